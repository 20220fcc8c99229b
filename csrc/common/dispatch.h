// Compile-time dispatch from runtime values, flash-attention style.
//
// Each macro turns a runtime value into a type alias or constexpr named by the caller and
// evaluates the trailing lambda body with it; unsupported values return a kUnsupported Status,
// so every use site must be inside a function returning edgespec::Status.
//
//   EDGESPEC_FLOAT_SWITCH(x.dtype, "rms_norm", T, [&] { return launch_rms_norm<T>(params, stream); });
//
// The float switch lists exactly the storage dtypes that tools/gen_instances.py instantiates
// (kCompiledFloatDtypes below); adding one means adding it in both places.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "common/status.h"
#include "common/tensor_view.h"

namespace edgespec {

// Storage dtypes every float kernel is compiled for; build_info() reports them.
constexpr DType kCompiledFloatDtypes[] = {DType::kBFloat16, DType::kFloat16, DType::kFloat32};

inline Status unsupported_dtype(const char* op, DType dtype) {
  return Status::unsupported(std::string(op) + ": no kernel compiled for dtype " + dtype_name(dtype));
}

}  // namespace edgespec

// TYPE_NAME becomes float, __half or __nv_bfloat16.
#define EDGESPEC_FLOAT_SWITCH(DTYPE, OP, TYPE_NAME, ...)                     \
  [&]() -> ::edgespec::Status {                                               \
    switch (DTYPE) {                                                          \
      case ::edgespec::DType::kFloat32: {                                     \
        using TYPE_NAME = float;                                              \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      case ::edgespec::DType::kFloat16: {                                     \
        using TYPE_NAME = __half;                                             \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      case ::edgespec::DType::kBFloat16: {                                    \
        using TYPE_NAME = __nv_bfloat16;                                      \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      default:                                                                \
        return ::edgespec::unsupported_dtype(OP, DTYPE);                      \
    }                                                                         \
  }()

// Token ids and positions: TYPE_NAME becomes int32_t or int64_t.
#define EDGESPEC_INDEX_SWITCH(DTYPE, OP, TYPE_NAME, ...)                     \
  [&]() -> ::edgespec::Status {                                               \
    switch (DTYPE) {                                                          \
      case ::edgespec::DType::kInt32: {                                       \
        using TYPE_NAME = std::int32_t;                                       \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      case ::edgespec::DType::kInt64: {                                       \
        using TYPE_NAME = std::int64_t;                                       \
        return __VA_ARGS__();                                                 \
      }                                                                       \
      default:                                                                \
        return ::edgespec::unsupported_dtype(OP, DTYPE);                      \
    }                                                                         \
  }()

// CONST_NAME becomes a `constexpr bool` equal to COND.
#define EDGESPEC_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&]() -> ::edgespec::Status {                     \
    if (COND) {                                     \
      constexpr bool CONST_NAME = true;             \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr bool CONST_NAME = false;            \
      return __VA_ARGS__();                         \
    }                                               \
  }()
