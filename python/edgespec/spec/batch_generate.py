"""Batched generation for building draft-training data.

The engine decodes one sequence at a time (the latency case). Self-distillation needs the
target's answers to hundreds of prompts, and on a CPU a decode step over 16 sequences costs little
more than over one (the weights are read once), so this module runs the same Decoder weights over
a batch with a per-sequence KV cache and per-sequence causal masks. It follows Decoder.forward
layer by layer through the same ops; only the attention differs (a batch of caches).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ops
from ..models.decoder import Decoder


class _BatchCache:
    """K/V for B sequences: [L, B, S, Hkv, D] each, and each sequence's length."""

    def __init__(self, model: Decoder, batch: int, max_len: int) -> None:
        c = model.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)


def _grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, 1, T, S] -> [B, Hq, T, D].

    Two batched matmuls with the query heads of a KV group stacked as rows: on a CPU, torch's SDPA
    with a per-sequence mask and GQA takes a slow path that cost as much as all the linears of a
    32-sequence decode step; this form costs a few percent of them."""
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    qg = q.reshape(b, hkv, g * t, d)                                                 # rows: (head, token)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale                  # [B, Hkv, g*T, S]
    scores = scores.view(b, hkv, g, t, s).masked_fill(~mask.unsqueeze(1), float("-inf"))
    p = scores.softmax(dim=-1).to(v.dtype).view(b, hkv, g * t, s)
    return torch.matmul(p, v).view(b, hq, t, d)


def _forward(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, cache: _BatchCache,
             rows: torch.Tensor) -> torch.Tensor:
    """tokens/positions: [B, T] int64 (row b of the batch is cache row rows[b]; its T tokens go to
    slots positions[b]). Returns final hidden states [B, T, H]."""
    cfg = model.config
    b, t = tokens.shape
    rs = cfg.residual_scale
    flat_pos = positions.reshape(-1)
    end = int(positions.max()) + 1
    slots = torch.arange(end, device=tokens.device)
    # Query (b, i) sees slots <= its own position: every earlier token of its own sequence.
    mask = (slots.view(1, 1, end) <= positions.unsqueeze(-1)).unsqueeze(1)          # [B, 1, T, S]
    residual = ops.embedding(tokens.reshape(-1), model.embed, cfg.embedding_scale, check=False)  # [B*T, H]
    h = ops.rms_norm(residual, model.layers[0].attn_norm, cfg.rms_norm_eps)
    for i, layer in enumerate(model.layers):
        q, k, v = layer.qkv(h).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.reshape(b * t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b * t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b * t, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = ops.apply_rope(q, k, flat_pos, model.rope)
        cache.k[i, rows.view(-1, 1), positions] = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        cache.v[i, rows.view(-1, 1), positions] = v.view(b, t, cfg.num_kv_heads, cfg.head_dim)
        keys = cache.k[i, rows, :end].transpose(1, 2)                                # [B, Hkv, S, D]
        values = cache.v[i, rows, :end].transpose(1, 2)
        out = _grouped_attention(q.view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2), keys, values, mask,
                                 model.attn_scale)                                   # [B, Hq, T, D]
        a = layer.o(out.transpose(1, 2).reshape(b * t, cfg.q_size))
        if rs != 1.0:
            a = a * rs
        h, residual = ops.rms_norm(a, layer.ffn_norm, cfg.rms_norm_eps, residual=residual)
        m = layer.ffn(h)
        if rs != 1.0:
            m = m * rs
        nxt = model.final_norm if i + 1 == len(model.layers) else model.layers[i + 1].attn_norm
        h, residual = ops.rms_norm(m, nxt, cfg.rms_norm_eps, residual=residual)
    return h.view(b, t, -1)


def generate_batch(model: Decoder, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop_ids: Sequence[int] = (), temperature: float = 0.0,
                   generator: torch.Generator | None = None) -> list[list[int]]:
    """Continuations (without the prompts) of every prompt, decoded together: greedy when
    temperature is 0, else sampled from ops.logits_to_probs at that temperature with `generator`.
    A sequence stops at its first stop id (included in its output) or after max_new_tokens."""
    if not prompts:
        return []
    dev = model.device
    b = len(prompts)
    max_len = max(len(p) for p in prompts) + max_new_tokens
    cache = _BatchCache(model, b, max_len)
    stop = set(int(i) for i in stop_ids)

    def pick(logits: torch.Tensor) -> torch.Tensor:  # [N, V] -> [N]
        if temperature == 0.0:
            return ops.argmax(logits)
        return ops.sample(ops.logits_to_probs(logits, temperature), generator)

    nxt = torch.empty(b, dtype=torch.int64, device=dev)
    with torch.inference_mode():
        for r, p in enumerate(prompts):  # prefills differ in length: one at a time
            ids = torch.tensor([list(p)], dtype=torch.int64, device=dev)
            pos = torch.arange(len(p), device=dev).unsqueeze(0)
            hidden = _forward(model, ids, pos, cache, torch.tensor([r], device=dev))
            nxt[r] = pick(model.logits(hidden[0, -1:]))[0]
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        outs: list[list[int]] = [[] for _ in range(b)]
        live = list(range(b))
        for _ in range(max_new_tokens):
            for r in list(live):
                tok = int(nxt[r])
                outs[r].append(tok)
                if tok in stop or len(outs[r]) >= max_new_tokens:
                    live.remove(r)
            if not live:
                break
            rows = torch.tensor(live, device=dev)
            hidden = _forward(model, nxt[rows].unsqueeze(1), lengths[rows].unsqueeze(1), cache, rows)
            nxt[rows] = pick(model.logits(hidden[:, 0]))
            lengths[rows] += 1
    return outs
