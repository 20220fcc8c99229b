"""Generation settings and the plain (one token per target forward) decoding strategy.

A decoding strategy turns a prompt into committed tokens: `begin(prompt_ids)` runs the prefill
and returns the first token(s); each `step()` returns the next committed tokens (one for plain
decoding, several for speculative decoding). The engine owns everything else (stop conditions,
detokenisation, streaming, statistics), so there is one generate loop for every strategy.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence

import torch

from . import cuda_graphs, ops
from .errors import GenerationCancelled, NumericalError
from .kv_cache import KVCache
from .ops import w4a16
from .ops.linear import INVARIANT_ROWS
from .models.decoder import Decoder

if TYPE_CHECKING:
    from .structured import Grammar, GrammarState

DEFAULT_PREFILL_CHUNK = 512


@dataclass
class GenerationConfig:
    """How to generate. temperature 0 means greedy; top_k 0, top_p 1 and min_p 0 disable those filters.
    logit_bias ({token id: bias in [-100, 100]}, added to the logits) and the penalties
    (ops.apply_penalties; repetition_penalty 1, presence_penalty 0 and frequency_penalty 0 disable
    them) apply in that order, to greedy and sampled decoding alike."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # Log-probabilities (ops.token_logprobs: the model's raw distribution): None returns none; k
    # returns each generated (prompt) token's and the k most likely alternatives at its position.
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Structured output (edgespec.structured): the generated text must match this grammar.
    grammar: "Grammar | None" = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    # Polled between prefill chunks and between decode steps; True stops the generation
    # (LLM.stream(cancel=...) sets it; a server cancels a request whose client went away).
    cancel: Callable[[], bool] | None = field(default=None, repr=False, compare=False)
    # The grammar's state during one generation (set by the engine; the Sampler masks with it).
    constraint: "GrammarState | None" = field(default=None, repr=False, compare=False)

    def validate(self) -> "GenerationConfig":
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        ops.validate_sampling(self.temperature, self.top_k, self.top_p, self.min_p)
        ops.validate_penalties(self.repetition_penalty, self.presence_penalty, self.frequency_penalty)
        ops.validate_logit_bias(self.logit_bias)
        if self.prefill_chunk <= 0:
            raise ValueError(f"prefill_chunk must be positive, got {self.prefill_chunk}")
        if self.grammar is not None:
            self.grammar.validate()
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= ops.MAX_TOP_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {ops.MAX_TOP_LOGPROBS}] (the number of "
                                 f"alternatives per token), got {k!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusts_logits(self) -> bool:
        """Whether Sampler.adjust changes logits (a logit bias or penalties)."""
        return bool(self.logit_bias) or self.penalised


@dataclass
class Sampler:
    """Draws the next tokens of one sequence from logits: the configured logit bias and penalties,
    then greedy selection or the sampling transform with a seeded generator.

    With penalties it keeps the sequence's history on the device (the prompt's tokens, and how
    often each token has been generated): a call adds the tokens it draws, `record` the tokens a
    strategy commits otherwise (a speculative step's accepted path)."""

    config: GenerationConfig
    device: torch.device
    prompt_ids: Sequence[int] = ()
    generator: torch.Generator = field(init=False)
    _prompt_seen: torch.Tensor | None = field(init=False, default=None)  # bool [V]
    _counts: torch.Tensor | None = field(init=False, default=None)       # int32 [V]
    _bias: torch.Tensor | None = field(init=False, default=None)         # fp32 [V]

    def __post_init__(self) -> None:
        seed = self.config.seed
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(seed))

    def adjust(self, logits: torch.Tensor, path_counts: torch.Tensor | None = None) -> torch.Tensor:
        """[N, V] logits plus the logit bias, then penalised for the history (ops.apply_penalties);
        path_counts int [N, V]: tokens each row's history holds beyond the committed sequence (a
        draft tree row's path). Without either the logits come back unchanged."""
        c = self.config
        if c.logit_bias:
            if self._bias is None:
                self._bias = ops.logit_bias_vector(c.logit_bias, logits.shape[-1], logits.device)
            logits = logits.float() + self._bias
        if not c.penalised:
            return logits
        if self._counts is None:
            vocab = logits.shape[-1]
            self._counts = torch.zeros(vocab, dtype=torch.int32, device=logits.device)
            self._prompt_seen = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
            ids = torch.tensor(list(self.prompt_ids), dtype=torch.int64, device=logits.device)
            self._prompt_seen[ids] = True
        counts = self._counts if path_counts is None else self._counts + path_counts
        return ops.apply_penalties(logits, self._prompt_seen, counts, c.repetition_penalty, c.presence_penalty,
                                   c.frequency_penalty)

    def record(self, tokens: torch.Tensor) -> None:
        """Add generated tokens (int64 [n], on the device) to the history."""
        if self._counts is not None:
            self._counts.index_put_((tokens,), torch.ones_like(tokens, dtype=torch.int32), accumulate=True)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, V] (penalised) logits -> [T, V] sampling distribution (only for temperature > 0)."""
        c = self.config
        return ops.logits_to_probs(logits, c.temperature, c.top_k, c.top_p, c.min_p)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, V] logits -> [T] int64 tokens, which join the history (T = 1: the next token; the
        grammar of a constrained generation restricts it, and the strategy feeds the grammar)."""
        logits = self.adjust(logits)
        constraint = self.config.constraint
        if constraint is None or full_grammar_masks():
            tokens = self._draw(logits if constraint is None else constraint.mask(logits))
        else:
            best = self.unconstrained_choices(logits, check=False)  # callers check the logits (checked_tokens)
            tokens = torch.tensor([self.constrained_token(logits, i, (), None if best is None else best[i])
                                   for i in range(logits.shape[0])], dtype=torch.int64, device=logits.device)
        self.record(tokens)
        return tokens

    def _draw(self, logits: torch.Tensor) -> torch.Tensor:
        """[T, V] (adjusted, masked) logits -> [T] int64: the argmax, or a draw from the sampling
        distribution."""
        if self.config.greedy:
            return ops.argmax(logits)
        probs = self.probs(logits)
        # Non-finite logits give NaN probabilities, which the sampler would refuse with an opaque
        # error: sample such rows from a placeholder and let checked_tokens report them.
        probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, torch.ones_like(probs))
        return ops.sample(probs, self.generator)

    def unconstrained_choices(self, logits: torch.Tensor, check: bool = True) -> list[int] | None:
        """Greedy: each row's argmax as if no grammar applied, [N, V] adjusted logits -> N ints in
        one host read; sampling: None, constrained_token draws a row's token only when asked for
        that row (a multinomial over a whole tree's rows costs 60 ms for 61 rows of 49K tokens on a
        CPU thread). check: also raise NumericalError for NaN or +inf anywhere in the logits (for
        sampling, a read of its own)."""
        if self.config.greedy:
            best = ops.argmax(logits)
            return checked_tokens(best, logits) if check else best.tolist()
        if check:
            checked_tokens(torch.empty(0, dtype=torch.int64, device=logits.device), logits)
        return None

    def constrained_token(self, logits: torch.Tensor, row: int, path: Sequence[int], choice: int | None) -> int:
        """The token chosen from row `row` of [N, V] adjusted logits masked by the grammar after the
        committed text plus `path`. The model's unconstrained choice comes first: `choice` (greedy,
        from unconstrained_choices), or a draw from the unmasked row when the sampling transform
        keeps every token; where the grammar allows it (GrammarState.allows), it is the answer, and
        only elsewhere is the row's vocabulary-wide mask computed and the token chosen afresh from
        the masked row. Exact for greedy decoding: an allowed argmax is the masked argmax. Lossless
        for sampling: the masked distribution is the unmasked one conditioned on the allowed set
        A, and a token y in A comes out with p(y) (drawn at once) + (1 - p(A)) p(y) / p(A) (A
        missed, then drawn from the masked row) = p(y) / p(A). Top-k, top-p and min-p pick their
        tokens among the allowed ones, not among all: with them the masked row is drawn from
        directly."""
        c = self.config
        constraint = c.constraint
        filtered = 0 < c.top_k < logits.shape[-1] or c.top_p < 1.0 or c.min_p > 0.0
        if choice is None and not c.greedy and not filtered:
            choice = int(self._draw(logits[row:row + 1])[0])  # no NaN check: the caller's
        if choice is not None and constraint.allows(path, choice):
            return choice
        masked = constraint.mask(logits[row:row + 1], [path])
        return checked_tokens(self._draw(masked), masked)[0]


