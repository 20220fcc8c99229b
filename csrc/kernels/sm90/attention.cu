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

constexpr int kWarpgroups = 2;               // consumers of every K/V tile
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kRowsPerGroup = 64;            // wgmma M
constexpr int kBlockM = kRowsPerGroup * kWarpgroups;  // packed query rows per block
constexpr int kBlockN = kAttentionBlockN;    // keys per tile (wgmma N of S, K of P.V)
static_assert(kBlockN == 64, "S is one m64n64 product per k16 step; P.V takes 4 k16 steps");
static_assert(kBlockM == kAttentionSm90BlockRows, "attention_plan.h plans splits for this block");

template <int kHeadDim>
struct Smem {
  static constexpr int kTileBytes = 64 * kHeadDim * 2;  // 64 rows of kHeadDim 16-bit elements
  __host__ __device__ static constexpr int q(int group) { return group * kTileBytes; }
  __host__ __device__ static constexpr int k(int stage) { return (kWarpgroups + 2 * stage) * kTileBytes; }
  __host__ __device__ static constexpr int v(int stage) { return (kWarpgroups + 2 * stage + 1) * kTileBytes; }
  // A Q tile per warpgroup, two stages of K and V, and room to move the start to a 1024-byte
  // boundary of the shared window.
  static constexpr int kBytes = (kWarpgroups + 4) * kTileBytes + static_cast<int>(kGmmaSwizzleAtomBytes);
  static_assert(kBytes == attention_sm90_tile_bytes(kHeadDim), "attention_plan.h sizes the launches");
};

// Copies 64 rows of kHeadDim elements into a swizzled tile: row i from src_row(i) (nullptr: zeros;
// `any` is a valid address the zero-filling copies name without reading it). All threads take part.
template <typename T, int kHeadDim, typename RowSource>
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
// the warpgroup): causal, the last slot each sees; tree, each row's tree-mask row (nullptr for a
// row past the last token) and the first tree slot; block-sparse, whether each row's token
// selected the current tile (always true without a block mask).
struct RowMask {
  int limit[2];
  const std::uint64_t* tree[2];
  int prefix = 0, tree_tokens = 0;
  bool selected[2] = {true, true};
};

// Whether slot `slot` is visible to row h (0 or 1) of this thread, in a tile that needs a mask.
template <bool kTree>
__device__ __forceinline__ bool visible(const RowMask& m, int h, int slot) {
  if (!kTree) return slot <= m.limit[h] && m.selected[h];
  const int j = slot - m.prefix;
  if (j < 0) return m.selected[h];  // a prefix slot; tree slots are governed by the tree mask alone
  if (j >= m.tree_tokens || m.tree[h] == nullptr) return false;
  return (__ldg(m.tree[h] + j / 64) >> (j % 64)) & 1ull;
}

// The running softmax state of one thread's two rows and its share of their output.
template <int kHeadDim>
struct RowState {
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float o[kHeadDim / 2] = {};
};

// One K/V tile for one warpgroup: S = Q.K^T, mask (`masked`: the tile holds a slot some row does
// not see), online softmax, O += P.V. q, k, v: shared-window addresses of the swizzled tiles.
template <typename T, int kHeadDim, bool kTree>
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
    s[i] = masked && !visible<kTree>(mask, h, slot) ? -INFINITY : s[i] * scale_log2;
    tile_max[h] = fmaxf(tile_max[h], s[i]);
  }
  float alpha[2], base[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    const float next = fmaxf(st.row_max[h], tile_max[h]);
    // A row that has seen no slot yet (a split past its diagonal, tree slots it does not see)
    // keeps max -inf: exponentiate against 0 so that its weights are 0, not NaN.
    base[h] = next == -INFINITY ? 0.f : next;
    alpha[h] = exp2f(st.row_max[h] - base[h]);
    st.row_max[h] = next;
    st.row_sum[h] *= alpha[h];
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h = (i % 4) / 2;
    s[i] = exp2f(s[i] - base[h]);
    st.row_sum[h] += s[i];
  }
