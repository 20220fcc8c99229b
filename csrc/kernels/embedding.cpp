// Checked entry point of the embedding family (host only; the kernel lives in embedding.cuh).
#include "kernels/embedding.h"

#include <cmath>
#include <limits>

#include "common/checks.h"
#include "common/device_guard.h"
#include "common/dispatch.h"

namespace edgespec {

namespace {

Status check_embedding(const EmbeddingArgs& a) {
  EDGESPEC_RETURN_IF_ERROR(check_view(a.ids, "ids", 1));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(a.ids, "ids", {DType::kInt32, DType::kInt64}));
  const TensorView& table = a.table;
  EDGESPEC_RETURN_IF_ERROR(check_view(table, "table", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(table, "table"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype_in(table, "table", {DType::kBFloat16, DType::kFloat16, DType::kFloat32}));
  EDGESPEC_RETURN_IF_ERROR(check_fits(table.size(1), std::numeric_limits<int>::max(), "embedding: hidden size"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(table, "table", a.ids, "ids"));
  EDGESPEC_RETURN_IF_ERROR(check_view(a.out, "out", 2));
  EDGESPEC_RETURN_IF_ERROR(check_rows_contiguous(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_no_self_overlap(a.out, "out"));
  EDGESPEC_RETURN_IF_ERROR(check_dtype(a.out, "out", table.dtype, "the dtype of table"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 0, a.ids.size(0), "one row per id"));
  EDGESPEC_RETURN_IF_ERROR(check_size(a.out, "out", 1, table.size(1), "the hidden size of table"));
  EDGESPEC_RETURN_IF_ERROR(check_same_device(table, "table", a.out, "out"));
  if (!std::isfinite(a.scale)) return Status::invalid("scale must be finite, got " + std::to_string(a.scale));
  EDGESPEC_RETURN_IF_ERROR(check_disjoint(a.out, "out", table, "table"));
  return check_disjoint(a.out, "out", a.ids, "ids");
}

}  // namespace

Status embedding(const EmbeddingArgs& args, cudaStream_t stream) {
  EDGESPEC_RETURN_IF_ERROR(check_embedding(args));
  if (args.out.numel() == 0) return Status::success();
  DeviceGuard guard;
  EDGESPEC_RETURN_IF_ERROR(guard.enter(args.table.device));
  return EDGESPEC_FLOAT_SWITCH(args.table.dtype, "embedding", T, [&] {
    return EDGESPEC_INDEX_SWITCH(args.ids.dtype, "embedding", IdT, [&] {
      EmbeddingParams<T, IdT> p;
      p.ids = args.ids.ptr<const IdT>();
      p.ids_stride = args.ids.stride(0);
      p.table = args.table.ptr<const T>();
      p.table_row_stride = args.table.stride(0);
      p.vocab = args.table.size(0);
      p.out = args.out.ptr<T>();
      p.out_row_stride = args.out.stride(0);
      p.tokens = args.ids.size(0);
      p.hidden = static_cast<int>(args.table.size(1));
      p.scale = args.scale;
      return launch_embedding<T, IdT>(p, stream);
    });
  });
}

}  // namespace edgespec
