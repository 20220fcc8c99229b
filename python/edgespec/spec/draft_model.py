"""A standalone small model as the drafter (same tokenizer as the target), chain or tree."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..errors import ModelFormatError
from ..generation import prefill
from ..kv_cache import KVCache, common_prefix
from ..models.decoder import Decoder
from .drafter import SlotParking, TargetStates
from .frspec import DraftLMHead, dense_weight
from .tree import ExpandBatch


def check_same_vocabulary(target: Decoder, draft: Decoder, target_tok: Any = None, draft_tok: Any = None,
                          where: str = "draft model") -> None:
    """Raise ModelFormatError unless draft and target share a vocabulary (size, and the token
    strings when both tokenizers are known), since draft ids are fed to the target as they are."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ModelFormatError(f"{where}: its vocabulary has {dv} tokens but the target's has {tv}; "
                               f"a draft model must use the target's tokenizer")
    if target_tok is not None and draft_tok is not None:
        n = min(len(target_tok.hf), len(draft_tok.hf), tv)
        a = target_tok.hf.convert_ids_to_tokens(list(range(n)))
        b = draft_tok.hf.convert_ids_to_tokens(list(range(n)))
        if a != b:
            i = next(i for i in range(n) if a[i] != b[i])
            raise ModelFormatError(f"{where}: token {i} is {b[i]!r} in the draft's tokenizer but {a[i]!r} in the "
                                   f"target's; a draft model must use the target's tokenizer")


class ModelDrafter(SlotParking):
    """Drafter protocol over a Decoder with its own KV cache; it also processes the root token,
    so its committed length is one more than the target's."""

    def __init__(self, model: Decoder, name: str = "model", prefill_chunk: int = 512) -> None:
        self.model = model
        # Its steps can be CUDA graphs (expand() honours ExpandBatch.committed, catch_up() takes the
        # length on the device) unless the model has InfLLM-v2 sparse attention, which plans on the host.
        self.graphable = model.sparse is None
        self.name = name
        self.capture: tuple[int, ...] = ()
        self.prefill_chunk = prefill_chunk
        w, b = dense_weight(model.lm_head)
        self.lm_head = DraftLMHead(w, b, model.config.logit_scale)
        self.cache: KVCache | None = None
        self._committed = 0
        self.sequence: list[int] = []

    @property
    def committed(self) -> int:
        return self._committed

    def reset(self, max_len: int) -> None:
        if self.cache is None or self.cache.max_len < max_len:
            self.cache = self.model.new_cache(max_len)
            self._committed, self.sequence = 0, []

    def reusable(self, prompt: Sequence[int]) -> int:
        return self._reusable(self._committed, self.sequence, prompt)

    @staticmethod
    def _reusable(committed: int, sequence: Sequence[int], prompt: Sequence[int]) -> int:
        return min(committed, common_prefix(sequence, prompt))  # slot i: tokens 0..i

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden[-1:])[0]

    def prefill(self, prompt: torch.Tensor, first_token: int, target: TargetStates,
                start: int = 0) -> tuple[torch.Tensor, None]:
        ids = torch.cat([prompt, torch.tensor([first_token], dtype=torch.int64, device=prompt.device)])
        hidden, _ = prefill(self.model, self.cache, ids, self.prefill_chunk, start=start)
        self._committed = ids.numel()
        return self._logits(hidden), None

    def advance(self, tokens: torch.Tensor, target: TargetStates) -> tuple[torch.Tensor, None]:
        start = self._committed
        positions = torch.arange(start, start + tokens.numel(), device=tokens.device)
        out = self.model.forward(tokens, positions, self.cache, start)
        self._committed += tokens.numel()
        return self._logits(out.hidden), None

    def catch_up(self, tokens: torch.Tensor, target: TargetStates, committed: torch.Tensor,
                 cache_view: int) -> tuple[torch.Tensor, None]:
        """advance() with the committed length read on the device (see EagleDrafter.catch_up)."""
        positions = committed + torch.arange(tokens.numel(), device=tokens.device)
        out = self.model.forward(tokens, positions, self.cache, committed, cache_view=cache_view)
        return self._logits(out.hidden), None

    def note_committed(self, n: int) -> None:
        self._committed += n

    def expand(self, batch: ExpandBatch) -> tuple[torch.Tensor, None]:
        committed = self._committed if batch.committed is None else batch.committed
        start = committed + batch.slot_offset
        positions = batch.depths + (committed - 1)
        out = self.model.forward(batch.tokens, positions, self.cache, start, tree_mask=batch.tree_mask,
                                 cache_view=batch.cache_view)
        return self.lm_head(out.hidden[-batch.new:]), None
