// Warp-level reductions (register shuffles, no shared memory). Every lane of the warp must call
// them: the full-warp mask 0xffffffff is used.
#pragma once

namespace edgespec {

constexpr int kWarpSize = 32;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

}  // namespace edgespec
