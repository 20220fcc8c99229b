"""The generation worker: one thread owns the LLM and runs admitted requests one at a time.

The engine generates one sequence at a time (one KV cache), so requests are serialised here rather
than interleaved: nothing can corrupt another request's KV state, and the event loop never runs
model code. Requests are admitted into a bounded set of slots (the running one plus those waiting);
when every slot is taken a new request gets a 429 at once instead of waiting without bound.

Thread bridging: the worker pushes each engine event into the request's asyncio.Queue with
`loop.call_soon_threadsafe`, so the HTTP side just awaits the queue. Cancellation goes the other way
through a threading.Event that the worker checks after every engine event (every decoding step);
closing the engine's stream iterator then releases the engine cleanly.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Union

from ..engine import LLM, GenerationResult, StreamEvent
from ..generation import GenerationConfig
from .errors import APIError, queue_full, shutting_down
from .metrics import JobTimes, ServerMetrics

logger = logging.getLogger("edgespec.server")


@dataclass(frozen=True)
class Finished:
    """The last event of a job that ran to completion."""

    result: GenerationResult


@dataclass(frozen=True)
class Failed:
    """The last event of a job that raised: the error to report to the client."""

    error: APIError


@dataclass(frozen=True)
class Cancelled:
    """The last event of a job cancelled by the server (shutdown) or its client (disconnect)."""

    reason: str


JobEvent = Union[StreamEvent, Finished, Failed, Cancelled]


class Job:
    """One admitted request: its prompt and settings, and the queue its events arrive on.

    prompt_ids: token ids (already validated against the context length by the HTTP layer).
    """

    def __init__(self, prompt_ids: list[int], config: GenerationConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids = prompt_ids
        self.config = config
        self.submitted = time.monotonic()
        self.events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._loop = loop
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def post(self, event: JobEvent) -> bool:
        """Deliver an event to the request's coroutine from any thread; False if its loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return False
        return True


class GenerationWorker:
    """Owns `llm` and runs admitted jobs first-in first-out on one thread.

    capacity: how many jobs may be admitted at once (the running one plus the waiting ones).
    """

    def __init__(self, llm: LLM, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the queue capacity must be at least 1 request, got {capacity}")
        self.llm = llm
        self.capacity = capacity
        # One lock guards the queue, the admitted set and the counters; RLock because cancel_all
        # calls cancel while holding it.
        self._cond = threading.Condition(threading.RLock())
        self._pending: deque[Job] = deque()
        self._admitted: set[Job] = set()   # jobs holding a slot: waiting, or running and not cancelled
        self._running: Job | None = None
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._drain_timer: threading.Timer | None = None
        self.counters = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.metrics = ServerMetrics(self)

    def start(self) -> None:
        if self._thread is not None:
            return
        # Daemon: a running step (one prefill chunk) cannot be interrupted, and it must not keep a
        # stopping process alive.
        self._thread = threading.Thread(target=self._serve, name="edgespec-generation", daemon=True)
        self._thread.start()

    def submit(self, *jobs: Job) -> None:
        """Admit all `jobs` (one request's generations, run in this order) or none of them: raise the
        APIError to answer with (429 queue full, 503 shutting down)."""
        with self._cond:
            if not self._accepting:
                raise shutting_down()
            if len(self._admitted) + len(jobs) > self.capacity:
                self.counters["rejected"] += 1
                raise queue_full(self.capacity)
            self._admitted.update(jobs)
            self._pending.extend(jobs)
            self._cond.notify()

    def cancel(self, job: Job, reason: str) -> None:
        """Cancel `job` wherever it is and free its slot at once; a no-op for a finished job.

        A running job stops after the engine's current step or prefill chunk (the engine polls the
        job's cancel flag between them).
        """
        with self._cond:
            if job not in self._admitted:
                return
            self._admitted.discard(job)
            if job in self._pending:
                self._pending.remove(job)
            self.counters["cancelled"] += 1
            job._cancel.set()
            job.post(Cancelled(reason))

    def cancel_all(self, reason: str) -> None:
        with self._cond:
            for job in list(self._admitted):
                self.cancel(job, reason)

    def drain(self, grace_s: float) -> None:
        """Stop admitting jobs; let admitted ones run for up to `grace_s` seconds, then cancel them."""
        with self._cond:
            self._accepting = False
        if grace_s <= 0:
            self.cancel_all("the server is shutting down")
            return
        self._drain_timer = threading.Timer(grace_s, self.cancel_all, args=("the server is shutting down",))
        self._drain_timer.daemon = True
        self._drain_timer.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Cancel everything and end the worker thread (waiting up to `timeout_s` for the current step)."""
        with self._cond:
            self._accepting = False
            self._stopped = True
            self._cond.notify_all()
        self.cancel_all("the server is shutting down")
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.warning("the generation thread did not stop within %.1f s (a long prefill?)", timeout_s)

    def snapshot(self) -> dict[str, Any]:
        """Queue state and counters (served on /health)."""
        with self._cond:
            return {"accepting": self._accepting, "running": self._running is not None,
                    "waiting": len(self._pending), "admitted": len(self._admitted), "capacity": self.capacity,
                    **self.counters}

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                job = self._pending.popleft()
                self._running = job
            try:
                self._generate(job)
            except Exception:  # noqa: BLE001 - the worker thread must survive anything a request does
                logger.exception("the generation worker caught an unexpected error")
                self.cancel(job, "internal error")
            finally:
                with self._cond:
                    self._running = None
                del job  # do not keep the last request (and its queued events) alive while idle

    def _generate(self, job: Job) -> None:
        final: JobEvent | None = None
        outcome = "completed"
        started, first_token = time.monotonic(), None
        # The cancel flag also stops a long prefill between its chunks (a client gone, a shutdown).
        stream = self.llm.stream(job.prompt_ids, job.config, cancel=job._cancel.is_set)
        try:
            for event in stream:
                if job.cancelled:
                    return
                if first_token is None and event.token_ids:
                    first_token = time.monotonic()
                if event.result is not None:
                    # Held back until the bookkeeping below: once the client sees the end, the slot
                    # is already free and a cancel from its side is a no-op.
                    final = Finished(event.result)
                    if event.text or event.token_ids:
                        job.post(StreamEvent(event.text, event.token_ids))
                elif not job.post(event):
                    self.cancel(job, "the client went away")
                    return
        except ValueError as exc:  # bad input the HTTP layer did not catch (e.g. from a decoding strategy)
            final, outcome = Failed(APIError(400, str(exc))), "failed"
        except Exception as exc:  # noqa: BLE001 - one broken request must not take the server down
            logger.exception("generation failed")
            final, outcome = Failed(APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                             type="server_error")), "failed"
        finally:
            stream.close()
        with self._cond:
            if job not in self._admitted:  # cancelled while the last step ran
                return
            self._admitted.discard(job)
            if final is None:  # the engine ended without a result: report it rather than hang the client
                final, outcome = Failed(APIError(500, "generation ended without a result", type="server_error")), "failed"
            self.counters[outcome] += 1
            job.post(final)
        if isinstance(final, Finished):
            self.metrics.record(final.result, JobTimes(job.submitted, started, first_token, time.monotonic()))
