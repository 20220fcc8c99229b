// Checked entry points of the W4A16 family and its dense variant (host only; the kernel lives in
// w4a16.cuh).
#include "kernels/w4a16.h"

#include <algorithm>
#include <string>
#include <utility>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"
#include "kernels/dense_gemm.h"

namespace edgespec {

int w4a16_num_splits(std::int64_t n, std::int64_t k, int num_sms) {
  const std::int64_t k_tiles = k / kW4A16TileK;
  if (n <= 0 || k_tiles <= 0) return 1;
  const std::int64_t block_cols = n % (2 * kW4A16TileN) == 0 ? n / (2 * kW4A16TileN) : n / kW4A16TileN;
  const std::int64_t want = std::max<std::int64_t>(1, (2 * std::max(num_sms, 1) + block_cols - 1) / block_cols);
  // fp32 partials cost splits * M * N * 8 bytes (written, then read); keep them at most the
  // K * N / 2 weight bytes at M = kW4A16SplitRows (w4a16.h: the plan must not depend on M).
  const std::int64_t traffic_cap = std::max<std::int64_t>(1, k / (16 * kW4A16SplitRows));
  std::int64_t splits = std::min({want, traffic_cap, k_tiles});
  // Whole k16 tiles per split, and no empty split: re-derive the count from the tiles per split.
  const std::int64_t per = (k_tiles + splits - 1) / splits;
  splits = (k_tiles + per - 1) / per;
  return static_cast<int>(splits);
}

namespace {

std::string str(std::int64_t v) { return std::to_string(v); }

Status check_aligned16(const TensorView& v, const char* name) {
  if (!is_aligned(v.ptr<const void>(), 16)) return Status::invalid(std::string(name) + ": must be 16-byte aligned");
  return Status::success();
}

// The expert gather's extra preconditions (w4a16.h), given the plain GEMM's checks passed.
Status check_gather(const W4A16Args& a, std::int64_t m, std::int64_t n, std::int64_t k) {
  const TensorView& active = *a.active;
  EDGESPEC_RETURN_IF_ERROR(check_view(active, "active", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(active, "active", DType::kInt32, "active expert ids and their count"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(active, "active"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(a.x, "x", active, "active"));
  const std::int64_t experts = active.size(0) - 1, d = a.expert_size;
  const std::int64_t width = a.gather_rows ? k : n;  // the gathered dimension, E * d
  if (experts < 1 || d < 1 || width != experts * d) {
    return Status::invalid("active: " + str(experts) + " experts of expert_size " + str(d) + " do not make the " +
                           (a.gather_rows ? "K = " : "N = ") + str(width) + " the weight has");
  }
  if (a.bias != nullptr) return Status::invalid("bias: the expert gather takes none");
  if (a.gather_rows) {
    if (d % kW4A16TileK != 0) {
      return Status::unsupported("expert_size " + str(d) + ": gathering rows needs a multiple of " + str(kW4A16TileK));
    }
    if (a.group_size < k && d % a.group_size != 0) {
      return Status::unsupported("group_size " + str(a.group_size) + " does not divide expert_size " + str(d) +
                                 ": a group would span two experts");
    }
    if (a.expert_weights != nullptr) return Status::invalid("expert_weights: only the columns gather scales by them");
    return Status::success();
  }
  if (d % kW4A16TileN != 0) {
    return Status::unsupported("expert_size " + str(d) + ": gathering columns needs a multiple of " +
                               str(kW4A16TileN));
  }
  if (a.expert_weights == nullptr) return Status::invalid("expert_weights: the columns gather needs the router weights");
  const TensorView& w = *a.expert_weights;
  EDGESPEC_RETURN_IF_ERROR(check_view(w, "expert_weights", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(w, "expert_weights", DType::kFloat32, "fp32 router weights"));
  EDGESPEC_RETURN_IF_ERROR(check_size(w, "expert_weights", 0, m, "the rows of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(w, "expert_weights", 1, experts, "one per expert"));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(w, "expert_weights"));
  if (m > 1 && w.stride(0) != experts) {
    return Status::invalid("expert_weights: row stride " + str(w.stride(0)) + ", expected " + str(experts));
  }
  EDGESPEC_RETURN_IF_ERROR(check_same_device(a.x, "x", w, "expert_weights"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", w, "expert_weights"));
  return check_disjoint(a.out, "out", active, "active");
}

// The activations of either weight format: [M <= 64, K] of bf16/fp16, K a multiple of 16,
// rows on 16-byte boundaries.
Status check_x(const TensorView& x) {
  EDGESPEC_RETURN_IF_ERROR(check_view(x, "x", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(x, "x", {DType::kBFloat16, DType::kFloat16}));
  const std::int64_t m = x.size(0), k = x.size(1);
  if (m > kW4A16MaxRows) {
    return Status::unsupported("x: " + str(m) + " rows; the kernel takes at most " + str(kW4A16MaxRows));
  }
  if (k <= 0 || k % kW4A16TileK != 0) {
    return Status::unsupported("x: K = " + str(k) + " must be a positive multiple of " + str(kW4A16TileK));
  }
  if ((m > 1 && x.stride(0) % 8 != 0) || !is_aligned(x.ptr<const void>(), 16)) {
    return Status::invalid("x: rows must start on 16-byte boundaries (row stride " + str(x.stride(0)) + ")");
  }
  return Status::success();
}

using NamedInputs = std::initializer_list<std::pair<const TensorView*, const char*>>;

// Bias, output and split-K scratch of either weight format, for N columns. `weights` are the
// weight's tensors (null entries skipped): no output or scratch may overlap an input.
Status check_outputs(const TensorView& x, const TensorView* bias, const TensorView& out, const TensorView* partial,
                     const TensorView* counters, int splits, std::int64_t n, NamedInputs weights) {
  const std::int64_t m = x.size(0), k = x.size(1);
  if (bias != nullptr) {
    EDGESPEC_RETURN_IF_ERROR(check_view(*bias, "bias", 1));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(*bias, "bias", x.dtype, "the dtype of x"));
    EDGESPEC_RETURN_IF_ERROR(check_size(*bias, "bias", 0, n, "N columns"));
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(*bias, "bias"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *bias, "bias"));
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(out, "out", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(out, "out", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(out, "out", 0, m, "the rows of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(out, "out", 1, n, "N columns"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", out, "out"));
  // Every input, so that no block overwrites what another block still reads.
  auto disjoint_from_inputs = [&](const TensorView& v, const char* name) -> Status {
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(v, name, x, "x"));
    for (const auto& [input, input_name] : weights) {
      if (input != nullptr) EDGESPEC_RETURN_IF_ERROR(check_disjoint(v, name, *input, input_name));
    }
    if (bias != nullptr) EDGESPEC_RETURN_IF_ERROR(check_disjoint(v, name, *bias, "bias"));
    return Status::success();
  };
  EDGESPEC_RETURN_IF_ERROR(disjoint_from_inputs(out, "out"));

  if (splits < 1 || splits > k / kW4A16TileK) {
    return Status::invalid("splits = " + str(splits) + " must be in [1, K / 16 = " + str(k / kW4A16TileK) + "]");
  }
  if (splits == 1) return Status::success();
  if (partial == nullptr || counters == nullptr) {
    return Status::invalid("splits = " + str(splits) + " needs the partial and counters scratch tensors");
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(*partial, "partial", 3));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(*partial, "partial", DType::kFloat32, "fp32 split-K sums"));
  EDGESPEC_RETURN_IF_ERROR(check_size(*partial, "partial", 0, splits, "splits"));
  EDGESPEC_RETURN_IF_ERROR(check_size(*partial, "partial", 1, m, "the rows of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(*partial, "partial", 2, n, "N columns"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(*partial, "partial"));
  EDGESPEC_RETURN_IF_ERROR(check_view(*counters, "counters", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(*counters, "counters", DType::kInt32, "arrival counters"));
  EDGESPEC_RETURN_IF_ERROR(check_size(*counters, "counters", 0, n / kW4A16TileN, "N / 64 column tiles"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(*counters, "counters"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *partial, "partial"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *counters, "counters"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(*partial, "partial", out, "out"));
  return disjoint_from_inputs(*partial, "partial");
}

Status check_w4a16(const W4A16Args& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_x(x));
  const std::int64_t m = x.size(0), k = x.size(1);
  EDGESPEC_RETURN_IF_ERROR(check_view(a.qweight, "qweight", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.qweight, "qweight", DType::kInt32, "packed 4-bit words"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.qweight, "qweight", 0, k / kW4A16TileK, "K / 16 tile rows"));
  const std::int64_t n = a.qweight.size(1) / 2;
  if (n <= 0 || a.qweight.size(1) % 2 != 0 || n % kW4A16TileN != 0) {
    return Status::unsupported("qweight: " + str(a.qweight.size(1)) + " words per tile row means N = " +
                               str(a.qweight.size(1) / 2) + "; the kernel needs N a positive multiple of " +
                               str(kW4A16TileN));
  }
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.qweight, "qweight"));
  EDGESPEC_RETURN_IF_ERROR(check_aligned16(a.qweight, "qweight"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", a.qweight, "qweight"));

  const std::int64_t g = a.group_size;
  if (g <= 0 || (g % kW4A16GroupAlign != 0 && g < k)) {
    return Status::unsupported("group_size " + str(g) + ": the kernel takes multiples of " +
                               str(kW4A16GroupAlign) + " or per-channel (group_size >= K = " + str(k) + ")");
  }
  const std::int64_t groups = (k + g - 1) / g;
  for (const auto& [view, name] : {std::pair{&a.scales, "scales"}, std::pair{a.zeros, "zeros"}}) {
    if (view == nullptr) continue;
    EDGESPEC_RETURN_IF_ERROR(check_view(*view, name, 2));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(*view, name, x.dtype, "the dtype of x"));
    EDGESPEC_RETURN_IF_ERROR(check_size(*view, name, 0, groups, "ceil(K / group_size) groups"));
    EDGESPEC_RETURN_IF_ERROR(check_size(*view, name, 1, n, "N columns"));
    EDGESPEC_RETURN_IF_ERROR(check_contiguous(*view, name));
    EDGESPEC_RETURN_IF_ERROR(check_aligned16(*view, name));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *view, name));
  }
  EDGESPEC_RETURN_IF_ERROR(check_outputs(x, a.bias, a.out, a.partial, a.counters, a.splits, n,
                                         {{&a.qweight, "qweight"}, {&a.scales, "scales"}, {a.zeros, "zeros"}}));
  if (a.active != nullptr) return check_gather(a, m, n, k);
  if (a.expert_weights != nullptr) return Status::invalid("expert_weights: given without an active expert list");
  return Status::success();
}

Status check_dense(const DenseGemmArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_x(x));
  const TensorView& w = a.weight;
  EDGESPEC_RETURN_IF_ERROR(check_view(w, "weight", 2));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(w, "weight", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(w, "weight", 1, x.size(1), "K, the columns of x"));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(w, "weight"));
  const std::int64_t n = w.size(0);
  if (n <= 0 || n % kW4A16TileN != 0) {
    return Status::unsupported("weight: N = " + str(n) + "; the kernel needs a positive multiple of " +
                               str(kW4A16TileN));
  }
  if ((n > 1 && w.stride(0) % 8 != 0) || !is_aligned(w.ptr<const void>(), 16)) {
    return Status::invalid("weight: rows must start on 16-byte boundaries (row stride " + str(w.stride(0)) + ")");
  }
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", w, "weight"));
  return check_outputs(x, a.bias, a.out, a.partial, a.counters, a.splits, n, {{&w, "weight"}});
}

// The parameters both weight formats share: activations, bias, output, split-K scratch (checked).
template <typename T>
W4A16Params<T> common_params(const TensorView& x, const TensorView* bias, const TensorView& out,
                             const TensorView* partial, const TensorView* counters, int splits) {
  W4A16Params<T> p;
  p.x = x.ptr<const T>();
  p.x_stride = x.stride(0);
  p.bias = bias != nullptr ? bias->ptr<const T>() : nullptr;
  p.out = out.ptr<T>();
  p.partial = partial != nullptr ? partial->ptr<float>() : nullptr;
  p.counters = counters != nullptr ? counters->ptr<int>() : nullptr;
  p.m = static_cast<int>(x.size(0));
  p.k = static_cast<int>(x.size(1));
  p.splits = splits;
  return p;
}

}  // namespace

Status w4a16_gemm(const W4A16Args& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_w4a16(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "w4a16_gemm", T, [&] {
    W4A16Params<T> p = common_params<T>(args.x, args.bias, args.out, args.partial, args.counters, args.splits);
    p.qweight = args.qweight.ptr<const std::uint32_t>();
    p.scales = args.scales.ptr<const T>();
    p.zeros = args.zeros != nullptr ? args.zeros->ptr<const T>() : nullptr;
    p.n = static_cast<int>(args.qweight.size(1) / 2);
    p.group_size = static_cast<int>(std::min<std::int64_t>(args.group_size, args.x.size(1)));
    if (args.active != nullptr) {
      p.active = args.active->ptr<const int>();
      p.expert_weights = args.expert_weights != nullptr ? args.expert_weights->ptr<const float>() : nullptr;
      p.experts = static_cast<int>(args.active->size(0) - 1);
      p.expert_size = args.expert_size;
      p.gather_rows = args.gather_rows;
    }
    return launch_w4a16<T>(p, stream);
  });
}

Status dense_gemm(const DenseGemmArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_dense(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "dense_gemm", T, [&] {
    W4A16Params<T> p = common_params<T>(args.x, args.bias, args.out, args.partial, args.counters, args.splits);
    p.weight = args.weight.ptr<const T>();
    p.w_stride = args.weight.stride(0);
    p.n = static_cast<int>(args.weight.size(0));
    p.group_size = p.k;  // unused by the dense variant; a valid divisor all the same
    return launch_dense_gemm<T>(p, stream);
  });
}

}  // namespace edgespec
