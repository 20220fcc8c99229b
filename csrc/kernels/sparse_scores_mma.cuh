// Tensor-core block scores of InfLLM-v2: the contract of sparse_attention.cuh's scores_kernel
// (sparse_attention.h, `sparse_scores`), computed with m16n8k16 mma instead of one query per
// block. Included by sparse_attention.cuh. They take every 16-bit call with head dim 64 or 128
// and G dividing 16: prefill chunks, decode steps and speculative trees.
//
// Why: a prefill chunk scores every query against every compressed key it sees; the SIMT kernel
// and the torch GEMM both make that a [T, Hq, C] fp32 logits stream (about 0.5 TB for a 128K
// MiniCPM4 prefill). Here the logits live in registers: pass 1 keeps each row's running base-2
// max and sum, pass 2 recomputes them, turns them into probabilities and sums the G rows of each
// token in registers, so only the [T, Hkv, C] group sums reach memory. A decode step gains too:
// the SIMT kernel's dot products are bound by shared-memory reads (two per multiply-add: by
// estimate about 9 us per pass over MiniCPM4-8B's 8K compressed keys of a 128K context on an
// H100, not yet measured), the same products here are 64 mma per tile of 64 kernels.
//
// One block: kMmaRows = 64 packed rows of one KV head and one split of the kernel range. Without
// a tree path row r is token r / G, head-in-group r % G (G dividing 16, so that a token's rows
// never straddle a warp's m16 tile). With one, each token gets a warp's whole m16 tile (rows
// past G are padding): the kernels its path completes past the committed prefix are its own, so
// the tiles holding them are loaded per token (each warp's in turn) after the tiles every token
// shares. Q goes to shared memory once and stays in registers as A fragments; tiles of 64
// compressed keys (zero-filled past the split's end) stream through two cp.async stages and give
// S = Q.CK^T as B fragments, as in the attention kernels (csrc/kernels/attention.cuh).
//
// Row invariance (a tree token's scores are bitwise its decoded path's): a row's arithmetic does
// not depend on the other rows of its block. Its tiles start at fixed multiples of 64 within a
// split, whatever the block's tokens see; a tile it cannot see changes neither its max nor its
// sum (the masked terms are exact zeros); each element of S is one mma chain over the head dim in
// a fixed order; a token's G rows sit at the same lanes however the tokens are packed.
//
// The product S = Q.CK^T is a policy (MmaScoreProduct below: mma.sync; the Hopper kernels'
// WgmmaScoreProduct in csrc/kernels/sm90/sparse_scores.cu), the passes around it are shared.
//
// Status: correct on the CPU emulator (tests/test_sparse_kernels.py), never run on a GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/mma.cuh"
#include "common/vec.cuh"
#include "kernels/sparse_attention.h"
#include "kernels/sparse_kernels.cuh"

namespace edgespec {
namespace sparse_detail {

constexpr int kMmaKernels = kSparseMmaKernels;  // compressed keys per tile (kernels_per_split is a multiple)
constexpr int kMmaWarps = 4;                // 16 packed rows each
constexpr int kMmaRows = 16 * kMmaWarps;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kAllLanes = 0xffffffffu;

// 16-byte chunk c of row r at chunk position c ^ (r % 8): conflict-free cp.async and ldmatrix
// (the attention kernels' layout).
template <int kHeadDim>
__device__ __forceinline__ int mma_swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// S = Q.CK^T of one warp's 16 packed rows x one tile of kMmaKernels kernels, left in
// mma.m16n8k16's C layout: s[j][e] is row lane / 4 + 8 (e >= 2), kernel 8 j + 2 (lane % 4) + (e & 1)
// of the tile, which is what the passes below read. Q and the kernel tiles live in shared memory,
// 64 rows of kHeadDim 16-bit elements each, the 16-byte chunk `chunk` of row `row` at byte
// offset(row, chunk) of its tile. Two products with this interface: mma.sync with Q kept in
// registers (here, every sm_80+ GPU) and Hopper's wgmma with both operands read from shared memory
// (csrc/kernels/sm90/sparse_scores.cu).
template <typename T, int kHeadDim>
struct MmaScoreProduct {
  static constexpr int kAlign = 16;  // tile alignment in shared memory (what dynamic shared memory has)
  static constexpr bool kPerWarp = true;  // each warp's product is its own (a tree's per-token tiles)
  __device__ static int offset(int row, int chunk) { return 2 * mma_swizzle<kHeadDim>(row, chunk); }
  __device__ static void landed() {}  // between a thread's cp.async wait and the barrier

