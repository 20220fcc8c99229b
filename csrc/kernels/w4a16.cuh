// W4A16 GEMM kernel and its launcher; see w4a16.h for the contract and the weight layout.
// Included only by the generated instance files csrc/instances/w4a16_<dtype>.cu.
//
// Why it is shaped this way (decode is a weight stream: at M <= 16 every byte of the 4-bit weight
// is read once and used for M multiply-adds, so the kernel's job is to keep DRAM busy):
//
// * Weights never pass through registers as raw 4-bit data more than once. The tile layout puts
//   the 32 values a lane needs for one k16 x 64 block into one 16-byte word group, so a warp
//   consumes a 512-byte block with one conflict-free LDS.128 per lane, and the dequantised
//   halves land directly in mma B registers (no shuffles, no ldmatrix for B).
// * Dequantisation is a shift, one lop3 and two or three half2 ops per 4 values: with the nibble
//   in the low bits of a 16-bit half whose exponent field is that of MAGIC (1024.0 for fp16,
//   128.0 for bf16, both with a unit last place), the half reads MAGIC + q exactly; subtracting
//   MAGIC (+ 8 for symmetric weights) is exact, then the zero point and the scale are applied.
// * Global -> shared copies are cp.async (16 bytes, no register staging) in a kStages-deep
//   pipeline of 128-row stages; weight copies carry an L2 evict-first policy because each weight
//   byte is read exactly once per step while the activations, scales and other layers' data
//   should stay in L2.
// * Small layers (hidden 576..2048) have too few 64-column tiles for the SMs, so K is split too
//   (grid.y) in whole k16 tiles: enough blocks for every SM even when N / 64 is 9. Partial sums
//   go to an fp32 buffer and the last block of a column tile to arrive adds them in split order
//   (deterministic), adds the bias and rounds once.
// * Activations are tiny (M x 128 per stage) and are read from shared memory with ldmatrix.x4
//   into the A fragments; rows past M are zero-filled by cp.async and never written out.
// * The expert gather (BlockFFN's 4-bit experts) changes addresses only: the stored column tile
//   (up) or k16 tile (down) and scale rows of each compact tile come from the active list at copy
//   time, so the dequantisation and mma loop is the plain GEMM's.
// * The dense variant (kDense, dense_gemm.h: 16-bit weights [N, K] as torch stores them) is the
//   same pipeline, split-K and reduction with the dequantisation replaced by ldmatrix: the weight
//   stage is 64 rows of W x 128 k (16 KB, swizzled like the activations), and a warp reads the B
//   fragments of its k16 x 64 block with four ldmatrix.x4. One column tile per block (kNU = 1):
//   the 4x larger weight stages must fit the same 99 KB.
//
// Status: correct on the CPU emulator (tests/test_w4a16_kernels.py), never run on a GPU.
// Tuning status: untuned; written and compiled without a GPU. kNU (column tiles per block) and
// the split heuristic (w4a16.cpp) are the first knobs to measure.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "common/checks.h"
#include "common/mma.cuh"
#include "common/search.cuh"
#include "common/vec.cuh"
#include "kernels/w4a16.h"

