// Token selection from logits: greedy argmax, and the top-p (nucleus) floor that sampling needs.
//
// Computes out[t] = the index of the largest logits[t, :] (int64), with the same semantics as
// torch.argmax:
//   * ties: the lowest index wins;
//   * NaN: a NaN counts as larger than every number, so a row containing NaN returns the index of
//     its first NaN (torch propagates NaN through max/argmax the same way). A row of all -inf
//     returns 0.
// Values are compared after exact conversion to fp32, so the result equals torch's bit for bit.
//
// Preconditions (checked by argmax() below): logits [T, V] fp32/fp16/bf16 with stride 1 along V,
// any non-negative row stride, 1 <= V < 2^31; out [T] int64 (any stride).
//
// Launch shape: one 1024-thread block per row. Each thread scans a strided slice with 16-byte
// loads (1024 x 16 B = 16 KB in flight per block, about what one SM needs to cover HBM latency),
// then the block reduces (value, index) pairs with warp shuffles and one shared-memory round.
// At T = 1 with V = 128k this is a single block streaming 256 KB, bounded by one SM's bandwidth
// (roughly 1-2 us on an H100); a split-V variant is the next step if the benchmark shows it
// matters next to the LM head GEMM that precedes it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T>
struct ArgmaxParams {
  const T* logits = nullptr;
  std::int64_t row_stride = 0;
  std::int64_t* out = nullptr;
  std::int64_t out_stride = 0;
  std::int64_t rows = 0;
  int vocab = 0;
};

// Instantiated per dtype in csrc/instances/sampling_<dtype>.cu.
template <typename T>
Status launch_argmax(const ArgmaxParams<T>& p, cudaStream_t stream);

struct ArgmaxArgs {
  TensorView logits;  // [T, V]
  TensorView out;     // [T] int64
};

Status argmax(const ArgmaxArgs& args, cudaStream_t stream);

// ---- Top-p: the nucleus floor --------------------------------------------------------------------
//
// out[r] = the smallest probability that top-p sampling keeps in row r of probs; the caller keeps
// exactly the tokens with probs[r, i] >= out[r]. The rule (ops/sampling.py's torch path is the
// same rule, and tests compare the two bit for bit):
//   * probability mass is counted in fixed point, m(p) = round_to_nearest_even(p * 2^40) (p
//     clamped to [0, 1]; NaN, negatives and zeros count as 0), so sums are exact and do not depend
//     on the order in which a kernel adds them;
//   * a token is kept when the mass of the tokens strictly more probable than it is < need
//     (need = round(top_p * 2^40), at least 1). The most probable token is always kept, and tied
//     tokens are kept or dropped together (a cut through a tie would depend on an order);
//   * when the whole row's mass is < need (rounding), every token is kept: out[r] = 0.
// Rounding p to 2^-40 moves a row's mass by at most V * 2^-41 (6e-8 for 128K tokens), below the
// rounding of a float cumulative sum.
//
// Method: a most-significant-digit-first radix select over the probabilities' bits, with mass
// (not count) histograms: pass 1 finds the exponent of the floor, passes 2-4 the mantissa's top 8,
// next 8 and last 7 bits; in each pass the bin where the mass counted from the top reaches `need`
// holds the floor. Pass 1 reads the whole row, split across blocks (nucleus_split_kernel, grid
// rows x splits); one block per row then merges the splits' histograms and runs passes 2-4
// (nucleus_floor_kernel). When the floor's exponent bin holds few tokens (a peaked distribution,
// the common case) pass 2 copies them to shared memory and passes 3-4 read only those. There is no
// sort and no host synchronisation: [64, 128K] rows cost two launches and at most four reads of
// each row, against a full segmented sort plus a scan and a scatter in torch.
//
// Preconditions (checked by nucleus_floor()): probs [R, V] fp32 with stride 1 along V, any row
// stride, 1 <= V <= 2^30; 1 <= need <= 2^40; out [R] fp32; workspace int64 with at least
// nucleus_floor_workspace_words(R, V) elements, 8-byte aligned, not overlapping the others.

// Tokens per block of pass 1 (a multiple of 4 for the 16-byte loads).
constexpr std::int64_t kNucleusSplitTokens = 8192;
constexpr int kNucleusMassBits = 40;
// Bins of every radix pass (8-bit digits); pass 1's per-split histograms in the workspace have as many.
constexpr int kNucleusBins = 256;

struct NucleusFloorParams {
  const float* probs = nullptr;
  std::int64_t row_stride = 0;
  float* out = nullptr;
  std::int64_t out_stride = 0;
  std::int64_t rows = 0;
  int vocab = 0;
  int splits = 0;                      // ceil(vocab / kNucleusSplitTokens)
  std::uint64_t need = 0;              // fixed-point mass the kept tokens must reach
  unsigned long long* split_mass = nullptr;  // [rows, splits, kNucleusBins] pass-1 mass histograms
  unsigned* split_count = nullptr;           // [rows, splits, kNucleusBins] pass-1 token counts
};

Status launch_nucleus_floor(const NucleusFloorParams& p, cudaStream_t stream);

struct NucleusFloorArgs {
  TensorView probs;      // [R, V] fp32
  std::uint64_t need = 0;
  TensorView out;        // [R] fp32
  TensorView workspace;  // int64 scratch, nucleus_floor_workspace_words(R, V) elements
};

std::int64_t nucleus_floor_workspace_words(std::int64_t rows, std::int64_t vocab);
Status nucleus_floor(const NucleusFloorArgs& args, cudaStream_t stream);

}  // namespace edgespec
