"""--cuda-graphs for every subcommand that loads a model: replay decode and speculative steps as
CUDA graphs (edgespec.cuda_graphs; the same switch as EDGESPEC_CUDA_GRAPHS=1, opt-in until measured).

Importing this module registers it through cli.common's MODEL_OPTION_HOOKS / LLM_SETUP_HOOKS.
"""
from __future__ import annotations

import argparse
import os

from ..engine import LLM
from .common import LLM_SETUP_HOOKS, MODEL_OPTION_HOOKS


def add_graph_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay each decode step, and each speculative step's drafting, verification and "
                        "catch-up, as CUDA graphs (GPU; opt-in, same as $EDGESPEC_CUDA_GRAPHS=1)")


def setup_graphs(llm: LLM, args: argparse.Namespace) -> None:
    if not getattr(args, "cuda_graphs", False):
        return
    model = llm.model
    if model.device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device; {llm.name} runs on {model.device}")
    # The strategies read the switch when each generation starts (cuda_graphs.requested()).
    os.environ["EDGESPEC_CUDA_GRAPHS"] = "1"


MODEL_OPTION_HOOKS.append(add_graph_options)
LLM_SETUP_HOOKS.append(setup_graphs)
