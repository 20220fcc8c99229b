"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch

from . import backend


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Accumulate in fp32 whatever the storage dtype, as the reference implementations do.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalise the last dimension and scale by `weight`.

    x:        [..., H] fp32/bf16/fp16
    weight:   [H], any float dtype
    residual: optional [..., H], same dtype as x. When given, the op first forms
              `s = x + residual` and returns `(rms_norm(s) * weight, s)`, so a decoder layer
              carries its residual stream without a separate add.
    Returns the normalised tensor with x's shape and dtype (and the new residual).
    """
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dim {x.shape[-1]} but weight has {weight.shape[-1]}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if backend.use_kernel(x, weight, residual):
        from . import _kernels

        if _kernels.supports_rms_norm(x, weight, residual):
            return _kernels.rms_norm(x, weight, eps, residual)
    if residual is None:
        return _rms_norm_torch(x, weight, eps)
    s = x + residual
    return _rms_norm_torch(s, weight, eps), s
