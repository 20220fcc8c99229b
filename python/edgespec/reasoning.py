"""Reasoning ("thinking") in a chat reply: the part between <think> and </think> that models such as
Qwen3 and the DeepSeek-R1 distillations write before their answer, kept apart from the answer.

A template that teaches thinking either lets the model open the section itself (Qwen3: the reply
may start with <think>) or opens it in the generation prompt (DeepSeek-R1 distills, Qwen3's
thinking-only releases: the reply starts inside it and only closes it). `Reasoning(inside)` splits
a reply accordingly: the reasoning, then the content after </think> (leading whitespace dropped: it
only separates the two). A reply cut short inside the section is all reasoning.

Structured output and tool calls apply to the content: `after_reasoning` lets a grammar's text
follow a reasoning section, so a thinking model still thinks before the constrained answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .text_stream import partial_suffix

OPEN, CLOSE = "<think>", "</think>"
# The server's --reasoning-format: "think" splits replies, "none" leaves them whole, "auto" splits
# those of a chat template that knows <think> (template_thinks).
REASONING_FORMATS = ("auto", "think", "none")
# A reasoning section: any text without the closing tag, then the tag and the whitespace after it.
# One lexeme, so the lexer never has to guess where the reasoning ends.
_BODY = r'(/(?s:.*)/ & ~/(?s:.*<\/think>.*)/) "</think>" /\s*/'


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template knows a <think> section (it opens one, or renders or strips them)."""
    return bool(chat_template) and (OPEN in chat_template or CLOSE in chat_template)


def prompt_opens_thinking(prompt_text: str) -> bool:
    """Whether a rendered prompt leaves a <think> section open, so the reply starts inside it. Give
    it the template's generation prompt (Tokenizer.generation_prompt): a conversation may mention
    the tag itself."""
    return prompt_text.rfind(OPEN) > prompt_text.rfind(CLOSE)


@dataclass(frozen=True)
class Reasoning:
    """How the replies to one prompt divide; inside: the prompt opened the section."""

    inside: bool

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning, content) of a whole reply; reasoning None when it has no section."""
        body = text
        if not self.inside:
            start = len(text) - len(text.lstrip())
            if not text.startswith(OPEN, start):
                return None, text
            body = text[start + len(OPEN):]
        end = body.find(CLOSE)
        if end < 0:
            return body, ""
        return body[:end], body[end + len(CLOSE):].lstrip()

    def stream(self) -> "ReasoningStream":
        return ReasoningStream(self.inside)


class ReasoningStream:
    """split() for a reply that arrives in pieces: feed(delta) -> (reasoning, content) that is
    certain so far, finish() -> what was held back. Held back: a start that may still become <think>,
    a reasoning tail that may be the start of </think>, whitespace that may precede the content.
    The pieces joined equal split() of the whole text."""

    def __init__(self, inside: bool) -> None:
        self.phase = "reasoning" if inside else "start"
        self.held = ""
        self.reasoned = inside  # whether the reply has a reasoning section

    def feed(self, delta: str) -> tuple[str, str]:
        text, self.held = self.held + delta, ""
        reasoning = ""
        if self.phase == "start":
            stripped = text.lstrip()
            if len(stripped) < len(OPEN) and OPEN.startswith(stripped):
                self.held = text  # still possibly the opening tag
                return "", ""
            if not stripped.startswith(OPEN):
                self.phase = "content"
                return "", text
            self.phase, self.reasoned = "reasoning", True
            text = stripped[len(OPEN):]
        if self.phase == "reasoning":
            end = text.find(CLOSE)
            if end < 0:
                keep = partial_suffix(text, CLOSE)
                self.held = text[len(text) - keep:]
                return text[:len(text) - keep], ""
            reasoning, text = text[:end], text[end + len(CLOSE):]
            self.phase = "answer-start"
        if self.phase == "answer-start":
            text = text.lstrip()
            if not text:
                return reasoning, ""
            self.phase = "content"
        return reasoning, text

    def finish(self) -> tuple[str, str]:
        held, self.held = self.held, ""
        if self.phase == "reasoning":
            return held, ""
        if self.phase == "start":  # whitespace, or the start of <think> and nothing more
            return "", held
        return "", ""


def after_reasoning(compiled: str, inside: bool) -> str:
    """A compiled llguidance grammar (its JSON text) whose text may follow a reasoning section: the
    section comes first when the prompt opened it (inside), and may when it did not."""
    try:
        grammars = json.loads(compiled)["grammars"]
    except json.JSONDecodeError:  # llguidance takes Lark text as it is
        grammars = [{"lark_grammar": compiled}]
    name = grammars[0].get("name") or "answer"
    grammars[0] = {**grammars[0], "name": name}
    rule = (f"start: REASONING @{name}\nREASONING: {_BODY}" if inside
            else f'start: REASONING? @{name}\nREASONING: "{OPEN}" {_BODY}')
    return json.dumps({"grammars": [{"lark_grammar": rule}, *grammars]})
