"""Perplexity of a text under a model: how to check that a quantized, block-sparse or converted model
still is the model it came from (score the same text with the same windows, compare the numbers).

A text longer than the window is scored in overlapping windows, as Hugging Face's perplexity guide
does: each window starts `stride` tokens after the previous one and scores only the tokens no
earlier window scored, so each of those has at least `window - stride` tokens of context (the first
window's tokens have less). stride = window scores every token once without overlap (fastest), but
the first token of each window then has no context and is not scored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from tqdm.auto import tqdm

from .engine import LLM

DEFAULT_WINDOW = 2048


@dataclass
class PerplexityResult:
    tokens: int      # tokens scored
    nll: float       # mean negative log-likelihood per scored token, in nats
    windows: int
    window: int
    stride: int
    seconds: float
    text_tokens: int  # tokens of the text (scored or not)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def as_dict(self) -> dict[str, Any]:
        return {"perplexity": round(self.perplexity, 4), "nll": round(self.nll, 6), "tokens": self.tokens,
                "text_tokens": self.text_tokens, "windows": self.windows, "window": self.window,
                "stride": self.stride, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens / self.seconds, 1) if self.seconds > 0 else 0.0}


def window_plan(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over n tokens: the windows' scored
    ranges [first, end) cover positions 1..n-1 except each window's own first token."""
    plan, begin, scored_until = [], 0, 1
    while scored_until < n:
        end = min(begin + window, n)
        plan.append((begin, end, max(scored_until, begin + 1)))
        scored_until = end
        begin += stride
    return plan


def perplexity(llm: LLM, text: str | Sequence[int], window: int | None = None, stride: int | None = None,
               max_tokens: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `text` (a string, tokenised with special tokens as the tokenizer adds them, or
    token ids) under llm's model. window: tokens per forward pass (default min(2048, context));
    stride: tokens between window starts (default window // 2); max_tokens: score only the first
    max_tokens tokens of the text."""
    ids = llm.encode(text)
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 (the first token is never scored), got {max_tokens}")
        ids = ids[:max_tokens]
    window = min(DEFAULT_WINDOW, llm.max_context) if window is None else window
    if not 2 <= window <= llm.max_context:
        raise ValueError(f"the window must hold 2 to {llm.max_context} tokens (the model's context), got {window}")
    stride = max(1, window // 2) if stride is None else stride
    if not 1 <= stride <= window:
        raise ValueError(f"the stride must be 1 to {window} tokens (the window), got {stride}")
    if len(ids) < 2:
        raise ValueError(f"the text has {len(ids)} token(s): at least 2 are needed for one prediction")
    plan = window_plan(len(ids), window, stride)
    nll, scored = 0.0, 0
    t0 = time.perf_counter()
    for begin, end, first in tqdm(plan, desc="scoring", unit="window", disable=not progress or len(plan) < 2):
        entries = llm.generate(ids[begin:end], max_new_tokens=0, prompt_logprobs=0).prompt_logprobs
        assert entries is not None
        nll -= math.fsum(entries[pos - begin].logprob for pos in range(first, end))
        scored += end - first
    return PerplexityResult(scored, nll / scored, len(plan), window, stride, time.perf_counter() - t0, len(ids))
