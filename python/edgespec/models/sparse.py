"""InfLLM-v2 block-sparse attention (MiniCPM4 `sparse_config`): settings, per-sequence state, switch.

Every length here is in **tokens**, every count in blocks, named so (`window_size` tokens,
`init_blocks` blocks). The method, for one query at absolute position p with context length
ctx = p + 1 (what plain decoding would see), per KV head g:

1. Compressed keys ("semantic kernels"): ck_j = mean(K[j·s : j·s + P]) for every kernel that is
   complete (j·s + P <= length), P = kernel_size, s = kernel_stride. They cover generated tokens
   too: they are extended incrementally as the cache grows (SparseState).
2. Scores: softmax over the kernels visible to the query (complete within its context) of
   scale · q_h · ck_j, for each query head h of group g, summed over the group (one selection per
   KV head, shared by its query heads).
3. Block scores: max-pool onto `block_size`-token blocks with pool kernel r + 1, stride r,
   padding 1 (r = block_size / kernel_stride = 4 for MiniCPM4): block b takes kernels
   r·b − 1 … r·b + r − 1. With kernel_size = 2·kernel_stride (MiniCPM4: 32/16) these are exactly
   the kernels whose token span overlaps the block: kernel 4b − 1 covers tokens [64b − 16, 64b + 16),
   kernel 4b + 3 covers [64b + 48, 64b + 80).
4. Selection (blocks b <= p // block_size only): the `init_blocks` first blocks, the local window
   (the window_size / block_size blocks ending with the query's own block, so the query always
   sees itself and its recent past), and the `topk` best-scoring of the remaining blocks (ties go
   to the lower block index).
5. Attention over the tokens of the selected blocks, causally masked.

Queries with ctx < dense_len use dense attention (HF: `kv_seq_len < dense_len`). The switch is per
query, so a chunked prefill, a one-shot prefill and token-by-token decoding give the same result.

Speculative tree verification: the prefix [0, start) is committed, tree tokens are not (the cache's
compressed keys stop at the prefix). A tree token is verified exactly as decoding its path would
compute it, so speculative output equals plain output: it also scores the kernels its own path
completes (ops.sparse_attention.path_kernels), selects among the blocks before its position
prefix + depth, and sees an ancestor only in a selected block of the ancestor's position. A tree
that crosses dense_len gives its rows below it the dense attention's result, as decoding does.

Differences from the Hugging Face MiniCPM4 code, on purpose: (a) HF scores with a softmax whose
normaliser comes from a coarser kernel level (kernel 4·P, stride 4·s); we use the exact softmax
over the kernels themselves (the coarse level is an approximation of it); (b) HF passes
`topk + window blocks` to its top-k over scores in which window blocks are −inf; we follow the
documented semantics (topk scored blocks plus init blocks plus the window), which is what CPM.cu's
`sparse_topk_k` / `block_window_size` pair does.

Dense/sparse switch: EDGESPEC_SPARSE=auto (default: sparse from dense_len on) | dense | sparse, or
`model.sparse.mode = ...` on a loaded Decoder.
"""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch

from .. import ops
from ..errors import ModelFormatError

MODES = ("auto", "dense", "sparse")

# HF MiniCPM4 defaults (modeling_minicpm.py reads each key with these fallbacks).
_DEFAULTS = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
             "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}


@dataclass(frozen=True)
class SparseConfig:
    """A validated `sparse_config`. Lengths in tokens, counts in blocks."""

    block_size: int = 64      # tokens per KV block (the unit of selection)
    kernel_size: int = 32     # tokens averaged into one compressed key
    kernel_stride: int = 16   # tokens between the starts of consecutive compressed keys
    init_blocks: int = 1      # leading blocks always attended ("attention sink")
    window_size: int = 2048   # tokens of local window (a whole number of blocks), always attended
    topk: int = 64            # blocks chosen by score besides init blocks and window
    dense_len: int = 8192     # queries whose context is shorter than this use dense attention

    @property
    def window_blocks(self) -> int:
        return self.window_size // self.block_size

    @property
    def pool_stride(self) -> int:
        """Kernels per block (r): the max-pool stride; the pool kernel is r + 1 with padding 1."""
        return self.block_size // self.kernel_stride

    @property
    def max_selected_blocks(self) -> int:
        return self.init_blocks + self.window_blocks + self.topk

    def num_kernels(self, length: int) -> int:
        """Compressed keys complete within the first `length` tokens."""
        if length < self.kernel_size:
            return 0
        return (length - self.kernel_size) // self.kernel_stride + 1

    def validate(self, where: str = "sparse_config") -> "SparseConfig":
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ModelFormatError(f"{where}: {f.name} must be an integer, got {value!r}")
        for name in ("block_size", "kernel_size", "kernel_stride", "window_size"):
            if getattr(self, name) <= 0:
                raise ModelFormatError(f"{where}: {name} must be a positive number of tokens, got {getattr(self, name)}")
        for name in ("init_blocks", "topk", "dense_len"):
            if getattr(self, name) < 0:
                raise ModelFormatError(f"{where}: {name} must be >= 0, got {getattr(self, name)}")
        if self.kernel_size < self.kernel_stride:
            raise ModelFormatError(
                f"{where}: kernel_size={self.kernel_size} tokens is shorter than kernel_stride={self.kernel_stride}: "
                f"some tokens would belong to no compressed key")
        if self.block_size % self.kernel_stride:
            raise ModelFormatError(
                f"{where}: block_size={self.block_size} must be a multiple of kernel_stride={self.kernel_stride} "
                f"(the max-pool onto blocks takes block_size/kernel_stride kernels per block)")
        if self.window_size % self.block_size:
            raise ModelFormatError(
                f"{where}: window_size={self.window_size} tokens must be a whole number of "
                f"block_size={self.block_size}-token blocks (e.g. {max(1, self.window_size // self.block_size) * self.block_size})")
        return self


