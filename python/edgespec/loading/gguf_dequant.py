"""GGUF block formats -> float32 with torch, on whatever device the raw bytes are on.

llama.cpp stores a tensor as rows of fixed-size blocks: `block_size` elements packed into
`type_size` bytes (gguf.constants.GGML_QUANT_SIZES). Each format below decodes a uint8 tensor of
those blocks with a few element-wise torch ops over all blocks at once, so one code path serves
the CPU (vectorised, several times faster than gguf's numpy code) and a GPU, where a CUDA load
copies the raw bytes (4-8x fewer than the float32 weights) across PCIe and decodes them there.

The arithmetic follows gguf.quants, the reference (itself checked against llama.cpp's C code),
operation for operation: the same float32 products and sums in the same order, never fused into an
FMA, so the results are bit-identical to it (tests/test_gguf_dequant.py). Types without an entry in
_FORMATS (the IQ*, TQ* and FP4 formats) are decoded by gguf's numpy code on the host instead.

Layouts, fields in byte order (fp16 fields little-endian, QK_K = 256 elements per super-block):

  F32, F16, BF16   one element per "block"
  Q8_0  (32, 34 B)  d, int8 q[32]                            w = d * q
  Q4_0  (32, 18 B)  d, qs[16]                                w = d * (q - 8)
  Q4_1  (32, 20 B)  d, m, qs[16]                             w = d * q + m
  Q5_0  (32, 22 B)  d, qh[4], qs[16]                         w = d * (q - 16)
  Q5_1  (32, 24 B)  d, m, qh[4], qs[16]                      w = d * q + m
      4-bit q: element j < 16 is the low nibble of qs[j], element j + 16 its high nibble; 5-bit
      q adds bit j of the little-endian 32-bit qh as bit 4.
  Q2_K  (256, 84 B)   scales[16], qs[64], d, dmin            16 groups of 16 elements
      group g: w = d * (scales[g] & 15) * q - dmin * (scales[g] >> 4); q is 2 bits: elements
      128h + 32s + i sit in bits 2s..2s+1 of qs[32h + i].
  Q3_K  (256, 110 B)  hmask[32], qs[64], scales[12], d       16 groups of 16 elements
      q = (2 low bits, placed as in Q2_K) - (4 unless bit e // 32 of hmask[e % 32] is set);
      6-bit signed scales (code - 32): low nibbles from bytes 0..7 (groups 0..7 the low
      nibbles, 8..15 the high ones), top 2 bits from bytes 8..11 (group g: bits 2 (g // 4)
      of byte 8 + g % 4). w = d * scale * q.
  Q4_K  (256, 144 B)  d, dmin, scales[12], qs[128]            8 groups of 32 elements
  Q5_K  (256, 176 B)  d, dmin, scales[12], qh[32], qs[128]
      6-bit scale and min codes packed in 12 bytes (_scale_min_k4); 4-bit q: groups 2c, 2c + 1
      in the low and high nibbles of qs[32c..32c + 31]; Q5_K adds bit g of qh[i] as bit 4 of
      element i of group g. w = d * sc * q - dmin * mc.
  Q6_K  (256, 210 B)  ql[128], qh[64], int8 scales[16], d     16 groups of 16 elements
      6-bit q - 32: low 4 bits as Q4_K's nibbles over 64-byte halves of ql, top 2 bits as Q2_K's
      pairs over 32-byte halves of qh. w = d * scale * (q - 32).
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from ..errors import ModelFormatError

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

# Elements decoded per step. Small enough on the CPU for a step's temporaries (a few bytes per
# element) to stay in cache: the same decode over whole 16M-element tensors ran 2-3x slower,
# touching fresh memory for every temporary. On a GPU the steps only bound the temporaries.
_STEP_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of each block, as float32 [n, 1] (exact)."""
    return blocks[:, at:at + 2].contiguous().view(torch.float16).float()


def _fields(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The 8 // bits bit fields of every byte of x (uint8), lowest bits first, stacked along a new
    axis `dim`. Scalar shifts: a broadcast tensor of shift counts is not vectorised on the CPU."""
    mask = (1 << bits) - 1
    return torch.stack([(x >> s) & mask for s in range(0, 8, bits)], dim=dim)


def _scale_min_k4(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's eight 6-bit scale codes and eight 6-bit min codes from 12 bytes: uint8 [n, 12]
    -> ([n, 8], [n, 8]). Bytes 0..3 hold scales 0..3 in their low 6 bits, bytes 4..7 mins 0..3;
    groups 4..7 take their low 4 bits from a nibble of bytes 8..11 (scale low, min high) and their
    top 2 bits from the otherwise unused top bits of bytes 0..3 (scales) and 4..7 (mins)."""
    sc_lo, mn_lo, mixed = codes[:, 0:4], codes[:, 4:8], codes[:, 8:12]
    sc = torch.cat([sc_lo & 63, (mixed & 15) | ((sc_lo >> 2) & 48)], dim=1)
    mn = torch.cat([mn_lo & 63, (mixed >> 4) | ((mn_lo >> 2) & 48)], dim=1)
    return sc, mn


# Each decoder: blocks uint8 [n, type_size] -> writes out float32 [n, block_size].

def _f32(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float32))


