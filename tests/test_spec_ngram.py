"""Prompt lookup (edgespec.spec.ngram): trees looked up in the sequence itself, checked node by node
on hand-made sequences; greedy speculative output equal to plain decoding on a tiny random model and
on the demo model (a copying task, where the drafts must be accepted many at a time); the CLI and
API entry points. The sampling test (lossless) is in test_spec_sampling.py.
"""
from __future__ import annotations

import pytest

from edgespec.spec import NgramDrafter, TreeSettings, disable_speculation, enable_speculation, speculation_info
from test_spec_helpers import one_thread, tiny_llm  # noqa: F401 (one_thread: autouse fixture)

WIDE = TreeSettings(tree_size=20, depth=5, topk=3)


def tree_of(sequence: list[int], settings: TreeSettings = WIDE, max_depth: int = 99, pick=None,
            drafter: NgramDrafter | None = None) -> list[tuple[int, int]]:
    """(token, parent) of every node below the root."""
    drafter = drafter or NgramDrafter()
    drafter.sequence = sequence
    tree = drafter.draft_tree(sequence[-1], settings, max_depth, pick)
    return list(zip(tree.tokens, tree.parents))[1:]


def test_the_longest_ngram_decides_and_recent_occurrences_come_first():
    # The sequence ends with 0 7 8 9, which occurred once before (followed by 3 4 5 0 7); "7 8 9"
    # occurred twice (also followed by 1 2 0 8 9), "8 9" three times (also by 6 0 7 8 9).
    seq = [7, 8, 9, 1, 2, 0, 8, 9, 6, 0, 7, 8, 9, 3, 4, 5, 0, 7, 8, 9]
    upto3 = NgramDrafter(max_n=3)
    assert tree_of(seq, drafter=upto3) == [(3, 0), (4, 1), (5, 2), (0, 3), (7, 4),   # most recent: 3 4 5 0 7
                                           (1, 0), (2, 6), (0, 7), (8, 8), (9, 9)]   # then 1 2 0 8 9
    assert tree_of(seq) == [(3, 0), (4, 1), (5, 2), (0, 3), (7, 4)]   # n = 4 matched: the one continuation
    assert tree_of(seq, TreeSettings(20, 5, 1), drafter=upto3) == [(3, 0), (4, 1), (5, 2), (0, 3), (7, 4)]


def test_shared_continuations_merge_and_limits_hold():
    seq = [1, 2, 3, 4, 0, 1, 2, 3, 5, 0, 1, 2, 3, 4, 6, 0, 1, 2]
    # Continuations of "0 1 2" (n = 3), most recent first: 3 4 6 and 3 5 0, one trie below the root.
    assert tree_of(seq, TreeSettings(20, 3, 3)) == [(3, 0), (4, 1), (6, 2), (5, 1), (0, 4)]
    assert tree_of(seq, TreeSettings(4, 3, 3)) == [(3, 0), (4, 1), (6, 2), (5, 1)]   # tree_size
    assert tree_of(seq, TreeSettings(20, 3, 3), max_depth=1) == [(3, 0)]             # the room left
    assert tree_of(seq, TreeSettings(20, 3, 3), max_depth=0) == []


def test_no_earlier_occurrence_drafts_nothing():
    assert tree_of([1, 2, 3, 4]) == [] and tree_of([5]) == []
    assert tree_of([1, 2, 3, 4], drafter=NgramDrafter(min_n=2)) == []
    assert tree_of([3, 9, 3], drafter=NgramDrafter(min_n=1)) == [(9, 0), (3, 1)]   # a unigram match
    assert tree_of([3, 9, 3], drafter=NgramDrafter(min_n=2)) == []


def test_a_grammar_cuts_what_it_refuses():
    seq = [7, 8, 9, 1, 2, 0, 7, 8, 9, 3, 4, 5, 0, 7, 8, 9]

    def pick(path, drafts, count):  # refuses token 4 anywhere: 3's branch stops there
        return [t for t in drafts if t != 4][:count], False

    assert tree_of(seq, pick=pick, drafter=NgramDrafter(max_n=3)) == [(3, 0), (1, 0), (2, 2), (0, 3), (7, 4), (8, 5)]


@pytest.mark.parametrize("min_n, max_n", [(1, 4), (2, 4), (1, 1), (3, 3), (2, 6)])
def test_matches_equal_a_brute_force_search(min_n, max_n):
    """The vectorised scan finds what comparing every window finds: the occurrences (their ends) of
    the longest n-gram in [min_n, max_n] that ends the sequence and occurred before it."""
    import random

    import numpy as np

    rng = random.Random(min_n * 10 + max_n)
    drafter = NgramDrafter(min_n, max_n)
    for _ in range(300):
        seq = [rng.randrange(rng.choice([2, 3, 5])) for _ in range(rng.randrange(1, 70))]
        want: list[int] = []
        for n in range(min(max_n, len(seq)), min_n - 1, -1):
            want = [j + 1 for j in range(n - 1, len(seq) - 1) if seq[j - n + 1:j + 1] == seq[len(seq) - n:]]
            if want:
                break
        assert drafter._match_ends(np.array(seq, dtype=np.int64)).tolist() == want, seq


