#include "common/tensor_view.h"

namespace edgespec {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat32: return "fp32";
    case DType::kFloat16: return "fp16";
    case DType::kBFloat16: return "bf16";
    case DType::kInt32: return "int32";
    case DType::kInt64: return "int64";
  }
  return "unknown-dtype";
}

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32:
    case DType::kInt32: return 4;
    case DType::kInt64: return 8;
  }
  return 0;
}

bool is_floating(DType dtype) {
  return dtype == DType::kFloat32 || dtype == DType::kFloat16 || dtype == DType::kBFloat16;
}

namespace {
std::string join(const std::int64_t* values, int n) {
  std::string s = "[";
  for (int i = 0; i < n; ++i) {
    if (i) s += ", ";
    s += std::to_string(values[i]);
  }
  return s + "]";
}
}  // namespace

std::string shape_string(const TensorView& view) { return join(view.shape, view.rank); }

std::string describe(const TensorView& view) {
  return std::string(dtype_name(view.dtype)) + shape_string(view) + " strides " +
         join(view.strides, view.rank) + " on cuda:" + std::to_string(view.device);
}

}  // namespace edgespec
