"""`edgespec train-draft`: train an EAGLE head for a target by self-distillation on local text."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .common import DTYPES


SELF_PROMPTS = "self-prompts"  # the cache tag of the prompts the model writes itself


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train-draft", help="train an EAGLE draft head for a model on local text (self-distillation)",
                       description="Label local text (and the model's own answers to --prompts) with the target's "
                                   "features and next-token distributions, then train an EAGLE-1/2 head "
                                   "(fc + one decoder layer). Writes config.json + model.safetensors to --out, "
                                   "checkpointing as it goes.")
    t.add_argument("--model", required=True, help="the target: a model directory, a .gguf file or 'demo'")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--dtype", default="auto", choices=list(DTYPES),
                   help="the target's dtype while labelling (default: the inference default, bf16 on capable CPUs)")
    t.add_argument("--data", nargs="+", required=True, help="text files to learn from")
    t.add_argument("--out", required=True, help="output head directory")
    t.add_argument("--prompts", nargs="+", default=[], help="prompt files (.jsonl with 'prompt' and optionally "
                   "'chat': false for a text opening to continue, or one chat prompt per line) the target answers "
                   "or continues itself; its outputs become training data")
    t.add_argument("--max-prompts", type=int, default=200, help="use at most this many prompts per file (default 200)")
    t.add_argument("--val-prompts", nargs="+", default=[],
                   help="validation prompt files (disjoint from --prompts): the target's greedy answers are "
                        "labelled but never trained on; the head's per-depth top-1 agreement with the target on "
                        "them (val_acc1, ... pooled, and val_acc1_<file stem> per file) is reported at every "
                        "checkpoint")
    t.add_argument("--self-prompts", type=int, default=0,
                   help="also answer (greedily) this many chat prompts the model writes itself (its chat template "
                        "up to a user turn, sampled: the Magpie method), a broad prompt set without any prompt "
                        "file; a --cache holding fewer is topped up with new ones")
    t.add_argument("--val-self-prompts", type=int, default=0,
                   help="validation prompts sampled the same way with another seed, distinct from the training ones")
    t.add_argument("--self-prompt-temperature", type=float, default=0.8,
                   help="sampling temperature of the self-written prompts (default 0.8)")
    t.add_argument("--response-tokens", type=int, default=160, help="new tokens per self-generated response")
    t.add_argument("--gen-batch", type=int, default=16, help="prompts answered together (batched decoding)")
    t.add_argument("--responses-per-prompt", type=int, default=1,
                   help="answers per prompt: the first greedy, the others sampled at --gen-temperature")
    t.add_argument("--gen-temperature", type=float, default=0.7)
    t.add_argument("--text-tokens", type=int, default=100_000, help="text tokens to label, spread over --data")
    t.add_argument("--cache", default=None, help="file for the labelled sequences: reused when it exists")
    t.add_argument("--frspec-vocab", default=None,
                   help="FR-Spec vocabulary: restricts the trained LM-head loss and ships with the head")
    t.add_argument("--init", default=None, help="start from this head (same shapes) instead of random weights")
    t.add_argument("--steps", type=int, default=400)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--seq-len", type=int, default=256)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--unroll", type=int, default=3, help="training-time-test draft steps (default 3)")
    t.add_argument("--fuse-layers", type=int, nargs="+", default=[],
                   help="also feed the head the residual streams entering these target layers (EAGLE-3's low "
                        "and mid features, e.g. 2 and L/2), fused into its input feature; the cache is topped up "
                        "with them, and an --init head without them starts with the fusion switched off")
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--train-seed", type=int, default=0)
    t.set_defaults(func=run_train_draft)


def run_train_draft(args: argparse.Namespace) -> int:
    from ..spec.train import (TrainSettings, add_streams, check_fuse_layers, generate_responses,  # noqa: PLC0415
                              label, load_sequences, read_prompts, read_texts, save_sequences, text_windows,
                              train_head)

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                             unroll=args.unroll, checkpoint_every=args.checkpoint_every,
                             seed=args.train_seed, fuse_layers=tuple(args.fuse_layers)).validate()
    layers = settings.fuse_layers
    texts = read_texts(args.data)
    prompt_sets = {Path(f).stem: read_prompts(f)[:args.max_prompts] for f in args.prompts}
    val_stems = [Path(f).stem for f in args.val_prompts]
    if len(prompt_sets) != len(args.prompts) or SELF_PROMPTS in prompt_sets:
        raise ValueError(f"train-draft: prompt files need distinct names other than {SELF_PROMPTS!r} "
                         f"(they tag the cache): {args.prompts}")
    if len(set(val_stems)) != len(val_stems) or SELF_PROMPTS in val_stems:
        raise ValueError(f"train-draft: --val-prompts files need distinct names other than {SELF_PROMPTS!r} "
                         f"(they tag the cache): {args.val_prompts}")
    from ..engine import LLM  # noqa: PLC0415

    device = None if args.device == "auto" else args.device
    llm = LLM.load(args.model, device=device, dtype=DTYPES[args.dtype], max_context=4096, progress=True, draft=None)
    if llm.tokenizer is None:
        raise ValueError(f"{args.model}: train-draft needs the model's tokenizer")
    check_fuse_layers(llm.model, layers)
    t0 = time.time()
    cache = Path(args.cache) if args.cache else None
    seqs = load_sequences(cache) if cache is not None and cache.exists() else []
    if seqs:
        print(f"train-draft: {len(seqs)} labelled sequences from {cache}", file=sys.stderr)
    from tqdm.auto import tqdm  # noqa: PLC0415

    # The cache fills in stages (text windows, then the target's chat responses), so an
    # interrupted run or a run with new prompts only redoes what is missing.
    if not any(s.kind == "text" for s in seqs):
        tok = llm.tokenizer
        windows = text_windows(lambda s: tok.encode(s, add_special_tokens=False), texts, settings.seq_len,
                               args.text_tokens, tok.hf.eos_token_id)
        seqs += [label(llm.model, w, settings.target_topk, "text", layers)
                 for w in tqdm(windows, desc="labelling text")]
        if cache is not None:
            save_sequences(cache, seqs)
    # Chat sequences are tagged with their prompt file and round, so one cache can hold the answers
    # to several prompt sets and only the missing rounds are generated.
    for stem, prompts in prompt_sets.items():
        for r in range(args.responses_per_prompt if prompts else 0):
            tag = f"chat:{stem}:{r}"
            if any(s.kind == tag for s in seqs):
                continue
            temperature = 0.0 if r == 0 else args.gen_temperature
            chats = generate_responses(llm, prompts, args.response_tokens, batch=args.gen_batch,
                                       temperature=temperature, seed=args.train_seed + r)
            seqs += [label(llm.model, c, settings.target_topk, tag, layers)
                     for c in tqdm(chats, desc=f"labelling {stem}")]
            if cache is not None:
                save_sequences(cache, seqs)
    from ..spec.self_prompts import cached_user_prompts  # noqa: PLC0415

    # Self-written prompts: --self-prompts counts them in all, so a cache from an earlier run with
    # fewer is topped up with new ones (another seed, distinct from those it holds).
    self_tag = f"chat:{SELF_PROMPTS}:0"
    wanted = args.self_prompts or args.val_self_prompts
    written = cached_user_prompts(llm.tokenizer, seqs, self_tag) if wanted else []
    if len(written) < args.self_prompts:
        seed = args.train_seed if not written else args.train_seed + 1000 + len(written)
        # A top-up must not write a held-out prompt of an earlier run into the training set.
        held_out = cached_user_prompts(llm.tokenizer, seqs, f"val:{SELF_PROMPTS}")
        new = _sample_prompts(llm, args.self_prompts - len(written), args, seed, exclude=written + held_out)
        chats = generate_responses(llm, new, args.response_tokens, batch=args.gen_batch, temperature=0.0)
        seqs += [label(llm.model, c, settings.target_topk, self_tag, layers)
                 for c in tqdm(chats, desc=f"labelling {SELF_PROMPTS}")]
        if cache is not None:
            save_sequences(cache, seqs)
        written += new
    val_sets = {}
    for stem, file in zip(val_stems, args.val_prompts):
        val_sets[stem] = lambda file=file: read_prompts(file)[:args.max_prompts]
    if args.val_self_prompts:
        # Another seed, and the training prompts excluded: held out by construction.
        val_sets[SELF_PROMPTS] = lambda: _sample_prompts(llm, args.val_self_prompts, args, args.train_seed + 1,
                                                         exclude=written)
    val = []
    for stem, read in val_sets.items():
        tag = f"val:{stem}"
        have = [s for s in seqs if s.kind == tag]
        if not have:
            chats = generate_responses(llm, read(), args.response_tokens, batch=args.gen_batch, temperature=0.0,
                                       seed=args.train_seed)
            have = [label(llm.model, c, settings.target_topk, tag, layers)
                    for c in tqdm(chats, desc=f"labelling val:{stem}")]
            seqs += have
            if cache is not None:
                save_sequences(cache, seqs)
        val += have
    if layers and add_streams(llm.model, seqs, layers) and cache is not None:
        save_sequences(cache, seqs)  # sequences labelled before --fuse-layers, now with the streams
    seqs = [s for s in seqs if not s.kind.startswith("val:")]
    tokens = sum(s.tokens.numel() for s in seqs)
    print(f"train-draft: {len(seqs)} sequences, {tokens:,} tokens labelled in {time.time() - t0:.0f} s",
          file=sys.stderr)
    meta = {"target": {"model": str(args.model), "hidden_size": llm.model.config.hidden_size,
                       "vocab_size": llm.model.config.vocab_size, "num_layers": llm.model.config.num_layers,
                       "dtype": str(llm.model.dtype).removeprefix("torch.")},
            "data": {"files": [Path(f).name for f in args.data], "text_tokens": args.text_tokens,
                     "prompts": {stem: sum(s.kind == f"chat:{stem}:0" for s in seqs) for stem in prompt_sets},
                     "self_prompts": sum(s.kind == self_tag for s in seqs),
                     "responses_per_prompt": args.responses_per_prompt, "response_tokens": args.response_tokens,
                     "labelled_tokens": tokens, "val_sequences": len(val)},
            "argv": sys.argv[1:]}
    metrics = train_head(llm.model, seqs, settings, args.out, frspec_vocab=args.frspec_vocab,
                         init=args.init, meta=meta, val_seqs=val)
    print(json.dumps({"out": str(args.out), **metrics}))
    return 0


def _sample_prompts(llm, count: int, args: argparse.Namespace, seed: int, exclude=()) -> list:
    from ..spec.self_prompts import sample_user_prompts  # noqa: PLC0415

    prompts = sample_user_prompts(llm, count, temperature=args.self_prompt_temperature, batch=max(args.gen_batch, 1),
                                  seed=seed, exclude=exclude)
    if len(prompts) < count:
        print(f"train-draft: the model finished only {len(prompts)} of {count} sampled user turns", file=sys.stderr)
    return prompts

