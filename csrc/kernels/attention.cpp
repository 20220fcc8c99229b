// Checked entry point of the attention family (host only; the kernels live in attention.cuh).
#include "kernels/attention.h"

#include <cmath>
#include <limits>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "kernels/attention_plan.h"
#ifdef EDGESPEC_HAS_SM90
#include "kernels/sm90/attention_sm90.h"
#endif

namespace edgespec {

namespace {

// The kernels move rows in 16-byte chunks (cp.async, vector stores): the last dim must be
// contiguous, every other stride (of a dim longer than 1) a multiple of 8 elements and the base
// address 16-byte aligned.
Status check_chunked_rows(const TensorView& v, const char* name) {
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(v, name));
  for (int i = 0; i + 1 < v.rank; ++i) {
    if (v.shape[i] > 1 && v.strides[i] % 8 != 0) {
      return Status::invalid(std::string(name) + ": stride of dim " + std::to_string(i) + " is " +
                             std::to_string(v.strides[i]) + " elements (" + describe(v) +
                             "); the kernel reads 16-byte chunks, so it must be a multiple of 8");
    }
  }
  if (v.numel() > 0 && v.data % 16 != 0) {
    return Status::invalid(std::string(name) + ": data address is not 16-byte aligned (" + describe(v) + ")");
  }
  return Status::success();
}

Status check_attention(const AttentionArgs& a) {
  const TensorView& q = a.q;
  const TensorView& k = a.k;
  const TensorView& v = a.v;
  EDGESPEC_RETURN_IF_ERROR(check_view(q, "q", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(q, "q", {DType::kBFloat16, DType::kFloat16}));
  EDGESPEC_RETURN_IF_ERROR(check_view(k, "k", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(k, "k", q.dtype, "the dtype of q"));
  EDGESPEC_RETURN_IF_ERROR(check_view(v, "v", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(v, "v", q.dtype, "the dtype of q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(v, "v", k, "k"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", k, "k"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", v, "v"));

  const std::int64_t tokens = q.size(0), heads_q = q.size(1), head_dim = q.size(2);
  const std::int64_t seqlen = k.size(0), heads_kv = k.size(1);
  if (head_dim != 64 && head_dim != 128) {
    return Status::unsupported("q: head dim " + std::to_string(head_dim) +
                               " has no attention kernel (compiled for 64 and 128)");
  }
  EDGESPEC_RETURN_IF_ERROR(check_size(k, "k", 2, head_dim, "the head dim of q"));
  if (heads_kv < 1 || heads_q % heads_kv != 0) {
    return Status::invalid("q has " + std::to_string(heads_q) + " heads, not a multiple of the " +
                           std::to_string(heads_kv) + " KV heads of k");
  }
  if (seqlen < tokens) {
    return Status::invalid("k: " + std::to_string(seqlen) + " cache slots cannot hold the " +
                           std::to_string(tokens) + " new tokens of q (they are the last T slots)");
  }
  // Packed rows (T * Hq), slot indices and grid.y are ints in the kernels.
  EDGESPEC_RETURN_IF_ERROR(check_fits(tokens * heads_q, std::int64_t{1} << 30, "attention: T * Hq"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(seqlen, std::numeric_limits<int>::max() - kAttentionBlockN,
                                      "attention: cache length S"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(heads_kv, kMaxGridY, "attention: KV heads (grid.y)"));
  EDGESPEC_RETURN_IF_ERROR(check_chunked_rows(q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_chunked_rows(k, "k"));
  EDGESPEC_RETURN_IF_ERROR(check_chunked_rows(v, "v"));
  if (!std::isfinite(a.scale)) return Status::invalid("scale must be finite, got " + std::to_string(a.scale));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", q.dtype, "the dtype of q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.out, "out", q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_chunked_rows(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", k, "k"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", v, "v"));

  if (a.tree_mask != nullptr) {
    const TensorView& m = *a.tree_mask;
    EDGESPEC_RETURN_IF_ERROR(check_view(m, "tree_mask", 2));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(m, "tree_mask", DType::kInt64, "bit-packed, 64 tree tokens per word"));
    EDGESPEC_RETURN_IF_ERROR(check_size(m, "tree_mask", 0, tokens, "one row per new token"));
    EDGESPEC_RETURN_IF_ERROR(check_size(m, "tree_mask", 1, (tokens + 63) / 64, "ceil(T / 64) words per row"));
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(m, "tree_mask"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", m, "tree_mask"));
    if (tokens > kAttentionMaxTreeTokens) {
      return Status::unsupported("tree_mask: " + std::to_string(tokens) + " tree tokens, above the " +
                                 std::to_string(kAttentionMaxTreeTokens) + " the kernel stages in shared memory");
    }
  }

  if (a.block_mask != nullptr) {
    const TensorView& m = *a.block_mask;
    EDGESPEC_RETURN_IF_ERROR(check_view(m, "block_mask", 3));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(m, "block_mask", DType::kInt64, "bit-packed, 64 key blocks per word"));
    EDGESPEC_RETURN_IF_ERROR(check_size(m, "block_mask", 0, tokens, "one row per new token"));
    EDGESPEC_RETURN_IF_ERROR(check_size(m, "block_mask", 1, heads_kv, "one row per KV head"));
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(m, "block_mask"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", m, "block_mask"));
    const std::int64_t tiles = (seqlen + kAttentionBlockN - 1) / kAttentionBlockN;
    if (m.size(2) * 64 < tiles || m.size(2) > kAttentionMaxBlockWords) {
      return Status::invalid("block_mask: " + std::to_string(m.size(2)) + " words per row cannot cover the " +
                             std::to_string(tiles) + " key blocks of k within the limit of " +
                             std::to_string(kAttentionMaxBlockWords) + " words");
    }
  }

  if (a.seqlen != nullptr) {
    const TensorView& n = *a.seqlen;
    EDGESPEC_RETURN_IF_ERROR(check_view(n, "seqlen", 1));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(n, "seqlen", DType::kInt32, "the slot count, read on the device"));
    EDGESPEC_RETURN_IF_ERROR(check_size(n, "seqlen", 0, 1, "one count"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", n, "seqlen"));
  }

  if (a.splits < 1 || a.splits > kAttentionMaxSplits) {
    return Status::invalid("splits must be in [1, " + std::to_string(kAttentionMaxSplits) + "], got " +
                           std::to_string(a.splits));
  }
  const bool invariant = a.chunk_tiles != 0;
  const bool invariant_tree = invariant && a.tree_mask != nullptr;
  if (a.rank_tiles != 0) {
    if (a.rank_tiles < 0) return Status::invalid("rank_tiles must be >= 0, got " + std::to_string(a.rank_tiles));
    if (a.block_mask == nullptr || invariant || a.sm90) {
      return Status::unsupported("attention: the row-invariant block-sparse mode (rank_tiles > 0) needs a block mask "
                                 "and takes neither chunk_tiles nor the sm90 kernels");
    }
  }
  // Both row-invariant tree modes run tail blocks, one token's G rows each.
  if (a.tree_mask != nullptr && (invariant || a.rank_tiles > 0) && heads_q / heads_kv > kAttentionMaxTailGroup) {
    return Status::unsupported("attention: the row-invariant tree mode takes at most " +
                               std::to_string(kAttentionMaxTailGroup) + " query heads per KV head, got " +
                               std::to_string(heads_q / heads_kv));
  }
  if (invariant) {
    if (a.chunk_tiles < 0) return Status::invalid("chunk_tiles must be >= 0, got " + std::to_string(a.chunk_tiles));
    if (a.block_mask != nullptr) {
      return Status::unsupported(
          "attention: the row-invariant mode (chunk_tiles > 0) does not take a block mask (rank_tiles is its "
          "block-sparse twin)");
    }
    const int chunks = attention_invariant_splits(seqlen, a.chunk_tiles);
    if (a.splits != chunks) {
      return Status::invalid("splits = " + std::to_string(a.splits) + " but chunk_tiles = " +
                             std::to_string(a.chunk_tiles) + " cuts the " + std::to_string(seqlen) + " slots into " +
                             std::to_string(chunks) + " chunks (attention_invariant_splits)");
    }
  } else if (a.resume != nullptr) {
    return Status::invalid("resume is scratch of the row-invariant tree mode (chunk_tiles > 0); pass none here");
  }
  if (invariant_tree) {
    if (a.resume == nullptr) return Status::invalid("a row-invariant tree call needs the resume scratch");
    const TensorView& r = *a.resume;
    const char* why = "resume is fp32 [T * Hq, attention_resume_stride(D)]";
    EDGESPEC_RETURN_IF_ERROR(check_view(r, "resume", 2));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(r, "resume", DType::kFloat32, why));
    EDGESPEC_RETURN_IF_ERROR(check_size(r, "resume", 0, tokens * heads_q, why));
    EDGESPEC_RETURN_IF_ERROR(check_size(r, "resume", 1, attention_resume_stride(static_cast<int>(head_dim)), why));
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(r, "resume"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", r, "resume"));
    if (r.data % 16 != 0) return Status::invalid("resume: data address is not 16-byte aligned");
    for (const auto& [view, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}, {&a.out, "out"}}) {
      EDGESPEC_RETURN_IF_ERROR(check_disjoint(r, "resume", *view, name));
    }
  }
  const bool partials = a.partial_out != nullptr || a.partial_lse != nullptr;
  if (a.splits == 1 && !invariant_tree) {
    if (partials) return Status::invalid("partial_out/partial_lse are scratch for splits > 1; pass none with splits 1");
    return Status::success();
  }
  if (a.partial_out == nullptr || a.partial_lse == nullptr) {
    return Status::invalid("splits " + std::to_string(a.splits) + (invariant_tree ? " (a row-invariant tree)" : "") +
                           " needs both partial_out and partial_lse");
  }
  const TensorView& po = *a.partial_out;
  const TensorView& pl = *a.partial_lse;
  const char* po_why = "partial_out is fp32 [splits, T * Hq, D]";
  const char* pl_why = "partial_lse is fp32 [splits, T * Hq]";
  EDGESPEC_RETURN_IF_ERROR(check_view(po, "partial_out", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(po, "partial_out", DType::kFloat32, po_why));
  EDGESPEC_RETURN_IF_ERROR(check_size(po, "partial_out", 0, a.splits, po_why));
  EDGESPEC_RETURN_IF_ERROR(check_size(po, "partial_out", 1, tokens * heads_q, po_why));
  EDGESPEC_RETURN_IF_ERROR(check_size(po, "partial_out", 2, head_dim, po_why));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(po, "partial_out"));
  EDGESPEC_RETURN_IF_ERROR(check_view(pl, "partial_lse", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(pl, "partial_lse", DType::kFloat32, pl_why));
  EDGESPEC_RETURN_IF_ERROR(check_size(pl, "partial_lse", 0, a.splits, pl_why));
  EDGESPEC_RETURN_IF_ERROR(check_size(pl, "partial_lse", 1, tokens * heads_q, pl_why));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(pl, "partial_lse"));
  if (po.numel() > 0 && po.data % 16 != 0) return Status::invalid("partial_out: data address is not 16-byte aligned");
  for (const TensorView* scratch : {&po, &pl}) {
    const char* name = scratch == &po ? "partial_out" : "partial_lse";
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", *scratch, name));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*scratch, name, q, "q"));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*scratch, name, k, "k"));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*scratch, name, v, "v"));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*scratch, name, a.out, "out"));
    if (a.resume != nullptr) EDGESPEC_RETURN_IF_ERROR(check_disjoint(*scratch, name, *a.resume, "resume"));
  }
  return check_disjoint(po, "partial_out", pl, "partial_lse");
}

template <typename T>
AttentionParams<T> make_params(const AttentionArgs& a) {
  AttentionParams<T> p;
  p.q = a.q.ptr<const T>();
  p.q_stride_t = a.q.stride(0);
  p.q_stride_h = a.q.stride(1);
  p.k = a.k.ptr<const T>();
  p.k_stride_s = a.k.stride(0);
  p.k_stride_h = a.k.stride(1);
  p.v = a.v.ptr<const T>();
  p.v_stride_s = a.v.stride(0);
  p.v_stride_h = a.v.stride(1);
  if (a.tree_mask != nullptr) {
    p.tree_mask = a.tree_mask->ptr<const std::uint64_t>();
    p.mask_words = static_cast<int>(a.tree_mask->size(1));
  }
  if (a.block_mask != nullptr) {
    p.block_mask = a.block_mask->ptr<const std::uint64_t>();
    p.block_words = static_cast<int>(a.block_mask->size(2));
  }
  p.out = a.out.ptr<T>();
  p.out_stride_t = a.out.stride(0);
  p.out_stride_h = a.out.stride(1);
  if (a.partial_out != nullptr) {
    p.partial_out = a.partial_out->ptr<float>();
    p.partial_lse = a.partial_lse->ptr<float>();
  }
  p.chunk_tiles = a.chunk_tiles;
  p.rank_tiles = a.rank_tiles;
  if (a.resume != nullptr) p.resume = a.resume->ptr<float>();
  p.tokens = static_cast<int>(a.q.size(0));
  p.seqlen = static_cast<int>(a.k.size(0));
  p.seqlen_dev = a.seqlen != nullptr ? a.seqlen->ptr<const int>() : nullptr;
  p.heads_q = static_cast<int>(a.q.size(1));
  p.heads_kv = static_cast<int>(a.k.size(1));
  p.group = p.heads_q / p.heads_kv;
  p.splits = a.splits;
  p.scale_log2 = a.scale * 1.4426950408889634f;  // log2(e)
  return p;
}

template <typename T>
Status launch_for_head_dim(const AttentionArgs& a, cudaStream_t stream) {
  const AttentionParams<T> p = make_params<T>(a);
  if (a.sm90) {
#ifdef EDGESPEC_HAS_SM90
    switch (a.q.size(2)) {
      case 64: return launch_attention_sm90<T, 64>(p, stream);
      case 128: return launch_attention_sm90<T, 128>(p, stream);
      default: break;  // check_attention allows 64 and 128 only
    }
#else
    return Status::unsupported("attention: this build has no sm90 kernels (EDGESPEC_CUDA_ARCHS lacks 90a-real)");
#endif
  }
  switch (a.q.size(2)) {
    case 64: return launch_attention<T, 64>(p, stream);
    case 128: return launch_attention<T, 128>(p, stream);
    default: return Status::unsupported("attention: no kernel for head dim " + std::to_string(a.q.size(2)));
  }
}

}  // namespace

Status attention(const AttentionArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_attention(args));
  if (args.q.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.q.device));
  switch (args.q.dtype) {
    case DType::kBFloat16: return launch_for_head_dim<__nv_bfloat16>(args, stream);
    case DType::kFloat16: return launch_for_head_dim<__half>(args, stream);
    default: return unsupported_dtype("attention", args.q.dtype);
  }
}

}  // namespace edgespec
