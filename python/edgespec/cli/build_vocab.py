"""`edgespec build-vocab`: an FR-Spec vocabulary (the most frequent token ids of local text)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("build-vocab", help="count token frequencies over local text and write an FR-Spec vocabulary",
                       description="Tokenise the --data files with the model's tokenizer, keep the --size most "
                                   "frequent token ids (special and end-of-sequence tokens always included) and "
                                   "write them, most frequent first, as JSON for --frspec-vocab.")
    b.add_argument("--model", required=True, help="the model whose tokenizer counts (directory, .gguf or 'demo')")
    b.add_argument("--data", nargs="+", required=True, help="text files")
    b.add_argument("--size", type=int, default=16384, help="number of token ids to keep (default 16384)")
    b.add_argument("--out", required=True, help="output .json file")
    b.set_defaults(func=run_build_vocab)


def run_build_vocab(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm  # noqa: PLC0415

    from ..loading import Tokenizer, open_checkpoint  # noqa: PLC0415
    from ..spec.frspec import count_tokens, save_vocab, select_vocab  # noqa: PLC0415
    from ..spec.train import read_texts  # noqa: PLC0415

    if args.size <= 0:
        raise ValueError(f"--size must be positive, got {args.size}")
    texts = read_texts(args.data)
    _, config, tok_dir, tok_gguf = open_checkpoint(args.model)
    tok = Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf, extra_stop_ids=config.eos_token_ids)
    vocab = config.vocab_size
    # Paragraphs keep the fast tokenizer quick on multi-megabyte files.
    paragraphs = (p for _, text in texts for p in text.split("\n\n"))
    counts = count_tokens(lambda s: tok.encode(s + "\n\n", add_special_tokens=False),
                          tqdm(paragraphs, desc="counting tokens", unit=" paragraphs"), vocab)
    special = set(int(i) for i in getattr(tok.hf, "all_special_ids", []) if i is not None and 0 <= int(i) < vocab)
    special |= {i for i in tok.stop_token_ids if 0 <= i < vocab}
    special |= {i for i in config.eos_token_ids if 0 <= i < vocab}
    if config.bos_token_id is not None and 0 <= int(config.bos_token_id) < vocab:
        special.add(int(config.bos_token_id))
    ids = select_vocab(counts, args.size, sorted(special))
    seen = int((counts > 0).sum())
    covered = float(counts[ids].sum()) / max(1, int(counts.sum()))
    path = save_vocab(args.out, ids, vocab, source_files=[Path(f).name for f in args.data],
                      counted_tokens=int(counts.sum()), distinct_tokens_seen=seen,
                      forced_special_ids=sorted(special), coverage=round(covered, 5))
    print(f"wrote {path}: {len(ids)} ids ({len(special)} special), covering {covered:.2%} of "
          f"{int(counts.sum()):,} counted tokens ({seen:,} distinct seen)", file=sys.stderr)
    return 0
