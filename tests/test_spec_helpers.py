"""Helpers for the speculative-decoding tests: tiny targets, random EAGLE heads in the published
formats, and plain-vs-speculative runs. (No tests here; the test_spec_* modules import it.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgespec import LLM
from edgespec.loading import load_model
from edgespec.models.config import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for the module: tiny ops are dominated by thread hand-offs, and on a shared
    2-core machine one thread is faster and steadier. Import it into a test module to use it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llm(directory: Path, max_context: int = 512, dtype: torch.dtype = torch.float32) -> LLM:
    """A tokenizer-less LLM over a tiny random HF model directory (conftest.write_tiny_hf_model)."""
    return LLM(load_model(str(directory), device="cpu", dtype=dtype, max_context=max_context, with_tokenizer=False))


def eagle3_head(target: ModelConfig, directory: Path, seed: int = 0, draft_vocab: int | None = None,
                std: float = 0.3, layers: list[int] | None = None, fmt: str = "safetensors") -> Path:
    """Write a random EAGLE-3 head (LlamaForCausalLMEagle3 layout: fc [H, 3H], midlayer.* with a 2H-wide
    attention input, norm, lm_head [Vd, H], d2t, t2d) for `target`."""
    g = torch.Generator().manual_seed(seed)
    h, v = target.hidden_size, target.vocab_size
    vd = draft_vocab or v
    q, kv, inter = target.q_size, target.kv_size, target.intermediate_size

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std / shape[-1] ** 0.5

    def n(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=g)

    # A draft vocabulary of every other target id from 0, then the rest: d2t = target - draft.
    target_ids = torch.cat([torch.arange(0, v, 2), torch.arange(1, v, 2)])[:vd].sort().values
    t2d = torch.zeros(v, dtype=torch.bool)
    t2d[target_ids] = True
    tensors = {
        "fc.weight": w(h, 3 * h), "norm.weight": n(h), "lm_head.weight": w(vd, h) * 4,
        "d2t": target_ids - torch.arange(vd), "t2d": t2d,
        "midlayer.hidden_norm.weight": n(h), "midlayer.input_layernorm.weight": n(h),
        "midlayer.post_attention_layernorm.weight": n(h),
        "midlayer.self_attn.q_proj.weight": w(q, 2 * h), "midlayer.self_attn.k_proj.weight": w(kv, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv, 2 * h), "midlayer.self_attn.o_proj.weight": w(h, q),
        "midlayer.mlp.gate_proj.weight": w(inter, h), "midlayer.mlp.up_proj.weight": w(inter, h),
        "midlayer.mlp.down_proj.weight": w(h, inter),
    }
    cfg = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": h,
           "intermediate_size": inter, "num_attention_heads": target.num_heads,
           "num_key_value_heads": target.num_kv_heads, "head_dim": target.head_dim, "num_hidden_layers": 1,
           "vocab_size": v, "draft_vocab_size": vd, "rms_norm_eps": target.rms_norm_eps,
           "rope_theta": target.rope_theta, "max_position_embeddings": target.max_position_embeddings}
    if layers is not None:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": layers}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    if fmt == "bin":
        torch.save(tensors, str(directory / "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        save_file({k: t.contiguous() for k, t in tensors.items()}, str(directory / "model.safetensors"))
    return directory


def run(llm: LLM, prompt: list[int], n: int, **settings) -> list[int]:
    """Token ids of one generation (EOS ignored)."""
    return llm.generate(prompt, max_new_tokens=n, ignore_eos=True, **settings).token_ids


def plain_and_speculative(llm: LLM, head_dir: Path, prompt: list[int], n: int, **tree):
    """Greedy plain token ids of `llm`, then its greedy speculative result with a random EAGLE head
    written to `head_dir` (tree: tree_size, depth, topk), checked to have accepted some draft token
    (else the comparison would test nothing). Leaves speculation on."""
    from edgespec.spec import disable_speculation, enable_speculation
    from edgespec.spec.train_head import random_head

    disable_speculation(llm)
    plain = run(llm, prompt, n)
    head = random_head(llm.model.config, head_dir, seed=1, std=0.4)
    enable_speculation(llm, draft=str(head), **tree)
    result = llm.generate(prompt, max_new_tokens=n, ignore_eos=True)
    histogram = {int(k): v for k, v in result.stats.extra["acceptance_histogram"].items()}
    assert sum(k * v for k, v in histogram.items()) > sum(histogram.values()), "no draft token was ever accepted"
    return plain, result


def assert_tree_rows_decode_alike(model, quantized: bool = False, prompt_len: int = 60) -> None:
    """The logits of every node of a verified tree are bitwise those of decoding its path one token
    at a time (what makes greedy speculative output equal plain output in any precision). The
    tree (depths up to 8) starts after `prompt_len` tokens: by default 4 slots before a 64-key tile
    boundary, so its rows' keys span two tiles. quantized: the model's projections become 4-bit
    (RTN, group 64, tile layout) first. Runs on the model's device."""
    from edgespec.ops.attention import pack_tree_mask
    from edgespec.quant.quantizer import QuantSettings, quantize_rtn

    device, dtype = model.device, model.dtype
    if quantized:
        def four_bit(dense):
            weight = quantize_rtn(dense.weight.float().cpu(), QuantSettings(method="rtn", group_size=64))
            return weight.to_linear(device=device, dtype=dtype, layout_name="tile")

        for layer in model.layers:
            layer.qkv, layer.o = four_bit(layer.qkv), four_bit(layer.o)
            layer.ffn.gate_up, layer.ffn.down = four_bit(layer.ffn.gate_up), four_bit(layer.ffn.down)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, vocab, (prompt_len,), generator=g).to(device)
    parents = [-1, 0, 0, 1, 2, 3, 5, 6, 6, 8, 9]  # depths up to 8
    tree = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        tree[i, i] = True
        if p >= 0:
            tree[i] |= tree[p]
    depth = (tree.sum(dim=1) - 1).to(device)
    tokens = torch.randint(3, vocab, (len(parents),), generator=g).to(device)
    with torch.inference_mode():
        cache = model.new_cache()
        model.forward(prompt, torch.arange(prompt_len, device=device), cache, 0)
        mask = pack_tree_mask(tree).to(device)
        verified = model.logits(model.forward(tokens, prompt_len + depth, cache, prompt_len, tree_mask=mask).hidden)
        for node in (4, 7, 10):  # depths 2, 5, 7
            chain = [node]
            while parents[chain[-1]] >= 0:
                chain.append(parents[chain[-1]])
            chain.reverse()
            cache = model.new_cache()
            model.forward(prompt, torch.arange(prompt_len, device=device), cache, 0)
            for i, t in enumerate(chain):
                out = model.forward(tokens[t:t + 1], torch.tensor([prompt_len + i], device=device), cache,
                                    prompt_len + i)
            decoded = model.logits(out.hidden)
            assert torch.equal(verified[node:node + 1], decoded), f"node {node}: verified and decoded logits differ"