  std::uint32_t q_frag[kHeadDim / 16][4];

  __device__ void load_q(const unsigned char* q_tile, int warp, int lane) {
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
      ldmatrix_x4(q_frag[ks], q_tile + offset(warp * 16 + lane % 16, ks * 2 + lane / 16));
    }
  }

  __device__ void product(float (&s)[kMmaKernels / 8][4], const unsigned char*, const unsigned char* ck_tile,
                          int lane) {
#pragma unroll
    for (int j = 0; j < kMmaKernels / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < kHeadDim / 16; ++ks) {
#pragma unroll
      for (int kp = 0; kp < kMmaKernels / 16; ++kp) {
        std::uint32_t b[4];
        ldmatrix_x4(b, ck_tile + offset(kp * 16 + lane % 8 + (lane / 16) * 8, ks * 2 + (lane / 8) % 2));
        mma_16816<T>(s[2 * kp], q_frag[ks], b[0], b[1]);
        mma_16816<T>(s[2 * kp + 1], q_frag[ks], b[2], b[3]);
      }
    }
  }
};

// Q and two stages of kernel tiles, and room to align them to the product's boundary.
template <typename Product>
constexpr int scores_mma_smem_bytes(int head_dim) {
  return 3 * kMmaRows * head_dim * 2 + (Product::kAlign > 16 ? Product::kAlign : 0);
}

// Sums v over the rows of each token in an m16 tile: lane l holds row l / 4 (first) or
// l / 4 + 8 (second) of the tile, and the token's G rows differ in the lane bits 2.. of l.
__device__ __forceinline__ float token_row_sum(float v, int group) {
  for (int offset = 4; offset < 4 * min(group, 8); offset *= 2) v += __shfl_xor_sync(kAllLanes, v, offset);
  return v;
}

// Packed query rows per token: its G heads, or for a tree's tokens (path given; only per-warp
// products take them) a warp's whole m16 tile, since their own kernels make B theirs.
template <typename Product, typename T>
__host__ __device__ inline int rows_per_token(const SparseScoreParams<T>& p) {
  return Product::kPerWarp && p.path != nullptr ? 16 : p.group;
}

// (One block per SM as the launch bound: ptxas would otherwise stop at 128 registers and spill in
// the probability pass; up to 156 registers still let three blocks share an SM.)
template <typename T, int kHeadDim, bool kProbs, typename Product>
__global__ void __launch_bounds__(kMmaThreads, 1) scores_mma_kernel(const SparseScoreParams<T> p) {
  constexpr int kChunks = kHeadDim / 8;         // 16-byte chunks per row
  constexpr int kKeyFrags = kMmaKernels / 8;    // n8 blocks of S
  constexpr int kTileBytes = kMmaRows * kHeadDim * 2;
  static_assert(kMmaRows == kMmaKernels, "Q and kernel tiles share one layout");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // Tiles start on the product's boundary (the 128-byte swizzle of wgmma is a function of the
  // shared-window address).
  const std::uint32_t misalign = smem_address(smem_raw) % Product::kAlign;
  unsigned char* const q_tile = smem_raw + (misalign == 0 ? 0 : Product::kAlign - misalign);
  unsigned char* const ck_tiles = q_tile + kTileBytes;  // [2 stages][64 kernels][kHeadDim]
  __shared__ int block_visible;
  Product product;

  const int g = blockIdx.y;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = p.group;
  const bool tree = Product::kPerWarp && p.path != nullptr;
  const int per_token = rows_per_token<Product>(p);
  const int row0 = blockIdx.x * kMmaRows;
  const int tok_first = row0 / per_token;
  const int tok_last = min((row0 + kMmaRows - 1) / per_token, p.tokens - 1);
  const int kv_limit = *p.kv_limit;
  const int committed = num_kernels(kv_limit, p.kernel_size, p.kernel_stride);
  const int path_kernels = tree ? p.path_kernels : -1;
  const std::int64_t part_rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
  auto visible_to = [&](int t) {
    return scored_kernels(p.positions[t], kv_limit, p.kernel_size, p.kernel_stride, p.max_kernels, path_kernels);
  };

  if (tid == 0) {
    int most = 0;
    for (int t = tok_first; t <= tok_last; ++t) most = max(most, visible_to(t));
    block_visible = most;
  }
  // This thread's two fragment rows (lane / 4 and lane / 4 + 8 of its warp's 16): their token,
  // query head, visible kernels and packed partial row.
  int row_tok[2], row_vis[2];
  std::int64_t row_part[2];
  bool row_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = row0 + warp * 16 + lane / 4 + 8 * i;
    const int tok = r / per_token;
    row_ok[i] = tok < p.tokens && r % per_token < group;
    row_tok[i] = row_ok[i] ? tok : tok_last;
    const int head = g * group + (row_ok[i] ? r % per_token : 0);
    row_vis[i] = row_ok[i] ? visible_to(tok) : 0;
    row_part[i] = static_cast<std::int64_t>(row_tok[i]) * p.heads_q + head;
  }

