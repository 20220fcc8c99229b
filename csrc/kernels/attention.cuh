// Attention kernels and their launcher; see attention.h for the contract and attention_plan.h for
// the choice of tile shape and splits. Included by the generated instance files
// csrc/instances/attention_<dtype>_hd<D>.cu, and by the Hopper kernels (csrc/kernels/sm90/attention.cu)
// for the split combine kernel.
//
// One block: kBlockM packed query rows (r = token * G + head-in-group) of one KV head, one split
// of the key range. Prologue: the block's tree-mask rows (one 64-bit word per row per 64 tree
// tokens, read once, coalesced) and its Q tile go to shared memory; each warp keeps its 16 rows
// of Q as mma A fragments in registers for the whole kernel. Main loop, per tile of 64 keys:
// cp.async brings the next K/V tile while the current one is used; S = Q.K^T with m16n8k16 mma;
// scale, mask (only tiles that cross the causal diagonal, hold tree tokens or, block-sparse, are
// not selected by every token of the block pay for it), online
// softmax in base 2; O += P.V with P re-packed from the S accumulators as A fragments (no shared
// memory round trip; the decode shape's four warps each take a quarter of the head dim here, all
// scoring the whole tile). Epilogue: the rows go through shared memory to coalesced stores of
// either the normalised output or, with splits, an fp32 partial output and its log-sum-exp for
// the combine kernel.
// Block-sparse (InfLLM-v2 block mask): the block visits only the union of the tiles its tokens
// selected (a bitset in shared memory; splits share that union out by rank), and masks each row's
// keys outside its own token's selection.
// Row-invariant trees (attention.h "Row invariance"): the same kernel with kTail runs the tail
// blocks, whose tiles are gathered per token in logical order and whose state resumes where the
// main kernel handed it over (`resume`).
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/vec.cuh"
#include "kernels/attention.h"
#include "kernels/attention_plan.h"

namespace edgespec {

namespace attention_detail {

constexpr int kBlockN = kAttentionBlockN;
constexpr int kCombineWarps = 4;
constexpr unsigned kFullMask = 0xffffffffu;

// Shared-memory tiles (Q, K, V) are rows of kHeadDim 16-bit elements cut into 16-byte chunks;
// chunk c of row r is stored at chunk position c ^ (r % 8). The 8 row addresses of one ldmatrix
// matrix then fall in 8 different 16-byte bank groups (D = 64: 128-byte rows; D = 128: the XOR
// keeps the low 3 bits of the chunk index distinct), so neither the cp.async writes nor the
// ldmatrix reads conflict. Returns the element offset of chunk `chunk` of row `row`.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

template <int kHeadDim, int kWarpsM, int kWarpsN>
struct Tile {
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarpsM;
  static constexpr int kChunks = kHeadDim / 8;          // 16-byte chunks per row
  static constexpr int kKeyFrags = kBlockN / 8;         // n8 blocks of S (every warp scores the whole tile)
  static constexpr int kDimFrags = kHeadDim / 8 / kWarpsN;  // n8 blocks of O per warp (its slice of D)
  static constexpr int kDimSteps = kHeadDim / 16;       // k16 steps of Q.K^T
  static constexpr int kKeySteps = kBlockN / 16;        // k16 steps of P.V
  static constexpr int kTileElems = kBlockN * kHeadDim;  // one K or V tile
  static constexpr int kStageElems = 2 * kTileElems;     // K tile, then V tile
  // fp32 epilogue rows padded by 8 floats: the float2 stores of one fragment row then spread
  // over all 32 banks instead of hitting the same 8.
  static constexpr int kORow = kHeadDim + 8;
  // Two stages of 16-bit K and V, or (reused) the epilogue's rows; then the row statistics.
  static constexpr int kMainBytes = attention_main_bytes(kHeadDim, kWarpsM);
  static constexpr int kStatBytes = attention_stat_bytes(kWarpsM);
  static_assert(kMainBytes >= 2 * kStageElems * 2 && kMainBytes >= kBlockM * kORow * 4,
                "attention_main_bytes covers the pipeline and the epilogue");

