"""Thinking models (edgespec.reasoning): a reply's <think> section split from its content, whole and
streamed; grammars that let a reasoning section come before the constrained answer; chat-template
variables (Qwen3's enable_thinking); and the server's reasoning_content with the `openai` client on
the demo model, given templates written for these tests (a Qwen3-like one that lets the reply open
the section, a DeepSeek-R1-like one whose generation prompt opens it).
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import httpx
import pytest

from edgespec.reasoning import Reasoning, prompt_opens_thinking, template_thinks

# ---- splitting -----------------------------------------------------------------------------------

SPLITS = [
    (False, "<think>\nhmm </thi nk {x}\n</think>\n\nAnswer <think> kept",
     ("\nhmm </thi nk {x}\n", "Answer <think> kept")),
    (False, "  <think>all reasoning</think>", ("all reasoning", "")),
    (False, "<think>cut short </thi", ("cut short </thi", "")),
    (False, "No thinking at all.", (None, "No thinking at all.")),
    (False, "<thinking> is not the tag", (None, "<thinking> is not the tag")),
    (False, "  <thi", (None, "  <thi")),
    (False, "", (None, "")),
    (True, "the prompt opened it</think>\n\n{}", ("the prompt opened it", "{}")),
    (True, "cut short </th", ("cut short </th", "")),
    (True, "</think>", ("", "")),
]


@pytest.mark.parametrize("inside, text, expected", SPLITS)
def test_split_whole_and_streamed(inside, text, expected):
    """split() of a whole reply, and the stream's pieces joined, for every piece size."""
    reasoning = Reasoning(inside)
    assert reasoning.split(text) == expected
    for step in range(1, len(text) + 2):
        stream = reasoning.stream()
        thought = content = ""
        for i in range(0, len(text), step):
            a, b = stream.feed(text[i:i + step])
            thought, content = thought + a, content + b
        a, b = stream.finish()
        assert (thought + a if stream.reasoned else None, content + b) == expected, step
    if inside or expected[0] is not None:  # the closing tag's characters never leak into the reasoning
        stream = reasoning.stream()
        leaked = "".join(stream.feed(ch)[0] for ch in text)
        assert "</think>" not in leaked


def test_templates_and_prompts_that_think():
    assert template_thinks(QWEN3_LIKE) and template_thinks(R1_LIKE) and not template_thinks("{{ messages }}")
    assert not template_thinks(None)
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n")


# ---- grammars after a reasoning section ----------------------------------------------------------

pytest.importorskip("llguidance")

from edgespec.structured import Grammar  # noqa: E402
from test_tool_calls import CALL_T, TIME, accepts, chat_template, tools  # noqa: E402
from edgespec.tool_calls import FORMATS, ToolUse  # noqa: E402

OBJ = Grammar.json({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
                    "additionalProperties": False})


@pytest.fixture(scope="module")
def demo_tokenizer(demo_llm):
    return demo_llm.tokenizer


@pytest.mark.parametrize("grammar, answer, wrong", [
    (OBJ, '{"a": 1}', '{"a": "x"}'),
    (Grammar.regex("[a-z]{2,5}"), "hello", "Hello"),
    (Grammar.choice(["yes", "no"]), "no", "maybe"),
    (Grammar.lark('start: "A" | "B" "C"'), "BC", "B"),
    (ToolUse(tools(TIME), "required").grammar(FORMATS["hermes"]), f"<tool_call>\n{CALL_T}\n</tool_call>",
     "It is noon."),
], ids=["json", "regex", "choice", "lark", "tool-call"])
def test_grammars_after_reasoning(demo_tokenizer, grammar, answer, wrong):
    """The answer the grammar allows, after a reasoning section that the reply may open (and must
    close when the prompt opened it); never a wrong answer, and never text before the answer."""
    section = "<think>\nLet me see: {braces}, </thin and <think>.\n</think>\n\n"
    optional, required = grammar.after_reasoning(False).validate(), grammar.after_reasoning(True).validate()
    assert grammar.reasoning is None and optional.reasoning is False and required.reasoning is True
    assert accepts(demo_tokenizer, optional, answer) and accepts(demo_tokenizer, optional, section + answer)
    assert not accepts(demo_tokenizer, optional, section + wrong)
    assert not accepts(demo_tokenizer, optional, "Preamble " + section + answer)
    inside = section.removeprefix("<think>")
    assert accepts(demo_tokenizer, required, inside + answer)
    assert not accepts(demo_tokenizer, required, answer) and not accepts(demo_tokenizer, required, inside + wrong)


# ---- chat-template variables ----------------------------------------------------------------------

QWEN3_LIKE = """\
{%- if tools %}<|im_start|>system
You may call functions. For each call write a line <tool_call>, then a JSON object {"name": <function name>, \
"arguments": <arguments object>}, then a line </tool_call>. The functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}{% endif %}"""

R1_LIKE = """\
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
<think>
{% endif %}"""

ASK = [{"role": "user", "content": "Is the sky blue?"}]


