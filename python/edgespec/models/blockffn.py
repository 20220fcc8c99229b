"""BlockFFN: the chunk-sparse mixture-of-experts FFN variant (Song et al. 2025, arXiv:2507.08771).

What the released checkpoints compute (MiniCPM-style `config.json`, `model_type` "minicpm",
`ffn_type` "block" or "block_linear"), per token x of the ffn-normed hidden state:

    w = RMSNorm_E(relu(router_proj(x))) * router_norm.weight      [E] weights, no top-k
    y = sum_e w[e] * down_e(silu(up_e(x)))                         experts: ungated 2-layer MLPs

Config fields read (names as published): `ffn_type`, `num_experts` (E), `expert_size` (d),
`router_act` (must be "relu"), `norm_after_router` (must be "rms": the BlockFFN router; "sum" and
"none" are the paper's ablations, default "sum" as in the released config class), `hidden_act`
(silu). `ffn_gated` is ignored, as the released modeling code ignores it for block FFNs: the
experts have no gate projection. `intermediate_size` defaults to E * d when absent.

Tensors per layer (`model.layers.{i}.mlp.` + name; the expert tensors are bare parameters, so the
names carry no `.weight` suffix, which is accepted too):

    router_proj.weight  [E, H]
    router_norm.weight  [E]
    up_proj             [E * d, H]   ("block_linear")  or  [E, d, H]  ("block")
    down_proj           [H, E * d]   ("block_linear")  or  [E, H, d]  ("block")

Both layouts are brought to the block_linear one on load (see edgespec.ops.moe). A GPTQ/AWQ
checkpoint (`edgespec quantize` writes one) may store up_proj / down_proj as 4-bit linears of the
block_linear shapes (`up_proj.qweight` with K = H, N = E * d; `down_proj.qweight` with K = E * d,
N = H): they load as W4A16Weights, the router stays in the compute dtype.

Sparsity statistics: every BlockFFN layer counts, on the device and without a host sync, the
(token, expert) pairs and the per-step expert union it used; `BlockFFN.merge_stats` turns the
layers' counters into token-level sparsity (fraction of (token, expert) pairs inactive) and
chunk-level sparsity (fraction of experts inactive for a whole step of T tokens, averaged over
steps and layers). `Decoder.stats()` reports them; the engine resets them after the prefill, so a
generation's numbers describe its decode (or speculative verify) steps.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import ops
from ..errors import ModelFormatError
from ..loading.build import FFN_BUILDERS
from ..loading.source import require

BLOCKFFN = "blockffn"  # the ModelConfig.ffn["type"] and FFN_BUILDERS key


def ffn_settings_from_hf(d: dict[str, Any], source: str = "config.json") -> dict[str, Any] | None:
    """The BlockFFN settings of a Hugging Face config dict, or None for an ordinary gated MLP.

    Raises ModelFormatError naming the field when the config asks for an FFN variant or a
    router form that is not BlockFFN's.
    """
    ffn_type = d.get("ffn_type")
    if ffn_type in (None, "vanilla"):
        return None
    if ffn_type not in ("block", "block_linear"):
        raise ModelFormatError(f"{source}: ffn_type {ffn_type!r} is not supported "
                               f"(supported: 'vanilla' gated MLP, 'block'/'block_linear' BlockFFN)")
    values = {}
    for name in ("num_experts", "expert_size"):
        v = d.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ModelFormatError(f"{source}: BlockFFN needs a positive integer {name}, got {v!r}")
        values[name] = v
    router_act = d.get("router_act", "relu")
    if router_act != "relu":
        raise ModelFormatError(f"{source}: router_act {router_act!r} is not supported (BlockFFN uses 'relu')")
    norm = d.get("norm_after_router", "sum")
    if norm != "rms":
        raise ModelFormatError(f"{source}: norm_after_router {norm!r} is not supported; BlockFFN's router "
                               f"is ReLU followed by RMSNorm ('rms')")
    return {"type": BLOCKFFN, "num_experts": values["num_experts"], "expert_size": values["expert_size"],
            "layout": ffn_type}


class BlockFFN:
    """One BlockFFN layer: callable [T, H] -> [T, H], counting its own sparsity.

    router_weight: [E, H]; router_norm: [E]; up: [E * d, H]; down: [H, E * d]; all on one device,
    router/up/down in the compute dtype; up and down may be W4A16Weights (4-bit experts).
    eps: the router RMSNorm epsilon (the model's rms_norm_eps).
    """

    def __init__(self, router_weight: torch.Tensor, router_norm: torch.Tensor, up: ops.moe.ExpertWeight,
                 down: ops.moe.ExpertWeight, eps: float) -> None:
        if router_weight.dim() != 2:
            raise ValueError(f"BlockFFN: router_weight must be [E, H], got {tuple(router_weight.shape)}")
        probe = router_weight.new_empty(0, router_weight.shape[1])
        self.num_experts, self.expert_size = ops.moe.check_blockffn_weights(probe, router_weight, router_norm, up, down)
        self.router_weight = router_weight
        self.router_norm = router_norm
        self.up = up
        self.down = down
        self.eps = eps
        # [active (token, expert) pairs, active experts summed over steps]; device-side so that
        # counting never synchronises (the kernels add to it directly).
        self.counters = torch.zeros(2, dtype=torch.int64, device=router_weight.device)
        self.scratch = ops.moe.BlockFFNScratch()  # the kernel path's per-layer device state
        self.steps = 0
        self.tokens = 0

    @property
    def hidden_size(self) -> int:
        return self.router_weight.shape[1]

    @property
    def quantized(self) -> bool:
        return isinstance(self.up, ops.W4A16Weight) or isinstance(self.down, ops.W4A16Weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, H] -> [T, H]
        y = ops.blockffn(x, self.router_weight, self.router_norm, self.eps, self.up, self.down, self.counters,
                         self.scratch)
        self.count_step(x.shape[0])
        return y

    def snapshot_stats(self) -> tuple[torch.Tensor, int, int]:
        """The statistics as they stand, for restore_stats (a CUDA graph's warm-up steps are no
        steps of the generation)."""
        return self.counters.clone(), self.steps, self.tokens

    def restore_stats(self, snapshot: tuple[torch.Tensor, int, int]) -> None:
        counters, self.steps, self.tokens = snapshot
        self.counters.copy_(counters)

    def count_step(self, tokens: int) -> None:
        """Host-side step bookkeeping of one call (the device counters count themselves). A CUDA
        graph replay runs no Python, so edgespec.cuda_graphs calls this per replay."""
        self.steps += 1
        self.tokens += tokens

    def reset_stats(self) -> None:
        self.counters.zero_()
        self.steps = 0
        self.tokens = 0

    @staticmethod
    def merge_stats(layers: list["BlockFFN"]) -> dict[str, Any]:
        """Sparsity over all steps since the last reset, over all `layers` (one host sync).

        token_sparsity = inactive (token, expert) pairs / all pairs;
        chunk_sparsity = experts inactive for a whole step / (steps * E), i.e. the mean over steps
        and layers of the fraction of experts a step did not read.
        """
        pairs = sum(layer.tokens * layer.num_experts for layer in layers)
        slots = sum(layer.steps * layer.num_experts for layer in layers)
        if not layers or slots == 0:
            return {}
        active_pairs, active_experts = torch.stack([layer.counters for layer in layers]).sum(0).tolist()
        steps = layers[0].steps
        return {"blockffn_token_sparsity": round(1.0 - active_pairs / pairs, 4),
                "blockffn_chunk_sparsity": round(1.0 - active_experts / slots, 4),
                "blockffn_steps": steps,
                "blockffn_tokens_per_step": round(layers[0].tokens / steps, 2)}


def _expert_tensor(source: Any, name: str) -> torch.Tensor:
    # The released checkpoints store the experts as bare parameters (no `.weight` suffix).
    if source.has(name):
        return source.tensor(name)
    return require(source, name + ".weight")


def _quantized_expert(source: Any, name: str, shape: tuple[int, int], device: torch.device,
                      dtype: torch.dtype) -> ops.W4A16Weight | None:
    """The 4-bit weight a quantized checkpoint (GPTQ/AWQ) stores under `name` (qweight, scales, ...),
    as a W4A16Weight of the block_linear shape [out, in] = `shape`; None when it is stored dense."""
    is_quantized = getattr(source, "is_quantized", None)
    if is_quantized is None or not is_quantized(name):
        return None
    weight = source.int4(name).to_linear(None, device, dtype, name=f"{source.path}: {name}").weight
    if (weight.out_features, weight.in_features) != shape:
        raise ModelFormatError(f"{source.path}: {name} is a 4-bit weight of {weight.in_features} inputs and "
                               f"{weight.out_features} outputs, expected {shape[1]} -> {shape[0]} "
                               f"(the block_linear layout)")
    return weight


def build_blockffn(cfg: Any, source: Any, prefix: str, device: torch.device, dtype: torch.dtype) -> BlockFFN:
    """Read layer `prefix`'s BlockFFN weights (either published layout, or 4-bit experts of a
    GPTQ/AWQ checkpoint written in the block_linear layout) into a BlockFFN."""
    e, d, h = cfg.ffn["num_experts"], cfg.ffn["expert_size"], cfg.hidden_size
    p = prefix + ".mlp."
    router = require(source, p + "router_proj.weight")
    if tuple(router.shape) != (e, h):
        raise ModelFormatError(f"{source.path}: {p}router_proj.weight has shape {tuple(router.shape)}, "
                               f"expected ({e}, {h}) (num_experts, hidden_size)")
    norm = require(source, p + "router_norm.weight")
    if tuple(norm.shape) != (e,):
        raise ModelFormatError(f"{source.path}: {p}router_norm.weight has shape {tuple(norm.shape)}, expected ({e},)")

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype).contiguous()

    up = _quantized_expert(source, p + "up_proj", (e * d, h), device, dtype)
    down = _quantized_expert(source, p + "down_proj", (h, e * d), device, dtype)
    return BlockFFN(put(router), norm.to(device=device, dtype=dtype),
                    up if up is not None else put(_dense_up(source, p, e, d, h)),
                    down if down is not None else put(_dense_down(source, p, e, d, h)), cfg.rms_norm_eps)


def _dense_up(source: Any, p: str, e: int, d: int, h: int) -> torch.Tensor:
    up = _expert_tensor(source, p + "up_proj")
    if tuple(up.shape) == (e, d, h):
        up = up.reshape(e * d, h)
    elif tuple(up.shape) != (e * d, h):
        raise ModelFormatError(f"{source.path}: {p}up_proj has shape {tuple(up.shape)}, expected "
                               f"({e * d}, {h}) or ({e}, {d}, {h}) from num_experts={e}, expert_size={d}")
    return up


def _dense_down(source: Any, p: str, e: int, d: int, h: int) -> torch.Tensor:
    down = _expert_tensor(source, p + "down_proj")
    if tuple(down.shape) == (e, h, d):
        # "block" layout [E, H, d] -> [H, E * d]: expert e becomes columns [e*d, (e+1)*d).
        down = down.permute(1, 0, 2).reshape(h, e * d)
    elif tuple(down.shape) != (h, e * d):
        raise ModelFormatError(f"{source.path}: {p}down_proj has shape {tuple(down.shape)}, expected "
                               f"({h}, {e * d}) or ({e}, {h}, {d}) from num_experts={e}, expert_size={d}")
    return down


FFN_BUILDERS[BLOCKFFN] = build_blockffn


def write_random_blockffn(directory: str | Path, *, vocab_size: int = 211, hidden_size: int = 96,
                          num_layers: int = 2, num_heads: int = 6, num_kv_heads: int = 2,
                          num_experts: int = 16, expert_size: int = 32, layout: str = "block_linear",
                          off_experts: float = 0.5, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a random-weight BlockFFN model (config.json + model.safetensors) for tests and benchmarks.

    The config uses the published field names (model_type "minicpm", ffn_type `layout`). Sparsity is
    steered, not exact: every embedding row shares one offset direction u, so the residual stream
    keeps a component along u; a fraction `off_experts` of the routers get a strongly negative
    component along u (those experts are rarely active), the rest a zero one (about half of the
    tokens use each). Returns the directory.
    """
    from safetensors.torch import save_file  # noqa: PLC0415 - only needed to write checkpoints

    if layout not in ("block", "block_linear"):
        raise ValueError(f"layout must be 'block' or 'block_linear', got {layout!r}")
    if not 0.0 <= off_experts <= 1.0:
        raise ValueError(f"off_experts must be in [0, 1], got {off_experts}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads
    e, d, h = num_experts, expert_size, hidden_size

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm_weight(n: int) -> torch.Tensor:
        return 1.0 + randn(n, std=0.2)

    u = randn(h, std=1.0)
    u /= u.norm()
    tensors: dict[str, torch.Tensor] = {}
    # Embedding noise has norm ~1 per row; the shared offset u keeps u visible after attention.
    tensors["model.embed_tokens.weight"] = randn(vocab_size, h, std=h ** -0.5) + 0.5 * u
    n_off = round(off_experts * e)
    off = torch.zeros(e)
    off[torch.randperm(e, generator=g)[:n_off]] = -16.0
    for i in range(num_layers):
        p = f"model.layers.{i}."
        # Wide logits (std 2/sqrt(fan_in)) so that greedy decoding of the random model is not a tie-break.
        tensors[p + "self_attn.q_proj.weight"] = randn(num_heads * head_dim, h, std=2.0 / h ** 0.5)
        tensors[p + "self_attn.k_proj.weight"] = randn(num_kv_heads * head_dim, h, std=2.0 / h ** 0.5)
        tensors[p + "self_attn.v_proj.weight"] = randn(num_kv_heads * head_dim, h, std=2.0 / h ** 0.5)
        tensors[p + "self_attn.o_proj.weight"] = randn(h, num_heads * head_dim, std=2.0 / (num_heads * head_dim) ** 0.5)
        tensors[p + "input_layernorm.weight"] = norm_weight(h)
        tensors[p + "post_attention_layernorm.weight"] = norm_weight(h)
        tensors[p + "mlp.router_proj.weight"] = randn(e, h, std=h ** -0.5) + off[:, None] * u
        tensors[p + "mlp.router_norm.weight"] = norm_weight(e).abs()
        up = randn(e * d, h, std=2.0 / h ** 0.5)
        down = randn(h, e * d, std=2.0 / (e * d) ** 0.5)
        if layout == "block":
            up = up.view(e, d, h)
            down = down.view(h, e, d).permute(1, 0, 2)
        tensors[p + "mlp.up_proj"] = up
        tensors[p + "mlp.down_proj"] = down
    final_norm = norm_weight(h)
    tensors["model.norm.weight"] = final_norm
    # LM head rows orthogonal to the offset as the final norm scales it: the offset must not
    # favour one token at every position.
    v = final_norm * u
    v /= v.norm()
    lm_head = randn(vocab_size, h, std=2.0 / h ** 0.5)
    tensors["lm_head.weight"] = lm_head - (lm_head @ v)[:, None] * v
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    config = {
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "vocab_size": vocab_size,
        "hidden_size": h, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "scale_emb": 1.0, "scale_depth": 1.4,
        "dim_model_base": h, "ffn_type": layout, "ffn_gated": True, "router_act": "relu",
        "norm_after_router": "rms", "num_experts": e, "expert_size": d,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory
