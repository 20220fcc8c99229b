"""The GPU benchmarks' own code on the CPU emulator, at toy sizes, with the timing replaced by one
eager call per input copy: a benchmark that would crash (a renamed argument, a call a kernel now
refuses, a missing key) fails here, not in the few minutes of a lent GPU. Nothing is timed; what is
checked is that every row carries the fields its JSON promises."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "python"


def _bench_module(name: str, monkeypatch: pytest.MonkeyPatch):
    """bench/python/<name>.py with one eager call per copy for timing and no torch SDPA baselines
    (their backends are CUDA's)."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = __import__(name)

    def one_eager_call(calls, repeats):
        for call in calls:
            call()
        return 1.0, "eager"

    monkeypatch.setattr(module, "graph_ms", one_eager_call)
    if hasattr(module, "sdpa_variants"):
        monkeypatch.setattr(module, "sdpa_variants", lambda *args: iter(()))
    return module


@pytest.fixture
def bench_sparse(monkeypatch):
    return _bench_module("bench_sparse", monkeypatch)


@pytest.fixture
def bench_attention(monkeypatch):
    return _bench_module("bench_attention", monkeypatch)


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
@pytest.mark.parametrize("phase", ["decode", "tree", "prefill"])
def test_bench_attention_runs_its_cases_on_the_emulated_kernels(bench_attention, phase):
    case = bench_attention.Case("llama3-8b", phase, 200)
    row = bench_attention.run_case(case, torch.bfloat16, torch.device("cpu"), repeats=1, l2_bytes=1, dram_tbps=3.0)
    assert row["case"] == case.name and "error" not in row, row
    expected = {"decode": ["pct_measured_bw", "invariant_ms", "invariant_over_ours", "sm90_invariant_ms",
                           "sm90_invariant_bitwise_equals_generic"],
                "tree": ["sm90_ms", "sm90_max_abs_diff_vs_ours", "invariant_ms", "invariant_max_abs_diff_vs_ours",
                         "sm90_invariant_ms", "sm90_invariant_max_abs_diff_vs_generic"],
                "prefill": ["sm90_ms", "sm90_tflops", "sm90_splits", "tflops"]}[phase]
    missing = [key for key in expected if key not in row]
    assert not missing, f"{case.name}: {missing} missing from {sorted(row)}"
    for key in ("sm90_max_abs_diff_vs_ours", "invariant_max_abs_diff_vs_ours", "sm90_invariant_max_abs_diff_vs_generic"):
        assert row.get(key, 0) < 0.05, f"{key} = {row[key]}"


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
@pytest.mark.parametrize("phase", ["decode", "tree", "prefill"])
def test_bench_sparse_runs_its_cases_on_the_emulated_kernels(bench_sparse, phase):
    from edgespec.models.sparse import parse_sparse_config

    cfg = parse_sparse_config(bench_sparse.SPARSE_CONFIG)
    case = bench_sparse.Case(bench_sparse.MODEL, phase, 320)
    rows = bench_sparse.run_case(case, cfg, torch.bfloat16, torch.device("cpu"), repeats=1, l2_bytes=1)
    baselines = [row["baseline"] for row in rows]
    assert baselines[0] == "edgespec dense"
    expected = {"decode": ["invariant_ms", "invariant_over_ours", "invariant_stage_ms", "max_abs_diff_vs_torch_path",
                           "sparsity"],
                "tree": ["heuristic_ms", "invariant_over_heuristic", "max_abs_diff_vs_torch_path"],
                "prefill": ["sm90_ms", "sm90_over_ours", "sm90_max_abs_diff_vs_ours"]}[phase]
    for row in rows:
        assert row["case"] == case.name and row["ours_ms"] > 0
        missing = [key for key in expected if key not in row]
        assert not missing, f"{case.name}: {missing} missing from {sorted(row)}"
    if phase == "decode":
        assert set(rows[0]["invariant_stage_ms"]) == {"compress", "select", "attention"}
        assert rows[0]["max_abs_diff_vs_torch_path"] < 0.05
    if phase == "prefill":  # the emulator has the Hopper kernels: their dense baseline too
        assert baselines == ["edgespec dense", "edgespec dense (sm90)"]
        assert rows[0]["sm90_max_abs_diff_vs_ours"] < 0.05


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
@pytest.mark.parametrize("zeros", [False, True])
def test_bench_w4a16_runs_a_case_on_the_emulated_kernels(monkeypatch, zeros):
    from edgespec.quant import Int4Weight

    bench = _bench_module("bench_w4a16", monkeypatch)
    # The tile layout the loader picks for CUDA tensors ("auto" keeps CPU weights plain).
    to_linear = Int4Weight.to_linear
    monkeypatch.setattr(Int4Weight, "to_linear", lambda self, *a, **kw: to_linear(self, *a, **kw | {"layout_name": "tile"}))
    case = bench.Case("smollm2-135m", "o", 4)
    rows = bench.run_case(case, torch.bfloat16, zeros, torch.device("cpu"), repeats=1, l2_bytes=1, dram_gbps=3000.0)
    assert "error" not in rows[0], rows[0]
    assert rows[0]["baseline"] == bench.BF16 and rows[0]["speedup"] > 0 and "edgespec_dense_ms" in rows[0], rows[0]
    # torch's tinygemm may not run on the CPU: then its row says why instead of timing it.
    assert rows[1]["baseline"] == bench.TINYGEMM and ("speedup" in rows[1] or "error" in rows[1]), rows[1]


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_ops")
def test_bench_sampling_runs_on_the_emulated_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    bench_sampling = __import__("bench_sampling")

    def one_call(fn, repeats):
        fn()
        return [1e-3]

    monkeypatch.setattr(bench_sampling, "time_cuda", one_call)
    monkeypatch.setitem(bench_sampling.VOCABS, "toy", 5003)
    rows = bench_sampling.measure("toy", 3, repeats=1, device=torch.device("cpu"))
    assert [r["case"] for r in rows] == ["toy floor R=3", "toy logits_to_probs R=3"]
    for row in rows:
        assert row["ours_ms"] == row["baseline_ms"] == 1.0 and row["vocab"] == 5003
        assert 1 <= row["mean_kept_tokens"] < 5003
