"""Log-probabilities in OpenAI's two response formats.

Chat completions: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal"}`.
Completions (the legacy format): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
where an echoed prompt's first token has no log-probability (null) and `top_logprobs` maps token
strings to values (tokens that decode to the same string share one entry, as in OpenAI's format).

A token's string is its decoded text, special tokens included; a token that holds part of a UTF-8
character decodes to U+FFFD, and its `bytes` are those of that string, as vLLM reports them. A
model without a tokenizer names tokens "token_id:<id>". `text_offset` counts characters of the
decoded token sequence, which is the response text wherever decoding reproduces it (a text prompt
is echoed as sent).
"""
from __future__ import annotations

from typing import Any, Sequence

from ..generation import TokenLogprob
from ..loading import IncrementalDetokenizer, Tokenizer


class LogprobFormatter:
    """Formats the log-probabilities of one response, chunk after chunk (a stream), keeping the
    running text offset of the completions format."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self._offset = 0
        self._strings: dict[int, str] = {}

    def token_string(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        if token_id not in self._strings:
            self._strings[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return self._strings[token_id]

    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.token_string(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return {"content": [{**self._chat_entry(e.token_id, e.logprob),
                             "top_logprobs": [self._chat_entry(t, v) for t, v in e.top]} for e in entries],
                "refusal": None}

    def completion(self, token_ids: Sequence[int], entries: Sequence[TokenLogprob | None]) -> dict[str, Any]:
        """token_ids with their entries (None: a prompt's first token, which nothing predicts)."""
        offsets = []
        for token in token_ids:
            offsets.append(self._offset)
            if self._detok is not None:
                self._offset += len(self._detok.add([token]))
        return {"tokens": [self.token_string(t) for t in token_ids],
                "token_logprobs": [None if e is None else e.logprob for e in entries],
                "top_logprobs": [None if e is None else {self.token_string(t): v for t, v in e.top} for e in entries],
                "text_offset": offsets}
