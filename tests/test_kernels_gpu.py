"""CUDA kernels against the float64 oracle (tests/oracle), on a GPU.

Every test here is marked `gpu` and skipped automatically (tests/conftest.py) when torch sees no
CUDA device or edgespec was installed without its extension. Run on a GPU machine with:

    pip install --no-build-isolation -C cmake.args=--preset=ci .   # or the default preset
    python -m pytest -q tests/test_kernels_gpu.py

Conventions (STYLE.md):
* random inputs, never zeros; odd sizes (1, 19, 99, 989 rows; hidden 111) and real model shapes
  (hidden 576 / 4096, head dims 64 / 128, vocab 49152 / 128256); strided and misaligned inputs,
  which take the kernels' scalar (non-vectorised) path;
* every kernel output is poisoned (NaN, or -7 for ids) before the launch, so an element the kernel
  forgets to write fails the test;
* tolerance: max |kernel - oracle| <= k * max |torch at the same precision - oracle| + one ulp of
  the largest reference value (k = 2); discrete results (argmax, embedding rows, the residual
  stream) are compared exactly.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Callable, Iterator

import pytest
import torch

import kernel_checks
from kernel_checks import assert_matches_oracle
from oracle import ops as oracle_ops
from oracle import rope as oracle_rope
from edgespec import errors, ops
from edgespec.ops import _kernels

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_kernel_outputs")]

FLOATS = [torch.bfloat16, torch.float16, torch.float32]
ROWS = [1, 19, 99, 989]


@contextmanager
def torch_backend() -> Iterator[None]:
    old = os.environ.get("EDGESPEC_BACKEND")
    os.environ["EDGESPEC_BACKEND"] = "torch"
    try:
        yield
    finally:
        if old is None:
            del os.environ["EDGESPEC_BACKEND"]
        else:
            os.environ["EDGESPEC_BACKEND"] = old


def on_torch_path(fn: Callable, *args, **kwargs):
    with torch_backend():
        return fn(*args, **kwargs)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return kernel_checks.randn(*shape, dtype=dtype, seed=seed, device="cuda", scale=scale, shift=shift)


def misaligned(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    return kernel_checks.misaligned(shape, dtype, seed, "cuda")


# --- RMSNorm -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("hidden", [111, 576, 4096])
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(rows: int, hidden: int, dtype: torch.dtype, residual: bool) -> None:
    x = randn(rows, hidden, dtype=dtype, seed=rows * hidden, scale=3.0, shift=0.5)
    weight = randn(hidden, dtype=dtype, seed=hidden, scale=0.3, shift=1.0)
    r = randn(rows, hidden, dtype=dtype, seed=7 + rows, scale=2.0) if residual else None
    assert _kernels.supports_rms_norm(x, weight, r)
    got = ops.rms_norm(x, weight, 1e-6, r)
    want = on_torch_path(ops.rms_norm, x, weight, 1e-6, r)
    if not residual:
        assert_matches_oracle("out", got, want, oracle_ops.rms_norm(x, weight, 1e-6))
        return
    (y, s), (y_torch, s_torch) = got, want
    # The residual stream is x + residual rounded once to the storage dtype: exact.
    assert torch.equal(s, s_torch)
    # The kernel normalises the rounded s, as the torch path does: judge both on that s.
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-6))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["row-stride", "misaligned", "3d", "3d-row-stride"])
def test_rms_norm_layouts(layout: str, dtype: torch.dtype) -> None:
    hidden = 576
    if layout == "row-stride":
        x = randn(19, hidden + 64, dtype=dtype, seed=1)[:, :hidden]
        r = randn(19, hidden + 8, dtype=dtype, seed=2)[:, 8:]
    elif layout == "misaligned":
        x, r = misaligned((19, hidden), dtype, 1), misaligned((19, hidden), dtype, 2)
    elif layout == "3d":
        x, r = randn(3, 7, hidden, dtype=dtype, seed=1), randn(3, 7, hidden, dtype=dtype, seed=2)
    else:
        x = randn(3, 7, hidden + 16, dtype=dtype, seed=1)[..., :hidden]
        r = randn(3, 7, hidden, dtype=dtype, seed=2)
    weight = randn(hidden, dtype=dtype, seed=3, scale=0.3, shift=1.0)
    if layout == "3d-row-stride":
        # [3, 7, H] with a padded last dim still folds into rows of stride H + 16.
        assert _kernels._rows(x) is not None
    assert _kernels.supports_rms_norm(x, weight, r)
    y, s = ops.rms_norm(x, weight, 1e-5, r)
    y_torch, s_torch = on_torch_path(ops.rms_norm, x, weight, 1e-5, r)
    assert y.shape == x.shape and s.shape == x.shape and y.is_contiguous() and s.is_contiguous()
    assert torch.equal(s, s_torch)
    assert_matches_oracle("out", y, y_torch, oracle_ops.rms_norm(s, weight, 1e-5))
    y_plain = ops.rms_norm(x, weight, 1e-5)
    assert_matches_oracle("out (no residual)", y_plain, on_torch_path(ops.rms_norm, x, weight, 1e-5),
                          oracle_ops.rms_norm(x, weight, 1e-5))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_rms_norm_bits_do_not_depend_on_alignment(dtype: torch.dtype) -> None:
    x, r, w = (randn(19, 576, dtype=dtype, seed=s) for s in (1, 2, 3))
    odd_x, odd_r = (misaligned((19, 576), dtype, 0).copy_(t) for t in (x, r))
    odd_w = misaligned((576,), dtype, 0).copy_(w[0])
    for a, b in zip(_kernels.rms_norm(x, w[0], 1e-6, r), _kernels.rms_norm(odd_x, odd_w, 1e-6, odd_r)):
        assert torch.equal(a, b)


def test_rms_norm_unfoldable_rows_fall_back() -> None:
    x = randn(8, 6, 64, dtype=torch.bfloat16, seed=0).transpose(0, 1)  # [6, 8, 64], rows not foldable
    weight = randn(64, dtype=torch.bfloat16, seed=1, shift=1.0)
    assert not _kernels.supports_rms_norm(x, weight, None)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), on_torch_path(ops.rms_norm, x, weight, 1e-6))


# --- RoPE ----------------------------------------------------------------------------------------

# (q heads, kv heads, head dim, rotary dim): SmolLM2-135M, Llama-3.1-8B, partial rotary (Phi /
# GLM style), and a rotary half of 10 that no 16-byte vector divides (scalar path).
ROPE_SHAPES = [(9, 3, 64, 64), (32, 8, 128, 128), (8, 2, 128, 64), (4, 2, 80, 20)]
ROPE_POSITIONS = 4096


def rope_reference(q, k, positions, table):
    pos = positions.long()
    cos, sin = table.cos[pos], table.sin[pos]
    return oracle_rope.apply_rope(q, cos, sin), oracle_rope.apply_rope(k, cos, sin)


@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=lambda s: "q{}k{}d{}r{}".format(*s))
@pytest.mark.parametrize("tokens", ROWS)
def test_rope(tokens: int, shape: tuple[int, int, int, int], dtype: torch.dtype, pos_dtype: torch.dtype) -> None:
    hq, hk, d, r = shape
    table = ops.build_rope_table(r, 10000.0, ROPE_POSITIONS, device="cuda")
    q = randn(tokens, hq, d, dtype=dtype, seed=tokens + d)
    k = randn(tokens, hk, d, dtype=dtype, seed=tokens + d + 1)
    positions = torch.randint(0, ROPE_POSITIONS, (tokens,), generator=gen(tokens), device="cuda").to(pos_dtype)
    assert _kernels.supports_rope(q, k, positions, table)
    q_out, k_out = ops.apply_rope(q, k, positions, table)
    q_torch, k_torch = on_torch_path(ops.apply_rope, q, k, positions, table)
    q_ref, k_ref = rope_reference(q, k, positions, table)
    assert_matches_oracle("q", q_out, q_torch, q_ref)
    assert_matches_oracle("k", k_out, k_torch, k_ref)
    # Dims past the rotary dim are copied bit for bit.
    assert torch.equal(q_out[..., r:], q[..., r:]) and torch.equal(k_out[..., r:], k[..., r:])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_rope_on_fused_qkv_views(dtype: torch.dtype) -> None:
    tokens, hq, hk, d = 19, 9, 3, 64
    qkv = randn(tokens, (hq + 2 * hk) * d, dtype=dtype, seed=5)  # output of a fused QKV projection
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d: (hq + hk) * d].view(tokens, hk, d)
    table = ops.build_rope_table(d, 100000.0, 512, scaling={"rope_type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 128},
                                 device="cuda")
    positions = torch.arange(100, 100 + tokens, device="cuda")[torch.randperm(tokens, generator=gen(1), device="cuda")]
    assert not q.is_contiguous() and _kernels.supports_rope(q, k, positions, table)
    q_out, k_out = ops.apply_rope(q, k, positions, table)
    q_torch, k_torch = on_torch_path(ops.apply_rope, q, k, positions, table)
    q_ref, k_ref = rope_reference(q, k, positions, table)
    assert_matches_oracle("q", q_out, q_torch, q_ref)
    assert_matches_oracle("k", k_out, k_torch, k_ref)


def test_rope_out_of_range_positions_give_nan() -> None:
    table = ops.build_rope_table(64, 10000.0, 16, device="cuda")
    q = randn(3, 2, 128, dtype=torch.bfloat16, seed=0)
    k = randn(3, 1, 128, dtype=torch.bfloat16, seed=1)
    positions = torch.tensor([3, 16, -1], device="cuda")
    q_out, k_out = _kernels.apply_rope(q, k, positions, table)
    for x, out in ((q, q_out), (k, k_out)):
        assert bool(torch.isfinite(out[0]).all())
        assert bool(torch.isnan(out[1:, :, :64]).all())
        assert torch.equal(out[1:, :, 64:], x[1:, :, 64:])  # pass-through dims still copied


# --- SiLU-and-mul --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("inter", [111, 1536, 14336])
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    x = randn(rows, 2 * inter, dtype=dtype, seed=rows + inter, scale=3.0)
    assert _kernels.supports_silu_and_mul(x)
    got = ops.silu_and_mul(x)
    assert_matches_oracle("out", got, on_torch_path(ops.silu_and_mul, x), oracle_ops.silu_and_mul(x))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("layout", ["row-stride", "misaligned", "3d"])
def test_silu_and_mul_layouts(layout: str, dtype: torch.dtype) -> None:
    if layout == "row-stride":
        x = randn(19, 2 * 1536 + 64, dtype=dtype, seed=1, scale=3.0)[:, 32: 32 + 2 * 1536]
    elif layout == "misaligned":
        x = misaligned((19, 2 * 1536), dtype, 1)
    else:
        x = randn(2, 5, 2 * 576, dtype=dtype, seed=1, scale=3.0)
    got = ops.silu_and_mul(x)
    assert got.shape == (*x.shape[:-1], x.shape[-1] // 2)
    assert_matches_oracle("out", got, on_torch_path(ops.silu_and_mul, x), oracle_ops.silu_and_mul(x))


# --- embedding -----------------------------------------------------------------------------------

@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("vocab,hidden", [(1000, 111), (49152, 576), (128256, 4096)])
@pytest.mark.parametrize("tokens", ROWS)
def test_embedding(tokens: int, vocab: int, hidden: int, dtype: torch.dtype, id_dtype: torch.dtype) -> None:
    table = randn(vocab, hidden, dtype=dtype, seed=vocab)
    ids = torch.randint(0, vocab, (tokens,), generator=gen(tokens), device="cuda").to(id_dtype)
    ids[0] = vocab - 1  # the last row is reachable
    for scale in (1.0, 12.0):
        got = ops.embedding(ids, table, scale)
        # Same single rounding of row * scale as the torch path: exact.
        assert torch.equal(got, on_torch_path(ops.embedding, ids, table, scale))
        rows = table[ids.long()].cpu()
        ref = oracle_ops.embedding(torch.arange(tokens), rows, scale)
        torch.testing.assert_close(got.cpu().double(), ref.to(dtype).double(), rtol=0, atol=0)


def test_embedding_strided_ids_table_and_misaligned() -> None:
    vocab, hidden = 5000, 576
    table = randn(vocab, hidden + 8, dtype=torch.bfloat16, seed=0)[:, 8:]  # row stride 584, offset 8
    ids = torch.randint(0, vocab, (38,), generator=gen(1), device="cuda")[::2]
    assert _kernels.supports_embedding(ids, table)
    assert torch.equal(ops.embedding(ids, table, 0.5), on_torch_path(ops.embedding, ids, table, 0.5))
    odd = misaligned((vocab, hidden), torch.float16, 2)
    assert torch.equal(ops.embedding(ids, odd), on_torch_path(ops.embedding, ids, odd))


def test_embedding_out_of_range_ids_give_nan_rows() -> None:
    table = randn(10, 64, dtype=torch.float16, seed=0)
    ids = torch.tensor([3, 10, -1, 9], device="cuda")
    out = _kernels.embedding(ids, table, 1.0)
    assert torch.equal(out[0], table[3]) and torch.equal(out[3], table[9])
    assert bool(torch.isnan(out[1:3]).all())
    with pytest.raises(IndexError, match="out of range"):
        ops.embedding(ids, table)  # the op layer's range check runs first


# --- argmax --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("vocab", [111, 49152, 128256])
@pytest.mark.parametrize("rows", ROWS)
def test_argmax(rows: int, vocab: int, dtype: torch.dtype) -> None:
    logits = randn(rows, vocab, dtype=dtype, seed=rows + vocab, scale=4.0)
    # Plant exact ties at the top of every row: the lowest index must win.
    top = logits.float().max(dim=1).values + 1.0
    cols = torch.randint(0, vocab, (rows, 3), generator=gen(rows), device="cuda")
    logits.scatter_(1, cols, top.unsqueeze(1).expand(rows, 3).contiguous().to(dtype))
    got = ops.argmax(logits)
    assert got.dtype == torch.int64
    assert torch.equal(got, logits.argmax(dim=-1))
    assert torch.equal(got, cols.min(dim=1).values)
    sample = slice(0, min(rows, 19))
    assert torch.equal(got[sample].cpu(), oracle_ops.argmax(logits[sample].cpu()))


def test_argmax_nan_inf_and_ties() -> None:
    logits = randn(5, 1000, dtype=torch.float32, seed=0)
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
        got = ops.argmax(x)
        assert torch.equal(got, x.argmax(dim=-1)), dtype
        assert got.tolist() == [300, 0, 10, 999, 0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_argmax_strided_and_misaligned(dtype: torch.dtype) -> None:
    wide = randn(19, 49152 + 64, dtype=dtype, seed=3)
    for logits in (wide[:, :49152], wide[:, 64:], misaligned((19, 49152), dtype, 4)):
        assert torch.equal(ops.argmax(logits), logits.argmax(dim=-1))


# --- dispatch, streams, graphs -----------------------------------------------------------------------

def test_ops_take_the_kernel_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("rms_norm", "apply_rope", "silu_and_mul", "embedding", "argmax"):
        real = getattr(_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_kernels, name, spy)
    x = randn(4, 64, dtype=torch.bfloat16, seed=0)
    table = ops.build_rope_table(16, 10000.0, 32, device="cuda")
    ops.rms_norm(x, x[0], 1e-6)
    ops.apply_rope(x.view(4, 4, 16), x.view(4, 4, 16), torch.arange(4, device="cuda"), table)
    ops.silu_and_mul(x)
    ops.embedding(torch.tensor([1, 2], device="cuda"), x)
    ops.argmax(x)
    assert calls == ["rms_norm", "apply_rope", "silu_and_mul", "embedding", "argmax"]
    calls.clear()
    with torch_backend():
        ops.rms_norm(x, x[0], 1e-6)
    assert calls == []


def test_kernels_run_on_the_current_stream_and_under_graph_capture() -> None:
    hidden, heads, d = 576, 9, 64
    x = randn(19, hidden, dtype=torch.bfloat16, seed=0)
    weight = randn(hidden, dtype=torch.bfloat16, seed=1, shift=1.0)
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
    x2 = randn(19, hidden, dtype=torch.bfloat16, seed=9)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, step(x2)):
        assert torch.equal(a, b)


# --- error paths ---------------------------------------------------------------------------------

def test_python_validation_names_the_op() -> None:
    x = randn(4, 64, dtype=torch.bfloat16, seed=0)
    with pytest.raises(ValueError, match=r"^rms_norm: .*weight has dtype torch.float32"):
        _kernels.rms_norm(x, torch.ones(64, device="cuda"), 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: .*residual"):
        _kernels.rms_norm(x, x[0], 1e-6, x[:3])
    with pytest.raises(ValueError, match=r"^silu_and_mul: .*even"):
        _kernels.silu_and_mul(x[:, :63])
    with pytest.raises(ValueError, match=r"^argmax: .*dtype"):
        _kernels.argmax(x.to(torch.int32))
    with pytest.raises(ValueError, match=r"^embedding: .*ids"):
        _kernels.embedding(x[:, 0], x, 1.0)
    table = ops.build_rope_table(64, 10000.0, 8, device="cuda")
    with pytest.raises(ValueError, match=r"^apply_rope: .*positions"):
        _kernels.apply_rope(x.view(4, 1, 64), x.view(4, 1, 64), torch.arange(3, device="cuda"), table)
    with pytest.raises(ValueError, match=r"^apply_rope: .*cpu"):
        _kernels.apply_rope(x.view(4, 1, 64), x.view(4, 1, 64), torch.arange(4), table)


def test_cpp_rechecks_real_tensors() -> None:
    C = ops.compiled_module()
    x = randn(19, 576, dtype=torch.bfloat16, seed=0)
    out = torch.empty(19, 575, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(errors.KernelError, match=r"^rms_norm: invalid argument: out has shape \[19, 575\]"):
        _kernels._run(C.rms_norm, _kernels._view(x), _kernels._view(x[0]), None, _kernels._view(out), None,
                      1e-6, _kernels._stream(x))
    ids = torch.tensor([1, 2], device="cuda", dtype=torch.int32)
    with pytest.raises(errors.KernelError, match=r"^embedding: invalid argument: out.*\(arguments: ids=int32\[2\]"):
        _kernels._run(C.embedding, _kernels._view(ids), _kernels._view(x), _kernels._view(x[:3]), 1.0,
                      _kernels._stream(x))
