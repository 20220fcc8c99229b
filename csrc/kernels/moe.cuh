// BlockFFN kernels and their launcher; see moe.h for the contract. Included only by the generated
// instance files csrc/instances/moe_<dtype>.cu.
//
// One templated kernel does the three GEMMs of a step (router, up, down), all "T tokens times a
// gathered slab of weight rows" products on tensor cores (mma.sync.m16n8k16, fp32 accumulate):
//
//   mode    A operand (tokens)     B operand rows (N)            reduction (K)
//   router  x [T, H]               router rows, N = E            H
//   up      x [T, H]               active rows of up, N = A*d    H
//   down    hidden [T, A*d]        rows of down, N = H           A*d, gathered per 32-chunk
//
// Launch shape: grid (ceil(N_max / 64), splits), 128 threads = 4 warps; warp w owns B rows
// n0 + 16w .. n0 + 16w + 15 (two n-tiles of 8) against all T tokens (kMT m-tiles of 16, T padded
// with zero rows), over the split's share of K in 32-wide chunks. N_max is E, E*d and H: blocks of
// the up kernel past the A*d active rows return at once (A is read on the device).
//
// Why no shared memory for operands: a block's 4 warps stream disjoint weight rows exactly once
// (the cost of the step is these bytes), and the token operand is small and read through L1/L2
// by every warp. Each lane loads 16 bytes (8 elements) of a row per chunk with LDG.128, so 4
// lanes cover a row's 64 contiguous bytes. The mma k-order is permuted to match: in 16-step s of
// a chunk, lane (g = lane/4, c = lane%4) feeds elements 4s..4s+3 of its 8, i.e. logical k
// 2c, 2c+1 <- physical 8c+4s, +1 and logical 2c+8, 2c+9 <- physical 8c+4s+2, +3. A and B use the
// same permutation, so the dot products are unchanged and no lane shuffles are needed.
//
// Split-K: with splits > 1 each block writes fp32 partial sums [split][T][N]; the last block to
// arrive at the tile's counter (router: at one counter for the whole grid) sums them and runs the
// epilogue, then resets the counter to zero (threadFenceReduction pattern: partials, fence,
// atomic ticket; the last block fences again and reads with ld.global.cg).
//
// Status: correct on the CPU emulator (tests/test_blockffn_kernels.py), never run on a GPU.
// Tuning (untuned: no GPU was available when this was written): kUnroll chunks are in flight per
// lane (4 for T <= 16, 2 for T <= 32, 1 above, to bound registers: kMT * 2 A vectors per chunk);
// the splits are chosen by edgespec/ops/_kernels.py from the SM count.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/mma.cuh"
#include "common/search.cuh"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "kernels/moe.h"

namespace edgespec {

namespace moe_detail {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kWarpRows = 16;
static_assert(kWarps * kWarpRows == kMoeBlockRows, "a block covers kMoeBlockRows B rows");

enum class Mode { kRouter, kUp, kDown };

// Eight 16-bit elements as four packed pairs; pair i holds elements 2i (low half) and 2i + 1.
struct Pack8 {
  std::uint32_t w[4];
};

__device__ __forceinline__ Pack8 load8(const void* ptr) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(ptr));
  return {{v.x, v.y, v.z, v.w}};
}

__device__ __forceinline__ Pack8 zero8() { return {{0u, 0u, 0u, 0u}}; }

// Rounds to the storage type and back: the value the torch path would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

// First scratch counter of each kernel in p.sync: [router][up tiles][down tiles].
__host__ __device__ inline int up_tiles(int experts, int expert_size) {
  return (experts * expert_size + kMoeBlockRows - 1) / kMoeBlockRows;
}

