"""Row-invariant attention on the CPU: a token's attention output is bitwise the same whether it is
decoded alone or verified inside a draft tree, so greedy speculative output equals plain greedy
output token for token in bf16 too (and sampled verification draws from the very same logits).

Why one masked SDPA call is not enough (measured on torch's CPU flash-attention kernel):
* a row's rounding depends on how many query rows share its call (M = 1 takes a GEMV path; in
  fp32 every M rounds its own way), though never on where it sits among them, on the batch size
  (except masked fp32 calls on several threads, seen on an AVX-512 machine: fp32 rows agree only
  up to rounding there, as the engine's fp32 GEMMs do anyway), or on strides (a cache view and a
  gathered copy of the same keys give the same bits);
* a tree token's visible keys do not sit where plain decoding has them: its ancestors are spread
  among masked siblings, and the kernel sums exp() and P·V by vector lane and key block, so the
  same keys at other offsets round differently.

So every query row attends its *logical* keys (the committed prefix, then its ancestors in depth
order, then itself) laid out exactly as plain decoding lays them out, split at a multiple of SPLIT
chosen by the row's position p alone:

    head = logical keys [0, h), h = p // SPLIT * SPLIT: for a tree, the committed prefix, read in
           place by all its rows together, HEAD_TOKENS rows to a batch entry (fixed row count);
    tail = logical keys [h, p], at most SPLIT keys: gathered per row into SPLIT slots, the unused
           ones masked, all rows in one batched call;

and the two parts are merged elementwise through their log-sum-exps. A decode step at position p
makes the same calls with the same shapes on the same bits. tests/test_attention_rows.py checks
the invariance bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .tree_paths import ancestors_by_depth, logical_slots

# Keys per tail: each row gathers and attends SPLIT tail slots per layer, and every position past
# SPLIT pays a head call and a merge.
SPLIT = 64
# Tokens per batch entry of a head call. The row count of a call is fixed (see above), so a
# decoded token pays for HEAD_TOKENS rows; a verified tree shares each entry among HEAD_TOKENS
# tokens. Measured (SmolLM2, bf16, 1 thread): a decode step's head call costs 1.0x at 128 keys and
# 1.6x at 2,000 keys that of the lone row.
HEAD_TOKENS = 4


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, width: int,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One flash-attention call with exactly `width` query rows per batch entry and KV head (q's m
    rows, padded with zero rows): the kernel's per-row rounding depends on that count, never on
    where a row sits among them or on the batch size. q: [B, Hkv, m, D], m <= width; k, v:
    [B, Hkv, L, D] (stride-0 expanded batches are fine); mask: additive, broadcast to [B, Hkv, width,
    L], or None. Returns out [B, Hkv, m, D] in q's dtype and the log-sum-exp of the scaled scores,
    fp32 [B, Hkv, m]."""
    m = q.shape[2]
    if m < width:
        q = torch.cat([q, q.new_zeros(q.shape[0], q.shape[1], width - m, q.shape[3])], dim=2)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
    return out[:, :, :m], lse[:, :, :m]


