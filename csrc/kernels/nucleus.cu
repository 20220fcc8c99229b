// The top-p nucleus floor (see sampling.h, "Top-p: the nucleus floor"). It reads the softmax's
// fp32 probabilities whatever the model's dtype, so it is compiled once here rather than per
// storage dtype.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch.h"
#include "common/reduce.cuh"
#include "common/vec.cuh"
#include "kernels/sampling.h"

namespace edgespec {

namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kSplitThreads = 256;
constexpr int kFloorThreads = 1024;
constexpr int kBins = kNucleusBins;
constexpr int kExponentShift = 23;  // pass 1's digit: the exponent (bits 30..23; the sign is 0)
// Passes 2-4: 8-bit digits of the mantissa from the top (bits 22..15, 14..7), the last one short
// (bits 6..0).
constexpr int kMantissaPasses = 3;
constexpr int kDigitBits = 8;
// The floor's exponent bin is copied to shared memory (32 KB) when it holds at most this many
// tokens, so that passes 3-4 do not read the row again.
constexpr int kStagedKeys = 8192;
// A warp whose lanes hold at most this many distinct digits adds them one digit at a time, summed
// across the warp; with more, digits are spread enough for one shared atomic per lane.
constexpr int kMaxDigitGroups = 8;
// kStagedKeys, kMaxDigitGroups and the split length (kNucleusSplitTokens) are estimates, untuned
// until bench/python/bench_sampling.py has run on a GPU.
constexpr float kMassUnit = static_cast<float>(1ull << kNucleusMassBits);

static_assert(kNucleusSplitTokens % 4 == 0, "splits start on 16-byte boundaries");
static_assert(kBins % kWarpSize == 0, "each lane of the searching warp holds whole bins");

// A probability's bits as an order-preserving key: positive floats compare as their bit patterns.
// Zeros, negatives and NaN become 0, the key of probability 0.
__device__ __forceinline__ unsigned key_of(float p) { return p > 0.f ? __float_as_uint(p) : 0u; }

// Fixed-point mass of a key's probability, clamped to 1 (<= 2^40, so a row's sum fits 64 bits).
__device__ __forceinline__ unsigned long long mass_of(unsigned key) {
  return static_cast<unsigned long long>(rintf(fminf(__uint_as_float(key), 1.f) * kMassUnit));
}

// Adds the mass of each lane's key (and with kCounts, one token) to bin `digit` of the block's
// histograms; lanes with digit < 0 add nothing (a warp with none returns before any mass is made). Called by whole warps. Lanes that share a digit are summed
// across the warp first: pass 1 puts most of a row on a few exponents, where one shared atomic per
// token would serialise thousands of tokens on the same bins.
template <bool kCounts>
__device__ __forceinline__ void add_to_bins(unsigned long long* mass_bins, unsigned* count_bins, int digit,
                                            unsigned key) {
  if (__ballot_sync(kFullMask, digit >= 0) == 0) return;
  const unsigned long long mass = mass_of(key);
  const int lane = threadIdx.x % kWarpSize;
  const unsigned peers = __match_any_sync(kFullMask, digit);  // the lanes holding this lane's digit
  const unsigned leaders = __ballot_sync(kFullMask, digit >= 0 && lane == __ffs(static_cast<int>(peers)) - 1);
  if (__popc(leaders) > kMaxDigitGroups) {
    if (digit >= 0) {
      atomicAdd(&mass_bins[digit], mass);
      if constexpr (kCounts) atomicAdd(&count_bins[digit], 1u);
    }
    return;
  }
  // mass <= 2^40: its two 20-bit halves sum over 32 lanes within 32 bits.
  const unsigned lo = static_cast<unsigned>(mass & 0xfffffu);
  const unsigned hi = static_cast<unsigned>(mass >> 20);
  for (unsigned rest = leaders; rest != 0; rest &= rest - 1) {
    const int leader = __ffs(static_cast<int>(rest)) - 1;
    const bool in_group = (peers >> leader) & 1u;
    const unsigned sum_lo = __reduce_add_sync(kFullMask, in_group ? lo : 0u);
    const unsigned sum_hi = __reduce_add_sync(kFullMask, in_group ? hi : 0u);
    if (lane == leader) {
      atomicAdd(&mass_bins[digit], (static_cast<unsigned long long>(sum_hi) << 20) + sum_lo);
      if constexpr (kCounts) atomicAdd(&count_bins[digit], static_cast<unsigned>(__popc(peers)));
    }
  }
}

// Calls visit(key, present) for the elements [begin, end) of a row, kVec per lane and step, with
// trip counts uniform across each warp (visit runs warp collectives); lanes past the end visit
// (0, false). begin and end are multiples of kVec.
template <int kVec, typename Visit>
__device__ __forceinline__ void scan_row(const float* row, int begin, int end, Visit visit) {
  const int lane = threadIdx.x % kWarpSize;
  const int first = begin + static_cast<int>(threadIdx.x - lane) * kVec;
  for (int base = first; base < end; base += static_cast<int>(blockDim.x) * kVec) {
    const int i = base + lane * kVec;
    const bool present = i < end;
    Vec<float, kVec> x{};
    if (present) x = load_vec<float, kVec>(row + i);
#pragma unroll
    for (int j = 0; j < kVec; ++j) visit(present ? key_of(x.v[j]) : 0u, present);
  }
}

// The same over keys[0, n) in shared memory.
template <typename Visit>
__device__ __forceinline__ void scan_keys(const unsigned* keys, int n, Visit visit) {
  const int lane = threadIdx.x % kWarpSize;
  for (int base = static_cast<int>(threadIdx.x) - lane; base < n; base += static_cast<int>(blockDim.x)) {
    const int i = base + lane;
    visit(i < n ? keys[i] : 0u, i < n);
  }
}

// Pass 1, one block per (row, split): the mass and token histograms of the exponents of the
// split's probabilities.
template <int kVec>
__global__ void __launch_bounds__(kSplitThreads) nucleus_split_kernel(const NucleusFloorParams p) {
  __shared__ unsigned long long mass[kBins];
  __shared__ unsigned count[kBins];
  const std::int64_t r = blockIdx.x;
  const int split = static_cast<int>(blockIdx.y);
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    mass[b] = 0;
    count[b] = 0;
  }
  __syncthreads();
  const int begin = split * static_cast<int>(kNucleusSplitTokens);
  const int end = static_cast<int>(min(static_cast<std::int64_t>(begin) + kNucleusSplitTokens,
                                       static_cast<std::int64_t>(p.vocab)));
  scan_row<kVec>(p.probs + r * p.row_stride, begin, end, [&](unsigned key, bool present) {
    add_to_bins<true>(mass, count, present ? static_cast<int>(key >> kExponentShift) : -1, key);
  });
  __syncthreads();
  const std::int64_t out = (r * p.splits + split) * kBins;
  for (int b = threadIdx.x; b < kBins; b += blockDim.x) {
    p.split_mass[out + b] = mass[b];
    p.split_count[out + b] = count[b];
  }
}

