"""Weight sources: a checkpoint seen through Hugging Face tensor names."""
from __future__ import annotations

from typing import Protocol

import torch

from ..errors import ModelFormatError
from ..ops.linear import DenseLinear


class WeightSource(Protocol):
    """A checkpoint whose tensors are addressed by Hugging Face names
    (`model.layers.0.self_attn.q_proj.weight`, ...), whatever the file format."""

    path: str

    def has(self, name: str) -> bool: ...

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The named tensor, for use on `device`: a source may produce it there (a GGUF file decodes
        its blocks on that device) or on the host; callers move it with `.to` either way."""

    def linear(self, prefix: str, device: torch.device, dtype: torch.dtype) -> "DenseLinear": ...


def require(source: WeightSource, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The named tensor (for use on `device`), or a ModelFormatError naming the file and the
    missing tensor."""
    if not source.has(name):
        raise ModelFormatError(f"{source.path}: tensor {name!r} is missing from the checkpoint")
    return source.tensor(name, device)


def dense_linear(source: WeightSource, prefix: str, device: torch.device, dtype: torch.dtype,
                 expected: tuple[int, int] | None = None) -> DenseLinear:
    """`prefix.weight` (and `prefix.bias` when present) as a DenseLinear on device/dtype."""
    weight = require(source, prefix + ".weight", device)
    if expected is not None and tuple(weight.shape) != expected:
        raise ModelFormatError(
            f"{source.path}: {prefix}.weight has shape {tuple(weight.shape)}, expected {expected} from config")
    bias = source.tensor(prefix + ".bias", device) if source.has(prefix + ".bias") else None
    return DenseLinear(weight.to(device=device, dtype=dtype),
                       None if bias is None else bias.to(device=device, dtype=dtype))
