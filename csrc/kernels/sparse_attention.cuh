// Compressed-key and block-score kernels of InfLLM-v2 block selection and their launchers; see
// sparse_attention.h for the contract. Included only by the generated instance files
// csrc/instances/sparse_<dtype>.cu.
//
// Status: correct on the CPU emulator (tests/test_sparse_kernels.py), never run on a GPU.
#pragma once

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/checks.h"
#include "common/vec.cuh"
#include "kernels/sparse_attention.h"
#include "kernels/sparse_kernels.cuh"
#include "kernels/sparse_scores_mma.cuh"

namespace edgespec {

namespace sparse_detail {

constexpr int kCompressThreads = 128;
constexpr int kScoreThreads = 128;

// One block per compressed-key slot stride; every thread sums kernel_size keys of its dims in
// fp32. Kernels complete within [0, from) are left alone: they cover committed tokens only.
template <typename T>
__global__ void __launch_bounds__(kCompressThreads) compress_keys_kernel(const SparseCompressParams<T> p) {
  const int from = p.range[0];
  const int to = min(p.range[1], p.seqlen);
  const int first = num_kernels(from, p.kernel_size, p.kernel_stride);
  const int last = min(num_kernels(to, p.kernel_size, p.kernel_stride), p.max_kernels);
  const int head = blockIdx.y;
  const float inv = 1.f / static_cast<float>(p.kernel_size);
  for (int j = first + static_cast<int>(blockIdx.x); j < last; j += p.grid_kernels) {
    const T* src = p.k + static_cast<std::int64_t>(j) * p.kernel_stride * p.k_stride_s + head * p.k_stride_h;
    T* dst = p.ck + static_cast<std::int64_t>(j) * p.ck_stride_c + head * p.ck_stride_h;
    for (int d = threadIdx.x; d < p.head_dim; d += kCompressThreads) {
      float sum = 0.f;
      for (int i = 0; i < p.kernel_size; ++i) sum += to_float(src[i * p.k_stride_s + d]);
      dst[d] = from_float<T>(sum * inv);
    }
  }
}

// Scores of one (query, KV head, split). kProbs == false: per query head, the running max and
// sum of exp of the scaled logits over this split's visible kernels go to `partial`. kProbs ==
// true: the splits' partials are merged into each head's log-sum-exp, the logits recomputed, and
// scores[t, g, j] = sum over the group's heads of exp(logit - lse) written for this split's run.
template <typename T, bool kProbs>
__global__ void __launch_bounds__(kScoreThreads) scores_kernel(const SparseScoreParams<T> p) {
  extern __shared__ float smem[];
  const int group = p.group;
  const int dim = p.head_dim;
  const int ck_row = dim + 1;  // odd stride: lanes reading different kernels hit different banks
  float* q_s = smem;                                  // [G][D]
  float* ck_s = q_s + group * dim;                    // [kChunk][D + 1]
  float* logit_s = ck_s + kSparseScoreChunk * ck_row;  // [G][kChunk]
  float* stat_s = logit_s + group * kSparseScoreChunk; // [G][2]: max and sum, or log-sum-exp

  const int t = blockIdx.x;
  const int g = blockIdx.y;
  const int split = blockIdx.z;
  const int tid = threadIdx.x;
  const int head0 = g * group;
  const std::int64_t pos = p.positions[t];
  const int committed = num_kernels(*p.kv_limit, p.kernel_size, p.kernel_stride);
  const int visible = scored_kernels(pos, *p.kv_limit, p.kernel_size, p.kernel_stride, p.max_kernels,
                                     p.path != nullptr ? p.path_kernels : -1);
  const int begin = split * p.kernels_per_split;
  const int end = begin + p.kernels_per_split;
  const std::int64_t part_row = static_cast<std::int64_t>(t) * p.heads_q + head0;
  const std::int64_t rows = static_cast<std::int64_t>(p.tokens) * p.heads_q;

  for (int i = tid; i < group * dim; i += kScoreThreads) {
    const int h = i / dim;
    q_s[i] = to_float(p.q[t * p.q_stride_t + (head0 + h) * p.q_stride_h + i % dim]);
  }
  if (tid < group) {
    if constexpr (kProbs) {
      float mx = -INFINITY;
      for (int z = 0; z < p.splits; ++z) mx = fmaxf(mx, p.partial[(z * rows + part_row + tid) * 2]);
      float total = 0.f;
      if (mx != -INFINITY) {
        for (int z = 0; z < p.splits; ++z) {
          const float* st = p.partial + (z * rows + part_row + tid) * 2;
          total += st[1] * expf(st[0] - mx);
        }
      }
      stat_s[2 * tid] = total > 0.f ? mx + logf(total) : INFINITY;  // +inf: every probability 0
    } else {
      stat_s[2 * tid] = -INFINITY;
      stat_s[2 * tid + 1] = 0.f;
    }
  }
  __syncthreads();

  float* out_row = kProbs ? p.scores + (static_cast<std::int64_t>(t) * p.heads_kv + g) * p.score_cols : nullptr;
  const int run_end = min(end, visible);
  for (int c0 = begin; c0 < run_end; c0 += kSparseScoreChunk) {
    const int n = min(kSparseScoreChunk, run_end - c0);
    for (int i = tid; i < n * dim; i += kScoreThreads) {
      const int j = i / dim;
      const int kernel = c0 + j;
      // A tree token's kernels past the committed ones are its path's own.
      const T* src = p.path != nullptr && kernel >= committed
                         ? p.path + t * p.path_stride_t + (kernel - committed) * p.path_stride_e + g * p.path_stride_h
                         : p.ck + static_cast<std::int64_t>(kernel) * p.ck_stride_c + g * p.ck_stride_h;
      ck_s[j * ck_row + i % dim] = to_float(src[i % dim]);
    }
    __syncthreads();
    for (int i = tid; i < group * kSparseScoreChunk; i += kScoreThreads) {
      const int h = i / kSparseScoreChunk;
      const int j = i % kSparseScoreChunk;
      float dot = 0.f;
      if (j < n) {
        const float* qr = q_s + h * dim;
        const float* kr = ck_s + j * ck_row;
        for (int d = 0; d < dim; ++d) dot = fmaf(qr[d], kr[d], dot);
      }
      logit_s[i] = j < n ? dot * p.scale : -INFINITY;
    }
    __syncthreads();
    if constexpr (kProbs) {
      for (int j = tid; j < n; j += kScoreThreads) {
        float sum = 0.f;
        for (int h = 0; h < group; ++h) sum += expf(logit_s[h * kSparseScoreChunk + j] - stat_s[2 * h]);
        out_row[c0 + j] = sum;
      }
    } else if (tid < group) {
      float mx = stat_s[2 * tid];
      float sum = stat_s[2 * tid + 1];
      for (int j = 0; j < n; ++j) {
        const float x = logit_s[tid * kSparseScoreChunk + j];
        if (x > mx) {
          sum = sum * expf(mx - x) + 1.f;
          mx = x;
        } else {
          sum += expf(x - mx);
        }
      }
      stat_s[2 * tid] = mx;
      stat_s[2 * tid + 1] = sum;
    }
    __syncthreads();
  }

  if constexpr (kProbs) {
    // Columns of this split the query cannot see: -inf, so that no element is left unwritten.
    for (int j = max(begin, visible) + tid; j < end; j += kScoreThreads) out_row[j] = -INFINITY;
  } else if (tid < group) {
    float* st = p.partial + (static_cast<std::int64_t>(split) * rows + part_row + tid) * 2;
    st[0] = stat_s[2 * tid];
    st[1] = stat_s[2 * tid + 1];
  }
}

inline int score_smem_bytes(int group, int dim) {
  return static_cast<int>(sizeof(float)) *
         (group * dim + kSparseScoreChunk * (dim + 1) + group * kSparseScoreChunk + 2 * group);
}

}  // namespace sparse_detail

template <typename T>
Status launch_sparse_compress_keys(const SparseCompressParams<T>& p, cudaStream_t stream) {
  using namespace sparse_detail;
  if (p.grid_kernels <= 0 || p.heads_kv <= 0) return Status::success();
  const dim3 grid(static_cast<unsigned>(p.grid_kernels), static_cast<unsigned>(p.heads_kv));
  compress_keys_kernel<T><<<grid, kCompressThreads, 0, stream>>>(p);
  EDGESPEC_CHECK_LAUNCH("sparse compress_keys_kernel");
  return Status::success();
}

template <typename T>
Status launch_sparse_scores(const SparseScoreParams<T>& p, cudaStream_t stream) {
  using namespace sparse_detail;
  if (p.tokens == 0) return Status::success();
  if constexpr (!std::is_same_v<T, float>) {
    if (sparse_scores_mma_applies(p.group, p.head_dim, 2) &&
        p.kernels_per_split % kSparseMmaKernels == 0 && scores_mma_aligned(p)) {
      return p.head_dim == 64 ? launch_scores_mma<T, 64>(p, stream) : launch_scores_mma<T, 128>(p, stream);
    }
  }
  const int smem = score_smem_bytes(p.group, p.head_dim);
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.tokens, 0x7fffffff, "sparse scores: tokens"));
  EDGESPEC_RETURN_IF_ERROR(check_fits(p.splits, 65535, "sparse scores: splits"));
  const dim3 grid(static_cast<unsigned>(p.tokens), static_cast<unsigned>(p.heads_kv), static_cast<unsigned>(p.splits));
  return launch_score_passes(scores_kernel<T, false>, scores_kernel<T, true>, p, grid, kScoreThreads, smem, stream);
}

}  // namespace edgespec
