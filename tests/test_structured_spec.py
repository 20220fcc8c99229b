"""Structured output stays cheap under speculation without losing exactness: a draft tree's rows
get the grammar's vocabulary-wide mask only where acceptance reaches them and the target's own
choice is not known to be allowed (edgespec.spec.accept.accept_constrained).

* GrammarState.allows, the cheap question, agrees with the mask wherever it answers, on the demo
  model's 49K-token vocabulary, in states where llguidance's mask is not the parser's verdict
  (forced bytes, a finished grammar) as well;
* greedy decoding gives the same tokens with these checks and with a full mask on every row
  (EDGESPEC_GRAMMAR_MASKS=full, the previous way), plain and speculative, on a target whose
  choice the grammar often forbids and often allows, while computing far fewer masks;
* sampled tree acceptance under a grammar draws the masked distributions (chi-square), with and
  without top-k/top-p, and never accepts a draft the grammar forbids.
"""
from __future__ import annotations

import random
import string
from dataclasses import replace

import pytest
import torch

pytest.importorskip("llguidance")

from edgespec import LLM, ops  # noqa: E402
from edgespec.generation import GenerationConfig, Sampler  # noqa: E402
from edgespec.loading import load_model  # noqa: E402
from edgespec.spec import disable_speculation, enable_speculation  # noqa: E402
from edgespec.spec.accept import accept_constrained  # noqa: E402
from edgespec.spec.tree import DraftTree  # noqa: E402
from edgespec.structured import Grammar, GrammarState  # noqa: E402
from test_engine import write_tiny_chat_model  # noqa: E402
from test_spec_helpers import one_thread  # noqa: E402, F401 (autouse fixture)

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age"], "additionalProperties": False}


def _mask_bits(state: GrammarState, path: list[int], vocab: int) -> torch.Tensor:
    """bool [vocab]: the tokens GrammarState.mask keeps in the row after `path`."""
    return torch.isfinite(state.mask(torch.zeros(1, vocab), [path])[0])


@pytest.mark.parametrize("grammar, text", [
    # Keys after the first are forced once the schema leaves one choice: llguidance's mask then
    # holds only the canonical token of the forced bytes, which its parser alone would not say.
    (Grammar.json(SCHEMA), '{"name": "Ann \\"Lee\\"", "age": 42, "tags": ["a b", "c\\n"]}'),
    (Grammar.regex(r"(Yes|No)[,.] [A-Z][a-z]+( [a-z]+){1,3}\."), "Yes, Blue skies are here."),
    (Grammar.choice(["alpha", "beta", "gamma"]), "gamma"),
], ids=["json-schema", "regex", "choice"])
def test_allows_says_what_the_mask_says(demo_llm, grammar, text) -> None:
    """After every prefix of a valid text (as a path below the start, and as committed text), and
    after the end: allows(path, t) is the mask's bit for every token tried, or False for all of
    them (a state whose mask llguidance does not derive from its parser alone). Both kinds occur."""
    state = demo_llm._grammar_state(GenerationConfig(grammar=grammar))
    committed = demo_llm._grammar_state(GenerationConfig(grammar=grammar))
    tok = demo_llm.tokenizer
    vocab = demo_llm.model.config.vocab_size
    ids = tok.encode(text)
    rng = random.Random(0)
    kinds = set()
    for i in range(len(ids) + 1):
        path = ids[:i]
        bits = _mask_bits(state, path, vocab)
        tried = sorted(set(bits.nonzero().flatten().tolist()[:300] + rng.sample(range(vocab), 300)
                           + [tok.hf.eos_token_id] + ids[i:i + 1]))
        said = [state.allows(path, t) for t in tried]
        if any(said):
            assert said == [bool(bits[t]) for t in tried], f"after {tok.decode(path)!r}"
            kinds.add("decided")
        else:
            kinds.add("undecided" if bits.any() else "nothing allowed")
        # Asked with the path committed instead, the answers are the same.
        assert [committed.allows([], t) for t in tried[::10]] == said[::10]
        if i < len(ids):
            committed.consume(ids[i:i + 1])
    assert kinds >= {"decided", "undecided"}
    # Asking moved nothing: the whole text still goes in token by token, and completes the grammar.
    assert state.consume(ids) == ids and state.done


