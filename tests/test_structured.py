"""Structured output (edgespec.structured): grammars compile or fail clearly; masking keeps the model's
choice wherever the grammar allows it and overrides it only where it must (checked against the
unconstrained greedy text); generations are valid and end when the grammar is complete, greedy and
sampled, with speculation installed, through the CLI and the server."""
from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch

pytest.importorskip("llguidance")

from edgespec import LLM  # noqa: E402
from edgespec.generation import GenerationConfig  # noqa: E402
from edgespec.loading import load_model  # noqa: E402
from edgespec.spec import DEMO_HEAD, enable_speculation  # noqa: E402
from edgespec.structured import Grammar  # noqa: E402
from test_engine import write_tiny_chat_model  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = write_tiny_chat_model(tmp_path_factory.mktemp("tiny-structured"))
    return LLM(load_model(d, device="cpu", dtype=torch.float32, max_context=64))


@pytest.mark.parametrize("grammar, message", [
    (Grammar("yaml"), r"grammar kind must be one of json, regex, choice, lark, got 'yaml'"),
    (Grammar.regex("("), r"the regex grammar does not compile: .*unclosed group"),
    (Grammar.json("{not json"), r"the JSON schema is not valid JSON"),
    (Grammar.json({"type": "nonsense"}), r"the json grammar does not compile: .*nonsense"),
    (Grammar.choice([]), r"a choice grammar needs one or more non-empty strings"),
    (Grammar.regex(5), r"a regex grammar needs its text as a string"),
])
def test_bad_grammars_are_refused(grammar, message) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(grammar=grammar).validate()


def test_bitmask_unpacking() -> None:
    from edgespec.structured import _allowed

    words = torch.tensor([[0b101, -(1 << 31), 1], [0, 0, 0]], dtype=torch.int32)  # tokens 0, 2, 63, 64
    allowed = _allowed(words, 100)
    assert allowed.shape == (2, 100) and not allowed[1].any()
    assert allowed[0].nonzero().flatten().tolist() == [0, 2, 63, 64]
    assert _allowed(words, 40)[0].nonzero().flatten().tolist() == [0, 2]


def test_the_mask_keeps_the_model_s_choice_where_the_grammar_allows_it(demo_llm) -> None:
    """A regex that is exactly the unconstrained greedy text reproduces its tokens and stops at its
    end; one that forbids the greedy token at step k keeps the k tokens before it and puts the
    character the grammar demands there."""
    enable_speculation(demo_llm, None)
    prompt = "The three primary colors are"
    free = demo_llm.generate(prompt, max_new_tokens=12, ignore_eos=True)
    same = demo_llm.generate(prompt, max_new_tokens=30, ignore_eos=True, grammar=Grammar.regex(re.escape(free.text)))
    assert same.token_ids == free.token_ids and same.finish_reason == "stop"
    k = 5
    prefix = demo_llm.tokenizer.decode(free.token_ids[:k])
    pattern = re.escape(prefix) + "Z[a-z ]{0,8}"
    forced = demo_llm.generate(prompt, max_new_tokens=30, ignore_eos=True, grammar=Grammar.regex(pattern))
    assert forced.token_ids[:k] == free.token_ids[:k] and forced.token_ids[k] != free.token_ids[k]
    assert re.fullmatch(pattern, forced.text) and forced.text[len(prefix)] == "Z"


@pytest.mark.parametrize("seed", [None, 1, 2, 3])
def test_every_sample_matches(tiny, seed) -> None:
    settings = {} if seed is None else {"temperature": 1.5, "seed": seed}
    pattern = r"[0-9]{3}-[0-9]{4}"
    r = tiny.generate("call ", max_new_tokens=30, ignore_eos=True, grammar=Grammar.regex(pattern), **settings)
    assert re.fullmatch(pattern, r.text) and r.finish_reason == "stop"
    choice = tiny.generate("pick: ", max_new_tokens=30, grammar=Grammar.choice(["alpha", "beta", "gamma"]), **settings)
    assert choice.text in ("alpha", "beta", "gamma") and choice.finish_reason == "stop"


def test_structured_output_needs_a_tokenizer(tmp_path) -> None:
    from conftest import write_tiny_hf_model

    llm = LLM(load_model(write_tiny_hf_model(tmp_path / "m"), device="cpu", max_context=32, with_tokenizer=False))
    with pytest.raises(ValueError, match="structured output needs the model's tokenizer"):
        llm.generate([5, 6], grammar=Grammar.regex("[a-z]+"))


