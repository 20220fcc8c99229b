"""The CUDA attention kernels (csrc/kernels/attention.cuh) run on the CPU emulator against the
fp32 oracle: causal prefill over a cache prefix, decode, tree verification, split-KV.

The same comparisons as tests/test_attention_gpu.py at sizes the emulator runs in seconds (it
executes every CUDA thread as a fiber). The kernel code, its launcher, its C++ checks and the
Python entry point are the real ones; only the machine is emulated. Outputs and split-KV scratch
are poisoned with NaN, and K/V are views of a cache whose slots past S hold NaN.

Tolerance: max |ours - oracle| <= 2 x max |torch path - oracle| + 2 x the oracle's rounding to
the output dtype (flash-attention's rule, STYLE.md), with the torch path run at the same dtype.
"""
from __future__ import annotations

import pytest
import torch

from edgespec.ops import _kernels
from kernel_checks import assert_attention_close, attention_inputs
from oracle.attention import pack_bits, random_tree, tree_visibility

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulated_kernels")]

DTYPES = [torch.bfloat16, torch.float16]
GQA = [(4, 4), (8, 2), (7, 1), (16, 1)]  # (Hq, Hkv): ratios 1, 4, 7, 16


def _make(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int):
    return attention_inputs(t, prefix, hq, hkv, d, dtype, seed, "cpu")


_assert_close = assert_attention_close


def _tree_mask(t: int, seed: int) -> torch.Tensor:
    return pack_bits(tree_visibility(random_tree(t, torch.Generator().manual_seed(seed))))


def _run(q, k, v, scale, mask=None, splits=None) -> torch.Tensor:
    assert _kernels.supports_attention(q, k, v, mask), _kernels.attention_rejection(q, k, v, mask)
    return _kernels.attention(q, k, v, scale, mask, splits=splits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
@pytest.mark.parametrize("t,prefix", [(1, 0), (1, 300), (19, 0), (19, 57), (99, 140)])
def test_causal(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = _make(t, prefix, hq, hkv, d, dtype, seed=t * 7919 + prefix * 31 + hq + d)
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, f"causal T={t} prefix={prefix}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (16, 1, 64), (7, 1, 64)])
def test_prefill_spanning_many_tiles(hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    # 389 new tokens over a 211-token prefix: several query tiles, key tiles cut by the diagonal.
    q, k, v = _make(389, 211, hq, hkv, d, dtype, seed=hq + d)
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, "prefill 389")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 128), (4, 4, 64), (16, 1, 128)])
@pytest.mark.parametrize("t", [1, 19, 64, 65, 128])
@pytest.mark.parametrize("prefix", [0, 99])
def test_tree(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, monkeypatch) -> None:
    q, k, v = _make(t, prefix, hq, hkv, d, dtype, seed=t * 104729 + prefix + hq)
    mask = _tree_mask(t, seed=t + prefix)
    _assert_close(_run(q, k, v, d ** -0.5, mask), q, k, v, d ** -0.5, mask, monkeypatch, f"tree T={t} prefix={prefix}")


@pytest.mark.parametrize("t,prefix,tree", [(1, 700, False), (19, 300, False), (70, 300, True), (1, 40, False)])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 13, 64])
def test_forced_splits(t: int, prefix: int, tree: bool, splits: int, monkeypatch) -> None:
    # Any split count is correct, including more splits than key tiles (empty splits).
    q, k, v = _make(t, prefix, 16, 2, 128, torch.bfloat16, seed=t + splits)
    mask = _tree_mask(t, seed=t) if tree else None
    _assert_close(_run(q, k, v, 0.09, mask, splits=splits), q, k, v, 0.09, mask, monkeypatch, f"splits={splits}")


def test_automatic_splits_on_a_long_decode(monkeypatch) -> None:
    # 132 SMs (the fixture's H100): a 4K decode with 2 KV heads is split, and every split is correct.
    q, k, v = _make(1, 4095, 32, 2, 128, torch.bfloat16, seed=11)
    assert _kernels.attention_splits(1, 4096, 32, 2, False, q.device) > 1
    _assert_close(_run(q, k, v, 0.09), q, k, v, 0.09, None, monkeypatch, "auto splits")


