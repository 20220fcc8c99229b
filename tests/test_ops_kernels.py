"""The row and elementwise CUDA kernels (RMSNorm, RoPE, SiLU-and-mul, embedding, argmax) against
the float64 oracle (tests/oracle).

One body per check for both targets (the `kernel_device` fixture, or `device_cases` where the
sizes differ): the CPU emulator (`emulated`) and a GPU (`gpu`, skipped without one; on a GPU:
`python -m pytest -q -m gpu tests/test_ops_kernels.py`).

Conventions (STYLE.md):
* random inputs, never zeros; odd sizes (1, 19, 99 rows, and 989 on a GPU; hidden 111) and real
  model shapes (hidden 576 / 4096, head dims 64 / 128, vocab 49152 / 128256); strided and
  misaligned inputs, which take the kernels' scalar (non-vectorised) path;
* every kernel output is poisoned (NaN, or -7 for ids) before the launch, so an element the kernel
  forgets to write fails the test;
* tolerance: max |kernel - oracle| <= k * max |torch at the same precision - oracle| + one ulp of
  the largest reference value (k = 2), the torch path run on the same device; discrete results
  (argmax, embedding rows, the residual stream) are compared exactly.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import kernel_checks
from kernel_checks import assert_matches_oracle, device_cases
from oracle import ops as oracle_ops
from oracle import rope as oracle_rope
from edgespec import errors, ops
from edgespec.ops import _kernels, sampling

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
ROWS_EMULATED = [1, 19, 99]
ROWS_GPU = [1, 19, 99, 989]


def on_torch_path(fn: Callable, *args, **kwargs):
    with pytest.MonkeyPatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        return fn(*args, **kwargs)


def gen(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, seed: int, device: torch.device, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    return kernel_checks.randn(*shape, dtype=dtype, seed=seed, device=device, scale=scale, shift=shift)


# --- RMSNorm -------------------------------------------------------------------------------------

RMS = device_cases(emulated=[(r, h) for r in ROWS_EMULATED for h in (111, 576)],
                   gpu=[(r, h) for r in ROWS_GPU for h in (111, 576, 4096)])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kernel_device, rows, hidden", RMS, indirect=["kernel_device"])
def test_rms_norm(kernel_device, rows: int, hidden: int, dtype: torch.dtype, residual: bool) -> None:
    dev = kernel_device
    x = randn(rows, hidden, dtype=dtype, seed=rows * hidden, device=dev, scale=3.0, shift=0.5)
    weight = randn(hidden, dtype=dtype, seed=hidden, device=dev, scale=0.3, shift=1.0)
    r = randn(rows, hidden, dtype=dtype, seed=7 + rows, device=dev, scale=2.0) if residual else None
    assert _kernels.supports_rms_norm(x, weight, r)
    got = _kernels.rms_norm(x, weight, 1e-6, r)
    want = on_torch_path(ops.rms_norm, x, weight, 1e-6, r)
    if not residual:
        assert_matches_oracle("out", got, want, oracle_ops.rms_norm(x, weight, 1e-6))
        return
    (y, s), (y_torch, s_torch) = got, want
    assert torch.equal(s, s_torch)  # x + residual rounded once: exact
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-6))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["row-stride", "misaligned", "3d", "3d-row-stride"])
def test_rms_norm_layouts(kernel_device, layout: str, dtype: torch.dtype) -> None:
    dev, hidden = kernel_device, 576
    if layout == "row-stride":
        x = randn(19, hidden + 64, dtype=dtype, seed=1, device=dev)[:, :hidden]
        r = randn(19, hidden + 8, dtype=dtype, seed=2, device=dev)[:, 8:]
    elif layout == "misaligned":
        x, r = (kernel_checks.misaligned((19, hidden), dtype, s, dev) for s in (1, 2))
    elif layout == "3d":
        x, r = randn(3, 7, hidden, dtype=dtype, seed=1, device=dev), randn(3, 7, hidden, dtype=dtype, seed=2, device=dev)
    else:
        # [3, 7, H] with a padded last dim still folds into rows of stride H + 16.
        x = randn(3, 7, hidden + 16, dtype=dtype, seed=1, device=dev)[..., :hidden]
        r = randn(3, 7, hidden, dtype=dtype, seed=2, device=dev)
        assert _kernels._rows(x) is not None
    weight = randn(hidden, dtype=dtype, seed=3, device=dev, scale=0.3, shift=1.0)
    assert _kernels.supports_rms_norm(x, weight, r)
    y, s = _kernels.rms_norm(x, weight, 1e-5, r)
    y_torch, s_torch = on_torch_path(ops.rms_norm, x, weight, 1e-5, r)
    assert y.shape == x.shape and s.shape == x.shape and y.is_contiguous() and s.is_contiguous()
    assert torch.equal(s, s_torch)
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-5))
    assert_matches_oracle("out (no residual)", _kernels.rms_norm(x, weight, 1e-5),
                          on_torch_path(ops.rms_norm, x, weight, 1e-5), oracle_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_bits_do_not_depend_on_alignment(kernel_device, dtype: torch.dtype, residual: bool) -> None:
    # The same rows, 16-byte aligned (vector accesses) and one element off (scalar accesses), are
    # summed in the same order: bit-identical results.
    dev = kernel_device
    x, r, w = (randn(19, 576, dtype=dtype, seed=s, device=dev) for s in (1, 2, 3))
    odd = [kernel_checks.misaligned((19, 576), dtype, 0, dev).copy_(t) for t in (x, r)]
    odd_w = kernel_checks.misaligned((576,), dtype, 0, dev).copy_(w[0])
    aligned = _kernels.rms_norm(x, w[0], 1e-6, r if residual else None)
    shifted = _kernels.rms_norm(odd[0], odd_w, 1e-6, odd[1] if residual else None)
    for a, b in zip(aligned if residual else [aligned], shifted if residual else [shifted]):
        assert torch.equal(a, b)


def test_rms_norm_unfoldable_rows_are_rejected(kernel_device) -> None:
    dev = kernel_device
    x = randn(8, 6, 64, dtype=torch.bfloat16, seed=0, device=dev).transpose(0, 1)  # [6, 8, 64], rows not foldable
    weight = randn(64, dtype=torch.bfloat16, seed=1, device=dev, shift=1.0)
    assert not _kernels.supports_rms_norm(x, weight, None)


# --- RoPE ----------------------------------------------------------------------------------------

# (q heads, kv heads, head dim, rotary dim): SmolLM2-135M, Llama-3.1-8B, partial rotary (Phi /
# GLM style), and a rotary half of 10 that no 16-byte vector divides (scalar path).
ROPE_SHAPES = [(9, 3, 64, 64), (32, 8, 128, 128), (8, 2, 128, 64), (4, 2, 80, 20)]
ROPE_POSITIONS = 4096
ROPE = device_cases(emulated=[(t, s) for t in (1, 19) for s in ROPE_SHAPES if s[0] <= 9],
                    gpu=[(t, s) for t in ROWS_GPU for s in ROPE_SHAPES])


def rope_reference(q, k, positions, table):
    pos = positions.long()
    cos, sin = table.cos[pos], table.sin[pos]
    return oracle_rope.apply_rope(q, cos, sin), oracle_rope.apply_rope(k, cos, sin)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("kernel_device, tokens, shape", ROPE, indirect=["kernel_device"])
def test_rope(kernel_device, tokens: int, shape: tuple[int, int, int, int], dtype: torch.dtype,
              pos_dtype: torch.dtype) -> None:
    dev = kernel_device
    hq, hk, d, r = shape
    table = ops.build_rope_table(r, 10000.0, ROPE_POSITIONS, device=dev)
    q = randn(tokens, hq, d, dtype=dtype, seed=tokens + d, device=dev)
    k = randn(tokens, hk, d, dtype=dtype, seed=tokens + d + 1, device=dev)
    positions = torch.randint(0, ROPE_POSITIONS, (tokens,), generator=gen(tokens, dev), device=dev).to(pos_dtype)
    assert _kernels.supports_rope(q, k, positions, table)
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    q_torch, k_torch = on_torch_path(ops.apply_rope, q, k, positions, table)
    q_ref, k_ref = rope_reference(q, k, positions, table)
    assert_matches_oracle("q", q_out, q_torch, q_ref)
    assert_matches_oracle("k", k_out, k_torch, k_ref)
    # Dims past the rotary dim are copied bit for bit.
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_rope_on_fused_qkv_views(kernel_device, dtype: torch.dtype) -> None:
    dev = kernel_device
    tokens, hq, hk, d = 19, 9, 3, 64
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype, seed=5, device=dev)  # output of a fused QKV projection
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    table = ops.build_rope_table(d, 100000.0, 512, scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 128}, device=dev)
    positions = torch.arange(100, 100 + tokens, device=dev)[torch.randperm(tokens, generator=gen(1, dev), device=dev)]
    assert not q.is_contiguous() and _kernels.supports_rope(q, k, positions, table)
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    q_torch, k_torch = on_torch_path(ops.apply_rope, q, k, positions, table)
    q_ref, k_ref = rope_reference(q, k, positions, table)
    assert_matches_oracle("q", q_out, q_torch, q_ref)
    assert_matches_oracle("k", k_out, k_torch, k_ref)


def test_rope_out_of_range_positions_give_nan(kernel_device) -> None:
    dev = kernel_device
    table = ops.build_rope_table(64, 10000.0, 16, device=dev)
    q = randn(3, 2, 128, dtype=torch.bfloat16, seed=0, device=dev)
    k = randn(3, 1, 128, dtype=torch.bfloat16, seed=1, device=dev)
    positions = torch.tensor([3, 16, -1], device=dev)
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    for x, out in ((q, q_out), (k, k_out)):
        assert bool(torch.isfinite(out[0]).all())
        assert bool(torch.isnan(out[1:, :, :64]).all())
        assert torch.equal(out[1:, :, 64:], x[1:, :, 64:])  # pass-through dims still copied


# --- SiLU-and-mul --------------------------------------------------------------------------------

SILU = device_cases(emulated=[(19, i) for i in (111, 1536)],
                    gpu=[(r, i) for r in ROWS_GPU for i in (111, 1536, 14336)])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("kernel_device, rows, inter", SILU, indirect=["kernel_device"])
def test_silu_and_mul(kernel_device, rows: int, inter: int, dtype: torch.dtype) -> None:
    x = randn(rows, 2 * inter, dtype=dtype, seed=rows + inter, device=kernel_device, scale=3.0)
    assert _kernels.supports_silu_and_mul(x)
    got = _kernels.silu_and_mul(x)
    assert_matches_oracle("out", got, on_torch_path(ops.silu_and_mul, x), oracle_ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["row-stride", "misaligned", "3d"])
def test_silu_and_mul_layouts(kernel_device, layout: str, dtype: torch.dtype) -> None:
    dev = kernel_device
    if layout == "row-stride":
        x = randn(19, 2 * 1536 + 64, dtype=dtype, seed=1, device=dev, scale=3.0)[:, 32: 32 + 2 * 1536]
    elif layout == "misaligned":
        x = kernel_checks.misaligned((19, 2 * 1536), dtype, 1, dev)
    else:
        x = randn(2, 5, 2 * 576, dtype=dtype, seed=1, device=dev, scale=3.0)
    got = _kernels.silu_and_mul(x)
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert_matches_oracle("out", got, on_torch_path(ops.silu_and_mul, x), oracle_ops.silu_and_mul(x))


# --- embedding -----------------------------------------------------------------------------------

EMBEDDING = device_cases(emulated=[(19, 1000, 111), (19, 5000, 576)],
                         gpu=[(t, v, h) for t in ROWS_GPU for v, h in [(1000, 111), (49152, 576), (128256, 4096)]])


@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("kernel_device, tokens, vocab, hidden", EMBEDDING, indirect=["kernel_device"])
def test_embedding(kernel_device, tokens: int, vocab: int, hidden: int, dtype: torch.dtype,
                   id_dtype: torch.dtype) -> None:
    dev = kernel_device
    table = randn(vocab, hidden, dtype=dtype, seed=vocab, device=dev)
    ids = torch.randint(0, vocab, (tokens,), generator=gen(tokens, dev), device=dev).to(id_dtype)
    ids[0] = vocab - 1  # the last row is reachable
    for scale in (1.0, 12.0):
        got = _kernels.embedding(ids, table, scale)
        # Same single rounding of row * scale as the torch path: exact.
        assert torch.equal(got, on_torch_path(ops.embedding, ids, table, scale))
        rows = table[ids.long()].cpu()
        ref = oracle_ops.embedding(torch.arange(tokens), rows, scale)
        torch.testing.assert_close(got.cpu().double(), ref.to(dtype).double(), rtol=0, atol=0)


def test_embedding_strided_ids_table_and_misaligned(kernel_device) -> None:
    dev = kernel_device
    vocab, hidden = 5000, 576
    table = randn(vocab, hidden + 8, dtype=torch.bfloat16, seed=0, device=dev)[:, 8:]  # row stride 584, offset 8
    ids = torch.randint(0, vocab, (38,), generator=gen(1, dev), device=dev)[::2]
    assert _kernels.supports_embedding(ids, table)
    assert torch.equal(_kernels.embedding(ids, table, 0.5), on_torch_path(ops.embedding, ids, table, 0.5))
    odd = kernel_checks.misaligned((vocab, hidden), torch.float16, 2, dev)
    assert torch.equal(_kernels.embedding(ids, odd, 1.0), on_torch_path(ops.embedding, ids, odd))


def test_embedding_out_of_range_ids_give_nan_rows(kernel_device) -> None:
    table = randn(10, 64, dtype=torch.float16, seed=0, device=kernel_device)
    ids = torch.tensor([3, 10, -1, 9], device=kernel_device)
    out = _kernels.embedding(ids, table, 1.0)
    assert torch.equal(out[0], table[3]) and torch.equal(out[3], table[9])
    assert bool(torch.isnan(out[1:3]).all())
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding(ids, table)  # the op layer's range check runs first


# --- argmax --------------------------------------------------------------------------------------

ARGMAX = device_cases(emulated=[(5, v) for v in (111, 49152)],
                      gpu=[(r, v) for r in ROWS_GPU for v in (111, 49152, 128256)])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("kernel_device, rows, vocab", ARGMAX, indirect=["kernel_device"])
def test_argmax(kernel_device, rows: int, vocab: int, dtype: torch.dtype) -> None:
    dev = kernel_device
    logits = randn(rows, vocab, dtype=dtype, seed=rows + vocab, device=dev, scale=4.0)
    # Plant exact ties at the top of every row: the lowest index must win.
    top = logits.float().max(dim=1).values + 1.0
    cols = torch.randint(0, vocab, (rows, 3), generator=gen(rows, dev), device=dev)
    logits.scatter_(1, cols, top.unsqueeze(1).expand(rows, 3).contiguous().to(dtype))
    got = _kernels.argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(got, cols.min(dim=1).values)
    sample = slice(0, min(rows, 19))
    assert torch.equal(got[sample].cpu(), oracle_ops.argmax(logits[sample].cpu()))


def test_argmax_nan_inf_and_ties(kernel_device) -> None:
    logits = randn(5, 1000, dtype=torch.float32, seed=0, device=kernel_device)
    logits[0, 700] = float("nan")
    logits[0, 300] = float("nan")             # first NaN wins, like torch.argmax
    logits[1, :] = float("-inf")              # all -inf: index 0
    logits[2, 10] = float("inf")
    logits[2, 20] = float("inf")              # tie between +inf: lowest index
    logits[3, 999] = float("nan")
    logits[3, 5] = float("inf")               # NaN beats +inf
    logits[4, :] = 1.0                        # all equal: index 0
    for dtype in FLOATS:
        x = logits.to(dtype)
        got = _kernels.argmax(x)
        assert torch.equal(got, x.argmax(dim=-1)), dtype
        assert got.tolist() == [300, 0, 10, 999, 0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_argmax_strided_and_misaligned(kernel_device, dtype: torch.dtype) -> None:
    dev = kernel_device
    wide = randn(19, 49152 + 64, dtype=dtype, seed=3, device=dev)
    for logits in (wide[:, :49152], wide[:, 64:], kernel_checks.misaligned((19, 49152), dtype, 4, dev)):
        assert torch.equal(_kernels.argmax(logits), logits.argmax(dim=-1))


# --- top-p nucleus floor -------------------------------------------------------------------------

def softmax_rows(rows: int, vocab: int, scale: float, seed: int, device: torch.device) -> torch.Tensor:
    """Rows of softmax(scale * randn): a large scale gives peaked rows (the floor's exponent holds
    few tokens, which the kernel stages in shared memory), a small one flat rows (it holds most of
    the row, which passes 3-4 read again from global memory)."""
    return torch.softmax(randn(rows, vocab, dtype=torch.float32, seed=seed, device=device, scale=scale), dim=-1)


def assert_is_nucleus_floor(probs: torch.Tensor, need: int, floor: torch.Tensor) -> None:
    """The definition (csrc/kernels/sampling.h), checked row by row in exact fixed-point mass: the
    tokens strictly above the floor hold less than `need`, those at or above it at least `need`
    (so the next smaller value is dropped); floor 0 only for a row whose whole mass is short."""
    mass = sampling._mass(probs.cpu().double()).cpu()
    for r, (row, f) in enumerate(zip(probs.cpu(), floor.cpu())):
        if f == 0:
            assert int(mass[r].sum()) < need, f"row {r}: floor 0 but the row holds the needed mass"
            continue
        assert bool((row == f).any()), f"row {r}: the floor {f.item()} is not one of the row's probabilities"
        assert int(mass[r][row > f].sum()) < need, f"row {r}: the tokens above the floor already hold top_p"
        assert int(mass[r][row >= f].sum()) >= need, f"row {r}: the kept tokens hold less than top_p"


NUCLEUS = device_cases(
    emulated=[(3, 999, 4.0, 0.9), (2, 16388, 0.02, 0.9), (2, 16388, 6.0, 0.5), (4, 1000, 2.0, 1e-6),
              (3, 4096, 1.0, 0.999)],
    gpu=[(r, v, scale, top_p) for r, v in ((1, 128256), (19, 49152), (64, 128256), (989, 1001))
         for scale, top_p in ((0.3, 0.9), (3.0, 0.9), (8.0, 0.5), (1.0, 0.999))])


@pytest.mark.parametrize("kernel_device, rows, vocab, scale, top_p", NUCLEUS, indirect=["kernel_device"])
def test_nucleus_floor(kernel_device, rows: int, vocab: int, scale: float, top_p: float) -> None:
    probs = softmax_rows(rows, vocab, scale, seed=rows + vocab, device=kernel_device)
    need = sampling.nucleus_need(top_p)
    got = _kernels.nucleus_floor(probs, need)
    assert got.dtype == torch.float32 and got.shape == (rows,)
    assert_is_nucleus_floor(probs, need, got)
    # The torch path's rule, bit for bit: a full sort, and the CPU's top-k shortcut.
    assert torch.equal(got, sampling._floor_among(torch.sort(probs, descending=True).values, need)[0])
    assert torch.equal(got.cpu(), sampling._nucleus_floor(probs.cpu(), need))


def test_nucleus_floor_ties_and_edge_rows(kernel_device) -> None:
    vocab = 1000
    probs = softmax_rows(5, vocab, 1.0, seed=7, device=kernel_device)
    probs[0] = 1.0 / vocab                                     # all tied: every token stays
    probs[1] = 0.0
    probs[1, 5] = 1.0                                          # one-hot
    probs[2] *= 0.4                                            # mass short of top_p: everything stays
    probs[3] = 0.0
    probs[3, [10, 20, 30, 40, 50]] = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1], device=kernel_device)
    probs[4] = 0.0
    probs[4, 900:] = 0.01                                      # 100 tied tokens, one bin in every pass
    need = sampling.nucleus_need(0.45)
    got = _kernels.nucleus_floor(probs, need)
    expected = torch.tensor([1.0 / vocab, 1.0, 0.0, 0.2, 0.01], dtype=torch.float32)
    assert torch.equal(got.cpu(), expected)                    # row 3: the tie at 0.2 stays whole
    assert torch.equal(got.cpu(), sampling._nucleus_floor(probs.cpu(), need))
    assert_is_nucleus_floor(probs, need, got)
    # Mass landing exactly on top_p (these values are exact in 2^-40 units): a token whose `before`
    # equals need goes, its predecessor stays.
    for values, top_p, floor in (([0.5, 0.25, 0.25], 0.5, 0.5), ([0.25] * 4, 0.5, 0.25),
                                 ([0.5, 0.375, 0.125], 0.875, 0.375)):
        exact = torch.zeros(1, vocab, device=kernel_device)
        exact[0, 7:7 + len(values)] = torch.tensor(values, device=kernel_device)
        assert _kernels.nucleus_floor(exact, sampling.nucleus_need(top_p)).item() == floor, values


def test_nucleus_floor_strided_misaligned_and_schedules(kernel_device, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = kernel_device
    wide = softmax_rows(3, 9001, 5.0, seed=11, device=dev)
    need = sampling.nucleus_need(0.8)
    for probs in (wide[:, :9000], wide[:, 1:]):  # a 9001-float row stride; then a misaligned base
        got = _kernels.nucleus_floor(probs, need)
        assert torch.equal(got.cpu(), sampling._nucleus_floor(probs.cpu().contiguous(), need))
    if dev.type == "cpu":
        # Staging the floor's exponent bin appends from every warp at once: the order must not matter.
        kernel_checks.assert_schedule_independent(lambda: _kernels.nucleus_floor(wide, need), monkeypatch)


def test_logits_to_probs_with_the_kernel_equals_the_torch_path(kernel_device, request: pytest.FixtureRequest) -> None:
    if kernel_device.type == "cpu":
        request.getfixturevalue("emulated_ops")  # CPU tensors take the emulated kernels in the op layer
    logits = randn(7, 4099, dtype=torch.bfloat16, seed=12, device=kernel_device, scale=3.0)
    for temperature, top_k, top_p in ((0.8, 0, 0.9), (1.0, 50, 0.7), (1.3, 0, 0.999)):
        got = ops.logits_to_probs(logits, temperature, top_k, top_p)
        assert torch.equal(got, on_torch_path(ops.logits_to_probs, logits, temperature, top_k, top_p))
        assert 0 < int((got > 0).sum(dim=-1).min()) and int((got > 0).sum(dim=-1).max()) < 4099


# --- error paths ---------------------------------------------------------------------------------

def test_python_validation_names_the_op(kernel_device) -> None:
    dev = kernel_device
    x = randn(4, 64, dtype=torch.bfloat16, seed=0, device=dev)
    with pytest.raises(ValueError, match=r"^rms_norm: .*weight has dtype torch.float32"):
        _kernels.rms_norm(x, torch.ones(64, device=dev), 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: .*residual"):
        _kernels.rms_norm(x, x[0], 1e-6, x[:3])
    with pytest.raises(ValueError, match=r"^silu_and_mul: .*even"):
        _kernels.silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match=r"^argmax: .*dtype"):
        _kernels.argmax(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"^embedding: .*ids"):
        _kernels.embedding(x[:, 0], x, 1.0)
    with pytest.raises(ValueError, match=r"^nucleus_floor: .*float32 probabilities"):
        _kernels.nucleus_floor(x, 1 << 39)
    table = ops.build_rope_table(64, 10000.0, 8, device=dev)
    with pytest.raises(ValueError, match=r"^apply_rope: .*positions"):
        _kernels.apply_rope(x.view(4, 1, 64), x.view(4, 1, 64), torch.arange(3, device=dev), table)


def test_cpp_rechecks_real_tensors(kernel_device) -> None:
    C = _kernels._module()
    x = randn(19, 576, dtype=torch.bfloat16, seed=0, device=kernel_device)
    out = torch.empty(19, 575, dtype=torch.bfloat16, device=kernel_device)
    with pytest.raises(errors.KernelError, match=r"^rms_norm: invalid argument: out has shape \[19, 575\]"):
        _kernels._run(C.rms_norm, _kernels._view(x), _kernels._view(x[0]), None, _kernels._view(out), None,
                      1e-6, _kernels._stream(x))
    ids = torch.tensor([1, 2], device=kernel_device, dtype=torch.int32)
    with pytest.raises(errors.KernelError, match=r"^embedding: invalid argument: out.*\(arguments: ids=int32\[2\]"):
        _kernels._run(C.embedding, _kernels._view(ids), _kernels._view(x), _kernels._view(x[:3]), 1.0,
                      _kernels._stream(x))
    probs = torch.softmax(x.float(), dim=-1)
    floor = torch.empty(19, device=kernel_device)
    words = C.nucleus_floor_workspace_words(19, 576)
    scratch = torch.empty(words, dtype=torch.int64, device=kernel_device)
    for need, workspace, message in ((0, scratch, r"need must be in \[1, 2\^40\]"),
                                     ((1 << 40) + 1, scratch, r"need must be in \[1, 2\^40\]"),
                                     (1 << 39, scratch[:-1], rf"workspace: {words - 1} words, top-p needs {words}")):
        with pytest.raises(errors.KernelError, match=r"^nucleus_floor: invalid argument: " + message):
            _kernels._run(C.nucleus_floor, _kernels._view(probs), need, _kernels._view(floor),
                          _kernels._view(workspace), _kernels._stream(probs))


# --- GPU only: dispatch through the op layer, streams, graphs, devices -------------------------------

def test_ops_take_the_kernel_path(kernel_device, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("the op layer takes the kernels for CUDA tensors (emulated: test_emulated_model.py)")
    calls: list[str] = []
    for name in ("rms_norm", "apply_rope", "silu_and_mul", "embedding", "argmax"):
        real = getattr(_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_kernels, name, spy)
    x = randn(4, 64, dtype=torch.bfloat16, seed=0, device=kernel_device)
    table = ops.build_rope_table(16, 10000.0, 32, device="cuda")
    ops.rms_norm(x, x[0], 1e-6)
    ops.apply_rope(x.view(4, 4, 16), x.view(4, 4, 16), torch.arange(4, device="cuda"), table)
    ops.silu_and_mul(x)
    ops.embedding(torch.tensor([1, 2], device="cuda"), x)
    ops.argmax(x)
    assert calls == ["rms_norm", "apply_rope", "silu_and_mul", "embedding", "argmax"]
    calls.clear()
    on_torch_path(ops.rms_norm, x, x[0], 1e-6)
    assert calls == []
    # Unfoldable rows take the torch path through the op layer.
    y = x.view(4, 4, 16).transpose(0, 1)
    torch.testing.assert_close(ops.rms_norm(y, y[0, 0], 1e-6), on_torch_path(ops.rms_norm, y, y[0, 0], 1e-6))


def test_kernels_run_on_the_current_stream_and_under_graph_capture(kernel_device) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("streams and CUDA graphs need a GPU")
    hidden, heads, d = 576, 9, 64
    x = randn(19, hidden, dtype=torch.bfloat16, seed=0, device=kernel_device)
    weight = randn(hidden, dtype=torch.bfloat16, seed=1, device=kernel_device, shift=1.0)
    table = ops.build_rope_table(d, 10000.0, 64, device="cuda")
    positions = torch.arange(19, device="cuda")

    def step(inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, s = ops.rms_norm(inp, weight, 1e-6, inp)
        q, k = ops.apply_rope(y.view(19, heads, d), y.view(19, heads, d)[:, :3], positions, table)
        return y, s, q, k, ops.silu_and_mul(y), ops.argmax(y)

    eager = step(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = step(x)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(eager, on_side):
        assert torch.equal(a, b)

    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    step(static_x)  # warm-up outside capture, as torch recommends
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = step(static_x)
    x2 = randn(19, hidden, dtype=torch.bfloat16, seed=9, device=kernel_device)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step(x2)):
        assert torch.equal(a, b)


def test_rope_rejects_positions_on_another_device(kernel_device) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("needs CUDA tensors next to CPU ones")
    x = randn(4, 64, dtype=torch.bfloat16, seed=0, device=kernel_device)
    table = ops.build_rope_table(64, 10000.0, 8, device="cuda")
    with pytest.raises(ValueError, match=r"^apply_rope: .*cpu"):
        _kernels.apply_rope(x.view(4, 1, 64), x.view(4, 1, 64), torch.arange(4), table)