@pytest.mark.slow
def test_json_from_the_demo_model_with_speculation_installed(demo_llm) -> None:
    """The demo model answers in JSON valid under the schema, greedy and sampled; with its draft head
    installed, speculative decoding gives plain decoding's tokens."""
    messages = [{"role": "user", "content": "Give a JSON object with a name and an age for a person."}]
    enable_speculation(demo_llm, None)
    results = [demo_llm.generate(messages, max_new_tokens=80, grammar=Grammar.json(SCHEMA), **s)
               for s in ({}, {"temperature": 1.0, "seed": 4})]
    for r in results:
        value = json.loads(r.text)
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and isinstance(value["age"], int)
        assert r.finish_reason == "stop"
    any_object = demo_llm.generate(messages, max_new_tokens=80, grammar=Grammar.json())
    assert isinstance(json.loads(any_object.text), dict)
    enable_speculation(demo_llm, draft=str(DEMO_HEAD))
    try:
        again = demo_llm.generate(messages, max_new_tokens=80, grammar=Grammar.json(SCHEMA))
    finally:
        enable_speculation(demo_llm, None)
    # Each tree row masked by its own path: greedy speculation gives plain decoding's text.
    assert again.token_ids == results[0].token_ids and again.stats.extra["mean_accepted_length"] > 1.3


def _one_step_each(monkeypatch) -> None:
    """Plain decoding as before jump-forward: no forced tokens, one forward per token."""
    from edgespec.structured import GrammarState

    monkeypatch.setattr(GrammarState, "take_forced", lambda self, limit: [])


@pytest.mark.parametrize("grammar, max_new", [
    (Grammar.json(SCHEMA), 80),
    (Grammar.json(SCHEMA), 9),                                       # ends inside a forced key
    (Grammar.regex(r'\{"answer": "(yes|no)", "why": "[a-z ]{1,30}"\}'), 60),
    (Grammar.choice(["the quick brown fox jumps over the lazy dog"]), 40),  # all forced
], ids=["json-schema", "json-budget", "regex", "choice"])
def test_forced_tokens_take_no_step_of_their_own(demo_llm, monkeypatch, grammar, max_new) -> None:
    """Plain decoding runs the tokens a grammar forces through the model with the last token in
    one forward: the same tokens and log-probabilities as one step per token, in fewer steps (as
    many fewer as tokens were forced), within the token budget."""
    messages = [{"role": "user", "content": "Give a JSON object with a name and an age for a person."}]
    enable_speculation(demo_llm, None)
    jumped = demo_llm.generate(messages, max_new_tokens=max_new, grammar=grammar, logprobs=2)
    with monkeypatch.context() as m:
        _one_step_each(m)
        stepped = demo_llm.generate(messages, max_new_tokens=max_new, grammar=grammar, logprobs=2)
    assert jumped.token_ids == stepped.token_ids and jumped.finish_reason == stepped.finish_reason
    assert len(jumped.token_ids) <= max_new
    for a, b in zip(jumped.logprobs, stepped.logprobs):
        assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
    # One step fewer per forced token, but for a step whose forced tokens complete the grammar.
    forced = jumped.stats.extra["forced_tokens"]
    assert forced > 0 and stepped.stats.steps - forced <= jumped.stats.steps <= stepped.stats.steps - forced + 1
    assert stepped.stats.extra["forced_tokens"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forced_tokens_get_a_steps_logits_bit_for_bit(tmp_path, monkeypatch, dtype) -> None:
    """In bf16 and fp16, where a row's result does not depend on the row count, a forced token's
    log-probabilities (and so its K/V) are exactly those of a step of its own."""
    llm = LLM(load_model(write_tiny_chat_model(tmp_path / "m"), device="cpu", dtype=dtype, max_context=64))
    llm.prefix_caching = False  # both runs prefill the whole prompt alike
    grammar = Grammar.regex(r"call [0-9]{2} at zzzz, then [a-z]{2,4} now")
    # The model prefers z, but the four forced ones count against it (frequency penalty): the
    # tokens chosen after forced ones must see them in the history.
    z = llm.tokenizer.encode("z")[0]
    settings = dict(max_new_tokens=40, grammar=grammar, logprobs=1, frequency_penalty=2.0, logit_bias={z: 6.0})
    jumped = llm.generate("so ", **settings)
    _one_step_each(monkeypatch)
    stepped = llm.generate("so ", **settings)
    assert jumped.token_ids == stepped.token_ids and jumped.stats.extra["forced_tokens"] >= 15
    assert "zzzz, then z" not in jumped.text
    assert [(e.logprob, e.top) for e in jumped.logprobs] == [(e.logprob, e.top) for e in stepped.logprobs]


def test_cli_options(tiny, tmp_path, capsys) -> None:
    from edgespec.cli import build_parser
    from edgespec.cli.common import generation_config

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    parse = build_parser().parse_args
    assert generation_config(parse(["generate", "--model", "m", "--json-schema", str(schema), "x"])).grammar == \
        Grammar.json(json.dumps(SCHEMA))
    assert generation_config(parse(["generate", "--model", "m", "--json", "x"])).grammar == Grammar.json()
    assert generation_config(parse(["generate", "--model", "m", "--choice", "a", "--choice", "b", "x"])).grammar == \
        Grammar.choice(["a", "b"])
    with pytest.raises(ValueError, match="--json-schema: nope.json is neither JSON text nor a readable file"):
        generation_config(parse(["generate", "--model", "m", "--json-schema", "nope.json", "x"]))
    with pytest.raises(SystemExit):  # one constraint at a time
        parse(["generate", "--model", "m", "--json", "--regex", "a+", "x"])
    capsys.readouterr()


def _letters_model(directory):
    """The spec-sampling test's 6-token random Llama with a tokenizer: tokens a..f are ids 0..5
    (f, the EOS, is special), pieces joined as they are."""
    from tokenizers import decoders, models
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    from conftest import write_tiny_hf_model

    write_tiny_hf_model(directory, "llama", 21, vocab_size=6, num_hidden_layers=2, hidden_size=48,
                        num_attention_heads=4, num_key_value_heads=2, intermediate_size=64)
    raw = RawTokenizer(models.WordLevel({c: i for i, c in enumerate("abcdef")}))
    raw.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="f").save_pretrained(directory)
    return LLM(load_model(str(directory), device="cpu", dtype=torch.float32, max_context=64))


