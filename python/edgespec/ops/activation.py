"""Gated activations used by the feed-forward blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU gate: x = [gate | up] along the last dim, returns silu(gate) * up.

    x: [..., 2*I] fp32/bf16/fp16 (the output of a fused gate_up projection)
    Returns [..., I] in x's dtype.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul: last dim must be even (gate|up), got {x.shape[-1]}")
    if backend.use_kernel(x):
        from . import _kernels

        if _kernels.supports_silu_and_mul(x):
            return _kernels.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
