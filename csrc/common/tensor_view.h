// TensorView: how a tensor crosses the Python/C++ boundary without libtorch.
//
// Python (edgespec/ops/_kernels.py) builds a view from a torch tensor it has already validated:
// the device address as an integer, the shape, the strides in elements (as torch reports them),
// a dtype code and the CUDA device index. C++ owns nothing here: the view is valid while the
// torch tensor is alive, which the Python caller guarantees for the duration of the (asynchronous)
// launch by holding the tensor; the caching allocator's stream semantics cover the rest.
// Entry points re-check every view (checks.h) before any CUDA call.
#pragma once

#include <cstdint>
#include <string>

namespace edgespec {

// Codes shared with Python through the binding (_C.DType); never renumber.
enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt32 = 3,
  kInt64 = 4,
};

// Short names used in messages and in build_info(): "fp32", "fp16", "bf16", "int32", "int64".
const char* dtype_name(DType dtype);
int dtype_size(DType dtype);
bool is_floating(DType dtype);

// Ops take at most [T, H, D] tensors; leading batch dims are folded into rows in Python.
constexpr int kMaxRank = 4;

struct TensorView {
  std::uint64_t data = 0;          // device address of element [0, ..., 0]
  int rank = 0;
  std::int64_t shape[kMaxRank] = {};
  std::int64_t strides[kMaxRank] = {};  // in elements, as torch.Tensor.stride()
  DType dtype = DType::kFloat32;
  int device = -1;                 // CUDA device index

  std::int64_t size(int dim) const { return shape[dim < 0 ? dim + rank : dim]; }
  std::int64_t stride(int dim) const { return strides[dim < 0 ? dim + rank : dim]; }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= shape[i];
    return n;
  }
  template <typename T>
  T* ptr() const {
    return reinterpret_cast<T*>(static_cast<std::uintptr_t>(data));
  }
};

// "bf16[19, 4096] strides [4096, 1] on cuda:0" — what every error message quotes.
std::string describe(const TensorView& view);
// "[19, 4096]"
std::string shape_string(const TensorView& view);

}  // namespace edgespec
