// Host-only tile and split heuristics of the attention family (attention.h). Shared by the
// launcher, the Python binding (which sizes the split-KV scratch) and bench/cpp/bench_attention.
//
// Tile shapes. Query rows are packed (token, query head of the group); a warp owns 16 rows (one
// m16n8k16 row block) and the block streams K/V tiles of kAttentionBlockN = 64 keys.
//   * rows <= 16 (decode, and trees/chunks with T * G <= 16): one row block, and the four warps
//     split each 64-key tile between them (16 keys each) with private softmax states merged at
//     the end. A decode step is memory-bound; what matters is that one block keeps many K/V bytes
//     in flight and that the G heads of a group share every load, not that the mma rows are full.
//   * otherwise 4 warps x 16 rows (64-row tiles, 128 threads): tree verification and short
//     chunks, where few row tiles exist and splits supply the parallelism.
//   * causal with more than 128 packed rows: 8 warps x 16 rows (128-row tiles, 256 threads), so
//     each K/V tile loaded to shared memory serves twice the rows (prefill is compute-bound and
//     the K/V smem traffic per FLOP halves).
//
// Splits (flash-decoding). Blocks before splitting: row tiles x Hkv. When that is below about two
// blocks per SM (both 128-thread shapes fit two or more per SM on A100/H100), the key range is
// cut into `splits` equal runs of tiles, each block writes an fp32 partial output plus its
// log-sum-exp and a combine kernel merges them. A split keeps at least kMinTilesPerSplit tiles
// (128 keys) so the partial traffic (2 x splits x Hq x D x 4 bytes) stays small against the K/V
// bytes (S x Hkv x D x 4), and at most kMaxAutoSplits splits are made.
//
// Roofline of the targets (H100, ~3.0 TB/s measured copy, bf16, 32K context):
//   decode, Llama-3.1-8B (8 KV heads, D 128): K/V = 32K x 8 x 128 x 2 x 2 B = 134 MB -> ~45 us.
//   tree of 64 tokens, same shape: 4 x 64 x 32 heads x 32K x 128 = 34 GFLOP, i.e. ~100 us at the
//   ~350 TFLOP/s that mma.sync flash kernels reach on H100 (~2.2x decode), ~55 us at FA3-class
//   wgmma rates. So "tree <= 1.3x decode" at T = 64 needs the Hopper (wgmma) path for Llama
//   shapes; for MiniCPM4 (2 KV heads: 4x fewer K/V bytes, the same FLOPs) it is out of reach of
//   the hardware (>= 3x even at the dense-bf16 peak). Trees of 16 or fewer tokens (CPM.cu's W4A16
//   default is 12) stay under the decode time with mma.sync. Prefill is compute-bound the same
//   way: parity with cuDNN/FA3-backed SDPA on Hopper needs wgmma; on A100/Ada mma.sync is the
//   right instruction.
//
// The Hopper kernels (csrc/kernels/sm90/attention.cu, opt-in: EDGESPEC_SM90_ATTENTION=1) take
// prefill and trees on wgmma with 128-row blocks, one per SM (168 registers x 256 threads), and plan
// their splits with attention_sm90_num_splits. Predictions to check on the first H100 run
// (bench_attention.py's sm90_* columns): prefill 4K-32K at 450-550 TFLOP/s against the generic
// kernel's ~300 (S and P.V products are serialised with the softmax inside a warpgroup, so not
// FA3's ~650); Llama-3.1-8B tree-64 at 32K in 60-75 us, 1.3-1.7x the decode step. A miss below
// 400 TFLOP/s points at the lockstep of the two warpgroups (both wait at every tile's barrier):
// the next step is FA3's ping-pong (named barriers) and a TMA producer warp.
//
// Status: correct on the CPU emulator (tests/test_attention_kernels.py, test_attention_sm90_kernels.py),
// never run on a GPU. Tuning history: first version, written without access to a GPU; the constants
// above are first estimates from the roofline. Retune on a lent H100/H200/A100 with
// bench/python/bench_attention.py (and bench/cpp/bench_attention) and record what changed and why
// here.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/attention.h"

// attention.cuh calls mask_tokens_per_block() in its kernel; host code (bindings, benchmarks)
// includes this header without nvcc.
#if defined(__CUDACC__)
#define EDGESPEC_HOST_DEVICE __host__ __device__
#else
#define EDGESPEC_HOST_DEVICE
#endif

namespace edgespec {

struct AttentionTileShape {
  int warps_m = 4;  // warps along the packed query rows (16 rows each)
  int warps_n = 1;  // warps sharing one row block, each on its own slice of every K/V tile

