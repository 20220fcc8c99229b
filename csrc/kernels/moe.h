// BlockFFN chunk-sparse mixture of experts (BlockFFN, arXiv:2507.08771): one step of T tokens.
//
// Computes, for x [T, H] (the ffn-normed hidden states of the step's tokens):
//   w[t, e]  = RMSNorm_e(relu(x[t] . router[e])) * router_norm[e]        router weights [T, E]
//   out[t]   = sum over the step's active experts e of
//                w[t, e] * down[:, e*d:(e+1)*d] @ silu(up[e*d:(e+1)*d] @ x[t])
// where an expert is active in the step when w[t, e] != 0 (after rounding to T) for at least one
// of the T tokens, and a token that does not use an active expert contributes through its zero
// weight. Only active experts' rows of `up` and columns of `down` are read: the step costs the
// union of its tokens' experts, with no host synchronisation and no sort-and-pad dispatch.
//
// Three kernels on one stream (moe.cuh):
//   1. router: split-K tensor-core GEMM x @ router.T into fp32 partials; the last block to arrive
//      sums them, applies relu (logits first rounded to T, as F.linear returns them), the RMSNorm
//      over experts and the norm weight, writes w (rounded to T, kept as fp32), the ascending list
//      of active experts and its length A, and adds the step's statistics to `counters`.
//   2. up: gathered GEMM over the A*d active rows of `up`, epilogue silu(.) * w[t, expert] into
//      the compact `hidden` [T, A*d] (T-rounded).
//   3. down: GEMM hidden @ down[:, gathered columns].T with the A*d reduction gathered per
//      32-column chunk; split-K partials summed by the last block of each output tile.
// With 4-bit experts only kernel 1 runs here (blockffn_router below); the W4A16 kernel's expert
// gather (w4a16.h) then does 2 and 3 on the tile-layout weights, reading the same active list.
// Kernels read A from the device (blocks past the active rows return at once), so the launch
// shapes are fixed by (T, H, E, d) alone and the three launches can be captured in a CUDA graph.
//
// Row invariance: a token's output does not depend on the other tokens of its step, so a token
// decoded alone and the same token verified in a draft tree get bitwise the same result. The
// split counts are planned without T (edgespec/ops/_kernels.py blockffn_splits); down's split s
// reduces over the active experts among [s * ceil(E / splits), ...) of all E, in expert order,
// so a token's experts fall in the same splits whatever the union is; the other tokens' experts
// add exact zeros for it (its router weight there is 0).
//
// Preconditions (checked by blockffn() below; edgespec/ops/_kernels.py checks the same first):
//   * T = x rows in [1, 128]; dtype T in {bf16, fp16} (tensor-core mma.m16n8k16, sm_80+);
//   * H % 32 == 0, d % 32 == 0, 1 <= E <= 1024; router [E, H], up [E*d, H], down [H, E*d],
//     router_norm [E] contiguous, of dtype T, 16-byte aligned; x, out rows contiguous with row
//     strides and base addresses 16-byte aligned (x; any row stride when T = 1) / 4-byte aligned
//     (out);
//   * scratch owned by the caller: weights fp32 [T, E], active int32 [E + 1], hidden T [T, E*d]
//     (contiguous), partial fp32 with at least blockffn_partial_floats(...) elements, sync int32
//     [blockffn_sync_words(H, E, d)] that is all zero on entry (the kernels leave it all zero);
//   * counters: null or contiguous int64 [2] (+= active (token, expert) pairs, += A);
//   * splits >= 1 (router <= H / 32, up <= H / 32, down any).
// One `sync` buffer must not be used by two launches running concurrently (give each stream or
// layer its own).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

// Rows of a weight tile handled by one block (4 warps x 16 rows) and k per lane-group step.
constexpr int kMoeBlockRows = 64;
constexpr int kMoeChunk = 32;
constexpr int kMoeMaxTokens = 128;
constexpr int kMoeMaxExperts = 1024;

template <typename T>
struct BlockFFNParams {
  const T* x = nullptr;            // [tokens, hidden], row stride x_stride
  std::int64_t x_stride = 0;
  const T* router = nullptr;       // [experts, hidden]
  const T* router_norm = nullptr;  // [experts]
  const T* up = nullptr;           // [experts * expert_size, hidden]
  const T* down = nullptr;         // [hidden, experts * expert_size]
  T* out = nullptr;                // [tokens, hidden], row stride out_stride
  std::int64_t out_stride = 0;
  float* weights = nullptr;        // [tokens, experts]
  int* active = nullptr;           // [experts + 1]
  T* hidden = nullptr;             // [tokens, experts * expert_size]
  float* partial = nullptr;        // split-K partial sums (reused by the three kernels in turn)
  unsigned* sync = nullptr;        // [1 + up tiles + down tiles] arrival counters
  long long* counters = nullptr;   // optional [2]
  int tokens = 0;
  int hidden_size = 0;
  int experts = 0;
  int expert_size = 0;
  int router_splits = 1;
  int up_splits = 1;
  int down_splits = 1;
  float eps = 1e-6f;
  bool router_only = false;        // launch kernel 1 only (4-bit experts: blockffn_router)
};

// Instantiated per dtype in csrc/instances/moe_<dtype>.cu (fp32 returns kUnsupported).
template <typename T>
Status launch_blockffn(const BlockFFNParams<T>& p, cudaStream_t stream);

// Scratch sizes (elements) the caller allocates.
std::int64_t blockffn_sync_words(std::int64_t hidden, std::int64_t experts, std::int64_t expert_size);
std::int64_t blockffn_partial_floats(std::int64_t tokens, std::int64_t hidden, std::int64_t experts,
                                     std::int64_t expert_size, int router_splits, int up_splits, int down_splits);

struct BlockFFNArgs {
  TensorView x;            // [T, H]
  TensorView router;       // [E, H]
  TensorView router_norm;  // [E]
  TensorView up;           // [E * d, H]
  TensorView down;         // [H, E * d]
  TensorView out;          // [T, H]
  TensorView weights;      // fp32 [T, E]
  TensorView active;       // int32 [E + 1]
  TensorView hidden;       // [T, E * d]
  TensorView partial;      // fp32 [P]
  TensorView sync;         // int32 [blockffn_sync_words]
  const TensorView* counters = nullptr;  // int64 [2] or null
  int router_splits = 1;
  int up_splits = 1;
  int down_splits = 1;
  float eps = 1e-6f;
};

Status blockffn(const BlockFFNArgs& args, cudaStream_t stream);

// Kernel 1 alone, for experts held as 4-bit weights: writes weights, active and the counters as
// blockffn() does; partial needs router_splits * T * E floats, sync one zero word (left zero).
struct BlockFFNRouterArgs {
  TensorView x;            // [T, H]
  TensorView router;       // [E, H]
  TensorView router_norm;  // [E]
  TensorView weights;      // fp32 [T, E]
  TensorView active;       // int32 [E + 1]
  TensorView partial;      // fp32 [router_splits * T * E]
  TensorView sync;         // int32 [1]
  const TensorView* counters = nullptr;  // int64 [2] or null
  int router_splits = 1;
  float eps = 1e-6f;
};

Status blockffn_router(const BlockFFNRouterArgs& args, cudaStream_t stream);

}  // namespace edgespec
