"""Prefix caching (LLM.prefix_caching): a prompt that starts with the previous generation's tokens
prefills only the rest, and generates what a full prefill generates.

Tiny random fp32 models (plain decoding, EAGLE-1/2 and EAGLE-3 heads, a standalone draft model, an
InfLLM-v2 sparse model across dense_len) and the demo model with its head in a two-turn chat. The
reference is always the same LLM with prefix caching off.
"""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import write_tiny_hf_model
from edgespec import GenerationConfig, prefix_store
from edgespec.kv_cache import KVCache
from edgespec.spec import DEMO_HEAD, disable_speculation, enable_speculation
from edgespec.spec.train_head import random_head
from test_spec_helpers import eagle3_head, one_thread, tiny_llm  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 40
FIRST = [1, 5, 9, 3, 17, 22, 8, 30, 2, 11]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    d = write_tiny_hf_model(tmp_path_factory.mktemp("prefix-target"), "llama", 21, vocab_size=VOCAB,
                            num_hidden_layers=4)
    return d, tiny_llm(d)


def fresh(llm, prompt, **settings):
    """What the LLM generates with a full prefill."""
    llm.prefix_caching = False
    try:
        return llm.generate(prompt, **settings)
    finally:
        llm.prefix_caching = True


def conversation(llm, turns: int = 3, new: int = 9) -> list[tuple[list[int], object]]:
    """Prompts that each continue the previous prompt and its output with two more tokens, generated
    with prefix caching; returns (prompt, result) per turn."""
    out, prompt = [], list(FIRST)
    for t in range(turns):
        result = llm.generate(prompt, max_new_tokens=new, ignore_eos=True)
        out.append((prompt, result))
        prompt = prompt + result.token_ids + [4 + t, 7 + t]
    return out


def check_conversation(llm) -> list[int]:
    """Each turn equals a full prefill's output; returns the cached prompt tokens per turn."""
    llm.generate([2, 2, 2], max_new_tokens=3)  # nothing in common with FIRST
    turns = conversation(llm)
    for prompt, result in turns:
        ref = fresh(llm, prompt, max_new_tokens=9, ignore_eos=True)
        assert result.token_ids == ref.token_ids and ref.stats.cached_tokens == 0
    return [r.stats.cached_tokens for _, r in turns]


def test_plain_decoding_reuses_the_previous_turn(target):
    _, llm = target
    disable_speculation(llm)
    cached = check_conversation(llm)
    # Turn t + 1 keeps turn t's prompt and all its output but the last token (never fed back).
    assert cached[0] == 0
    previous = conversation(llm)
    for (prompt, result), (next_prompt, _), n in zip(previous, previous[1:], cached[1:]):
        assert n == len(prompt) + len(result.token_ids) - 1 < len(next_prompt)


def test_the_same_prompt_again_prefills_one_token(target):
    _, llm = target
    disable_speculation(llm)
    a = llm.generate(FIRST, max_new_tokens=5, ignore_eos=True)
    b = llm.generate(FIRST, max_new_tokens=5, ignore_eos=True)
    assert b.stats.cached_tokens == len(FIRST) - 1 and a.token_ids == b.token_ids