  static_assert(kBlockM * kHeadDim <= kStageElems, "the Q tile is staged in the second pipeline stage");
  static_assert(kDimFrags % 2 == 0, "a warp's slice of the head dim must be whole pairs of n8 blocks");
  static_assert((kBlockN * kChunks) % kThreads == 0, "every thread copies the same number of K/V chunks");
};

// Block-sparse helpers over a bitset of 64-key tiles (bit t % 64 of word t / 64 is tile t).
__device__ __forceinline__ std::uint64_t bits_below(int n) {
  return n <= 0 ? 0ull : (n >= 64 ? ~0ull : (1ull << n) - 1);
}

// First set tile after `after`, or -1.
__device__ __forceinline__ int next_set_tile(const std::uint64_t* words, int nwords, int after) {
  int w = (after + 1) >> 6;
  if (w >= nwords) return -1;
  std::uint64_t x = words[w] & ~bits_below((after + 1) & 63);
  while (x == 0) {
    if (++w >= nwords) return -1;
    x = words[w];
  }
  return w * 64 + __ffsll(static_cast<long long>(x)) - 1;
}

// The set tile of rank n (0-based), or -1.
__device__ __forceinline__ int nth_set_tile(const std::uint64_t* words, int nwords, int n) {
  for (int w = 0; w < nwords; ++w) {
    std::uint64_t x = words[w];
    const int c = __popcll(x);
    if (n < c) {
      for (int i = 0; i < n; ++i) x &= x - 1;  // drop the n lowest set bits
      return w * 64 + __ffsll(static_cast<long long>(x)) - 1;
    }
    n -= c;
  }
  return -1;
}

// Word w of the tiles that the selection rows [first, last] of sel_rows (bw words each) pick:
// `any` their union, plus every tile from first_tree_tile on (tree slots: the tree mask decides
// there) and minus every tile from `visible` on (past what those rows can see); `all` their
// intersection (tiles no row needs to mask by selection).
struct SelectionWord {
  std::uint64_t any = 0, all = ~0ull;
};

__device__ __forceinline__ SelectionWord selection_word(const std::uint64_t* sel_rows, int bw, int first, int last,
                                                        int w, int first_tree_tile, int visible) {
  SelectionWord s;
  for (int u = first; u <= last; ++u) {
    s.any |= sel_rows[u * bw + w];
    s.all &= sel_rows[u * bw + w];
  }
  s.any = (s.any | ~bits_below(first_tree_tile - w * 64)) & bits_below(visible - w * 64);
  return s;
}

// Split `split`'s share of the set tiles of `words`: per_split of them by rank (0: an equal share
// of `splits`). Returns how many; *first is the first of them.
__device__ __forceinline__ int split_tiles_by_rank(const std::uint64_t* words, int bw, int split, int splits,
                                                   int per_split, int* first) {
  int total = 0;
  for (int w = 0; w < bw; ++w) total += __popcll(words[w]);
  if (per_split == 0) per_split = (total + splits - 1) / splits;
  const int count = max(min(per_split, total - split * per_split), 0);
  *first = count > 0 ? nth_set_tile(words, bw, split * per_split) : 0;
  return count;
}

// The bits of tree token `token`'s mask row: its ancestors and itself, i.e. its depth + 1.
__device__ __forceinline__ int tree_path_length(const std::uint64_t* tree_mask, int mask_words, int token) {
  int bits = 0;
  for (int w = 0; w < mask_words; ++w) bits += __popcll(__ldg(tree_mask + static_cast<std::int64_t>(token) * mask_words + w));
  return bits;
}

// A tail block's tree index (row-invariant trees): depth_of[j] for every tree token j and
// ancestor[d], the tree index of the block's token's ancestor at depth d (itself at its own
// depth), from the token's mask row `own_row`. Tree token j sits at depth popcount(row j) - 1, and
// a token's row sets exactly its ancestors and itself, one per depth. All threads of the block
// call it; it ends with a barrier (the tile loads read the ancestors).
__device__ __forceinline__ void tail_ancestors(const std::uint64_t* tree_mask, int mask_words, int tokens,
                                               const std::uint64_t* own_row, short* depth_of, short* ancestor,
                                               int tid, int threads) {
  for (int j = tid; j < tokens; j += threads) {
    ancestor[j] = -1;  // stays -1 only for a malformed mask (a depth the row has no token at)
    depth_of[j] = static_cast<short>(tree_path_length(tree_mask, mask_words, j) - 1);
  }
  __syncthreads();
  for (int j = tid; j < tokens; j += threads) {
    if (((own_row[j >> 6] >> (j & 63)) & 1u) && depth_of[j] >= 0) ancestor[depth_of[j]] = static_cast<short>(j);
  }
  __syncthreads();
}

// kTail (row-invariant tree calls only; attention.h "Row invariance"): the block attends one tree
// token's tail (blockIdx.x), the gathered tiles from the tree's first tile to the token's own,
// within one chunk (the tree's first chunk + blockIdx.z), resuming the main kernel's state there.
template <typename T, int kHeadDim, int kWarpsM, int kWarpsN, bool kTree, bool kTail>
__global__ void __launch_bounds__(Tile<kHeadDim, kWarpsM, kWarpsN>::kThreads)
    attention_kernel(const AttentionParams<T> p) {
  static_assert(kTree || !kTail, "tail blocks exist for tree calls only");
  using C = Tile<kHeadDim, kWarpsM, kWarpsN>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* const pipe = reinterpret_cast<T*>(smem);     // [2 stages][K | V][kBlockN][kHeadDim], swizzled
  T* const q_tile = pipe + C::kStageElems;        // stage 1, until Q is in registers
  float* const o_part = reinterpret_cast<float*>(smem);  // epilogue: [kBlockM][kORow]
  float* const row_inv = reinterpret_cast<float*>(smem + C::kMainBytes);  // [kBlockM]
  float* const row_lse = row_inv + C::kBlockM;                            // [kBlockM]
  std::uint64_t* const mask_rows = reinterpret_cast<std::uint64_t*>(row_lse + C::kBlockM);
  // Block-sparse: the selected-tile words of the block's tokens, then their union and intersection.
  const int span_tokens = kTail ? 1 : mask_tokens_per_block(C::kBlockM, p.group, p.tokens);
  std::uint64_t* const tree_index = mask_rows + (kTree ? span_tokens * p.mask_words : 0);
  // Tail blocks: the depth of every tree token, then the token's ancestors by depth (tree indices).
  short* const depth_of = reinterpret_cast<short*>(tree_index);
  short* const ancestor = depth_of + p.tokens;
  std::uint64_t* const sel_rows = tree_index + (kTail ? attention_tail_index_bytes(p.tokens) / 8 : 0);
  std::uint64_t* const sel_any = sel_rows + span_tokens * p.block_words;
  std::uint64_t* const sel_all = sel_any + p.block_words;

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int wm = warp % kWarpsM;
  const int wn = warp / kWarpsM;
  const int group = p.group;
  const int rows = p.tokens * group;
  // Causal row tiles further down see more keys; launching them first shortens the tail.
  const int tile_m = kTree ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x - 1 - blockIdx.x);
  // A tail block holds the G rows of token blockIdx.x (the rest of its row block is padding).
  const int row0 = kTail ? tile_m * group : tile_m * C::kBlockM;
  const int row_end = kTail ? row0 + group : rows;
  const int kv_head = blockIdx.y;
  // The slots that count: the views' S, or the device-side length of a graph replay.
  const int seqlen = p.seqlen_dev != nullptr ? max(p.tokens, min(__ldg(p.seqlen_dev), p.seqlen)) : p.seqlen;
  const int prefix = seqlen - p.tokens;
  const int tok_first = row0 / group;
  const int tok_last = kTail ? tok_first : min((row0 + C::kBlockM - 1) / group, p.tokens - 1);
  const bool invariant = p.chunk_tiles > 0;
  // Row-invariant block-sparse mode (attention.h): split z takes selected tiles by rank.
  const bool ranked = p.rank_tiles > 0;
  // Row-invariant trees: the tiles from here on hold tree tokens, attended as per-token tails.
  const int tree_tile = prefix / kBlockN;
  // A tail token's last logical key: its own position (the prefix, then its depth).
  int last_key = 0;
  if constexpr (kTail) last_key = prefix + tree_path_length(p.tree_mask, p.mask_words, tok_first) - 1;

