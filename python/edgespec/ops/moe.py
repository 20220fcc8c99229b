"""BlockFFN chunk-sparse mixture of experts: router and experts over the union of active experts.

The layer (BlockFFN, arXiv:2507.08771), for the T tokens of one step:

    w = RMSNorm_E(relu(x @ Wr.T)) * g       router weights [T, E]; no top-k, so any number of
                                            experts can be active per token (w != 0)
    y = sum_e w[:, e] * down_e(silu(up_e(x)))

An expert is *active in the step* when at least one of the T tokens gives it a non-zero weight.
Only those experts' up and down projections are read; inside them, a token that does not use the
expert contributes zero through its zero weight. A speculative tree is one step, so trees cost the
union of their tokens' experts, which is what BlockFFN's chunk-sparsity training makes small.

Weight layout (the released "block_linear" checkpoints' layout, see models/blockffn.py):
up [E * d, H] with expert e in rows [e*d, (e+1)*d); down [H, E * d] with expert e in columns
[e*d, (e+1)*d). Both keep each weight row's reduction axis contiguous, which is what the torch
path's slices and the kernels' vector loads need.

4-bit experts: up and down may each be a W4A16Weight of the same linear (up: H -> E * d, down:
E * d -> H). The torch path reads their dequantised weights, cached under the W4A16 budget (see
ops.w4a16); past the budget it dequantises only the step's active experts (W4A16Weight.sub). The
kernel path runs the router kernel and then the W4A16 kernel's expert gather, which reads only
the active experts' 4-bit column tiles of up and row tiles of down.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import backend
from .norm import rms_norm
from .w4a16 import W4A16Weight, cached_dense

ExpertWeight = torch.Tensor | W4A16Weight  # [out, in] dense, or the 4-bit weight of that linear


def _matrix_shape(t: ExpertWeight) -> tuple[int, ...]:
    """[out, in] of a dense or 4-bit expert weight."""
    return (t.out_features, t.in_features) if isinstance(t, W4A16Weight) else tuple(t.shape)


def check_blockffn_weights(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor,
                           up: ExpertWeight, down: ExpertWeight) -> tuple[int, int]:
    """Validate the shapes of a BlockFFN call; returns (num_experts, expert_size)."""
    if x.dim() != 2:
        raise ValueError(f"blockffn: x must be 2-D [T, H], got shape {tuple(x.shape)}")
    h = x.shape[1]
    if router_weight.dim() != 2 or router_weight.shape[1] != h:
        raise ValueError(f"blockffn: router_weight must be [E, {h}], got {tuple(router_weight.shape)}")
    e = router_weight.shape[0]
    if norm_weight.shape != (e,):
        raise ValueError(f"blockffn: router norm weight must be [{e}] (one per expert), got {tuple(norm_weight.shape)}")
    up_shape, down_shape = _matrix_shape(up), _matrix_shape(down)
    if len(up_shape) != 2 or up_shape[1] != h or up_shape[0] % e or up_shape[0] == 0:
        raise ValueError(f"blockffn: up must be [E * d, {h}] with E = {e}, got {up_shape}")
    d = up_shape[0] // e
    if down_shape != (h, e * d):
        raise ValueError(f"blockffn: down must be [{h}, {e * d}] (H, E * d), got {down_shape}")
    for name, t in (("router_weight", router_weight), ("up", up), ("down", down)):
        # A 4-bit weight's scales may be in another float dtype: the torch path dequantises to x's.
        dtype = x.dtype if isinstance(t, W4A16Weight) else t.dtype
        if dtype != x.dtype or t.device != x.device:
            raise ValueError(f"blockffn: {name} is {dtype} on {t.device}, expected x's {x.dtype} on {x.device}")
    return e, d


def blockffn_router(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """Router weights w = RMSNorm(relu(x @ router_weight.T)) * norm_weight.

    x: [T, H]; router_weight: [E, H] (x's dtype); norm_weight: [E].
    Returns [T, E] in x's dtype. w[t, e] == 0 exactly when expert e is inactive for token t
    (a token whose logits are all negative gets an all-zero row, not NaN).
    """
    if router_weight.dim() != 2 or x.shape[-1] != router_weight.shape[1]:
        raise ValueError(f"blockffn_router: x {tuple(x.shape)} and router_weight {tuple(router_weight.shape)} "
                         f"must share the hidden size")
    return rms_norm(F.relu(F.linear(x, router_weight)), norm_weight, eps)


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted expert indices -> maximal [start, stop) runs of consecutive experts."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def blockffn_experts(x: torch.Tensor, weights: torch.Tensor, up: ExpertWeight, down: ExpertWeight) -> torch.Tensor:
    """Torch path of the expert part: y = sum over the step's active experts of w * down(silu(up(x))).

    x: [T, H]; weights: [T, E] router weights (x's dtype); up: [E * d, H]; down: [H, E * d]
    (either may be a W4A16Weight: its dequantised weight is used, cached while the budget allows).
    Returns [T, H] in x's dtype.

    The active experts are grouped into runs of consecutive indices and each run is two matmuls
    over *views* of the weights: only the active experts' bytes are read and nothing is copied.
    (Gathering the active experts into a new tensor first reads them three times, and was slower
    on CPU whenever more than a few experts were active.) Listing the runs needs the active set on
    the host: one synchronisation on GPU; the CUDA kernels avoid it.
    """
    t = x.shape[0]
    e = weights.shape[1]
    d = _matrix_shape(up)[0] // e
    active = (weights != 0).any(dim=0)                                   # [E]
    runs = _runs(active.nonzero().flatten().tolist())
    if not runs:
        return x.new_zeros(t, _matrix_shape(down)[0])
    up_rows, down_cols = _expert_slices(up, 0, x.dtype), _expert_slices(down, 1, x.dtype)
    parts = []
    for a, b in runs:
        n = b - a
        hidden = F.silu(F.linear(x, up_rows(a * d, b * d)))             # [T, n*d]
        # Scale each expert's block by its token's router weight (zero for tokens not using it).
        hidden = (hidden.view(t, n, d) * weights[:, a:b, None]).view(t, n * d)
        parts.append(F.linear(hidden, down_cols(a * d, b * d)))          # [T, H]
    if len(parts) == 1:
        return parts[0]
    # Several runs: sum their partial products in fp32 so the result has one final rounding.
    return torch.stack(parts).float().sum(0).to(x.dtype)


def _expert_slices(w: ExpertWeight, dim: int, dtype: torch.dtype):
    """slice(lo, hi) -> w's rows (dim 0: up) or columns (dim 1: down) [lo, hi) as a dense [out, in]
    tensor in `dtype`: a view of a dense or cached weight, else the dequantised 4-bit slice."""
    dense = w if isinstance(w, torch.Tensor) else cached_dense(w, dtype)
    if dense is not None:
        return lambda lo, hi: dense[lo:hi] if dim == 0 else dense[:, lo:hi]

    whole: list[torch.Tensor] = []  # dequantised once per call if a run cannot be cut out

    def dequantize(lo: int, hi: int) -> torch.Tensor:
        part = w.sub(outputs=(lo, hi)) if dim == 0 else w.sub(inputs=(lo, hi))
        if part is not None:
            return part.dequantize(dtype)
        if not whole:  # a cut the packing does not allow (act-order, unaligned expert sizes)
            whole.append(w.dequantize(dtype))
        return whole[0][lo:hi] if dim == 0 else whole[0][:, lo:hi]

    return dequantize


class BlockFFNScratch:
    """Device state the kernel path keeps between calls of one layer: the int32 arrival counters
    that its kernels need zeroed and leave zeroed, so no memset runs per step. Give each layer (or
    each stream that runs layers concurrently) its own; the torch path needs none."""

    def __init__(self) -> None:
        self.sync: torch.Tensor | None = None

    def sync_for(self, device: torch.device, words: int) -> torch.Tensor:
        if self.sync is None or self.sync.device != device or self.sync.numel() != words:
            self.sync = torch.zeros(words, dtype=torch.int32, device=device)
        return self.sync


def blockffn(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             up: ExpertWeight, down: ExpertWeight, counters: torch.Tensor | None = None,
             scratch: BlockFFNScratch | None = None) -> torch.Tensor:
    """The whole BlockFFN layer for one step of T tokens.

    x: [T, H] fp32/bf16/fp16 (the ffn-normed hidden states); router_weight: [E, H];
    norm_weight: [E] (router RMSNorm); up: [E * d, H]; down: [H, E * d] (all in x's dtype/device;
    up and down may be W4A16Weights of those linears instead).
    counters: optional int64 [2] on x's device, accumulated in place without a host sync:
      counters[0] += (token, expert) pairs with a non-zero router weight,
      counters[1] += experts active for at least one of the T tokens.
    scratch: the calling layer's BlockFFNScratch (kernel path; a fresh one per call when None).
    Returns [T, H] in x's dtype.

    Kernel path (CUDA bf16/fp16, csrc/kernels/moe.h): three launches (4-bit experts: the router
    and two W4A16 expert-gather launches per 64 tokens), no host synchronisation, CUDA-graph
    capturable. Torch path: blockffn_router + blockffn_experts (one host sync).
    """
    check_blockffn_weights(x, router_weight, norm_weight, up, down)
    if counters is not None and (counters.shape != (2,) or counters.dtype != torch.int64
                                 or counters.device != x.device):
        raise ValueError(f"blockffn: counters must be int64 [2] on {x.device}, got {counters.dtype} "
                         f"{tuple(counters.shape)} on {counters.device}")
    quantized = isinstance(up, W4A16Weight) and isinstance(down, W4A16Weight)
    tensors = tuple(t.qweight if isinstance(t, W4A16Weight) else t for t in (up, down))
    if backend.use_kernel(x, router_weight, norm_weight, *tensors, counters):
        from . import _kernels

        scratch = scratch or BlockFFNScratch()
        if quantized and _kernels.blockffn_w4a16_rejection(x, router_weight, norm_weight, up, down) is None:
            return _kernels.blockffn_w4a16(x, router_weight, norm_weight, eps, up, down, counters,
                                           scratch.sync_for(x.device, 1))
        if not quantized and isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor) \
                and _kernels.supports_blockffn(x, router_weight, norm_weight, up, down):
            e, d = router_weight.shape[0], up.shape[0] // router_weight.shape[0]
            sync = scratch.sync_for(x.device, _kernels.blockffn_sync_words(x.shape[1], e, d))
            return _kernels.blockffn(x, router_weight, norm_weight, eps, up, down, counters, sync)
    weights = blockffn_router(x, router_weight, norm_weight, eps)        # [T, E]
    if counters is not None:
        active = weights != 0
        counters[0] += active.sum()
        counters[1] += active.any(dim=0).sum()
    return blockffn_experts(x, weights, up, down)
