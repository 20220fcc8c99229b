"""End-to-end generation: edgespec (plain decoding) vs Hugging Face transformers `generate`.

Same model weights (the demo GGUF, which transformers loads through its own GGUF reader), same
prompts, same dtype, greedy, the same number of new tokens (EOS ignored on both sides), measured in
one run, alternating the two engines per repeat so drift in machine load hits both alike. On a
GPU each row also records edgespec with its decode steps replayed as CUDA graphs
(edgespec.cuda_graphs, opt-in): graphs_ms, graphs_tokens_per_s, and whether its tokens equal the
eager run's (graphs_same_tokens), and the price of the row-invariant kernels (the same run with
EDGESPEC_ROW_INVARIANT=0: without_row_invariance_ms, row_invariance_cost = ours / that).

    python bench/python/bench_e2e.py [--model PATH] [--device cpu|cuda] [--dtype bf16|fp32] [--new-tokens 128]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import GGUF_WEIGHTS, Interruptible, environment, median, projection_weights, time_cpu, write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading import default_dtype, resolve_device  # noqa: E402
from edgespec.loading.demo import demo_model_path  # noqa: E402

PROMPTS = [
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse.",
    "The history of the printing press begins",
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def graph_row(graphed: "edgespec.LLM", ids: list[int], n: int, repeats: int, eager_tokens: list[int]) -> dict:
    """The CUDA-graph columns of one row (or the error that kept the graphs from running)."""
    try:
        tokens = graphed.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids  # captures on first use
        seconds = median(time_cpu(lambda: graphed.generate(ids, max_new_tokens=n, ignore_eos=True), repeats))
    except Exception as exc:  # noqa: BLE001 - a failed capture is a result to record, not a crash
        return {"graphs_error": f"{type(exc).__name__}: {exc}"[:300]}
    return {"graphs_ms": round(seconds * 1e3, 2), "graphs_tokens_per_s": round(n / seconds, 2),
            "graphs_same_tokens": tokens == eager_tokens}


def invariance_row(run_ours, repeats: int, ours_ms: float) -> dict:
    """The price of the row-invariant kernels (EDGESPEC_ROW_INVARIANT, on by default): the same
    generation with cuBLAS projections and the heuristic attention splits instead."""
    with environment("EDGESPEC_ROW_INVARIANT", "0"):
        seconds = median(time_cpu(run_ours, repeats))
    return {"without_row_invariance_ms": round(seconds * 1e3, 2),
            "row_invariance_cost": round(ours_ms / (seconds * 1e3), 3)}


def load_transformers(gguf: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: the demo model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: edgespec's default for the device")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf-weights", default="auto", choices=list(GGUF_WEIGHTS),
                    help="edgespec's Q4 projections 4-bit or dequantised (default: the device's default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for both engines (default: torch's); 1 is steadier on a shared machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    gguf = Path(args.model) if args.model else demo_model_path()
    llm = edgespec.LLM.load(str(gguf), device=str(device), dtype=dtype, max_context=2048, draft=None,
                            quantized=GGUF_WEIGHTS[args.gguf_weights])
    llm.prefix_caching = False  # every run prefills its whole prompt, as the baseline's does
    graphed = None
    if device.type == "cuda":  # the same weights, decode steps as CUDA graphs (its own cache)
        from edgespec.generation import PlainDecoding
        from edgespec.loading import LoadedModel

        graphed = edgespec.LLM(LoadedModel(llm.model, llm.tokenizer, llm.name),
                               strategy=lambda m, c: PlainDecoding(m, c, cuda_graph=True))
        graphed.prefix_caching = False
    hf = load_transformers(gguf, dtype, device)
    n = args.new_tokens
    rows = []
    with Interruptible() as run:
        for prompt in PROMPTS:
            ids = llm.encode(prompt, chat=True)
            hf_ids = torch.tensor([ids], device=device)

            def run_ours() -> list[int]:
                return llm.generate(ids, max_new_tokens=n, ignore_eos=True).token_ids

            def run_hf() -> list[int]:
                with torch.inference_mode():
                    out = hf.generate(hf_ids, attention_mask=torch.ones_like(hf_ids), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
                return out[0, len(ids):].tolist()

            ours_t, hf_t = [], []
            for _ in range(args.repeats):  # alternate so load drift affects both engines alike
                ours_t += time_cpu(run_ours, 1, warmup=0 if ours_t else 1)
                hf_t += time_cpu(run_hf, 1, warmup=0 if hf_t else 1)
            same = run_ours() == run_hf()
            ours_s, hf_s = median(ours_t), median(hf_t)
            rows.append({
                "case": f"smollm2-135m {str(dtype).removeprefix('torch.')} greedy prompt={len(ids)} new={n}: {prompt[:32]}",
                "ours_ms": round(ours_s * 1e3, 2), "baseline": "transformers.generate",
                "baseline_ms": round(hf_s * 1e3, 2), "speedup": round(hf_s / ours_s, 3),
                "ours_tokens_per_s": round(n / ours_s, 2), "baseline_tokens_per_s": round(n / hf_s, 2),
                "same_tokens": same,
            })
            if graphed is not None:
                rows[-1].update(graph_row(graphed, ids, n, args.repeats, run_ours()))
            if device.type == "cuda":
                rows[-1].update(invariance_row(run_ours, args.repeats, rows[-1]["ours_ms"]))
            print(rows[-1], flush=True)
    notes = (f"Wall time of one whole generation (prefill of a chat-templated prompt + {n} greedy new tokens, "
             f"EOS ignored), median of {args.repeats} repeats after one warm-up, engines alternated; "
             f"tokens_per_s = new tokens / wall time. edgespec plain decoding (no speculation). "
             f"same_tokens: both engines produced identical token ids.")
    path = write_result("e2e_generate", device, rows, notes, model=gguf.name, dtype=str(dtype),
                        weights=projection_weights(llm.model),
                        **run.marker(len(rows), len(PROMPTS)))
    geo = 1.0
    for r in rows:
        geo *= r["speedup"]
    print(f"wrote {path}; geometric-mean speedup {geo ** (1 / max(len(rows), 1)):.3f}x")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
