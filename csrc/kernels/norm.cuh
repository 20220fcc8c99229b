// RMSNorm kernel and its launcher; see norm.h for the contract. Included only by the generated
// instance files csrc/instances/norm_<dtype>.cu.
#pragma once

#include <algorithm>
#include <type_traits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "kernels/norm.h"

namespace edgespec {

namespace rms_norm_detail {

constexpr int kMaxThreads = 1024;
// Enough threads per block to keep an SM's warp schedulers busy when rows are short.
constexpr int kTargetThreads = 256;

// kVec elements per thread and step, read with one 16-byte access when kAligned, element by
// element otherwise: the grouping, and so the order of the row sum, depends only on the row length,
// not on where the tensors happen to sit in memory.
template <typename T, int kVec, bool kAligned>
__device__ __forceinline__ Vec<T, kVec> load_group(const T* ptr) {
  if constexpr (kAligned) {
    return load_vec<T, kVec>(ptr);
  } else {
    Vec<T, kVec> v;
#pragma unroll
    for (int j = 0; j < kVec; ++j) v.v[j] = ptr[j];
    return v;
  }
}

template <typename T, int kVec, bool kAligned>
__device__ __forceinline__ void store_group(T* ptr, const Vec<T, kVec>& v) {
  if constexpr (kAligned) {
    store_vec<T, kVec>(ptr, v);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) ptr[j] = v.v[j];
  }
}

template <typename T, int kVec, bool kAligned, bool kResidual>
__global__ void __launch_bounds__(kMaxThreads) rms_norm_kernel(const RmsNormParams<T> p) {
  // One partial sum per warp of the block: at most 1024 / 32 = 32 warps.
  __shared__ float warp_sums[kMaxThreads / kWarpSize];

  const std::int64_t row = static_cast<std::int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  // Rows past the end still take part in __syncthreads below; they just load nothing.
  const bool active = row < p.rows;
  const int vecs = p.hidden / kVec;

  const T* __restrict__ x = p.x + row * p.x_row_stride;
  // The residual stream s is written in pass 1 and read back in pass 2 by the same thread (same
  // element-to-thread mapping), so program order makes its own writes visible. Read it through a
  // plain pointer: a `const __restrict__` one would license the non-coherent (LDG.NC) path,
  // which is not guaranteed to see writes made by the same kernel.
  T* s_out = kResidual ? p.residual_out + row * p.residual_out_row_stride : nullptr;

  float sum_sq = 0.f;
  if (active) {
    const T* __restrict__ res = kResidual ? p.residual + row * p.residual_row_stride : nullptr;
    for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
      Vec<T, kVec> v = load_group<T, kVec, kAligned>(x + i * kVec);
      if constexpr (kResidual) {
        const Vec<T, kVec> r = load_group<T, kVec, kAligned>(res + i * kVec);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v.v[j] = from_float<T>(to_float(v.v[j]) + to_float(r.v[j]));
        store_group<T, kVec, kAligned>(s_out + i * kVec, v);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const float f = to_float(v.v[j]);
        sum_sq += f * f;
      }
    }
  }

  // Row sum: shuffle within each warp, then every thread of the row adds its row's warp sums
  // from shared memory (a broadcast read; at most 32 values).
  const int warps_per_row = blockDim.x / kWarpSize;
  sum_sq = warp_sum(sum_sq);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.y * warps_per_row + threadIdx.x / kWarpSize] = sum_sq;
  __syncthreads();
  if (!active) return;
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += warp_sums[threadIdx.y * warps_per_row + w];
  const float inv_rms = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);

  const T* src = kResidual ? s_out : x;
  T* __restrict__ out = p.out + row * p.out_row_stride;
  for (int i = threadIdx.x; i < vecs; i += blockDim.x) {
    const Vec<T, kVec> v = load_group<T, kVec, kAligned>(src + i * kVec);
    const Vec<T, kVec> w = load_group<T, kVec, kAligned>(p.weight + i * kVec);
    Vec<T, kVec> y;
#pragma unroll
    for (int j = 0; j < kVec; ++j) y.v[j] = from_float<T>(to_float(v.v[j]) * inv_rms * to_float(w.v[j]));
    store_group<T, kVec, kAligned>(out + i * kVec, y);
  }
}

// 16-byte accesses are possible: every base address and row stride allows them (the row length
// is a multiple of the vector width, checked by the caller).
template <typename T>
bool can_use_vector_access(const RmsNormParams<T>& p) {
  constexpr int kVec = kVecWidth<T>;
  constexpr int kBytes = 16;
  bool ok = p.x_row_stride % kVec == 0 && p.out_row_stride % kVec == 0 && is_aligned(p.x, kBytes) &&
            is_aligned(p.weight, kBytes) && is_aligned(p.out, kBytes);
  if (p.residual != nullptr) {
    ok = ok && p.residual_row_stride % kVec == 0 && p.residual_out_row_stride % kVec == 0 &&
         is_aligned(p.residual, kBytes) && is_aligned(p.residual_out, kBytes);
  }
  return ok;
}

}  // namespace rms_norm_detail

template <typename T>
Status launch_rms_norm(const RmsNormParams<T>& p, cudaStream_t stream) {
  using namespace rms_norm_detail;
  if (p.rows == 0) return Status::success();
  // Rows whose length is a multiple of the vector width are summed in groups of that width
  // whether or not the tensors allow 16-byte accesses, so a row's result does not depend on its
  // alignment (a decoded token and the same token in a verified tree get the same bits).
  const bool grouped = p.hidden % kVecWidth<T> == 0;
  const bool aligned = grouped && can_use_vector_access(p);
  const int vec = grouped ? kVecWidth<T> : 1;
  const int vecs = p.hidden / vec;
  const int threads_per_row = std::min(kMaxThreads, (vecs + kWarpSize - 1) / kWarpSize * kWarpSize);
  const int rows_per_block = static_cast<int>(
      std::min<std::int64_t>(std::max(1, kTargetThreads / threads_per_row), p.rows));
  const std::int64_t blocks = (p.rows + rows_per_block - 1) / rows_per_block;
  EDGESPEC_RETURN_IF_ERROR(check_fits(blocks, kMaxGridX, "rms_norm: number of row blocks"));
  const dim3 block(threads_per_row, rows_per_block);
  const dim3 grid(static_cast<unsigned>(blocks));

  auto launch = [&](auto vec_tag, auto aligned_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    constexpr bool kAligned = decltype(aligned_tag)::value;
    return EDGESPEC_BOOL_SWITCH(p.residual != nullptr, kResidual, [&] {
      rms_norm_kernel<T, kVec, kAligned, kResidual><<<grid, block, 0, stream>>>(p);
      EDGESPEC_CHECK_LAUNCH("rms_norm_kernel");
      return Status::success();
    });
  };
  using Wide = std::integral_constant<int, kVecWidth<T>>;
  using One = std::integral_constant<int, 1>;
  if (!grouped) return launch(One{}, std::false_type{});
  return aligned ? launch(Wide{}, std::true_type{}) : launch(Wide{}, std::false_type{});
}

}  // namespace edgespec
