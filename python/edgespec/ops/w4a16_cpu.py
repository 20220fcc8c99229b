"""W4A16 on the CPU: torch's own int4 GEMM (`aten._weight_int4pack_mm_for_cpu`) instead of a
dequantised copy of the weight.

A decode step on a CPU streams every weight from memory once, so its time is the weight bytes
over the memory bandwidth: 4-bit weights with group-32 scales and offsets read 0.625 bytes per
weight against bf16's 2 (one projection of one row runs 2.6x-3.6x faster than F.linear bf16,
SmolLM2-135M Q4_1 decodes about 1.9x faster than its dequantised bf16 copy on one core:
bench/results/cpu_w4a16-cpu.json). The loader stores such weights in torch's packing alone
(`prepare`); elsewhere the packing is made on a weight's first call and kept beside the weight's
own. Several rows cost more: torch's kernel spends per row what a dense matmul spends per weight
byte, so from about 16 rows on the dense matmul of a dequantised copy is faster. A call of more
than INVARIANT_ROWS rows (ops.linear: a prefill chunk, never a decode or verify step) therefore
dequantises the weight (W4A16Weight.dequantize, in cache-sized tiles) and runs one dense GEMM: at
512 rows 0.35x-0.53x F.linear's speed on SmolLM2 to Llama-8B shapes, about 4x faster than the
int4 kernel's time at 64 rows scaled to 512 (bench/results/cpu_w4a16-cpu.json; one core with AMX,
where dense GEMMs are fastest). The prompt's later chunks reuse the copy (ops.w4a16.prefill_dense,
within a prefill's keep_dequantized block and DEQUANT_BUDGET); no dense copy outlives the prefill.

torch's kernel computes w = (q - 8) * s + m with one scale s and one offset m per group of K
rows and output column, in the activation dtype. edgespec's weights are w = (q - z) * s
(ops/w4a16.py), so m = (8 - z) * s, formed in fp32 and rounded once to the activation dtype:
in fp32 the result is the dequantised matmul to rounding, in bf16/fp16 it differs from it by
about one rounding of the offset, as a dense bf16 weight differs from its fp32 value.

What the kernel takes (`rejection` says which condition failed): N a multiple of 16; groups of
32, 64, 128 or 256 rows that tile K. A coarser group whose size is a multiple of 32 (per-channel
scales, group 1024, a group 128 with K = 576) runs as finer groups with repeated scales, which
is the same weight. Act-order weights gather the input columns first.

Up to INVARIANT_ROWS rows, a row's result does not depend on how many rows come with it
(tests/test_w4a16_cpu.py checks every count to 70 and 128, bf16, 1 and 2 threads), so greedy
speculative decoding of a 4-bit model on the CPU stays token for token the same as plain decoding.

EDGESPEC_CPU_INT4=0 turns the path off (the dequantised torch path runs instead).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .linear import INVARIANT_ROWS
from .linear import linear as dense_linear

if TYPE_CHECKING:
    from .w4a16 import W4A16Weight

_GROUPS = (256, 128, 64, 32)
# torch 2.13's kernel is vectorised for bf16 activations only: with fp16 or fp32 it runs 5x-50x
# slower than the dequantised matmul (measured on SmolLM2 to Llama-8B shapes), so those take the
# dequantised path.
DTYPES = (torch.bfloat16,)


def _turned_off() -> bool:
    value = os.environ.get("EDGESPEC_CPU_INT4", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_CPU_INT4 must be 0 or 1, got {value!r}")
    return value == "0"


@lru_cache(maxsize=1)
def _torch_has_it() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") \
        and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def available() -> bool:
    """Whether this torch has the CPU int4 kernel and EDGESPEC_CPU_INT4 does not turn it off."""
    return not _turned_off() and _torch_has_it()


def runs_dtype(dtype: torch.dtype) -> bool:
    """Whether 4-bit weights on the CPU run on this kernel with activations of `dtype` (the shapes
    aside): what makes keeping a model's weights 4-bit there pay."""
    return dtype in DTYPES and available()


def kernel_group(w: "W4A16Weight") -> int | None:
    """The group size the kernel runs `w` with (its own or a finer one), or None."""
    for g in _GROUPS:
        if w.group_size % g == 0 and w.in_features % g == 0:
            return g
    return None