  // This block's keys: its split's run of whole tiles, cut after the last slot any row here sees.
  const int visible_end = kTail ? last_key + 1 : kTree ? seqlen : prefix + tok_last + 1;
  const int tiles_visible = (visible_end + kBlockN - 1) / kBlockN;
  const int tiles_total = (seqlen + kBlockN - 1) / kBlockN;
  int split = blockIdx.z;
  int tile_begin, tile_end;
  if (invariant) {
    // Fixed chunks; a tree's tiles from tree_tile on belong to the tail blocks.
    if constexpr (kTail) split += tree_tile / p.chunk_tiles;
    tile_begin = split * p.chunk_tiles;
    tile_end = min(tile_begin + p.chunk_tiles, tiles_visible);
    if constexpr (kTail) {
      tile_begin = max(tile_begin, tree_tile);
      tile_end = min(tile_end, last_key / kBlockN + 1);
    } else if constexpr (kTree) {
      tile_end = min(tile_end, tree_tile);
    }
  } else {
    const int tiles_per_split = (tiles_total + p.splits - 1) / p.splits;
    tile_begin = split * tiles_per_split;
    tile_end = min(tile_begin + tiles_per_split, tiles_visible);
  }
  // The token's tail misses this chunk: nothing to write. (The first tail chunk always writes its
  // partial, even for a malformed row that sees no tree token, so no stale partial is combined.)
  if (kTail && invariant && blockIdx.z > 0 && tile_begin >= tile_end) return;
  // The chunk holding the tree's first tile, when it also holds committed tiles before it: the
  // main kernel hands its rows' state over to the tail blocks there instead of finishing them.
  const bool handover = kTree && invariant && split == tree_tile / p.chunk_tiles && tree_tile % p.chunk_tiles != 0;
  const bool sparse = p.block_mask != nullptr;
  // The tiles this block visits: [tile_first, ...) in order, tile_count of them (sparse: the set
  // tiles of sel_any, the splits sharing them out by rank).
  int tile_first = tile_begin;
  int tile_count = max(tile_end - tile_begin, 0);
  // Slots below full_end are visible to every row of the block: tiles entirely below it skip
  // the mask (for a long prefix, all but the last one or two tiles). Tail tiles are always masked.
  const int full_end = kTail ? 0 : kTree ? prefix : prefix + tok_first + 1;

