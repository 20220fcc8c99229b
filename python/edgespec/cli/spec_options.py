"""Speculative-decoding options for every subcommand that loads a model (generate, chat, serve, ...).

Importing this module registers them through cli.common's MODEL_OPTION_HOOKS / LLM_SETUP_HOOKS.
"""
from __future__ import annotations

import argparse

from ..engine import LLM
from .common import LLM_SETUP_HOOKS, MODEL_OPTION_HOOKS


def add_spec_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding")
    on_off = g.add_mutually_exclusive_group()
    on_off.add_argument("--draft", default=None,
                        help="draft for speculative decoding: an EAGLE-1/2/3 head directory, a small model with "
                             "the same tokenizer (directory, .gguf), or 'ngram' (prompt lookup: drafts what followed "
                             "the last few tokens earlier in the prompt or output; no draft model). Default: the head "
                             "shipped for --model demo, else none")
    on_off.add_argument("--no-draft", action="store_true", help="turn speculative decoding off (plain decoding)")
    g.add_argument("--tree-size", type=int, default=None, help="draft tokens verified per step (default: per device)")
    g.add_argument("--depth", type=int, default=None, help="maximum draft depth (default: per device)")
    g.add_argument("--topk", type=int, default=None, help="children per expanded node; 1 drafts a chain")
    g.add_argument("--lookup", type=int, default=None, metavar="N",
                   help="with a draft model or head: also draft up to N tokens by prompt lookup at each step, "
                        "grafted onto its tree where the prompt or output repeats (default: per device, 0 on a GPU; 0: off)")
    g.add_argument("--frspec-vocab", default=None,
                   help="FR-Spec vocabulary file restricting the draft LM head ('none': full vocabulary; "
                        "default: the one the head names)")


def setup_speculation(llm: LLM, args: argparse.Namespace) -> None:
    from ..spec import enable_speculation, speculation_info  # noqa: PLC0415

    tree_opts = {"tree_size": args.tree_size, "depth": args.depth, "topk": args.topk, "lookup": args.lookup}
    if args.no_draft:
        given = [f"--{k.replace('_', '-')}" for k, v in tree_opts.items() if v is not None]
        if given or args.frspec_vocab is not None:
            raise ValueError(f"--no-draft turns speculation off; drop {' '.join(given) or '--frspec-vocab'}")
        enable_speculation(llm, None)
        return
    if args.draft is None and args.frspec_vocab is None and all(v is None for v in tree_opts.values()):
        return  # keep what LLM.load chose (the shipped head for 'demo', plain decoding otherwise)
    draft = args.draft
    if draft is None:
        if speculation_info(llm) is None:
            raise ValueError("--tree-size/--depth/--topk/--lookup/--frspec-vocab need a draft: pass --draft")
        draft = "auto"
    enable_speculation(llm, draft, frspec_vocab=args.frspec_vocab, **tree_opts)


MODEL_OPTION_HOOKS.append(add_spec_options)
LLM_SETUP_HOOKS.append(setup_speculation)