// Epilogue of one output element (t, n) of the up or down GEMM.
template <typename T, Mode kMode>
__device__ __forceinline__ void store_result(const BlockFFNParams<T>& p, const int* s_active, int t, int n,
                                             float v) {
  if constexpr (kMode == Mode::kUp) {
    // silu(up . x) scaled by this token's weight for the row's expert (zero when it is unused).
    const float w = p.weights[static_cast<std::int64_t>(t) * p.experts + s_active[n / p.expert_size]];
    const float h = v / (1.f + expf(-v)) * w;
    p.hidden[static_cast<std::int64_t>(t) * p.experts * p.expert_size + n] = from_float<T>(h);
  } else {
    p.out[t * p.out_stride + n] = from_float<T>(v);
  }
}

// The router's last block: logits -> relu -> RMSNorm over experts -> weights; active list.
template <typename T>
__device__ void finalize_router(const BlockFFNParams<T>& p, int splits, int* s_flag) {
  __shared__ int s_pairs;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int e_count = p.experts;
  for (int e = threadIdx.x; e < e_count; e += kThreads) s_flag[e] = 0;
  if (threadIdx.x == 0) s_pairs = 0;
  __syncthreads();
  for (int t = warp; t < p.tokens; t += kWarps) {
    float* w_row = p.weights + static_cast<std::int64_t>(t) * e_count;
    float sum_sq = 0.f;
    for (int e = lane; e < e_count; e += kWarpSize) {
      float z = 0.f;
      for (int s = 0; s < splits; ++s) z += __ldcg(p.partial + (static_cast<std::int64_t>(s) * p.tokens + t) * e_count + e);
      // F.linear hands the torch path logits rounded to T; round here too so both paths agree on
      // which experts are active.
      z = fmaxf(round_to<T>(z), 0.f);
      w_row[e] = z;
      sum_sq += z * z;
    }
    sum_sq = warp_sum(sum_sq);
    const float inv_rms = rsqrtf(sum_sq / static_cast<float>(e_count) + p.eps);
    int pairs = 0;
    for (int e = lane; e < e_count; e += kWarpSize) {
      const float w = round_to<T>(w_row[e] * inv_rms * to_float(p.router_norm[e]));
      w_row[e] = w;
      if (w != 0.f) {
        s_flag[e] = 1;  // several tokens may store 1 for one expert: same value, no race in effect
        ++pairs;
      }
    }
    pairs = __reduce_add_sync(0xffffffffu, pairs);
    if (lane == 0) atomicAdd(&s_pairs, pairs);
  }
  __syncthreads();
  if (warp != 0) return;
  // Ascending compaction of the active experts, 32 at a time with a ballot.
  int count = 0;
  for (int base = 0; base < e_count; base += kWarpSize) {
    const int e = base + lane;
    const bool on = e < e_count && s_flag[e] != 0;
    const unsigned mask = __ballot_sync(0xffffffffu, on);
    if (on) p.active[count + __popc(mask & ((1u << lane) - 1u))] = e;
    count += __popc(mask);
  }
  if (lane == 0) {
    p.active[e_count] = count;
    if (p.counters != nullptr) {
      p.counters[0] += s_pairs;
      p.counters[1] += count;
    }
    p.sync[0] = 0u;  // every block of the grid has arrived: ready for the next call
  }
}

