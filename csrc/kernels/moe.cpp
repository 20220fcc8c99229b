// Checked entry point of the BlockFFN family (host only; the kernels live in moe.cuh).
#include "kernels/moe.h"

#include <algorithm>
#include <initializer_list>
#include <utility>
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

// What the router kernel reads and writes, shared by blockffn() and blockffn_router().
Status check_router(const TensorView& x, const TensorView& router, const TensorView& router_norm,
                    const TensorView& weights, const TensorView& active, const TensorView* counters, float eps) {
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
  EDGESPEC_RETURN_IF_ERROR(check_view(router, "router", 2));
  const std::int64_t experts = router.size(0);
  if (experts < 1 || experts > kMoeMaxExperts) {
    return Status::unsupported("router: " + str(experts) + " experts; the kernels take 1.." + str(kMoeMaxExperts));
  }
  EDGESPEC_RETURN_IF_ERROR(check_matrix(router, "router", experts, hidden, x.dtype, "[E, H]"));
  EDGESPEC_RETURN_IF_ERROR(check_view(router_norm, "router_norm", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(router_norm, "router_norm", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(router_norm, "router_norm", 0, experts, "one per expert"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(router_norm, "router_norm"));

  EDGESPEC_RETURN_IF_ERROR(check_view(weights, "weights", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(weights, "weights", DType::kFloat32, "router weights scratch"));
  EDGESPEC_RETURN_IF_ERROR(check_size(weights, "weights", 0, tokens, "[T, E]"));
  EDGESPEC_RETURN_IF_ERROR(check_size(weights, "weights", 1, experts, "[T, E]"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(weights, "weights"));
  EDGESPEC_RETURN_IF_ERROR(check_view(active, "active", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(active, "active", DType::kInt32, "active expert list"));
  EDGESPEC_RETURN_IF_ERROR(check_size(active, "active", 0, experts + 1, "E ids and their count"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(active, "active"));
  if (counters != nullptr) {
    EDGESPEC_RETURN_IF_ERROR(check_view(*counters, "counters", 1));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(*counters, "counters", DType::kInt64, "sparsity counters"));
    EDGESPEC_RETURN_IF_ERROR(check_size(*counters, "counters", 0, 2, "[pairs, experts]"));
    // finalize_router adds to counters[0] and counters[1] as adjacent words.
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(*counters, "counters"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *counters, "counters"));
  }
  if (!(eps >= 0.f)) return Status::invalid("eps must be a non-negative number, got " + std::to_string(eps));
  const TensorView* all[] = {&router, &router_norm, &weights, &active};
  const char* names[] = {"router", "router_norm", "weights", "active"};
  for (int i = 0; i < 4; ++i) EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *all[i], names[i]));
  return Status::success();
}

Status check_splits(std::int64_t hidden, std::initializer_list<int> all, int router_splits, int up_splits) {
  for (const int s : all) {
    if (s < 1 || s > 65535) return Status::invalid("splits must be in [1, 65535], got " + str(s));
  }
  if (router_splits > hidden / kMoeChunk || up_splits > hidden / kMoeChunk) {
    return Status::invalid("router/up splits (" + str(router_splits) + ", " + str(up_splits) + ") exceed the " +
                           str(hidden / kMoeChunk) + " chunks of H");
  }
  return Status::success();
}

Status check_scratch(const TensorView& x, const TensorView& partial, std::int64_t partial_floats,
                     const TensorView& sync, std::int64_t sync_words) {
  EDGESPEC_RETURN_IF_ERROR(check_view(partial, "partial", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(partial, "partial", DType::kFloat32, "split-K scratch"));
  if (partial.size(0) < partial_floats || partial.stride(0) != 1) {
    return Status::invalid("partial: needs " + str(partial_floats) + " contiguous floats, got " + describe(partial));
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(sync, "sync", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(sync, "sync", DType::kInt32, "arrival counters"));
  EDGESPEC_RETURN_IF_ERROR(check_size(sync, "sync", 0, sync_words, "arrival counters"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(sync, "sync"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", partial, "partial"));
  return check_same_device(x, "x", sync, "sync");
}

// Written buffers must not alias what the kernels read, or each other.
Status check_no_aliasing(std::initializer_list<std::pair<const TensorView*, const char*>> reads,
                         std::initializer_list<std::pair<const TensorView*, const char*>> writes) {
  for (auto w = writes.begin(); w != writes.end(); ++w) {
    for (const auto& r : reads) EDGESPEC_RETURN_IF_ERROR(check_disjoint(*w->first, w->second, *r.first, r.second));
    for (auto o = w + 1; o != writes.end(); ++o) {
      EDGESPEC_RETURN_IF_ERROR(check_disjoint(*w->first, w->second, *o->first, o->second));
    }
  }
  return Status::success();
}

Status check_blockffn(const BlockFFNArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_router(x, a.router, a.router_norm, a.weights, a.active, a.counters, a.eps));
  const std::int64_t tokens = x.size(0), hidden = x.size(1), experts = a.router.size(0);
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
  EDGESPEC_RETURN_IF_ERROR(check_view(a.hidden, "hidden", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.hidden, "hidden", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.hidden, "hidden", 0, tokens, "[T, E * d]"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.hidden, "hidden", 1, width, "[T, E * d]"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.hidden, "hidden"));
  if (!is_aligned(a.hidden.ptr<const void>(), 16)) return Status::invalid("hidden: must be 16-byte aligned");

  EDGESPEC_RETURN_IF_ERROR(
      check_splits(hidden, {a.router_splits, a.up_splits, a.down_splits}, a.router_splits, a.up_splits));
  EDGESPEC_RETURN_IF_ERROR(check_scratch(
      x, a.partial,
      blockffn_partial_floats(tokens, hidden, experts, width / experts, a.router_splits, a.up_splits, a.down_splits),
      a.sync, blockffn_sync_words(hidden, experts, width / experts)));
  const TensorView* all[] = {&a.up, &a.down, &a.out, &a.hidden};
  const char* names[] = {"up", "down", "out", "hidden"};
  for (int i = 0; i < 4; ++i) EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *all[i], names[i]));
  return check_no_aliasing({{&x, "x"}, {&a.router, "router"}, {&a.router_norm, "router_norm"}, {&a.up, "up"},
                            {&a.down, "down"}},
                           {{&a.out, "out"}, {&a.weights, "weights"}, {&a.active, "active"}, {&a.hidden, "hidden"},
                            {&a.partial, "partial"}, {&a.sync, "sync"}});
}

Status check_blockffn_router(const BlockFFNRouterArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_router(x, a.router, a.router_norm, a.weights, a.active, a.counters, a.eps));
  const std::int64_t tokens = x.size(0), hidden = x.size(1), experts = a.router.size(0);
  EDGESPEC_RETURN_IF_ERROR(check_splits(hidden, {a.router_splits}, a.router_splits, 1));
  EDGESPEC_RETURN_IF_ERROR(check_scratch(x, a.partial, a.router_splits * tokens * experts, a.sync, 1));
  return check_no_aliasing({{&x, "x"}, {&a.router, "router"}, {&a.router_norm, "router_norm"}},
                           {{&a.weights, "weights"}, {&a.active, "active"}, {&a.partial, "partial"},
                            {&a.sync, "sync"}});
}

// The fields the router kernel reads, shared by blockffn() and blockffn_router().
template <typename T>
BlockFFNParams<T> router_params(const TensorView& x, const TensorView& router, const TensorView& router_norm,
                                const TensorView& weights, const TensorView& active, const TensorView& partial,
                                const TensorView& sync, const TensorView* counters, int router_splits, float eps) {
  BlockFFNParams<T> p;
  p.x = x.ptr<const T>();
  p.x_stride = x.stride(0);
  p.router = router.ptr<const T>();
  p.router_norm = router_norm.ptr<const T>();
  p.weights = weights.ptr<float>();
  p.active = active.ptr<int>();
  p.partial = partial.ptr<float>();
  p.sync = sync.ptr<unsigned>();
  p.counters = counters != nullptr ? counters->ptr<long long>() : nullptr;
  p.tokens = static_cast<int>(x.size(0));
  p.hidden_size = static_cast<int>(x.size(1));
  p.experts = static_cast<int>(router.size(0));
  p.router_splits = router_splits;
  p.eps = eps;
  return p;
}

}  // namespace

Status blockffn(const BlockFFNArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_blockffn(args));
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "blockffn", T, [&] {
    BlockFFNParams<T> p = router_params<T>(args.x, args.router, args.router_norm, args.weights, args.active,
                                           args.partial, args.sync, args.counters, args.router_splits, args.eps);
    p.up = args.up.ptr<const T>();
    p.down = args.down.ptr<const T>();
    p.out = args.out.ptr<T>();
    p.out_stride = args.out.stride(0);
    p.hidden = args.hidden.ptr<T>();
    p.expert_size = static_cast<int>(args.up.size(0) / args.router.size(0));
    p.up_splits = args.up_splits;
    p.down_splits = args.down_splits;
    return launch_blockffn<T>(p, stream);
  });
}

Status blockffn_router(const BlockFFNRouterArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_blockffn_router(args));
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "blockffn_router", T, [&] {
    BlockFFNParams<T> p = router_params<T>(args.x, args.router, args.router_norm, args.weights, args.active,
                                           args.partial, args.sync, args.counters, args.router_splits, args.eps);
    p.router_only = true;
    return launch_blockffn<T>(p, stream);
  });
}

}  // namespace edgespec