def full_grammar_masks() -> bool:
    """Whether EDGESPEC_GRAMMAR_MASKS asks for the grammar's vocabulary-wide mask on every row
    (`full`: every decode step, every row of a draft tree; bench_structured.py's baseline) instead
    of only where the model's own choice is not known to be allowed (`checked`, the default)."""
    value = os.environ.get("EDGESPEC_GRAMMAR_MASKS", "checked").strip().lower() or "checked"
    if value not in ("checked", "full"):
        raise ValueError(f"EDGESPEC_GRAMMAR_MASKS must be checked or full, got {value!r}")
    return value == "full"


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (ops.token_logprobs) and the `logprobs` most
    likely tokens at its position as (token id, log-probability), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def read_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """TokenLogprob of tokens [N] (int64, on the logits' device) chosen from logits [N, V]."""
    return _to_host(tokens, *ops.token_logprobs(logits, tokens, top))


def _to_host(tokens: torch.Tensor, chosen: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> list[TokenLogprob]:
    """ops.token_logprobs' tensors as TokenLogprob, in one host read (ids are exact in float64)."""
    top = ids.shape[1]
    rows = torch.cat([tokens.double().unsqueeze(1), chosen.double().unsqueeze(1), values.double(), ids.double()],
                     dim=1).tolist()
    return [TokenLogprob(int(r[0]), r[1], tuple((int(i), v) for i, v in zip(r[2 + top:], r[2:2 + top])))
            for r in rows]


class PromptScorer:
    """Log-probabilities of a prompt's own tokens, taken from the prefill's hidden states chunk by
    chunk (only one chunk's [chunk, V] logits exist at a time). The token at position i is scored
    by the logits at position i - 1, so the first token has none."""

    def __init__(self, model: Decoder, ids: torch.Tensor, top: int) -> None:
        self.model, self.ids, self.top = model, ids, top
        self._parts: list[tuple[torch.Tensor, ...]] = []

    @classmethod
    def maybe(cls, model: Decoder, ids: torch.Tensor, config: GenerationConfig,
              reuse: int = 0) -> "PromptScorer | None":
        """A scorer when the config asks for prompt log-probabilities, which need every prompt
        position computed: a prefill that reuses cached slots (reuse > 0) cannot give them."""
        if config.prompt_logprobs is None:
            return None
        if reuse:
            raise ValueError("prompt log-probabilities need the whole prompt prefilled (reuse must be 0)")
        return cls(model, ids, config.prompt_logprobs)

    def __call__(self, start: int, hidden: torch.Tensor) -> None:
        """hidden: [n, H], the final hidden states at prompt positions [start, start + n)."""
        n = min(hidden.shape[0], self.ids.numel() - 1 - start)  # the last row predicts a new token
        if n > 0:
            logits = self.model.logits(hidden[:n])
            self._parts.append(ops.token_logprobs(logits, self.ids[start + 1:start + 1 + n], self.top))

    def result(self) -> list[TokenLogprob | None]:
        if not self._parts:
            return [None]
        chosen, values, ids = (torch.cat(t) for t in zip(*self._parts))
        return [None, *_to_host(self.ids[1:], chosen, values, ids)]


def checked_tokens(tokens: torch.Tensor, logits: torch.Tensor) -> list[int]:
    """The chosen tokens as ints, read in one host transfer together with a check of the logits
    they came from: NaN or +inf anywhere raises NumericalError instead of returning the garbage
    token argmax or sampling would pick (on a GPU the check adds no synchronisation of its own)."""
    bad = ~(logits < math.inf).all()  # NaN compares false as well
    values = torch.cat([tokens.reshape(-1).long(), bad.long().reshape(1)]).tolist()
    if values[-1]:
        raise NumericalError(
            f"the model produced non-finite logits (NaN or +inf) for {logits.shape[0]} position(s) in "
            f"{logits.dtype}: in float16 an activation usually overflowed (load the model in bfloat16 or "
            "float32); otherwise the checkpoint's weights hold NaN or inf")
    return values[:-1]


class DecodingStrategy(Protocol):
    """begin/step return the committed tokens. When the config asks for them, each call also sets
    token_logits, the [n, V] raw target logits its n tokens were chosen from (row i: token i's
    distribution), and begin sets prompt_logprobs (a PromptScorer's result)."""

    token_logits: torch.Tensor | None
    prompt_logprobs: list[TokenLogprob | None] | None
    cached_tokens: int  # prompt tokens begin() did not recompute (prefix caching)

    def begin(self, prompt_ids: Sequence[int], config: GenerationConfig, max_new_tokens: int,
              reuse: int = 0) -> list[int]:
        """Prefill the prompt and choose the first token. reuse: the cache's slots [0, reuse)
        already hold the K/V of the prompt's first `reuse` tokens (LLM's prefix caching)."""

    def step(self) -> list[int]: ...


def prefill(model: Decoder, cache: KVCache, ids: torch.Tensor, chunk: int,
            capture: tuple[int, ...] = (), cancel: Callable[[], bool] | None = None,
            on_chunk: Callable[[int, torch.Tensor], None] | None = None, start: int = 0,
            ) -> tuple[torch.Tensor, dict[int, list[torch.Tensor]]]:
    """Run the prompt through the model in chunks of `chunk` tokens, filling cache slots [start, P)
    (slots before `start` already hold the K/V of ids[:start]).

    ids: [P] int64 on the model's device. Returns the final hidden state of the last prompt token
    [1, H] and, per captured layer, the list of per-chunk [chunk, H] streams of positions
    [start, P) (for draft heads).
    cancel: polled before every chunk after the first; True raises GenerationCancelled (a long
    prompt stops within one chunk's time, not after the whole prefill).
    on_chunk: called with each chunk's start and final hidden states [chunk, H] (PromptScorer).
    """
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in capture}
    hidden = None
    # Several chunks: the 4-bit weights a chunk dequantises for the CPU's dense GEMM serve the rest.
    several = ids.numel() - start > chunk
    with w4a16.keep_dequantized() if several else contextlib.nullcontext():
        for s in range(start, ids.numel(), chunk):
            if s > start and cancel is not None and cancel():
                raise GenerationCancelled(f"cancelled after {s} of {ids.numel()} prompt tokens")
            part = ids[s:s + chunk]
            positions = torch.arange(s, s + part.numel(), device=ids.device)
            out = model.forward(part, positions, cache, s, capture=capture)
            for i in capture:
                captured[i].append(out.captured[i])
            if on_chunk is not None:
                on_chunk(s, out.hidden)
            hidden = out.hidden
    cache.length = ids.numel()
    return hidden[-1:], captured


