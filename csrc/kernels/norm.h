// RMSNorm, optionally fused with the residual add that precedes it.
//
// Computes, per row r of x [R, H]:
//   s[r]   = x[r] + residual[r]                  (only with a residual; rounded to T and stored)
//   out[r] = s[r] * rsqrt(mean(s[r]^2) + eps) * weight
// where s = x without a residual. Sums, the scale and the products are fp32; each output is
// rounded once to T. The normalised row is computed from the *rounded* s, so out and the stored
// residual stream agree exactly with the unfused torch path `s = x + r; rms_norm(s)`.
//
// Preconditions (checked by rms_norm() below): x, residual, out, residual_out are [R, H] of one
// dtype T in {fp32, fp16, bf16} with stride 1 along H and any non-negative row stride; weight is
// [H], contiguous, dtype T; outputs do not overlap inputs; H >= 1.
//
// Launch shape: a block of (threads_per_row, rows_per_block) threads; threads_per_row is H/kVec
// rounded up to a warp multiple (capped at 1024) and several rows share a block when rows are
// short, so small hidden sizes (576, 111) still fill 256-thread blocks. Two passes over the row:
// sum of squares, then scale; the second pass re-reads the row from L1/L2 (a row is at most a
// few tens of KB), which costs far less than the HBM traffic of the first.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T>
struct RmsNormParams {
  const T* x = nullptr;
  std::int64_t x_row_stride = 0;
  const T* residual = nullptr;  // nullptr: no fused add
  std::int64_t residual_row_stride = 0;
  const T* weight = nullptr;
  T* out = nullptr;
  std::int64_t out_row_stride = 0;
  T* residual_out = nullptr;  // required iff residual != nullptr
  std::int64_t residual_out_row_stride = 0;
  std::int64_t rows = 0;
  int hidden = 0;
  float eps = 0.f;
};

// Instantiated per dtype in csrc/instances/norm_<dtype>.cu.
template <typename T>
Status launch_rms_norm(const RmsNormParams<T>& p, cudaStream_t stream);

struct RmsNormArgs {
  TensorView x;                             // [R, H]
  TensorView weight;                        // [H]
  const TensorView* residual = nullptr;     // [R, H] or nullptr
  TensorView out;                           // [R, H]
  const TensorView* residual_out = nullptr; // [R, H], given iff residual is
  float eps = 1e-6f;
};

// Checks the views, selects their device and launches on `stream`.
Status rms_norm(const RmsNormArgs& args, cudaStream_t stream);

}  // namespace edgespec
