// W4A16 GEMM: 4-bit weights (per-group scales, optional zero points) times bf16/fp16 activations,
// for the M = 1..64 rows of decode steps and speculative tree verification (Marlin-class).
//
// Computes out[m, n] = sum_k x[m, k] * w[k, n] (+ bias[n]) with
//   w[k, n] = (q[k, n] - z[k / group, n]) * s[k / group, n]      (z = 8 when zeros is null)
// in fp32 accumulation on tensor cores (mma.sync.m16n8k16), dequantising the 4-bit values in
// registers; the result is rounded once to T.
//
// Weight layout ("tile" layout, edgespec/quant/layout.py is the reference and the CPU packer):
// int32 [K/16, 2N] viewed as [K/16][N/64][32 lanes][4 words]. One 16 x 64 block (k16 tile kt,
// n64 tile nt) is 512 contiguous bytes, one 16-byte vector per lane. Word j of lane l holds,
// for the column pair na = nt*64 + 16j + l/4, nb = na + 8 and the rows r0 = kt*16 + 2(l%4):
//   nibble:  0          1            2          3            4            5            6            7
//   value:   q[r0][na]  q[r0+8][na]  q[r0][nb]  q[r0+8][nb]  q[r0+1][na]  q[r0+9][na]  q[r0+1][nb]  q[r0+9][nb]
// so (word >> 4i) & 0x000F000F holds, in its two 16-bit halves, exactly the pair of values of the
// mma B register i of the lane (i = 0, 1: sub-tile na's b0, b1; i = 2, 3: sub-tile nb's).
//
// Preconditions (checked by w4a16_gemm() below; edgespec/ops/_kernels.py checks the same first):
//   * T in {bf16, fp16}; x [M, K] with 0 <= M <= 64, stride 1 along K, row stride a multiple of 8
//     elements, 16-byte aligned base; out [M, N] contiguous, not overlapping any input;
//   * K % 16 == 0, N % 64 == 0; qweight int32 [K/16, 2N] contiguous, 16-byte aligned;
//   * group_size: a multiple of 32 (or K itself: per-channel); scales [G, N] of dtype T with
//     G = ceil(K / group_size), contiguous, 16-byte aligned; zeros null or like scales;
//   * bias null or [N] of dtype T, contiguous;
//   * splits in [1, K/16]; with splits > 1: partial fp32 [splits, M, N] and counters int32
//     [N / 64] that are all zero on entry (the kernel leaves them zero; one counters buffer must
//     not be used by two launches running concurrently).
// Act-order (GPTQ desc_act) checkpoints are stored with rows sorted by group; the caller gathers
// the activation columns into that order first (x[:, perm]).
//
// Expert gather (BlockFFN with 4-bit experts, moe.h): with an `active` list the weight holds E
// experts of d = expert_size consecutive columns (gather_rows false: BlockFFN's up, K = H, N = E*d)
// or rows (gather_rows true: its down, K = E*d, N = H), and only the A active ones are read, where
// active[0..A) lists them ascending and A = active[E] is read on the device (no host sync, fixed
// launch shape). The gathered dimension is compact on the activation side: columns mode writes
// out[:, j*d + c] for the j-th active expert's column c, and its epilogue is
// silu(acc) * expert_weights[m, active[j]] (BlockFFN's up + router scaling; no bias); rows mode reads
// x[:, j*d + r] against the j-th active expert's row r. Blocks past the active columns return at
// once; splits past the active rows add zeros. In rows mode split s covers the active experts
// among [s * ceil(E / splits), ...) of all E (not an even share of the A active ones): with
// d % 128 == 0 each expert then keeps its split, pipeline stage and warp whatever the union is,
// and a token's result does not depend on the step's other tokens (row invariance; with other d
// the stages mix experts and it holds up to rounding). Extra preconditions: columns mode d % 64 == 0
// (whole column tiles), rows mode d % 16 == 0 and group_size dividing d or per-channel, no bias.
//
// Launch shape (w4a16.cuh): grid (N / (64 * kNU), splits), 256 threads = 8 warps; block (nt, s)
// streams k16 tiles [s * per, (s + 1) * per) of its kNU column tiles through a cp.async pipeline
// of 128-row stages; warp w takes column tile w % kNU and the k16 tiles w / kNU + i * (8 / kNU)
// of each stage. The 8 / kNU warps of one column tile reduce in shared memory (in a fixed order:
// results are deterministic), then either write out (splits == 1) or fp32 partials that the last
// block of the column tile sums in split order.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

