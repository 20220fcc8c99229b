"""Build the CPU-emulated edgespec._C: every kernel of csrc/ compiled as host C++ against the
emulator in this directory, so the kernels run (slowly, one fiber per CUDA thread) on CPU tensors.

    python tools/cuda_emulator/build.py            # builds (or finds) it, prints the path

The sources are copied with four mechanical rewrites, nothing else:
* `kernel<<<grid, block, smem, stream>>>(args)` becomes
  `::cuemu::configure(kernel, grid, block, smem, stream)(args)`;
* `extern __shared__ T name[];` becomes `T* name = static_cast<T*>(::cuemu::dynamic_shared());`;
* `__shared__ T name[N];` becomes a function-local static registered with the runtime, which fills
  it with 0xFF bytes (NaN, -1) before every block, like uninitialised shared memory;
* csrc/common/mma.cuh and csrc/kernels/sm90/wgmma.cuh (all the inline PTX) are replaced by mma.cuh
  and wgmma.cuh of this directory;
and the module is named `_C_emulated` (C++ namespace `edgespec_emulated`). selftest.cu (the
emulator's own checks) is compiled into it too. The build is cached under
build/cuda-emulator/<hash of the inputs>, so tests pay for it once per source change (about 25 s
on 2 cores).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
MODULE_NAME = "_C_emulated"
# CUEMU_SANITIZE=address builds an AddressSanitizer variant (tools/cuda_emulator/asan.sh runs the
# kernel tests on it): a kernel that reads or writes global memory past a tensor's allocation stops
# with a report instead of reading a neighbour's bytes. Fibers switch with ucontext there, which
# ASan follows; its own stack switch would confuse ASan's stack bookkeeping.
SANITIZERS = {"": [], "address": ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-DCUEMU_UCONTEXT"]}
SANITIZE = os.environ.get("CUEMU_SANITIZE", "")
if SANITIZE not in SANITIZERS:
    raise ValueError(f"CUEMU_SANITIZE must be one of {sorted(SANITIZERS)}, got {SANITIZE!r}")
# -ffp-contract=off: every float operation rounds alone on every host (aarch64 compilers fuse
# a*b+c by default), so the bitwise row-invariance tests mean the same everywhere.
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-w", "-fno-strict-aliasing", "-ffp-contract=off", *SANITIZERS[SANITIZE]]

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}()]*?>)?)\s*<<<(.*?)>>>", re.S)
_STATIC_SHARED = re.compile(r"__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)((?:\[[^\]]+\])*)\s*;")
_EXTERN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+[\w:]+)*?)\s+(\w+)\[\]\s*;")


class EmulatorUnavailable(RuntimeError):
    """The emulated build cannot be made here (no CUDA headers or no C++ compiler)."""


def cuda_include_dir() -> Path:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    candidates.append("/usr/local/cuda")
    for base in filter(None, candidates):
        for inc in (Path(base) / "include", Path(base) / "targets" / "x86_64-linux" / "include"):
            if (inc / "cuda_runtime_api.h").exists() and (inc / "cuda_bf16.h").exists():
                return inc
    raise EmulatorUnavailable("no CUDA toolkit headers found (set CUDA_HOME)")


def rewrite(text: str) -> str:
    text = _LAUNCH.sub(lambda m: f"::cuemu::configure({m.group(1)}, {m.group(2).strip()})", text)
    text = _EXTERN_SHARED.sub(lambda m: f"{m.group(1)}* {m.group(2)} = static_cast<{m.group(1)}*>(::cuemu::dynamic_shared());",
                              text)
    text = _STATIC_SHARED.sub(lambda m: f"static {m.group(1)} {m.group(2)}{m.group(3)}; "
                                        f"static const ::cuemu::SharedRegion {m.group(2)}_region(&{m.group(2)}, sizeof({m.group(2)}));",
                              text)
    return text.replace("PYBIND11_MODULE(_C,", f"PYBIND11_MODULE({MODULE_NAME},")


def _sources() -> list[Path]:
    files = [p for p in sorted(CSRC.rglob("*")) if p.suffix in {".cpp", ".cu", ".h", ".cuh"}]
    mine = [p for p in sorted(HERE.iterdir()) if p.suffix in {".h", ".cuh", ".cpp", ".cu", ".py"}]
    return files + mine


def _digest(compiler: str) -> str:
    h = hashlib.sha256()
    for p in _sources():
        h.update(str(p.relative_to(ROOT)).encode())
        h.update(p.read_bytes())
    h.update(" ".join([compiler, *FLAGS, sys.version]).encode())
    return h.hexdigest()[:16]


def _compile(cmd: list[str]) -> str | None:
    """None, or the compiler's complaint."""
    result = subprocess.run(cmd, capture_output=True, text=True)
    return None if result.returncode == 0 else f"{' '.join(cmd)}\n{result.stderr[-4000:]}"


