"""Attention kernels (csrc/kernels/attention.h) vs torch SDPA, Llama-3.1-8B and MiniCPM4-8B shapes.

Phases, each at several contexts (`context` = committed prefix, or the prompt for prefill):
  decode   T = 1 new token over S = context + 1 slots          (split-KV flash-decoding)
  prefill  T = context new tokens, causal, empty prefix         (tiled flash attention)
  tree     T = 64 tree tokens over S = context + 64 slots, random tree mask (tree verification)

The baseline is torch.nn.functional.scaled_dot_product_attention with the fastest backend that
runs the case (cuDNN, flash, memory-efficient; math only when none of them does), given its own
preferred [1, H, S, D] layout and native GQA (`enable_gqa`) where the backend supports it,
otherwise K/V expanded to Hq heads beforehand (named in the row). Both sides are verified against
each other before timing, captured in a CUDA graph (so host-side launch cost is not timed) that
runs the call on `copies` different input sets (together more than 3x the L2 cache, so K/V come
from DRAM as in a real model), and timed with CUDA events: median over --repeats replays, divided
by the number of calls. The DRAM bandwidth is measured in the same run (device-to-device copy of
1 GiB) and decode rows report the fraction of it they reach. Tree rows report the time of a
decode step at the same context and their ratio to it. On a compute capability 9.0 GPU with an
sm_90a build, prefill and tree rows also time the Hopper wgmma kernels (csrc/kernels/sm90;
`sm90_ms`, `sm90_tflops`, `sm90_speedup_vs_baseline`, `sm90_splits`, their largest difference
from the generic kernel; tree rows also `sm90_tree_over_decode` against the generic decode).
Decode and tree rows also time the row-invariant mode the engine's target model runs
(csrc/kernels/attention.h "Row invariance": `invariant_ms`, `invariant_over_ours`, its chunk
length for a 32K cache; tree rows `invariant_tree_over_decode` against the invariant decode), and
on a cc 9.0 GPU the same mode on the Hopper kernels (`sm90_invariant_ms`; tree rows
`sm90_invariant_tree_over_decode`, the ratio that bounds a speculative step with
EDGESPEC_SM90_ATTENTION=1; `sm90_invariant_bitwise_equals_generic`: whether wgmma and mma.sync
gave the same bits on this GPU).

    python bench/python/bench_attention.py [--models llama3-8b,minicpm4-8b] [--phases decode,prefill,tree]
        [--dtype bf16|fp16] [--repeats 20] [--quick] [--list]

Writes bench/results/attention-<device-slug>.json (format: ../shared/STYLE.md, via benchlib).
Exits 77 (nothing measured) without a CUDA GPU or without the compiled extension.
"""
from __future__ import annotations

import argparse
import math
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the oracle's random trees

from benchlib import Interruptible, median, target_line, time_cuda, write_result  # noqa: E402

from edgespec import ops  # noqa: E402
from oracle.attention import random_tree, tree_visibility  # noqa: E402

# name -> (query heads, KV heads, head dim)
MODELS = {"llama3-8b": (32, 8, 128), "minicpm4-8b": (32, 2, 128)}
CONTEXTS = {"decode": [4096, 8192, 16384, 32768, 65536, 131072],
            "prefill": [4096, 8192, 16384, 32768],
            "tree": [4096, 8192, 16384, 32768]}
QUICK_CONTEXTS = {"decode": [4096, 32768], "prefill": [4096], "tree": [4096, 32768]}
TREE_TOKENS = 64
# The cache length the row-invariant columns plan their chunks for (a generation's cache).
INVARIANT_SPAN = 32768
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
EXIT_SKIPPED = 77


@dataclass(frozen=True)
class Case:
    model: str
    phase: str
    context: int

    @property
    def heads(self) -> tuple[int, int, int]:
        return MODELS[self.model]

    @property
    def tokens(self) -> int:
        return {"decode": 1, "prefill": self.context, "tree": TREE_TOKENS}[self.phase]

    @property
    def seqlen(self) -> int:
        return self.context if self.phase == "prefill" else self.context + self.tokens

    @property
    def name(self) -> str:
        return f"{self.model} {self.phase} {self.context // 1024}K"


