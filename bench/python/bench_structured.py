"""Host cost of structured output (a grammar's token masks) in speculative and plain decoding on the
demo model (SmolLM2-135M-Instruct with its EAGLE head), against the named baseline in the same run:
every row masked (EDGESPEC_GRAMMAR_MASKS=full: each plain step, each row of each verified tree),
versus the default, which masks a row only where acceptance reads it and the grammar is not known
to allow the model's own choice there (edgespec.spec.accept.accept_constrained).

Per case (tree shape x decoding), over JSON-schema chat prompts (answers of ~60-200 tokens):
  grammar_ms     time inside GrammarState.mask and GrammarState.allows: the grammar's host cost
                 (ours_ms / baseline_ms of the row, per verification step; plain decoding: per token)
  masks          vocabulary-wide masks (llguidance bitmask fill + unpack) per step
  accept_ms      wall time of SpeculativeDecoding._accept per step (plain: Sampler.__call__), which
                 adds the argmax/sampling over the tree and its host read, alike in both modes
each per step and per generated token, for both modes. The GPU-default tree (60 nodes,
DEFAULT_SETTINGS["cuda"]) is the case that matters: there the target forward of a small model
takes a few milliseconds, so a step's host milliseconds decide the speedup.
Greedy outputs must be identical in both modes, and complete answers JSON (checked before
anything is written). Cases: greedy-cpu-tree, greedy-gpu-tree, sampled-gpu-tree (T 0.8),
sampled-top-p-gpu-tree (T 0.8, top-p 0.9: every row acceptance reads is masked), greedy-plain
(plain decoding); sampled-cpu-tree and sampled-top-p-cpu-tree on request.

The drafts-* cases (drafts-greedy-cpu-tree, drafts-greedy-gpu-tree, drafts-sampled-gpu-tree by
default) measure the draft tree under a grammar instead: trees holding only drafts the grammar
allows plus the token it forces (GrammarState.draft_choices) against trees of every draft, the
forbidden ones too, in the same run: tokens committed per verification step (the speedup column:
ours / baseline), rows verified per step, and the grammar's host time spent choosing the drafts.
forced-greedy-plain measures plain decoding's jump-forward: the tokens a grammar forces run
through the model in one forward with the last token, against one step per token (same run,
identical greedy outputs): tokens/s both ways, steps, and how many tokens were forced.

    python bench/python/bench_structured.py [--device cpu|cuda] [--dtype bf16|fp32] [--threads N]
        [--limit N] [--new-tokens 200] [--cases greedy-cpu-tree,greedy-gpu-tree,...]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import Interruptible, environment, projection_weights, write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.generation import Sampler  # noqa: E402
from edgespec.loading import default_dtype, resolve_device  # noqa: E402
from edgespec.spec import DEMO_HEAD, enable_speculation  # noqa: E402
from edgespec.spec.api import DEFAULT_SETTINGS  # noqa: E402
from edgespec.spec import decoding  # noqa: E402
from edgespec.spec.decoding import SpeculativeDecoding  # noqa: E402
from edgespec.structured import Grammar, GrammarState  # noqa: E402

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "occupation", "bio"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0},
                         "occupation": {"type": "string"}, "bio": {"type": "string", "maxLength": 300}}}
RECIPE = {"type": "object", "additionalProperties": False, "required": ["title", "ingredients", "steps"],
          "properties": {"title": {"type": "string"},
                         "ingredients": {"type": "array", "maxItems": 6, "items": {"type": "string"}},
                         "steps": {"type": "array", "maxItems": 4, "items": {"type": "string"}}}}
BOOKS = {"type": "array", "maxItems": 3, "items": {
    "type": "object", "additionalProperties": False, "required": ["title", "author", "year"],
    "properties": {"title": {"type": "string"}, "author": {"type": "string"}, "year": {"type": "integer"}}}}
PROMPTS = [
    ("Describe a fictional person as a JSON object with name, age, occupation and a short bio.", PERSON),
    ("Give a simple pancake recipe as JSON with a title, a list of ingredients and the steps.", RECIPE),
    ("List three classic novels as a JSON array of objects with title, author and year.", BOOKS),
]
TREES = {"cpu-tree": DEFAULT_SETTINGS["cpu"], "gpu-tree": DEFAULT_SETTINGS["cuda"]}
DECODINGS = {"greedy": {}, "sampled": {"temperature": 0.8}, "sampled-top-p": {"temperature": 0.8, "top_p": 0.9}}
# name -> (decoding, tree shape or None for plain decoding)
CASES: dict[str, tuple[str, str | None]] = {**{f"{d}-{t}": (d, t) for d in DECODINGS for t in TREES},
                                            "greedy-plain": ("greedy", None),
                                            **{f"drafts-{d}-{t}": (d, t) for d in DECODINGS for t in TREES},
                                            "forced-greedy-plain": ("greedy", None)}
DEFAULT_CASES = ["greedy-cpu-tree", "greedy-gpu-tree", "sampled-gpu-tree", "sampled-top-p-gpu-tree", "greedy-plain",
                 "drafts-greedy-cpu-tree", "drafts-greedy-gpu-tree", "drafts-sampled-gpu-tree", "forced-greedy-plain"]


class Timers:
    """Wall time and calls of wrapped methods, and the masks GrammarStates compute."""

    def __init__(self) -> None:
        self.s: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, owner: type, name: str, key: str) -> Callable[[], None]:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t0
                self.calls[key] = self.calls.get(key, 0) + 1

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def generate(llm: edgespec.LLM, ids: list[int], schema: dict, n: int, sampling: dict) -> dict[str, Any]:
    """One constrained generation, timed inside: acceptance (or the sampler), the grammar's work."""
    timers = Timers()
    states: list[GrammarState] = []
    make_state = edgespec.LLM._grammar_state

    def recording(self: edgespec.LLM, config: Any) -> GrammarState:
        states.append(make_state(self, config))
        return states[-1]

    undo = [timers.wrap(SpeculativeDecoding, "_accept", "accept"), timers.wrap(Sampler, "__call__", "sampler"),
            timers.wrap(GrammarState, "mask", "grammar"), timers.wrap(GrammarState, "allows", "grammar"),
            timers.wrap(GrammarState, "draft_choices", "drafting")]
    edgespec.LLM._grammar_state = recording
    try:
        t0 = time.perf_counter()
        r = llm.generate(ids, max_new_tokens=n, grammar=Grammar.json(schema), seed=0, **sampling)
        wall = time.perf_counter() - t0
    finally:
        edgespec.LLM._grammar_state = make_state
        for u in undo:
            u()
    return {"tokens": r.token_ids, "text": r.text, "finish": r.finish_reason, "steps": r.stats.steps, "wall_s": wall,
            "accept_s": timers.s.get("accept", 0.0), "accept_calls": timers.calls.get("accept", 0),
            "sampler_s": timers.s.get("sampler", 0.0), "sampler_calls": timers.calls.get("sampler", 0),
            "grammar_s": timers.s.get("grammar", 0.0), "masks": states[0].full_masks,
            "drafting_s": timers.s.get("drafting", 0.0),
            "accept_len": r.stats.extra.get("mean_accepted_length"), "forced": r.stats.extra.get("forced_tokens", 0),
            "verified_rows": r.stats.steps * (1 + r.stats.extra.get("mean_tree_size", 0.0))}


