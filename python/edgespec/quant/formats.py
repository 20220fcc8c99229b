"""4-bit checkpoint formats <-> one format-neutral weight (Int4Weight).

Conventions (for a linear with K inputs, N outputs, group size g, G = ceil(K / g) groups):

GPTQ (AutoGPTQ / GPTQModel / transformers), `quantize_config.json` keys bits, group_size,
desc_act, sym, checkpoint_format:
    qweight int32 [K/8, N]   8 nibbles per int32 packed along K, low nibble first
    qzeros  int32 [G, N/8]   packed along N, low nibble first; "gptq" (v1) stores zero - 1,
                             "gptq_v2" stores the zero itself
    scales  fp16  [G, N]
    g_idx   int32 [K]        group of each input row (non-trivial with desc_act / act-order)
    w[k, n] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]; symmetric GPTQ uses zero 8.
AWQ (gemm, AutoAWQ):
    qweight int32 [K, N/8]   packed along N with nibble i holding column 8c + [0,2,4,6,1,3,5,7][i]
    qzeros  int32 [G, N/8]   same packing; the zero itself
    scales  fp16  [G, N]
GGUF Q4_0 / Q4_1 (llama.cpp), group 32 along K, one row of blocks per output feature:
    Q4_0 block (18 bytes): fp16 d, 16 bytes qs; element j < 16 is the low nibble of qs[j], element
         j + 16 the high nibble; w = d * (q - 8)
    Q4_1 block (20 bytes): fp16 d, fp16 m, 16 bytes qs (same order); w = d * q + m, i.e. zero = -m / d.
GGUF Q4_K (the 4-bit part of llama.cpp's Q4_K_S/Q4_K_M files), super-blocks of 256 along K, eight
    sub-blocks of 32 each with its own 6-bit scale code sc and min code mc:
    block (144 bytes): fp16 d, fp16 dmin, 12 bytes of codes, 128 bytes qs. Codes of sub-blocks
         j < 4 are the low 6 bits of bytes j (sc) and j + 4 (mc); for j >= 4, sc is the low nibble of
         byte j + 4 with bits 4..5 from the top two bits of byte j - 4, and mc the high nibble of
         byte j + 4 with bits 4..5 from the top two bits of byte j. qs holds 64 elements per 32
         bytes: sub-block 2c in the low nibbles of bytes 32c..32c+31, sub-block 2c + 1 in the high.
    w = d * sc * q - dmin * mc, i.e. group 32 with scale d * sc and zero dmin * mc / (d * sc).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ModelFormatError
from ..loading.gguf_dequant import q4_k_fields
from . import layout
from .linear import QuantLinear

BITS = 4
GGUF_Q4_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20}
GGUF_BLOCK = 32
GGUF_Q4K_SUPER = 256          # elements per Q4_K super-block
GGUF_Q4K_BYTES = 144          # bytes per Q4_K super-block
GGUF_4BIT_TYPES = (*GGUF_Q4_BLOCK_BYTES, "Q4_K")


@dataclass
class Int4Weight:
    """A 4-bit weight in no particular file format (CPU tensors).

    q:          uint8 [K, N], 0..15, rows in input-feature order
    scales:     fp32 [G, N]
    zeros:      fp32 [G, N] zero points (integers for GPTQ/AWQ, any value for GGUF Q4_1) or None (8)
    group_size: rows per group (K for per-channel)
    g_idx:      int64 [K] group of each row, or None for the contiguous k // group_size
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    g_idx: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.q.shape[0]

    @property
    def out_features(self) -> int:
        return self.q.shape[1]

    def groups(self) -> torch.Tensor:
        """int64 [K]: the group of each input row."""
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(self.in_features) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """W: fp32 [N, K] (the format's own formula, in fp32)."""
        g = self.groups()
        z = 8.0 if self.zeros is None else self.zeros[g]
        return ((self.q.float() - z) * self.scales[g]).t().contiguous()

    def select_outputs(self, index: torch.Tensor) -> "Int4Weight":
        """The weight whose output n is this weight's output index[n] (index: int64 [N'])."""
        return Int4Weight(self.q[:, index], self.scales[:, index],
                          None if self.zeros is None else self.zeros[:, index], self.group_size, self.g_idx)

    def to_linear(self, bias: torch.Tensor | None = None, device: torch.device | str = "cpu",
                  dtype: torch.dtype = torch.float32, layout_name: str = "auto", name: str = "weight") -> QuantLinear:
        """A QuantLinear on device/dtype. Act-order rows are sorted by group (groups contiguous, as
        the kernel needs) and the sort is kept as the input permutation."""
        k = self.in_features
        q, perm = self.q, None
        if self.g_idx is not None:
            contiguous = torch.arange(k) // self.group_size
            if not torch.equal(self.g_idx, contiguous):
                perm = torch.argsort(self.g_idx, stable=True)
                if not torch.equal(self.g_idx[perm], contiguous):
                    counts = torch.bincount(self.g_idx, minlength=self.scales.shape[0]).tolist()
                    raise ModelFormatError(
                        f"{name}: g_idx assigns {counts[:8]}{'...' if len(counts) > 8 else ''} rows to its groups; "
                        f"expected {self.group_size} rows per group (a permutation of k // group_size)")
                q = q[perm]
        return QuantLinear.from_ints(q, self.scales, self.zeros, self.group_size, perm=perm, bias=bias,
                                     device=device, dtype=dtype, layout_name=layout_name)


