"""Reference decoder forward: Llama / Mistral / Qwen2 / Qwen3 / MiniCPM(4) from a Hugging Face
config dict and a state dict under Hugging Face tensor names.

The whole sequence is computed at once with a causal mask (no KV cache), in float64, reading the
architecture features from the config and the weights themselves:

* QKV bias: whenever the state dict has `self_attn.{q,k,v}_proj.bias` (Qwen2).
* QK-norm: per-head RMSNorm of q and k before RoPE when `self_attn.{q,k}_norm.weight` exist (Qwen3).
* head_dim: the config's `head_dim` when given (Qwen3 may have head_dim != hidden / heads).
* tied embeddings: the LM head is the embedding table when `lm_head.weight` is absent or
  `tie_word_embeddings` is true.
* MiniCPM muP: embeddings times `scale_emb`; each residual branch times scale_depth / sqrt(L);
  the final hidden state divided by hidden_size / dim_model_base before the LM head.
* RoPE scaling from `rope_scaling` (or transformers 5's `rope_parameters`), see oracle.rope.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .attention import attention_ref, visibility
from .ops import gated_mlp, linear, rms_norm
from .rope import apply_rope, inv_freq_and_attention_factor, rope_tables

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "minicpm")


def _rope_settings(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = config.get("rope_parameters") or {}
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = config.get("rope_scaling")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    if scaling is not None and "original_max_position_embeddings" not in scaling \
            and config.get("original_max_position_embeddings"):
        # Phi-3 style configs keep the pretraining length next to rope_scaling, not inside it.
        scaling = dict(scaling, original_max_position_embeddings=config["original_max_position_embeddings"])
    return theta, scaling


def decoder_forward(config: dict[str, Any], state: dict[str, torch.Tensor], ids: Sequence[int],
                    context: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Logits [T, V] (in `dtype`) of every position of `ids` ([T] token ids).

    context: the sequence length the RoPE table is built for (LongRoPE picks its long factors iff
    context > original_max_position_embeddings). None means T, which is what transformers does
    for one forward over the whole sequence; pass the engine's max_context to mirror edgespec.
    """
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"oracle decoder: model_type {model_type!r} is not one of {SUPPORTED}")
    ids = [int(i) for i in ids]
    t = len(ids)
    hidden = int(config["hidden_size"])
    num_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    eps = float(config.get("rms_norm_eps", 1e-6))
    theta, scaling = _rope_settings(config)
    minicpm = model_type == "minicpm"
    emb_scale = float(config.get("scale_emb", 1.0)) if minicpm else 1.0
    res_scale = float(config.get("scale_depth", 1.0)) / math.sqrt(num_layers) if minicpm else 1.0
    base = config.get("dim_model_base") if minicpm else None
    logit_divisor = hidden / float(base) if base else 1.0

    def w(name: str) -> torch.Tensor:
        return state[name].to(dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return state[name].to(dtype) if name in state else None

    inv_freq, attn_factor = inv_freq_and_attention_factor(
        head_dim, theta, scaling, int(config.get("max_position_embeddings", 4096)), context or t)
    cos, sin = rope_tables(inv_freq, attn_factor, torch.arange(t))
    causal = visibility(t, t)

    h = torch.stack([w("model.embed_tokens.weight")[i] for i in ids]) * emb_scale      # [T, H]
    for layer in range(num_layers):
        p = f"model.layers.{layer}."
        x = rms_norm(h, w(p + "input_layernorm.weight"), eps, dtype=dtype)
        q = linear(x, w(p + "self_attn.q_proj.weight"), maybe(p + "self_attn.q_proj.bias"), dtype=dtype)
        k = linear(x, w(p + "self_attn.k_proj.weight"), maybe(p + "self_attn.k_proj.bias"), dtype=dtype)
        v = linear(x, w(p + "self_attn.v_proj.weight"), maybe(p + "self_attn.v_proj.bias"), dtype=dtype)
        q = q.view(t, heads, head_dim)
        k = k.view(t, kv_heads, head_dim)
        v = v.view(t, kv_heads, head_dim)
        if p + "self_attn.q_norm.weight" in state:
            q = rms_norm(q, w(p + "self_attn.q_norm.weight"), eps, dtype=dtype)
            k = rms_norm(k, w(p + "self_attn.k_norm.weight"), eps, dtype=dtype)
        q = apply_rope(q, cos, sin, dtype=dtype)
        k = apply_rope(k, cos, sin, dtype=dtype)
        a = attention_ref(q, k, v, head_dim ** -0.5, dense_visibility=causal, dtype=dtype)  # [T, Hq, D]
        a = linear(a.reshape(t, heads * head_dim), w(p + "self_attn.o_proj.weight"), dtype=dtype)
        h = h + a * res_scale
        x = rms_norm(h, w(p + "post_attention_layernorm.weight"), eps, dtype=dtype)
        m = gated_mlp(x, w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight"),
                      w(p + "mlp.down_proj.weight"), dtype=dtype)
        h = h + m * res_scale
    h = rms_norm(h, w("model.norm.weight"), eps, dtype=dtype) / logit_divisor
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in state
    head = w("model.embed_tokens.weight") if tied else w("lm_head.weight")
    return linear(h, head, dtype=dtype)


def greedy_generate(config: dict[str, Any], state: dict[str, torch.Tensor], prompt: Sequence[int],
                    max_new_tokens: int, context: int | None = None) -> list[int]:
    """Greedy continuation of `prompt` by recomputing the whole sequence for every new token
    (lowest id wins an exact tie). context: as in decoder_forward (fixed for the whole run)."""
    ids = [int(i) for i in prompt]
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = decoder_forward(config, state, ids, context=context)[-1]
        token = int((logits == logits.max()).nonzero()[0, 0])
        out.append(token)
        ids.append(token)
    return out
