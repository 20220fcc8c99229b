"""Assemble a Decoder from a ModelConfig and a WeightSource."""
from __future__ import annotations

from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ..errors import ModelFormatError
from ..models.config import ModelConfig
from ..models.decoder import Decoder, GatedMLP, Layer
from ..ops.linear import DenseLinear, fuse_linears
from .source import require

# FFN variants beyond the gated MLP register a builder here:
# (config, source, layer_prefix, device, dtype) -> callable [T, H] -> [T, H].
FFN_BUILDERS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {}


def _check_features(source: Any, name: str, lin: Any, out_features: int, in_features: int) -> None:
    if (lin.out_features, lin.in_features) != (out_features, in_features):
        raise ModelFormatError(
            f"{source.path}: {name} maps {lin.in_features} -> {lin.out_features} features, "
            f"expected {in_features} -> {out_features} from the config")


def _vector(source: Any, name: str, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    t = require(source, name, device)
    if tuple(t.shape) != (size,):
        raise ModelFormatError(f"{source.path}: {name} has shape {tuple(t.shape)}, expected ({size},)")
    return t.to(device=device, dtype=dtype)


def _gated_mlp(cfg: ModelConfig, source: Any, prefix: str, device: torch.device, dtype: torch.dtype) -> GatedMLP:
    h, inter = cfg.hidden_size, cfg.intermediate_size
    gate = source.linear(prefix + ".mlp.gate_proj", device, dtype)
    up = source.linear(prefix + ".mlp.up_proj", device, dtype)
    down = source.linear(prefix + ".mlp.down_proj", device, dtype)
    _check_features(source, prefix + ".mlp.gate_proj", gate, inter, h)
    _check_features(source, prefix + ".mlp.up_proj", up, inter, h)
    _check_features(source, prefix + ".mlp.down_proj", down, h, inter)
    return GatedMLP(fuse_linears([gate, up]), down)


def build_layer(cfg: ModelConfig, source: Any, i: int, device: torch.device, dtype: torch.dtype) -> Layer:
    p = f"model.layers.{i}"
    h = cfg.hidden_size
    q = source.linear(p + ".self_attn.q_proj", device, dtype)
    k = source.linear(p + ".self_attn.k_proj", device, dtype)
    v = source.linear(p + ".self_attn.v_proj", device, dtype)
    o = source.linear(p + ".self_attn.o_proj", device, dtype)
    _check_features(source, p + ".self_attn.q_proj", q, cfg.q_size, h)
    _check_features(source, p + ".self_attn.k_proj", k, cfg.kv_size, h)
    _check_features(source, p + ".self_attn.v_proj", v, cfg.kv_size, h)
    _check_features(source, p + ".self_attn.o_proj", o, h, cfg.q_size)
    if cfg.ffn is None:
        ffn = _gated_mlp(cfg, source, p, device, dtype)
    else:
        kind = cfg.ffn.get("type")
        if kind not in FFN_BUILDERS:
            raise ModelFormatError(f"{cfg.source}: FFN variant {kind!r} is not supported (known: {sorted(FFN_BUILDERS)})")
        ffn = FFN_BUILDERS[kind](cfg, source, p, device, dtype)
    layer = Layer(
        attn_norm=_vector(source, p + ".input_layernorm.weight", h, device, dtype),
        qkv=fuse_linears([q, k, v]),
        o=o,
        ffn_norm=_vector(source, p + ".post_attention_layernorm.weight", h, device, dtype),
        ffn=ffn,
    )
    if cfg.qk_norm:
        layer.q_norm = _vector(source, p + ".self_attn.q_norm.weight", cfg.head_dim, device, dtype)
        layer.k_norm = _vector(source, p + ".self_attn.k_norm.weight", cfg.head_dim, device, dtype)
    return layer


def build_decoder(cfg: ModelConfig, source: Any, device: torch.device | str, dtype: torch.dtype,
                  max_context: int, progress: bool = False) -> Decoder:
    """Read every weight of `cfg` from `source` onto `device` in `dtype` and return the Decoder."""
    device = torch.device(device)
    embed = require(source, "model.embed_tokens.weight", device)
    if tuple(embed.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise ModelFormatError(f"{source.path}: model.embed_tokens.weight has shape {tuple(embed.shape)}, "
                               f"expected ({cfg.vocab_size}, {cfg.hidden_size})")
    embed = embed.to(device=device, dtype=dtype)
    layers = [build_layer(cfg, source, i, device, dtype)
              for i in tqdm(range(cfg.num_layers), desc="loading layers", disable=not progress, leave=False)]
    final_norm = _vector(source, "model.norm.weight", cfg.hidden_size, device, dtype)
    if cfg.tie_word_embeddings or not source.has("lm_head.weight"):
        lm_head = DenseLinear(embed)
    else:
        lm_head = source.linear("lm_head", device, dtype)
        _check_features(source, "lm_head", lm_head, cfg.vocab_size, cfg.hidden_size)
    return Decoder(cfg, embed, layers, final_norm, lm_head, max_context)