def _f16_elements(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.float16))


def _bf16(b: torch.Tensor, out: torch.Tensor) -> None:
    out.copy_(b.view(torch.bfloat16))  # bf16 -> fp32 is a 16-bit shift, NaNs included


def _q8_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(b[:, 2:].view(torch.int8).float(), _f16(b, 0), out=out)


def _q4_0(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _fields(b[:, 2:], 4, 1).reshape(-1, 32)
    torch.mul(_f16(b, 0), q.float().sub_(8), out=out)


def _q4_1(b: torch.Tensor, out: torch.Tensor) -> None:
    q = _fields(b[:, 4:], 4, 1).reshape(-1, 32)
    torch.mul(_f16(b, 0), q.float(), out=out).add_(_f16(b, 2))


def _q5(b: torch.Tensor, qh_at: int) -> torch.Tensor:
    """5-bit q [n, 32] uint8 of Q5_0/Q5_1: nibbles from qs (after qh), bit 4 from the 32-bit qh."""
    low = _fields(b[:, qh_at + 4:], 4, 1).reshape(-1, 32)
    high = _fields(b[:, qh_at:qh_at + 4], 1, 2).reshape(-1, 32)  # bit i of byte j -> element 8j + i
    return low | (high << 4)


def _q5_0(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_f16(b, 0), _q5(b, 2).float().sub_(16), out=out)


def _q5_1(b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mul(_f16(b, 0), _q5(b, 4).float(), out=out).add_(_f16(b, 2))


def _q2_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scales = b[:, :16]
    dl = (_f16(b, 80) * (scales & 15).float()).reshape(n, 16, 1)
    ml = (_f16(b, 82) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _fields(b[:, 16:80].reshape(n, 2, 32), 2, 2).reshape(n, 16, 16)
    torch.mul(dl, q.float(), out=out.view(n, 16, 16)).sub_(ml)


def _q3_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    codes = b[:, 96:108]
    low = _fields(codes[:, :8], 4, 1).reshape(n, 16)
    high = _fields(codes[:, 8:], 2, 1).reshape(n, 16)
    scale = (low | (high << 4)).float().sub_(32)
    dl = (_f16(b, 108) * scale).reshape(n, 16, 1)
    ql = _fields(b[:, 32:96].reshape(n, 2, 32), 2, 2).reshape(n, 16, 16)
    # A set hmask bit means "no offset": q = ql - 4 + 4 * bit = (ql | bit << 2) - 4.
    hbit = _fields(b[:, :32], 1, 1).reshape(n, 16, 16)
    torch.mul(dl, (ql | (hbit << 2)).float().sub_(4), out=out.view(n, 16, 16))


def _k4_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's per-group scale d * sc and offset dmin * mc, float32 [n, 8, 1] each."""
    n = b.shape[0]
    sc, mc = _scale_min_k4(b[:, 4:16])
    return (_f16(b, 0) * sc.float()).reshape(n, 8, 1), (_f16(b, 2) * mc.float()).reshape(n, 8, 1)


def q4_k_fields(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks uint8 [n, 144] -> (q uint8 [n, 8, 32], scale, offset float32 [n, 8, 1]):
    w = scale * q - offset in each 32-element group. Also what edgespec.quant.formats imports
    Q4_K weights as 4-bit from."""
    n = b.shape[0]
    scale, offset = _k4_scales(b)
    return _fields(b[:, 16:144].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32), scale, offset


def _q4_k(b: torch.Tensor, out: torch.Tensor) -> None:
    q, scale, offset = q4_k_fields(b)
    torch.mul(scale, q.float(), out=out.view(*q.shape)).sub_(offset)


def _q5_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scale, offset = _k4_scales(b)
    low = _fields(b[:, 48:176].reshape(n, 4, 32), 4, 2).reshape(n, 8, 32)
    high = _fields(b[:, 16:48], 1, 1)  # [n, 8, 32]: bit g of qh[i] belongs to group g
    torch.mul(scale, (low | (high << 4)).float(), out=out.view(n, 8, 32)).sub_(offset)


def _q6_k(b: torch.Tensor, out: torch.Tensor) -> None:
    n = b.shape[0]
    scale = (_f16(b, 208) * b[:, 192:208].view(torch.int8).float()).reshape(n, 16, 1)
    low = _fields(b[:, :128].reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)
    high = _fields(b[:, 128:192].reshape(n, 2, 32), 2, 2).reshape(n, 8, 32)
    q = (low | (high << 4)).float().sub_(32).reshape(n, 16, 16)
    torch.mul(scale, q, out=out.view(n, 16, 16))


# GGUF type name -> decoder. Sizes come from gguf.constants.GGML_QUANT_SIZES.
_FORMATS: dict[str, Callable[[torch.Tensor, torch.Tensor], None]] = {
    "F32": _f32, "F16": _f16_elements, "BF16": _bf16,
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def supported(qtype: GGMLQuantizationType) -> bool:
    """Whether `qtype` is decoded by torch here, not by gguf's numpy code."""
    return qtype.name in _FORMATS


def raw_bytes(data: np.ndarray) -> torch.Tensor:
    """The bytes of a GGUF tensor's data (GGUFTensor.data: a read-only view of the file) as a flat
    uint8 CPU tensor sharing its memory: nothing here writes to it."""
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(flat)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType | int, shape: Sequence[int],
               name: str = "GGUF tensor") -> torch.Tensor:
    """Decode a GGUF tensor's bytes to float32 on raw's device.

    raw:   uint8 [nbytes] (any shape, its bytes in order), on any device
    qtype: the GGUF type (gguf.GGMLQuantizationType or its number)
    shape: the tensor's shape in torch order (GGUF's dimensions reversed: the last one is a row,
           a whole number of blocks)
    name:  the file and tensor, for error messages
    Returns float32 `shape` on raw.device, a new tensor. ModelFormatError when the byte count
    does not fit the shape (a truncated file) or when nothing can decode the type.
    """
    import gguf  # noqa: PLC0415 - only needed for GGUF input

    qtype = gguf.GGMLQuantizationType(qtype)
    shape = tuple(int(s) for s in shape)
    if raw.dtype != torch.uint8:
        raise TypeError(f"{name}: raw GGUF data must be a uint8 tensor, got {raw.dtype}")
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    row = shape[-1] if shape else 1
    if row % block:
        raise ModelFormatError(f"{name}: rows of {row} elements are not whole {qtype.name} blocks "
                               f"of {block} elements")
    nblocks = math.prod(shape) // block
    if raw.numel() != nblocks * nbytes:
        raise ModelFormatError(f"{name}: {raw.numel()} bytes of {qtype.name} data, expected {nblocks * nbytes} "
                               f"for shape {list(shape)} ({nblocks} blocks of {nbytes} bytes); a truncated file?")
    decode = _FORMATS.get(qtype.name)
    if decode is None:
        return _numpy_dequantize(raw, qtype, shape, name)
    blocks = raw.reshape(nblocks, nbytes)
    if blocks.storage_offset() % 4:  # F32/F16/BF16 reinterpret the bytes in place: keep them aligned
        blocks = blocks.clone()
    out = _empty(nblocks, block, raw.device)
    step = max(1, _STEP_ELEMENTS.get(raw.device.type, _STEP_ELEMENTS["cuda"]) // block)
    for start in range(0, nblocks, step):
        decode(blocks[start:start + step], out[start:start + step])
    return out.reshape(shape)


def _empty(nblocks: int, block: int, device: torch.device) -> torch.Tensor:
    """An uninitialised float32 [nblocks, block] output on `device`."""
    if device.type == "cpu":
        # numpy asks the kernel for transparent huge pages for large arrays (madvise), torch's CPU
        # allocator does not: writing a fresh 64 MiB output took 17 ms in 4 KiB pages, 4 ms in
        # huge pages (THP in madvise mode, the common default), as long as the decoding itself.
        return torch.from_numpy(np.empty((nblocks, block), dtype=np.float32))
    return torch.empty(nblocks, block, dtype=torch.float32, device=device)


def _numpy_dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """gguf's numpy decoder on the host, for the types _FORMATS leaves out."""
    import gguf  # noqa: PLC0415

    rows = math.prod(shape[:-1]) if shape else 1
    data = raw.cpu().numpy().reshape(rows, -1) if rows else raw.cpu().numpy().reshape(0, 0)
    try:
        values = gguf.quants.dequantize(data, qtype)
    except NotImplementedError:
        raise ModelFormatError(f"{name}: GGUF type {qtype.name} cannot be dequantised "
                               f"(neither edgespec nor the gguf package decodes it)") from None
    return torch.from_numpy(np.array(values, dtype=np.float32)).reshape(shape).to(raw.device)
