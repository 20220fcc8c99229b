// Checked entry point of the activation family (host only; the kernel lives in activation.cuh).
#include "kernels/activation.h"

#include <limits>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

namespace {

Status check_silu_and_mul(const SiluAndMulArgs& a) {
  const TensorView& x = a.x;
  EDGESPEC_RETURN_IF_ERROR(check_view(x, "x", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(x, "x"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(x, "x", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  const std::int64_t width = x.size(1);
  if (width < 2 || width % 2 != 0) {
    return Status::invalid("x: last dim must be even and >= 2 (gate | up), got " + std::to_string(width));
  }
  EDGESPEC_RETURN_IF_ERROR(check_fits(width / 2, std::numeric_limits<int>::max(), "silu_and_mul: I"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", x.dtype, "the dtype of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 0, x.size(0), "the rows of x"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 1, width / 2, "half the last dim of x"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(x, "x", a.out, "out"));
  return check_disjoint(a.out, "out", x, "x");
}

}  // namespace

Status silu_and_mul(const SiluAndMulArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_silu_and_mul(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.x.device));
  return EDGESPEC_FLOAT_SWITCH(args.x.dtype, "silu_and_mul", T, [&] {
    SiluAndMulParams<T> p;
    p.x = args.x.ptr<const T>();
    p.x_row_stride = args.x.stride(0);
    p.out = args.out.ptr<T>();
    p.out_row_stride = args.out.stride(0);
    p.rows = args.x.size(0);
    p.inter = static_cast<int>(args.x.size(1) / 2);
    return launch_silu_and_mul<T>(p, stream);
  });
}

}  // namespace edgespec
