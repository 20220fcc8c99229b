"""The attention kernels' row-invariant mode (csrc/kernels/attention.h, "Row invariance"): a token
decoded alone and the same token verified inside a draft tree (or inside a causal chunk) get
bitwise the same output, so greedy speculative decoding on the GPU emits plain greedy's tokens.

Every check runs on the CPU emulator (`emulated`) and on a GPU (`gpu`). The emulator sums in a
fixed order per output element, like the tensor cores do per mma, so a row whose arithmetic
depended on its neighbours, its slot or the call's length would differ here too. Chunks of one or
two tiles put chunk boundaries inside the trees' tails; prefixes 60 and 120 put tile boundaries
inside them. Outputs and scratch are NaN-poisoned, K/V are views of a NaN-padded cache.
"""
from __future__ import annotations

import pytest
import torch

from edgespec.errors import KernelError
from edgespec.ops import _kernels
from kernel_checks import (assert_attention_close, assert_schedule_independent, attention_inputs, device_cases,
                           skip_unless_sm90)
from oracle.attention import pack_bits, random_tree, tree_visibility


# Both kernel families have the mode: the generic kernels (every GPU) and the Hopper ones (wgmma;
# EDGESPEC_SM90_ATTENTION=1). Each is invariant on its own; a decode step and a tree that must
# agree run on the same family.
KERNELS = pytest.mark.parametrize("sm90", [False, True], ids=["generic", "sm90"])


def _tree(t: int, seed: int) -> tuple[list[int], torch.Tensor]:
    parents = random_tree(t, torch.Generator().manual_seed(seed))
    return parents, tree_visibility(parents)


def _path(parents: list[int], node: int) -> list[int]:
    """The node's ancestors and itself, root first (its keys in logical order)."""
    path = [node]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def _decoded(q, k, v, scale, prefix: int, path: list[int], chunk: int, sm90: bool) -> torch.Tensor:
    """What plain decoding computes for the last node of `path`: its keys in logical order (the
    committed prefix, then its ancestors by depth, then itself), one query token."""
    slots = torch.cat([torch.arange(prefix), prefix + torch.tensor(path)]).to(k.device)
    node = path[-1]
    return _kernels.attention(q[node:node + 1], k.index_select(0, slots), v.index_select(0, slots), scale,
                              chunk_tiles=chunk, sm90=sm90)


# (T, prefix, Hq, Hkv, D, chunk tiles): tails crossing tile (prefix 60, 120) and chunk boundaries
# (one- and two-tile chunks), a tree starting on a chunk boundary (prefix 128, chunk 2), trees of
# more than 64 tokens (two mask words), GQA 1/4/7/16 (16: one tail block row tile; 1: many tokens
# per row tile), both head dims.
TREES = device_cases(
    emulated=[(20, 60, 8, 2, 128, 1), (20, 120, 8, 2, 64, 2), (9, 128, 4, 4, 64, 2), (70, 30, 4, 4, 64, 1),
              (12, 250, 16, 1, 128, 3), (15, 64, 7, 1, 64, 4), (6, 0, 8, 2, 128, 1)],
    gpu=[(t, p, hq, hkv, d, c) for t in (20, 70) for p in (60, 120, 4095) for hq, hkv in ((8, 2), (7, 1), (32, 2))
         for d in (64, 128) for c in (1, 3, 16)])


