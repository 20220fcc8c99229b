// InfLLM-v2 block selection (MiniCPM4 sparse attention): compressed keys, block scores, selected
// block masks. The attention over the selected blocks is a feature of the attention family
// (attention.h): it takes the block mask produced here.
//
// Every length is in tokens. With P = kernel_size, s = kernel_stride, B = block_size, r = B / s:
//
//   sparse_compress_keys  ck[j, h] = mean(k[j*s .. j*s + P - 1, h]) (fp32 sum, one rounding) for
//                         the kernels complete within [0, to) but not within [0, from), where
//                         (from, to) = range[0..1] is read on the device: a captured CUDA graph
//                         replays with whatever range the host wrote there before the replay.
//   sparse_scores         for query t (absolute position pos[t]) and KV head g: the kernels
//                         visible to it, j < n(t) = num_kernels(min(pos[t] + 1, *kv_limit)); per
//                         query head h of the group: p_h(j) = softmax_j(scale * q[t, h] . ck[j, g]);
//                         scores[t, g, j] = sum_h p_h(j) for j < n(t), -inf for n(t) <= j < C.
//                         Two passes (log-sum-exp partials per split, then probabilities), so
//                         no [T, Hq, C] logits are ever stored. A tree (path given) scores each
//                         token with its own path's kernels past *kv_limit and n(t) =
//                         num_kernels(pos[t] + 1). A query's sums run over its kernels in splits
//                         of kernels_per_split in order, whatever T or C: with one
//                         kernels_per_split per generation, a tree token scores bitwise as its
//                         decoded path does (empty splits merge as exact zeros).
//   sparse_select         block b <= pos[t] / B scores max(scores[t, g, r*b - 1 .. r*b + r - 1])
//                         (a max-pool of kernel r + 1, stride r, padding 1; -inf when no kernel of
//                         the window is visible). Selected: blocks < init_blocks, the
//                         window_blocks blocks ending with the query's own block, and the topk
//                         best-scoring other blocks with a finite score (ties: lower block first).
//                         Queries with pos[t] + 1 < dense_len select every block up to their own.
//                         Output: bit b % 64 of word b / 64 of block_mask[t, g] is set iff
//                         block b is selected; every word of every row is written.
//
// Preconditions (checked by the entry points): k, ck, q of one dtype in {bf16, fp16, fp32}, last
// dim contiguous; 1 <= D <= kSparseMaxHeadDim; Hq % Hkv == 0 and G = Hq / Hkv <= kSparseMaxGroup;
// positions int64 [T]; range / kv_limit int32 device scalars; block_size % kernel_stride == 0;
// num_blocks <= kSparseMaxBlocks.
//
// Launch shapes: compress, grid (kernel slots, Hkv) x 128 threads, each thread one or more of the
// D dims of one compressed key (coalesced rows). Scores: the tensor-core kernels take every call
// they apply to, decode steps and trees included (sparse_scores_mma.cuh: 64 packed query rows
// per block, a tree token a warp's 16; logits in registers; prefills on wgmma with
// SparseSelectArgs::sm90, csrc/kernels/sm90/sparse_scores_sm90.h). The others (fp32, other head
// dims, G not dividing 16) take the SIMT kernels: grid (T, Hkv, splits) x 128 threads; each block
// stages q of the group's G heads and chunks of kSparseScoreChunk compressed keys in shared
// memory (fp32) and walks its split's run of kernels. Decode steps and trees of one generation
// always meet the same family: it depends on the dtype, head dim and G alone (and on
// kernels_per_split, fixed per generation, and 16-byte aligned rows). Select: grid (T, Hkv) x 256
// threads (1024 for at most 64 blocks: decode steps, small trees); the top-k of one (query, KV
// head) by a radix select over ranking keys in shared memory (sparse_select.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

constexpr int kSparseMaxHeadDim = 256;
constexpr int kSparseMaxGroup = 64;
// 4096 blocks of 64 tokens: contexts up to 256K tokens (the sort stages 8 bytes per block).
constexpr int kSparseMaxBlocks = 4096;
constexpr int kSparseScoreChunk = 32;
// Calls the tensor-core score kernels take (16-bit, head dim 64 or 128, G dividing 16;
// sparse_scores_mma.cuh) need a kernels_per_split that is a multiple of kSparseMmaKernels.
constexpr int kSparseMmaKernels = 64;

// Whether the tensor-core score kernels take a call with these shapes (sparse_scores_mma.cuh;
// the launcher also needs 16-byte aligned rows of q, ck and a tree's path kernels, and a
// kernels_per_split multiple of kSparseMmaKernels, else it runs the SIMT kernels).
inline bool sparse_scores_mma_applies(int group, int head_dim, int elem_bytes) {
  return elem_bytes == 2 && (head_dim == 64 || head_dim == 128) && group >= 1 && 16 % group == 0;
}

