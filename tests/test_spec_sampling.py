"""Lossless sampling: speculative sampling produces the target's distribution over whole sequences.

The test: a tiny random Llama with a 6-token vocabulary, prompt [1, 3], 3 new tokens, so 216
possible sequences. Their exact probabilities under plain sampling come from the target itself
(43 forward passes through ops.logits_to_probs, the transform both paths share). N seeded
speculative generations (random EAGLE head, a tree with siblings at every depth) are binned and
compared with a chi-square goodness-of-fit test (bins with expected count < 5 merged); the test
fails below a p-value of 1e-3. The same statistic must reject a biased acceptance rule (accept the
first child whenever the target gives it p >= 0.15), which shows the test has the power to fail.
One-hot target distributions (top_k = 1) must reproduce greedy decoding exactly.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from scipy import stats

from edgespec import ops
from oracle import ops as ref
from edgespec.spec import accept as accept_mod
from edgespec.spec import NgramDrafter, TreeSettings, decoding, disable_speculation, enable_speculation
from edgespec.spec.ngram import GRAFT_MIN_N
from edgespec.spec.train_head import random_head
from test_spec_helpers import one_thread, run, tiny_llm  # noqa: F401 (one_thread: autouse fixture)

VOCAB = 6
PROMPT = [1, 3]
NEW = 3
SAMPLES = 3000
ALPHA = 1e-3



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from conftest import write_tiny_hf_model

    root = tmp_path_factory.mktemp("spec-sampling")
    d = write_tiny_hf_model(root / "m", "llama", 21, vocab_size=VOCAB, num_hidden_layers=2, hidden_size=48,
                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    llm = tiny_llm(d, max_context=64)
    head = random_head(llm.model.config, root / "head", seed=4, std=0.5)
    return llm, head


def exact_distribution(llm, temperature: float, top_k: int, top_p: float, min_p: float = 0.0,
                       repetition_penalty: float = 1.0, presence_penalty: float = 0.0,
                       frequency_penalty: float = 0.0, logit_bias: dict | None = None,
                       prompt: list[int] = PROMPT) -> dict[tuple[int, ...], float]:
    """P(sequence) under plain sampling, by enumerating every prefix (fp32 logits of the target plus
    the logit bias, penalised by the oracle for the prompt and the prefix generated so far)."""
    model = llm.model
    probs: dict[tuple[int, ...], torch.Tensor] = {}
    with torch.inference_mode():
        for length in range(NEW):
            for prefix in itertools.product(range(VOCAB), repeat=length):
                ids = torch.tensor(prompt + list(prefix))
                cache = model.new_cache(len(prompt) + NEW)
                out = model.forward(ids, torch.arange(ids.numel()), cache, 0)
                logits = model.logits(out.hidden[-1:])
                for t, bias in (logit_bias or {}).items():
                    logits[0, t] += bias
                logits = ref.penalised_logits(logits[0], prompt, list(prefix), repetition_penalty, presence_penalty,
                                              frequency_penalty).float().unsqueeze(0)
                probs[prefix] = ops.logits_to_probs(logits, temperature, top_k, top_p, min_p)[0].double()
    dist = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        p = 1.0
        for i in range(NEW):
            p *= float(probs[seq[:i]][seq[i]])
        dist[seq] = p
    return dist


def chi_square_pvalue(counts: dict[tuple[int, ...], int], dist: dict[tuple[int, ...], float], n: int) -> float:
    """Goodness of fit, bins with expected count < 5 pooled into one."""
    obs, exp, pool_o, pool_e = [], [], 0.0, 0.0
    for seq, p in dist.items():
        if p * n >= 5:
            obs.append(counts.get(seq, 0))
            exp.append(p * n)
        else:
            pool_o += counts.get(seq, 0)
            pool_e += p * n
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    # The fp32 probabilities sum to 1 within ~1e-7; scipy wants the totals to agree to 1.5e-8.
    total = sum(exp)
    exp = [e * n / total for e in exp]
    return float(stats.chisquare(obs, exp).pvalue)


def sample_sequences(llm, n: int, prompt: list[int] = PROMPT, **sampling) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for seed in range(n):
        seq = tuple(run(llm, prompt, NEW, seed=seed, **sampling))
        counts[seq] = counts.get(seq, 0) + 1
    return counts


@pytest.mark.slow
# The second setting's filters each cut: 216 possible sequences, 125 after top-k, 33 after top-p,
# 13 after min-p. The third one's penalties make each tree row's distribution depend on its own
# path, which the acceptance must follow; the fourth adds a logit bias (token 2 banned) before them.
@pytest.mark.parametrize("sampling", [dict(temperature=1.0, top_k=0, top_p=1.0),
                                      dict(temperature=1.0, top_k=5, top_p=0.95, min_p=0.1),
                                      dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=2.0,
                                           presence_penalty=1.0, frequency_penalty=0.5),
                                      dict(temperature=1.0, top_k=0, top_p=1.0, logit_bias={0: 1.5, 2: -100.0, 4: -0.7},
                                           presence_penalty=0.8)],
                         ids=["plain", "filters", "penalties", "bias"])
def test_speculative_sampling_matches_plain_distribution(setup, sampling):
    llm, head = setup
    dist = exact_distribution(llm, **sampling)
    assert abs(sum(dist.values()) - 1.0) < 1e-6
    enable_speculation(llm, draft=str(head), tree_size=10, depth=3, topk=3)
    try:
        counts = sample_sequences(llm, SAMPLES, **sampling)
        stats_ = llm.generate(PROMPT, max_new_tokens=NEW, ignore_eos=True, seed=0, **sampling).stats.extra
    finally:
        disable_speculation(llm)
    assert sum(counts.values()) == SAMPLES
    # Zero-probability sequences (top-k/top-p cut) never appear.
    assert all(dist[s] > 0 for s in counts)
    pvalue = chi_square_pvalue(counts, dist, SAMPLES)
    assert pvalue > ALPHA, f"speculative sampling differs from the target distribution (p = {pvalue:.2e})"
    assert stats_["acceptance_histogram"]  # the speculative path really ran


@pytest.mark.slow
def test_prompt_lookup_sampling_matches_plain_distribution(setup):
    """Prompt lookup (spec.ngram) proposes its drafts with certainty: unigram lookups in a prompt in
    which every token recurs after different ones make trees of up to three siblings, and the
    samples keep the target's distribution."""
    llm, _ = setup
    prompt = [1, 3, 0, 1, 3, 5, 2, 4, 0, 2, 5, 3, 4, 1]
    drafter, settings = NgramDrafter(max_n=1), TreeSettings(tree_size=8, depth=3, topk=3)
    for first in range(VOCAB):  # the premise: whatever the first token, the next step drafts siblings
        drafter.sequence = prompt + [first]
        assert len(drafter.draft_tree(first, settings, 1).children[0]) >= 2
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    dist = exact_distribution(llm, prompt=prompt, **sampling)
    enable_speculation(llm, draft=drafter, tree_size=8, depth=3, topk=3)
    try:
        counts = sample_sequences(llm, SAMPLES, prompt=prompt, **sampling)
        stats_ = llm.generate(prompt, max_new_tokens=NEW, ignore_eos=True, seed=0, **sampling).stats.extra
    finally:
        disable_speculation(llm)
    assert stats_["draft"] == "ngram:1-1" and stats_["acceptance_histogram"]
    pvalue = chi_square_pvalue(counts, dist, SAMPLES)
    assert pvalue > ALPHA, f"prompt-lookup sampling differs from the target distribution (p = {pvalue:.2e})"


