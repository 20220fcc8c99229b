"""Whole models on the emulated CUDA kernels: the op layer routes every op its kernels take
(embedding, RMSNorm, RoPE, attention, SiLU-and-mul, argmax) to them, exactly as on a GPU, and the
results must match the torch path. This checks the wiring of the kernels into the decoder and the
speculative driver, not only each kernel alone."""
from __future__ import annotations

import json

import pytest
import torch

from edgespec import LLM
from edgespec.loading import load_model
from edgespec.models.blockffn import write_random_blockffn
from edgespec.ops import _kernels
from edgespec.spec import ModelDrafter, enable_speculation
from oracle.attention import pack_bits, tree_visibility
from sparse_cases import SMALL
from test_spec_helpers import assert_tree_rows_decode_alike, plain_and_speculative

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulated_ops")]

KERNELS = ("embedding", "rms_norm", "apply_rope", "attention", "silu_and_mul", "blockffn", "blockffn_w4a16",
           "w4a16_linear", "dense_linear", "compress_keys", "sparse_select_blocks")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of each kernel entry point."""
    calls = {name: 0 for name in KERNELS}
    for name in KERNELS:
        real = getattr(_kernels, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(_kernels, name, spy)
    return calls


@pytest.mark.parametrize("dtype,heads,kv_heads", [(torch.float16, 4, 1), (torch.bfloat16, 2, 2)],
                         ids=["fp16-hd64-gqa4", "bf16-hd128-mha"])
def test_decoder_forward_matches_torch_path(tiny_model_dir, kernel_calls, monkeypatch, dtype, heads, kv_heads) -> None:
    """Prefill, decode and a tree step through the kernels give the torch path's logits: against
    the model in fp32, the kernels' error is at most twice the torch path's at the same dtype."""
    path = tiny_model_dir("llama", hidden_size=256, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          intermediate_size=512)
    tokens = torch.randint(3, 200, (37,), generator=torch.Generator().manual_seed(0))
    tree = tree_visibility([-1, 0, 0, 1, 2])
    mask = pack_bits(tree)

    def run(dtype: torch.dtype) -> list[torch.Tensor]:
        model = load_model(str(path), device="cpu", dtype=dtype, max_context=256, with_tokenizer=False).model
        cache = model.new_cache()
        out = [model.logits(model.forward(tokens[:30], torch.arange(30), cache, 0).hidden)]
        out.append(model.logits(model.forward(tokens[30:31], torch.tensor([30]), cache, 30).hidden))
        depth = tree.sum(dim=1) - 1
        out.append(model.logits(model.forward(tokens[31:36], 31 + depth, cache, 31, tree_mask=mask).hidden))
        return [x.float() for x in out]

    kernel_logits = run(dtype)
    layers = 3  # tiny_model_dir's default
    assert kernel_calls["attention"] == 3 * layers and kernel_calls["apply_rope"] == 3 * layers
    assert kernel_calls["silu_and_mul"] == 3 * layers and kernel_calls["embedding"] == 3
    assert kernel_calls["rms_norm"] >= 3 * (2 * layers + 1)
    with monkeypatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        torch_logits = run(dtype)
        reference = run(torch.float32)
    for phase, ours, theirs, ref in zip(["prefill", "decode", "tree"], kernel_logits, torch_logits, reference):
        assert torch.isfinite(ours).all(), phase
        err, torch_err = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
        assert err <= 2 * torch_err + 1e-3 * ref.abs().max().item(), f"{phase}: {err:.3g} vs torch path {torch_err:.3g}"


def test_speculative_greedy_equals_plain_on_the_kernels(tiny_model_dir, tmp_path, kernel_calls) -> None:
    """The speculative invariant with every attention of the target and the draft on the kernels:
    tree verification (tree-mask kernel) must commit exactly the tokens plain decoding (causal
    kernel, one token at a time) produces."""
    path = tiny_model_dir("llama", seed=3, vocab_size=40, hidden_size=128, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2)
    llm = LLM(load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256, with_tokenizer=False))
    plain, result = plain_and_speculative(llm, tmp_path / "head", [1, 5, 9, 3, 17, 22, 8], 24,
                                          tree_size=16, depth=4, topk=4)
    assert result.token_ids == plain
    assert kernel_calls["attention"] > 0


def test_speculative_greedy_equals_plain_on_the_hopper_kernels(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """EDGESPEC_SM90_ATTENTION=1: the target's decode steps and tree verifications all run the
    Hopper kernels' row-invariant mode (the draft's small calls stay generic), and greedy
    speculative output still equals plain output."""
    path = tiny_model_dir("llama", seed=5, vocab_size=40, hidden_size=128, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2)
    llm = LLM(load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256, with_tokenizer=False))
    invariant_calls = []
    real = _kernels.attention

    def spy(*args, sm90=False, chunk_tiles=None, **kwargs):
        if chunk_tiles is not None:
            invariant_calls.append(sm90)
        return real(*args, sm90=sm90, chunk_tiles=chunk_tiles, **kwargs)

    monkeypatch.setattr(_kernels, "attention", spy)
    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "1")
    plain, result = plain_and_speculative(llm, tmp_path / "head", [1, 5, 9, 3, 17, 22, 8], 24,
                                          tree_size=16, depth=4, topk=4)
    assert result.token_ids == plain
    assert invariant_calls and all(invariant_calls)


@pytest.mark.parametrize("quantized", [False, True], ids=["bf16", "w4a16"])
def test_verified_logits_equal_decoded_logits_bitwise(tiny_model_dir, kernel_calls, quantized: bool) -> None:
    """Row invariance through a whole model on the kernels (dense GEMM or W4A16, attention's
    invariant mode, norms, RoPE, the LM head): see test_spec_helpers.assert_tree_rows_decode_alike."""
    path = tiny_model_dir("llama", seed=7, vocab_size=128, hidden_size=256, num_attention_heads=4,
                          num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2)  # head dim 64, GQA 4
    model = load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256, with_tokenizer=False).model
    assert_tree_rows_decode_alike(model, quantized)
    assert kernel_calls["attention"] > 0
    assert kernel_calls["w4a16_linear"] > 0 if quantized else kernel_calls["dense_linear"] > 0


def _max_error_vs_fp32(path, dtype: torch.dtype, run, monkeypatch) -> tuple[float, float, float]:
    """(kernel error, torch-path error, scale) of run(model) at `dtype` against the fp32 model."""
    def load(dt):
        return load_model(str(path), device="cpu", dtype=dt, max_context=1024, with_tokenizer=False).model

    ours = run(load(dtype)).float()
    with monkeypatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        theirs = run(load(dtype)).float()
        ref = run(load(torch.float32)).float()
    assert torch.isfinite(ours).all()
    return (ours - ref).abs().max().item(), (theirs - ref).abs().max().item(), ref.abs().max().item()


def test_blockffn_model_on_the_kernels(tmp_path, kernel_calls, monkeypatch) -> None:
    """A BlockFFN model (issue: chunk-sparse MoE) runs its FFNs through the blockffn kernels: logits
    match the torch path, and a speculative tree is verified as one BlockFFN step."""
    path = write_random_blockffn(tmp_path / "blockffn", hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2,
                                 num_experts=16, expert_size=32, seed=4)
    tokens = torch.randint(3, 200, (21,), generator=torch.Generator().manual_seed(1))

    def run(model):
        cache = model.new_cache()
        prefill = model.logits(model.forward(tokens[:20], torch.arange(20), cache, 0).hidden)
        decode = model.logits(model.forward(tokens[20:], torch.tensor([20]), cache, 20).hidden)
        return torch.cat([prefill, decode])

    err, torch_err, scale = _max_error_vs_fp32(path, torch.bfloat16, run, monkeypatch)
    assert kernel_calls["blockffn"] == 2 * 2  # two layers, prefill and decode
    assert err <= 2 * torch_err + 1e-3 * scale, f"{err:.3g} vs torch path {torch_err:.3g}"

    llm = LLM(load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256, with_tokenizer=False))
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    plain = llm.generate(prompt, max_new_tokens=16, ignore_eos=True)
    drafter = ModelDrafter(load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256,
                                      with_tokenizer=False).model, name="same-weights")
    enable_speculation(llm, draft=drafter, tree_size=8, depth=3, topk=2)
    fast = llm.generate(prompt, max_new_tokens=16, ignore_eos=True)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.extra["blockffn_tokens_per_step"] > 1.0


def test_blockffn_verified_logits_equal_decoded_logits_bitwise(tmp_path, kernel_calls) -> None:
    """Row invariance through a BlockFFN model on the kernels: a tree's steps activate the union of
    its tokens' experts, a decoded token only its own, and the logits agree bit for bit."""
    path = write_random_blockffn(tmp_path / "blockffn", hidden_size=256, num_heads=4, num_kv_heads=1, num_layers=2,
                                 num_experts=16, expert_size=32, seed=4)
    model = load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=256, with_tokenizer=False).model
    assert_tree_rows_decode_alike(model)
    assert kernel_calls["blockffn"] > 0 and kernel_calls["attention"] > 0


