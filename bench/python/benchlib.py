"""Shared benchmark plumbing: device description, timing, and the bench/results JSON format (STYLE.md).

Import from a script in bench/python/ as `from benchlib import ...` (scripts put their own folder on
sys.path when run directly).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
# --gguf-weights of the benchmarks that load the demo GGUF: load_model's `quantized` (None: the
# device's default, 4-bit where a 4-bit GEMM runs the Q4 weights).
GGUF_WEIGHTS = {"auto": None, "4bit": True, "dense": False}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: torch.device | str) -> str:
    """Human-readable device: the GPU's name, or 'CPU: <model> (<n> threads)'."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def git_commit() -> str:
    """HEAD of this checkout; else $EDGESPEC_COMMIT (a copy of the tree without .git, such as the one
    a lent GPU machine gets: tools/gpu_session.sh sets it from --commit); else 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("EDGESPEC_COMMIT") or "unknown"


def time_cpu(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` calls (CPU, or GPU work that syncs itself)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_cuda(fn: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    """Seconds per call measured with CUDA events, one pair per repeat, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


@contextlib.contextmanager
def environment(name: str, value: str):
    """The environment variable set to value inside the block (edgespec reads its switches at each
    call), restored after it."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name)
        else:
            os.environ[name] = previous


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def target_line(what: str, value: float, goal: float, unit: str = "x", at_most: bool = False) -> str:
    """One line of a benchmark's `targets` (an issue's goal for one row: met or MISSED; the GPU
    session's summary counts the MISSED ones). at_most: the value must not exceed the goal."""
    met = value <= goal if at_most else value >= goal
    return f"{what}: {value:.2f}{unit} (target {'<=' if at_most else '>='} {goal:g}{unit}) {'met' if met else 'MISSED'}"


def write_result(benchmark: str, device: torch.device | str, rows: list[dict[str, Any]], notes: str,
                 **extra: Any) -> Path:
    """Write bench/results/<benchmark>-<device-slug>.json in the STYLE.md format and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    for row in rows:
        if "baseline_ms" in row and "ours_ms" in row and row["ours_ms"]:
            row.setdefault("speedup", round(row["baseline_ms"] / row["ours_ms"], 3))
    path = RESULTS_DIR / f"{benchmark}-{device_slug(device)}.json"
    if not rows and extra.get("interrupted"):
        print(f"nothing measured before the interrupt: {path} left as it was", file=sys.stderr)
        return path
    doc = {"benchmark": benchmark, "device": device_name(device), "commit": git_commit(),
           "date": datetime.date.today().isoformat(), "torch": torch.__version__, "notes": notes,
           **extra, "rows": rows}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class Interruptible:
    """The measuring loop of a benchmark, cut short cleanly by Ctrl-C or by the SIGINT that
    tools/gpu_session.sh sends at a stage's time limit: the KeyboardInterrupt ends the block,
    `interrupted` is set, and the caller still writes the rows measured so far (marked) instead
    of losing the whole stage.

        with Interruptible() as run:
            for case in todo:
                rows.append(measure(case))
        write_result(..., **run.marker(len(rows), len(todo)))
        return run.exit_code
    """

    def __enter__(self) -> "Interruptible":
        self.interrupted = False
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if kind is KeyboardInterrupt:
            self.interrupted = True
            print("interrupted: writing the rows measured so far", file=sys.stderr, flush=True)
            return True
        return False

    def marker(self, measured: int, planned: int) -> dict[str, Any]:
        """Extra JSON fields for write_result: nothing for a complete run."""
        return {"interrupted": f"after {measured} of {planned} cases"} if self.interrupted else {}

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 0  # 128 + SIGINT, as a shell reports it


def projection_weights(model: Any) -> str:
    """What a loaded decoder's projections hold, recorded with results: '4bit' or 'dense'."""
    from edgespec.quant import QuantLinear  # noqa: PLC0415 - scripts put python/ on sys.path first

    return "4bit" if isinstance(model.layers[0].qkv, QuantLinear) else "dense"
