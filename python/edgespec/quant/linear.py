"""QuantLinear: a 4-bit weight-only linear with the same interface as ops.DenseLinear."""
from __future__ import annotations

import torch

from ..ops.linear import ConcatLinear
from ..ops.w4a16 import W4A16Weight, w4a16_linear
from . import layout


def _choose_layout(device: torch.device, k: int, n: int, requested: str) -> str:
    if requested != "auto":
        if requested not in ("plain", "tile"):
            raise ValueError(f"layout must be 'auto', 'plain' or 'tile', got {requested!r}")
        return requested
    # The kernel reads the tile layout; the torch path (CPU) reads the plain one faster.
    return "tile" if device.type == "cuda" and layout.tile_layout_ok(k, n) else "plain"


class QuantLinear:
    """y = x @ W.T + bias with W held as 4-bit values, per-group scales and optional zero points.

    Build one with `from_ints` (or a format reader in edgespec.quant.formats). Interface as
    ops.DenseLinear: in_features, out_features, __call__, to(), fuse().
    """

    def __init__(self, weight: W4A16Weight, bias: torch.Tensor | None = None) -> None:
        if bias is not None and tuple(bias.shape) != (weight.out_features,):
            raise ValueError(f"QuantLinear: bias shape {tuple(bias.shape)} != ({weight.out_features},)")
        self.weight = weight
        self.bias = bias

    @classmethod
    def from_ints(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
                  perm: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  layout_name: str = "auto") -> "QuantLinear":
        """A QuantLinear from unpacked values.

        q:      uint8 [K, N] in 0..15, rows in stored order (grouped: row j is in group j // group_size)
        scales: [G, N] float; zeros: [G, N] float zero points or None (symmetric, z = 8)
        perm:   int64 [K] or None: stored row j multiplies input feature perm[j]
        bias:   [N] or None
        The result lives on `device` with scales/zeros/bias in `dtype` (the compute dtype).
        """
        if q.dim() != 2:
            raise ValueError(f"QuantLinear.from_ints: q must be [K, N], got shape {tuple(q.shape)}")
        if q.numel() and int(q.max()) > 15:
            raise ValueError(f"QuantLinear.from_ints: q holds {int(q.max())}, 4-bit values must be 0..15")
        device = torch.device(device)
        k, n = q.shape
        name = _choose_layout(device, k, n, layout_name)
        q = q.to(device)  # pack where the weight will live: a GPU repacks an 8B model in seconds
        packed = layout.pack_rows(q) if name == "plain" else layout.pack_tile(q)
        weight = W4A16Weight(
            qweight=packed, scales=scales.to(device=device, dtype=dtype),
            zeros=None if zeros is None else zeros.to(device=device, dtype=dtype),
            group_size=group_size, in_features=k, out_features=n, layout=name,
            perm=None if perm is None else perm.to(device=device, dtype=torch.int64))
        return cls(weight, None if bias is None else bias.to(device=device, dtype=dtype))

    @property
    def in_features(self) -> int:
        return self.weight.in_features

    @property
    def out_features(self) -> int:
        return self.weight.out_features

    @property
    def group_size(self) -> int:
        return self.weight.group_size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N] in x's dtype."""
        return w4a16_linear(x, self.weight, self.bias)

    def ints(self) -> torch.Tensor:
        """uint8 [K, N]: the 4-bit values in stored row order."""
        return self.weight.unpacked()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [N, K] in `dtype` (the oracle every path is compared with)."""
        return self.weight.dequantize(dtype)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           layout_name: str = "auto") -> "QuantLinear":
        """A copy on `device` with scales/zeros/bias in `dtype`, repacked for the path that device uses."""
        w = self.weight
        device = w.device if device is None else torch.device(device)
        dtype = w.scales.dtype if dtype is None else dtype
        name = _choose_layout(device, w.in_features, w.out_features, layout_name)
        if name == w.layout:
            packed = w.qweight.to(device)
        else:
            q = w.unpacked().to(device)
            packed = layout.pack_rows(q) if name == "plain" else layout.pack_tile(q)
        moved = W4A16Weight(
            qweight=packed, scales=w.scales.to(device=device, dtype=dtype),
            zeros=None if w.zeros is None else w.zeros.to(device=device, dtype=dtype),
            group_size=w.group_size, in_features=w.in_features, out_features=w.out_features, layout=name,
            perm=None if w.perm is None else w.perm.to(device))
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return QuantLinear(moved, bias)

    @classmethod
    def fuse(cls, parts: list["QuantLinear"]):
        """One QuantLinear computing the parts' outputs concatenated (q|k|v, gate|up).

        Fusing is a concatenation along N in the plain and tile layouts, so it is done whenever the
        parts agree on K, group size, act-order permutation, layout, device and dtype: one launch instead of
        several, and more column tiles for the kernel to spread over the SMs. Parts that disagree
        fall back to ConcatLinear (called one by one), as do weights already in torch's cpu layout
        (the loader packs them after fusing).
        """
        if not parts:
            raise ValueError("QuantLinear.fuse: no parts given")
        if len(parts) == 1:
            return parts[0]
        ws = [p.weight for p in parts]
        first = ws[0]
        same = first.layout != "cpu" and all(
            w.in_features == first.in_features and w.group_size == first.group_size
            and w.layout == first.layout and w.device == first.device
            and w.scales.dtype == first.scales.dtype
            and ((w.perm is None and first.perm is None)
                 or (w.perm is not None and first.perm is not None and torch.equal(w.perm, first.perm)))
            for w in ws)
        if not same:
            return ConcatLinear(list(parts))
        if all(w.zeros is None for w in ws):
            zeros = None
        else:
            # A symmetric part joins an asymmetric one with its implicit zero point 8 made explicit.
            zeros = torch.cat([w.zeros if w.zeros is not None else torch.full_like(w.scales, 8.0) for w in ws], dim=1)
        fused = W4A16Weight(
            qweight=torch.cat([w.qweight for w in ws], dim=1), scales=torch.cat([w.scales for w in ws], dim=1),
            zeros=zeros, group_size=first.group_size, in_features=first.in_features,
            out_features=sum(w.out_features for w in ws), layout=first.layout, perm=first.perm)
        if all(p.bias is None for p in parts):
            bias = None
        else:
            bias = torch.cat([p.bias if p.bias is not None else first.scales.new_zeros(p.out_features)
                              for p in parts])
        return cls(fused, bias)

    def __repr__(self) -> str:
        w = self.weight
        return (f"QuantLinear(in={w.in_features}, out={w.out_features}, group={w.group_size}, "
                f"{'sym' if w.zeros is None else 'asym'}, layout={w.layout}, act_order={w.perm is not None}, "
                f"dtype={w.scales.dtype}, device={w.device})")
