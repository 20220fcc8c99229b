"""W4A16 GEMM (csrc/kernels/w4a16.h) vs torch.matmul bf16 (cuBLAS) and torch._weight_int4pack_mm
(tinygemm) on SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B layer shapes, M = 1, 4, 16, 32, 64.

Cases are "<model> <layer> M=<rows>" with q|k|v and gate|up fused as edgespec loads them. Weights
are random 4-bit values with group-128 scales (group 64 for SmolLM2, whose K = 576 is not a
multiple of 128 and which tinygemm needs whole groups for) and symmetric zero points unless
--zeros int. Every side is checked against the dequantised weights (float32 reference on the
GPU) before it is timed; a baseline that fails the check is reported as such, not timed.

Timing: each side runs `copies` calls on different weight copies (together > 3x L2, so weights
stream from DRAM as between the layers of a model) captured in one CUDA graph (host launch cost is
not timed); CUDA events around graph replays, median of --repeats, divided by the calls. The DRAM
bandwidth is measured in the same run (device-to-device copy of 1 GiB) and every row reports our
achieved GB/s (4-bit weights + scales (+ zeros) + activations + output) and its share of it.

The torch.matmul rows also time edgespec's row-invariant dense kernel on the same 16-bit weights
(csrc/kernels/dense_gemm.h: `edgespec_dense_ms`, `edgespec_dense_over_baseline`): the price of
bitwise speculative == plain decoding for unquantized models.

Targets (issue 5; checked here and printed, never asserted in pytest): at M <= 16 on Llama-3.1-8B
shapes >= 3.5x torch.matmul bf16, >= 85% of the measured DRAM bandwidth and >= 1.3x tinygemm; on
Llama-3.2-1B shapes >= 2.5x torch.matmul bf16.

    python bench/python/bench_w4a16.py [--models ...] [--layers ...] [--rows 1,4,16,32,64]
        [--dtype bf16|fp16] [--zeros sym|int] [--repeats 20] [--cpp build/ci/bench/cpp/bench_w4a16] [--list]

--cpp also runs the C++ binary on the same shapes in the same session (its JSON goes next to
this one as w4a16_gemm_cpp-<device-slug>.json). Writes bench/results/w4a16_gemm-<device-slug>.json
(format: ../shared/STYLE.md, via benchlib). Exits 77 (nothing measured) without a CUDA GPU or
without the compiled extension.
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import RESULTS_DIR, Interruptible, device_slug, git_commit, target_line, write_result  # noqa: E402

# name -> (hidden, intermediate, query heads, kv heads, head dim, group size)
MODELS = {"smollm2-135m": (576, 1536, 9, 3, 64, 64),
          "llama3-1b": (2048, 8192, 32, 8, 64, 128),
          "llama3-8b": (4096, 14336, 32, 8, 128, 128)}
LAYERS = ("qkv", "o", "gate_up", "down")
ROWS = (1, 4, 16, 32, 64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_SKIPPED = 77
BF16 = "torch.matmul bf16"
TINYGEMM = "torch._weight_int4pack_mm"


@dataclass(frozen=True)
class Case:
    model: str
    layer: str
    rows: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(K, N, group size)."""
        h, inter, hq, hkv, d, g = MODELS[self.model]
        k, n = {"qkv": (h, (hq + 2 * hkv) * d), "o": (hq * d, h), "gate_up": (h, 2 * inter),
                "down": (inter, h)}[self.layer]
        return k, n, g

    @property
    def name(self) -> str:
        return f"{self.model} {self.layer} M={self.rows}"


def cases(models: list[str], layers: list[str], rows: list[int]) -> list[Case]:
    return [Case(m, layer, r) for m in models for layer in layers for r in rows]


