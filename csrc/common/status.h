// Status values returned by every launcher and checked entry point.
//
// C++ in edgespec never throws across a launcher, never calls exit()/abort(), and never signals
// errors from device code. A launcher returns a Status; the pybind11 binding (the only place
// that raises) turns a non-OK Status into a Python exception whose message names the op, the
// argument shapes and the reason. The benchmark binaries print the same text.
#pragma once

#include <cuda_runtime_api.h>

#include <string>
#include <utility>

namespace edgespec {

enum class StatusCode : int {
  kOk = 0,
  kInvalidArgument,  // a view has the wrong rank, dtype, device, strides or shape
  kUnsupported,      // a well-formed input this build cannot run (dtype not compiled, too large)
  kCudaError,        // the CUDA runtime reported an error (launch configuration, device, driver)
};

// A code, plus the CUDA error for kCudaError and a sentence for the argument errors. Returning
// the CUDA error by value keeps its text available after cudaGetLastError() cleared it.
struct Status {
  StatusCode code = StatusCode::kOk;
  cudaError_t cuda = cudaSuccess;
  std::string detail;

  bool ok() const { return code == StatusCode::kOk; }

  static Status success() { return {}; }
  static Status invalid(std::string why) {
    return {StatusCode::kInvalidArgument, cudaSuccess, std::move(why)};
  }
  static Status unsupported(std::string why) {
    return {StatusCode::kUnsupported, cudaSuccess, std::move(why)};
  }
  static Status from_cuda(cudaError_t err, std::string where) {
    if (err == cudaSuccess) return {};
    return {StatusCode::kCudaError, err, std::move(where)};
  }

  // "invalid argument: residual has shape [19, 4095] but x has [19, 4096]"
  std::string message() const;
};

const char* status_code_name(StatusCode code);

}  // namespace edgespec

// Propagate a non-OK Status to the caller.
#define EDGESPEC_RETURN_IF_ERROR(expr)              \
  do {                                              \
    ::edgespec::Status edgespec_status_ = (expr);   \
    if (!edgespec_status_.ok()) return edgespec_status_; \
  } while (0)

// After every kernel launch: a bad launch configuration or a missing kernel image is reported
// here, synchronously, without waiting for the kernel. cudaGetLastError() also clears the
// (non-sticky) error so that the next op does not inherit it.
#define EDGESPEC_CHECK_LAUNCH(kernel_name) \
  EDGESPEC_RETURN_IF_ERROR(::edgespec::Status::from_cuda(cudaGetLastError(), "launching " kernel_name))
