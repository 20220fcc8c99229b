"""Prefix caching: time to first token of each turn of a chat, with the previous turn's K/V kept
(edgespec's default) against a full prefill of the same prompt (prefix caching off: the baseline).

A conversation on the demo model whose system prompt carries tool definitions (a few hundred
tokens, as agents send every turn); each turn's prompt is the whole history so far, the chat
template applied. Per turn and repeat the two runs alternate, each right after the previous
turn's generation has left its tokens in the cache (the baseline ignores them). `speedup` =
baseline TTFT / cached TTFT; `same_tokens`: both produced identical output ids. With
--speculation the demo's EAGLE head drafts, so the head's cache is reused too.

A second set of rows ("after another request") puts an unrelated request between two turns (a chat
front end's title task, with its own system prompt), which overwrites the cache: ours parks the
previous turn's tokens on the host and copies them back (edgespec.prefix_store, the default); the
baseline keeps the live sequence only (a store of 0 bytes, EDGESPEC_PREFIX_STORE_MB=0).

    python bench/python/bench_prefix_cache.py [--device cpu|cuda] [--new-tokens 32] [--speculation]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python"))

from benchlib import Interruptible, median, projection_weights, write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading import default_dtype, resolve_device  # noqa: E402

TOOLS = [
    {"name": "get_weather", "description": "Current weather for a city: temperature, wind and sky.",
     "parameters": {"city": "string", "unit": "celsius or fahrenheit"}},
    {"name": "search_flights", "description": "Flights between two airports on a date, cheapest first.",
     "parameters": {"from": "IATA code", "to": "IATA code", "date": "YYYY-MM-DD", "passengers": "integer"}},
    {"name": "book_hotel", "description": "Reserve a hotel room; returns a confirmation number.",
     "parameters": {"city": "string", "check_in": "YYYY-MM-DD", "nights": "integer", "guests": "integer"}},
    {"name": "convert_currency", "description": "Convert an amount between two currencies at today's rate.",
     "parameters": {"amount": "number", "from": "ISO 4217 code", "to": "ISO 4217 code"}},
]
SYSTEM = ("You are a travel assistant. You can use these tools by answering with a JSON call:\n"
          + "\n".join(json.dumps(t) for t in TOOLS) + "\nBe brief and friendly.")
QUESTIONS = [
    "I want to visit Lisbon in May. What should I pack?",
    "What is the weather usually like there?",
    "Find me a cheap flight from Berlin.",
    "And a hotel for four nights, please.",
    "How much is 500 euros in dollars?",
]
OTHER_REQUEST = [{"role": "system", "content": "You write short, catchy titles for chats."},
                 {"role": "user", "content": "Write a five-word title for a chat about a trip to Lisbon."}]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: edgespec's default for the device")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--speculation", action="store_true", help="draft with the demo's EAGLE head")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared machine)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    llm = edgespec.LLM.load("demo", device=str(device), dtype=dtype, max_context=2048,
                            draft="auto" if args.speculation else None)
    n = args.new_tokens
    messages = [{"role": "system", "content": SYSTEM}]
    turns = []  # the prompt ids of each turn, the replies fixed by one greedy run
    for question in QUESTIONS:
        messages.append({"role": "user", "content": question})
        turns.append(llm.encode(messages))
        messages.append({"role": "assistant", "content": llm.generate(turns[-1], max_new_tokens=n).text})

    rows = []
    with Interruptible() as run:
        for t in range(1, len(turns)):
            ids, previous = turns[t], turns[t - 1]
            cached_s, full_s, cached_n, outputs = [], [], 0, {}
            for _ in range(args.repeats):
                for cached in (True, False):  # alternate so load drift hits both alike
                    llm.prefix_caching = True
                    llm.generate(previous, max_new_tokens=n)  # the previous turn leaves its tokens cached
                    llm.prefix_store.clear()  # and nothing else: no earlier run's sequence parked
                    llm.prefix_caching = cached
                    result = llm.generate(ids, max_new_tokens=n)
                    (cached_s if cached else full_s).append(result.stats.prefill_s)
                    outputs[cached] = result.token_ids
                    if cached:
                        cached_n = result.stats.cached_tokens
            llm.prefix_caching = True
            c, f = median(cached_s), median(full_s)
            rows.append({"case": f"turn {t + 1}: prompt {len(ids)} tokens, {cached_n} cached",
                         "ours_ms": round(c * 1e3, 2), "baseline": "the same prompt prefilled whole",
                         "baseline_ms": round(f * 1e3, 2), "speedup": round(f / c, 3),
                         "prompt_tokens": len(ids), "cached_tokens": cached_n,
                         "same_tokens": outputs[True] == outputs[False]})
            print(rows[-1], flush=True)
        other = llm.encode(OTHER_REQUEST)
        store_budget = llm.prefix_store.budget
        for t in range(1, len(turns)):
            ids, previous = turns[t], turns[t - 1]
            times, cached_n, outputs = {True: [], False: []}, 0, {}
            for _ in range(args.repeats):
                for parking in (True, False):
                    llm.prefix_store.budget = store_budget if parking else 0
                    llm.generate(previous, max_new_tokens=n)
                    llm.prefix_store.clear()  # only the previous turn's tokens are there to keep
                    llm.generate(other, max_new_tokens=8)  # the request in between
                    result = llm.generate(ids, max_new_tokens=n)
                    times[parking].append(result.stats.prefill_s)
                    outputs[parking] = result.token_ids
                    if parking:
                        cached_n = result.stats.cached_tokens
            llm.prefix_store.budget = store_budget
            c, f = median(times[True]), median(times[False])
            rows.append({"case": f"turn {t + 1} after another request: prompt {len(ids)} tokens, {cached_n} cached",
                         "ours_ms": round(c * 1e3, 2),
                         "baseline": "live-sequence prefix caching only (EDGESPEC_PREFIX_STORE_MB=0)",
                         "baseline_ms": round(f * 1e3, 2), "speedup": round(f / c, 3),
                         "prompt_tokens": len(ids), "cached_tokens": cached_n,
                         "same_tokens": outputs[True] == outputs[False]})
            print(rows[-1], flush=True)
    notes = (f"Time to first token (the prefill, up to and including the first token's choice: "
             f"GenerationStats.prefill_s) of each turn of a {len(QUESTIONS)}-turn chat on the demo model whose "
             f"system prompt lists {len(TOOLS)} tools, median of {args.repeats} repeats, runs alternated; each "
             f"run follows a generation of the previous turn's prompt ({n} new tokens). ours: prefix caching on "
             f"(the default); baseline: off. Speculation: {'the demo EAGLE head' if args.speculation else 'none'}. "
             f"same_tokens false means rounding flipped a near tie: the cached run computes the new rows in other "
             f"prefill chunks, which in bf16 can move a logit by one ulp (in fp32 the last logits of a 331-token "
             f"prompt agree to 3e-5 for every split point; measured ad hoc), as two chunk sizes of a full prefill do. "
             f"'after another request' rows: a {len(other)}-token unrelated request runs between the previous turn and "
             f"this one; ours parks and restores the previous turn's tokens (edgespec.prefix_store), the baseline "
             f"keeps the live sequence only.")
    path = write_result("prefix_cache_spec" if args.speculation else "prefix_cache", device, rows, notes,
                        model="SmolLM2-135M-Instruct (demo)",
                        dtype=str(dtype), weights=projection_weights(llm.model), speculation=args.speculation, **run.marker(len(rows), 2 * (len(turns) - 1)))
    print(f"wrote {path}")
    return run.exit_code


if __name__ == "__main__":
    sys.exit(main())
