"""BlockFFN layer time vs a dense FFN of the same total size, at controlled chunk-level sparsity.

Shape "blockffn-3b": hidden 2560, 80 experts x 128 (E * d = 10240), i.e. the paper's BlockFFN-1.2B
layer (hidden 1792, 56 x 128, ungated SiLU experts) scaled to a ~3B model's width. The baseline is
the dense FFN over all 10240 columns with the same ungated form: down(silu(up(x))), one matmul
each (torch F.linear; cuBLAS on GPU). Ours is edgespec.ops.blockffn: router (ReLU + RMSNorm),
union of the step's active experts, gathered up/down projections over them only — the CUDA
kernels on a GPU when built, the torch path otherwise (the JSON's notes and each row's
`impl` say which ran).

Inputs: router weights solved so that exactly round(s * 80) experts are inactive for the whole
step of T tokens (chunk-level sparsity s); each active expert is used by each token with
probability 1/2 (at least one token), so token-level sparsity is higher than s for T > 1 (both
are recorded). Weights of `--copies` independent layers are rotated between calls so that repeated
calls do not find the active experts in L2 (105 MB per bf16 layer; 4 copies by default on GPU).
Before timing each case, ours is checked against the dense masked computation.

4-bit experts (`--experts w4`, on by default on a GPU): the same layers with random 4-bit up/down
weights (group 128, integer zero points, the kernel's tile layout); rows are named "... w4". Their
baseline is the same dense bf16 FFN; each w4 row also records the dense FFN through edgespec's W4A16
kernel (`dense_w4a16_ms`), i.e. what the 4-bit model would cost without the expert gather.

    python bench/python/bench_blockffn.py [--device cuda|cpu] [--dtype bf16|fp16|fp32] [--repeats 50]
                                          [--experts dense,w4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from benchlib import Interruptible, environment, median, target_line, time_cpu, time_cuda, write_result  # noqa: E402

from edgespec import ops  # noqa: E402
from edgespec.ops.moe import BlockFFNScratch  # noqa: E402
from edgespec.loading import default_dtype, resolve_device  # noqa: E402
from oracle.blockffn_ref import routed_router, sparsity_ref  # noqa: E402
from w4a16_cases import _weight as random_int4  # noqa: E402

SHAPES = {"blockffn-3b": dict(hidden=2560, experts=80, expert_size=128)}
SPARSITIES = (0.5, 0.7, 0.9)
TOKENS = (1, 8, 32, 64)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-5


def implementation(x: torch.Tensor, router: torch.Tensor, norm: torch.Tensor, up, down) -> str:
    """Which path ops.blockffn takes for these experts (dense tensors or W4A16Weights)."""
    if isinstance(up, ops.W4A16Weight):
        if ops.use_kernel(x, router, norm, up.qweight, down.qweight):
            from edgespec.ops import _kernels

            if _kernels.blockffn_w4a16_rejection(x, router, norm, up, down) is None:
                return "cuda kernels (router + W4A16 expert gather)"
        return "torch union path (dequantised experts)"
    if ops.use_kernel(x, router, norm, up, down):
        from edgespec.ops import _kernels

        if _kernels.supports_blockffn(x, router, norm, up, down):
            return "cuda kernels"
    return "torch union path"


def dense_weight(w, dtype: torch.dtype) -> torch.Tensor:
    return w.dequantize(dtype) if isinstance(w, ops.W4A16Weight) else w


def make_layers(kind: str, h: int, e: int, d: int, copies: int, device: torch.device, dtype: torch.dtype) -> list:
    """`copies` independent (up, down) pairs: dense [E*d, H] / [H, E*d], or 4-bit W4A16Weights."""
    if kind == "w4":
        return [tuple(random_int4(k, n, 128, "int", seed=2 * i + j).to_linear(None, device, dtype).weight
                      for j, (k, n) in enumerate(((h, e * d), (e * d, h)))) for i in range(copies)]
    gen = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(e * d, h, device=device, dtype=dtype, generator=gen) / h ** 0.5,
             torch.randn(h, e * d, device=device, dtype=dtype, generator=gen) / (e * d) ** 0.5)
            for _ in range(copies)]


def targets(rows: list[dict]) -> list[str]:
    """The issue's target (H100/H200): at 70% chunk sparsity the layer takes <= 40% of the dense
    FFN's time, for every T (bf16 and 4-bit experts alike)."""
    return [target_line(f"{r['case']} (chunk sparsity {r['chunk_sparsity']:.2f})", r["pct_of_dense"], 40, "%",
                        at_most=True)
            for r in rows if " 70%" in r["case"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: edgespec's default for the device")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 50 on GPU, 7 on CPU)")
    ap.add_argument("--copies", type=int, default=None, help="weight copies rotated (default 4 on GPU, 1 on CPU)")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated T values")
    ap.add_argument("--experts", default=None,
                    help="comma-separated expert kinds: dense, w4 (default: both on GPU, dense on CPU)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a shared machine, more threads than free cores make "
                         "OpenMP barriers wait on descheduled threads and times jump 100x)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (50 if on_gpu else 7)
    copies = args.copies or (4 if on_gpu else 1)
    tokens = [int(t) for t in args.tokens.split(",")]
    timer = time_cuda if on_gpu else time_cpu
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    kinds = (args.experts or ("dense,w4" if on_gpu else "dense")).split(",")
    rows = []
    impls = set()
    with Interruptible() as run:
        for shape, s, kind in ((shape, s, kind) for shape, s in SHAPES.items() for kind in kinds):
            h, e, d = s["hidden"], s["experts"], s["expert_size"]
            layers = make_layers(kind, h, e, d, copies, device, dtype)
            dense_layers = make_layers("dense", h, e, d, copies, device, dtype) if kind == "w4" else layers
            suffix = " w4" if kind == "w4" else ""
            for t in tokens:
                for sparsity in SPARSITIES:
                    x, router, norm, active = routed_router(t, h, e, sparsity, seed=t * 1000 + int(sparsity * 100))
                    x, router, norm = (v.to(device=device, dtype=dtype) for v in (x, router, norm))
                    weights = ops.blockffn_router(x, router, norm, EPS)
                    tls, cls = sparsity_ref(weights.float().cpu())
                    impl = implementation(x, router, norm, *layers[0])
                    impls.add(impl)
                    # Correctness first: ours vs the dense computation with zero weights for inactive pairs.
                    up0, down0 = layers[0]
                    dense_masked = F.linear(F.silu(F.linear(x.float(), dense_weight(up0, torch.float32)))
                                            * weights.float().repeat_interleave(d, 1), dense_weight(down0, torch.float32))
                    err = (ops.blockffn(x, router, norm, EPS, up0, down0).float() - dense_masked).abs().max().item()
                    scale = dense_masked.abs().max().item()
                    if not err <= 0.03 * scale + 1e-3:
                        raise SystemExit(f"{shape} T={t} {sparsity:.0%}: ours differs from the dense reference "
                                         f"by {err:.3g} (max |y| {scale:.3g})")
                    it_ours, it_dense = iter(range(1 << 30)), iter(range(1 << 30))
                    scratch = BlockFFNScratch()  # as a model layer holds it: no per-call memset of the counters

                    def ours() -> torch.Tensor:
                        up, down = layers[next(it_ours) % copies]
                        return ops.blockffn(x, router, norm, EPS, up, down, scratch=scratch)

                    def dense() -> torch.Tensor:
                        up, down = dense_layers[next(it_dense) % copies]
                        return F.linear(F.silu(F.linear(x, up)), down)

                    ours_ms = median(timer(ours, repeats)) * 1e3
                    dense_ms = median(timer(dense, repeats)) * 1e3
                    extra = {}
                    if kind == "w4":
                        it_w4 = iter(range(1 << 30))

                        def dense_w4() -> torch.Tensor:
                            up, down = layers[next(it_w4) % copies]
                            return ops.w4a16_linear(F.silu(ops.w4a16_linear(x, up)), down)

                        extra["dense_w4a16_ms"] = round(median(timer(dense_w4, repeats)) * 1e3, 4)
                    if impl.startswith("cuda kernels"):
                        # The torch union path on the same device, for reference (it syncs once per call).
                        with environment("EDGESPEC_BACKEND", "torch"):
                            extra["torch_path_ms"] = round(median(timer(ours, repeats)) * 1e3, 4)
                    bytes_per_weight = 0.5 + 2 * 2 / 128 if kind == "w4" else x.element_size()  # w4: + scales, zeros
                    active_bytes = (e - round(sparsity * e)) * d * h * 2 * bytes_per_weight
                    rows.append({
                        "case": f"{shape} T={t} {round(sparsity * 100)}%{suffix}", "impl": impl, "ours_ms": round(ours_ms, 4),
                        "baseline": f"dense FFN (torch F.linear {dtype_name}{', cuBLAS' if on_gpu else ', CPU'})",
                        "baseline_ms": round(dense_ms, 4), "pct_of_dense": round(100 * ours_ms / dense_ms, 1),
                        "chunk_sparsity": round(cls, 4), "token_sparsity": round(tls, 4),
                        "active_experts": e - round(sparsity * e),
                        "gbps": round(active_bytes / (ours_ms * 1e-3) / 1e9, 1),
                        "max_abs_err": float(f"{err:.3g}"), **extra})
                    print(f"{rows[-1]['case']:28s} ours {ours_ms:8.3f} ms  dense {dense_ms:8.3f} ms  "
                          f"{rows[-1]['pct_of_dense']:5.1f}% of dense  (TLS {tls:.2f}, CLS {cls:.2f}, {impl})")
    planned = len(SHAPES) * len(kinds) * len(tokens) * len(SPARSITIES)
    # The targets are the GPU's: a CPU run records none.
    path = write_result("blockffn", device, rows, notes(dtype_name, impls, on_gpu, repeats, copies, args.threads),
                        shape=SHAPES, **({"targets": targets(rows)} if on_gpu else {}), **run.marker(len(rows), planned))
    print(f"wrote {path}")
    return run.exit_code


def notes(dtype_name: str, impls: set[str], on_gpu: bool, repeats: int, copies: int, threads: int) -> str:
    text = (f"FFN layer only, {dtype_name}. ours = edgespec.ops.blockffn ({', '.join(sorted(impls))}): router + union "
            f"of active experts + gathered up/down; baseline = dense down(silu(up(x))) over all E*d columns. "
            f"Rows ending in w4: 4-bit experts (group 128, zero points), same dense {dtype_name} baseline, "
            f"dense_w4a16_ms = the dense FFN through edgespec's W4A16 kernel. "
            f"{'CUDA events' if on_gpu else 'wall clock'}, median of {repeats} calls after warm-up, {copies} "
            f"weight copies rotated. Chunk-level sparsity exact by construction; target on H100/H200: at 70% "
            f"chunk sparsity ours <= 40% of dense.")
    if not on_gpu:
        text = f"CPU run of the torch union path (no kernels), {threads} thread(s) on a shared machine. " + text
    return text


if __name__ == "__main__":
    sys.exit(main())
