"""Structured output: generated tokens constrained by a grammar (any JSON value or object, a JSON
schema, a regular expression, or a choice among strings), through llguidance (`pip install
"edgespec[structured]"`; the server extra includes it).

Each step masks the logits (after the logit bias and penalties) to the tokens the grammar allows
after the text so far, -inf elsewhere, so greedy and sampled decoding draw from the model's
distribution restricted to valid continuations; the generation ends when the grammar is complete
and allows nothing more (finish_reason "stop"). Log-probabilities stay the model's raw ones.
Speculative decoding masks each row of a verified tree by the grammar after that node's path, so
greedy speculative output still equals plain output and sampling stays lossless. The draft tree
itself holds only drafts the grammar's parser takes, and the token it forces where it forces one
(GrammarState.draft_choices): a forbidden draft would never be accepted, so the next best one
takes its place. Plain decoding feeds the tokens a grammar forces (a JSON key the schema fixes, a
tool call's fixed opening) through the model together with the last token, in one forward, and
chooses the next token after them: the same tokens as one step each, in fewer steps.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Sequence

import torch

KINDS = ("json", "regex", "choice", "lark")


@dataclass(frozen=True)
class Grammar:
    """What generated text must match. kind "json": JSON text, any object when `spec` is None,
    else valid under the JSON schema `spec` (a dict or its JSON text); "regex": a full match of
    the regular expression `spec`; "choice": exactly one of the strings `spec`; "lark": a grammar
    in llguidance's Lark dialect (edgespec.tool_calls writes these).

    A dict schema is kept as its JSON text, so the grammar cannot change after it is made and
    compiles once however often it is validated and used.

    reasoning: whether a reasoning section (<think>...</think>, edgespec.reasoning) comes before the
    text: None no, False it may, True it must (the prompt opened it). after_reasoning() sets it."""

    kind: str
    spec: Any = None
    reasoning: bool | None = None

    def __post_init__(self) -> None:
        if self.kind == "json" and isinstance(self.spec, dict):
            object.__setattr__(self, "spec", json.dumps(self.spec))

    @classmethod
    def json(cls, schema: dict[str, Any] | str | None = None) -> "Grammar":
        return cls("json", schema)

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> "Grammar":
        return cls("choice", tuple(options))

    @classmethod
    def lark(cls, grammar: str) -> "Grammar":
        return cls("lark", grammar)

    def after_reasoning(self, inside: bool) -> "Grammar":
        """This grammar for the answer after a thinking model's reasoning section, which the reply
        must open (inside False: it may) or close (True: the prompt opened it)."""
        return Grammar(self.kind, self.spec, inside)

    def validate(self) -> "Grammar":
        """Check the spec's shape and that llguidance compiles it (ValueError naming the problem)."""
        if self.kind not in KINDS:
            raise ValueError(f"grammar kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind in ("regex", "lark") and not isinstance(self.spec, str):
            raise ValueError(f"a {self.kind} grammar needs its text as a string, got {type(self.spec).__name__}")
        if self.kind == "choice" and (not self.spec or not all(isinstance(s, str) and s for s in self.spec)):
            raise ValueError("a choice grammar needs one or more non-empty strings")
        if self.kind == "json" and self.spec is not None and not isinstance(self.spec, str):
            raise ValueError(f"a JSON schema must be a dict or its JSON text, got {type(self.spec).__name__}")
        if self._problems:
            raise ValueError(f"the {self.kind} grammar does not compile: {self._problems}")
        return self

    @cached_property
    def _problems(self) -> str:
        """llguidance's complaints about the compiled grammar ("" when it compiles)."""
        failed, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(self.compiled())
        return "; ".join(" ".join(m.split()) for m in messages) if failed else ""

    @cached_property
    def _compiled(self) -> str:
        if self.reasoning is None:
            return self._compiled_text()
        from .reasoning import after_reasoning  # noqa: PLC0415

        return after_reasoning(self._compiled_text(), self.reasoning)

    def _compiled_text(self) -> str:
        """The grammar of the text itself."""
        llguidance = _llguidance()
        if self.kind == "json":
            schema = self.spec if self.spec is not None else '{"type": "object"}'
            try:
                json.loads(schema)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            return llguidance.LLMatcher.grammar_from_json_schema(schema)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.spec)
        return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(s) for s in self.spec))

    def compiled(self) -> str:
        """The grammar in llguidance's format (built once)."""
        return self._compiled


