"""Reference InfLLM-v2 block-sparse attention (MiniCPM4 `sparse_config`), written as loops.

All lengths are in tokens. For a query at absolute position p (context [0, p + 1)) and each KV head:

1. compressed key j = mean of the keys of tokens [j*stride, j*stride + kernel_size), for every
   kernel complete within the tokens the query may score against;
2. per query head: softmax over those kernels of scale * q . ck_j; summed over the query heads of
   the KV head's group;
3. block b scores the max over kernels r*b - 1 ... r*b + r - 1 (r = block_size / kernel_stride):
   a max-pool of kernel r + 1, stride r, padding 1;
4. selected = init blocks + the window_size / block_size blocks ending with the query's block +
   the topk best other blocks (ties: lower block first), all at or before the query's block;
5. attention over the tokens of the selected blocks (causal), or over every earlier token when
   p + 1 < dense_len.

Tree verification: a tree token is computed exactly as decoding its path would compute it: on its
logical sequence (the committed prefix, then its ancestors in depth order, then itself), with the
compressed keys of that sequence (those its path completes included) and its blocks.

Computes in float64 unless a `dtype` is given. Never imports edgespec.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SparseParams:
    block_size: int
    kernel_size: int
    kernel_stride: int
    init_blocks: int
    window_size: int
    topk: int
    dense_len: int


def kernel_count(length: int, p: SparseParams) -> int:
    """Number of kernels whose tokens all lie in [0, length)."""
    count = 0
    while count * p.kernel_stride + p.kernel_size <= length:
        count += 1
    return count


def compressed_keys(k: torch.Tensor, length: int, p: SparseParams, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """k: [S, Hkv, D] keys of one layer -> [kernel_count(length), Hkv, D] compressed keys."""
    rows = []
    for j in range(kernel_count(length, p)):
        first = j * p.kernel_stride
        rows.append(k[first:first + p.kernel_size].to(dtype).mean(dim=0))
    if not rows:
        return torch.zeros(0, k.shape[1], k.shape[2], dtype=dtype)
    return torch.stack(rows)


def pool_members(block: int, num_kernels: int, p: SparseParams) -> list[int]:
    """The kernels whose group scores block `block` max-pools."""
    r = p.block_size // p.kernel_stride
    return [j for j in range(r * block - 1, r * block + r) if 0 <= j < num_kernels]


def block_scores(q: torch.Tensor, ck: torch.Tensor, scale: float, num_blocks: int, p: SparseParams,
                 dtype: torch.dtype = torch.float64) -> list[list[float]]:
    """One query's block scores. q: [Hq, D]; ck: [C, Hkv, D] the kernels this query sees.

    Returns scores[g][b] for KV head g and block b < num_blocks (-inf when no kernel scores it).
    """
    hq = q.shape[0]
    c, hkv, _ = ck.shape
    group = hq // hkv
    out = []
    for g in range(hkv):
        summed = torch.zeros(c, dtype=dtype)
        for h in range(g * group, (g + 1) * group):
            if c:
                summed += torch.softmax(ck[:, g].to(dtype) @ q[h].to(dtype) * scale, dim=0)
        values = summed.tolist()
        row = []
        for b in range(num_blocks):
            members = pool_members(b, c, p)
            row.append(max(values[j] for j in members) if members else float("-inf"))
        out.append(row)
    return out


def _candidates(scores: list[float], position: int, p: SparseParams) -> tuple[list[int], list[int]]:
    """(always-selected blocks, scored candidates sorted best first) of one (query, KV head)."""
    q_blk = position // p.block_size
    window = p.window_size // p.block_size
    fixed = [b for b in range(q_blk + 1) if b < p.init_blocks or b > q_blk - window]
    cands = [b for b in range(min(q_blk + 1, len(scores)))
             if b not in fixed and scores[b] != float("-inf")]
    cands.sort(key=lambda b: (-scores[b], b))
    return fixed, cands


def select(scores: list[float], position: int, p: SparseParams) -> list[int]:
    """Sorted selected blocks of one (query, KV head) from its block scores."""
    fixed, cands = _candidates(scores, position, p)
    return sorted(fixed + cands[:p.topk])


def equivalent_selection(got: list[int], want: list[int], scores: list[float], position: int,
                         p: SparseParams, tol: float) -> bool:
    """Whether selection `got` differs from the reference `want` only by swapping scored blocks whose
    scores are within `tol` of the last one `want` chose (what a different rounding may do)."""
    q_blk = position // p.block_size
    fixed = {b for b in range(q_blk + 1) if b < p.init_blocks or b > q_blk - p.window_size // p.block_size}
    if not fixed <= set(got) or len(got) != len(want) or len(set(got)) != len(got):
        return False
    scored = set(want) - fixed
    if not scored:
        return set(got) == set(want)
    cut = min(scores[b] for b in scored)
    return all(b < len(scores) and scores[b] >= cut - tol for b in set(got) - fixed)


@dataclass
class SparseResult:
    out: torch.Tensor                       # [T, Hq, D]
    selected: list[list[list[int]] | None]  # per query: per KV head sorted blocks; None for dense queries
    scores: list[list[list[float]] | None]  # per query: per KV head block scores; None for dense queries


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], scale: float,
                     p: SparseParams, kv_limit: int, tree: torch.Tensor | None = None,
                     dense_len: int | None = None, dtype: torch.dtype = torch.float64) -> SparseResult:
    """q: [T, Hq, D]; k, v: [S, Hkv, D] (the T new tokens are the last T slots); positions: T ints;
    kv_limit: tokens whose kernels may be scored (S for a chain; for a tree, the committed prefix
    S - T: its tokens score their own paths' kernels past it);
    tree: None (causal chain) or bool [T, T] (row i: tree tokens visible to tree token i, its
    ancestors and itself); dense_len: overrides p.dense_len (0 forces sparse)."""
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    prefix = s - t
    dense_from = p.dense_len if dense_len is None else dense_len
    num_blocks = (s + p.block_size - 1) // p.block_size
    chain_ck = compressed_keys(k, kv_limit, p, dtype)
    out = torch.zeros(t, hq, d, dtype=dtype)
    selected: list[list[list[int]] | None] = []
    all_scores: list[list[list[float]] | None] = []
    for i in range(t):
        pos = positions[i]
        q_blk = pos // p.block_size
        if tree is None:
            seq_k, seq_v, limit, all_ck = k, v, kv_limit, chain_ck
        else:
            assert kv_limit == prefix, "a tree's tokens follow the committed prefix"
            path = sorted((j for j in range(t) if tree[i, j]), key=lambda j: int(tree[j].sum()))
            slots = list(range(prefix)) + [prefix + j for j in path]
            assert pos == len(slots) - 1, f"tree token {i} at position {pos} has a path of {len(path)} tokens"
            seq_k, seq_v, limit = k[slots], v[slots], len(slots)
            all_ck = compressed_keys(seq_k, limit, p, dtype)
        if pos + 1 < dense_from:
            blocks = [list(range(q_blk + 1)) for _ in range(hkv)]
            selected.append(None)
            all_scores.append(None)
        else:
            visible = kernel_count(min(pos + 1, limit), p)
            scores = block_scores(q[i], all_ck[:visible], scale, num_blocks, p, dtype)
            blocks = [select(scores[g], pos, p) for g in range(hkv)]
            selected.append(blocks)
            all_scores.append(scores)
        out[i] = _attend_one(q[i], seq_k, seq_v, pos, blocks, p.block_size, scale, dtype)
    return SparseResult(out, selected, all_scores)


def _attend_keys(q_i: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: list[list[int]], scale: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """One query [Hq, D] over the slots keys[g] of k, v [S, Hkv, D] for its query heads of KV head g -> [Hq, D]."""
    hq, d = q_i.shape
    group = hq // k.shape[1]
    out = torch.zeros(hq, d, dtype=dtype)
    for h in range(hq):
        g = h // group
        if not keys[g]:
            continue  # a row that sees nothing is zeros (the attention kernels' contract)
        idx = torch.tensor(keys[g], dtype=torch.long)
        weights = torch.softmax(k[idx, g].to(dtype) @ q_i[h].to(dtype) * scale, dim=0)   # [n]
        out[h] = weights @ v[idx, g].to(dtype)
    return out


def _block_slots(end: int, chosen: list[int], block_size: int) -> list[int]:
    """The slots before `end` that lie in the chosen blocks."""
    wanted = set(chosen)
    return [slot for slot in range(end) if slot // block_size in wanted]


def _attend_one(q_i: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int, blocks: list[list[int]],
                block_size: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """One query at position `pos` of the sequence k, v over its KV heads' selected blocks (causal)."""
    return _attend_keys(q_i, k, v, [_block_slots(pos + 1, row, block_size) for row in blocks], scale, dtype)


def attend_blocks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], scale: float,
                  block_size: int, blocks: list[list[list[int]]], tree: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Attention over given selections (the block-sparse attention kernel's contract): blocks[i][g]
    lists the blocks query i sees through KV head g, causal within them; with a tree (bool [T, T],
    as in sparse_attention) the blocks select among the committed prefix's slots and every tree
    token sees the tree tokens its row shows. -> [T, Hq, D]."""
    t = q.shape[0]
    prefix = k.shape[0] - t
    outs = []
    for i in range(t):
        if tree is None:
            outs.append(_attend_one(q[i], k, v, positions[i], blocks[i], block_size, scale, dtype))
        else:
            own = [prefix + j for j in range(t) if tree[i, j]]
            keys = [_block_slots(prefix, row, block_size) + own for row in blocks[i]]
            outs.append(_attend_keys(q[i], k, v, keys, scale, dtype))
    return torch.stack(outs)
