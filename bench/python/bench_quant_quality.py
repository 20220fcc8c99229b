"""Quality of edgespec's 4-bit quantizers: perplexity of the demo model (SmolLM2-135M-Instruct) after
RTN and GPTQ quantization, against the weights they start from, on the same text and windows.

Baseline: the demo model as loaded (its GGUF weights dequantised to fp32), scored by edgespec. A
first row checks the scoring itself: transformers scores the same weights, text and windows (its
GGUF reader, Hugging Face's perplexity-guide loop), and the ratio must be 1 to rounding.

Text: docstrings of Python standard-library modules, which every Python ships (their wording
changes between Python versions: the JSON records the version). GPTQ calibrates on docstrings of
other modules than the ones it is scored on. SmolLM2's weights already sit on the GGUF's Q4_1 grid
(group 32), which flatters group 32 alone; group 128 measures the quantizers on a grid they do
not share.

    python bench/python/bench_quant_quality.py [--tokens 4096] [--window 1024] [--stride 512]
"""
from __future__ import annotations

import argparse
import ast
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading import LoadedModel  # noqa: E402
from edgespec.loading.demo import demo_model_path  # noqa: E402
from edgespec.perplexity import perplexity, window_plan  # noqa: E402
from edgespec.quant import QuantSettings, quantize_decoder, quantized_copy  # noqa: E402
from edgespec.quant.quantizer import calibration_batches  # noqa: E402

EVAL_MODULES = ("textwrap.py", "argparse.py", "difflib.py", "pathlib.py")
CALIBRATION_MODULES = ("collections/__init__.py", "inspect.py", "typing.py")
VARIANTS = [  # (label, settings)
    ("RTN g128 asym", QuantSettings("rtn", 128, sym=False)),
    ("RTN g32 asym", QuantSettings("rtn", 32, sym=False)),
    ("RTN g128 sym", QuantSettings("rtn", 128, sym=True)),
    ("GPTQ g128 asym", QuantSettings("gptq", 128, sym=False)),
    ("GPTQ g128 asym act-order", QuantSettings("gptq", 128, sym=False, act_order=True)),
    ("GPTQ g32 asym", QuantSettings("gptq", 32, sym=False)),
]


def docstrings(modules: tuple[str, ...]) -> str:
    """The longer docstrings of some standard-library modules, joined by blank lines."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in modules:
        for node in ast.walk(ast.parse((root / name).read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
    return "\n\n".join(docs)


def transformers_perplexity(gguf: Path, ids: list[int], window: int, stride: int) -> float:
    """Hugging Face's perplexity-guide loop over edgespec's windows, on transformers' own GGUF load."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in window_plan(len(ids), window, stride):
            logits = model(torch.tensor([ids[begin:end]])).logits[0].double()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[begin + 1:end])
            scored = logprobs.gather(1, targets[:, None]).squeeze(1)[first - begin - 1:]
            nll -= float(scored.sum())
            count += scored.numel()
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of evaluation text")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per GPTQ calibration sequence")
    args = ap.parse_args()
    torch.manual_seed(0)
    gguf = demo_model_path(progress=True)
    llm = edgespec.LLM.load(str(gguf), device="cpu", dtype=torch.float32, max_context=args.window, draft=None)
    ids = llm.encode(docstrings(EVAL_MODULES))[:args.tokens]
    calib = calibration_batches(llm.encode(docstrings(CALIBRATION_MODULES)), args.seq_len, args.calibration_tokens)

    def score(model) -> tuple[float, float]:
        t0 = time.perf_counter()
        scored = edgespec.LLM(LoadedModel(model, llm.tokenizer, "variant"))
        return perplexity(scored, ids, window=args.window, stride=args.stride).perplexity, time.perf_counter() - t0

    base, base_s = score(llm.model)
    hf = transformers_perplexity(gguf, ids, args.window, args.stride)
    baseline = "the demo weights as loaded (GGUF dequantised to fp32), edgespec"
    rows = [{"case": "smollm2-135m fp32 scored by edgespec vs transformers", "perplexity": round(base, 4),
             "baseline": "transformers (same weights, text and windows)", "baseline_perplexity": round(hf, 4),
             "perplexity_ratio": round(base / hf, 6)}]
    print(f"edgespec {base:.4f} vs transformers {hf:.4f} ({base_s:.1f} s)", flush=True)
    for label, settings in VARIANTS:
        t0 = time.perf_counter()
        weights = quantize_decoder(llm.model, settings, calib if settings.method == "gptq" else ())
        quantize_s = time.perf_counter() - t0
        ppl, _ = score(quantized_copy(llm.model, weights))
        rows.append({"case": f"smollm2-135m W4A16 {label}", "perplexity": round(ppl, 4), "baseline": baseline,
                     "baseline_perplexity": round(base, 4), "perplexity_ratio": round(ppl / base, 4),
                     "quantize_s": round(quantize_s, 1)})
        print(f"{label}: {ppl:.4f} ({ppl / base:.3f}x, quantized in {quantize_s:.1f} s)", flush=True)
    notes = (f"Perplexity over the first {len(ids)} tokens of docstrings of {', '.join(EVAL_MODULES)} (Python "
             f"{platform.python_version()} standard library), windows of {args.window} tokens {args.stride} apart "
             f"(edgespec.perplexity: Hugging Face's sliding-window method). GPTQ calibration: {len(calib)} sequences "
             f"of up to {args.seq_len} tokens from docstrings of {', '.join(CALIBRATION_MODULES)}, dampening 0.01. "
             "perplexity_ratio = perplexity / baseline_perplexity (1 = no loss). The demo's weights already sit "
             "on a Q4_1 group-32 grid, which flatters group 32.")
    path = write_result("quant_quality", "cpu", rows, notes, model="SmolLM2-135M-Instruct Q4_1 (demo), fp32",
                        python=platform.python_version(), tokens=len(ids))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