constexpr int kW4A16MaxRows = 64;    // M: 4 m16 tiles
constexpr int kW4A16TileK = 16;      // K granularity of the layout
constexpr int kW4A16TileN = 64;      // N granularity of the layout (and of the split-K counters)
constexpr int kW4A16StageK = 128;    // rows of K per pipeline stage
constexpr int kW4A16GroupAlign = 32; // group sizes the kernel takes: multiples of this, or K

template <typename T>
struct W4A16Params {
  const T* x = nullptr;                 // [m, k], row stride x_stride
  std::int64_t x_stride = 0;
  const std::uint32_t* qweight = nullptr;  // tile layout [k / 16, 2n]
  const T* weight = nullptr;            // dense_gemm.h only: [n, k], row stride w_stride
  std::int64_t w_stride = 0;
  const T* scales = nullptr;            // [groups, n]
  const T* zeros = nullptr;             // [groups, n] or null (z = 8)
  const T* bias = nullptr;              // [n] or null
  T* out = nullptr;                     // [m, n] contiguous
  float* partial = nullptr;             // [splits, m, n] when splits > 1
  int* counters = nullptr;              // [n / 64] when splits > 1
  // Expert gather (see above); active == nullptr for a plain GEMM.
  const int* active = nullptr;          // [experts + 1]: ascending ids, then their count
  const float* expert_weights = nullptr;  // columns mode: [m, experts] router weights
  int experts = 0;
  int expert_size = 0;
  bool gather_rows = false;
  int m = 0;
  int n = 0;
  int k = 0;
  int group_size = 0;
  int splits = 1;
};

// Instantiated per dtype in csrc/instances/w4a16_<dtype>.cu (fp32 returns kUnsupported).
template <typename T>
Status launch_w4a16(const W4A16Params<T>& p, cudaStream_t stream);
// The dense variant (dense_gemm.h): p.weight instead of qweight/scales/zeros, no gather.
template <typename T>
Status launch_dense_gemm(const W4A16Params<T>& p, cudaStream_t stream);

// Split-K factor for this shape on a GPU with num_sms SMs (host only; edgespec/ops/_kernels.py
// calls it through the binding). Untuned heuristic, written without a GPU: aim for about two
// blocks per SM, split in whole k16 tiles, and cap the fp32 partial traffic (splits * M * N * 8
// bytes) at the weight bytes (K * N / 2) for M = kW4A16SplitRows.
//
// It does not depend on M, and that is the point: a row's sums then run over the same K
// partition in the same order whatever the number of rows it comes with (the M tiles only pick
// which mma rows hold it), so a token decoded alone (M = 1) and the same token verified in a
// draft tree (M = T) get bitwise the same projection: the row invariance greedy speculative
// decoding needs (csrc/kernels/attention.h has the attention half). Larger M pay more partial
// traffic than an M-aware plan would (at M = 64, up to 4x the weight bytes, through L2).
constexpr std::int64_t kW4A16SplitRows = 16;
int w4a16_num_splits(std::int64_t n, std::int64_t k, int num_sms);

struct W4A16Args {
  TensorView x;                          // [M, K]
  TensorView qweight;                    // int32 [K/16, 2N]
  TensorView scales;                     // [G, N]
  const TensorView* zeros = nullptr;     // [G, N] or null
  const TensorView* bias = nullptr;      // [N] or null
  TensorView out;                        // [M, N]
  const TensorView* partial = nullptr;   // fp32 [splits, M, N] (splits > 1)
  const TensorView* counters = nullptr;  // int32 [N / 64] (splits > 1)
  int group_size = 0;
  int splits = 1;
  // Expert gather: null for a plain GEMM; `expert_weights` (fp32 [M, E]) only in columns mode.
  const TensorView* active = nullptr;          // int32 [E + 1]
  const TensorView* expert_weights = nullptr;  // fp32 [M, E], rows contiguous
  int expert_size = 0;
  bool gather_rows = false;
};

Status w4a16_gemm(const W4A16Args& args, cudaStream_t stream);

}  // namespace edgespec
