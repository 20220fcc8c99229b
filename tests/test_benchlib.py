"""bench/python/benchlib.py: the commit a result records when the tree is a copy without .git
(as on a lent GPU machine, where tools/gpu_session.sh passes it in EDGESPEC_COMMIT), and what an
interrupted benchmark writes."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

BENCHLIB = Path(__file__).resolve().parents[1] / "bench" / "python" / "benchlib.py"


def load_copy(root: Path):
    """benchlib copied to root/bench/python/, so RESULTS_DIR and git's working directory lie in root."""
    target = root / "bench" / "python" / "benchlib.py"
    target.parent.mkdir(parents=True)
    shutil.copy(BENCHLIB, target)
    spec = importlib.util.spec_from_file_location("benchlib_copy", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("why", ["not a git checkout", "no git program"])
def test_results_carry_edgespec_commit_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    benchlib = load_copy(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # no repository above the copy either
    if why == "no git program":
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("EDGESPEC_COMMIT", raising=False)
    assert benchlib.git_commit() == "unknown"

    monkeypatch.setenv("EDGESPEC_COMMIT", "0123abcd" * 5)
    path = benchlib.write_result("selftest", "cpu", [{"case": "c", "ours_ms": 2.0, "baseline_ms": 3.0}], "n")
    assert path == tmp_path / "bench" / "results" / "selftest-cpu.json"
    doc = json.loads(path.read_text())
    assert doc["commit"] == "0123abcd" * 5
    assert doc["rows"][0]["speedup"] == 1.5


def test_an_interrupted_benchmark_keeps_its_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt (a GPU session's stage limit) ends the measuring loop; the rows so far
    are written with an `interrupted` field, and an interrupt before any row leaves an earlier
    result file untouched."""
    benchlib = load_copy(tmp_path)
    monkeypatch.setenv("EDGESPEC_COMMIT", "abc1234")
    rows = []
    with benchlib.Interruptible() as run:
        for i in range(5):
            if i == 2:
                raise KeyboardInterrupt
            rows.append({"case": f"c{i}", "ours_ms": 1.0, "baseline_ms": 2.0})
    assert run.interrupted and run.exit_code == 130
    path = benchlib.write_result("demo", "cpu", rows, "notes", **run.marker(len(rows), 5))
    doc = json.loads(path.read_text())
    assert doc["interrupted"] == "after 2 of 5 cases" and len(doc["rows"]) == 2 and doc["rows"][0]["speedup"] == 2.0
    with benchlib.Interruptible() as again:
        raise KeyboardInterrupt
    assert benchlib.write_result("demo", "cpu", [], "notes", **again.marker(0, 5)) == path
    assert json.loads(path.read_text()) == doc  # not replaced by an empty result
    with benchlib.Interruptible() as complete:
        pass
    assert complete.marker(5, 5) == {} and complete.exit_code == 0
    with pytest.raises(ValueError), benchlib.Interruptible():
        raise ValueError("other errors pass through")



@pytest.mark.parametrize("before", [None, "1"])
def test_environment_sets_a_variable_for_its_block_and_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  before: str | None) -> None:
    import os

    benchlib = load_copy(tmp_path)
    if before is None:
        monkeypatch.delenv("EDGESPEC_BACKEND", raising=False)
    else:
        monkeypatch.setenv("EDGESPEC_BACKEND", before)
    with pytest.raises(RuntimeError, match="inside"):
        with benchlib.environment("EDGESPEC_BACKEND", "torch"):
            assert os.environ["EDGESPEC_BACKEND"] == "torch"
            raise RuntimeError("inside")  # restored on the way out of an exception too
    assert os.environ.get("EDGESPEC_BACKEND") == before
