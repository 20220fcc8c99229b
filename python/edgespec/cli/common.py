"""Options shared by every subcommand that loads a model, and the loading they drive."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

import torch

from ..engine import LLM
from ..generation import GenerationConfig
from ..structured import Grammar

DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GGUF_WEIGHTS = {"auto": None, "4bit": True, "dense": False}

# Other features (speculative decoding, ...) add their options and an LLM configuration hook here:
# (parser) -> None and (llm, args) -> None.
MODEL_OPTION_HOOKS: list[Callable[[argparse.ArgumentParser], None]] = []
LLM_SETUP_HOOKS: list[Callable[[LLM, argparse.Namespace], None]] = []


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a Hugging Face model directory, a .gguf file, or 'demo' (SmolLM2-135M-Instruct, fetched on first use)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to run (default: cuda if present)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="compute dtype (default: bf16 on cuda and on CPUs with native bf16 dot products, else fp32)")
    p.add_argument("--max-context", type=int, default=None, help="KV cache positions (default: the model's maximum)")
    p.add_argument("--gguf-weights", default="auto", choices=list(GGUF_WEIGHTS),
                   help="GGUF Q4_0/Q4_1/Q4_K weights: 4bit keeps them 4-bit, dense dequantises them to the compute "
                        "dtype (default auto: 4-bit where a 4-bit GEMM runs them, the CUDA kernel or, in bf16, "
                        "torch's CPU int4 kernel; on a CPU that decodes about 2x faster and prefills long prompts "
                        "about 1.3x slower than dense)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="prefill every prompt whole (default: reuse the K/V of the previous generation's tokens "
                        "that the prompt starts with)")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template to use instead of the model's (e.g. one that renders tools)")
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
    g = p.add_argument_group("structured output (needs llguidance: pip install \"edgespec[structured]\")")
    one = g.add_mutually_exclusive_group()
    one.add_argument("--json", action="store_true", help="the output is a JSON object")
    one.add_argument("--json-schema", metavar="SCHEMA", help="the output is JSON valid under SCHEMA (a file or JSON text)")
    one.add_argument("--regex", metavar="PATTERN", help="the output matches the regular expression PATTERN")
    one.add_argument("--choice", action="append", metavar="TEXT", help="the output is one of these texts (repeatable)")
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


def _grammar(args: argparse.Namespace) -> Grammar | None:
    if args.json:
        return Grammar.json()
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            try:
                text = Path(text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"--json-schema: {args.json_schema} is neither JSON text nor a readable file ({exc})") from None
        return Grammar.json(text)
    if args.regex is not None:
        return Grammar.regex(args.regex)
    if args.choice:
        return Grammar.choice(args.choice)
    return None


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            logit_bias=_logit_bias(args.logit_bias), seed=args.seed, stop=tuple(args.stop),
                            grammar=_grammar(args)).validate()


def load_llm(args: argparse.Namespace) -> LLM:
    device = None if args.device == "auto" else args.device
    template = None
    if args.chat_template is not None:  # read before the (slow) load, so a wrong path fails at once
        try:
            template = Path(args.chat_template).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--chat-template: cannot read {args.chat_template} ({exc})") from None
    llm = LLM.load(args.model, device=device, dtype=DTYPES[args.dtype], max_context=args.max_context, progress=True,
                   quantized=GGUF_WEIGHTS[args.gguf_weights])
    llm.prefix_caching = args.prefix_caching
    if template is not None:
        if llm.tokenizer is None:
            raise ValueError("--chat-template: this model was loaded without a tokenizer")
        llm.tokenizer.set_chat_template(template)
    for hook in LLM_SETUP_HOOKS:
        hook(llm, args)
    return llm
