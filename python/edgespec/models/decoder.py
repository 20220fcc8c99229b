"""The one decoder: Llama, Qwen2, Qwen3 and MiniCPM/MiniCPM4, composed from ops (gpt-fast style).

Architecture differences are data, not code paths: QKV bias (Qwen2), per-head QK RMSNorm (Qwen3),
muP scalars (MiniCPM), RoPE scaling (Llama 3, LongRoPE, YaRN) and the FFN variant (gated MLP or a
plug-in such as BlockFFN) all come from the ModelConfig and the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from .. import ops
from ..kv_cache import KVCache
from ..ops.rope import RopeTable, build_rope_table
from .config import ModelConfig
from .sparse import SparseAttention, for_config as sparse_for_config


class Linear(Protocol):
    """Anything with a projection's call interface (ops.DenseLinear or a quantized linear)."""

    out_features: int
    in_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class GatedMLP:
    """down(silu(gate(x)) * up(x)) with gate and up fused into one projection."""

    def __init__(self, gate_up: Linear, down: Linear) -> None:
        self.gate_up = gate_up
        self.down = down

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H] -> [T, H]
        return self.down(ops.silu_and_mul(self.gate_up(x)))


def device_length(start: int | torch.Tensor, t: int) -> torch.Tensor | None:
    """For a device-side start (int64 [1]): the cache slots that count once T tokens are written
    there, int32 [1] on the device, as the attention op's `seqlen` takes it; None for a host int."""
    if not isinstance(start, torch.Tensor):
        return None
    return (start.reshape(1) + t).to(torch.int32)


@dataclass
class Layer:
    attn_norm: torch.Tensor  # [H]
    qkv: Linear              # H -> (Hq + 2 Hkv) * D
    o: Linear                # Hq * D -> H
    ffn_norm: torch.Tensor   # [H]
    ffn: Callable[[torch.Tensor], torch.Tensor]
    q_norm: torch.Tensor | None = None  # [D] (Qwen3)
    k_norm: torch.Tensor | None = None  # [D] (Qwen3)


@dataclass
class ForwardOutput:
    hidden: torch.Tensor  # [T, H] after the final norm
    captured: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [T, H] residual stream entering it


