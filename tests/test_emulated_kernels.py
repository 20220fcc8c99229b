"""The row and elementwise CUDA kernels (RMSNorm, RoPE, SiLU-and-mul, embedding, argmax) run on
the CPU emulator against the float64 oracle, as tests/test_kernels_gpu.py does on a GPU, at sizes
the emulator runs quickly. Both the 16-byte vector path and the scalar path (misaligned or odd
sizes) are covered; outputs are poisoned (NaN, -7 for ids).

Tolerance (STYLE.md): max |kernel - oracle| <= 2 x max |torch path - oracle| + one ulp of the
largest reference value; discrete results are compared exactly.
"""
from __future__ import annotations

import pytest
import torch

import kernel_checks
from kernel_checks import assert_matches_oracle
from oracle import ops as oracle_ops
from oracle import rope as oracle_rope
from edgespec import errors, ops
from edgespec.ops import _kernels

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulated_kernels")]

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [1, 19, 99]


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return kernel_checks.randn(*shape, dtype=dtype, seed=seed, device="cpu", scale=scale, shift=shift)


def misaligned(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return kernel_checks.misaligned(shape, dtype, seed, "cpu")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("hidden", [111, 576])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(rows: int, hidden: int, dtype: torch.dtype, residual: bool) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=rows * hidden, scale=3.0, shift=0.5)
    weight = randn(hidden, dtype=dtype, seed=hidden, scale=0.3, shift=1.0)
    r = randn(rows, hidden, dtype=dtype, seed=7 + rows, scale=2.0) if residual else None
    got = _kernels.rms_norm(x, weight, 1e-6, r)
    want = ops.rms_norm(x, weight, 1e-6, r)  # CPU tensors: the torch path
    if not residual:
        assert_matches_oracle("out", got, want, oracle_ops.rms_norm(x, weight, 1e-6))
        return
    (y, s), (y_torch, s_torch) = got, want
    assert torch.equal(s, s_torch)  # x + residual rounded once: exact
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-6))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["row-stride", "misaligned", "3d"])
def test_rms_norm_layouts(layout: str, dtype: torch.dtype) -> None:
    hidden = 576
    if layout == "row-stride":
        x = randn(19, hidden + 64, dtype=dtype, seed=1)[:, :hidden]
        r = randn(19, hidden + 8, dtype=dtype, seed=2)[:, 8:]
    elif layout == "misaligned":
        x, r = misaligned((19, hidden), dtype, 1), misaligned((19, hidden), dtype, 2)
    else:
        x, r = randn(3, 7, hidden, dtype=dtype, seed=1), randn(3, 7, hidden, dtype=dtype, seed=2)
    weight = randn(hidden, dtype=dtype, seed=3, scale=0.3, shift=1.0)
    y, s = _kernels.rms_norm(x, weight, 1e-5, r)
    y_torch, s_torch = ops.rms_norm(x, weight, 1e-5, r)
    assert torch.equal(s, s_torch)
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-5))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_bits_do_not_depend_on_alignment(dtype: torch.dtype, residual: bool) -> None:
    # The same rows, 16-byte aligned (vector accesses) and one element off (scalar accesses), are
    # summed in the same order: bit-identical results.
    x, r, w = (randn(19, 576, dtype=dtype, seed=s) for s in (1, 2, 3))
    odd = [misaligned((19, 576), dtype, 0).copy_(t) for t in (x, r)]
    odd_w = misaligned((576,), dtype, 0).copy_(w[0])
    aligned = _kernels.rms_norm(x, w[0], 1e-6, r if residual else None)
    shifted = _kernels.rms_norm(odd[0], odd_w, 1e-6, odd[1] if residual else None)
    for a, b in zip(aligned if residual else [aligned], shifted if residual else [shifted]):
        assert torch.equal(a, b)


ROPE_SHAPES = [(9, 3, 64, 64), (8, 2, 128, 64), (4, 2, 80, 20)]  # SmolLM2, partial rotary, scalar path


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "q{}k{}d{}r{}".format(*s))
@pytest.mark.parametrize("tokens", [1, 19])
def test_rope(tokens: int, shape: tuple[int, int, int, int], dtype: torch.dtype, pos_dtype: torch.dtype) -> None:
    hq, hk, d, r = shape
    table = ops.build_rope_table(r, 10000.0, 4096, device="cpu")
    q = randn(tokens, hq, d, dtype=dtype, seed=tokens + d)
    k = randn(tokens, hk, d, dtype=dtype, seed=tokens + d + 1)
    positions = torch.randint(0, 4096, (tokens,), generator=torch.Generator().manual_seed(tokens)).to(pos_dtype)
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    q_torch, k_torch = ops.apply_rope(q, k, positions, table)
    pos = positions.long()
    cos, sin = table.cos[pos], table.sin[pos]
    assert_matches_oracle("q", q_out, q_torch, oracle_rope.apply_rope(q, cos, sin))
    assert_matches_oracle("k", k_out, k_torch, oracle_rope.apply_rope(k, cos, sin))
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