@pytest.mark.parametrize("draft", ["eagle", "eagle3", "model"])
def test_speculation_reuses_target_and_drafter(target, tmp_path, draft):
    d, llm = target
    if draft == "eagle":
        path = random_head(llm.model.config, tmp_path / "head", seed=3, std=0.4)
    elif draft == "eagle3":
        path = eagle3_head(llm.model.config, tmp_path / "head3", seed=4)
    else:
        path = write_tiny_hf_model(tmp_path / "draft", "llama", 22, vocab_size=VOCAB, num_hidden_layers=1)
    enable_speculation(llm, str(path), tree_size=12, depth=4, topk=3)
    try:
        drafter = llm._strategy_factory.drafter
        cached = check_conversation(llm)
        assert all(n > len(FIRST) for n in cached[1:]), cached
        # Drafts never change greedy output, so compare the caches themselves: after a turn that
        # reused both, every committed slot of the target and of the drafter holds what a full
        # prefill puts there.
        # Both a next turn and a prompt that leaves the old one inside it.
        next_turn = conversation(llm, turns=2)[1][0]
        for prompt in (next_turn, FIRST[:6] + [33, 34, 35]):
            llm.generate(FIRST, max_new_tokens=9, ignore_eos=True)
            assert llm.generate(prompt, max_new_tokens=9, ignore_eos=True).stats.cached_tokens > 0
            kept = committed_slots(llm.cache, llm.cache.length) + committed_slots(drafter.cache, drafter.committed)
            fresh(llm, prompt, max_new_tokens=9, ignore_eos=True)
            full = committed_slots(llm.cache, llm.cache.length) + committed_slots(drafter.cache, drafter.committed)
            for a, b in zip(kept, full):
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        # The drafter's slots follow the target's: a head lags the target by one position.
        llm.generate(FIRST, max_new_tokens=9, ignore_eos=True)
        lag = 0 if draft == "model" else 1
        assert drafter.reusable(FIRST + [3]) == len(FIRST) - lag
    finally:
        disable_speculation(llm)


def committed_slots(cache, length: int) -> list[torch.Tensor]:
    return [cache.k[:, :length].clone(), cache.v[:, :length].clone()]


def test_what_invalidates_the_cache(target):
    _, llm = target
    disable_speculation(llm)
    llm.generate(FIRST, max_new_tokens=4)
    # Prompt log-probabilities score every prompt token: a full prefill.
    r = llm.generate(FIRST + [3], max_new_tokens=2, prompt_logprobs=1)
    assert r.stats.cached_tokens == 0
    assert llm.generate(FIRST + [3], max_new_tokens=2).stats.cached_tokens == len(FIRST)
    # A cache that had to grow for another strategy holds nothing.
    llm.set_strategy(llm._strategy_factory, cache_slack=llm.cache.max_len)
    assert llm.generate(FIRST + [3], max_new_tokens=2).stats.cached_tokens == 0
    llm.prefix_caching = False
    assert llm.generate(FIRST + [3], max_new_tokens=2).stats.cached_tokens == 0
    llm.prefix_caching = True


def test_an_interrupted_generation_leaves_a_valid_prefix(target):
    _, llm = target
    disable_speculation(llm)
    prompt = FIRST * 4
    # A stream closed after its first tokens, then a prefill cancelled after its first chunk.
    stream = llm.stream(prompt, GenerationConfig(max_new_tokens=20, ignore_eos=True))
    next(stream)
    stream.close()
    calls = iter(range(100))
    cancelled = llm.generate(prompt[:-3] + [6] * 30, GenerationConfig(max_new_tokens=5, prefill_chunk=8),
                             cancel=lambda: next(calls) >= 1)
    assert cancelled.finish_reason == "cancelled"
    again = llm.generate(prompt + [3, 3], max_new_tokens=6, ignore_eos=True)
    assert 0 < again.stats.cached_tokens <= len(prompt) - 3
    assert again.token_ids == fresh(llm, prompt + [3, 3], max_new_tokens=6, ignore_eos=True).token_ids


def test_sparse_model_across_dense_len(tiny_model_dir):
    import json

    from edgespec import LLM
    from edgespec.loading import load_model
    from sparse_cases import SMALL

    path = tiny_model_dir("llama", seed=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=256,
                          intermediate_size=256, num_hidden_layers=2, max_position_embeddings=2048, vocab_size=VOCAB)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="minicpm", scale_emb=2.0, scale_depth=1.4, dim_model_base=64,
                  sparse_config={**SMALL, "dense_len": 128})
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(load_model(str(path), device="cpu", dtype=torch.float32, max_context=400, with_tokenizer=False))
    g = torch.Generator().manual_seed(0)
    first = torch.randint(1, VOCAB, (100,), generator=g).tolist()  # dense; the second prompt crosses 128
    r1 = llm.generate(first, max_new_tokens=20, ignore_eos=True)
    second = first + r1.token_ids + torch.randint(1, VOCAB, (60,), generator=g).tolist()
    r2 = llm.generate(second, max_new_tokens=30, ignore_eos=True)
    assert r2.stats.cached_tokens == len(first) + 19
    assert r2.token_ids == fresh(llm, second, max_new_tokens=30, ignore_eos=True).token_ids
    # Sparse and dense attention give later layers other K/V: a mode change forgets the cache.
    llm.model.sparse.mode = "dense"
    assert llm.generate(second, max_new_tokens=2).stats.cached_tokens == 0


