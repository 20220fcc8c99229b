"""W4A16 quantization: 4-bit weights with per-group scales and optional zero points.

* QuantLinear: the quantized projection (same interface as ops.DenseLinear), running through
  ops.w4a16_linear (CUDA kernel or torch dequantise + matmul).
* formats: GPTQ (v1/v2, sym/asym, act-order), AWQ (gemm), GGUF Q4_0/Q4_1/Q4_K <-> Int4Weight (Q4_K read only).
* layout: the plain and the fragment-ordered (kernel) bit layouts, packing and unpacking.
* checkpoint: GPTQ/AWQ directories and GGUF Q4 files as weight sources for the loader.
* quantizer / export: RTN and GPTQ, and the GPTQ-compatible checkpoint writer (`edgespec quantize`).
"""
from __future__ import annotations

from typing import Any

from .formats import Int4Weight, read_awq, read_gguf_q4, read_gptq, write_gguf_q4, write_gptq
from .linear import QuantLinear
from .quantizer import QuantSettings, quantize_decoder, quantized_copy, quantize_gptq, quantize_rtn

__all__ = ["Int4Weight", "QuantLinear", "QuantSettings", "quantize_checkpoint", "quantize_decoder",
           "quantized_copy", "quantize_gptq", "quantize_rtn", "read_awq", "read_gguf_q4", "read_gptq",
           "save_gptq", "write_gguf_q4", "write_gptq"]


def __getattr__(name: str) -> Any:
    # The writer imports the loader, which imports this package: load it on first use.
    if name in ("quantize_checkpoint", "save_gptq"):
        from . import export  # noqa: PLC0415

        return getattr(export, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
