// Checked entry points of the sampling family (host only; the kernels live in sampling.cuh and
// nucleus.cu).
#include "kernels/sampling.h"

#include <string>

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

// Pass 1's histograms per (row, split): kNucleusBins uint64 masses, then kNucleusBins uint32 counts.
constexpr std::int64_t kNucleusWordsPerSplit = kNucleusBins + kNucleusBins / 2;
constexpr std::uint64_t kMaxNeed = std::uint64_t{1} << kNucleusMassBits;

std::int64_t nucleus_splits(std::int64_t vocab) { return (vocab + kNucleusSplitTokens - 1) / kNucleusSplitTokens; }

Status check_nucleus_floor(const NucleusFloorArgs& a) {
  const TensorView& probs = a.probs;
  EDGESPEC_RETURN_IF_ERROR(check_view(probs, "probs", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(probs, "probs"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(probs, "probs", DType::kFloat32, "probabilities are a float32 softmax"));
  if (probs.size(1) < 1) return Status::invalid("probs: vocabulary size must be at least 1");
  EDGESPEC_RETURN_IF_ERROR(check_fits(probs.size(1), kMaxVocab, "top-p: vocabulary size"));
  if (a.need < 1 || a.need > kMaxNeed) {
    return Status::invalid("need must be in [1, 2^40] (top_p * 2^40, rounded), got " + std::to_string(a.need));
  }
  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", DType::kFloat32, "one float32 floor per row"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 0, probs.size(0), "one floor per row of probs"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.workspace, "workspace", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.workspace, "workspace", DType::kInt64, "8-byte scratch words"));
  EDGESPEC_RETURN_IF_ERROR(check_contiguous(a.workspace, "workspace"));
  const std::int64_t words = nucleus_floor_workspace_words(probs.size(0), probs.size(1));
  if (a.workspace.size(0) < words) {
    return Status::invalid("workspace: " + std::to_string(a.workspace.size(0)) + " words, top-p needs " +
                           std::to_string(words) + " for probs " + shape_string(probs));
  }
  EDGESPEC_RETURN_IF_ERROR(check_same_device(probs, "probs", a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(probs, "probs", a.workspace, "workspace"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", probs, "probs"));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.workspace, "workspace", probs, "probs"));
  return check_disjoint(a.workspace, "workspace", a.out, "out");
}

}  // namespace

std::int64_t nucleus_floor_workspace_words(std::int64_t rows, std::int64_t vocab) {
  return rows * nucleus_splits(vocab) * kNucleusWordsPerSplit;
}

Status nucleus_floor(const NucleusFloorArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_nucleus_floor(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.probs.device));
  NucleusFloorParams p;
  p.probs = args.probs.ptr<const float>();
  p.row_stride = args.probs.stride(0);
  p.out = args.out.ptr<float>();
  p.out_stride = args.out.stride(0);
  p.rows = args.probs.size(0);
  p.vocab = static_cast<int>(args.probs.size(1));
  p.splits = static_cast<int>(nucleus_splits(p.vocab));
  p.need = args.need;
  auto* words = args.workspace.ptr<std::int64_t>();
  const std::int64_t bins = p.rows * p.splits * kNucleusBins;
  p.split_mass = reinterpret_cast<unsigned long long*>(words);
  p.split_count = reinterpret_cast<unsigned*>(words + bins);
  return launch_nucleus_floor(p, stream);
}

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
