"""A trainable EAGLE-1/2 head (torch.nn) that mirrors EagleHead's inference forward exactly, and
its export to the published checkpoint layout (config.json + fc/layers tensors).

Training-time test (the EAGLE-3 paper's name for it): the head is unrolled for several draft
steps. Step 1 at anchor t reads the real pair (x[t+1], f[t]) and predicts f[t+1]; step j reads
(x[t+j], its own previous prediction) at position t+j-1 and attends, as at inference, to the
real keys of positions <= t plus the keys its own earlier steps produced for the same anchor
(never to another anchor's predicted keys). So the head learns on the inputs it will see at
depth j of a draft tree.

Fused lower layers (optional, after EAGLE-3's observation that the top layer alone under-informs
a draft): the first step's feature becomes f[t] + proj(cat(rms(s_1[t]) * w_1, ..., rms(s_n[t]) * w_n)),
where s_i are the residual streams entering the chosen target layers. proj starts at zero, so a
head with fusion starts exactly as the plain head it is initialised from; deeper steps feed back
the head's own predicted feature as before. Saved as `fuse.norm.weight` [n*H] and
`fuse.proj.weight` [H, n*H] beside the EAGLE-1/2 tensors, with the layers in config.json.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..models.config import ModelConfig
from ..ops.rope import build_rope_table
from .eagle import CONFIG_KEY


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [..., S, D]; cos/sin: [S, D/2] (the rotate-half form ops.apply_rope uses)
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half:2 * half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:]], dim=-1)


class _Layer(nn.Module):
    def __init__(self, cfg: ModelConfig, first: bool) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.input_layernorm = None if first else _RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, cfg.q_size, bias=False)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=False)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=False)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=False)
        self.post_attention_layernorm = _RMSNorm(h, cfg.rms_norm_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """h [B, S, H] -> q [B, Hq, S, D], k/v [B, Hq, S, D] (KV heads repeated for GQA), rotated."""
        c = self.cfg
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, c.num_heads, c.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, c.num_kv_heads, c.head_dim).transpose(1, 2)
        rep = c.num_heads // c.num_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def mlp(self, a: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        s = a + residual
        h = self.post_attention_layernorm(s)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)) + s


class TrainableEagleHead(nn.Module):
    """EAGLE-1/2 head: fc(cat(embed, feature)) -> decoder layer(s); first layer without input norm;
    optionally fusing lower target layers into the first step's feature (module docstring)."""

    def __init__(self, cfg: ModelConfig, num_layers: int = 1, fc_bias: bool = True,
                 fuse_layers: tuple[int, ...] = ()) -> None:
        super().__init__()
        if num_layers != 1:
            raise ValueError("training supports one-layer heads (as EAGLE publishes them)")
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=fc_bias)
        self.fuse_layers = tuple(fuse_layers)
        if self.fuse_layers:
            n = len(self.fuse_layers)
            self.fuse_norm = nn.Parameter(torch.ones(n * h))
            self.fuse_proj = nn.Linear(n * h, h, bias=False)
        self.layer = _Layer(cfg, first=True)
        table = build_rope_table(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling,
                                 cfg.max_position_embeddings)
        self.register_buffer("cos", table.cos, persistent=False)
        self.register_buffer("sin", table.sin, persistent=False)

    def reset_parameters(self, seed: int, std: float = 0.02) -> None:
        """Small random weights (norm weights 1) from a seeded generator; fc starts near passing the
        feature through, which is a good first guess for the next feature."""
        g = torch.Generator().manual_seed(seed)
        h = self.cfg.hidden_size
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "fuse_norm":
                    p.fill_(1.0)
                elif name.startswith("fuse_proj"):
                    p.zero_()  # fusion starts as a no-op: the plain head's behaviour
                elif p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                else:
                    p.zero_()
            self.fc.weight[:, h:] += torch.eye(h)

    def fuse(self, feats: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
        """feats [B, S, H] + the fused lower-layer streams [B, S, n*H] (module docstring)."""
        h = self.cfg.hidden_size
        x = streams.float().unflatten(-1, (len(self.fuse_layers), h))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return feats + self.fuse_proj(x.flatten(-2) * self.fuse_norm.float())

    def unrolled(self, emb: torch.Tensor, feats: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time-test forward (module docstring).

        emb:   [B, S, H] embeddings of tokens x[1..S] (row t holds x[t+1])
        feats: [B, S, H] target features f[0..S-1]
        Returns `steps` tensors; element j-1 is [B, S - j + 1, H]: row t predicts f[t+j].
        """
        b, s, h = emb.shape
        c = self.cfg
        layer = self.layer
        cos, sin = self.cos[:s + steps], self.sin[:s + steps]
        outs: list[torch.Tensor] = []
        keys: list[torch.Tensor] = []    # per step: [B, Hq, S, D] keys of anchors (step 1: positions)
        values: list[torch.Tensor] = []
        state = feats
        for j in range(1, steps + 1):
            n = s - j + 1                                  # anchors with a token x[t+j] available
            x = self.fc(torch.cat([emb[:, j - 1:j - 1 + n], state[:, :n]], dim=-1))   # [B, n, H]
            # Step j's row for anchor t sits at position t + j - 1.
            q, k, v = layer.qkv(x, cos[j - 1:j - 1 + n], sin[j - 1:j - 1 + n])
            if j == 1:
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                k1, v1 = keys[0][:, :, :n], values[0][:, :, :n]
                scale = 1.0 / math.sqrt(c.head_dim)
                real = torch.matmul(q, k1.transpose(-1, -2)) * scale          # [B, Hq, n, n]: real keys
                causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
                real = real.masked_fill(~causal, float("-inf"))
                own = [(q * kk[:, :, :n]).sum(-1, keepdim=True) * scale for kk in keys[1:]]
                own.append((q * k).sum(-1, keepdim=True) * scale)              # [B, Hq, n, 1] each
                p = torch.cat([real] + own, dim=-1).softmax(dim=-1)
                attn = torch.matmul(p[..., :n], v1)
                for i, vv in enumerate(values[1:] + [v]):
                    attn = attn + p[..., n + i:n + i + 1] * vv[:, :, :n]
            a = layer.o_proj(attn.transpose(1, 2).reshape(b, n, c.q_size))
            out = layer.mlp(a, x)                                               # [B, n, H]
            outs.append(out)
            keys.append(k)
            values.append(v)
            state = out
        return outs

    def eagle_tensors(self) -> dict[str, torch.Tensor]:
        """The head's tensors under EAGLE's published names."""
        layer = self.layer
        out = {"fc.weight": self.fc.weight}
        if self.fc.bias is not None:
            out["fc.bias"] = self.fc.bias
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"layers.0.self_attn.{name}.weight"] = getattr(layer, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"layers.0.mlp.{name}.weight"] = getattr(layer, name).weight
        out["layers.0.post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight
        if self.fuse_layers:
            out["fuse.norm.weight"] = self.fuse_norm
            out["fuse.proj.weight"] = self.fuse_proj.weight
        return out


def head_config(target_config: ModelConfig, **meta: Any) -> dict[str, Any]:
    """config.json of an EAGLE-1/2 head for a target (Llama layout, one layer, fc bias), with our
    metadata under CONFIG_KEY."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": target_config.hidden_size,
        "intermediate_size": target_config.intermediate_size,
        "num_attention_heads": target_config.num_heads,
        "num_key_value_heads": target_config.num_kv_heads,
        "head_dim": target_config.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": target_config.vocab_size,
        "rms_norm_eps": target_config.rms_norm_eps,
        "rope_theta": target_config.rope_theta,
        "rope_scaling": target_config.rope_scaling,
        "max_position_embeddings": target_config.max_position_embeddings,
        "hidden_act": "silu",
        "bias": True,
        CONFIG_KEY: {"kind": "eagle", **meta},
    }


def head_model_config(target: ModelConfig) -> ModelConfig:
    """The ModelConfig of a head for `target` (the shapes head_config writes)."""
    from ..models.config import config_from_hf  # noqa: PLC0415

    return config_from_hf(head_config(target), source="<eagle head config>")


def random_head(target: ModelConfig, directory: Any, seed: int = 0, std: float = 0.02,
                fuse_layers: tuple[int, ...] = ()) -> Any:
    """Write a randomly initialised EAGLE-1/2 head for `target` into `directory` (tests, and the
    starting point of training). With fuse_layers, the fusion is random too (not the no-op training
    starts from), so tests exercise it. Returns the directory."""
    from .eagle import save_eagle_head  # noqa: PLC0415

    head = TrainableEagleHead(head_model_config(target), fuse_layers=fuse_layers)
    head.reset_parameters(seed, std)
    meta: dict[str, Any] = {"random_init_seed": seed}
    if fuse_layers:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed + 1)
            head.fuse_proj.weight.copy_(torch.randn(head.fuse_proj.weight.shape, generator=g) * std)
            head.fuse_norm.copy_(1 + 0.1 * torch.randn(head.fuse_norm.shape, generator=g))
        meta["fuse_layers"] = list(fuse_layers)
    return save_eagle_head(directory, head.eagle_tensors(), head_config(target, **meta), dtype=torch.float32)
