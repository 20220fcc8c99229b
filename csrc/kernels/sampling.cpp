// Checked entry point of the sampling family (host only; the kernel lives in sampling.cuh).
#include "kernels/sampling.h"

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

namespace {

// Keeps the strided scan `v += 1024` of every thread far from int overflow.
constexpr std::int64_t kMaxVocab = std::int64_t{1} << 30;

Status check_argmax(const ArgmaxArgs& a) {
  const TensorView& logits = a.logits;
  EDGESPEC_RETURN_IF_ERROR(check_view(logits, "logits", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(logits, "logits"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(logits, "logits", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  if (logits.size(1) < 1) return Status::invalid("logits: vocabulary size must be at least 1");
  EDGESPEC_RETURN_IF_ERROR(check_fits(logits.size(1), kMaxVocab, "argmax: vocabulary size"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", DType::kInt64, "token ids are int64"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 0, logits.size(0), "one id per row of logits"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(logits, "logits", a.out, "out"));
  return check_disjoint(a.out, "out", logits, "logits");
}

}  // namespace

Status argmax(const ArgmaxArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_argmax(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.logits.device));
  return EDGESPEC_FLOAT_SWITCH(args.logits.dtype, "argmax", T, [&] {
    ArgmaxParams<T> p;
    p.logits = args.logits.ptr<const T>();
    p.row_stride = args.logits.stride(0);
    p.out = args.out.ptr<std::int64_t>();
    p.out_stride = args.out.stride(0);
    p.rows = args.logits.size(0);
    p.vocab = static_cast<int>(args.logits.size(1));
    return launch_argmax<T>(p, stream);
  });
}

}  // namespace edgespec
