// Force-included (g++ -include) before every source of the emulated build: gives the CUDA
// qualifiers their host meaning before the CUDA headers define them (crt/host_defines.h keeps a
// definition that already exists), then declares the emulated built-ins.
#pragma once

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
// Blocks run one at a time on one host thread, so a function-local static is exactly one copy per
// block, shared by its threads. build.py also registers each one (cuemu::SharedRegion) so that it
// starts every block as 0xFF bytes, like uninitialised shared memory.
#define __shared__ static
#define __constant__ static

#include "runtime.h"
