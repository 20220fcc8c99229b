// Checked entry point of the BlockFFN family (host only; the kernels live in moe.cuh).
#include "kernels/moe.h"

#include <algorithm>
#include <limits>
#include <string>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

std::int64_t blockffn_sync_words(std::int64_t hidden, std::int64_t experts, std::int64_t expert_size) {
  const auto tiles = [](std::int64_t n) { return (n + kMoeBlockRows - 1) / kMoeBlockRows; };
  return 1 + tiles(experts * expert_size) + tiles(hidden);
}

std::int64_t blockffn_partial_floats(std::int64_t tokens, std::int64_t hidden, std::int64_t experts,
                                     std::int64_t expert_size, int router_splits, int up_splits, int down_splits) {
  // The router always reduces through the partials; up and down only when split.
  std::int64_t n = static_cast<std::int64_t>(router_splits) * tokens * experts;
  if (up_splits > 1) n = std::max(n, static_cast<std::int64_t>(up_splits) * tokens * experts * expert_size);
  if (down_splits > 1) n = std::max(n, static_cast<std::int64_t>(down_splits) * tokens * hidden);
  return n;
}

namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

Status check_matrix(const TensorView& v, const char* name, std::int64_t rows, std::int64_t cols, DType dtype,
                    const char* what) {
  EDGESPEC_RETURN_IF_ERROR(check_view(v, name, 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(v, name, dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(v, name, 0, rows, what));
  EDGESPEC_RETURN_IF_ERROR(check_size(v, name, 1, cols, what));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(v, name));
  if (!is_aligned(v.ptr<const void>(), 16)) return Status::invalid(std::string(name) + ": must be 16-byte aligned");
  return Status::success();
}

Status check_blockffn(const BlockFFNArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_view(x, "x", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(x, "x", {DType::kBFloat16, DType::kFloat16}));
  const std::int64_t tokens = x.size(0), hidden = x.size(1);
  if (tokens < 1 || tokens > kMoeMaxTokens) {
    return Status::unsupported("x: " + str(tokens) + " tokens; the kernels take 1.." + str(kMoeMaxTokens));
  }
  if (hidden < kMoeChunk || hidden % kMoeChunk != 0) {
    return Status::unsupported("x: hidden size " + str(hidden) + " must be a positive multiple of " + str(kMoeChunk));
  }
  // One token's row stride is never used (edgespec/ops/_kernels.py accepts any there too).
  if ((tokens > 1 && x.stride(0) % 8 != 0) || !is_aligned(x.ptr<const void>(), 16)) {
    return Status::invalid("x: rows must start on 16-byte boundaries (row stride " + str(x.stride(0)) + ")");
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.router, "router", 2));
  const std::int64_t experts = a.router.size(0);
  if (experts < 1 || experts > kMoeMaxExperts) {
    return Status::unsupported("router: " + str(experts) + " experts; the kernels take 1.." + str(kMoeMaxExperts));
  }
  EDGESPEC_RETURN_IF_ERROR(check_matrix(a.router, "router", experts, hidden, x.dtype, "[E, H]"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.router_norm, "router_norm", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.router_norm, "router_norm", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.router_norm, "router_norm", 0, experts, "one per expert"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.router_norm, "router_norm"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.up, "up", 2));
  const std::int64_t width = a.up.size(0);
  if (width % experts != 0 || width / experts % kMoeChunk != 0) {
    return Status::unsupported("up: " + str(width) + " rows is not E * d with d a multiple of " + str(kMoeChunk) +
                               " (E = " + str(experts) + ")");
  }
  EDGESPEC_RETURN_IF_ERROR(check_fits(width, std::numeric_limits<int>::max() / kMoeMaxTokens, "blockffn: E * d"));
  EDGESPEC_RETURN_IF_ERROR(check_matrix(a.up, "up", width, hidden, x.dtype, "[E * d, H]"));
  EDGESPEC_RETURN_IF_ERROR(check_matrix(a.down, "down", hidden, width, x.dtype, "[H, E * d]"));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.out, "out", x, "x"));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.weights, "weights", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.weights, "weights", DType::kFloat32, "router weights scratch"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.weights, "weights", 0, tokens, "[T, E]"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.weights, "weights", 1, experts, "[T, E]"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.weights, "weights"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.active, "active", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.active, "active", DType::kInt32, "active expert list"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.active, "active", 0, experts + 1, "E ids and their count"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.hidden, "hidden", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.hidden, "hidden", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.hidden, "hidden", 0, tokens, "[T, E * d]"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.hidden, "hidden", 1, width, "[T, E * d]"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.hidden, "hidden"));
  if (!is_aligned(a.hidden.ptr<const void>(), 16)) return Status::invalid("hidden: must be 16-byte aligned");

  for (const int s : {a.router_splits, a.up_splits, a.down_splits}) {
    if (s < 1 || s > 65535) return Status::invalid("splits must be in [1, 65535], got " + str(s));
  }
  if (a.router_splits > hidden / kMoeChunk || a.up_splits > hidden / kMoeChunk) {
    return Status::invalid("router/up splits (" + str(a.router_splits) + ", " + str(a.up_splits) +
                           ") exceed the " + str(hidden / kMoeChunk) + " chunks of H");
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.partial, "partial", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.partial, "partial", DType::kFloat32, "split-K scratch"));
  const std::int64_t need = blockffn_partial_floats(tokens, hidden, experts, width / experts, a.router_splits,
                                                    a.up_splits, a.down_splits);
  if (a.partial.size(0) < need || a.partial.stride(0) != 1) {
    return Status::invalid("partial: needs " + str(need) + " contiguous floats, got " + describe(a.partial));
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.sync, "sync", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.sync, "sync", DType::kInt32, "arrival counters"));
  EDGESPEC_RETURN_IF_ERROR(
      check_size(a.sync, "sync", 0, blockffn_sync_words(hidden, experts, width / experts), "blockffn_sync_words"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.sync, "sync"));
  if (a.counters != nullptr) {
    EDGESPEC_RETURN_IF_ERROR(check_view(*a.counters, "counters", 1));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(*a.counters, "counters", DType::kInt64, "sparsity counters"));
    EDGESPEC_RETURN_IF_ERROR(check_size(*a.counters, "counters", 0, 2, "[pairs, experts]"));
    // finalize_router adds to counters[0] and counters[1] as adjacent words.
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(*a.counters, "counters"));
  }
  if (!(a.eps >= 0.f)) return Status::invalid("eps must be a non-negative number, got " + std::to_string(a.eps));

  const TensorView* all[] = {&a.router, &a.router_norm, &a.up, &a.down, &a.out, &a.weights,
                             &a.active, &a.hidden, &a.partial, &a.sync};
  const char* names[] = {"router", "router_norm", "up", "down", "out", "weights", "active", "hidden", "partial", "sync"};
  for (int i = 0; i < 10; ++i) EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *all[i], names[i]));
  if (a.counters != nullptr) EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *a.counters, "counters"));
  // Written buffers must not alias what the kernels read (or each other).
  const TensorView* reads[] = {&x, &a.router, &a.router_norm, &a.up, &a.down};
  const char* read_names[] = {"x", "router", "router_norm", "up", "down"};
  const TensorView* writes[] = {&a.out, &a.weights, &a.active, &a.hidden, &a.partial, &a.sync};
  const char* write_names[] = {"out", "weights", "active", "hidden", "partial", "sync"};
  for (int w = 0; w < 6; ++w) {
    for (int r = 0; r < 5; ++r) EDGESPEC_RETURN_IF_ERROR(check_disjoint(*writes[w], write_names[w], *reads[r], read_names[r]));
    for (int o = w + 1; o < 6; ++o) {
      EDGESPEC_RETURN_IF_ERROR(check_disjoint(*writes[w], write_names[w], *writes[o], write_names[o]));
    }
  }
  return Status::success();
}

}  // namespace

