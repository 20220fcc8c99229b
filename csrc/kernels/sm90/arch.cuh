// Compile-time guard for Hopper-only device code (wgmma, TMA, setmaxnreg).
//
// Those instructions exist only in sm_90a SASS. CMake compiles csrc/kernels/sm90/*.cu for
// 90a-real alone (and only when 90a-real is in EDGESPEC_CUDA_ARCHS), but nvcc still runs a host
// pass over every file, so each kernel body is wrapped:
//
//   __global__ void my_wgmma_kernel(Params p) {
//   #if EDGESPEC_SM90_ENABLED
//     ... wgmma / TMA code ...
//   #endif
//   }
//
// Host code that dispatches to such kernels tests EDGESPEC_HAS_SM90 (defined by CMake when the
// sm90 library is built) and, at run time, that the device is compute capability 9.0
// (check_sm90_device below).
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "common/status.h"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EDGESPEC_SM90_ENABLED 1
#elif defined(EDGESPEC_EMULATED_SM90)  // the CPU emulator's build (tools/cuda_emulator/wgmma.cuh)
#define EDGESPEC_SM90_ENABLED 1
#else
#define EDGESPEC_SM90_ENABLED 0
#endif

namespace edgespec {

// kUnsupported unless the current device is compute capability 9.0 (sm_90a code runs on no other).
inline Status check_sm90_device(const std::string& what) {
  int device = 0, major = 0, minor = 0;
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaGetDevice(&device), what + ": cudaGetDevice"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                                             what + ": reading the compute capability"));
  EDGESPEC_RETURN_IF_ERROR(Status::from_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
                                             what + ": reading the compute capability"));
  if (major != 9 || minor != 0) {
    return Status::unsupported(what + ": needs a compute capability 9.0 GPU (H100/H200), this is " +
                               std::to_string(major) + "." + std::to_string(minor));
  }
  return Status::success();
}

}  // namespace edgespec
