// Rotary position embedding (rotate-half / GPT-NeoX form) applied to query and key heads.
//
// For each token t, head h and d < R/2 (R = rotary dim = 2 * cos.shape[1]), with p = positions[t]:
//   out[t, h, d]       = x[t, h, d] * cos[p, d] - x[t, h, d + R/2] * sin[p, d]
//   out[t, h, d + R/2] = x[t, h, d + R/2] * cos[p, d] + x[t, h, d] * sin[p, d]
//   out[t, h, d']      = x[t, h, d']            for R <= d' < D (partial rotary passes through)
// in fp32, rounded once to T. The tables already carry any YaRN/LongRoPE attention factor, so
// every scaling scheme is the same op. Out-of-place: q and k are read, q_out and k_out written.
//
// Out-of-range positions (p < 0 or p >= P) never index the tables: the rotated dims of that
// token's heads are written as NaN (loud downstream, never silently wrong) and the pass-through
// dims are copied. Python validates positions where it can afford the host sync.
//
// Preconditions (checked by apply_rope() below): q [T, Hq, D], k [T, Hk, D] of one dtype T in
// {fp32, fp16, bf16}, stride 1 along D, any non-negative token/head strides (views into a fused
// QKV projection are fine); q_out, k_out the same shapes and dtype with stride 1 along D;
// positions [T] int32/int64 (any stride); cos, sin fp32 [P, R/2] with stride 1 along R/2, R <= D.
//
// Launch shape: grid (T, ceil(items / 128)), 128 threads; one work item is kVec consecutive
// rotary pairs (or kVec pass-through elements) of one head, items = (Hq + Hk) * items_per_head.
// Each item loads its cos/sin slice itself: the table row of a token is at most 1 KB and is
// served from L1 after the first head, so sharing it through shared memory would buy nothing.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T, typename PosT>
struct RopeParams {
  const T* q = nullptr;
  std::int64_t q_token_stride = 0, q_head_stride = 0;
  const T* k = nullptr;
  std::int64_t k_token_stride = 0, k_head_stride = 0;
  const PosT* positions = nullptr;
  std::int64_t positions_stride = 0;
  const float* cos = nullptr;
  std::int64_t cos_row_stride = 0;
  const float* sin = nullptr;
  std::int64_t sin_row_stride = 0;
  std::int64_t table_rows = 0;  // P
  T* q_out = nullptr;
  std::int64_t q_out_token_stride = 0, q_out_head_stride = 0;
  T* k_out = nullptr;
  std::int64_t k_out_token_stride = 0, k_out_head_stride = 0;
  std::int64_t tokens = 0;
  int heads_q = 0, heads_k = 0, head_dim = 0;
  int rotary_half = 0;  // R / 2
};

// Instantiated per dtype (both position types) in csrc/instances/rope_<dtype>.cu.
template <typename T, typename PosT>
Status launch_rope(const RopeParams<T, PosT>& p, cudaStream_t stream);

struct RopeArgs {
  TensorView q;          // [T, Hq, D]
  TensorView k;          // [T, Hk, D]
  TensorView positions;  // [T]
  TensorView cos;        // [P, R/2] fp32
  TensorView sin;        // [P, R/2] fp32
  TensorView q_out;      // [T, Hq, D]
  TensorView k_out;      // [T, Hk, D]
};

Status apply_rope(const RopeArgs& args, cudaStream_t stream);

}  // namespace edgespec
