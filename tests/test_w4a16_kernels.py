"""The W4A16 GEMM kernel (csrc/kernels/w4a16.h) against the float64 oracle.

One body per check for both targets (the `kernel_device` fixture): the CPU emulator (`emulated`)
and a GPU (`gpu`, skipped without one; on a GPU: `python -m pytest -q -m gpu
tests/test_w4a16_kernels.py` after `pip install --no-build-isolation -C
cmake.define.EDGESPEC_CUDA_ARCHS=90a-real .`). The kernel, its launcher, its C++ checks and the
Python entry point are the real ones on both.

Conventions (STYLE.md): random inputs and weights (never zeros); odd and real model shapes
(SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B layers, q|k|v and gate|up fused as the loader fuses
them), M in {1, 2, 7, 16, 33, 64}; bf16/fp16, symmetric and zero-point weights, every group size
the kernel takes, bias, act-order, strided inputs, forced split-K (last-block reduction, empty
splits), row chunking; outputs and split-K scratch poisoned with NaN before every launch.
Tolerance (w4a16_cases.py): max |kernel - oracle| <= k * max |torch at the same precision -
oracle| + one ulp of the largest reference value, k = 2 (4 for fractional zero points, which
round q - z before the scale).
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

from edgespec import errors, ops
from edgespec.ops import _kernels, backend
from edgespec.quant import QuantLinear
from w4a16_cases import K_TORCH, _check, _oracle, _weight

DTYPES = [torch.bfloat16, torch.float16]
ROWS = [1, 2, 7, 16, 33, 64]
# (name, K, N): odd small shapes (N = 192: one-column-tile blocks; 640: two-tile blocks) and the
# SmolLM2-135M layers (q|k|v fused; down: K = 1536, N = 576).
SHAPES = [("odd", 48, 192), ("odd-wide", 112, 640), ("smollm2 qkv", 576, 960), ("smollm2 down", 1536, 576)]
# Llama layers: every M on a GPU; on the emulator two of them at three M (seconds each there).
LLAMA_SHAPES = [("llama3-1b qkv", 2048, 3072), ("llama3-1b down", 8192, 2048), ("llama3-8b o", 4096, 4096)]
LLAMA_ON_EMULATOR = {(k, n, rows) for k, n in ((2048, 3072), (4096, 4096)) for rows in (1, 16, 64)}


def _tile_linear(k: int, n: int, group: int, zeros: str, dtype: torch.dtype, seed: int, device: torch.device,
                 bias: bool = False, g_idx: bool = False):
    """(Int4Weight, QuantLinear on `device` in the kernel's tile layout)."""
    w = _weight(k, n, group, zeros, seed=seed, g_idx=g_idx)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    lin = w.to_linear(b, device=device, dtype=dtype, layout_name="tile")
    assert lin.weight.layout == "tile"
    return w, lin


def _x(rows: int, k: int, dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randn(rows, k, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _counters_clear(lin: QuantLinear) -> None:
    """The split-K arrival counters of the weight's width (on every stream) are back at zero."""
    for (_, _, tiles), counters in _kernels._split_counters.items():
        if tiles == lin.weight.out_features // 64:
            assert int(counters.abs().sum()) == 0, f"arrival counters left at {counters.tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name,k,n", SHAPES)
def test_kernel_matches_oracle(kernel_device, name: str, k: int, n: int, rows: int, dtype: torch.dtype) -> None:
    # The planned split count (132 SMs on the emulator): M = 1 on these shapes splits K 3 to 24 ways.
    w, lin = _tile_linear(k, n, 128 if k % 128 == 0 else 32, "int", dtype, seed=k * 7 + n, device=kernel_device)
    x = _x(rows, k, dtype, seed=rows, device=kernel_device)
    assert _kernels.supports_w4a16(x, lin.weight)
    out = _kernels.w4a16_linear(x, lin.weight)
    assert out.shape == (rows, n) and out.dtype == dtype
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)
    _counters_clear(lin)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name,k,n", LLAMA_SHAPES)
def test_llama_shapes(kernel_device, name: str, k: int, n: int, rows: int, dtype: torch.dtype) -> None:
    if kernel_device.type == "cpu" and ((k, n, rows) not in LLAMA_ON_EMULATOR or dtype != torch.bfloat16):
        pytest.skip("the emulator runs two Llama layers at three M, bf16")
    w, lin = _tile_linear(k, n, 128, "int", dtype, seed=k + n, device=kernel_device)
    x = _x(rows, k, dtype, seed=rows, device=kernel_device)
    _check(_kernels.w4a16_linear(x, lin.weight), *_oracle(x.float(), w, lin, dtype), dtype)
    _counters_clear(lin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group,zeros", [(32, "sym"), (32, "frac"), (64, "int"), (128, "sym"), (-1, "int"),
                                         (-1, "sym"), (96, "int"), (128, "frac")])
