// Checked entry points of InfLLM-v2 block selection (host only; kernels in sparse_attention.cuh
// and sparse_select.cu).
#include "kernels/sparse_attention.h"

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"
#ifdef EDGESPEC_HAS_SM90
#include "kernels/sm90/sparse_scores_sm90.h"
#endif

namespace edgespec {

namespace {

constexpr int kMaxInt = std::numeric_limits<int>::max();
// Dynamic shared memory the score kernels may ask for (sm_86 allows 99 KB per block).
constexpr int kMaxScoreSmem = 96 * 1024;
// Blocks a compress launch strides over its kernels with (a decode step needs 1 or 2).
constexpr int kMaxCompressGrid = 4096;

std::int64_t host_num_kernels(std::int64_t length, int kernel_size, int kernel_stride) {
  return length < kernel_size ? 0 : (length - kernel_size) / kernel_stride + 1;
}

Status check_geometry(int kernel_size, int kernel_stride) {
  if (kernel_stride < 1 || kernel_size < kernel_stride) {
    return Status::invalid("kernel_size (" + std::to_string(kernel_size) + ") and kernel_stride (" +
                           std::to_string(kernel_stride) + ") must satisfy kernel_size >= kernel_stride >= 1");
  }
  return Status::success();
}

Status check_keys(const TensorView& k, const char* k_name, const TensorView& ck) {
  EDGESPEC_RETURN_IF_ERROR(check_view(k, k_name, 3));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(k, k_name));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(k, k_name, {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  EDGESPEC_RETURN_IF_ERROR(check_view(ck, "ck", 3));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(ck, "ck"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(ck, "ck", k.dtype, "the dtype of the keys"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(k, k_name, ck, "ck"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(ck.size(0), kMaxInt, "compressed keys"));
  return Status::success();
}

Status check_device_scalar(const TensorView& v, const char* name, std::int64_t size, const TensorView& ref) {
  EDGESPEC_RETURN_IF_ERROR(check_view(v, name, 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(v, name, DType::kInt32, "device-side lengths are int32"));
  EDGESPEC_RETURN_IF_ERROR(check_size(v, name, 0, size, "its fixed length"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(v, name));
  return check_same_device(ref, "the keys", v, name);
}

Status check_compress(const SparseCompressArgs& a) {
  EDGESPEC_RETURN_IF_ERROR(check_keys(a.k, "k", a.ck));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.ck, "ck", 1, a.k.size(1), "the KV heads of k"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.ck, "ck", 2, a.k.size(2), "the head dim of k"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(a.k.size(0), kMaxInt, "sparse compress: cache slots"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(a.k.size(1), 65535, "sparse compress: KV heads"));
  EDGESPEC_RETURN_IF_ERROR(check_geometry(a.kernel_size, a.kernel_stride));
  if (a.max_new_kernels < 0) return Status::invalid("max_new_kernels must be >= 0");
  EDGESPEC_RETURN_IF_ERROR(check_device_scalar(a.range, "range", 2, a.k));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.ck, "ck"));
  return check_disjoint(a.ck, "ck", a.k, "k");
}

Status check_select(const SparseSelectArgs& a, int* splits_out) {
  const TensorView& q = a.q;
  EDGESPEC_RETURN_IF_ERROR(check_view(q, "q", 3));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(q, "q"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(q, "q", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  EDGESPEC_RETURN_IF_ERROR(check_keys(a.ck, "ck", a.ck));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.ck, "ck", q.dtype, "the dtype of q"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", a.ck, "ck"));
  const std::int64_t tokens = q.size(0), heads_q = q.size(1), dim = q.size(2), heads_kv = a.ck.size(1);
  EDGESPEC_RETURN_IF_ERROR(check_size(a.ck, "ck", 2, dim, "the head dim of q"));
  if (heads_kv < 1 || heads_q % heads_kv != 0) {
    return Status::invalid("q has " + std::to_string(heads_q) + " heads, not a multiple of the " +
                           std::to_string(heads_kv) + " KV heads of ck");
  }
  if (heads_q / heads_kv > kSparseMaxGroup || dim < 1 || dim > kSparseMaxHeadDim) {
    return Status::unsupported("sparse selection is compiled for groups up to " + std::to_string(kSparseMaxGroup) +
                               " query heads per KV head and head dims 1.." + std::to_string(kSparseMaxHeadDim));
  }
  EDGESPEC_RETURN_IF_ERROR(check_fits(tokens, kMaxInt, "sparse select: tokens"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(heads_kv, 65535, "sparse select: KV heads"));
  EDGESPEC_RETURN_IF_ERROR(check_geometry(a.kernel_size, a.kernel_stride));
  if (a.block_size < 1 || a.block_size % a.kernel_stride != 0) {
    return Status::invalid("block_size (" + std::to_string(a.block_size) + ") must be a positive multiple of kernel_stride (" +
                           std::to_string(a.kernel_stride) + ")");
  }
  if (a.num_blocks < 1 || a.num_blocks > kSparseMaxBlocks) {
    return Status::unsupported("num_blocks " + std::to_string(a.num_blocks) + " outside [1, " +
                               std::to_string(kSparseMaxBlocks) + "]");
  }
  if (a.init_blocks < 0 || a.window_blocks < 1 || a.topk < 0 || a.dense_len < 0) {
    return Status::invalid("need init_blocks >= 0, window_blocks >= 1, topk >= 0 and dense_len >= 0");
  }
  if (a.kernels_per_split < kSparseScoreChunk || a.kernels_per_split % kSparseScoreChunk != 0) {
    return Status::invalid("kernels_per_split must be a positive multiple of " + std::to_string(kSparseScoreChunk));
  }
  const std::int64_t readable = std::min<std::int64_t>(
      a.ck.size(0), host_num_kernels(std::int64_t{a.num_blocks} * a.block_size, a.kernel_size, a.kernel_stride));
  const std::int64_t splits = std::max<std::int64_t>(1, (readable + a.kernels_per_split - 1) / a.kernels_per_split);
  EDGESPEC_RETURN_IF_ERROR(check_fits(splits, 65535, "sparse select: score splits"));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.positions, "positions", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.positions, "positions", DType::kInt64, "positions are int64"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.positions, "positions", 0, tokens, "one per token of q"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.positions, "positions"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", a.positions, "positions"));
  EDGESPEC_RETURN_IF_ERROR(check_device_scalar(a.kv_limit, "kv_limit", 1, q));

  const TensorView* outs[] = {&a.partial, &a.scores, &a.block_mask};
  const char* out_names[] = {"partial", "scores", "block_mask"};
  EDGESPEC_RETURN_IF_ERROR(check_view(a.partial, "partial", 4));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.partial, "partial", DType::kFloat32, "fp32 scratch"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.partial, "partial", 0, splits, "the number of score splits"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.partial, "partial", 1, tokens, "the tokens of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.partial, "partial", 2, heads_q, "the heads of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.partial, "partial", 3, 2, "a max and a sum"));
  if (a.partial.data % 8 != 0) {
    return Status::invalid("partial: must start 8-byte aligned (the kernels read its (max, sum) pairs as float2)");
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.scores, "scores", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.scores, "scores", DType::kFloat32, "fp32 scratch"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.scores, "scores", 0, tokens, "the tokens of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.scores, "scores", 1, heads_kv, "the KV heads"));
  if (a.scores.size(2) < splits * a.kernels_per_split) {
    return Status::invalid("scores: needs at least " + std::to_string(splits * a.kernels_per_split) +
                           " columns (splits x kernels_per_split), has " + std::to_string(a.scores.size(2)));
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.block_mask, "block_mask", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.block_mask, "block_mask", DType::kInt64, "64-bit words"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.block_mask, "block_mask", 0, tokens, "the tokens of q"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.block_mask, "block_mask", 1, heads_kv, "the KV heads"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.block_mask, "block_mask", 2, (a.num_blocks + 63) / 64,
                                      "one word per 64 blocks"));
  for (int i = 0; i < 3; ++i) {
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(*outs[i], out_names[i]));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", *outs[i], out_names[i]));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[i], out_names[i], q, "q"));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[i], out_names[i], a.ck, "ck"));
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[i], out_names[i], a.positions, "positions"));
    for (int j = 0; j < i; ++j) EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[i], out_names[i], *outs[j], out_names[j]));
  }
  if (a.path != nullptr) {
    const TensorView& path = *a.path;
    EDGESPEC_RETURN_IF_ERROR(check_view(path, "path", 4));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(path, "path", q.dtype, "the dtype of q"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(q, "q", path, "path"));
    EDGESPEC_RETURN_IF_ERROR(check_size(path, "path", 0, tokens, "the tokens of q"));
    EDGESPEC_RETURN_IF_ERROR(check_size(path, "path", 2, heads_kv, "the KV heads"));
    EDGESPEC_RETURN_IF_ERROR(check_size(path, "path", 3, dim, "the head dim of q"));
    if (path.stride(3) != 1) return Status::invalid("path: the head dim must be contiguous");
    EDGESPEC_RETURN_IF_ERROR(check_fits(path.size(1), kMaxInt, "path kernels"));
    for (int i = 0; i < 3; ++i) EDGESPEC_RETURN_IF_ERROR(check_disjoint(*outs[i], out_names[i], path, "path"));
  }
  const int smem = static_cast<int>(sizeof(float)) *
                   static_cast<int>((heads_q / heads_kv) * dim + kSparseScoreChunk * (dim + 1) +
                                    (heads_q / heads_kv) * kSparseScoreChunk + 2 * (heads_q / heads_kv));
  if (smem > kMaxScoreSmem) {
    return Status::unsupported("sparse scores would need " + std::to_string(smem) + " bytes of shared memory");
  }
  if (a.sm90) {
    const bool aligned = q.data % 16 == 0 && a.ck.data % 16 == 0 && q.stride(0) % 8 == 0 && q.stride(1) % 8 == 0 &&
                         a.ck.stride(0) % 8 == 0 && a.ck.stride(1) % 8 == 0;
    const bool applies = sparse_scores_mma_applies(static_cast<int>(heads_q / heads_kv), static_cast<int>(dim),
                                                   dtype_size(q.dtype));
    if (!applies || a.path != nullptr || a.kernels_per_split % kSparseMmaKernels != 0 || !aligned) {
      return Status::unsupported("sparse scores (sm90) take what the tensor-core score kernels take without a tree "
                                 "path: 16-bit q and ck with 16-byte aligned rows, head dim 64 or 128, a GQA group "
                                 "dividing 16, kernels_per_split a multiple of " + std::to_string(kSparseMmaKernels));
    }
  }
  *splits_out = static_cast<int>(splits);
  return Status::success();
}

}  // namespace