@dataclass
class RowPlan:
    """Where every query row's logical keys live in the cache, grouped into calls.

    tail_slots: int64 [T, SPLIT], the cache slots of each row's tail keys (then padding);
    tail_valid: bool [T, SPLIT], which of them are keys (a prefix of each row);
    heads: (rows [R] int64, h) per head length h > 0 whose keys are the cache slots [0, h), read in
        place, or (rows, slots [R, h]) for rows whose head reaches into the tree (gathered);
    head_rows: the rows of the concatenated head groups (None: every row, in order; empty: none).
    """

    tail_slots: torch.Tensor
    tail_valid: torch.Tensor
    heads: list[tuple[torch.Tensor, int | torch.Tensor]]
    head_rows: torch.Tensor | None
    _masks: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def tail_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [T, 1, 1, SPLIT] in `dtype` (the kernel wants the query's): 0 or -inf."""
        if dtype not in self._masks:
            zeros = torch.zeros(self.tail_valid.shape, dtype=dtype)
            self._masks[dtype] = zeros.masked_fill(~self.tail_valid, float("-inf"))[:, None, None, :]
        return self._masks[dtype]


def plan_rows(n: int, visible: torch.Tensor | None) -> RowPlan:
    """Plan the calls for T query rows after a committed prefix of n slots.

    visible: None for a single decoded token (T = 1, at slot n), or bool [T, T], the unpacked tree
    mask (row i sees tree token j: its ancestors and itself, at any slots).
    """
    if visible is None:
        visible = torch.ones(1, 1, dtype=torch.bool)
    t = visible.shape[0]
    depth, order = ancestors_by_depth(visible)                                        # [T], [T, T]
    positions = depth + n
    starts = positions // SPLIT * SPLIT

    def slots(rows: torch.Tensor, lo: torch.Tensor, length: int) -> torch.Tensor:
        """Cache slots of each row's logical keys [lo_r, lo_r + length) (past its position: slot 0
        as padding): int64 [R, length]."""
        logical = lo.unsqueeze(1) + torch.arange(length)                                  # [R, L]
        past = logical > positions[rows].unsqueeze(1)
        return logical_slots(order[rows], n, logical).masked_fill(past, 0)

    everyone = torch.arange(t)
    tail_slots = slots(everyone, starts, SPLIT)
    tail_valid = starts.unsqueeze(1) + torch.arange(SPLIT) <= positions.unsqueeze(1)
    heads: list[tuple[torch.Tensor, int | torch.Tensor]] = []
    head_rows: list[int] = []
    for h in sorted(set(starts.tolist()) - {0}):
        rows = (starts == h).nonzero().flatten()
        heads.append((rows, h) if h <= n else (rows, slots(rows, torch.zeros_like(rows), h)))
        head_rows += rows.tolist()
    return RowPlan(tail_slots, tail_valid, heads,
                   None if head_rows == list(range(t)) else torch.tensor(head_rows, dtype=torch.int64))


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache [S, Hkv, D], slots [R, L] -> [R, Hkv, L, D] (a copy)."""
    r, length = slots.shape
    return cache.index_select(0, slots.view(-1)).view(r, length, *cache.shape[1:]).permute(0, 2, 1, 3)


def _by_kv_head(cache: torch.Tensor) -> torch.Tensor:
    """cache slots [S, Hkv, D] -> a [1, Hkv, S, D] view."""
    return cache.permute(1, 0, 2).unsqueeze(0)


def _merge(head_out: torch.Tensor, head_lse: torch.Tensor, tail_out: torch.Tensor,
           tail_lse: torch.Tensor) -> torch.Tensor:
    """Softmax attention over head and tail keys from the two parts: the head's share of the
    probability mass is w = 1 / (1 + exp(lse_tail - lse_head)). outs: [R, Hkv, g, D]; lses: fp32
    [R, Hkv, g]. Returns tail_out's dtype.

    Elementwise, and only through ops whose result does not depend on where an element sits in the
    tensor: torch's sigmoid, for one, rounds the elements of a loop's scalar remainder differently
    from its vectorised body (measured), which would make a row's bits depend on the row count.
    """
    w = (tail_lse - head_lse).exp_().add_(1.0).reciprocal_().unsqueeze(-1)
    tail = tail_out.float()
    return torch.addcmul(tail, head_out.float() - tail, w).to(tail_out.dtype)


def attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, plan: RowPlan) -> torch.Tensor:
    """Attention of the T new tokens (the last T cache slots) as planned by plan_rows.

    q: [T, Hq, D]; k, v: [S, Hkv, D] (CPU; S - T committed slots, then the new tokens' own).
    Returns [T, Hq, D] in q's dtype.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qg = q.view(t, hkv, g, d)                                                  # [T, Hkv, g, D]
    slots = plan.tail_slots
    out, lse = _attend(qg, _gather(k, slots), _gather(v, slots), scale, max(g, 2), plan.tail_mask(q.dtype))
    if plan.head_rows is not None and plan.head_rows.numel() == 0:
        return out.reshape(t, hq, d)
    width = HEAD_TOKENS * g
    outs, lses = [], []
    for rows, keys in plan.heads:
        qr = qg if plan.head_rows is None and len(plan.heads) == 1 else qg[rows]
        r = qr.shape[0]
        if isinstance(keys, int):
            # Rows sharing the prefix [0, h): HEAD_TOKENS of them to a batch entry, over one K/V.
            blocks = -(-r // HEAD_TOKENS)
            if blocks * HEAD_TOKENS > r:
                qr = torch.cat([qr, qr.new_zeros(blocks * HEAD_TOKENS - r, hkv, g, d)])
            qh = qr.view(blocks, HEAD_TOKENS, hkv, g, d).transpose(1, 2).reshape(blocks, hkv, width, d)
            kh = _by_kv_head(k[:keys]).expand(blocks, -1, -1, -1)              # [blocks, Hkv, h, D]
            vh = _by_kv_head(v[:keys]).expand(blocks, -1, -1, -1)
            o, l_ = _attend(qh, kh, vh, scale, width)
            outs.append(o.reshape(blocks, hkv, HEAD_TOKENS, g, d).transpose(1, 2).reshape(-1, hkv, g, d)[:r])
            lses.append(l_.reshape(blocks, hkv, HEAD_TOKENS, g).transpose(1, 2).reshape(-1, hkv, g)[:r])
        else:
            o, l_ = _attend(qr, _gather(k, keys), _gather(v, keys), scale, width)
            outs.append(o)
            lses.append(l_)
    head_out, head_lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
    if plan.head_rows is None:
        return _merge(head_out, head_lse, out, lse).reshape(t, hq, d)
    rows = plan.head_rows
    merged = _merge(head_out, head_lse, out.index_select(0, rows), lse.index_select(0, rows))
    return out.index_copy(0, rows, merged).reshape(t, hq, d)
