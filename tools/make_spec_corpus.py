"""Assemble the offline training corpus for draft heads and FR-Spec vocabularies.

Writes into OUT:
  text/botchan.txt          the English novel inside the sentencepiece sdist (pip download)
  text/python-docs.txt      prose from Debian's python3.11-doc (apt-get install python3.11-doc)
  text/python-stdlib.txt    a sample of the Python standard library sources
  prompts.jsonl             chat prompts {"prompt": ...} for self-distillation: templates x topics,
                            plus "summarise this passage" / "explain this code" built from the text
  prompts-broad.jsonl       instruction styles x words of the tokenizer's vocabulary, stdlib modules
                            and passages of the corpora
  prompts-natural.jsonl     everyday request forms x everyday subjects
  prompts-continue.jsonl    text openings the target continues without the chat template
                            ({"prompt": ..., "chat": false}): starts of corpus paragraphs, stdlib
                            definitions, and opening forms x everyday subjects

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


# A second, broader set: instruction styles x words from the tokenizer's own vocabulary, standard
# library modules, and passages of the corpora. Self-distillation generalises with the variety of
# the prompts far more than with their number (a narrow set is memorised).
WORD_TEMPLATES = [
    "Write a short story that includes the word '{w}'.", "What does the word '{w}' mean? Use it in a sentence.",
    "Write a haiku about {w}.", "Give me a fun fact related to {w}.", "Write a tweet about {w}.",
    "Explain the concept of {w} to a beginner.", "Write a two-line rhyme about {w}.",
    "Describe {w} in three sentences.", "Brainstorm five names for a company about {w}.",
    "Write a short dialogue between two friends about {w}.", "Give three tips related to {w}.",
    "Write a riddle whose answer is '{w}'.", "How would a scientist describe {w}?",
    "Write an encouraging message that mentions {w}.", "Compose a short product description for {w}.",
    "Tell me a joke about {w}.", "Write a diary entry about {w}.", "What questions would a child ask about {w}?",
    "List synonyms and antonyms of '{w}'.", "Write a news headline and a short summary about {w}.",
]
MODULE_TEMPLATES = [
    "What is the Python {m} module used for?", "Show a small example of using Python's {m} module.",
    "What are common mistakes when using the {m} module in Python?",
]
GENERAL = [
    "How do I make a cup of tea?", "What is the meaning of life?", "Can you help me plan a trip to Japan?",
    "What are the benefits of reading books?", "How do I stay motivated when studying?",
    "Write an email asking my manager for a day off.", "What is the difference between weather and climate?",
    "How do airplanes stay in the air?", "Give me a simple recipe for pancakes.", "Why do cats purr?",
    "How can I improve my handwriting?", "What is a good way to learn math?", "Tell me about the moon landing.",
    "Write a motivational speech for a sports team.", "How do I start running?", "What makes a good leader?",
]


# A third set in the style of real chat requests: everyday task and question forms x everyday
# subjects (none of them the benchmark's; see bench/python/bench_spec.py).
NATURAL_TEMPLATES = [
    "How does {t} work?", "What is the difference between {t} and {u}?", "Can you explain {t} in a few sentences?",
    "Give me three ideas related to {t}.", "Write a short email to a friend about {t}.",
    "What are the most common questions people have about {t}?",
    "I want to learn about {t}. Where should I start?", "Summarize what you know about {t}.",
    "What would happen if {t} disappeared tomorrow?", "Compare {t} and {u} in a short table.",
    "Write a short story for kids about {t}.", "What are five tips for someone interested in {t}?",
    "Describe {t} to someone who has never heard of it.", "Why do people like {t}?",
    "Write a short speech about {t}.", "What are the advantages and disadvantages of {t}?",
    "Tell me something surprising about {t}.", "Write a product review about {t}.",
    "How has {t} changed over the last hundred years?", "Create a short quiz with three questions about {t}.",
    "Explain {t} step by step.", "Write a motivational quote about {t}.", "Is {t} good or bad? Explain.",
    "What jobs are related to {t}?", "Plan a one-day itinerary themed around {t}.",
    "Write a conversation between a teacher and a student about {t}.", "What is a fun weekend project about {t}?",
    "Explain the science behind {t}.", "Write a social media post announcing an event about {t}.",
    "What should a beginner know about {t}?", "Give an analogy that explains {t}.",
]
NATURAL_SUBJECTS = [
    "tea", "chocolate", "pizza", "sushi", "yoga", "running", "swimming", "football", "tennis", "basketball",
    "the piano", "the violin", "drums", "photography", "painting", "knitting", "pottery", "origami", "poetry",
    "novels", "comic books", "movies", "theater", "podcasts", "radio", "newspapers", "television", "cameras",
    "laptops", "keyboards", "printers", "robots", "drones", "satellites", "rockets", "telescopes", "microscopes",
    "batteries", "solar panels", "wind turbines", "nuclear power", "electric bikes", "trucks", "boats",
    "submarines", "helicopters", "hot air balloons", "traffic lights", "roads", "tunnels", "castles", "temples",
    "farms", "forests", "rivers", "lakes", "mountains", "islands", "caves", "beaches", "snow", "rain", "wind",
    "lightning", "the sun", "stars", "comets", "Jupiter", "Saturn", "the Milky Way", "atoms", "molecules",
    "chemistry", "physics", "biology", "geology", "astronomy", "algebra", "geometry", "statistics",
    "probability", "economics", "psychology", "philosophy", "sociology", "law", "medicine", "nursing",
    "dentistry", "nutrition", "vitamins", "water", "salt", "sugar", "bread", "cheese", "eggs", "apples",
    "bananas", "tomatoes", "potatoes", "rice", "pasta", "soup", "salad", "spices", "vegetarian food",
    "camels", "elephants", "lions", "wolves", "foxes", "rabbits", "horses", "cows", "chickens", "frogs",
    "snakes", "turtles", "sharks", "dolphins", "octopuses", "ants", "butterflies", "spiders", "trees",
    "flowers", "cactus plants", "bamboo", "moss", "money", "banks", "credit cards", "taxes", "insurance",
    "shopping", "advertising", "marketing", "startups", "small businesses", "teamwork", "meetings",
    "email etiquette", "negotiation", "leadership", "habits", "goals", "stress", "happiness", "gratitude",
    "patience", "courage", "curiosity", "creativity", "memory", "dreams", "emotions", "families", "grandparents",
    "neighbors", "weddings", "holidays", "birthdays", "travel", "hotels", "airports", "maps", "languages",
    "alphabets", "calendars", "clocks", "numbers", "music festivals", "concerts", "dancing", "singing",
    "cooking at home", "cleaning the house", "moving to a new city", "learning to drive", "first aid",
    "fire safety", "passwords", "malware", "spreadsheets", "websites", "search engines", "algorithms",
    "programming", "JavaScript", "Linux", "open source software", "cloud computing", "artificial intelligence",
    "chatbots", "virtual reality", "3D printing", "the stock market", "cities", "villages", "schools",
    "universities", "homework", "exams", "teachers", "libraries at night", "board games", "puzzles", "magic tricks",
]


def natural_prompts(rng: random.Random, count: int) -> list[str]:
    out = set()
    while len(out) < count:
        t, u = rng.sample(NATURAL_SUBJECTS, 2)
        out.add(rng.choice(NATURAL_TEMPLATES).format(t=t, u=u))
    out = sorted(out)
    rng.shuffle(out)
    return out


def _tokenizer_words(limit: int, rng: random.Random) -> list[str]:
    """Plain English words the demo tokenizer has as single tokens (its vocabulary is local)."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
        from edgespec.loading import Tokenizer, open_checkpoint  # noqa: PLC0415

        _, _, tok_dir, tok_gguf = open_checkpoint("demo")
        vocab = Tokenizer.from_pretrained(tok_dir, gguf_file=tok_gguf).hf.get_vocab()
    except Exception as exc:  # the demo model may be unavailable: this source is optional
        print(f"no tokenizer words ({exc}); skipping", file=sys.stderr)
        return []
    words = sorted({t[1:] for t in vocab if t.startswith("\u0120") and t[1:].isalpha() and t[1:].islower()
                    and 5 <= len(t) - 1 <= 12})
    rng.shuffle(words)
    return words[:limit]


