"""Tool calling (edgespec.tool_calls): tool validation, the two call formats (parsing, streaming
hold-back, grammars) and the server's tools / tool_choice with the `openai` client on the demo model.

The demo model's own template renders no tools, so the server tests give it HERMES_TEMPLATE (written
for these tests) through Tokenizer.set_chat_template, as `--chat-template` does.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import httpx
import pytest

pytest.importorskip("llguidance")

from edgespec.structured import GrammarState  # noqa: E402
from test_spec_helpers import one_thread  # noqa: E402,F401 (autouse: steadier on a shared 2-core machine)
from edgespec.tool_call_stream import ToolCallStream  # noqa: E402
from edgespec.tool_calls import FORMATS, Tool, ToolUse, detect_format, template_renders_tools  # noqa: E402

HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

You may call functions. For each call write a line <tool_call>, then a JSON object {"name": <function name>, \
"arguments": <arguments object>}, then a line </tool_call>. The functions:
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if loop.first and m.role == 'system' and tools %}
{%- elif m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{{ m.content }}{% for c in m.tool_calls %}<tool_call>
{{ {"name": c.function.name, "arguments": c.function.arguments} | tojson }}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"], "additionalProperties": False}}}
NAMES = {"get_weather", "get_time"}


def tools(*raw: dict) -> tuple[Tool, ...]:
    return tuple(Tool.from_openai(t) for t in raw)


# ---- tools and choices ----------------------------------------------------------------------------

@pytest.mark.parametrize("raw, message", [
    ({"type": "function"}, r"must be \{'type': 'function'"),
    ({"type": "retrieval", "function": {"name": "f"}}, r"must be \{'type': 'function'"),
    ({"type": "function", "function": {"name": "has space"}}, r"function.name must be 1-64 letters"),
    ({"type": "function", "function": {"name": "f" * 65}}, r"function.name must be 1-64 letters"),
    ({"type": "function", "function": {"name": "f", "parameters": [1]}}, r"parameters must be a JSON schema object"),
    ({"type": "function", "function": {"name": "f", "strict": "yes"}}, r"strict must be a boolean"),
    ({"type": "function", "function": {"name": "f", "description": 3}}, r"description must be a string"),
])
def test_bad_tools_are_refused(raw, message):
    with pytest.raises(ValueError, match=message):
        Tool.from_openai(raw, "tools.0")


def test_tool_defaults_and_template_form():
    t = Tool.from_openai({"type": "function", "function": {"name": "now"}})
    assert t.parameters == {"type": "object", "properties": {}} and not t.strict
    assert t.openai() == {"type": "function", "function": {"name": "now", "parameters": t.parameters}}
    assert Tool.from_openai(WEATHER).openai() == WEATHER


def test_tool_use_checks_names():
    with pytest.raises(ValueError, match="unique"):
        ToolUse(tools(WEATHER, WEATHER))
    with pytest.raises(ValueError, match="names function 'nope', which is not among the tools"):
        ToolUse(tools(WEATHER), "nope")
    with pytest.raises(ValueError, match="at least one tool"):
        ToolUse(())
    assert not ToolUse(tools(WEATHER)).constrained() and ToolUse(tools(WEATHER), "required").constrained()
    strict = {"type": "function", "function": {**TIME["function"], "strict": True}}
    assert ToolUse(tools(WEATHER, strict)).constrained()


def test_format_detection():
    assert detect_format(HERMES_TEMPLATE).name == "hermes"
    llama = '<|start_header_id|>user<|end_header_id|> Respond as {"name": name, "parameters": args} {{ tools }}'
    assert detect_format(llama).name == "llama3_json"
    assert detect_format("{{ messages }}") is None and detect_format(None) is None
    assert template_renders_tools(HERMES_TEMPLATE) and not template_renders_tools("{% for m in messages %}{% endfor %}")


# ---- parsing ----------------------------------------------------------------------------------------

CALL_W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CALL_T = '{"name": "get_time", "arguments": {"zone": "UTC"}}'


@pytest.mark.parametrize("text, content, calls", [
    (f"<tool_call>\n{CALL_W}\n</tool_call>", None, [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (f"Let me look.\n<tool_call>\n{CALL_W}\n</tool_call>\n<tool_call>\n{CALL_T}\n</tool_call>\n", "Let me look.",
     [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "UTC"})]),
    # arguments written as JSON text; the last closing tag missing at the end of the reply
    ('<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}', None, [("get_time", {"zone": "CET"})]),
])
def test_hermes_parses_calls(text, content, calls):
    got_content, got = FORMATS["hermes"].parse(text, NAMES)
    assert got_content == content and [(c.name, c.arguments) for c in got] == calls
    assert all(c.id.startswith("call_") for c in got) and len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("text", [
    "No calls here, just text with a < sign.",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>',          # not offered
    '<tool_call>\n{"name": "get_time", "arguments": [1]}\n</tool_call>',               # not an object
    '<tool_call>\n{"name": "get_time", "arguments": {}, "extra": 1}\n</tool_call>',    # unknown key
    f"<tool_call>\n{CALL_T}\n</tool_call>\nand some words after it",
    f"<tool_call>\n{CALL_T}\n</tool_call> between <tool_call>\n{CALL_T}\n</tool_call>",
])
def test_hermes_keeps_anything_else_as_content(text):
    assert FORMATS["hermes"].parse(text, NAMES) == (text, [])


def test_llama3_json_parses_calls():
    fmt = FORMATS["llama3_json"]
    one = '{"name": "get_time", "parameters": {"zone": "UTC"}}'
    content, calls = fmt.parse(f"  {one}; {one.replace('UTC', 'CET')}\n", NAMES)
    assert content is None and [c.arguments["zone"] for c in calls] == ["UTC", "CET"]
    for text in ["It is sunny.", one[:-1], f"{one} trailing", '{"name": "get_time", "arguments": {"zone": "x"}}']:
        assert fmt.parse(text, NAMES) == (text, [])


# ---- streaming ---------------------------------------------------------------------------------------

def joined(deltas: list[dict]) -> dict[int, dict]:
    """Tool-call deltas joined as clients join them: per index, the id and type of its first delta
    (no later delta repeats them), the name and the concatenated argument fragments."""
    calls: dict[int, dict] = {}
    for d in deltas:
        if d["index"] not in calls:
            assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
            calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
        calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert list(calls) == list(range(len(calls))) and len({c["id"] for c in calls.values()}) == len(calls)
    return calls


def stream_in_pieces(use: ToolUse, fmt: str, text: str, step: int) -> tuple[str, list[dict], ToolCallStream]:
    """(content, call deltas, the stream) of `text` fed `step` characters at a time, then finished."""
    stream = ToolCallStream(use, FORMATS[fmt])
    content, deltas = "", []
    for i in range(0, len(text), step):
        part, calls = stream.feed(text[i:i + step])
        content, deltas = content + part, deltas + calls
    part, calls = stream.finish()
    return content + part, deltas + calls, stream


@pytest.mark.parametrize("fmt, text, streamed", [
    ("hermes", f"Let me check <that>.\n<tool_call>\n{CALL_T}\n</tool_call>", "Let me check <that>.\n"),
    ("hermes", "Text with <tool_ca but no call.", "Text with <tool_ca but no call."),
    ("hermes", "Just an answer.", "Just an answer."),
    ("llama3_json", '\n{"name": "get_time", "parameters": {"zone": "UTC"}}', ""),
    ("llama3_json", "\nIt is sunny {really}.", "\nIt is sunny {really}."),
])
def test_free_stream_holds_back_calls_and_loses_nothing(fmt, text, streamed):
    """Free `auto`: text that may open a call is held back, and a well-formed call is sent whole."""
    use = ToolUse(tools(WEATHER, TIME))
    for step in (1, 3, len(text)):  # deltas of several sizes
        stream = ToolCallStream(use, FORMATS[fmt])
        sent = ""
        for i in range(0, len(text), step):
            part, calls = stream.feed(text[i:i + step])
            sent += part
            assert calls == []
        held, calls = stream.finish()
        if calls:
            assert sent == streamed and held == "" and stream.calls == 1
            (call,) = calls
            assert call["index"] == 0 and call["function"]["name"] == "get_time"
            assert json.loads(call["function"]["arguments"]) == {"zone": "UTC"}
        else:
            assert sent + held == text == streamed and stream.calls == 0
        if step == 1 and "<tool_call>" in text:  # nothing of the opening tag ever leaks as content
            assert "<" not in sent.replace("<that>", "")


# Calls as a grammar would let them through, with brackets, quotes and escapes inside strings.
TRICKY_W = '{"name": "get_weather", "arguments": {"city": "Pa\\"r{is}] \\\\", "unit": "celsius"}}'
TRICKY_T = '{"name": "get_time", "arguments": {"zone": "UTC [+1] {\\u00e9} \u00e9"}}'


@pytest.mark.parametrize("fmt, choice, text, content", [
    ("hermes", "required", f"<tool_call>\n{TRICKY_W}\n</tool_call>\n<tool_call>\n{TRICKY_T}\n</tool_call>", ""),
    ("hermes", "auto", f"Checking {{now}}.\n<tool_call>\n{TRICKY_T}\n</tool_call>", "Checking {now}.\n"),
    ("hermes", "required", '<tool_call>\n{"arguments": {"zone": "x"}, "name": "get_time"}\n</tool_call>', ""),
    ("llama3_json", "required", f'{TRICKY_T.replace("arguments", "parameters")}; '
                                '{"name": "get_time", "parameters": {"zone": "A", "more": [1, {"b": "}"}]}}', ""),
])
def test_guaranteed_calls_stream_as_written(fmt, choice, text, content):
    """Where a grammar guarantees the calls, each streams as written: id and name first, as soon as
    the name is complete, then the arguments' own text in fragments."""
    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]
    use = ToolUse(tools(*strict), choice)
    names = {t.name for t in use.tools}
    _, expected = FORMATS[fmt].parse(text, names)
    assert expected  # the premise: the text is well formed
    for step in (1, 2, 7, len(text)):
        sent, deltas, stream = stream_in_pieces(use, fmt, text, step)
        calls = joined(deltas)
        assert sent == content and stream.calls == len(expected)
        assert [c["name"] for c in calls.values()] == [c.name for c in expected]
        assert [json.loads(c["arguments"]) for c in calls.values()] == [c.arguments for c in expected]
        assert all(c["arguments"] in text for c in calls.values())  # the model's own text, not re-serialised
        if step == 1 and '{"name"' in text:  # fragments, and each name sent before its arguments end
            for index in calls:
                mine = [d for d in deltas if d["index"] == index]
                assert len(mine) > 3 and "name" in mine[0]["function"]


