"""The row-invariant dense GEMM (csrc/kernels/dense_gemm.h) against the float64 oracle.

One body per check for both targets (the `kernel_device` fixture): the CPU emulator (`emulated`)
and a GPU (`gpu`, skipped without one). Random inputs and weights, odd and real model shapes
(SmolLM2-135M and Llama layers, q|k|v and gate|up fused as the loader fuses them, an LM head),
M in {1, 2, 7, 16, 33, 64}, bf16 and fp16, bias, strided inputs, forced
split-K; outputs and scratch poisoned with NaN. Tolerance (w4a16_cases.py): max |kernel - oracle|
<= 2 x max |torch at the same precision - oracle| + one ulp of the largest reference value.

The property the kernel exists for: a row's bits do not depend on the rows it comes with.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.errors import KernelError
from edgespec.ops import _kernels
from kernel_checks import assert_schedule_independent, device_cases
from w4a16_cases import _check

DTYPES = [torch.bfloat16, torch.float16]


def _operands(m: int, k: int, n: int, dtype: torch.dtype, seed: int, device: torch.device, bias: bool = False):
    g = torch.Generator(device).manual_seed(seed)  # made on the device: an 8B LM head is 0.5G values
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, w, b


def _oracle(x, w, b, dtype):
    """(float64 reference, torch at `dtype` on x's device), both float64 on the CPU."""
    ref = (x.double() @ w.double().t()).cpu()  # on the device: an 8B LM head in float64 is 4 GB
    low = (x @ w.t()).double().cpu()
    if b is not None:
        ref, low = ref + b.double().cpu(), low + b.double().cpu()
    return ref, low


# (name, K, N): odd small shapes, then real layers (on the emulator a few rows each).
SHAPES = device_cases(
    emulated=[("odd", 48, 192, m) for m in (1, 7, 33)] + [("odd-wide", 112, 640, 64), ("smollm2 qkv", 576, 960, 2),
                                                           ("smollm2 down", 1536, 576, 16), ("smollm2 lm head", 576, 49152, 1)],
    gpu=[(name, k, n, m) for name, k, n in [("odd", 48, 192), ("smollm2 qkv", 576, 960), ("smollm2 down", 1536, 576),
                                             ("llama3-1b qkv", 2048, 3072), ("llama3-1b gate|up", 2048, 16384),
                                             ("llama3-8b o", 4096, 4096), ("llama3-8b down", 14336, 4096)]
         for m in (1, 2, 7, 16, 33, 64)] + [("llama3-8b lm head", 4096, 128256, m) for m in (1, 64)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel_device, name, k, n, rows", SHAPES, indirect=["kernel_device"])
def test_kernel_matches_oracle(kernel_device, name: str, k: int, n: int, rows: int, dtype: torch.dtype) -> None:
    x, w, b = _operands(rows, k, n, dtype, k + n + rows, kernel_device, bias=rows % 2 == 1)
    _check(_kernels.dense_linear(x, w, b), *_oracle(x, w, b, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forced_splits_agree(kernel_device, dtype: torch.dtype) -> None:
    k, n, rows = 576, 320, 5  # 36 k16 tiles: 7 splits leave an empty one, 36 one tile each
    x, w, b = _operands(rows, k, n, dtype, 3, kernel_device, bias=True)
    ref, low = _oracle(x, w, b, dtype)
    for splits in (1, 2, 3, 7, 36):
        first = _kernels.dense_linear(x, w, b, splits=splits)
        _check(first, ref, low, dtype)
        assert torch.equal(first, _kernels.dense_linear(x, w, b, splits=splits)), f"splits={splits}: not deterministic"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_a_row_gets_the_same_bits_whatever_rows_come_with_it(kernel_device, dtype: torch.dtype) -> None:
    """What makes greedy speculative output equal plain output: a token decoded alone (M = 1) and
    the same token among the rows of a verified tree (any M, any position) are bitwise equal; the
    planned split-K (here > 1) is the same for every M."""
    k, n = 2048, 640
    assert _kernels.w4a16_splits(n, k, kernel_device) > 1
    x, w, b = _operands(64, k, n, dtype, 21, kernel_device, bias=True)
    picks = (0, 6, 17, 32, 48, 63)
    alone = {i: _kernels.dense_linear(x[i:i + 1], w, b) for i in picks}
    for rows in (7, 18, 33, 49, 64):  # one to four m16 tiles
        many = _kernels.dense_linear(x[:rows], w, b)
        for i in picks:
            if i < rows:
                assert torch.equal(many[i:i + 1], alone[i]), f"row {i} of {rows}"
    # Trees past 64 tokens: 64-row launches, the row at 64 + i landing where row i would.
    wide = _kernels.dense_linear(torch.cat([x, x[:37]]), w, b)
    for i in picks:
        assert torch.equal(wide[i:i + 1], alone[i]), f"row {i} of 101"
        if i < 37:
            assert torch.equal(wide[64 + i:65 + i], alone[i]), f"row {64 + i} of 101"


def test_strided_rows_and_leading_dims(kernel_device) -> None:
    dtype = torch.bfloat16
    base = _operands(9, 136, 64, dtype, 5, kernel_device)[0]
    w = _operands(1, 128, 128, dtype, 6, kernel_device)[1]
    x = base[:, 8:]  # row stride 136: read in place
    _check(_kernels.dense_linear(x, w), *_oracle(x, w, None, dtype), dtype)
    odd = base[:, 1:129]  # misaligned rows: copied first
    _check(_kernels.dense_linear(odd, w), *_oracle(odd, w, None, dtype), dtype)
    out = _kernels.dense_linear(x.reshape(3, 3, 128), w)
    assert out.shape == (3, 3, 128)
    assert _kernels.dense_linear(x[:0], w).shape == (0, 128)


def test_rejections_and_cpp_checks(kernel_device) -> None:
    x, w, b = _operands(3, 64, 128, torch.float16, 1, kernel_device, bias=True)
    assert "multiple of 64" in _kernels.dense_rejection(x, w[:100])
    assert "multiple of 16" in _kernels.dense_rejection(x[:, :40], w[:, :40])
    assert "dtype" in _kernels.dense_rejection(x, w.bfloat16())
    assert _kernels.dense_rejection(torch.zeros(128, 64, dtype=x.dtype, device=x.device), w) is None
    assert "cuBLAS" in _kernels.dense_rejection(torch.zeros(129, 64, dtype=x.dtype, device=x.device), w)
    assert "float16" in _kernels.dense_rejection(x.float(), w.float())
    with pytest.raises(ValueError, match="dense_linear"):
        _kernels.dense_linear(x, w[:100])
    # The C++ entry point re-checks what Python sent.
    out = torch.empty(3, 128, dtype=x.dtype, device=x.device)
    module = _kernels._module()
    with pytest.raises(KernelError, match="partial"):
        _kernels._run(module.dense_gemm, _kernels._view(x), _kernels._view(w), None, _kernels._view(out), None, None,
                      2, _kernels._stream(x))
    with pytest.raises(KernelError, match="weight"):
        _kernels._run(module.dense_gemm, _kernels._view(x), _kernels._view(w[:, :32]), None, _kernels._view(out),
                      None, None, 1, _kernels._stream(x))
    with pytest.raises(KernelError, match="out"):
        _kernels._run(module.dense_gemm, _kernels._view(x), _kernels._view(w), None, _kernels._view(x), None, None,
                      1, _kernels._stream(x))


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_thread_order_does_not_change_the_result(monkeypatch) -> None:
    x, w, b = _operands(20, 512, 192, torch.bfloat16, 8, torch.device("cpu"), bias=True)
    assert_schedule_independent(lambda: _kernels.dense_linear(x, w, b, splits=3), monkeypatch)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_ops_linear_takes_the_kernel_for_few_rows(monkeypatch) -> None:
    calls = []
    real = _kernels.dense_linear
    monkeypatch.setattr(_kernels, "dense_linear", lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    x, w, b = _operands(129, 64, 128, torch.bfloat16, 2, torch.device("cpu"), bias=True)
    ops.linear(x[:5], w, b)
    ops.linear(x[:65], w, b)      # a 65-token tree: two launches
    ops.linear(x, w, b)           # a 129-token prefill chunk: cuBLAS (here the CPU's BLAS)
    ops.linear(x[:5, :48], w[:100, :48])  # N not a multiple of 64: the torch path
    assert calls == [5, 65]
    monkeypatch.setenv("EDGESPEC_ROW_INVARIANT", "0")
    ops.linear(x[:5], w, b)
    assert calls == [5, 65]
    monkeypatch.setenv("EDGESPEC_ROW_INVARIANT", "maybe")
    with pytest.raises(ValueError, match="EDGESPEC_ROW_INVARIANT"):
        ops.linear(x[:5], w, b)
