"""OpenAI's Responses API (POST /v1/responses) with the `openai` client's `responses.create`: text
equal to the library's generation of the same conversation, whole and streamed (the events in
order, their deltas joining to the text); input items (messages with text parts, function calls
and their outputs, reasoning); instructions; json_schema output; function tools; reasoning items of
a thinking template; and the fields it refuses, with a 400 naming them.
"""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import httpx
import pytest
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from test_reasoning import QWEN3_LIKE, scripted  # noqa: E402
from test_server import (MESSAGES, TINY_CONTEXT, WAIT_S, assert_openai_error, client, health,  # noqa: E402,F401
                         one_torch_thread, running_server, tiny_llm, tiny_server, wait_until)
from test_tool_calls import HERMES_TEMPLATE, WEATHER, chat_template, check_weather_arguments  # noqa: E402

from edgespec.structured import Grammar  # noqa: E402

RESP = "/v1/responses"
# The Responses API's flat form of a function tool.
WEATHER_TOOL = {"type": "function", **WEATHER["function"]}


def events_of(c: "openai.OpenAI", **kwargs: Any) -> list[Any]:
    return list(c.responses.create(stream=True, **kwargs))


def check_event_order(events: list[Any]) -> None:
    """Sequence numbers count up from 0; created and in_progress open the stream, a terminal event
    ends it; every output item is added before its deltas and done after them."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type in ("response.completed", "response.incomplete")
    open_items: set[int] = set()
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index not in open_items and not open_items  # one item at a time
            open_items.add(e.output_index)
        elif e.type == "response.output_item.done":
            open_items.remove(e.output_index)
        else:
            assert e.output_index in open_items, e.type


@pytest.mark.parametrize("conversation", [0, 1])
def test_text_equals_the_library_s_whole_and_streamed(tiny_server, tiny_llm, conversation):
    messages = MESSAGES[conversation]
    ref = tiny_llm.generate(messages, max_new_tokens=30, temperature=0.0)
    c = client(tiny_server)
    r = c.responses.create(model="tiny", input=messages, max_output_tokens=30, temperature=0)
    assert r.object == "response" and r.model == "tiny" and r.id.startswith("resp_")
    assert r.output_text == ref.text and [o.type for o in r.output] == ["message"]
    assert r.status == ("incomplete" if ref.finish_reason == "length" else "completed")
    if ref.finish_reason == "length":
        assert r.incomplete_details.reason == "max_output_tokens" and r.output[0].status == "incomplete"
    assert r.usage.input_tokens == len(tiny_llm.encode(messages))
    assert r.usage.output_tokens == len(ref.token_ids) and r.usage.output_tokens_details.reasoning_tokens == 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens

    events = events_of(c, model="tiny", input=messages, max_output_tokens=30, temperature=0)
    check_event_order(events)
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response
    assert deltas == done.text == final.output_text == ref.text and final.status == r.status
    assert final.usage.output_tokens == r.usage.output_tokens and final.id == events[0].response.id
    assert final.output[0].status == r.output[0].status


def test_string_input_instructions_and_items(tiny_server, tiny_llm):
    """A string is one user message, instructions the first system message, and message items with
    text parts the conversation they spell."""
    c = client(tiny_server)
    r = c.responses.create(model="tiny", input="what did the fox do?", instructions="you are a lazy dog.",
                           max_output_tokens=12, temperature=0)
    ref = tiny_llm.generate([{"role": "system", "content": "you are a lazy dog."},
                             {"role": "user", "content": "what did the fox do?"}], max_new_tokens=12)
    assert r.output_text == ref.text and r.instructions == "you are a lazy dog."
    items = [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "you are a lazy dog."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "what did the fox do?"}]},
             {"type": "message", "role": "assistant",
              "content": [{"type": "output_text", "text": "the fox jumps over the lazy dog."}]},
             {"role": "user", "content": "and then?"}]
    r = c.responses.create(model="tiny", input=items, max_output_tokens=12, temperature=0)
    assert r.output_text == tiny_llm.generate(MESSAGES[1], max_new_tokens=12).text
    assert r.usage.input_tokens == len(tiny_llm.encode(MESSAGES[1]))


def test_sampling_settings_and_extensions_reach_the_generation(tiny_server, tiny_llm):
    settings = dict(temperature=0.9, top_p=0.9, top_k=40, seed=1234)
    ref = tiny_llm.generate(MESSAGES[0], max_new_tokens=20, **settings)
    r = client(tiny_server).responses.create(model="tiny", input=MESSAGES[0], max_output_tokens=20, temperature=0.9,
                                             top_p=0.9, extra_body={"top_k": 40, "seed": 1234})
    assert r.output_text == ref.text and (r.temperature, r.top_p) == (0.9, 0.9)


@pytest.mark.parametrize("body, param, match", [
    ({"previous_response_id": "resp_1"}, "previous_response_id", "not stored"),
    ({"background": True}, "background", "not stored"),
    ({"input": []}, "input", "empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0",
     "only text parts"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type", "input items are"),
    ({"input": [{"type": "function_call_output", "call_id": "c1"}]}, "input.0.output", "must be a string"),
    ({"tools": [{"type": "web_search"}]}, "tools.0.type", "only function tools"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort", "chat template decides"),
    ({"text": {"format": {"type": "xml"}}}, "text.format", "json_schema"),
    ({"truncation": "auto"}, "truncation", "disabled"),
    ({"max_output_tokens": 0}, "max_output_tokens", None),
    ({"temperature": 3.0}, "temperature", None),
    ({"max_output_tokens": TINY_CONTEXT}, "max_output_tokens", "context holds"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role", "roles are"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{oops"}]}, "input",
     "not JSON"),
    ({"text": {"format": {"type": "json_schema", "schema": {"type": "nonsense"}}}}, "text.format", None),
])
def test_refused_fields(tiny_server, body, param, match):
    payload = {"model": "tiny", "input": "hello", **body}
    err = assert_openai_error(httpx.post(f"{tiny_server}{RESP}", json=payload, timeout=60), 400)
    assert err["param"] == param and (match is None or match in err["message"]), err


def test_store_and_include_are_accepted_and_nothing_is_stored(tiny_server):
    c = client(tiny_server)
    r = c.responses.create(model="tiny", input="hello", max_output_tokens=3, store=True,
                           include=["reasoning.encrypted_content"], metadata={"k": "v"})
    assert r.store is False and r.metadata == {"k": "v"} and r.output_text is not None
    for call in (c.responses.retrieve, c.responses.delete, c.responses.cancel):
        with pytest.raises(openai.NotFoundError) as exc:
            call(r.id)
        assert exc.value.code == "response_not_found" and "stores no responses" in exc.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_client_that_hangs_up_cancels_the_generation(tiny_server, stream):
    before = health(tiny_server)["queue"]
    body = {"input": "hello", "max_output_tokens": 3000, "temperature": 0, "ignore_eos": True}
    if stream:
        events = client(tiny_server).responses.create(model="tiny", stream=True, **{
            k: v for k, v in body.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True})
        it = iter(events)
        assert [next(it).type for _ in range(4)][:2] == ["response.created", "response.in_progress"]
        events.close()
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{tiny_server}{RESP}", json=body, timeout=httpx.Timeout(WAIT_S, read=0.3))
    wait_until(lambda: health(tiny_server)["queue"]["cancelled"] == before["cancelled"] + 1, "the cancellation")
    wait_until(lambda: not health(tiny_server)["queue"]["running"], "the worker to go idle")
    assert health(tiny_server)["queue"]["admitted"] == 0


# ---- the demo model: structured output, tools, reasoning ----------------------------------------------

@pytest.fixture(scope="module")
def demo_server(demo_llm) -> Iterator[str]:
    with chat_template(demo_llm, HERMES_TEMPLATE), running_server(demo_llm, model_name="smollm2") as base:
        yield base


ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
          "required": ["city"], "additionalProperties": False}


def test_json_schema_output(demo_server, demo_llm):
    fmt = {"type": "json_schema", "name": "place", "schema": SCHEMA, "strict": True}
    r = client(demo_server).responses.create(model="smollm2", input=ASK, text={"format": fmt}, max_output_tokens=40,
                                             temperature=0)
    with chat_template(demo_llm, HERMES_TEMPLATE):
        ref = demo_llm.generate(demo_llm.encode(ASK), max_new_tokens=40, grammar=Grammar.json(SCHEMA))
    assert r.output_text == ref.text and set(json.loads(r.output_text)) == {"city"}
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"}],
                         ids=["required", "named"])
def test_function_calls_whole_and_streamed(demo_server, demo_llm, tool_choice):
    c = client(demo_server)
    kwargs = dict(model="smollm2", input=ASK, tools=[WEATHER_TOOL], tool_choice=tool_choice, max_output_tokens=80,
                  temperature=0, parallel_tool_calls=False)
    r = c.responses.create(**kwargs)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    assert call.id.startswith("fc_") and r.status == "completed"
    check_weather_arguments(call.arguments)
    assert r.usage.input_tokens == len(demo_llm.encode(ASK, tools=[WEATHER]))  # the tools reached the prompt

    events = events_of(c, **kwargs)
    check_event_order(events)
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.name, i.arguments) for i in added] == [("function_call", "get_weather", "")]
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    # The grammar guarantees the call: its arguments stream as written, and join to the whole reply's.
    assert len(pieces) > 1 and "".join(pieces) == done.arguments
    assert json.loads(done.arguments) == json.loads(call.arguments)
    assert [o.type for o in events[-1].response.output] == ["function_call"]


def test_free_auto_calls_follow_the_text_before_them(demo_server, demo_llm):
    """In plain auto the reply's text goes out as it comes and its well-formed calls whole at the end:
    a message item, closed, then a function_call item per call (a scripted reply, parsed as the
    chat endpoint parses it)."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    kwargs = dict(model="smollm2", input=ASK, tools=[WEATHER_TOOL], max_output_tokens=60)
    with scripted(demo_llm, "Let me check.\n" + call):
        c = client(demo_server)
        r = c.responses.create(**kwargs)
        events = events_of(c, **kwargs)
    assert [o.type for o in r.output] == ["message", "function_call"] and r.output_text == "Let me check."
    assert (r.output[1].name, json.loads(r.output[1].arguments)) == ("get_weather", {"city": "Paris", "unit": "celsius"})
    check_event_order(events)
    added = [e.item.type for e in events if e.type == "response.output_item.added"]
    assert added == ["message", "function_call"]
    final = events[-1].response
    assert final.output_text.strip() == "Let me check." and final.output[1].arguments == r.output[1].arguments