def test_rope_on_fused_qkv_views_and_out_of_range_positions() -> None:
    tokens, hq, hk, d = 19, 9, 3, 64
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=torch.bfloat16, seed=5)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    table = ops.build_rope_table(d, 10000.0, 64, device="cpu")
    positions = torch.arange(40, 40 + tokens)
    positions[3] = 64  # outside the table: NaN, never an out-of-bounds read
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    ok = torch.ones(tokens, dtype=torch.bool)
    ok[3] = False
    q_torch, k_torch = ops.apply_rope(q[ok], k[ok], positions[ok], table)
    assert torch.allclose(q_out[ok].float(), q_torch.float(), atol=2e-2)
    assert torch.allclose(k_out[ok].float(), k_torch.float(), atol=2e-2)
    assert bool(torch.isnan(q_out[3]).all()) and bool(torch.isnan(k_out[3]).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("inter", [111, 1536])
@pytest.mark.parametrize("layout", ["contiguous", "row-stride", "misaligned"])
def test_silu_and_mul(inter: int, layout: str, dtype: torch.dtype) -> None:
    if layout == "contiguous":
        x = randn(19, 2 * inter, dtype=dtype, seed=inter, scale=3.0)
    elif layout == "row-stride":
        x = randn(19, 2 * inter + 64, dtype=dtype, seed=1, scale=3.0)[:, 32: 32 + 2 * inter]
    else:
        x = misaligned((19, 2 * inter), dtype, 1)
    got = _kernels.silu_and_mul(x)
    assert_matches_oracle("out", got, ops.silu_and_mul(x), oracle_ops.silu_and_mul(x))


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("vocab,hidden", [(1000, 111), (5000, 576)])
def test_embedding(vocab: int, hidden: int, dtype: torch.dtype, id_dtype: torch.dtype) -> None:
    table = randn(vocab, hidden, dtype=dtype, seed=vocab)
    ids = torch.randint(0, vocab, (19,), generator=torch.Generator().manual_seed(vocab)).to(id_dtype)
    ids[0] = vocab - 1
    for scale in (1.0, 12.0):
        assert torch.equal(_kernels.embedding(ids, table, scale), ops.embedding(ids, table, scale))
    out = _kernels.embedding(torch.tensor([3, vocab, -1], dtype=id_dtype), table, 1.0)
    assert torch.equal(out[0], table[3]) and bool(torch.isnan(out[1:]).all())


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("vocab", [111, 49152])
def test_argmax(vocab: int, dtype: torch.dtype) -> None:
    rows = 5
    logits = randn(rows, vocab, dtype=dtype, seed=vocab, scale=4.0)
    top = logits.float().max(dim=1).values + 1.0
    cols = torch.randint(0, vocab, (rows, 3), generator=torch.Generator().manual_seed(vocab))
    logits.scatter_(1, cols, top.unsqueeze(1).expand(rows, 3).contiguous().to(dtype))  # ties: lowest wins
    got = _kernels.argmax(logits)
    assert torch.equal(got, cols.min(dim=1).values)
    assert torch.equal(_kernels.argmax(misaligned((rows, vocab), dtype, 4)), misaligned((rows, vocab), dtype, 4).argmax(-1))


def test_argmax_nan_inf_and_ties() -> None:
    logits = randn(5, 1000, dtype=torch.float32, seed=0)
    logits[0, 700] = float("nan")
    logits[0, 300] = float("nan")
    logits[1, :] = float("-inf")
    logits[2, 10] = float("inf")
    logits[2, 20] = float("inf")
    logits[3, 999] = float("nan")
    logits[3, 5] = float("inf")
    logits[4, :] = 1.0
    for dtype in FLOATS:
        assert _kernels.argmax(logits.to(dtype)).tolist() == [300, 0, 10, 999, 0]


def test_cpp_rechecks_what_python_sends() -> None:
    C = _kernels._module()
    x = randn(19, 576, dtype=torch.bfloat16, seed=0)
    out = torch.empty(19, 575, dtype=torch.bfloat16)
    with pytest.raises(errors.KernelError, match=r"^rms_norm: invalid argument: out has shape \[19, 575\]"):
        _kernels._run(C.rms_norm, _kernels._view(x), _kernels._view(x[0]), None, _kernels._view(out), None,
                      1e-6, _kernels._stream(x))
