"""Running the app under uvicorn with a graceful shutdown.

On SIGINT/SIGTERM uvicorn stops listening and waits for open responses; `GracefulServer` first
tells the worker to admit nothing more and to cancel whatever is still running after the grace
period, so waiting for the open responses ends: finished requests complete normally, cancelled ones
end with an OpenAI-format error (a 503, or an error event in a stream).
"""
from __future__ import annotations

import signal
import socket
import threading
from typing import Any

import uvicorn

from ..engine import LLM
from .app import ServerSettings, create_app
from .worker import GenerationWorker

# uvicorn's own hard stop after our grace period, for anything the worker's cancellation misses.
_BACKSTOP_S = 5.0


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains the generation worker when shutdown begins."""

    def __init__(self, config: uvicorn.Config, worker: GenerationWorker, grace_s: float) -> None:
        super().__init__(config)
        self.worker = worker
        self.grace_s = grace_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.worker.drain(self.grace_s)
        await super().shutdown(sockets)


def make_server(llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info", **uvicorn_options: Any) -> GracefulServer:
    """A configured server for `llm`; call `.run()` (blocking) or `await .serve()`."""
    app = create_app(llm, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=settings.shutdown_timeout + _BACKSTOP_S, **uvicorn_options)
    return GracefulServer(config, app.state.worker, settings.shutdown_timeout)


def run_server(llm: LLM, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully and return normally."""
    server = make_server(llm, settings, host, port, log_level)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # After a signal-initiated shutdown uvicorn re-raises the signal against the handlers that were
    # installed before it started, which would turn a clean shutdown into death by SIGTERM (or a
    # KeyboardInterrupt). Installing no-op handlers first makes the graceful path end in a normal return.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