// Run by warp 0: the bin of `mass` where the mass counted from the top bin down reaches *need,
// which holds the floor. Adds its digit to *prefix at `shift`, leaves in *need the mass still to
// reach inside it and, with counts, its token count in *bin_tokens. Returns false (on lane 0) only
// when all the bins together hold less than *need, which pass 1 of a row whose mass rounds short
// of top_p can meet; later passes always find their bin, since a bin's sub-bins hold exactly its
// mass.
__device__ bool find_bin(const unsigned long long* mass, const unsigned* count, int shift, unsigned* prefix,
                         unsigned long long* need, unsigned* bin_tokens) {
  constexpr int kPerLane = kBins / kWarpSize;
  const int lane = threadIdx.x;
  const unsigned long long target = *need;
  __syncwarp();  // every lane has read *need before the finding lane rewrites it
  unsigned long long own = 0;  // this lane's bins [kPerLane * lane, kPerLane * (lane + 1))
  for (int i = 0; i < kPerLane; ++i) own += mass[lane * kPerLane + i];
  unsigned long long suffix = own;  // the mass of the bins of lanes >= this one
  for (int off = 1; off < kWarpSize; off <<= 1) {
    const unsigned long long v = __shfl_down_sync(kFullMask, suffix, off);
    if (lane + off < kWarpSize) suffix += v;
  }
  const unsigned long long above = suffix - own;
  const bool mine = above < target && suffix >= target;  // at most one lane: the suffixes fall
  if (mine) {
    unsigned long long reached = above;
    for (int i = kPerLane - 1; i >= 0; --i) {
      const int bin = lane * kPerLane + i;
      if (reached + mass[bin] >= target) {
        *prefix |= static_cast<unsigned>(bin) << shift;
        *need = target - reached;
        if (count != nullptr) *bin_tokens = count[bin];
        break;
      }
      reached += mass[bin];
    }
  }
  return __any_sync(kFullMask, mine);
}

