"""Row-invariant CPU attention (edgespec.ops.attention_rows): a tree token's attention output is
bitwise the output of decoding it alone over its prefix and ancestors, in bf16 and fp16, for any
GQA ratio, tree size (> 64 included), prefix length (either side of the head/tail split, heads
that reach into the tree) and thread count, and in fp32 on one thread; and it is accurate against
the fp64 oracle.

fp32 on several threads is only close: torch's CPU flash attention then rounds a masked fp32 row
by the batch it comes in (measured with torch 2.13 on a 2-core AVX-512 machine; earlier CI
machines gave the same bits). The engine claims no more for fp32 on the CPU: its GEMMs round by
row count."""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.ops import attention_rows
from oracle.attention import attention_ref, random_tree, tree_visibility

# The CPU path's exact rows: under --emulated-ops CPU tensors take the (not row-invariant) kernels.
pytestmark = pytest.mark.cpu_paths

CASES = [  # prefix n, tree tokens T, query heads, KV heads, head dim
    (0, 1, 4, 4, 64), (5, 7, 9, 3, 64), (60, 13, 9, 3, 64), (63, 3, 4, 1, 64), (127, 19, 6, 2, 128),
    (130, 70, 8, 8, 128), (1000, 21, 6, 2, 64), (511, 90, 12, 4, 64),
]


def _inputs(n: int, t: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int, chain: bool = False):
    g = torch.Generator().manual_seed(seed)
    s = n + t
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    k = torch.randn(s, hkv, d, generator=g).to(dtype)
    v = torch.randn(s, hkv, d, generator=g).to(dtype)
    visible = tree_visibility(list(range(-1, t - 1)) if chain else random_tree(t, g))
    return q, k, v, visible


def _check_rows_equal_decoding(q, k, v, visible, bitwise: bool = True):
    """Every tree row's output is bitwise (else to fp32 rounding) that of decoding the token alone
    over its prefix and its ancestors in depth order."""
    n, d = k.shape[0] - q.shape[0], q.shape[-1]
    out = ops.attention(q, k, v, d ** -0.5, ops.pack_tree_mask(visible))
    for i in range(q.shape[0]):
        ancestors = sorted(visible[i].nonzero().flatten().tolist(), key=lambda j: int(visible[j].sum()))
        slots = list(range(n)) + [n + j for j in ancestors]
        alone = ops.attention(q[i:i + 1], k[slots], v[slots], d ** -0.5)
        where = f"tree row {i} (depth {len(ancestors) - 1}) != decoding it alone"
        if bitwise:
            assert torch.equal(alone[0], out[i]), where
        else:
            torch.testing.assert_close(alone[0], out[i], rtol=1e-6, atol=1e-6, msg=where)


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,t,hq,hkv,d", CASES)
def test_tree_rows_equal_decoding_each_token_alone(threads, dtype, n, t, hq, hkv, d):
    _check_rows_equal_decoding(*_inputs(n, t, hq, hkv, d, dtype, seed=n * 131 + t),
                               bitwise=dtype != torch.float32 or threads == 1)


