"""Load test of `edgespec serve` on loopback: requests/s and latency percentiles at several client counts.

The server runs as its own process (`python -m edgespec serve`), so the load generator does not share
its interpreter. Each client sends streamed chat completions (greedy, EOS ignored so every request
produces exactly --new-tokens tokens) back to back; from the server-sent events it records the time
to first token (TTFT), the gaps between content events (inter-token latency, ITL) and the whole
request latency.

There is no named baseline for a server. As the comparison, the same requests are served
sequentially through `LLM.generate` inside this process (no HTTP, no queue): `speedup` =
baseline ms per request / server ms per request (wall time / requests), i.e. the server's overhead
ratio. The engine runs one generation at a time, so more clients raise queueing latency, not
throughput; a value near 1 means HTTP, SSE and queueing cost little next to generation.

    python bench/python/bench_server.py [--model PATH] [--concurrency 1 4 16] [--new-tokens 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))

from benchlib import write_result  # noqa: E402

import edgespec  # noqa: E402
from edgespec.loading.demo import demo_model_path  # noqa: E402

QUESTIONS = ["Explain why the sky is blue.", "Write a haiku about autumn.", "What is a prime number?",
             "Give three tips for learning to cook.", "Describe a lighthouse at night.",
             "Why do cats purr?", "Summarise the plot of Hamlet.", "How does a bicycle stay upright?"]


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile q in [0, 100] of a non-empty list."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def one_request(http: httpx.AsyncClient, question: str, new_tokens: int) -> dict:
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": new_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            if event.get("usage"):
                usage = event["usage"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    end = time.perf_counter()
    if not stamps or usage is None:
        raise RuntimeError("a stream ended without content or usage")
    return {"ttft": stamps[0] - t0, "itl": [b - a for a, b in zip(stamps, stamps[1:])], "latency": end - t0,
            "tokens": usage["completion_tokens"]}


async def load(base: str, concurrency: int, requests: int, new_tokens: int) -> tuple[float, list[dict]]:
    """`concurrency` clients share `requests` requests, each client sending its next when the last ends."""
    queue = [QUESTIONS[i % len(QUESTIONS)] for i in range(requests)]
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        async def client() -> None:
            while queue:
                results.append(await one_request(http, queue.pop(), new_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return wall, results


def start_server(model: Path, port: int, max_context: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "edgespec", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
           "--max-context", str(max_context), "--served-model-name", "bench", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become ready within 300 s")


def baseline(llm: edgespec.LLM, requests: int, new_tokens: int) -> dict:
    """The same requests, sequentially, through LLM.stream in this process: per-request ms and TTFT."""
    totals, ttfts = [], []
    for i in range(requests):
        messages = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        t0 = time.perf_counter()
        first = None
        for event in llm.stream(messages, max_new_tokens=new_tokens, ignore_eos=True):
            if first is None and event.text:
                first = time.perf_counter() - t0
        totals.append(time.perf_counter() - t0)
        ttfts.append(first or totals[-1])
    return {"ms_per_request": statistics.mean(totals) * 1e3, "ttft_p50_ms": percentile(ttfts, 50) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file or model directory (default: the demo model)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, nargs="+", default=[4, 8, 16],
                    help="requests per concurrency level (one number, or one per level)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch CPU threads for both the server and the in-process baseline")
    ap.add_argument("--baseline-requests", type=int, default=3,
                    help="in-process requests timed just before each load level")
    args = ap.parse_args()
    requests = args.requests * len(args.concurrency) if len(args.requests) == 1 else args.requests
    if len(requests) != len(args.concurrency):
        raise SystemExit("--requests takes one number or one per --concurrency level")

    model = Path(args.model) if args.model else demo_model_path()
    torch.set_num_threads(args.threads)
    llm = edgespec.LLM.load(str(model), device="cpu", max_context=args.max_context)
    llm.generate("warm up", max_new_tokens=4)
    port = free_port()
    proc = start_server(model, port, args.max_context, args.threads)
    base = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(load(base, 1, 2, args.new_tokens))  # warm-up
        for concurrency, n in zip(args.concurrency, requests):
            # The baseline runs right before each level (the server idles meanwhile), so drift in the
            # load of this shared machine hits both sides of a row alike.
            base_stats = baseline(llm, args.baseline_requests, args.new_tokens)
            wall, results = asyncio.run(load(base, concurrency, n, args.new_tokens))
            ttft = [r["ttft"] * 1e3 for r in results]
            itl = [x * 1e3 for r in results for x in r["itl"]]
            latency = [r["latency"] * 1e3 for r in results]
            tokens = sum(r["tokens"] for r in results)
            ours_ms = wall / n * 1e3
            row = {
                "case": f"{concurrency} concurrent clients, {n} streamed chat requests, {args.new_tokens} new tokens",
                "ours_ms": round(ours_ms, 1), "baseline": "LLM.generate in-process, sequential",
                "baseline_ms": round(base_stats["ms_per_request"], 1),
                "speedup": round(base_stats["ms_per_request"] / ours_ms, 3),
                "requests_per_s": round(n / wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
                "ttft_p50_ms": round(percentile(ttft, 50), 1), "ttft_p90_ms": round(percentile(ttft, 90), 1),
                "ttft_p99_ms": round(percentile(ttft, 99), 1),
                "itl_p50_ms": round(percentile(itl, 50), 2), "itl_p90_ms": round(percentile(itl, 90), 2),
                "itl_p99_ms": round(percentile(itl, 99), 2),
                "latency_p50_ms": round(percentile(latency, 50), 1), "latency_p90_ms": round(percentile(latency, 90), 1),
                "baseline_ttft_p50_ms": round(base_stats["ttft_p50_ms"], 1),
            }
            rows.append(row)
            print(row, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    load_avg = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"edgespec serve as a separate process on 127.0.0.1 (CPU, default dtype, {args.threads} torch "
             f"thread(s) on both sides), driven by asyncio httpx clients sending streamed chat completions back "
             f"to back; greedy, EOS ignored, {args.new_tokens} new tokens each, prompts cycled from "
             f"{len(QUESTIONS)} short questions. ours_ms = wall time / requests (1 / throughput); baseline_ms = "
             f"mean time of {args.baseline_requests} of the same requests run sequentially through LLM.stream "
             f"in the benchmark process (no HTTP) right before each level; speedup = baseline_ms / ours_ms is the server's overhead ratio (the engine serves one "
             f"request at a time, so extra clients add queueing to TTFT, not throughput). TTFT = request sent "
             f"to first content event; ITL = gaps between content events within a stream. Shared 2-core machine, "
             f"1-minute load average {load_avg:.1f} at the end of the run: absolute numbers are noisy.")
    path = write_result("server", "cpu", rows, notes, model=model.name)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