  for (int i = tid; i < kMmaRows * kChunks; i += kMmaThreads) {
    const int r = i / kChunks;
    const int c = i % kChunks;
    const int row = row0 + r;
    const bool valid = row / per_token < p.tokens && row % per_token < group;
    const T* src = p.q;
    if (valid) {
      src = p.q + (row / per_token) * p.q_stride_t + (g * group + row % per_token) * p.q_stride_h + c * 8;
    }
    cp_async_16(q_tile + Product::offset(r, c), src, valid);
  }
  cp_async_commit();
  __syncthreads();  // block_visible

  const int begin = split * p.kernels_per_split;
  const int end = min(begin + p.kernels_per_split, block_visible);
  const int tiles = end > begin ? (end - begin + kMmaKernels - 1) / kMmaKernels : 0;
  // A tree's tiles from the first one holding a kernel past the committed prefix are per token.
  const int shared_tiles = tree ? min(tiles, max(committed - begin, 0) / kMmaKernels) : tiles;
  // Tile `tile` of this split into stage `stage`: the committed kernels for every token, and with
  // `token` >= 0 that token's own past them (its path's) up to what it sees.
  auto load_tile = [&](int tile, int stage, int token) {
    unsigned char* dst = ck_tiles + stage * kTileBytes;
    const int j0 = begin + tile * kMmaKernels;
    const int stop = token < 0 ? end : min(end, visible_to(token));
    for (int i = tid; i < kMmaKernels * kChunks; i += kMmaThreads) {
      const int r = i / kChunks;
      const int c = i % kChunks;
      const int j = j0 + r;
      const T* src = p.ck;
      if (j < stop && (token < 0 || j < committed)) {
        src = p.ck + static_cast<std::int64_t>(j) * p.ck_stride_c + g * p.ck_stride_h + c * 8;
      } else if (j < stop) {
        src = p.path + token * p.path_stride_t + (j - committed) * p.path_stride_e + g * p.path_stride_h + c * 8;
      }
      cp_async_16(dst + Product::offset(r, c), src, j < stop);
    }
  };
  if (shared_tiles > 0) load_tile(0, 0, -1);
  cp_async_commit();
  cp_async_wait<1>();  // Q has landed
  Product::landed();
  __syncthreads();
  product.load_q(q_tile, warp, lane);