template <typename T>
struct SparseCompressParams {
  const T* k = nullptr;  // [S, Hkv, D]
  std::int64_t k_stride_s = 0, k_stride_h = 0;
  T* ck = nullptr;  // [C, Hkv, D]
  std::int64_t ck_stride_c = 0, ck_stride_h = 0;
  const std::int32_t* range = nullptr;  // device [2]: from, to (token lengths)
  int seqlen = 0;        // S: slots readable in k
  int max_kernels = 0;   // C: rows of ck
  int heads_kv = 0;
  int head_dim = 0;
  int kernel_size = 0;
  int kernel_stride = 0;
  int grid_kernels = 0;  // blocks along grid.x; they stride over the kernels to compute
};

template <typename T>
struct SparseScoreParams {
  const T* q = nullptr;  // [T, Hq, D]
  std::int64_t q_stride_t = 0, q_stride_h = 0;
  const T* ck = nullptr;  // [C, Hkv, D]
  std::int64_t ck_stride_c = 0, ck_stride_h = 0;
  const std::int64_t* positions = nullptr;  // [T]
  const std::int32_t* kv_limit = nullptr;   // device scalar: tokens whose kernels may be scored
  float* partial = nullptr;  // [splits, T, Hq, 2]: running max and sum of exp per split
  float* scores = nullptr;   // [T, Hkv, score_cols]
  std::int64_t score_cols = 0;  // >= splits * kernels_per_split
  int tokens = 0;
  int heads_q = 0;
  int heads_kv = 0;
  int group = 0;
  int head_dim = 0;
  int max_kernels = 0;  // C: kernels stored in ck (never read past)
  int kernel_size = 0;
  int kernel_stride = 0;
  int splits = 1;
  int kernels_per_split = 0;  // a multiple of kSparseScoreChunk
  float scale = 0.f;
  // Tree verification (null otherwise): each token's own kernels [T, E, Hkv, D], the compressed
  // keys its path completes past the committed prefix *kv_limit (edgespec/ops/sparse_attention.py
  // path_kernels). Kernel j >= num_kernels(*kv_limit) of token t is read from path[t, j - that],
  // and every kernel complete within the token's context counts: decoding the path scores the same.
  const T* path = nullptr;
  std::int64_t path_stride_t = 0, path_stride_e = 0, path_stride_h = 0;
  int path_kernels = 0;  // E
};

struct SparseSelectParams {
  const float* scores = nullptr;  // [T, Hkv, score_cols]
  std::int64_t score_cols = 0;
  const std::int64_t* positions = nullptr;  // [T]
  const std::int32_t* kv_limit = nullptr;   // device scalar
  std::uint64_t* block_mask = nullptr;      // [T, Hkv, words]
  int words = 0;
  int tokens = 0;
  int heads_kv = 0;
  int num_blocks = 0;  // blocks of the cache, ceil(S / B); bits past it stay 0
  int block_size = 0;
  int kernel_size = 0;
  int kernel_stride = 0;
  int max_kernels = 0;
  int init_blocks = 0;
  int window_blocks = 0;
  int topk = 0;
  int dense_len = 0;
  int path_kernels = -1;  // >= 0: the scores came with the tokens' path kernels (SparseScoreParams::path)
};

// Instantiated per dtype in csrc/instances/sparse_<dtype>.cu.
template <typename T>
Status launch_sparse_compress_keys(const SparseCompressParams<T>& p, cudaStream_t stream);
template <typename T>
Status launch_sparse_scores(const SparseScoreParams<T>& p, cudaStream_t stream);
Status launch_sparse_select(const SparseSelectParams& p, cudaStream_t stream);

struct SparseCompressArgs {
  TensorView k;      // [S, Hkv, D]
  TensorView ck;     // [C, Hkv, D]
  TensorView range;  // int32 [2] on the device
  int kernel_size = 0;
  int kernel_stride = 0;
  int max_new_kernels = 0;  // host upper bound on the kernels one call computes (grid size)
};

struct SparseSelectArgs {
  TensorView q;          // [T, Hq, D]
  TensorView ck;         // [C, Hkv, D]
  TensorView positions;  // int64 [T]
  TensorView kv_limit;   // int32 [1] on the device
  TensorView partial;    // fp32 [splits, T, Hq, 2] (scratch)
  TensorView scores;     // fp32 [T, Hkv, >= splits * kernels_per_split] (scratch)
  TensorView block_mask; // int64 [T, Hkv, ceil(num_blocks / 64)]
  int num_blocks = 0;
  int block_size = 0;
  int kernel_size = 0;
  int kernel_stride = 0;
  int init_blocks = 0;
  int window_blocks = 0;
  int topk = 0;
  int dense_len = 0;
  int kernels_per_split = 0;
  float scale = 0.f;
  const TensorView* path = nullptr;  // [T, E, Hkv, D] of q's dtype (tree verification) or nullptr
  // Score on the Hopper (sm_90a) wgmma kernels (csrc/kernels/sm90/sparse_scores_sm90.h): an error
  // (kUnsupported) when the build has no sm90 kernels, the GPU is not compute capability 9.0 or
  // the tensor-core score kernels do not take the call.
  bool sm90 = false;
};

// Checks the views, selects their device and launches on `stream`.
Status sparse_compress_keys(const SparseCompressArgs& args, cudaStream_t stream);
// Scores then selection: two score kernels and the select kernel, in stream order.
Status sparse_select_blocks(const SparseSelectArgs& args, cudaStream_t stream);

}  // namespace edgespec