def test_draft_choices_are_what_the_parser_takes_or_the_forced_token(demo_llm) -> None:
    """After every prefix of a valid JSON text: where llguidance forces the next token, that token
    alone (the one its mask allows), drafted or not; elsewhere the drafts its parser takes, in
    their order (every token the mask allows among them, and the text's own next token), at most
    `count`. A path the grammar refuses gets none. Both kinds of state occur."""
    grammar = Grammar.json(SCHEMA)
    state = demo_llm._grammar_state(GenerationConfig(grammar=grammar))
    vocab = demo_llm.model.config.vocab_size
    ids = demo_llm.tokenizer.encode('{"name": "Ann \\"Lee\\"", "age": 42, "tags": ["a b", "c\\n"]}')
    rng = random.Random(1)
    kinds = set()
    for i in range(len(ids)):
        path = ids[:i]
        bits = _mask_bits(state, path, vocab)
        drafts = rng.sample(range(vocab), 200) + bits.nonzero().flatten().tolist()[:50] + [ids[i]]
        drafts = list(dict.fromkeys(drafts))
        chosen, forced = state.draft_choices(path, drafts, len(drafts))
        if forced:
            kinds.add("forced")
            assert chosen == bits.nonzero().flatten().tolist() and len(chosen) == 1
            continue
        kinds.add("drafts")
        assert chosen == [t for t in drafts if t in set(chosen)]               # in the drafts' order
        assert {t for t in drafts if bits[t]} <= set(chosen) and ids[i] in chosen
        assert state.draft_choices(path, drafts, 3) == (chosen[:3], False)
    assert kinds == {"forced", "drafts"}
    refused = demo_llm.tokenizer.encode("]")                                   # no JSON object starts so
    assert state.draft_choices(refused, list(range(100)), 5) == ([], False)
    assert state.consume(ids) == ids                                           # asking moved nothing


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory):
    """The tiny character-level model: its draft model is itself, so every draft is its
    unconstrained greedy choice, which the grammar below allows only sometimes."""
    d = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-structured-spec"))
    return LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=128)), d


@pytest.mark.parametrize("pattern", [r"[a-z]{2,5}( [a-z]{1,4}){3}[,;][a-z ]{4,9}", r"([a-z]{2}[0-9]{1,2}){5}"],
                         ids=["words", "letters-and-digits"])
def test_greedy_tokens_equal_full_masks_everywhere(chat_llm, monkeypatch, pattern) -> None:
    """Plain and speculative greedy decoding under a grammar give the same tokens with checked
    rows as with every row fully masked. A logit bias makes the random model prefer letters, so
    its choice is allowed inside words and forbidden where the grammar demands a space, a comma
    or a digit (rarely, then half the time); speculation computes at most one mask per token it
    commits (the rows its walk reads), far fewer than a mask per tree row. Where the grammar leaves
    one choice (a space after a word of the longest length) plain decoding takes it as a forced
    token, with no mask and no step of its own."""
    llm, directory = chat_llm
    tok = llm.tokenizer
    bias = {tok.encode(c)[0]: 6.0 for c in string.ascii_lowercase}
    grammar = Grammar.regex(pattern)
    prompts = ["The quick brown fox", "hello", "zzz q"]
    states: list[GrammarState] = []
    make_state = LLM._grammar_state

    def recording(self, config):
        states.append(make_state(self, config))
        return states[-1]

    monkeypatch.setattr(LLM, "_grammar_state", recording)

    def run(speculative: bool, mode: str) -> tuple[list[list[int]], int]:
        """(token ids per prompt, full masks over the prompts); plain decoding's forced tokens
        (chosen by no mask) go into forced[mode]."""
        monkeypatch.setenv("EDGESPEC_GRAMMAR_MASKS", mode)
        if speculative:
            enable_speculation(llm, draft=str(directory), tree_size=16, depth=5, topk=3)
        try:
            results = [llm.generate(p, max_new_tokens=40, grammar=grammar, logit_bias=bias) for p in prompts]
        finally:
            disable_speculation(llm)
        masks = [s.full_masks for s in states[-len(prompts):]]
        for r, m in zip(results, masks):
            assert r.finish_reason == "stop" and (not speculative or r.stats.extra["grammar_masks"] == m)
        if not speculative:
            forced[mode] = sum(r.stats.extra["forced_tokens"] for r in results)
        return [r.token_ids for r in results], sum(masks)

    forced: dict[str, int] = {}
    plain_full, plain_full_masks = run(False, "full")
    plain, plain_masks = run(False, "checked")
    spec_full, spec_full_masks = run(True, "full")
    spec, spec_masks = run(True, "checked")
    assert plain == plain_full == spec_full == spec
    tokens = sum(len(t) for t in plain)
    # One mask per token chosen (one more where an end token, which results leave out, was chosen);
    # the grammar forced the others (a space after a word of the longest length).
    chosen = tokens - forced["full"]
    assert forced["full"] == forced["checked"] and chosen <= plain_full_masks <= chosen + len(prompts)
    assert (forced["full"] > 0) == ("{1,4}" in pattern)  # only the words pattern has single choices
    assert 0 < plain_masks < chosen            # the grammar both allowed and forbade the model's choice
    assert spec_masks <= tokens + len(prompts)  # at most the rows the walks read
    assert spec_full_masks > 3 * spec_masks


