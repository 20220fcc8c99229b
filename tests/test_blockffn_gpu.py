"""BlockFFN CUDA kernels (csrc/kernels/moe.h) against the dense fp32 oracle, on a GPU.

Marked `gpu`: skipped automatically (tests/conftest.py) without a CUDA device and the compiled
extension. Run on a GPU machine with:

    pip install --no-build-isolation -C cmake.define.EDGESPEC_CUDA_ARCHS=90a-real .
    python -m pytest -q tests/test_blockffn_gpu.py

Conventions (STYLE.md): random inputs with an exactly known active set (oracle.routed_case),
odd and real shapes, every kernel output and scratch buffer NaN-poisoned before the launch,
tolerance k * (error of the torch path at the same precision vs the fp32 oracle) + an ulp of the
largest value; the active set and the sparsity counters are compared exactly.
"""
from __future__ import annotations

import os

import pytest
import torch

from edgespec import ops
from edgespec.ops import _kernels
from edgespec.ops.moe import BlockFFNScratch
from oracle.blockffn_ref import blockffn_ref, router_ref, routed_case, sparsity_ref

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("poisoned_kernel_outputs")]

EPS = 1e-5
K_TORCH = 2.0
DTYPES = [torch.bfloat16, torch.float16]
# (H, E, d): smallest legal, odd expert counts, the demo model's width, BlockFFN-1.2B and -3B-like.
SHAPES = [(32, 1, 32), (96, 7, 32), (576, 36, 64), (1792, 56, 128), (2560, 80, 128)]
TOKENS = [1, 7, 16, 17, 33, 64, 100, 128]


def cuda_case(t: int, h: int, e: int, d: int, sparsity: float, dtype: torch.dtype, seed: int = 0, density: float = 0.5):
    x, router, norm, up, down, active = routed_case(t, h, e, d, sparsity, seed=seed, token_density=density)
    return [v.to(device="cuda", dtype=dtype) for v in (x, router, norm, up, down)], active


def torch_path(*args, **kwargs) -> torch.Tensor:
    old = os.environ.get("EDGESPEC_BACKEND")
    os.environ["EDGESPEC_BACKEND"] = "torch"
    try:
        return ops.blockffn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["EDGESPEC_BACKEND"]
        else:
            os.environ["EDGESPEC_BACKEND"] = old


def check(got: torch.Tensor, on_torch: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (an element was not written?)"
    torch_err = (on_torch.float().cpu() - ref).abs().max().item()
    err = (got.float().cpu() - ref).abs().max().item()
    ulp = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= K_TORCH * torch_err + ulp, f"{what}: max error {err:.3g} vs torch path {torch_err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h, e, d", SHAPES)
@pytest.mark.parametrize("t", TOKENS)
def test_kernels_match_oracle(t: int, h: int, e: int, d: int, dtype: torch.dtype) -> None:
    sparsity = 0.7 if e > 1 else 0.0
    (x, router, norm, up, down), active = cuda_case(t, h, e, d, sparsity, dtype, seed=t + h)
    assert _kernels.supports_blockffn(x, router, norm, up, down)
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    got = ops.blockffn(x, router, norm, EPS, up, down, counters)
    ref = blockffn_ref(*(v.float().cpu() for v in (x, router, norm)), EPS, up.float().cpu(), down.float().cpu())
    check(got, torch_path(x, router, norm, EPS, up, down), ref, f"T={t} H={h} E={e} d={d} {dtype}")
    w = router_ref(x.float().cpu(), router.float().cpu(), norm.float().cpu(), EPS)
    assert torch.equal(w != 0, active)
    tls, cls = sparsity_ref(w)
    assert counters.tolist() == [round((1 - tls) * t * e), round((1 - cls) * e)]


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.95, 1.0])
@pytest.mark.parametrize("t", [1, 8, 64])
def test_sparsity_levels_and_edge_cases(t: int, sparsity: float) -> None:
    """0% (all active, here with every token using every expert), 1.0 (no expert active: zeros)."""
    density = 1.0 if sparsity == 0.0 else 0.5
    (x, router, norm, up, down), _ = cuda_case(t, 256, 40, 32, sparsity, torch.bfloat16, seed=3, density=density)
    got = ops.blockffn(x, router, norm, EPS, up, down)
    ref = blockffn_ref(*(v.float().cpu() for v in (x, router, norm)), EPS, up.float().cpu(), down.float().cpu())
    if sparsity == 1.0:
        assert torch.equal(got.cpu(), torch.zeros_like(got.cpu()))
    else:
        check(got, torch_path(x, router, norm, EPS, up, down), ref, f"T={t} sparsity {sparsity}")


def test_inactive_experts_are_never_read() -> None:
    (x, router, norm, up, down), active = cuda_case(9, 512, 24, 64, 0.75, torch.bfloat16, seed=5)
    clean = ops.blockffn(x, router, norm, EPS, up, down)
    up, down = up.clone(), down.clone()
    for i in (~active.any(0)).nonzero().flatten().tolist():
        up[i * 64:(i + 1) * 64] = float("nan")
        down[:, i * 64:(i + 1) * 64] = float("nan")
    assert torch.equal(ops.blockffn(x, router, norm, EPS, up, down), clean)


def test_scratch_counters_are_left_zero_and_calls_repeat() -> None:
    (x, router, norm, up, down), _ = cuda_case(5, 1024, 48, 64, 0.6, torch.float16, seed=6)
    scratch = BlockFFNScratch()
    first = ops.blockffn(x, router, norm, EPS, up, down, scratch=scratch)
    for _ in range(3):
        assert torch.equal(ops.blockffn(x, router, norm, EPS, up, down, scratch=scratch), first)
    assert scratch.sync is not None and int(scratch.sync.abs().sum()) == 0


def test_cuda_graph_replay_follows_new_inputs() -> None:
    """No host sync inside the op: it captures into a CUDA graph and replays with new tokens."""
    (x, router, norm, up, down), _ = cuda_case(8, 512, 32, 64, 0.5, torch.bfloat16, seed=7)
    (x2, _, _, _, _), _ = cuda_case(8, 512, 32, 64, 0.5, torch.bfloat16, seed=8)
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
    expected = torch_path(x2, router, norm, EPS, up, down)
    ref = blockffn_ref(*(v.float().cpu() for v in (x2, router, norm)), EPS, up.float().cpu(), down.float().cpu())
    check(static_y, expected, ref, "graph replay")
    w = router_ref(x2.float().cpu(), router.float().cpu(), norm.float().cpu(), EPS)
    tls, cls = sparsity_ref(w)
    assert counters.tolist() == [round((1 - tls) * 8 * 32), round((1 - cls) * 32)]


def test_unsupported_shapes_fall_back_to_torch() -> None:
    x = torch.randn(3, 100, device="cuda", dtype=torch.bfloat16)  # hidden not a multiple of 32
    router = torch.randn(4, 100, device="cuda", dtype=torch.bfloat16)
    norm = torch.ones(4, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(128, 100, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(100, 128, device="cuda", dtype=torch.bfloat16)
    assert "multiple of 32" in _kernels.blockffn_rejection(x, router, norm, up, down)
    y = ops.blockffn(x, router, norm, EPS, up, down)
    ref = blockffn_ref(*(v.float().cpu() for v in (x, router, norm)), EPS, up.float().cpu(), down.float().cpu())
    assert (y.float().cpu() - ref).abs().max().item() < 0.05 * ref.abs().max().item() + 1e-2