def test_demo_chat_with_its_head(demo_llm):
    messages = [{"role": "user", "content": "Name three fruits."}]
    enable_speculation(demo_llm, draft=str(DEMO_HEAD))
    try:
        first = demo_llm.generate(messages, max_new_tokens=24)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And three colors?"}]
        second = demo_llm.generate(messages, max_new_tokens=24)
        ref = fresh(demo_llm, messages, max_new_tokens=24)
    finally:
        enable_speculation(demo_llm, None)  # the fixture is shared: leave it as plain decoding
    assert second.token_ids == ref.token_ids
    assert second.stats.cached_tokens >= len(demo_llm.encode(messages[:1])) - 1
    # The head drafted from its kept slots as from recomputed ones: the same trees were accepted.
    assert second.stats.extra["acceptance_histogram"] == ref.stats.extra["acceptance_histogram"]


# ------------------------------------------------------------------ parked sequences (prefix_store)

A1 = FIRST * 3                                   # two conversations with nothing in common
B1 = [3, 8, 13, 18, 23, 28, 33, 38, 6, 16] * 3


def turns_in_alternation(llm, new: int = 9) -> list:
    """A's first turn, B's, A's second, B's second; returns the four results."""
    ra = llm.generate(A1, max_new_tokens=new, ignore_eos=True)
    rb = llm.generate(B1, max_new_tokens=new, ignore_eos=True)
    ra2 = llm.generate(A1 + ra.token_ids + [4, 7], max_new_tokens=new, ignore_eos=True)
    rb2 = llm.generate(B1 + rb.token_ids + [5, 6], max_new_tokens=new, ignore_eos=True)
    return [ra, rb, ra2, rb2]


def test_two_conversations_in_turns_both_keep_their_cache(target):
    """A prompt that shares nothing with the live sequence parks it on the host; the next turn of
    the parked conversation copies it back instead of prefilling it, and generates what a full
    prefill generates."""
    d, llm = target
    disable_speculation(llm)
    llm.generate([2, 2, 2], max_new_tokens=3)  # nothing in common with A or B, live or parked
    llm.prefix_store.clear()
    ra, rb, ra2, rb2 = turns_in_alternation(llm)
    assert [r.stats.cached_tokens for r in (ra, rb)] == [0, 0]
    assert ra2.stats.cached_tokens == len(A1) + len(ra.token_ids) - 1
    assert rb2.stats.cached_tokens == len(B1) + len(rb.token_ids) - 1
    reference = tiny_llm(d)
    reference.prefix_caching = False
    assert [r.token_ids for r in turns_in_alternation(reference)] == [r.token_ids for r in (ra, rb, ra2, rb2)]
    # Without a store only the live sequence is kept.
    llm.prefix_store.budget = 0
    try:
        llm.generate([2, 2, 2], max_new_tokens=3)
        llm.prefix_store.clear()
        assert [r.stats.cached_tokens for r in turns_in_alternation(llm)] == [0, 0, 0, 0]
    finally:
        llm.prefix_store.budget = prefix_store.budget_from_env()