  const float scale2 = p.scale * kLog2e;  // base-2 logits: exp2 throughout
  // Pass 1: this thread's share of each row's running max and sum (the max is shared by the quad).
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  // Pass 2: each row's base-2 log-sum-exp over every split (+inf: no kernel, every probability 0).
  // A decode step over a long context has a hundred splits, whose partials one thread would read
  // one L2 round trip after another: the row's quad shares the merge (lane c takes splits c, c + 4,
  // ...), each lane in one online pass over (max, sum) pairs. Which lane merges which split
  // depends on the split alone, and the empty splits a longer cache adds are skipped, so the merge
  // keeps a row's bits whatever the call.
  float row_lse[2] = {INFINITY, INFINITY};
  if constexpr (kProbs) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
      float total = 0.f;
      for (int z = lane % 4; z < p.splits; z += 4) {
        const float2 st = *reinterpret_cast<const float2*>(p.partial + (z * part_rows + row_part[i]) * 2);
        if (st.x == -INFINITY) continue;  // an empty split (no visible kernel)
        if (st.x > mx) {
          total = total * exp2f(mx - st.x) + st.y;
          mx = st.x;
        } else {
          total += st.y * exp2f(st.x - mx);
        }
      }
      const float lane_max = mx;
      mx = fmaxf(mx, __shfl_xor_sync(kAllLanes, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kAllLanes, mx, 2));
      total = lane_max == -INFINITY ? 0.f : total * exp2f(lane_max - mx);
      total += __shfl_xor_sync(kAllLanes, total, 1);
      total += __shfl_xor_sync(kAllLanes, total, 2);
      row_lse[i] = total > 0.f ? mx + log2f(total) : INFINITY;
    }
  }

  // One tile's S of this warp's rows: pass 1 folds it into the rows' max and sum, pass 2 writes
  // the tokens' summed probabilities.
  auto consume = [&](float (&s)[kKeyFrags][4], int tile) {
    const int col0 = begin + tile * kMmaKernels + (lane % 4) * 2;  // this thread's first column
    if constexpr (!kProbs) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = row_max[i];
#pragma unroll
        for (int j = 0; j < kKeyFrags; ++j) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float x = col0 + j * 8 + e < row_vis[i] ? s[j][2 * i + e] * scale2 : -INFINITY;
            s[j][2 * i + e] = x;
            mx = fmaxf(mx, x);
          }
        }
        mx = fmaxf(mx, __shfl_xor_sync(kAllLanes, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(kAllLanes, mx, 2));
        if (mx == -INFINITY) continue;  // nothing visible yet: max and sum stay (-inf, 0)
        float sum = row_sum[i] * exp2f(row_max[i] - mx);
#pragma unroll
        for (int j = 0; j < kKeyFrags; ++j) sum += exp2f(s[j][2 * i] - mx) + exp2f(s[j][2 * i + 1] - mx);
        row_max[i] = mx;
        row_sum[i] = sum;
      }
    } else {
      // Probabilities, summed over each token's G rows (a token's rows share their visibility).
#pragma unroll
      for (int j = 0; j < kKeyFrags; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = col0 + j * 8 + e;
          float v[2];
#pragma unroll
          for (int i = 0; i < 2; ++i) v[i] = col < row_vis[i] ? exp2f(s[j][2 * i + e] * scale2 - row_lse[i]) : 0.f;
          // G = 16: both rows belong to one token, whose sum lane 4k + c then holds; else each
          // row's token sums its own G rows, held by the lanes of its first row.
          const int sums = group == 16 ? 1 : 2;
          if (group == 16) v[0] += v[1];
#pragma unroll
          for (int i = 0; i < 2; ++i) {  // unrolled with constant indices: v stays in registers
            if (i >= sums) continue;
            v[i] = token_row_sum(v[i], group);
            if ((lane / 4) % group != 0 || !row_ok[i]) continue;
            float* out = p.scores + (static_cast<std::int64_t>(row_tok[i]) * p.heads_kv + g) * p.score_cols;
            out[col] = col < row_vis[i] ? v[i] : -INFINITY;
          }
        }
      }
    }
  };

  for (int it = 0; it < shared_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < shared_tiles) load_tile(it + 1, stage ^ 1, -1);
    cp_async_commit();
    cp_async_wait<1>();
    Product::landed();
    __syncthreads();
    float s[kKeyFrags][4];
    product.product(s, q_tile, ck_tiles + stage * kTileBytes, lane);
    consume(s, it);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  // A tree's last tiles (at most a path's kernels past the committed prefix: usually one), each
  // token's own in turn: its warp computes while the others wait.
  if constexpr (Product::kPerWarp) {
    for (int it = shared_tiles; it < tiles; ++it) {
      for (int w = 0; w < kMmaWarps && tok_first + w <= tok_last; ++w) {
        load_tile(it, 0, tok_first + w);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        if (warp == w) {
          float s[kKeyFrags][4];
          product.product(s, q_tile, ck_tiles, lane);
          consume(s, it);
        }
        __syncthreads();
      }
    }
  }

  if constexpr (kProbs) {
    // Columns of this split past the last tile (and past what the block sees): -inf, so that no
    // element of a token's split is left unwritten.
    const int written = begin + tiles * kMmaKernels;
    const int from = max(begin, written);
    const int count = max(begin + p.kernels_per_split - from, 0);
    for (int i = tid; i < (tok_last - tok_first + 1) * count; i += kMmaThreads) {
      const int t = tok_first + i / count;
      p.scores[(static_cast<std::int64_t>(t) * p.heads_kv + g) * p.score_cols + from + i % count] = -INFINITY;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float sum = row_sum[i];
      sum += __shfl_xor_sync(kAllLanes, sum, 1);
      sum += __shfl_xor_sync(kAllLanes, sum, 2);
      if (row_ok[i] && lane % 4 == 0) {
        float* st = p.partial + (split * part_rows + row_part[i]) * 2;
        st[0] = row_max[i];
        st[1] = sum;
      }
    }
  }
}

}  // namespace sparse_detail
}  // namespace edgespec

