"""--sparse for every subcommand that loads a model: the dense/sparse switch of InfLLM-v2 block-sparse
attention (MiniCPM4-style models with a sparse_config).

Importing this module registers it through cli.common's MODEL_OPTION_HOOKS / LLM_SETUP_HOOKS.
"""
from __future__ import annotations

import argparse

from ..engine import LLM
from ..models.sparse import MODES
from .common import LLM_SETUP_HOOKS, MODEL_OPTION_HOOKS


def add_sparse_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sparse", default=None, choices=MODES,
                   help="block-sparse attention of models with a sparse_config: auto = sparse for queries whose "
                        "context reaches the config's dense_len (default, or $EDGESPEC_SPARSE), dense = never, "
                        "sparse = every query")


def setup_sparse(llm: LLM, args: argparse.Namespace) -> None:
    mode = getattr(args, "sparse", None)
    if mode is None:
        return
    sparse = llm.model.sparse
    if sparse is None:
        if mode == "sparse":
            raise ValueError(f"--sparse sparse: {llm.name} has no sparse_config, so it has no block-sparse attention")
        return
    sparse.mode = mode


MODEL_OPTION_HOOKS.append(add_sparse_options)
LLM_SETUP_HOOKS.append(setup_sparse)
