"""Whole models on the emulated CUDA kernels: the op layer routes every op its kernels take
(embedding, RMSNorm, RoPE, attention, SiLU-and-mul, argmax) to them, exactly as on a GPU, and the
results must match the torch path. This checks the wiring of the kernels into the decoder and the
speculative driver, not only each kernel alone."""
from __future__ import annotations

import pytest
import torch

from edgespec import LLM
from edgespec.loading import load_model
from edgespec.ops import _kernels
from edgespec.spec import disable_speculation, enable_speculation
from edgespec.spec.train_head import random_head
from oracle.attention import pack_bits, tree_visibility

pytestmark = [pytest.mark.emulated, pytest.mark.usefixtures("emulated_ops")]

KERNELS = ("embedding", "rms_norm", "apply_rope", "attention", "silu_and_mul")


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
    prompt = [1, 5, 9, 3, 17, 22, 8]
    disable_speculation(llm)
    plain = llm.generate(prompt, max_new_tokens=24, ignore_eos=True).token_ids
    head = random_head(llm.model.config, tmp_path / "head", seed=1, std=0.4)
    enable_speculation(llm, draft=str(head), tree_size=16, depth=4, topk=4)
    result = llm.generate(prompt, max_new_tokens=24, ignore_eos=True)
    assert result.token_ids == plain
    histogram = {int(k): v for k, v in result.stats.extra["acceptance_histogram"].items()}
    assert sum(k * v for k, v in histogram.items()) > sum(histogram.values()), "no draft token was ever accepted"
    assert kernel_calls["attention"] > 0
