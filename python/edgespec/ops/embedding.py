"""Token embedding lookup with an optional scale (MiniCPM's scale_emb)."""
from __future__ import annotations

import torch

from . import backend


def embedding(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0, check: bool = True) -> torch.Tensor:
    """Look up rows of `table`.

    ids:   [T] int32/int64 token ids, each in [0, V)
    table: [V, H] float
    Returns [T, H] in table's dtype, multiplied by `scale` when it is not 1.
    check: validate the id range first (a host sync on GPU). The engine validates user ids once
           at its boundary and passes check=False for ids it sampled itself.
    Raises IndexError naming the offending id when an id is out of range.
    """
    if ids.dim() != 1:
        raise ValueError(f"embedding: ids must be 1-D [T], got shape {tuple(ids.shape)}")
    vocab = table.shape[0]
    if check and ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            bad = lo if lo < 0 else hi
            raise IndexError(f"embedding: token id {bad} is out of range for a vocabulary of {vocab}")
    if backend.use_kernel(ids, table):
        from . import _kernels

        if _kernels.supports_embedding(ids, table):
            return _kernels.embedding(ids, table, scale)
    out = table.index_select(0, ids.long())
    return out * scale if scale != 1.0 else out
