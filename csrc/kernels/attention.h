// Attention of T new tokens over a KV cache: causal prefill / chunked prefill, single-token decode
// and tree verification, with grouped-query attention of any ratio. One kernel family.
//
// Computes, for new token t in [0, T) and query head h in [0, Hq), with G = Hq / Hkv and
// kv = h / G (repeat-interleave order, as torch SDPA's enable_gqa):
//   out[t, h] = softmax_j(scale * q[t, h] . k[j, kv]) @ v[:, kv]   over the visible slots j
// where the T new tokens are the last T of the S cache slots (prefix P = S - T) and
//   causal: token t sees slots [0, P + t];
//   tree:   token t sees [0, P) plus slot P + j whenever bit j % 64 of word j / 64 of row t of
//           the bit-packed mask int64 [T, ceil(T / 64)] is set (its ancestors and itself).
//   block-sparse (InfLLM-v2, either of the above plus a block mask int64 [T, Hkv, W]): a slot j
//           below P + t (causal) or below P (tree) is also required to lie in a selected 64-key
//           block: bit (j / 64) % 64 of word j / 4096 of block_mask[t, kv] set. Tree slots are
//           governed by the tree mask alone. (edgespec/ops/sparse_attention.py builds the mask.)
// Scores, the softmax and the P.V accumulation are fp32 (tensor-core mma with fp32 accumulate);
// P is rounded to the storage type before its product with V, as in FlashAttention. A row that
// sees no slot at all (only possible with a malformed tree mask) is written as zeros.
//
// Preconditions (checked by attention() below):
//   q [T, Hq, D], out [T, Hq, D], k, v [S, Hkv, D] of one dtype in {bf16, fp16}; D in {64, 128};
//   1 <= T <= S; Hq % Hkv == 0; last dim stride 1, every other stride a multiple of 8 elements and
//   every base address 16-byte aligned (16-byte cp.async / vector accesses); out does not overlap
//   an input; tree_mask int64 [T, ceil(T / 64)] contiguous with T <= kAttentionMaxTreeTokens;
//   block_mask int64 [T, Hkv, W] contiguous with ceil(S / 64) <= 64 W <= 64 kAttentionMaxBlockWords;
//   with splits > 1, partial_out fp32 [splits, T * Hq, D] and partial_lse fp32 [splits, T * Hq],
//   both contiguous (scratch: their contents on entry do not matter). The launcher also refuses
//   (kUnsupported) a call whose block needs more shared memory than the GPU's opt-in limit
//   (attention_smem_bytes in attention_plan.h: long block masks with a small GQA group on a
//   99 KB sm_86/sm_89); edgespec/ops/_kernels.py checks the same first and falls back to torch.
//   seqlen (optional): int32 [1] on q's device, the slots that count, read by the kernels (clamped
//   to [T, S]); the launch shape follows the views' S, the tiles a split visits the device length.
//   With a block mask, its words cover the tiles of all S slots; tiles past seqlen are never read.
//
// Launch shape (attention.cuh): packed query rows r = t * G + g (the G query heads sharing one KV
// head are adjacent rows of one tile, so every K/V tile loaded to shared memory serves all of
// them) are cut into tiles of kBlockM rows; grid = (row tiles, Hkv, splits); each block streams its
// split's share of the K/V tiles of kAttentionBlockN keys through a two-stage cp.async pipeline.
// With splits > 1 each block writes an fp32 partial output and log-sum-exp and a second kernel
// merges the splits (flash-decoding). Tile shapes and split counts: attention_plan.h.
//
// Row invariance (chunk_tiles > 0). A token decoded alone at position p and the same token
// verified inside a draft tree get bitwise the same output, so greedy speculative decoding on the
// GPU emits exactly plain greedy's tokens. Three things make a row's arithmetic depend on its own
// logical keys only:
//   1. every warp scores whole 64-key tiles in every tile shape (attention_plan.h), so the order of
//      a row's sums does not depend on how many rows share its block;
//   2. splits are chunks of chunk_tiles tiles at fixed positions (one chunk length for a whole
//      generation: attention_invariant_chunk_tiles), not a fraction of the current length; the
//      combine adds empty chunks as exact zeros;
//   3. a tree token's keys from the tree's first tile on (the committed keys of that tile, then
//      its ancestors in depth order, then itself) are gathered into tiles at their logical
//      positions, exactly where a decode step finds them in the cache. The main kernel attends the
//      whole tiles below the tree's first tile, shared by every tree token; it stops there and
//      leaves each row's online-softmax state (unnormalised, fp32, exact) in `resume`; a tail
//      kernel with one block per (tree token, KV head, chunk) resumes it over the gathered tiles.
//      Masked keys and fully masked tiles change nothing, bit for bit (exp2(-inf) = 0, x * 1 = x).
// Causal calls need only 1 and 2: their keys are in logical order already. The sm90 kernels run
// this mode too, with the same structure on wgmma (csrc/kernels/sm90/attention.cu): rows agree
// bit for bit within one kernel family, which is why ops.attention sends a generation's decode
// steps and trees to the same one.
//
// Block-sparse calls (InfLLM-v2) are row-invariant by rank instead (rank_tiles > 0): a token
// visits only the few tiles it selected, so fixed key chunks would leave most chunks empty (a
// partial per row each) and put the whole local window in one chunk. Split z attends the token's
// selected tiles of ranks [z * rank_tiles, (z + 1) * rank_tiles), in order. A decode step's block
// holds one token; a tree runs as tail blocks alone, one per (token, KV head, split), over its
// logical tiles (committed ones in place, ancestors gathered, as in 3) as its own row selects
// them, so a tree token sees an ancestor exactly where its decoded path does. `splits` is the
// same for every step (from the sparse config: at most init + window + top-k tiles, or dense_len's);
// chunks past a token's tiles are empty and add exact zeros.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

