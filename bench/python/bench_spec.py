"""Speculative decoding vs plain decoding on the demo model (SmolLM2-135M-Instruct) with its
shipped EAGLE head, in the same run: mean accepted length, tokens/s both ways, speedup, and the
acceptance histogram, over a fixed prompt set (chat and continuation).

Both sides are edgespec in the same process, dtype and thread count; greedy, up to 128 new tokens
(a chat answer may end earlier at its end-of-turn token; --ignore-eos forces 128); tokens/s counts
the tokens each side produced. The two are alternated per prompt so drift in machine load hits both
alike. Prompts and topics are disjoint from the head's training prompts.

    python bench/python/bench_spec.py [--device cpu|cuda] [--dtype bf16|fp32] [--new-tokens 128]
        [--tree-size N --depth D --topk K] [--draft HEAD] [--frspec-vocab FILE|none] [--threads N]
        [--sweep "12,5,4 8,4,2 ..."]  (prints mean accepted length and speedup per tree shape, no JSON)
        [--prompts-file held_out.jsonl --limit N]  (tune on other prompts than the benchmark's)
        [--cuda-graphs]  (GPU: both sides replay their steps as CUDA graphs: plain decode steps,
                          full-depth draft rounds, full-tree verifications and the draft's
                          catch-up; written as spec_graphs-<device>.json)
        [--temperature 0.8 --top-p 0.9 --seed 0]  (both sides sample, speculation with lossless
                          rejection sampling; written as spec_sampling-<device>.json)
        [--draft ngram --kinds chat,continuation,grounded]  (prompt lookup, no draft model, also on
                          requests whose answers restate their prompt; written as spec_ngram-<device>.json)
        [--lookup N]  (the head's trees plus a prompt-lookup chain of up to N tokens, default the
                          device's (DEFAULT_SETTINGS); written as spec_lookup-<device>.json, and with
                          --lookup 0 (the head alone) as spec-<device>.json; --sweep shapes may name
                          it: "12,8,4,8")

Heads and tree shapes are chosen on other prompts, never on these: prompts-tuning.jsonl beside this
file (10 chat, 6 continuations, disjoint from both the benchmark's and the training prompts) is the
set for that (`--prompts-file bench/python/prompts-tuning.jsonl --sweep ...`); prompts-tuning-grounded.jsonl
(5 edit, reformat and quote requests, none of GROUNDED_PROMPTS) is the one prompt lookup's shapes were
chosen on.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import GGUF_WEIGHTS, Interruptible, projection_weights, write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading import default_dtype, resolve_device  # noqa: E402
from edgespec.spec import DEMO_HEAD, default_settings, enable_speculation  # noqa: E402

CHAT_PROMPTS = [
    "What is the difference between a virus and a bacterium?",
    "Write a limerick about a forgetful wizard.",
    "How can I make my morning routine more productive?",
    "Explain what a neural network is to a high school student.",
    "What should I pack for a weekend camping trip?",
    "Describe the taste of a ripe mango to someone who has never had one.",
    "Give me three ideas for a birthday party for a ten-year-old.",
    "Why do leaves change color in the fall?",
    "Write a short thank-you note to a teacher.",
    "How does a refrigerator keep food cold?",
    "What are some good habits for writing clean code?",
    "Summarize the plot of Cinderella in a few sentences.",
]
CONTINUATION_PROMPTS = [
    "The old lighthouse keeper climbed the stairs one last time, and",
    "In computer science, a linked list is",
    "The recipe begins with two cups of flour, a pinch of salt, and",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the bicycle starts in the early nineteenth century, when",
    "Dear hiring manager,\n\nI am writing to apply for",
]
# Requests whose answers restate their input (edit, reformat, extract, quote): where prompt lookup
# (--draft ngram) finds its drafts. Written for this benchmark.
GROUNDED_PROMPTS = [
    "Fix the spelling mistakes in this paragraph and return the corrected paragraph:\n\nThe comittee met on "
    "Tuesday to discus the new budjet. After a long debate, the members agred to increase funding for the "
    "libary and to repair the roof of the comunity center before winter.",
    "Convert this list into a JSON array of objects with the keys name and city:\n\n- Alice Moreau, Lyon\n"
    "- Bob Tanaka, Osaka\n- Carla Diaz, Seville\n- David Okoro, Lagos",
    "Add a docstring to this Python function and return the whole function:\n\ndef moving_average(values, "
    "window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n    total = "
    "sum(values[:window])\n    out = [total / window]\n    for i in range(window, len(values)):\n        "
    "total += values[i] - values[i - window]\n        out.append(total / window)\n    return out",
    "Rewrite this email so that it sounds more polite, keeping every detail:\n\nSend me the invoice for "
    "order 5521 by Friday. The last two invoices had the wrong address. Use 14 Harbour Street, Bristol.",
    "Quote, word for word, the sentence of this text that mentions the bridge:\n\nThe town grew around its "
    "market square. In 1852 a stone bridge replaced the old ferry across the river. Today the square hosts "
    "a farmers market every Saturday morning.",
    "Rename the variable tmp to count everywhere in this code and return the code:\n\ntmp = 0\nfor line in "
    "open('log.txt'):\n    if 'ERROR' in line:\n        tmp += 1\nprint('errors:', tmp)",
]
KINDS = ("chat", "continuation", "grounded")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def run_prompt(llm: edgespec.LLM, ids: list[int], n: int, ignore_eos: bool,
               sampling: dict | None = None) -> tuple[float, edgespec.GenerationResult]:
    t0 = time.perf_counter()
    res = llm.generate(ids, max_new_tokens=n, ignore_eos=ignore_eos, **(sampling or {}))
    return time.perf_counter() - t0, res


def measure(llm: edgespec.LLM, prompts: list[tuple[str, list[int]]], n: int, spec: dict,
            ignore_eos: bool, rows: list[dict], sampling: dict | None = None) -> list[dict]:
    """Alternate plain and speculative generation per prompt; appends one row per prompt to `rows`
    (so an interrupted run keeps the prompts it finished) and returns it. With `sampling` (temperature,
    top_p, seed) both sides sample: their tokens are draws, not compared (same_tokens None)."""
    for kind, ids in prompts:
        enable_speculation(llm, None)
        plain_s, plain = run_prompt(llm, ids, n, ignore_eos, sampling)
        enable_speculation(llm, **spec)
        spec_s, res = run_prompt(llm, ids, n, ignore_eos, sampling)
        first_diff = next((i for i, (a, b) in enumerate(zip(plain.token_ids, res.token_ids)) if a != b), None)
        if first_diff is None and len(plain.token_ids) != len(res.token_ids):
            first_diff = min(len(plain.token_ids), len(res.token_ids))  # one side stopped at end-of-turn
        rows.append({"kind": kind, "prompt_tokens": len(ids), "plain_s": plain_s, "spec_s": spec_s,
                     "plain_tokens": len(plain.token_ids), "spec_tokens": len(res.token_ids),
                     "accept": res.stats.extra["mean_accepted_length"],
                     "hist": Counter({int(k): v for k, v in res.stats.extra["acceptance_histogram"].items()}),
                     "same_tokens": None if sampling else first_diff is None,
                     "first_difference": None if sampling else first_diff})
    return rows


def aggregate(rows: list[dict]) -> dict:
    """One summary row over several prompts: total times, tokens/s over all tokens, the pooled
    acceptance histogram and its mean. speedup compares tokens/s (the two sides may stop at
    different lengths when a bf16 tie makes them part)."""
    h = sum((r["hist"] for r in rows), Counter())
    ps, ss = sum(r["plain_s"] for r in rows), sum(r["spec_s"] for r in rows)
    pt, st = sum(r["plain_tokens"] for r in rows), sum(r["spec_tokens"] for r in rows)
    return {"ours_ms": round(ss * 1e3, 1), "baseline": "edgespec plain decoding (same run)",
            "baseline_ms": round(ps * 1e3, 1), "speedup": round((st / ss) / (pt / ps), 3),
            "accept_len": round(sum(k * v for k, v in h.items()) / sum(h.values()), 3),
            "new_tokens": st, "baseline_new_tokens": pt,
            "tokens_per_s": round(st / ss, 2), "baseline_tokens_per_s": round(pt / ps, 2),
            "acceptance_histogram": {str(k): h[k] for k in sorted(h)},
            "identical_outputs": (None if rows[0]["same_tokens"] is None  # sampled: draws, not compared
                                  else f"{sum(r['same_tokens'] for r in rows)}/{len(rows)}")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: edgespec's default for the device")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --new-tokens tokens")
    ap.add_argument("--draft", default=str(DEMO_HEAD), help="an EAGLE head or draft model, or 'ngram' (prompt lookup)")
    ap.add_argument("--kinds", default="chat,continuation",
                    help=f"prompt sets to run, of {', '.join(KINDS)} (grounded: answers that restate the prompt)")
    ap.add_argument("--frspec-vocab", default=None)
    ap.add_argument("--tree-size", type=int, default=None)
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--topk", type=int, default=None)
    ap.add_argument("--lookup", type=int, default=None,
                    help="prompt-lookup tokens grafted onto the draft's trees (default: the device's default)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gguf-weights", default="auto", choices=list(GGUF_WEIGHTS),
                    help="the demo's Q4_1 projections 4-bit or dequantised (default: the device's default)")
    ap.add_argument("--sweep", default=None, help="space-separated tree_size,depth,topk shapes to compare")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each kind")
    ap.add_argument("--prompts-file", default=None,
                    help="tune on other prompts (.jsonl with 'prompt', and 'chat': false for a text to "
                         "continue), e.g. held-out training prompts")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="both sides replay their target steps as CUDA graphs (EDGESPEC_CUDA_GRAPHS=1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="> 0: both sides sample (default: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both sides")
    args = ap.parse_args()
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "seed": args.seed} if args.temperature > 0 else None
    if args.cuda_graphs:
        os.environ["EDGESPEC_CUDA_GRAPHS"] = "1"  # read by every strategy the LLM creates
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        ap.error("--cuda-graphs needs a CUDA device")
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    llm = edgespec.LLM.load("demo", device=str(device), dtype=dtype, max_context=2048, draft=None,
                            quantized=GGUF_WEIGHTS[args.gguf_weights])
    llm.prefix_caching = False  # every run prefills its whole prompt, as the baseline's does
    chat = CHAT_PROMPTS[:args.limit]
    cont = CONTINUATION_PROMPTS[:args.limit]
    if args.prompts_file:
        items = [json.loads(line) for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        chat = [i["prompt"] for i in items if i.get("chat", True)][:args.limit]
        cont = [i["prompt"] for i in items if not i.get("chat", True)][:args.limit]
    kinds = args.kinds.split(",")
    if set(kinds) - set(KINDS):
        ap.error(f"--kinds takes {', '.join(KINDS)}, got {args.kinds!r}")
    grounded = GROUNDED_PROMPTS[:args.limit] if "grounded" in kinds else []
    prompts = ([("chat", llm.encode(p, chat=True)) for p in chat if "chat" in kinds]
               + [("continuation", llm.encode(p)) for p in cont if "continuation" in kinds]
               + [("grounded", llm.encode(p, chat=True)) for p in grounded])
    ngram = args.draft == "ngram"
    base = default_settings(llm.model, ngram=ngram)
    lookup = base.lookup if args.lookup is None else args.lookup
    shapes = [(args.tree_size or base.tree_size, args.depth or base.depth, args.topk or base.topk, lookup)]
    if args.sweep:
        shapes = [(tuple(int(x) for x in s.split(",")) + (lookup,))[:4] for s in args.sweep.split()]
    load_before = os.getloadavg()
    run_prompt(llm, prompts[0][1], 8, True)  # warm-up (allocations, kernels' first calls)
    rows: list[dict] = []
    with Interruptible() as run:
        for tree_size, depth, topk, chain in shapes:
            spec = {"draft": args.draft, "tree_size": tree_size, "depth": depth, "topk": topk,
                    "frspec_vocab": args.frspec_vocab, **({} if ngram else {"lookup": chain})}
            rows = []  # filled in place: an interrupt keeps the prompts already measured
            measure(llm, prompts, args.new_tokens, spec, args.ignore_eos, rows, sampling)
            agg = aggregate(rows)
            print(f"tree {tree_size:3d} depth {depth} topk {topk} lookup {chain}: mean accepted length {agg['accept_len']:.2f}, "
                  f"{agg['tokens_per_s']:.1f} vs {agg['baseline_tokens_per_s']:.1f} tok/s, speedup "
                  f"{agg['speedup']:.2f}x, identical outputs {agg['identical_outputs']}", flush=True)
    if args.sweep or not rows:
        return run.exit_code
    load_after = os.getloadavg()
    n = args.new_tokens
    decoding = f"T={args.temperature:g} top_p={args.top_p:g}" if sampling else "greedy"
    name = f"smollm2-135m {str(dtype).removeprefix('torch.')} {decoding} max_new={n}"
    baseline = "edgespec plain decoding, CUDA graphs (same run)" if args.cuda_graphs else "edgespec plain decoding (same run)"
    out_rows = []
    for i, r in enumerate(rows):
        out_rows.append({
            "case": f"{name} {r['kind']} #{i} prompt={r['prompt_tokens']}",
            "ours_ms": round(r["spec_s"] * 1e3, 1), "baseline": baseline,
            # tokens/s over tokens/s, as aggregate() does: the sides may stop at different lengths.
            "baseline_ms": round(r["plain_s"] * 1e3, 1),
            "speedup": round((r["spec_tokens"] / r["spec_s"]) / (r["plain_tokens"] / r["plain_s"]), 3),
            "accept_len": r["accept"], "new_tokens": r["spec_tokens"], "baseline_new_tokens": r["plain_tokens"],
            "tokens_per_s": round(r["spec_tokens"] / r["spec_s"], 2),
            "baseline_tokens_per_s": round(r["plain_tokens"] / r["plain_s"], 2), "same_tokens": r["same_tokens"],
            "first_difference": r["first_difference"]})
    for kind in [k for k in KINDS if k in kinds] + ["all"]:
        sel = [r for r in rows if kind in ("all", r["kind"])]
        out_rows.append({"case": f"{name} {kind} prompts (all {len(sel)} together)", **aggregate(sel),
                         "baseline": baseline})
    notes = (f"Wall time of each whole generation (prefill + up to {n} {decoding} new tokens, "
             f"{'EOS ignored' if args.ignore_eos else 'stopping at the end-of-turn token'}), plain and "
             f"speculative alternated per prompt, one run each after a warm-up; tokens_per_s = new tokens / wall "
             f"time, speedup = ratio of tokens/s. "
             f"accept_len = mean tokens committed per target forward (bonus included). Draft: "
             + ("prompt lookup (spec.ngram: continuations of the longest of the last 4..1 tokens seen earlier in "
                "the prompt or output; no draft model)" if ngram else
                f"{Path(args.draft).name} (EAGLE-1/2 head trained with edgespec train-draft)")
             + f", tree_size {shapes[0][0]}, depth {shapes[0][1]}, topk {shapes[0][2]}"
             + (f", plus a prompt-lookup chain of up to {shapes[0][3]} tokens grafted below the root (spec.ngram "
                f"index of the prompt and output)" if shapes[0][3] else "")
             + ("" if ngram else f", FR-Spec vocabulary: {args.frspec_vocab or 'the head default'}")
             + f". Prompt sets: {', '.join(kinds)} (grounded: edit, reformat, extract and quote requests). "
             f"{torch.get_num_threads()} torch threads; load average before/after {load_before[0]:.2f}/"
             f"{load_after[0]:.2f} (machine shared with other jobs). "
             + (f"Both sides sample (seed {args.seed}); speculation accepts by lossless rejection sampling, so "
                "its tokens are other draws from the same distribution: same_tokens is not compared."
                if sampling else
                "same_tokens compares with plain decoding token for token: on the CPU, ops.linear and "
                "ops.attention give a verified tree token bitwise the result of decoding it alone (bf16/fp16), "
                "so every row should say true.")
             + (" CUDA graphs: plain decode steps, the draft rounds of every full-depth tree, the "
                "verification of every full tree (tree_size + 1 nodes) and the drafter's catch-up replay "
                "captured graphs; shorter trees run eagerly."
                if args.cuda_graphs else ""))
    benchmark = (("spec_graphs" if args.cuda_graphs else "spec") + ("_ngram" if ngram else "")
                 + ("_lookup" if shapes[0][3] else "")
                 + ("_sampling" if sampling else ""))
    path = write_result(benchmark, device, out_rows, notes, model="SmolLM2-135M-Instruct Q4_1 (demo)",
                        dtype=str(dtype), weights=projection_weights(llm.model), tree={"tree_size": shapes[0][0], "depth": shapes[0][1],
                                                "topk": shapes[0][2], "lookup": shapes[0][3]},
                        **run.marker(len(rows), len(prompts)))
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