namespace edgespec {

namespace w4a16_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kStageTiles = kW4A16StageK / kW4A16TileK;  // k16 tiles per stage (8)
constexpr int kTileWords = 128;                           // int32 words of one 16 x 64 block
// Group rows a stage can touch: 128 rows starting at any k16 boundary, groups of >= 32 rows.
constexpr int kMaxStageGroups = kW4A16StageK / kW4A16GroupAlign + 1;
static_assert(kWarps == kStageTiles, "one k16 tile per warp and column tile in a stage");

template <typename T>
struct Half2;
template <>
struct Half2<__half> {
  using type = __half2;
};
template <>
struct Half2<__nv_bfloat16> {
  using type = __nv_bfloat162;
};

// 16-bit pattern of the magic number whose last place is 1: 1024.0 (fp16), 128.0 (bf16).
template <typename T>
constexpr std::uint32_t kMagic = std::is_same_v<T, __half> ? 0x6400u : 0x4300u;

template <typename T>
__device__ __forceinline__ typename Half2<T>::type as_h2(std::uint32_t v) {
  return *reinterpret_cast<const typename Half2<T>::type*>(&v);
}

template <typename T>
__device__ __forceinline__ std::uint32_t as_u32(typename Half2<T>::type v) {
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ typename Half2<T>::type splat(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2half2(v);
  } else {
    return __bfloat162bfloat162(v);
  }
}

// Per-column dequantisation constants of one column pair (na, nb) of a k16 tile.
template <typename T>
struct ColumnQuant {
  typename Half2<T>::type scale[2];  // splat(s[na]), splat(s[nb])
  typename Half2<T>::type zero[2];   // splat(z[na]), splat(z[nb]) (asymmetric only)
};

// One word of the tile layout -> the four mma B registers of sub-tiles na (b[0], b[1]) and nb
// (b[2], b[3]).
template <typename T, bool kZeros>
__device__ __forceinline__ void dequant_word(std::uint32_t word, const ColumnQuant<T>& c, std::uint32_t (&b)[4]) {
  using H2 = typename Half2<T>::type;
  constexpr std::uint32_t kMagic2 = kMagic<T> | (kMagic<T> << 16);
  // MAGIC (+ 8 when symmetric, the zero point folded in) as a pair: the last place of MAGIC is 1,
  // so MAGIC + 8 is the bit pattern kMagic + 8 and the subtraction is exact.
  constexpr std::uint32_t kOffset = kZeros ? kMagic2 : kMagic2 + 0x00080008u;
  const H2 offset = as_h2<T>(kOffset);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::uint32_t bits = lop3_and_or(word >> (4 * i), 0x000F000Fu, kMagic2);
    H2 v = __hsub2(as_h2<T>(bits), offset);  // (q_lo - 8, q_hi - 8) or (q_lo, q_hi), exact
    const int col = i >> 1;                   // registers 0, 1: column na; 2, 3: column nb
    if constexpr (kZeros) v = __hsub2(v, c.zero[col]);
    b[i] = as_u32<T>(__hmul2(v, c.scale[col]));
  }
}

template <int kMB, int kNU, int kStages, bool kDense = false>
struct Smem {
  static constexpr int kRows = kMB * 16;
  static constexpr int kColsN = kNU * kW4A16TileN;
  // Activations: [kRows][128] 16-bit, rows of 16 chunks of 16 bytes, chunk c of row r stored at
  // c ^ (r & 7) so the 8 row addresses of an ldmatrix phase hit 8 different bank groups.
  static constexpr int kABytes = kRows * kW4A16StageK * 2;
  // Weights: the 4-bit tile words, or (dense) [kColsN][128] 16-bit rows of W swizzled like A.
  static constexpr int kBBytes = kDense ? kColsN * kW4A16StageK * 2 : kStageTiles * kNU * kTileWords * 4;
  static constexpr int kSBytes = kDense ? 0 : kMaxStageGroups * kColsN * 2;
  static constexpr int kStageBytes = kABytes + kBBytes + 2 * kSBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kReduceBytes = kRows * kColsN * 4;
  static constexpr int kBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
};

