// Attention for Hopper (sm_90a) on wgmma: causal prefill / chunked prefill and tree verification,
// the two phases where the generic kernel's mma.sync leaves the tensor cores short (prefill is
// compute-bound; a 64-token tree over a long context does 64x a decode step's FLOPs on the same
// bytes). Same math as the generic kernel (attention.cuh: packed GQA rows, online softmax in base
// 2, P rounded to the storage type before P.V, split-KV partials merged by its combine kernel).
//
// One block = two warpgroups (256 threads) = 128 packed query rows r = t * G + g of one KV head,
// 64 per warpgroup, and one split of the key range: every K/V tile brought to shared memory serves
// 128 rows, which halves the L2 traffic of a one-warpgroup block (at 64 rows per tile a long causal
// prefill reads K/V from L2 at about the rate the tensor cores consume them). Shared memory
// (128-byte swizzled, gmma_desc.h): a Q tile per warpgroup and two stages of K and V tiles of 64
// keys, each tile D / 64 column blocks of 64 rows x 128 bytes. Per key tile: all threads cp.async
// the next tile while this one is used; each warpgroup then, for its own rows (skipping tiles none
// of them sees), computes S = Q.K^T as D / 16 wgmma m64n64k16 steps with both operands in shared
// memory (K-major); the mask (causal diagonal, or the tree mask over the tree's slots, read from
// global memory: a few words per row per tile), the online softmax and the rescale of O run on
// the accumulators in registers; O += P.V is 4 wgmma m64nDk16 steps with P from registers (the S
// accumulators, rounded and packed: the wgmma A layout) and V from shared memory (MN-major).
// Block-sparse (InfLLM-v2 block mask, the generic kernel's rule): the block streams the union of
// the tiles its tokens selected, a warpgroup attends those its own tokens selected, and a row's
// prefix keys outside its token's selection are masked; a long sparse prefill (MiniCPM4: 8
// tokens of 16 heads per block, neighbours selecting mostly the same blocks) is the case.
// Row-invariant mode (chunk_tiles > 0; attention.h "Row invariance", the generic kernels' rule on
// these kernels' arithmetic): fixed key chunks as splits; a tree's main blocks stop at its first
// tile and hand each row's raw state over (`resume`) to tail blocks, one warpgroup per (tree
// token, KV head, chunk), which attend the token's gathered logical tiles. A row's arithmetic is
// the same instructions in all of them (explicitly rounded, whole 64-key tiles, wgmma per element),
// so a decode step and a tree verification both run here agree bit for bit; mixing these kernels
// with the generic ones would need wgmma to round like mma.sync, which nothing here assumes. A
// call of at most 64 packed rows (a decode step) runs one warpgroup per block.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/checks.h"
#include "common/launch.h"
#include "kernels/attention.cuh"  // the split combine kernel
#include "kernels/sm90/arch.cuh"
#include "kernels/sm90/attention_sm90.h"
#include "kernels/sm90/qk_product.cuh"
#include "kernels/sm90/wgmma.cuh"

