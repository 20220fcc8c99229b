"""The engine: a loaded model, its tokenizer, one KV cache, and the one generate loop."""
from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from . import ops
from .errors import ContextLengthError, GenerationCancelled
from .generation import DecodingStrategy, GenerationConfig, PlainDecoding, TokenLogprob, read_logprobs
from .kv_cache import KVCache, common_prefix
from .loading import IncrementalDetokenizer, LoadedModel, Tokenizer, load_model
from .models.decoder import Decoder
from .prefix_store import MIN_GAIN_TOKENS, Parked, PrefixStore, SlotCopy
from .text_stream import partial_suffix

Prompt = str | Sequence[int] | Sequence[dict[str, str]]


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    steps: int = 0  # target forward passes after the prefill
    cached_tokens: int = 0  # prompt tokens whose K/V the previous generation left in the cache
    extra: dict[str, Any] = field(default_factory=dict)  # strategy statistics (speculation, sparsity)

    @property
    def prefill_tokens_per_s(self) -> float:
        # The tokens the prefill computed: the cached ones cost nothing.
        return (self.prompt_tokens - self.cached_tokens) / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # The first new token comes out of the prefill; decode speed counts the ones after it.
        n = self.new_tokens - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens, "new_tokens": self.new_tokens,
             "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
             "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
             "prefill_s": round(self.prefill_s, 4), "decode_s": round(self.decode_s, 4), "steps": self.steps}
        d.update(self.extra)
        return d


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (stream(cancel=...))
    stats: GenerationStats
    # One per token of token_ids / of the prompt (its first token has None), when the config asks.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class StreamEvent:
    """A piece of streamed output. The last event of a stream carries the whole `result`."""

    text: str
    token_ids: list[int]
    result: GenerationResult | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the config asks
    # Only on the event that follows the prefill, when the config asks for prompt_logprobs.
    prompt_logprobs: list[TokenLogprob | None] | None = None