def _tile_layout(model):
    """The model with every 4-bit weight repacked into the kernel's tile layout (what loading onto
    a GPU does; on the CPU the loader keeps the plain layout the torch path reads faster)."""
    from edgespec.quant import QuantLinear

    for layer in model.layers:
        layer.qkv, layer.o = (lin.to(layout_name="tile") for lin in (layer.qkv, layer.o))
        layer.ffn.up, layer.ffn.down = (QuantLinear(w).to(layout_name="tile").weight
                                        for w in (layer.ffn.up, layer.ffn.down))
    return model


def test_blockffn_model_with_4bit_experts_on_the_kernels(tmp_path, kernel_calls, monkeypatch) -> None:
    """A BlockFFN model quantized to 4 bits (experts and attention projections) runs its FFNs on the
    router kernel + W4A16 expert gather and its projections on the W4A16 kernel: logits match the
    torch path, and greedy speculative output equals plain output on the kernels."""
    from edgespec.loading import LoadedModel
    from edgespec.quant import QuantSettings, quantize_decoder, quantized_copy

    path = write_random_blockffn(tmp_path / "blockffn", hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2,
                                 num_experts=8, expert_size=64, seed=5)
    def load(dtype):
        return load_model(str(path), device="cpu", dtype=dtype, max_context=256, with_tokenizer=False).model

    def quantized(dtype):  # the same 4-bit weights, the rest of the model in `dtype`
        model = quantized_copy(load(dtype), weights)
        return model if dtype == torch.float32 else _tile_layout(model)

    dense = load(torch.float32)
    weights = quantize_decoder(dense, QuantSettings(method="rtn", group_size=32))
    tokens = torch.randint(3, 200, (13,), generator=torch.Generator().manual_seed(2))

    def run(dtype):
        model = quantized(dtype)
        cache = model.new_cache()
        prefill = model.logits(model.forward(tokens[:12], torch.arange(12), cache, 0).hidden)
        decode = model.logits(model.forward(tokens[12:], torch.tensor([12]), cache, 12).hidden)
        return torch.cat([prefill, decode]).float()

    ours = run(torch.bfloat16)
    assert kernel_calls["blockffn_w4a16"] == 2 * 2 and kernel_calls["blockffn"] == 0
    assert kernel_calls["w4a16_linear"] == 2 * 2 * 2  # qkv and o, two layers, prefill and decode
    with monkeypatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        theirs = run(torch.bfloat16)
    ref = run(torch.float32)
    err, torch_err = (ours - ref).abs().max().item(), (theirs - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-3 * ref.abs().max().item(), f"{err:.3g} vs torch path {torch_err:.3g}"

    llm = LLM(LoadedModel(quantized(torch.bfloat16), None, "q4"))
    prompt = [5, 17, 23, 42, 8, 99, 150, 3]
    plain = llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
    enable_speculation(llm, draft=ModelDrafter(load(torch.bfloat16), name="dense"), tree_size=8, depth=3, topk=2)
    fast = llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
    assert fast.token_ids == plain.token_ids
    assert fast.stats.extra["blockffn_tokens_per_step"] > 1.0


def test_minicpm4_sparse_model_on_the_kernels(tiny_model_dir, kernel_calls, monkeypatch) -> None:
    """A MiniCPM4 model with InfLLM-v2 sparse attention past dense_len (512 tokens): compressed keys,
    block selection (the prefill's on the tensor-core score kernels) and block-sparse attention run
    on the kernels inside the decoder, and the logits
    of a long prefill and the decode steps after it match the torch path."""
    path = tiny_model_dir("llama", seed=3, num_attention_heads=4, num_key_value_heads=1, hidden_size=256,
                          intermediate_size=512, num_hidden_layers=2, max_position_embeddings=4096)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=256, sparse_config=SMALL)
    (path / "config.json").write_text(json.dumps(config))
    tokens = torch.randint(0, 200, (604,), generator=torch.Generator().manual_seed(0))

    def run(model):
        cache = model.new_cache()
        out = [model.logits(model.forward(tokens[:600], torch.arange(600), cache, 0).hidden[-8:])]
        for pos in range(600, 604):
            out.append(model.logits(model.forward(tokens[pos:pos + 1], torch.tensor([pos]), cache, pos).hidden))
        return torch.cat(out)

    err, torch_err, scale = _max_error_vs_fp32(path, torch.bfloat16, run, monkeypatch)
    # Per layer: the prefill's keys compressed once; the prefill (tensor-core scores) and 4 decodes selected.
    assert kernel_calls["compress_keys"] == 2 and kernel_calls["sparse_select_blocks"] == 2 * 5
    assert err <= 2 * torch_err + 1e-3 * scale, f"{err:.3g} vs torch path {torch_err:.3g}"