namespace edgespec {
namespace sparse_detail {

template <typename T>
bool scores_mma_aligned(const SparseScoreParams<T>& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; };
  const bool path = p.path == nullptr || (aligned(p.path) && p.path_stride_t % 8 == 0 && p.path_stride_e % 8 == 0 &&
                                          p.path_stride_h % 8 == 0);
  return aligned(p.q) && aligned(p.ck) && p.q_stride_t % 8 == 0 && p.q_stride_h % 8 == 0 && p.ck_stride_c % 8 == 0 &&
         p.ck_stride_h % 8 == 0 && path;
}

// Launches a score kernel's two passes (log-sum-exp partials, then probabilities), each with
// `smem` bytes of dynamic shared memory (above 48 KB a kernel must opt in; legal during capture).
template <typename P>
Status launch_score_passes(void (*lse)(const P), void (*probs)(const P), const P& p, dim3 grid, int threads,
                           int smem, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(lse, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "sparse scores: shared memory"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(probs, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), "sparse scores: shared memory"));
  lse<<<grid, threads, smem, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("sparse scores (log-sum-exp pass)");
  probs<<<grid, threads, smem, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("sparse scores (probability pass)");
  return Status::success();
}

// Both passes of the tensor-core score kernels with `Product` (MmaScoreProduct, or the sm90 one).
template <typename T, int kHeadDim, typename Product = MmaScoreProduct<T, kHeadDim>>
Status launch_scores_mma(const SparseScoreParams<T>& p, cudaStream_t stream) {
  const std::int64_t row_tiles =
      (static_cast<std::int64_t>(p.tokens) * rows_per_token<Product>(p) + kMmaRows - 1) / kMmaRows;
  EDGESPEC_RETURN_IF_ERROR(check_fits(row_tiles, 0x7fffffff, "sparse scores: row tiles"));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.splits));
  return launch_score_passes(scores_mma_kernel<T, kHeadDim, false, Product>,
                             scores_mma_kernel<T, kHeadDim, true, Product>, p, grid, kMmaThreads,
                             scores_mma_smem_bytes<Product>(kHeadDim), stream);
}

}  // namespace sparse_detail
}  // namespace edgespec