// Passes 2-4, one block per row, after pass 1's split histograms are merged.
template <int kVec>
__global__ void __launch_bounds__(kFloorThreads) nucleus_floor_kernel(const NucleusFloorParams p) {
  __shared__ unsigned long long mass[kBins];
  __shared__ unsigned count[kBins];
  __shared__ unsigned staged[kStagedKeys];
  __shared__ int num_staged;
  __shared__ unsigned prefix;          // the floor's bits found so far
  __shared__ unsigned long long need;  // mass still to reach inside the prefix's range
  __shared__ unsigned bin_tokens;      // tokens in the floor's exponent bin
  __shared__ int found;

  const std::int64_t r = blockIdx.x;
  const int tid = threadIdx.x;
  const int lane = tid % kWarpSize;
  const float* row = p.probs + r * p.row_stride;
  for (int b = tid; b < kBins; b += blockDim.x) {
    unsigned long long m = 0;
    unsigned c = 0;
    for (int s = 0; s < p.splits; ++s) {
      const std::int64_t at = (r * p.splits + s) * kBins + b;
      m += p.split_mass[at];
      c += p.split_count[at];
    }
    mass[b] = m;
    count[b] = c;
  }
  if (tid == 0) {
    prefix = 0;
    need = p.need;
    num_staged = 0;
  }
  __syncthreads();
  if (tid < kWarpSize) {
    const bool ok = find_bin(mass, count, kExponentShift, &prefix, &need, &bin_tokens);
    if (tid == 0) found = ok;
  }
  __syncthreads();
  if (!found) {  // the row's mass rounds below need: every token stays
    if (tid == 0) p.out[r * p.out_stride] = 0.f;
    return;
  }
  const bool stage = bin_tokens <= static_cast<unsigned>(kStagedKeys);
  unsigned known = 0xffu << kExponentShift;  // the key bits `prefix` holds
  for (int pass = 0; pass < kMantissaPasses; ++pass) {
    const int top = kExponentShift - kDigitBits * pass;  // this pass's digit is bits [shift, top)
    const int shift = max(top - kDigitBits, 0);
    const unsigned digits = (1u << (top - shift)) - 1u;
    for (int b = tid; b < kBins; b += blockDim.x) mass[b] = 0;
    __syncthreads();
    const unsigned want = prefix;
    const bool staging = stage && pass == 0;
    auto visit = [&](unsigned key, bool present) {
      const bool match = present && (key & known) == want;
      add_to_bins<false>(mass, nullptr, match ? static_cast<int>((key >> shift) & digits) : -1, key);
      if (staging) {
        const unsigned matches = __ballot_sync(kFullMask, match);
        if (matches != 0) {
          int base = 0;
          if (lane == 0) base = atomicAdd(&num_staged, __popc(matches));
          base = __shfl_sync(kFullMask, base, 0);
          if (match) staged[base + __popc(matches & ((1u << lane) - 1u))] = key;
        }
      }
    };
    if (stage && pass > 0) {
      scan_keys(staged, num_staged, visit);
    } else {
      scan_row<kVec>(row, 0, p.vocab, visit);
    }
    __syncthreads();
    if (tid < kWarpSize) find_bin(mass, nullptr, shift, &prefix, &need, &bin_tokens);
    known |= digits << shift;
    __syncthreads();
  }
  if (tid == 0) p.out[r * p.out_stride] = __uint_as_float(prefix);
}

}  // namespace

Status launch_nucleus_floor(const NucleusFloorParams& p, cudaStream_t stream) {
  if (p.rows == 0) return Status::success();
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.rows, kMaxGridX, "top-p: number of rows"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.splits, kMaxGridY, "top-p: vocabulary size / 8192"));
  const bool vectorized = p.vocab % 4 == 0 && p.row_stride % 4 == 0 && is_aligned(p.probs, 16);
  return EDGESPEC_BOOL_SWITCH(vectorized, kVectorized, [&] {
    constexpr int kVec = kVectorized ? 4 : 1;
    const dim3 split_grid(static_cast<unsigned>(p.rows), static_cast<unsigned>(p.splits));
    nucleus_split_kernel<kVec><<<split_grid, kSplitThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("nucleus_split_kernel");
    nucleus_floor_kernel<kVec><<<static_cast<unsigned>(p.rows), kFloorThreads, 0, stream>>>(p);
    EDGESPEC_CHECK_LAUNCH("nucleus_floor_kernel");
    return Status::success();
  });
}

}  // namespace edgespec
