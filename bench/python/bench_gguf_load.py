"""GGUF loading speed: edgespec's torch dequantisation (edgespec.loading.gguf_dequant) against the
`gguf` package's numpy decoder, per block type on real model tensor sizes, and the demo model's
whole load.

Per type and shape (rows "dequant Q4_K 4096x4096"; 4096x4096 is a Llama-3-8B attention projection,
14336x4096 its FFN): random blocks (tests/gguf_cases.py: random bytes, finite fp16 scales).
baseline = what GGUFSource did before: gguf.quants.dequantize on the host into a float32 tensor (on
CUDA then copied to the GPU); ours = gguf_dequant.dequantize of the raw bytes on the device (on CUDA
including the copy of the raw bytes from pageable host memory; `decode_ms` is the decode alone, CUDA
events). Every row first checks ours bit-equal to the baseline. `melem_per_s`: output elements per
second of ours.

Demo load (rows "load demo ..."): edgespec.load_model of the demo GGUF (SmolLM2-135M: Q4_1, Q8_0
and F32 tensors) onto the device in its default dtype, 256-position KV cache, no tokenizer, header
index cached by a warm-up load; baseline = the same load with every type sent to gguf's numpy
fallback. The two alternate, repeat by repeat. On CUDA a second row loads with quantized=False (every
weight dequantised; by default the Q4_1 projections import as 4-bit directly).

    python bench/python/bench_gguf_load.py [--device auto|cpu|cuda] [--types Q4_K,Q6_K]
                                           [--shapes 4096x4096,14336x4096] [--repeats 3] [--threads 1] [--no-load]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import gguf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from benchlib import Interruptible, median, time_cpu, time_cuda, write_result  # noqa: E402
from gguf_cases import QT, TYPES, random_raw, reference  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading import default_dtype, gguf_dequant, resolve_device  # noqa: E402
from edgespec.loading.demo import demo_model_path  # noqa: E402

SHAPES = "4096x4096,14336x4096"


def alternated(fns: list[Callable[[], Any]], device: torch.device, repeats: int) -> list[float]:
    """Median wall-clock ms of each fn (GPU work synchronised), after one warm-up call each, the fns
    called in turn repeat by repeat so that drift in the machine's load hits them alike."""
    def synced(fn: Callable[[], Any]) -> Callable[[], None]:
        def call() -> None:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return call

    calls = [synced(fn) for fn in fns]
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, call in zip(times, calls):
            t += time_cpu(call, 1, warmup=0)
    return [median(t) * 1e3 for t in times]


def dequant_row(name: str, rows: int, cols: int, device: torch.device, repeats: int) -> dict[str, Any]:
    block = gguf.GGML_QUANT_SIZES[QT[name]][0]
    raw = random_raw(name, rows * cols // block, seed=rows + cols).reshape(rows, -1)
    shape = (rows, cols)
    want = reference(raw, name, shape)
    got = gguf_dequant.dequantize(torch.from_numpy(raw).to(device), QT[name], shape)
    equal = bool(torch.equal(got.cpu().view(torch.int32), want.view(torch.int32)))
    del got, want

    def baseline() -> torch.Tensor:
        return reference(raw, name, shape).to(device)

    def ours() -> torch.Tensor:
        return gguf_dequant.dequantize(torch.from_numpy(raw).to(device), QT[name], shape)

    baseline_ms, ours_ms = alternated([baseline, ours], device, repeats)
    row = {"case": f"dequant {name} {rows}x{cols}", "ours_ms": round(ours_ms, 3),
           "baseline": "gguf.quants.dequantize (numpy, host) to float32" + (" + copy to the GPU" if device.type == "cuda" else ""),
           "baseline_ms": round(baseline_ms, 3), "speedup": round(baseline_ms / ours_ms, 3),
           "melem_per_s": round(rows * cols / ours_ms / 1e3, 1), "raw_mib": round(raw.nbytes / 2**20, 1),
           "bit_equal": equal}
    if device.type == "cuda":
        on_device = torch.from_numpy(raw).to(device)
        decode_ms = median(time_cuda(lambda: gguf_dequant.dequantize(on_device, QT[name], shape), repeats)) * 1e3
        row.update(decode_ms=round(decode_ms, 3), decode_melem_per_s=round(rows * cols / decode_ms / 1e3, 1))
    return row


def load_rows(device: torch.device, repeats: int) -> list[dict[str, Any]]:
    path = demo_model_path(progress=False)
    dtype = default_dtype(device)
    variants = [("default", None)] + ([("quantized=False", False)] if device.type == "cuda" else [])
    rows = []
    for label, quantized in variants:
        def load() -> None:
            edgespec.load_model(path, device=device, dtype=dtype, max_context=256, with_tokenizer=False,
                                quantized=quantized)

        def numpy_load() -> None:
            with mock.patch.dict(gguf_dequant._FORMATS, clear=True):  # every type to gguf's numpy decoder
                load()

        # The warm-up calls write the header index and bring the file into the page cache.
        base_ms, ours_ms = alternated([numpy_load, load], device, repeats)
        rows.append({"case": f"load demo (SmolLM2-135M Q4_1) {str(dtype).removeprefix('torch.')} {label}",
                     "ours_ms": round(ours_ms, 1), "baseline": "the same load, gguf.quants numpy dequantisation",
                     "baseline_ms": round(base_ms, 1), "speedup": round(base_ms / ours_ms, 3)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated GGUF types (of {', '.join(TYPES)})")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated ROWSxCOLS")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of a CPU run (default 1, like gguf's single-threaded numpy; on a shared "
                         "machine more threads than free cores make OpenMP barriers wait on descheduled threads)")
    ap.add_argument("--no-load", action="store_true", help="skip the demo-model load rows (no demo model here)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    types = args.types.split(",")
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        ap.error(f"unknown types {unknown}; choose from {TYPES}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    planned = len(types) * len(shapes) + (0 if args.no_load else 1 + (device.type == "cuda"))
    rows: list[dict[str, Any]] = []
    with Interruptible() as run:
        for name in types:
            for r, c in shapes:
                rows.append(dequant_row(name, r, c, device, args.repeats))
                print(rows[-1], flush=True)
        if not args.no_load:
            for row in load_rows(device, args.repeats):
                rows.append(row)
                print(row, flush=True)
    if not all(row.get("bit_equal", True) for row in rows):
        print("ours differs from gguf.quants in rows marked bit_equal false", file=sys.stderr)
    threads = torch.get_num_threads()
    notes = (f"Wall clock (GPU work synchronised), median of {args.repeats} after one warm-up; torch CPU threads "
             f"{threads}, numpy single-threaded. dequant rows: random blocks, float32 out; ours includes the "
             f"raw bytes' copy to the device, decode_ms (CUDA events) excludes it. load rows: load_model of the "
             f"demo GGUF, baseline with gguf_dequant's table emptied (every type through gguf.quants), alternated. "
             f"F32 is a plain copy on both sides (torch's copy_ is slower than numpy's memcpy on one CPU thread); "
             f"a quantized GGUF's F32 tensors are its norm vectors.")
    path = write_result("gguf_load", device, rows, notes, threads=threads, **run.marker(len(rows), planned))
    speedups = [row["speedup"] for row in rows if row["case"].startswith("dequant")]
    if speedups:
        geo = math.exp(sum(map(math.log, speedups)) / len(speedups))
        print(f"wrote {path}; dequant speedup geometric mean {geo:.2f}x ({min(speedups):.2f}-{max(speedups):.2f})")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