def test_a_conversation_with_calls_and_their_outputs(demo_server, demo_llm):
    """function_call and function_call_output items render as an assistant's tool_calls and a tool
    message: the prompt is the chat endpoint's for the same conversation."""
    items = ASK + [{"type": "function_call", "call_id": "call_1", "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "celsius"}'},
                   {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": 21}'}]
    chat = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    c = client(demo_server)
    r = c.responses.create(model="smollm2", input=items, tools=[WEATHER_TOOL], max_output_tokens=12, temperature=0)
    ref = c.chat.completions.create(model="smollm2", messages=chat, tools=[WEATHER], max_tokens=12, temperature=0)
    assert r.usage.input_tokens == ref.usage.prompt_tokens
    assert r.output_text == (ref.choices[0].message.content or "")


@contextlib.contextmanager
def thinking_server(llm) -> Iterator[str]:
    with chat_template(llm, QWEN3_LIKE), running_server(llm, model_name="smollm2") as base:
        yield base


def test_reasoning_is_an_item_of_its_own(demo_llm):
    text = "<think>\nThe sky scatters blue light.\n</think>\n\nYes, it is."
    with thinking_server(demo_llm) as base, scripted(demo_llm, text):
        c = client(base)
        r = c.responses.create(model="smollm2", input="Is the sky blue?", max_output_tokens=60)
        assert [o.type for o in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == "\nThe sky scatters blue light.\n" and r.output_text == "Yes, it is."
        assert r.usage.output_tokens_details.reasoning_tokens > 3
        events = events_of(c, model="smollm2", input="Is the sky blue?", max_output_tokens=60)
        check_event_order(events)
        thought = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        answer = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert (thought, answer) == ("\nThe sky scatters blue light.\n", "Yes, it is.")
        assert [o.type for o in events[-1].response.output] == ["reasoning", "message"]
        # A reasoning item in the input reaches the template as the assistant's reasoning_content.
        history = [{"role": "user", "content": "Is the sky blue?"},
                   {"type": "reasoning", "id": "rs_1", "summary": [],
                    "content": [{"type": "reasoning_text", "text": "It scatters blue light."}]},
                   {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "Why?"}]
        r = c.responses.create(model="smollm2", input=history, max_output_tokens=4)
        ids = demo_llm.encode([history[0], {"role": "assistant", "content": "Yes.",
                                            "reasoning_content": "It scatters blue light."}, history[3]])
        assert "<think>\nIt scatters blue light.\n</think>" in demo_llm.tokenizer.decode(ids, skip_special_tokens=False)
        assert r.usage.input_tokens == len(ids)