def test_a_prompt_logprobs_request_parks_but_restores_nothing(target):
    """It prefills its whole prompt (every position's logits are asked for), so it takes no parked
    sequence; but it overwrites the live one, which it parks first."""
    _, llm = target
    disable_speculation(llm)
    llm.generate([2, 2, 2], max_new_tokens=3)
    llm.prefix_store.clear()
    ra = llm.generate(A1, max_new_tokens=9, ignore_eos=True)
    scored = llm.generate(B1, max_new_tokens=2, prompt_logprobs=1)     # parks A
    assert scored.stats.cached_tokens == 0 and len(llm.prefix_store.entries) == 1
    prompt = A1 + ra.token_ids + [4, 7]
    again = llm.generate(prompt, max_new_tokens=2, prompt_logprobs=1)  # parks B; A stays parked
    assert again.stats.cached_tokens == 0
    assert sorted(e.ids[0] for e in llm.prefix_store.entries) == sorted([A1[0], B1[0]])
    rb = llm.generate(B1 + [5, 6], max_new_tokens=9, ignore_eos=True)  # B comes back
    assert rb.stats.cached_tokens == len(B1)
    assert rb.token_ids == fresh(llm, B1 + [5, 6], max_new_tokens=9, ignore_eos=True).token_ids


@pytest.mark.parametrize("draft", [None, "eagle", "model"])
def test_choices_of_one_prompt_park_only_their_endings(target, tmp_path, draft):
    """Choices of one prompt (n > 1, a regenerated reply) park one another in turn: each copies to
    the host only the slots after those it kept of the choice parked before it, and comes back bit
    for bit as it was live (under speculation the target recomputes the prompt slots its drafter
    did not keep: those are not shared)."""
    _, llm = target
    disable_speculation(llm)
    if draft == "eagle":
        enable_speculation(llm, str(random_head(llm.model.config, tmp_path / "head", seed=3, std=0.4)),
                           tree_size=12, depth=4, topk=3)
    elif draft == "model":
        enable_speculation(llm, str(write_tiny_hf_model(tmp_path / "draft", "llama", 22, vocab_size=VOCAB,
                                                        num_hidden_layers=1)), tree_size=12, depth=4, topk=3)
    llm.generate([2, 2, 2], max_new_tokens=3)
    llm.prefix_store.clear()
    results, live = [], []
    for seed in range(3):
        results.append(llm.generate(A1, max_new_tokens=20, ignore_eos=True, temperature=1.0, seed=seed))
        live.append((list(llm._cached_ids), llm.cache.k.clone(), llm.cache.v.clone()))
    assert len({tuple(r.token_ids) for r in results}) == 3  # the premise: three endings
    first, second = llm.prefix_store.entries                # the third is live
    assert first.ids == live[0][0] and second.ids == live[1][0]
    # What the second choice kept of the first: the prompt but its last token (prefilled again),
    # less what a drafter did not keep.
    shared = results[1].stats.cached_tokens
    assert shared == len(A1) - 1 if draft is None else 0 < shared <= len(A1) - 1
    assert [(start, k.shape[1]) for start, k, _ in second.target.segments] == [(0, shared),
                                                                               (shared, len(second.ids) - shared)]
    assert second.target.segments[0][1].untyped_storage().data_ptr() in first.target.storages()
    per_token = first.target.nbytes() // len(first.ids)
    drafters = first.drafter_bytes + second.drafter_bytes  # the drafter's slots: copied whole
    assert llm.prefix_store.nbytes() - drafters == per_token * (len(first.ids) + len(second.ids) - shared)
    for index in (1, 0):  # the next turn after each parked choice
        ids, k, v = live[index]
        prompt = A1 + results[index].token_ids + [4, 7]
        result = llm.generate(prompt, max_new_tokens=4, ignore_eos=True)
        assert result.stats.cached_tokens == len(ids)
        n = len(ids)
        assert torch.equal(llm.cache.k[:, :n], k[:, :n]) and torch.equal(llm.cache.v[:, :n], v[:, :n])
        assert result.token_ids == fresh(llm, prompt, max_new_tokens=4, ignore_eos=True).token_ids
    disable_speculation(llm)


def test_a_conversation_parked_again_copies_only_its_new_turn(target):
    _, llm = target
    disable_speculation(llm)
    llm.generate([2, 2, 2], max_new_tokens=3)
    llm.prefix_store.clear()
    ra, rb, ra2, rb2 = turns_in_alternation(llm)  # A's second turn came back from the host, then B's parked it
    (a,) = [e for e in llm.prefix_store.entries if e.ids[:len(A1)] == A1]
    kept = ra2.stats.cached_tokens
    assert [(start, k.shape[1]) for start, k, _ in a.target.segments] == [(0, kept), (kept, len(a.ids) - kept)]