namespace edgespec {

namespace sm90_attention {

using attention_detail::next_set_tile;
using attention_detail::selection_word;
using attention_detail::SelectionWord;
using attention_detail::split_tiles_by_rank;

constexpr int kRowsPerGroup = 64;            // wgmma M
constexpr int kBlockN = kAttentionBlockN;    // keys per tile (wgmma N of S, K of P.V)
static_assert(kBlockN == 64, "S is one m64n64 product per k16 step; P.V takes 4 k16 steps");
static_assert(2 * kRowsPerGroup == kAttentionSm90BlockRows, "attention_plan.h plans splits for two-warpgroup blocks");

template <int kHeadDim, int kWarpgroups>
struct Smem {
  static constexpr int kTileBytes = 64 * kHeadDim * 2;  // 64 rows of kHeadDim 16-bit elements
  __host__ __device__ static constexpr int q(int group) { return group * kTileBytes; }
  __host__ __device__ static constexpr int k(int stage) { return (kWarpgroups + 2 * stage) * kTileBytes; }
  __host__ __device__ static constexpr int v(int stage) { return (kWarpgroups + 2 * stage + 1) * kTileBytes; }
  // A Q tile per warpgroup, two stages of K and V, and room to move the start to a 1024-byte
  // boundary of the shared window.
  static constexpr int kBytes = (kWarpgroups + 4) * kTileBytes + static_cast<int>(kGmmaSwizzleAtomBytes);
  static_assert(kBytes == attention_sm90_tile_bytes(kHeadDim, kWarpgroups), "attention_plan.h sizes the launches");
};

// Copies 64 rows of kHeadDim elements into a swizzled tile: row i from src_row(i) (nullptr: zeros;
// `any` is a valid address the zero-filling copies name without reading it). All threads take part.
template <typename T, int kHeadDim, int kThreads, typename RowSource>
__device__ __forceinline__ void load_tile(unsigned char* tile, const T* any, RowSource src_row) {
  constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row
  static_assert((64 * kChunks) % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < 64 * kChunks / kThreads; ++it) {
    const int chunk = static_cast<int>(threadIdx.x) + it * kThreads;
    const int row = chunk / kChunks, col = (chunk % kChunks) * 8;
    const T* src = src_row(row);
    cp_async_16(tile + sw128_offset(64, row, col), src != nullptr ? src + col : any, src != nullptr);
  }
}

// What one thread needs to mask its two rows (16 w + g and + 8 of its warpgroup's 64, w = warp in
// the warpgroup): causal (and a tail block's logical keys), the last slot each sees; tree, each
// row's tree-mask row (nullptr for a row past the last token) and the first tree slot;
// block-sparse, whether each row's token selected the current tile (always true without a block
// mask).
struct RowMask {
  int limit[2];
  const std::uint64_t* tree[2];
  int prefix = 0, tree_tokens = 0;
  bool selected[2] = {true, true};
};

// Whether slot `slot` is visible to row h (0 or 1) of this thread, in a tile that needs a mask.
template <bool kTreeMask>
__device__ __forceinline__ bool visible(const RowMask& m, int h, int slot) {
  if (!kTreeMask) return slot <= m.limit[h] && m.selected[h];
  const int j = slot - m.prefix;
  if (j < 0) return m.selected[h];  // a prefix slot; tree slots are governed by the tree mask alone
  if (j >= m.tree_tokens || m.tree[h] == nullptr) return false;
  return (__ldg(m.tree[h] + j / 64) >> (j % 64)) & 1ull;
}

// The running softmax state of one thread's two rows and its share of their output: o[4i + 2h + e]
// is row h, column 8i + 2c + e (c = lane % 4); row_sum[h] sums this thread's columns only (the
// quad's four partial sums are added at the end, as the resume buffer keeps them).
template <int kHeadDim>
struct RowState {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float o[kHeadDim / 2] = {};
};

// One K/V tile for one warpgroup: S = Q.K^T, mask (`masked`: the tile holds a slot some row does
// not see), online softmax, O += P.V. q, k, v: shared-window addresses of the swizzled tiles.
// Explicitly rounded operations (never contracted into FMAs), in the generic kernel's order: a
// row's arithmetic is the same instructions in every block shape that attends it (row invariance).
template <typename T, int kHeadDim, bool kTreeMask>
__device__ __forceinline__ void attend_tile(RowState<kHeadDim>& st, const RowMask& mask, std::uint32_t q,
                                            std::uint32_t k, std::uint32_t v, int first_slot, bool masked,
                                            float scale_log2) {
  constexpr int kO = kHeadDim / 2;
  const int c = static_cast<int>(threadIdx.x) % 4;
  float s[32] = {};  // overwritten by the first step (accumulate = 0)
  qk_product_64x64<T, kHeadDim>(s, q, k);

  // Scale to base 2 and mask: s[4i + e] is row e / 2, key 8i + 2c + e % 2 of the tile.
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h = (i % 4) / 2;
    const int slot = first_slot + 8 * (i / 4) + 2 * c + (i % 2);
    s[i] = masked && !visible<kTreeMask>(mask, h, slot) ? -INFINITY : __fmul_rn(s[i], scale_log2);
    tile_max[h] = fmaxf(tile_max[h], s[i]);
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    const float next = fmaxf(st.row_max[h], tile_max[h]);
    // A row that has seen no slot yet (a split past its diagonal, tree slots it does not see)
    // keeps max -inf: exponentiate against 0 so that its weights are 0, not NaN.
    const float base = next == -INFINITY ? 0.f : next;
    const float correction = exp2f(__fsub_rn(st.row_max[h], base));
    st.row_max[h] = next;
    st.row_sum[h] = __fmul_rn(st.row_sum[h], correction);
#pragma unroll
    for (int i = 0; i < kO / 4; ++i) {
      st.o[4 * i + 2 * h] = __fmul_rn(st.o[4 * i + 2 * h], correction);
      st.o[4 * i + 2 * h + 1] = __fmul_rn(st.o[4 * i + 2 * h + 1], correction);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {  // key pairs in column order, each pair summed first
      s[4 * i + 2 * h] = exp2f(__fsub_rn(s[4 * i + 2 * h], base));
      s[4 * i + 2 * h + 1] = exp2f(__fsub_rn(s[4 * i + 2 * h + 1], base));
      st.row_sum[h] = __fadd_rn(st.row_sum[h], __fadd_rn(s[4 * i + 2 * h], s[4 * i + 2 * h + 1]));
    }
  }

  // O += P.V: the S accumulators of keys 16kk..16kk+15 are the A fragment of step kk.
  std::uint32_t pa[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) pa[kk][r] = pack2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
  }
#pragma unroll
  for (int i = 0; i < kO; ++i) wgmma_fence_operand(st.o[i]);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wgmma_rs_mn<T, kHeadDim>(st.o, pa[kk], gmma_desc_sw128(v + static_cast<std::uint32_t>(kk * 16 * 128), 64 * 128, 1024),
                             1);
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < kO; ++i) wgmma_fence_operand(st.o[i]);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {  // the P registers stay allocated until the wgmma read them
#pragma unroll
    for (int r = 0; r < 4; ++r) wgmma_fence_operand(pa[kk][r]);
  }
}