Status sparse_compress_keys(const SparseCompressArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_compress(args));
  if (args.max_new_kernels == 0 || args.ck.size(0) == 0 || args.k.size(1) == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.k.device));
  return EDGESPEC_FLOAT_SWITCH(args.k.dtype, "sparse_compress_keys", T, [&] {
    SparseCompressParams<T> p;
    p.k = args.k.ptr<const T>();
    p.k_stride_s = args.k.stride(0);
    p.k_stride_h = args.k.stride(1);
    p.ck = args.ck.ptr<T>();
    p.ck_stride_c = args.ck.stride(0);
    p.ck_stride_h = args.ck.stride(1);
    p.range = args.range.ptr<const std::int32_t>();
    p.seqlen = static_cast<int>(args.k.size(0));
    p.max_kernels = static_cast<int>(args.ck.size(0));
    p.heads_kv = static_cast<int>(args.k.size(1));
    p.head_dim = static_cast<int>(args.k.size(2));
    p.kernel_size = args.kernel_size;
    p.kernel_stride = args.kernel_stride;
    p.grid_kernels = std::min(args.max_new_kernels, kMaxCompressGrid);
    return launch_sparse_compress_keys<T>(p, stream);
  });
}

Status sparse_select_blocks(const SparseSelectArgs& args, cudaStream_t stream) {
  int splits = 1;
  EDGESPEC_RETURN_IF_ERROR(check_select(args, &splits));
  if (args.q.size(0) == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.q.device));
  const int heads_q = static_cast<int>(args.q.size(1));
  const int heads_kv = static_cast<int>(args.ck.size(1));
  EDGESPEC_RETURN_IF_ERROR(EDGESPEC_FLOAT_SWITCH(args.q.dtype, "sparse_select_blocks", T, [&] {
    SparseScoreParams<T> p;
    p.q = args.q.ptr<const T>();
    p.q_stride_t = args.q.stride(0);
    p.q_stride_h = args.q.stride(1);
    p.ck = args.ck.ptr<const T>();
    p.ck_stride_c = args.ck.stride(0);
    p.ck_stride_h = args.ck.stride(1);
    p.positions = args.positions.ptr<const std::int64_t>();
    p.kv_limit = args.kv_limit.ptr<const std::int32_t>();
    p.partial = args.partial.ptr<float>();
    p.scores = args.scores.ptr<float>();
    p.score_cols = args.scores.size(2);
    p.tokens = static_cast<int>(args.q.size(0));
    p.heads_q = heads_q;
    p.heads_kv = heads_kv;
    p.group = heads_q / heads_kv;
    p.head_dim = static_cast<int>(args.q.size(2));
    p.max_kernels = static_cast<int>(args.ck.size(0));
    p.kernel_size = args.kernel_size;
    p.kernel_stride = args.kernel_stride;
    p.splits = splits;
    p.kernels_per_split = args.kernels_per_split;
    p.scale = args.scale;
    if (args.path != nullptr) {
      p.path = args.path->ptr<const T>();
      p.path_stride_t = args.path->stride(0);
      p.path_stride_e = args.path->stride(1);
      p.path_stride_h = args.path->stride(2);
      p.path_kernels = static_cast<int>(args.path->size(1));
    }
    if (args.sm90) {
#ifdef EDGESPEC_HAS_SM90
      if constexpr (!std::is_same_v<T, float>) {  // check_select allows 16-bit, head dims 64 and 128 only
        return p.head_dim == 64 ? launch_sparse_scores_sm90<T, 64>(p, stream)
                                : launch_sparse_scores_sm90<T, 128>(p, stream);
      }
#else
      return Status::unsupported("sparse scores: this build has no sm90 kernels (EDGESPEC_CUDA_ARCHS lacks 90a-real)");
#endif
    }
    return launch_sparse_scores<T>(p, stream);
  }));
  SparseSelectParams s;
  s.scores = args.scores.ptr<const float>();
  s.score_cols = args.scores.size(2);
  s.positions = args.positions.ptr<const std::int64_t>();
  s.kv_limit = args.kv_limit.ptr<const std::int32_t>();
  s.block_mask = args.block_mask.ptr<std::uint64_t>();
  s.words = static_cast<int>(args.block_mask.size(2));
  s.tokens = static_cast<int>(args.q.size(0));
  s.heads_kv = heads_kv;
  s.num_blocks = args.num_blocks;
  s.block_size = args.block_size;
  s.kernel_size = args.kernel_size;
  s.kernel_stride = args.kernel_stride;
  s.max_kernels = static_cast<int>(args.ck.size(0));
  s.init_blocks = args.init_blocks;
  s.window_blocks = args.window_blocks;
  s.topk = args.topk;
  s.dense_len = args.dense_len;
  s.path_kernels = args.path != nullptr ? static_cast<int>(args.path->size(1)) : -1;
  return launch_sparse_select(s, stream);
}

}  // namespace edgespec