  int block_m() const { return 16 * warps_m; }
  int threads() const { return 32 * warps_m * warps_n; }
};

namespace attention_plan_detail {
constexpr int kMinTilesPerSplit = 2;
constexpr int kMaxAutoSplits = 128;
constexpr int kTargetBlocksPerSm = 2;
}  // namespace attention_plan_detail

inline AttentionTileShape attention_tile_shape(std::int64_t tokens, int group, bool tree) {
  const std::int64_t rows = tokens * group;
  if (rows <= 16) return {1, 4};
  if (!tree && rows > 128) return {8, 1};
  return {4, 1};
}

// Largest number of distinct tokens among block_m consecutive packed rows (their tree-mask and
// block-selection rows are staged in shared memory): floor((block_m - 1) / G) + 2, at most T.
EDGESPEC_HOST_DEVICE inline int mask_tokens_per_block(int block_m, int group, int tokens) {
  const int span = (block_m - 1) / group + 2;
  return span < tokens ? span : tokens;
}

// Shared memory of one block, in bytes. attention.cuh's Tile takes its two fixed parts from here;
// the launcher checks the total against the GPU's opt-in limit (returning kUnsupported rather than
// failing the launch), and edgespec/ops/_kernels.py asks for it (through the binding) to fall back
// to torch first. The variable parts: the tree-mask rows and the block-selection rows (plus their
// union and intersection words) of the tokens a block spans.
constexpr int attention_main_bytes(int head_dim, int warps_m, int warps_n) {
  const int pipe = 2 * 2 * kAttentionBlockN * head_dim * 2;       // two stages of 16-bit K and V tiles
  const int epilogue = warps_n * 16 * warps_m * (head_dim + 8) * 4;  // fp32 rows padded by 8 (reuses pipe)
  return pipe > epilogue ? pipe : epilogue;
}

constexpr int attention_stat_bytes(int warps_m, int warps_n) {
  return (2 * warps_n + 2) * 16 * warps_m * 4;  // per-warp row max and sum, then per-row 1/l and lse
}

inline std::int64_t attention_smem_bytes(int head_dim, std::int64_t tokens, int group, bool tree, int mask_words,
                                         int block_words) {
  const AttentionTileShape shape = attention_tile_shape(tokens, group, tree);
  const int span = mask_tokens_per_block(shape.block_m(), group, static_cast<int>(tokens));
  const std::int64_t mask_bytes = tree ? std::int64_t{span} * mask_words * 8 : 0;
  const std::int64_t sel_bytes = block_words > 0 ? std::int64_t{span + 2} * block_words * 8 : 0;
  return attention_main_bytes(head_dim, shape.warps_m, shape.warps_n) +
         attention_stat_bytes(shape.warps_m, shape.warps_n) + mask_bytes + sel_bytes;
}

inline std::int64_t attention_ceil_div(std::int64_t a, std::int64_t b) { return (a + b - 1) / b; }

// Number of key-range splits that brings `blocks` blocks (row tiles x Hkv) up to about `target`;
// 1 means no partials and no combine kernel.
inline int attention_splits_for_blocks(std::int64_t blocks, std::int64_t seqlen, std::int64_t target) {
  using namespace attention_plan_detail;
  if (blocks <= 0 || seqlen <= 0 || blocks >= target) return 1;
  const std::int64_t tiles = attention_ceil_div(seqlen, kAttentionBlockN);
  std::int64_t splits = attention_ceil_div(target, blocks);
  splits = std::min<std::int64_t>({splits, attention_ceil_div(tiles, kMinTilesPerSplit), kMaxAutoSplits});
  splits = std::max<std::int64_t>(splits, 1);
  // Equal runs of whole tiles; recount so that no split of the full key range is empty.
  const std::int64_t per_split = attention_ceil_div(tiles, splits);
  return static_cast<int>(attention_ceil_div(tiles, per_split));
}

// Number of key-range splits for a call of the generic kernels; num_sms <= 0 (unknown) disables
// splitting.
inline int attention_num_splits(std::int64_t tokens, std::int64_t seqlen, int heads_q, int heads_kv,
                                bool tree, int num_sms) {
  using namespace attention_plan_detail;
  if (num_sms <= 0 || heads_kv <= 0 || heads_q % heads_kv != 0 || tokens <= 0 || seqlen <= 0) return 1;
  const int group = heads_q / heads_kv;
  const AttentionTileShape shape = attention_tile_shape(tokens, group, tree);
  const std::int64_t row_tiles = attention_ceil_div(tokens * group, shape.block_m());
  return attention_splits_for_blocks(row_tiles * heads_kv, seqlen, std::int64_t{kTargetBlocksPerSm} * num_sms);
}

// Packed query rows per block of the Hopper kernels (csrc/kernels/sm90: two warpgroups of 64), of
// which one block fits an SM (registers): their splits aim at one block per SM.
constexpr int kAttentionSm90BlockRows = 128;

inline int attention_sm90_num_splits(std::int64_t tokens, std::int64_t seqlen, int heads_q, int heads_kv,
                                     int num_sms) {
  if (num_sms <= 0 || heads_kv <= 0 || heads_q % heads_kv != 0 || tokens <= 0 || seqlen <= 0) return 1;
  const std::int64_t row_tiles = attention_ceil_div(tokens * (heads_q / heads_kv), kAttentionSm90BlockRows);
  return attention_splits_for_blocks(row_tiles * heads_kv, seqlen, num_sms);
}

}  // namespace edgespec
