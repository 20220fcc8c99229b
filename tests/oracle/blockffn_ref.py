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
