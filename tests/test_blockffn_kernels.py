"""BlockFFN CUDA kernels (csrc/kernels/moe.h) against the dense fp32 oracle.

One body per check for both targets (the `kernel_device` fixture): the CPU emulator (`emulated`,
tools/cuda_emulator) and a GPU (`gpu`, skipped without one). On a GPU:

    pip install --no-build-isolation -C cmake.define.EDGESPEC_CUDA_ARCHS=90a-real .
    python -m pytest -q -m gpu tests/test_blockffn_kernels.py

Conventions (STYLE.md): random inputs with an exactly known active set (oracle.routed_case), odd
and real shapes, every output and scratch buffer NaN-poisoned (-7 for integers) before the launch,
tolerance k * (error of the torch path at the same precision vs the fp32 oracle) + an ulp of the
largest value. Compared exactly: the active (token, expert) pattern of the router weights, the
kernels' ascending active-expert list and its length, the sparsity counters, the arrival counters
left at zero, and (emulator) the outputs under every thread/block schedule (a difference is a race).

The split-K factors come from edgespec.ops._kernels.blockffn_splits (on the emulator as for an
H100's 132 SMs) or are forced, so that every GEMM's last-block reduction and its counter reset run.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.ops import _kernels
from edgespec.ops.moe import BlockFFNScratch, blockffn_router
from oracle.blockffn_ref import blockffn_ref, router_ref, routed_case, sparsity_ref

EPS = 1e-5
K_TORCH = 2.0
DTYPES = [torch.bfloat16, torch.float16]
# One token; a partial m-tile of each token-tile count the launcher picks (kMT = 1, 2, 4, 8 for
# T <= 16, 32, 64, 128); full tiles at 16, 64 and 128.
TOKENS = [1, 7, 16, 17, 33, 64, 100, 128]
# (H, E, d): smallest legal; odd E; d = 64; E > 64 (two router tiles, so the router's last block
# is the last of several tiles). routed_case needs T <= H.
SHAPES = [(32, 1, 32), (96, 7, 32), (160, 36, 64), (128, 70, 32)]
# Real layer widths: the demo model's, BlockFFN-1.2B's and the BlockFFN-3B-like benchmark layer.
# On the emulator only the benchmark layer, at three token counts (each takes seconds there).
REAL_SHAPES = [(576, 36, 64), (1792, 56, 128), (2560, 80, 128)]
REAL_ON_EMULATOR = {(2560, 80, 128, t) for t in (1, 16, 64)}


def make_case(t: int, h: int, e: int, d: int, sparsity: float, dtype: torch.dtype, device: torch.device,
              seed: int = 0, density: float = 0.5):
    x, router, norm, up, down, active = routed_case(t, h, e, d, sparsity, seed=seed, token_density=density)
    return [v.to(device=device, dtype=dtype) for v in (x, router, norm, up, down)], active


class Call:
    """One kernel call with its scratch: out [T, H], weights fp32 [T, E], active int32 [E + 1],
    hidden [T, E * d], and the split factors the call used."""

    def __init__(self, out, weights, active, hidden, splits):
        self.out, self.weights, self.active, self.hidden, self.splits = out, weights, active, hidden, splits

    def active_list(self) -> list[int]:
        count = int(self.active[-1])
        return self.active[:count].tolist()


def run_kernels(x, router, norm, up, down, counters=None, sync=None, splits=None) -> Call:
    """_kernels.blockffn, keeping the scratch it allocates (through the poisoned _new_output)."""
    allocated = []
    used = []
    poisoned = _kernels._new_output
    heuristic = _kernels.blockffn_splits

    def record(shape, dtype, device):
        allocated.append(poisoned(shape, dtype, device))
        return allocated[-1]

    def choose(*args):
        used.append(splits if splits is not None else heuristic(*args))
        return used[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(_kernels, "_new_output", record)
        m.setattr(_kernels, "blockffn_splits", choose)
        out = _kernels.blockffn(x, router, norm, EPS, up, down, counters, sync)
    assert out is allocated[0]
    _, weights, active, hidden, _partial = allocated
    return Call(out, weights, active, hidden, used[0])


def torch_path(x, router, norm, up, down) -> torch.Tensor:
    """ops.blockffn's torch path at the inputs' precision, on their device."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        return ops.blockffn(x, router, norm, EPS, up, down)


