"""The `edgespec` command line. Each subcommand lives in its own module with a `register` function."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import EdgespecError

# Subcommand modules, in the order `edgespec --help` lists them.
SUBCOMMANDS = ["generate", "serve", "perplexity", "quantize", "build_vocab", "train_draft"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgespec", description="Fast single-GPU LLM inference with speculative decoding.")
    parser.add_argument("--version", action="store_true", help="print the version and build information")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    importlib.import_module(f"{__name__}.spec_options")  # registers --draft & co. before any parser is built
    importlib.import_module(f"{__name__}.sparse_options")  # registers --sparse
    importlib.import_module(f"{__name__}.graph_options")  # registers --cuda-graphs
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from .. import build_info  # noqa: PLC0415

        print(build_info())
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (EdgespecError, ValueError, FileNotFoundError, RuntimeError, TypeError) as exc:
        print(f"edgespec: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