@contextlib.contextmanager
def drafts_unpicked():
    """Draft trees built as without a grammar (the baseline of the drafts-* cases): every draft
    enters, those the grammar forbids too, and no forced token is added."""
    build_tree = decoding.build_tree

    def unpicked(*args: Any, pick: Any = None, **kwargs: Any) -> Any:
        return build_tree(*args, **kwargs)

    decoding.build_tree = unpicked
    try:
        yield
    finally:
        decoding.build_tree = build_tree


def run_both(llm: edgespec.LLM, prompts: list[tuple[list[int], dict]], n: int, sampling: dict,
             modes: dict[str, Callable[[], Any]], case: str, differ: str) -> dict[str, list[dict[str, Any]]]:
    """Each prompt generated in both `modes` (name -> context manager factory; baseline first, ours
    second), measured runs per mode. llguidance builds its lexer's states lazily and keeps them for
    the grammar: a first generation pays for them, so each mode runs once unmeasured, then once
    measured, the two alternated in turn so that drift in machine load hits both. Complete answers
    must be JSON, and greedy tokens the same in both modes (AssertionError naming `differ`)."""
    names = list(modes)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for i, (ids, schema) in enumerate(prompts):
        order = names if i % 2 == 0 else names[::-1]
        for measured in (False, True):
            for mode in order:
                with modes[mode]():
                    r = generate(llm, ids, schema, n, sampling)
                if measured:
                    runs[mode].append(r)
    for rs in runs.values():
        for r in rs:
            if r["finish"] == "stop":  # a complete answer is JSON (its schema: llguidance's business)
                json.loads(r["text"])
    if not sampling:
        for a, b in zip(*runs.values()):
            if a["tokens"] != b["tokens"]:
                raise AssertionError(f"{case}: greedy tokens differ {differ}: {a['text']!r} vs {b['text']!r}")
    return runs


