"""Write GPTQ-compatible checkpoints: model.safetensors + config.json (with quantization_config)
+ quantize_config.json + tokenizer files, as AutoGPTQ/GPTQModel and `transformers` expect them."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import __version__
from ..errors import ModelFormatError
from ..loading import GGUFSource, HFDirectorySource, Tokenizer, load_model, open_checkpoint
from ..loading.hf_dir import read_json
from ..models.config import ModelConfig
from .formats import Int4Weight, write_gptq
from .quantizer import QuantSettings, calibration_batches, quantize_decoder

_HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face config.json for a model read from a GGUF file (llama, qwen2, qwen3)."""
    if cfg.arch not in _HF_ARCHITECTURES:
        raise ModelFormatError(f"{cfg.source}: cannot write a Hugging Face config for architecture {cfg.arch!r}")
    d: dict[str, Any] = {
        "architectures": [_HF_ARCHITECTURES[cfg.arch]], "model_type": cfg.arch,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu", "attention_bias": cfg.qkv_bias,
    }
    if cfg.rope_scaling:
        d["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.bos_token_id is not None:
        d["bos_token_id"] = int(cfg.bos_token_id)
    if cfg.eos_token_ids:
        d["eos_token_id"] = cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else list(cfg.eos_token_ids)
    return d


def gptq_settings_dict(settings: QuantSettings, checkpoint_format: str) -> dict[str, Any]:
    """quantize_config.json / quantization_config contents."""
    return {
        "quant_method": "gptq", "bits": 4, "group_size": settings.group_size, "desc_act": settings.act_order,
        # "format" is what transformers >= 5 and GPTQModel read, "checkpoint_format" the older key.
        "sym": settings.sym, "format": checkpoint_format, "checkpoint_format": checkpoint_format,
        "damp_percent": settings.damp,
        "true_sequential": True, "static_groups": False, "lm_head": False,
        "meta": {"quantizer": [f"edgespec:{__version__}"], "method": settings.method},
    }


def save_gptq(out_dir: str | Path, source: Any, config: dict[str, Any], weights: dict[str, Int4Weight],
              settings: QuantSettings, checkpoint_format: str = "gptq", tokenizer: Any = None,
              extra_files: tuple[Path, ...] = ()) -> Path:
    """Write the checkpoint. source: the unquantized weight source (HF names) for everything that
    stays unquantized (embeddings, norms, LM head), stored as fp16; weights: from quantize_decoder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    # Linears are stored as `prefix.weight`; BlockFFN expert tensors under the bare prefix.
    quantized = {f"{p}.weight" for p in weights} | set(weights)
    for name in source.names():
        if name not in quantized:
            tensors[name] = source.tensor(name).to(torch.float16).contiguous()
    for prefix, w in weights.items():
        for key, t in write_gptq(w, checkpoint_format).items():
            tensors[f"{prefix}.{key}"] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    qc = gptq_settings_dict(settings, checkpoint_format)
    cfg = dict(config)
    cfg["quantization_config"] = qc
    cfg["torch_dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    (out / "quantize_config.json").write_text(
        json.dumps({k: v for k, v in qc.items() if k != "quant_method"} | {"quant_method": "gptq"}, indent=2) + "\n",
        encoding="utf-8")
    if tokenizer is not None:
        tokenizer.hf.save_pretrained(str(out))
    for f in extra_files:
        shutil.copy(f, out / f.name)
    return out


def quantize_checkpoint(model: str | Path, out_dir: str | Path, settings: QuantSettings,
                        calibration_text: str | None = None, calibration_tokens: int = 2048, seq_len: int = 512,
                        checkpoint_format: str = "gptq", device: str | None = "cpu", progress: bool = True) -> Path:
    """Quantize a model directory, GGUF file or 'demo' and write a GPTQ checkpoint to out_dir."""
    settings = settings.validate()
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    if checkpoint_format == "gptq" and settings.min_zero != 1:
        raise ValueError("the GPTQ v1 format stores zero - 1 and needs min_zero=1")
    source, config, tok_dir, tok_gguf = open_checkpoint(model)
    if isinstance(source, GGUFSource):
        config_dict = hf_config_dict(config)
        extras: tuple[Path, ...] = ()
    elif isinstance(source, HFDirectorySource):
        config_dict = read_json(Path(tok_dir) / "config.json")
        gen = Path(tok_dir) / "generation_config.json"
        extras = (gen,) if gen.exists() else ()
    else:
        raise ModelFormatError(f"{model}: already a quantized checkpoint ({type(source).__name__}); "
                               "quantize the unquantized model instead")
    if settings.method == "gptq" and not calibration_text:
        raise ValueError("GPTQ needs calibration text (--calib FILE)")
    try:
        tokenizer = Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf)
    except ModelFormatError:
        if settings.method == "gptq":
            raise
        tokenizer = None  # RTN needs no text; the checkpoint then has no tokenizer files either
    loaded = load_model(model, device=device, dtype=torch.float32, max_context=max(seq_len, 16),
                        with_tokenizer=False, quantized=False)
    batches: list[torch.Tensor] = []
    if settings.method == "gptq":
        batches = calibration_batches(tokenizer.encode(calibration_text), seq_len, calibration_tokens)
        if progress:
            tqdm.write(f"calibrating on {sum(b.numel() for b in batches)} tokens in {len(batches)} sequences")
    weights = quantize_decoder(loaded.model, settings, batches, progress=progress)
    if config_dict.get("ffn_type") == "block":
        # The 4-bit experts are written in the block_linear layout ([E * d, H] and [H, E * d]).
        config_dict = dict(config_dict, ffn_type="block_linear")
    return save_gptq(out_dir, source, config_dict, weights, settings, checkpoint_format, tokenizer, extras)