@pytest.mark.parametrize("n", [attention_rows.SPLIT - 3, 2 * attention_rows.SPLIT - 1, 300])
def test_chains_crossing_head_boundaries(n):
    # A chain crosses SPLIT boundaries in order: head groups of shared and gathered prefixes whose
    # rows, concatenated, are all the rows in order.
    _check_rows_equal_decoding(*_inputs(n, 2 * attention_rows.SPLIT + 7, 9, 3, 64, torch.bfloat16, n, chain=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n,t,hq,hkv,d", CASES)
def test_tree_rows_match_the_oracle(dtype, n, t, hq, hkv, d):
    q, k, v, visible = _inputs(n, t, hq, hkv, d, dtype, seed=7 + n + t)
    mask = ops.pack_tree_mask(visible)
    out = ops.attention(q, k, v, d ** -0.5, mask)
    want = attention_ref(q, k, v, d ** -0.5, mask, dtype=torch.float64)
    # The merge of head and tail rounds twice in the output dtype: allow 2 ulps of |out| <= ~4.
    tol = {torch.bfloat16: 3e-2, torch.float32: 2e-6}[dtype]
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - want).abs().max().item() < tol


@pytest.mark.parametrize("s", [1, 63, 64, 65, 300, 2049])
def test_decoding_matches_the_oracle(s):
    g = torch.Generator().manual_seed(s)
    q = torch.randn(1, 9, 64, generator=g).to(torch.bfloat16)
    k = torch.randn(s, 3, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(s, 3, 64, generator=g).to(torch.bfloat16)
    out = ops.attention(q, k, v, 0.125)
    want = attention_ref(q, k, v, 0.125, dtype=torch.float64)
    assert (out.double() - want).abs().max().item() < 3e-2


def test_plan_groups_rows_by_head_and_tail():
    split = attention_rows.SPLIT
    n = split * 2 - 2                                     # rows at depth >= 2 cross the split
    visible = tree_visibility([-1, 0, 1, 2, 0])         # a chain of 4 and a second child of the root
    plan = attention_rows.plan_rows(n, visible)
    heads = [(rows.tolist(), keys if isinstance(keys, int) else keys.tolist()) for rows, keys in plan.heads]
    # Depths 0 and 1 (positions n, n + 1) share the prefix [0, SPLIT), read in place; depths 2 and 3
    # sit at positions 2 SPLIT and 2 SPLIT + 1: their head [0, 2 SPLIT) holds the prefix and their
    # first two ancestors (tree slots 0 and 1 -> cache slots n and n + 1), gathered per row.
    assert heads == [([0, 1, 4], split), ([2, 3], [list(range(n)) + [n, n + 1]] * 2)]
    assert plan.head_rows.tolist() == [0, 1, 4, 2, 3]
    tails = [list(range(split, n)) + [n], list(range(split, n)) + [n, n + 1], [n + 2], [n + 2, n + 3],
             list(range(split, n)) + [n, n + 4]]
    for row, want in enumerate(tails):
        valid = plan.tail_valid[row]
        assert valid.tolist() == [True] * len(want) + [False] * (split - len(want))
        assert plan.tail_slots[row, :len(want)].tolist() == want
        assert (plan.tail_slots[row, len(want):] == 0).all()     # padding reads slot 0, masked out
    mask = plan.tail_mask(torch.bfloat16)
    assert mask.shape == (5, 1, 1, split) and mask.dtype == torch.bfloat16
    assert torch.equal(mask.isinf().squeeze(), ~plan.tail_valid)


def test_decoding_plan():
    split = attention_rows.SPLIT
    short = attention_rows.plan_rows(split - 1, None)
    assert short.heads == [] and short.head_rows.numel() == 0
    assert short.tail_slots.tolist() == [list(range(split))] and short.tail_valid.all()
    n = 3 * split + 5
    long = attention_rows.plan_rows(n, None)
    assert long.head_rows is None and [(rows.tolist(), h) for rows, h in long.heads] == [([0], 3 * split)]
    assert long.tail_slots[0, :6].tolist() == list(range(3 * split, n + 1))
    assert long.tail_valid.sum() == 6


def test_a_mask_changed_in_place_is_planned_again():
    q, k, v, visible = _inputs(10, 6, 4, 2, 64, torch.float32, seed=3)
    mask = ops.pack_tree_mask(visible)
    first = ops.attention(q, k, v, 0.125, mask)
    chain = tree_visibility([-1, 0, 1, 2, 3, 4])
    mask.copy_(ops.pack_tree_mask(chain))
    again = ops.attention(q, k, v, 0.125, mask)
    assert torch.equal(again, ops.attention(q, k, v, 0.125, ops.pack_tree_mask(chain)))
    assert not torch.equal(first, again)
