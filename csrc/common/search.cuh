// Device-side search helpers shared by kernel families.
#pragma once

namespace edgespec {

// How many of the ascending values sorted[0..count) are below `bound` (binary search). BlockFFN's
// expert gathers (moe.cuh, w4a16.cuh) use it to find which active experts a split covers.
__device__ __forceinline__ int count_below(const int* sorted, int count, int bound) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (sorted[mid] < bound) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

}  // namespace edgespec