def rejection(x: torch.Tensor, w: "W4A16Weight") -> str | None:
    """Why the CPU int4 kernel cannot take x [..., K] times `w`, or None when it can."""
    if _turned_off():
        return "EDGESPEC_CPU_INT4=0"
    if not _torch_has_it():
        return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
    if x.device.type != "cpu" or w.device.type != "cpu":
        return f"x is on {x.device} and the weight on {w.device}, not both on the CPU"
    if x.dtype not in DTYPES:
        return f"x has dtype {x.dtype}: the kernel is fast for torch.bfloat16 only"
    if w.out_features % 16:
        return f"N = {w.out_features} is not a multiple of 16"
    if kernel_group(w) is None:
        return (f"group size {w.group_size} with K = {w.in_features}: needs groups of 32, 64, 128 or 256 rows "
                f"(or a multiple of 32 made of them) that tile K")
    return None


def prepare(w: "W4A16Weight", dtype: torch.dtype) -> "W4A16Weight":
    """`w` ready for the kernel with activations of `dtype` (the loader calls it, so a model's first
    request does not pay for packing every layer: 0.4 s for the demo model on one core, growing
    with the weights): where N % 64 == 0, the same weight stored in torch's packing alone (the
    "cpu" layout, edgespec.quant.layout: 0.75 bytes per weight with group-32 scales, zeros and
    the kernel's scales and offsets, instead of 1.25 with the plain packing kept beside it);
    otherwise `w` with its packing made. `w` itself where the kernel does not take it."""
    from ..quant import layout  # noqa: PLC0415 - quant builds on ops; imported on use
    from .w4a16 import W4A16Weight  # noqa: PLC0415 - w4a16 imports this module

    if rejection(torch.empty(0, w.in_features, dtype=dtype), w) is not None:
        return w
    packed = None if w.layout == "cpu" else layout.pack_cpu(w.unpacked())
    if packed is None:
        _packed(w, dtype)
        return w
    moved = W4A16Weight(qweight=packed, scales=w.scales, zeros=w.zeros, group_size=w.group_size,
                        in_features=w.in_features, out_features=w.out_features, layout="cpu", perm=w.perm)
    _packed(moved, dtype)
    return moved


def _packed(w: "W4A16Weight", dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed weight, scales and offsets [K/g, N, 2] in `dtype`, g), made on first use and kept
    on `w` (one dtype at a time). In the cpu layout the packed weight is w's own; otherwise a
    second packing, half a byte per weight."""
    cached = w._cpu_int4
    if cached is not None and cached[1].dtype == dtype:
        return cached
    g = kernel_group(w)
    assert g is not None, "rejection() is checked first"
    if w.layout == "cpu":  # torch's packing already
        packed = w.qweight
    else:
        q = w.unpacked().t().contiguous().to(torch.int32)                   # [N, K]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # the CPU op ignores inner tiles
    group_of = torch.arange(0, w.in_features, g) // w.group_size          # w's group of each finer group
    scales = w.scales.float()[group_of]                                    # [K/g, N]
    zeros = 8.0 if w.zeros is None else w.zeros.float()[group_of]
    offsets = (8.0 - zeros) * scales
    cached = (packed, torch.stack([scales, offsets], dim=-1).to(dtype).contiguous(), g)
    w._cpu_int4 = cached
    return cached


def linear(x: torch.Tensor, w: "W4A16Weight", bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias on the CPU int4 kernel, or for more than INVARIANT_ROWS rows (prefill
    chunks) as the dense GEMM of the weight dequantised for this call; `rejection(x, w)` must be
    None."""
    rows = x.reshape(-1, w.in_features)
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], w.out_features)
    if rows.shape[0] > INVARIANT_ROWS:
        from .w4a16 import prefill_dense  # noqa: PLC0415 - w4a16 imports this module

        return dense_linear(x, prefill_dense(w, x.dtype), None if bias is None else bias.to(x.dtype))
    packed, scales_offsets, g = _packed(w, x.dtype)
    if w.perm is not None:  # stored row j multiplies input feature perm[j]
        rows = rows.index_select(1, w.perm)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, g, scales_offsets)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.out_features)
