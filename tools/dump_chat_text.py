"""Write the chat sequences of a `train-draft --cache` file as text (chat template included), one
conversation per paragraph: the target's own answers, for counting an FR-Spec vocabulary that
covers what the model actually says (`edgespec build-vocab --data chat.txt corpus/*.txt`).

    python tools/dump_chat_text.py --cache labelled.pt --model demo --out chat.txt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from edgespec.loading import Tokenizer, open_checkpoint  # noqa: E402
from edgespec.spec.train import load_sequences  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="a labelled-sequence cache written by edgespec train-draft")
    ap.add_argument("--model", required=True, help="the model whose tokenizer decodes the ids (path or 'demo')")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    _, _, tok_dir, tok_gguf = open_checkpoint(args.model)
    tok = Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf)
    chats = [s for s in load_sequences(args.cache) if s.kind.startswith("chat")]
    with open(args.out, "w", encoding="utf-8") as f:
        for s in chats:
            f.write(tok.decode(s.tokens.tolist(), skip_special_tokens=False) + "\n\n")
    print(f"wrote {args.out}: {len(chats)} conversations", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