class Decoder:
    """A decoder-only transformer over a KVCache. Weights are plain tensors and Linear objects."""

    def __init__(self, config: ModelConfig, embed: torch.Tensor, layers: list[Layer],
                 final_norm: torch.Tensor, lm_head: Linear, max_context: int) -> None:
        self.config = config
        self.embed = embed            # [V, H]
        self.layers = layers
        self.final_norm = final_norm  # [H]
        self.lm_head = lm_head        # H -> V
        self.set_max_context(max_context)
        self.attn_scale = config.head_dim ** -0.5
        # Bitwise-equal attention for decoded and verified tokens (ops.attention); drafts turn it off.
        self.row_invariant_attention = True
        # InfLLM-v2 block-sparse attention (MiniCPM4 sparse_config): None for dense-only models.
        self.sparse: SparseAttention | None = sparse_for_config(
            config.sparse_config, config.num_layers, config.num_kv_heads, config.head_dim)

    def set_max_context(self, max_context: int) -> None:
        """Serve positions [0, max_context): the RoPE table covers them (LongRoPE's factors depend
        on the context), KV caches default to that many slots."""
        cfg = self.config
        self.max_context = max_context
        self.rope: RopeTable = build_rope_table(cfg.head_dim, cfg.rope_theta, max_context, cfg.rope_scaling,
                                                cfg.max_position_embeddings, device=self.embed.device)

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    def new_cache(self, max_len: int | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.num_layers, max_len or self.max_context, cfg.num_kv_heads, cfg.head_dim,
                       self.dtype, self.device)

    def _attention(self, i: int, layer: Layer, h: torch.Tensor, positions: torch.Tensor,
                   cache: KVCache, start: int | torch.Tensor, tree_mask: torch.Tensor | None,
                   seqlen: torch.Tensor | None = None, cache_view: int | None = None,
                   sparse_active: bool = False) -> torch.Tensor:
        cfg = self.config
        t = h.shape[0]
        qkv = layer.qkv(h)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(t, cfg.num_heads, cfg.head_dim)
        k = k.view(t, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(t, cfg.num_kv_heads, cfg.head_dim)
        if layer.q_norm is not None:
            q = ops.rms_norm(q, layer.q_norm, cfg.rms_norm_eps)
            k = ops.rms_norm(k, layer.k_norm, cfg.rms_norm_eps)
        q, k = ops.apply_rope(q, k, positions, self.rope)
        cache.write(i, start, k, v)
        out = None
        if seqlen is not None:  # device-side start: cache_view slots, of which seqlen count
            keys, values = cache.view(i, cache_view or cache.max_len)
        else:
            keys, values = cache.view(i, start + t)                               # [S, Hkv, D]

        def dense() -> torch.Tensor:  # [T, Hq, D]
            return ops.attention(q, keys, values, self.attn_scale, tree_mask, self.row_invariant_attention,
                                 seqlen=seqlen, span=cache.attention_span)

        invariant = {"row_invariant": self.row_invariant_attention, "span": cache.attention_span}
        if sparse_active:
            assert self.sparse is not None and seqlen is not None
            out = self.sparse.attend_on_device(i, q, keys, values, positions, cache, self.attn_scale, tree_mask, seqlen,
                                               **invariant)
        elif self.sparse is not None and seqlen is None:  # None back when every query is below dense_len
            out = self.sparse.attend(i, q, keys, values, positions, cache, start, self.attn_scale, tree_mask, dense,
                                     **invariant)
        if out is None:
            out = dense()
        return layer.o(out.reshape(t, cfg.q_size))

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int | torch.Tensor,
                tree_mask: torch.Tensor | None = None, capture: tuple[int, ...] = (),
                check_ids: bool = False, cache_view: int | None = None,
                sparse_active: bool | None = None) -> ForwardOutput:
        """Run T tokens through the model, writing their K/V at cache slots [start, start + T).

        start: a host int, or a one-element int64 tensor on the model's device that no step reads
        on the host (what a CUDA graph captures: see edgespec.cuda_graphs). Attention then views
        the first `cache_view` slots of the cache (default all; the kernels plan their splits for
        that many), of which the first start + T count. On a model with an InfLLM-v2 sparse config
        the host decides whether such a step is sparse and prepares it
        (SparseAttention.prepare_device_step, which gives `sparse_active`).

        tokens: [T] int64; positions: [T] int64 RoPE positions (start + i for a chain; prefix length +
        depth for tree tokens); tree_mask: None (causal) or packed int64 [T, ceil(T/64)];
        capture: layer indices whose input residual stream to return (EAGLE-3 features; index
        num_layers means the stream after the last layer, before the final norm).
        Returns the final-normed hidden states [T, H] and the captured streams.
        """
        cfg = self.config
        rs = cfg.residual_scale
        captured: dict[int, torch.Tensor] = {}
        if isinstance(start, torch.Tensor) and self.sparse is not None and sparse_active is None:
            raise ValueError("a device-side start on a model with an InfLLM-v2 sparse_config needs sparse_active, "
                             "from SparseAttention.prepare_device_step")
        if sparse_active and (self.sparse is None or not isinstance(start, torch.Tensor)):
            raise ValueError("sparse_active is for a device-side start on a model with an InfLLM-v2 sparse_config")
        seqlen = device_length(start, tokens.shape[0])
        residual = ops.embedding(tokens, self.embed, cfg.embedding_scale, check=check_ids)  # [T, H]
        if 0 in capture:
            captured[0] = residual
        h = ops.rms_norm(residual, self.layers[0].attn_norm, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            a = self._attention(i, layer, h, positions, cache, start, tree_mask, seqlen, cache_view, bool(sparse_active))
            if rs != 1.0:
                a = a * rs
            h, residual = ops.rms_norm(a, layer.ffn_norm, cfg.rms_norm_eps, residual=residual)
            m = layer.ffn(h)
            if rs != 1.0:
                m = m * rs
            last = i + 1 == len(self.layers)
            next_norm = self.final_norm if last else self.layers[i + 1].attn_norm
            h, residual = ops.rms_norm(m, next_norm, cfg.rms_norm_eps, residual=residual)
            if i + 1 in capture:
                captured[i + 1] = residual
        return ForwardOutput(hidden=h, captured=captured)

    def reset_stats(self) -> None:
        """Zero the step statistics kept by FFN variants (BlockFFN's sparsity counters)."""
        for layer in self.layers:
            if hasattr(layer.ffn, "reset_stats"):
                layer.ffn.reset_stats()

    def stats(self) -> dict[str, Any]:
        """Step statistics of the FFN variants since reset_stats(), merged over the layers by the
        variant's own `merge_stats` (BlockFFN: token- and chunk-level sparsity); {} for a plain MLP."""
        parts = [layer.ffn for layer in self.layers if hasattr(layer.ffn, "merge_stats")]
        return type(parts[0]).merge_stats(parts) if parts else {}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head. hidden: [T, H] -> logits [T, V] fp32."""
        if self.config.logit_scale != 1.0:
            hidden = hidden * self.config.logit_scale
        return self.lm_head(hidden).float()