def test_minicpm4_sparse_verified_logits_equal_decoded_logits_bitwise(tiny_model_dir, kernel_calls) -> None:
    """Row invariance through a sparse model on the kernels, past dense_len (test_spec_helpers.
    assert_tree_rows_decode_alike): a tree across a block and kernel boundaries, its ancestors
    outside a one-block window, top-1 selection; the selection kernels score the tree with its
    paths' kernels and the attention kernels run the invariant mode with the block mask."""
    path = tiny_model_dir("llama", seed=3, num_attention_heads=4, num_key_value_heads=1, hidden_size=256,
                          intermediate_size=512, num_hidden_layers=2, max_position_embeddings=4096)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=256,
                  sparse_config={**SMALL, "dense_len": 64, "window_size": 64, "topk": 1})
    (path / "config.json").write_text(json.dumps(config))
    model = load_model(str(path), device="cpu", dtype=torch.bfloat16, max_context=512, with_tokenizer=False).model
    assert_tree_rows_decode_alike(model, prompt_len=187)
    assert kernel_calls["sparse_select_blocks"] > 0 and kernel_calls["attention"] > 0


def test_hopper_attention_inside_the_decoder(tiny_model_dir, monkeypatch) -> None:
    """EDGESPEC_SM90_ATTENTION=1: a prefill and a tree verification of 64+ packed rows run on the
    Hopper (wgmma) kernels inside the decoder (q a view of the fused QKV projection), the decode
    step on the generic one, and the logits match the torch path's accuracy. (A target model's
    verification stays on the generic kernels' row-invariant mode: the model here opts out of it,
    as a draft does.)"""
    path = tiny_model_dir("llama", hidden_size=256, num_attention_heads=4, num_key_value_heads=1,
                          intermediate_size=512, num_hidden_layers=2)
    tokens = torch.randint(3, 200, (91,), generator=torch.Generator().manual_seed(2))
    parents = [-1] + [i // 2 for i in range(19)]  # a 20-token binary tree: 80 packed rows
    tree = tree_visibility(parents)
    calls = []
    real = _kernels.attention

    def spy(*args, sm90=False, **kwargs):
        calls.append(sm90)
        return real(*args, sm90=sm90, **kwargs)

    def run(model):
        model.row_invariant_attention = False
        cache = model.new_cache()
        out = [model.logits(model.forward(tokens[:70], torch.arange(70), cache, 0).hidden[-4:])]
        out.append(model.logits(model.forward(tokens[70:71], torch.tensor([70]), cache, 70).hidden))
        depth = tree.sum(dim=1) - 1
        out.append(model.logits(model.forward(tokens[71:91], 71 + depth, cache, 71, tree_mask=pack_bits(tree)).hidden))
        return torch.cat(out)

    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "1")
    monkeypatch.setattr(_kernels, "attention", spy)
    err, torch_err, scale = _max_error_vs_fp32(path, torch.bfloat16, run, monkeypatch)
    layers = 2
    assert calls == [True] * layers + [False] * layers + [True] * layers  # the torch-path runs call none
    assert err <= 2 * torch_err + 1e-3 * scale, f"{err:.3g} vs torch path {torch_err:.3g}"
