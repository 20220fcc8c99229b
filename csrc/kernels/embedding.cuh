// Embedding kernel and its launcher; see embedding.h for the contract. Included only by the
// generated instance files csrc/instances/embedding_<dtype>.cu.
#pragma once

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/vec.cuh"
#include "kernels/embedding.h"

namespace edgespec {

namespace embedding_detail {

constexpr int kThreads = 256;

template <typename T, typename IdT, int kVec>
__global__ void __launch_bounds__(kThreads) embedding_kernel(const EmbeddingParams<T, IdT> p) {
  const int i = (blockIdx.y * kThreads + threadIdx.x) * kVec;
  if (i >= p.hidden) return;
  const std::int64_t t = blockIdx.x;
  const std::int64_t id = static_cast<std::int64_t>(p.ids[t * p.ids_stride]);
  Vec<T, kVec> y;
  if (id >= 0 && id < p.vocab) {
    const Vec<T, kVec> v = load_vec<T, kVec>(p.table + id * p.table_row_stride + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = from_float<T>(to_float(v.v[j]) * p.scale);
  } else {
    const T nan = from_float<T>(__int_as_float(0x7fc00000));
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = nan;
  }
  store_vec<T, kVec>(p.out + t * p.out_row_stride + i, y);
}

}  // namespace embedding_detail

template <typename T, typename IdT>
Status launch_embedding(const EmbeddingParams<T, IdT>& p, cudaStream_t stream) {
  using namespace embedding_detail;
  if (p.tokens == 0) return Status::success();
  constexpr int kWide = kVecWidth<T>;
  const bool vectorized = p.hidden % kWide == 0 && p.table_row_stride % kWide == 0 &&
                          p.out_row_stride % kWide == 0 && is_aligned(p.table, 16) &&
                          is_aligned(p.out, 16);
  dim3 grid;
  EDGESPEC_RETURN_IF_ERROR(row_chunk_grid(p.tokens, p.hidden / (vectorized ? kWide : 1), kThreads, "embedding", &grid));

  return EDGESPEC_BOOL_SWITCH(vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? kWide : 1;
    embedding_kernel<T, IdT, kVec><<<grid, kThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("embedding_kernel");
    return Status::success();
  });
}

}  // namespace edgespec
