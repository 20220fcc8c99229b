"""Model loading: Hugging Face directories, GGUF files and the `demo` model, onto any device."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ContextLengthError, DeviceMemoryError, ModelFormatError
from ..models.config import ModelConfig, config_from_hf
from ..models.decoder import Decoder, GatedMLP
from .build import FFN_BUILDERS, build_decoder
from .demo import demo_model_path
from .gguf_file import GGUFSource
from .hf_dir import HFDirectorySource, read_json
from .memory import free_device_memory, plan_context
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["FFN_BUILDERS", "GGUFSource", "HFDirectorySource", "IncrementalDetokenizer", "LoadedModel",
           "Tokenizer", "build_decoder", "default_dtype", "load_model", "open_checkpoint", "resolve_device"]

# Checkpoint kinds other issues add (GPTQ/AWQ directories, ...): detector(dir, config dict) -> source or None.
SOURCE_DETECTORS: list[Any] = []

from ..quant.checkpoint import detect_quantized_checkpoint, wrap_gguf  # noqa: E402 - needs the loaders above

SOURCE_DETECTORS.append(detect_quantized_checkpoint)


@dataclass
class LoadedModel:
    model: Decoder
    tokenizer: Tokenizer | None
    name: str


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'cuda' when available and nothing was asked for, else 'cpu'; a clear error for an unusable request."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but torch sees no CUDA GPU (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported (use cpu or cuda)")
    return dev


def _cpu_has_bf16() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            flags = f.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs and on CPUs with native bf16 dot products (AVX512-BF16/AMX), else fp32.

    Decoding streams every weight once per token, so halving the bytes roughly halves the time
    (2.3x measured on an AVX512-BF16 CPU with SmolLM2-135M); CPUs without bf16 units would instead
    emulate it and run slower than fp32.
    """
    if device.type == "cuda" or _cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def open_checkpoint(model: str | Path) -> tuple[Any, ModelConfig, str | Path, str | None]:
    """(weight source, config, tokenizer directory, tokenizer gguf file) for a path or 'demo'."""
    if str(model) == "demo":
        model = demo_model_path()
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {str(model)!r} not found: pass a model directory, a .gguf file or 'demo'")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelFormatError(f"{path}: a model file must be GGUF (.gguf); for Hugging Face models pass the directory")
        src = GGUFSource(path)
        return src, src.config, path.parent, path.name
    cfg_dict = read_json(path / "config.json")
    config = config_from_hf(cfg_dict, source=str(path / "config.json"))
    for detect in SOURCE_DETECTORS:
        src = detect(path, cfg_dict)
        if src is not None:
            return src, config, path, None
    return HFDirectorySource(path), config, path, None


def _generation_eos(path: Path) -> list[int]:
    gen = path / "generation_config.json"
    if not gen.exists():
        return []
    eos = read_json(gen).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]


def _pack_cpu_int4(decoder: Decoder) -> None:
    """Pack the 4-bit projections that run on torch's CPU int4 kernel at load, not on first use,
    into torch's layout alone where it allows (w4a16_cpu.prepare)."""
    from ..ops import w4a16_cpu  # noqa: PLC0415
    from ..quant import QuantLinear  # noqa: PLC0415

    linears = [decoder.lm_head]
    for layer in decoder.layers:
        ffn = [layer.ffn.gate_up, layer.ffn.down] if isinstance(layer.ffn, GatedMLP) else []
        linears += [layer.qkv, layer.o, *ffn]
    for lin in linears:
        if isinstance(lin, QuantLinear):
            lin.weight = w4a16_cpu.prepare(lin.weight, decoder.dtype)


def load_model(model: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
               max_context: int | None = None, with_tokenizer: bool = True, progress: bool = False,
               quantized: bool | None = None) -> LoadedModel:
    """Load a model directory, GGUF file or 'demo' onto `device` (default: cuda if present, else cpu).

    max_context: positions the KV cache holds (default: the config's max_position_embeddings, on CUDA
    capped to what fits beside the weights; a max_context that cannot fit raises DeviceMemoryError:
    edgespec.loading.memory).
    quantized: GGUF Q4_0/Q4_1/Q4_K weights become 4-bit QuantLinears (True) or are dequantised (False);
    None decides per device and dtype (edgespec.quant.checkpoint.gguf_q4_by_default: 4-bit where a
    4-bit GEMM runs them, the CUDA kernel or the CPU's bf16 int4 kernel). GPTQ/AWQ directories
    always load 4-bit.
    """
    dev = resolve_device(device)
    dtype = dtype or default_dtype(dev)
    source, config, tok_dir, tok_gguf = open_checkpoint(model)
    if isinstance(source, GGUFSource):
        source = wrap_gguf(source, dev, dtype, quantized)
    context = int(max_context or config.max_position_embeddings)
    if context <= 0:
        raise ContextLengthError(f"max_context must be positive, got {context}")
    try:
        decoder = build_decoder(config, source, dev, dtype, context, progress=progress)
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceMemoryError(f"{model}: the weights do not fit in the GPU's memory ({exc}); use a smaller or "
                                f"4-bit model (GPTQ, AWQ, GGUF Q4)") from None
    free = free_device_memory(dev)
    if free is not None:  # a CUDA device: fit the KV cache beside the weights (loading/memory.py)
        torch.cuda.empty_cache()  # loading's temporaries are not in anybody's way
        free = free_device_memory(dev)
        fitted = plan_context(decoder, max_context, free, str(model))
        if fitted != decoder.max_context:
            decoder.set_max_context(fitted)
    if dev.type == "cpu":
        _pack_cpu_int4(decoder)
    tokenizer = None
    if with_tokenizer:
        extra = list(config.eos_token_ids) + (_generation_eos(Path(tok_dir)) if tok_gguf is None else [])
        tokenizer = Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf, extra_stop_ids=extra)
    return LoadedModel(decoder, tokenizer, str(model))
