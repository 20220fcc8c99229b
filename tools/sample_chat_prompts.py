"""Write chat prompts the model writes itself (the Magpie method, as `train-draft --self-prompts`)
to a .jsonl prompt file, optionally steered by openers: each prompt starts with an opener drawn at
random from a file (one per line) and the model writes the rest. The file then serves as
`train-draft --prompts` (training) or `--val-prompts` (held out: sample it with another seed and
pass it to the training set's --exclude, or the other way round).

    python tools/sample_chat_prompts.py --model demo --count 1500 --openers tools/instruction-openers.txt \
        --seed 11 --exclude CORPUS/opened-val.jsonl --out CORPUS/opened-train.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import torch  # noqa: E402

from edgespec import LLM  # noqa: E402
from edgespec.spec.self_prompts import sample_user_prompts  # noqa: E402
from edgespec.spec.train import read_prompts  # noqa: E402


def read_openers(path: str) -> list[str]:
    """Non-empty lines, '#' comments skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    openers = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not openers:
        raise ValueError(f"{path}: no openers (one per line expected)")
    return openers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the chat model (path or 'demo')")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--out", required=True, help="the .jsonl prompt file to write")
    ap.add_argument("--openers", default=None, help="text file, one opener per line (default: none, unsteered)")
    ap.add_argument("--exclude", nargs="*", default=[], help="prompt files whose prompts must not come back")
    ap.add_argument("--temperature", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=64, help="longest user turn kept, in tokens")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    openers = read_openers(args.openers) if args.openers else []
    exclude = [p for f in args.exclude for p in read_prompts(f)]
    llm = LLM.load(args.model, draft=None, max_context=1024)
    prompts = sample_user_prompts(llm, args.count, temperature=args.temperature, max_tokens=args.max_tokens,
                                  batch=args.batch, seed=args.seed, exclude=exclude, openers=openers)
    with open(args.out, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p.text}) + "\n")
    print(f"wrote {args.out}: {len(prompts)} of {args.count} prompts", file=sys.stderr)
    return 0 if prompts else 1


if __name__ == "__main__":
    sys.exit(main())
