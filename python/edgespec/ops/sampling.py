"""Greedy selection and the logits → probabilities transform shared by plain and speculative decoding.

Plain sampling and lossless speculative sampling must use exactly the same target distribution,
so both go through `logits_to_probs`.
"""
from __future__ import annotations

import torch

from . import backend


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token per row. logits: [T, V] float. Returns [T] int64 (lowest index wins ties)."""
    if logits.dim() != 2:
        raise ValueError(f"argmax: logits must be [T, V], got {tuple(logits.shape)}")
    if backend.use_kernel(logits):
        from . import _kernels

        if _kernels.supports_argmax(logits):
            return _kernels.argmax(logits)
    return logits.argmax(dim=-1)


def validate_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for sampling settings outside their domains."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Sampling distribution over the vocabulary.

    logits: [..., V] float. temperature > 0. top_k = 0 keeps all tokens; top_p = 1 keeps all mass.
    Returns fp32 probabilities [..., V] that sum to 1 over the kept tokens (others exactly 0).
    Top-k is applied before top-p, as Hugging Face's default processors do.
    """
    if temperature <= 0:
        raise ValueError("logits_to_probs needs temperature > 0; use argmax for greedy decoding")
    # Shift by the row max before dividing: with a tiny temperature the quotient then goes to -inf
    # (a one-hot distribution) instead of overflowing to inf and producing NaN in the softmax.
    x = logits.float()
    x = (x - x.amax(dim=-1, keepdim=True)) / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        x = x.masked_fill(_outside_nucleus(x.softmax(dim=-1), top_p), float("-inf"))
    return x.softmax(dim=-1)


# On the CPU a full sort of the vocabulary dominates sampling (about 2 ms per row of 49K tokens, a
# speculative step sorts one row per tree token); a partial top-k finds the nucleus whenever it
# lies within the k most likely tokens, which a host check tells. On a GPU that check would be a
# synchronisation inside a speculative step, and sorting is cheap there: it always sorts.
_NUCLEUS_TOP_K = (256, 4096)


def _outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool [..., V]: the tokens past the nucleus of each row of probs. A token is dropped when the
    mass of the tokens ranked before it already reaches top_p (the first token is always kept)."""
    if probs.device.type == "cpu":
        for k in _NUCLEUS_TOP_K:
            if k >= probs.shape[-1]:
                break
            top, order = torch.topk(probs, k, dim=-1)  # sorted, descending
            before = top.cumsum(dim=-1) - top
            # Every token past the top k has at least the top k's mass before it.
            if bool((before[..., -1] + top[..., -1] >= top_p).all()):
                return torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)
    top, order = torch.sort(probs, dim=-1, descending=True)
    before = top.cumsum(dim=-1) - top
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= top_p)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row. probs: [T, V] (rows sum to 1). Returns [T] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