template <typename T, int kMB, int kNU, int kStages, bool kZeros, bool kDense = false>
__global__ void __launch_bounds__(kThreads) w4a16_kernel(const W4A16Params<T> p) {
  static_assert(!kDense || (kNU == 1 && !kZeros), "the dense variant reads one column tile per block, no zeros");
  using S = Smem<kMB, kNU, kStages, kDense>;
  constexpr int kWarpsK = kWarps / kNU;       // warps sharing one column tile
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ int s_ticket;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nu = warp % kNU, kw = warp / kNU;
  const int n0 = blockIdx.x * S::kColsN;  // first column of the block

  // Expert gather (w4a16.h): the active count bounds the compact columns (up) or rows (down).
  const bool gather_cols = p.active != nullptr && !p.gather_rows;
  const bool gather_rows = p.active != nullptr && p.gather_rows;
  const int gathered = p.active != nullptr ? __ldg(p.active + p.experts) * p.expert_size : 0;
  const int n_valid = gather_cols ? gathered : p.n;
  if (n0 >= n_valid) return;  // past the active experts' columns: uniform over the tile's splits
  // Compact index along the gathered dimension -> stored index (its expert's block of d).
  auto stored = [&](int i) { return __ldg(p.active + i / p.expert_size) * p.expert_size + i % p.expert_size; };
  auto stored_col = [&](int c) { return gather_cols ? stored(c) : c; };
  auto stored_row = [&](int r) { return gather_rows ? stored(r) : r; };
  // A compact group lies inside one stored group (group_size divides d, or one group in all).
  auto stored_group = [&](int g) { return gather_rows ? stored(g * p.group_size) / p.group_size : g; };

  const int k_tiles = (gather_rows ? gathered : p.k) / kW4A16TileK;
  int kt_begin, kt_end;
  if (gather_rows) {
    // Split s reduces over the active experts among [s * per, (s + 1) * per) of all E, not over an
    // even share of the step's: a token's experts then fall in the same splits whatever the other
    // tokens activate (row invariance; with d % 128 == 0 they also keep their stage and warp).
    const int per = (p.experts + p.splits - 1) / p.splits;
    const int count = gathered / p.expert_size;
    const int split = static_cast<int>(blockIdx.y);
    kt_begin = count_below(p.active, count, split * per) * (p.expert_size / kW4A16TileK);
    kt_end = count_below(p.active, count, (split + 1) * per) * (p.expert_size / kW4A16TileK);
  } else {
    const int per = (k_tiles + p.splits - 1) / p.splits;
    kt_begin = min(k_tiles, static_cast<int>(blockIdx.y) * per);
    kt_end = min(k_tiles, kt_begin + per);
  }
  const int stages = (kt_end - kt_begin + kStageTiles - 1) / kStageTiles;

  auto a_smem = [&](int slot) { return reinterpret_cast<T*>(smem + slot * S::kStageBytes); };
  auto b_smem = [&](int slot) {
    return reinterpret_cast<std::uint32_t*>(smem + slot * S::kStageBytes + S::kABytes);
  };
  auto s_smem = [&](int slot) { return reinterpret_cast<T*>(smem + slot * S::kStageBytes + S::kABytes + S::kBBytes); };
  auto z_smem = [&](int slot) {
    return reinterpret_cast<T*>(smem + slot * S::kStageBytes + S::kABytes + S::kBBytes + S::kSBytes);
  };
  auto first_group = [&](int stage) { return (kt_begin + stage * kStageTiles) * kW4A16TileK / p.group_size; };

  // Issue the copies of one stage (A rows, B blocks, the scale/zero rows of its groups).
  auto load_stage = [&](int stage) {
    const int slot = stage % kStages;
    const int kt0 = kt_begin + stage * kStageTiles;
    const int tiles = min(kStageTiles, kt_end - kt0);
    T* a = a_smem(slot);
#pragma unroll
    for (int i = 0; i < kMB; ++i) {
      const int chunk = tid + i * kThreads;  // kRows * 16 chunks = kMB * 256
      const int row = chunk >> 4, c = chunk & 15;
      const bool valid = row < p.m && (c >> 1) < tiles;
      const T* src = p.x + (valid ? static_cast<std::int64_t>(row) * p.x_stride + kt0 * kW4A16TileK + c * 8 : 0);
      cp_async_16(a + row * kW4A16StageK + ((c ^ (row & 7)) * 8), src, valid);
    }
    if constexpr (kDense) {
      // 64 rows of W (this block's columns) x the stage's k16 tiles, 16-byte chunks, swizzled.
      T* b = reinterpret_cast<T*>(b_smem(slot));
#pragma unroll
      for (int i = 0; i < S::kColsN * 16 / kThreads; ++i) {
        const int chunk = tid + i * kThreads;
        const int row = chunk >> 4, c = chunk & 15;
        if ((c >> 1) < tiles) {  // chunks past K are never read (their k16 tile is skipped)
          cp_async_16_stream(b + row * kW4A16StageK + ((c ^ (row & 7)) * 8),
                             p.weight + static_cast<std::int64_t>(n0 + row) * p.w_stride + kt0 * kW4A16TileK + c * 8);
        }
      }
      return;  // no scales
    }
    std::uint32_t* b = b_smem(slot);
#pragma unroll
    for (int i = 0; i < kNU; ++i) {
      const int chunk = tid + i * kThreads;  // kStageTiles * kNU * 32 chunks
      const int t = chunk / (kNU * 32), rem = chunk % (kNU * 32);
      const int col = n0 + (rem / 32) * kW4A16TileN;  // first (compact) column of the chunk's tile
      // A tile past the active columns is never loaded; its accumulators are never stored.
      if (t < tiles && col < n_valid) {
        const std::int64_t tile_row = stored_row((kt0 + t) * kW4A16TileK) / kW4A16TileK;
        const std::int64_t word = tile_row * (2 * static_cast<std::int64_t>(p.n)) +
                                  (static_cast<std::int64_t>(stored_col(col)) / kW4A16TileN) * kTileWords +
                                  (rem % 32) * 4;
        cp_async_16_stream(b + chunk * 4, p.qweight + word);
      }
    }
    const int g0 = first_group(stage);
    const int g1 = ((kt0 + tiles) * kW4A16TileK - 1) / p.group_size;
    constexpr int kChunksPerRow = S::kColsN * 2 / 16;
    for (int chunk = tid; chunk < (g1 - g0 + 1) * kChunksPerRow; chunk += kThreads) {
      const int r = chunk / kChunksPerRow, c = chunk % kChunksPerRow;
      const bool valid = n0 + c * 8 < n_valid;
      const std::int64_t off =
          valid ? static_cast<std::int64_t>(stored_group(g0 + r)) * p.n + stored_col(n0 + c * 8) : 0;
      cp_async_16(s_smem(slot) + r * S::kColsN + c * 8, p.scales + off, valid);
      if constexpr (kZeros) cp_async_16(z_smem(slot) + r * S::kColsN + c * 8, p.zeros + off, valid);
    }
  };

  // acc[mb][2j + h]: C fragment of m16 tile mb and n8 sub-tile 16j + 8h of the warp's 64 columns.
  float acc[kMB][8][4];
#pragma unroll
  for (int i = 0; i < kMB * 8 * 4; ++i) (&acc[0][0][0])[i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < stages) load_stage(s);
    cp_async_commit();
  }

  for (int stage = 0; stage < stages; ++stage) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `stage` landed for every thread; slot stage - 1 is free again
    if (stage + kStages - 1 < stages) load_stage(stage + kStages - 1);
    cp_async_commit();  // always commit, so the wait count above stays in step

    const int slot = stage % kStages;
    const int kt0 = kt_begin + stage * kStageTiles;
    const int g0 = kDense ? 0 : first_group(stage);
    const T* a = a_smem(slot);
    const std::uint32_t* b = b_smem(slot);
    const T* sc = s_smem(slot);
    const T* zc = z_smem(slot);
