"""Greedy selection and the logits → probabilities transform shared by plain and speculative decoding.

Plain sampling and lossless speculative sampling must use exactly the same target distribution,
so both go through `logits_to_probs`.
"""
from __future__ import annotations

import math
from typing import Mapping

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


def validate_sampling(temperature: float, top_k: int, top_p: float, min_p: float = 0.0) -> None:
    """Raise ValueError for sampling settings outside their domains."""
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {min_p}")


def validate_penalties(repetition: float, presence: float, frequency: float) -> None:
    """Raise ValueError for penalties outside their domains (vLLM's and OpenAI's)."""
    if not repetition > 0.0 or math.isinf(repetition):
        raise ValueError(f"repetition_penalty must be a positive number (1 disables it), got {repetition}")
    for name, value in (("presence_penalty", presence), ("frequency_penalty", frequency)):
        if not -2.0 <= value <= 2.0:
            raise ValueError(f"{name} must be in [-2, 2] (0 disables it), got {value}")


MAX_LOGIT_BIAS = 100.0  # OpenAI's range: +-100 forces or bans a token


def validate_logit_bias(bias: Mapping[int, float], vocab: int | None = None) -> None:
    """Raise ValueError for a logit bias that is not {token id: finite bias in [-100, 100]} (ids
    below `vocab` when it is given)."""
    for token, value in bias.items():
        if not isinstance(token, int) or isinstance(token, bool) or token < 0 or (vocab is not None and token >= vocab):
            ids = f"integers in [0, {vocab})" if vocab is not None else "non-negative integers"
            raise ValueError(f"logit_bias: keys must be token ids ({ids}), got {token!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias: the bias of token {token} must be a number in [-100, 100], got {value!r}")


def logit_bias_vector(bias: Mapping[int, float], vocab: int, device: torch.device | str) -> torch.Tensor:
    """fp32 [vocab]: bias[token] at each biased token, 0 elsewhere (added to every row of logits)."""
    out = torch.zeros(vocab, dtype=torch.float32)
    if bias:
        out[torch.tensor(list(bias), dtype=torch.int64)] = torch.tensor(list(bias.values()), dtype=torch.float32)
    return out.to(device)


