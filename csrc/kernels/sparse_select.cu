// Block selection of InfLLM-v2 (see sparse_attention.h, `sparse_select`): dtype-independent (it
// reads the fp32 kernel scores), so it is compiled once here rather than per storage dtype.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"
#include "kernels/sparse_attention.h"
#include "kernels/sparse_kernels.cuh"

namespace edgespec {

namespace {

using sparse_detail::min64;
using sparse_detail::scored_kernels;

// Threads per (query, KV head) block: a decode step or a small tree launches a handful of blocks,
// whose latency is the step's, so they get a full block each; a prefill launches thousands.
constexpr int kSelectThreadsFew = 1024;
constexpr int kSelectThreadsMany = 256;
constexpr int kSelectFewBlocks = 64;  // at most this many (query, KV head) blocks: kSelectThreadsFew
constexpr int kBlockBits = 12;        // block indices < kSparseMaxBlocks = 2^12
static_assert(kSparseMaxBlocks <= (1 << kBlockBits), "a block index fits the key's low bits");
constexpr int kKeyBits = 32 + kBlockBits;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// The ranking key of a candidate block: its score's bits made order-preserving as an unsigned
// integer, then the block index inverted, so that a higher score ranks first and equal scores
// rank the lower block first (the torch path's stable descending sort gives the same order). Keys
// are distinct, and 0 is below every candidate's key (it marks "not a candidate").
__device__ __forceinline__ std::uint64_t rank_key(float score, int block) {
  std::uint32_t u = __float_as_uint(score == 0.f ? 0.f : score);  // -0 ranks as +0, as a float compare does
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<std::uint64_t>(u) << kBlockBits) | static_cast<std::uint64_t>((1 << kBlockBits) - 1 - block);
}

// One block per (query t, KV head g). Fixed blocks (init, window) are set directly; the other
// blocks up to the query's own are candidates when their pooled score is finite; the top-k
// candidates are found by a most-significant-digit-first radix select over their keys (8 bits per
// pass: a histogram of the digit among the keys that match the prefix found so far, then the digit
// at which the count from the top reaches k), which costs a dozen barriers where a bitonic sort of
// every block took ~66. The histogram is warp-aggregated: block scores span a few binary orders of
// magnitude, so in the first pass nearly every key has one of two or three digits, and an atomicAdd
// per key would serialise the block's thousands of keys (2048 at 128K) on those bins.
__global__ void __launch_bounds__(kSelectThreadsFew) select_kernel(const SparseSelectParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  std::uint64_t* bits = reinterpret_cast<std::uint64_t*>(smem);  // [words]
  std::uint64_t* keys = bits + p.words;                           // [num_blocks]
  __shared__ int hist[kRadixBins];
  __shared__ int candidates;
  __shared__ int remaining;
  __shared__ std::uint64_t prefix;

  const int t = blockIdx.x;
  const int g = blockIdx.y;
  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int threads = blockDim.x;
  const std::int64_t pos = p.positions[t];
  // Blocks at or before the query's own; a negative position selects nothing.
  const std::int64_t q_blk64 = pos < 0 ? -1 : pos / p.block_size;
  const int q_blk = static_cast<int>(min64(q_blk64, p.num_blocks - 1));
  const int nb = q_blk + 1;
  for (int w = tid; w < p.words; w += threads) bits[w] = 0;
  for (int i = tid; i < kRadixBins; i += threads) hist[i] = 0;
  if (tid == 0) {
    candidates = 0;
    prefix = 0;
  }
  __syncthreads();

  std::uint64_t* out = p.block_mask + (static_cast<std::int64_t>(t) * p.heads_kv + g) * p.words;
  auto set_bit = [&](int b) { atomicOr(reinterpret_cast<unsigned long long*>(&bits[b >> 6]), 1ull << (b & 63)); };
  if (pos + 1 < p.dense_len) {
    for (int b = tid; b < nb; b += threads) set_bit(b);
    __syncthreads();
    for (int w = tid; w < p.words; w += threads) out[w] = bits[w];
    return;
  }

  const int visible = scored_kernels(pos, *p.kv_limit, p.kernel_size, p.kernel_stride, p.max_kernels, p.path_kernels);
  const int r = p.block_size / p.kernel_stride;
  const float* row = p.scores + (static_cast<std::int64_t>(t) * p.heads_kv + g) * p.score_cols;
  int mine = 0;  // this thread's candidates
  for (int b = tid; b < nb; b += threads) {
    std::uint64_t key = 0;
    if (b < p.init_blocks || b > q_blk - p.window_blocks) {
      set_bit(b);
    } else {
      const int j0 = max(r * b - 1, 0);
      const int j1 = min(r * b + r, visible);  // exclusive
      float score = -INFINITY;
      for (int j = j0; j < j1; ++j) score = fmaxf(score, row[j]);
      if (score > -INFINITY) key = rank_key(score, b);
    }
    keys[b] = key;
    mine += key != 0;
  }
  if (mine > 0) atomicAdd(&candidates, mine);
  __syncthreads();

  const int k = min(p.topk, candidates);
  if (k > 0 && k < candidates) {
    // The k-th largest key, digit by digit from the top; keys are distinct, so exactly k keys are
    // >= it.
    if (tid == 0) remaining = k;
    std::uint64_t found = 0;  // the key bits `prefix` holds so far
    for (int shift = kKeyBits - kRadixBits; shift > -kRadixBits; shift -= kRadixBits) {
      const int s = max(shift, 0);  // the last pass takes the remaining low bits
      for (int b0 = tid - lane; b0 < nb; b0 += threads) {  // warp-uniform trips: the match below
        const int b = b0 + lane;
        const std::uint64_t key = b < nb ? keys[b] : 0;
        const bool counts = key != 0 && (key & found) == prefix;
        const int digit = counts ? static_cast<int>((key >> s) & (kRadixBins - 1)) : -1;
        const unsigned peers = __match_any_sync(0xffffffffu, digit);  // the lanes with this digit
        if (counts && lane == __ffs(static_cast<int>(peers)) - 1) atomicAdd(&hist[digit], __popc(peers));
      }
      __syncthreads();
      if (tid < 32) {
        // Lane l holds bins [8l, 8l + 8); counts from the top: above[l] = keys in bins of lanes > l.
        constexpr int kPerLane = kRadixBins / 32;
        const int need = remaining;
        __syncwarp();  // every lane has read `remaining` before the finding lane rewrites it
        int own = 0;
        for (int i = 0; i < kPerLane; ++i) own += hist[tid * kPerLane + i];
        int suffix = own;  // keys in bins of lanes >= tid
        for (int off = 1; off < 32; off <<= 1) {
          const int v = __shfl_down_sync(0xffffffffu, suffix, off);
          if (tid + off < 32) suffix += v;
        }
        const int above = suffix - own;
        if (above < need && suffix >= need) {  // exactly one lane: the k-th key's digit is in its bins
          int count = above;
          for (int i = kPerLane - 1; i >= 0; --i) {
            const int bin = tid * kPerLane + i;
            if (count + hist[bin] >= need) {
              prefix |= static_cast<std::uint64_t>(bin) << s;
              remaining = need - count;
              break;
            }
            count += hist[bin];
          }
        }
        __syncwarp();
        for (int i = 0; i < kPerLane; ++i) hist[tid * kPerLane + i] = 0;  // ready for the next pass
      }
      found |= static_cast<std::uint64_t>(kRadixBins - 1) << s;
      __syncthreads();
    }
  }
  // Select every candidate at or above the k-th key (all of them when k == candidates).
  const std::uint64_t kth = k == 0 ? ~0ull : (k == candidates ? 1ull : prefix);
  for (int b = tid; b < nb; b += threads) {
    if (keys[b] != 0 && keys[b] >= kth) set_bit(b);
  }
  __syncthreads();
  for (int w = tid; w < p.words; w += threads) out[w] = bits[w];
}

}  // namespace

Status launch_sparse_select(const SparseSelectParams& p, cudaStream_t stream) {
  if (p.tokens == 0 || p.heads_kv == 0) return Status::success();
  const int smem = p.words * 8 + p.num_blocks * 8;
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.tokens, 0x7fffffff, "sparse select: tokens"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.heads_kv, 65535, "sparse select: KV heads"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(
      cudaFuncSetAttribute(select_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
      "sparse select: shared memory"));
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.heads_kv));
  const int threads =
      static_cast<std::int64_t>(p.tokens) * p.heads_kv <= kSelectFewBlocks ? kSelectThreadsFew : kSelectThreadsMany;
  select_kernel<<<grid, threads, smem, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("sparse select_kernel");
  return Status::success();
}

}  // namespace edgespec
