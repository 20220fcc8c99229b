"""Prometheus metrics of one server, served on /metrics in the text format Prometheus scrapes.

Each generation the worker completes is recorded: its tokens (prompt, of them those the prefix
cache supplied, generated), its decode steps (generated tokens per step is what speculation gains),
its finish reason, and its times as the client lives them: waiting in the queue, to the first token
(queue and prefill), per output token after the first, and in all. The queue's state and the
worker's outcome counts (completed, cancelled, failed, rejected with a 429) are read at each scrape.
Every HTTP response is counted by route and status code (ResponseCounter), so requests refused
before any generation (400 for a bad field, 401 without the key, 404) show too.

The metrics live in the server's own registry, not prometheus_client's global one: two servers in
one process (as in the tests) keep theirs apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..engine import GenerationResult
    from .worker import GenerationWorker

# Seconds. A first token comes in milliseconds (a short prompt on a GPU) to minutes (a long prompt
# on a CPU, or a long queue); an output token in about a millisecond (a small model on a GPU) to a
# tenth of a second (a large one on a CPU).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.0)


@dataclass(frozen=True)
class JobTimes:
    """Monotonic times of one generation: admitted, started by the worker, first token out, done."""

    submitted: float
    started: float
    first_token: float | None
    finished: float


class ServerMetrics:
    def __init__(self, worker: "GenerationWorker") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.prompt_tokens = Counter("edgespec_prompt_tokens", "Prompt tokens of completed generations", registry=r)
        self.cached_tokens = Counter("edgespec_prompt_tokens_cached",
                                     "Prompt tokens whose K/V the prefix cache supplied", registry=r)
        self.generation_tokens = Counter("edgespec_generation_tokens", "Tokens generated", registry=r)
        self.decode_steps = Counter("edgespec_decode_steps", "Target forward passes after the prefill (a "
                                    "speculative step commits one token or more)", registry=r)
        self.finished = Counter("edgespec_generations_finished", "Completed generations by finish reason",
                                ["finish_reason"], registry=r)
        self.queue_wait = Histogram("edgespec_queue_wait_seconds", "From admission to the start of generation",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.first_token = Histogram("edgespec_time_to_first_token_seconds",
                                     "From admission to the first generated token (queue and prefill)",
                                     buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram("edgespec_time_per_output_token_seconds",
                                   "Time per generated token after the first", buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("edgespec_generation_duration_seconds", "From admission to the last token",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.responses = Counter("edgespec_http_responses", "HTTP responses by route (the path template; "
                                 "'unmatched' for paths the server does not serve) and status code",
                                 ["route", "status"], registry=r)
        r.register(_QueueCollector(worker))

    def record(self, result: "GenerationResult", times: JobTimes) -> None:
        """One completed generation."""
        stats = result.stats
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generation_tokens.inc(len(result.token_ids))
        self.decode_steps.inc(stats.steps)
        self.finished.labels(result.finish_reason).inc()
        self.queue_wait.observe(times.started - times.submitted)
        self.duration.observe(times.finished - times.submitted)
        if times.first_token is not None:
            self.first_token.observe(times.first_token - times.submitted)
            if len(result.token_ids) > 1:
                self.per_token.observe((times.finished - times.first_token) / (len(result.token_ids) - 1))

    def exposition(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ResponseCounter:
    """ASGI middleware counting each HTTP response in ServerMetrics.responses. It only watches the
    status that the app sends (no wrapping of the body), so streamed responses and the detection of
    a client that hangs up work as without it; a response the app never started (an unhandled
    error, answered by the server's outermost layer) counts as 500."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Awaitable[Any]],
                       send: Callable[..., Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            route = scope.get("route")  # set by the router when a route matched
            self.metrics.responses.labels(getattr(route, "path", "unmatched"),
                                          str(status[0]) if status else "500").inc()


class _QueueCollector(Collector):
    """The worker's queue and outcome counts, read when Prometheus scrapes."""

    def __init__(self, worker: "GenerationWorker") -> None:
        self.worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = self.worker.snapshot()
        for name, value, help_text in [
                ("running", int(state["running"]), "Generations running (0 or 1: one at a time)"),
                ("waiting", state["waiting"], "Generations admitted and waiting"),
                ("capacity", state["capacity"], "Generations that may be admitted at once")]:
            yield GaugeMetricFamily(f"edgespec_queue_{name}", help_text, value=value)
        outcomes = CounterMetricFamily("edgespec_generations", "Generations by outcome (rejected: requests "
                                       "refused with a 429, the queue full)", labels=["outcome"])
        for outcome in ("completed", "cancelled", "failed", "rejected"):
            outcomes.add_metric([outcome], state[outcome])
        yield outcomes
