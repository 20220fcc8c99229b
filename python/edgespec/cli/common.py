"""Options shared by every subcommand that loads a model, and the loading they drive."""
from __future__ import annotations

import argparse
from typing import Callable

import torch

from ..engine import LLM
from ..generation import GenerationConfig

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Other features (speculative decoding, ...) add their options and an LLM configuration hook here:
# (parser) -> None and (llm, args) -> None.
MODEL_OPTION_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []
LLM_SETUP_HOOKS: list[Callable[[LLM, argparse.Namespace], None]] = []


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a Hugging Face model directory, a .gguf file, or 'demo' (SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's maximum)")
    for hook in MODEL_OPTION_HOOKS:
        hook(p)


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction as probable as the most likely one (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide positive logits of tokens already in the text by this, multiply negative ones (1 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logits of tokens generated so far, in [-2, 2] (0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a token's count so far in the output, in [-2, 2] (0 = off)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="TOKEN=BIAS",
                   help="add BIAS (-100 to 100) to the logit of token id TOKEN (repeatable; 100 forces, -100 bans)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _logit_bias(items: list[str]) -> dict[int, float]:
    bias = {}
    for item in items:
        token, _, value = item.partition("=")  # no "=": value is "", which float() refuses
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias takes TOKEN=BIAS (a token id and a number), got {item!r}") from None
    return bias


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            logit_bias=_logit_bias(args.logit_bias), seed=args.seed, stop=tuple(args.stop)).validate()


def load_llm(args: argparse.Namespace) -> LLM:
    device = None if args.device == "auto" else args.device
    llm = LLM.load(args.model, device=device, dtype=DTYPES[args.dtype], max_context=args.max_context, progress=True)
    for hook in LLM_SETUP_HOOKS:
        hook(llm, args)
    return llm