class PlainDecoding:
    """One target forward per token: the baseline every speculative strategy must match.

    Under a grammar, the tokens it forces next (GrammarState.take_forced) need no choosing: a step
    runs them through the model with the last token in one forward (jump-forward) and chooses the
    token after them. That forward is a verification step's (a chain under a tree mask, at most
    ops.linear.INVARIANT_ROWS rows), so every token gets the K/V and logits a step of its own would
    give it: bit for bit in bf16 and fp16, as speculative decoding's verified tokens do.

    cuda_graph: replay each decode step as one CUDA graph (edgespec.cuda_graphs; None: as
    EDGESPEC_CUDA_GRAPHS says, and only for a CUDA model).
    """

    def __init__(self, model: Decoder, cache: KVCache, cuda_graph: bool | None = None) -> None:
        self.model = model
        self.cache = cache
        self.sampler: Sampler | None = None
        self._last: int | None = None
        self.token_logits: torch.Tensor | None = None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.cached_tokens = 0
        self._room = 0            # tokens the generation may still commit
        self.forced_tokens = 0    # tokens a grammar forced, committed without a step of their own
        if cuda_graph is None:
            cuda_graph = cuda_graphs.requested() and model.device.type == "cuda"
        self._graph = cuda_graphs.StepGraphs(model, cache) if cuda_graph else None

    def begin(self, prompt_ids: Sequence[int], config: GenerationConfig, max_new_tokens: int,
              reuse: int = 0) -> list[int]:
        self.sampler = Sampler(config, self.model.device, prompt_ids)
        ids = torch.tensor(list(prompt_ids), dtype=torch.int64, device=self.model.device)
        scorer = PromptScorer.maybe(self.model, ids, config, reuse)
        self.cached_tokens = reuse
        self._room = max_new_tokens - 1
        self.forced_tokens = 0
        hidden, _ = prefill(self.model, self.cache, ids, config.prefill_chunk, cancel=config.cancel, on_chunk=scorer,
                            start=reuse)
        self.prompt_logprobs = scorer.result() if scorer is not None else None
        logits = self.model.logits(hidden)
        token = checked_tokens(self.sampler(logits), logits)[0]
        self._commit(token)
        self.token_logits = logits
        return [token]

    def step(self) -> list[int]:
        pos = self.cache.length
        dev = self.model.device
        constraint = self.sampler.config.constraint
        # Room for forced tokens: one place stays for the token chosen after them, and every token
        # fed sits inside the context.
        room = min(self._room - 1, self.model.max_context - 2 - pos, INVARIANT_ROWS - 1)
        forced = constraint.take_forced(room) if constraint is not None and room > 0 else []
        if forced:
            return self._jump(pos, forced)
        if self._graph is not None:
            logits = self._graph.decode(self._last, pos)
        else:
            out = self.model.forward(torch.tensor([self._last], device=dev), torch.tensor([pos], device=dev),
                                     self.cache, pos)
            logits = self.model.logits(out.hidden)
        self.cache.length = pos + 1
        token = checked_tokens(self.sampler(logits), logits)[0]
        self._commit(token)
        self._room -= 1
        self.token_logits = logits  # a graph's output buffer: valid until the next step
        return [token]

    def _jump(self, pos: int, forced: list[int]) -> list[int]:
        """One forward over the last token and the forced ones (which the grammar has taken), then
        the token after them, unless they complete the grammar. Row i of token_logits is the
        distribution committed token i came from, as log-probabilities need."""
        dev = self.model.device
        done = self.sampler.config.constraint.done
        fed = [self._last] + (forced[:-1] if done else forced)  # the last token stays out of the cache
        # A chain under a tree mask: the verification step's attention, whose rows equal decode
        # steps' (what keeps speculative output equal to plain output).
        chain = ops.pack_tree_mask(torch.ones(len(fed), len(fed), dtype=torch.bool, device=dev).tril())
        out = self.model.forward(torch.tensor(fed, device=dev), torch.arange(pos, pos + len(fed), device=dev),
                                 self.cache, pos, tree_mask=chain)
        logits = self.model.logits(out.hidden)
        self.cache.length = pos + len(fed)
        self.sampler.record(torch.tensor(forced, dtype=torch.int64, device=dev))
        self.forced_tokens += len(forced)
        self.token_logits = logits
        if done:
            checked_tokens(torch.empty(0, dtype=torch.int64, device=dev), logits)  # NaN: an error here too
            self._last = forced[-1]
            self._room -= len(forced)
            return forced
        token = checked_tokens(self.sampler(logits[-1:]), logits)[0]
        self._commit(token)
        self._room -= len(forced) + 1
        return forced + [token]

    def stats(self) -> dict[str, int]:
        """Merged into GenerationStats: under a grammar, the tokens it forced (committed without a
        step of their own)."""
        return {"forced_tokens": self.forced_tokens} if self.sampler.config.constraint is not None else {}

    def _commit(self, token: int) -> None:
        self._last = token
        if self.sampler.config.constraint is not None:
            self.sampler.config.constraint.consume([token])
