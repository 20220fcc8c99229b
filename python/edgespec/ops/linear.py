"""Linear layers: one call interface for dense and quantized weights.

Every projection in a model is a `Linear`-like object with `out_features`, `in_features` and
`__call__(x)`. Dense weights live here; quantized variants (W4A16) implement the same
interface in `edgespec.quant`, so the decoder never knows which one it holds.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend


# Rows per CPU GEMM call within which a row's result does not depend on the row count (measured
# with torch 2.13's CPU BLAS on SmolLM2 to Llama-8B shapes, 1 and 2 threads: bf16 and fp16 agree
# for 2..32 rows and change kernels past 32). A single row runs as two: the one-row (GEMV) kernel
# rounds differently. fp32 is left alone: its GEMMs change their reduction with the row count, the
# shape and the thread count alike, so in fp32 decoded and verified tokens agree up to rounding.
_CPU_ROW_BLOCK = {torch.bfloat16: 32, torch.float16: 32}
# The most rows a call keeps row-invariant: a draft tree of up to 127 tokens and its root, the
# bound the GPU's dense kernel keeps too (ops/_kernels.py). Calls with more rows are prefill
# chunks, which plain and speculative decoding run alike: they take the fastest GEMM, one call on
# the CPU (32-row blocks made a 512-row SmolLM2 projection 3x slower and the demo's 981-token
# prefill 1.8x slower, bf16, one thread on a Xeon with AMX; ad hoc).
INVARIANT_ROWS = 128


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias. x: [..., K]; weight: [N, K]; bias: [N] or None. Returns [..., N].

    Row-invariant: a row's result does not depend on how many rows come with it, so a token
    decoded alone and the same token inside a verified draft tree get bitwise the same
    projections (with ops.attention's row-invariant path, greedy speculative output equals plain
    output bit for bit in bf16 and fp16), for calls of up to INVARIANT_ROWS rows. On the CPU one
    row runs as two (the same row twice, no copy) and more rows than _CPU_ROW_BLOCK run in blocks
    of at most that many; neither costs anything measurable for the few rows of a decode or verify
    step (the weight read, not the row count, sets their time). On the GPU up to 128 rows (decode
    steps, trees up to 128 tokens) run on csrc/kernels/dense_gemm.h, whose split-K does not depend
    on the row count, 64 rows per launch. More rows (prefill chunks), and on the GPU
    EDGESPEC_ROW_INVARIANT=0, run as one torch GEMM (cuBLAS on the GPU).
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: x has {x.shape[-1]} input features but weight is {tuple(weight.shape)}")
    if backend.use_kernel(x, weight, bias) and backend.row_invariant_kernels():
        from . import _kernels  # noqa: PLC0415 - only with the compiled extension

        # Few rows (decode, verification) on the GPU: the row-invariant dense kernel, not cuBLAS.
        if _kernels.dense_rejection(x, weight, bias) is None:
            return _kernels.dense_linear(x, weight, bias)
    block = _CPU_ROW_BLOCK.get(x.dtype) if x.device.type == "cpu" else None
    rows = None if block is None else x.reshape(-1, x.shape[-1])
    if rows is None or rows.shape[0] > INVARIANT_ROWS:
        return F.linear(x, weight, bias)
    if rows.shape[0] == 1:
        return F.linear(rows.expand(2, -1), weight, bias)[:1].reshape(*x.shape[:-1], weight.shape[0])
    if rows.shape[0] <= block:
        return F.linear(x, weight, bias)
    # Blocks of `block` rows, the last one rounded up to at least two rows.
    starts = list(range(0, rows.shape[0], block))
    if rows.shape[0] - starts[-1] == 1:
        starts[-1] -= 1
    parts = [F.linear(rows[a:b], weight, bias) for a, b in zip(starts, starts[1:] + [rows.shape[0]])]
    return torch.cat(parts).reshape(*x.shape[:-1], weight.shape[0])


class DenseLinear:
    """A dense projection. weight: [N, K]; bias: [N] or None (same dtype/device as weight)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"DenseLinear: weight must be 2-D [N, K], got {tuple(weight.shape)}")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"DenseLinear: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "DenseLinear":
        bias = None if self.bias is None else self.bias.to(device=device, dtype=dtype)
        return DenseLinear(self.weight.to(device=device, dtype=dtype), bias)

    @staticmethod
    def fuse(parts: list["DenseLinear"]) -> "DenseLinear":
        """Concatenate projections that read the same input (q|k|v, gate|up) into one."""
        weight = torch.cat([p.weight for p in parts], dim=0)
        biases = [p.bias for p in parts]
        if all(b is None for b in biases):
            bias = None
        else:
            bias = torch.cat([b if b is not None else torch.zeros(p.out_features, dtype=weight.dtype,
                                                                   device=weight.device)
                              for p, b in zip(parts, biases)])
        return DenseLinear(weight, bias)


class ConcatLinear:
    """Projections that read the same input but cannot be fused into one weight (mixed types):
    called one by one, outputs concatenated along the last dim."""

    def __init__(self, parts: list) -> None:
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("ConcatLinear: parts must share in_features")
        self.parts = parts
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)


def fuse_linears(parts: list):
    """One projection computing [p(x) for p in parts] concatenated (q|k|v, gate|up).

    Same-type parts fuse through their class's `fuse` (one GEMM instead of several); mixed types
    fall back to ConcatLinear.
    """
    kind = type(parts[0])
    if all(type(p) is kind for p in parts) and hasattr(kind, "fuse"):
        return kind.fuse(parts)
    return ConcatLinear(parts)
