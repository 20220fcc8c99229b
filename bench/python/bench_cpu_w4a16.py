"""4-bit weights on the CPU: torch's int4 kernel on the 4-bit weights (edgespec/ops/w4a16_cpu.py,
what a GGUF Q4 model runs in bf16 on the CPU by default) against the same weights dequantised to
dense bf16 (`--gguf-weights dense`: the baseline), in the same run.

Two parts:
* model: the demo model (SmolLM2-135M-Instruct, Q4_1) loaded both ways. Rows: greedy decoding of
  --new-tokens tokens after a chat prompt (EOS ignored; wall time of the whole generation); the
  prefill of a ~1K-token prompt (time to first token: two chunks of more than INVARIANT_ROWS rows,
  which dequantise the 4-bit weights per call); one forward step of M = 1, 4, 13, 32 rows at
  context 256 (what a decode step, the default CPU draft tree, the default dense tree and a large
  tree cost: the int4 kernel's time grows with M sooner than a dense matmul's). Both engines
  alternate per repeat; medians. `weights_mb`: the bytes of the projection weights each engine
  keeps (4-bit: torch's packing, the scales and zeros, the kernel's scales and offsets).
* gemm: one projection of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes (q|k|v and gate|up
  fused as edgespec loads them), M = 1, 4, 16, 64 (the int4 kernel) and 512 (a prefill chunk:
  past ops.linear.INVARIANT_ROWS rows the weight is dequantised for the call and multiplied in one
  dense GEMM), random 4-bit weights with group-32 scales and zero points, kept in torch's packing
  alone as the loader keeps them (w4a16_cpu.prepare); each side cycles through enough weight
  copies (> 256 MB of bf16) that the weights stream from memory as between the layers of a model.

    python bench/python/bench_cpu_w4a16.py [--threads 1] [--new-tokens 128] [--repeats 3] [--skip-gemm]

Writes bench/results/cpu_w4a16-cpu.json (format: ../shared/STYLE.md, via benchlib). Exits 77
without torch's CPU int4 kernel.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from bench_w4a16 import MODELS  # noqa: E402
from benchlib import Interruptible, median, time_cpu, write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading.demo import demo_model_path  # noqa: E402
from edgespec.ops import DenseLinear  # noqa: E402
from edgespec.ops import w4a16_cpu  # noqa: E402
from edgespec.quant import Int4Weight, QuantLinear  # noqa: E402

EXIT_SKIPPED = 77
BASELINE = "edgespec dense bf16 (--gguf-weights dense)"
GEMM_BASELINE = "torch F.linear bf16"
PROMPTS = ["Explain why the sky is blue in two sentences.", "Write a short poem about a lighthouse.",
           "List three facts about the moon and one about the sun."]
LONG_TEXT = ("The lighthouse keeper climbed the spiral stairs each evening, trimmed the wick, polished the lens "
             "and wrote the weather in a leather log before the ships came round the point. ")
STEP_ROWS = (1, 4, 13, 32)
GEMM_ROWS = (1, 4, 16, 64, 512)
STREAM_BYTES = 256 * 2**20


def projection_bytes(model) -> int:
    """Bytes of the projection weights the model keeps (4-bit: both packings, scales, zeros)."""
    total = 0
    for layer in model.layers:
        for lin in (layer.qkv, layer.o, layer.ffn.gate_up, layer.ffn.down):
            if isinstance(lin, QuantLinear):
                total += lin.weight.nbytes()
                packed = lin.weight._cpu_int4  # torch's packing (the weight's own in the cpu layout), scales/offsets
                extra = [] if packed is None else [t for t in packed[:2] if t is not lin.weight.qweight]
                total += sum(t.numel() * t.element_size() for t in extra)
            elif isinstance(lin, DenseLinear):
                total += lin.weight.numel() * lin.weight.element_size()
    return total


def model_rows(args: argparse.Namespace) -> list[dict]:
    gguf = demo_model_path()
    engines = {}
    for name, quantized in (("4bit", True), ("dense", False)):
        llm = edgespec.LLM.load(str(gguf), device="cpu", dtype=torch.bfloat16, max_context=2048, draft=None,
                                quantized=quantized)
        llm.prefix_caching = False
        engines[name] = llm
    four, dense = engines["4bit"], engines["dense"]
    assert isinstance(four.model.layers[0].qkv, QuantLinear) and isinstance(dense.model.layers[0].qkv, DenseLinear)
    rows = []

    def compare(case: str, fn_ours, fn_base) -> dict:
        ours, base = [], []
        for i in range(args.repeats):  # alternate so load drift hits both alike
            ours += time_cpu(fn_ours, 1, warmup=1 if i == 0 else 0)
            base += time_cpu(fn_base, 1, warmup=1 if i == 0 else 0)
        o, b = median(ours), median(base)
        rows.append({"case": case, "ours_ms": round(o * 1e3, 2), "baseline": BASELINE, "baseline_ms": round(b * 1e3, 2),
                     "speedup": round(b / o, 3)})
        print(rows[-1], flush=True)
        return rows[-1]

    n = args.new_tokens
    for i, prompt in enumerate(PROMPTS):
        ids = four.encode(prompt, chat=True)
        same = four.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids == \
            dense.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids
        row = compare(f"smollm2-135m Q4_1 decode {n} tokens chat #{i} prompt={len(ids)}",
                      lambda: four.generate(ids, max_new_tokens=n, ignore_eos=True),
                      lambda: dense.generate(ids, max_new_tokens=n, ignore_eos=True))
        row.update(same_tokens=same, ours_tokens_per_s=round(n / (row["ours_ms"] / 1e3), 2),
                   baseline_tokens_per_s=round(n / (row["baseline_ms"] / 1e3), 2))

    long_ids = four.encode(LONG_TEXT * 28, chat=True)
    compare(f"smollm2-135m Q4_1 prefill {len(long_ids)} tokens (time to first token)",
            lambda: four.generate(long_ids, max_new_tokens=1), lambda: dense.generate(long_ids, max_new_tokens=1))

    context = 256
    tokens = torch.tensor(four.encode(LONG_TEXT * 12)[:context + max(STEP_ROWS)])
    assert tokens.numel() == context + max(STEP_ROWS)
    steps = {}
    for name, llm in engines.items():
        model, cache = llm.model, llm.model.new_cache(context + max(STEP_ROWS))
        with torch.no_grad():
            model.forward(tokens[:context], torch.arange(context), cache, 0)
        steps[name] = (model, cache)

    def step(name: str, m: int):
        model, cache = steps[name]

        def run_step():
            with torch.no_grad():
                model.forward(tokens[context:context + m], torch.arange(context, context + m), cache, context)
        return run_step

    for m in STEP_ROWS:
        compare(f"smollm2-135m Q4_1 forward M={m} at context {context}", step("4bit", m), step("dense", m))
    for r in rows:
        r["weights_mb"] = round(projection_bytes(four.model) / 2**20, 1)
        r["baseline_weights_mb"] = round(projection_bytes(dense.model) / 2**20, 1)
    return rows


def gemm_rows(args: argparse.Namespace) -> list[dict]:
    rows = []
    for model, (h, inter, hq, hkv, d, _) in MODELS.items():  # the GPU benchmark's shapes, group 32 here
        shapes = {"qkv": (h, (hq + 2 * hkv) * d), "o": (hq * d, h), "gate_up": (h, 2 * inter), "down": (inter, h)}
        for layer, (k, n) in shapes.items():
            gen = torch.Generator().manual_seed(k * 7 + n)
            copies = max(1, -(-STREAM_BYTES // (k * n * 2)))
            quant, dense = [], []
            for _ in range(copies):
                q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
                scales = torch.rand(k // 32, n, generator=gen) * 0.02 + 0.002
                zeros = torch.rand(k // 32, n, generator=gen) * 15
                lin = Int4Weight(q, scales, zeros, 32).to_linear(dtype=torch.bfloat16)
                lin.weight = w4a16_cpu.prepare(lin.weight, torch.bfloat16)  # stored as the loader stores it
                quant.append(lin)
                dense.append(lin.dequantize(torch.bfloat16))
            for m in GEMM_ROWS:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                ref = x.float() @ dense[0].float().t()
                err = float((quant[0](x).float() - ref).abs().max() / ref.abs().max())
                assert err < 2e-2, f"{model} {layer} M={m}: int4 path off by {err:.3g} of the output scale"
                state = {"i": 0}

                def ours():
                    state["i"] = (state["i"] + 1) % copies
                    return quant[state["i"]](x)

                def base():
                    state["i"] = (state["i"] + 1) % copies
                    return F.linear(x, dense[state["i"]])

                calls = max(copies, 8) if m <= 64 else 4  # a prefill chunk is compute-bound: no need to stream
                o = median(time_cpu(lambda: [ours() for _ in range(calls)], args.repeats)) / calls
                b = median(time_cpu(lambda: [base() for _ in range(calls)], args.repeats)) / calls
                rows.append({"case": f"{model} {layer} M={m}", "ours_ms": round(o * 1e3, 4), "baseline": GEMM_BASELINE,
                             "baseline_ms": round(b * 1e3, 4), "speedup": round(b / o, 3), "k": k, "n": n,
                             "ours_gb_per_s": round(k * n * 0.5 / o / 1e9, 2),
                             "baseline_gb_per_s": round(k * n * 2 / b / 1e9, 2), "max_rel_error": round(err, 5)})
                print(rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared machine)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-gemm", action="store_true", help="only the whole-model rows")
    args = ap.parse_args()
    if not w4a16_cpu.available():
        print("this torch has no CPU int4 kernel (aten._weight_int4pack_mm_for_cpu): nothing to measure")
        return EXIT_SKIPPED
    torch.set_num_threads(args.threads)
    started = time.time()
    rows: list[dict] = []
    with Interruptible() as run:
        rows += model_rows(args)
        if not args.skip_gemm:
            rows += gemm_rows(args)
    notes = (f"{args.threads} torch thread(s), bf16 activations. Model rows: the demo GGUF (Q4_1 projections, Q8_0 "
             f"tied embedding/LM head, which stays dense bf16 in both) loaded 4-bit (ours: torch's CPU int4 kernel) "
             f"and dequantised to dense bf16 (baseline), medians of {args.repeats} alternated repeats after a warm-up; "
             f"same_tokens: greedy outputs identical (both are the same 4-bit weights, rounded differently, so a near "
             f"tie may go either way). GEMM rows: one projection, random 4-bit weights (group 32 with zero points), "
             f"each side cycling through weight copies totalling >= {STREAM_BYTES >> 20} MB of bf16 so weights stream "
             f"from memory; gb_per_s = weight bytes (0.5 or 2 per weight) / time. {time.time() - started:.0f} s.")
    path = write_result("cpu_w4a16", "cpu", rows, notes, **run.marker(len(rows), None))
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
