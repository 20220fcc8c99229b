// Hopper (sm_90a) InfLLM-v2 block scores for prefill chunks: the tensor-core score kernels of
// csrc/kernels/sparse_scores_mma.cuh (both passes, the same blocks of 64 packed query rows) with
// S = Q.CK^T on wgmma from shared memory instead of mma.sync (csrc/kernels/sm90/sparse_scores.cu).
// A long MiniCPM4 prefill scores every query against every compressed key it sees, twice: these
// products are the selection's FLOPs. Same contract as launch_sparse_scores (sparse_attention.h)
// for the calls the tensor-core kernels take (sparse_scores_mma_applies, kernels_per_split a
// multiple of kSparseMmaKernels, 16-byte aligned rows of q and ck); the caller checks those. The
// launch returns kUnsupported on a GPU that is not compute capability 9.0.
#pragma once

#include <cuda_runtime_api.h>

#include "common/status.h"
#include "kernels/sparse_attention.h"

namespace edgespec {

// Instantiated for bf16/fp16 x head dims 64/128 in csrc/kernels/sm90/sparse_scores.cu.
template <typename T, int kHeadDim>
Status launch_sparse_scores_sm90(const SparseScoreParams<T>& p, cudaStream_t stream);

}  // namespace edgespec