def _require(t: Any, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ModelFormatError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise ModelFormatError(f"{name}: expected {str(dtype).removeprefix('torch.')} {list(shape)}, "
                               f"got {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    return t


def _group_size(group_size: int, k: int, name: str) -> int:
    if group_size == -1 or group_size == 0:
        return k
    if group_size < 0 or group_size % 8 and group_size != k:
        raise ModelFormatError(f"{name}: group_size {group_size} is not supported (use -1 or a multiple of 8)")
    return group_size


def _float_scales(scales: torch.Tensor, name: str) -> torch.Tensor:
    s = scales.float()
    if not torch.isfinite(s).all():
        raise ModelFormatError(f"{name}.scales: holds non-finite values (corrupt checkpoint?)")
    return s


def read_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
              group_size: int, checkpoint_format: str = "gptq", bits: int = 4, name: str = "gptq") -> Int4Weight:
    """A GPTQ linear (tensors as stored; `name` is the checkpoint prefix used in errors)."""
    if bits != BITS:
        raise ModelFormatError(f"{name}: {bits}-bit GPTQ is not supported (only 4-bit)")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ModelFormatError(f"{name}: GPTQ checkpoint_format {checkpoint_format!r} is not supported "
                               "(expected 'gptq' or 'gptq_v2')")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ModelFormatError(f"{name}.qweight: expected int32 [K/8, N], got {qweight.dtype} {list(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    g = _group_size(group_size, k, name)
    groups = -(-k // g)
    _require(qzeros, name + ".qzeros", torch.int32, (groups, -(-n // 8)))
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ModelFormatError(f"{name}.scales: expected a float tensor, got {scales.dtype}")
    _require(scales, name + ".scales", scales.dtype, (groups, n))
    q = layout.unpack_rows(qweight, k)
    z = layout.unpack_cols(qzeros, n).float()
    if checkpoint_format == "gptq":
        z = z + 1.0  # v1 stores zero - 1 (so a stored 15 means 16)
    gi = None
    if g_idx is not None:
        gi = _require(g_idx, name + ".g_idx", g_idx.dtype, (k,)).to(torch.int64)
        if g_idx.dtype not in (torch.int32, torch.int64) or (gi.numel() and (gi.min() < 0 or gi.max() >= groups)):
            raise ModelFormatError(f"{name}.g_idx: expected int32 [{k}] with values in [0, {groups}), "
                                   f"got {g_idx.dtype} with range [{int(gi.min())}, {int(gi.max())}]")
    zeros = None if bool((z == 8).all()) else z
    return Int4Weight(q, _float_scales(scales, name), zeros, g, gi)


def write_gptq(w: Int4Weight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ tensors {qweight, qzeros, scales (fp16), g_idx} of `w` (integer zeros required)."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    if w.in_features % 8:
        raise ValueError(f"GPTQ packs 8 rows per int32: in_features {w.in_features} is not a multiple of 8")
    z = torch.full_like(w.scales, 8.0) if w.zeros is None else w.zeros
    if not torch.equal(z, z.round()):
        raise ValueError("GPTQ stores integer zero points; this weight has fractional ones (GGUF Q4_1?)")
    zi = z.to(torch.int64)
    if checkpoint_format == "gptq":
        zi = zi - 1  # v1 stores zero - 1
    if zi.numel() and (zi.min() < 0 or zi.max() > 15):
        raise ValueError(f"zero points {int(z.min())}..{int(z.max())} do not fit the {checkpoint_format} "
                         f"format ({'1..16' if checkpoint_format == 'gptq' else '0..15'})")
    return {"qweight": layout.pack_rows(w.q), "qzeros": layout.pack_cols(zi.to(torch.uint8)),
            "scales": w.scales.to(torch.float16), "g_idx": w.groups().to(torch.int32)}


def read_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
             bits: int = 4, name: str = "awq") -> Int4Weight:
    """An AWQ (gemm) linear."""
    if bits != BITS:
        raise ModelFormatError(f"{name}: {bits}-bit AWQ is not supported (only 4-bit)")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ModelFormatError(f"{name}.qweight: expected int32 [K, N/8], got {qweight.dtype} {list(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _group_size(group_size, k, name)
    groups = -(-k // g)
    _require(qzeros, name + ".qzeros", torch.int32, (groups, n // 8))
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ModelFormatError(f"{name}.scales: expected a float tensor, got {scales.dtype}")
    _require(scales, name + ".scales", scales.dtype, (groups, n))
    q = layout.unpack_cols(qweight, n, order=layout.NIBBLE_ORDER)
    z = layout.unpack_cols(qzeros, n, order=layout.NIBBLE_ORDER).float()
    return Int4Weight(q, _float_scales(scales, name), None if bool((z == 8).all()) else z, g)


def read_gguf_q4(data: np.ndarray, type_name: str, k: int, n: int, name: str = "gguf") -> Int4Weight:
    """A GGUF Q4_0/Q4_1/Q4_K tensor. data: uint8 [N, row bytes] (GGUFTensor.data)."""
    if type_name not in GGUF_4BIT_TYPES:
        raise ModelFormatError(f"{name}: GGUF type {type_name} is not a 4-bit type edgespec imports directly "
                               f"(expected one of {', '.join(GGUF_4BIT_TYPES)})")
    block, nbytes = (GGUF_Q4K_SUPER, GGUF_Q4K_BYTES) if type_name == "Q4_K" else (GGUF_BLOCK, GGUF_Q4_BLOCK_BYTES[type_name])
    if k % block:
        raise ModelFormatError(f"{name}: GGUF {type_name} rows must be a multiple of {block} long, got K={k}")
    blocks = np.ascontiguousarray(data, dtype=np.uint8)
    if blocks.size != n * (k // block) * nbytes:
        raise ModelFormatError(f"{name}: {blocks.size} bytes of {type_name} data, expected "
                               f"{n * (k // block) * nbytes} for a [{n}, {k}] weight")
    blocks = blocks.reshape(n, k // block, nbytes)
    if type_name == "Q4_K":
        q, scale, offset = _q4k_fields(blocks)
    else:
        qs = blocks[..., nbytes - 16:]                                        # [N, G, 16]
        q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)                      # [N, G, 32]
        scale = _fp16(blocks[..., 0:2])                                        # [N, G]
        offset = None if type_name == "Q4_0" else -_fp16(blocks[..., 2:4])
    q_t = torch.from_numpy(np.ascontiguousarray(q.reshape(n, k).T))
    scales = torch.from_numpy(np.ascontiguousarray(scale.T))                  # [G, N]
    if not torch.isfinite(scales).all():
        raise ModelFormatError(f"{name}: non-finite block scales in {type_name} data")
    if offset is None:
        return Int4Weight(q_t, scales, None, GGUF_BLOCK)
    # w = s * q - o  ==  (q - o / s) * s.
    o = torch.from_numpy(np.ascontiguousarray(offset.T))
    if not torch.isfinite(o).all():
        raise ModelFormatError(f"{name}: non-finite block minimums in {type_name} data")
    flat = scales == 0
    zeros = torch.where(flat, torch.zeros_like(o), o / torch.where(flat, torch.ones_like(scales), scales))
    if flat.any():
        # A zero scale makes a constant block (every weight = -o), which (q - z) * s cannot express
        # with s = 0; q = 0, z = 8, s = o / 8 gives the same values exactly.
        rows = flat.repeat_interleave(GGUF_BLOCK, dim=0)
        q_t = torch.where(rows, torch.zeros_like(q_t), q_t)
        zeros = torch.where(flat, torch.full_like(zeros, 8.0), zeros)
        scales = torch.where(flat, o / 8.0, scales)
    return Int4Weight(q_t, scales, zeros, GGUF_BLOCK)


def _fp16(two_bytes: np.ndarray) -> np.ndarray:
    """fp32 values of little-endian fp16 fields: uint8 [..., 2] -> [...]."""
    return two_bytes.copy().view(np.float16)[..., 0].astype(np.float32)


def _q4k_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks uint8 [N, S, 144] -> (q [N, 8S, 32], scale [N, 8S], offset [N, 8S])
    per 32-element sub-block: w = scale * q - offset (layout in the module docstring), decoded
    by the GGUF loader's own Q4_K reader (scale and offset exact: 11 x 6 bits)."""
    n, s, _ = blocks.shape
    q, scale, offset = q4_k_fields(torch.from_numpy(blocks.reshape(n * s, GGUF_Q4K_BYTES)))
    return q.reshape(n, s * 8, 32).numpy(), scale.reshape(n, s * 8).numpy(), offset.reshape(n, s * 8).numpy()


def write_gguf_q4(w: Int4Weight, type_name: str) -> np.ndarray:
    """GGUF Q4_0/Q4_1 block bytes uint8 [N, K/32 * block bytes] of a group-32 weight whose scales
    (and Q4_1 mins -zero * scale) are exact in fp16 (used by tests and tools)."""
    if type_name not in GGUF_Q4_BLOCK_BYTES:
        raise ValueError(f"type_name must be Q4_0 or Q4_1, got {type_name!r}")
    if w.group_size != GGUF_BLOCK or w.g_idx is not None or w.in_features % GGUF_BLOCK:
        raise ValueError("GGUF Q4 blocks need group size 32 over contiguous rows and K % 32 == 0")
    if type_name == "Q4_0" and w.zeros is not None:
        raise ValueError("Q4_0 is symmetric (zero point 8); this weight has zero points")
    k, n = w.q.shape
    q = w.q.t().contiguous().numpy().reshape(n, k // GGUF_BLOCK, GGUF_BLOCK)
    qs = (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)
    d = w.scales.t().contiguous().numpy().astype(np.float16).reshape(n, -1, 1).view(np.uint8)
    parts = [d]
    if type_name == "Q4_1":
        z = torch.full_like(w.scales, 8.0) if w.zeros is None else w.zeros
        m = (-z * w.scales).t().contiguous().numpy().astype(np.float16).reshape(n, -1, 1).view(np.uint8)
        parts.append(m)
    parts.append(qs)
    return np.concatenate(parts, axis=-1).reshape(n, -1)
