"""Assemble the offline training corpus for draft heads and FR-Spec vocabularies.

Writes into OUT:
  text/botchan.txt          the English novel inside the sentencepiece sdist (pip download)
  text/python-docs.txt      prose from Debian's python3.11-doc (apt-get install python3.11-doc)
  text/python-stdlib.txt    a sample of the Python standard library sources
  prompts.jsonl             chat prompts {"prompt": ...} for self-distillation: templates x topics,
                            plus "summarise this passage" / "explain this code" built from the text

Every source is local; missing ones are skipped with a message. The benchmark prompts in
bench/python/bench_spec.py are deliberately not among these topics.

    python tools/make_spec_corpus.py --out /tmp/spec_corpus [--sentencepiece-sdist FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from pathlib import Path

TOPICS = [
    "photosynthesis", "the water cycle", "volcanoes", "black holes", "the immune system", "plate tectonics",
    "the Roman Empire", "the Industrial Revolution", "ancient Egypt", "the printing press", "the Silk Road",
    "machine learning", "binary search", "recursion", "hash tables", "the TCP/IP model", "public-key cryptography",
    "compound interest", "inflation", "supply and demand", "renewable energy", "electric cars", "recycling",
    "healthy sleep habits", "learning a new language", "time management", "public speaking", "meditation",
    "the French Revolution", "Shakespeare", "jazz music", "the Olympic Games", "chess openings", "gardening",
    "baking bread", "coffee", "honeybees", "whales", "rainforests", "deserts", "glaciers", "earthquakes",
    "the human heart", "vaccines", "antibiotics", "DNA", "evolution", "the solar system", "Mars", "the Moon",
    "electricity", "magnetism", "gravity", "the speed of light", "rainbows", "clouds", "hurricanes",
    "the internet", "smartphones", "video games", "social media", "remote work", "budgeting", "saving money",
    "writing a resume", "job interviews", "friendship", "kindness", "climate change", "ocean tides",
    "dinosaurs", "the Great Wall of China", "pyramids", "democracy", "libraries", "museums", "bicycles",
    "trains", "airplanes", "bridges", "skyscrapers", "cats", "dogs", "owls", "penguins", "mushrooms",
    "Python lists", "sorting algorithms", "databases", "version control with git", "unit testing",
]

TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short paragraph about {t}.",
    "Give me a brief overview of {t}.",
    "Why is {t} important?",
    "Write a short poem about {t}.",
    "What is the history of {t}?",
    "How would you explain {t} to a child?",
    "List some common misconceptions about {t}.",
    "What are the pros and cons of {t}?",
]


def _botchan(sdist: Path | None, work: Path) -> str | None:
    if sdist is None:
        print("downloading the sentencepiece sdist for botchan.txt ...", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "sentencepiece", "-d", str(work)], capture_output=True, text=True)
        found = sorted(work.glob("sentencepiece-*.tar.gz"))
        if proc.returncode != 0 or not found:
            print("  could not download it; skipping botchan.txt", file=sys.stderr)
            return None
        sdist = found[0]
    with tarfile.open(sdist) as tf:
        member = next((m for m in tf.getmembers() if m.name.endswith("test/botchan.txt")), None)
        if member is None:
            return None
        return tf.extractfile(member).read().decode("utf-8", errors="replace")


def _python_docs(limit_chars: int) -> str | None:
    root = Path("/usr/share/doc/python3.11/html/_sources")
    if not root.is_dir():
        print("python3.11-doc is not installed (apt-get install python3.11-doc); skipping", file=sys.stderr)
        return None
    parts, total = [], 0
    for f in sorted(root.rglob("*.rst.txt")):
        if "whatsnew" in f.parts or "c-api" in f.parts:  # changelogs and C API tables are unlike chat text
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= limit_chars:
            break
    return "\n\n".join(parts)


def _stdlib(limit_chars: int, rng: random.Random) -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in sorted(root.glob("*.py")) if f.stat().st_size < 60_000]
    rng.shuffle(files)
    parts, total = [], 0
    for f in files:
        parts.append(f.read_text(encoding="utf-8", errors="replace"))
        total += len(parts[-1])
        if total >= limit_chars:
            break
    return "\n\n".join(parts)


def _paragraphs(text: str, min_len: int, max_len: int) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if min_len <= len(p) <= max_len]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--sentencepiece-sdist", type=Path, default=None, help="a local sentencepiece-*.tar.gz")
    ap.add_argument("--docs-chars", type=int, default=2_000_000)
    ap.add_argument("--stdlib-chars", type=int, default=600_000)
    ap.add_argument("--derived-prompts", type=int, default=120, help="summarise/explain prompts built from the text")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    text_dir = args.out / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        botchan = _botchan(args.sentencepiece_sdist, Path(work))
    sources = {"botchan.txt": botchan, "python-docs.txt": _python_docs(args.docs_chars),
               "python-stdlib.txt": _stdlib(args.stdlib_chars, rng)}
    for name, text in sources.items():
        if text:
            (text_dir / name).write_text(text, encoding="utf-8")
            print(f"wrote {text_dir / name} ({len(text):,} chars)", file=sys.stderr)
    prompts = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    prose = _paragraphs((botchan or "") + "\n\n" + (sources["python-docs.txt"] or ""), 200, 700)
    rng.shuffle(prose)
    for p in prose[:args.derived_prompts // 2]:
        prompts.append(f"Summarize the following passage in two sentences:\n\n{p}")
    code = _paragraphs(sources["python-stdlib.txt"].replace("\n    ", "\n\n    "), 150, 600)
    code = [c for c in code if "def " in c or "class " in c]
    rng.shuffle(code)
    for c in code[:args.derived_prompts // 2]:
        prompts.append(f"What does this Python code do?\n\n{c}")
    rng.shuffle(prompts)
    with open(args.out / "prompts.jsonl", "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {args.out / 'prompts.jsonl'} ({len(prompts)} prompts)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
