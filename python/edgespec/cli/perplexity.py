"""`edgespec perplexity`: score a text file, to compare a quantized, sparse or converted model with its original."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_options, load_llm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("perplexity", help="perplexity of a text file under a model (quality check)",
                       description="Score a UTF-8 text with the model in overlapping windows and print its "
                                   "perplexity. Compare models on the same text, window and stride.")
    add_model_options(p)
    p.add_argument("file", help="a UTF-8 text file, or '-' for stdin")
    p.add_argument("--window", type=int, default=None,
                   help="tokens per forward pass (default: min(2048, the context))")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts; each scored token has at least window - stride tokens "
                        "of context (default: window / 2)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    p.set_defaults(func=run_perplexity)


def _check(args: argparse.Namespace) -> None:
    for name in ("window", "stride", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")


def run_perplexity(args: argparse.Namespace) -> int:
    from ..perplexity import perplexity  # noqa: PLC0415

    _check(args)  # before the model loads, not seconds after
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{args.file}: cannot read UTF-8 text ({exc})") from None
    llm = load_llm(args)
    result = perplexity(llm, text, window=args.window, stride=args.stride, max_tokens=args.max_tokens,
                        progress=True)
    if args.json:
        print(json.dumps({"model": llm.name, **result.as_dict()}))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({result.windows} window(s) of "
              f"{result.window}, stride {result.stride}; {result.seconds:.1f} s)")
    return 0