#pragma unroll
  for (int i = 0; i < kO; ++i) st.o[i] *= alpha[(i % 4) / 2];

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

template <typename T, int kHeadDim, bool kTree>
__global__ void __launch_bounds__(kThreads, 1) attention_kernel(const AttentionParams<T> p) {
#if EDGESPEC_SM90_ENABLED
  using S = Smem<kHeadDim>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The swizzle is a function of the shared-window address: tiles start on 1024-byte boundaries.
  const std::uint32_t raw = smem_address(smem_raw);
  const std::uint32_t pad = (kGmmaSwizzleAtomBytes - raw % kGmmaSwizzleAtomBytes) % kGmmaSwizzleAtomBytes;
  unsigned char* const smem = smem_raw + pad;
  const std::uint32_t base = raw + pad;

  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int wg = warp / 4, g = lane / 4, c = lane % 4;
  const int group = p.group, kv = static_cast<int>(blockIdx.y), split = static_cast<int>(blockIdx.z);
  const int rows_total = p.tokens * group;
  // Causal row tiles further down see more keys: launch them first.
  const int m0 = (kTree ? static_cast<int>(blockIdx.x) : static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) *
                 kBlockM;
  // The slots that count: the views' S, or the device-side length of a graph replay.
  const int seqlen = p.seqlen_dev != nullptr ? max(p.tokens, min(__ldg(p.seqlen_dev), p.seqlen)) : p.seqlen;
  const int prefix = seqlen - p.tokens;
  const int mine = m0 + kRowsPerGroup * wg;  // this warpgroup's first row

  // Key tiles: this split's run of the whole range, cut after the last slot a row of the block
  // (my_end: of this warpgroup) sees; tiles below `whole` are seen entirely by every row of the
  // warpgroup and skip the mask.
  const int tiles_total = (seqlen + kBlockN - 1) / kBlockN;
  const int per_split = (tiles_total + p.splits - 1) / p.splits;
  const int tile_begin = split * per_split;
  auto visible_tiles = [&](int first_row, int rows) {  // tiles holding a slot rows [first_row, +rows) see
    if (first_row >= rows_total) return 0;
    const int last_token = min(p.tokens - 1, (first_row + rows - 1) / group);
    return ((kTree ? seqlen : prefix + last_token + 1) + kBlockN - 1) / kBlockN;
  };
  const int tile_end = min(tile_begin + per_split, visible_tiles(m0, kBlockM));
  const int my_end = min(tile_begin + per_split, visible_tiles(mine, kRowsPerGroup));
  const int whole = (kTree ? prefix : prefix + mine / group + 1) / kBlockN;
  // The tiles this block visits: [tile_first, ...) in order, tile_count of them.
  int tile_first = tile_begin;
  int tile_count = max(tile_end - tile_begin, 0);

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
  std::uint64_t* const group_any = sel_any + bw;                                             // [2][bw]
  std::uint64_t* const group_all = group_any + kWarpgroups * bw;                             // [2][bw]
  if (sparse) {
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
    if (r >= rows_total) return nullptr;
    return p.q + static_cast<std::int64_t>(r / group) * p.q_stride_t +
           static_cast<std::int64_t>(kv * group + r % group) * p.q_stride_h;
  };
#pragma unroll
  for (int w = 0; w < kWarpgroups; ++w) {
    load_tile<T, kHeadDim>(smem + S::q(w), p.q, [&](int i) { return row_q(m0 + kRowsPerGroup * w + i); });
  }
  auto load_kv = [&](int tile, int stage) {
    auto key_row = [&](const T* base_ptr, std::int64_t stride_s, std::int64_t stride_h) {
      return [=](int i) -> const T* {
        const int slot = tile * kBlockN + i;
        return slot < seqlen ? base_ptr + slot * stride_s + kv * stride_h : nullptr;
      };
    };
    load_tile<T, kHeadDim>(smem + S::k(stage), p.k, key_row(p.k, p.k_stride_s, p.k_stride_h));
    load_tile<T, kHeadDim>(smem + S::v(stage), p.v, key_row(p.v, p.v_stride_s, p.v_stride_h));
  };
  if (tile_count > 0) load_kv(tile_first, 0);
  cp_async_commit();

  RowMask mask;
  mask.prefix = prefix;
  mask.tree_tokens = p.tokens;
  int row_token[2];  // a padding row past the last token borrows it (its Q is zero, never written)
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = mine + 16 * (warp % 4) + g + 8 * h;
    mask.limit[h] = prefix + r / group;
    mask.tree[h] = kTree && r < rows_total ? p.tree_mask + static_cast<std::int64_t>(r / group) * p.mask_words : nullptr;
    row_token[h] = min(r / group, p.tokens - 1);
  }
  RowState<kHeadDim> st;

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
      attend_tile<T, kHeadDim, kTree>(st, mask, base + static_cast<std::uint32_t>(S::q(wg)),
                                      base + static_cast<std::uint32_t>(S::k(stage)),
                                      base + static_cast<std::uint32_t>(S::v(stage)), tile * kBlockN, masked,
                                      p.scale_log2);
    }
    tile = next;
  }
  cp_async_wait<0>();

  // Rows: the normalised output, or with splits this split's normalised partial and its
  // log-sum-exp (base 2; -inf for a row that saw no slot here) for the combine kernel.
  const std::int64_t partial_rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.row_sum[h] += __shfl_xor_sync(0xffffffffu, st.row_sum[h], 1);
    st.row_sum[h] += __shfl_xor_sync(0xffffffffu, st.row_sum[h], 2);
    const int r = mine + 16 * (warp % 4) + g + 8 * h;
    if (r >= rows_total) continue;
    const float inv = st.row_sum[h] > 0.f ? 1.f / st.row_sum[h] : 0.f;
    const int token = r / group, head = kv * group + r % group;
    if (p.partial_out == nullptr) {
      T* dst = p.out + static_cast<std::int64_t>(token) * p.out_stride_t + static_cast<std::int64_t>(head) * p.out_stride_h;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        *reinterpret_cast<std::uint32_t*>(dst + 8 * i + 2 * c) =
            pack2<T>(st.o[4 * i + 2 * h] * inv, st.o[4 * i + 2 * h + 1] * inv);
      }
    } else {
      const std::int64_t prow = split * partial_rows + static_cast<std::int64_t>(token) * p.heads_q + head;
      float* dst = p.partial_out + prow * kHeadDim;
#pragma unroll
      for (int i = 0; i < kHeadDim / 8; ++i) {
        *reinterpret_cast<float2*>(dst + 8 * i + 2 * c) =
            make_float2(st.o[4 * i + 2 * h] * inv, st.o[4 * i + 2 * h + 1] * inv);
      }
      if (c == 0) p.partial_lse[prow] = st.row_sum[h] > 0.f ? st.row_max[h] + log2f(st.row_sum[h]) : -INFINITY;
    }
  }
#endif  // EDGESPEC_SM90_ENABLED
}

template <typename T, int kHeadDim, bool kTree>
Status launch(const AttentionParams<T>& p, cudaStream_t stream) {
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.group;
  const std::int64_t row_tiles = (rows + kBlockM - 1) / kBlockM;
  EDGESPEC_RETURN_IF_ERROR(check_fits(row_tiles, kMaxGridX, "attention (sm90): number of query row tiles"));
  auto* kernel = attention_kernel<T, kHeadDim, kTree>;
  const int smem = attention_sm90_smem_bytes(kHeadDim, p.tokens, p.group, p.block_mask != nullptr ? p.block_words : 0);
  EDGESPEC_RETURN_IF_ERROR(
      check_smem_optin(smem, "attention (sm90)", "block-selection rows grow with the tokens a block spans"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "attention (sm90): requesting dynamic shared memory"));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.splits));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("attention_kernel (sm90)");
  if (p.splits == 1) return Status::success();
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
