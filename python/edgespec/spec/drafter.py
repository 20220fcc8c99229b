"""The drafter interface shared by EAGLE heads and standalone draft models.

A drafter keeps its own KV cache in step with the target's. Its committed length L counts the
cache slots it has filled from committed tokens; draft-tree nodes of depth d then sit at RoPE
position L + d - 1 and are written after L. EAGLE heads consume (token x[i+1], target feature
f[i]) pairs at position i, so L equals the target's committed length; a standalone model has
also processed the root token itself, so L is one more. Either way, `prefill`/`advance` end at
the root and return the draft distribution for the token after it.

Prefix caching: a drafter's cache outlives a generation. `sequence` records the tokens its
committed slots were computed from (SpeculativeDecoding keeps it), `reusable` says how many of
those slots a new prompt can keep, and `prefill(start=...)` computes only the slots after them.
A drafter with `park`, `unpark` and `parked_reusable` (SlotParking: both built-in drafters) also
follows the sequences the engine parks off the KV cache (edgespec.prefix_store).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch

from ..kv_cache import KVCache
from ..prefix_store import SlotCopy
from .frspec import DraftLMHead
from .tree import ExpandBatch


@dataclass
class TargetStates:
    """What the target computed at the positions a drafter is catching up on.

    captured: layer index -> [a, H] residual stream entering that layer (index num_layers: the
              stream after the last layer, before the final norm), for the layers in
              `Drafter.capture`, one row per position in order.
    """

    captured: dict[int, torch.Tensor] = field(default_factory=dict)

    def rows(self, index: torch.Tensor) -> "TargetStates":
        """The states at `index` ([a] int64 row indices)."""
        return TargetStates({k: v.index_select(0, index) for k, v in self.captured.items()})


class Drafter(Protocol):
    """Proposes draft tokens; see the module docstring for positions and cache slots."""

    name: str
    capture: tuple[int, ...]  # target layers whose input streams the drafter reads
    lm_head: DraftLMHead      # its vocabulary (token_map: target ids) and output projection

    # The committed tokens its cache slots were computed from, in order (SpeculativeDecoding
    # records them; [] when unknown): what prefix caching compares a new prompt with.
    sequence: list[int]

    @property
    def committed(self) -> int: ...

    def reset(self, max_len: int) -> None:
        """Prepare for a new sequence whose committed length plus a draft tree fits in `max_len`
        (the committed slots stay, unless the cache has to grow: then `sequence` is emptied)."""

    def reusable(self, prompt: Sequence[int]) -> int:
        """How many committed slots stay valid for a sequence that starts with `prompt`."""

    def prefill(self, prompt: torch.Tensor, first_token: int, target: TargetStates,
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Process the prompt ([P] int64) and the first generated token, keeping the slots before
        `start` (at most reusable(prompt)).

        target: the target's states at prompt positions [start, P). Returns the draft logits [Vd]
        fp32 for the token after `first_token` and the draft state [1, Hs] its children consume
        (or None).
        """

    def advance(self, tokens: torch.Tensor, target: TargetStates) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Commit `tokens` ([a] int64: the accepted draft tokens and the bonus token, which is the new
        root). target: the target's states at the a positions before them (the old root and the
        accepted nodes). Returns like prefill."""

    def expand(self, batch: ExpandBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft round: logits [batch.new, Vd] fp32 and states [batch.new, Hs] (or None)."""


class SlotParking:
    """park/unpark for a drafter that keeps `cache`, `_committed` and `sequence` and says how many
    slots of such a state a prompt keeps (`_reusable(committed, sequence, prompt)`): its committed
    slots go to the host with the sequence the engine parks, and come back with it."""

    cache: KVCache | None
    _committed: int
    sequence: list[int]

    @staticmethod
    def _reusable(committed: int, sequence: Sequence[int], prompt: Sequence[int]) -> int:
        raise NotImplementedError

    def parked_reusable(self, state: tuple[SlotCopy, int, list[int]], prompt: Sequence[int]) -> int:
        """reusable(prompt) once `state` (from park) is back."""
        _, committed, sequence = state
        return self._reusable(committed, sequence, prompt)

    def park(self) -> tuple[tuple[SlotCopy, int, list[int]], int] | None:
        """(state, bytes) of the committed slots and what they were computed from, or None."""
        if self.cache is None or not self.sequence:
            return None
        copy = SlotCopy.of(self.cache, self._committed)
        return (copy, self._committed, list(self.sequence)), copy.nbytes()

    def unpark(self, state: tuple[SlotCopy, int, list[int]]) -> bool:
        """Put a parked state back (False, changing nothing, when the cache no longer holds it)."""
        copy, committed, sequence = state
        if self.cache is None or self.cache.max_len < committed:
            return False
        copy.restore(self.cache, committed)
        self._committed, self.sequence = committed, list(sequence)
        return True
