"""Quantized checkpoints as weight sources: GPTQ/AWQ model directories and GGUF Q4_0/Q4_1/Q4_K files.

Both wrap an existing source and change only `linear`: a layer the checkpoint stores quantized
becomes a QuantLinear, everything else (embeddings, norms, an unquantized LM head) is read as the
wrapped source reads it, so "which layers stay unquantized" is whatever the checkpoint says.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from ..loading.gguf_file import GGUFSource, _unpermute
from ..loading.hf_dir import HFDirectorySource, read_json
from ..loading.source import dense_linear
from ..ops import w4a16_cpu
from ..ops.w4a16 import kernel_available
from .formats import GGUF_4BIT_TYPES, Int4Weight, read_awq, read_gguf_q4, read_gptq


def quantization_settings(directory: Path, cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's quantization settings (config.json `quantization_config`, else
    `quantize_config.json`), with `quant_method` filled in; None for an unquantized model."""
    qc = cfg.get("quantization_config")
    where = directory / "config.json"
    if qc is None and (directory / "quantize_config.json").exists():
        where = directory / "quantize_config.json"
        qc = dict(read_json(where))
        qc.setdefault("quant_method", "gptq")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ModelFormatError(f"{where}: quantization settings must be an object, got {type(qc).__name__}")
    qc = dict(qc)
    qc["_source"] = str(where)
    return qc


class _WrappedSource:
    """A weight source read through `base`, whose quantized projections become QuantLinear."""

    base: Any
    path: str

    def names(self) -> list[str]:
        return self.base.names()

    # `prefix.weight` of a quantized layer reads as its dequantised weight, so code that asks for
    # a layer's weight (the loader deciding whether an LM head exists, tools) sees every layer.
    def has(self, name: str) -> bool:
        return self.base.has(name) or (name.endswith(".weight") and self.is_quantized(name.removesuffix(".weight")))

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        if not self.base.has(name) and name.endswith(".weight") and self.is_quantized(name.removesuffix(".weight")):
            return self.int4(name.removesuffix(".weight")).dequantize()  # fp32 [N, K] on the host
        return self.base.tensor(name, device)

    def is_quantized(self, prefix: str) -> bool:
        raise NotImplementedError

    def int4(self, prefix: str) -> Int4Weight:
        raise NotImplementedError

    def linear(self, prefix: str, device: torch.device, dtype: torch.dtype):
        if not self.is_quantized(prefix):
            return dense_linear(self, prefix, device, dtype)
        bias = self.tensor(prefix + ".bias", device) if self.has(prefix + ".bias") else None
        return self.int4(prefix).to_linear(bias, device, dtype, name=f"{self.path}: {prefix}")


class QuantizedDirectorySource(_WrappedSource):
    """A Hugging Face directory holding a GPTQ or AWQ (gemm) checkpoint."""

    def __init__(self, directory: Path, settings: dict[str, Any]) -> None:
        where = settings["_source"]
        self.method = str(settings.get("quant_method", "gptq")).lower()
        if self.method not in ("gptq", "awq"):
            raise ModelFormatError(f"{where}: quant_method {self.method!r} is not supported (gptq or awq)")
        self.bits = int(settings.get("bits", settings.get("w_bit", 4)))
        if self.bits != 4:
            raise ModelFormatError(f"{where}: {self.bits}-bit weights are not supported (only 4-bit)")
        self.group_size = int(settings.get("group_size", settings.get("q_group_size", 128)))
        # transformers >= 5 and GPTQModel write "format"; AutoGPTQ-era checkpoints "checkpoint_format".
        self.checkpoint_format = str(settings.get("checkpoint_format") or settings.get("format") or "gptq").lower()
        if self.method == "awq":
            version = str(settings.get("version", "gemm")).lower()
            if version != "gemm":
                raise ModelFormatError(f"{where}: AWQ version {version!r} is not supported (only 'gemm')")
            if settings.get("zero_point", True) is False:
                raise ModelFormatError(f"{where}: AWQ without zero points is not supported")
        # Settings first: an unsupported method is the clearer error than whatever the weights hold.
        self.base = HFDirectorySource(directory)
        self.path = self.base.path

    def is_quantized(self, prefix: str) -> bool:
        return self.base.has(prefix + ".qweight")

    def int4(self, prefix: str) -> Int4Weight:
        """The format-neutral 4-bit weight stored under `prefix` (which must have a qweight)."""
        t = self.base.tensor
        for part in ("qzeros", "scales"):
            if not self.base.has(f"{prefix}.{part}"):
                raise ModelFormatError(f"{self.path}: {prefix}.qweight has no {prefix}.{part}")
        if self.method == "awq":
            return read_awq(t(prefix + ".qweight"), t(prefix + ".qzeros"), t(prefix + ".scales"),
                            self.group_size, self.bits, name=prefix)
        g_idx = t(prefix + ".g_idx") if self.base.has(prefix + ".g_idx") else None
        return read_gptq(t(prefix + ".qweight"), t(prefix + ".qzeros"), t(prefix + ".scales"), g_idx,
                         self.group_size, self.checkpoint_format, self.bits, name=prefix)



