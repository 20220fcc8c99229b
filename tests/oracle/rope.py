"""Reference rotary position embeddings: inverse frequencies of every scaling scheme, and the
rotate-half application, computed per dimension in float64.

Sources of the formulas (the transformers source was read only to cross-check conventions):
* default: RoFormer (Su et al. 2021), inv_freq_i = theta^(-2i / d) for i < d/2.
* linear: position interpolation (Chen et al. 2023), inv_freq / factor.
* llama3: Meta's Llama 3.1 `apply_scaling`: keep frequencies whose wavelength is short, divide long
  ones by `factor`, blend linearly in wavelength-ratio space in between.
* yarn: YaRN (Peng et al. 2023) "NTK-by-parts" with the reference implementation's ramp over
  dimension indices, and the attention temperature 0.1 ln(s) + 1 folded into cos/sin.
* longrope: LongRoPE (Ding et al. 2024) per-dimension rescale factors, long or short set, and the
  attention factor sqrt(1 + ln(s) / ln(L_orig)).
"""
from __future__ import annotations

import math
from typing import Any

import torch


def _scaling_kind(scaling: dict[str, Any] | None) -> str:
    if not scaling:
        return "default"
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return "longrope" if kind == "su" else str(kind)


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    # YaRN's attention temperature: sqrt(1/t) = 0.1 ln(s) + 1 (no change without extension).
    return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0


def inv_freq_and_attention_factor(rotary_dim: int, theta: float, scaling: dict[str, Any] | None,
                                  model_max_positions: int, context: int) -> tuple[torch.Tensor, float]:
    """(inv_freq float64 [rotary_dim / 2], attention factor) for one RoPE configuration.

    scaling: the config's rope_scaling / rope_parameters dict or None.
    model_max_positions: the config's max_position_embeddings (fallback for
    original_max_position_embeddings; LongRoPE's default scale is model_max / original).
    context: the sequence length the table serves; LongRoPE uses its long factors iff
    context > original_max_position_embeddings.
    """
    kind = _scaling_kind(scaling)
    half = rotary_dim // 2
    base = [theta ** (-(2 * i) / rotary_dim) for i in range(half)]
    attn = 1.0
    if kind == "default":
        freqs = base
    elif kind == "linear":
        freqs = [f / float(scaling["factor"]) for f in base]
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings") or model_max_positions)
        freqs = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen < old_ctx / high_ff:          # many rotations within the old context
                freqs.append(f)
            elif wavelen > old_ctx / low_ff:         # less than one rotation: interpolate fully
                freqs.append(f / factor)
            else:
                smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
                freqs.append((1 - smooth) * f / factor + smooth * f)
    elif kind == "yarn":
        factor = float(scaling["factor"])
        orig = float(scaling.get("original_max_position_embeddings") or model_max_positions)
        beta_fast = float(scaling.get("beta_fast") or 32.0)
        beta_slow = float(scaling.get("beta_slow") or 1.0)

        def dim_of_rotations(rotations: float) -> float:
            # Dimension pair i turns orig / wavelen_i times over the old context, with
            # wavelen_i = 2 pi theta^(2i/d); solve orig / wavelen_i = rotations for i.
            return rotary_dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of_rotations(beta_fast), dim_of_rotations(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        if high == low:
            high += 0.001
        freqs = []
        for i, f in enumerate(base):
            ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: keep f, 1: interpolate f / factor
            freqs.append(f * (1 - ramp) + (f / factor) * ramp)
        if scaling.get("attention_factor") is not None:
            attn = float(scaling["attention_factor"])
        elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attn = (_yarn_mscale(factor, float(scaling["mscale"]))
                    / _yarn_mscale(factor, float(scaling["mscale_all_dim"])))
        else:
            attn = _yarn_mscale(factor)
    elif kind == "longrope":
        orig = int(scaling.get("original_max_position_embeddings") or model_max_positions)
        factors = scaling["long_factor"] if context > orig else scaling["short_factor"]
        if len(factors) != half:
            raise ValueError(f"longrope: {len(factors)} factors for rotary dim {rotary_dim}")
        freqs = [f / float(r) for f, r in zip(base, factors)]
        if scaling.get("attention_factor") is not None:
            attn = float(scaling["attention_factor"])
        else:
            scale = float(scaling.get("factor") or model_max_positions / orig)
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(orig))
    else:
        raise ValueError(f"oracle rope: unknown scaling type {kind!r}")
    return torch.tensor(freqs, dtype=torch.float64), attn


def rope_tables(inv_freq: torch.Tensor, attention_factor: float, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin float64 [P, rotary_dim / 2] of angle position * inv_freq, times the attention factor."""
    angles = positions.to(torch.float64).unsqueeze(1) * inv_freq.to(torch.float64).unsqueeze(0)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Rotate-half RoPE. x: [T, H, D]; cos, sin: [T, R/2] for the rotary dim R <= D.

    out = x * [cos, cos] + rotate_half(x) * [sin, sin] on the first R dims, with
    rotate_half([a, b]) = [-b, a]; dims R..D pass through. Returns [T, H, D] in `dtype`.
    """
    x = x.to(dtype)
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    c = torch.cat([cos, cos], dim=-1).to(dtype).unsqueeze(1)   # [T, 1, R]
    s = torch.cat([sin, sin], dim=-1).to(dtype).unsqueeze(1)
    first, second = rot[..., : r // 2], rot[..., r // 2:]
    rotated = torch.cat([-second, first], dim=-1)
    return torch.cat([rot * c + rotated * s, rest], dim=-1)