def broad_prompts(rng: random.Random, prose: list[str], code_modules: list[str], words: int) -> list[str]:
    out = list(GENERAL)
    for w in _tokenizer_words(words, rng):
        out.append(rng.choice(WORD_TEMPLATES).format(w=w))
    for m in code_modules:
        out.append(rng.choice(MODULE_TEMPLATES).format(m=m))
    for p in prose:
        sentence = p.split(". ")[0][:300]
        out.append(rng.choice(["Continue this story: ", "Rewrite this more simply: ", "What is happening here? ",
                               "Explain this sentence: "]) + sentence)
    rng.shuffle(out)
    return out


# Openings of everyday text forms for prompts-continue.jsonl (subjects: NATURAL_SUBJECTS).
OPENING_TEMPLATES = [
    "{T} is", "The history of {t} is", "There are many reasons why people enjoy {t}.",
    "Here are five facts about {t}:\n\n1.", "To get started with {t}, you", "Most people think of {t} as",
    "Chapter 1\n\nNobody in the town had ever seen {t} like this before.", "My grandmother always said that {t}",
    "Q: What is the best thing about {t}?\nA:", "# A beginner's guide to {t}\n\n", "The report on {t} found that",
    "Once upon a time, a little girl who loved {t}", "In this article, we will look at {t} and",
    "When I first tried {t}, I", "{T} and {u} have more in common than you might think.",
    "Step 1: Learn the basics of {t}.", "The museum's new exhibit about {t}", "Scientists studying {t} have",
]


