// Block selection of InfLLM-v2 (see sparse_attention.h, `sparse_select`): dtype-independent (it
// reads the fp32 kernel scores), so it is compiled once here rather than per storage dtype.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "kernels/sparse_attention.h"
#include "kernels/sparse_kernels.cuh"

namespace edgespec {

namespace {

using sparse_detail::min64;
using sparse_detail::scored_kernels;

constexpr int kSelectThreads = 256;

// Sort order of candidates: higher score first, then lower block index (the torch path's stable
// descending sort gives the same order).
__device__ __forceinline__ bool before(float key_a, int idx_a, float key_b, int idx_b) {
  return key_a > key_b || (key_a == key_b && idx_a < idx_b);
}

__global__ void __launch_bounds__(kSelectThreads) select_kernel(const SparseSelectParams p, int sort_len) {
  extern __shared__ __align__(16) unsigned char smem[];
  std::uint64_t* bits = reinterpret_cast<std::uint64_t*>(smem);           // [words]
  float* key = reinterpret_cast<float*>(bits + p.words);                  // [sort_len]
  int* idx = reinterpret_cast<int*>(key + sort_len);                      // [sort_len]

  const int t = blockIdx.x;
  const int g = blockIdx.y;
  const int tid = threadIdx.x;
  const std::int64_t pos = p.positions[t];
  // Blocks at or before the query's own; a negative position selects nothing.
  const std::int64_t q_blk64 = pos < 0 ? -1 : pos / p.block_size;
  const int q_blk = static_cast<int>(min64(q_blk64, p.num_blocks - 1));
  const int nb = q_blk + 1;
  for (int w = tid; w < p.words; w += kSelectThreads) bits[w] = 0;
  __syncthreads();

  std::uint64_t* out = p.block_mask + (static_cast<std::int64_t>(t) * p.heads_kv + g) * p.words;
  if (pos + 1 < p.dense_len) {
    for (int b = tid; b < nb; b += kSelectThreads) {
      atomicOr(reinterpret_cast<unsigned long long*>(&bits[b >> 6]), 1ull << (b & 63));
    }
    __syncthreads();
    for (int w = tid; w < p.words; w += kSelectThreads) out[w] = bits[w];
    return;
  }

  const int visible = scored_kernels(pos, *p.kv_limit, p.kernel_size, p.kernel_stride, p.max_kernels, p.path_kernels);
  const int r = p.block_size / p.kernel_stride;
  const float* row = p.scores + (static_cast<std::int64_t>(t) * p.heads_kv + g) * p.score_cols;
  for (int b = tid; b < sort_len; b += kSelectThreads) {
    float score = -INFINITY;
    if (b < nb) {
      const bool fixed = b < p.init_blocks || b > q_blk - p.window_blocks;
      if (fixed) {
        atomicOr(reinterpret_cast<unsigned long long*>(&bits[b >> 6]), 1ull << (b & 63));
      } else {
        const int j0 = max(r * b - 1, 0);
        const int j1 = min(r * b + r, visible);  // exclusive
        for (int j = j0; j < j1; ++j) score = fmaxf(score, row[j]);
      }
    }
    key[b] = score;
    idx[b] = b;
  }
  __syncthreads();

  // Bitonic sort of sort_len (a power of two) entries into `before` order.
  for (int k = 2; k <= sort_len; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = tid; i < sort_len; i += kSelectThreads) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const bool ascending = (i & k) == 0;  // this run ends up in `before` order
          const bool swap = ascending ? before(key[ixj], idx[ixj], key[i], idx[i])
                                      : before(key[i], idx[i], key[ixj], idx[ixj]);
          if (swap) {
            const float kt = key[i];
            key[i] = key[ixj];
            key[ixj] = kt;
            const int it = idx[i];
            idx[i] = idx[ixj];
            idx[ixj] = it;
          }
        }
      }
      __syncthreads();
    }
  }

  const int take = min(p.topk, sort_len);
  for (int i = tid; i < take; i += kSelectThreads) {
    if (key[i] > -INFINITY) {
      const int b = idx[i];
      atomicOr(reinterpret_cast<unsigned long long*>(&bits[b >> 6]), 1ull << (b & 63));
    }
  }
  __syncthreads();
  for (int w = tid; w < p.words; w += kSelectThreads) out[w] = bits[w];
}

}  // namespace

Status launch_sparse_select(const SparseSelectParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads_kv == 0) return Status::success();
  int sort_len = 1;
  while (sort_len < p.num_blocks) sort_len <<= 1;
  const int smem = p.words * 8 + sort_len * 8;
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.tokens, 0x7fffffff, "sparse select: tokens"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.heads_kv, 65535, "sparse select: KV heads"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "sparse select: shared memory"));
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.heads_kv));
  select_kernel<<<grid, kSelectThreads, smem, stream>>>(p, sort_len);
  EDGESPEC_CHECK_LAUNCH("sparse select_kernel");
  return Status::success();
}

}  // namespace edgespec