class Weights:
    """`copies` random 4-bit weights of one shape in every side's own format, plus a float32
    dequantised copy of the first for checking."""

    def __init__(self, k: int, n: int, group: int, zeros: bool, dtype: torch.dtype, device: torch.device,
                 l2_bytes: int, seed: int) -> None:
        from edgespec.quant import Int4Weight

        gen = torch.Generator(device).manual_seed(seed)  # generated and packed on the GPU (8B layers are large)
        bf16_bytes = k * n * 2
        self.copies = max(1, min(32, math.ceil(3 * l2_bytes / (k * n // 2))))
        self.bf16_copies = max(1, min(32, math.ceil(3 * l2_bytes / bf16_bytes)))
        self.ours, self.tiny, self.dense = [], [], []
        for c in range(max(self.copies, self.bf16_copies)):
            q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8, device=device)
            s = torch.rand(k // group, n, generator=gen, device=device) * 0.02 + 0.002
            z = torch.randint(0, 16, (k // group, n), generator=gen, device=device).float() if zeros else None
            w = Int4Weight(q, s.to(dtype).float(), z, group)
            if c < self.copies:
                self.ours.append(w.to_linear(device=device, dtype=dtype))
                self.tiny.append(tinygemm_weight(w, device))
            if c < self.bf16_copies:
                self.dense.append(w.dequantize().to(device=device, dtype=dtype))  # [N, K]
            if c == 0:
                self.reference = w.dequantize()  # [N, K] float32


def tinygemm_weight(w, device: torch.device):
    """(packed weight, scales_and_zeros) for torch._weight_int4pack_mm, or the reason it cannot take
    this weight. tinygemm's formula is w = (q - 8) * scale + zero: zero = (8 - z) * scale."""
    k, n = w.q.shape
    q_nk = w.q.t().contiguous().to(device=device, dtype=torch.int32)  # [N, K]
    z = torch.full_like(w.scales, 8.0) if w.zeros is None else w.zeros
    sz = torch.stack([w.scales, (8.0 - z) * w.scales], dim=-1).to(device=device, dtype=torch.bfloat16).contiguous()
    inner_k_tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    if inner_k_tiles is None:
        return f"K = {k} is not a multiple of 32"
    try:  # torch >= 2.5 packs two values per byte first (high nibble = even k)
        packed = torch._convert_weight_to_int4pack((q_nk[:, ::2] << 4 | q_nk[:, 1::2]).to(torch.uint8), inner_k_tiles)
    except (RuntimeError, TypeError):
        try:
            packed = torch._convert_weight_to_int4pack(q_nk, inner_k_tiles)
        except (RuntimeError, TypeError) as exc:
            return f"_convert_weight_to_int4pack failed: {exc}"
    return packed, sz, w.group_size


def graph_ms(calls: list[Callable[[], object]], repeats: int) -> tuple[float, str]:
    """Per-call ms of `calls` replayed as one CUDA graph (eager when capture fails)."""
    from bench_attention import graph_ms as _graph_ms  # the shared CUDA-graph timer

    return _graph_ms(calls, repeats)


def measure_dram_gbps(device: torch.device) -> float:
    from bench_attention import measure_dram_tbps

    return measure_dram_tbps(device) * 1e3


def close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> tuple[bool, float]:
    """Relative max error against the fp32 reference; passes within 16 ulps of the dtype."""
    err = ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    return err <= 16 * torch.finfo(dtype).eps, err


def run_case(case: Case, dtype: torch.dtype, zeros: bool, device: torch.device, repeats: int, l2_bytes: int,
             dram_gbps: float) -> list[dict]:
    from edgespec.ops import _kernels

    k, n, group = case.shape
    w = Weights(k, n, group, zeros, dtype, device, l2_bytes, seed=zlib.crc32(case.name.encode()))
    x = torch.randn(case.rows, k, device=device, dtype=dtype)
    ref = x.float() @ w.reference.t()
    rows: list[dict] = []

    lin = w.ours[0]
    if not _kernels.supports_w4a16(x, lin.weight):
        return [{"case": case.name, "error": _kernels.w4a16_rejection(x, lin.weight)}]
    ok, err = close(lin(x), ref, dtype)
    if not ok:
        return [{"case": case.name, "error": f"kernel disagrees with the dequantised reference (rel. error {err:.3g})"}]
    ours_ms, mode = graph_ms([lambda q=q: q(x) for q in w.ours], repeats)
    qbytes = lin.weight.nbytes() + (x.numel() + case.rows * n) * x.element_size()
    gbps = qbytes / (ours_ms * 1e6)
    common = {"case": case.name, "m": case.rows, "k": k, "n": n, "group": group, "ours_ms": round(ours_ms, 5),
              "gbps": round(gbps, 1), "pct_peak_bw": round(100 * gbps / dram_gbps, 1), "timing": mode}

    bf16_ms, _ = graph_ms([lambda d=d: F.linear(x, d) for d in w.dense], repeats)
    ok, err = close(F.linear(x, w.dense[0]), ref, dtype)
    dense_row = {"baseline": BF16 if dtype == torch.bfloat16 else "torch.matmul fp16",
                 "baseline_ms": round(bf16_ms, 5), "speedup": round(bf16_ms / ours_ms, 3)}
    if _kernels.dense_rejection(x, w.dense[0]) is None:
        # edgespec's row-invariant dense kernel (csrc/kernels/dense_gemm.h) on the same 16-bit
        # weights: what the engine runs for unquantized projections of few rows, against cuBLAS.
        ok, err = close(_kernels.dense_linear(x, w.dense[0]), ref, dtype)
        if ok:
            dense_ms, _ = graph_ms([lambda d=d: _kernels.dense_linear(x, d) for d in w.dense], repeats)
            dense_row.update(edgespec_dense_ms=round(dense_ms, 5), edgespec_dense_over_baseline=round(dense_ms / bf16_ms, 3),
                             edgespec_dense_pct_peak_bw=round(100 * k * n * 2 / (dense_ms * 1e6) / dram_gbps, 1))
        else:
            dense_row["edgespec_dense_error"] = f"dense kernel disagrees with the reference (rel. error {err:.3g})"
    rows.append(common | dense_row)

    tiny = w.tiny[0]
    if isinstance(tiny, str) or dtype != torch.bfloat16:
        rows.append(common | {"baseline": TINYGEMM, "error": tiny if isinstance(tiny, str) else "tinygemm takes bf16 only"})
        return rows
    try:
        def mm(t=tiny):
            return torch._weight_int4pack_mm(x, t[0], t[2], t[1])
        ok, err = close(mm(), ref, dtype)
    except RuntimeError as exc:
        rows.append(common | {"baseline": TINYGEMM, "error": f"tinygemm failed: {exc}"})
        return rows
    if not ok:
        rows.append(common | {"baseline": TINYGEMM, "error": f"tinygemm disagrees with the reference (rel. error {err:.3g})"})
        return rows
    tiny_ms, _ = graph_ms([lambda t=t: torch._weight_int4pack_mm(x, t[0], t[2], t[1]) for t in w.tiny], repeats)
    rows.append(common | {"baseline": TINYGEMM, "baseline_ms": round(tiny_ms, 5), "speedup": round(tiny_ms / ours_ms, 3)})
    return rows


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets, as lines saying met / missed for every row they apply to."""
    lines = []
    for r in rows:
        if "speedup" not in r:
            continue
        model, m = r["case"].split()[0], r["m"]
        if model == "llama3-8b" and m <= 16:
            goal = 3.5 if r["baseline"] == BF16 else 1.3 if r["baseline"] == TINYGEMM else None
            if goal:
                lines.append(target_line(f"{r['case']} vs {r['baseline']}", r["speedup"], goal))
            if r["baseline"] == BF16:
                lines.append(target_line(f"{r['case']} bandwidth", r["pct_peak_bw"], 85, "%"))
        if model == "llama3-1b" and r["baseline"] == BF16:
            lines.append(target_line(f"{r['case']} vs {BF16}", r["speedup"], 2.5))
    return lines


def run_cpp(binary: Path, args: argparse.Namespace, device: torch.device) -> None:
    out = RESULTS_DIR / f"w4a16_gemm_cpp-{device_slug(device)}.json"
    cmd = [str(binary), "--models", ",".join(args.models), "--layers", ",".join(args.layers),
           "--rows", ",".join(map(str, args.rows)), "--dtype", args.dtype, "--zeros", args.zeros,
           "--json", str(out), "--commit", git_commit()]
    print("running", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd)
    print(f"bench_w4a16 exited with {proc.returncode}; results in {out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    p.add_argument("--layers", type=lambda s: s.split(","), default=list(LAYERS))
    p.add_argument("--rows", type=lambda s: [int(v) for v in s.split(",")], default=list(ROWS))
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--zeros", choices=["sym", "int"], default="sym")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--cpp", type=Path, default=None, help="path of the bench_w4a16 binary to run on the same shapes")
    p.add_argument("--list", action="store_true", help="print the cases and exit")
    args = p.parse_args()
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r} (known: {', '.join(MODELS)})")
    for layer in args.layers:
        if layer not in LAYERS:
            p.error(f"unknown layer {layer!r} (known: {', '.join(LAYERS)})")
    if any(not 1 <= r <= 64 for r in args.rows):
        p.error("--rows must be in 1..64 (the kernel's range)")
    todo = cases(args.models, args.layers, args.rows)
    if args.list:
        for c in todo:
            k, n, g = c.shape
            print(f"{c.name:28s} K={k:6d} N={n:6d} group={g}")
        return 0
    if not torch.cuda.is_available():
        print("bench_w4a16: no CUDA GPU; nothing measured")
        return EXIT_SKIPPED
    from edgespec.ops.w4a16 import kernel_available

    if not kernel_available():
        print("bench_w4a16: edgespec was built without the W4A16 kernel; nothing measured")
        return EXIT_SKIPPED
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    dram_gbps = measure_dram_gbps(device)
    print(f"{torch.cuda.get_device_name(device)}: measured DRAM copy bandwidth {dram_gbps:.0f} GB/s")
    rows: list[dict] = []
    done = 0
    with Interruptible() as run:
        for case in todo:
            for row in run_case(case, dtype, args.zeros == "int", device, args.repeats, l2_bytes, dram_gbps):
                rows.append(row)
                if "error" in row:
                    print(f"{row['case']:28s} {row.get('baseline', '')}: {row['error']}")
                else:
                    print(f"{row['case']:28s} ours {row['ours_ms']:.4f} ms ({row['gbps']:.0f} GB/s, "
                          f"{row['pct_peak_bw']:.0f}%)  {row['baseline']} {row['baseline_ms']:.4f} ms  "
                          f"x{row['speedup']:.2f}")
            done += 1
    summary = targets(rows)
    print("\n".join(summary))
    path = write_result(
        "w4a16_gemm", device, rows,
        notes=(f"{args.dtype} activations, random 4-bit weights, group 128 (SmolLM2: 64), "
               f"{'integer zero points' if args.zeros == 'int' else 'symmetric'}; q|k|v and gate|up fused; every side "
               "checked against the dequantised fp32 reference first; CUDA events around CUDA-graph replays of calls on "
               "weight copies rotated through > 3x L2, median of replays / calls; gbps counts 4-bit weights, scales, "
               "zeros, activations and output; pct_peak_bw is over a 1 GiB device copy measured in the same run"),
        dram_copy_gbps=round(dram_gbps, 1), targets=summary, **run.marker(done, len(todo)))
    print(f"wrote {path}")
    if args.cpp is not None and not run.interrupted:
        run_cpp(args.cpp, args, device)
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
