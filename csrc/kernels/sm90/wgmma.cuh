// Hopper warpgroup matrix multiply (wgmma, sm_90a) and the fences around it: every line of inline
// PTX of the sm90 kernels lives here, so that the CPU emulator can run them by replacing this one
// file (tools/cuda_emulator/wgmma.cuh implements exactly these functions).
//
// A wgmma is issued by a warpgroup (4 consecutive warps starting at a multiple of 4) and runs
// asynchronously: wgmma_fence() before the first of a batch (its accumulators and A registers were
// written by ordinary instructions), wgmma_commit() after the batch, wgmma_wait<0>() before the
// results are read or the operands overwritten. Shared memory written by ordinary stores or cp.async
// must be followed by fence_proxy_async() in each writing thread, then a barrier, before a wgmma
// reads it.
//
// Fragment layouts (m64nNk16, f32 accumulators), with w = warp index in the warpgroup, g = lane / 4,
// c = lane % 4: warp w owns rows 16w..16w+15; accumulator d[4i + e] is row 16w + g + 8 (e >= 2),
// column 8i + 2c + (e & 1) -- mma.m16n8k16's C layout repeated over the N / 8 column blocks. A in
// registers (wgmma_rs_mn): warp w's 16 x 16 slice in mma.m16n8k16's A layout (csrc/common/mma.cuh),
// so the accumulators of one product, rounded and packed in pairs, are the A operand of the next.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/mma.cuh"
#include "kernels/sm90/gmma_desc.h"

namespace edgespec {

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Orders this thread's earlier shared-memory writes (ordinary stores, cp.async once waited for)
// before later reads by the async proxy (wgmma, TMA).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Keeps the compiler from moving accesses of an accumulator register across a wgmma that is still
// in flight (the asm statements above do not name the registers the hardware writes).
__device__ __forceinline__ void wgmma_fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void wgmma_fence_operand(std::uint32_t& r) { asm volatile("" : "+r"(r)::"memory"); }

// d (+)= A . B for a 64 x N x 16 step: A and B from shared memory, both K-major (descriptors:
// gmma_desc.h); accumulate = 0 overwrites d.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, int accumulate);

// d (+)= A . B for a 64 x N x 16 step: A from registers, B from shared memory MN-major.
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_mn(float (&d)[N / 2], const std::uint32_t (&a)[4], std::uint64_t desc_b,
                                            int accumulate);

// The PTX of each (type, N) is spelled out by the macros below: an asm string must be a literal.
// Accumulator operands "+f"(d[i..i+7]) and the register lists {%0, ..., %(n-1)}.
#define EDGESPEC_WGMMA_F8(i)                                                                               \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define EDGESPEC_WGMMA_OUT32 EDGESPEC_WGMMA_F8(0), EDGESPEC_WGMMA_F8(8), EDGESPEC_WGMMA_F8(16), EDGESPEC_WGMMA_F8(24)
#define EDGESPEC_WGMMA_OUT64 \
  EDGESPEC_WGMMA_OUT32, EDGESPEC_WGMMA_F8(32), EDGESPEC_WGMMA_F8(40), EDGESPEC_WGMMA_F8(48), EDGESPEC_WGMMA_F8(56)
#define EDGESPEC_WGMMA_REGS32 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define EDGESPEC_WGMMA_REGS64 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "  \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"

// wgmma_ss<CPP, N>: operands after the N / 2 accumulators are %A (desc_a), %B (desc_b), %S (accumulate).
#define EDGESPEC_WGMMA_SS(CPP, PTX, N, ACC, A, B, S)                                                        \
  template <>                                                                                                \
  __device__ __forceinline__ void wgmma_ss<CPP, N>(float(&d)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, \
                                                   int accumulate) {                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S ", 0;\n"                                           \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " EDGESPEC_WGMMA_REGS##ACC   \
                 ", %" #A ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                                   \
                 : EDGESPEC_WGMMA_OUT##ACC                                                                   \
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));                                              \
  }

// wgmma_rs_mn<CPP, N>: after the accumulators, %A0..%A0+3 (a), %B (desc_b), %S (accumulate); B MN-major.
#define EDGESPEC_WGMMA_RS_MN(CPP, PTX, N, ACC, A0, A1, A2, A3, B, S)                                        \
  template <>                                                                                                \
  __device__ __forceinline__ void wgmma_rs_mn<CPP, N>(float(&d)[N / 2], const std::uint32_t(&a)[4],          \
                                                      std::uint64_t desc_b, int accumulate) {                 \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #S ", 0;\n"                                           \
                 "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " " EDGESPEC_WGMMA_REGS##ACC   \
                 ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1;\n}\n"                    \
                 : EDGESPEC_WGMMA_OUT##ACC                                                                   \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));               \
  }

EDGESPEC_WGMMA_SS(__nv_bfloat16, "bf16", 64, 32, 32, 33, 34)
EDGESPEC_WGMMA_SS(__half, "f16", 64, 32, 32, 33, 34)
EDGESPEC_WGMMA_RS_MN(__nv_bfloat16, "bf16", 64, 32, 32, 33, 34, 35, 36, 37)
EDGESPEC_WGMMA_RS_MN(__half, "f16", 64, 32, 32, 33, 34, 35, 36, 37)
EDGESPEC_WGMMA_RS_MN(__nv_bfloat16, "bf16", 128, 64, 64, 65, 66, 67, 68, 69)
EDGESPEC_WGMMA_RS_MN(__half, "f16", 128, 64, 64, 65, 66, 67, 68, 69)

#undef EDGESPEC_WGMMA_SS
#undef EDGESPEC_WGMMA_RS_MN

}  // namespace edgespec
