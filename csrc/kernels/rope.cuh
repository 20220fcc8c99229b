// RoPE kernel and its launcher; see rope.h for the contract. Included only by the generated
// instance files csrc/instances/rope_<dtype>.cu.
#pragma once

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/vec.cuh"
#include "kernels/rope.h"

namespace edgespec {

namespace rope_detail {

constexpr int kThreads = 128;

template <typename T, typename PosT, int kVec>
__global__ void __launch_bounds__(kThreads) rope_kernel(const RopeParams<T, PosT> p) {
  const int rot_items = p.rotary_half / kVec;
  const int items_per_head = rot_items + (p.head_dim - 2 * p.rotary_half) / kVec;
  const int item = blockIdx.y * kThreads + threadIdx.x;
  if (item >= (p.heads_q + p.heads_k) * items_per_head) return;

  const std::int64_t t = blockIdx.x;
  const int head = item / items_per_head;
  const int sub = item - head * items_per_head;
  const bool is_q = head < p.heads_q;
  const int h = is_q ? head : head - p.heads_q;
  const T* __restrict__ src = is_q ? p.q + t * p.q_token_stride + h * p.q_head_stride
                                   : p.k + t * p.k_token_stride + h * p.k_head_stride;
  T* __restrict__ dst = is_q ? p.q_out + t * p.q_out_token_stride + h * p.q_out_head_stride
                             : p.k_out + t * p.k_out_token_stride + h * p.k_out_head_stride;

  if (sub >= rot_items) {  // dims [R, D) of a partial-rotary head pass through
    const int d = 2 * p.rotary_half + (sub - rot_items) * kVec;
    store_vec<T, kVec>(dst + d, load_vec<T, kVec>(src + d));
    return;
  }

  const int d = sub * kVec;
  const Vec<T, kVec> x1 = load_vec<T, kVec>(src + d);
  const Vec<T, kVec> x2 = load_vec<T, kVec>(src + d + p.rotary_half);
  Vec<T, kVec> r1, r2;
  const std::int64_t pos = static_cast<std::int64_t>(p.positions[t * p.positions_stride]);
  if (pos >= 0 && pos < p.table_rows) {
    const Vec<float, kVec> c = load_vec<float, kVec>(p.cos + pos * p.cos_row_stride + d);
    const Vec<float, kVec> s = load_vec<float, kVec>(p.sin + pos * p.sin_row_stride + d);
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const float a = to_float(x1.v[j]), b = to_float(x2.v[j]);
      r1.v[j] = from_float<T>(a * c.v[j] - b * s.v[j]);
      r2.v[j] = from_float<T>(b * c.v[j] + a * s.v[j]);
    }
  } else {
    const T nan = from_float<T>(__int_as_float(0x7fc00000));
#pragma unroll
    for (int j = 0; j < kVec; ++j) r1.v[j] = r2.v[j] = nan;
  }
  store_vec<T, kVec>(dst + d, r1);
  store_vec<T, kVec>(dst + d + p.rotary_half, r2);
}

template <typename T, typename PosT>
bool can_vectorize(const RopeParams<T, PosT>& p) {
  constexpr int kVec = kVecWidth<T>;
  const std::int64_t strides[] = {p.q_token_stride, p.q_head_stride, p.k_token_stride,
                                  p.k_head_stride, p.q_out_token_stride, p.q_out_head_stride,
                                  p.k_out_token_stride, p.k_out_head_stride, p.cos_row_stride,
                                  p.sin_row_stride};
  for (std::int64_t s : strides) {
    if (s % kVec != 0) return false;
  }
  // The fp32 table slice of kVec pairs is a kVec * 4-byte load (32 bytes for 16-bit T).
  return p.rotary_half % kVec == 0 && p.head_dim % kVec == 0 && is_aligned(p.q, 16) &&
         is_aligned(p.k, 16) && is_aligned(p.q_out, 16) && is_aligned(p.k_out, 16) &&
         is_aligned(p.cos, kVec * sizeof(float)) && is_aligned(p.sin, kVec * sizeof(float));
}

}  // namespace rope_detail

template <typename T, typename PosT>
Status launch_rope(const RopeParams<T, PosT>& p, cudaStream_t stream) {
  using namespace rope_detail;
  if (p.tokens == 0 || p.heads_q + p.heads_k == 0) return Status::success();
  const bool vectorized = can_vectorize(p);
  const int vec = vectorized ? kVecWidth<T> : 1;
  const std::int64_t items_per_head = p.rotary_half / vec + (p.head_dim - 2 * p.rotary_half) / vec;
  const std::int64_t items = static_cast<std::int64_t>(p.heads_q + p.heads_k) * items_per_head;
  dim3 grid;
  EDGESPEC_RETURN_IF_ERROR(row_chunk_grid(p.tokens, items, kThreads, "rope", &grid));

  return EDGESPEC_BOOL_SWITCH(vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? kVecWidth<T> : 1;
    rope_kernel<T, PosT, kVec><<<grid, kThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("rope_kernel");
    return Status::success();
  });
}

}  // namespace edgespec
