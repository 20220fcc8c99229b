"""Top-p sampling on the GPU: the nucleus-floor kernel (csrc/kernels/sampling.h) vs the torch path
it replaces, a full descending sort of every row plus a scan, on the vocabularies of real models
and the row counts of plain decoding (1) and speculative verification (16, 64 tree tokens).

Two rows per case, both sides measured in the same run on the same fp32 probabilities:
* "floor": the nucleus floor alone, `_kernels.nucleus_floor` vs `ops.sampling._nucleus_floor`
  (torch.sort on a GPU). Both give the same floor bit for bit; it is checked before timing.
* "logits_to_probs": the whole sampling transform at temperature 0.8, top-p 0.9 (shift, scale,
  softmax, top-p mask, softmax), with the kernel vs with EDGESPEC_BACKEND=torch.
Logits are random bf16 with a standard deviation of 2.5 (a peaked but not one-hot distribution).
Timing: CUDA events around eager calls (host launch cost included, as a decoding loop pays it),
median of --repeats. Writes bench/results/sampling-<device-slug>.json (format: ../shared/STYLE.md).
Exits 77 (nothing measured) without a CUDA GPU or without the compiled extension.

    python bench/python/bench_sampling.py [--repeats 50] [--cases llama3,qwen2.5,smollm2] [--rows 1,16,64]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import Interruptible, environment, median, time_cuda, write_result  # noqa: E402

from edgespec import ops  # noqa: E402
from edgespec.ops import sampling  # noqa: E402

EXIT_SKIPPED = 77
VOCABS = {"llama3": 128256, "qwen2.5": 151936, "smollm2": 49152}
TEMPERATURE, TOP_P, LOGIT_STD = 0.8, 0.9, 2.5
BASELINE = "torch.sort top-p (edgespec torch path)"


def measure(model: str, rows: int, repeats: int, device: torch.device) -> list[dict]:
    from edgespec.ops import _kernels

    vocab = VOCABS[model]
    g = torch.Generator(device=device).manual_seed(rows * 7 + vocab)
    logits = (torch.randn(rows, vocab, generator=g, device=device) * LOGIT_STD).to(torch.bfloat16)
    probs = ops.logits_to_probs(logits, TEMPERATURE)  # what top-p sees: the tempered softmax, before any cut
    need = sampling.nucleus_need(TOP_P)
    ours_floor = _kernels.nucleus_floor(probs, need)
    torch_floor = sampling._nucleus_floor(probs, need)
    if not torch.equal(ours_floor, torch_floor):
        raise SystemExit(f"{model} R={rows}: the kernel's nucleus floor differs from the torch path's; not timed")
    kept = int((probs >= ours_floor[:, None]).sum()) / rows
    floor_ours = median(time_cuda(lambda: _kernels.nucleus_floor(probs, need), repeats))
    floor_base = median(time_cuda(lambda: sampling._nucleus_floor(probs, need), repeats))
    full_ours = median(time_cuda(lambda: ops.logits_to_probs(logits, TEMPERATURE, 0, TOP_P), repeats))
    with environment("EDGESPEC_BACKEND", "torch"):
        full_base = median(time_cuda(lambda: ops.logits_to_probs(logits, TEMPERATURE, 0, TOP_P), repeats))
    common = {"rows": rows, "vocab": vocab, "mean_kept_tokens": round(kept, 1), "baseline": BASELINE}
    return [{"case": f"{model} floor R={rows}", "ours_ms": floor_ours * 1e3, "baseline_ms": floor_base * 1e3, **common},
            {"case": f"{model} logits_to_probs R={rows}", "ours_ms": full_ours * 1e3,
             "baseline_ms": full_base * 1e3, **common}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--cases", default=",".join(VOCABS), help=f"models by vocabulary: {', '.join(VOCABS)}")
    ap.add_argument("--rows", default="1,16,64", help="rows per call (1: plain decoding; a tree's tokens)")
    args = ap.parse_args(argv)
    models = args.cases.split(",")
    unknown = [m for m in models if m not in VOCABS]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(VOCABS)}")
    row_counts = [int(r) for r in args.rows.split(",")]
    if not torch.cuda.is_available() or ops.compiled_module() is None:
        print("bench_sampling: needs a CUDA GPU and edgespec built with its CUDA extension; nothing measured")
        return EXIT_SKIPPED
    device = torch.device("cuda")
    todo = [(m, r) for m in models for r in row_counts]
    results: list[dict] = []
    with Interruptible() as run:
        for model, rows in todo:
            for row in measure(model, rows, args.repeats, device):
                results.append(row)
                print({k: row[k] for k in ("case", "ours_ms", "baseline_ms")}, flush=True)
    notes = (f"top-p {TOP_P}, temperature {TEMPERATURE}, fp32 probabilities of bf16 logits ~ N(0, {LOGIT_STD}^2); "
             f"ours = nucleus-floor kernel (two launches, no sort), baseline = {BASELINE}; CUDA events around eager "
             f"calls, median of {args.repeats}")
    path = write_result("sampling", device, results, notes, **run.marker(len(results) // 2, len(todo)))
    for row in results:
        print(f"{row['case']}: {row['ours_ms']:.3f} ms vs {row['baseline_ms']:.3f} ms ({row['speedup']:.2f}x)")
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