def test_guaranteed_call_cut_short_keeps_its_fragments():
    use = ToolUse(tools(WEATHER, TIME), "required")
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c'  # max_tokens ends it
    sent, deltas, stream = stream_in_pieces(use, "hermes", text, 3)
    (call,) = joined(deltas).values()
    assert sent == "" and stream.calls == 1
    assert call["name"] == "get_weather" and call["arguments"] == '{"city": "Paris", "unit": "c'
    # strict auto that wrote text ending in what might have opened a call: all of it is content
    strict = [{"type": "function", "function": {**WEATHER["function"], "strict": True}}]
    sent, deltas, stream = stream_in_pieces(ToolUse(tools(*strict)), "hermes", "Hello <tool_ca", 2)
    assert sent == "Hello <tool_ca" and deltas == [] and stream.calls == 0


# ---- grammars ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_tokenizer(demo_llm):
    return demo_llm.tokenizer


def accepts(tokenizer, grammar, text: str) -> bool:
    """Whether the grammar allows `text` as a complete reply (tokenised canonically)."""
    import llguidance

    if tokenizer.grammar_tokenizer is None:
        tokenizer.grammar_tokenizer = GrammarState.tokenizer_for(tokenizer.hf, len(tokenizer.hf))
    matcher = llguidance.LLMatcher(tokenizer.grammar_tokenizer, grammar.compiled())
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


