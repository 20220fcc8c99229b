"""GGUF files (llama.cpp): metadata -> config, tensors -> Hugging Face names, dequantised
(gguf_dequant.py, on the load device).

llama.cpp's converter permutes the rows of Llama Q and K projections (it stores the two RoPE
halves interleaved); `_unpermute` restores the Hugging Face "rotate half" order so the one
decoder and its RoPE op serve every format.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFormatError
from ..models.config import ModelConfig, config_from_hf
from .gguf_dequant import dequantize, raw_bytes
from .gguf_header import GGUFHeader, Unreadable, read_header
from .source import dense_linear

# GGUF architecture -> Hugging Face model_type.
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name, or None for tensors the decoder does not use."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation. w: [n_heads * D, ...] (weight or bias).

    llama.cpp maps HF rows (head, half, i) to (head, i, half); this maps them back.
    """
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
             .transpose(1, 2).reshape(w.shape))


def _field(header: GGUFHeader, key: str, default: Any = None) -> Any:
    value = header.fields.get(key, default)
    if isinstance(value, Unreadable):
        raise ModelFormatError(f"GGUF metadata field {key!r} is unreadable ({value.reason})")
    return value


class GGUFSource:
    """Tensors of a GGUF file under Hugging Face names, dequantised to float32 on demand, on the
    device that asks."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self.header = read_header(self.path)
        except FileNotFoundError:
            raise ModelFormatError(f"{self.path}: file not found") from None
        except Exception as exc:  # GGUFReader raises ValueError/struct.error/... on bad files
            raise ModelFormatError(f"{self.path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        self.arch = _field(self.header, "general.architecture")
        if self.arch not in GGUF_ARCHS:
            raise ModelFormatError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
        self._tensors = {}
        for t in self.header.tensors:
            name = hf_name(t.name)
            if name is not None:
                self._tensors[name] = t
        self.config = self._config()

    def _config(self) -> ModelConfig:
        a, r = self.arch, self.header
        head_count = _field(r, f"{a}.attention.head_count")
        embed = self._tensors.get("model.embed_tokens.weight")
        if head_count is None or embed is None:
            raise ModelFormatError(f"{self.path}: missing {a}.attention.head_count or token_embd.weight")
        hidden = int(_field(r, f"{a}.embedding_length"))
        vocab = int(_field(r, f"{a}.vocab_size", default=int(embed.shape[1])))
        d: dict[str, Any] = {
            "model_type": GGUF_ARCHS[a],
            "hidden_size": hidden,
            "intermediate_size": int(_field(r, f"{a}.feed_forward_length")),
            "num_hidden_layers": int(_field(r, f"{a}.block_count")),
            "num_attention_heads": int(head_count),
            "num_key_value_heads": int(_field(r, f"{a}.attention.head_count_kv", default=head_count)),
            "head_dim": int(_field(r, f"{a}.attention.key_length", default=hidden // int(head_count))),
            "vocab_size": vocab,
            "rms_norm_eps": float(_field(r, f"{a}.attention.layer_norm_rms_epsilon", default=1e-6)),
            "rope_theta": float(_field(r, f"{a}.rope.freq_base", default=10000.0)),
            "max_position_embeddings": int(_field(r, f"{a}.context_length", default=4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "attention_bias": "model.layers.0.self_attn.q_proj.bias" in self._tensors,
            "bos_token_id": _field(r, "tokenizer.ggml.bos_token_id"),
            "eos_token_id": _field(r, "tokenizer.ggml.eos_token_id"),
        }
        scaling_type = _field(r, f"{a}.rope.scaling.type")
        if scaling_type and scaling_type != "none":
            d["rope_scaling"] = {
                "rope_type": scaling_type,
                "factor": float(_field(r, f"{a}.rope.scaling.factor", default=1.0)),
                "original_max_position_embeddings": int(_field(r, f"{a}.rope.scaling.original_context_length",
                                                               default=d["max_position_embeddings"])),
            }
        return config_from_hf(d, source=self.path)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def raw(self, name: str) -> Any:
        """The GGUFTensor behind a Hugging Face name (for direct quantized import)."""
        return self._tensors[name]

    def tensor(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The named tensor as float32 on `device`, Hugging Face layout (llama Q/K un-permuted).

        The raw block bytes go to `device` and are decoded there (gguf_dequant): a CUDA load moves
        the 4-bit bytes across PCIe, not float32 weights, and decodes them on the GPU.
        """
        if name not in self._tensors:
            raise ModelFormatError(f"{self.path}: tensor {name!r} is missing from the GGUF file")
        t = self._tensors[name]
        shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists the fastest dimension first
        w = dequantize(raw_bytes(t.data).to(device), t.tensor_type, shape, name=f"{self.path}: {t.name}")
        if self.arch == "llama":
            if ".self_attn.q_proj." in name:
                w = _unpermute(w, self.config.num_heads)
            elif ".self_attn.k_proj." in name:
                w = _unpermute(w, self.config.num_kv_heads)
        return w

    def linear(self, prefix: str, device: torch.device, dtype: torch.dtype):
        return dense_linear(self, prefix, device, dtype)
