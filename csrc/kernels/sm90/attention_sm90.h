// Hopper (sm_90a) attention kernels on wgmma: causal prefill / chunks and tree verification,
// split-KV, device-side lengths, InfLLM-v2 block masks and the dense row-invariant mode included.
// Same contract as attention.h for the calls they take (attention_sm90_rejection says which);
// csrc/kernels/attention.cpp dispatches to them when AttentionArgs::sm90 asks and the build has
// them (EDGESPEC_HAS_SM90). Splits: attention_sm90_num_splits (attention_plan.h) plans them for
// these kernels' 128-row blocks.
#pragma once

#include <cuda_runtime_api.h>

#include "common/status.h"
#include "kernels/attention.h"

namespace edgespec {

// Why the sm90 kernels cannot take this call (nullptr: they can): the row-invariant block-sparse
// mode (rank_tiles; it runs on the generic kernels). The dense row-invariant mode (chunk_tiles)
// runs here too, bitwise equal among these kernels' own calls only (attention.cu).
template <typename T>
const char* attention_sm90_rejection(const AttentionParams<T>& p) {
  if (p.rank_tiles > 0) return "the row-invariant block-sparse mode (rank_tiles)";
  return nullptr;
}

// Instantiated for bf16/fp16 x head dims 64/128 in csrc/kernels/sm90/attention.cu.
template <typename T, int kHeadDim>
Status launch_attention_sm90(const AttentionParams<T>& p, cudaStream_t stream);

}  // namespace edgespec