// kTail (row-invariant trees only): one warpgroup attends one tree token's tail (blockIdx.x), the
// gathered logical tiles from the tree's first tile to the token's own, within one chunk (the
// tree's first chunk + blockIdx.z), resuming the state the main blocks handed over there.
template <typename T, int kHeadDim, int kWarpgroups, bool kTree, bool kTail>
__global__ void __launch_bounds__(128 * kWarpgroups, 1) attention_kernel(const AttentionParams<T> p) {
#if EDGESPEC_SM90_ENABLED
  static_assert(kTree || !kTail, "tail blocks exist for tree calls only");
  static_assert(!kTail || kWarpgroups == 1, "a tail block holds one token's rows: one warpgroup");
  constexpr int kThreads = 128 * kWarpgroups;
  constexpr int kBlockM = kRowsPerGroup * kWarpgroups;  // packed query rows per block
  using S = Smem<kHeadDim, kWarpgroups>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The swizzle is a function of the shared-window address: tiles start on 1024-byte boundaries.
  const std::uint32_t raw = smem_address(smem_raw);
  const std::uint32_t pad = (kGmmaSwizzleAtomBytes - raw % kGmmaSwizzleAtomBytes) % kGmmaSwizzleAtomBytes;
  unsigned char* const smem = smem_raw + pad;
  const std::uint32_t base = raw + pad;

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int wg = warp / 4, g = lane / 4, c = lane % 4;
  const int group = p.group, kv = static_cast<int>(blockIdx.y);
  const int rows_total = p.tokens * group;
  // Causal row tiles further down see more keys: launch them first. A tail block holds the G rows
  // of token blockIdx.x (the rest of its warpgroup is padding).
  const int m0 = kTail ? static_cast<int>(blockIdx.x) * group
                       : (kTree ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) *
                             kBlockM;
  const int row_end = kTail ? m0 + group : rows_total;
  // The slots that count: the views' S, or the device-side length of a graph replay.
  const int seqlen = p.seqlen_dev != nullptr ? max(p.tokens, min(__ldg(p.seqlen_dev), p.seqlen)) : p.seqlen;
  const int prefix = seqlen - p.tokens;
  const int mine = m0 + kRowsPerGroup * wg;  // this warpgroup's first row
  const bool invariant = p.chunk_tiles > 0;
  // Row-invariant trees: the tiles from here on hold tree tokens, attended as per-token tails.
  const int tree_tile = prefix / kBlockN;
  // A tail token's last logical key: its own position (the prefix, then its depth).
  int last_key = 0;
  if constexpr (kTail) {
    last_key = prefix + attention_detail::tree_path_length(p.tree_mask, p.mask_words, static_cast<int>(blockIdx.x)) - 1;
  }

  // Key tiles: this split's run of the range (a fixed chunk in the invariant mode, a tree's main
  // blocks stopping at its first tile there), cut after the last slot a row of the block (my_end:
  // of this warpgroup) sees; tiles below `whole` are seen entirely by every row of the warpgroup
  // and skip the mask (never in a tail: its tiles are logical).
  const int tiles_total = (seqlen + kBlockN - 1) / kBlockN;
  int split = static_cast<int>(blockIdx.z);
  if (kTail) split += tree_tile / max(p.chunk_tiles, 1);
  const int per_split = invariant ? p.chunk_tiles : (tiles_total + p.splits - 1) / p.splits;
  const int run_end = (split + 1) * per_split;
  const int tile_begin = kTail ? max(split * per_split, tree_tile) : split * per_split;
  auto visible_tiles = [&](int first_row, int rows) {  // tiles holding a slot rows [first_row, +rows) see
    if (first_row >= row_end) return 0;
    if (kTail) return last_key / kBlockN + 1;
    const int last_token = min(p.tokens - 1, (first_row + rows - 1) / group);
    return ((kTree ? seqlen : prefix + last_token + 1) + kBlockN - 1) / kBlockN;
  };
  auto range_end = [&](int first_row, int rows) {
    const int end = min(run_end, visible_tiles(first_row, rows));
    return kTree && !kTail && invariant ? min(end, tree_tile) : end;
  };
  const int tile_end = range_end(m0, kBlockM);
  const int my_end = range_end(mine, kRowsPerGroup);
  // The token's tail misses this chunk: nothing to write. (The first tail chunk always writes its
  // partial, even for a malformed row that sees no tree token, so no stale partial is combined.)
  if (kTail && blockIdx.z > 0 && tile_begin >= tile_end) return;
  // The chunk holding the tree's first tile, when it also holds committed tiles before it: the
  // main blocks hand their rows' state over to the tail blocks there instead of finishing them.
  const bool handover = kTree && invariant && split == tree_tile / p.chunk_tiles && tree_tile % p.chunk_tiles != 0;
  const int whole = kTail ? 0 : (kTree ? prefix : prefix + mine / group + 1) / kBlockN;
  // The tiles this block visits: [tile_first, ...) in order, tile_count of them.
  int tile_first = tile_begin;
  int tile_count = max(tile_end - tile_begin, 0);

  // Tail blocks: the tree tokens' depths and this token's ancestors by depth (tree indices).
  short* const depth_of = reinterpret_cast<short*>(smem_raw + S::kBytes);
  short* const ancestor = depth_of + p.tokens;
  if constexpr (kTail) {
    attention_detail::tail_ancestors(p.tree_mask, p.mask_words, p.tokens,
                                     p.tree_mask + static_cast<std::int64_t>(blockIdx.x) * p.mask_words, depth_of,
                                     ancestor, static_cast<int>(threadIdx.x), kThreads);
  }

  // Block-sparse (attention.h): the block visits the union of the tiles its tokens selected, the
  // splits sharing it out by rank; a warpgroup attends the tiles its own tokens selected (union
  // per warpgroup, so the choice is uniform per warpgroup as wgmma requires) and skips the
  // per-row mask where all of them did (intersection). Words past the tiles a row can see are
  // ignored; tiles holding tree slots are always visited (the tree mask decides there).
  const bool sparse = p.block_mask != nullptr;
  const int bw = p.block_words;
  const int tok_first = m0 / group;
  const int tok_last = min((m0 + kBlockM - 1) / group, p.tokens - 1);
  std::uint64_t* const sel_rows = reinterpret_cast<std::uint64_t*>(smem_raw + S::kBytes);  // [span][bw]
  std::uint64_t* const sel_any = sel_rows + (tok_last - tok_first + 1) * bw;                 // [bw]
  std::uint64_t* const group_any = sel_any + bw;                                             // [wg][bw]
  std::uint64_t* const group_all = group_any + kWarpgroups * bw;                             // [wg][bw]
  if (!kTail && sparse) {
    const int span = tok_last - tok_first + 1;
    for (int i = static_cast<int>(threadIdx.x); i < span * bw; i += kThreads) {
      const std::int64_t tok = tok_first + i / bw;
      sel_rows[i] = __ldg(p.block_mask + (tok * p.heads_kv + kv) * bw + i % bw);
    }
    __syncthreads();
    const int first_tree_tile = kTree ? prefix / kBlockN : tiles_total;
    // part 0: the whole block; part 1 + w: warpgroup w.
    for (int i = static_cast<int>(threadIdx.x); i < (1 + kWarpgroups) * bw; i += kThreads) {
      const int part = i / bw, w = i % bw;
      const int first_row = part == 0 ? m0 : m0 + kRowsPerGroup * (part - 1);
      const int rows = part == 0 ? kBlockM : kRowsPerGroup;
      const int end = visible_tiles(first_row, rows);  // 0 for a warpgroup past the last row
      const int last = end > 0 ? min((first_row + rows - 1) / group, p.tokens - 1) : first_row / group - 1;
      const SelectionWord s =
          selection_word(sel_rows, bw, first_row / group - tok_first, last - tok_first, w, first_tree_tile, end);
      if (part == 0) {
        sel_any[w] = s.any;
      } else {
        group_any[(part - 1) * bw + w] = s.any;
        group_all[(part - 1) * bw + w] = s.all;
      }
    }
    __syncthreads();
    tile_count = split_tiles_by_rank(sel_any, bw, split, p.splits, 0, &tile_first);
  }
  auto has_tile = [](const std::uint64_t* words, int tile) { return ((words[tile >> 6] >> (tile & 63)) & 1ull) != 0; };

  auto row_q = [&](int r) -> const T* {
    if (r >= row_end) return nullptr;
    return p.q + static_cast<std::int64_t>(r / group) * p.q_stride_t +
           static_cast<std::int64_t>(kv * group + r % group) * p.q_stride_h;
  };
#pragma unroll
  for (int w = 0; w < kWarpgroups; ++w) {
    load_tile<T, kHeadDim, kThreads>(smem + S::q(w), p.q, [&](int i) { return row_q(m0 + kRowsPerGroup * w + i); });
  }
  // The cache slot of a tile's key, or -1 (zeros): a tail's keys are logical (committed ones in
  // place, then the token's ancestors by depth, then itself).
  auto slot_of = [&](int key) {
    if constexpr (kTail) {
      if (key < prefix) return key;
      if (key > last_key) return -1;
      const int node = ancestor[key - prefix];  // -1 only for a malformed mask
      return node >= 0 ? prefix + node : -1;
    } else {
      return key < seqlen ? key : -1;
    }
  };
  auto load_kv = [&](int tile, int stage) {
    auto key_row = [&](const T* base_ptr, std::int64_t stride_s, std::int64_t stride_h) {
      return [=](int i) -> const T* {
        const int slot = slot_of(tile * kBlockN + i);
        return slot >= 0 ? base_ptr + slot * stride_s + kv * stride_h : nullptr;
      };
    };
    load_tile<T, kHeadDim, kThreads>(smem + S::k(stage), p.k, key_row(p.k, p.k_stride_s, p.k_stride_h));
    load_tile<T, kHeadDim, kThreads>(smem + S::v(stage), p.v, key_row(p.v, p.v_stride_s, p.v_stride_h));
  };
  if (tile_count > 0) load_kv(tile_first, 0);
  cp_async_commit();

  RowMask mask;
  mask.prefix = prefix;
  mask.tree_tokens = p.tokens;
  int row_token[2];  // a padding row past the last token borrows it (its Q is zero, never written)
  int row[2];        // this thread's two rows (packed, of the whole call)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    row[h] = mine + 16 * (warp % 4) + g + 8 * h;
    mask.limit[h] = kTail ? last_key : prefix + row[h] / group;
    mask.tree[h] = kTree && row[h] < rows_total ? p.tree_mask + static_cast<std::int64_t>(row[h] / group) * p.mask_words
                                                : nullptr;
    row_token[h] = min(row[h] / group, p.tokens - 1);
  }
  // The packed (token * Hq + head) index of a row: partials, lse and resume rows.
  auto packed_row = [&](int r) {
    return static_cast<std::int64_t>(r / group) * p.heads_q + kv * group + r % group;
  };
  constexpr int kResume = kHeadDim + kAttentionResumeExtra;  // attention_resume_stride
  RowState<kHeadDim> st;
  if (kTail && handover) {
    // Resume the state the main blocks left after the chunk's committed tiles (exact fp32).
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row[h] >= row_end) continue;
      const float* src = p.resume + packed_row(row[h]) * kResume;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        const float2 o = *reinterpret_cast<const float2*>(src + 8 * i + 2 * c);
        st.o[4 * i + 2 * h] = o.x;
        st.o[4 * i + 2 * h + 1] = o.y;
      }
      st.row_max[h] = src[kHeadDim];
      st.row_sum[h] = src[kHeadDim + 1 + c];
    }
  }

  int tile = tile_first;
  for (int it = 0; it < tile_count; ++it) {
    const int stage = it & 1;
    cp_async_wait<0>();
    fence_proxy_async();  // the cp.async writes, before the wgmma reads of the async proxy
    __syncthreads();      // every thread's copies landed; the other stage is free again
    const int next = it + 1 < tile_count ? (sparse ? next_set_tile(sel_any, bw, tile) : tile + 1) : -1;
    if (next >= 0) load_kv(next, stage ^ 1);
    cp_async_commit();
    // Uniform per warpgroup, as wgmma requires.
    const bool attend = sparse ? has_tile(group_any + wg * bw, tile) : tile < my_end;
    if (attend) {
      bool masked = tile >= whole;
      if (sparse) {
        masked = masked || !has_tile(group_all + wg * bw, tile);
#pragma unroll
        for (int h = 0; h < 2; ++h) mask.selected[h] = has_tile(sel_rows + (row_token[h] - tok_first) * bw, tile);
      }
      attend_tile<T, kHeadDim, kTree && !kTail>(st, mask, base + static_cast<std::uint32_t>(S::q(wg)),
                                                base + static_cast<std::uint32_t>(S::k(stage)),
                                                base + static_cast<std::uint32_t>(S::v(stage)), tile * kBlockN,
                                                masked, p.scale_log2);
    }
    tile = next;
  }
  cp_async_wait<0>();

  if (!kTail && handover) {
    // Hand the rows' raw state to the tail blocks (attention.h): o, max and the lanes' sums, in the
    // generic kernel's layout.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (row[h] >= row_end) continue;
      float* dst = p.resume + packed_row(row[h]) * kResume;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        *reinterpret_cast<float2*>(dst + 8 * i + 2 * c) = make_float2(st.o[4 * i + 2 * h], st.o[4 * i + 2 * h + 1]);
      }
      if (c == 0) dst[kHeadDim] = st.row_max[h];
      dst[kHeadDim + 1 + c] = st.row_sum[h];
    }
    return;
  }

  // Rows: the normalised output, or with splits this split's normalised partial and its
  // log-sum-exp (base 2; -inf for a row that saw no slot here) for the combine kernel.
  const std::int64_t partial_rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.row_sum[h] = __fadd_rn(st.row_sum[h], __shfl_xor_sync(0xffffffffu, st.row_sum[h], 1));
    st.row_sum[h] = __fadd_rn(st.row_sum[h], __shfl_xor_sync(0xffffffffu, st.row_sum[h], 2));
    if (row[h] >= row_end) continue;
    const float total = st.row_sum[h];
    const float inv = total > 0.f ? 1.f / total : 0.f;
    if (p.partial_out == nullptr) {
      T* dst = p.out + static_cast<std::int64_t>(row[h] / group) * p.out_stride_t +
               static_cast<std::int64_t>(kv * group + row[h] % group) * p.out_stride_h;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        *reinterpret_cast<std::uint32_t*>(dst + 8 * i + 2 * c) =
            pack2<T>(__fmul_rn(st.o[4 * i + 2 * h], inv), __fmul_rn(st.o[4 * i + 2 * h + 1], inv));
      }
    } else {
      const std::int64_t prow = split * partial_rows + packed_row(row[h]);
      float* dst = p.partial_out + prow * kHeadDim;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        *reinterpret_cast<float2*>(dst + 8 * i + 2 * c) =
            make_float2(__fmul_rn(st.o[4 * i + 2 * h], inv), __fmul_rn(st.o[4 * i + 2 * h + 1], inv));
      }
      if (c == 0) p.partial_lse[prow] = total > 0.f ? st.row_max[h] + log2f(total) : -INFINITY;
    }
  }
