"""Prompt lookup grafted onto a draft model's trees (TreeSettings.lookup): DraftTree.graft checked
node by node; greedy output equal to plain decoding with a random EAGLE head on a tiny model and
with the shipped head on the demo model (a copying task, where the chain must be accepted); a
grammar; the API, CLI and statistics. The sampling test (lossless) is in test_spec_sampling.py.
"""
from __future__ import annotations

import pytest

from edgespec.spec import (DEMO_HEAD, TreeSettings, default_settings, disable_speculation, enable_speculation,
                           speculation_info)
from edgespec.spec.decoding import cache_slack
from edgespec.spec.train_head import random_head
from edgespec.spec.tree import DeviceTree, DraftTree
from test_spec_helpers import one_thread, tiny_llm  # noqa: F401 (one_thread: autouse fixture)


def nodes(tree: DraftTree) -> list[tuple[int, int]]:
    """(token, parent) of every node below the root."""
    return list(zip(tree.tokens, tree.parents))[1:]


def test_graft_merges_shared_paths_and_appends_the_rest():
    # The model's tree: 5 -> (3 -> 4, 6), 5 being the root.
    model = DraftTree([5, 3, 6, 4], [-1, 0, 0, 1], [0, 1, 1, 2], [0.0, -0.1, -0.9, -0.5], children_bound=2)
    chain = DraftTree.from_parents([5, 3, 4, 8, 9], [-1, 0, 1, 2, 3])   # shares 3 -> 4, then goes on
    merged = model.graft(chain)
    assert nodes(merged) == [(3, 0), (6, 0), (4, 1), (8, 3), (9, 4)]
    assert merged.depths == [0, 1, 1, 2, 3, 4] and merged.scores[:4] == model.scores
    other = DraftTree.from_parents([5, 7, 3], [-1, 0, 1])                # a third child of the root
    merged = model.graft(other)
    assert nodes(merged) == [(3, 0), (6, 0), (4, 1), (7, 0), (3, 4)]
    assert merged.children[0] == [1, 2, 4] and merged.children_bound == 2
    # The acceptance's children table holds all three children, past the drafting bound.
    table = DeviceTree.from_host(merged, "cpu").children_table()
    assert table.shape[1] == 3 and table[0].tolist() == [1, 2, 4]
    assert nodes(model.graft(DraftTree.from_parents([5], [-1]))) == nodes(model)    # nothing to add
    assert nodes(model.graft(DraftTree.from_parents([5, 3, 4], [-1, 0, 1]))) == nodes(model)
    with pytest.raises(ValueError, match="different roots"):
        model.graft(DraftTree.from_parents([2, 3], [-1, 0]))


def test_settings_count_the_lookup_tokens():
    s = TreeSettings(tree_size=10, depth=4, topk=3, lookup=6).validate()
    assert s.verified == 17 and cache_slack(s) == 18
    assert TreeSettings(10, 4, 3).verified == 11
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="lookup must be a non-negative integer"):
            TreeSettings(10, 4, 3, lookup=bad).validate()


# ---- through the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import write_tiny_hf_model

    root = tmp_path_factory.mktemp("lookup")
    d = write_tiny_hf_model(root / "m", "llama", 5, vocab_size=24, num_hidden_layers=2)
    # A second random model with the same vocabulary: a standalone draft model.
    draft = write_tiny_hf_model(root / "draft", "llama", 6, vocab_size=24, num_hidden_layers=1)
    llm = tiny_llm(d)
    return llm, random_head(llm.model.config, root / "head", seed=3, std=0.5), draft


