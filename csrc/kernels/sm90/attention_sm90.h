// Hopper (sm_90a) attention kernels: causal prefill on wgmma. Same contract as attention.h for the
// calls they take (attention_sm90_rejection says which); csrc/kernels/attention.cpp dispatches to
// them when AttentionArgs::sm90 asks and the build has them (EDGESPEC_HAS_SM90).
#pragma once

#include <cuda_runtime_api.h>

#include "common/status.h"
#include "kernels/attention.h"

namespace edgespec {

// Why the sm90 prefill kernel cannot take this call (nullptr: it can): causal only (no tree mask,
// no block mask), no device-side length, one split.
template <typename T>
const char* attention_sm90_rejection(const AttentionParams<T>& p) {
  if (p.tree_mask != nullptr) return "a tree mask (the sm90 kernel is the causal prefill)";
  if (p.block_mask != nullptr) return "a block mask (the sm90 kernel is the causal prefill)";
  if (p.seqlen_dev != nullptr) return "a device-side seqlen";
  if (p.splits != 1) return "key-range splits (the sm90 kernel runs one split)";
  return nullptr;
}

// Instantiated for bf16/fp16 x head dims 64/128 in csrc/kernels/sm90/attention_prefill.cu.
template <typename T, int kHeadDim>
Status launch_attention_prefill_sm90(const AttentionParams<T>& p, cudaStream_t stream);

}  // namespace edgespec
