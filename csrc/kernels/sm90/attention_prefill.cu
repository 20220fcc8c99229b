// Causal prefill attention for Hopper (sm_90a): the math of the generic kernel (attention.cuh:
// packed GQA rows, online softmax in base 2, P rounded to the storage type before P.V) with both
// products on wgmma, which the generic kernel's mma.sync cannot match on compute-bound prefill.
//
// One block = two warpgroups (256 threads) = 128 packed query rows r = t * G + g of one KV head,
// 64 per warpgroup: every K/V tile brought to shared memory serves 128 rows, which halves the
// L2 traffic of a one-warpgroup block (at 64 rows per tile a long causal prefill reads K/V from L2
// at about the rate the tensor cores consume them). Shared memory (128-byte swizzled, gmma_desc.h):
// a Q tile per warpgroup and two stages of K and V tiles of 64 keys, each tile D / 64 column blocks
// of 64 rows x 128 bytes. Per key tile: all threads cp.async the next tile while this one is used;
// each warpgroup then, for its own rows (skipping tiles past its last row's diagonal), computes
// S = Q.K^T as D / 16 wgmma m64n64k16 steps with both operands in shared memory (K-major); the
// causal mask (tiles that cross a row's diagonal), the online softmax and the rescale of O run on
// the accumulators in registers; O += P.V is 4 wgmma m64nDk16 steps with P from registers (the S
// accumulators, rounded and packed: the wgmma A layout) and V from shared memory (MN-major).
// Blocks with the most key tiles (the last rows) are scheduled first.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/checks.h"
#include "common/launch.h"
#include "kernels/sm90/arch.cuh"
#include "kernels/sm90/attention_sm90.h"
#include "kernels/sm90/wgmma.cuh"

namespace edgespec {

namespace sm90_prefill {

constexpr int kWarpgroups = 2;               // consumers of every K/V tile
constexpr int kThreads = 128 * kWarpgroups;
constexpr int kRowsPerGroup = 64;            // wgmma M
constexpr int kBlockM = kRowsPerGroup * kWarpgroups;  // packed query rows per block
constexpr int kBlockN = kAttentionBlockN;    // keys per tile (wgmma N of S, K of P.V)
static_assert(kBlockN == 64, "S is one m64n64 product per k16 step; P.V takes 4 k16 steps");

template <int kHeadDim>
struct Smem {
  static constexpr int kTileBytes = 64 * kHeadDim * 2;  // 64 rows of kHeadDim 16-bit elements
  __host__ __device__ static constexpr int q(int group) { return group * kTileBytes; }
  __host__ __device__ static constexpr int k(int stage) { return (kWarpgroups + 2 * stage) * kTileBytes; }
  __host__ __device__ static constexpr int v(int stage) { return (kWarpgroups + 2 * stage + 1) * kTileBytes; }
  // A Q tile per warpgroup, two stages of K and V, and room to move the start to a 1024-byte
  // boundary of the shared window.
  static constexpr int kBytes = (kWarpgroups + 4) * kTileBytes + static_cast<int>(kGmmaSwizzleAtomBytes);
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

// The running softmax state of one thread: its two rows (16 w + g and + 8 of its warpgroup's 64,
// w = warp in the warpgroup), the last slot each sees, and its share of their output.
template <int kHeadDim>
struct RowState {
  int limit[2];
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float o[kHeadDim / 2] = {};
};

// One K/V tile for one warpgroup: S = Q.K^T, mask (`masked`: the tile crosses a row's diagonal),
// online softmax, O += P.V. q, k, v: shared-window addresses of the swizzled tiles.
template <typename T, int kHeadDim>
__device__ __forceinline__ void attend_tile(RowState<kHeadDim>& st, std::uint32_t q, std::uint32_t k,
                                            std::uint32_t v, int first_slot, bool masked, float scale_log2) {
  constexpr int kO = kHeadDim / 2;
  const int c = static_cast<int>(threadIdx.x) % 4;
  float s[32] = {};  // overwritten by the first step (accumulate = 0)
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    // Dims 16kk..16kk+15: column block kk / 4 (64 rows x 128 bytes), 32 bytes per k16 step in it.
    const std::uint32_t slice = static_cast<std::uint32_t>((kk / 4) * 64 * 128 + (kk % 4) * 32);
    wgmma_ss<T, 64>(s, gmma_desc_sw128(q + slice, 16, 1024), gmma_desc_sw128(k + slice, 16, 1024), kk > 0);
  }
  wgmma_commit();
  wgmma_wait<0>();
#pragma unroll
  for (int i = 0; i < 32; ++i) wgmma_fence_operand(s[i]);