@pytest.mark.slow
def test_speculative_sampling_under_a_grammar_keeps_the_masked_distribution(tmp_path) -> None:
    """Chi-square goodness of fit (as test_spec_sampling) of 3-token speculative samples under the
    regex [abc][a-e][b-e] against the exact distribution of the model restricted, position by
    position, to those letters: a tree row masked by the wrong path would move mass."""
    from edgespec import ops
    from edgespec.spec import disable_speculation
    from edgespec.spec.train_head import random_head
    from test_spec_sampling import chi_square_pvalue

    llm = _letters_model(tmp_path / "letters")
    prompt, allowed = [1, 3], [{0, 1, 2}, {0, 1, 2, 3, 4}, {1, 2, 3, 4}]
    model = llm.model
    probs = {}
    with torch.inference_mode():
        for length in range(3):
            for prefix in itertools.product(range(6), repeat=length):
                ids = torch.tensor(prompt + list(prefix))
                logits = model.logits(model.forward(ids, torch.arange(ids.numel()), model.new_cache(16), 0).hidden[-1:])
                keep = torch.tensor([t in allowed[length] for t in range(6)])
                probs[prefix] = ops.logits_to_probs(torch.where(keep, logits, float("-inf")), 1.0)[0].double()
    dist = {seq: math.prod(float(probs[seq[:i]][seq[i]]) for i in range(3))
            for seq in itertools.product(range(6), repeat=3)}
    grammar = Grammar.regex("[abc][a-e][b-e]")
    enable_speculation(llm, draft=str(random_head(model.config, tmp_path / "head", seed=4, std=0.5)),
                       tree_size=10, depth=3, topk=3)
    try:
        counts: dict[tuple[int, ...], int] = {}
        accepted = 0
        for seed in range(2000):
            r = llm.generate(prompt, max_new_tokens=5, ignore_eos=True, temperature=1.0, seed=seed, grammar=grammar)
            assert r.finish_reason == "stop" and len(r.token_ids) == 3  # the grammar ends it
            counts[tuple(r.token_ids)] = counts.get(tuple(r.token_ids), 0) + 1
            accepted += max(int(k) for k in r.stats.extra["acceptance_histogram"])
    finally:
        disable_speculation(llm)
    assert all(dist[s] > 0 for s in counts)
    assert accepted > 2000  # drafts were accepted, so tree rows beyond the root were used
    pvalue = chi_square_pvalue(counts, dist, 2000)
    assert pvalue > 1e-3, f"speculative sampling under a grammar differs from the masked distribution (p = {pvalue:.2e})"


def test_a_grammar_compiles_once(monkeypatch) -> None:
    # Validation (the config's, the server's) and the matcher share one compilation; a dict schema
    # is frozen as JSON text, so mutating the caller's dict afterwards changes nothing.
    import llguidance

    calls = []
    real = llguidance.LLMatcher.grammar_from_json_schema
    monkeypatch.setattr(llguidance.LLMatcher, "grammar_from_json_schema",
                        lambda schema, *a, **k: calls.append(schema) or real(schema, *a, **k))
    schema = dict(SCHEMA)
    grammar = Grammar.json(schema)
    schema["required"] = ["nothing"]
    GenerationConfig(grammar=grammar).validate()
    grammar.validate()
    assert grammar.compiled() and len(calls) == 1 and json.loads(calls[0]) == SCHEMA
