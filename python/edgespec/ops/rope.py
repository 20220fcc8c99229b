"""Rotary position embeddings: frequency tables for every scaling scheme, and their application.

A `RopeTable` holds cos/sin for positions [0, max_positions) with any attention scaling factor
(YaRN, LongRoPE) already folded in, so applying RoPE is the same op for every scheme.
The rotation is the "rotate half" (GPT-NeoX) form that Hugging Face Llama-family models use:
for d < D/2, (x[d], x[d + D/2]) is rotated by angle pos * inv_freq[d].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from . import backend


@dataclass
class RopeTable:
    cos: torch.Tensor  # [P, D/2] fp32
    sin: torch.Tensor  # [P, D/2] fp32

    @property
    def max_positions(self) -> int:
        return self.cos.shape[0]

    @property
    def rotary_dim(self) -> int:
        return 2 * self.cos.shape[1]

    def to(self, device: torch.device | str) -> "RopeTable":
        return RopeTable(self.cos.to(device), self.sin.to(device))


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: keep high frequencies, divide low frequencies by `factor`, blend in between.
    factor = float(cfg["factor"])
    low_ff = float(cfg.get("low_freq_factor", 1.0))
    high_ff = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, cfg: dict[str, Any], model_max_positions: int) -> tuple[torch.Tensor, float]:
    factor = float(cfg["factor"])
    # Without an explicit pretraining length the model's own max_position_embeddings is it (as in
    # transformers), never the engine's context: the ramp must not move with --max-context.
    orig = int(cfg.get("original_max_position_embeddings") or model_max_positions)
    beta_fast = float(cfg.get("beta_fast") or 32.0)
    beta_slow = float(cfg.get("beta_slow") or 1.0)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = cfg.get("attention_factor")
    if attn is None:
        m, m_all = cfg.get("mscale"), cfg.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):  # gpt-oss style configs disable the integer rounding
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the original frequency is kept
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def _longrope(dim: int, theta: float, cfg: dict[str, Any], max_positions: int,
              model_max_positions: int) -> tuple[torch.Tensor, float]:
    orig = int(cfg.get("original_max_position_embeddings") or model_max_positions)
    # The table is built once for the engine's context: long factors when that context exceeds
    # the pretraining length, short factors otherwise (as MiniCPM's own code does for its cache).
    factors = cfg["long_factor"] if max_positions > orig else cfg["short_factor"]
    factors = torch.tensor(factors, dtype=torch.float64)
    if factors.numel() != dim // 2:
        raise ValueError(f"longrope: {factors.numel()} factors given, expected rotary_dim/2 = {dim // 2}")
    inv_freq = _default_inv_freq(dim, theta) / factors
    attn = cfg.get("attention_factor")
    if attn is None:
        # An explicit `factor` wins over the length ratio, as in transformers.
        scale = float(cfg.get("factor") or model_max_positions / orig)
        attn = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig))
    return inv_freq, float(attn)


SUPPORTED_SCALING = ("default", "linear", "llama3", "yarn", "longrope")


def build_rope_table(
    rotary_dim: int,
    theta: float,
    max_positions: int,
    scaling: dict[str, Any] | None = None,
    model_max_positions: int | None = None,
    device: torch.device | str = "cpu",
) -> RopeTable:
    """cos/sin tables for positions [0, max_positions).

    scaling: the config's `rope_scaling` dict (None for plain RoPE). Its `rope_type` (or legacy
    `type`) selects default, linear, llama3, yarn or longrope; anything else raises ValueError.
    model_max_positions: the config's max_position_embeddings (LongRoPE's scale uses it).
    """
    if rotary_dim % 2:
        raise ValueError(f"rotary dim must be even, got {rotary_dim}")
    kind = "default"
    if scaling:
        kind = str(scaling.get("rope_type") or scaling.get("type") or "default")
    if kind == "su":  # older name for LongRoPE
        kind = "longrope"
    attn = 1.0
    if kind == "default":
        inv_freq = _default_inv_freq(rotary_dim, theta)
    elif kind == "linear":
        inv_freq = _default_inv_freq(rotary_dim, theta) / float(scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_inv_freq(_default_inv_freq(rotary_dim, theta), scaling)
    elif kind == "yarn":
        inv_freq, attn = _yarn(rotary_dim, theta, scaling, model_max_positions or max_positions)
    elif kind == "longrope":
        inv_freq, attn = _longrope(rotary_dim, theta, scaling, max_positions,
                                   model_max_positions or max_positions)
    else:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(SUPPORTED_SCALING)})")
    pos = torch.arange(max_positions, dtype=torch.float64)
    angles = torch.outer(pos, inv_freq)
    cos = (angles.cos() * attn).float().to(device)
    sin = (angles.sin() * attn).float().to(device)
    return RopeTable(cos=cos.contiguous(), sin=sin.contiguous())


def _rotate_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos/sin: [T, 1, D/2] fp32
    half = cos.shape[-1]
    x1, x2, rest = x[..., :half].float(), x[..., half:2 * half].float(), x[..., 2 * half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    out = torch.cat([r1.to(x.dtype), r2.to(x.dtype), rest], dim=-1)
    return out


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: RopeTable
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query and key heads by their positions.

    q: [T, Hq, D], k: [T, Hk, D] (same dtype); positions: [T] int, each in [0, table.max_positions)
    table: rotary dim <= D; dims past the rotary dim pass through unchanged.
    Returns new (q, k) tensors of the same shapes and dtype.
    """
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"apply_rope: expected q [T,Hq,D] and k [T,Hk,D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if positions.shape != (q.shape[0],):
        raise ValueError(f"apply_rope: positions must be [T={q.shape[0]}], got {tuple(positions.shape)}")
    if table.rotary_dim > q.shape[2]:
        raise ValueError(f"apply_rope: rotary dim {table.rotary_dim} exceeds head dim {q.shape[2]}")
    if backend.use_kernel(q, k, positions, table.cos):
        from . import _kernels

        if _kernels.supports_rope(q, k, positions, table):
            return _kernels.apply_rope(q, k, positions, table)
    idx = positions.long()
    cos = table.cos.index_select(0, idx).unsqueeze(1)
    sin = table.sin.index_select(0, idx).unsqueeze(1)
    return _rotate_torch(q, cos, sin), _rotate_torch(k, cos, sin)