def test_draft_trees_hold_only_what_the_grammar_allows(chat_llm, monkeypatch) -> None:
    """Under a grammar every verified tree node continues the text as the grammar's parser allows
    (the drafter, the model itself biased towards letters, often proposes forbidden ones), and
    where the grammar forces the next character (the comma after a fourth word) it is drafted."""
    from edgespec.spec.decoding import SpeculativeDecoding

    llm, directory = chat_llm
    tok = llm.tokenizer
    bias = {tok.encode(c)[0]: 6.0 for c in string.ascii_lowercase}
    accept = SpeculativeDecoding._accept
    seen = {"nodes": 0, "forced": 0}

    def checked(self, tree, logits):
        state = self.sampler.config.constraint
        for i in range(1, tree.size):
            path = [tree.tokens[j] for j in _ancestors(tree, i)]
            taken = state.matcher.try_consume_tokens(path)
            assert taken == len(path), f"a drafted path the grammar refuses: {tok.decode(path)!r}"
            state.matcher.rollback(taken)
        seen["nodes"] += tree.size - 1
        return accept(self, tree, logits)

    choices = GrammarState.draft_choices

    def counted(self, path, drafts, count):
        chosen, forced = choices(self, path, drafts, count)
        seen["forced"] += forced
        return chosen, forced

    monkeypatch.setattr(SpeculativeDecoding, "_accept", checked)
    monkeypatch.setattr(GrammarState, "draft_choices", counted)
    enable_speculation(llm, draft=str(directory), tree_size=16, depth=5, topk=3)
    try:
        for prompt in ["The quick brown fox", "hello"]:
            r = llm.generate(prompt, max_new_tokens=40, grammar=Grammar.regex(r"[a-z]{2,5}( [a-z]{4}){3},[a-z ]{4,9}"),
                             logit_bias=bias)
            assert r.finish_reason == "stop"
    finally:
        disable_speculation(llm)
    assert seen["nodes"] > 0 and seen["forced"] > 0


def _ancestors(tree: DraftTree, node: int) -> list[int]:
    """The nodes from below the root down to `node`."""
    out = []
    while node > 0:
        out.append(node)
        node = tree.parents[node]
    return out[::-1]


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 1}], ids=["greedy", "sampled"])
def test_nan_logits_raise_under_a_grammar(chat_llm, speculative, sampling) -> None:
    """NaN logits raise NumericalError instead of giving a token, at a decode or verification
    step (as test_engine checks without a grammar), though the grammar allows any character, so
    that no row's mask (which would show the NaN) is computed: the NaN makes token a the argmax,
    and a sampled row's draw comes from a placeholder. The logits are checked all the same."""
    from edgespec import NumericalError

    llm, directory = chat_llm
    if speculative:
        enable_speculation(llm, draft=str(directory), tree_size=6, depth=3, topk=2)
    weight = llm.model.lm_head.weight  # the target's alone: the draft model has its own
    a = llm.tokenizer.encode("a")[0]
    saved = weight[a].clone()
    try:
        events = llm.stream("abc", max_new_tokens=8, grammar=Grammar.regex(r"[\s\S]{8}"), **sampling)
        next(events)  # the first token, from the prefill
        weight[a] = float("nan")  # token a's logit is NaN at every later position: argmax picks it
        with pytest.raises(NumericalError, match="non-finite logits"):
            list(events)
    finally:
        weight[a] = saved
        disable_speculation(llm)


