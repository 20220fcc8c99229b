"""The Python side of the boundary to the compiled CUDA kernels (`edgespec._C`).

Only the op modules of this package call in here, and only after `backend.use_kernel(...)` said
yes. For every op there are three functions:

* `<op>_rejection(...) -> str | None`: why the kernel cannot take these tensors (wrong dtype,
  strides it cannot read, shapes that disagree, not on one CUDA device), or None when it can.
  Device-independent reasons come first, so they are testable with CPU tensors.
* `supports_<op>(...) -> bool`: the rejection is None. The op layer falls back to its torch path
  otherwise.
* `<op>(...)`: runs the kernel; raises ValueError naming the op if the inputs are rejected.

Tensors cross as checked views (`_C.TensorView`: address, shape, strides in elements, dtype code,
device index); C++ re-checks them and raises `_C.KernelError`, re-raised here as
`edgespec.errors.KernelError` with the op, every argument's shape and the reason. Outputs are
allocated here with torch (so the caching allocator and CUDA graphs see them) and every kernel
launches on torch's current stream of the tensors' device, so graph capture records it.
"""
from __future__ import annotations

import os
from functools import lru_cache
from types import ModuleType
from typing import Any, Callable

import torch

from ..errors import KernelError
from . import backend
from .linear import INVARIANT_ROWS

# Storage dtypes every float kernel is compiled for (csrc/common/dispatch.h, kCompiledFloatDtypes).
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)
# argmax and the top-p kernel scan with int32 indices (csrc/kernels/sampling.cpp).
MAX_VOCAB = 1 << 30


# --- the boundary --------------------------------------------------------------------------------

def _module() -> ModuleType:
    module = backend.compiled_module()
    if module is None:
        raise RuntimeError("edgespec._C is not built: the CUDA kernels are unavailable (use the ops in edgespec.ops)")
    return module


@lru_cache(maxsize=1)
def _dtype_codes() -> dict[torch.dtype, Any]:
    codes = _module().DType
    return {torch.float32: codes.fp32, torch.float16: codes.fp16, torch.bfloat16: codes.bf16,
            torch.int32: codes.int32, torch.int64: codes.int64}