@pytest.mark.parametrize("shape", [(4, 3, 2, 6), (1, 1, 1, 3)], ids=["tree", "one-token"])
@pytest.mark.parametrize("kind", ["head", "model"])
def test_greedy_equals_plain_decoding(tiny, shape, kind):
    """A random head's or model's trees are mostly rejected; the prompts repeat, so lookup chains
    are grafted, and some accepted: the tokens stay plain decoding's."""
    llm, head, draft_model = tiny
    draft = head if kind == "head" else draft_model
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 9, 5, 9, 7], list(range(3, 20))]
    plain = [llm.generate(p, max_new_tokens=40, ignore_eos=True).token_ids for p in prompts]
    size, depth, topk, lookup = shape
    settings = enable_speculation(llm, str(draft), tree_size=size, depth=depth, topk=topk, lookup=lookup)
    assert settings == TreeSettings(*shape) and speculation_info(llm)["lookup"] == lookup
    try:
        results = [llm.generate(p, max_new_tokens=40, ignore_eos=True) for p in prompts]
    finally:
        disable_speculation(llm)
    assert [r.token_ids for r in results] == plain
    extras = [r.stats.extra for r in results]
    assert all(e["lookup"] == lookup and e["draft"].startswith("eagle" if kind == "head" else "model") for e in extras)
    assert sum(e["lookup_accepted_tokens"] for e in extras) > 0, extras   # some chain was accepted
    assert max(e["mean_tree_size"] for e in extras) > size, extras          # and trees grew past tree_size


def test_lookup_is_for_draft_models(tiny):
    llm, head, _ = tiny
    with pytest.raises(ValueError, match="prompt lookup's already"):
        enable_speculation(llm, "ngram", lookup=4)
    with pytest.raises(ValueError, match="non-negative"):
        enable_speculation(llm, str(head), lookup=-2)
    with pytest.raises(ValueError, match="does not fit a context"):
        enable_speculation(llm, str(head), tree_size=8, lookup=llm.max_context)
    assert speculation_info(llm) is None
    try:  # the device's default, unless told
        enable_speculation(llm, str(head), tree_size=4, depth=2, topk=2)
        assert speculation_info(llm)["lookup"] == default_settings(llm.model).lookup > 0
        enable_speculation(llm, str(head), tree_size=4, depth=2, topk=2, lookup=0)
        extra = llm.generate([1, 2, 1, 2], max_new_tokens=6, ignore_eos=True).stats.extra
        assert speculation_info(llm)["lookup"] == 0 and "lookup" not in extra
    finally:
        disable_speculation(llm)


def test_the_demo_head_accepts_copied_text(demo_llm):
    """A copying request: the shipped head's trees plus lookup chains give plain decoding's tokens,
    more of them per step than the head alone, part of them from the chains."""
    text = ("Alice sent Bob the quarterly report on Tuesday at noon; Bob forwarded it to Carol, "
            "who filed it under finance/2026/q3 before the meeting in room 42.")
    ids = demo_llm.encode([{"role": "user", "content": f"Repeat this text exactly:\n{text}"}])
    plain = demo_llm.generate(ids, max_new_tokens=48)
    accepted = {}
    for lookup in (0, 8):
        enable_speculation(demo_llm, str(DEMO_HEAD), tree_size=4, depth=4, topk=2, lookup=lookup)
        try:
            spec = demo_llm.generate(ids, max_new_tokens=48)
        finally:
            enable_speculation(demo_llm, None)
        assert spec.token_ids == plain.token_ids
        accepted[lookup] = spec.stats.extra["mean_accepted_length"]
    assert text[:40] in plain.text  # the premise: it copies
    assert spec.stats.extra["lookup_accepted_tokens"] > 8, spec.stats.extra
    assert accepted[8] > accepted[0] + 0.5, accepted


def test_a_grammar_cuts_the_chain_too(demo_llm):
    pytest.importorskip("llguidance")
    from edgespec.structured import Grammar

    schema = Grammar.json({"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                                            "street": {"type": "string", "maxLength": 40}},
                           "required": ["city", "street"], "additionalProperties": False})
    ask = [{"role": "user", "content": "Return this record as JSON with keys city and street: "
                                       "city Lyon-sur-Saône-et-Loire, street 14 Boulevard des Capucines"}]
    ids = demo_llm.encode(ask)
    plain = demo_llm.generate(ids, max_new_tokens=40, grammar=schema)
    enable_speculation(demo_llm, str(DEMO_HEAD), tree_size=4, depth=4, topk=2, lookup=6)
    try:
        spec = demo_llm.generate(ids, max_new_tokens=40, grammar=schema)
    finally:
        enable_speculation(demo_llm, None)
    assert spec.token_ids == plain.token_ids and "Capucines" in plain.text  # the premise: it copies
    assert spec.stats.extra["lookup_accepted_tokens"] > 4, spec.stats.extra