// Head dims with compiled instances (csrc/instances/attention_<dtype>_hd<D>.cu); build_info() lists them.
constexpr int kAttentionHeadDims[] = {64, 128};
// Tree masks are staged in shared memory per block; larger trees fall back to the torch path.
constexpr int kAttentionMaxTreeTokens = 1024;
// Keys per shared-memory K/V tile (and the granularity of the split-KV partition).
constexpr int kAttentionBlockN = 64;
// Upper bound on splits accepted from a caller (grid.z; the combine kernel loops over them).
constexpr int kAttentionMaxSplits = 1024;
// Block masks are staged in shared memory per block: up to 64 words (4096 tiles, 256K slots).
constexpr int kAttentionMaxBlockWords = 64;

template <typename T>
struct AttentionParams {
  const T* q = nullptr;  // [T, Hq, D]
  std::int64_t q_stride_t = 0, q_stride_h = 0;
  const T* k = nullptr;  // [S, Hkv, D]
  std::int64_t k_stride_s = 0, k_stride_h = 0;
  const T* v = nullptr;  // [S, Hkv, D]
  std::int64_t v_stride_s = 0, v_stride_h = 0;
  const std::uint64_t* tree_mask = nullptr;  // [T, mask_words] or nullptr (causal)
  int mask_words = 0;
  const std::uint64_t* block_mask = nullptr;  // [T, Hkv, block_words] or nullptr (not block-sparse)
  int block_words = 0;
  T* out = nullptr;  // [T, Hq, D]
  std::int64_t out_stride_t = 0, out_stride_h = 0;
  float* partial_out = nullptr;  // [splits, T * Hq, D], required iff splits > 1
  float* partial_lse = nullptr;  // [splits, T * Hq] (log2 units)
  int tokens = 0;    // T
  int seqlen = 0;    // S: slots of the k/v views
  // If set, the slots that count, read on the device (clamped to [T, seqlen]): a CUDA graph
  // captured once over a cache view of seqlen slots replays at any cache length.
  const int* seqlen_dev = nullptr;
  int heads_q = 0;   // Hq
  int heads_kv = 0;  // Hkv
  int group = 0;     // Hq / Hkv
  int splits = 1;
  float scale_log2 = 0.f;  // scale * log2(e): the softmax runs in base 2 (exp2 is one MUFU op)
  // Row-invariant mode (see "Row invariance" above): split z is the chunk of tiles
  // [z * chunk_tiles, (z + 1) * chunk_tiles); 0: the splits share the visible tiles out evenly.
  int chunk_tiles = 0;
  // Row-invariant block-sparse mode (see above): split z is the selected tiles of ranks
  // [z * rank_tiles, (z + 1) * rank_tiles); trees run as tail blocks only.
  int rank_tiles = 0;
  // Invariant tree calls: per packed row (token * Hq + head), kResumeStride floats: the raw
  // online-softmax state of the chunk holding the tree's first tile (o[D], row max, the four
  // lanes' partial row sums), handed from the main kernel to the tail kernel.
  float* resume = nullptr;
};

// Floats per row of the resume buffer past the head dim: the row max, the 4 lanes' partial sums,
// padding to 16 bytes.
constexpr int kAttentionResumeExtra = 8;
constexpr int attention_resume_stride(int head_dim) { return head_dim + kAttentionResumeExtra; }

// Instantiated per (dtype, head dim) in csrc/instances/attention_<dtype>_hd<D>.cu.
template <typename T, int kHeadDim>
Status launch_attention(const AttentionParams<T>& p, cudaStream_t stream);

struct AttentionArgs {
  TensorView q;                             // [T, Hq, D]
  TensorView k;                             // [S, Hkv, D]
  TensorView v;                             // [S, Hkv, D]
  const TensorView* tree_mask = nullptr;    // int64 [T, ceil(T/64)] or nullptr (causal)
  TensorView out;                           // [T, Hq, D]
  const TensorView* partial_out = nullptr;  // fp32 [splits, T*Hq, D], given iff splits > 1
  const TensorView* partial_lse = nullptr;  // fp32 [splits, T*Hq], given iff splits > 1
  float scale = 0.f;
  int splits = 1;  // attention_num_splits() picks it; any value in [1, kAttentionMaxSplits] is correct
  const TensorView* block_mask = nullptr;   // int64 [T, Hkv, W] (block-sparse) or nullptr
  const TensorView* seqlen = nullptr;       // int32 [1]: the slots of k/v that count, or nullptr (all)
  // Row-invariant mode: chunk_tiles > 0 (attention_invariant_chunk_tiles); splits must then be
  // attention_invariant_splits(S, chunk_tiles). A tree call also needs partial_out/partial_lse
  // (even with one split) and resume: fp32 [T * Hq, attention_resume_stride(D)] scratch.
  int chunk_tiles = 0;
  const TensorView* resume = nullptr;
  // Row-invariant block-sparse mode: rank_tiles > 0 with a block mask (not with chunk_tiles); any
  // splits >= 1, the same for the steps that must agree. A tree call needs partial_out/partial_lse
  // when splits > 1, and no resume.
  int rank_tiles = 0;
  // Run the Hopper (sm_90a) wgmma kernels instead (csrc/kernels/sm90/attention_sm90.h; plan the
  // splits with attention_sm90_num_splits): an error (kUnsupported) when the build has no sm90
  // kernels, the GPU is not compute capability 9.0 or the call is one they do not take
  // (attention_sm90_rejection: the block-sparse row-invariant mode, rank_tiles).
  bool sm90 = false;
};

// Checks the views, selects their device and launches on `stream`.
Status attention(const AttentionArgs& args, cudaStream_t stream);

}  // namespace edgespec
