"""OpenAI-compatible HTTP server: `edgespec serve` (FastAPI + uvicorn, one generation worker thread).

Importing this package needs the `server` extra (fastapi, uvicorn, prometheus-client); the rest of edgespec
does not.
"""
from .app import ServerSettings, create_app
from .errors import APIError
from .runner import GracefulServer, make_server, run_server
from .worker import GenerationWorker, Job

__all__ = ["APIError", "GenerationWorker", "GracefulServer", "Job", "ServerSettings", "create_app", "make_server",
           "run_server"]