@pytest.mark.parametrize("draft", ["eagle", "model"])
def test_parked_sequences_bring_back_the_drafters_slots(target, tmp_path, draft):
    """Speculation parks the drafter's committed slots with the target's, so a parked conversation's
    next turn reuses both; every committed slot then holds what a full prefill puts there."""
    d, llm = target
    if draft == "eagle":
        path = random_head(llm.model.config, tmp_path / "head", seed=3, std=0.4)
    else:
        path = write_tiny_hf_model(tmp_path / "draft", "llama", 22, vocab_size=VOCAB, num_hidden_layers=1)
    enable_speculation(llm, str(path), tree_size=12, depth=4, topk=3)
    try:
        drafter = llm._strategy_factory.drafter
        llm.generate([2, 2, 2], max_new_tokens=3)
        llm.prefix_store.clear()
        ra, rb, ra2, rb2 = turns_in_alternation(llm)
        assert ra2.stats.cached_tokens > len(A1) and rb2.stats.cached_tokens > len(B1)
        prompt = A1 + ra.token_ids + [4, 7]
        llm.generate(B1, max_new_tokens=9, ignore_eos=True)  # parks A's second turn
        assert llm.generate(prompt + ra2.token_ids, max_new_tokens=9, ignore_eos=True).stats.cached_tokens > len(prompt)
        kept = committed_slots(llm.cache, llm.cache.length) + committed_slots(drafter.cache, drafter.committed)
        fresh(llm, prompt + ra2.token_ids, max_new_tokens=9, ignore_eos=True)
        full = committed_slots(llm.cache, llm.cache.length) + committed_slots(drafter.cache, drafter.committed)
        for a, b in zip(kept, full):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    finally:
        disable_speculation(llm)


def test_a_sequence_parked_under_speculation_comes_back_to_plain_decoding(target, tmp_path):
    """Its drafter's slots stay behind: the drafter is gone (its reference dead) or another one
    decodes now; the target's slots come back all the same."""
    d, llm = target
    enable_speculation(llm, str(random_head(llm.model.config, tmp_path / "head", seed=5, std=0.4)),
                       tree_size=12, depth=4, topk=3)
    llm.generate([2, 2, 2], max_new_tokens=3)
    llm.prefix_store.clear()
    ra = llm.generate(A1, max_new_tokens=9, ignore_eos=True)
    llm.generate(B1, max_new_tokens=9, ignore_eos=True)          # parks A with the head's slots
    assert llm.prefix_store.entries[-1].drafter is not None
    disable_speculation(llm)
    gc.collect()
    assert llm.prefix_store.entries[-1].drafter() is None           # the head is gone
    prompt = A1 + ra.token_ids + [4, 7]
    result = llm.generate(prompt, max_new_tokens=9, ignore_eos=True)
    assert result.stats.cached_tokens == len(A1) + len(ra.token_ids) - 1
    assert result.token_ids == fresh(llm, prompt, max_new_tokens=9, ignore_eos=True).token_ids


