"""tools/gpu_session.sh, the one command a lent GPU runs: its list of kernel test modules must name
files that exist and cover every kernel family module, or a GPU session silently skips a family
(a renamed module would leave its stage with nothing to collect)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "gpu_session.sh"


def kernel_files() -> dict[str, list[str]]:
    text = SCRIPT.read_text()
    block = re.search(r"declare -A KERNEL_FILES=\((.*?)\)\n", text, re.S)
    assert block, "gpu_session.sh no longer declares KERNEL_FILES"
    return {stage: files.split() for stage, files in re.findall(r'\[(\w+)\]="([^"]*)"', block.group(1))}


def test_every_kernel_module_runs_in_a_gpu_stage() -> None:
    stages = kernel_files()
    listed = [f for files in stages.values() for f in files]
    assert sorted(stages) == sorted(re.search(r"KERNEL_TESTS=\(([^)]*)\)", SCRIPT.read_text()).group(1).split())
    missing = [f for f in listed if not (ROOT / "tests" / f).is_file()]
    assert not missing, f"gpu_session.sh lists test modules that do not exist: {missing}"
    modules = sorted(p.name for p in (ROOT / "tests").glob("test_*_kernels.py"))
    # The CUDA-graph tests run in a stage of their own too, apart from the other GPU tests.
    graph_modules = sorted(p.name for p in (ROOT / "tests").glob("test_cuda_graphs*.py"))
    assert sorted(stages.get("graphs", [])) == graph_modules
    assert sorted(f for f in listed if f not in graph_modules) == modules, \
        "every tests/test_*_kernels.py belongs to exactly one GPU stage"


def test_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
