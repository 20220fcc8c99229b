// SiLU-and-mul kernel and its launcher; see activation.h for the contract. Included only by the
// generated instance files csrc/instances/activation_<dtype>.cu.
#pragma once

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/vec.cuh"
#include "kernels/activation.h"

namespace edgespec {

namespace silu_detail {

constexpr int kThreads = 256;

template <typename T, int kVec>
__global__ void __launch_bounds__(kThreads) silu_and_mul_kernel(const SiluAndMulParams<T> p) {
  const int i = (blockIdx.y * kThreads + threadIdx.x) * kVec;
  if (i >= p.inter) return;
  const std::int64_t row = blockIdx.x;
  const T* __restrict__ gate = p.x + row * p.x_row_stride;
  const Vec<T, kVec> g = load_vec<T, kVec>(gate + i);
  const Vec<T, kVec> u = load_vec<T, kVec>(gate + p.inter + i);
  Vec<T, kVec> y;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    const float gf = to_float(g.v[j]);
    y.v[j] = from_float<T>(gf / (1.f + expf(-gf)) * to_float(u.v[j]));
  }
  store_vec<T, kVec>(p.out + row * p.out_row_stride + i, y);
}

}  // namespace silu_detail

template <typename T>
Status launch_silu_and_mul(const SiluAndMulParams<T>& p, cudaStream_t stream) {
  using namespace silu_detail;
  if (p.rows == 0) return Status::success();
  constexpr int kWide = kVecWidth<T>;
  // The up half starts I elements after the gate half, so I itself must keep 16-byte alignment.
  const bool vectorized = p.inter % kWide == 0 && p.x_row_stride % kWide == 0 &&
                          p.out_row_stride % kWide == 0 && is_aligned(p.x, 16) && is_aligned(p.out, 16);
  dim3 grid;
  EDGESPEC_RETURN_IF_ERROR(row_chunk_grid(p.rows, p.inter / (vectorized ? kWide : 1), kThreads, "silu_and_mul", &grid));

  return EDGESPEC_BOOL_SWITCH(vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? kWide : 1;
    silu_and_mul_kernel<T, kVec><<<grid, kThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("silu_and_mul_kernel");
    return Status::success();
  });
}

}  // namespace edgespec
