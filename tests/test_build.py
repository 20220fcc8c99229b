"""Build and boundary checks that run on a CPU-only machine (CI).

* the package imports and describes its build without touching a GPU;
* EDGESPEC_BACKEND selects the torch path or fails loudly;
* the generated kernel instances and the CMake presets are consistent with the sources;
* CMake configures a pure-Python build when CUDA is off or the compiler is missing;
* when the extension is built, its C++ re-checks of tensor views reject bad views before any CUDA
  call (so they run here, with fake addresses) and the error names the op, shapes and reason;
* the kernel-path predicates give device-independent reasons on CPU tensors.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import edgespec
from edgespec import errors, ops
from edgespec.ops import _kernels, backend

ROOT = Path(__file__).resolve().parent.parent
BUILD_KEYS = {"version", "cuda", "architectures", "dtypes", "head_dims", "cuda_version"}
_C = ops.compiled_module()
needs_extension = pytest.mark.skipif(_C is None, reason="edgespec._C was not built (no CUDA compiler)")


# --- package and build info ------------------------------------------------------------------------

def test_build_info_has_every_key() -> None:
    info = edgespec.build_info()
    assert BUILD_KEYS <= info.keys()
    assert info["version"] == edgespec.__version__
    assert info["cuda"] is (_C is not None)
    if _C is None:
        assert "reason" in info and info["architectures"] == []


@needs_extension
def test_extension_reports_what_it_was_compiled_for() -> None:
    info = _C.build_info()
    assert _C.HAS_CUDA is True
    assert info["cuda"] is True
    assert info["architectures"], "the extension must list the architectures it was built for"
    for arch in info["architectures"]:
        assert re.fullmatch(r"\d+[af]?(-real|-virtual)?", arch), arch
    assert info["dtypes"] == ["bf16", "fp16", "fp32"]
    assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
    assert isinstance(info["head_dims"], list)


def test_import_never_initialises_cuda() -> None:
    code = ("import torch, edgespec, edgespec.ops; edgespec.build_info(); edgespec.ops.compiled_module();"
            "assert not torch.cuda.is_initialized(), 'importing edgespec initialised CUDA'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- backend selection -------------------------------------------------------------------------------

_FAKE_CUDA = SimpleNamespace(is_cuda=True)  # use_kernel only asks .is_cuda


def test_backend_torch_forces_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPEC_BACKEND", "torch")
    assert backend.requested_backend() == "torch"
    assert backend.use_kernel(_FAKE_CUDA) is False
    assert ops.use_kernel(torch.zeros(3)) is False


def test_backend_auto_uses_kernels_only_with_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGESPEC_BACKEND", raising=False)
    assert backend.use_kernel(_FAKE_CUDA) is (_C is not None)
    assert backend.use_kernel(torch.zeros(3)) is False  # CPU tensors never take the kernel path


def test_backend_bogus_value_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPEC_BACKEND", "bogus")
    with pytest.raises(ValueError, match="EDGESPEC_BACKEND"):
        backend.use_kernel(_FAKE_CUDA)


def test_backend_cuda_without_extension_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESPEC_BACKEND", "cuda")
    monkeypatch.setattr(backend, "compiled_module", lambda: None)
    with pytest.raises(RuntimeError, match="without its CUDA extension"):
        backend.use_kernel(_FAKE_CUDA)


# --- sources, presets and CMake ------------------------------------------------------------------------

def test_generated_instances_are_current() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_instances.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_presets_default_matches_cmake_and_ci_is_one_arch() -> None:
    presets = {p["name"]: p for p in json.loads((ROOT / "CMakePresets.json").read_text())["configurePresets"]}
    cmake = (ROOT / "CMakeLists.txt").read_text()
    default = re.search(r'set\(EDGESPEC_CUDA_ARCHS "([^"]+)" CACHE', cmake).group(1)
    assert presets["default"]["cacheVariables"]["EDGESPEC_CUDA_ARCHS"] == default
    ci = presets["ci"]["cacheVariables"]
    assert len(ci["EDGESPEC_CUDA_ARCHS"].split(";")) == 1
    assert ci["EDGESPEC_BUILD_BENCH"] == "ON"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.parametrize("args", [["-DEDGESPEC_CUDA=OFF"], ["-DCMAKE_CUDA_COMPILER=/nonexistent/nvcc"]],
                         ids=["cuda-off", "compiler-missing"])
def test_cmake_configures_pure_python_without_cuda(tmp_path: Path, args: list[str]) -> None:
    result = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "building without CUDA" in result.stdout
    assert not list(tmp_path.glob("**/_C*"))


# --- predicates of the kernel path (device-independent reasons, CPU tensors) ----------------------------

def test_rejections_name_the_problem() -> None:
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert "weight" in _kernels.rms_norm_rejection(x, torch.randn(8))  # fp32 weight, bf16 x
    assert "residual" in _kernels.rms_norm_rejection(x, x[0], torch.randn(4, 7, dtype=torch.bfloat16))
    assert "stride" in _kernels.silu_and_mul_rejection(torch.randn(8, 4).t())
    assert "even" in _kernels.silu_and_mul_rejection(torch.randn(4, 7))
    assert "dtype" in _kernels.argmax_rejection(torch.randint(0, 9, (2, 9)))
    assert "ids" in _kernels.embedding_rejection(torch.zeros(3, dtype=torch.float32), x)
    table = ops.build_rope_table(8, 10000.0, 16)
    q, k = torch.randn(3, 2, 8), torch.randn(3, 1, 8)
    assert "positions" in _kernels.rope_rejection(q, k, torch.arange(2), table)
    assert "rotary dim" in _kernels.rope_rejection(q[..., :6], k[..., :6], torch.arange(3), table)
    # Well-formed CPU tensors are rejected only for their device.
    assert "not a CUDA device" in _kernels.rms_norm_rejection(x, x[0])
    assert "not a CUDA device" in _kernels.rope_rejection(q, k, torch.arange(3), table)
    assert not _kernels.supports_argmax(torch.randn(2, 9))
    assert not _kernels.supports_attention(q, k, k)


# --- C++ re-checks of views (no GPU needed: every check runs before the first CUDA call) ----------------

_BASE = 1 << 32  # fake, well-aligned device addresses; never dereferenced


def _fake(shape: tuple[int, ...], dtype: str = "bf16", offset: int = 0, strides: tuple[int, ...] | None = None):
    if strides is None:
        strides = tuple(int(torch.tensor(shape[i + 1:]).prod()) for i in range(len(shape)))
    return _C.TensorView(_BASE + offset, shape, strides, getattr(_C.DType, dtype), 0)


def _kernel_error(fn, *args) -> str:
    with pytest.raises(errors.KernelError) as info:
        _kernels._run(fn, *args)
    return str(info.value)


@needs_extension
def test_view_construction_is_checked() -> None:
    with pytest.raises(ValueError, match="rank 5"):
        _C.TensorView(_BASE, (1, 1, 1, 1, 1), (1, 1, 1, 1, 1), _C.DType.fp32, 0)
    with pytest.raises(ValueError, match="strides"):
        _C.TensorView(_BASE, (2, 3), (3,), _C.DType.fp32, 0)
    v = _fake((19, 4096))
    assert v.shape == [19, 4096] and v.strides == [4096, 1] and "bf16[19, 4096]" in repr(v)


@needs_extension
def test_rms_norm_rechecks_in_cpp() -> None:
    x, out = _fake((19, 4096)), _fake((19, 4096), offset=1 << 24)
    msg = _kernel_error(_C.rms_norm, x, _fake((4095,), offset=1 << 26), None, out, None, 1e-6, 0)
    assert msg.startswith("rms_norm: invalid argument: weight") and "4095" in msg and "x=bf16[19, 4096]" in msg
    msg = _kernel_error(_C.rms_norm, x, _fake((4096,), "fp32", offset=1 << 26), None, out, None, 1e-6, 0)
    assert "weight: expected dtype bf16" in msg
    msg = _kernel_error(_C.rms_norm, x, _fake((4096,), offset=1 << 26), None, x, None, 1e-6, 0)
    assert "overlaps x" in msg
    msg = _kernel_error(_C.rms_norm, x, _fake((4096,), offset=1 << 26), _fake((19, 4096), offset=1 << 27), out,
                        None, 1e-6, 0)
    assert "residual and residual_out must be given together" in msg
    null = _C.TensorView(0, (19, 4096), (4096, 1), _C.DType.bf16, 0)
    assert "null data pointer" in _kernel_error(_C.rms_norm, null, _fake((4096,)), None, out, None, 1e-6, 0)


@needs_extension
def test_other_ops_recheck_in_cpp() -> None:
    q, k = _fake((5, 8, 64)), _fake((5, 2, 64), offset=1 << 20)
    pos = _fake((5,), "int64", offset=1 << 21)
    cos, sin = _fake((128, 32), "fp32", offset=1 << 22), _fake((128, 32), "fp32", offset=1 << 23)
    q_out, k_out = _fake((5, 8, 64), offset=1 << 24), _fake((5, 2, 64), offset=1 << 25)
    msg = _kernel_error(_C.apply_rope, q, k, _fake((4,), "int64", offset=1 << 21), cos, sin, q_out, k_out, 0)
    assert msg.startswith("apply_rope: invalid argument: positions") and "[4]" in msg
    msg = _kernel_error(_C.apply_rope, q, k, pos, _fake((128, 40), "fp32", offset=1 << 22),
                        _fake((128, 40), "fp32", offset=1 << 23), q_out, k_out, 0)
    assert "rotary dim" in msg
    msg = _kernel_error(_C.silu_and_mul, _fake((3, 10)), _fake((3, 4), offset=1 << 20), 0)
    assert msg.startswith("silu_and_mul: invalid argument: out") and "half the last dim" in msg
    msg = _kernel_error(_C.embedding, _fake((3,), "fp32"), _fake((100, 8), offset=1 << 20),
                        _fake((3, 8), offset=1 << 24), 1.0, 0)
    assert msg.startswith("embedding: invalid argument: ids: expected dtype in {int32, int64}")
    msg = _kernel_error(_C.argmax, _fake((2, 50)), _fake((2,), "int32", offset=1 << 20), 0)
    assert "out: expected dtype int64" in msg
    msg = _kernel_error(_C.argmax, _fake((2, 50)), _fake((2,), "int64", offset=1 << 20, strides=(0,)), 0)
    assert "overlap" in msg
