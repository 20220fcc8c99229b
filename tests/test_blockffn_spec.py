"""The speculative invariant on a BlockFFN target: greedy speculative output equals greedy plain
output token for token, while each verify step runs the whole draft tree as one BlockFFN step
(the union of the tree tokens' experts)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgespec import LLM
from edgespec.loading import load_model
from edgespec.models.blockffn import write_random_blockffn

spec = pytest.importorskip("edgespec.spec", reason="the speculative decoding package is not available")

PROMPT = [5, 17, 23, 42, 8, 99, 150, 3, 61, 77, 12, 200]


def _load(directory: Path):
    return load_model(str(directory), device="cpu", dtype=torch.float32, with_tokenizer=False, max_context=256)


@pytest.mark.parametrize("draft_kind", ["same-weights", "other-model"])
def test_greedy_speculative_equals_plain_on_blockffn(tmp_path: Path, draft_kind: str) -> None:
    target_dir = write_random_blockffn(tmp_path / "target", num_layers=3, num_experts=24, expert_size=32, seed=4)
    llm = LLM(_load(target_dir))
    plain = llm.generate(PROMPT, max_new_tokens=40, ignore_eos=True)
    assert plain.stats.extra["blockffn_tokens_per_step"] == 1.0

    # Drafting with the target's own weights accepts every drafted token (long accepted paths);
    # a different random model is mostly rejected (the bonus-token path). Both must match plain.
    draft_dir = target_dir if draft_kind == "same-weights" else write_random_blockffn(
        tmp_path / "draft", num_layers=1, num_experts=8, expert_size=32, seed=9)
    drafter = spec.ModelDrafter(_load(draft_dir).model, name=draft_kind)
    spec.enable_speculation(llm, draft=drafter, tree_size=16, depth=4, topk=3)
    fast = llm.generate(PROMPT, max_new_tokens=40, ignore_eos=True)

    assert fast.token_ids == plain.token_ids
    s = fast.stats.extra
    assert s["blockffn_steps"] == fast.stats.steps  # one BlockFFN step per target forward
    # Verify steps carry the tree: more than one token per BlockFFN step, and the chunk (tree)
    # sparsity is at most the token-level sparsity.
    assert s["blockffn_tokens_per_step"] > 1.0
    assert 0.0 <= s["blockffn_chunk_sparsity"] <= s["blockffn_token_sparsity"] < 1.0
    if draft_kind == "same-weights":
        assert s["mean_accepted_length"] > 2.0 and fast.stats.steps < plain.stats.steps / 2