def measure_case(llm: edgespec.LLM, prompts: list[tuple[list[int], dict]], case: str, n: int) -> dict[str, Any]:
    decoding, tree = CASES[case]
    sampling = DECODINGS[decoding]
    plain = tree is None
    if plain:
        enable_speculation(llm, None)
    else:
        s = TREES[tree]
        enable_speculation(llm, draft=str(DEMO_HEAD), tree_size=s.tree_size, depth=s.depth, topk=s.topk)
    runs = run_both(llm, prompts, n, sampling, {mode: lambda mode=mode: environment("EDGESPEC_GRAMMAR_MASKS", mode)
                                                for mode in ("full", "checked")},
                    case, "between full and checked masks")

    def totals(rs: list[dict[str, Any]]) -> dict[str, float]:
        steps = sum(r["sampler_calls"] if plain else r["accept_calls"] for r in rs)
        tokens = sum(len(r["tokens"]) for r in rs)
        host = sum(r["sampler_s"] if plain else r["accept_s"] for r in rs)
        grammar = sum(r["grammar_s"] for r in rs)
        masks = sum(r["masks"] for r in rs)
        return {"steps": steps, "tokens": tokens, "accept_ms_per_step": host * 1e3 / steps,
                "grammar_ms_per_step": grammar * 1e3 / steps, "masks_per_step": masks / steps,
                "accept_ms_per_token": host * 1e3 / tokens, "grammar_ms_per_token": grammar * 1e3 / tokens,
                "tokens_per_s": tokens / sum(r["wall_s"] for r in rs)}

    ours, base = totals(runs["checked"]), totals(runs["full"])
    shape = "plain decoding" if plain else "tree {0.tree_size}/{0.depth}/{0.topk}".format(TREES[tree])
    settings = ", ".join(f"{k} {v}" for k, v in sampling.items()) or "greedy"
    row = {"case": f"{case}: {shape}, {settings}",
           "ours_ms": round(ours["grammar_ms_per_step"], 4),
           "baseline": "every row masked (EDGESPEC_GRAMMAR_MASKS=full), same run",
           "baseline_ms": round(base["grammar_ms_per_step"], 4),
           "speedup": round(base["grammar_ms_per_step"] / max(ours["grammar_ms_per_step"], 1e-9), 2)}
    for key in ("masks_per_step", "grammar_ms_per_token", "accept_ms_per_step", "accept_ms_per_token",
                "tokens_per_s"):
        row[key] = round(ours[key], 4)
        row[f"baseline_{key}"] = round(base[key], 4)
    row["accept_speedup"] = round(base["accept_ms_per_step"] / ours["accept_ms_per_step"], 2)
    row.update(steps=ours["steps"], new_tokens=ours["tokens"], baseline_steps=base["steps"],
               baseline_new_tokens=base["tokens"],
               # Plain decoding: tokens per choice (above 1 where the grammar forced tokens).
               accept_len=round(ours["tokens"] / ours["steps"], 3),
               identical_outputs=None if sampling else True,
               complete_answers=f"{sum(r['finish'] == 'stop' for r in runs['checked'])}/{len(prompts)}")
    return row