@KERNELS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kernel_device, t, prefix, hq, hkv, d, chunk", TREES, indirect=["kernel_device"])
def test_verified_tree_rows_equal_decoded_rows(kernel_device, t, prefix, hq, hkv, d, chunk, dtype, sm90,
                                               monkeypatch) -> None:
    if sm90:
        skip_unless_sm90(kernel_device)
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t * 31 + prefix + hq + chunk, kernel_device)
    parents, visible = _tree(t, t + prefix)
    mask = pack_bits(visible).to(kernel_device)
    verified = _kernels.attention(q, k, v, d ** -0.5, mask, chunk_tiles=chunk, sm90=sm90)
    assert_attention_close(verified, q, k, v, d ** -0.5, mask, monkeypatch,
                           f"invariant tree T={t} prefix={prefix} sm90={sm90}")
    rows = range(t) if kernel_device.type == "cuda" else sorted({0, t - 1, *range(1, t, max(1, t // 6))})
    for node in rows:
        decoded = _decoded(q, k, v, d ** -0.5, prefix, _path(parents, node), chunk, sm90)
        assert torch.equal(verified[node:node + 1], decoded), f"node {node} (depth {int(visible[node].sum()) - 1})"


# (T, prefix, Hq, Hkv, D, rank tiles): trees across a tile boundary (124, 250), one to three
# selected tiles per split (so most tokens' selections span several), GQA 4 and 16, both head dims.
SPARSE_TREES = device_cases(emulated=[(20, 124, 8, 2, 64, 1), (12, 250, 16, 1, 128, 2)],
                            gpu=[(t, p, hq, hkv, d, r) for t in (20, 70) for p in (124, 4095) for hq, hkv in ((8, 2), (32, 2))
                                 for d in (64, 128) for r in (1, 3, 8)])


@pytest.mark.parametrize("kernel_device, t, prefix, hq, hkv, d, rank", SPARSE_TREES, indirect=["kernel_device"])
def test_verified_sparse_tree_rows_equal_decoded_rows(kernel_device, t, prefix, hq, hkv, d, rank) -> None:
    """The block-sparse invariant mode (rank_tiles): a tree token's row attends, tile by logical
    tile and split by split, what its decoded path attends, ancestors' tiles included, and the
    other tokens' selections add nothing. Each token's own random selection (block 0, its own
    block, a third of the others); the decoded step has fewer splits than the tree (its cache is
    shorter): the extra ones are empty."""
    from oracle import sparse_ref
    from sparse_cases import random_selection

    dtype = torch.bfloat16
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, dtype, t + prefix + rank, kernel_device)
    parents, visible = _tree(t, t * 7 + prefix)
    depth = (visible.sum(dim=1) - 1).tolist()
    positions = [prefix + x for x in depth]
    nb = -(-(prefix + t) // 64)
    blocks, words = random_selection(positions, hkv, nb, 64, torch.Generator().manual_seed(prefix), 0.34)
    words = words.to(kernel_device)
    mask = pack_bits(visible).to(kernel_device)
    scale = d ** -0.5
    splits = _kernels.rank_splits(nb, rank)
    verified = _kernels.attention(q, k, v, scale, mask, block_mask=words, rank_tiles=rank, splits=splits)
    rows = range(t) if kernel_device.type == "cuda" else sorted({0, t // 2, t - 1, *range(1, t, max(1, t // 4))})
    for node in rows:
        path = _path(parents, node)
        slots = torch.cat([torch.arange(prefix), prefix + torch.tensor(path)]).to(k.device)
        k_log, v_log = k.index_select(0, slots), v.index_select(0, slots)
        own_splits = _kernels.rank_splits(-(-len(slots) // 64), rank)
        decoded = _kernels.attention(q[node:node + 1], k_log, v_log, scale, block_mask=words[node:node + 1],
                                     rank_tiles=rank, splits=own_splits)
        assert torch.equal(verified[node:node + 1], decoded), f"node {node} (depth {depth[node]})"
        if node in (0, t // 2, t - 1):  # the (slow, loop-written) oracle on a few rows
            ref = sparse_ref.attend_blocks(q[node:node + 1].cpu(), k_log.cpu(), v_log.cpu(), [positions[node]],
                                           scale, 64, [blocks[node]])
            torch.testing.assert_close(decoded.double().cpu(), ref, rtol=3e-2, atol=3e-2)


CAUSAL = device_cases(emulated=[(7, 57, 8, 2, 128, 1), (19, 120, 16, 1, 64, 2), (33, 0, 4, 4, 64, 1)],
                      gpu=[(t, p, hq, hkv, d, c) for t in (7, 33, 200) for p in (57, 4000) for hq, hkv in ((8, 2), (32, 2))
                           for d in (64, 128) for c in (1, 16)])


@KERNELS
@pytest.mark.parametrize("kernel_device, t, prefix, hq, hkv, d, chunk", CAUSAL, indirect=["kernel_device"])
def test_causal_chunk_rows_equal_decoded_rows(kernel_device, t, prefix, hq, hkv, d, chunk, sm90, monkeypatch) -> None:
    # A chain verified causally (or a chunked prefill) sees its keys in logical order already: the
    # fixed chunks and the whole-tile arithmetic alone make its rows equal decode's.
    if sm90:
        skip_unless_sm90(kernel_device)
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, torch.bfloat16, t + prefix, kernel_device)
    chunked = _kernels.attention(q, k, v, 0.1, chunk_tiles=chunk, sm90=sm90)
    assert_attention_close(chunked, q, k, v, 0.1, None, monkeypatch,
                           f"invariant causal T={t} prefix={prefix} sm90={sm90}")
    for i in (range(t) if kernel_device.type == "cuda" else (0, t // 2, t - 1)):
        decoded = _kernels.attention(q[i:i + 1], k[:prefix + i + 1], v[:prefix + i + 1], 0.1, chunk_tiles=chunk,
                                     sm90=sm90)
        assert torch.equal(chunked[i:i + 1], decoded), f"row {i}"


@KERNELS
@pytest.mark.parametrize("tree", [False, True], ids=["decode", "tree"])
def test_a_device_length_over_a_longer_view_changes_no_bit(kernel_device, tree: bool, sm90: bool) -> None:
    # A CUDA graph attends a whole-cache view with the length on the device: the chunks past the
    # length are empty and add exact zeros.
    if sm90:
        skip_unless_sm90(kernel_device)
    t, prefix = (11, 140) if tree else (1, 140)
    q, k, v = attention_inputs(t, prefix + 300, 8, 2, 64, torch.bfloat16, 5, kernel_device)
    mask = pack_bits(_tree(t, 3)[1]).to(kernel_device) if tree else None
    # The new tokens are the last T of the slots that count.
    exact = _kernels.attention(q, k[:prefix + t], v[:prefix + t], 0.1, mask, chunk_tiles=1, sm90=sm90)
    seqlen = torch.tensor([prefix + t], dtype=torch.int32, device=kernel_device)
    graphed = _kernels.attention(q, k, v, 0.1, mask, seqlen=seqlen, chunk_tiles=1, sm90=sm90)
    assert torch.equal(exact, graphed)


def test_the_chunk_plan_follows_the_span() -> None:
    _C = pytest.importorskip("edgespec._C", reason="the plan is C++ (attention_plan.h), built with the extension")
    plan = _C.attention_invariant_chunk_tiles
    # One plan per generation, from its span. Llama-3.1-8B (32 / 8 heads), a 32K span on 132 SMs:
    # 1024-key chunks, 32 of them when full.
    assert plan(32768, 32, 8, 132) == 16
    assert _C.attention_invariant_splits(32768, 16) == 32 and _C.attention_invariant_splits(1, 16) == 1
    # MiniCPM4 (G = 16): chunks of >= 2G tiles keep a 64-token tree's partials below its K/V bytes.
    assert plan(32768, 32, 2, 132) >= 32
    # Never more chunks than the combine takes, never under 4 tiles.
    assert _C.attention_invariant_splits(1 << 20, plan(1 << 20, 8, 8, 132)) <= _C.ATTENTION_MAX_SPLITS
    assert plan(100, 4, 4, 132) == 4


def test_invariant_mode_refuses_what_it_cannot_take(kernel_device) -> None:
    q, k, v = attention_inputs(3, 100, 8, 2, 64, torch.bfloat16, 1, kernel_device)
    with pytest.raises(ValueError, match="row-invariant"):
        _kernels.attention(q, k, v, 0.1, splits=2, chunk_tiles=1)
    with pytest.raises(ValueError, match="chunk_tiles"):
        _kernels.attention(q, k, v, 0.1, chunk_tiles=0)
    # The block-sparse mode needs a block mask and its splits; the chunked mode takes no block mask.
    words = torch.full((3, 2, 1), -1, dtype=torch.int64, device=kernel_device)
    with pytest.raises(ValueError, match="block mask"):
        _kernels.attention(q, k, v, 0.1, rank_tiles=2, splits=2)
    with pytest.raises(ValueError, match="splits"):
        _kernels.attention(q, k, v, 0.1, block_mask=words, rank_tiles=2)
    with pytest.raises(ValueError, match="no block mask"):
        _kernels.attention(q, k, v, 0.1, block_mask=words, chunk_tiles=1)
    # The C++ entry point re-checks: splits that are not the chunk count of the view.
    out = torch.empty_like(q)
    with pytest.raises(KernelError, match="chunks"):
        _kernels._run(_kernels._module().attention, _kernels._view(q), _kernels._view(k), _kernels._view(v), None,
                      _kernels._view(out), None, None, 0.1, 1, _kernels._stream(q), None, None, False, 1, None)
    # A tree without the resume scratch.
    mask = pack_bits(_tree(3, 1)[1]).to(kernel_device)
    po = torch.empty(2, 24, 64, device=kernel_device)
    pl = torch.empty(2, 24, device=kernel_device)
    with pytest.raises(KernelError, match="resume"):
        _kernels._run(_kernels._module().attention, _kernels._view(q), _kernels._view(k), _kernels._view(v),
                      _kernels._view(mask), _kernels._view(out), _kernels._view(po), _kernels._view(pl), 0.1, 2,
                      _kernels._stream(q), None, None, False, 1, None)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_tail_blocks_do_not_depend_on_thread_order(monkeypatch) -> None:
    # The tail blocks build their ancestor table and gather tiles between barriers: a missing one
    # shows up as a schedule-dependent result.
    cpu = torch.device("cpu")
    q, k, v = attention_inputs(20, 60, 8, 2, 64, torch.bfloat16, 9, cpu)
    _, visible = _tree(20, 4)
    mask = pack_bits(visible)
    for sm90 in (False, True):
        assert_schedule_independent(lambda: _kernels.attention(q, k, v, 0.1, mask, chunk_tiles=1, sm90=sm90),
                                    monkeypatch)
    # The block-sparse mode's tails also stage their token's selection (after the ancestor table).
    from sparse_cases import random_selection

    positions = (60 + visible.sum(dim=1) - 1).tolist()
    _, words = random_selection(positions, 2, 2, 64, torch.Generator().manual_seed(2), 0.5)
    assert_schedule_independent(lambda: _kernels.attention(q, k, v, 0.1, mask, block_mask=words, rank_tiles=1,
                                                           splits=2), monkeypatch)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
@pytest.mark.parametrize("t, prefix, hq, hkv, d, chunk", [(1, 300, 8, 2, 64, 2), (20, 60, 8, 2, 128, 1),
                                                          (12, 250, 16, 1, 128, 3)])
def test_emulated_kernel_families_share_their_arithmetic(t, prefix, hq, hkv, d, chunk) -> None:
    """The Hopper kernels' row-invariant mode does a row's arithmetic in the generic kernels' order
    (scale, max, rescale, pairwise sums, the quad's partial sums, the epilogue): on the emulator,
    where wgmma and mma.sync sum alike, the two families give the same bits. A change to either
    kernel's order fails here; on a GPU only the MMA units' rounding could still part them
    (bench_attention.py records whether it does: sm90_invariant_bitwise_equals_generic)."""
    cpu = torch.device("cpu")
    q, k, v = attention_inputs(t, prefix, hq, hkv, d, torch.bfloat16, t + prefix, cpu)
    mask = pack_bits(_tree(t, 8)[1]) if t > 1 else None
    generic = _kernels.attention(q, k, v, d ** -0.5, mask, chunk_tiles=chunk)
    hopper = _kernels.attention(q, k, v, d ** -0.5, mask, chunk_tiles=chunk, sm90=True)
    assert torch.equal(generic, hopper)