  if constexpr (kTree) {
    const int words = (tok_last - tok_first + 1) * p.mask_words;
    const std::uint64_t* src = p.tree_mask + static_cast<std::int64_t>(tok_first) * p.mask_words;
    for (int i = tid; i < words; i += C::kThreads) mask_rows[i] = src[i];
  }

  if constexpr (kTail) {
    tail_ancestors(p.tree_mask, p.mask_words, p.tokens, mask_rows, depth_of, ancestor, tid, C::kThreads);
  }

  if (sparse) {
    const int span = tok_last - tok_first + 1;
    const int bw = p.block_words;
    for (int i = tid; i < span * bw; i += C::kThreads) {
      const std::int64_t tok = tok_first + i / bw;
      sel_rows[i] = p.block_mask[(tok * p.heads_kv + kv_head) * bw + i % bw];
    }
    __syncthreads();
    // Tiles holding tree slots are always visited (the tree mask decides there); tiles past what
    // the block can see never are. A tail's tiles are logical: its token's selection decides,
    // exactly as for the decoded token (ancestors included).
    const int first_tree_tile = kTree && !kTail ? tree_tile : tiles_total;
    for (int w = tid; w < bw; w += C::kThreads) {
      const SelectionWord s = selection_word(sel_rows, bw, 0, span - 1, w, first_tree_tile, tiles_visible);
      sel_any[w] = s.any;
      sel_all[w] = s.all;
    }
    __syncthreads();
    // Ranked: a fixed number of tiles per split, so a token's splits do not depend on the call.
    tile_count = split_tiles_by_rank(sel_any, bw, split, p.splits, ranked ? p.rank_tiles : 0, &tile_first);
  }

  for (int i = tid; i < C::kBlockM * C::kChunks; i += C::kThreads) {
    const int r = i / C::kChunks;
    const int c = i % C::kChunks;
    const int row = row0 + r;
    const bool valid = row < row_end;
    const T* src = p.q;
    if (valid) {
      const int tok = row / group;
      const int head = kv_head * group + row % group;
      src = p.q + tok * p.q_stride_t + head * p.q_stride_h + c * 8;
    }
    cp_async_16(q_tile + swizzle<kHeadDim>(r, c), src, valid);
  }
  cp_async_commit();