def measure_drafting(llm: edgespec.LLM, prompts: list[tuple[list[int], dict]], case: str, n: int) -> dict[str, Any]:
    """A drafts-* case: draft trees that hold only what the grammar allows, plus the token it
    forces (GrammarState.draft_choices), against trees of every draft (the baseline), same run."""
    decoding_name, tree = CASES[case]
    sampling = DECODINGS[decoding_name]
    s = TREES[tree]
    enable_speculation(llm, draft=str(DEMO_HEAD), tree_size=s.tree_size, depth=s.depth, topk=s.topk)
    runs = run_both(llm, prompts, n, sampling, {"unpicked": drafts_unpicked, "picked": contextlib.nullcontext},
                    case, "with picked drafts")

    def totals(rs: list[dict[str, Any]]) -> dict[str, float]:
        steps = sum(r["steps"] for r in rs)
        tokens = sum(len(r["tokens"]) for r in rs)
        return {"steps": steps, "tokens": tokens, "accept_len": tokens / steps,
                "rows_per_step": sum(r["verified_rows"] for r in rs) / steps,
                "drafting_ms_per_step": sum(r["drafting_s"] for r in rs) * 1e3 / steps,
                "tokens_per_s": tokens / sum(r["wall_s"] for r in rs)}

    ours, base = totals(runs["picked"]), totals(runs["unpicked"])
    settings = ", ".join(f"{k} {v}" for k, v in sampling.items()) or "greedy"
    row = {"case": f"{case}: tree {s.tree_size}/{s.depth}/{s.topk}, {settings}",
           "ours_tokens_per_step": round(ours["accept_len"], 3),
           "baseline": "every draft in the tree, the grammar's forbidden ones too (the drafter alone), same run",
           "baseline_tokens_per_step": round(base["accept_len"], 3),
           "speedup": round(ours["accept_len"] / base["accept_len"], 3),
           "steps": ours["steps"], "baseline_steps": base["steps"],
           "new_tokens": ours["tokens"], "baseline_new_tokens": base["tokens"],
           "rows_per_step": round(ours["rows_per_step"], 2), "baseline_rows_per_step": round(base["rows_per_step"], 2),
           "drafting_grammar_ms_per_step": round(ours["drafting_ms_per_step"], 4),
           "tokens_per_s": round(ours["tokens_per_s"], 3), "baseline_tokens_per_s": round(base["tokens_per_s"], 3),
           "identical_outputs": None if sampling else True}
    return row


@contextlib.contextmanager
def one_step_each():
    """Plain decoding without jump-forward (the baseline of forced-greedy-plain): the tokens a
    grammar forces are chosen one step each, like any other."""
    take_forced = GrammarState.take_forced
    GrammarState.take_forced = lambda self, limit: []
    try:
        yield
    finally:
        GrammarState.take_forced = take_forced


