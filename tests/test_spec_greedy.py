"""The speculative invariant: greedy speculative output equals greedy plain output, token for token.

Tiny random Llama/Qwen2/Qwen3 targets (fp32) with random EAGLE-1/2 heads (plain and fusing lower
layers), EAGLE-3 heads and standalone draft models, over many seeds, tree sizes from 1 to 90
(masks of two words), depths 1 to 8 and top-k 1 to 8; a small vocabulary makes random drafts hit
often enough that long accepted paths, sibling acceptance and KV compaction all occur (checked
through the statistics).
"""
from __future__ import annotations

import random

import pytest
import torch

from edgespec.spec import disable_speculation, enable_speculation, speculation_info
from edgespec.spec.train_head import random_head
from test_spec_helpers import eagle3_head, one_thread, run, tiny_llm  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 40
NEW_TOKENS = 28



@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    from conftest import write_tiny_hf_model

    root = tmp_path_factory.mktemp("spec-targets")
    out = {}
    for arch, seed in (("llama", 11), ("qwen2", 12), ("qwen3", 13)):
        d = write_tiny_hf_model(root / arch, arch, seed, vocab_size=VOCAB, num_hidden_layers=4)
        out[arch] = (d, tiny_llm(d))
    return out


PROMPTS = [[1, 5, 9, 3, 17], [1, 30, 2, 2, 8, 14, 6, 39, 21, 4, 7], [1]]


def plain_outputs(llm) -> list[list[int]]:
    disable_speculation(llm)
    return [run(llm, p, NEW_TOKENS) for p in PROMPTS]


def check_equal(llm, expected, **spec) -> dict:
    enable_speculation(llm, **spec)
    got = [llm.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True) for p in PROMPTS]
    disable_speculation(llm)
    for p, e, g in zip(PROMPTS, expected, got):
        assert g.token_ids == e, f"speculative != plain for prompt {p} with {spec}"
    hists = [{int(k): v for k, v in g.stats.extra["acceptance_histogram"].items()} for g in got]
    return {"steps": sum(sum(h.values()) for h in hists),
            "committed": sum(k * v for h in hists for k, v in h.items()),
            "max_accept": max(k for h in hists for k in h)}


def settings_for(seed: int) -> dict:
    r = random.Random(seed)
    depth = 1 + seed % 8
    topk = r.choice([1, 2, 3, 4, 8])
    tree_size = r.choice([1, 3, 8, 16, 40, 65, 90])
    return {"tree_size": tree_size, "depth": depth, "topk": topk}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_eagle_heads_many_seeds(targets, tmp_path, arch):
    d, llm = targets[arch]
    expected = plain_outputs(llm)
    total = {"steps": 0, "committed": 0, "max_accept": 0}
    for seed in range(8):
        head = random_head(llm.model.config, tmp_path / f"head{seed}", seed=seed, std=0.4)
        spec = settings_for(seed + 10 * len(arch))
        res = check_equal(llm, expected, draft=str(head), **spec)
        total["steps"] += res["steps"]
        total["committed"] += res["committed"]
        total["max_accept"] = max(total["max_accept"], res["max_accept"])
    # Random heads over 40 tokens still hit: acceptance happened, not only bonus tokens.
    assert total["committed"] > total["steps"]


