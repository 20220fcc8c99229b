// Host-side re-checks of the views an entry point receives.
//
// Python validated the same facts; C++ checks them again because a view is only integers and a
// wrong one would make a kernel read or write arbitrary device memory. Each check returns a
// Status whose detail names the argument and says what was expected, e.g.
// "weight: expected dtype bf16 (the dtype of x), got fp32".
#pragma once

#include <cstdint>
#include <initializer_list>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

// Rank, non-null data (unless the view is empty), non-negative sizes, a valid device index.
Status check_view(const TensorView& v, const char* name, int rank);
Status check_dtype(const TensorView& v, const char* name, DType expected, const char* why);
Status check_dtype_in(const TensorView& v, const char* name, std::initializer_list<DType> allowed);
// Every view lives on the device of `first`.
Status check_same_device(const TensorView& first, const char* first_name, const TensorView& other,
                         const char* other_name);
Status check_size(const TensorView& v, const char* name, int dim, std::int64_t expected,
                  const char* what);
Status check_same_shape(const TensorView& v, const char* name, const TensorView& ref,
                        const char* ref_name);
// The last dimension has stride 1 (rows of a kernel are read with contiguous, vector loads) and
// every other stride is non-negative, so no two rows alias when the kernel writes.
Status check_rows_contiguous(const TensorView& v, const char* name);
// For outputs: no two elements share an address (otherwise threads race on them). Sufficient
// test: with dims sorted by stride, each stride exceeds the span of the dims below it.
Status check_no_self_overlap(const TensorView& v, const char* name);
// Fully packed, row-major.
Status check_contiguous(const TensorView& v, const char* name);
// An output does not overlap an input (out-of-place kernels read inputs after writing outputs).
Status check_disjoint(const TensorView& out, const char* out_name, const TensorView& in,
                      const char* in_name);
// Launch dimensions: CUDA grid.x holds up to 2^31 - 1 blocks, grid.y/z up to 65535.
Status check_fits(std::int64_t value, std::int64_t limit, const char* what);

// True when `ptr` is a multiple of `bytes` (a power of two).
inline bool is_aligned(const void* ptr, std::uintptr_t bytes) {
  return (reinterpret_cast<std::uintptr_t>(ptr) & (bytes - 1)) == 0;
}

}  // namespace edgespec