W_ARGS = '{"city": "Oslo", "unit": "celsius"}'


@pytest.mark.parametrize("choice, parallel, text, ok", [
    ("required", True, f'<tool_call>\n{{"name": "get_weather", "arguments": {W_ARGS}}}\n</tool_call>', True),
    ("required", True, f"<tool_call>\n{CALL_T}\n</tool_call>\n<tool_call>\n{CALL_T}\n</tool_call>", True),
    ("required", False, f"<tool_call>\n{CALL_T}\n</tool_call>\n<tool_call>\n{CALL_T}\n</tool_call>", False),
    ("required", True, "Sure, I can help.", False),
    ("required", True, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', False),
    ("required", True, '<tool_call>\n{"name": "get_date", "arguments": {}}\n</tool_call>', False),
    ("get_time", True, f"<tool_call>\n{CALL_T}\n</tool_call>", True),
    ("get_time", True, f'<tool_call>\n{{"name": "get_weather", "arguments": {W_ARGS}}}\n</tool_call>', False),
    ("auto", True, "Sure, I can help with < and > signs.", True),
    ("auto", True, f"Checking.\n<tool_call>\n{CALL_T}\n</tool_call>", True),
    ("auto", True, '<tool_call>\n{"name": "get_time", "arguments": {"zone": 5}}\n</tool_call>', False),
])
def test_hermes_grammars(demo_tokenizer, choice, parallel, text, ok):
    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]
    use = ToolUse(tools(*strict), choice, parallel)
    assert accepts(demo_tokenizer, use.grammar(FORMATS["hermes"]), text) == ok


