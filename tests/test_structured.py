"""Structured output (edgespec.structured): grammars compile or fail clearly; masking keeps the model's
choice wherever the grammar allows it and overrides it only where it must (checked against the
unconstrained greedy text); generations are valid and end when the grammar is complete, greedy and
sampled, with speculation installed, through the CLI and the server."""
from __future__ import annotations

import json
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
    (Grammar("yaml"), r"grammar kind must be one of json, regex, choice, got 'yaml'"),
    (Grammar.regex("("), r"the regex grammar does not compile: .*unclosed group"),
    (Grammar.json("{not json"), r"the JSON schema is not valid JSON"),
    (Grammar.json({"type": "nonsense"}), r"the json grammar does not compile: .*nonsense"),
    (Grammar.choice([]), r"a choice grammar needs one or more non-empty strings"),
    (Grammar.regex(5), r"a regex grammar needs the pattern as a string"),
])
def test_bad_grammars_are_refused(grammar, message) -> None:
    with pytest.raises(ValueError, match=message):
        GenerationConfig(grammar=grammar).validate()


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
    installed the constrained generation runs plain decoding and gives the same text."""
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
    assert again.text == results[0].text and "draft" not in again.stats.extra


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