template <typename T, int kMT, Mode kMode>
__global__ void __launch_bounds__(kThreads) blockffn_gemm_kernel(const BlockFFNParams<T> p) {
  constexpr int kUnroll = kMT == 1 ? 4 : (kMT == 2 ? 2 : 1);
  // Active expert ids (up/down) or the router's active flags.
  __shared__ int s_active[kMoeMaxExperts];
  __shared__ unsigned s_ticket;

  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int g = lane / 4, c = lane % 4;
  const int hidden_size = p.hidden_size, d = p.expert_size;
  const std::int64_t width = static_cast<std::int64_t>(p.experts) * d;  // E * d
  const int tile = blockIdx.x, split = blockIdx.y, splits = gridDim.y;
  const int n0 = tile * kMoeBlockRows;

  int num_active = 0;
  if constexpr (kMode != Mode::kRouter) num_active = p.active[p.experts];  // written by the router kernel
  const int rows = kMode == Mode::kRouter ? p.experts : (kMode == Mode::kUp ? num_active * d : hidden_size);
  const int depth = kMode == Mode::kDown ? num_active * d : hidden_size;
  if (n0 >= rows) return;  // up: past the active rows (uniform over the block and its splits)
  if constexpr (kMode != Mode::kRouter) {
    for (int i = threadIdx.x; i < num_active; i += kThreads) s_active[i] = p.active[i];
    __syncthreads();
  }

  const int chunks = depth / kMoeChunk;
  int c_begin, c_end;
  if constexpr (kMode == Mode::kDown) {
    // Split s reduces over the active experts among [s * per, (s + 1) * per) of all E, not over an
    // even share of the step's A: a token's experts then fall in the same splits, in the same
    // order, whatever the step's other tokens activate (their chunks add exact zeros for it), so
    // a token decoded alone and verified in a tree gets the same bits (row invariance, moe.h).
    const int per = (p.experts + splits - 1) / splits;
    c_begin = count_below(s_active, num_active, split * per) * (d / kMoeChunk);
    c_end = count_below(s_active, num_active, (split + 1) * per) * (d / kMoeChunk);
  } else {
    const int per_split = (chunks + splits - 1) / splits;
    c_begin = min(chunks, split * per_split);
    c_end = min(chunks, c_begin + per_split);
  }

  // This lane's two B rows (one per n-tile) and whether they exist.
  const int r0 = n0 + warp * kWarpRows + g;
  const int r1 = r0 + 8;
  const bool has0 = r0 < rows, has1 = r1 < rows;
  const T* b0_row = nullptr;
  const T* b1_row = nullptr;
  if constexpr (kMode == Mode::kRouter) {
    if (has0) b0_row = p.router + static_cast<std::int64_t>(r0) * hidden_size;
    if (has1) b1_row = p.router + static_cast<std::int64_t>(r1) * hidden_size;
  } else if constexpr (kMode == Mode::kUp) {
    // The warp's 16 rows lie in one expert (d % 16 == 0): compact row r -> physical row.
    if (has0) b0_row = p.up + (static_cast<std::int64_t>(s_active[r0 / d]) * d + r0 % d) * hidden_size;
    if (has1) b1_row = p.up + (static_cast<std::int64_t>(s_active[r1 / d]) * d + r1 % d) * hidden_size;
  } else {
    if (has0) b0_row = p.down + static_cast<std::int64_t>(r0) * width;
    if (has1) b1_row = p.down + static_cast<std::int64_t>(r1) * width;
  }
  const T* a_base = kMode == Mode::kDown ? p.hidden : p.x;
  const std::int64_t a_stride = kMode == Mode::kDown ? width : p.x_stride;

  float acc[kMT][2][4];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;

  for (int cc = c_begin; cc < c_end; cc += kUnroll) {
    Pack8 b[kUnroll][2];
    Pack8 a[kUnroll][kMT][2];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int ch = cc + u;
      const bool live = ch < c_end;
      const int ka = ch * kMoeChunk + c * 8;  // column of A (compact)
      int kb = ka;                            // column of B
      if constexpr (kMode == Mode::kDown) {
        // Chunks never straddle experts (d % 32 == 0): one lookup per chunk.
        if (live) kb = s_active[(ch * kMoeChunk) / d] * d + (ch * kMoeChunk) % d + c * 8;
      }
      b[u][0] = live && has0 ? load8(b0_row + kb) : zero8();
      b[u][1] = live && has1 ? load8(b1_row + kb) : zero8();
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int t0 = mt * 16 + g, t1 = t0 + 8;
        a[u][mt][0] = live && t0 < p.tokens ? load8(a_base + t0 * a_stride + ka) : zero8();
        a[u][mt][1] = live && t1 < p.tokens ? load8(a_base + t1 * a_stride + ka) : zero8();
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
#pragma unroll
      for (int s = 0; s < 2; ++s)
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          const std::uint32_t frag[4] = {a[u][mt][0].w[2 * s], a[u][mt][1].w[2 * s], a[u][mt][0].w[2 * s + 1],
                                         a[u][mt][1].w[2 * s + 1]};
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma_16816<T>(acc[mt][nt], frag, b[u][nt].w[2 * s], b[u][nt].w[2 * s + 1]);
        }
  }

  // Accumulator element i of (mt, nt) is token mt*16 + g (+8 for i >= 2), row n0 + 16w + 8nt + 2c + (i & 1).
  const bool direct = kMode != Mode::kRouter && splits == 1;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int t = mt * 16 + g + (i >= 2 ? 8 : 0);
        const int n = n0 + warp * kWarpRows + nt * 8 + 2 * c + (i & 1);
        if (t >= p.tokens || n >= rows) continue;
        if (direct) {
          store_result<T, kMode>(p, s_active, t, n, acc[mt][nt][i]);
        } else {
          p.partial[(static_cast<std::int64_t>(split) * p.tokens + t) * rows + n] = acc[mt][nt][i];
        }
      }
  if (direct) return;

  // Arrival: the last block of the tile (router: of the grid) finishes the reduction.
  unsigned* counter = p.sync;
  unsigned expected = gridDim.x * gridDim.y;
  if constexpr (kMode != Mode::kRouter) {
    counter = p.sync + 1 + (kMode == Mode::kUp ? 0 : up_tiles(p.experts, d)) + tile;
    expected = splits;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_ticket = atomicAdd(counter, 1u);
  __syncthreads();
  if (s_ticket != expected - 1) return;
  __threadfence();

  if constexpr (kMode == Mode::kRouter) {
    finalize_router<T>(p, splits, s_active);
  } else {
    for (int i = threadIdx.x; i < p.tokens * kMoeBlockRows; i += kThreads) {
      const int t = i / kMoeBlockRows, n = n0 + i % kMoeBlockRows;
      if (n >= rows) continue;
      float v = 0.f;
      for (int s = 0; s < splits; ++s) v += __ldcg(p.partial + (static_cast<std::int64_t>(s) * p.tokens + t) * rows + n);
      store_result<T, kMode>(p, s_active, t, n, v);
    }
    if (threadIdx.x == 0) *counter = 0u;
  }
}