def cases(models: list[str], phases: list[str], quick: bool) -> list[Case]:
    table = QUICK_CONTEXTS if quick else CONTEXTS
    return [Case(m, ph, ctx) for m in models for ph in phases for ctx in table[ph]]


def visible_pairs(case: Case, tree: torch.Tensor | None) -> int:
    t, s = case.tokens, case.seqlen
    prefix = s - t
    if case.phase == "tree":
        return t * prefix + int(tree.sum())
    return t * prefix + t * (t + 1) // 2


def graph_ms(calls: list[Callable[[], object]], repeats: int) -> tuple[float, str]:
    """Per-call milliseconds of `calls` (one per rotated input set) replayed as one CUDA graph;
    eager back-to-back calls if capture fails (then host launch cost may be included)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph requires
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for call in calls:
                call()
        run, mode = graph.replay, "cuda graph"
    except RuntimeError:
        torch.cuda.synchronize()

        def run() -> None:
            for call in calls:
                call()
        mode = "eager"
    return median(time_cuda(run, repeats, warmup=2)) * 1e3 / len(calls), mode


def measure_dram_tbps(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time, in TB/s."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median(time_cuda(lambda: dst.copy_(src), 20, warmup=3)) * 1e3
    return 2 * n / (ms * 1e-3) / 1e12


class Inputs:
    """`copies` input sets for one case: ours in the KV-cache layout [S, Hkv, D] (views of a
    [1, S_max, Hkv, D] layer as the engine passes them), the baseline's in SDPA's [1, H, S, D]."""

    def __init__(self, case: Case, dtype: torch.dtype, device: torch.device, l2_bytes: int, seed: int) -> None:
        hq, hkv, d = case.heads
        t, s = case.tokens, case.seqlen
        g = torch.Generator(device=device).manual_seed(seed)
        per_copy = (2 * s * hkv * d + 2 * t * hq * d) * torch.finfo(dtype).bits // 8
        self.copies = max(1, min(64, math.ceil(3 * l2_bytes / per_copy)))
        self.q, self.k, self.v = [], [], []
        for _ in range(self.copies):
            self.q.append(torch.randn(t, hq, d, generator=g, device=device).to(dtype))
            self.k.append(torch.randn(s, hkv, d, generator=g, device=device).to(dtype))
            self.v.append(torch.randn(s, hkv, d, generator=g, device=device).to(dtype))
        self.tree = None
        self.packed = None
        self.dense_mask = None
        if case.phase == "tree":
            self.tree = tree_visibility(random_tree(t, torch.Generator().manual_seed(seed)))
            self.packed = ops.pack_tree_mask(self.tree).to(device)
            self.dense_mask = torch.ones(t, s, dtype=torch.bool, device=device)
            self.dense_mask[:, s - t:] = self.tree.to(device)
        self.bytes_per_call = per_copy + (self.packed.numel() * 8 if self.packed is not None else 0)

    def sdpa_layout(self, i: int, expand: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.q[i].transpose(0, 1).unsqueeze(0).contiguous()  # [1, Hq, T, D]
        k = self.k[i].transpose(0, 1).unsqueeze(0)                # [1, Hkv, S, D]
        v = self.v[i].transpose(0, 1).unsqueeze(0)
        if expand > 1:
            k, v = k.repeat_interleave(expand, dim=1), v.repeat_interleave(expand, dim=1)
        return q, k.contiguous(), v.contiguous()


def sdpa_variants(case: Case, inputs: Inputs, scale: float):
    """Yield (name, calls, reference output of copy 0) for each SDPA backend that runs this case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    hq, hkv, _ = case.heads
    causal = case.phase == "prefill"
    mask = inputs.dense_mask
    backends = [("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                ("efficient", SDPBackend.EFFICIENT_ATTENTION)]
    found = False
    for label, backend in backends:
        for expand in (1, hq // hkv):
            if expand > 1 and hq == hkv:
                continue
            try:
                tensors = [inputs.sdpa_layout(i, expand) for i in range(inputs.copies)]
            except torch.OutOfMemoryError:
                break

            def make(i: int, backend=backend, tensors=tensors, expand=expand) -> Callable[[], torch.Tensor]:
                q, k, v = tensors[i]

                def call() -> torch.Tensor:
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                                              scale=scale, enable_gqa=expand == 1 and hq != hkv)
                return call
            calls = [make(i) for i in range(inputs.copies)]
            try:
                out = calls[0]()
                torch.cuda.synchronize()
            except (RuntimeError, torch.OutOfMemoryError):
                continue
            found = True
            name = f"torch SDPA ({label})" if expand == 1 else f"torch SDPA ({label}, K/V expanded)"
            yield name, calls, out.squeeze(0).transpose(0, 1)
            break  # native GQA worked: the expanded variant only adds traffic
    scores_bytes = hq * case.tokens * case.seqlen * 4
    if not found and scores_bytes < (4 << 30):
        tensors = [inputs.sdpa_layout(i, 1) for i in range(inputs.copies)]

        def make_math(i: int) -> Callable[[], torch.Tensor]:
            q, k, v = tensors[i]

            def call() -> torch.Tensor:
                with sdpa_kernel([SDPBackend.MATH]):
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                          enable_gqa=hq != hkv)
            return call
        calls = [make_math(i) for i in range(inputs.copies)]
        yield "torch SDPA (math)", calls, calls[0]().squeeze(0).transpose(0, 1)


def run_case(case: Case, dtype: torch.dtype, device: torch.device, repeats: int, l2_bytes: int,
             dram_tbps: float) -> dict:
    from edgespec.ops import _kernels

    hq, hkv, d = case.heads
    scale = d ** -0.5
    inputs = Inputs(case, dtype, device, l2_bytes, seed=zlib.crc32(case.name.encode()))
    mask = inputs.packed
    if not _kernels.supports_attention(inputs.q[0], inputs.k[0], inputs.v[0], mask):
        reason = _kernels.attention_rejection(inputs.q[0], inputs.k[0], inputs.v[0], mask)
        return {"case": case.name, "error": f"kernel rejected the case: {reason}"}
    ours_calls = [lambda i=i: _kernels.attention(inputs.q[i], inputs.k[i], inputs.v[i], scale, mask)
                  for i in range(inputs.copies)]
    ours_out = ours_calls[0]()
    ours_ms, mode = graph_ms(ours_calls, repeats)

    best = None
    for name, calls, out in sdpa_variants(case, inputs, scale):
        diff = (out.float() - ours_out.float()).abs().max().item()
        ms, _ = graph_ms(calls, repeats)
        if best is None or ms < best[1]:
            best = (name, ms, diff)
        del calls, out
    row = {"case": case.name, "phase": case.phase, "tokens": case.tokens, "seqlen": case.seqlen,
           "heads_q": hq, "heads_kv": hkv, "head_dim": d,
           "splits": _kernels.attention_splits(case.tokens, case.seqlen, hq, hkv, mask is not None, device),
           "ours_ms": round(ours_ms, 5), "timing": mode, "copies": inputs.copies}
    if best is not None:
        row.update(baseline=best[0], baseline_ms=round(best[1], 5), max_abs_diff_vs_baseline=round(best[2], 5),
                   verified=best[2] <= (2e-2 if dtype == torch.bfloat16 else 4e-3))
    else:
        row.update(baseline="torch SDPA (none of its backends ran this case)")
    row["tbps"] = round(inputs.bytes_per_call / (ours_ms * 1e-3) / 1e12, 3)
    flops = 4 * d * hq * visible_pairs(case, inputs.tree)
    row["tflops"] = round(flops / (ours_ms * 1e-3) / 1e12, 2)
    if case.phase != "decode" and _kernels.sm90_attention_rejection(inputs.q[0]) is None:
        # The Hopper kernels (wgmma), opt-in until measured: their time beside the generic one's.
        sm90_calls = [lambda i=i: _kernels.attention(inputs.q[i], inputs.k[i], inputs.v[i], scale, mask, sm90=True)
                      for i in range(inputs.copies)]
        sm90_diff = (sm90_calls[0]().float() - ours_out.float()).abs().max().item()
        sm90_ms, _ = graph_ms(sm90_calls, repeats)
        row.update(sm90_ms=round(sm90_ms, 5), sm90_tflops=round(flops / (sm90_ms * 1e-3) / 1e12, 2),
                   sm90_max_abs_diff_vs_ours=round(sm90_diff, 5),
                   sm90_splits=_kernels.attention_splits(case.tokens, case.seqlen, hq, hkv, mask is not None, device,
                                                         sm90=True))
        if best is not None:
            row["sm90_speedup_vs_baseline"] = round(best[1] / sm90_ms, 3)
    if case.phase != "prefill" and _kernels.invariant_rejection(inputs.q[0], inputs.k[0], mask) is None:
        # The row-invariant mode the engine's target model runs (decoded == verified, bitwise),
        # chunked for a cache of INVARIANT_SPAN slots (or the case's length, if longer).
        chunk = _kernels.invariant_chunk_tiles(max(INVARIANT_SPAN, case.seqlen), hq, hkv, device)

        def invariant(sm90: bool) -> tuple[torch.Tensor, float]:
            calls = [lambda i=i: _kernels.attention(inputs.q[i], inputs.k[i], inputs.v[i], scale, mask,
                                                    chunk_tiles=chunk, sm90=sm90) for i in range(inputs.copies)]
            return calls[0](), graph_ms(calls, repeats)[0]

        inv_out, inv_ms = invariant(False)
        inv_diff = (inv_out.float() - ours_out.float()).abs().max().item()
        row.update(invariant_ms=round(inv_ms, 5), invariant_chunk_tiles=chunk,
                   invariant_over_ours=round(inv_ms / ours_ms, 3), invariant_max_abs_diff_vs_ours=round(inv_diff, 5))
        if (_kernels.sm90_attention_rejection(inputs.q[0]) is None
                and _kernels.invariant_rejection(inputs.q[0], inputs.k[0], mask, sm90=True) is None):
            # The same mode on the Hopper kernels (EDGESPEC_SM90_ATTENTION=1 sends a target's decode
            # steps and trees there). Whether its bits equal the generic kernels' says whether
            # wgmma rounds like mma.sync on this GPU (they agree on the emulator, where only the
            # two instructions can differ): if so, decode could stay generic under sm90 trees.
            sm90_out, sm90_ms = invariant(True)
            row.update(sm90_invariant_ms=round(sm90_ms, 5), sm90_invariant_over_ours=round(sm90_ms / ours_ms, 3),
                       sm90_invariant_bitwise_equals_generic=bool(torch.equal(sm90_out, inv_out)),
                       sm90_invariant_max_abs_diff_vs_generic=round((sm90_out.float() - inv_out.float()).abs().max().item(), 5))
    if case.phase == "decode":
        row["pct_measured_bw"] = round(100 * row["tbps"] / dram_tbps, 1)
    return row


# Tree / decode ratios of a tree row (pair_trees_with_decodes): ratio column -> (the tree row's
# time, the decode row's time at the same context, what the ratio times). The engine's target
# model runs a row-invariant one.
TREE_RATIOS = {"tree_over_decode": ("ours_ms", "ours_ms", "generic"),
               "sm90_tree_over_decode": ("sm90_ms", "ours_ms", "sm90 vs generic decode"),
               "invariant_tree_over_decode": ("invariant_ms", "invariant_ms", "generic invariant"),
               "sm90_invariant_tree_over_decode": ("sm90_invariant_ms", "sm90_invariant_ms", "sm90 invariant")}


def row_context(row: dict) -> int:
    """A row's context: the committed prefix (decode, tree) or the prompt length (prefill)."""
    return row["seqlen"] if row["phase"] == "prefill" else row["seqlen"] - row["tokens"]


def pair_trees_with_decodes(rows: list[dict]) -> None:
    """Give every tree row the decode step's time at its model and context and the TREE_RATIOS of
    the columns both rows have."""
    decodes = {(r["case"].split()[0], row_context(r)): r for r in rows if r.get("phase") == "decode"}
    for r in rows:
        decode = decodes.get((r["case"].split()[0], row_context(r))) if r.get("phase") == "tree" else None
        if decode is None:
            continue
        r["decode_ms_same_context"] = decode["ours_ms"]
        for ratio, (tree_ms, decode_ms, _) in TREE_RATIOS.items():
            if tree_ms in r and decode_ms in decode:
                r[ratio] = round(r[tree_ms] / decode[decode_ms], 3)


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets (H100/H200), as lines saying met / missed for every row they apply to:
    decode at 4K-128K >= 1.3x SDPA and >= 80% of the measured DRAM bandwidth; prefill at 4K-32K
    >= 1.0x SDPA (the faster of the generic and sm90 kernels); a 64-token tree at 4K-32K <= 1.3x the
    decode step at the same context (the best of the kernels and modes timed, and separately the
    best row-invariant one: what greedy speculative decoding runs)."""
    lines = []
    for r in rows:
        if "error" in r or "ours_ms" not in r:
            continue
        phase, context = r["phase"], row_context(r)
        if phase == "decode" and 4096 <= context <= 131072 and "baseline_ms" in r:
            lines.append(target_line(f"{r['case']} vs {r['baseline']}", r["baseline_ms"] / r["ours_ms"], 1.3))
            lines.append(target_line(f"{r['case']} bandwidth", r["pct_measured_bw"], 80, "%"))
        elif phase == "prefill" and 4096 <= context <= 32768 and "baseline_ms" in r:
            kernels = {"generic": r["ours_ms"]} | ({"sm90": r["sm90_ms"]} if "sm90_ms" in r else {})
            best = min(kernels, key=kernels.get)
            lines.append(target_line(f"{r['case']} ({best} kernels) vs {r['baseline']}",
                                     r["baseline_ms"] / kernels[best], 1.0))
        elif phase == "tree" and 4096 <= context <= 32768 and r["tokens"] == TREE_TOKENS:
            ratios = {name: r[key] for key, (_, _, name) in TREE_RATIOS.items() if key in r}
            for label, names in (("best", list(ratios)), ("row-invariant", [n for n in ratios if "invariant" in n])):
                if names:
                    best = min(names, key=ratios.get)
                    lines.append(target_line(f"{r['case']} / decode, {label} ({best})", ratios[best], 1.3, at_most=True))
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--phases", default="decode,prefill,tree")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="a few contexts per phase (smoke run)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit (needs no GPU)")
    args = ap.parse_args()
    models = args.models.split(",")
    phases = args.phases.split(",")
    unknown = [m for m in models if m not in MODELS] + [p for p in phases if p not in CONTEXTS]
    if unknown:
        ap.error(f"unknown model/phase {unknown}; models: {list(MODELS)}, phases: {list(CONTEXTS)}")
    todo = cases(models, phases, args.quick)
    if args.list:
        for c in todo:
            print(f"{c.name}: T={c.tokens} S={c.seqlen} heads={c.heads}")
        return 0
    if not torch.cuda.is_available() or ops.compiled_module() is None:
        print("bench_attention: needs a CUDA GPU and edgespec built with its CUDA extension; nothing measured")
        return EXIT_SKIPPED
    device = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    dram_tbps = measure_dram_tbps(device)
    print(f"{torch.cuda.get_device_name(device)}: measured DRAM copy bandwidth {dram_tbps:.2f} TB/s")
    rows = []
    with Interruptible() as run:
        for case in todo:
            row = run_case(case, dtype, device, args.repeats, l2_bytes, dram_tbps)
            rows.append(row)
            print({k: row[k] for k in ("case", "ours_ms", "baseline", "baseline_ms", "speedup", "tbps", "tflops",
                                       "sm90_ms", "sm90_tflops")
                   if k in row} if "error" not in row else row, flush=True)
            torch.cuda.empty_cache()
    pair_trees_with_decodes(rows)
    notes = (f"{args.dtype}; ours = edgespec attention kernels via edgespec.ops._kernels.attention (KV-cache layout "
             f"[S, Hkv, D]); baseline = fastest torch SDPA backend that runs the case, native GQA where supported, "
             f"[1, H, S, D] layout; CUDA events around CUDA-graph replays of `copies` calls on distinct inputs "
             f"(> 3x L2), median of {args.repeats} replays / copies; tree = {TREE_TOKENS} random-tree tokens; "
             f"context = committed prefix (prompt length for prefill)")
    path = write_result("attention", device, rows, notes, dtype=args.dtype, measured_dram_tbps=round(dram_tbps, 3),
                        targets=targets(rows), **run.marker(len(rows), len(todo)))
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
