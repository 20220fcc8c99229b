"""Attention of new tokens against the KV cache: one op, with causal and tree masks as variants.

Layout (batch 1, the engine's case): the cache holds keys/values for positions [0, S); the T
new tokens occupy the last T slots [S - T, S) (their K/V were written before the call).

* causal: new token i sees cache slots [0, S - T + i].
* tree:   new token i sees every prefix slot [0, S - T) and the tree slots j whose bit is set in
          row i of the bit-packed tree mask (its ancestors and itself).

Bit-packed tree mask: int64 [T, ceil(T / 64)]; bit (j % 64) of word (j // 64) in row i is set
iff tree token j is visible to tree token i. One 64-bit word per row per 64 tree tokens keeps
the mask reads of a kernel coalesced and works for trees of any size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from .attention_rows import RowPlan, attend_rows, plan_rows


# The cache length the GPU's row-invariant chunks are planned for when a call does not say (span).
DEFAULT_SPAN = 32768


def tree_mask_words(num_tokens: int) -> int:
    """Number of int64 words per row of a packed tree mask for `num_tokens` tree tokens."""
    return (num_tokens + 63) // 64


def pack_tree_mask(dense: torch.Tensor) -> torch.Tensor:
    """bool [T, T] visibility matrix -> packed int64 [T, ceil(T/64)] (see module docstring)."""
    if dense.dim() != 2 or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"pack_tree_mask: expected a square [T, T] mask, got {tuple(dense.shape)}")
    t = dense.shape[0]
    words = tree_mask_words(t)
    padded = torch.zeros(t, words * 64, dtype=torch.int64, device=dense.device)
    padded[:, :t] = dense.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=dense.device)
    # Summing distinct powers of two is an OR; bit 63 wraps to the sign bit, as intended.
    return (padded.view(t, words, 64) << shifts).sum(dim=-1)


def unpack_tree_mask(packed: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """packed int64 [T, W] -> bool [T, num_tokens]."""
    t, words = packed.shape
    if words != tree_mask_words(num_tokens):
        raise ValueError(f"tree mask has {words} words per row, expected {tree_mask_words(num_tokens)} for {num_tokens} tokens")
    shifts = torch.arange(64, dtype=torch.int64, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.view(t, words * 64)[:, :num_tokens].bool()


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tree_mask: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"attention: expected q [T,Hq,D], k/v [S,Hkv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    t, hq, d = q.shape
    s, hkv, dk = k.shape
    if dk != d:
        raise ValueError(f"attention: head dim of q ({d}) != head dim of k ({dk})")
    if hq % hkv:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hkv} KV heads")
    if s < t:
        raise ValueError(f"attention: {s} cache slots cannot hold the {t} new tokens")
    if tree_mask is not None:
        if tree_mask.dtype != torch.int64 or tree_mask.shape != (t, tree_mask_words(t)):
            raise ValueError(f"attention: tree mask must be int64 [{t}, {tree_mask_words(t)}], got {tree_mask.dtype} {tuple(tree_mask.shape)}")


class _PlanMemo:
    """The row plan of the last call: every layer of one forward attends the same rows, so the plan
    is made once per forward. Keyed by the prefix length and the tree mask's contents (a copy); the
    entry is one tuple, replaced whole, so threads running other models never mix two entries."""

    def __init__(self) -> None:
        self.entry: tuple[int, torch.Tensor | None, RowPlan] | None = None

    def get(self, prefix: int, tree_mask: torch.Tensor | None) -> RowPlan:
        entry = self.entry
        if entry is not None and entry[0] == prefix and _same_mask(entry[1], tree_mask):
            return entry[2]
        visible = None if tree_mask is None else unpack_tree_mask(tree_mask, tree_mask.shape[0])
        plan = plan_rows(prefix, visible)
        self.entry = (prefix, None if tree_mask is None else tree_mask.clone(), plan)
        return plan


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


_row_plans = _PlanMemo()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tree_mask: torch.Tensor | None = None,
    row_invariant: bool = True,
    seqlen: torch.Tensor | None = None,
    span: int | None = None,
) -> torch.Tensor:
    """Softmax attention of T new tokens over S cache slots (the new tokens are the last T).

    q: [T, Hq, D]; k, v: [S, Hkv, D] with Hq % Hkv == 0 (grouped-query attention);
    scale: multiplier of q·k (usually D ** -0.5);
    tree_mask: None for causal attention, or packed int64 [T, ceil(T/64)] (module docstring).
    row_invariant: give a decoded token and a verified tree token bitwise the same output (what
    makes greedy speculative output equal plain output): on the CPU attention_rows, on the GPU the
    kernels' row-invariant mode (csrc/kernels/attention.h; with EDGESPEC_SM90_ATTENTION=1 on a
    compute capability 9.0 GPU, the Hopper kernels' version of it). A draft, whose outputs only propose
    tokens, turns it off (one masked SDPA call on the CPU, the heuristic splits on the GPU).
    span: the most cache slots this generation can reach (KVCache.attention_span). The GPU's
    row-invariant mode cuts the keys into chunks sized from it, the same for every step of the
    generation; calls that leave it out share DEFAULT_SPAN, so they agree with each other.
    seqlen: None, or an int32 [1] tensor on q's device: only slots [0, seqlen) of k, v count (the
    new tokens are the last T of them). The kernel reads it on the device (what a CUDA graph
    captured over the whole cache needs); the torch path reads it on the host.
    Returns [T, Hq, D] in q's dtype.
    """
    _check(q, k, v, tree_mask)
    if backend.use_kernel(q, k, v, tree_mask, seqlen):
        from . import _kernels

        if _kernels.supports_attention(q, k, v, tree_mask):
            # Decoded and verified tokens need the invariant mode; a prefill does not (and may take sm90).
            invariant = row_invariant and (q.shape[0] == 1 or tree_mask is not None) and backend.row_invariant_kernels()
            # Both kinds of row go to the same kernels (sm90 or generic), or their bits would part.
            sm90 = invariant and _kernels.sm90_opted_in(q)
            if invariant and _kernels.invariant_rejection(q, k, tree_mask, sm90=sm90) is None:
                chunk = _kernels.invariant_chunk_tiles(span or DEFAULT_SPAN, q.shape[1], k.shape[1], q.device)
                return _kernels.attention(q, k, v, scale, tree_mask, seqlen=seqlen, chunk_tiles=chunk, sm90=sm90)
            return _kernels.attention(q, k, v, scale, tree_mask, seqlen=seqlen,
                                      sm90=_kernels.sm90_attention_requested(q, k))
    if seqlen is not None:
        n = int(seqlen.reshape(()).item())
        if not q.shape[0] <= n <= k.shape[0]:
            raise ValueError(f"attention: seqlen {n} must hold the {q.shape[0]} new tokens within the {k.shape[0]} slots")
        k, v = k[:n], v[:n]
    t, s = q.shape[0], k.shape[0]
    prefix = s - t
    if row_invariant and q.device.type == "cpu" and (t == 1 or tree_mask is not None):
        # Decoded and verified tokens: bitwise the same result either way (attention_rows).
        return attend_rows(q, k, v, scale, _row_plans.get(prefix, tree_mask))
    mask = None
    if tree_mask is not None:
        mask = torch.ones(t, s, dtype=torch.bool, device=q.device)
        mask[:, prefix:] = unpack_tree_mask(tree_mask, t)
    elif t > 1:
        cols = torch.arange(s, device=q.device)
        rows = torch.arange(t, device=q.device).unsqueeze(1) + prefix
        mask = cols <= rows
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # [1, Hq, T, D]
        k.transpose(0, 1).unsqueeze(0),  # [1, Hkv, S, D]
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)  # [T, Hq, D]
