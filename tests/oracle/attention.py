"""Naive fp32 reference for attention of T new tokens over a KV cache (causal or tree-masked).

Never imports edgespec: the bit-packed tree mask is decoded here independently of
edgespec.ops.attention, so a packing bug cannot hide in both the kernel path and the reference.

Conventions (the same contract as edgespec.ops.attention):
* q [T, Hq, D]; k, v [S, Hkv, D]; the T new tokens occupy the last T cache slots [S - T, S).
* Query head h reads KV head h // (Hq // Hkv) (grouped-query attention, repeat-interleave order).
* causal: token i sees slots [0, S - T + i].
* tree:   token i sees every prefix slot [0, S - T) plus tree slot S - T + j whenever bit j % 64 of
          word j // 64 in row i of the packed mask int64 [T, ceil(T / 64)] is set.
"""
from __future__ import annotations

import torch


def mask_words(num_tokens: int) -> int:
    """64-bit words per packed mask row for `num_tokens` tree tokens."""
    return (num_tokens + 63) // 64


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """bool [T, T] -> int64 [T, ceil(T/64)], bit j % 64 of word j // 64 = dense[i, j].

    Built word by word with Python integers (slow, obviously right) rather than the vectorised
    shift-and-sum of the library.
    """
    t = dense.shape[0]
    rows = dense.cpu().tolist()
    out = torch.zeros(t, mask_words(t), dtype=torch.int64)
    for i, row in enumerate(rows):
        for w in range(mask_words(t)):
            word = 0
            for b in range(64):
                j = w * 64 + b
                if j < t and row[j]:
                    word |= 1 << b
            # Two's complement: bit 63 set means a negative int64.
            out[i, w] = word - (1 << 64) if word >= 1 << 63 else word
    return out.to(dense.device)


def unpack_bits(packed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """int64 [T, W] -> bool [T, num_tokens] (inverse of pack_bits)."""
    rows = packed.cpu().tolist()
    dense = torch.zeros(len(rows), num_tokens, dtype=torch.bool)
    for i, row in enumerate(rows):
        for j in range(num_tokens):
            dense[i, j] = bool((row[j // 64] >> (j % 64)) & 1)
    return dense.to(packed.device)


def random_tree(num_tokens: int, generator: torch.Generator) -> list[int]:
    """Parent index of each tree token (-1 for children of the committed prefix).

    Tokens are in topological order (a parent precedes its children), as the speculative driver
    lays them out. Several roots are allowed so forests (e.g. sibling first tokens) are covered.
    """
    parents = []
    for i in range(num_tokens):
        roll = int(torch.randint(0, 10, (1,), generator=generator))
        if i == 0 or roll == 0:
            parents.append(-1)
        else:
            # Prefer recent tokens as parents so that trees get deep, not only wide.
            low = max(0, i - 8)
            parents.append(int(torch.randint(low, i, (1,), generator=generator)))
    return parents


def tree_visibility(parents: list[int]) -> torch.Tensor:
    """bool [T, T]: token i sees itself and its ancestors."""
    t = len(parents)
    dense = torch.zeros(t, t, dtype=torch.bool)
    for i in range(t):
        j = i
        while j >= 0:
            dense[i, j] = True
            j = parents[j]
    return dense


def tree_dense_visibility(tree: torch.Tensor, seqlen: int) -> torch.Tensor:
    """bool [T, S] from a tree's own bool [T, T] visibility (ancestors and self): every tree
    token also sees the whole committed prefix [0, S - T)."""
    t = tree.shape[0]
    if tree.shape != (t, t) or seqlen < t:
        raise ValueError(f"tree_dense_visibility: need a square [T, T] tree and S >= T, got "
                         f"{tuple(tree.shape)} and S={seqlen}")
    vis = torch.ones(t, seqlen, dtype=torch.bool)
    vis[:, seqlen - t:] = tree.bool().cpu()
    return vis


def block_visibility(selected_blocks: list[list[int]], seqlen: int, block_size: int = 64,
                     causal: bool = True) -> torch.Tensor:
    """bool [T, S] for block-sparse attention (InfLLM-v2): new token i sees the slots of the key
    blocks selected for it (block b = slots [b * block_size, (b + 1) * block_size)), e.g. top-k
    blocks + sink + local window; with `causal`, never a slot after its own position.

    For selections made per KV head, stack one matrix per head into [Hkv, T, S] and pass it as
    attention_ref's dense_visibility.
    """
    t = len(selected_blocks)
    vis = torch.zeros(t, seqlen, dtype=torch.bool)
    for i, blocks in enumerate(selected_blocks):
        for b in blocks:
            vis[i, b * block_size:(b + 1) * block_size] = True
    return vis & visibility(t, seqlen) if causal else vis


def visibility(num_tokens: int, seqlen: int, tree_mask: torch.Tensor | None = None) -> torch.Tensor:
    """bool [T, S]: which cache slots each new token attends to."""
    prefix = seqlen - num_tokens
    if tree_mask is None:
        cols = torch.arange(seqlen).unsqueeze(0)
        rows = torch.arange(num_tokens).unsqueeze(1) + prefix
        return cols <= rows
    vis = torch.ones(num_tokens, seqlen, dtype=torch.bool)
    vis[:, prefix:] = unpack_bits(tree_mask, num_tokens).cpu()
    return vis


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  tree_mask: torch.Tensor | None = None, dense_visibility: torch.Tensor | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Softmax attention in fp32, one query head at a time (bounded memory for T, S ~ 4K).

    q: [T, Hq, D]; k, v: [S, Hkv, D] (any float dtype, any device); tree_mask: packed int64
    [T, ceil(T/64)] or None; dense_visibility: bool [T, S], or [Hkv, T, S] for a per-KV-head
    (block-sparse) selection, overriding both (when the caller already built it).
    dtype: the precision of every step (float64 for a tighter reference).
    Returns [T, Hq, D] in `dtype` on q's device. A row that sees no slot is NaN, like softmax
    over an empty set.
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    group = hq // hkv
    vis = dense_visibility if dense_visibility is not None else visibility(t, s, tree_mask)
    vis = vis.to(q.device)
    if vis.dim() == 2:
        vis = vis.expand(hkv, t, s)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    out = torch.empty(t, hq, d, dtype=dtype, device=q.device)
    for h in range(hq):
        kv = h // group
        scores = (qf[:, h, :] @ kf[:, kv, :].T) * scale                  # [T, S]
        scores = scores.masked_fill(~vis[kv], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, h, :] = probs @ vf[:, kv, :]                                # [T, D]
    return out
