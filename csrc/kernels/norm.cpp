// Checked entry point of the RMSNorm family (host only; the kernels live in norm.cuh).
#include "kernels/norm.h"

#include <limits>
#include <utility>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

namespace {

Status check_rms_norm(const RmsNormArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_view(x, "x", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(x, "x", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  const std::int64_t hidden = x.size(1);
  if (hidden < 1) return Status::invalid("x: hidden size must be at least 1");
  EDGESPEC_RETURN_IF_ERROR(check_fits(hidden, std::numeric_limits<int>::max(), "rms_norm: hidden size"));
  if (!(a.eps >= 0.f)) return Status::invalid("eps must be a non-negative number, got " + std::to_string(a.eps));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.weight, "weight", 1));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.weight, "weight"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.weight, "weight", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.weight, "weight", 0, hidden, "the hidden size of x"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", a.weight, "weight"));

  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_same_shape(a.out, "out", x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", a.weight, "weight"));

  if ((a.residual == nullptr) != (a.residual_out == nullptr)) {
    return Status::invalid("residual and residual_out must be given together");
  }
  if (a.residual == nullptr) return Status::success();
  const TensorView* ins[] = {&x, &a.weight, a.residual};
  const char* in_names[] = {"x", "weight", "residual"};
  for (const auto& [view, name] : {std::pair{a.residual, "residual"}, std::pair{a.residual_out, "residual_out"}}) {
    EDGESPEC_RETURN_IF_ERROR(check_view(*view, name, 2));
    EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(*view, name));
    EDGESPEC_RETURN_IF_ERROR(check_dtype(*view, name, x.dtype, "the dtype of x"));
    EDGESPEC_RETURN_IF_ERROR(check_same_shape(*view, name, x, "x"));
    EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", *view, name));
  }
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(*a.residual_out, "residual_out"));
  for (int i = 0; i < 3; ++i) {
    EDGESPEC_RETURN_IF_ERROR(check_disjoint(*a.residual_out, "residual_out", *ins[i], in_names[i]));
  }
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", *a.residual, "residual"));
  return check_disjoint(a.out, "out", *a.residual_out, "residual_out");
}

template <typename T>
RmsNormParams<T> make_params(const RmsNormArgs& a) {
  RmsNormParams<T> p;
  p.x = a.x.ptr<const T>();
  p.x_row_stride = a.x.stride(0);
  p.weight = a.weight.ptr<const T>();
  p.out = a.out.ptr<T>();
  p.out_row_stride = a.out.stride(0);
  if (a.residual != nullptr) {
    p.residual = a.residual->ptr<const T>();
    p.residual_row_stride = a.residual->stride(0);
    p.residual_out = a.residual_out->ptr<T>();
    p.residual_out_row_stride = a.residual_out->stride(0);
  }
  p.rows = a.x.size(0);
  p.hidden = static_cast<int>(a.x.size(1));
  p.eps = a.eps;
  return p;
}

}  // namespace

Status rms_norm(const RmsNormArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_rms_norm(args));
  if (args.x.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "rms_norm", T,
                               [&] { return launch_rms_norm<T>(make_params<T>(args), stream); });
}

}  // namespace edgespec
