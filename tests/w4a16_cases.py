"""Random 4-bit weights, the float64 oracle and the tolerance rule of the W4A16 kernel tests
(test_w4a16_kernels.py, on the emulator and a GPU) and the 4-bit BlockFFN tests."""
from __future__ import annotations

import torch

from edgespec.quant import Int4Weight, QuantLinear
from oracle.ops import dequantize_int4

# max |kernel - oracle| <= K_TORCH x max |torch at the same precision - oracle| + one ulp.
K_TORCH = 2.0


def _weight(k: int, n: int, group: int, zeros: str, seed: int, g_idx: bool = False) -> Int4Weight:
    """Random 4-bit weight; zeros: 'sym' (none), 'int' (GPTQ/AWQ) or 'frac' (GGUF Q4_1-like)."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    groups = -(-k // g)
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = torch.rand(groups, n, generator=gen) * 0.02 + 0.002
    z = None
    if zeros == "int":
        z = torch.randint(0, 16, (groups, n), generator=gen).float()
    elif zeros == "frac":
        z = torch.rand(groups, n, generator=gen) * 15
    gi = None
    if g_idx:
        gi = torch.empty(k, dtype=torch.int64)
        gi[torch.randperm(k, generator=gen)] = torch.arange(k) // g
    return Int4Weight(q, scales, z, g, gi)


def random_experts(h: int, e: int, d: int, group: int, zeros: str = "int", dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", *, layout: str = "tile", seed: int = 0,
                   act_order: bool = False):
    """Random 4-bit BlockFFN experts as W4A16Weights: up (H -> E * d, act-order optional) and down
    (E * d -> H), in `layout` on `device` with scales in `dtype`."""
    up = _weight(h, e * d, group, zeros, seed, g_idx=act_order)
    down = _weight(e * d, h, group, zeros, seed + 1)
    return tuple(w.to_linear(None, device, dtype, layout_name=layout).weight for w in (up, down))


def _oracle(x: torch.Tensor, w: Int4Weight, lin: QuantLinear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 reference, torch at `dtype`) for x [M, K] and the weight exactly as stored on the
    GPU (scales/zeros rounded to dtype). Input-feature order, act-order undone."""
    k, n = w.q.shape
    s = lin.weight.scales.double().cpu()
    z = None if lin.weight.zeros is None else lin.weight.zeros.double().cpu()
    q = lin.ints().cpu()                     # stored (group-sorted) row order
    g = lin.group_size
    if k % g:  # the oracle wants whole groups: pad K to a multiple with zero activations
        pad = g - k % g
        q = torch.cat([q, torch.zeros(pad, n, dtype=torch.uint8)])
    wt = dequantize_int4(q.t(), s.t(), None if z is None else z.t(), g)[:, :k]  # [N, K] float64
    if lin.weight.perm is not None:
        full = torch.empty_like(wt)
        full[:, lin.weight.perm.cpu()] = wt
        wt = full
    xd = x.double().cpu()
    ref = xd @ wt.t()
    low = (x.to(dtype) @ wt.to(device=x.device, dtype=dtype).t()).double().cpu()
    return ref, low


def _check(out: torch.Tensor, ref: torch.Tensor, low: torch.Tensor, dtype: torch.dtype, k_torch: float = K_TORCH) -> None:
    out = out.double().cpu()
    assert torch.isfinite(out).all(), "kernel left NaN (an unwritten output element?)"
    torch_err = (low - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * ref.abs().max().item()
    err = (out - ref).abs().max().item()
    assert err <= k_torch * torch_err + ulp, f"max error {err:.3g} vs torch {torch_err:.3g} (+ulp {ulp:.3g})"