def test_ids_and_opening_in_two_renderings(demo_llm):
    """The server reads a thinking template's reply opening and the prompt's ids from one call: the
    same as apply_chat_template and generation_prompt apart."""
    tok = demo_llm.tokenizer
    with chat_template(demo_llm, R1_LIKE):
        ids, opening = tok.chat_ids_and_opening(ASK)
        assert ids == tok.apply_chat_template(ASK) and opening == tok.generation_prompt(ASK)
        assert opening == "<|im_start|>assistant\n<think>\n"
    with chat_template(demo_llm, QWEN3_LIKE):
        ids, opening = tok.chat_ids_and_opening(ASK, template_kwargs={"enable_thinking": False})
        assert ids == tok.apply_chat_template(ASK, template_kwargs={"enable_thinking": False})
        assert opening.endswith("<think>\n\n</think>\n\n") and not prompt_opens_thinking(opening)


def test_template_variables_reach_the_template(demo_llm):
    with chat_template(demo_llm, QWEN3_LIKE):
        thinking = demo_llm.encode(ASK)
        plain = demo_llm.encode(ASK, template_kwargs={"enable_thinking": False})
        text = demo_llm.tokenizer.decode(plain, skip_special_tokens=False)
        assert text.endswith("<think>\n\n</think>\n\n") and plain[:len(thinking)] == thinking
        with pytest.raises(ValueError, match="identifiers other than"):
            demo_llm.encode(ASK, template_kwargs={"add_generation_prompt": False})
        with pytest.raises(ValueError, match="identifiers other than"):
            demo_llm.encode(ASK, template_kwargs={"not a name": 1})
        with pytest.raises(ValueError, match="chat template"):
            demo_llm.encode("Is the sky blue?", template_kwargs={"enable_thinking": False})


# ---- the server ------------------------------------------------------------------------------------

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_server import assert_openai_error, client, running_server  # noqa: E402


@contextlib.contextmanager
def serving(llm, template: str, **settings: Any) -> Iterator[str]:
    with chat_template(llm, template), running_server(llm, model_name="smollm2", **settings) as base:
        yield base


def streamed(c, **kwargs) -> tuple[str | None, str | None, list[dict]]:
    """(reasoning, content, tool-call deltas) of a streamed chat completion, joined."""
    thought = content = None
    calls: list[dict] = []
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if getattr(delta, "reasoning_content", None):
            thought = (thought or "") + delta.reasoning_content
        if delta.content:
            content = (content or "") + delta.content
        calls += [part.model_dump(exclude_none=True) for part in delta.tool_calls or []]
    return thought, content, calls


@contextlib.contextmanager
def scripted(llm, text: str, finish: str = "stop") -> Iterator[None]:
    """Every generation of `llm` replaced by `text`, streamed three characters per event: how the
    server handles a reply, apart from what the demo model would write."""
    from edgespec.engine import GenerationResult, GenerationStats, StreamEvent

    def stream(prompt_ids, config, cancel=None, **_):
        for i in range(0, len(text), 3):
            yield StreamEvent(text[i:i + 3], [])
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        yield StreamEvent("", [], GenerationResult(text, ids, finish, GenerationStats(prompt_tokens=len(prompt_ids))))

    llm.stream = stream
    try:
        yield
    finally:
        del llm.stream


@pytest.mark.parametrize("text, thought, content", [
    ("<think>\nThe sky scatters blue light.\n</think>\n\nYes, it is.", "\nThe sky scatters blue light.\n",
     "Yes, it is."),
    ("Yes.", None, "Yes."),
    ("<think>all reasoning</think>\n", "all reasoning", None),
])
def test_reasoning_comes_apart_from_the_content(demo_llm, text, thought, content):
    """A reply's <think> section is its reasoning_content and the rest its content, streamed or not;
    with --reasoning-format none the text stays the content."""
    kwargs = dict(model="smollm2", messages=ASK, max_tokens=60)
    with serving(demo_llm, QWEN3_LIKE) as base, scripted(demo_llm, text):
        c = client(base)
        message = c.chat.completions.create(**kwargs).choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (thought, content)
        assert streamed(c, **kwargs)[:2] == (thought, content)
    with serving(demo_llm, QWEN3_LIKE, reasoning_format="none") as base, scripted(demo_llm, text):
        message = client(base).chat.completions.create(**kwargs).choices[0].message
        assert message.content == text and "reasoning_content" not in message.model_extra


def test_constrained_answer_after_the_models_own_reasoning(demo_llm):
    """Under a reasoning-aware grammar the demo opens a section and writes its own reasoning (it
    prefers that to the forced choice here); the server returns it apart, as the engine's text splits."""
    forced = "<think>\nThe sky scatters blue light.\n</think>\n\nYes."
    kwargs = dict(model="smollm2", messages=ASK, max_tokens=40, temperature=0, extra_body={"guided_choice": [forced]})
    with serving(demo_llm, QWEN3_LIKE) as base:
        c = client(base)
        message = c.chat.completions.create(**kwargs).choices[0].message
        with chat_template(demo_llm, QWEN3_LIKE):
            ids = demo_llm.encode(ASK)
        ref = demo_llm.generate(ids, max_new_tokens=40, grammar=Grammar.choice([forced]).after_reasoning(False))
        thought, content = Reasoning(False).split(ref.text)
        assert thought  # the premise: the model reasons first
        assert (message.model_extra["reasoning_content"], message.content) == (thought, content or None)
        assert streamed(c, **kwargs)[:2] == (thought, content or None)


