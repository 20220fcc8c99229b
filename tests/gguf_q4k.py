"""GGUF Q4_K blocks for tests, written from llama.cpp's block layout (the `gguf` package reads
them but cannot write them): a packer of raw fields, and a simple round-to-nearest quantizer.

The reader under test is `edgespec.quant.formats.read_gguf_q4`; the oracle it is checked against
is `gguf.quants.dequantize`, so this packer is only trusted to produce *some* valid blocks.
"""
from __future__ import annotations

import numpy as np

SUPER = 256  # elements per super-block
SUB = 32     # elements per sub-block


def pack_q4k(d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mc: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K bytes uint8 [N, S * 144] of rows of S super-blocks.

    d, dmin: [N, S] (stored as fp16); sc, mc: [N, S, 8] 6-bit codes; q: [N, S * 256] in 0..15.
    """
    n, s = d.shape
    sc, mc = sc.astype(np.uint8), mc.astype(np.uint8)
    codes = np.empty((n, s, 12), dtype=np.uint8)
    codes[..., 0:4] = (sc[..., :4] & 0x3F) | ((sc[..., 4:] >> 4) << 6)
    codes[..., 4:8] = (mc[..., :4] & 0x3F) | ((mc[..., 4:] >> 4) << 6)
    codes[..., 8:12] = (sc[..., 4:] & 0x0F) | ((mc[..., 4:] & 0x0F) << 4)
    nib = q.astype(np.uint8).reshape(n, s, 4, 2, SUB)       # [chunk of 64][low/high half][32]
    qs = (nib[:, :, :, 0] | (nib[:, :, :, 1] << 4)).reshape(n, s, 128)
    half = [np.ascontiguousarray(a.astype(np.float16)).view(np.uint8).reshape(n, s, 2) for a in (d, dmin)]
    return np.concatenate([*half, codes, qs], axis=-1).reshape(n, s * 144)


def quantize_q4k(x: np.ndarray) -> np.ndarray:
    """Q4_K bytes of a float [N, K] matrix (K % 256 == 0): per sub-block min/max, then 6-bit codes
    of the sub-block scales and minimums relative to the super-block's largest."""
    n, k = x.shape
    s = k // SUPER
    sub = x.reshape(n, s, 8, SUB).astype(np.float64)
    lo = np.minimum(sub.min(-1), 0.0)                        # offsets are subtracted: w = s q - o
    scale = (sub.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float64)
    dmin = (np.maximum(-lo.min(-1), 0.0) / 63).astype(np.float16).astype(np.float64)
    sc = np.clip(np.rint(scale / np.where(d > 0, d, 1)[..., None]), 0, 63)
    mc = np.clip(np.rint(-lo / np.where(dmin > 0, dmin, 1)[..., None]), 0, 63)
    step = d[..., None] * sc
    q = np.clip(np.rint((sub + (dmin[..., None] * mc)[..., None]) / np.where(step > 0, step, 1)[..., None]), 0, 15)
    return pack_q4k(d, dmin, sc, mc, q.reshape(n, k))