template <typename T, int kMT>
Status launch_all(const BlockFFNParams<T>& p, cudaStream_t stream) {
  const unsigned router_tiles = (p.experts + kMoeBlockRows - 1) / kMoeBlockRows;
  const unsigned down_tiles = (p.hidden_size + kMoeBlockRows - 1) / kMoeBlockRows;
  blockffn_gemm_kernel<T, kMT, Mode::kRouter>
      <<<dim3(router_tiles, p.router_splits), kThreads, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("blockffn_gemm_kernel<router>");
  if (p.router_only) return Status::success();
  blockffn_gemm_kernel<T, kMT, Mode::kUp>
      <<<dim3(up_tiles(p.experts, p.expert_size), p.up_splits), kThreads, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("blockffn_gemm_kernel<up>");
  blockffn_gemm_kernel<T, kMT, Mode::kDown><<<dim3(down_tiles, p.down_splits), kThreads, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("blockffn_gemm_kernel<down>");
  return Status::success();
}

}  // namespace moe_detail

template <typename T>
Status launch_blockffn(const BlockFFNParams<T>& p, cudaStream_t stream) {
  using namespace moe_detail;
  if constexpr (std::is_same_v<T, float>) {
    return Status::unsupported("blockffn: the tensor-core kernels take bf16 or fp16, not fp32");
  } else {
    if (p.tokens <= 16) return launch_all<T, 1>(p, stream);
    if (p.tokens <= 32) return launch_all<T, 2>(p, stream);
    if (p.tokens <= 64) return launch_all<T, 4>(p, stream);
    return launch_all<T, 8>(p, stream);
  }
}

}  // namespace edgespec
