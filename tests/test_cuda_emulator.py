"""The CPU emulator of the CUDA kernels (tools/cuda_emulator) checked on its own kernels
(tools/cuda_emulator/selftest.cu): tensor-core fragments and ldmatrix against the layouts
csrc/common/mma.cuh documents (which the PTX ISA defines), warp collectives, when cp.async copies
land under each schedule, shared memory that starts as garbage, and every fault it promises to
report as a launch error instead of hanging or corrupting memory."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.emulated

COLLECTIVES = 6  # selftest.cu collectives_kernel: ints written per thread
FAULTS = {  # selftest.cu cuemu_selftest_fault(which): what the error must say
    0: "divergent warp",
    1: "exited",
    2: "deadlock",
    3: "wrote past the end of its 128 bytes of dynamic shared memory",
    4: "not 16-byte aligned",
    5: "above the 49152 the kernel is allowed",
    7: "no fence.proxy.async by that thread",  # wgmma reading cp.async bytes without the proxy fence
}


@pytest.fixture(scope="module")
def lib(emulated_module):
    return ctypes.CDLL(emulated_module.__file__)


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _message(lib) -> str:
    lib.cuemu_selftest_message.restype = ctypes.c_char_p
    return lib.cuemu_selftest_message().decode()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mma_follows_the_documented_fragment_layout(lib, dtype) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(16, 16, generator=g).to(dtype)
    b = torch.randn(16, 8, generator=g).to(dtype)
    d = torch.randn(16, 8, generator=g)
    out = d.clone()
    bt = b.t().contiguous()
    rc = lib.cuemu_selftest_mma(_ptr(a.view(torch.int16)), _ptr(bt.view(torch.int16)), _ptr(out),
                                int(dtype == torch.bfloat16))
    assert rc == 0, _message(lib)
    want = a.double() @ b.double() + d.double()
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)


def test_wgmma_follows_the_documented_layouts_and_completes_at_its_wait(lib) -> None:
    """Hopper wgmma (tools/cuda_emulator/wgmma.cuh): 128-byte-swizzled K-major and MN-major
    operands read through descriptors (csrc/kernels/sm90/gmma_desc.h), A from registers, the
    accumulator layout of csrc/kernels/sm90/wgmma.cuh, and the accumulators unchanged until the
    wait that retires the product."""
    _check_wgmma(lib)


def test_a_launch_that_failed_with_products_in_flight_leaves_nothing_behind(lib) -> None:
    """The unfenced-wgmma fault stops its threads inside wgmma_wait, with products still queued;
    the next launch on the same block and threads must not run them (they write into the dead
    launch's registers)."""
    floats = torch.zeros(64 * 1024, dtype=torch.float32)
    for _ in range(2):
        assert lib.cuemu_selftest_fault(7, None, _ptr(floats)) != 0
        assert lib.cuemu_selftest_wgmma_wait_only() == 0, _message(lib)  # no stale product runs at its wait
        _check_wgmma(lib)


def _check_wgmma(lib) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    b = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    v = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    before, d, e = (torch.full((64, 64), float("nan")) for _ in range(3))
    bt = b.t().contiguous()
    rc = lib.cuemu_selftest_wgmma(*(_ptr(x.view(torch.int16)) for x in (a, bt, v)), _ptr(before), _ptr(d), _ptr(e))
    assert rc == 0, _message(lib)
    assert torch.equal(before, torch.full((64, 64), 7.0))  # read between issue and wait: untouched
    torch.testing.assert_close(d.double(), a.double() @ b.double() + 7.0, rtol=0, atol=1e-4)
    torch.testing.assert_close(e.double(), a.double() @ v.double(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_x4_follows_the_documented_layout(lib, trans) -> None:
    m = torch.arange(32 * 8, dtype=torch.int16).view(32, 8)  # four 8 x 8 matrices, distinct values
    out = torch.zeros(32, 4, dtype=torch.int32)
    assert lib.cuemu_selftest_ldmatrix(_ptr(m), _ptr(out), int(trans)) == 0, _message(lib)
    for lane in range(32):
        g, c = lane // 4, lane % 4
        for i in range(4):
            mat = m[8 * i: 8 * i + 8]
            lo, hi = (mat[2 * c, g], mat[2 * c + 1, g]) if trans else (mat[g, 2 * c], mat[g, 2 * c + 1])
            want = int(lo) | (int(hi) << 16)
            assert int(out[lane, i]) & 0xFFFFFFFF == want, (lane, i, trans)


def test_warp_collectives(lib) -> None:
    threads = 64
    out = torch.zeros(threads, COLLECTIVES, dtype=torch.int32)
    assert lib.cuemu_selftest_collectives(_ptr(out), threads) == 0, _message(lib)

    def signed(bits: int) -> int:
        return bits - (1 << 32 if bits >= 1 << 31 else 0)

    ballot = sum(1 << i for i in range(32) if i % 3 == 0)
    for t in range(threads):
        lane = t % 32
        down = lane + 3 if lane + 3 < 32 else lane
        match = sum(1 << i for i in range(32) if i % 5 == lane % 5)
        assert out[t].tolist() == [(lane ^ 5) * 3, 21, down * 3, signed(ballot), 496, signed(match)]


@pytest.mark.parametrize("schedule,wait_first,lands", [("forward", 0, False), ("forward", 1, True),
                                                       ("serial", 0, True), ("serial", 1, True)])
def test_cp_async_lands_late_or_early_by_schedule(lib, monkeypatch, schedule, wait_first, lands) -> None:
    monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
    src = torch.arange(1, 32 * 4 + 1, dtype=torch.float32)
    out = torch.zeros(32)
    assert lib.cuemu_selftest_cp_async_timing(_ptr(src), _ptr(out), wait_first) == 0, _message(lib)
    if lands:
        assert torch.equal(out, src[::4])
    else:
        assert torch.isnan(out).all(), "a copy read before its wait must see the poisoned shared memory"


def test_static_shared_memory_starts_as_garbage(lib) -> None:
    out = torch.zeros(1, dtype=torch.int64)
    for _ in range(2):  # and again on the next launch
        assert lib.cuemu_selftest_static_shared(_ptr(out)) == 0, _message(lib)
        assert int(out[0]) & 0xFFFFFFFF == 0xFFFFFFFF


@pytest.mark.parametrize("which", sorted(FAULTS))
def test_faults_are_reported_and_the_emulator_recovers(lib, which) -> None:
    ints = torch.zeros(64, dtype=torch.int32)
    floats = torch.zeros(64 * 1024, dtype=torch.float32)
    assert lib.cuemu_selftest_fault(which, _ptr(ints), _ptr(floats)) != 0
    assert FAULTS[which] in _message(lib)
    out = torch.zeros(32, COLLECTIVES, dtype=torch.int32)
    assert lib.cuemu_selftest_collectives(_ptr(out), 32) == 0, "the next launch must run normally"


def test_shared_memory_above_48k_runs_after_the_opt_in(lib) -> None:
    floats = torch.zeros(64 * 1024, dtype=torch.float32)
    assert lib.cuemu_selftest_fault(6, None, _ptr(floats)) == 0, _message(lib)
    assert torch.equal(floats[:32], torch.ones(32))


def test_old_builds_are_pruned_but_not_builds_in_progress(tmp_path) -> None:
    """Each edited source state builds anew under build/cuda-emulator/<hash>: after a build, only
    the newest KEEP_BUILDS finished builds stay; a directory without a module (a build still
    running in another process) is left alone."""
    import importlib.util
    import os
    import sysconfig
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "cuda_emulator" / "build.py"
    spec = importlib.util.spec_from_file_location("cuda_emulator_build_prune", path)
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    name = builder.MODULE_NAME + sysconfig.get_config_var("EXT_SUFFIX")
    for i in range(7):
        d = tmp_path / f"build{i}"
        d.mkdir()
        (d / name).write_bytes(b"")
        os.utime(d / name, (1000 + i, 1000 + i))
    (tmp_path / "running").mkdir()
    builder._prune(tmp_path, keep=tmp_path / "build0")  # the one just built, however old its file
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["build0", "build4", "build5", "build6", "running"]
    assert builder.KEEP_BUILDS == 4


def test_global_reads_past_a_tensor_are_caught_under_asan(lib) -> None:
    """Under tools/cuda_emulator/asan.sh, a kernel reading past the end of a tensor is an ASan
    report (run in a child process, since ASan ends the process it reports in); in bounds, not."""
    if os.environ.get("CUEMU_SANITIZE") != "address":
        pytest.skip("the AddressSanitizer build only (tools/cuda_emulator/asan.sh)")
    script = (f"import ctypes, torch; lib = ctypes.CDLL({os.path.abspath(lib._name)!r}); "
              "src, out = torch.randn({n}), torch.zeros(32); "
              "rc = lib.cuemu_selftest_global_read(ctypes.c_void_p(src.data_ptr()), ctypes.c_void_p(out.data_ptr()), 32); "
              "assert rc == 0 and torch.equal(out[:{n}], src), rc")
    env = {**os.environ, "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1"}
    runs = {n: subprocess.run([sys.executable, "-c", script.replace("{n}", str(n))], env=env, capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=120) for n in (32, 20)}
    assert runs[32].returncode == 0, runs[32].stderr[-2000:]
    assert runs[20].returncode != 0 and "heap-buffer-overflow" in runs[20].stderr, runs[20].stderr[-2000:]
    assert "global_read_kernel" in runs[20].stderr