StrategyFactory = Callable[[Decoder, KVCache], DecodingStrategy]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LLM:
    """Generate text with one model. Not thread-safe by itself: one generation at a time
    (a lock enforces it); the server queues requests in front of it.

    Prefix caching (`prefix_caching`, on by default): the K/V of the previous generation's tokens
    stay in the cache, and a prompt that starts with some of them (the next turn of a chat, the
    same system prompt or tool list, another choice of the same prompt) prefills only the rest.
    The result is the one a full prefill gives up to rounding (the prefill's rows are computed in
    other chunks), as in vLLM and llama.cpp; prompt log-probabilities always take a full prefill.
    A sequence that a prompt overwrites is parked on the host first (`prefix_store`), and comes
    back when a later prompt extends it: two conversations served in turns both keep their cache.
    """

    def __init__(self, loaded: LoadedModel, strategy: StrategyFactory | None = None, cache_slack: int = 0) -> None:
        self.model: Decoder = loaded.model
        self.tokenizer: Tokenizer | None = loaded.tokenizer
        self.name = loaded.name
        self._strategy_factory: StrategyFactory = strategy or PlainDecoding
        # Speculative strategies write tree tokens past the committed length: keep room for them.
        self.cache = self.model.new_cache(self.model.max_context + cache_slack)
        self._lock = threading.Lock()
        self.prefix_caching = True
        # The tokens whose K/V fill slots [0, len) of self.cache, and what they were computed under
        # (the cache itself, the sparse attention mode): prefix caching's state.
        self._cached_ids: list[int] = []
        self._cached_under: tuple[Any, ...] = ()
        # Sequences a prompt overwrote, kept on the host for a later prompt that extends one of them
        # (another conversation's next turn): edgespec.prefix_store.
        self.prefix_store = PrefixStore()

    @property
    def _live_twin(self) -> SlotCopy | None:
        """A host copy equal to the first slots of self.cache (the sequence parked or restored last,
        as far as later prompts kept it): parking the live sequence again copies only what follows.
        The prefix store holds it within its budget (and may drop it: then parking copies it all)."""
        return self.prefix_store.pinned

    @_live_twin.setter
    def _live_twin(self, copy: SlotCopy | None) -> None:
        self.prefix_store.pin(copy)

    @classmethod
    def load(cls, model: str, device: str | None = None, dtype: torch.dtype | None = None,
             max_context: int | None = None, progress: bool = False, draft: Any = "auto",
             quantized: bool | None = None, **speculation: Any) -> "LLM":
        """Load a model directory, GGUF file or 'demo' (see edgespec.loading.load_model).

        draft: speculative decoding (edgespec.spec.enable_speculation): "auto" uses the draft head
        shipped for the model (the demo model has one), None turns it off, or an EAGLE head
        directory / draft model path; speculation: tree_size, depth, topk, lookup, frspec_vocab.
        quantized: GGUF Q4_0/Q4_1/Q4_K weights as 4-bit layers (True), dequantised (False) or per device and dtype (None).
        """
        llm = cls(load_model(model, device=device, dtype=dtype, max_context=max_context, progress=progress,
                             quantized=quantized))
        if draft is not None or speculation:
            from .spec import enable_speculation  # noqa: PLC0415 - speculation is optional machinery

            enable_speculation(llm, draft, **speculation)
        return llm

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def set_strategy(self, strategy: StrategyFactory, cache_slack: int = 0) -> None:
        """Switch the decoding strategy (e.g. speculative decoding with a draft)."""
        with self._lock:
            self._strategy_factory = strategy
            if self.cache.max_len < self.model.max_context + cache_slack:
                self.cache = self.model.new_cache(self.model.max_context + cache_slack)
                self._cached_ids, self._cached_under, self._live_twin = [], (), None
                self.prefix_store.clear()

    def encode(self, prompt: Prompt, chat: bool = False, tools: list[dict[str, Any]] | None = None,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of a prompt: text (with the chat template when chat=True), chat messages
        ([{"role", "content"}], always templated) or ids (validated against the vocabulary).
        tools: OpenAI function definitions for the chat template (edgespec.tool_calls);
        template_kwargs: other variables it reads (e.g. {"enable_thinking": False} for Qwen3)."""
        templated = chat if isinstance(prompt, str) else bool(prompt) and all(isinstance(m, dict) for m in prompt)
        if (tools is not None or template_kwargs) and not templated:
            raise ValueError("tools and template variables are read by the chat template: send chat messages "
                             "(or chat=True)")
        if isinstance(prompt, str):
            tok = self._need_tokenizer()
            if chat:
                return tok.apply_chat_template([{"role": "user", "content": prompt}], tools=tools,
                                               template_kwargs=template_kwargs)
            return tok.encode(prompt)
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return self._need_tokenizer().apply_chat_template(items, tools=tools, template_kwargs=template_kwargs)
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise TypeError("prompt must be a string, a list of token ids or a list of chat messages")
        vocab = self.model.config.vocab_size
        bad = [i for i in items if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is out of range for a vocabulary of {vocab}")
        return items

    def _grammar_state(self, config: GenerationConfig) -> Any:
        from .structured import GrammarState  # noqa: PLC0415 - llguidance only for structured output

        tok = self.tokenizer
        if tok is None:
            raise ValueError("structured output needs the model's tokenizer (this model was loaded without one)")
        if tok.grammar_tokenizer is None:  # slow to build: once per tokenizer
            tok.grammar_tokenizer = GrammarState.tokenizer_for(tok.hf, self.model.config.vocab_size)
        return GrammarState(config.grammar, tok.grammar_tokenizer)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model was loaded without a tokenizer: pass token ids")
        return self.tokenizer

    def generate(self, prompt: Prompt, config: GenerationConfig | None = None, chat: bool = False,
                 **settings: Any) -> GenerationResult:
        """Generate a completion. settings are GenerationConfig fields (max_new_tokens, temperature, ...)."""
        result = None
        for event in self.stream(prompt, config, chat=chat, **settings):
            result = event.result or result
        assert result is not None
        return result

    def stream(self, prompt: Prompt, config: GenerationConfig | None = None, chat: bool = False,
               cancel: Callable[[], bool] | None = None, **settings: Any) -> Iterator[StreamEvent]:
        """Like generate, but yields text as it is produced; the last event carries the result.
        Closing the iterator early cancels the generation between events. `cancel`, polled between
        prefill chunks and between decode steps (from the generating thread), stops it from
        anywhere, a long prefill included: the last event then has finish_reason "cancelled" and
        the tokens generated so far."""
        config = (config or GenerationConfig(**settings)).validate()
        if cancel is not None:
            config = replace(config, cancel=cancel)
        ops.validate_logit_bias(config.logit_bias, self.model.config.vocab_size)
        prompt_ids = self.encode(prompt, chat=chat)
        if not prompt_ids:
            raise ValueError("the prompt is empty: at least one token is needed")
        if len(prompt_ids) > self.max_context or (len(prompt_ids) == self.max_context and config.max_new_tokens > 0):
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_context} "
                f"(at least one position must remain for a new token, unless max_new_tokens is 0)")
        budget = min(config.max_new_tokens, self.max_context - len(prompt_ids))
        with self._lock:
            yield from self._run(prompt_ids, config, budget)

    def _run(self, prompt_ids: list[int], config: GenerationConfig, budget: int) -> Iterator[StreamEvent]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        stop_ids = set(config.stop_token_ids)
        if not config.ignore_eos and self.tokenizer is not None:
            stop_ids |= self.tokenizer.stop_token_ids
        stop_ids |= set() if config.ignore_eos else set(self.model.config.eos_token_ids)
        if config.grammar is not None:
            config = replace(config, constraint=self._grammar_state(config))
        text_out = _TextStopper(self.tokenizer, config.stop)
        generated: list[int] = []
        logprobs: list[TokenLogprob] | None = [] if config.logprobs is not None else None
        finish = "length"
        if budget == 0 and config.prompt_logprobs is None:
            yield StreamEvent("", [], GenerationResult("", [], finish, stats, logprobs))
            return
        device = self.model.device
        reuse = self._reusable_prefix(prompt_ids, config)
        swap_start = time.perf_counter()
        with torch.inference_mode():  # a drafter's cache is an inference tensor
            reuse = self._swap_parked(prompt_ids, config, reuse)
        swap_s = time.perf_counter() - swap_start  # part of the time to first token
        self.cache.length = reuse
        self.cache.plan_span(len(prompt_ids) + budget)
        strategy = self._strategy_factory(self.model, self.cache)
        # Every token the strategy commits, in cache order (slot i holds sequence[i]'s K/V for i
        # below cache.length, whatever ends the generation: a stop, an error, a closed stream).
        sequence = list(prompt_ids)
        self._cached_ids = []
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                # This generation writes the slots from those begin() keeps on (at most `reuse`; fewer
                # where a drafter kept fewer): the twin then holds the live cache's slots below them.
                twin, self._live_twin = self._live_twin, None
                try:
                    tokens = strategy.begin(prompt_ids, config, budget, reuse=reuse)
                except GenerationCancelled:
                    yield StreamEvent("", [], GenerationResult("", [], "cancelled", stats, logprobs))
                    return
                sequence.extend(tokens)
                stats.cached_tokens = strategy.cached_tokens  # a drafter may keep fewer slots
                if twin is not None and strategy.cached_tokens:
                    self._live_twin = twin.head(strategy.cached_tokens)
                prompt_logprobs = strategy.prompt_logprobs if config.prompt_logprobs is not None else None
                _synchronize(device)
                stats.prefill_s = time.perf_counter() - t0 + swap_s
                if prompt_logprobs is not None:
                    yield StreamEvent("", [], logprobs=[] if logprobs is not None else None,
                                      prompt_logprobs=prompt_logprobs)
                self.model.reset_stats()  # model statistics (BlockFFN sparsity) describe the decode steps
                t0 = time.perf_counter()
                while budget > 0:  # budget 0: a prompt scored, nothing generated
                    accepted: list[int] = []
                    for tok in tokens:
                        if tok in stop_ids:
                            finish = "stop"
                            break
                        accepted.append(tok)
                        if len(generated) + len(accepted) >= budget:
                            break
                    generated.extend(accepted)
                    step_logprobs = [] if logprobs is not None else None
                    if logprobs is not None and accepted:
                        rows = strategy.token_logits[:len(accepted)]
                        step_logprobs = read_logprobs(rows, torch.tensor(accepted, device=rows.device),
                                                      config.logprobs)
                        logprobs.extend(step_logprobs)
                    delta, stopped = text_out.add(accepted)
                    if stopped:
                        finish = "stop"
                    if delta or accepted:
                        yield StreamEvent(delta, accepted, logprobs=step_logprobs)
                    if config.constraint is not None and config.constraint.done:
                        finish = "stop"  # the grammar is complete and allows no further token
                    if finish == "stop" or stopped or len(generated) >= budget:
                        break
                    if config.cancel is not None and config.cancel():
                        finish = "cancelled"
                        break
                    tokens = strategy.step()
                    sequence.extend(tokens)
                    stats.steps += 1
                _synchronize(device)
                stats.decode_s = time.perf_counter() - t0
            tail = text_out.flush()
            if tail:
                yield StreamEvent(tail, [], logprobs=[] if logprobs is not None else None)
            stats.new_tokens = len(generated)
            stats.extra.update(self.model.stats())
            stats.extra.update(getattr(strategy, "stats", lambda: {})())
            result = GenerationResult(text_out.text, generated, finish, stats, logprobs, prompt_logprobs)
            yield StreamEvent("", [], result)
        finally:
            self._cached_ids = sequence[:self.cache.length]
            self._cached_under = self._cache_state()

    def _cache_state(self) -> tuple[Any, ...]:
        """What cached K/V depend on beyond their tokens: the cache they sit in (set_strategy forgets
        the state when it replaces the cache, so an id cannot be reused unnoticed), and for an
        InfLLM-v2 model the attention mode (dense and sparse layers give later layers other K/V)."""
        return (id(self.cache), self.model.sparse.mode if self.model.sparse is not None else None)

    def _swap_parked(self, prompt_ids: list[int], config: GenerationConfig, reuse: int) -> int:
        """Before this prompt overwrites committed slots, park the live sequence; when a parked one
        is worth at least MIN_GAIN_TOKENS more prompt tokens than the live one, bring it back
        instead. A sequence is worth the prompt tokens whose slots it holds, under speculation no
        more than its drafter keeps (the target recomputes what the drafter must). Returns the prompt
        tokens whose slots the target's cache then holds. Not for InfLLM-v2 models (their
        compressed keys follow the live sequence), nor when prefix caching is off. A request for
        prompt log-probabilities prefills its whole prompt: it parks the live sequence but restores
        none."""
        store = self.prefix_store
        if not self.prefix_caching or store.budget <= 0 or self.model.sparse is not None:
            return reuse
        under = self._cache_state()
        drafter = getattr(self._strategy_factory, "drafter", None)

        def worth(entry: Parked | None, tokens: int) -> int:
            if drafter is None:
                return tokens
            state = entry.state_of(drafter) if entry is not None else None
            if state is not None:
                return min(tokens, drafter.parked_reusable(state, prompt_ids))
            return min(tokens, drafter.reusable(prompt_ids))  # the drafter keeps its live slots

        entry = None
        if config.prompt_logprobs is None:
            index, value, kept = store.best(prompt_ids[:-1], under, worth)
            if index >= 0 and value >= worth(None, reuse) + MIN_GAIN_TOKENS:
                entry = store.take(index)
        if self._cached_under != under:
            self._live_twin = None
        elif len(self._cached_ids) - reuse >= MIN_GAIN_TOKENS or entry is not None:
            copy = SlotCopy.of(self.cache, len(self._cached_ids), share=self._live_twin)
            parked = Parked(list(self._cached_ids), copy, under)
            drafted = drafter.park() if hasattr(drafter, "park") else None
            if drafted is not None:
                parked.drafter, (parked.drafter_state, parked.drafter_bytes) = weakref.ref(drafter), drafted
            store.park(parked)
            self._live_twin = copy
        if entry is None:
            return reuse
        entry.target.restore(self.cache, kept)
        self._live_twin = entry.target  # _run keeps the slots the generation keeps
        self._cached_ids = entry.ids[:kept]
        state = entry.state_of(drafter)
        if state is not None:
            drafter.unpark(state)
        return kept

    def _reusable_prefix(self, prompt_ids: list[int], config: GenerationConfig) -> int:
        """How many leading prompt tokens' K/V the cache already holds (at most all but the last:
        the prefill must compute the last token's logits)."""
        if not self.prefix_caching or config.prompt_logprobs is not None or self._cached_under != self._cache_state():
            return 0
        return common_prefix(self._cached_ids, prompt_ids[:-1])


class _TextStopper:
    """Detokenises incrementally and applies stop strings: text that might be the start of a stop
    string is held back until it is known not to be one."""

    def __init__(self, tokenizer: Tokenizer | None, stop: Sequence[str]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.stop = list(stop)
        self.full = ""      # all decoded text
        self.emitted = 0    # characters of `full` already handed out
        self.text = ""      # the final text (set by flush)

    def add(self, ids: list[int]) -> tuple[str, bool]:
        if self.detok is None:
            return "", False
        self.full += self.detok.add(ids)
        for s in self.stop:
            idx = self.full.find(s, max(0, self.emitted - len(s) + 1))
            if idx != -1:
                self.full = self.full[:idx]
                return self._emit(len(self.full)), True
        hold = max((partial_suffix(self.full, s) for s in self.stop), default=0)
        return self._emit(len(self.full) - hold), False

    def flush(self) -> str:
        """Release held-back text at the end of a generation that did not hit a stop string."""
        self.text = self.full
        return self._emit(len(self.full))

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        delta = self.full[self.emitted:upto]
        self.emitted = upto
        return delta
