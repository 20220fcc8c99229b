// Argmax kernel and its launcher; see sampling.h for the contract. Included only by the
// generated instance files csrc/instances/sampling_<dtype>.cu.
#pragma once

#include <climits>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "kernels/sampling.h"

namespace edgespec {

namespace argmax_detail {

constexpr int kThreads = 1024;

// True when (av, ai) should be selected over (bv, bi): NaN beats numbers, larger beats smaller,
// and among equals (NaN included) the lower index wins. A strict total order on distinct
// indices, so the reduction result does not depend on the order in which pairs meet.
__device__ __forceinline__ bool beats(float av, int ai, float bv, int bi) {
  const bool a_nan = isnan(av), b_nan = isnan(bv);
  if (a_nan || b_nan) return a_nan && (!b_nan || ai < bi);
  return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ void warp_argmax(float& v, int& i) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const float ov = __shfl_xor_sync(0xffffffffu, v, offset);
    const int oi = __shfl_xor_sync(0xffffffffu, i, offset);
    if (beats(ov, oi, v, i)) {
      v = ov;
      i = oi;
    }
  }
}

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) argmax_kernel(const ArgmaxParams<T> p) {
  __shared__ float warp_val[kThreads / kWarpSize];
  __shared__ int warp_idx[kThreads / kWarpSize];

  const std::int64_t row = blockIdx.x;
  const T* __restrict__ logits = p.logits + row * p.row_stride;
  // INT_MAX loses every tie, so even a row of -inf ends at index 0.
  float best = -INFINITY;
  int best_i = INT_MAX;
  const int vecs = p.vocab / kVec;
#pragma unroll 4
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    const Vec<T, kVec> x = load_vec<T, kVec>(logits + v * kVec);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float f = to_float(x.v[j]);
      const int idx = v * kVec + j;
      if (beats(f, idx, best, best_i)) {
        best = f;
        best_i = idx;
      }
    }
  }

  warp_argmax(best, best_i);
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) {
    warp_val[warp] = best;
    warp_idx[warp] = best_i;
  }
  __syncthreads();
  if (warp != 0) return;
  best = warp_val[lane];  // kThreads / kWarpSize == kWarpSize: one entry per lane
  best_i = warp_idx[lane];
  warp_argmax(best, best_i);
  if (lane == 0) p.out[row * p.out_stride] = best_i;
}

}  // namespace argmax_detail

template <typename T>
Status launch_argmax(const ArgmaxParams<T>& p, cudaStream_t stream) {
  using namespace argmax_detail;
  static_assert(kThreads / kWarpSize == kWarpSize, "the final reduction gives one warp sum per lane");
  if (p.rows == 0) return Status::success();
  constexpr int kWide = kVecWidth<T>;
  const bool vectorized = p.vocab % kWide == 0 && p.row_stride % kWide == 0 && is_aligned(p.logits, 16);
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.rows, kMaxGridX, "argmax: number of rows"));
  return EDGESPEC_BOOL_SWITCH(vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? kWide : 1;
    argmax_kernel<T, kVec><<<static_cast<unsigned>(p.rows), kThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("argmax_kernel");
    return Status::success();
  });
}

}  // namespace edgespec