  const T* const k_head = p.k + kv_head * p.k_stride_h;
  const T* const v_head = p.v + kv_head * p.v_stride_h;
  auto load_tile = [&](int tile, int stage) {
    T* k_dst = pipe + stage * C::kStageElems;
    T* v_dst = k_dst + C::kTileElems;
    const int key0 = tile * kBlockN;
#pragma unroll
    for (int j = 0; j < kBlockN * C::kChunks / C::kThreads; ++j) {
      const int i = tid + j * C::kThreads;
      const int r = i / C::kChunks;
      const int c = i % C::kChunks;
      const int key = key0 + r;
      // Tail tiles are logical: committed keys in place, then the token's ancestors by depth.
      const int node = kTail && key >= prefix && key <= last_key ? ancestor[key - prefix] : 0;
      const bool valid = kTail ? key <= last_key && node >= 0 : key < seqlen;
      const int slot = kTail && key >= prefix ? prefix + node : key;
      const std::int64_t k_off = valid ? slot * p.k_stride_s + c * 8 : 0;
      const std::int64_t v_off = valid ? slot * p.v_stride_s + c * 8 : 0;
      cp_async_16(k_dst + swizzle<kHeadDim>(r, c), k_head + k_off, valid);
      cp_async_16(v_dst + swizzle<kHeadDim>(r, c), v_head + v_off, valid);
    }
  };

  if (tile_count > 0) load_tile(tile_first, 0);
  cp_async_commit();
  cp_async_wait<1>();  // the Q group, committed first, has landed
  __syncthreads();

  std::uint32_t q_frag[C::kDimSteps][4];
#pragma unroll
  for (int ks = 0; ks < C::kDimSteps; ++ks) {
    ldmatrix_x4(q_frag[ks], q_tile + swizzle<kHeadDim>(wm * 16 + lane % 16, ks * 2 + lane / 16));
  }
  __syncthreads();  // stage 1 is overwritten by the first prefetch below

  // This thread's fragment rows are lr0 and lr0 + 8 of the block; padding rows past the last
  // token borrow its token (their Q is zero and they are never written).
  const int lr0 = wm * 16 + lane / 4;
  int row_tok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) row_tok[i] = kTail ? tok_first : min((row0 + lr0 + 8 * i) / group, p.tokens - 1);

  // The packed (token * Hq + head) index of a block row: partials, lse and resume rows.
  auto packed_row = [&](int row) {
    return static_cast<std::int64_t>(row / group) * p.heads_q + kv_head * group + row % group;
  };
  constexpr int kResume = kHeadDim + kAttentionResumeExtra;  // attention_resume_stride
  const int dim0 = wn * C::kDimFrags * 8 + (lane % 4) * 2;  // this thread's first O column

  float o_acc[C::kDimFrags][4];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};  // this thread's columns only; reduced over the quad at the end
#pragma unroll
  for (int d = 0; d < C::kDimFrags; ++d) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o_acc[d][e] = 0.f;
  }
  if (kTail && handover) {
    // Resume the state the main kernel left after the chunk's committed tiles (exact fp32).
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + lr0 + 8 * i;
      if (row >= row_end) continue;
      const float* src = p.resume + packed_row(row) * kResume;
#pragma unroll
      for (int d = 0; d < C::kDimFrags; ++d) {
        o_acc[d][2 * i] = src[dim0 + d * 8];
        o_acc[d][2 * i + 1] = src[dim0 + d * 8 + 1];
      }
      row_max[i] = src[kHeadDim];
      row_sum[i] = src[kHeadDim + 1 + lane % 4];
    }
  }

  int tile = tile_first;
  for (int it = 0; it < tile_count; ++it) {
    const int stage = it & 1;
    const int next = it + 1 < tile_count ? (sparse ? next_set_tile(sel_any, p.block_words, tile) : tile + 1) : -1;
    if (next >= 0) load_tile(next, stage ^ 1);
    cp_async_commit();   // possibly empty: keeps the group count uniform for wait<1>
    cp_async_wait<1>();  // everything but the prefetch just issued: this tile is here
    __syncthreads();
    const T* const k_tile = pipe + stage * C::kStageElems;
    const T* const v_tile = k_tile + C::kTileElems;

    float s[C::kKeyFrags][4];
#pragma unroll
    for (int j = 0; j < C::kKeyFrags; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int ks = 0; ks < C::kDimSteps; ++ks) {
#pragma unroll
      for (int kp = 0; kp < C::kKeyFrags / 2; ++kp) {
        // Matrices: keys +0..7 | +0..7 | +8..15 | +8..15 of this pair of n8 blocks, dims
        // low | high 8 of this k16 step: b[0..1] feed n-block 2kp, b[2..3] n-block 2kp + 1.
        const int key = kp * 16 + lane % 8 + (lane / 16) * 8;
        std::uint32_t b[4];
        ldmatrix_x4(b, k_tile + swizzle<kHeadDim>(key, ks * 2 + (lane / 8) % 2));
        mma_16816<T>(s[2 * kp], q_frag[ks], b[0], b[1]);
        mma_16816<T>(s[2 * kp + 1], q_frag[ks], b[2], b[3]);
      }
    }

    // Sparse: a tile not selected by every token of the block is masked row by row.
    const bool masked = (tile + 1) * kBlockN > full_end || (sparse && !((sel_all[tile >> 6] >> (tile & 63)) & 1u));
    bool row_sel[2] = {true, true};
    if (sparse) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        row_sel[i] = (sel_rows[(row_tok[i] - tok_first) * p.block_words + (tile >> 6)] >> (tile & 63)) & 1u;
      }
    }
    const int key_base = tile * kBlockN + (lane % 4) * 2;