#pragma unroll
    for (int i = 0; i < kNU; ++i) {
      const int t = kw + i * kWarpsK;  // this warp's k16 tile of the stage
      if (kt0 + t >= kt_end) break;
      std::uint32_t breg[4][4];
      if constexpr (kDense) {
        // Matrices: columns +0..7 | +0..7 | +8..15 | +8..15 of this n16 group, k low | high 8 of
        // the k16 tile: breg[j][0..1] feed sub-tile 2j, breg[j][2..3] sub-tile 2j + 1.
        const T* bt = reinterpret_cast<const T*>(b);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int row = 16 * j + lane % 8 + (lane / 16) * 8;
          const int chunk = 2 * t + (lane / 8) % 2;
          ldmatrix_x4(breg[j], bt + row * kW4A16StageK + ((chunk ^ (row & 7)) * 8));
        }
      }
      const int grow = kDense ? 0 : (kt0 + t) * kW4A16TileK / p.group_size - g0;
      const uint4 words = kDense ? uint4{} : *reinterpret_cast<const uint4*>(b + ((t * kNU + nu) * 32 + lane) * 4);
      const std::uint32_t w4[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
      for (int j = 0; j < (kDense ? 0 : 4); ++j) {
        const int col = nu * kW4A16TileN + 16 * j + (lane >> 2);
        ColumnQuant<T> cq;
        cq.scale[0] = splat<T>(sc[grow * S::kColsN + col]);
        cq.scale[1] = splat<T>(sc[grow * S::kColsN + col + 8]);
        if constexpr (kZeros) {
          cq.zero[0] = splat<T>(zc[grow * S::kColsN + col]);
          cq.zero[1] = splat<T>(zc[grow * S::kColsN + col + 8]);
        }
        dequant_word<T, kZeros>(w4[j], cq, breg[j]);
      }
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb) {
        // ldmatrix.x4: lanes 0-15 address rows 0-15 at the tile's first 8 columns, lanes 16-31
        // the same rows at the next 8; the result is the A fragment of this m16 x k16 tile.
        const int row = mb * 16 + (lane & 15);
        const int chunk = 2 * t + (lane >> 4);
        std::uint32_t afrag[4];
        ldmatrix_x4(afrag, a + row * kW4A16StageK + ((chunk ^ (row & 7)) * 8));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          mma_16816<T>(acc[mb][2 * j], afrag, breg[j][0], breg[j][1]);
          mma_16816<T>(acc[mb][2 * j + 1], afrag, breg[j][2], breg[j][3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the reduction buffer

  // Sum the kWarpsK warps of each column tile in a fixed order (deterministic results).
  float* red = reinterpret_cast<float*>(smem);
  const int g = lane >> 2, c2 = 2 * (lane & 3);
  for (int round = 0; round < kWarpsK; ++round) {
    if (kw == round) {
#pragma unroll
      for (int mb = 0; mb < kMB; ++mb)
#pragma unroll
        for (int jh = 0; jh < 8; ++jh)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            // C fragment: d[0..1] = C[g][2c..2c+1], d[2..3] = C[g+8][2c..2c+1].
            const int row = mb * 16 + g + (e >= 2 ? 8 : 0);
            const int col = nu * kW4A16TileN + 8 * jh + c2 + (e & 1);
            float& dst = red[row * S::kColsN + col];
            dst = round == 0 ? acc[mb][jh][e] : dst + acc[mb][jh][e];
          }
    }
    __syncthreads();
  }

  const int elems = p.m * S::kColsN;
  auto store = [&](int i, float v) {  // element i = row * kColsN + col of the block's output tile
    const int row = i / S::kColsN, col = i % S::kColsN;
    if (n0 + col >= n_valid) return;
    if (gather_cols) {
      // BlockFFN's up epilogue: silu, scaled by this row's (token's) weight for the column's expert.
      const float w = p.expert_weights[static_cast<std::int64_t>(row) * p.experts +
                                       __ldg(p.active + (n0 + col) / p.expert_size)];
      v = v / (1.f + expf(-v)) * w;
    } else if (p.bias != nullptr) {
      v += to_float(p.bias[n0 + col]);
    }
    p.out[static_cast<std::int64_t>(row) * p.n + n0 + col] = from_float<T>(v);
  };
  if (p.splits == 1) {
    for (int i = tid; i < elems; i += kThreads) store(i, red[i]);
    return;
  }
  for (int i = tid; i < elems; i += kThreads) {
    const int row = i / S::kColsN, col = i % S::kColsN;
    p.partial[(static_cast<std::int64_t>(blockIdx.y) * p.m + row) * p.n + n0 + col] = red[i];
  }
  // Arrival (threadFenceReduction): publish the partials, take a ticket at the block column's
  // counter; the block that takes the last one sums all splits.
  __threadfence();
  __syncthreads();
  if (tid == 0) s_ticket = atomicAdd(p.counters + blockIdx.x, 1) == p.splits - 1;
  __syncthreads();
  if (!s_ticket) return;
  __threadfence();
  for (int i = tid; i < elems; i += kThreads) {
    const int row = i / S::kColsN, col = i % S::kColsN;
    float v = 0.f;
    for (int s = 0; s < p.splits; ++s) v += __ldcg(p.partial + (static_cast<std::int64_t>(s) * p.m + row) * p.n + n0 + col);
    store(i, v);
  }
  if (tid == 0) p.counters[blockIdx.x] = 0;
}

template <typename T, int kMB, int kNU, bool kZeros, bool kDense = false>
Status launch_shape(const W4A16Params<T>& p, cudaStream_t stream) {
  // Deeper pipelines for small M; at M > 32 three stages keep the footprint under the 99 KB a
  // block may use on sm_89 (the activation tile grows with M).
  constexpr int kStages = kMB <= 2 ? 4 : 3;
  using S = Smem<kMB, kNU, kStages, kDense>;
  static_assert(S::kBytes <= 99 * 1024, "shared memory must fit the 99 KB opt-in limit of sm_86/sm_89");
  auto* kernel = w4a16_kernel<T, kMB, kNU, kStages, kZeros, kDense>;
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kBytes),
      "w4a16: requesting dynamic shared memory for w4a16_kernel"));
  const dim3 grid(static_cast<unsigned>(p.n / S::kColsN), static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, S::kBytes, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("w4a16_kernel");
  return Status::success();
}