def detect_quantized_checkpoint(directory: Path, cfg: dict[str, Any]) -> QuantizedDirectorySource | None:
    """SOURCE_DETECTORS entry: a QuantizedDirectorySource for GPTQ/AWQ directories, else None."""
    settings = quantization_settings(Path(directory), cfg)
    if settings is None:
        return None
    return QuantizedDirectorySource(Path(directory), settings)


class GGUFQ4Source(_WrappedSource):
    """A GGUF file whose Q4_0/Q4_1/Q4_K linears become QuantLinear straight from the block bytes
    (no float round trip); other tensors are dequantised as GGUFSource does."""

    def __init__(self, base: GGUFSource) -> None:
        self.base = base
        self.path = base.path
        self.config = base.config

    def raw(self, name: str) -> Any:
        return self.base.raw(name)

    def is_quantized(self, prefix: str) -> bool:
        name = prefix + ".weight"
        return self.base.has(name) and self.raw(name).tensor_type.name in GGUF_4BIT_TYPES

    def int4(self, prefix: str) -> Int4Weight:
        """The Q4 weight of `prefix`, rows in Hugging Face order (llama Q/K un-permuted)."""
        t = self.raw(prefix + ".weight")
        k, n = (int(s) for s in t.shape)  # GGUF lists the fastest dimension (K) first
        w = read_gguf_q4(t.data, t.tensor_type.name, k, n, name=f"{self.path}: {t.name}")
        heads = {".self_attn.q_proj": self.config.num_heads, ".self_attn.k_proj": self.config.num_kv_heads}
        for suffix, count in heads.items():
            if self.base.arch == "llama" and prefix.endswith(suffix):
                w = w.select_outputs(_unpermute(torch.arange(n), count))
        return w


def gguf_q4_by_default(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether GGUF Q4 weights stay 4-bit when the caller does not say.

    Yes where a 4-bit GEMM runs them: on CUDA with the W4A16 kernel built, on the CPU with torch's
    int4 kernel (ops/w4a16_cpu.py, bf16 compute only): a quarter to three eighths of the weight
    memory and bandwidth per token. No elsewhere: the torch path would dequantise and cache the
    weights anyway, so keeping them 4-bit buys nothing but a slower first step.
    """
    if device.type == "cpu":
        return w4a16_cpu.runs_dtype(dtype)
    return device.type == "cuda" and kernel_available()


def wrap_gguf(source: GGUFSource, device: torch.device, dtype: torch.dtype, quantized: bool | None) -> Any:
    """`source` itself, or a GGUFQ4Source when Q4_0/Q4_1/Q4_K weights should be imported as 4-bit
    (`quantized`, or when None gguf_q4_by_default for the device and compute dtype)."""
    if quantized is None:
        quantized = gguf_q4_by_default(device, dtype)
    return GGUFQ4Source(source) if quantized else source
