// Gated activations of the feed-forward block: SiLU-and-multiply (SwiGLU).
//
// Computes, per row r of x [R, 2I] (the output of a fused gate|up projection) and i < I:
//   out[r, i] = silu(x[r, i]) * x[r, I + i],   silu(g) = g / (1 + exp(-g))
// in fp32 (accurate expf: the op is memory-bound, so fast-math exp would buy nothing), rounded
// once to T. torch's F.silu(gate) * up rounds twice, so the kernel is at least as accurate.
//
// Preconditions (checked by silu_and_mul() below): x [R, 2I] and out [R, I] of one dtype T in
// {fp32, fp16, bf16}, stride 1 along the last dim, any non-negative row stride, I >= 1, out not
// overlapping x.
//
// Launch shape: grid (R, ceil(I / kVec / 256)), 256 threads; each thread reads kVec gate and
// kVec up elements (two 16-byte loads when aligned) and writes kVec outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

template <typename T>
struct SiluAndMulParams {
  const T* x = nullptr;
  std::int64_t x_row_stride = 0;
  T* out = nullptr;
  std::int64_t out_row_stride = 0;
  std::int64_t rows = 0;
  int inter = 0;  // I
};

// Instantiated per dtype in csrc/instances/activation_<dtype>.cu.
template <typename T>
Status launch_silu_and_mul(const SiluAndMulParams<T>& p, cudaStream_t stream);

struct SiluAndMulArgs {
  TensorView x;    // [R, 2I]
  TensorView out;  // [R, I]
};

Status silu_and_mul(const SiluAndMulArgs& args, cudaStream_t stream);

}  // namespace edgespec
