"""Structured output: generated tokens constrained by a grammar (any JSON value or object, a JSON
schema, a regular expression, or a choice among strings), through llguidance (`pip install
"edgespec[structured]"`; the server extra includes it).

Each step masks the logits to the tokens the grammar allows after the text so far (-inf elsewhere)
before penalties' and sampling's choice, so greedy and sampled decoding draw from the model's
distribution restricted to valid continuations; the generation ends when the grammar is complete
and allows nothing more (finish_reason "stop"). Log-probabilities stay the model's raw ones. A
constrained generation runs plain decoding even where speculation is installed: a draft tree would
need one grammar state per node.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

KINDS = ("json", "regex", "choice")


@dataclass(frozen=True)
class Grammar:
    """What generated text must match. kind "json": JSON text, any object when `spec` is None,
    else valid under the JSON schema `spec` (a dict or its JSON text); "regex": a full match of
    the regular expression `spec`; "choice": exactly one of the strings `spec`."""

    kind: str
    spec: Any = None

    @classmethod
    def json(cls, schema: dict[str, Any] | str | None = None) -> "Grammar":
        return cls("json", schema)

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Grammar":
        return cls("choice", tuple(options))

    def validate(self) -> "Grammar":
        """Check the spec's shape and that llguidance compiles it (ValueError naming the problem)."""
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "regex" and not isinstance(self.spec, str):
            raise ValueError(f"a regex grammar needs the pattern as a string, got {type(self.spec).__name__}")
        if self.kind == "choice" and (not self.spec or not all(isinstance(s, str) and s for s in self.spec)):
            raise ValueError("a choice grammar needs one or more non-empty strings")
        if self.kind == "json" and self.spec is not None and not isinstance(self.spec, (dict, str)):
            raise ValueError(f"a JSON schema must be a dict or its JSON text, got {type(self.spec).__name__}")
        failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(self.compiled())
        if failed:
            raise ValueError(f"the {self.kind} grammar does not compile: {'; '.join(' '.join(m.split()) for m in messages)}")
        return self

    def compiled(self) -> str:
        """The grammar in llguidance's format."""
        llguidance = _llguidance()
        if self.kind == "json":
            schema = self.spec if self.spec is not None else {"type": "object"}
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(s) for s in self.spec))


class GrammarState:
    """One generation's position in its grammar: which tokens may come next, fed the tokens that
    do come. tokenizer: from tokenizer_for, sized to the model's vocabulary (the logits' width)."""

    def __init__(self, grammar: Grammar, tokenizer: Any) -> None:
        llguidance = _llguidance()
        import llguidance.torch as lt  # noqa: PLC0415

        self._lt = lt
        self.matcher = llguidance.LLMatcher(tokenizer, grammar.compiled())
        self._check()
        self._bitmask = lt.allocate_token_bitmask(1, tokenizer.vocab_size)

    @staticmethod
    def tokenizer_for(hf_tokenizer: Any, vocab: int) -> Any:
        """llguidance's view of a transformers tokenizer over `vocab` tokens (the model's vocabulary,
        which may exceed the tokenizer's; slow to build: keep one per tokenizer)."""
        llguidance = _llguidance()
        import llguidance.hf  # noqa: PLC0415

        try:
            return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab)
        except ValueError:  # a decoder llguidance does not read (e.g. Fuse): give it each token's text
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_DecodedTokens(hf_tokenizer, vocab)),
                                          n_vocab=vocab)

    @property
    def done(self) -> bool:
        """The text is complete and the grammar allows no further token."""
        return self.matcher.is_stopped()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [1, V] with every token the grammar forbids next at -inf (a new fp32 tensor)."""
        self._lt.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        self._check()
        masked = logits.float().clone()  # the raw logits stay as they are (log-probabilities read them)
        self._lt.apply_token_bitmask_inplace(masked, self._bitmask.to(logits.device))
        return masked

    def consume(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            if not self.matcher.consume_token(int(t)):
                self._check()
                raise ValueError(f"token {t} does not continue the grammar")

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ValueError(f"structured output: {self.matcher.get_error()}")


class _DecodedTokens:
    """A tokenizer as llguidance's TokenizerWrapper reads it, each token's bytes being its own decoded
    text: exact for tokenizers whose tokens decode independently (character or word pieces joined
    as they are), which are the ones llguidance cannot read from their decoder itself."""

    def __init__(self, hf_tokenizer: Any, vocab: int) -> None:
        self.hf = hf_tokenizer
        self.eos_token_id = hf_tokenizer.eos_token_id
        self.bos_token_id = hf_tokenizer.bos_token_id
        known = len(hf_tokenizer)
        self.tokens = [hf_tokenizer.decode([i]).encode("utf-8") if i < known else b"" for i in range(vocab)]
        self.special_token_ids = list(hf_tokenizer.all_special_ids)

    def __call__(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))


def _llguidance() -> Any:
    try:
        import llguidance  # noqa: PLC0415
    except ImportError:
        raise ValueError('structured output needs llguidance: pip install "edgespec[structured]"') from None
    return llguidance