@pytest.mark.slow
def test_lookup_chains_on_draft_trees_keep_the_distribution(setup):
    """A random head's chains with prompt-lookup chains grafted onto them (TreeSettings.lookup): the
    lookup's tokens join the head's as further point-mass drafts, siblings where they differ (the
    first step, whose tree the 3-token budget keeps one deep, has two children where the lookup
    disagrees with the head), and the samples keep the target's distribution."""
    llm, head = setup
    # "1 t" occurs for every token t, so a chain follows whatever the first token is.
    prompt = [1, 2, 4, 0, 1, 1, 3, 1, 0, 3, 1, 3, 2, 1, 4, 5, 1, 5, 0, 4, 1]
    lookup = NgramDrafter(min_n=GRAFT_MIN_N)
    for first in range(VOCAB):  # the premise: whatever the first token, the next step grafts a chain
        lookup.sequence = prompt + [first]
        assert lookup.draft_tree(first, TreeSettings(3, 3, 1), 2).size > 1
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    dist = exact_distribution(llm, prompt=prompt, **sampling)

    def tree_sizes(lookup: int) -> float:  # summed over a few generations
        return sum(llm.generate(prompt, max_new_tokens=NEW, ignore_eos=True, seed=seed, **sampling)
                   .stats.extra["mean_tree_size"] for seed in range(20))

    enable_speculation(llm, draft=str(head), tree_size=2, depth=2, topk=1, lookup=0)
    alone = tree_sizes(0)
    enable_speculation(llm, draft=str(head), tree_size=2, depth=2, topk=1, lookup=3)
    try:
        assert tree_sizes(3) > alone + 2  # the chains add nodes to the head's trees
        counts = sample_sequences(llm, SAMPLES, prompt=prompt, **sampling)
    finally:
        disable_speculation(llm)
    pvalue = chi_square_pvalue(counts, dist, SAMPLES)
    assert pvalue > ALPHA, f"sampling with lookup chains differs from the target distribution (p = {pvalue:.2e})"


