// S = Q.K^T of 64 query rows x 64 keys for one warpgroup on wgmma (sm_90a): the product that the
// Hopper attention kernel (attention.cu) and the Hopper InfLLM-v2 score kernel (sparse_scores.cu)
// share. Q and K are 64-row tiles of kHeadDim 16-bit elements in 128-byte-swizzled shared memory
// (gmma_desc.h), both K-major; s comes back in wgmma's accumulator layout (wgmma.cuh), which is
// mma.m16n8k16's C layout repeated over the 8 column blocks.
#pragma once

#include <cstdint>

#include "kernels/sm90/gmma_desc.h"
#include "kernels/sm90/wgmma.cuh"

namespace edgespec {

// q, k: shared-window addresses of the tiles (1024-byte aligned). All 128 threads of the
// warpgroup call it; the products are complete when it returns.
template <typename T, int kHeadDim>
__device__ __forceinline__ void qk_product_64x64(float (&s)[32], std::uint32_t q, std::uint32_t k) {
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Dims 16kk..16kk+15: column block kk / 4 (64 rows x 128 bytes), 32 bytes per k16 step in it.
    const std::uint32_t slice = static_cast<std::uint32_t>((kk / 4) * 64 * 128 + (kk % 4) * 32);
    wgmma_ss<T, 64>(s, gmma_desc_sw128(q + slice, 16, 1024), gmma_desc_sw128(k + slice, 16, 1024), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 32; ++i) wgmma_fence_operand(s[i]);
}

}  // namespace edgespec