#endif  // EDGESPEC_SM90_ENABLED
}

template <typename T, int kHeadDim, int kWarpgroups, bool kTree, bool kTail>
Status launch_blocks(const AttentionParams<T>& p, cudaStream_t stream) {
  constexpr int kBlockM = kRowsPerGroup * kWarpgroups;
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.group;
  // Tail blocks: one per tree token (and KV head, and chunk its tail can touch).
  const std::int64_t row_tiles = kTail ? p.tokens : (rows + kBlockM - 1) / kBlockM;
  EDGESPEC_RETURN_IF_ERROR(check_fits(row_tiles, kMaxGridX, "attention (sm90): number of query row tiles"));
  auto* kernel = attention_kernel<T, kHeadDim, kWarpgroups, kTree, kTail>;
  const int smem = kTail ? attention_sm90_tail_smem_bytes(kHeadDim, p.tokens)
                         : attention_sm90_smem_bytes(kHeadDim, p.tokens, p.group,
                                                     p.block_mask != nullptr ? p.block_words : 0, kWarpgroups);
  EDGESPEC_RETURN_IF_ERROR(check_smem_optin(
      smem, "attention (sm90)", "block-selection rows grow with the tokens a block spans, a tail's tree index with T"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "attention (sm90): requesting dynamic shared memory"));
  const int grid_z = kTail ? attention_tail_chunks(p.tokens, p.chunk_tiles) : p.splits;
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(grid_z));
  kernel<<<grid, 128 * kWarpgroups, smem, stream>>>(p);
  if constexpr (kTail) {
    EDGESPEC_CHECK_LAUNCH("attention_kernel (sm90, tail blocks)");
  } else {
    EDGESPEC_CHECK_LAUNCH("attention_kernel (sm90)");
  }
  return Status::success();
}