LETTERS = "abcdef"  # ids 0..5; f is the end token


@pytest.fixture(scope="module")
def letters_tokenizer():
    """Tokens a..f are ids 0..5, one character each (f, the end token, is special). llguidance
    tokenizes forced text with it, hence the split into characters."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    raw = RawTokenizer(models.WordLevel({c: i for i, c in enumerate(LETTERS)}))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    raw.decoder = decoders.Fuse()
    return GrammarState.tokenizer_for(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="f"), len(LETTERS))


# The filters keep other tokens of the masked rows than of the raw ones: there the sampler must not
# draw among all tokens first (mutation-checked: that fails here with p ~ 1e-30).
@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=3, top_p=0.95, min_p=0.2)],
                         ids=["unfiltered", "filtered"])
def test_sampled_tree_acceptance_under_a_grammar_is_lossless(letters_tokenizer, sampling) -> None:
    """One constrained acceptance of a fixed tree with fixed target rows commits (c1, c2), c2 only
    when c1 is a drafted child of the root; exactly, c1 ~ the root row masked by the grammar and
    c2 ~ c1's node's row masked after c1 (probabilities from GrammarState.mask, the full masks).
    Chi-square over 2000 acceptances (as test_spec_sampling). The tree drafts tokens the grammar
    forbids (e at the root; e after b, where only c may follow), which must never be committed."""
    from test_spec_sampling import chi_square_pvalue

    a, b, c, d, e = range(5)
    grammar = Grammar.regex("a?(bc|d)[a-e]")
    tokens = [a, a, b, d, e, b, d, c, e, a]
    parents = [-1, 0, 0, 0, 0, 1, 1, 2, 2, 3]
    tree = DraftTree.from_parents(tokens, parents)
    logits = torch.randn(len(tokens), len(LETTERS), generator=torch.Generator().manual_seed(3)) * 1.5
    config = GenerationConfig(seed=0, **sampling)

    def masked_probs(row: int, path: list[int]) -> list[float]:
        state = GrammarState(grammar, letters_tokenizer)
        masked = state.mask(logits[row:row + 1], [path])
        probs = ops.logits_to_probs(masked, config.temperature, config.top_k, config.top_p, config.min_p)
        return probs[0].double().tolist()

    root = masked_probs(0, [])
    dist: dict[tuple[int, ...], float] = {}
    for t1, p1 in enumerate(root):
        node = next((i for i in tree.children[0] if tokens[i] == t1), None)
        if node is None:
            dist[(t1,)] = p1
        else:
            for t2, p2 in enumerate(masked_probs(node, [t1])):
                dist[(t1, t2)] = p1 * p2
    state = GrammarState(grammar, letters_tokenizer)
    sampler = Sampler(replace(config, constraint=state), torch.device("cpu"))
    counts: dict[tuple[int, ...], int] = {}
    n = 2000
    for _ in range(n):
        path, bonus = accept_constrained(tree, logits, sampler)
        committed = [tokens[i] for i in path[1:]] + [bonus]
        counts[tuple(committed[:2])] = counts.get(tuple(committed[:2]), 0) + 1
    assert all(dist.get(s, 0.0) > 0 for s in counts), "a token the grammar (or the filters) forbids was committed"
    pvalue = chi_square_pvalue(counts, dist, n)
    assert pvalue > 1e-3, f"constrained tree acceptance differs from the masked distributions (p = {pvalue:.2e})"
    # The walk reads at most one row per depth (3): far fewer masks than the tree's 10 rows.
    assert state.full_masks <= 3 * n
