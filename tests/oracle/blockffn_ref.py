"""Naive fp32 reference for the BlockFFN layer (BlockFFN, Song et al. 2025, arXiv:2507.08771).

Never imports edgespec. The reference is *dense*: every expert is computed for every token and an
inactive (token, expert) pair simply has router weight zero, so it checks the sparse paths without
sharing their notion of "active experts".

The layer, as in the released checkpoints (`ffn_type` "block"/"block_linear", `router_act` relu,
`norm_after_router` rms, `hidden_act` silu):

    w  = RMSNorm_E(relu(x @ Wr.T)) * g                  router weights      [T, E]
    y  = sum_e w[:, e] * down_e(silu(up_e(x)))          experts are plain (ungated) 2-layer MLPs

Weight layouts accepted (both as the checkpoints store them):
* "block_linear": up [E * d, H] (expert e = rows e*d:(e+1)*d), down [H, E * d] (expert e = columns).
* "block":        up [E, d, H], down [E, H, d].

Sparsity of one step of T tokens (one forward pass, e.g. a speculative tree):
* token-level: fraction of (token, expert) pairs with w == 0;
* chunk-level: fraction of experts with w == 0 for *all* T tokens (the experts a step can skip).
"""
from __future__ import annotations

import torch


def router_ref(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Router weights. x [T, H]; router_weight [E, H]; norm_weight [E]. Returns fp32 [T, E]."""
    logits = x.float() @ router_weight.float().T
    r = torch.clamp(logits, min=0.0)
    # RMSNorm over the expert axis; an all-zero row stays zero (0 * rsqrt(eps)).
    inv = torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps)
    return r * inv * norm_weight.float()


def experts_ref(x: torch.Tensor, weights: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """All experts, weighted. x [T, H]; weights [T, E]; up/down in either layout. Returns fp32 [T, H]."""
    x = x.float()
    weights = weights.float()
    t = x.shape[0]
    if up.dim() == 3:  # "block": up [E, d, H], down [E, H, d]
        e, d, _ = up.shape
        out = torch.zeros(t, down.shape[1], dtype=torch.float32)
        for i in range(e):  # one expert at a time: obviously right, not fast
            h = torch.nn.functional.silu(x @ up[i].float().T)            # [T, d]
            out += weights[:, i:i + 1] * (h @ down[i].float().T)          # [T, H]
        return out
    e = weights.shape[1]
    d = up.shape[0] // e
    h = torch.nn.functional.silu(x @ up.float().T)                          # [T, E*d]
    h = h * weights.repeat_interleave(d, dim=1)                             # block e scaled by w[:, e]
    return h @ down.float().T


def blockffn_ref(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                 up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The whole layer: x [T, H] -> fp32 [T, H]."""
    return experts_ref(x, router_ref(x, router_weight, norm_weight, eps), up, down)


def sparsity_ref(weights: torch.Tensor) -> tuple[float, float]:
    """(token-level, chunk-level) sparsity of one step's router weights [T, E], counted in Python."""
    rows = weights.tolist()
    t, e = len(rows), len(rows[0])
    inactive_pairs = sum(1 for row in rows for v in row if v == 0.0)
    inactive_experts = sum(1 for j in range(e) if all(rows[i][j] == 0.0 for i in range(t)))
    return inactive_pairs / (t * e), inactive_experts / e


def routed_router(t: int, h: int, e: int, chunk_sparsity: float, seed: int = 0, token_density: float = 0.5,
                  dtype: torch.dtype = torch.float32):
    """Random router inputs whose logits have an exactly known sign pattern.

    round(chunk_sparsity * E) experts get negative logits for every token (inactive for the step);
    every other expert is positive for a random subset of the tokens (each token with probability
    token_density, at least one token). The router weight is solved from the wanted logits
    (least squares through pinv(x), plus noise orthogonal to x's rows), so the pattern is exact
    while the weights still look random. Needs t <= h.
    Returns x [T, H], router weight [E, H], router norm weight [E], active bool [T, E].
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g, dtype=torch.float64)
    off = torch.randperm(e, generator=g)[:round(chunk_sparsity * e)]
    active = torch.rand(t, e, generator=g) < token_density
    first = torch.randint(0, t, (e,), generator=g)
    active[first, torch.arange(e)] = True          # every expert used by at least one token...
    active[:, off] = False                         # ...except the step's inactive ones
    magnitude = 0.5 + torch.rand(t, e, generator=g, dtype=torch.float64)
    logits = torch.where(active, magnitude, -magnitude)
    pinv = torch.linalg.pinv(x)                                                 # [H, T]
    noise = torch.randn(e, h, generator=g, dtype=torch.float64) * 0.3
    noise = noise - (noise @ pinv) @ x                                          # orthogonal to x's rows
    router = (pinv @ logits).T + noise                                          # [E, H]
    norm = 0.5 + torch.rand(e, generator=g, dtype=torch.float64)
    return x.to(dtype), router.to(dtype).contiguous(), norm.to(dtype), active


def random_experts(h: int, e: int, d: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Expert weights in the block_linear layout: up [E*d, H], down [H, E*d], unit-variance outputs."""
    g = torch.Generator().manual_seed(seed + 7919)
    up = torch.randn(e * d, h, generator=g) / h ** 0.5
    down = torch.randn(h, e * d, generator=g) / (e * d) ** 0.5
    return up.to(dtype), down.to(dtype)


def routed_case(t: int, h: int, e: int, d: int, chunk_sparsity: float, seed: int = 0,
                token_density: float = 0.5, dtype: torch.dtype = torch.float32):
    """routed_router + random_experts: x, router, norm, up, down, active (see those two)."""
    x, router, norm, active = routed_router(t, h, e, chunk_sparsity, seed, token_density, dtype)
    up, down = random_experts(h, e, d, seed, dtype)
    return x, router, norm, up, down, active