@pytest.mark.slow
@pytest.mark.parametrize("model,hq,hkv", [("llama3-8b", 32, 8), ("minicpm4-8b", 32, 2)])
@pytest.mark.parametrize("t,prefix,tree", [(1, 32767, False), (64, 4032, True)])
def test_real_shapes_at_long_context(model: str, hq: int, hkv: int, t: int, prefix: int, tree: bool, monkeypatch) -> None:
    # The benchmark shapes: a 32K decode (32 and 128 planned splits on 132 SMs) and a
    # 64-token tree at 4K, head dim 128.
    q, k, v = _make(t, prefix, hq, hkv, 128, torch.bfloat16, seed=t + hkv)
    mask = _tree_mask(t, seed=t) if tree else None
    _assert_close(_run(q, k, v, 128 ** -0.5, mask), q, k, v, 128 ** -0.5, mask, monkeypatch, f"{model} T={t}")


def test_tree_of_a_chain_equals_causal() -> None:
    q, k, v = _make(40, 500, 8, 2, 128, torch.bfloat16, seed=5)
    chain = pack_bits(tree_visibility([-1] + list(range(39))))
    tree_out = _run(q, k, v, 0.1, chain, splits=1).float()
    causal_out = _run(q, k, v, 0.1, None, splits=1).float()
    torch.testing.assert_close(tree_out, causal_out, rtol=0, atol=2e-2)


def test_tree_tokens_do_not_see_siblings() -> None:
    q, k, v = _make(2, 300, 4, 1, 64, torch.float16, seed=9)
    mask = pack_bits(torch.eye(2, dtype=torch.bool))
    before = _run(q, k, v, 0.125, mask)
    k[-1] += 3.0
    v[-1] -= 2.0
    after = _run(q, k, v, 0.125, mask)
    assert torch.equal(before[0], after[0])
    assert not torch.equal(before[1], after[1])


def test_query_as_a_view_of_fused_qkv(monkeypatch) -> None:
    t, hq, hkv, d = 19, 8, 2, 128
    q_full, k, v = _make(t, 200, hq + 2 * hkv, hkv, d, torch.bfloat16, seed=3)
    q = q_full[:, :hq]
    assert not q.is_contiguous()
    _assert_close(_run(q, k, v, d ** -0.5), q, k, v, d ** -0.5, None, monkeypatch, "strided q")


@pytest.mark.parametrize("case", ["prefill", "tree", "split decode"])
def test_output_does_not_depend_on_thread_order(case: str, monkeypatch) -> None:
    # Between two barriers the emulator runs a block's threads in the schedule's order; a race
    # changes the result: round-robin schedules land cp.async copies late (a tile read before its
    # wait is stale), serial ones let one warp run ahead with copies landing at once (a stage
    # refilled before every warp is done with it). Removing either barrier of the main loop fails here.
    t, prefix, mask, splits = {"prefill": (77, 64, None, 1), "tree": (65, 40, _tree_mask(65, 1), 1),
                               "split decode": (1, 900, None, 5)}[case]
    q, k, v = _make(t, prefix, 8, 2, 128, torch.bfloat16, seed=21)
    outputs = []
    for schedule in ["forward", "reverse", "random:1", "serial", "serial-reverse"]:
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        outputs.append(_run(q, k, v, 0.1, mask, splits=splits))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


@pytest.mark.xfail(strict=True, reason="the kernels are not row-invariant yet: a decoded token and the same token "
                   "verified in a tree are summed in different orders (tile shape, splits, slot gaps), so they can "
                   "differ in the last bit; on a GPU greedy speculative output equals plain output only up to "
                   "near-ties. The CPU path is exact (ops.attention_rows).")
def test_decoded_and_verified_rows_are_bitwise_equal() -> None:
    prefix = 300
    q, k, v = _make(5, prefix, 8, 2, 128, torch.bfloat16, seed=1)
    chain = pack_bits(tree_visibility([-1, 0, 1, 2, 3]))
    verified = _run(q, k, v, 0.1, chain)
    decoded = torch.cat([_run(q[i:i + 1], k[:prefix + i + 1], v[:prefix + i + 1], 0.1) for i in range(5)])
    assert torch.equal(verified, decoded)
