"""The W4A16 CUDA kernel (csrc/kernels/w4a16.h) against the float64 oracle, on a GPU.

Marked `gpu`: skipped automatically without a CUDA device or the compiled extension. Run with

    pip install --no-build-isolation -C cmake.define.EDGESPEC_CUDA_ARCHS=90a-real .   # H100/H200
    python -m pytest -q tests/test_w4a16_gpu.py

Conventions (STYLE.md): random inputs and weights (never zeros); odd and real model shapes
(SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B layers), M in {1, 2, 7, 16, 33, 64}; outputs and split-K
scratch poisoned with NaN before every launch; tolerance max |kernel - oracle| <= k * max |torch at
the same precision - oracle| + one ulp of the largest reference value, where "torch at the same
precision" multiplies the same activations by the dequantised weights rounded to the dtype.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import errors
from edgespec.ops import _kernels
from edgespec.quant import QuantLinear
from w4a16_cases import K_TORCH, _check, _oracle, _weight

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_kernel_outputs")]

DTYPES = [torch.bfloat16, torch.float16]
ROWS = [1, 2, 7, 16, 33, 64]
# (name, K, N): odd small shapes and real layers (q|k|v and gate|up fused as the loader fuses them).
SHAPES = [("odd", 48, 192), ("odd-wide", 112, 640), ("smollm2 qkv", 576, 960), ("smollm2 down", 1536, 576),
          ("llama3-1b qkv", 2048, 3072), ("llama3-1b down", 8192, 2048), ("llama3-8b o", 4096, 4096)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name,k,n", SHAPES)
def test_kernel_matches_oracle(name: str, k: int, n: int, rows: int, dtype: torch.dtype) -> None:
    w = _weight(k, n, 128 if k % 128 == 0 else 32, "int", seed=k * 7 + n)
    lin = w.to_linear(device="cuda", dtype=dtype)
    assert lin.weight.layout == "tile" and _kernels.supports_w4a16(torch.empty(rows, k, dtype=dtype, device="cuda"),
                                                                    lin.weight)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    out = _kernels.w4a16_linear(x, lin.weight)
    assert out.shape == (rows, n) and out.dtype == dtype
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,zeros", [(32, "sym"), (32, "frac"), (64, "int"), (128, "sym"), (-1, "int"),
                                         (-1, "sym"), (96, "int"), (128, "frac")])
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_group_sizes_and_zero_points(group: int, zeros: str, rows: int, dtype: torch.dtype) -> None:
    k, n = 576, 192  # K % 128 != 0: group 128 has a partial last group
    w = _weight(k, n, group, zeros, seed=group + rows)
    lin = w.to_linear(device="cuda", dtype=dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    out = _kernels.w4a16_linear(x, lin.weight)
    # Fractional zero points (GGUF Q4_1) round (q - z) before the scale: a second rounding.
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype, k_torch=4.0 if zeros == "frac" else K_TORCH)


@pytest.mark.parametrize("dtype", DTYPES)
def test_splits_agree_and_are_deterministic(dtype: torch.dtype) -> None:
    k, n, rows = 2048, 1024, 5
    w = _weight(k, n, 128, "int", seed=3)
    lin = w.to_linear(device="cuda", dtype=dtype)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    ref, low = _oracle(x.float(), w, lin, dtype)
    for splits in (1, 2, 3, 7, 16, k // 16):
        first = _kernels.w4a16_linear(x, lin.weight, splits=splits)
        _check(first, ref, low, dtype)
        again = _kernels.w4a16_linear(x, lin.weight, splits=splits)
        assert torch.equal(first, again), f"splits={splits}: two identical calls differ"
    # The arrival counters are left at zero for the next call.
    assert int(lin.weight._counters.abs().sum()) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_act_order_and_strided_input(dtype: torch.dtype) -> None:
    k, n, rows = 512, 320, 9
    w = _weight(k, n, 64, "int", seed=5, g_idx=True)
    bias = torch.randn(n)
    lin = w.to_linear(bias, device="cuda", dtype=dtype)
    assert lin.weight.perm is not None
    base = torch.randn(rows, k + 3, device="cuda", dtype=dtype)
    x = base[:, 1:k + 1]  # misaligned, strided rows: the boundary copies them
    out = lin(x)
    ref, low = _oracle(x.float(), w, lin, dtype)
    b = lin.bias.double().cpu()
    _check(out, ref + b, low + b, dtype)


@pytest.mark.parametrize("rows", [65, 100, 256])
def test_more_than_64_rows_run_in_chunks(rows: int) -> None:
    dtype = torch.bfloat16
    w = _weight(1024, 512, 128, "sym", seed=rows)
    lin = w.to_linear(device="cuda", dtype=dtype)
    x = torch.randn(rows, 1024, device="cuda", dtype=dtype)
    out = _kernels.w4a16_linear(x, lin.weight)
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)


def test_op_routes_supported_shapes_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = _kernels.w4a16_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(_kernels, "w4a16_linear", spy)
    lin = _weight(256, 128, 32, "int", seed=1).to_linear(device="cuda", dtype=torch.bfloat16)
    lin(torch.randn(3, 256, device="cuda", dtype=torch.bfloat16))
    assert calls == [(3, 256)]
    # Rows past the chunked limit, fp32 activations, and N % 64 != 0 take the torch path.
    lin(torch.randn(_kernels.W4A16_MAX_CHUNKED_ROWS + 1, 256, device="cuda", dtype=torch.bfloat16))
    lin.to(dtype=torch.float32)(torch.randn(2, 256, device="cuda"))
    odd = _weight(256, 96, 32, "int", seed=2).to_linear(device="cuda", dtype=torch.bfloat16)
    assert odd.weight.layout == "plain"
    y = odd(torch.randn(2, 256, device="cuda", dtype=torch.bfloat16))
    assert len(calls) == 1 and torch.isfinite(y).all()


def test_cpp_rechecks_views() -> None:
    """The binding re-checks what Python validated: a view that lies about its shape is refused."""
    from edgespec.ops.backend import compiled_module

    C = compiled_module()
    lin = _weight(256, 128, 32, "sym", seed=4).to_linear(device="cuda", dtype=torch.float16)
    x = torch.randn(2, 256, device="cuda", dtype=torch.float16)
    out = torch.empty(2, 128, device="cuda", dtype=torch.float16)
    stream = torch.cuda.current_stream().cuda_stream
    bad_scales = torch.ones(3, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(C.KernelError, match=r"scales: dim 0 has size 3, expected 8"):
        C.w4a16_gemm(_kernels._view(x), _kernels._view(lin.weight.qweight), _kernels._view(bad_scales), None, None,
                     _kernels._view(out), None, None, 32, 1, stream)
    with pytest.raises(C.KernelError, match="needs the partial and counters"):
        C.w4a16_gemm(_kernels._view(x), _kernels._view(lin.weight.qweight), _kernels._view(lin.weight.scales), None,
                     None, _kernels._view(out), None, None, 32, 2, stream)
    with pytest.raises(errors.KernelError):
        _kernels._run(C.w4a16_gemm, _kernels._view(x), _kernels._view(lin.weight.qweight), _kernels._view(bad_scales),
                      None, None, _kernels._view(out), None, None, 32, 1, stream)


def test_quantized_smollm2_on_gpu(demo_gguf) -> None:
    """The demo model imported 4-bit from its Q4_1 blocks decodes through the kernel to the same
    greedy tokens as the torch path (dequantise + cuBLAS) and nearly the same logits."""
    import os

    from edgespec.loading import load_model

    model = load_model(demo_gguf, device="cuda", dtype=torch.bfloat16, max_context=128, with_tokenizer=False,
                       quantized=True).model
    assert isinstance(model.layers[0].qkv, QuantLinear) and model.layers[0].qkv.weight.layout == "tile"
    tokens = torch.tensor([1, 504, 3458, 314, 260, 1345, 30, 2, 77, 1000], device="cuda")

    def logits() -> torch.Tensor:
        out = model.forward(tokens, torch.arange(tokens.numel(), device="cuda"), model.new_cache(64), 0)
        return model.logits(out.hidden)

    with torch.no_grad():
        ours = logits()
        os.environ["EDGESPEC_BACKEND"] = "torch"
        try:
            ref = logits()
        finally:
            del os.environ["EDGESPEC_BACKEND"]
    assert torch.isfinite(ours).all()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) > 0.999