def measure_forced(llm: edgespec.LLM, prompts: list[tuple[list[int], dict]], case: str, n: int) -> dict[str, Any]:
    """forced-greedy-plain: plain decoding that runs the tokens a grammar forces through the model
    in one forward with the last token (jump-forward) against one step per token, same run."""
    enable_speculation(llm, None)
    runs = run_both(llm, prompts, n, {}, {"stepped": one_step_each, "jump": contextlib.nullcontext},
                    case, "with jump-forward")

    def totals(rs: list[dict[str, Any]]) -> dict[str, float]:
        tokens = sum(len(r["tokens"]) for r in rs)
        return {"steps": sum(r["steps"] for r in rs), "tokens": tokens,
                "tokens_per_s": tokens / sum(r["wall_s"] for r in rs)}

    ours, base = totals(runs["jump"]), totals(runs["stepped"])
    return {"case": f"{case}: plain decoding, greedy, forced tokens in one forward with the last token",
            "ours_tokens_per_s": round(ours["tokens_per_s"], 3),
            "baseline": "one step per token, forced ones too, same run",
            "baseline_tokens_per_s": round(base["tokens_per_s"], 3),
            "speedup": round(ours["tokens_per_s"] / base["tokens_per_s"], 3),
            "steps": ours["steps"], "baseline_steps": base["steps"], "new_tokens": ours["tokens"],
            "forced_tokens": sum(r["forced"] for r in runs["jump"]), "identical_outputs": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of: {', '.join(CASES)}")
    args = ap.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if importlib.util.find_spec("llguidance") is None:
        print("bench_structured: llguidance is not installed (pip install \"edgespec[structured]\"): skipped")
        return 77  # tools/gpu_session.sh records a skip
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[args.dtype] if args.dtype \
        else default_dtype(device)
    llm = edgespec.LLM.load("demo", device=str(device), dtype=dtype, max_context=2048, draft=None)
    prompts = [(llm.encode(p, chat=True), schema) for p, schema in PROMPTS[:args.limit]]
    enable_speculation(llm, draft=str(DEMO_HEAD))
    generate(llm, prompts[0][0], prompts[0][1], 16, {})  # warm-up: the grammar tokenizer, first calls
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with Interruptible() as run:
        for case in cases:
            if case.startswith("forced-"):
                row = measure_forced(llm, prompts, case, args.new_tokens)
                rows.append(row)
                print(f"{row['case']}: {row['ours_tokens_per_s']:.2f} vs {row['baseline_tokens_per_s']:.2f} tokens/s "
                      f"({row['speedup']:.2f}x), {row['steps']} vs {row['baseline_steps']} steps for "
                      f"{row['new_tokens']} tokens, {row['forced_tokens']} forced", flush=True)
                continue
            if case.startswith("drafts-"):
                row = measure_drafting(llm, prompts, case, args.new_tokens)
                rows.append(row)
                print(f"{row['case']}: {row['ours_tokens_per_step']:.2f} vs {row['baseline_tokens_per_step']:.2f} "
                      f"tokens/step ({row['speedup']:.2f}x), {row['rows_per_step']:.1f} vs "
                      f"{row['baseline_rows_per_step']:.1f} rows verified/step, drafting's grammar "
                      f"{row['drafting_grammar_ms_per_step']:.3f} ms/step", flush=True)
                continue
            row = measure_case(llm, prompts, case, args.new_tokens)
            rows.append(row)
            print(f"{row['case']}: grammar {row['ours_ms']:.3f} vs {row['baseline_ms']:.3f} ms/step "
                  f"({row['speedup']:.1f}x), masks/step {row['masks_per_step']:.2f} vs "
                  f"{row['baseline_masks_per_step']:.2f}, acceptance {row['accept_ms_per_step']:.3f} vs "
                  f"{row['baseline_accept_ms_per_step']:.3f} ms/step, {row['accept_len']:.2f} tokens/step",
                  flush=True)
    load_after = os.getloadavg()
    notes = (f"Host time of constrained decoding on the demo model ({str(dtype).removeprefix('torch.')}, "
             f"{len(prompts)} JSON-schema chat prompts, up to {args.new_tokens} new tokens, seed 0). Per case and "
             "prompt each mode runs once to warm llguidance's lexer, then once measured, alternated. ours_ms / "
             "baseline_ms: time inside GrammarState.mask and .allows per verification step (plain decoding: per "
             "token), the grammar's whole host cost (llguidance bitmask fills, their unpacking, the masking of the "
             "logits, the parser's checks); masks: vocabulary-wide masks per step; accept_ms: wall time of "
             "SpeculativeDecoding._accept per step (plain: Sampler.__call__), which adds argmax/sampling over the "
             "tree and the host read, the same in both modes (device work on a GPU). speedup = baseline_ms / ours_ms. "
             "tokens_per_s is end to end (on a CPU the target forward dominates it). Greedy outputs are identical "
             "in both modes, and complete answers are JSON; sampled ones are draws (both lossless), compared per "
             "step and per token. drafts-* rows compare draft trees instead: only drafts the grammar allows plus "
             "the token it forces (ours) against every draft (baseline), same run; speedup there = tokens "
             "committed per verification step, ours / baseline; rows_per_step: tree rows the target verifies (on "
             "the CPU refused drafts are left out); drafting_grammar_ms_per_step: GrammarState.draft_choices' "
             "host time. forced-greedy-plain: plain decoding with the grammar's forced tokens run in one forward "
             "with the last token (ours) against one step per token (baseline), speedup = tokens/s ours / baseline.")
    path = write_result("structured", device, rows, notes, weights=projection_weights(llm.model),
                        load_before=load_before, load_after=load_after,
                        **run.marker(len(rows), len(cases)))
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