template <typename T, int kHeadDim, bool kTree>
Status launch(const AttentionParams<T>& p, cudaStream_t stream) {
  // At most 64 packed rows (a decode step, a small tree): one warpgroup per block, no idle one.
  const bool one_group = static_cast<std::int64_t>(p.tokens) * p.group <= kRowsPerGroup;
  EDGESPEC_RETURN_IF_ERROR((one_group ? launch_blocks<T, kHeadDim, 1, kTree, false>(p, stream)
                                      : launch_blocks<T, kHeadDim, 2, kTree, false>(p, stream)));
  // Row-invariant trees: the tail blocks attend each token's gathered tiles (attention.h).
  const bool tails = kTree && p.chunk_tiles > 0;
  if (tails) EDGESPEC_RETURN_IF_ERROR((launch_blocks<T, kHeadDim, 1, true, true>(p, stream)));
  if (p.splits == 1 && !tails) return Status::success();
  using attention_detail::kCombineWarps;
  const std::int64_t blocks = (static_cast<std::int64_t>(p.tokens) * p.heads_q + kCombineWarps - 1) / kCombineWarps;
  EDGESPEC_RETURN_IF_ERROR(check_fits(blocks, kMaxGridX, "attention (sm90): number of combine blocks"));
  attention_detail::attention_combine_kernel<T, kHeadDim><<<static_cast<unsigned>(blocks), kCombineWarps * 32, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("attention_combine_kernel (sm90)");
  return Status::success();
}

}  // namespace sm90_attention

template <typename T, int kHeadDim>
Status launch_attention_sm90(const AttentionParams<T>& p, cudaStream_t stream) {
  if (const char* why = attention_sm90_rejection(p)) {
    return Status::unsupported(std::string("attention (sm90): cannot take ") + why);
  }
  if (p.tokens == 0 || p.heads_q == 0) return Status::success();
  EDGESPEC_RETURN_IF_ERROR(check_sm90_device("attention (sm90)"));
  return p.tree_mask != nullptr ? sm90_attention::launch<T, kHeadDim, true>(p, stream)
                                : sm90_attention::launch<T, kHeadDim, false>(p, stream);
}

template Status launch_attention_sm90<__nv_bfloat16, 64>(const AttentionParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_attention_sm90<__nv_bfloat16, 128>(const AttentionParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_attention_sm90<__half, 64>(const AttentionParams<__half>&, cudaStream_t);
template Status launch_attention_sm90<__half, 128>(const AttentionParams<__half>&, cudaStream_t);

}  // namespace edgespec