def test_the_copy_follows_a_growing_sequence_and_a_new_one():
    drafter = NgramDrafter()
    seq = [4, 1, 2, 5, 1, 2, 6, 4, 1]
    live: list[int] = []
    for token in seq:  # committed a token at a time, as SpeculativeDecoding extends it
        live.append(token)
        assert tree_of(live, drafter=drafter) == tree_of(list(live))
    assert tree_of(live, drafter=drafter) == [(2, 0), (5, 1), (1, 2), (2, 3), (6, 4)]   # "4 1" -> 2 5 1 2 6
    buffer = drafter._tokens
    longer = live + [2, 5, 4, 1]  # a new sequence that continues the one held: its copy is extended
    assert tree_of(longer, drafter=drafter) == tree_of(list(longer)) == [(2, 0), (5, 1), (4, 2), (1, 3),
                                                                         (1, 2), (2, 5), (6, 6)]
    assert drafter._array().tolist() == longer and drafter._tokens is buffer
    assert tree_of([9, 9, 9], drafter=drafter) == [(9, 0)]  # any other: copied anew
    assert tree_of([4, 1, 7, 4, 1], drafter=drafter) == [(7, 0), (4, 1), (1, 2)]
    with pytest.raises(ValueError, match="not the root"):
        drafter.sequence = [1, 2]
        drafter.draft_tree(3, WIDE, 5)
    with pytest.raises(ValueError, match="min_n <= max_n"):
        NgramDrafter(min_n=3, max_n=2)


# ---- through the engine ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import write_tiny_hf_model

    d = write_tiny_hf_model(tmp_path_factory.mktemp("ngram"), "llama", 5, vocab_size=24, num_hidden_layers=2)
    return tiny_llm(d)


@pytest.mark.parametrize("shape", [(8, 8, 1), (12, 4, 3)], ids=["chain", "tree"])
def test_greedy_equals_plain_decoding(tiny, shape):
    """Drafts are found in the prompt and the output, some accepted, most not (a random model); the
    tokens are plain decoding's, whatever was drafted and accepted."""
    llm = tiny
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [5, 9, 5, 9, 7], list(range(3, 20))]
    plain = [llm.generate(p, max_new_tokens=40, ignore_eos=True).token_ids for p in prompts]
    size, depth, topk = shape
    assert enable_speculation(llm, "ngram", tree_size=size, depth=depth, topk=topk) == TreeSettings(*shape)
    try:
        results = [llm.generate(p, max_new_tokens=40, ignore_eos=True) for p in prompts]
    finally:
        disable_speculation(llm)
    assert [r.token_ids for r in results] == plain
    for r in results:
        extra = r.stats.extra
        assert extra["draft"] == "ngram:1-4" and extra["mean_tree_size"] > 1, extra
        assert max(map(int, extra["acceptance_histogram"])) > 1, extra  # some step accepted drafts


def test_the_demo_copies_many_tokens_a_step(demo_llm):
    text = ("Alice sent Bob the quarterly report on Tuesday at noon; Bob forwarded it to Carol, "
            "who filed it under finance/2026/q3 before the meeting in room 42.")
    ids = demo_llm.encode([{"role": "user", "content": f"Repeat this text exactly:\n{text}"}])
    plain = demo_llm.generate(ids, max_new_tokens=48)
    settings = enable_speculation(demo_llm, "ngram")
    try:
        assert speculation_info(demo_llm)["draft"] == "ngram:1-4" and settings.topk == 1
        spec = demo_llm.generate(ids, max_new_tokens=48)
    finally:
        enable_speculation(demo_llm, None)
    assert spec.token_ids == plain.token_ids and text[:40] in plain.text  # the premise: it copies
    assert spec.stats.extra["mean_accepted_length"] > 2.5, spec.stats.extra


def test_ngram_takes_no_frspec_vocabulary(tiny, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match="has none"):
        enable_speculation(tiny, "ngram", frspec_vocab=str(vocab))
    assert speculation_info(tiny) is None


def test_prefix_caching_and_a_grammar_under_prompt_lookup(demo_llm):
    """The next turn of a chat reuses the cached prompt (the drafter keeps nothing to recompute), and
    a JSON schema's output equals plain decoding's (the grammar cuts the drafts it refuses)."""
    pytest.importorskip("llguidance")
    from edgespec.structured import Grammar

    schema = Grammar.json({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                            "colors": {"type": "array", "items": {"type": "string"},
                                                                       "maxItems": 4}},
                           "required": ["name", "colors"], "additionalProperties": False})
    ask = [{"role": "user", "content": "Give a JSON object naming a flag and its colors: red, white and red."}]
    ids = demo_llm.encode(ask)
    plain = demo_llm.generate(ids, max_new_tokens=40, grammar=schema)
    enable_speculation(demo_llm, "ngram")
    try:
        spec = demo_llm.generate(ids, max_new_tokens=40, grammar=schema)
        follow = ids + spec.token_ids + demo_llm.encode(" Again.")
        again = demo_llm.generate(follow, max_new_tokens=8)
    finally:
        enable_speculation(demo_llm, None)
    assert spec.token_ids == plain.token_ids and spec.stats.extra["draft"] == "ngram:1-4"
    assert again.stats.cached_tokens >= len(ids)
    assert again.token_ids == demo_llm.generate(follow, max_new_tokens=8).token_ids
