"""Preallocated KV cache for one sequence (batch 1, the latency case)."""
from __future__ import annotations

from typing import Sequence

import torch

# Generations that reach fewer slots than this share one attention plan (plan_span).
MIN_ATTENTION_SPAN = 1024


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, allocated once.

    k, v: [num_layers, max_len, num_kv_heads, head_dim]. Slot s of layer l holds the K/V of the
    token written at slot s; `length` counts the committed slots [0, length). Speculative
    verification writes tree tokens after `length` and `compact` keeps the accepted ones.
    """

    def __init__(self, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, max_len, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.length = 0
        # The most slots the current generation can reach, rounded up to a power of two: the GPU's
        # row-invariant attention cuts the keys into chunks sized from it, one plan for the whole
        # generation (ops.attention's `span`). plan_span sets it; the default plans for a full cache.
        self.attention_span = max_len

    def plan_span(self, end: int) -> None:
        """Declare that the coming generation attends at most `end` slots. Any value keeps decoded
        and verified tokens bitwise alike (the plan only has to stay fixed for the generation); a
        close one gives a short generation in a long cache short key chunks, i.e. more parallel
        blocks per decode step. Powers of two, so few plans (and CUDA graph sets) ever exist."""
        span = MIN_ATTENTION_SPAN
        while span < end:
            span *= 2
        self.attention_span = min(span, self.max_len)

    def write(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v: [T, Hkv, D] at slots [start, start + T) of `layer`.

        start may be a one-element int64 tensor on the cache's device (a CUDA graph's replays each
        write at another slot); it is not read on the host, so the caller keeps it in range."""
        if isinstance(start, torch.Tensor):
            slots = start.reshape(1) + torch.arange(k.shape[0], device=start.device)
            self.k[layer].index_copy_(0, slots, k)
            self.v[layer].index_copy_(0, slots, v)
            return
        end = start + k.shape[0]
        if end > self.max_len:
            raise IndexError(f"KV cache overflow: writing slots [{start}, {end}) of a cache of {self.max_len}")
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v

    def view(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of slots [0, end) of `layer`: two [end, Hkv, D] views (no copy)."""
        return self.k[layer, :end], self.v[layer, :end]

    def compact(self, src_slots: torch.Tensor | list[int], dst_start: int) -> None:
        """Move the K/V at `src_slots` ([n] int64 or a list, increasing) to slots [dst_start,
        dst_start + n) of every layer: keeps the accepted path of a verified tree contiguous after
        the prefix. A host list lets a path that is already in place (a chain of first children)
        cost nothing, without reading the device."""
        if isinstance(src_slots, list):
            if src_slots == list(range(dst_start, dst_start + len(src_slots))):
                return
            src_slots = torch.tensor(src_slots, dtype=torch.int64, device=self.k.device)
        n = src_slots.numel()
        if n == 0:
            return
        # index_select copies before the write, so overlapping source/destination ranges are safe.
        self.k[:, dst_start:dst_start + n] = self.k.index_select(1, src_slots)
        self.v[:, dst_start:dst_start + n] = self.v.index_select(1, src_slots)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences (prefix caching)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
