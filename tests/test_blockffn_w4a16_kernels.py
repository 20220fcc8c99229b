"""BlockFFN with 4-bit experts on the kernel path: the router kernel (csrc/kernels/moe.h) followed
by the W4A16 kernel's expert gather (csrc/kernels/w4a16.h), against the dense fp32 oracle.

One body for both targets (the `kernel_device` fixture): the CPU emulator (`emulated`) and a GPU
(`gpu`), with the real BlockFFN-3B-like shape added on the GPU only. Conventions as the other
kernel tests: random inputs with an exactly known active set (oracle.routed_case), random 4-bit
weights of every zero-point kind, every output and scratch buffer NaN-poisoned, tolerance
k * (error of the torch path at the same precision vs the oracle) + an ulp of the largest value.
The oracle uses the 4-bit weights dequantised in fp32, so the comparison isolates the kernels.
"""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.ops import _kernels
from oracle.blockffn_ref import blockffn_ref, routed_case, sparsity_ref
from w4a16_cases import random_experts as experts

EPS = 1e-5
K_TORCH = 2.0
DTYPES = [torch.bfloat16, torch.float16]
# (H, E, d): one expert; odd E with d = 64 (two experts per 128-column block of the kernel);
# d = 128 (one expert per block, a whole pipeline stage per expert in down).
SHAPES = [(64, 1, 64), (96 + 32, 7, 64), (192, 13, 128)]
TOKENS = [1, 7, 33, 64, 100, 128]


def case(t: int, h: int, e: int, d: int, sparsity: float, dtype: torch.dtype, device: torch.device, seed: int = 0,
         density: float = 0.5):
    x, router, norm, _, _, active = routed_case(t, h, e, d, sparsity, seed=seed, token_density=density)
    return [v.to(device=device, dtype=dtype) for v in (x, router, norm)], active


def oracle(x, router, norm, up: ops.W4A16Weight, down: ops.W4A16Weight) -> torch.Tensor:
    return blockffn_ref(x.float().cpu(), router.float().cpu(), norm.float().cpu(), EPS,
                        up.dequantize().cpu(), down.dequantize().cpu())


def torch_path(x, router, norm, up, down) -> torch.Tensor:
    """The op's torch path at the same precision (dequantised weights in x's dtype), on the CPU."""
    cpu = [v.cpu() for v in (x, router, norm)]
    return ops.moe.blockffn_experts(cpu[0], ops.blockffn_router(*cpu, EPS),
                                    up.dequantize(x.dtype).cpu(), down.dequantize(x.dtype).cpu())


def check(got: torch.Tensor, inputs, up, down, what: str) -> None:
    ref = oracle(*inputs, up, down)
    on_torch = torch_path(*inputs, up, down)
    got = got.float().cpu()
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (an element was not written?)"
    torch_err = (on_torch.float() - ref).abs().max().item()
    err = (got - ref).abs().max().item()
    ulp = torch.finfo(on_torch.dtype).eps * ref.abs().max().item()
    assert err <= K_TORCH * torch_err + ulp, f"{what}: max error {err:.3g} vs torch path {torch_err:.3g}"


def expected_counters(active: torch.Tensor) -> list[int]:
    t, e = active.shape
    tls, cls = sparsity_ref(active.float())
    return [round((1 - tls) * t * e), round((1 - cls) * e)]