#pragma unroll
    for (int j = 0; j < C::kKeyFrags; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = __fmul_rn(s[j][e], p.scale_log2);
        if (masked) {
          const int key = key_base + j * 8 + (e & 1);
          const int tok = row_tok[e / 2];
          bool visible;
          if constexpr (kTail) {
            visible = key <= last_key;  // a logical key: committed, an ancestor or the token itself
          } else if constexpr (kTree) {
            const int node = key - prefix;
            visible = node < 0 ? row_sel[e / 2]
                               : (node < p.tokens &&
                                  ((mask_rows[(tok - tok_first) * p.mask_words + (node >> 6)] >> (node & 63)) & 1u));
          } else {
            visible = key <= prefix + tok && row_sel[e / 2];
          }
          if (!visible) x = -INFINITY;
        }
        s[j][e] = x;
      }
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = row_max[i];
#pragma unroll
      for (int j = 0; j < C::kKeyFrags; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * i], s[j][2 * i + 1]));
      // The four lanes of a quad hold the columns of the same two rows.
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      // A row with nothing visible yet keeps max -inf; subtract 0 instead so exp2 gives 0, not NaN.
      const float base = mx == -INFINITY ? 0.f : mx;
      // Explicitly rounded operations (never fused into an FMA): a row's arithmetic must be the
      // same instructions in every instance of this kernel (row invariance, attention.h).
      const float correction = exp2f(__fsub_rn(row_max[i], base));
      row_max[i] = mx;
      row_sum[i] = __fmul_rn(row_sum[i], correction);
#pragma unroll
      for (int d = 0; d < C::kDimFrags; ++d) {
        o_acc[d][2 * i] = __fmul_rn(o_acc[d][2 * i], correction);
        o_acc[d][2 * i + 1] = __fmul_rn(o_acc[d][2 * i + 1], correction);
      }
#pragma unroll
      for (int j = 0; j < C::kKeyFrags; ++j) {
        s[j][2 * i] = exp2f(__fsub_rn(s[j][2 * i], base));
        s[j][2 * i + 1] = exp2f(__fsub_rn(s[j][2 * i + 1], base));
        row_sum[i] = __fadd_rn(row_sum[i], __fadd_rn(s[j][2 * i], s[j][2 * i + 1]));
      }
    }

#pragma unroll
    for (int kk = 0; kk < C::kKeySteps; ++kk) {
      // The accumulators of n-blocks 2kk and 2kk + 1 are exactly an A fragment of k16.
      const std::uint32_t a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < C::kDimFrags / 2; ++dp) {
        // Transposed matrices: keys +0..7 | +8..15 | +0..7 | +8..15, dims low | low | high | high
        // 8 of this pair of n8 blocks (of the warp's slice of D): b[0..1] feed dim block 2dp,
        // b[2..3] dim block 2dp + 1.
        const int key = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8;
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, v_tile + swizzle<kHeadDim>(key, wn * C::kDimFrags + dp * 2 + lane / 16));
        mma_16816<T>(o_acc[2 * dp], a, b[0], b[1]);
        mma_16816<T>(o_acc[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // all warps are done with this stage before it is refilled
    tile = next;
  }

  if (!kTail && handover) {
    // Hand the rows' raw state to the tail blocks (attention.h): o, max and the lanes' sums.
    cp_async_wait<0>();
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = row0 + lr0 + 8 * i;
      if (row >= row_end) continue;
      float* dst = p.resume + packed_row(row) * kResume;
#pragma unroll
      for (int d = 0; d < C::kDimFrags; ++d) {
        dst[dim0 + d * 8] = o_acc[d][2 * i];
        dst[dim0 + d * 8 + 1] = o_acc[d][2 * i + 1];
      }
      if (wn == 0) {  // every warp of the row holds the same max and sums
        if (lane % 4 == 0) dst[kHeadDim] = row_max[i];
        dst[kHeadDim + 1 + lane % 4] = row_sum[i];
      }
    }
    return;
  }

  // ---- epilogue: normalise, write ----
  cp_async_wait<0>();
  __syncthreads();  // o_part aliases the pipeline
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    row_sum[i] = __fadd_rn(row_sum[i], __shfl_xor_sync(kFullMask, row_sum[i], 1));
    row_sum[i] = __fadd_rn(row_sum[i], __shfl_xor_sync(kFullMask, row_sum[i], 2));
  }
  if (wn == 0 && lane % 4 == 0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float total = row_sum[i];
      row_inv[lr0 + 8 * i] = total > 0.f ? 1.f / total : 0.f;
      row_lse[lr0 + 8 * i] = total > 0.f ? row_max[i] + log2f(total) : -INFINITY;
    }
  }
