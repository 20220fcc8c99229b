"""Where a draft-tree token's logical keys live in the cache.

Verifying a tree must give every token what decoding its path would: its logical sequence is the
committed prefix, then its ancestors in depth order, then itself, while the cache holds the tree's
tokens in tree order after the prefix. The row-invariant paths (attention_rows on the CPU, the
InfLLM-v2 sparse path's compressed keys and attention) read each token's keys through these maps.
"""
from __future__ import annotations

import torch


def ancestors_by_depth(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(depth [T], order [T, T]) of a tree from its unpacked mask visible bool [T, T] (row i: its
    ancestors and itself): order[i, j] is the tree index of token i's ancestor at depth j for
    j <= depth[i] (order[i, depth[i]] = i); the columns past it are padding."""
    depth = visible.sum(dim=1) - 1
    return depth, torch.where(visible, depth.unsqueeze(0), visible.shape[0] + 1).argsort(dim=1, stable=True)


def logical_slots(order: torch.Tensor, prefix: int | torch.Tensor, logical: torch.Tensor) -> torch.Tensor:
    """Cache slots of logical positions for the tree rows whose ancestor orders are `order` [R, T],
    after `prefix` committed slots (an int or a 0-d tensor). logical: [L] (the same positions for
    every row) or [R, L]. A position before the prefix is its own slot; prefix + j is the row's
    ancestor at depth j (positions past a row's own depth give padding slots). Returns int64 [R, L]."""
    depth_of = (logical - prefix).clamp(0, order.shape[1] - 1).expand(order.shape[0], -1)
    return torch.where(logical < prefix, logical, prefix + order.gather(1, depth_of))