def arrivals_left_zero(*weights: ops.W4A16Weight) -> bool:
    """The W4A16 split-K arrival counters of the weights' widths (made on the first split launch,
    shared per stream) are back at zero."""
    widths = {w.out_features // 64 for w in weights}
    return all(int(c.abs().sum()) == 0 for (_, _, tiles), c in _kernels._split_counters.items() if tiles in widths)


def run(inputs, up, down, counters=None, sync=None) -> torch.Tensor:
    x, router, norm = inputs
    assert _kernels.blockffn_w4a16_rejection(x, router, norm, up, down) is None
    return _kernels.blockffn_w4a16(x, router, norm, EPS, up, down, counters, sync)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t, h, e, d", [(t, *s) for t in TOKENS for s in SHAPES if t <= s[0]])
def test_matches_oracle(kernel_device: torch.device, t: int, h: int, e: int, d: int, dtype: torch.dtype) -> None:
    inputs, active = case(t, h, e, d, 0.7 if e > 1 else 0.0, dtype, kernel_device, seed=t + h)
    up, down = experts(h, e, d, 64, "int", dtype, kernel_device, seed=t)
    counters = torch.zeros(2, dtype=torch.int64, device=kernel_device)
    sync = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    out = run(inputs, up, down, counters, sync)
    check(out, inputs, up, down, f"T={t} H={h} E={e} d={d} {dtype}")
    assert counters.tolist() == expected_counters(active)
    assert int(sync.item()) == 0 and arrivals_left_zero(up, down)


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_token_gets_the_same_bits_whatever_tokens_share_its_step(kernel_device: torch.device,
                                                                    dtype: torch.dtype, monkeypatch) -> None:
    """Row invariance (w4a16.h): with d % 128 == 0 a token decoded alone and the same token among
    the T of a verified tree get bitwise the same output, though the step's union of experts
    differs: down splits at fixed expert boundaries, so each expert keeps its split, stage and warp."""
    h, e, d = 192, 13, 128
    monkeypatch.setattr(_kernels, "w4a16_splits", lambda n, k, device: 3)  # split both GEMMs
    inputs, _ = case(33, h, e, d, 0.7, dtype, kernel_device, seed=6, density=0.3)
    up, down = experts(h, e, d, 64, "int", dtype, kernel_device, seed=2)
    x, router, norm = inputs
    many = run(inputs, up, down)
    for i in range(33):
        alone = run([x[i:i + 1], router, norm], up, down)
        assert torch.equal(many[i:i + 1], alone), f"token {i}"
    assert arrivals_left_zero(up, down)


# (group, zero points, act-order up): per group size the kernel takes on both sides (32, 64 = d,
# per-channel), each zero-point kind, GPTQ act-order on up (down never has it).
QUANT = [(32, "sym", False), (64, "int", False), (-1, "frac", False), (32, "int", True), (64, "sym", True)]


@pytest.mark.parametrize("group, zeros, act_order", QUANT)
@pytest.mark.parametrize("t", [1, 17])
def test_group_sizes_zero_points_and_act_order(kernel_device: torch.device, t: int, group: int, zeros: str,
                                               act_order: bool) -> None:
    h, e, d = 128, 9, 64
    inputs, _ = case(t, h, e, d, 0.6, torch.bfloat16, kernel_device, seed=5)
    up, down = experts(h, e, d, group, zeros, torch.bfloat16, kernel_device, seed=7, act_order=act_order)
    assert (up.perm is not None) == act_order
    check(run(inputs, up, down), inputs, up, down, f"group {group} {zeros} act-order {act_order}")


@pytest.mark.parametrize("t, sparsity", [(1, 1.0), (7, 0.0), (64, 0.95), (128, 1.0), (128, 0.0)])
def test_no_expert_and_every_expert(kernel_device: torch.device, t: int, sparsity: float) -> None:
    """100% sparsity: no launch reads a weight and the output is exact zeros; 0%: all experts."""
    h, e, d = 128, 6, 64
    inputs, active = case(t, h, e, d, sparsity, torch.float16, kernel_device, seed=t,
                          density=1.0 if sparsity == 0.0 else 0.5)
    up, down = experts(h, e, d, 32, "int", torch.float16, kernel_device, seed=3)
    counters = torch.tensor([3, 4], dtype=torch.int64, device=kernel_device)
    out = run(inputs, up, down, counters)
    pairs, count = expected_counters(active)
    assert counters.tolist() == [3 + pairs, 4 + count]
    if sparsity == 1.0:
        assert count == 0 and torch.equal(out, torch.zeros_like(out))
    else:
        check(out, inputs, up, down, f"T={t} sparsity {sparsity}")


def test_inactive_experts_are_never_read(kernel_device: torch.device) -> None:
    """NaN scales on every inactive expert of the step (up's columns, down's groups): any read of
    them would reach the output (silu(NaN) * 0 is NaN)."""
    h, e, d, t = 128, 12, 64, 9
    inputs, active = case(t, h, e, d, 0.75, torch.bfloat16, kernel_device, seed=4)
    up, down = experts(h, e, d, 32, "int", torch.bfloat16, kernel_device, seed=8)
    ref_out = run(inputs, up, down)
    for i in (~active.any(0)).nonzero().flatten().tolist():
        up.scales[:, i * d:(i + 1) * d] = float("nan")
        down.scales[i * d // 32:(i + 1) * d // 32] = float("nan")
    assert torch.equal(run(inputs, up, down), ref_out)


@pytest.mark.parametrize("splits", [1, 3, 8])
def test_forced_splits_and_repeated_calls(kernel_device: torch.device, splits: int,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Every split count on both gathers (down: more splits than active k16 tiles, so some add
    zeros), then calls with other active sets on the same arrival counters, which the last block of
    each column tile must leave at zero."""
    monkeypatch.setattr(_kernels, "w4a16_splits", lambda n, k, device: splits)
    h, e, d, t = 128, 10, 64, 7
    up, down = experts(h, e, d, 64, "int", torch.bfloat16, kernel_device, seed=9)
    sync = torch.zeros(1, dtype=torch.int32, device=kernel_device)
    for seed in (1, 2, 1):
        inputs, _ = case(t, h, e, d, 0.8, torch.bfloat16, kernel_device, seed=seed)
        check(run(inputs, up, down, sync=sync), inputs, up, down, f"splits {splits} seed {seed}")
        assert arrivals_left_zero(up, down)


def test_blockffn_3b_like_shape(kernel_device: torch.device) -> None:
    """The benchmark's layer shape (H 2560, 80 experts of 128), GPTQ-style group 128, on the GPU."""
    if kernel_device.type != "cuda":
        pytest.skip("real shape: GPU only (the emulator takes minutes)")
    h, e, d = 2560, 80, 128
    for t in (1, 8, 64):
        inputs, active = case(t, h, e, d, 0.7, torch.bfloat16, kernel_device, seed=t)
        up, down = experts(h, e, d, 128, "int", torch.bfloat16, kernel_device, seed=t)
        counters = torch.zeros(2, dtype=torch.int64, device=kernel_device)
        check(run(inputs, up, down, counters), inputs, up, down, f"BlockFFN-3B-like T={t}")
        assert counters.tolist() == expected_counters(active)


def test_ops_layer_takes_the_4bit_kernel_path(kernel_device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """ops.blockffn with W4A16Weight experts reaches blockffn_w4a16 (and nothing else) on the kernel path."""
    if kernel_device.type == "cpu":
        monkeypatch.setattr(ops.backend, "use_kernel", lambda *tensors: True)
    calls = []
    real = _kernels.blockffn_w4a16
    monkeypatch.setattr(_kernels, "blockffn_w4a16", lambda *a: calls.append(1) or real(*a))
    h, e, d, t = 128, 5, 64, 3
    inputs, _ = case(t, h, e, d, 0.4, torch.bfloat16, kernel_device, seed=6)
    up, down = experts(h, e, d, 32, "sym", torch.bfloat16, kernel_device, seed=2)
    counters = torch.zeros(2, dtype=torch.int64, device=kernel_device)
    out = ops.blockffn(*inputs, EPS, up, down, counters)
    assert calls == [1]
    check(out, inputs, up, down, "ops.blockffn")


@pytest.mark.emulated
@pytest.mark.usefixtures("emulated_kernels")
def test_emulated_schedules_give_bit_identical_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Emulator only: threads and blocks in forward, reverse, random and run-ahead (serial) orders,
    split on both gathers. A result that changes with the order is a race."""
    monkeypatch.setattr(_kernels, "w4a16_splits", lambda n, k, device: 3)
    h, e, d, t = 128, 11, 64, 20
    inputs, _ = case(t, h, e, d, 0.6, torch.float16, torch.device("cpu"), seed=12)
    up, down = experts(h, e, d, 32, "int", torch.float16, torch.device("cpu"), seed=13)
    results = {}
    for schedule in ("forward", "reverse", "random:7", "serial", "serial-reverse"):
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        results[schedule] = run(inputs, up, down)
    check(results["forward"], inputs, up, down, "forward")
    for schedule, out in results.items():
        assert torch.equal(out, results["forward"]), f"{schedule}: output differs from forward"