@pytest.mark.parametrize("rows", [1, 16, 33])
def test_group_sizes_and_zero_points(kernel_device, group: int, zeros: str, rows: int, dtype: torch.dtype) -> None:
    k, n = 576, 192  # K % 128 != 0: group 128 has a partial last group
    w, lin = _tile_linear(k, n, group, zeros, dtype, seed=group + rows, device=kernel_device)
    x = _x(rows, k, dtype, seed=group * rows, device=kernel_device)
    out = _kernels.w4a16_linear(x, lin.weight)
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype, k_torch=4.0 if zeros == "frac" else K_TORCH)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,group,splits", [
    (48, -1, 1),    # per-channel with K not a multiple of 32, one partial stage
    (48, -1, 3),
    (48, 128, 2),   # group larger than K: one group (the launcher clamps it to K)
    (288, 32, 2),   # split 1 starts at row 144: its first 128-row stage spans 5 groups (the maximum)
    (288, 96, 3),
])
def test_small_k_and_group_boundaries(kernel_device, k: int, group: int, splits: int, dtype: torch.dtype) -> None:
    n, rows = 128, 3
    w, lin = _tile_linear(k, n, group, "int", dtype, seed=k + group, device=kernel_device)
    x = _x(rows, k, dtype, seed=splits, device=kernel_device)
    out = _kernels.w4a16_linear(x, lin.weight, splits=splits)
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)
    _counters_clear(lin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_splits_agree_and_are_deterministic(kernel_device, dtype: torch.dtype) -> None:
    k, n, rows = 576, 320, 5  # 36 k16 tiles, 5 one-tile column blocks
    w, lin = _tile_linear(k, n, 64, "int", dtype, seed=3, device=kernel_device)
    x = _x(rows, k, dtype, seed=3, device=kernel_device)
    ref, low = _oracle(x.float(), w, lin, dtype)
    # 7 splits of 6 tiles leave split 6 empty (it still writes zero partials and takes a ticket);
    # 36: one k16 tile per split, fewer than a stage.
    for splits in (1, 2, 3, 5, 7, 16, 36):
        first = _kernels.w4a16_linear(x, lin.weight, splits=splits)
        _check(first, ref, low, dtype)
        again = _kernels.w4a16_linear(x, lin.weight, splits=splits)
        assert torch.equal(first, again), f"splits={splits}: two identical calls differ"
        _counters_clear(lin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_split_k_at_64_rows_with_bias(kernel_device, dtype: torch.dtype) -> None:
    k, n, rows = 1024, 256, 64  # 4 m16 tiles, two-tile column blocks, 8 stages of 128 rows
    w, lin = _tile_linear(k, n, 128, "sym", dtype, seed=11, device=kernel_device, bias=True)
    x = _x(rows, k, dtype, seed=11, device=kernel_device)
    ref, low = _oracle(x.float(), w, lin, dtype)
    b = lin.bias.double().cpu()
    for splits in (1, 3, 4):
        out = _kernels.w4a16_linear(x, lin.weight, lin.bias, splits=splits)
        _check(out, ref + b, low + b, dtype)
    _counters_clear(lin)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_act_order_and_strided_input(kernel_device, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through QuantLinear and ops.w4a16_linear, which take the kernel path (for the emulator's CPU
    tensors once they count as CUDA tensors); act-order gathers x's columns, misaligned strided
    rows are copied, aligned strided rows are read in place."""
    calls = []
    real = _kernels.w4a16_linear

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)
    monkeypatch.setattr(_kernels, "w4a16_linear", spy)
    k, n, rows = 512, 320, 9
    w, lin = _tile_linear(k, n, 64, "int", dtype, seed=5, device=kernel_device, bias=True, g_idx=True)
    assert lin.weight.perm is not None
    base = _x(rows, k + 3, dtype, seed=5, device=kernel_device)
    x = base[:, 1:k + 1]  # misaligned, strided rows
    out = lin(x)
    assert calls == [(rows, k)]
    ref, low = _oracle(x.float(), w, lin, dtype)
    b = lin.bias.double().cpu()
    _check(out, ref + b, low + b, dtype)
    wide = _x(rows, k + 8, dtype, seed=6, device=kernel_device)
    x = wide[:, :k]  # row stride k + 8: read in place, here with split-K
    out = real(x, lin.weight, lin.bias, splits=4)
    ref, low = _oracle(x.float(), w, lin, dtype)
    _check(out, ref + b, low + b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it(kernel_device, dtype: torch.dtype) -> None:
    """Row invariance (w4a16.h): the planned split-K does not depend on M, so a token decoded
    alone (M = 1) and the same token among the rows of a verified tree get bitwise the same
    projection. The shape splits K on the emulator's SM count and on a GPU's."""
    k, n = 2048, 640
    assert _kernels.w4a16_splits(n, k, kernel_device) > 1
    w, lin = _tile_linear(k, n, 128, "int", dtype, seed=21, device=kernel_device, bias=True)
    x = _x(100, k, dtype, seed=21, device=kernel_device)
    alone = torch.cat([_kernels.w4a16_linear(x[i:i + 1], lin.weight, lin.bias) for i in (0, 6, 32, 63, 64, 99)])
    for rows in (7, 33, 64, 100):  # one, three and four m16 tiles; 100: two launches
        many = _kernels.w4a16_linear(x[:rows], lin.weight, lin.bias)
        for j, i in enumerate((0, 6, 32, 63, 64, 99)):
            if i < rows:
                assert torch.equal(many[i], alone[j]), f"row {i} of {rows}"
    _counters_clear(lin)


@pytest.mark.parametrize("rows", [65, 100, 256])
def test_more_than_64_rows_run_in_chunks(kernel_device, rows: int) -> None:
    dtype = torch.bfloat16
    w, lin = _tile_linear(256, 128, 128, "sym", dtype, seed=rows, device=kernel_device)
    x = _x(rows, 256, dtype, seed=rows, device=kernel_device)
    out = _kernels.w4a16_linear(x, lin.weight, splits=2)  # the counters serve every chunk in turn
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)
    _counters_clear(lin)


def test_leading_dims_and_zero_rows(kernel_device) -> None:
    dtype = torch.float16
    w, lin = _tile_linear(128, 64, 32, "frac", dtype, seed=9, device=kernel_device)
    x = _x(6, 128, dtype, seed=9, device=kernel_device).view(2, 3, 128)
    out = _kernels.w4a16_linear(x, lin.weight)
    assert out.shape == (2, 3, 64)
    _check(out.view(6, 64), *_oracle(x.view(6, 128).float(), w, lin, dtype), dtype, k_torch=4.0)
    empty = _kernels.w4a16_linear(torch.empty(0, 128, dtype=dtype, device=kernel_device), lin.weight)
    assert empty.shape == (0, 64)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
@pytest.mark.parametrize("schedule", ["reverse", "random:7", "random:2024", "serial", "serial-reverse"])
def test_emulated_thread_order_does_not_change_the_result(schedule: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulator only. A race (a stage read before its copy landed, a slot overwritten while read,
    the split-K arrival) shows as a result that depends on the order threads and blocks run in."""
    dtype, cpu = torch.bfloat16, torch.device("cpu")
    # 2 m16 tiles (a 4-stage pipeline); 2 splits of 6 stages each, so stages are loaded into
    # slots that other warps just read (the write-after-read the serial schedules expose).
    k, n, rows = 1536, 256, 21
    w, lin = _tile_linear(k, n, 32, "int", dtype, seed=21, device=cpu)
    x = _x(rows, k, dtype, seed=21, device=cpu)
    forward = _kernels.w4a16_linear(x, lin.weight, splits=2)
    _check(forward, *_oracle(x.float(), w, lin, dtype), dtype)
    monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
    other = _kernels.w4a16_linear(x, lin.weight, splits=2)
    assert torch.equal(forward, other), f"CUEMU_SCHEDULE={schedule} changed the result: a race"
    _counters_clear(lin)


def test_cpp_rechecks_views(kernel_device) -> None:
    """The binding re-checks what Python validated: a view that lies about its shape is refused."""
    C = _kernels._module()
    view = _kernels._view
    _, lin = _tile_linear(256, 128, 32, "sym", torch.float16, seed=4, device=kernel_device)
    x = _x(2, 256, torch.float16, seed=4, device=kernel_device)
    out = torch.empty(2, 128, dtype=torch.float16, device=kernel_device)
    stream = _kernels._stream(x)
    bad_scales = torch.ones(3, 128, dtype=torch.float16, device=kernel_device)
    with pytest.raises(C.KernelError, match=r"scales: dim 0 has size 3, expected 8"):
        C.w4a16_gemm(view(x), view(lin.weight.qweight), view(bad_scales), None, None, view(out), None, None, 32, 1,
                     stream)
    with pytest.raises(C.KernelError, match="needs the partial and counters"):
        C.w4a16_gemm(view(x), view(lin.weight.qweight), view(lin.weight.scales), None, None, view(out), None, None,
                     32, 2, stream)
    with pytest.raises(C.KernelError, match="group_size 48"):
        C.w4a16_gemm(view(x), view(lin.weight.qweight), view(lin.weight.scales), None, None, view(out), None, None,
                     48, 1, stream)
    _, zlin = _tile_linear(256, 128, 32, "int", torch.float16, seed=4, device=kernel_device)
    z = zlin.weight.zeros
    with pytest.raises(C.KernelError, match="out overlaps zeros"):
        C.w4a16_gemm(view(x), view(zlin.weight.qweight), view(zlin.weight.scales), view(z), None, view(z[:2]), None,
                     None, 32, 1, stream)
    with pytest.raises(errors.KernelError):
        _kernels._run(C.w4a16_gemm, view(x), view(lin.weight.qweight), view(bad_scales), None, None, view(out), None,
                      None, 32, 1, stream)


def test_strided_scales_take_the_torch_path(kernel_device, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scales the kernel cannot read (a strided view) are rejected up front, so the op falls back to
    torch instead of raising the C++ check's KernelError."""
    monkeypatch.setattr(backend, "use_kernel", lambda *tensors: True)
    dtype = torch.bfloat16
    w, lin = _tile_linear(256, 128, 32, "int", dtype, seed=8, device=kernel_device)
    wide = torch.randn(lin.weight.scales.shape[0], 136, device=kernel_device).to(dtype)
    wide[:, :128] = lin.weight.scales
    strided = dataclasses.replace(lin.weight, scales=wide[:, :128])
    x = _x(3, 256, dtype, seed=8, device=kernel_device)
    assert "scales" in _kernels.w4a16_rejection(x, strided)
    out = ops.w4a16_linear(x, strided)
    _check(out, *_oracle(x.float(), w, lin, dtype), dtype)


# --- GPU only: the loader's layout choice and a real model --------------------------------------------

def test_op_routes_supported_shapes_to_the_kernel(kernel_device, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("the loader picks the tile layout, and the op the kernel, for CUDA tensors")
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


def test_quantized_smollm2_on_gpu(kernel_device, demo_gguf) -> None:
    """The demo model imported 4-bit from its Q4_1 blocks decodes through the kernel to the same
    greedy tokens as the torch path (dequantise + cuBLAS) and nearly the same logits."""
    if kernel_device.type != "cuda":
        pytest.skip("a whole model on the emulated kernels: test_emulated_model.py")
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