def build(out_root: Path | None = None, jobs: int | None = None) -> Path:
    """Path of the emulated extension, compiled if this source state has not been built yet."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise EmulatorUnavailable("no C++ compiler (g++) found")
    cuda_inc = cuda_include_dir()
    try:
        import pybind11
    except ImportError as exc:
        raise EmulatorUnavailable("pybind11 is not installed") from exc
    out_root = out_root or Path(os.environ.get("EDGESPEC_EMULATOR_BUILD", ROOT / "build" / "cuda-emulator"))
    out = out_root / _digest(compiler)
    target = out / (MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    # Concurrent test processes: one builds, the others wait for it and reuse the result.
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            work = Path(tempfile.mkdtemp(prefix="tmp-", dir=out))
            try:
                _build_into(work, target, compiler, cuda_inc, pybind11.get_include(), jobs)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            _prune(out_root, keep=out)
    return target


KEEP_BUILDS = 4


def _prune(out_root: Path, keep: Path) -> None:
    """Delete all but the KEEP_BUILDS most recent finished builds (one per source state edited, so
    they pile up). A build still in progress has no module file yet and is never touched; a process
    that already imported a deleted module keeps its mapping."""
    suffix = MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX")
    done = [d for d in out_root.iterdir() if d != keep and (d / suffix).exists()]
    done.sort(key=lambda d: (d / suffix).stat().st_mtime, reverse=True)
    for old in done[KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(work: Path, target: Path, compiler: str, cuda_inc: Path, pybind11_inc: str, jobs: int | None) -> None:
    src = work / "csrc"
    for p in CSRC.rglob("*"):
        if p.is_file() and p.suffix in {".cpp", ".cu", ".h", ".cuh"}:
            dst = src / p.relative_to(CSRC)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(rewrite(p.read_text()))
    shutil.copy(HERE / "mma.cuh", src / "common" / "mma.cuh")
    shutil.copy(HERE / "wgmma.cuh", src / "kernels" / "sm90" / "wgmma.cuh")

    # The emulator's own checks (tests/test_cuda_emulator.py), rewritten like the kernels.
    (src / "selftest.cu").write_text(rewrite((HERE / "selftest.cu").read_text()))
    units = [p for p in sorted(src.rglob("*")) if p.suffix in {".cpp", ".cu"}]
    units.append(HERE / "runtime.cpp")
    includes = ["-I", str(HERE), "-I", str(src), "-I", str(cuda_inc), "-I", pybind11_inc,
                "-I", sysconfig.get_paths()["include"]]
    # Another namespace for every C++ name: pybind11 registers types by their C++ type, so the real
    # edgespec._C and this module could not both be imported into one process otherwise.
    # The Hopper kernels (csrc/kernels/sm90) are built and dispatched as on an sm_90a build.
    defines = ['-DEDGESPEC_CUDA_ARCHS="emulated"', "-Dedgespec=edgespec_emulated", "-DEDGESPEC_HAS_SM90=1",
               "-DEDGESPEC_EMULATED_SM90=1"]
    objects = []
    commands = []
    for unit in units:
        obj = work / "obj" / (unit.stem + ("_" + unit.parent.name) + ".o")
        obj.parent.mkdir(parents=True, exist_ok=True)
        objects.append(obj)
        commands.append([compiler, *FLAGS, "-x", "c++", "-include", str(HERE / "prelude.h"), *includes, *defines,
                         "-c", str(unit), "-o", str(obj)])
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1) as pool:
        errors = [e for e in pool.map(_compile, commands) if e is not None]
    linked = work / target.name
    errors = errors or list(filter(None, [_compile([compiler, "-shared", "-o", str(linked), *map(str, objects)])]))
    if errors:
        raise RuntimeError("emulated build failed:\n" + "\n".join(errors))
    linked.replace(target)  # atomic: a reader sees no file or the whole file


def load(path: Path | None = None) -> ModuleType:
    """Import the emulated extension (building it first if needed)."""
    path = path or build()
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build())