def _view(t: torch.Tensor) -> Any:
    """A `_C.TensorView` of a CUDA tensor; the tensor must outlive the launch (callers hold it)."""
    return _module().TensorView(t.data_ptr(), t.shape, t.stride(), _dtype_codes()[t.dtype], t.device.index)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every kernel output is allocated here (tests poison it to prove every element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _run(fn: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except _module().KernelError as exc:
        raise KernelError(str(exc)) from exc


def _require(op: str, reason: str | None) -> None:
    if reason is not None:
        raise ValueError(f"{op}: the CUDA kernel cannot take these inputs: {reason}")


# --- shared checks -------------------------------------------------------------------------------

def _shape(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """`t` [..., H] as an [R, H] view (no copy), or None when its last dim is strided or its leading
    dims do not fold into one row stride."""
    if t.dim() == 0 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return None
    if t.dim() == 2:
        return t
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims not foldable without a copy
        return None


def _float_dtype(name: str, t: torch.Tensor) -> str | None:
    if t.dtype not in FLOAT_DTYPES:
        return f"{name} has dtype {t.dtype}; kernels are compiled for bfloat16, float16 and float32"
    return None


def _same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> str | None:
    if t.dtype != ref.dtype:
        return f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}"
    return None


def _last_dim_contiguous(name: str, t: torch.Tensor) -> str | None:
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return f"{name} {_shape(t)} has last-dim stride {t.stride(-1)}; the kernel reads rows with stride 1"
    return None


def _one_cuda_device(**tensors: torch.Tensor) -> str | None:
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
        if not t.is_cuda:
            return f"{name} is on {t.device}, not a CUDA device"
        if t.device != first.device:
            return f"{name} is on {t.device} but {first_name} is on {first.device}"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


# --- RMSNorm -------------------------------------------------------------------------------------

def rms_norm_rejection(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> str | None:
    reason = _first(_float_dtype("x", x), _same_dtype("weight", weight, "x", x))
    if reason:
        return reason
    if x.dim() == 0 or x.shape[-1] < 1:
        return f"x {_shape(x)} needs a last (hidden) dim of at least 1"
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1] or not weight.is_contiguous():
        return f"weight {_shape(weight)} must be contiguous [{x.shape[-1]}] (x is {_shape(x)})"
    if _rows(x) is None:
        return f"x {_shape(x)} strides {x.stride()} cannot be read as rows without a copy"
    if residual is None:
        return _one_cuda_device(x=x, weight=weight)
    reason = _same_dtype("residual", residual, "x", x)
    if reason:
        return reason
    if residual.shape != x.shape:
        return f"residual {_shape(residual)} does not match x {_shape(x)}"
    if _rows(residual) is None:
        return f"residual {_shape(residual)} strides {residual.stride()} cannot be read as rows without a copy"
    return _one_cuda_device(x=x, weight=weight, residual=residual)


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    return rms_norm_rejection(x, weight, residual) is None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm kernel (csrc/kernels/norm.h); same contract as edgespec.ops.rms_norm.

    x: [..., H] bf16/fp16/fp32, last dim contiguous, leading dims foldable into rows;
    weight: [H] contiguous, x's dtype; residual: optional, x's shape and dtype.
    Returns out [..., H] (contiguous), or (out, s) with s = x + residual (contiguous).
    """
    _require("rms_norm", rms_norm_rejection(x, weight, residual))
    hidden = x.shape[-1]
    out = _new_output(x.shape, x.dtype, x.device)
    C = _module()
    if residual is None:
        _run(C.rms_norm, _view(_rows(x)), _view(weight), None, _view(out.view(-1, hidden)), None,
             float(eps), _stream(x))
        return out
    s = _new_output(x.shape, x.dtype, x.device)
    _run(C.rms_norm, _view(_rows(x)), _view(weight), _view(_rows(residual)), _view(out.view(-1, hidden)),
         _view(s.view(-1, hidden)), float(eps), _stream(x))
    return out, s


# --- RoPE ----------------------------------------------------------------------------------------

def rope_rejection(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: Any) -> str | None:
    """`table` is an edgespec.ops.RopeTable (cos, sin: fp32 [P, R/2])."""
    cos, sin = table.cos, table.sin
    reason = _first(_float_dtype("q", q), _same_dtype("k", k, "q", q))
    if reason:
        return reason
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        return f"expected q [T, Hq, D] and k [T, Hk, D], got {_shape(q)} and {_shape(k)}"
    if positions.dim() != 1 or positions.shape[0] != q.shape[0] or positions.dtype not in INDEX_DTYPES:
        return f"positions must be int32/int64 [{q.shape[0]}], got {_shape(positions)}"
    if cos.dtype != torch.float32 or sin.dtype != torch.float32 or cos.dim() != 2 or cos.shape != sin.shape:
        return f"cos/sin must be float32 [P, R/2] of one shape, got {_shape(cos)} and {_shape(sin)}"
    if not 1 <= cos.shape[1] <= q.shape[2] // 2:
        return f"rotary dim {2 * cos.shape[1]} must be in [2, head dim {q.shape[2]}]"
    reason = _first(*(_last_dim_contiguous(n, t) for n, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin))))
    return reason or _one_cuda_device(q=q, k=k, positions=positions, cos=cos, sin=sin)


def supports_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: Any) -> bool:
    return rope_rejection(q, k, positions, table) is None


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, table: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE kernel (csrc/kernels/rope.h); same contract as edgespec.ops.apply_rope.

    q: [T, Hq, D], k: [T, Hk, D] (one dtype, last dim contiguous; token/head strides free, so
    views into a fused QKV output need no copy); positions: [T] int32/int64; table.cos/sin:
    fp32 [P, R/2], R <= D. Returns new contiguous (q, k). A position outside [0, P) yields NaN in
    that token's rotated dims (the kernel never reads outside the table).
    """
    _require("apply_rope", rope_rejection(q, k, positions, table))
    q_out = _new_output(q.shape, q.dtype, q.device)
    k_out = _new_output(k.shape, k.dtype, k.device)
    _run(_module().apply_rope, _view(q), _view(k), _view(positions), _view(table.cos), _view(table.sin),
         _view(q_out), _view(k_out), _stream(q))
    return q_out, k_out


# --- SiLU-and-mul --------------------------------------------------------------------------------

def silu_and_mul_rejection(x: torch.Tensor) -> str | None:
    reason = _float_dtype("x", x)
    if reason:
        return reason
    if x.dim() == 0 or x.shape[-1] < 2 or x.shape[-1] % 2:
        return f"x {_shape(x)} needs an even last dim >= 2 (gate | up)"
    if _rows(x) is None:
        return f"x {_shape(x)} strides {x.stride()} cannot be read as rows without a copy"
    return _one_cuda_device(x=x)


def supports_silu_and_mul(x: torch.Tensor) -> bool:
    return silu_and_mul_rejection(x) is None


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU-and-mul kernel (csrc/kernels/activation.h): x [..., 2I] -> silu(x[..., :I]) * x[..., I:],
    [..., I] contiguous in x's dtype."""
    _require("silu_and_mul", silu_and_mul_rejection(x))
    inter = x.shape[-1] // 2
    out = _new_output((*x.shape[:-1], inter), x.dtype, x.device)
    _run(_module().silu_and_mul, _view(_rows(x)), _view(out.view(-1, inter)), _stream(x))
    return out


# --- embedding -----------------------------------------------------------------------------------

def embedding_rejection(ids: torch.Tensor, table: torch.Tensor) -> str | None:
    if ids.dim() != 1 or ids.dtype not in INDEX_DTYPES:
        return f"ids must be int32/int64 [T], got {_shape(ids)}"
    reason = _float_dtype("table", table)
    if reason:
        return reason
    if table.dim() != 2:
        return f"table must be [V, H], got {_shape(table)}"
    return _last_dim_contiguous("table", table) or _one_cuda_device(table=table, ids=ids)


def supports_embedding(ids: torch.Tensor, table: torch.Tensor) -> bool:
    return embedding_rejection(ids, table) is None


def embedding(ids: torch.Tensor, table: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Embedding kernel (csrc/kernels/embedding.h): ids [T] int32/int64, table [V, H] ->
    table[ids] * scale, [T, H] contiguous in table's dtype. An id outside [0, V) yields a NaN row
    (never an out-of-bounds read); edgespec.ops.embedding range-checks first when check=True."""
    _require("embedding", embedding_rejection(ids, table))
    out = _new_output((ids.shape[0], table.shape[1]), table.dtype, table.device)
    _run(_module().embedding, _view(ids), _view(table), _view(out), float(scale), _stream(table))
    return out


# --- argmax --------------------------------------------------------------------------------------

def argmax_rejection(logits: torch.Tensor) -> str | None:
    reason = _float_dtype("logits", logits)
    if reason:
        return reason
    if logits.dim() != 2 or not 1 <= logits.shape[1] <= MAX_VOCAB:
        return f"logits must be [T, V] with 1 <= V <= {MAX_VOCAB}, got {_shape(logits)}"
    return _last_dim_contiguous("logits", logits) or _one_cuda_device(logits=logits)


def supports_argmax(logits: torch.Tensor) -> bool:
    return argmax_rejection(logits) is None


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Argmax kernel (csrc/kernels/sampling.h): logits [T, V] -> int64 [T]; the lowest index wins
    ties and a NaN counts as the largest value (so the first NaN wins), exactly as torch.argmax."""
    _require("argmax", argmax_rejection(logits))
    out = _new_output((logits.shape[0],), torch.int64, logits.device)
    _run(_module().argmax, _view(logits), _view(out), _stream(logits))
    return out


# --- top-p nucleus floor -------------------------------------------------------------------------

def nucleus_floor_rejection(probs: torch.Tensor) -> str | None:
    if probs.dtype != torch.float32:
        return f"probs has dtype {probs.dtype}; the kernel reads float32 probabilities"
    if probs.dim() != 2 or not 1 <= probs.shape[1] <= MAX_VOCAB:
        return f"probs must be [R, V] with 1 <= V <= {MAX_VOCAB}, got {_shape(probs)}"
    return _last_dim_contiguous("probs", probs) or _one_cuda_device(probs=probs)


def supports_nucleus_floor(probs: torch.Tensor) -> bool:
    return nucleus_floor_rejection(probs) is None


def nucleus_floor(probs: torch.Tensor, need: int) -> torch.Tensor:
    """Top-p kernel (csrc/kernels/sampling.h, "the nucleus floor"): probs [R, V] fp32 -> fp32 [R],
    the smallest probability of each row's nucleus; `need` is top_p in units of 2^-40 mass."""
    _require("nucleus_floor", nucleus_floor_rejection(probs))
    rows, vocab = probs.shape
    out = _new_output((rows,), torch.float32, probs.device)
    # Scratch, fully written by pass 1 before it is read (tests poison it as they poison outputs).
    workspace = _new_output((_module().nucleus_floor_workspace_words(rows, vocab),), torch.int64, probs.device)
    _run(_module().nucleus_floor, _view(probs), int(need), _view(out), _view(workspace), _stream(probs))
    return out


# --- attention -----------------------------------------------------------------------------------

# csrc/kernels/attention.h: 16-bit tensor-core kernels specialised for these head dims; tree masks
# are staged in shared memory up to this many tree tokens.
ATTENTION_DTYPES = (torch.bfloat16, torch.float16)
ATTENTION_HEAD_DIMS = (64, 128)
ATTENTION_MAX_TREE_TOKENS = 1024


def _chunk_rejection(name: str, t: torch.Tensor) -> str | None:
    """The kernels move rows in 16-byte chunks: last dim contiguous, every other stride (of a dim
    longer than 1) a multiple of 8 elements, 16-byte aligned base address."""
    reason = _last_dim_contiguous(name, t)
    if reason:
        return reason
    if any(size > 1 and stride % 8 for size, stride in zip(t.shape[:-1], t.stride()[:-1])):
        return f"{name} {_shape(t)} has strides {t.stride()}; the kernel needs multiples of 8 elements"
    if t.data_ptr() % 16:
        return f"{name} {_shape(t)} starts at an address that is not 16-byte aligned"
    return None


def attention_rejection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        tree_mask: torch.Tensor | None = None) -> str | None:
    """Why the attention kernels cannot take these tensors, or None. A query whose strides are not
    chunk-aligned is not a reason: `attention` copies it (K/V are cache views and are never copied)."""
    if q.dtype not in ATTENTION_DTYPES:
        return f"q has dtype {q.dtype}; the attention kernels are compiled for bfloat16 and float16"
    reason = _first(_same_dtype("k", k, "q", q), _same_dtype("v", v, "q", q))
    if reason:
        return reason
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        return f"expected q [T, Hq, D] and k, v [S, Hkv, D], got {_shape(q)}, {_shape(k)}, {_shape(v)}"
    t, hq, d = q.shape
    s, hkv, dk = k.shape
    if d not in ATTENTION_HEAD_DIMS or dk != d:
        return f"head dim {d} (q) / {dk} (k) has no attention kernel (compiled for {ATTENTION_HEAD_DIMS})"
    if hkv < 1 or hq % hkv or s < t:
        return f"q {_shape(q)} and k {_shape(k)} do not form T <= S new tokens with Hq a multiple of Hkv"
    if tree_mask is not None:
        if tree_mask.dtype != torch.int64 or tuple(tree_mask.shape) != (t, (t + 63) // 64):
            return f"tree_mask must be int64 [{t}, {(t + 63) // 64}], got {_shape(tree_mask)}"
        if t > ATTENTION_MAX_TREE_TOKENS:
            return f"tree of {t} tokens is above the kernel's limit of {ATTENTION_MAX_TREE_TOKENS}"
    reason = _first(_last_dim_contiguous("q", q), _chunk_rejection("k", k), _chunk_rejection("v", v))
    if reason:
        return reason
    tensors = {"q": q, "k": k, "v": v} | ({"tree_mask": tree_mask} if tree_mask is not None else {})
    return _one_cuda_device(**tensors) or attention_smem_rejection(q, k, tree_mask)


def supports_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       tree_mask: torch.Tensor | None = None) -> bool:
    return attention_rejection(q, k, v, tree_mask) is None


@lru_cache(maxsize=None)
def _smem_optin(device_index: int) -> int:
    # The per-block shared memory a kernel may opt in to (99 KB on sm_86/sm_89, 163 KB on sm_80,
    # 227 KB on sm_90); queried once per device, on first use.
    return int(_module().max_shared_memory_optin(device_index))


def attention_smem_rejection(q: torch.Tensor, k: torch.Tensor, tree_mask: torch.Tensor | None,
                             block_words: int = 0) -> str | None:
    """Why this call's attention block would need more shared memory than the GPU allows, or None.
    Long trees and long block masks (block_words int64 words per token) with a small GQA group
    stage many rows (csrc/kernels/attention_plan.h); q, k on one CUDA device, shapes checked."""
    t, hq, d = q.shape
    need = _module().attention_smem_bytes(d, t, hq // k.shape[1], tree_mask is not None,
                                          0 if tree_mask is None else tree_mask.shape[1], block_words)
    return _smem_rejection("this call", need, q.device)


def _smem_rejection(what: str, need: int, device: torch.device) -> str | None:
    """Why `what`, needing `need` bytes of shared memory per block, exceeds the GPU's opt-in limit, or None."""
    limit = _smem_optin(device.index or 0)
    return f"{what} needs {need} bytes of shared memory per block; the GPU allows {limit}" if need > limit else None


@lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    # Queried once per device, on first use (never at import).
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def attention_splits(tokens: int, seqlen: int, heads_q: int, heads_kv: int, tree: bool,
                     device: torch.device, sm90: bool = False) -> int:
    """How many key-range splits the kernels (sm90: the Hopper kernels) use for this shape on
    `device` (csrc/kernels/attention_plan.h)."""
    if sm90:
        return _module().attention_sm90_num_splits(tokens, seqlen, heads_q, heads_kv, _sm_count(device.index or 0))
    return _module().attention_num_splits(tokens, seqlen, heads_q, heads_kv, tree, _sm_count(device.index or 0))


def invariant_chunk_tiles(span: int, heads_q: int, heads_kv: int, device: torch.device) -> int:
    """Tiles (64 keys) per chunk of the row-invariant attention mode for a cache of `span` slots on
    `device` (csrc/kernels/attention_plan.h): one value for a whole generation."""
    return int(_module().attention_invariant_chunk_tiles(span, heads_q, heads_kv, _sm_count(device.index or 0)))


def invariant_rejection(q: torch.Tensor, k: torch.Tensor, tree_mask: torch.Tensor | None,
                        block_words: int = 0, sm90: bool = False) -> str | None:
    """Why the row-invariant mode (sm90: on the Hopper kernels) cannot take this (otherwise
    supported) call, or None: a tree with more query heads per KV head than a tail block holds, or
    whose tail block (with a block mask of block_words words per row) needs more shared memory
    than the GPU allows."""
    if tree_mask is None:
        return None
    t, hq, d = q.shape
    group = hq // k.shape[1]
    if group > _module().ATTENTION_MAX_TAIL_GROUP:
        return f"{group} query heads per KV head; the invariant tree mode takes at most {_module().ATTENTION_MAX_TAIL_GROUP}"
    need = (_module().attention_sm90_tail_smem_bytes(d, t) if sm90
            else _module().attention_tail_smem_bytes(d, t, group, tree_mask.shape[1], block_words))
    return _smem_rejection("a tail block", need, q.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              tree_mask: torch.Tensor | None = None, splits: int | None = None,
              block_mask: torch.Tensor | None = None, seqlen: torch.Tensor | None = None,
              sm90: bool = False, chunk_tiles: int | None = None, rank_tiles: int | None = None) -> torch.Tensor:
    """Attention kernels (csrc/kernels/attention.h); same contract as edgespec.ops.attention.

    q: [T, Hq, D] bf16/fp16, D in (64, 128), last dim contiguous; k, v: [S, Hkv, D] with S >= T
    (the new tokens are the last T slots), chunk-aligned strides (a KVCache layer view is);
    tree_mask: None (causal) or packed int64 [T, ceil(T/64)]; splits: key-range splits (None: the
    plan for this GPU; any value in [1, 1024] gives the same result up to rounding);
    block_mask: None, or the InfLLM-v2 selection int64 [T, Hkv, W] (bit b % 64 of word b // 64: 64-key
    block b is selected; see block_mask_rejection), restricting each token's prefix keys to it.
    seqlen: None, or int32 [1] on q's device: only the first seqlen of the S slots count, read by
    the kernel (the new tokens are slots [seqlen - T, seqlen)), so a CUDA graph captured over a
    whole cache replays at any length; the number of splits then follows S. With a block mask the
    mask's words cover the tiles of all S slots (those past seqlen are never visited).
    sm90: run the Hopper kernels (wgmma; csrc/kernels/sm90/attention_sm90.h), which take every
    call but the row-invariant block-sparse mode, block masks included, on a compute capability
    9.0 GPU with a 90a-real build (sm90_attention_rejection); splits=None then plans for them.
    chunk_tiles: None, or the row-invariant mode (csrc/kernels/attention.h "Row invariance"): keys
    cut into chunks of chunk_tiles x 64 at fixed positions (invariant_chunk_tiles; the same value
    for every call of a generation), so a decoded token and the same token verified in a tree get
    bitwise the same output, when both run on the same kernels (sm90 or not). Not with a block
    mask; splits must be None.
    rank_tiles: None, or the row-invariant block-sparse mode (with a block mask; attention.h): split
    z attends each token's selected tiles of ranks [z * rank_tiles, (z + 1) * rank_tiles), trees as
    per-token tail blocks; splits is then required (rank_splits: the same for every call that must agree).
    Returns [T, Hq, D] contiguous in q's dtype. With splits > 1 two fp32 scratch tensors,
    [splits, T * Hq, D] and [splits, T * Hq], are allocated for the partial results (an invariant
    tree call always has them, and a third, fp32 [T * Hq, D + 8], for the state its tail blocks
    resume).
    """
    _require("attention", attention_rejection(q, k, v, tree_mask)
             or (block_mask_rejection(q, k, block_mask) or attention_smem_rejection(q, k, tree_mask, block_mask.shape[2])
                 if block_mask is not None else None)
             or (_seqlen_rejection(q, seqlen) if seqlen is not None else None))
    if _chunk_rejection("q", q) is not None:
        q = q.contiguous()
    if tree_mask is not None and not tree_mask.is_contiguous():
        tree_mask = tree_mask.contiguous()
    t, hq, d = q.shape
    if sm90:
        _require("attention (sm90)", sm90_attention_rejection(q))
    resume = None
    if rank_tiles is not None:
        if block_mask is None or chunk_tiles is not None or sm90 or splits is None or rank_tiles < 1:
            raise ValueError("attention: the row-invariant block-sparse mode (rank_tiles >= 1) needs a block mask "
                             "and splits (rank_splits), and takes neither chunk_tiles nor the sm90 kernels")
        _require("attention (row-invariant)", invariant_rejection(q, k, tree_mask, block_mask.shape[2]))
    elif chunk_tiles is not None:
        if splits is not None or block_mask is not None:
            raise ValueError("attention: the row-invariant mode (chunk_tiles) plans its own splits and takes "
                             "no block mask (rank_tiles is its block-sparse twin)")
        if chunk_tiles < 1:
            raise ValueError(f"attention: chunk_tiles must be >= 1, got {chunk_tiles}")
        _require("attention (row-invariant)", invariant_rejection(q, k, tree_mask, sm90=sm90))
        splits = int(_module().attention_invariant_splits(k.shape[0], chunk_tiles))
        if tree_mask is not None:
            resume = _new_output((t * hq, d + _module().ATTENTION_RESUME_EXTRA), torch.float32, q.device)
    elif splits is None:
        splits = attention_splits(t, k.shape[0], hq, k.shape[1], tree_mask is not None, q.device, sm90)
    out = _new_output(q.shape, q.dtype, q.device)
    partial_out = partial_lse = None
    if splits > 1 or resume is not None:
        partial_out = _new_output((splits, t * hq, d), torch.float32, q.device)
        partial_lse = _new_output((splits, t * hq), torch.float32, q.device)
    _run(_module().attention, _view(q), _view(k), _view(v), None if tree_mask is None else _view(tree_mask),
         _view(out), None if partial_out is None else _view(partial_out),
         None if partial_lse is None else _view(partial_lse), float(scale), int(splits), _stream(q),
         None if block_mask is None else _view(block_mask), None if seqlen is None else _view(seqlen), bool(sm90),
         int(chunk_tiles or 0), None if resume is None else _view(resume), int(rank_tiles or 0))
    return out


# Selected tiles per split of the row-invariant block-sparse mode: a decode step of MiniCPM4-8B
# (1 + 32 + 64 selected tiles, 2 KV heads) spreads over 26 busy blocks of 8 tiles, and a 64-token
# tree writes 16 partials per row (dense_len's 128 tiles bound the splits). Untuned:
# bench_sparse.py's invariant_ms and heuristic_ms columns measure it.
RANK_TILES = 8


def rank_splits(max_tiles: int, rank_tiles: int = RANK_TILES) -> int:
    """Splits of the row-invariant block-sparse mode for tokens that select at most max_tiles tiles."""
    return max(1, -(-max_tiles // rank_tiles))


# Calls with this many packed query rows (tokens x query heads per KV head: one warpgroup's wgmma
# tile) and more take the Hopper kernels when they are asked for; fewer (decode steps, small
# trees) stay on the generic kernels, whose 16-row tiles fit them. Row-invariant calls ignore it
# (sm90_opted_in).
SM90_MIN_ROWS = 64


def sm90_opted_in(q: torch.Tensor) -> bool:
    """EDGESPEC_SM90_ATTENTION=1 (opt-in until a GPU session has checked and timed the Hopper
    kernels: bench_attention.py's sm90 columns) and q's device runs them. ops.attention then sends
    every row-invariant call there (a target's decode steps and trees, whatever their size: both
    sides must run one kernel family for their bits to agree) and the others of at least
    SM90_MIN_ROWS packed rows (sm90_attention_requested)."""
    value = os.environ.get("EDGESPEC_SM90_ATTENTION", "0")
    if value not in ("0", "1"):
        raise ValueError(f"EDGESPEC_SM90_ATTENTION must be 0 or 1, got {value!r}")
    return value == "1" and sm90_attention_rejection(q) is None


def sm90_attention_requested(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ops.attention (and ops.sparse_attention, a prefill's scores included) runs this
    call, not a row-invariant one, on the Hopper kernels: sm90_opted_in and a call of at least
    SM90_MIN_ROWS packed rows."""
    return sm90_opted_in(q) and q.shape[0] * (q.shape[1] // k.shape[1]) >= SM90_MIN_ROWS


def sm90_attention_rejection(q: torch.Tensor) -> str | None:
    """Why the Hopper kernels cannot take this attention call (None: they can), beyond
    attention_rejection: they need an sm_90a build and a compute capability 9.0 GPU."""
    if not _module().build_info().get("sm90_kernels", False):
        return "this build has no sm90 kernels (EDGESPEC_CUDA_ARCHS lacks 90a-real)"
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device) != (9, 0):
        return f"the sm90 kernels need a compute capability 9.0 GPU, {q.device} is {torch.cuda.get_device_capability(q.device)}"
    return None


def _seqlen_rejection(q: torch.Tensor, seqlen: torch.Tensor) -> str | None:
    if seqlen.dtype != torch.int32 or seqlen.numel() != 1 or seqlen.device != q.device:
        return f"seqlen must be int32 [1] on {q.device}, got {seqlen.dtype} {_shape(seqlen)} on {seqlen.device}"
    return None


# --- InfLLM-v2 block selection (sparse attention) -----------------------------------------------

# csrc/kernels/sparse_attention.h: kSparseMaxHeadDim, kSparseMaxGroup, kSparseMaxBlocks, kSparseScoreChunk.
SPARSE_MAX_HEAD_DIM = 256
SPARSE_MAX_GROUP = 64
SPARSE_MAX_BLOCKS = 4096
SPARSE_SCORE_CHUNK = 32
# csrc/kernels/sparse_attention.cpp kMaxScoreSmem: the score kernels stage the group's q, a chunk of
# compressed keys and the logits in fp32 shared memory (sparse_detail::score_smem_bytes), at most this.
SPARSE_MAX_SCORE_SMEM = 96 * 1024


def _num_kernels(length: int, kernel_size: int, kernel_stride: int) -> int:
    return 0 if length < kernel_size else (length - kernel_size) // kernel_stride + 1


def _device_ints(values: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Lengths the kernels read on the device. A caller capturing a CUDA graph passes its own
    persistent int32 device tensor (and refreshes it before each replay); plain ints are copied."""
    if isinstance(values, torch.Tensor):
        if values.dtype != torch.int32 or values.device != device or not values.is_contiguous():
            raise ValueError(f"device-side lengths must be a contiguous int32 tensor on {device}, got {_shape(values)} "
                             f"on {values.device}")
        return values
    return torch.tensor(values, dtype=torch.int32).to(device, non_blocking=True)


def compress_keys_rejection(keys: torch.Tensor, ck: torch.Tensor, kernel_size: int, kernel_stride: int) -> str | None:
    reason = _first(_float_dtype("keys", keys), _same_dtype("ck", ck, "keys", keys))
    if reason:
        return reason
    if keys.dim() != 3 or ck.dim() != 3 or keys.shape[1:] != ck.shape[1:]:
        return f"expected keys [S, Hkv, D] and ck [C, Hkv, D], got {_shape(keys)} and {_shape(ck)}"
    if not 1 <= kernel_stride <= kernel_size:
        return f"kernel_size {kernel_size} and kernel_stride {kernel_stride} need kernel_size >= kernel_stride >= 1"
    reason = _first(_last_dim_contiguous("keys", keys), _last_dim_contiguous("ck", ck))
    return reason or _one_cuda_device(keys=keys, ck=ck)


def supports_compress_keys(keys: torch.Tensor, ck: torch.Tensor, kernel_size: int, kernel_stride: int) -> bool:
    return compress_keys_rejection(keys, ck, kernel_size, kernel_stride) is None


def compress_keys(keys: torch.Tensor, ck: torch.Tensor, start_len: int, end_len: int, kernel_size: int,
                  kernel_stride: int, lengths: torch.Tensor | None = None) -> None:
    """Compressed-key kernel (csrc/kernels/sparse_attention.h); same contract as
    edgespec.ops.compress_keys: ck[j] = mean(keys[j*stride : j*stride + kernel_size]) for the kernels
    complete within [0, end_len) but not within [0, start_len), in place. `lengths` (int32 [2] on
    the device) replaces (start_len, end_len) on the device side; the host values then only bound
    the launch (graph capture)."""
    _require("compress_keys", compress_keys_rejection(keys, ck, kernel_size, kernel_stride))
    new = _num_kernels(end_len, kernel_size, kernel_stride) - _num_kernels(start_len, kernel_size, kernel_stride)
    if new <= 0:
        return
    lengths = _device_ints([start_len, end_len] if lengths is None else lengths, keys.device)
    _run(_module().sparse_compress_keys, _view(keys), _view(ck), _view(lengths), int(kernel_size),
         int(kernel_stride), int(new), _stream(keys))


def sparse_select_rejection(q: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor, cfg: Any,
                            num_blocks: int) -> str | None:
    """`cfg` has block_size, kernel_size, kernel_stride (an edgespec SparseConfig)."""
    reason = _first(_float_dtype("q", q), _same_dtype("ck", ck, "q", q))
    if reason:
        return reason
    if q.dim() != 3 or ck.dim() != 3 or ck.shape[2] != q.shape[2] or q.shape[1] % ck.shape[1]:
        return f"expected q [T, Hq, D] and ck [C, Hkv, D] with Hq % Hkv == 0, got {_shape(q)} and {_shape(ck)}"
    if q.shape[1] // ck.shape[1] > SPARSE_MAX_GROUP or q.shape[2] > SPARSE_MAX_HEAD_DIM:
        return (f"q {_shape(q)} with {ck.shape[1]} KV heads: the kernels take up to {SPARSE_MAX_GROUP} query heads "
                f"per KV head and head dims up to {SPARSE_MAX_HEAD_DIM}")
    group, dim = q.shape[1] // ck.shape[1], q.shape[2]
    # Within the group and head-dim bounds, the largest shapes (group 64 with head dim 256) still
    # exceed the score kernels' shared memory: the C++ check would raise instead of falling back.
    smem = 4 * (group * dim + SPARSE_SCORE_CHUNK * (dim + 1) + group * SPARSE_SCORE_CHUNK + 2 * group)
    if smem > SPARSE_MAX_SCORE_SMEM:
        return (f"q {_shape(q)} with {ck.shape[1]} KV heads: the score kernels would need {smem} bytes of shared "
                f"memory, above their {SPARSE_MAX_SCORE_SMEM}")
    if not 1 <= num_blocks <= SPARSE_MAX_BLOCKS:
        return f"{num_blocks} blocks of {cfg.block_size} tokens; the kernels select among at most {SPARSE_MAX_BLOCKS}"
    if positions.dim() != 1 or positions.dtype != torch.int64 or positions.shape[0] != q.shape[0]:
        return f"positions must be int64 [{q.shape[0]}] (one per token of q), got {_shape(positions)}"
    reason = _first(_last_dim_contiguous("q", q), _last_dim_contiguous("ck", ck))
    return reason or _one_cuda_device(q=q, ck=ck, positions=positions)


def supports_sparse_select(q: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor, cfg: Any, num_blocks: int) -> bool:
    return sparse_select_rejection(q, ck, positions, cfg, num_blocks) is None


# csrc/kernels/attention.h kAttentionBlockN and kAttentionMaxBlockWords: the attention kernels take
# a block mask over 64-key tiles, at most 64 words (4096 tiles) per row.
ATTENTION_BLOCK_KEYS = 64
ATTENTION_MAX_BLOCK_WORDS = 64


def block_mask_rejection(q: torch.Tensor, k: torch.Tensor, block_mask: torch.Tensor) -> str | None:
    """Why the attention kernels cannot take this block mask (int64 [T, Hkv, W] contiguous, W words
    covering the 64-key tiles of k), or None."""
    t, hkv = q.shape[0], k.shape[1]
    tiles = -(-k.shape[0] // ATTENTION_BLOCK_KEYS)
    if (block_mask.dtype != torch.int64 or block_mask.dim() != 3 or tuple(block_mask.shape[:2]) != (t, hkv)
            or not tiles <= 64 * block_mask.shape[2] <= 64 * ATTENTION_MAX_BLOCK_WORDS):
        return (f"block_mask must be int64 [{t}, {hkv}, W] with {tiles} <= 64 W <= {64 * ATTENTION_MAX_BLOCK_WORDS}, "
                f"got {_shape(block_mask)}")
    if not block_mask.is_contiguous():
        return f"block_mask {_shape(block_mask)} must be contiguous"
    return _one_cuda_device(q=q, block_mask=block_mask)


def _score_plan(tokens: int, heads_kv: int, readable: int, device: torch.device,
                align: int = SPARSE_SCORE_CHUNK) -> tuple[int, int]:
    """(splits, kernels_per_split) of the score kernels: enough blocks for about two per SM;
    kernels_per_split a multiple of `align` (the tensor-core kernels' 64-kernel tiles)."""
    chunks = max(1, -(-readable // align))
    target = 2 * _sm_count(device.index or 0)
    splits = min(chunks, max(1, -(-target // max(1, tokens * heads_kv))), 65535)
    per_split = -(-chunks // splits) * align
    return max(1, -(-readable // per_split)), per_split


def sparse_scores_mma(q: torch.Tensor, ck: torch.Tensor) -> bool:
    """Whether a selection call scores on the tensor-core kernels (csrc/kernels/sparse_scores_mma.cuh:
    16-bit queries, head dim 64 or 128, G dividing 16; prefill chunks, decode steps and trees)."""
    group = q.shape[1] // ck.shape[1]
    return bool(_module().sparse_scores_mma_applies(group, q.shape[2], q.element_size()))


def sparse_scores_sm90_rejection(q: torch.Tensor, ck: torch.Tensor, path: torch.Tensor | None = None) -> str | None:
    """Why the Hopper score kernels cannot take this selection call (None: they can): they need what
    the sm90 attention kernels need and take the calls the tensor-core score kernels take, but no
    tree path (one wgmma per warpgroup cannot give each token its own kernels)."""
    if not sparse_scores_mma(q, ck) or path is not None:
        return ("the Hopper score kernels take 16-bit q with head dim 64 or 128, a GQA group dividing 16 and no "
                f"tree path, got {q.dtype} {_shape(q)} with ck {_shape(ck)}{' and a path' if path is not None else ''}")
    return sm90_attention_rejection(q)


def sparse_invariant_per_split(span: int, heads_kv: int, cfg: Any, device: torch.device) -> int:
    """kernels_per_split of the row-invariant selection: the score kernels' plan for one query over
    a `span`-slot context, one value for a whole generation (as invariant_chunk_tiles is). A multiple
    of the tensor-core kernels' tile, so that decode steps and trees score on them where they apply."""
    readable = _num_kernels(span, cfg.kernel_size, cfg.kernel_stride)
    return _score_plan(1, heads_kv, readable, device, int(_module().SPARSE_MMA_KERNELS))[1]


def sparse_select_blocks(q: torch.Tensor, ck: torch.Tensor, positions: torch.Tensor, cfg: Any, scale: float,
                         dense_len: int, kv_limit: int | torch.Tensor, num_blocks: int,
                         path: torch.Tensor | None = None, per_split: int | None = None,
                         sm90: bool = False) -> torch.Tensor:
    """Block-selection kernels (csrc/kernels/sparse_attention.h): the InfLLM-v2 selection of
    edgespec.ops.select_blocks as a bit-packed mask int64 [T, Hkv, ceil(num_blocks / 64)] (bit b % 64
    of word b // 64 set iff block b is selected). kv_limit: an int, or an int32 [1] device tensor
    (graph capture); path: a tree's own kernels [T, E, Hkv, D] past kv_limit (ops.sparse_attention
    path_kernels) or None; per_split: None (a plan for this call) or the kernels per score split
    (sparse_invariant_per_split: then a query's scores do not depend on T or num_blocks); sm90: score
    on the Hopper kernels (csrc/kernels/sm90/sparse_scores_sm90.h; sparse_scores_sm90_rejection)."""
    _require("sparse_select_blocks", sparse_select_rejection(q, ck, positions, cfg, num_blocks))
    if sm90:
        _require("sparse_select_blocks (sm90)", sparse_scores_sm90_rejection(q, ck, path))
    t, hq, _ = q.shape
    hkv = ck.shape[1]
    readable = min(ck.shape[0], _num_kernels(num_blocks * cfg.block_size, cfg.kernel_size, cfg.kernel_stride))
    if per_split is None:
        align = int(_module().SPARSE_MMA_KERNELS) if sparse_scores_mma(q, ck) else SPARSE_SCORE_CHUNK
        splits, per_split = _score_plan(t, hkv, readable, q.device, align)
    else:
        splits = max(1, -(-readable // per_split))
    if path is not None and (path.dim() != 4 or path.shape[0] != t or path.shape[2:] != ck.shape[1:]
                             or path.dtype != q.dtype or path.stride(-1) != 1):
        raise ValueError(f"sparse_select_blocks: path must be [{t}, E, {hkv}, {ck.shape[2]}] of {q.dtype} with "
                         f"a contiguous head dim, got {path.dtype} {_shape(path)}")
    partial = _new_output((splits, t, hq, 2), torch.float32, q.device)
    scores = _new_output((t, hkv, splits * per_split), torch.float32, q.device)
    mask = _new_output((t, hkv, (num_blocks + 63) // 64), torch.int64, q.device)
    limit = _device_ints(kv_limit if isinstance(kv_limit, torch.Tensor) else [kv_limit], q.device)
    _run(_module().sparse_select_blocks, _view(q), _view(ck), _view(positions.contiguous()), _view(limit),
         _view(partial), _view(scores), _view(mask), int(num_blocks), int(cfg.block_size), int(cfg.kernel_size),
         int(cfg.kernel_stride), int(cfg.init_blocks), int(cfg.window_blocks), int(cfg.topk), int(dense_len),
         int(per_split), float(scale), _stream(q), None if path is None else _view(path), bool(sm90))
    return mask


# --- BlockFFN (chunk-sparse MoE) ------------------------------------------------------------------

# csrc/kernels/moe.h: tensor-core kernels (mma.m16n8k16), so 16-bit storage only; the launch shapes
# cover up to 128 tokens (one speculative tree) and 1024 experts; K runs in 32-element chunks.
MOE_DTYPES = (torch.bfloat16, torch.float16)
MOE_MAX_TOKENS = 128
MOE_MAX_EXPERTS = 1024
MOE_CHUNK = 32
MOE_BLOCK_ROWS = 64  # weight rows per block (csrc/kernels/moe.h kMoeBlockRows)
MOE_MAX_WIDTH = (2**31 - 1) // MOE_MAX_TOKENS  # E * d (csrc/kernels/moe.cpp check_blockffn)


def _aligned_contiguous(name: str, t: torch.Tensor) -> str | None:
    if not t.is_contiguous():
        return f"{name} {_shape(t)} must be contiguous (strides {t.stride()})"
    if t.data_ptr() % 16:
        return f"{name} {_shape(t)} starts at an address that is not 16-byte aligned"
    return None


def _router_rejection(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor) -> str | None:
    """Why the BlockFFN router kernel cannot take this step, or None."""
    if x.dtype not in MOE_DTYPES:
        return f"x has dtype {x.dtype}; the BlockFFN kernels take bfloat16 or float16 (tensor cores)"
    reason = _first(*(_same_dtype(n, t, "x", x) for n, t in (("router_weight", router_weight), ("norm_weight", norm_weight))))
    if reason:
        return reason
    if x.dim() != 2 or not 1 <= x.shape[0] <= MOE_MAX_TOKENS:
        return f"x must be [T, H] with 1 <= T <= {MOE_MAX_TOKENS}, got {_shape(x)}"
    t, h = x.shape
    if h % MOE_CHUNK:
        return f"hidden size {h} is not a multiple of {MOE_CHUNK}"
    e = router_weight.shape[0] if router_weight.dim() == 2 else 0
    if router_weight.shape != (e, h) or not 1 <= e <= MOE_MAX_EXPERTS:
        return f"router_weight must be [E, {h}] with 1 <= E <= {MOE_MAX_EXPERTS}, got {_shape(router_weight)}"
    if norm_weight.shape != (e,):
        return f"norm_weight must be [{e}], got {_shape(norm_weight)}"
    reason = _first(*(_aligned_contiguous(n, v) for n, v in (("router_weight", router_weight), ("norm_weight", norm_weight))))
    if reason:
        return reason
    if _last_dim_contiguous("x", x) or (t > 1 and x.stride(0) % 8) or x.data_ptr() % 16:
        return f"x {_shape(x)} strides {x.stride()} must have contiguous, 16-byte aligned rows"
    return None


def blockffn_rejection(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor,
                       up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why csrc/kernels/moe.h cannot run this BlockFFN step, or None (shapes as edgespec.ops.blockffn)."""
    reason = _router_rejection(x, router_weight, norm_weight) or _first(
        *(_same_dtype(n, t, "x", x) for n, t in (("up", up), ("down", down))))
    if reason:
        return reason
    h, e = x.shape[1], router_weight.shape[0]
    if up.dim() != 2 or up.shape[1] != h or up.shape[0] % e or (up.shape[0] // e) % MOE_CHUNK:
        return f"up must be [E * d, {h}] with E = {e} and d a multiple of {MOE_CHUNK}, got {_shape(up)}"
    if down.shape != (h, up.shape[0]):
        return f"down must be [{h}, {up.shape[0]}], got {_shape(down)}"
    if up.shape[0] > MOE_MAX_WIDTH:  # the C++ check_blockffn limit (int indices into [T, E * d])
        return f"E * d = {up.shape[0]} is above the kernels' limit of {MOE_MAX_WIDTH}"
    reason = _first(*(_aligned_contiguous(n, v) for n, v in (("up", up), ("down", down))))
    if reason:
        return reason
    return _one_cuda_device(x=x, router_weight=router_weight, norm_weight=norm_weight, up=up, down=down)


def supports_blockffn(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor,
                      up: torch.Tensor, down: torch.Tensor) -> bool:
    return blockffn_rejection(x, router_weight, norm_weight, up, down) is None


def blockffn_sync_words(hidden: int, experts: int, expert_size: int) -> int:
    """int32 arrival counters the kernels need (zero on entry; the kernels leave them zero)."""
    return int(_module().blockffn_sync_words(hidden, experts, expert_size))


def blockffn_splits(hidden: int, experts: int, expert_size: int, sms: int) -> tuple[int, int, int]:
    """Split-K factors (router, up, down) for the launch shapes of csrc/kernels/moe.cuh.

    Untuned heuristic (written without a GPU): give each GEMM a few blocks per SM so the weight
    stream has enough loads in flight, assuming about a third of the up tiles are active, with
    the split count capped (partial sums cost T * N * 4 bytes per split). The step's token count
    has no say: a token's sums must not depend on how many tokens share its step (row invariance,
    csrc/kernels/moe.h).
    """
    chunks = hidden // MOE_CHUNK
    cap = 4
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    router = max(1, min(8, chunks, 2 * sms // ceil(experts, MOE_BLOCK_ROWS)))
    up = max(1, min(cap, chunks, round(8 * sms / ceil(experts * expert_size, MOE_BLOCK_ROWS))))
    down = max(1, min(2 * cap, round(4 * sms / ceil(hidden, MOE_BLOCK_ROWS))))
    return router, up, down


def _checked_sync(sync: torch.Tensor | None, words: int, device: torch.device) -> torch.Tensor:
    if sync is None:
        return torch.zeros(words, dtype=torch.int32, device=device)
    if sync.shape != (words,) or sync.dtype != torch.int32 or sync.device != device:
        raise ValueError(f"blockffn: sync must be int32 [{words}] on {device}, got {_shape(sync)} on {sync.device}")
    return sync


def _kernel_counters(counters: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """The counters the kernels add to: `counters` itself, or a contiguous temporary for a strided
    view (the kernels add to counters[0] and counters[1] as adjacent words; the caller adds the
    temporary back)."""
    if counters is None:
        return None
    if counters.shape != (2,) or counters.dtype != torch.int64 or counters.device != device:
        raise ValueError(f"blockffn: counters must be int64 [2] on {device}, got {_shape(counters)}")
    return counters if counters.is_contiguous() else torch.zeros(2, dtype=torch.int64, device=device)


def blockffn(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
             up: torch.Tensor, down: torch.Tensor, counters: torch.Tensor | None = None,
             sync: torch.Tensor | None = None) -> torch.Tensor:
    """BlockFFN step kernels (csrc/kernels/moe.h); same contract as edgespec.ops.blockffn.

    x: [T, H] bf16/fp16; router_weight [E, H]; norm_weight [E]; up [E * d, H]; down [H, E * d];
    counters: optional int64 [2] (+= active pairs, += active experts); sync: int32
    [blockffn_sync_words(H, E, d)] of zeros that the kernels leave zero (a layer keeps one so that
    no memset runs per step), allocated here when None. Returns [T, H] contiguous in x's dtype.
    No host synchronisation: the active set stays on the device.
    """
    _require("blockffn", blockffn_rejection(x, router_weight, norm_weight, up, down))
    t, h = x.shape
    e = router_weight.shape[0]
    d = up.shape[0] // e
    sync = _checked_sync(sync, blockffn_sync_words(h, e, d), x.device)
    kernel_counters = _kernel_counters(counters, x.device)
    splits = blockffn_splits(h, e, d, _sm_count(x.device.index))
    out = _new_output((t, h), x.dtype, x.device)
    # Scratch comes from _new_output too, so the poisoned-output tests also prove it is written before read.
    weights = _new_output((t, e), torch.float32, x.device)
    active = _new_output((e + 1,), torch.int32, x.device)
    hidden = _new_output((t, e * d), x.dtype, x.device)
    partial = _new_output((_module().blockffn_partial_floats(t, h, e, d, *splits),), torch.float32, x.device)
    _run(_module().blockffn, _view(x), _view(router_weight), _view(norm_weight), _view(up), _view(down), _view(out),
         _view(weights), _view(active), _view(hidden), _view(partial), _view(sync),
         None if kernel_counters is None else _view(kernel_counters), *splits, float(eps), _stream(x))
    if kernel_counters is not counters:
        counters.add_(kernel_counters)
    return out


# --- W4A16 GEMM (4-bit weights) -----------------------------------------------------------------

# csrc/kernels/w4a16.h: tensor-core kernel (bf16/fp16), tile layout (K % 16, N % 64), group sizes
# that are multiples of 32 or per-channel, at most 64 rows per launch.
W4A16_DTYPES = (torch.bfloat16, torch.float16)
W4A16_MAX_ROWS = 64
W4A16_GROUP_ALIGN = 32
# Above this many rows the call runs as 64-row launches that each stream the weights again; past
# it the torch path (dequantise once, cuBLAS) is the better trade. Untuned: measure on a GPU.
W4A16_MAX_CHUNKED_ROWS = 256


def _w4a16_weight_rejection(w: Any, dtype: torch.dtype) -> str | None:
    """Why the W4A16 kernel cannot read the W4A16Weight `w` with activations of `dtype`, or None."""
    if dtype not in W4A16_DTYPES:
        return f"x has dtype {dtype}; the W4A16 kernel takes bfloat16 or float16 (tensor cores)"
    if w.layout != "tile":
        return f"the weight is in the {w.layout} layout; QuantLinear.to('cuda') repacks it into the kernel's tile layout"
    for name, t in (("scales", w.scales), ("zeros", w.zeros)):
        if t is not None and t.dtype != dtype:
            return f"{name} has dtype {t.dtype}, x has {dtype}"
    k, n, g = w.in_features, w.out_features, w.group_size
    if k % 16 or n % 64:
        return f"K = {k} must be a multiple of 16 and N = {n} a multiple of 64"
    if g % W4A16_GROUP_ALIGN and g < k:
        return f"group size {g} is neither a multiple of {W4A16_GROUP_ALIGN} nor per-channel (>= K = {k})"
    # The C++ check refuses these too; rejecting here sends such a weight (e.g. scales kept as a
    # strided view by .to()) to the torch path instead of raising KernelError.
    for name, t in (("qweight", w.qweight), ("scales", w.scales), ("zeros", w.zeros)):
        if t is not None and (not t.is_contiguous() or t.data_ptr() % 16):
            return f"{name} {_shape(t)} must be contiguous and 16-byte aligned (the kernel copies 16-byte vectors)"
    return None


def _w4a16_tensors(w: Any) -> dict[str, torch.Tensor]:
    return {"qweight": w.qweight, "scales": w.scales} | ({"zeros": w.zeros} if w.zeros is not None else {})


def w4a16_rejection(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> str | None:
    """Why csrc/kernels/w4a16.h cannot take x [..., K] times the W4A16Weight `w`, or None."""
    reason = _w4a16_weight_rejection(w, x.dtype) or (None if bias is None else _same_dtype("bias", bias, "x", x))
    if reason:
        return reason
    k = w.in_features
    if x.shape[-1] != k:
        return f"x {_shape(x)} does not have the weight's {k} input features"
    rows = x.numel() // k if k else 0
    if rows > W4A16_MAX_CHUNKED_ROWS:
        return f"{rows} rows: above {W4A16_MAX_CHUNKED_ROWS}, dequantise + cuBLAS is the faster path"
    if bias is not None and (bias.dim() != 1 or not bias.is_contiguous()):
        return f"bias {_shape(bias)} must be a contiguous vector"
    return _one_cuda_device(x=x, **_w4a16_tensors(w), **({"bias": bias} if bias is not None else {}))


def supports_w4a16(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None) -> bool:
    return w4a16_rejection(x, w, bias) is None


def w4a16_splits(n: int, k: int, device: torch.device) -> int:
    """Split-K factor of the W4A16 kernel for this shape on `device` (csrc/kernels/w4a16.h). The
    row count has no say: that keeps a row's result independent of the rows it comes with."""
    return int(_module().w4a16_num_splits(n, k, _sm_count(device.index or 0)))


# Split-K arrival counters of the W4A16 and dense GEMMs (w4a16.h, dense_gemm.h), which the kernels
# leave at zero: one zeroed buffer per (device, stream, N / 64), made on first use (no memset per
# call) and shared by every weight of that width, since launches on one stream never overlap.
_split_counters: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def _split_counters_for(device: torch.device, stream: int, n: int) -> torch.Tensor:
    key = (device, stream, n // 64)
    counters = _split_counters.get(key)
    if counters is None:
        counters = _split_counters[key] = torch.zeros(n // 64, dtype=torch.int32, device=device)
    return counters


def _w4a16_gemm(x: torch.Tensor, w: Any, bias: torch.Tensor | None, out: torch.Tensor, splits: int,
                gather: dict[str, Any] | None = None) -> None:
    """One launch: out [M, N] = x [M <= 64, K] @ dequant(w).T (+ bias); `gather` holds the expert
    gather's keyword arguments of the binding (csrc/kernels/w4a16.h), None for a plain GEMM."""
    m, n = out.shape
    partial = _new_output((splits, m, n), torch.float32, x.device) if splits > 1 else None
    extra = {}
    if gather is not None:
        extra = {key: (_view(v) if isinstance(v, torch.Tensor) else v) for key, v in gather.items()}
    _run(_module().w4a16_gemm, _view(x), _view(w.qweight), _view(w.scales),
         None if w.zeros is None else _view(w.zeros), None if bias is None else _view(bias), _view(out),
         None if partial is None else _view(partial),
         None if splits == 1 else _view(_split_counters_for(x.device, _stream(x), n)),
         int(w.group_size), int(splits), _stream(x), **extra)


# --- dense GEMM for few rows (csrc/kernels/dense_gemm.h) ----------------------------------------

# Rows per launch of the dense kernel (one launch reads the weights once, like cuBLAS), and the
# most rows it takes as 64-row launches: trees of up to 128 tokens stay row-invariant at the price
# of a second weight read past 64 rows. More rows (prefill chunks, which plain and speculative
# decoding run alike and which need no invariance) go to cuBLAS.
DENSE_MAX_ROWS = W4A16_MAX_ROWS
DENSE_MAX_CHUNKED_ROWS = INVARIANT_ROWS


def dense_rejection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> str | None:
    """Why csrc/kernels/dense_gemm.h cannot take x [..., K] @ weight [N, K].T (+ bias), or None."""
    if x.dtype not in W4A16_DTYPES:
        return f"x has dtype {x.dtype}; the dense kernel takes bfloat16 or float16 (tensor cores)"
    reason = _first(_same_dtype("weight", weight, "x", x), None if bias is None else _same_dtype("bias", bias, "x", x))
    if reason:
        return reason
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return f"x {_shape(x)} and weight {_shape(weight)} do not form x @ weight.T"
    n, k = weight.shape
    if k % 16 or n % 64:
        return f"K = {k} must be a multiple of 16 and N = {n} a multiple of 64"
    if x.numel() // max(k, 1) > DENSE_MAX_CHUNKED_ROWS:
        return f"{x.numel() // k} rows; above {DENSE_MAX_CHUNKED_ROWS} the dense kernel leaves the call to cuBLAS"
    if weight.stride(-1) != 1 or (n > 1 and weight.stride(0) % 8) or weight.data_ptr() % 16:
        return f"weight {_shape(weight)} must have contiguous 16-byte aligned rows"
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        return f"bias must be contiguous [{n}], got {_shape(bias)}"
    tensors = {"x": x, "weight": weight} | ({"bias": bias} if bias is not None else {})
    return _one_cuda_device(**tensors)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 splits: int | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) on the row-invariant dense kernel: a row's result
    does not depend on how many rows come with it (csrc/kernels/dense_gemm.h). Up to
    DENSE_MAX_CHUNKED_ROWS rows, as launches of DENSE_MAX_ROWS; splits: None (the plan for this GPU,
    which does not depend on the row count) or a forced split-K in [1, K/16]. Returns [..., N]
    contiguous."""
    _require("dense_linear", dense_rejection(x, weight, bias))
    n, k = weight.shape
    lead = x.shape[:-1]
    x2 = _aligned_rows(x.reshape(-1, k))
    rows = x2.shape[0]
    out = _new_output((rows, n), x.dtype, x.device)
    s = splits if splits is not None else w4a16_splits(n, k, x.device)
    stream = _stream(x)
    for start in range(0, rows, DENSE_MAX_ROWS):
        m = min(DENSE_MAX_ROWS, rows - start)
        partial = _new_output((s, m, n), torch.float32, x.device) if s > 1 else None
        _run(_module().dense_gemm, _view(x2[start:start + m]), _view(weight), None if bias is None else _view(bias),
             _view(out[start:start + m]), None if partial is None else _view(partial),
             None if s == 1 else _view(_split_counters_for(x.device, stream, n)), int(s), stream)
    return out.view(*lead, n)


def _aligned_rows(x2: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] itself when its rows are contiguous and 16-byte aligned, else an aligned copy."""
    if x2.stride(-1) != 1 or (x2.shape[0] > 1 and x2.stride(0) % 8) or x2.data_ptr() % 16:
        return x2.clone(memory_format=torch.contiguous_format)  # a fresh, aligned allocation
    return x2


def w4a16_linear(x: torch.Tensor, w: Any, bias: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """W4A16 kernel (csrc/kernels/w4a16.h); same contract as edgespec.ops.w4a16_linear.

    x: [..., K] bf16/fp16; w: an edgespec.ops.W4A16Weight in the tile layout with scales/zeros in
    x's dtype; bias: [N] in x's dtype or None; splits: split-K factor (None: the plan for this GPU;
    any value in [1, K/16] gives the same result up to rounding). Act-order weights gather x's
    columns first. More than 64 rows run as 64-row launches. Returns [..., N] contiguous.
    With splits > 1 an fp32 scratch [splits, rows, N] is allocated per launch.
    """
    _require("w4a16_linear", w4a16_rejection(x, w, bias))
    k, n = w.in_features, w.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if w.perm is not None:
        x2 = x2.index_select(1, w.perm)
    x2 = _aligned_rows(x2)
    rows = x2.shape[0]
    out = _new_output((rows, n), x.dtype, x.device)
    for start in range(0, rows, W4A16_MAX_ROWS):
        m = min(W4A16_MAX_ROWS, rows - start)
        s = splits if splits is not None else w4a16_splits(n, k, x.device)
        _w4a16_gemm(x2[start:start + m], w, bias, out[start:start + m], s)
    return out.view(*lead, n)


# --- BlockFFN with 4-bit experts: the router kernel, then the W4A16 kernel's expert gather ------------

# Fraction of a BlockFFN layer's experts a step is assumed to activate when planning the splits of
# the gathered GEMMs (the launch shapes must not depend on the device-side active count).
BLOCKFFN_PLANNED_ACTIVE = 1 / 3


def blockffn_w4a16_rejection(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor,
                             up: Any, down: Any) -> str | None:
    """Why the 4-bit BlockFFN path cannot run this step, or None. up: W4A16Weight H -> E * d;
    down: W4A16Weight E * d -> H (as edgespec.ops.blockffn takes them)."""
    reason = _router_rejection(x, router_weight, norm_weight)
    if reason:
        return reason
    h, e = x.shape[1], router_weight.shape[0]
    if up.in_features != h or up.out_features % e or down.in_features != up.out_features or down.out_features != h:
        return (f"up ({up.in_features} -> {up.out_features}) and down ({down.in_features} -> {down.out_features}) "
                f"must map H = {h} -> E * d -> H with E = {e}")
    d = up.out_features // e
    if d % 64:
        return f"expert size {d} is not a multiple of 64 (the kernel gathers whole 64-column tiles of up)"
    if h % 64:
        return f"hidden size {h} is not a multiple of 64 (down's output tiles)"
    if down.perm is not None:
        return "down is act-order: its stored rows interleave the experts, which the kernel gathers as blocks"
    if down.group_size < down.in_features and d % down.group_size:
        return f"down's group size {down.group_size} does not divide the expert size {d}"
    reason = _w4a16_weight_rejection(up, x.dtype) or _w4a16_weight_rejection(down, x.dtype)
    if reason:
        return reason
    tensors = {f"up.{k}": v for k, v in _w4a16_tensors(up).items()} | {f"down.{k}": v for k, v in _w4a16_tensors(down).items()}
    if up.perm is not None:
        tensors["up.perm"] = up.perm
    return _one_cuda_device(x=x, router_weight=router_weight, norm_weight=norm_weight, **tensors)


def blockffn_w4a16(x: torch.Tensor, router_weight: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   up: Any, down: Any, counters: torch.Tensor | None = None,
                   sync: torch.Tensor | None = None) -> torch.Tensor:
    """A BlockFFN step with 4-bit experts; same contract as `blockffn` with up/down W4A16Weights in
    the tile layout and sync an int32 [1] zero word.

    Launches: the router kernel (weights, ascending active list and its count, counters), then per
    64 tokens the W4A16 kernel gathering the active column tiles of up (epilogue silu * router
    weight into a compact hidden [T, A * d]) and the active row tiles of down. The active count
    stays on the device: no host synchronisation, fixed launch shapes.
    """
    _require("blockffn", blockffn_w4a16_rejection(x, router_weight, norm_weight, up, down))
    t, h = x.shape
    e = router_weight.shape[0]
    d = up.out_features // e
    sync = _checked_sync(sync, 1, x.device)
    kernel_counters = _kernel_counters(counters, x.device)
    router_splits = blockffn_splits(h, e, d, _sm_count(x.device.index))[0]
    weights = _new_output((t, e), torch.float32, x.device)
    active = _new_output((e + 1,), torch.int32, x.device)
    partial = _new_output((router_splits * t * e,), torch.float32, x.device)
    _run(_module().blockffn_router, _view(x), _view(router_weight), _view(norm_weight), _view(weights),
         _view(active), _view(partial), _view(sync), None if kernel_counters is None else _view(kernel_counters),
         router_splits, float(eps), _stream(x))
    if kernel_counters is not counters:
        counters.add_(kernel_counters)

    x_up = x if up.perm is None else _aligned_rows(x.index_select(1, up.perm))
    hidden = _new_output((t, e * d), x.dtype, x.device)
    out = _new_output((t, h), x.dtype, x.device)
    planned = max(64, round(e * d * BLOCKFFN_PLANNED_ACTIVE / 64) * 64)
    for start in range(0, t, W4A16_MAX_ROWS):
        m = min(W4A16_MAX_ROWS, t - start)
        rows = slice(start, start + m)
        _w4a16_gemm(x_up[rows], up, None, hidden[rows], w4a16_splits(planned, h, x.device),
                    {"active": active, "expert_weights": weights[rows], "expert_size": d, "gather_rows": False})
        _w4a16_gemm(hidden[rows], down, None, out[rows], w4a16_splits(h, planned, x.device),
                    {"active": active, "expert_size": d, "gather_rows": True})
    return out