@pytest.mark.parametrize("choice, text, ok", [
    ("required", '{"name": "get_time", "parameters": {"zone": "UTC"}}', True),
    ("required", '{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_time", "parameters": '
                 '{"zone": "CET"}}', True),
    ("required", "It is noon.", False),
    ("auto", "It is noon.", True),
    ("auto", '{"name": "get_time", "parameters": {}}', False),
])
def test_llama3_json_grammars(demo_tokenizer, choice, text, ok):
    strict = {"type": "function", "function": {**TIME["function"], "strict": True}}
    use = ToolUse(tools(strict), choice)
    assert accepts(demo_tokenizer, use.grammar(FORMATS["llama3_json"]), text) == ok


def test_free_auto_has_no_grammar():
    assert ToolUse(tools(WEATHER, TIME)).grammar(FORMATS["hermes"]) is None


# ---- the server ------------------------------------------------------------------------------------------

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from test_server import assert_openai_error, client, running_server  # noqa: E402


@contextlib.contextmanager
def chat_template(llm, template: str) -> Iterator[None]:
    """`llm` with another chat template, its own restored afterwards (the demo LLM is shared)."""
    original = llm.tokenizer.hf.chat_template
    llm.tokenizer.set_chat_template(template)
    try:
        yield
    finally:
        llm.tokenizer.hf.chat_template = original


@pytest.fixture(scope="module")
def tool_server(demo_llm) -> Iterator[str]:
    """The demo model served with HERMES_TEMPLATE."""
    with chat_template(demo_llm, HERMES_TEMPLATE), running_server(demo_llm, model_name="smollm2") as base:
        yield base


ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


def check_weather_arguments(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and len(args["city"]) <= 30
    assert args["unit"] in ("celsius", "fahrenheit")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_forced_call(tool_server, demo_llm, tool_choice):
    c = client(tool_server)
    r = c.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice,
                                  parallel_tool_calls=False, max_tokens=80, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_weather"
    if call.function.name == "get_weather":
        check_weather_arguments(call.function.arguments)
    else:
        assert call.function.name == "get_time" and set(json.loads(call.function.arguments)) == {"zone"}
    # The prompt the server generated from is the template's rendering with the tools.
    assert r.usage.prompt_tokens == len(demo_llm.encode(ASK, tools=[WEATHER, TIME]))
    assert r.usage.prompt_tokens > len(demo_llm.encode(ASK)) + 50


def test_streamed_call_equals_whole(tool_server):
    c = client(tool_server)
    kwargs = dict(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
                  max_tokens=80, temperature=0)
    whole = c.chat.completions.create(**kwargs).choices[0].message.tool_calls
    content, parts, finish = "", [], None
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        parts += [part.model_dump(exclude_none=True) for part in delta.tool_calls or []]
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    calls = joined(parts)  # as clients join them
    # The grammar guarantees the call: it streamed as written, not whole at the end.
    assert len(parts) > 3 and parts[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert [(e["name"], json.loads(e["arguments"])) for e in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole]
    check_weather_arguments(calls[0]["arguments"])


def test_auto_without_a_call_is_content(tool_server, demo_llm):
    c = client(tool_server)
    messages = [{"role": "user", "content": "Say hello in one sentence."}]
    r = c.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER], max_tokens=20, temperature=0)
    ref = demo_llm.generate(demo_llm.encode(messages, tools=[WEATHER]), max_new_tokens=20)
    assert "<tool_call>" not in ref.text  # the premise: this reply holds no call
    assert r.choices[0].message.content == ref.text and r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == ref.finish_reason
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="smollm2", messages=messages, tools=[WEATHER], max_tokens=20, temperature=0, stream=True) if ch.choices)
    assert streamed == ref.text


