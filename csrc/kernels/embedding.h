// Token embedding lookup with a scale (MiniCPM's scale_emb; 1 for most models).
//
// Computes out[t, :] = table[ids[t], :] * scale in fp32, rounded once to T (bit-exact copies
// when scale == 1, and the same rounding as torch's `table[ids] * scale`).
//
// Out-of-range ids (id < 0 or id >= V) never index the table: that token's row is written as NaN,
// so the error surfaces in the logits instead of as a silently plausible embedding. The Python
// op range-checks user-supplied ids before calling (a host sync it skips for ids the engine
// sampled itself).
//
// Preconditions (checked by embedding() below): ids [T] int32/int64 (any stride); table [V, H]
// and out [T, H] of one dtype T in {fp32, fp16, bf16} with stride 1 along H and any
// non-negative row stride; out not overlapping the inputs.
//
// Launch shape: grid (T, ceil(H / kVec / 256)), 256 threads; each thread copies kVec elements.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T, typename IdT>
struct EmbeddingParams {
  const IdT* ids = nullptr;
  std::int64_t ids_stride = 0;
  const T* table = nullptr;
  std::int64_t table_row_stride = 0;
  std::int64_t vocab = 0;
  T* out = nullptr;
  std::int64_t out_row_stride = 0;
  std::int64_t tokens = 0;
  int hidden = 0;
  float scale = 1.f;
};

// Instantiated per dtype (both id types) in csrc/instances/embedding_<dtype>.cu.
template <typename T, typename IdT>
Status launch_embedding(const EmbeddingParams<T, IdT>& p, cudaStream_t stream);

struct EmbeddingArgs {
  TensorView ids;    // [T]
  TensorView table;  // [V, H]
  TensorView out;    // [T, H]
  float scale = 1.f;
};

Status embedding(const EmbeddingArgs& args, cudaStream_t stream);

}  // namespace edgespec