def apply_penalties(logits: torch.Tensor, prompt_seen: torch.Tensor, output_counts: torch.Tensor,
                    repetition: float = 1.0, presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """Logits penalised for the tokens already in the sequence, as vLLM does.

    logits: [N, V] float raw logits; prompt_seen: bool [V] (or [N, V]), the tokens of the prompt;
    output_counts: [N, V] or [V] int, how often each token was generated so far (each row its own
    history: a speculative tree's rows differ by their paths). Returns fp32 [N, V]:
      repetition (> 0, 1 = off): a token of the prompt or the output has a positive logit divided
        by `repetition`, a negative one multiplied by it (Hugging Face's and vLLM's rule);
      frequency, presence (0 = off): logit - frequency * count - presence * [count > 0], counting
        generated tokens only (OpenAI's definition, as vLLM implements it).
    """
    x = logits.float()
    if repetition != 1.0:
        seen = prompt_seen | (output_counts > 0)
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
    if frequency != 0.0:
        x = x - frequency * output_counts.to(x.dtype)
    if presence != 0.0:
        x = x - presence * (output_counts > 0).to(x.dtype)
    return x


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Sampling distribution over the vocabulary.

    logits: [..., V] float. temperature > 0. top_k = 0 keeps all tokens; top_p = 1 keeps all mass;
    min_p = 0 keeps all tokens, else only those at least min_p times as probable as the most
    probable one. Returns fp32 probabilities [..., V] that sum to 1 over the kept tokens (others
    exactly 0). Top-k, then top-p, then min-p, as Hugging Face's processors do (min-p compares
    probabilities with the largest, which top-k and top-p always keep, so its place only matters
    to top-p's mass).
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
    if min_p > 0.0:
        # p_i >= min_p * p_max  <=>  x_i >= x_max + ln(min_p), and x_max = 0 after the shift above.
        x = x.masked_fill(x < math.log(min_p), float("-inf"))
    return x.softmax(dim=-1)


# Top-p counts probability mass in fixed point, units of 2^-40: sums are exact, so the nucleus does
# not depend on the order in which a sort, a scan or a kernel adds the probabilities up, and the
# CUDA kernel (csrc/kernels/sampling.h, "the nucleus floor") and the torch code below keep the same
# tokens bit for bit. Rounding moves a row's mass by at most V * 2^-41, 6e-8 for 128K tokens.
_MASS_BITS = 40


def nucleus_need(top_p: float) -> int:
    """top_p as the fixed-point mass the kept tokens must reach (at least one unit)."""
    return max(1, round(top_p * 2.0 ** _MASS_BITS))


def _mass(probs: torch.Tensor) -> torch.Tensor:
    """int64 fixed-point mass of each probability (round half to even, as the kernel's rintf)."""
    return (probs.clamp(0.0, 1.0) * 2.0 ** _MASS_BITS).round().long()


def _outside_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """bool [..., V]: the tokens outside the top-p nucleus of each row of probs. A token stays when
    the mass of the tokens strictly more probable than it is below top_p: the most probable token
    always stays, and tied tokens stay or go together."""
    rows = probs.reshape(-1, probs.shape[-1])
    need = nucleus_need(top_p)
    if backend.use_kernel(rows):
        from . import _kernels

        if _kernels.supports_nucleus_floor(rows):
            return probs < _kernels.nucleus_floor(rows, need).view(*probs.shape[:-1], 1)
    return probs < _nucleus_floor(rows, need).view(*probs.shape[:-1], 1)


# On the CPU a full sort of the vocabulary dominates sampling (about 2 ms per row of 49K tokens, a
# speculative step sorts one row per tree token); a partial top-k finds the nucleus whenever it
# lies within the k most likely tokens, which a host check tells. On a GPU without the kernel that
# check would be a synchronisation inside a speculative step: it sorts.
_NUCLEUS_TOP_K = (256, 4096)


def _nucleus_floor(rows: torch.Tensor, need: int) -> torch.Tensor:
    """[R] the smallest probability each row of rows [R, V] keeps: the kernel's rule in torch."""
    if rows.device.type == "cpu":
        for k in _NUCLEUS_TOP_K:
            if k >= rows.shape[-1]:
                break
            floor, last_before = _floor_among(torch.topk(rows, k, dim=-1).values, need)
            # Every token past the top k has at least the k-th token's `before` before it.
            if bool((last_before >= need).all()):
                return floor
    return _floor_among(torch.sort(rows, dim=-1, descending=True).values, need)[0]


def _floor_among(top: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus floor [R] among the most probable tokens of each row, top [R, k] (descending),
    and the mass before the k-th token [R] (when it reaches need, no token past the k stays, and the
    floor is the row's). A row whose whole mass is below need keeps everything: floor 0, as the
    kernel returns."""
    mass = _mass(top)
    before = mass.cumsum(dim=-1) - mass
    # A token tied with tokens before it has only the mass strictly above their value before it.
    starts = torch.ones_like(top, dtype=torch.bool)
    starts[:, 1:] = top[:, 1:] != top[:, :-1]
    first = torch.where(starts, torch.arange(top.shape[-1], device=top.device), 0).cummax(dim=-1).values
    before = before.gather(-1, first)
    kept = (before < need).sum(dim=-1, keepdim=True)  # a prefix: `before` never falls
    floor = top.gather(-1, kept - 1).squeeze(-1)
    short = mass.sum(dim=-1) < need  # the listed tokens' mass: the whole row's when k = V
    return floor.masked_fill(short, 0.0), before[:, -1]


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row. probs: [T, V] (rows sum to 1). Returns [T] int64."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the model's own distribution (the log-softmax of raw logits: no
    penalties, temperature or filters, which only shape how a token is drawn).

    logits: [N, V] float; tokens: [N] int64, the token each row chose; top: 0..MAX_TOP_LOGPROBS.
    Returns fp32 chosen [N], and the `top` most likely tokens per row, most likely first:
    top_logprobs fp32 [N, top] and top_ids int64 [N, top]."""
    if logits.dim() != 2 or tokens.shape != logits.shape[:1]:
        raise ValueError(f"token_logprobs: logits must be [N, V] and tokens [N], got {tuple(logits.shape)} "
                         f"and {tuple(tokens.shape)}")
    if not 0 <= top <= min(MAX_TOP_LOGPROBS, logits.shape[-1]):
        raise ValueError(f"token_logprobs: top must be in [0, {min(MAX_TOP_LOGPROBS, logits.shape[-1])}], got {top}")
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1).long()).squeeze(1)
    values, ids = torch.topk(logprobs, top, dim=-1)
    return chosen, values, ids