#pragma unroll
  for (int d = 0; d < C::kDimFrags; ++d) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float* dst = o_part + (lr0 + 8 * i) * C::kORow + dim0 + d * 8;
      *reinterpret_cast<float2*>(dst) = make_float2(o_acc[d][2 * i], o_acc[d][2 * i + 1]);
    }
  }
  __syncthreads();

  const std::int64_t partial_rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
  for (int i = tid; i < C::kBlockM * C::kChunks; i += C::kThreads) {
    const int r = i / C::kChunks;
    const int c = i % C::kChunks;
    const int row = row0 + r;
    if (row >= row_end) continue;
    const float4* src = reinterpret_cast<const float4*>(o_part + r * C::kORow + c * 8);
    const float4 lo = src[0], hi = src[1];
    const float acc[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    const float inv = row_inv[r];
    const int tok = row / group;
    const int head = kv_head * group + row % group;
    if (p.partial_out == nullptr) {
      Vec<T, 8> out;
#pragma unroll
      for (int e = 0; e < 8; ++e) out.v[e] = from_float<T>(__fmul_rn(acc[e], inv));
      store_vec<T, 8>(p.out + tok * p.out_stride_t + head * p.out_stride_h + c * 8, out);
    } else {
      const std::int64_t prow = static_cast<std::int64_t>(split) * partial_rows + packed_row(row);
      float4* dst = reinterpret_cast<float4*>(p.partial_out + prow * kHeadDim + c * 8);
      dst[0] = make_float4(__fmul_rn(acc[0], inv), __fmul_rn(acc[1], inv), __fmul_rn(acc[2], inv),
                           __fmul_rn(acc[3], inv));
      dst[1] = make_float4(__fmul_rn(acc[4], inv), __fmul_rn(acc[5], inv), __fmul_rn(acc[6], inv),
                           __fmul_rn(acc[7], inv));
      if (c == 0) p.partial_lse[prow] = row_lse[r];
    }
  }
}

