"""Chat prompts sampled from the target itself (train-draft --self-prompts, the Magpie method)."""
from __future__ import annotations

import pytest

from edgespec.errors import ModelFormatError
from edgespec.loading import Tokenizer
from edgespec.spec.self_prompts import sample_user_prompts, user_turn_prefix
from edgespec.spec.train import Prompt


class _StubHF:
    """The two attributes user_turn_prefix reads from a transformers tokenizer."""

    eos_token_id = None

    def __init__(self, template: str | None, render: str = "") -> None:
        self.chat_template = template
        self._render = render

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return self._render.replace("USER", messages[0]["content"])


def test_prefix_is_the_template_before_the_user_text(demo_llm):
    tok = demo_llm.tokenizer
    prefix = user_turn_prefix(tok)
    assert tok.decode(prefix, skip_special_tokens=False).endswith("<|im_start|>user\n")
    full = tok.apply_chat_template([{"role": "user", "content": "Name a planet."}])
    assert full[:len(prefix)] == prefix


def test_templates_that_cannot_start_a_user_turn():
    with pytest.raises(ModelFormatError, match="needs a chat template"):
        user_turn_prefix(Tokenizer(_StubHF(None), [], "stub"))
    with pytest.raises(ModelFormatError, match="no marker before the user's text"):
        user_turn_prefix(Tokenizer(_StubHF("t", render="USER</s>"), [], "stub"))


@pytest.mark.slow
def test_sampled_prompts_are_finished_distinct_and_reproducible(demo_llm):
    got = sample_user_prompts(demo_llm, 3, batch=4, max_tokens=48, seed=5, progress=False)
    assert 1 <= len(got) <= 3
    assert all(isinstance(p, Prompt) and p.chat and len(p.text.split()) >= 3 for p in got)
    assert len({p.text.casefold() for p in got}) == len(got)
    assert sample_user_prompts(demo_llm, 3, batch=4, max_tokens=48, seed=5, progress=False) == got
    # Excluded prompts (e.g. the training set, when sampling held-out ones) never come back.
    again = sample_user_prompts(demo_llm, 3, batch=4, max_tokens=48, seed=5, progress=False, exclude=got[:1])
    assert got[0].text.casefold() not in {p.text.casefold() for p in again}


@pytest.mark.slow
def test_openers_start_every_prompt(demo_llm):
    openers = ["Write a poem", "Why do", "Explain how"]
    got = sample_user_prompts(demo_llm, 6, batch=6, max_tokens=48, seed=3, openers=openers, progress=False)
    assert len(got) >= 3
    assert all(any(p.text.startswith(o + " ") for o in openers) for p in got), got
    assert len({p.text.split()[0] for p in got}) >= 2  # drawn per sample, not one opener for all
    assert sample_user_prompts(demo_llm, 6, batch=6, max_tokens=48, seed=3, openers=openers, progress=False) == got


def test_unfinished_turns_are_dropped_and_sampling_gives_up(demo_llm):
    # One token is never a finished turn of three words: every sample is rejected, and the
    # sampler stops after its bounded number of batches instead of looping.
    assert sample_user_prompts(demo_llm, 2, batch=2, max_tokens=1, seed=0, progress=False) == []


def test_bad_arguments(demo_llm):
    with pytest.raises(ValueError, match="temperature > 0"):
        sample_user_prompts(demo_llm, 2, temperature=0.0, progress=False)
    with pytest.raises(ValueError, match="count >= 0"):
        sample_user_prompts(demo_llm, -1, progress=False)
    with pytest.raises(ValueError, match="an opener is empty"):
        sample_user_prompts(demo_llm, 2, openers=["Why", " "], progress=False)
