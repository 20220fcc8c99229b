#include "common/status.h"

namespace edgespec {

const char* status_code_name(StatusCode code) {
  switch (code) {
    case StatusCode::kOk: return "ok";
    case StatusCode::kInvalidArgument: return "invalid argument";
    case StatusCode::kUnsupported: return "unsupported";
    case StatusCode::kCudaError: return "CUDA error";
  }
  return "unknown status";
}

std::string Status::message() const {
  std::string text = status_code_name(code);
  if (code == StatusCode::kCudaError) {
    text += " ";
    text += cudaGetErrorName(cuda);
    text += " (";
    text += cudaGetErrorString(cuda);
    text += ")";
    if (!detail.empty()) text += " while " + detail;
    return text;
  }
  if (!detail.empty()) text += ": " + detail;
  return text;
}

}  // namespace edgespec