def test_the_store_keeps_the_most_recent_within_its_budget():
    cache = KVCache(2, 64, 1, 4, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    per_token = 2 * 2 * 1 * 4 * 4                       # K and V, 2 layers, 1 head of 4 fp32
    store = prefix_store.PrefixStore(budget=60 * per_token)

    def entry(ids):
        return prefix_store.Parked(ids, prefix_store.SlotCopy.of(cache, len(ids)), ("cache",))

    store.park(entry(list(range(20))))
    store.park(entry([9] * 20))
    assert store.best([0, 1, 2, 5], ("cache",)) == (0, 3, 3) and store.best([0, 1], ("other",)) == (-1, 0, 0)
    assert store.best([0, 1, 2, 5], ("cache",), worth=lambda entry, n: n - 1) == (0, 2, 3)
    store.park(entry(list(range(30))))                  # extends the first: replaces it
    assert [len(e.ids) for e in store.entries] == [20, 30]
    store.park(entry([7] * 25))                          # over budget: the least recently used goes
    assert [e.ids[0] for e in store.entries] == [0, 7]
    store.park(entry([5] * 61))                          # larger than the whole budget: not kept
    assert len(store.entries) == 2
    taken = store.take(0)
    assert len(taken.ids) == 30 and taken.target.length == 30
    restored = KVCache(2, 64, 1, 4, torch.float32, "cpu")
    restored.k.fill_(float("nan"))
    taken.target.restore(restored, 30)
    assert torch.equal(restored.k[:, :30], cache.k[:, :30]) and torch.equal(restored.v[:, :30], cache.v[:, :30])
    assert restored.k[:, 30:].isnan().all()  # the slots after it untouched


def test_the_live_copy_counts_in_the_budget_and_goes_last():
    """The engine's copy of the live sequence (PrefixStore.pinned) is held within the budget: entries
    make room for it, least recent first, and it goes itself only when they cannot."""
    cache = KVCache(2, 64, 1, 4, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    per_token = 2 * 2 * 1 * 4 * 4
    store = prefix_store.PrefixStore(budget=60 * per_token)
    for ids in (list(range(20)), [9] * 20):
        store.park(prefix_store.Parked(ids, prefix_store.SlotCopy.of(cache, len(ids)), ("cache",)))
    twin = prefix_store.SlotCopy.of(cache, 30)
    store.pin(twin)                                       # 20 + 20 + 30 > 60: the older entry goes
    assert [e.ids[0] for e in store.entries] == [9] and store.pinned is twin
    assert store.nbytes() == (20 + 30) * per_token
    store.park(prefix_store.Parked([4] * 25, prefix_store.SlotCopy.of(cache, 25), ("cache",)))
    assert [e.ids[0] for e in store.entries] == [4] and store.pinned is twin   # 25 + 30 fit; 20 more do not
    store.pin(prefix_store.SlotCopy.of(cache, 61))        # larger than the budget alone
    assert store.entries == [] and store.pinned is None and store.nbytes() == 0


def test_copies_share_the_slots_they_have_in_common():
    """A copy made with `share` copies only the slots after the shared copy's; the store counts
    shared host memory once, and every copy restores its own slots exactly."""
    cache = KVCache(2, 64, 1, 4, torch.float32, "cpu")
    cache.k.normal_(), cache.v.normal_()
    per_token = 2 * 2 * 1 * 4 * 4
    first = prefix_store.SlotCopy.of(cache, 30)
    snapshot = cache.k[:, :40].clone(), cache.v[:, :40].clone()
    cache.k[:, 20:].normal_(), cache.v[:, 20:].normal_()   # slots from 20 on overwritten, as a new ending
    second = prefix_store.SlotCopy.of(cache, 40, share=first.head(20))
    assert [(start, k.shape[1]) for start, k, _ in second.segments] == [(0, 20), (20, 20)]
    assert second.nbytes() == (30 + 20) * per_token    # the whole first copy stays alive through the view
    store = prefix_store.PrefixStore(budget=10**6)
    store.park(prefix_store.Parked(list(range(30)), first, ("cache",)))
    store.park(prefix_store.Parked(list(range(20)) + [9] * 20, second, ("cache",)))
    assert store.nbytes() == (30 + 20) * per_token
    for copy, n, (k, v) in [(first, 30, snapshot), (second, 40, (cache.k[:, :40], cache.v[:, :40]))]:
        restored = KVCache(2, 64, 1, 4, torch.float32, "cpu")
        copy.restore(restored, n)
        if copy is first:
            k, v = k[:, :30], v[:, :30]
        else:  # shared slots from the first copy, the rest its own
            k, v = torch.cat([snapshot[0][:, :20], k[:, 20:]], 1), torch.cat([snapshot[1][:, :20], v[:, 20:]], 1)
        assert torch.equal(restored.k[:, :n], k) and torch.equal(restored.v[:, :n], v)
    assert prefix_store.SlotCopy.of(cache, 10, share=first).length == 10  # a shorter copy: a view only
