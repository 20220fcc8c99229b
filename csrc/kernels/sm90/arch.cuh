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
// sm90 library is built) and, at run time, that the device is compute capability 9.0.
#pragma once

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define EDGESPEC_SM90_ENABLED 1
#elif defined(EDGESPEC_EMULATED_SM90)  // the CPU emulator's build (tools/cuda_emulator/wgmma.cuh)
#define EDGESPEC_SM90_ENABLED 1
#else
#define EDGESPEC_SM90_ENABLED 0
#endif