def parse_sparse_config(raw: Any, source: str = "config.json") -> SparseConfig | None:
    """A MiniCPM4 `sparse_config` dict (or None) -> SparseConfig (or None), validated.

    Missing keys take the Hugging Face defaults; unknown keys are an error (their meaning would be
    silently ignored), as is use_nope=true (scoring with un-rotated keys is not supported).
    """
    if raw is None:
        return None
    where = f"{source}: sparse_config"
    if not isinstance(raw, dict):
        raise ModelFormatError(f"{where} must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_DEFAULTS))
    if unknown:
        raise ModelFormatError(f"{where} has unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_DEFAULTS))}")
    merged = {**_DEFAULTS, **raw}
    if merged.pop("use_nope") not in (False, None):
        raise ModelFormatError(f"{where}: use_nope=true (block scores from keys without RoPE) is not supported")
    return SparseConfig(**merged).validate(where)


def mode_from_env() -> str:
    """EDGESPEC_SPARSE: 'auto' (default), 'dense' or 'sparse'."""
    value = os.environ.get("EDGESPEC_SPARSE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"EDGESPEC_SPARSE={value!r} is not one of {', '.join(MODES)}")
    return value


class SparseState:
    """Per-sequence device state: the compressed keys of every layer, extended as the cache grows.

    ck: [num_layers, max_kernels, Hkv, D] in the cache dtype, on the cache device. valid[l] is the
    token length whose complete kernels are up to date in layer l. Everything before a forward's
    `start` is committed (the engine's invariant), so a forward at `start` first trusts only
    min(valid, start) tokens: tokens written past `start` earlier (rejected speculation, a new
    generation reusing the cache) are recomputed, and accepted tree tokens moved into place by
    KVCache.compact are picked up.
    """

    def __init__(self, cfg: SparseConfig, num_layers: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.cfg = cfg
        self.max_kernels = max(cfg.num_kernels(max_len), 1)
        self.ck = torch.zeros(num_layers, self.max_kernels, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.valid = [0] * num_layers
        # The (trusted, kv_limit) lengths of each layer for the next forward whose start lives on
        # the device (a CUDA graph step): written by SparseAttention.prepare_device_step before
        # the step, read by it on the device.
        self.ranges = torch.zeros(num_layers, 2, dtype=torch.int32, device=device)

    def update(self, layer: int, keys: torch.Tensor, start: int, end: int) -> None:
        """Bring layer `layer` up to date for tokens [0, end) of keys ([>= end, Hkv, D]), trusting
        only what was computed from tokens before `start`."""
        trusted = min(self.valid[layer], start)
        ops.compress_keys(keys, self.ck[layer], trusted, end, self.cfg.kernel_size, self.cfg.kernel_stride)
        self.valid[layer] = end


class SparseAttention:
    """The decoder's sparse-attention switch and the per-cache states (one per KVCache, weakly held)."""

    def __init__(self, cfg: SparseConfig, num_layers: int, num_kv_heads: int, head_dim: int,
                 mode: str | None = None) -> None:
        self.cfg = cfg
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.mode = mode or mode_from_env()
        self._states: weakref.WeakKeyDictionary[Any, SparseState] = weakref.WeakKeyDictionary()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"sparse attention mode {value!r} is not one of {', '.join(MODES)}")
        self._mode = value

    def dense_len(self) -> int:
        """The context length from which queries go sparse under the current mode."""
        return 0 if self.mode == "sparse" else self.cfg.dense_len

    def active(self, end: int) -> bool:
        """Whether a forward writing up to slot `end` can contain sparse queries (host decision)."""
        return self.mode != "dense" and end >= self.dense_len()

    def crosses_dense_len(self, start: int, rows: int) -> bool:
        """Whether a tree of `rows` tokens after `start` committed slots has rows on both sides of
        dense_len: attend() then gives the rows below it the dense attention's bits, as decoding
        them would (a graphed step does not; the driver verifies such a tree eagerly)."""
        return self.active(start + rows) and start + 1 < self.dense_len()

    def state(self, cache: Any) -> SparseState:
        """The state of `cache` (a KVCache: k [L, max_len, Hkv, D]), created on first use."""
        st = self._states.get(cache)
        if st is None:
            st = SparseState(self.cfg, self.num_layers, cache.max_len, self.num_kv_heads, self.head_dim,
                             cache.k.dtype, cache.k.device)
            self._states[cache] = st
        return st

    def attend(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               positions: torch.Tensor, cache: Any, start: int, scale: float,
               tree_mask: torch.Tensor | None, dense: Callable[[], torch.Tensor], row_invariant: bool = True,
               span: int | None = None) -> torch.Tensor | None:
        """Sparse attention for one layer, or None when every query is dense (caller runs ops.attention).

        q: [T, Hq, D]; keys, values: [start + T, Hkv, D] (new tokens last); positions: [T] int64
        (start + i for a chain, start + depth for tree tokens); tree_mask: None or packed int64
        [T, ceil(T/64)]; dense: the step's dense attention (ops.attention), called for a tree that
        crosses dense_len: its rows below it take their rows from there, as decoding them would;
        row_invariant, span: as for ops.sparse_attention. Returns [T, Hq, D] in q's dtype.
        """
        t = q.shape[0]
        if not self.active(start + t):
            # This forward still overwrites slots from `start` on: stop trusting kernels over them.
            known = self._states.get(cache)
            if known is not None:
                known.valid[layer] = min(known.valid[layer], start)
            return None
        st = self.state(cache)
        # Tree tokens are not committed: the compressed keys stop at the prefix.
        kv_limit = start if tree_mask is not None else start + t
        st.update(layer, keys, start, kv_limit)
        out = ops.sparse_attention(q, keys, values, scale, st.ck[layer], positions, self.cfg,
                                   dense_len=self.dense_len(), kv_limit=kv_limit, tree_mask=tree_mask,
                                   row_invariant=row_invariant, span=span)
        if tree_mask is not None and self.crosses_dense_len(start, t):
            # Same semantics either way (a row below dense_len selects every block), but a decoded
            # token below dense_len runs ops.attention: its tree row takes those bits.
            out = torch.where((positions + 1 < self.dense_len()).view(-1, 1, 1), dense(), out)
        return out


    def prepare_device_step(self, cache: Any, start: int, rows: int, tree: bool) -> bool:
        """The host side of a forward whose start lives on the device (a CUDA graph step) at the
        host-known slot `start`, with `rows` tokens, a tree or a chain: whether it runs sparse (the
        graph to replay depends on it: Decoder.forward's `sparse_active`). A sparse step finds its
        lengths in the cache's SparseState.ranges, filled here without a host-device sync; `valid`
        moves as the step will move it."""
        if not self.active(start + rows):
            known = self._states.get(cache)
            if known is not None:
                known.valid = [min(v, start) for v in known.valid]
            return False
        st = self.state(cache)
        trusted = [min(v, start) for v in st.valid]
        kv_limit = start if tree else start + rows
        if len(set(trusted)) == 1:
            st.ranges[:, 0].fill_(trusted[0])
        else:
            for layer, length in enumerate(trusted):
                st.ranges[layer, 0].fill_(length)
        st.ranges[:, 1].fill_(kv_limit)
        st.valid = [kv_limit] * len(st.valid)
        return True

    def attend_on_device(self, layer: int, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                         positions: torch.Tensor, cache: Any, scale: float, tree_mask: torch.Tensor | None,
                         seqlen: torch.Tensor, row_invariant: bool = True, span: int | None = None) -> torch.Tensor:
        """attend() for a sparse step prepared by prepare_device_step, with nothing read on the
        host: keys, values are a fixed view of the cache of which `seqlen` (int32 [1] on the
        device) slots count, the new tokens last."""
        st = self.state(cache)
        lengths = st.ranges[layer]                                                # (trusted, kv_limit)
        # The compressed-key kernel computes this many tokens' kernels at once and loops for more
        # (a step usually has a tree's worth or less to catch up).
        launch = min(keys.shape[0], q.shape[0] + self.cfg.block_size + self.cfg.kernel_size)
        ops.compress_keys(keys, st.ck[layer], 0, launch, self.cfg.kernel_size, self.cfg.kernel_stride, lengths=lengths)
        return ops.sparse_attention(q, keys, values, scale, st.ck[layer], positions, self.cfg,
                                    dense_len=self.dense_len(), kv_limit=lengths[1:], tree_mask=tree_mask,
                                    seqlen=seqlen, row_invariant=row_invariant, span=span)


def for_config(sparse: SparseConfig | None, num_layers: int, num_kv_heads: int, head_dim: int) -> SparseAttention | None:
    return None if sparse is None else SparseAttention(sparse, num_layers, num_kv_heads, head_dim)
