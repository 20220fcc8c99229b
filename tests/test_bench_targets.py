"""The benchmarks' `targets` lines (the issues' goals, evaluated per row in the JSON; the GPU
session's summary counts the MISSED ones), on hand-made rows: which rows a target applies to,
which kernel or mode it credits, and that a miss says MISSED."""
from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "python"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return lambda name: __import__(name)


def _verdicts(lines: list[str]) -> list[str]:
    return [line.rsplit(" ", 1)[1] for line in lines]


def test_target_line_says_met_or_missed(bench) -> None:
    line = bench("benchlib").target_line
    assert line("a", 1.31, 1.3) == "a: 1.31x (target >= 1.3x) met"
    assert line("a", 1.29, 1.3).endswith("MISSED")
    assert line("b", 41.0, 40, "%", at_most=True) == "b: 41.00% (target <= 40%) MISSED"
    assert line("b", 40.0, 40, "%", at_most=True).endswith(" met")


def test_attention_targets(bench) -> None:
    targets = bench("bench_attention").targets
    decode = {"case": "llama3-8b decode 32K", "phase": "decode", "tokens": 1, "seqlen": 32769, "ours_ms": 0.04,
              "baseline": "torch SDPA (flash)", "baseline_ms": 0.06, "pct_measured_bw": 79.0}
    short = dict(decode, case="llama3-8b decode 1K", seqlen=1025)  # below 4K: no target
    prefill = {"case": "llama3-8b prefill 4K", "phase": "prefill", "tokens": 4096, "seqlen": 4096, "ours_ms": 1.2,
               "sm90_ms": 0.9, "baseline": "torch SDPA (flash)", "baseline_ms": 1.0}
    tree = {"case": "llama3-8b tree 32K", "phase": "tree", "tokens": 64, "seqlen": 32832, "ours_ms": 0.1,
            "tree_over_decode": 2.2, "invariant_tree_over_decode": 2.4, "sm90_tree_over_decode": 1.1,
            "sm90_invariant_tree_over_decode": 1.25}
    lines = targets([decode, short, prefill, tree, {"case": "x", "error": "rejected"}])
    assert len(lines) == 5
    assert _verdicts(lines[:2]) == ["met", "MISSED"]  # 1.5x SDPA, 79% of the bandwidth
    assert "(sm90 kernels)" in lines[2] and lines[2].endswith(" met")  # the faster kernels count: 1.11x
    assert "best (sm90 vs generic decode)" in lines[3] and "row-invariant (sm90 invariant)" in lines[4]
    assert _verdicts(lines[3:]) == ["met", "met"]
    del tree["sm90_invariant_tree_over_decode"]
    assert targets([tree])[1].startswith("llama3-8b tree 32K / decode, row-invariant (generic invariant): 2.40x")
    assert _verdicts(targets([tree])) == ["met", "MISSED"]


def test_sparse_targets(bench) -> None:
    targets = bench("bench_sparse").targets
    common = {"case": "minicpm4-8b decode 128K", "phase": "decode", "tokens": 1, "seqlen": 131073,
              "ours_ms": 0.010, "invariant_ms": 0.013}
    rows = [dict(common, baseline="edgespec dense", baseline_ms=0.060),
            dict(common, baseline="torch SDPA dense", baseline_ms=0.055)]
    lines = targets(rows)
    # Against the faster dense baseline: 5.5x heuristic (met), 4.2x row-invariant (missed).
    assert [line.split(" vs ")[1].split(":")[0] for line in lines] == ["torch SDPA dense"] * 2
    assert "(heuristic)" in lines[0] and "(row-invariant)" in lines[1]
    assert _verdicts(lines) == ["met", "MISSED"]
    prefill = {"case": "minicpm4-8b prefill 128K", "phase": "prefill", "tokens": 131072, "seqlen": 131072,
               "ours_ms": 120.0, "sm90_ms": 80.0, "baseline": "torch SDPA dense", "baseline_ms": 330.0}
    (line,) = targets([prefill, dict(prefill, case="minicpm4-8b prefill 64K", seqlen=65536, tokens=65536)])
    assert "(sm90)" in line and line.endswith(" met")  # 4.1x
    assert targets([dict(common, case="minicpm4-8b decode 64K", seqlen=65537, baseline="x", baseline_ms=1.0)]) == []


def test_blockffn_targets(bench) -> None:
    targets = bench("bench_blockffn").targets
    rows = [{"case": "blockffn-3b T=8 70%", "pct_of_dense": 38.0, "chunk_sparsity": 0.71},
            {"case": "blockffn-3b T=64 70% w4", "pct_of_dense": 45.0, "chunk_sparsity": 0.69},
            {"case": "blockffn-3b T=8 90%", "pct_of_dense": 10.0, "chunk_sparsity": 0.9}]
    lines = targets(rows)
    assert _verdicts(lines) == ["met", "MISSED"] and "chunk sparsity 0.69" in lines[1]


def test_tree_rows_get_their_decode_ratios(bench) -> None:
    module = bench("bench_attention")
    decode = {"case": "llama3-8b decode 32K", "phase": "decode", "tokens": 1, "seqlen": 32769, "ours_ms": 0.04,
              "invariant_ms": 0.05}
    tree = {"case": "llama3-8b tree 32K", "phase": "tree", "tokens": 64, "seqlen": 32832, "ours_ms": 0.08,
            "sm90_ms": 0.06, "invariant_ms": 0.1, "sm90_invariant_ms": 0.07}
    other = dict(tree, case="minicpm4-8b tree 32K")  # no decode row of its model: left alone
    module.pair_trees_with_decodes([decode, tree, other, {"case": "x", "error": "rejected"}])
    assert tree["decode_ms_same_context"] == 0.04
    assert (tree["tree_over_decode"], tree["sm90_tree_over_decode"], tree["invariant_tree_over_decode"]) == (2.0, 1.5, 2.0)
    assert "sm90_invariant_tree_over_decode" not in tree  # the decode row has no sm90 invariant time
    assert "tree_over_decode" not in other
    assert module.targets([tree])[1].endswith("MISSED")  # row-invariant: generic invariant at 2.0x
