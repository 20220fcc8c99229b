"""Sequences parked off the KV cache, so that prefix caching serves more than the last one.

The live KV cache holds one sequence. A request whose prompt shares little with it (another
conversation, a server front end's title or follow-up task between two turns of a chat) overwrites
it, and the next turn of the first conversation prefilled its whole history again. Before a
generation overwrites committed slots, the engine parks them here: the token ids behind the slots,
a host copy of their keys and values, and the drafter's (speculative decoding). A later prompt that
extends a parked sequence further than the live one copies it back instead of prefilling it (a copy
moves bytes, a prefill computes every layer: the demo's 300-token prefix, 6.6 MB of bf16 K/V, is
parked or copied back in about 1 ms, against about 0.4 s to prefill it with 4-bit weights on one
core; ad hoc).

Entries live on the host, least recently used first out, within a byte budget
(EDGESPEC_PREFIX_STORE_MB, default 1024; 0 parks nothing). Entries share the slots they have in
common with the sequence parked or restored before them (SlotCopy): the choices of one prompt, or
one conversation parked turn after turn, copy only their new slots. The engine keeps such a copy of
the live sequence too (`pinned`, so that parking it again copies only what follows); it counts in
the budget like an entry and goes last, when the entries alone no longer make room.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .kv_cache import KVCache, common_prefix

DEFAULT_BUDGET_MB = 1024
# A parked sequence is copied back only if it saves at least this many prompt tokens' prefill over
# what the live cache keeps: below it the copies cost about what they save.
MIN_GAIN_TOKENS = 16


def budget_from_env() -> int:
    """EDGESPEC_PREFIX_STORE_MB in bytes (default DEFAULT_BUDGET_MB)."""
    value = os.environ.get("EDGESPEC_PREFIX_STORE_MB", str(DEFAULT_BUDGET_MB)).strip()
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"EDGESPEC_PREFIX_STORE_MB={value!r} is not a number of MiB") from None
    if mb < 0:
        raise ValueError(f"EDGESPEC_PREFIX_STORE_MB must be >= 0, got {value!r}")
    return int(mb * 2**20)


@dataclass
class SlotCopy:
    """Host copies of slots [0, length) of a KVCache, in segments (start, k, v): k, v [num_layers,
    len, Hkv, D] hold slots [start, start + len).

    A copy can take its first slots from another copy (`share`) that holds the same K/V: the
    engine knows which parked copy the live cache's first slots equal (it parked or restored them
    and has not overwritten them since), so parking a sequence again with another ending (another
    choice of the same prompt, a regenerated reply) or with a new turn copies only the slots after
    them. Shared slots are views: the host memory is held once, and counted once (storages())."""

    segments: list[tuple[int, torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, cache: KVCache, n: int, share: "SlotCopy | None" = None) -> "SlotCopy":
        head = share.head(n) if share is not None else cls([])
        m = head.length
        if n > m:
            head.segments.append((m, cache.k[:, m:n].to("cpu", copy=True), cache.v[:, m:n].to("cpu", copy=True)))
        return head

    @property
    def length(self) -> int:
        return self.segments[-1][0] + self.segments[-1][1].shape[1] if self.segments else 0

    def head(self, n: int) -> "SlotCopy":
        """The copy of slots [0, min(n, length)) only (views of this one's tensors)."""
        out = []
        for start, k, v in self.segments:
            if start >= n:
                break
            end = min(start + k.shape[1], n)
            out.append((start, k[:, :end - start], v[:, :end - start]))
        return SlotCopy(out)

    def storages(self) -> dict[int, int]:
        """{address: bytes} of the host memory this copy keeps alive (whole storages: a view keeps
        all of the tensor it was taken from)."""
        out = {}
        for _, k, v in self.segments:
            for t in (k, v):
                storage = t.untyped_storage()
                out[storage.data_ptr()] = storage.nbytes()
        return out

    def nbytes(self) -> int:
        return sum(self.storages().values())

    def restore(self, cache: KVCache, n: int) -> None:
        """Write the first n copied slots back into slots [0, n) of `cache`."""
        for start, k, v in self.head(n).segments:
            cache.k[:, start:start + k.shape[1]].copy_(k)
            cache.v[:, start:start + v.shape[1]].copy_(v)


@dataclass
class Parked:
    """One parked sequence: the tokens behind its target slots (`ids`, slots [0, len(ids))), their
    K/V, what they were computed under (LLM._cache_state), and the drafter that parked with it
    (weakly: a replaced drafter's state is never restored into another) with its state and bytes."""

    ids: list[int]
    target: SlotCopy
    under: tuple[Any, ...]
    drafter: weakref.ref | None = None
    drafter_state: Any = None
    drafter_bytes: int = 0

    def nbytes(self) -> int:
        return self.target.nbytes() + self.drafter_bytes

    def state_of(self, drafter: Any) -> Any:
        """What `drafter` parked with this sequence, or None (another drafter, or none, parked it;
        or `drafter` is None: a drafter since collected leaves a dead reference, which gives None too)."""
        if drafter is None or self.drafter is None:
            return None
        return self.drafter_state if self.drafter() is drafter else None


class PrefixStore:
    """Parked sequences, most recently used last, within `budget` bytes."""

    def __init__(self, budget: int | None = None) -> None:
        self.budget = budget_from_env() if budget is None else budget
        self.entries: list[Parked] = []
        self.pinned: SlotCopy | None = None  # the engine's host copy of the live sequence

    def nbytes(self) -> int:
        """Host bytes the entries and the pinned copy hold (storages they share counted once)."""
        target: dict[int, int] = dict(self.pinned.storages()) if self.pinned is not None else {}
        for e in self.entries:
            target.update(e.target.storages())
        return sum(target.values()) + sum(e.drafter_bytes for e in self.entries)

    def pin(self, copy: SlotCopy | None) -> None:
        """Hold `copy` (None: nothing) as the live sequence's, within the budget."""
        self.pinned = copy
        self._evict()

    def _evict(self) -> None:
        """Least recently used entries out, then the pinned copy, until the bytes fit the budget."""
        while self.nbytes() > self.budget and self.entries:
            self.entries.pop(0)
        if self.nbytes() > self.budget:
            self.pinned = None

    def clear(self) -> None:
        self.entries.clear()
        self.pinned = None

    def best(self, prompt: Sequence[int], under: tuple[Any, ...],
             worth: Callable[[Parked, int], int] | None = None) -> tuple[int, int, int]:
        """(index, worth, tokens) of the parked sequence computed under `under` worth the most for
        `prompt`: `worth(entry, tokens)` of the `tokens` leading prompt tokens whose slots it holds
        (default: those tokens; speculation also counts what the drafter keeps); (-1, 0, 0) when
        none is worth any."""
        best = (-1, 0, 0)
        for i, e in enumerate(self.entries):
            if e.under != under:
                continue
            n = common_prefix(e.ids, prompt)
            value = n if worth is None else worth(e, n)
            if value > best[1]:
                best = (i, value, n)
        return best

    def park(self, entry: Parked) -> None:
        """Keep `entry` (replacing any parked sequence it extends), dropping the least recently used
        entries beyond the budget; an entry larger than the whole budget is not kept."""
        if entry.nbytes() > self.budget:
            return
        self.entries = [e for e in self.entries
                        if not (e.under == entry.under and common_prefix(e.ids, entry.ids) == len(e.ids))]
        self.entries.append(entry)
        self._evict()

    def take(self, index: int) -> Parked:
        """Remove and return entry `index` (it goes back into the live cache)."""
        return self.entries.pop(index)
