// Host-only tile and split heuristics of the attention family (attention.h). Shared by the
// launcher, the Python binding (which sizes the split-KV scratch) and bench/cpp/bench_attention.
//
// Tile shapes. Query rows are packed (token, query head of the group); a warp owns 16 rows (one
// m16n8k16 row block) and the block streams K/V tiles of kAttentionBlockN = 64 keys. Every warp
// scores whole tiles: a row's arithmetic (the order of its sums) is the same in every shape, which
// is what makes the row-invariant mode below possible.
//   * rows <= 16 (decode, and trees/chunks with T * G <= 16): one row block, and the four warps
//     split the head dim of P.V between them (each scores the whole tile, redundantly: a decode
//     step is memory-bound, four times the Q.K^T mma work costs nothing measurable next to the
//     K/V bytes, and one block keeps four warps' worth of loads in flight).
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
//   The engine's target model verifies trees in the row-invariant mode (below). On mma.sync (the
//   default) a Llama-shape 64-token tree at 32K sits near the ~2.2x estimate, the price of bitwise
//   speculative == plain output. With EDGESPEC_SM90_ATTENTION=1 the mode runs on wgmma for the
//   decode steps and the trees alike (they must share a kernel family to share their bits): the
//   decode step then computes a 64-row wgmma tile for its G rows (16x the FLOPs of its 4 Llama
//   rows, ~8 GFLOP at 32K, still under its ~45 us of K/V traffic), and the tree should come to
//   ~1.2-1.4x it (bench_attention.py's sm90_invariant_tree_over_decode, with sm90_invariant_over_ours
//   saying what the decode step pays). Smaller trees (16 tokens) need neither.
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
  int warps_n = 1;  // warps sharing one row block, each on its own slice of the head dim (P.V)

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
constexpr int attention_main_bytes(int head_dim, int warps_m) {
  const int pipe = 2 * 2 * kAttentionBlockN * head_dim * 2;  // two stages of 16-bit K and V tiles
  const int epilogue = 16 * warps_m * (head_dim + 8) * 4;     // fp32 rows padded by 8 (reuses pipe)
  return pipe > epilogue ? pipe : epilogue;
}

constexpr int attention_stat_bytes(int warps_m) {
  return 2 * 16 * warps_m * 4;  // per-row 1/l and lse
}