def check(got: torch.Tensor, on_torch: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got, on_torch = got.float().cpu(), on_torch.cpu()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (an element was not written?)"
    torch_err = (on_torch.float() - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    ulp = torch.finfo(on_torch.dtype).eps * ref.abs().max().item()
    assert err <= K_TORCH * torch_err + ulp, f"{what}: max error {err:.3g} vs torch path {torch_err:.3g}"


def verify(call: Call, inputs, active: torch.Tensor, what: str) -> None:
    """Output vs the oracle; router weights, active pattern and active-expert list exactly."""
    x, router, norm, up, down = inputs
    cpu = [v.float().cpu() for v in inputs]
    ref = blockffn_ref(*cpu[:3], EPS, *cpu[3:])
    check(call.out, torch_path(*inputs), ref, what)
    # The router weights (T-rounded, kept in fp32) against the torch path's and the oracle's.
    w_ref = router_ref(*cpu[:3], EPS)
    assert torch.equal(w_ref != 0, active), f"{what}: test setup: the rounded inputs moved the active set"
    assert torch.equal(call.weights.cpu() != 0, active), f"{what}: router active pattern"
    check(call.weights, blockffn_router(x, router, norm, EPS), w_ref, f"{what} router weights")
    expected = active.any(0).nonzero().flatten().tolist()
    assert call.active_list() == expected, f"{what}: active experts {call.active_list()} != {expected}"


def expected_counters(active: torch.Tensor) -> list[int]:
    t, e = active.shape
    tls, cls = sparsity_ref(active.float())
    return [round((1 - tls) * t * e), round((1 - cls) * e)]


def counters_and_sync(device: torch.device, h: int, e: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.zeros(2, dtype=torch.int64, device=device),
            torch.zeros(_kernels.blockffn_sync_words(h, e, d), dtype=torch.int32, device=device))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, h, e, d", [(t, *shape) for t in TOKENS for shape in SHAPES if t <= shape[0]])
def test_kernels_match_oracle(kernel_device: torch.device, t: int, h: int, e: int, d: int, dtype: torch.dtype) -> None:
    inputs, active = make_case(t, h, e, d, 0.7 if e > 1 else 0.0, dtype, kernel_device, seed=t + h)
    assert _kernels.supports_blockffn(*inputs)
    counters, sync = counters_and_sync(kernel_device, h, e, d)
    call = run_kernels(*inputs, counters=counters, sync=sync)
    verify(call, inputs, active, f"T={t} H={h} E={e} d={d} {dtype} splits {call.splits}")
    assert counters.tolist() == expected_counters(active)
    assert int(sync.abs().sum()) == 0, "arrival counters not left at zero"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, e, d, splits", [(160, 36, 64, None), (128, 70, 32, (2, 3, 5))])
def test_a_token_gets_the_same_bits_whatever_tokens_share_its_step(kernel_device: torch.device, h: int, e: int,
                                                                    d: int, splits, dtype: torch.dtype) -> None:
    """Row invariance (moe.h): a token decoded alone and the same token among the T of a verified
    tree get bitwise the same output, although the step's union of experts differs (down splits at
    fixed expert boundaries; the planned splits ignore T)."""
    inputs, _ = make_case(33, h, e, d, 0.7, dtype, kernel_device, seed=4, density=0.3)
    x, rest = inputs[0], inputs[1:]
    many = run_kernels(x, *rest, splits=splits)
    assert len(many.active_list()) > len(run_kernels(x[5:6], *rest, splits=splits).active_list())  # unions differ
    for i in range(33):
        alone = run_kernels(x[i:i + 1], *rest, splits=splits)
        assert torch.equal(many.out[i:i + 1], alone.out), f"token {i}"
    assert torch.equal(many.out[:7], run_kernels(x[:7], *rest, splits=splits).out)


@pytest.mark.slow
@pytest.mark.parametrize("t, h, e, d", [(t, *shape) for t in TOKENS for shape in REAL_SHAPES])
def test_real_layer_shapes(kernel_device: torch.device, t: int, h: int, e: int, d: int) -> None:
    """Real BlockFFN layer widths at 70% chunk sparsity (bf16)."""
    if kernel_device.type == "cpu" and (h, e, d, t) not in REAL_ON_EMULATOR:
        pytest.skip("the emulator runs the benchmark layer at three token counts only")
    inputs, active = make_case(t, h, e, d, 0.7, torch.bfloat16, kernel_device, seed=t)
    counters, _ = counters_and_sync(kernel_device, h, e, d)
    call = run_kernels(*inputs, counters=counters)
    verify(call, inputs, active, f"H={h} E={e} d={d} T={t} splits {call.splits}")
    assert counters.tolist() == expected_counters(active)


LEVELS = [0.0, 0.5, 0.9, 0.95, 1.0]
# Each (T, level) in one dtype, alternating, so that both dtypes meet every T and every level.
LEVEL_CASES = [(t, s, DTYPES[(i + j) % 2]) for i, t in enumerate([1, 7, 64, 128]) for j, s in enumerate(LEVELS)]


@pytest.mark.parametrize("t, sparsity, dtype", LEVEL_CASES)
def test_sparsity_levels_and_edge_cases(kernel_device: torch.device, t: int, sparsity: float,
                                        dtype: torch.dtype) -> None:
    """0% (every token uses every expert), 50-95%, and 100% (no expert active: exact zeros)."""
    h, e, d = 128, 40, 32
    density = 1.0 if sparsity == 0.0 else 0.5
    inputs, active = make_case(t, h, e, d, sparsity, dtype, kernel_device, seed=3 + t, density=density)
    counters = torch.tensor([5, 11], dtype=torch.int64, device=kernel_device)  # accumulated into, not overwritten
    call = run_kernels(*inputs, counters=counters)
    what = f"T={t} sparsity {sparsity} {dtype} splits {call.splits}"
    verify(call, inputs, active, what)
    pairs, experts = expected_counters(active)
    assert counters.tolist() == [5 + pairs, 11 + experts]
    if sparsity == 1.0:
        assert int(call.active[-1]) == 0 and pairs == 0
        assert torch.equal(call.out, torch.zeros_like(call.out)), f"{what}: not exact zeros"
    if sparsity == 0.0:
        assert call.active_list() == list(range(e)) and pairs == t * e
    else:
        assert experts == e - round(sparsity * e)


def test_default_splits_cover_every_reduction() -> None:
    """The heuristic (132 SMs) splits all three GEMMs at the small-T shapes used here."""
    assert all(s > 1 for s in _kernels.blockffn_splits(128, 40, 32, 132))
    assert all(s > 1 for s in _kernels.blockffn_splits(160, 36, 64, 132))


# (router, up, down): unsplit; each GEMM split alone; all at once; every split count at its
# maximum (router/up: H / 32 chunks) or past the down GEMM's chunks (empty splits write zeros).
SPLITS = [(1, 1, 1), (3, 1, 1), (1, 4, 1), (1, 1, 6), (2, 3, 5), (5, 5, 40)]


@pytest.mark.parametrize("t, splits", [(7, s) for s in SPLITS] + [(64, (2, 3, 5)), (128, (4, 4, 9))])
def test_forced_splits_and_repeated_calls_on_one_sync(kernel_device: torch.device, t: int,
                                                      splits: tuple[int, int, int]) -> None:
    """Every split-K reduction, then calls on the same arrival counters: each last block must have
    reset its counter, or the next call's reduction never runs and its poisoned output stays NaN."""
    h, e, d = 160, 70, 32
    inputs, active = make_case(t, h, e, d, 0.6, torch.bfloat16, kernel_device, seed=21)
    inputs2, active2 = make_case(t, h, e, d, 0.6, torch.bfloat16, kernel_device, seed=22)  # another active set
    counters, sync = counters_and_sync(kernel_device, h, e, d)
    first = run_kernels(*inputs, counters=counters, sync=sync, splits=splits)
    verify(first, inputs, active, f"T={t} splits {splits} call 1")
    assert int(sync.abs().sum()) == 0
    second = run_kernels(*inputs2, counters=counters, sync=sync, splits=splits)
    verify(second, inputs2, active2, f"T={t} splits {splits} call 2")
    again = run_kernels(*inputs, counters=counters, sync=sync, splits=splits)
    assert torch.equal(again.out, first.out)
    assert int(sync.abs().sum()) == 0, "arrival counters not left at zero"
    c1, c2 = expected_counters(active), expected_counters(active2)
    assert counters.tolist() == [2 * c1[0] + c2[0], 2 * c1[1] + c2[1]]


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
@pytest.mark.parametrize("t, splits", [(7, (3, 2, 4)), (64, (4, 2, 3))])
def test_emulated_schedules_give_bit_identical_results(t: int, splits, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulator only: threads and blocks in forward, reverse, random and run-ahead (serial) orders.
    A result that changes with the order is a race."""
    h, e, d = 160, 70, 32
    cpu = torch.device("cpu")
    inputs, active = make_case(t, h, e, d, 0.5, torch.float16, cpu, seed=31)
    results = []
    for schedule in ("forward", "reverse", "random:1", "random:12345", "serial", "serial-reverse"):
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        counters, sync = counters_and_sync(cpu, h, e, d)
        call = run_kernels(*inputs, counters=counters, sync=sync, splits=splits)
        results.append((schedule, call, counters))
        assert int(sync.abs().sum()) == 0, f"{schedule}: arrival counters not left at zero"
    verify(results[0][1], inputs, active, f"T={t} forward")
    _, base, base_counters = results[0]
    width = int(base.active[-1]) * d
    for schedule, call, counters in results[1:]:
        assert torch.equal(call.out, base.out), f"{schedule}: output differs from forward"
        assert torch.equal(call.weights, base.weights), f"{schedule}: router weights differ"
        assert torch.equal(call.active, base.active), f"{schedule}: active list differs"
        assert torch.equal(call.hidden[:, :width], base.hidden[:, :width]), f"{schedule}: hidden differs"
        assert torch.equal(counters, base_counters), f"{schedule}: sparsity counters differ"


def test_inactive_experts_are_never_read(kernel_device: torch.device) -> None:
    """NaN weights on every expert the step does not use: the result must not change."""
    h = 512 if kernel_device.type == "cuda" else 160
    inputs, active = make_case(9, h, 24, 64, 0.75, torch.bfloat16, kernel_device, seed=5)
    x, router, norm, up, down = inputs
    clean = run_kernels(*inputs).out
    up, down = up.clone(), down.clone()
    for i in (~active.any(0)).nonzero().flatten().tolist():
        up[i * 64:(i + 1) * 64] = float("nan")
        down[:, i * 64:(i + 1) * 64] = float("nan")
    assert torch.equal(run_kernels(x, router, norm, up, down).out, clean)


@pytest.mark.parametrize("t, pad", [(7, 8), (1, 8), (1, 3)])
def test_strided_x_rows(kernel_device: torch.device, t: int, pad: int) -> None:
    """x as a column slice of a wider buffer (row stride H + pad). One token's row stride is never
    used, so any stride is accepted there (by the Python check and the C++ check alike)."""
    h, e, d = 96, 7, 32
    inputs, active = make_case(t, h, e, d, 0.5, torch.float16, kernel_device, seed=41)
    wide = torch.randn(t, h + pad, dtype=torch.float16, device=kernel_device)
    wide[:, :h] = inputs[0]
    x = wide[:, :h]
    assert x.stride(0) == h + pad
    assert _kernels.supports_blockffn(x, *inputs[1:])
    call = run_kernels(x, *inputs[1:])
    verify(call, inputs, active, f"T={t} row stride {h + pad}")


def test_strided_counters(kernel_device: torch.device) -> None:
    """counters may be any int64 [2] view (the torch path accumulates into any); the kernels must
    add to its two elements, not to the next two words of its storage."""
    inputs, active = make_case(7, 96, 7, 32, 0.5, torch.bfloat16, kernel_device, seed=51)
    base = torch.tensor([100, -1, 200, -1], dtype=torch.int64, device=kernel_device)
    run_kernels(*inputs, counters=base[::2])
    pairs, experts = expected_counters(active)
    assert base.tolist() == [100 + pairs, -1, 200 + experts, -1]


def test_python_rejects_what_the_cpp_check_rejects(kernel_device: torch.device) -> None:
    """E * d past the C++ limit (int indices into hidden [T, E * d]) falls back to the torch path
    instead of failing in the kernel's argument check (stride-0 views: no memory allocated)."""
    h, width = 32, 2**24
    x = torch.randn(3, h, dtype=torch.bfloat16, device=kernel_device)
    router = torch.randn(1, h, dtype=torch.bfloat16, device=kernel_device)
    norm = torch.ones(1, dtype=torch.bfloat16, device=kernel_device)
    up = torch.empty(1, h, dtype=torch.bfloat16, device=kernel_device).expand(width, h)
    down = torch.empty(h, 1, dtype=torch.bfloat16, device=kernel_device).expand(h, width)
    reason = _kernels.blockffn_rejection(x, router, norm, up, down)
    assert reason is not None and "limit" in reason, reason


# --- GPU only: the op layer's kernel path ------------------------------------------------------------

def test_ops_layer_scratch_is_left_zero_and_calls_repeat(kernel_device: torch.device) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("the op layer takes the kernels for CUDA tensors (emulated: test_emulated_model.py)")
    inputs, _ = make_case(5, 1024, 48, 64, 0.6, torch.float16, kernel_device, seed=6)
    x, router, norm, up, down = inputs
    scratch = BlockFFNScratch()
    first = ops.blockffn(x, router, norm, EPS, up, down, scratch=scratch)
    for _ in range(3):
        assert torch.equal(ops.blockffn(x, router, norm, EPS, up, down, scratch=scratch), first)
    assert scratch.sync is not None and int(scratch.sync.abs().sum()) == 0


def test_cuda_graph_replay_follows_new_inputs(kernel_device: torch.device) -> None:
    """No host sync inside the op: it captures into a CUDA graph and replays with new tokens."""
    if kernel_device.type != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    (x, router, norm, up, down), _ = make_case(8, 512, 32, 64, 0.5, torch.bfloat16, kernel_device, seed=7)
    (x2, _, _, _, _), active2 = make_case(8, 512, 32, 64, 0.5, torch.bfloat16, kernel_device, seed=8)
    scratch = BlockFFNScratch()
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    static_x = x.clone()
    ops.blockffn(static_x, router, norm, EPS, up, down, counters, scratch)  # warm-up allocations
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = ops.blockffn(static_x, router, norm, EPS, up, down, counters, scratch)
    counters.zero_()
    static_x.copy_(x2)
    graph.replay()
    cpu = [v.float().cpu() for v in (x2, router, norm, up, down)]
    check(static_y, torch_path(x2, router, norm, up, down), blockffn_ref(*cpu[:3], EPS, *cpu[3:]), "graph replay")
    assert counters.tolist() == expected_counters(active2)


def test_unsupported_shapes_fall_back_to_torch(kernel_device: torch.device) -> None:
    if kernel_device.type != "cuda":
        pytest.skip("the op layer takes the kernels for CUDA tensors only")
    x = torch.randn(3, 100, device="cuda", dtype=torch.bfloat16)  # hidden not a multiple of 32
    router = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(4, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(128, 100, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16)
    assert "multiple of 32" in _kernels.blockffn_rejection(x, router, norm, up, down)
    y = ops.blockffn(x, router, norm, EPS, up, down)
    cpu = [v.float().cpu() for v in (x, router, norm, up, down)]
    ref = blockffn_ref(*cpu[:3], EPS, *cpu[3:])
    assert (y.float().cpu() - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 1e-2