def test_conversation_with_calls_and_results(tool_server, demo_llm):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    r = client(tool_server).chat.completions.create(model="smollm2", messages=history, tools=[WEATHER],
                                                    tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.content  # tool_choice none: text, and the tools are not rendered
    rendered = demo_llm.tokenizer.decode(demo_llm.encode([
        ASK[0], {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temperature": 21}'}]),
        skip_special_tokens=False)
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in rendered
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in rendered
    assert r.usage.prompt_tokens == len(demo_llm.tokenizer.encode(rendered, add_special_tokens=False))


@pytest.mark.parametrize("body, param, match", [
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools",
     "not among the tools"),
    ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto', 'required'"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "1-64 letters"),
    ({"functions": [WEATHER["function"]]}, "functions", "send 'tools'"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
    ({"messages": [{"role": "tool", "content": "21"}]}, "messages.0.tool_call_id", "required in a tool message"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
        "name": "get_weather", "arguments": "{oops"}}]}]}, "messages.0.tool_calls.0.function.arguments",
     "not JSON text"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}], "tools": [WEATHER]}, None, None),
])
def test_bad_tool_requests(tool_server, body, param, match):
    payload = {"model": "smollm2", "messages": ASK, "max_tokens": 4, **body}
    resp = httpx.post(f"{tool_server}/v1/chat/completions", json=payload, timeout=60)
    if match is None:  # an empty tool_calls list is no call: accepted
        assert resp.status_code == 200, resp.text
        return
    err = assert_openai_error(resp, 400)
    assert err["param"] == param and match in err["message"], err


def test_tools_need_a_template_that_renders_them(demo_llm):
    # A template that ignores `tools` (as the demo model's own does): refuse rather than drop them.
    plain = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    with chat_template(demo_llm, plain), running_server(demo_llm, model_name="smollm2") as base:
        resp = httpx.post(f"{base}/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER]}, timeout=60)
    err = assert_openai_error(resp, 400)
    assert err["code"] == "tools_not_rendered" and "--chat-template" in err["message"]


def test_unknown_format_needs_the_option(demo_llm):
    body: dict[str, Any] = {"messages": ASK, "tools": [WEATHER], "max_tokens": 2}
    counts_tools = "{% for m in messages %}{{ m.content }}{% endfor %}{% if tools %}{{ tools | length }}{% endif %}"
    with chat_template(demo_llm, counts_tools):
        with running_server(demo_llm, model_name="smollm2") as base:
            err = assert_openai_error(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60), 400)
            assert err["code"] == "tool_format_unknown" and "--tool-call-format" in err["message"]
        with running_server(demo_llm, model_name="smollm2", tool_call_format="hermes") as base:
            assert httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).status_code == 200


def test_set_chat_template_refuses_a_broken_one(demo_llm):
    tok = demo_llm.tokenizer
    original = tok.hf.chat_template
    with pytest.raises(ValueError, match="cannot render a user message"):
        tok.set_chat_template("{% for m in messages %}")
    assert tok.hf.chat_template == original


@pytest.mark.parametrize("choice", ["required", "auto"])
def test_tool_grammars_under_speculation(demo_llm, choice):
    """A call forced by its grammar, and strict auto's text-or-call grammar, give the same greedy
    reply with the demo's draft head as without it."""
    from edgespec.spec import DEMO_HEAD, enable_speculation

    strict = [{"type": "function", "function": {**t["function"], "strict": True}} for t in (WEATHER, TIME)]
    use = ToolUse(tools(*strict), choice, parallel=False)
    with chat_template(demo_llm, HERMES_TEMPLATE):
        ids = demo_llm.encode(ASK, tools=strict)
    grammar = use.grammar(FORMATS["hermes"])
    plain = demo_llm.generate(ids, max_new_tokens=60, grammar=grammar)
    enable_speculation(demo_llm, draft=str(DEMO_HEAD))
    try:
        spec = demo_llm.generate(ids, max_new_tokens=60, grammar=grammar)
    finally:
        enable_speculation(demo_llm, None)  # the fixture is shared: leave it as plain decoding
    assert spec.token_ids == plain.token_ids
    content, calls = use.parse(FORMATS["hermes"], spec.text)
    if choice == "required":
        assert content is None and len(calls) == 1 and spec.finish_reason == "stop"