def continuation_prompts(rng: random.Random, prose: list[str], stdlib: str, count: int) -> list[dict]:
    """Text openings (no chat template): a third from corpus paragraphs (their first 6-24 words), a
    third the first lines of stdlib definitions, a third opening forms x everyday subjects."""
    third = count // 3
    out = []
    for para in rng.sample(prose, min(third, len(prose))):
        words = para.split()
        out.append(" ".join(words[:rng.randint(6, min(24, len(words)))]))
    lines = stdlib.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "class "))]
    for i in rng.sample(starts, min(third, len(starts))):
        out.append("\n".join(lines[i:i + rng.randint(1, 3)]) + "\n")
    while len(out) < count:
        t, u = rng.sample(NATURAL_SUBJECTS, 2)
        out.append(rng.choice(OPENING_TEMPLATES).format(t=t, u=u, T=t[:1].upper() + t[1:]))
    rng.shuffle(out)
    return [{"prompt": o, "chat": False} for o in out]


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
    ap.add_argument("--broad-words", type=int, default=1200, help="tokenizer words for prompts-broad.jsonl")
    ap.add_argument("--natural-prompts", type=int, default=2000, help="size of prompts-natural.jsonl")
    ap.add_argument("--continue-prompts", type=int, default=1500, help="size of prompts-continue.jsonl")
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
    modules = sorted(f.stem for f in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if not f.stem.startswith("_"))
    broad = broad_prompts(rng, prose[args.derived_prompts:args.derived_prompts + 300], modules, args.broad_words)
    with open(args.out / "prompts-broad.jsonl", "w", encoding="utf-8") as f:
        for p in broad:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {args.out / 'prompts-broad.jsonl'} ({len(broad)} prompts)", file=sys.stderr)
    natural = natural_prompts(rng, args.natural_prompts)
    with open(args.out / "prompts-natural.jsonl", "w", encoding="utf-8") as f:
        for p in natural:
            f.write(json.dumps({"prompt": p}) + "\n")
    print(f"wrote {args.out / 'prompts-natural.jsonl'} ({len(natural)} prompts)", file=sys.stderr)
    # Its own generator, so adding this set left the earlier files as they were for the same seed.
    cont = continuation_prompts(random.Random(args.seed + 1), _paragraphs(sources["python-docs.txt"] or "", 80, 2000)
                                + _paragraphs(botchan or "", 80, 2000), sources["python-stdlib.txt"],
                                args.continue_prompts)
    with open(args.out / "prompts-continue.jsonl", "w", encoding="utf-8") as f:
        for item in cont:
            f.write(json.dumps(item) + "\n")
    print(f"wrote {args.out / 'prompts-continue.jsonl'} ({len(cont)} openings)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