  // Scale to base 2, mask past each row's last slot.
  float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h = (i % 4) / 2;
    const int slot = first_slot + 8 * (i / 4) + 2 * c + (i % 2);
    s[i] = masked && slot > st.limit[h] ? -INFINITY : s[i] * scale_log2;
    tile_max[h] = fmaxf(tile_max[h], s[i]);
  }
  float alpha[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
    tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
    const float next = fmaxf(st.row_max[h], tile_max[h]);  // finite: slot 0 is in tile 0 for every row
    alpha[h] = exp2f(st.row_max[h] - next);
    st.row_max[h] = next;
    st.row_sum[h] *= alpha[h];
  }
#pragma unroll
  for (int i = 0; i < 32; ++i) {
    const int h = (i % 4) / 2;
    s[i] = exp2f(s[i] - st.row_max[h]);
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

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kThreads, 1) prefill_kernel(const AttentionParams<T> p) {
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
  const int group = p.group, kv = static_cast<int>(blockIdx.y);
  const int rows_total = p.tokens * group;
  const int m0 = (static_cast<int>(gridDim.x) - 1 - static_cast<int>(blockIdx.x)) * kBlockM;  // longest first
  const int prefix = p.seqlen - p.tokens;
  auto row_q = [&](int r) -> const T* {
    if (r >= rows_total) return nullptr;
    return p.q + static_cast<std::int64_t>(r / group) * p.q_stride_t +
           static_cast<std::int64_t>(kv * group + r % group) * p.q_stride_h;
  };
  // The key tiles: those holding a slot some row of the block sees; per warpgroup, those holding a
  // slot one of its rows sees (none for a warpgroup past the last row) and those all its rows see whole.
  const int tiles = (prefix + min(p.tokens - 1, (m0 + kBlockM - 1) / group) + kBlockN) / kBlockN;
  const int mine = m0 + kRowsPerGroup * wg;
  const int my_tiles =
      mine < rows_total ? (prefix + min(p.tokens - 1, (mine + kRowsPerGroup - 1) / group) + kBlockN) / kBlockN : 0;
  const int my_whole_tiles = (prefix + mine / group + 1) / kBlockN;

#pragma unroll
  for (int w = 0; w < kWarpgroups; ++w) {
    load_tile<T, kHeadDim>(smem + S::q(w), p.q, [&](int i) { return row_q(m0 + kRowsPerGroup * w + i); });
  }
  auto load_kv = [&](int tile, int stage) {
    auto key_row = [&](const T* base_ptr, std::int64_t stride_s, std::int64_t stride_h) {
      return [=](int i) -> const T* {
        const int slot = tile * kBlockN + i;
        return slot < p.seqlen ? base_ptr + slot * stride_s + kv * stride_h : nullptr;
      };
    };
    load_tile<T, kHeadDim>(smem + S::k(stage), p.k, key_row(p.k, p.k_stride_s, p.k_stride_h));
    load_tile<T, kHeadDim>(smem + S::v(stage), p.v, key_row(p.v, p.v_stride_s, p.v_stride_h));
  };
  load_kv(0, 0);
  cp_async_commit();

  RowState<kHeadDim> st;
#pragma unroll
  for (int h = 0; h < 2; ++h) st.limit[h] = prefix + (mine + 16 * (warp % 4) + g + 8 * h) / group;

  for (int tile = 0; tile < tiles; ++tile) {
    const int stage = tile & 1;
    cp_async_wait<0>();
    fence_proxy_async();  // the cp.async writes, before the wgmma reads of the async proxy
    __syncthreads();      // every thread's copies landed; the other stage is free again
    if (tile + 1 < tiles) load_kv(tile + 1, stage ^ 1);
    cp_async_commit();
    if (tile < my_tiles) {  // uniform per warpgroup, as wgmma requires
      attend_tile<T, kHeadDim>(st, base + static_cast<std::uint32_t>(S::q(wg)),
                               base + static_cast<std::uint32_t>(S::k(stage)),
                               base + static_cast<std::uint32_t>(S::v(stage)), tile * kBlockN,
                               tile >= my_whole_tiles, p.scale_log2);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    st.row_sum[h] += __shfl_xor_sync(0xffffffffu, st.row_sum[h], 1);
    st.row_sum[h] += __shfl_xor_sync(0xffffffffu, st.row_sum[h], 2);
    const int r = mine + 16 * (warp % 4) + g + 8 * h;
    if (r >= rows_total) continue;
    const float inv = st.row_sum[h] > 0.f ? 1.f / st.row_sum[h] : 0.f;
    T* dst = p.out + static_cast<std::int64_t>(r / group) * p.out_stride_t +
             static_cast<std::int64_t>(kv * group + r % group) * p.out_stride_h;
#pragma unroll
    for (int i = 0; i < kHeadDim / 8; ++i) {
      *reinterpret_cast<std::uint32_t*>(dst + 8 * i + 2 * c) =
          pack2<T>(st.o[4 * i + 2 * h] * inv, st.o[4 * i + 2 * h + 1] * inv);
    }
  }
#endif  // EDGESPEC_SM90_ENABLED
}

}  // namespace sm90_prefill

template <typename T, int kHeadDim>
Status launch_attention_prefill_sm90(const AttentionParams<T>& p, cudaStream_t stream) {
  using namespace sm90_prefill;
  if (const char* why = attention_sm90_rejection(p)) {
    return Status::unsupported(std::string("attention (sm90 prefill): cannot take ") + why);
  }
  if (p.tokens == 0 || p.heads_q == 0) return Status::success();
  int device = 0, major = 0, minor = 0;
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaGetDevice(&device), "attention (sm90): cudaGetDevice"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                                             "attention (sm90): reading the compute capability"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
                                             "attention (sm90): reading the compute capability"));
  if (major != 9 || minor != 0) {
    return Status::unsupported("attention (sm90 prefill): needs a compute capability 9.0 GPU (H100/H200), this is " +
                               std::to_string(major) + "." + std::to_string(minor));
  }
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.group;
  const std::int64_t row_tiles = (rows + kBlockM - 1) / kBlockM;
  EDGESPEC_RETURN_IF_ERROR(check_fits(row_tiles, kMaxGridX, "attention (sm90): number of query row tiles"));
  auto* kernel = prefill_kernel<T, kHeadDim>;
  constexpr int smem = Smem<kHeadDim>::kBytes;
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "attention (sm90): requesting dynamic shared memory"));
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(p.heads_kv));
  kernel<<<grid, kThreads, smem, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("attention prefill_kernel (sm90)");
  return Status::success();
}

template Status launch_attention_prefill_sm90<__nv_bfloat16, 64>(const AttentionParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_attention_prefill_sm90<__nv_bfloat16, 128>(const AttentionParams<__nv_bfloat16>&, cudaStream_t);
template Status launch_attention_prefill_sm90<__half, 64>(const AttentionParams<__half>&, cudaStream_t);
template Status launch_attention_prefill_sm90<__half, 128>(const AttentionParams<__half>&, cudaStream_t);

}  // namespace edgespec