template <typename T, int kMB, bool kDense>
Status launch_rows(const W4A16Params<T>& p, cudaStream_t stream) {
  if constexpr (kDense) {
    return launch_shape<T, kMB, 1, false, true>(p, stream);
  } else {
    // Two column tiles per block when N allows: twice the bytes per stage and per ldmatrix.
    const bool wide = p.n % (2 * kW4A16TileN) == 0;
    const bool zeros = p.zeros != nullptr;
    if (wide) {
      return zeros ? launch_shape<T, kMB, 2, true>(p, stream) : launch_shape<T, kMB, 2, false>(p, stream);
    }
    return zeros ? launch_shape<T, kMB, 1, true>(p, stream) : launch_shape<T, kMB, 1, false>(p, stream);
  }
}

// Both weight formats: the m16 tiles of the row count pick the instance.
template <typename T, bool kDense>
Status launch_format(const W4A16Params<T>& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return Status::unsupported(std::string(kDense ? "dense_gemm" : "w4a16") +
                               ": the tensor-core kernel takes bf16 or fp16 activations, not fp32");
  } else {
    if (p.m == 0 || p.n == 0) return Status::success();
    if (p.m <= 16) return launch_rows<T, 1, kDense>(p, stream);
    if (p.m <= 32) return launch_rows<T, 2, kDense>(p, stream);
    if (p.m <= 48) return launch_rows<T, 3, kDense>(p, stream);
    return launch_rows<T, 4, kDense>(p, stream);
  }
}

}  // namespace w4a16_detail

template <typename T>
Status launch_dense_gemm(const W4A16Params<T>& p, cudaStream_t stream) {
  return w4a16_detail::launch_format<T, true>(p, stream);
}

template <typename T>
Status launch_w4a16(const W4A16Params<T>& p, cudaStream_t stream) {
  return w4a16_detail::launch_format<T, false>(p, stream);
}

}  // namespace edgespec