inline std::int64_t attention_smem_bytes(int head_dim, std::int64_t tokens, int group, bool tree, int mask_words,
                                         int block_words) {
  const AttentionTileShape shape = attention_tile_shape(tokens, group, tree);
  const int span = mask_tokens_per_block(shape.block_m(), group, static_cast<int>(tokens));
  const std::int64_t mask_bytes = tree ? std::int64_t{span} * mask_words * 8 : 0;
  const std::int64_t sel_bytes = block_words > 0 ? std::int64_t{span + 2} * block_words * 8 : 0;
  return attention_main_bytes(head_dim, shape.warps_m) + attention_stat_bytes(shape.warps_m) + mask_bytes +
         sel_bytes;
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

// ---- Row-invariant mode (AttentionParams::chunk_tiles > 0; attention.h "Row invariance") ----
//
// Key chunks of a fixed length replace the splits: one length for a whole generation, so a token
// decoded at position p and the same token verified in a tree sum their keys over the same
// partition. Chosen from the longest context the generation can reach (`span`: the engine plans
// it per generation from the prompt and the token budget, KVCache.plan_span):
//   * decode at a full cache gets about kTargetBlocksPerSm blocks per SM (Hkv x chunks);
//   * a 64-token tree's fp32 partials (2 x 64 x G x D x 4 bytes per chunk and KV head, written and
//     read) stay below the chunk's K/V bytes (C x D x 2 x 2): C >= 128 G keys, i.e. 2 G tiles;
//   * at least 4 tiles, and no more chunks than the combine kernel takes.
// The price, to measure on a GPU (bench_attention.py's invariant columns): the early steps of a long
// generation decode on fewer blocks than the heuristic splits would give them.
inline int attention_invariant_chunk_tiles(std::int64_t span, int heads_q, int heads_kv, int num_sms) {
  using namespace attention_plan_detail;
  const std::int64_t tiles = attention_ceil_div(std::max<std::int64_t>(span, 1), kAttentionBlockN);
  const int group = heads_kv > 0 ? std::max(heads_q / heads_kv, 1) : 1;
  const std::int64_t fill = num_sms > 0 ? attention_ceil_div(tiles * std::max(heads_kv, 1),
                                                              std::int64_t{kTargetBlocksPerSm} * num_sms)
                                        : tiles;
  const std::int64_t chunk = std::max<std::int64_t>({4, fill, 2 * std::int64_t{group},
                                                     attention_ceil_div(tiles, kAttentionMaxSplits)});
  return static_cast<int>(std::min<std::int64_t>(chunk, tiles < 4 ? 4 : tiles));
}

// Chunks of the key range [0, seqlen) with chunk_tiles tiles each: the splits of an invariant call.
inline int attention_invariant_splits(std::int64_t seqlen, int chunk_tiles) {
  return static_cast<int>(attention_ceil_div(attention_ceil_div(std::max<std::int64_t>(seqlen, 1), kAttentionBlockN),
                                             std::max(chunk_tiles, 1)));
}

// The tail blocks of an invariant tree call (attention.cuh): one token's query rows, G of them,
// in the smallest generic shape that holds them.
inline AttentionTileShape attention_tail_shape(int group) { return group <= 16 ? AttentionTileShape{1, 4} : AttentionTileShape{4, 1}; }

// Largest group the tail blocks take (one token's rows in one 64-row block).
constexpr int kAttentionMaxTailGroup = 64;

// Chunks one token's tail can touch: its tiles run from the tree's first tile to the tile of its
// own position, at most ceil((63 + T) / 64) + 1 tiles (grid.z of the tail kernel; empty ones exit).
inline int attention_tail_chunks(std::int64_t tokens, int chunk_tiles) {
  const std::int64_t tiles = (63 + tokens - 1) / kAttentionBlockN + 1;
  return static_cast<int>(attention_ceil_div(tiles, std::max(chunk_tiles, 1)) + 1);
}

// Bytes of a tail block's tree index: the tree tokens' depths and the token's ancestor slots
// (int16 [T] each), rounded up to 16.
EDGESPEC_HOST_DEVICE inline int attention_tail_index_bytes(int tokens) { return (4 * tokens + 15) / 16 * 16; }

// Shared memory of one tail block: the generic tile's, one tree-mask row, the tree index, and
// with a block mask (block_words > 0) the token's selection row with its union and intersection.
inline std::int64_t attention_tail_smem_bytes(int head_dim, std::int64_t tokens, int group, int mask_words,
                                              int block_words = 0) {
  const AttentionTileShape shape = attention_tail_shape(group);
  return attention_main_bytes(head_dim, shape.warps_m) + attention_stat_bytes(shape.warps_m) +
         std::int64_t{mask_words} * 8 + attention_tail_index_bytes(static_cast<int>(tokens)) +
         (block_words > 0 ? std::int64_t{3} * block_words * 8 : 0);
}

// Packed query rows per block of the Hopper kernels (csrc/kernels/sm90: two warpgroups of 64), of
// which one block fits an SM (registers): their splits aim at one block per SM.
constexpr int kAttentionSm90BlockRows = 128;

// Shared memory of one Hopper block of `warpgroups` warpgroups (two; one for a call of at most 64
// packed rows): a Q tile per warpgroup and two stages of K and V tiles (64 rows of head_dim 16-bit
// elements each) plus 1 KB to align them to the 128-byte swizzle's atom; with a block mask also the
// selection rows of the tokens the block spans, their union and each warpgroup's union and
// intersection words (at most 166 KB, under every cc 9.0 GPU's 227 KB).
constexpr int attention_sm90_tile_bytes(int head_dim, int warpgroups = 2) {
  return (warpgroups + 4) * 64 * head_dim * 2 + 1024;
}

inline int attention_sm90_smem_bytes(int head_dim, std::int64_t tokens, int group, int block_words,
                                     int warpgroups = 2) {
  if (block_words <= 0) return attention_sm90_tile_bytes(head_dim, warpgroups);
  const int span = mask_tokens_per_block(kAttentionSm90BlockRows, group, static_cast<int>(tokens));
  return attention_sm90_tile_bytes(head_dim, warpgroups) + (span + 5) * block_words * 8;
}

// Shared memory of one Hopper tail block (row-invariant trees; one warpgroup): its tiles and the
// tree index (at most 81 KB + 4 KB for 1024 tokens).
inline int attention_sm90_tail_smem_bytes(int head_dim, std::int64_t tokens) {
  return attention_sm90_tile_bytes(head_dim, 1) + attention_tail_index_bytes(static_cast<int>(tokens));
}

inline int attention_sm90_num_splits(std::int64_t tokens, std::int64_t seqlen, int heads_q, int heads_kv,
                                     int num_sms) {
  if (num_sms <= 0 || heads_kv <= 0 || heads_q % heads_kv != 0 || tokens <= 0 || seqlen <= 0) return 1;
  const std::int64_t row_tiles = attention_ceil_div(tokens * (heads_q / heads_kv), kAttentionSm90BlockRows);
  return attention_splits_for_blocks(row_tiles * heads_kv, seqlen, num_sms);
}

}  // namespace edgespec
