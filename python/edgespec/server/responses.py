"""OpenAI's Responses API (POST /v1/responses) on top of the chat machinery.

A request is translated into a chat completion request (ResponsesRequest.to_chat) and generated as
one; its reply is returned as a Response object: output items in the order the model wrote them (a
"reasoning" item for a thinking model's <think> section, a "message" with one output_text part, a
"function_call" per tool call), or streamed as Responses events (ResponseEvents).

Field policy (besides schemas.py's, which the translated request then follows):
* input: a string, or a list of items: messages (roles system, developer, user, assistant; content
  a string or input_text / output_text parts), function_call and function_call_output items (an
  earlier turn's calls and their results) and reasoning items (their text reaches the next
  assistant message as reasoning_content). instructions become the first system message.
* tools: function tools ({"type": "function", "name", "description", "parameters", "strict"});
  tool_choice "auto", "none", "required" or {"type": "function", "name": ...}.
* text.format: text, json_object or json_schema ({"name", "schema", "strict"}).
* max_output_tokens, temperature, top_p; and, as extensions, the chat endpoint's top_k, min_p,
  seed, stop, repetition_penalty, presence_penalty, frequency_penalty, logit_bias,
  chat_template_kwargs.
* Nothing is stored: store is accepted and reported false; previous_response_id and background
  (which need stored responses) are a 400, as are truncation "auto", non-text input parts, tools
  other than functions and a reasoning effort (the chat template decides how a model thinks: send
  chat_template_kwargs). include is accepted and adds nothing.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Union

from pydantic import Field, ValidationError

from ..engine import GenerationResult
from .errors import bad_request, from_validation_error, unsupported
from .schemas import ChatCompletionRequest, _Strict

# Fields the chat endpoint takes that a Responses request may send as extensions, under the same name.
CHAT_EXTENSIONS = ("top_k", "min_p", "seed", "stop", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "logit_bias", "chat_template_kwargs", "stop_token_ids", "ignore_eos")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class ResponsesRequest(_Strict):
    model: str | None = None
    input: Union[str, list[dict[str, Any]]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None
    truncation: str | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.previous_response_id is not None:
            raise unsupported("previous_response_id", "responses are not stored: send the whole conversation as "
                                                      "'input'")
        if self.background:
            raise unsupported("background", "responses are not stored, so they cannot run in the background")
        if self.truncation not in (None, "disabled"):
            raise unsupported("truncation", f"only 'disabled' is implemented, got {self.truncation!r}")
        if self.reasoning and self.reasoning.get("effort") is not None:
            raise unsupported("reasoning.effort", "the model's chat template decides how it reasons; send "
                                                  "chat_template_kwargs (e.g. {\"enable_thinking\": false})")
        if isinstance(self.input, list) and not self.input:
            raise bad_request("'input' is empty: send a string or at least one item", param="input")

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion request that generates this response (validated like one)."""
        body: dict[str, Any] = {"messages": self._messages(), "stream": False}
        if self.model is not None:
            body["model"] = self.model
        for ours, theirs in (("max_output_tokens", "max_completion_tokens"), ("temperature", "temperature"),
                             ("top_p", "top_p"), ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user")):
            if getattr(self, ours) is not None:
                body[theirs] = getattr(self, ours)
        if self.tools is not None:
            body["tools"] = [self._chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            body["tool_choice"] = self._chat_tool_choice()
        fmt = self.response_format()
        if fmt is not None:
            body["response_format"] = fmt
        extra = self.model_extra or {}
        body.update((k, extra[k]) for k in CHAT_EXTENSIONS if k in extra)
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        req.check_supported()
        return req

    def response_format(self) -> dict[str, Any] | None:
        """text.format as a chat response_format (None: plain text)."""
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return {"type": "json_object"}
        if kind == "json_schema":
            if not isinstance(fmt.get("schema"), dict):
                raise bad_request("'text.format' of type json_schema needs a 'schema' object", param="text.format")
            return {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}}
        raise unsupported("text.format", f"types are text, json_object and json_schema, got {kind!r}")

    def _messages(self) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.instructions:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        reasoning: str | None = None  # a reasoning item's text, for the assistant message after it
        for i, item in enumerate(self.input):
            param = f"input.{i}"
            kind = item.get("type", "message")
            if kind == "message":
                role = item.get("role")
                if role not in ("system", "developer", "user", "assistant"):
                    raise unsupported(f"{param}.role", f"roles are system, developer, user and assistant, got {role!r}")
                message: dict[str, Any] = {"role": role, "content": self._text(item.get("content"), param)}
                if role == "assistant" and reasoning is not None:
                    message["reasoning_content"], reasoning = reasoning, None
                messages.append(message)
            elif kind == "function_call":
                call = {"id": self._field(item, "call_id", param), "type": "function",
                        "function": {"name": self._field(item, "name", param),
                                     "arguments": self._field(item, "arguments", param)}}
                last = messages[-1] if messages else None
                if last is None or last["role"] != "assistant" or last.get("_calls_closed"):
                    last = {"role": "assistant", "content": None}
                    if reasoning is not None:
                        last["reasoning_content"], reasoning = reasoning, None
                    messages.append(last)
                last.setdefault("tool_calls", []).append(call)
            elif kind == "function_call_output":
                output = item.get("output")
                if not isinstance(output, str):
                    output = self._text(output, param) if isinstance(output, list) else None
                if output is None:
                    raise bad_request(f"'{param}.output' must be a string", param=f"{param}.output")
                messages.append({"role": "tool", "tool_call_id": self._field(item, "call_id", param), "content": output})
                for m in reversed(messages):  # calls after a result start a new assistant message
                    if m["role"] == "assistant":
                        m["_calls_closed"] = True
                        break
            elif kind == "reasoning":
                parts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
                reasoning = "".join(parts) or None
            else:
                raise unsupported(f"{param}.type", "input items are message, function_call, function_call_output "
                                                   f"and reasoning, got {kind!r}")
        for m in messages:
            m.pop("_calls_closed", None)
        return messages

    @staticmethod
    def _field(item: dict[str, Any], name: str, param: str) -> str:
        value = item.get(name)
        if not isinstance(value, str):
            raise bad_request(f"'{param}.{name}' must be a string", param=f"{param}.{name}")
        return value

    @staticmethod
    def _text(content: Any, param: str) -> str:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise bad_request(f"'{param}.content' must be a string or a list of text parts", param=f"{param}.content")
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
                raise unsupported(f"{param}.content.{j}", f"only text parts are implemented, got type {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    @staticmethod
    def _chat_tool(tool: dict[str, Any], i: int) -> dict[str, Any]:
        if tool.get("type") != "function":
            raise unsupported(f"tools.{i}.type", f"only function tools are implemented, got {tool.get('type')!r}")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        return {"type": "function", "function": fn}

    def _chat_tool_choice(self) -> Any:
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
                raise bad_request("'tool_choice' names a function as {'type': 'function', 'name': ...}",
                                  param="tool_choice")
            return {"type": "function", "function": {"name": choice["name"]}}
        return choice

    def echo_fields(self) -> dict[str, Any]:
        """What a Response object repeats of its request."""
        chat_tools = [self._chat_tool(t, i)["function"] for i, t in enumerate(self.tools or [])]
        return {"instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
                "temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": 1.0 if self.top_p is None else self.top_p,
                "tools": [{"type": "function", **t} for t in chat_tools],
                "tool_choice": self.tool_choice or "auto", "parallel_tool_calls": self.parallel_tool_calls is not False,
                "text": {"format": (self.text or {}).get("format") or {"type": "text"}},
                "metadata": self.metadata or {}, "store": False, "truncation": "disabled",
                "reasoning": {"effort": None, "summary": None}, "previous_response_id": None, "user": self.user}


# The chat request's field names an error may carry, as a Responses client knows them (a message's
# index is not an input item's: instructions and function calls shift them).
CHAT_PARAMS = {"max_tokens": "max_output_tokens", "max_completion_tokens": "max_output_tokens",
               "response_format": "text.format", "messages": "input"}


def responses_param(param: str | None) -> str | None:
    """A chat request's error param as the Responses request's field."""
    if param is not None and param.startswith("messages."):
        return "input"
    return CHAT_PARAMS.get(param, param) if param is not None else None


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    try:
        return ResponsesRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


# ---- output items ------------------------------------------------------------------------------

def reasoning_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {"type": "reasoning", "id": item_id or _new_id("rs"), "summary": [], "status": status,
            "content": [{"type": "reasoning_text", "text": text}]}


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict[str, Any]:
    return {"type": "message", "id": item_id or _new_id("msg"), "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def function_call_item(call_id: str, name: str, arguments: str, item_id: str | None = None,
                       status: str = "completed") -> dict[str, Any]:
    return {"type": "function_call", "id": item_id or _new_id("fc"), "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def usage(prompt_tokens: int, result: GenerationResult, reasoning_tokens: int) -> dict[str, Any]:
    n = len(result.token_ids)
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": result.stats.cached_tokens},
            "output_tokens": n, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + n}


def status_of(finish_reason: str) -> tuple[str, dict[str, str] | None]:
    """(status, incomplete_details) of a reply that ended for finish_reason."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


class ResponseObject:
    """The Response object of one request, in its states (in progress, then done)."""

    def __init__(self, req: ResponsesRequest, model: str) -> None:
        self.base = {"id": _new_id("resp"), "object": "response", "created_at": int(time.time()), "model": model,
                     **req.echo_fields()}

    def build(self, status: str, output: list[dict[str, Any]], incomplete: dict[str, str] | None = None,
              usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {**self.base, "status": status, "output": output, "incomplete_details": incomplete,
                "usage": usage, "error": error}


class ResponseEvents:
    """The Responses stream events of one reply, fed what the chat machinery streams: reasoning text,
    content text and chat tool-call deltas (edgespec.tool_call_stream). Output items open as their
    first piece arrives and close when another kind begins or the reply ends."""

    def __init__(self, response: ResponseObject) -> None:
        self.response = response
        self.sequence = 0
        self.output: list[dict[str, Any]] = []   # items done, in order
        self.open: dict[str, Any] | None = None  # the item being written
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> its function_call item

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response.build("in_progress", [])
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def _index(self) -> int:
        return len(self.output)

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self.open = item
        shown = {**item, "status": "in_progress"}
        if item["type"] in ("message", "reasoning"):  # their text arrives as deltas
            shown["content"] = []
        events.append(self._event("response.output_item.added", output_index=self._index(), item=shown))
        if item["type"] == "message":
            events.append(self._event("response.content_part.added", item_id=item["id"], output_index=self._index(),
                                      content_index=0, part={"type": "output_text", "text": "", "annotations": []}))
        return events

    def _close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        index, events = self._index(), []
        if item["type"] == "message":
            part = item["content"][0]
            events += [self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[]),
                       self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part)]
        elif item["type"] == "reasoning":
            events.append(self._event("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                      content_index=0, text=item["content"][0]["text"]))
        else:
            events.append(self._event("response.function_call_arguments.done", item_id=item["id"],
                                      output_index=index, name=item["name"], arguments=item["arguments"]))
        events.append(self._event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events

    def feed(self, reasoning: str, text: str, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if reasoning:
            if self.open is None or self.open["type"] != "reasoning":
                events += self._open(reasoning_item(""))
            self.open["content"][0]["text"] += reasoning
            events.append(self._event("response.reasoning_text.delta", item_id=self.open["id"],
                                      output_index=self._index(), content_index=0, delta=reasoning))
        if text:
            if self.open is None or self.open["type"] != "message":
                events += self._open(message_item(""))
            self.open["content"][0]["text"] += text
            events.append(self._event("response.output_text.delta", item_id=self.open["id"],
                                      output_index=self._index(), content_index=0, delta=text, logprobs=[]))
        for delta in calls:
            fn = delta.get("function", {})
            if "id" in delta:  # a new call: its name is complete
                item = function_call_item(delta["id"], fn["name"], "")
                events += self._open(item)
                self.calls[delta["index"]] = item
            item = self.calls[delta["index"]]
            piece = fn.get("arguments") or ""
            if piece:
                item["arguments"] += piece
                events.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                          output_index=self._index(), delta=piece))
        return events

    def finish(self, finish_reason: str, usage: dict[str, Any]) -> list[dict[str, Any]]:
        status, incomplete = status_of(finish_reason)
        if self.open is not None and status == "incomplete":  # the item being written was cut short
            self.open["status"] = "incomplete"
        events = self._close()
        if not self.output:  # an empty reply still has its message
            events += self._open(message_item(""))
            events += self._close()
        done = self.response.build(status, self.output, incomplete, usage)
        return events + [self._event(f"response.{status}", response=done)]

    def error(self, message: str, code: str | None) -> list[dict[str, Any]]:
        return [self._event("error", code=code, message=message, param=None)]