// Merges the splits of one (token, query head) row per warp: out = sum_z w_z O_z / sum_z w_z
// with w_z = 2^(lse_z - max lse). Splits that saw no slot have lse -inf and weight 0.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kCombineWarps * 32) attention_combine_kernel(const AttentionParams<T> p) {
  constexpr int kPerLane = kHeadDim / 32;  // consecutive dims per lane: 2 or 4 (one 8/16-byte load)
  const int lane = threadIdx.x % 32;
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
  const std::int64_t prow = static_cast<std::int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (prow >= rows) return;

  float mx = -INFINITY;
  for (int z = lane; z < p.splits; z += 32) mx = fmaxf(mx, p.partial_lse[z * rows + prow]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, offset));

  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) acc[e] = 0.f;
  float total = 0.f;
  if (mx != -INFINITY) {
    for (int z = 0; z < p.splits; ++z) {
      const float w = exp2f(p.partial_lse[z * rows + prow] - mx);
      total += w;
      const Vec<float, kPerLane> part =
          load_vec<float, kPerLane>(p.partial_out + (z * rows + prow) * kHeadDim + lane * kPerLane);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[e] += w * part.v[e];
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const std::int64_t tok = prow / p.heads_q;
  const std::int64_t head = prow % p.heads_q;
  Vec<T, kPerLane> out;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out.v[e] = from_float<T>(acc[e] * inv);
  store_vec<T, kPerLane>(p.out + tok * p.out_stride_t + head * p.out_stride_h + lane * kPerLane, out);
}

template <typename T, int kHeadDim, int kWarpsM, int kWarpsN, bool kTree, bool kTail = false>
Status launch_attention_tiles(const AttentionParams<T>& p, cudaStream_t stream) {
  using C = Tile<kHeadDim, kWarpsM, kWarpsN>;
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.group;
  // Tail blocks: one per tree token (and KV head, and chunk its tail can touch).
  const std::int64_t row_tiles = kTail ? p.tokens : (rows + C::kBlockM - 1) / C::kBlockM;
  EDGESPEC_RETURN_IF_ERROR(check_fits(row_tiles, kMaxGridX, "attention: number of query row tiles"));
  const std::int64_t smem =
      kTail ? attention_tail_smem_bytes(kHeadDim, p.tokens, p.group, p.mask_words,
                                        p.block_mask != nullptr ? p.block_words : 0)
            : attention_smem_bytes(kHeadDim, p.tokens, p.group, kTree, kTree ? p.mask_words : 0,
                                   p.block_mask != nullptr ? p.block_words : 0);
  EDGESPEC_RETURN_IF_ERROR(
      check_smem_optin(smem, "attention", "tree-mask and block-selection rows grow with the tokens a block spans"));
  auto* kernel = attention_kernel<T, kHeadDim, kWarpsM, kWarpsN, kTree, kTail>;
  // Above 48 KB of dynamic shared memory a kernel must opt in (per kernel, not per launch, but
  // the call is cheap, needs no synchronisation and is legal during stream capture).
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
      "attention: requesting dynamic shared memory for attention_kernel"));
  const int grid_z = kTail && p.rank_tiles == 0 ? attention_tail_chunks(p.tokens, p.chunk_tiles) : p.splits;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(grid_z));
  kernel<<<grid, C::kThreads, static_cast<std::size_t>(smem), stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("attention_kernel");
  return Status::success();
}

}  // namespace attention_detail

template <typename T, int kHeadDim>
Status launch_attention(const AttentionParams<T>& p, cudaStream_t stream) {
  using namespace attention_detail;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "attention kernels are written for head dims 64 and 128");
  if (p.tokens == 0 || p.heads_q == 0) return Status::success();
  const bool tree = p.tree_mask != nullptr;
  const AttentionTileShape shape = attention_tile_shape(p.tokens, p.group, tree);
  Status status;
  if (tree && p.rank_tiles > 0) {
    // A ranked tree runs as tail blocks alone (attention.h): no shared prefix pass.
  } else if (shape.warps_m == 1 && shape.warps_n == 4) {
    status = tree ? launch_attention_tiles<T, kHeadDim, 1, 4, true>(p, stream)
                  : launch_attention_tiles<T, kHeadDim, 1, 4, false>(p, stream);
  } else if (shape.warps_m == 4 && shape.warps_n == 1) {
    status = tree ? launch_attention_tiles<T, kHeadDim, 4, 1, true>(p, stream)
                  : launch_attention_tiles<T, kHeadDim, 4, 1, false>(p, stream);
  } else if (shape.warps_m == 8 && shape.warps_n == 1 && !tree) {
    status = launch_attention_tiles<T, kHeadDim, 8, 1, false>(p, stream);
  } else {
    return Status::unsupported("attention: no kernel instance for a " + std::to_string(shape.warps_m) + "x" +
                               std::to_string(shape.warps_n) + "-warp tile" + (tree ? " with a tree mask" : ""));
  }
  EDGESPEC_RETURN_IF_ERROR(status);
  // Row-invariant trees: the tail blocks attend each token's gathered tiles (attention.h).
  const bool tails = tree && (p.chunk_tiles > 0 || p.rank_tiles > 0);
  if (tails) {
    const AttentionTileShape tail = attention_tail_shape(p.group);
    const Status launched = tail.warps_m == 1 ? launch_attention_tiles<T, kHeadDim, 1, 4, true, true>(p, stream)
                                              : launch_attention_tiles<T, kHeadDim, 4, 1, true, true>(p, stream);
    EDGESPEC_RETURN_IF_ERROR(launched);
  }
  if (p.splits == 1 && !(tree && p.chunk_tiles > 0)) return Status::success();
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
  const std::int64_t blocks = (rows + kCombineWarps - 1) / kCombineWarps;
  EDGESPEC_RETURN_IF_ERROR(check_fits(blocks, kMaxGridX, "attention: number of combine blocks"));
  attention_combine_kernel<T, kHeadDim><<<static_cast<unsigned>(blocks), kCombineWarps * 32, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("attention_combine_kernel");
  return Status::success();
}

}  // namespace edgespec
