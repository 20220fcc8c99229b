// Row-invariant dense GEMM for few rows: out = x @ weight^T (+ bias) with 16-bit weights stored
// as torch stores a Linear's ([N, K], rows contiguous), for the M = 1..64 rows of decode steps and
// speculative tree verification (trees of up to 128 tokens launch per 64 rows: ops/_kernels.py).
// The W4A16 kernel's pipeline, split-K and reduction with the dequantisation replaced by ldmatrix
// (w4a16.cuh, kDense).
//
// Why not cuBLAS: cuBLAS picks its kernel, tiles and split-K by M, so a token's projection rounds
// differently when it comes alone (a decode step) than among the T rows of a verified tree, and
// greedy speculative output then equals plain greedy output only up to near-ties. Here a row's
// sums run over a K partition planned from (N, K) alone (w4a16_num_splits) in a fixed order, and
// the M tiles only pick which mma rows hold it: bitwise the same result for any M and any row
// position (tests/test_dense_gemm_kernels.py). Decode is a weight stream either way; the cost
// against cuBLAS is bench_w4a16.py's `edgespec dense` column.
//
// Preconditions (checked by dense_gemm(); edgespec/ops/_kernels.py checks the same first):
//   * x [M, K] in {bf16, fp16}, 0 <= M <= 64, stride 1 along K, row stride a multiple of 8
//     elements, 16-byte aligned base; K % 16 == 0;
//   * weight [N, K] of x's dtype, stride 1 along K, row stride a multiple of 8, 16-byte aligned;
//     N % 64 == 0;
//   * bias null or [N] contiguous of x's dtype; out [M, N] contiguous, overlapping no input;
//   * splits in [1, K/16]; with splits > 1 partial fp32 [splits, M, N] and counters int32 [N / 64]
//     all zero on entry (left zero; not shared by launches running concurrently).
#pragma once

#include <cuda_runtime_api.h>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

struct DenseGemmArgs {
  TensorView x;                          // [M, K]
  TensorView weight;                     // [N, K]
  const TensorView* bias = nullptr;      // [N] or null
  TensorView out;                        // [M, N]
  const TensorView* partial = nullptr;   // fp32 [splits, M, N] (splits > 1)
  const TensorView* counters = nullptr;  // int32 [N / 64] (splits > 1)
  int splits = 1;                        // w4a16_num_splits(N, K, SMs): it does not depend on M
};

Status dense_gemm(const DenseGemmArgs& args, cudaStream_t stream);

}  // namespace edgespec