@pytest.fixture(scope="module")
def bf16_targets(targets):
    return {arch: tiny_llm(d, dtype=torch.bfloat16) for arch, (d, _) in targets.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_bf16_speculative_equals_plain_bit_for_bit(bf16_targets, tmp_path, arch):
    """bf16, the CPU default: a verified tree token gets bitwise the logits it gets decoded alone
    (row-invariant ops.linear and ops.attention), so outputs agree even where bf16 logits tie.
    Long generations cross the attention's head/tail split (64 positions) several times; trees
    up to 90 tokens span two mask words and three linear row blocks."""
    llm = bf16_targets[arch]
    n = 150
    disable_speculation(llm)
    expected = [run(llm, p, n) for p in PROMPTS]
    for seed in range(4):
        head = random_head(llm.model.config, tmp_path / f"head{seed}", seed=seed, std=0.4)
        spec = [{"tree_size": 90, "depth": 8, "topk": 8}, {"tree_size": 12, "depth": 5, "topk": 4},
                {"tree_size": 40, "depth": 3, "topk": 6}, {"tree_size": 65, "depth": 7, "topk": 3}][seed]
        enable_speculation(llm, draft=str(head), **spec)
        try:
            got = [run(llm, p, n) for p in PROMPTS]
        finally:
            disable_speculation(llm)
        assert got == expected, f"bf16 speculative != plain with {spec}"


def test_large_trees_and_all_depths(targets, tmp_path):
    d, llm = targets["llama"]
    expected = plain_outputs(llm)
    head = random_head(llm.model.config, tmp_path / "head", seed=3, std=0.4)
    for depth in range(1, 9):
        for tree_size, topk in ((65, 8), (90, 6), (5, 2)):
            check_equal(llm, expected, draft=str(head), tree_size=tree_size, depth=depth, topk=topk)


PENALTIES = [dict(repetition_penalty=1.5), dict(presence_penalty=1.0, frequency_penalty=0.5),
             dict(repetition_penalty=0.7, frequency_penalty=-1.0),
             dict(logit_bias={t: float(t % 5 - 2) for t in range(0, 40, 3)})]


@pytest.mark.parametrize("penalties", PENALTIES, ids=["repetition", "presence-frequency", "negative", "bias"])
def test_penalties_keep_speculative_equal_to_plain(targets, tmp_path, penalties):
    """Each tree row is penalised for its own history, the committed tokens plus its path: with
    40 tokens, paths repeat tokens often, so a row penalised for the wrong history would pick
    another argmax somewhere. A logit bias (alone, in the last case) applies to every row."""
    d, llm = targets["llama"]
    disable_speculation(llm)
    expected = [run(llm, p, NEW_TOKENS, **penalties) for p in PROMPTS]
    assert expected != plain_outputs(llm), "the penalties changed nothing: the comparison would prove little"
    head = random_head(llm.model.config, tmp_path / "head", seed=3, std=0.4)
    accepted = []
    for tree_size, depth, topk in ((40, 6, 4), (8, 8, 1), (90, 3, 8)):
        enable_speculation(llm, draft=str(head), tree_size=tree_size, depth=depth, topk=topk)
        got = [llm.generate(p, max_new_tokens=NEW_TOKENS, ignore_eos=True, **penalties) for p in PROMPTS]
        disable_speculation(llm)
        assert [g.token_ids for g in got] == expected, f"speculative != plain with {penalties}, tree {tree_size}"
        accepted += [int(k) for g in got for k in g.stats.extra["acceptance_histogram"]]
    assert max(accepted) > 2, "no path of two draft tokens was ever accepted"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_eagle_heads_with_fused_lower_layers(targets, tmp_path, arch):
    """EAGLE-1/2 heads that fuse lower target layers (captured at prefill and at every verification)."""
    d, llm = targets[arch]
    expected = plain_outputs(llm)
    for seed, layers in enumerate([(1,), (0, 2), (3, 1, 2)]):
        head = random_head(llm.model.config, tmp_path / f"fused{seed}", seed=seed, std=0.4, fuse_layers=layers)
        for spec in ({"tree_size": 12, "depth": 5, "topk": 3}, {"tree_size": 70, "depth": 4, "topk": 8},
                     {"tree_size": 5, "depth": 5, "topk": 1}):
            check_equal(llm, expected, draft=str(head), **spec)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_eagle3_heads(targets, tmp_path, arch):
    d, llm = targets[arch]
    expected = plain_outputs(llm)
    for seed, (draft_vocab, layers) in enumerate([(VOCAB, None), (23, None), (30, [0, 2, 4])]):
        head = eagle3_head(llm.model.config, tmp_path / f"e3-{seed}", seed=seed, draft_vocab=draft_vocab,
                           layers=layers)
        for spec in ({"tree_size": 12, "depth": 4, "topk": 3}, {"tree_size": 70, "depth": 6, "topk": 8},
                     {"tree_size": 4, "depth": 4, "topk": 1}):
            check_equal(llm, expected, draft=str(head), **spec)


def test_self_draft_accepts_long_paths(targets):
    """The target as its own draft model: every drafted argmax is accepted, so whole trees commit
    (long compactions from scattered slots) and the output is still the plain one."""
    d, llm = targets["qwen2"]
    expected = plain_outputs(llm)
    res = check_equal(llm, expected, draft=str(d), tree_size=20, depth=6, topk=3)
    assert res["max_accept"] >= 5  # paths through several depths (the rerank may trim the deepest)
    assert res["committed"] / res["steps"] > 4
    res = check_equal(llm, expected, draft=str(d), tree_size=8, depth=8, topk=1)
    assert res["max_accept"] == 9


def test_other_draft_model(targets):
    """A different small model with the same vocabulary (here another random Qwen3) as the draft."""
    _, llm = targets["llama"]
    d_draft, _ = targets["qwen3"]
    expected = plain_outputs(llm)
    for spec in ({"tree_size": 16, "depth": 5, "topk": 4}, {"tree_size": 6, "depth": 6, "topk": 1},
                 {"tree_size": 66, "depth": 3, "topk": 8}):
        check_equal(llm, expected, draft=str(d_draft), **spec)


def test_frspec_restricted_draft(targets, tmp_path):
    """An FR-Spec vocabulary (a subset the argmax often falls outside of) changes only speed."""
    import json

    d, llm = targets["qwen3"]
    expected = plain_outputs(llm)
    vocab = tmp_path / "v.json"
    vocab.write_text(json.dumps({"token_ids": list(range(0, VOCAB, 3)) + [1, 2]}))
    head = random_head(llm.model.config, tmp_path / "head", seed=7, std=0.4)
    check_equal(llm, expected, draft=str(head), tree_size=16, depth=4, topk=4, frspec_vocab=str(vocab))
    check_equal(llm, expected, draft=str(d), tree_size=16, depth=4, topk=4, frspec_vocab=str(vocab))


def test_context_end_and_token_budget(targets, tmp_path):
    """Trees are cut so positions stay inside the context and no deeper than the tokens still wanted."""
    d, _ = targets["llama"]
    llm = tiny_llm(d, max_context=40)
    prompt = PROMPTS[1]
    disable_speculation(llm)
    plain = [run(llm, prompt, n) for n in (1, 2, 7, 29)]
    enable_speculation(llm, draft=str(d), tree_size=20, depth=8, topk=3)
    assert [run(llm, prompt, n) for n in (1, 2, 7, 29)] == plain
    assert len(plain[-1]) == 29  # the context (40) minus the prompt (11) is exhausted exactly


def test_speculation_info_and_off(targets, tmp_path):
    d, llm = targets["llama"]
    head = random_head(llm.model.config, tmp_path / "head", seed=1)
    enable_speculation(llm, draft=str(head), tree_size=9, depth=3, topk=2, lookup=5)
    assert speculation_info(llm) == {"draft": "eagle:head", "tree_size": 9, "depth": 3, "topk": 2, "lookup": 5}
    stats = llm.generate(PROMPTS[0], max_new_tokens=5, ignore_eos=True).stats.as_dict()
    assert stats["mean_accepted_length"] >= 1.0 and sum(stats["acceptance_histogram"].values()) == stats["steps"]
    disable_speculation(llm)
    assert speculation_info(llm) is None
    assert "mean_accepted_length" not in llm.generate(PROMPTS[0], max_new_tokens=5).stats.as_dict()


def test_trees_past_the_row_invariant_bound_are_flagged(targets, tmp_path, caplog):
    """A tree verifies as up to tree_size + lookup + 1 rows; past INVARIANT_ROWS the projections run as one GEMM
    (prefill's path), so greedy equality holds only up to rounding, and enabling such a tree says so."""
    from edgespec.ops.linear import INVARIANT_ROWS

    d, llm = targets["llama"]
    try:
        with caplog.at_level("WARNING", logger="edgespec.spec.api"):
            enable_speculation(llm, draft=str(d), tree_size=INVARIANT_ROWS - 1, depth=4, topk=4, lookup=0)
            assert not caplog.records
            enable_speculation(llm, draft=str(d), tree_size=INVARIANT_ROWS - 5, depth=4, topk=4, lookup=4)
            assert not caplog.records
            enable_speculation(llm, draft=str(d), tree_size=INVARIANT_ROWS, depth=4, topk=4, lookup=0)
            enable_speculation(llm, draft=str(d), tree_size=INVARIANT_ROWS - 5, depth=4, topk=4, lookup=5)
        assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
        assert f"{INVARIANT_ROWS} rows or fewer keep it token for token" in caplog.records[0].getMessage()
        assert f"lookup 5: a tree and its root verify as up to {INVARIANT_ROWS + 1} rows" in caplog.records[1].getMessage()
    finally:
        disable_speculation(llm)
