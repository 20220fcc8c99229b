// Device helpers shared by the InfLLM-v2 kernels (sparse_attention.cuh: compression and scores;
// sparse_select.cu: selection), so that both count a query's kernels the same way.
#pragma once

#include <cstdint>

namespace edgespec {
namespace sparse_detail {

__device__ __forceinline__ int num_kernels(int length, int kernel_size, int kernel_stride) {
  return length < kernel_size ? 0 : (length - kernel_size) / kernel_stride + 1;
}

__device__ __forceinline__ std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

// The kernels a query at `pos` scores: those complete within its context and within kv_limit, or,
// for a tree token scored with its path's kernels (path_kernels >= 0), all those complete within
// its context (at most path_kernels past the committed ones); never more than ck holds.
__device__ __forceinline__ int scored_kernels(std::int64_t pos, int kv_limit, int kernel_size, int kernel_stride,
                                              int max_kernels, int path_kernels) {
  if (path_kernels < 0) {
    const int limit = static_cast<int>(min64(pos + 1, static_cast<std::int64_t>(kv_limit)));
    return min(num_kernels(limit, kernel_size, kernel_stride), max_kernels);
  }
  const int context = static_cast<int>(min64(pos + 1, static_cast<std::int64_t>(0x7fffffff)));
  const int own_end = num_kernels(kv_limit, kernel_size, kernel_stride) + path_kernels;
  return min(min(num_kernels(context, kernel_size, kernel_stride), own_end), max_kernels);
}

}  // namespace sparse_detail
}  // namespace edgespec
