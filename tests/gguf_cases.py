"""Random GGUF blocks and the `gguf` package's numpy decoder, shared by tests/test_gguf_dequant.py
and bench/python/bench_gguf_load.py."""
from __future__ import annotations

import math

import gguf
import numpy as np
import torch

QT = gguf.GGMLQuantizationType
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
# Byte offsets of each block's fp16 scale fields (gguf/quants.py's layouts): random bytes there would
# make NaN/inf scales, which would pass a bitwise comparison without checking any arithmetic.
FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q2_K": (80, 82),
               "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_raw(name: str, nblocks: int, seed: int) -> np.ndarray:
    """uint8 [nblocks, type_size]: random bytes, each fp16 scale field finite and non-zero (F32 and
    BF16 elements are random bits, NaNs and infinities included; F16 elements are finite)."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[QT[name]][1]
    raw = rng.integers(0, 256, (nblocks, size), dtype=np.uint8)
    fields = FP16_FIELDS.get(name, ())
    scales = rng.uniform(0.05, 4.0, (nblocks, len(fields))) * rng.choice([-1, 1], (nblocks, 1))
    for i, at in enumerate(fields):
        raw[:, at:at + 2] = scales[:, i:i + 1].astype(np.float16).view(np.uint8)
    if name == "F16":  # random bits, finite (subnormals included)
        bits = raw.view(np.uint16)
        bits[(bits & 0x7C00) == 0x7C00] ^= 0x4000  # an all-ones exponent (inf/NaN) loses its top bit
    return raw


def reference(raw: np.ndarray, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf.quants.dequantize of the blocks as float32 `shape` (what GGUFSource did before torch)."""
    rows = math.prod(shape[:-1])
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw.reshape(rows, -1), QT[name]), dtype=np.float32)
                            ).reshape(shape)