@pytest.mark.slow
def test_the_statistic_rejects_a_biased_acceptance_rule(setup, monkeypatch):
    llm, head = setup
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0)
    dist = exact_distribution(llm, **sampling)

    def biased(tree, probs, generator):
        node, path = 0, [0]
        while True:
            kids = tree.children[node]
            if kids and float(probs[node, tree.tokens[kids[0]]]) >= 0.15:
                node = kids[0]
                path.append(node)
                continue
            return path, int(ops.sample(probs[node:node + 1], generator)[0])

    monkeypatch.setattr(decoding, "accept_sampling", biased)
    enable_speculation(llm, draft=str(head), tree_size=10, depth=3, topk=3)
    try:
        counts = sample_sequences(llm, SAMPLES, **sampling)
    finally:
        disable_speculation(llm)
    assert chi_square_pvalue(counts, dist, SAMPLES) < ALPHA


def test_one_hot_sampling_equals_greedy(setup):
    """top_k = 1 makes every target distribution one-hot: sampling must give the greedy tokens."""
    llm, head = setup
    prompts = [[1, 3], [1, 0, 5, 4], [2]]
    greedy = [run(llm, p, 20) for p in prompts]
    enable_speculation(llm, draft=str(head), tree_size=10, depth=4, topk=3)
    try:
        for seed in range(5):
            assert [run(llm, p, 20, temperature=1.3, top_k=1, seed=seed) for p in prompts] == greedy
    finally:
        disable_speculation(llm)


def test_seeded_speculative_sampling_reproduces(setup):
    llm, head = setup
    enable_speculation(llm, draft=str(head), tree_size=10, depth=3, topk=3)
    try:
        a = [run(llm, [1, 3], 24, temperature=1.0, seed=s) for s in range(4)]
        b = [run(llm, [1, 3], 24, temperature=1.0, seed=s) for s in range(4)]
    finally:
        disable_speculation(llm)
    assert a == b
    assert len(set(map(tuple, a))) > 1  # different seeds, different samples


def test_accept_sampling_is_used_for_temperature(setup, monkeypatch):
    """Guards the wiring: temperature > 0 goes through accept_sampling with the sampler's generator."""
    llm, head = setup
    calls = []
    real = accept_mod.accept_sampling

    def spy(tree, probs, generator):
        calls.append(generator)
        return real(tree, probs, generator)

    monkeypatch.setattr(decoding, "accept_sampling", spy)
    enable_speculation(llm, draft=str(head), tree_size=4, depth=2, topk=2)
    try:
        run(llm, PROMPT, 5, temperature=0.8, seed=1)
    finally:
        disable_speculation(llm)
    assert calls and all(isinstance(g, torch.Generator) for g in calls)
