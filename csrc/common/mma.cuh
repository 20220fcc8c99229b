// sm_80+ tensor-core building blocks shared by the kernel families: asynchronous global->shared
// copies (cp.async), ldmatrix fragment loads, the m16n8k16 mma with fp32 accumulation and lop3.
//
// Every line of inline PTX in the kernels lives in this header, so that the CPU emulator
// (tools/cuda_emulator) can run the kernels by replacing this one file with C++ that does the
// same thing (tools/cuda_emulator/mma.cuh implements exactly the functions declared here).
//
// Fragment layouts of mma.sync.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with
// g = lane / 4 and c = lane % 4:
//   A (16x16, row-major), 4 x b32 registers of two 16-bit values:
//     a[0] = A[g][2c..2c+1]  a[1] = A[g+8][2c..2c+1]  a[2] = A[g][2c+8..]  a[3] = A[g+8][2c+8..]
//   B (16x8, "col": stored as B^T rows), 2 registers:
//     b[0] = B[2c..2c+1][g]  b[1] = B[2c+8..2c+9][g]
//   C/D (16x8 fp32), 4 floats:
//     d[0..1] = C[g][2c..2c+1]  d[2..3] = C[g+8][2c..2c+1]
// ldmatrix.x4 loads four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i
// and lane l receives, of each matrix, row l / 4, columns 2(l % 4)..+1 (with .trans: rows
// 2(l % 4)..+1 of column l / 4). So a row-major tile in shared memory yields A fragments directly,
// an [n][k] tile (e.g. K stored [key][dim]) yields B fragments directly, and a [k][n] tile (e.g. V
// stored [key][dim]) yields B fragments through .trans.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace edgespec {

__device__ __forceinline__ std::uint32_t smem_address(const void* ptr) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(ptr));
}

// 16-byte global->shared copy that bypasses L1 (.cg: streamed data). With valid == false no global
// memory is read and the 16 bytes are zero-filled (src-size 0): rows past the end of a tensor
// become zeros instead of whatever the allocation holds.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 16-byte global->shared copy with an L2 evict-first hint: streamed weights should not push the
// activations, scales and KV cache out of L2.
__device__ __forceinline__ void cp_async_16_stream(void* smem, const void* gmem) {
  asm volatile(
      "{\n"
      "  .reg .b64 policy;\n"
      "  createpolicy.fractional.L2::evict_first.b64 policy, 1.0;\n"
      "  cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, policy;\n"
      "}\n" ::"r"(smem_address(smem)),
      "l"(gmem)
      : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(smem)));
}

__device__ __forceinline__ std::uint32_t lop3_and_or(std::uint32_t a, std::uint32_t b, std::uint32_t c) {
  // (a & b) | c in one instruction: LUT 0xEA = (0xF0 & 0xCC) | 0xAA.
  std::uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// d += a * b, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const std::uint32_t (&a)[4],
                                                         std::uint32_t b0, std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                                  std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values rounded to the 16-bit type and packed, `lo` in the low half (the lower column
// of an A fragment register).
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

}  // namespace edgespec
