"""Tool calls in a streamed chat reply: the text that is certainly content, and the calls as
OpenAI's `tool_calls` deltas.

Where a grammar guarantees the calls (tool_choice "required" or a named function, or a strict tool:
ToolUse.constrained), each call streams as the model writes it, as OpenAI streams calls: a delta
with its index, id and name once the name is complete, then its arguments' JSON text piece by
piece. A call cut short by max_tokens or a stop string has then sent its fragments so far, and the
finish reason says so.

Otherwise the model may write something that only looks like a call. The reply's text is then held
back from the point where a call may begin until the reply ends: well-formed calls go out whole
(one delta each: clients join argument fragments, and one fragment is a valid split), anything else
as content, so nothing is lost.
"""
from __future__ import annotations

import json
from typing import Any

from .tool_calls import ToolCallFormat, ToolUse, new_call_id

Delta = dict[str, Any]  # one entry of a chunk's delta.tool_calls


class CallScanner:
    """Reads call objects ({"name": ..., <arguments key>: {...}}, one after another; text between
    them is skipped) from a reply fed piece by piece, for replies a grammar keeps well formed. It
    follows the JSON nesting (brackets outside strings, escapes inside them) and reads the top-level
    keys and the name; the arguments value is passed on as the raw text the model wrote."""

    def __init__(self, arguments_key: str) -> None:
        self.arguments_key = arguments_key
        self.calls = 0            # call objects begun
        self.depth = 0            # brackets open; 0 between calls
        self.in_string = False
        self.escaped = False
        self.literal: list[str] | None = None  # a top-level string being read (a key or the name), quoted
        self.want_key = False     # at the top level, the next string is a key
        self.key: str | None = None  # the top-level key whose value is being read
        self.named = False        # this call's first delta (id and name) is out
        self.arguments: list[str] = []  # the call's arguments text not sent yet (held until the name is)

    def feed(self, text: str) -> list[Delta]:
        out: list[Delta] = []
        for ch in text:
            if self.depth == 0:
                if ch == "{":
                    self.calls += 1
                    self.depth, self.want_key, self.key, self.named = 1, True, None, False
                continue
            if (self.key == self.arguments_key and not self.want_key and not self.in_string
                    and self.depth == 1 and ch in "{["):
                self.arguments.append(ch)  # the arguments value opens
            elif self.key == self.arguments_key and self.depth >= 2:
                self.arguments.append(ch)
            if self.in_string:
                self._string_char(ch, out)
            elif ch == '"':
                self.in_string = True
                if self.depth == 1:
                    self.literal = [ch]
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self._flush(out)
            elif self.depth == 1 and ch == ":":
                self.want_key = False
            elif self.depth == 1 and ch == ",":
                self.want_key, self.key = True, None
        self._flush(out)
        return out

    def _string_char(self, ch: str, out: list[Delta]) -> None:
        if self.literal is not None:
            self.literal.append(ch)
        if self.escaped:
            self.escaped = False
        elif ch == "\\":
            self.escaped = True
        elif ch == '"':
            self.in_string = False
            if self.literal is not None:
                value = json.loads("".join(self.literal))
                self.literal = None
                if self.want_key:
                    self.key = value
                elif self.key == "name" and not self.named:
                    self.named = True
                    out.append({"index": self.calls - 1, "id": new_call_id(), "type": "function",
                                "function": {"name": value, "arguments": ""}})

    def _flush(self, out: list[Delta]) -> None:
        if self.named and self.arguments:
            out.append({"index": self.calls - 1, "function": {"arguments": "".join(self.arguments)}})
            self.arguments = []


class ToolCallStream:
    """One streamed reply that may hold calls: feed(text delta) -> (content, call deltas) as the reply
    grows, finish() -> (content, call deltas) not sent yet once it has ended; `calls` counts the
    calls sent."""

    def __init__(self, use: ToolUse, fmt: ToolCallFormat) -> None:
        self.use, self.fmt = use, fmt
        self.text = ""
        self.sent = 0             # text[:sent] went out as content
        self.scanner = CallScanner(fmt.arguments_key) if use.constrained() else None
        self.scanned: int | None = None  # text[:scanned] has been read, once calls have begun
        self.calls = 0

    def feed(self, delta: str) -> tuple[str, list[Delta]]:
        self.text += delta
        hold = self.fmt.hold_from(self.text)
        content = ""
        if hold > self.sent:
            content, self.sent = self.text[self.sent:hold], hold
        if self.scanner is None:
            return content, []
        if self.scanned is None:
            self.scanned = self.fmt.calls_start(self.text)
            if self.scanned is None:
                return content, []
        deltas = self.scanner.feed(self.text[self.scanned:])
        self.scanned, self.calls = len(self.text), self.scanner.calls
        return content, deltas

    def finish(self) -> tuple[str, list[Delta]]:
        if self.scanner is None:
            _, calls = self.use.parse(self.fmt, self.text)
            if calls:  # the held-back text is theirs (content before the first call was sent already)
                self.calls = len(calls)
                return "", [{"index": k, **call.openai()} for k, call in enumerate(calls)]
        elif self.scanner.calls:
            return "", []  # sent as written
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest, []
