"""`edgespec serve`: the OpenAI-compatible HTTP server (needs the `server` extra: fastapi, uvicorn)."""
from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..reasoning import REASONING_FORMATS
from ..tool_calls import FORMATS
from .common import add_model_options, load_llm

API_KEY_ENV = "EDGESPEC_API_KEY"


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics. "
                                   "Stops gracefully on SIGINT/SIGTERM.")
    add_model_options(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 exposes it to the network)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV}; "
                        f"the variable keeps the key out of the process list)")
    s.add_argument("--served-model-name", default=None,
                   help="model id reported by /v1/models and in responses (default: the model file or directory name)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests admitted at once, running + waiting; more are answered 429 (default: 64)")
    s.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    s.add_argument("--max-request-bytes", type=int, default=4 << 20, help="largest request body (default: 4 MiB)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may still run after SIGINT/SIGTERM before they are cancelled")
    s.add_argument("--tool-call-format", default="auto", choices=["auto", *FORMATS],
                   help="how the model writes tool calls (default: auto, read from its chat template)")
    s.add_argument("--reasoning-format", default="auto", choices=REASONING_FORMATS,
                   help="think: return a chat reply's <think> section as reasoning_content, apart from the content; "
                        "none: leave it in the content (default: auto, think when the chat template teaches it)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=run_serve)


def served_name(model: str) -> str:
    name = Path(model.rstrip("/")).name or model
    return name[:-5] if name.lower().endswith(".gguf") else name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    # Import here: the server extra is optional and the other subcommands must not need it.
    from ..server import ServerSettings, run_server  # noqa: PLC0415

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    settings = ServerSettings(model_name=args.served_model_name or served_name(args.model), api_key=args.api_key,
                              max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                              max_tokens_limit=args.max_tokens_limit,
                              shutdown_timeout=args.shutdown_timeout,
                              tool_call_format=args.tool_call_format,
                              reasoning_format=args.reasoning_format).validate()
    if not _is_loopback(args.host) and settings.api_key is None:
        print(f"edgespec: warning: serving on {args.host} without --api-key: anyone who can reach this port can use it",
              file=sys.stderr)
    llm = load_llm(args)
    run_server(llm, settings, host=args.host, port=args.port, log_level=args.log_level)
    return 0
