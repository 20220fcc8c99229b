"""InfLLM-v2 block-sparse attention: compressed keys, block scores, block selection, attention.

The method and its exact geometry are documented in edgespec.models.sparse (all lengths in
tokens). This module holds the op-layer torch path and the kernel hooks:

* compress_keys: extend the compressed keys of one layer as the cache grows (in place).
* block_scores / select_blocks: scores of the queries against the compressed keys, max-pooled onto
  blocks, and the selected block set of each (query, KV head).
* sparse_attention: attention of T new tokens over the selected blocks of the cache (chain or tree).

Layout is the one of ops.attention: the cache holds slots [0, S), the T new tokens are the last T;
for a tree the prefix [0, S - T) is committed and the tree tokens see each other through the tree
mask only.

A tree token is verified exactly as decoding its path would compute it (what keeps speculative
output equal to plain output): it scores the committed prefix's compressed keys *and* the kernels
that its path completes (path_kernels: built from the prefix's last keys and its ancestors' keys
in depth order), and sees an ancestor only where plain decoding would, in a selected block of
the ancestor's own position.

Kernel paths (CUDA tensors, `_C` built): compress_keys and the block scores + selection run in
csrc/kernels/sparse_attention.h (scored on tensor cores where csrc/kernels/sparse_scores_mma.cuh
applies, else one query per block, or for long chains as a torch GEMM) and give a bit-packed block
mask; the attention over
the selected blocks is the attention kernel family's block-sparse variant
(csrc/kernels/attention.h), which needs block_size == 64 (its key tile) and bf16/fp16 with head
dim 64 or 128. Other shapes, and CPU tensors, take the torch path below: masked SDPA a query chunk
at a time for prefill chunks, and for decode steps and trees one batch of calls per position,
row-invariant (_attend_by_position), so that on the CPU a verified tree token gets its decoded
bits. On the GPU decode steps and trees run the kernels' row-invariant mode for the same property:
the selection kernels with a score split length fixed per generation (trees read their paths'
kernels), and the attention kernels' block-sparse invariant mode, split by the rank of a token's
selected tiles (attention.h "Row invariance"; a tree token's tiles are logical, as its decoded
path has them).
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from . import backend
from .attention import DEFAULT_SPAN, tree_mask_words, unpack_tree_mask
from .tree_paths import ancestors_by_depth, logical_slots

# Upper bound on the elements of one query chunk's [Tc, Hq, max(S, C)] temporaries in the torch path.
_CHUNK_ELEMENTS = 1 << 24


class SparseSettings(Protocol):
    """What the op needs from a sparse config (edgespec.models.sparse.SparseConfig provides it)."""

    block_size: int
    kernel_size: int
    kernel_stride: int
    init_blocks: int
    topk: int

    @property
    def window_blocks(self) -> int: ...

    @property
    def pool_stride(self) -> int: ...

    @property
    def max_selected_blocks(self) -> int: ...

    def num_kernels(self, length: int) -> int: ...


def num_kernels(length: int, kernel_size: int, kernel_stride: int) -> int:
    """Compressed keys complete within the first `length` tokens."""
    return 0 if length < kernel_size else (length - kernel_size) // kernel_stride + 1


def _num_kernels_of(lengths: torch.Tensor, kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """num_kernels of every element of an integer tensor (on its device, no host read)."""
    return torch.clamp(torch.div(lengths - kernel_size, kernel_stride, rounding_mode="floor") + 1, min=0)


def compress_keys(keys: torch.Tensor, ck: torch.Tensor, start_len: int, end_len: int,
                  kernel_size: int, kernel_stride: int, lengths: torch.Tensor | None = None) -> None:
    """Write the compressed keys complete within [0, end_len) but not within [0, start_len).

    keys: [>= end_len, Hkv, D] one layer of the cache; ck: [max_kernels, Hkv, D], same dtype and
    device, updated in place: ck[j] = mean(keys[j*stride : j*stride + kernel_size]) (fp32 sum, one
    rounding to ck's dtype).
    lengths: None, or int32 [2] on keys' device holding the real (start_len, end_len) (a CUDA
    graph's input, refreshed before each replay). The kernel reads it on the device, and the host
    start_len, end_len then only size its launch (it computes that many kernels at once and loops
    for more); the torch path reads it on the host.
    """
    if keys.dim() != 3 or ck.dim() != 3 or keys.shape[1:] != ck.shape[1:]:
        raise ValueError(f"compress_keys: expected keys [S, Hkv, D] and ck [C, Hkv, D] with equal Hkv, D; "
                         f"got {tuple(keys.shape)} and {tuple(ck.shape)}")
    if lengths is not None and (lengths.shape != (2,) or lengths.dtype != torch.int32 or lengths.device != keys.device):
        raise ValueError(f"compress_keys: lengths must be int32 [2] on {keys.device}, got {lengths.dtype} "
                         f"{list(lengths.shape)} on {lengths.device}")
    on_kernel = backend.use_kernel(keys, ck, lengths)
    if on_kernel:
        from . import _kernels

        on_kernel = _kernels.supports_compress_keys(keys, ck, kernel_size, kernel_stride)
    if lengths is not None and not on_kernel:
        start_len, end_len = (int(x) for x in lengths.tolist())
    if not 0 <= start_len <= end_len <= keys.shape[0]:
        raise ValueError(f"compress_keys: need 0 <= start_len ({start_len}) <= end_len ({end_len}) <= "
                         f"{keys.shape[0]} cache slots")
    first = num_kernels(start_len, kernel_size, kernel_stride)
    last = num_kernels(end_len, kernel_size, kernel_stride)
    if last > ck.shape[0]:
        raise ValueError(f"compress_keys: {last} compressed keys do not fit the buffer of {ck.shape[0]}")
    if last <= first:
        return
    if on_kernel:
        _kernels.compress_keys(keys, ck, start_len, end_len, kernel_size, kernel_stride, lengths=lengths)
        return
    span = keys[first * kernel_stride:(last - 1) * kernel_stride + kernel_size]   # [L, Hkv, D]
    windows = span.unfold(0, kernel_size, kernel_stride)                         # [last-first, Hkv, D, P]
    ck[first:last] = windows.float().mean(dim=-1).to(ck.dtype)


def path_kernels(keys: torch.Tensor, prefix: int | torch.Tensor, visible: torch.Tensor,
                 kernel_size: int, kernel_stride: int) -> torch.Tensor:
    """The compressed keys that decoding each tree token's path would add to the prefix's.

    keys: [>= prefix + T, Hkv, D] one layer of the cache (the tree's T tokens at slots prefix ..);
    prefix: the committed length (an int, or an int32 [1] tensor on keys' device: no host read);
    visible: bool [T, T], the unpacked tree mask. Token i's logical sequence is the prefix, then its
    ancestors by depth, then itself (what plain decoding would hold at positions prefix .. prefix +
    depth_i). Returns [T, E, Hkv, D] in keys' dtype, E = ceil(T / kernel_stride): entry e of token
    i is compressed key num_kernels(prefix) + e of that sequence, meaningful for the kernels
    complete within the token's context, e < num_kernels(prefix + depth_i + 1) - num_kernels(prefix)
    (the others are means of padding). They are computed by ops.compress_keys over the gathered
    sequences, so each equals, bit for bit, the key the cache's own compression gives the decoded path.
    """
    t = visible.shape[0]
    _, hkv, d = keys.shape
    _, order = ancestors_by_depth(visible)
    count = -(-t // kernel_stride)                          # a path of <= T tokens completes <= this many
    length = (count - 1) * kernel_stride + kernel_size
    base = torch.as_tensor(prefix, device=keys.device).reshape(()).long()
    first = _num_kernels_of(base, kernel_size, kernel_stride) * kernel_stride       # the first new kernel's token
    slots = logical_slots(order, base, first + torch.arange(length, device=keys.device))   # [T, L]
    seq = keys.index_select(0, slots.t().reshape(-1)).view(length, t * hkv, d)     # [L, T * Hkv, D]
    out = torch.empty(count, t * hkv, d, dtype=keys.dtype, device=keys.device)
    # The lengths (0, length) made on the device, not copied from the host: a graph capture allows
    # no host-to-device copy.
    lengths = torch.arange(2, dtype=torch.int32, device=keys.device) * length
    compress_keys(seq, out, 0, length, kernel_size, kernel_stride, lengths=lengths)
    return out.view(count, t, hkv, d).transpose(0, 1)


def block_scores(q: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor, cfg: SparseSettings,
                 scale: float, kv_limit: int | torch.Tensor, num_blocks: int,
                 path: torch.Tensor | None = None) -> torch.Tensor:
    """Block scores of each (query, KV head): fp32 [T, Hkv, num_blocks], -inf where no kernel is visible.

    q: [T, Hq, D]; ck: [C, Hkv, D], up to date for [0, kv_limit); positions: [T] int64 absolute
    positions. Query i sees the kernels complete within its context [0, positions[i] + 1) and
    within [0, kv_limit); softmax over those of scale * q_h . ck_j per query head, summed over the
    query heads of each KV head's group, max-pooled (kernel r + 1, stride r, padding 1; r =
    pool_stride). kv_limit: an int, or an int [1] tensor on q's device, used there without a host
    read (a CUDA graph's input). The kernels the blocks can reach are scored either way and those
    past kv_limit masked, so the two give the same bits.

    path: tree tokens' own kernels past kv_limit, [T, E, Hkv, D] (path_kernels, with kv_limit the
    committed prefix): kernel num_kernels(kv_limit) + e of query i is path[i, e], and every kernel
    complete within the query's context counts, as when its path is decoded.
    """
    t, hq, d = q.shape
    hkv = ck.shape[1]
    g = hq // hkv
    avail = min(ck.shape[0], num_kernels(num_blocks * cfg.block_size, cfg.kernel_size, cfg.kernel_stride))
    ckf = ck[:avail].float()                                                      # [C, Hkv, D]
    if path is not None:
        vis_len = positions + 1
    elif isinstance(kv_limit, torch.Tensor):
        vis_len = torch.minimum(positions + 1, kv_limit.reshape(1).to(positions.dtype))
    else:
        vis_len = torch.clamp(positions + 1, max=kv_limit)
    n_vis = _num_kernels_of(vis_len, cfg.kernel_size, cfg.kernel_stride)
    kernel = torch.arange(avail, device=q.device)
    hidden = kernel >= n_vis.unsqueeze(1)                                         # [T, C]
    qg = q.float().view(t, hkv, g, d)
    logits = torch.einsum("tkgd,ckd->tkgc", qg, ckf) * scale
    if path is not None:
        # Kernels from num_kernels(kv_limit) on are the path's own: score them instead.
        own = kernel - _num_kernels_of(torch.as_tensor(kv_limit, device=q.device).reshape(()).long(),
                                       cfg.kernel_size, cfg.kernel_stride)       # [C]
        path_logits = torch.einsum("tkgd,tekd->tkge", qg, path.float()) * scale   # [T, Hkv, g, E]
        picked = path_logits.gather(-1, own.clamp(0, path.shape[1] - 1).expand(t, hkv, g, avail))
        logits = torch.where(own >= 0, picked, logits)
    return _pool_scores(logits, hidden, cfg, num_blocks)


def _pool_scores(logits: torch.Tensor, hidden: torch.Tensor, cfg: SparseSettings, num_blocks: int) -> torch.Tensor:
    """Block scores fp32 [T, Hkv, num_blocks] from the scaled kernel logits fp32 [T, Hkv, g, C] and
    the kernels each query may not see, bool [T, C] (C <= pool_stride * num_blocks)."""
    t, hkv, _, avail = logits.shape
    logits = logits.masked_fill(hidden[:, None, None, :], float("-inf"))
    # A query with no visible kernel softmaxes an all -inf row: NaN, cleared right after.
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=2)             # [T, Hkv, C]
    probs = probs.masked_fill(hidden[:, None, :], float("-inf"))
    r = cfg.pool_stride
    padded = torch.full((t, hkv, r * num_blocks), float("-inf"), device=logits.device)
    padded[..., :avail] = probs
    pooled = F.max_pool1d(padded.view(t * hkv, 1, -1), kernel_size=r + 1, stride=r, padding=1)
    return pooled.view(t, hkv, -1)[..., :num_blocks]


def select_from_scores(scores: torch.Tensor, positions: torch.Tensor, cfg: SparseSettings,
                       dense_len: int) -> torch.Tensor:
    """Selected blocks: bool [T, Hkv, nB] from block scores fp32 [T, Hkv, nB] and positions [T].

    Blocks past the query's own block are never selected. Queries whose context positions + 1 is
    below dense_len select every block up to their own (dense attention).
    """
    t, hkv, nb = scores.shape
    blk = torch.arange(nb, device=scores.device)
    q_blk = torch.div(positions, cfg.block_size, rounding_mode="floor").unsqueeze(1)   # [T, 1]
    causal = blk <= q_blk                                                               # [T, nB]
    fixed = causal & ((blk < cfg.init_blocks) | (blk > q_blk - cfg.window_blocks))
    cand = (causal & ~fixed).unsqueeze(1) & torch.isfinite(scores)                      # [T, Hkv, nB]
    keyed = scores.masked_fill(~cand, float("-inf"))
    k = min(cfg.topk, nb)
    chosen = torch.zeros_like(cand)
    if k > 0:
        # A stable descending sort breaks ties towards the lower block index, like the kernel.
        order = torch.sort(keyed, dim=-1, descending=True, stable=True).indices[..., :k]
        chosen.scatter_(-1, order, torch.gather(cand, -1, order))
    selected = chosen | fixed.unsqueeze(1)
    dense = (positions + 1 < dense_len).view(t, 1, 1)
    return torch.where(dense, causal.unsqueeze(1), selected)


def select_blocks(q: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor, cfg: SparseSettings,
                  scale: float, dense_len: int, kv_limit: int | torch.Tensor, num_blocks: int,
                  path: torch.Tensor | None = None) -> torch.Tensor:
    """Selected blocks bool [T, Hkv, num_blocks] of each (query, KV head) (see block_scores and
    select_from_scores). positions: [T] int64; kv_limit: an int or an int32 [1] device tensor;
    path: tree tokens' own kernels (block_scores). CUDA tensors take the selection kernels (chains)."""
    if path is None and backend.use_kernel(q, ck, positions):
        from . import _kernels

        if _kernels.supports_sparse_select(q, ck, positions, cfg, num_blocks):
            words = _kernels.sparse_select_blocks(q, ck, positions, cfg, scale, dense_len, kv_limit, num_blocks)
            t, hkv, w = words.shape
            return unpack_tree_mask(words.view(t * hkv, w), num_blocks).view(t, hkv, num_blocks)
    scores = block_scores(q, ck, positions, cfg, scale, kv_limit, num_blocks, path)
    return select_from_scores(scores, positions, cfg, dense_len)


def ancestors_in_window(positions: torch.Tensor, prefix: int | torch.Tensor, cfg: SparseSettings) -> bool:
    """Whether every tree token's ancestors surely lie in blocks of its local window (always
    selected): then the tree mask alone shows each token the ancestors plain decoding would attend.
    Any tree of up to window_size - block_size + 1 tokens passes without a host read (MiniCPM4:
    1,985); a larger one needs a host prefix and reads the deepest position."""
    if positions.shape[0] <= cfg.window_size - cfg.block_size + 1:
        return True
    if isinstance(prefix, torch.Tensor):
        return False
    return int(positions.max()) // cfg.block_size - prefix // cfg.block_size < cfg.window_blocks


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor,
           cfg: SparseSettings, kv_limit: int | torch.Tensor, tree_mask: torch.Tensor | None,
           seqlen: torch.Tensor | None) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"sparse_attention: expected q [T,Hq,D], k/v [S,Hkv,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    if k.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"sparse_attention: q {tuple(q.shape)} does not fit k {tuple(k.shape)} "
                         f"(equal head dim, query heads a multiple of KV heads)")
    if ck.dim() != 3 or ck.shape[1:] != (hkv, d):
        raise ValueError(f"sparse_attention: compressed keys must be [C, {hkv}, {d}], got {tuple(ck.shape)}")
    if positions.shape != (t,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sparse_attention: positions must be int [{t}], got {positions.dtype} {tuple(positions.shape)}")
    if s < t:
        raise ValueError(f"sparse_attention: {s} cache slots cannot hold the {t} new tokens")
    for name, length in (("kv_limit", kv_limit), ("seqlen", seqlen)):
        if isinstance(length, torch.Tensor) and (length.shape != (1,) or length.dtype != torch.int32
                                                 or length.device != q.device):
            raise ValueError(f"sparse_attention: a device-side {name} must be int32 [1] on {q.device}, got "
                             f"{length.dtype} {list(length.shape)} on {length.device}")
    if not isinstance(kv_limit, torch.Tensor):
        if not 0 <= kv_limit <= s:
            raise ValueError(f"sparse_attention: kv_limit={kv_limit} outside [0, {s}]")
        if num_kernels(kv_limit, cfg.kernel_size, cfg.kernel_stride) > ck.shape[0]:
            raise ValueError(f"sparse_attention: {ck.shape[0]} compressed keys cannot cover kv_limit={kv_limit}")
    if tree_mask is not None and (tree_mask.dtype != torch.int64 or tree_mask.shape != (t, tree_mask_words(t))):
        raise ValueError(f"sparse_attention: tree mask must be int64 [{t}, {tree_mask_words(t)}], "
                         f"got {tree_mask.dtype} {tuple(tree_mask.shape)}")


# The selection kernels score on tensor cores where they apply (_kernels.sparse_scores_mma), else
# with the SIMT kernels, one query per block (built for decode and trees): longer chains then
# score as a torch GEMM over query chunks.
_KERNEL_SELECT_MAX_TOKENS = 8
# fp32 score scratch per selection-kernel call of a long chain: its query chunk follows from it.
_SCORE_BYTES = 256 << 20


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """bool [..., N] -> int64 [..., ceil(N / 64)]: bit n % 64 of word n // 64 is bits[..., n]."""
    n = bits.shape[-1]
    words = (n + 63) // 64
    padded = torch.zeros(*bits.shape[:-1], words * 64, dtype=torch.int64, device=bits.device)
    padded[..., :n] = bits.to(torch.int64)
    shifts = torch.arange(64, dtype=torch.int64, device=bits.device)
    # Summing distinct powers of two is an OR; bit 63 wraps to the sign bit, as intended.
    return (padded.view(*bits.shape[:-1], words, 64) << shifts).sum(dim=-1)


def _kernel_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ck: torch.Tensor,
                             positions: torch.Tensor, cfg: SparseSettings, dense_len: int,
                             kv_limit: int | torch.Tensor, tree_mask: torch.Tensor | None,
                             seqlen: torch.Tensor | None, row_invariant: bool, span: int | None) -> torch.Tensor | None:
    """Selection kernels, then the attention kernels with the block mask; None where they do not apply.
    With device-side lengths nothing here reads the GPU from the host (CUDA graph capture)."""
    from . import _kernels

    t, hq, _ = q.shape
    s, hkv, _ = k.shape
    nb = (s + cfg.block_size - 1) // cfg.block_size
    words = -(-nb // 64)
    if cfg.block_size != _kernels.ATTENTION_BLOCK_KEYS or not _kernels.supports_attention(q, k, v, tree_mask):
        return None
    if _kernels.attention_smem_rejection(q, k, tree_mask, words) is not None:
        return None  # the block-selection rows would not fit the GPU's shared memory: torch path
    # Decoded and verified tokens: the row-invariant mode (a tree token gets its decoded bits): one
    # score split length for the whole generation (planned from span), and attention split by the
    # rank of a token's selected tiles, into as many splits as the config lets a token select.
    invariant = (row_invariant and (t == 1 or tree_mask is not None) and backend.row_invariant_kernels()
                 and _kernels.invariant_rejection(q, k, tree_mask, words) is None
                 and _kernels.supports_sparse_select(q, ck, positions, cfg, nb))
    # The heuristic mode's tree mask shows a token all its ancestors, whatever blocks it selected.
    if not invariant and tree_mask is not None and not ancestors_in_window(positions, kv_limit, cfg):
        return None
    path = None if tree_mask is None else path_kernels(k, kv_limit, unpack_tree_mask(tree_mask, t),
                                                       cfg.kernel_size, cfg.kernel_stride)
    if invariant:
        per_split = _kernels.sparse_invariant_per_split(span or DEFAULT_SPAN, hkv, cfg, q.device)
        mask = _kernels.sparse_select_blocks(q, ck, positions, cfg, scale, dense_len, kv_limit, nb, path, per_split)
        if _kernels.block_mask_rejection(q, k, mask) is not None:
            return None
        most = max(-(-dense_len // cfg.block_size), cfg.max_selected_blocks)
        return _kernels.attention(q, k, v, scale, tree_mask, block_mask=mask, seqlen=seqlen,
                                  rank_tiles=_kernels.RANK_TILES, splits=_kernels.rank_splits(most))
    # A long prefill (and a heuristic-mode tree) may take the Hopper kernels (EDGESPEC_SM90_ATTENTION=1):
    # the prefill's scores and its attention.
    sm90 = _kernels.sm90_attention_requested(q, k)
    if path is None and _kernels.supports_sparse_select(q, ck, positions, cfg, nb) and (
            t <= _KERNEL_SELECT_MAX_TOKENS or _kernels.sparse_scores_mma(q, ck)):
        # Query chunks bound the kernels' fp32 score scratch ([rows, Hkv, C]) for long prefills.
        columns = max(num_kernels(s, cfg.kernel_size, cfg.kernel_stride), 1)
        rows = max(_KERNEL_SELECT_MAX_TOKENS, _SCORE_BYTES // (4 * hkv * columns))
        mask = torch.cat([_kernels.sparse_select_blocks(
            q[a:a + rows], ck, positions[a:a + rows], cfg, scale, dense_len, kv_limit, nb,
            sm90=sm90 and _kernels.sparse_scores_mma(q[a:a + rows], ck)) for a in range(0, t, rows)])
    else:
        chunk = max(1, _CHUNK_ELEMENTS // (hq * max(num_kernels(s, cfg.kernel_size, cfg.kernel_stride), 1)))
        mask = torch.cat([_pack_bits(select_from_scores(
            block_scores(q[a:a + chunk], ck, positions[a:a + chunk], cfg, scale, kv_limit, nb,
                         None if path is None else path[a:a + chunk]),
            positions[a:a + chunk], cfg, dense_len)) for a in range(0, t, chunk)])
    if _kernels.block_mask_rejection(q, k, mask) is not None:
        return None
    # Splits are planned for the keys a query can select, not for the whole cache.
    selectable = max(dense_len, (cfg.init_blocks + cfg.window_blocks + cfg.topk) * cfg.block_size) + t
    splits = _kernels.attention_splits(t, min(s, selectable), hq, hkv, tree_mask is not None, q.device, sm90)
    return _kernels.attention(q, k, v, scale, tree_mask, splits=splits, block_mask=mask, seqlen=seqlen, sm90=sm90)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ck: torch.Tensor,
                     positions: torch.Tensor, cfg: SparseSettings, dense_len: int, kv_limit: int | torch.Tensor,
                     tree_mask: torch.Tensor | None = None, seqlen: torch.Tensor | None = None,
                     row_invariant: bool = True, span: int | None = None) -> torch.Tensor:
    """Block-sparse attention of T new tokens over S cache slots (the new tokens are the last T).

    q: [T, Hq, D]; k, v: [S, Hkv, D]; ck: compressed keys [C, Hkv, D] of this layer (up to date for
    [0, kv_limit)); positions: [T] int absolute positions (S - T + i for a chain, prefix + depth
    for tree tokens); dense_len: queries with positions + 1 < dense_len attend densely; kv_limit:
    S for a chain, the committed prefix S - T for a tree; tree_mask: None (causal) or packed int64
    [T, ceil(T/64)] (ops.attention). Returns [T, Hq, D] in q's dtype.

    Device-side lengths (what a CUDA graph captured over a fixed view of the cache replays with):
    kv_limit may be an int32 [1] tensor on q's device, and seqlen (int32 [1]) says that only slots
    [0, seqlen) of k, v count, the new tokens being the last T of them. The kernels read both on
    the device; the torch path reads seqlen on the host, like ops.attention.

    row_invariant, span: as for ops.attention. On the GPU decode steps and trees then run the
    selection and attention kernels' row-invariant mode (a verified tree token gets its decoded
    token's bits), planned from span; the CPU's torch path is row-invariant for them regardless.
    """
    _check(q, k, v, ck, positions, cfg, kv_limit, tree_mask, seqlen)
    positions = positions.long()
    if backend.use_kernel(q, k, v, ck, positions, tree_mask, seqlen):
        out = _kernel_sparse_attention(q, k, v, scale, ck, positions, cfg, dense_len, kv_limit, tree_mask, seqlen,
                                       row_invariant, span)
        if out is not None:
            return out
    if seqlen is not None:
        n = int(seqlen.item())
        if not q.shape[0] <= n <= k.shape[0]:
            raise ValueError(f"sparse_attention: seqlen {n} must hold the {q.shape[0]} new tokens within the "
                             f"{k.shape[0]} slots")
        k, v = k[:n], v[:n]
    if tree_mask is not None or q.shape[0] == 1:
        limit = int(kv_limit) if isinstance(kv_limit, torch.Tensor) else kv_limit
        return _attend_by_position(q, k, v, scale, ck, positions, cfg, dense_len, limit, tree_mask)
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    nb = (s + cfg.block_size - 1) // cfg.block_size
    slots = torch.arange(s, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (hq * max(s, 1)))
    out = torch.empty_like(q)
    kk = k.transpose(0, 1).unsqueeze(0)                                           # [1, Hkv, S, D]
    vv = v.transpose(0, 1).unsqueeze(0)
    for a in range(0, t, chunk):
        b = min(a + chunk, t)
        pos = positions[a:b]
        sel = select_blocks(q[a:b], ck, pos, cfg, scale, dense_len, kv_limit, nb)  # [Tc, Hkv, nB]
        allowed = sel.repeat_interleave(cfg.block_size, dim=-1)[..., :s] & (slots <= pos.unsqueeze(1)).unsqueeze(1)
        mask = allowed.unsqueeze(2).expand(b - a, hkv, g, s).reshape(b - a, hq, s)
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1).unsqueeze(0), kk, vv,                          # [1, Hq, Tc, D]
            attn_mask=mask.transpose(0, 1).unsqueeze(0), scale=scale, enable_gqa=g > 1)
        out[a:b] = o.squeeze(0).transpose(0, 1)
    return out


def _attend_by_position(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ck: torch.Tensor,
                        positions: torch.Tensor, cfg: SparseSettings, dense_len: int, kv_limit: int,
                        tree_mask: torch.Tensor | None) -> torch.Tensor:
    """The torch path of one decoded token (T = 1, no tree mask) or of a tree, row-invariant: every
    row runs the calls a decode step at its position runs, with the same shapes on the same bits,
    so a verified tree token gets bitwise its decoded output.

    A row at position p works on its logical sequence of p + 1 tokens (the committed prefix, then
    its ancestors by depth, then itself), gathered from the cache: its compressed keys are the
    prefix's and its path's (path_kernels, computed like the cache's own), scored against p's
    blocks; it attends the selected blocks of that sequence. Rows of one position share the calls
    (batched: torch's CPU GEMMs and attention do not round a batch entry by the batch size).
    """
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    prefix = s - t
    visible = (torch.ones(1, 1, dtype=torch.bool, device=q.device) if tree_mask is None
               else unpack_tree_mask(tree_mask, t))
    depth, order = ancestors_by_depth(visible)                                        # [T], [T, T]
    if not torch.equal(positions, prefix + depth):
        raise ValueError(f"sparse_attention: positions {positions.tolist()} are not the slots' logical positions "
                         f"{(prefix + depth).tolist()} (the committed {prefix} slots, then each token's depth)")
    if tree_mask is not None and kv_limit != prefix:
        raise ValueError(f"sparse_attention: a tree's kv_limit must be its committed prefix {prefix}, got {kv_limit}")
    path = None if tree_mask is None else path_kernels(k, prefix, visible, cfg.kernel_size, cfg.kernel_stride)
    committed = num_kernels(kv_limit, cfg.kernel_size, cfg.kernel_stride)
    out = torch.empty_like(q)
    for level in sorted(set(depth.tolist())):
        rows = (depth == level).nonzero().flatten()
        length = prefix + level + 1                                               # p + 1
        slots = logical_slots(order[rows], prefix, torch.arange(length, device=q.device))   # [R, L]
        nb = -(-length // cfg.block_size)
        avail = min(ck.shape[0], num_kernels(nb * cfg.block_size, cfg.kernel_size, cfg.kernel_stride))
        seen = length if path is not None else min(length, kv_limit)            # tokens whose kernels count
        hidden = (torch.arange(avail, device=q.device)
                  >= num_kernels(seen, cfg.kernel_size, cfg.kernel_stride)).unsqueeze(0)     # [1, C]
        pos = torch.full((1,), length - 1, dtype=torch.long, device=q.device)
        step = max(1, _CHUNK_ELEMENTS // (length * hkv * d))
        for a in range(0, len(rows), step):
            part = rows[a:a + step]
            b = len(part)
            # The row's compressed keys: the committed ones, then its path's.
            kernels = ck[:avail].unsqueeze(0).expand(b, -1, -1, -1)                # [B, C, Hkv, D]
            if path is not None and avail > committed:
                own = path[part, :avail - committed]                            # (those past it: hidden)
                kernels = torch.cat([kernels[:, :committed], own, kernels[:, committed + own.shape[1]:]], dim=1)
            qg = q[part].float().view(b, hkv, g, d)
            logits = torch.matmul(qg, kernels.float().permute(0, 2, 3, 1)) * scale  # [B, Hkv, g, C]
            scores = _pool_scores(logits, hidden.expand(b, -1), cfg, nb)
            sel = select_from_scores(scores, pos.expand(b), cfg, dense_len)        # [B, Hkv, nB]
            allowed = sel.repeat_interleave(cfg.block_size, dim=-1)[..., :length]  # [B, Hkv, L]
            mask = allowed.unsqueeze(2).expand(b, hkv, g, length).reshape(b, hq, 1, length)
            if tree_mask is None:
                # A decode step's logical sequence is the cache itself: read in place (torch's
                # attention gives a view and a gathered copy of the same keys the same bits).
                kl, vl = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)   # [1, Hkv, S, D]
            else:
                gather = slots[a:a + step].reshape(-1)
                kl = k.index_select(0, gather).view(b, length, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
                vl = v.index_select(0, gather).view(b, length, hkv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(q[part].unsqueeze(2), kl, vl, attn_mask=mask, scale=scale,
                                               enable_gqa=g > 1)                   # [B, Hq, 1, D]
            out[part] = o.squeeze(2)
    return out
