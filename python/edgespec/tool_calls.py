"""Tool (function) calling: the functions an OpenAI chat request offers, rendered into the prompt by
the model's own chat template, and the calls the model writes parsed back out of its text.

Models write calls in the format they were trained on, which their chat template describes. Two
formats cover the families edgespec serves:
* "hermes" (Qwen2.5, Qwen3, Hermes and other ChatML models): each call is a JSON object
  {"name": ..., "arguments": {...}} between <tool_call> and </tool_call> lines, after optional text;
* "llama3_json" (Llama 3.1 / 3.2 templates): the whole reply is {"name": ..., "parameters": {...}},
  several calls separated by ";".
`detect_format` picks one from the template's text; servers may name one instead.

How a request's `tool_choice` is honoured:
* "auto": the model writes text or calls freely; calls are parsed from its text. A text that is
  not a well-formed sequence of calls to offered tools (bad JSON, an unknown name, arguments that
  are not an object) comes back unchanged as content: nothing is lost. When a tool is marked
  `strict`, a grammar (edgespec.structured) lets the text open a call only in the format and with
  arguments valid under that tool's schema.
* "required" or one named function: a grammar makes the reply exactly one call (or, with parallel
  calls allowed and "required", one or more) in the model's format, arguments valid under the
  schema; the model chooses the function (required) and every argument.
* "none": the tools are not rendered and nothing is parsed.
How calls are streamed: edgespec.tool_call_stream.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Sequence

from .structured import Grammar
from .text_stream import partial_suffix

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    """One function the model may call. parameters: the JSON schema of its arguments object."""

    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool = False

    @classmethod
    def from_openai(cls, raw: Any, where: str = "tool") -> "Tool":
        """A tool from OpenAI's {"type": "function", "function": {"name", "description",
        "parameters", "strict"}} (ValueError naming `where` and the problem)."""
        if not isinstance(raw, dict) or raw.get("type") != "function" or not isinstance(raw.get("function"), dict):
            raise ValueError(f"{where} must be {{'type': 'function', 'function': {{...}}}}")
        fn = raw["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ValueError(f"{where}.function.description must be a string")
        # OpenAI: a function without parameters takes an empty argument list.
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValueError(f"{where}.function.parameters must be a JSON schema object")
        strict = fn.get("strict") or False
        if not isinstance(strict, bool):
            raise ValueError(f"{where}.function.strict must be a boolean")
        return cls(name, parameters, description, strict)

    def openai(self) -> dict[str, Any]:
        """The tool as chat templates read it (OpenAI's format)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """A call the model wrote: the function's name and its arguments object."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=new_call_id)

    def openai(self) -> dict[str, Any]:
        """OpenAI's form: arguments as JSON text."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass(frozen=True)
class ToolUse:
    """What one request allows: its tools, and `choice`: "auto", "required", or the name of the one
    function the reply must call. parallel: whether a reply may hold several calls."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    parallel: bool = True

    def __post_init__(self) -> None:
        names = [t.name for t in self.tools]
        if not names:
            raise ValueError("tool calling needs at least one tool")
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        if self.choice not in ("auto", "required") and self.choice not in names:
            raise ValueError(f"tool_choice names function {self.choice!r}, which is not among the tools "
                             f"({', '.join(names)})")

    def constrained(self) -> bool:
        return self.choice != "auto" or any(t.strict for t in self.tools)

    def grammar(self, fmt: "ToolCallFormat") -> Grammar | None:
        """The grammar that enforces this choice in `fmt` (validated), or None when the text is free."""
        if not self.constrained():
            return None
        if self.choice == "auto":  # some tool is strict: every call is held to its tool's schema
            return Grammar.lark(fmt.lark(self.tools, calls_only=False, parallel=self.parallel)).validate()
        tools = self.tools if self.choice == "required" else tuple(t for t in self.tools if t.name == self.choice)
        parallel = self.parallel and self.choice == "required"
        return Grammar.lark(fmt.lark(tools, calls_only=True, parallel=parallel)).validate()

    def parse(self, fmt: "ToolCallFormat", text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a reply; ([text], []) when it holds no well-formed calls."""
        return fmt.parse(text, {t.name for t in self.tools})


class ToolCallFormat:
    """How one model family writes calls: parse them, hold back streamed text that may start one,
    and the Lark grammar (llguidance's dialect) of a reply."""

    name = ""
    arguments_key = "arguments"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        raise NotImplementedError

    def hold_from(self, text: str) -> int:
        """The offset in a partial reply from which text may belong to a call and must not be
        streamed as content yet (len(text): all of it is content)."""
        raise NotImplementedError

    def calls_start(self, text: str) -> int | None:
        """Where the calls of a partial reply begin (their first object is at or after it), or None
        while it holds none; for replies whose grammar guarantees well-formed calls."""
        raise NotImplementedError

    def lark(self, tools: Sequence[Tool], calls_only: bool, parallel: bool) -> str:
        raise NotImplementedError

    def _call(self, obj: Any, names: set[str]) -> ToolCall | None:
        """A call from a parsed JSON object, or None when it is not a call to an offered tool."""
        if not isinstance(obj, dict) or set(obj) - {"name", self.arguments_key}:
            return None
        name, args = obj.get("name"), obj.get(self.arguments_key, {})
        if isinstance(args, str):  # some models write the arguments as JSON text
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if name not in names or not isinstance(args, dict):
            return None
        return ToolCall(name, args)

    def _call_schema(self, tools: Sequence[Tool]) -> str:
        """The JSON schema of one call object: {"name": one tool's name, <arguments key>: its arguments}."""
        options = [{"type": "object",
                    "properties": {"name": {"const": t.name}, self.arguments_key: t.parameters},
                    "required": ["name", self.arguments_key], "additionalProperties": False} for t in tools]
        return json.dumps(options[0] if len(options) == 1 else {"anyOf": options})


class HermesFormat(ToolCallFormat):
    """<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>, one block per call, after
    optional text."""

    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.OPEN)
        if start < 0:
            return text, []
        calls, end = [], start
        for block in self._BLOCK.finditer(text, start):
            if text[end:block.start()].strip():  # text between calls: not a call sequence
                return text, []
            try:
                call = self._call(json.loads(block.group(1)), names)
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
            end = block.end()
        if text[end:].strip():
            return text, []
        content = text[:start].strip()
        return content or None, calls

    def hold_from(self, text: str) -> int:
        start = text.find(self.OPEN)
        if start >= 0:
            return start
        return len(text) - partial_suffix(text, self.OPEN)  # a suffix may still grow into the opening tag

    def calls_start(self, text: str) -> int | None:
        start = text.find(self.OPEN)
        return None if start < 0 else start + len(self.OPEN)

    def lark(self, tools: Sequence[Tool], calls_only: bool, parallel: bool) -> str:
        more = ' ("\\n<tool_call>\\n" call "\\n</tool_call>")*' if parallel else ""
        calls = f'call "\\n</tool_call>"{more}'
        rules = [f"call: %json {self._call_schema(tools)}"]
        if calls_only:
            rules.insert(0, f'start: "<tool_call>\\n" {calls}')
        else:
            # Free text that never contains the opening tag, optionally followed by the tag and calls.
            # The text and the tag are one lexeme so the lexer never has to guess where text ends.
            rules[:0] = [f"start: TEXT | OPENING {calls}",
                         r"TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/",
                         r'OPENING: (/(?s:.*)/ & ~/(?s:.*<tool_call>.*)/) "<tool_call>\n"']
        return "\n".join(rules)


class Llama3JsonFormat(ToolCallFormat):
    """The whole reply is {"name": ..., "parameters": {...}}, several calls joined by ";" (Llama 3.1
    and 3.2's JSON tool calling; <|python_tag|> is a special token and never reaches the text)."""

    name = "llama3_json"
    arguments_key = "parameters"

    def parse(self, text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, i = json.JSONDecoder(), [], 0
        while i < len(body):
            try:
                obj, i = decoder.raw_decode(body, i)
            except json.JSONDecodeError:
                return text, []
            call = self._call(obj, names)
            if call is None:
                return text, []
            calls.append(call)
            rest = body[i:].lstrip()
            if rest.startswith(";"):
                rest = rest[1:].lstrip()
            elif rest:
                return text, []
            i = len(body) - len(rest)
        return None, calls

    def hold_from(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{"):  # undecided, or a call: hold everything
            return 0
        return len(text)

    def calls_start(self, text: str) -> int | None:
        body = text.lstrip()
        return len(text) - len(body) if body.startswith("{") else None

    def lark(self, tools: Sequence[Tool], calls_only: bool, parallel: bool) -> str:
        calls = 'call ("; " call)*' if parallel else "call"
        rules = [f"call: %json {self._call_schema(tools)}"]
        if calls_only:
            rules.insert(0, f"start: {calls}")
        else:  # a reply that does not start with "{" is text
            rules[:0] = [f"start: TEXT | {calls}", r"TEXT: /(?s:\s*[^\s{].*)?/"]
        return "\n".join(rules)


FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (HermesFormat(), Llama3JsonFormat())}


def detect_format(chat_template: str | None) -> ToolCallFormat | None:
    """The call format a chat template teaches its model, or None when it shows none edgespec knows."""
    if not chat_template:
        return None
    if HermesFormat.OPEN in chat_template:
        return FORMATS["hermes"]
    if "<|start_header_id|>" in chat_template and '"parameters"' in chat_template:
        return FORMATS["llama3_json"]
    return None


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether a chat template reads the `tools` variable at all (if not, offered tools would be
    silently dropped from the prompt)."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template) is not None