Status blockffn(const BlockFFNArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_blockffn(args));
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "blockffn", T, [&] {
    BlockFFNParams<T> p;
    p.x = args.x.ptr<const T>();
    p.x_stride = args.x.stride(0);
    p.router = args.router.ptr<const T>();
    p.router_norm = args.router_norm.ptr<const T>();
    p.up = args.up.ptr<const T>();
    p.down = args.down.ptr<const T>();
    p.out = args.out.ptr<T>();
    p.out_stride = args.out.stride(0);
    p.weights = args.weights.ptr<float>();
    p.active = args.active.ptr<int>();
    p.hidden = args.hidden.ptr<T>();
    p.partial = args.partial.ptr<float>();
    p.sync = args.sync.ptr<unsigned>();
    p.counters = args.counters != nullptr ? args.counters->ptr<long long>() : nullptr;
    p.tokens = static_cast<int>(args.x.size(0));
    p.hidden_size = static_cast<int>(args.x.size(1));
    p.experts = static_cast<int>(args.router.size(0));
    p.expert_size = static_cast<int>(args.up.size(0) / args.router.size(0));
    p.router_splits = args.router_splits;
    p.up_splits = args.up_splits;
    p.down_splits = args.down_splits;
    p.eps = args.eps;
    return launch_blockffn<T>(p, stream);
  });
}

}  // namespace edgespec