class GrammarState:
    """One generation's position in its grammar: which tokens may come next, fed the tokens that
    do come. tokenizer: from tokenizer_for, sized to the model's vocabulary (the logits' width)."""

    def __init__(self, grammar: Grammar, tokenizer: Any) -> None:
        llguidance = _llguidance()
        import llguidance.torch as lt  # noqa: PLC0415

        self._lt = lt
        self.matcher = llguidance.LLMatcher(tokenizer, grammar.compiled())
        self._check()
        self._words = lt.get_bitmask_shape(1, tokenizer.vocab_size)[1]
        # Vocabulary-wide masks computed so far (one per row `mask` fills): the host work `allows`
        # saves. Speculation's statistics report it; tests count it.
        self.full_masks = 0

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

    def mask(self, logits: torch.Tensor, paths: Sequence[Sequence[int]] = ((),)) -> torch.Tensor:
        """logits [N, V] as a new fp32 tensor (the raw ones stay: log-probabilities read them) whose
        row i has every token the grammar forbids after the text so far plus paths[i] at -inf (a
        draft tree's rows: each node's tokens below the root). A row whose path the grammar rejects
        is left unmasked: acceptance never reaches it, its parent's row forbids its token.

        Each row costs a fill of llguidance's bitmask and its unpacking over the vocabulary (tens to
        hundreds of microseconds for 49K tokens): where the question is only whether one token
        survives, `allows` answers it for a few microseconds."""
        bitmask = torch.full((len(paths), self._words), -1, dtype=torch.int32)  # all allowed
        for i, path in enumerate(paths):
            consumed = self.matcher.try_consume_tokens(list(path)) if path else 0
            if consumed == len(path):
                self._lt.fill_next_token_bitmask(self.matcher, bitmask, i)
                self.full_masks += 1
            if consumed:
                self.matcher.rollback(consumed)
            self._check()
        return torch.where(_allowed(bitmask.to(logits.device), logits.shape[-1]), logits.float(), float("-inf"))

    def allows(self, path: Sequence[int], token: int) -> bool:
        """Whether `mask` keeps `token` in the row after `path`, told without computing that mask:
        a few microseconds of llguidance's parser instead of a vocabulary-wide bitmask.

        llguidance's mask after a text is what its parser accepts next (plus the end token where
        the text may end), except in two states: where the grammar forces the next bytes, the mask
        holds only their canonical token (the parser would also take a shorter piece of them), and
        a stopped grammar's mask allows end tokens the parser no longer takes. In those states this
        returns False whatever the token. So a caller that computes the row's mask whenever this
        says False, and then picks from the masked row, ends with the masked row's argmax, or with
        a token distributed exactly as the masked row's distribution says (False never depends on
        the token except through the mask itself). A path the grammar rejects leaves its row
        unmasked (mask's rule): every token is allowed there. (This is how llguidance 1.9 builds its
        mask; tests/test_structured_spec.py checks it on a 49K-token vocabulary.)"""
        consumed = self.matcher.try_consume_tokens(list(path)) if path else 0
        if consumed < len(path):
            allowed = True
        elif self.matcher.is_stopped() or self.matcher.compute_ff_bytes():
            allowed = False
        else:
            allowed = self.matcher.validate_tokens([int(token)]) == 1
        if consumed:
            self.matcher.rollback(consumed)
        self._check()
        return allowed

    def draft_choices(self, path: Sequence[int], drafts: Sequence[int], count: int) -> tuple[list[int], bool]:
        """Which tokens may enter a draft tree after the text so far plus `path` (spec.tree.PickFn):
        where the grammar forces the next token (llguidance's forced tokens, the one token its mask
        then allows), that token, forced True; elsewhere the first `count` of `drafts` that its
        parser takes, in order. A draft the grammar forbids is never accepted, so its place goes to
        the next best, and a forced token is a sure guess whether the drafter saw it or not.

        The parser is looser than `mask` where forced bytes may still join the next ones (no forced
        token then, yet a token taking a shorter piece of them passes): such a draft is verified and
        turned down like any wrong guess. A parser check per draft costs microseconds, where a
        mask costs a vocabulary-wide fill."""
        consumed = self.matcher.try_consume_tokens(list(path)) if path else 0
        chosen: list[int] = []
        forced = False
        if consumed == len(path) and not self.matcher.is_stopped():
            ahead = self._forced_next()
            if ahead is not None:
                chosen, forced = [ahead], True
            else:
                for token in drafts:
                    if len(chosen) == count:
                        break
                    if self.matcher.validate_tokens([int(token)]) == 1:
                        chosen.append(int(token))
        if consumed:
            self.matcher.rollback(consumed)
        self._check()
        return chosen, forced

    def take_forced(self, limit: int) -> list[int]:
        """Feed and return the tokens the grammar forces next, at most `limit`: llguidance's
        fast-forward tokens, taken one at a time (each is then the one token the mask allows), so
        every decoding, greedy or sampled, would choose them. Plain decoding runs them through the
        model in one forward with the last token (jump-forward) instead of one step each."""
        forced: list[int] = []
        while len(forced) < limit and not self.done:
            ahead = self._forced_next()
            if ahead is None:
                break
            forced.extend(self.consume([ahead]))
        self._check()
        return forced

    def _forced_next(self) -> int | None:
        """The token the grammar forces next (the first of llguidance's fast-forward tokens, the
        one token its mask then allows), or None where it leaves a choice."""
        ahead = self.matcher.compute_ff_tokens()
        return int(ahead[0]) if ahead else None

    def consume(self, tokens: Sequence[int]) -> list[int]:
        """Feed committed tokens; returns those up to the one that completes the grammar (the rest,
        which a speculative step may have committed past the end, are dropped)."""
        for i, t in enumerate(tokens):
            if not self.matcher.consume_token(int(t)):
                self._check()
                raise ValueError(f"token {t} does not continue the grammar")
            if self.done:
                return list(tokens[:i + 1])
        return list(tokens)

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


# Per device: int32 [32], entry j the word with only bit j set (bit 31 is the sign bit).
_WORD_BITS: dict[torch.device, torch.Tensor] = {}


def _allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [N, vocab] from llguidance's int32 bitmask [N, W] (bit j of word i: token 32 i + j);
    tokens past the bitmask are not allowed."""
    bits = _WORD_BITS.get(bitmask.device)
    if bits is None:
        bits = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)], dtype=torch.int32, device=bitmask.device)
        _WORD_BITS[bitmask.device] = bits
    # One int32 AND and compare per token: shifting int64 copies of the words made four [N, V]
    # int64 temporaries: 27 ms for a 61-row tree on one CPU thread, about 2 ms this way.
    allowed = (bitmask.unsqueeze(-1) & bits).ne(0).view(bitmask.shape[0], -1)
    if allowed.shape[1] < vocab:
        allowed = torch.cat([allowed, allowed.new_zeros(allowed.shape[0], vocab - allowed.shape[1])], dim=1)
    return allowed[:, :vocab]


def _llguidance() -> Any:
    try:
        import llguidance  # noqa: PLC0415
    except ImportError:
        raise ValueError('structured output needs llguidance: pip install "edgespec[structured]"') from None
    return llguidance
