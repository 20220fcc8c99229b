"""Model configuration: one normalised view of Llama, Qwen2, Qwen3 and MiniCPM/MiniCPM4 configs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ModelFormatError
from .sparse import SparseConfig, parse_sparse_config

# model_type -> architecture family handled by the one decoder.
SUPPORTED_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "minicpm": "minicpm",
}


@dataclass
class ModelConfig:
    """Everything the decoder needs, in one unit system, validated.

    `residual_scale` and `logit_scale` carry MiniCPM's muP scalars so the decoder has no
    architecture branches: residual branch outputs are multiplied by residual_scale
    (scale_depth / sqrt(num_layers)), the final hidden state by logit_scale
    (dim_model_base / hidden_size) before the LM head, the embeddings by embedding_scale (scale_emb).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sparse_config: SparseConfig | None = None  # InfLLM-v2 block-sparse attention (MiniCPM4), in tokens
    ffn: dict[str, Any] | None = None  # None: gated SiLU MLP; otherwise a variant's settings
    source: str = "<config>"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def validate(self) -> "ModelConfig":
        where = self.source
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ModelFormatError(f"{where}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelFormatError(
                f"{where}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelFormatError(f"{where}: head_dim must be even for RoPE, got {self.head_dim}")
        return self


def _get(d: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if d.get(n) is not None:
            return d[n]
    return default


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def config_from_hf(d: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config.json dict.

    Raises ModelFormatError naming the file and the field when the architecture is unsupported
    or a required field is missing/invalid.
    """
    if not isinstance(d, dict):
        raise ModelFormatError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        archs = d.get("architectures")
        raise ModelFormatError(
            f"{source}: model_type {model_type!r} (architectures {archs}) is not supported; "
            f"supported model types: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    arch = SUPPORTED_MODEL_TYPES[model_type]
    # FFN variants read their own fields. Imported here, not at the top: models.blockffn registers
    # its builder in loading.build, which imports this module.
    from .blockffn import ffn_settings_from_hf  # noqa: PLC0415

    ffn = ffn_settings_from_hf(d, source)
    if ffn is not None and "intermediate_size" not in d:
        # BlockFFN configs need not carry it; the experts' total width is its natural value.
        d = {**d, "intermediate_size": ffn["num_experts"] * ffn["expert_size"]}
    if d.get("attention_type", "vanilla") != "vanilla":
        raise ModelFormatError(f"{source}: attention_type {d['attention_type']!r} is not supported "
                               f"(only 'vanilla' multi-head/grouped-query attention)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if k not in d]
    if missing:
        raise ModelFormatError(f"{source}: required field(s) {', '.join(missing)} missing")
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelFormatError(f"{source}: hidden_act {act!r} is not supported (only silu)")
    if d.get("use_sliding_window"):
        raise ModelFormatError(f"{source}: sliding-window attention (use_sliding_window=true) is not supported")
    num_heads = int(d["num_attention_heads"])
    hidden = int(d["hidden_size"])
    num_layers = int(d["num_hidden_layers"])
    head_dim = _get(d, "head_dim", default=hidden // num_heads)
    cfg = ModelConfig(
        arch=arch,
        vocab_size=int(d["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(d["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(_get(d, "num_key_value_heads", default=num_heads)),
        head_dim=int(head_dim),
        rms_norm_eps=float(_get(d, "rms_norm_eps", default=1e-6)),
        rope_theta=float(_get(d, "rope_theta", default=(d.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
        rope_scaling=_rope_scaling(d),
        max_position_embeddings=int(_get(d, "max_position_embeddings", default=4096)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=bool(d.get("attention_bias", arch == "qwen2")),
        qk_norm=arch == "qwen3",
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=_eos_list(d.get("eos_token_id")),
        sparse_config=parse_sparse_config(d.get("sparse_config"), source),
        ffn=ffn,
        source=source,
    )
    if arch == "minicpm":
        cfg.embedding_scale = float(d.get("scale_emb", 1.0))
        cfg.residual_scale = float(d.get("scale_depth", 1.0)) / math.sqrt(num_layers)
        base = d.get("dim_model_base")
        cfg.logit_scale = float(base) / hidden if base else 1.0
    return cfg.validate()


def _rope_scaling(d: dict[str, Any]) -> dict[str, Any] | None:
    scaling = d.get("rope_scaling")
    if scaling is None:
        # transformers >= 5 writes rope settings under `rope_parameters`.
        params = d.get("rope_parameters")
        if params and params.get("rope_type", "default") != "default":
            scaling = params
    if not scaling:
        return None
    scaling = dict(scaling)
    # Phi-3-style configs keep the pretraining length beside rope_scaling rather than inside it.
    if "original_max_position_embeddings" not in scaling and d.get("original_max_position_embeddings"):
        scaling["original_max_position_embeddings"] = int(d["original_max_position_embeddings"])
    return scaling
