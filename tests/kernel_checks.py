"""Inputs and comparisons shared by the kernel test modules (test_*_kernels.py), whose checks run on
the CPU emulator and on a GPU: one tolerance rule, one way to build inputs, any device."""
from __future__ import annotations

import pytest
import torch

from edgespec import ops
from edgespec.kv_cache import KVCache
from oracle.attention import attention_ref

# Tolerance (STYLE.md): max |kernel - oracle| <= K_TORCH x max |torch path - oracle| + slack.
K_TORCH = 2.0


def device_cases(emulated, gpu) -> list:
    """Parameters for tests on the `kernel_device` fixture whose cases differ by target: the
    `emulated` cases (tuples) on the CPU emulator, the `gpu` cases (usually a superset, at real
    sizes) on a GPU. Use as

        @pytest.mark.parametrize("kernel_device, t, prefix", device_cases(EMU, GPU), indirect=["kernel_device"])
    """
    return ([pytest.param("emulated", *case, marks=pytest.mark.emulated) for case in emulated]
            + [pytest.param("cuda", *case, marks=pytest.mark.gpu) for case in gpu])


def randn(*shape: int, dtype: torch.dtype, seed: int, device: str | torch.device, scale: float = 1.0,
          shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(*shape, generator=g, device=device, dtype=torch.float32) * scale + shift
    return x.to(dtype)


def misaligned(shape: tuple[int, ...], dtype: torch.dtype, seed: int, device: str | torch.device) -> torch.Tensor:
    """A contiguous tensor whose address is one element past a 16-byte boundary (scalar path)."""
    n = 1
    for s in shape:
        n *= s
    return randn(n + 1, dtype=dtype, seed=seed, device=device)[1:].view(shape)


def assert_matches_oracle(what: str, got: torch.Tensor, torch_out: torch.Tensor, ref: torch.Tensor) -> None:
    """got / torch_out: kernel and torch-path results in the storage dtype; ref: the float64 oracle.
    Slack: one ulp of the largest reference value."""
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert got.dtype == torch_out.dtype, f"{what}: dtype {got.dtype} != {torch_out.dtype}"
    assert bool(torch.isfinite(got).all()), f"{what}: non-finite output (an element was not written?)"
    ref = ref.double()
    err = (got.double() - ref).abs().max().item()
    base = (torch_out.double() - ref).abs().max().item()
    atol = torch.finfo(got.dtype).eps * ref.abs().max().item()
    assert err <= K_TORCH * base + atol, (
        f"{what}: max error {err:.3g} vs oracle exceeds {K_TORCH} x torch's {base:.3g} + atol {atol:.3g}")


SCHEDULES = ("forward", "reverse", "random:1", "serial", "serial-reverse")


def assert_schedule_independent(run, monkeypatch: pytest.MonkeyPatch, schedules=SCHEDULES) -> None:
    """Emulator only: run() gives bit-identical outputs under each thread schedule (CUEMU_SCHEDULE,
    see conftest's emulated_kernels); a race between the threads of a block changes them."""
    outputs = []
    for schedule in schedules:
        monkeypatch.setenv("CUEMU_SCHEDULE", schedule)
        outputs.append(run())
    for schedule, other in zip(schedules[1:], outputs[1:]):
        assert torch.equal(outputs[0], other), f"schedule {schedule} gives other bits than {schedules[0]}"


def attention_inputs(t: int, prefix: int, hq: int, hkv: int, d: int, dtype: torch.dtype, seed: int,
                     device: str | torch.device):
    """q [T, Hq, D] and k, v [S = prefix + T, Hkv, D] views of layer 1 of a KVCache whose other
    slots are NaN, so a kernel reading past S fails."""
    g = torch.Generator(device=device).manual_seed(seed)
    s = prefix + t
    cache = KVCache(num_layers=2, max_len=s + 77, num_kv_heads=hkv, head_dim=d, dtype=dtype, device=device)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    cache.write(1, 0, torch.randn(s, hkv, d, generator=g, device=device).to(dtype),
                torch.randn(s, hkv, d, generator=g, device=device).to(dtype))
    k, v = cache.view(1, s)
    q = torch.randn(t, hq, d, generator=g, device=device).to(dtype)
    return q, k, v


def assert_attention_close(ours: torch.Tensor, q, k, v, scale, mask, monkeypatch: pytest.MonkeyPatch,
                           what: str) -> None:
    """flash-attention's rule: max |ours - oracle| <= 2 x max |torch path - oracle| + 2 x the
    oracle's rounding to the output dtype, the torch path run at the same dtype on the same device.
    NaN never passes."""
    assert ours.shape == q.shape and ours.dtype == q.dtype, what
    assert torch.isfinite(ours).all(), f"{what}: non-finite output (an element was not written or NaN leaked in)"
    ref = attention_ref(q, k, v, scale, tree_mask=mask)
    with monkeypatch.context() as m:
        m.setenv("EDGESPEC_BACKEND", "torch")
        torch_out = ops.attention(q, k, v, scale, mask)
    torch_err = (torch_out.float() - ref).abs().max().item()
    rounding = (ref.to(q.dtype).float() - ref).abs().max().item()
    err = (ours.float() - ref).abs().max().item()
    bound = K_TORCH * torch_err + 2 * rounding
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} (torch path {torch_err:.3g}, rounding {rounding:.3g})"


def fake_view(module, shape: tuple[int, ...], dtype: str = "bf16", slot: int = 0):
    """A contiguous TensorView of `module` (edgespec._C) at a fake, never dereferenced address: slot
    i starts at (i + 1) * 16 MiB, so views in different slots are disjoint and same-slot views
    overlap. For tests of the C++ re-checks, which all run before the first CUDA call."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    return module.TensorView((slot + 1) << 24, shape, strides, getattr(module.DType, dtype), 0)


def skip_unless_sm90(device) -> None:
    """Skip on a GPU where the Hopper kernels do not run (not compute capability 9.0, or a build
    without them); the emulator (a CPU device) runs them."""
    if torch.device(device).type == "cuda":
        from edgespec.ops import _kernels

        why = _kernels.sm90_attention_rejection(torch.zeros(1, 1, 64, dtype=torch.bfloat16, device=device))
        if why is not None:
            pytest.skip(why)


def use_attention_family(sm90: bool, device, monkeypatch) -> None:
    """EDGESPEC_SM90_ATTENTION for a model test on a GPU: sm90 runs a target's decode steps and
    trees on the Hopper kernels' row-invariant mode (skipped where those kernels do not run)."""
    if sm90:
        skip_unless_sm90(device)
    monkeypatch.setenv("EDGESPEC_SM90_ATTENTION", "1" if sm90 else "0")
