// Token selection from logits. First member of the family: greedy argmax.
//
// Computes out[t] = the index of the largest logits[t, :] (int64), with the same semantics as
// torch.argmax:
//   * ties: the lowest index wins;
//   * NaN: a NaN counts as larger than every number, so a row containing NaN returns the index of
//     its first NaN (torch propagates NaN through max/argmax the same way). A row of all -inf
//     returns 0.
// Values are compared after exact conversion to fp32, so the result equals torch's bit for bit.
//
// Preconditions (checked by argmax() below): logits [T, V] fp32/fp16/bf16 with stride 1 along V,
// any non-negative row stride, 1 <= V < 2^31; out [T] int64 (any stride).
//
// Launch shape: one 1024-thread block per row. Each thread scans a strided slice with 16-byte
// loads (1024 x 16 B = 16 KB in flight per block, about what one SM needs to cover HBM latency),
// then the block reduces (value, index) pairs with warp shuffles and one shared-memory round.
// At T = 1 with V = 128k this is a single block streaming 256 KB, bounded by one SM's bandwidth
// (roughly 1-2 us on an H100); a split-V variant is the next step if the benchmark shows it
// matters next to the LM head GEMM that precedes it.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T>
struct ArgmaxParams {
  const T* logits = nullptr;
  std::int64_t row_stride = 0;
  std::int64_t* out = nullptr;
  std::int64_t out_stride = 0;
  std::int64_t rows = 0;
  int vocab = 0;
};

// Instantiated per dtype in csrc/instances/sampling_<dtype>.cu.
template <typename T>
Status launch_argmax(const ArgmaxParams<T>& p, cudaStream_t stream);

struct ArgmaxArgs {
  TensorView logits;  // [T, V]
  TensorView out;     // [T] int64
};

Status argmax(const ArgmaxArgs& args, cudaStream_t stream);

}  // namespace edgespec
