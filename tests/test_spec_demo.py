"""The real demo model (SmolLM2-135M-Instruct) with its shipped, trained EAGLE head: greedy
speculative output equals greedy plain output in bf16, bit for bit, on 20 prompts with the Q4_1
weights on torch's CPU int4 kernel (the CPU default) and on 10 of them with the weights dequantised,
and on those 10 in fp32; and the head earns its keep."""
from __future__ import annotations

import pytest
import torch

from edgespec.spec import DEMO_HEAD, enable_speculation
from test_spec_helpers import one_thread  # noqa: F401 (autouse fixture)

PROMPTS = [
    ("chat", "What is two plus two?"), ("chat", "Name three colors of the rainbow."),
    ("chat", "Write a sentence about the ocean."), ("chat", "How do plants make food?"),
    ("chat", "Give me a tip for learning to cook."), ("chat", "What is a prime number?"),
    ("chat", "Translate 'good morning' into French."), ("chat", "Why is exercise healthy?"),
    ("chat", "Describe a cat in one sentence."), ("chat", "What does a compiler do?"),
    ("chat", "Suggest a name for a pet goldfish."), ("chat", "What is the boiling point of water?"),
    ("text", "Once upon a time, in a small village by the sea,"), ("text", "The three laws of motion state that"),
    ("text", "import os\nimport sys\n\ndef main():\n"), ("text", "Chapter 1\n\nIt was a cold morning when"),
    ("text", "The best way to learn a language is"), ("text", "Water is made of hydrogen and"),
    ("text", "In 1969, the first humans"), ("text", "To install the package, run"),
]
NEW_TOKENS = 32


def test_the_demo_head_is_shipped():
    # Part of the package (an install that dropped it would silently turn speculation off).
    assert {p.name for p in DEMO_HEAD.iterdir()} >= {"config.json", "model.safetensors", "frspec.json"}
    assert (DEMO_HEAD / "model.safetensors").stat().st_size < 10 << 20  # small enough to ship in the wheel


@pytest.fixture(scope="module")
def demo_bf16(demo_gguf):
    from edgespec import LLM

    return LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=2048, draft=None,
                    quantized=False)


@pytest.fixture(scope="module")
def demo_bf16_4bit(demo_gguf):
    """The CPU default in bf16: Q4_1 projections on torch's int4 kernel, a small default tree."""
    from edgespec import LLM
    from edgespec.ops import w4a16_cpu

    if not w4a16_cpu.available():
        pytest.skip("this torch has no CPU int4 kernel")
    return LLM.load(str(demo_gguf), device="cpu", dtype=torch.bfloat16, max_context=2048, draft=None)


# Mean tokens per target forward the head must beat: the 4-bit default tree (3 nodes, depth 3)
# accepts at most 4 per step.
MIN_ACCEPTED = {"bf16": 2.0, "fp32": 2.0, "bf16_4bit": 1.7}


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["bf16", "fp32", "bf16_4bit"])
def test_demo_greedy_speculative_equals_plain(request, weights):
    llm = request.getfixturevalue({"bf16": "demo_bf16", "fp32": "demo_llm", "bf16_4bit": "demo_bf16_4bit"}[weights])
    # All 20 for the CPU default (4-bit); every other one for the dequantised weights, the slower
    # cases (bf16 is bit for bit on the tiny models too: test_spec_greedy) and not the default.
    prompts = PROMPTS if weights == "bf16_4bit" else PROMPTS[::2]
    ids = [llm.encode(p, chat=kind == "chat") for kind, p in prompts]
    enable_speculation(llm, None)
    plain = [llm.generate(i, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids for i in ids]
    enable_speculation(llm, draft=str(DEMO_HEAD))
    try:
        results = [llm.generate(i, max_new_tokens=NEW_TOKENS, ignore_eos=True) for i in ids]
    finally:
        enable_speculation(llm, None)  # the fixture is shared: leave it as plain decoding
    for (kind, p), want, got in zip(prompts, plain, results):
        assert got.token_ids == want, f"speculative output differs from plain output for {p!r}"
    steps = sum(sum(r.stats.extra["acceptance_histogram"].values()) for r in results)
    tokens = sum(int(k) * v for r in results for k, v in r.stats.extra["acceptance_histogram"].items())
    # A trained head: on average well over one token per target forward.
    assert tokens / steps > MIN_ACCEPTED[weights]
