"""Reference element-wise and small ops: RMSNorm, gated SiLU MLP, linear, embedding, int4
dequantisation, greedy choice and the sampling distribution.

Every function computes in float64 unless a `dtype` is given (the tests pass bf16 to measure how
much error plain PyTorch arithmetic makes at that precision, which sets their tolerances).
"""
from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             dtype: torch.dtype = torch.float64) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y = s / sqrt(mean(s^2) + eps) * weight over the last dim, with s = x (+ residual).

    x: [..., H]; weight: [H]; residual: optional [..., H].
    Returns y in `dtype`, and s too when a residual was given (the new residual stream).
    """
    s = x.to(dtype)
    if residual is not None:
        s = s + residual.to(dtype)
    rms = torch.sqrt((s * s).mean(dim=-1, keepdim=True) + eps)
    y = s / rms * weight.to(dtype)
    return (y, s) if residual is not None else y


def silu_and_mul(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[..., 2I] = [gate | up] -> [..., I] = gate * sigmoid(gate) * up, in `dtype`."""
    x = x.to(dtype)
    half = x.shape[-1] // 2
    gate, up = x[..., :half], x[..., half:]
    return gate / (1.0 + torch.exp(-gate)) * up


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x: [..., K]; weight: [N, K]; bias: [N] or None -> [..., N] = x W^T + b in `dtype`."""
    y = x.to(dtype) @ weight.to(dtype).T
    return y if bias is None else y + bias.to(dtype)


def gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Llama FFN: down(silu(x W_gate^T) * (x W_up^T)). x: [T, H]; w_gate, w_up: [I, H]; w_down: [H, I]."""
    gate = linear(x, w_gate, dtype=dtype)
    up = linear(x, w_up, dtype=dtype)
    return linear(silu_and_mul(torch.cat([gate, up], dim=-1), dtype=dtype), w_down, dtype=dtype)


def embedding(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ids: [T] ints in [0, V); table: [V, H] -> [T, H] rows of the table times `scale`."""
    rows = [table[int(i)].to(dtype) for i in ids]
    return torch.stack(rows) * scale


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """w = (q - z) * s per group of `group_size` consecutive input columns.

    q: [N, K] unpacked integer values in [0, 15]; scales: [N, K / g]; zeros: [N, K / g] zero points
    (may be fractional, e.g. GGUF Q4_1's -min/scale), or None for the symmetric grid (zero point 8).
    group_size: g, or -1 for one group over all K columns.
    Returns [N, K] in `dtype`.
    """
    n, k = q.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"dequantize_int4: K={k} is not a multiple of the group size {g}")
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise ValueError("dequantize_int4: q must hold unpacked 4-bit values in [0, 15]")
    groups = k // g
    if scales.shape != (n, groups):
        raise ValueError(f"dequantize_int4: scales must be [{n}, {groups}], got {tuple(scales.shape)}")
    w = torch.empty(n, k, dtype=dtype)
    for j in range(groups):
        cols = slice(j * g, (j + 1) * g)
        z = 8.0 if zeros is None else zeros[:, j:j + 1].to(dtype)
        w[:, cols] = (q[:, cols].to(dtype) - z) * scales[:, j:j + 1].to(dtype)
    return w


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[T, V] -> [T] int64: the index of each row's maximum, the lowest index among ties."""
    out = []
    for row in logits:
        best = row.max()
        out.append(int((row == best).nonzero()[0, 0]))
    return torch.tensor(out, dtype=torch.int64)


def penalised_logits(logits: torch.Tensor, prompt: list[int], output: list[int], repetition: float = 1.0,
                     presence: float = 0.0, frequency: float = 0.0) -> torch.Tensor:
    """One row of logits [V] (float64 [V]) penalised for a sequence's history, token by token:
    repetition divides a positive logit (multiplies a negative one) of every token in the prompt or
    the output; presence and frequency subtract presence + frequency * count for the tokens the
    output holds (count times)."""
    x = [float(v) for v in logits.to(torch.float64)]
    for t in set(prompt) | set(output):
        x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
    for t in set(output):
        x[t] -= presence + frequency * output.count(t)
    return torch.tensor(x, dtype=torch.float64)


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """The distribution a sampler draws from, for one row of logits [V] (float64 [V]).

    1. divide by the temperature (> 0);
    2. top-k (0 = off): keep the tokens whose value is >= the k-th largest (ties at the
       threshold are all kept);
    3. top-p (1 = off), over the renormalised survivors of top-k: keep a token when the mass of
       the tokens strictly more likely than it is < top_p (so the most likely token is always
       kept, and tokens of equal probability are kept or dropped together);
    4. min-p (0 = off): keep the tokens whose probability is at least min_p times the largest;
    5. renormalise over the kept tokens; every other token has probability exactly 0.
    """
    if temperature <= 0:
        raise ValueError(f"sampling_probs: temperature must be > 0, got {temperature}")
    x = [float(v) / temperature for v in logits.to(torch.float64)]
    vocab = len(x)
    kept = list(range(vocab))
    if 0 < top_k < vocab:
        threshold = sorted(x, reverse=True)[top_k - 1]
        kept = [i for i in kept if x[i] >= threshold]
    if top_p < 1.0:
        top = max(x[i] for i in kept)
        mass = {i: math.exp(x[i] - top) for i in kept}
        total = sum(mass.values())
        ordered = sorted(kept, key=lambda i: -x[i])
        survivors = []
        before = 0.0  # the mass of the tokens strictly more likely than the current value
        running = 0.0
        for n, i in enumerate(ordered):
            if n > 0 and x[i] < x[ordered[n - 1]]:
                before = running
            if before >= top_p:
                break
            survivors.append(i)
            running += mass[i] / total
        kept = sorted(survivors)
    top = max(x[i] for i in kept)
    if min_p > 0.0:
        kept = [i for i in kept if math.exp(x[i] - top) >= min_p]
    probs = torch.zeros(vocab, dtype=torch.float64)
    for i in kept:
        probs[i] = math.exp(x[i] - top)
    return probs / probs.sum()