def test_a_prompt_that_opens_the_section(demo_llm):
    """R1-like templates open <think> in the generation prompt: the reply starts as reasoning, and a
    reply cut short before </think> is all reasoning, with no content."""
    kwargs = dict(model="smollm2", messages=ASK, max_tokens=8, temperature=0)
    with serving(demo_llm, R1_LIKE) as base:
        c = client(base)
        r = c.chat.completions.create(**kwargs)
        with chat_template(demo_llm, R1_LIKE):
            ref = demo_llm.generate(demo_llm.encode(ASK), max_new_tokens=8)
        assert "</think>" not in ref.text and ref.finish_reason == "length"  # the premise
        message = r.choices[0].message
        assert (message.model_extra["reasoning_content"], message.content) == (ref.text, None)
        assert streamed(c, **kwargs)[:2] == (ref.text, None)


def test_a_tag_in_the_conversation_opens_nothing(demo_llm):
    """Only the template's opening of the reply decides whether the reply starts inside a section:
    a user who writes <think> does not turn the answer into reasoning."""
    messages = [{"role": "user", "content": "What does the tag <think> mean?"}]
    tok = demo_llm.tokenizer
    with chat_template(demo_llm, QWEN3_LIKE):
        assert tok.generation_prompt(messages) == "<|im_start|>assistant\n"
        off = tok.generation_prompt(messages, template_kwargs={"enable_thinking": False})
        assert off == "<|im_start|>assistant\n<think>\n\n</think>\n\n" and not prompt_opens_thinking(off)
    with chat_template(demo_llm, R1_LIKE):
        assert prompt_opens_thinking(tok.generation_prompt(messages))
    with serving(demo_llm, QWEN3_LIKE) as base, scripted(demo_llm, "It marks reasoning."):
        message = client(base).chat.completions.create(model="smollm2", messages=messages).choices[0].message
        assert message.content == "It marks reasoning." and message.model_extra["reasoning_content"] is None


def test_enable_thinking_through_chat_template_kwargs(demo_llm):
    with serving(demo_llm, QWEN3_LIKE) as base:
        c = client(base)
        off = c.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2,
                                        extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        on = c.chat.completions.create(model="smollm2", messages=ASK, max_tokens=2)
        with chat_template(demo_llm, QWEN3_LIKE):
            assert off.usage.prompt_tokens == len(demo_llm.encode(ASK, template_kwargs={"enable_thinking": False}))
        assert off.usage.prompt_tokens > on.usage.prompt_tokens
        payload = {"model": "smollm2", "messages": ASK, "max_tokens": 2, "chat_template_kwargs": {"messages": []}}
        err = assert_openai_error(httpx.post(f"{base}/v1/chat/completions", json=payload, timeout=60), 400)
        assert err["param"] == "chat_template_kwargs" and "identifiers other than" in err["message"]


def test_reasoning_in_the_history_reaches_the_template(demo_llm):
    history = ASK + [{"role": "assistant", "content": "Yes.", "reasoning_content": "Rayleigh scattering."},
                     {"role": "user", "content": "Why?"}]
    with serving(demo_llm, QWEN3_LIKE) as base:
        r = client(base).chat.completions.create(model="smollm2", messages=history, max_tokens=2)
        with chat_template(demo_llm, QWEN3_LIKE):
            ids = demo_llm.encode(history)
        assert "<think>\nRayleigh scattering.\n</think>" in demo_llm.tokenizer.decode(ids, skip_special_tokens=False)
        assert r.usage.prompt_tokens == len(ids)
        bad = [{"role": "user", "content": "Hi", "reasoning_content": "x"}]
        err = assert_openai_error(httpx.post(f"{base}/v1/chat/completions", timeout=60,
                                             json={"model": "smollm2", "messages": bad}), 400)
        assert err["param"] == "messages.0.reasoning_content"


def test_a_required_call_may_follow_reasoning(demo_llm):
    """tool_choice required on a thinking model: the call grammar comes after the optional section,
    and the call is parsed from the content, streamed or not."""
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "What time is it in Paris?"}],
                  tools=[TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=60, temperature=0)
    with serving(demo_llm, QWEN3_LIKE) as base:
        c = client(base)
        choice = c.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
        thought, content, parts = streamed(c, **kwargs)
        assert thought == choice.message.model_extra["reasoning_content"] and content is None
        assert json.loads("".join(p["function"]["arguments"] for p in parts)) == json.loads(call.function.arguments)
