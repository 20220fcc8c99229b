// The emulated build's replacement for csrc/common/mma.cuh: the same functions, in C++ that does
// what the PTX instructions do (PTX ISA: cp.async, ldmatrix, mma.m16n8k16, lop3). The fragment
// layouts are the ones documented at the top of csrc/common/mma.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace edgespec {

namespace emulated {

inline float half_to_float(std::uint16_t bits, __nv_bfloat16*) {
  std::uint32_t w = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

inline float half_to_float(std::uint16_t bits, __half*) {
  __half h;
  std::memcpy(&h, &bits, sizeof h);
  return __half2float(h);
}

// Element `half` (0: low 16 bits, 1: high) of a packed register as fp32.
template <typename T>
float element(std::uint32_t reg, int half) {
  return half_to_float(static_cast<std::uint16_t>(half ? reg >> 16 : reg & 0xffffu), static_cast<T*>(nullptr));
}

}  // namespace emulated

inline std::uint32_t smem_address(const void* ptr) { return ::cuemu::shared_window_address(ptr); }

inline void cp_async_16(void* smem, const void* gmem, bool valid) { ::cuemu::cp_async(smem, gmem, valid); }

// The L2 eviction hint changes nothing a program can observe.
inline void cp_async_16_stream(void* smem, const void* gmem) { ::cuemu::cp_async(smem, gmem, true); }

inline void cp_async_commit() { ::cuemu::cp_async_commit(); }

template <int kPending>
inline void cp_async_wait() {
  ::cuemu::cp_async_wait(kPending);
}

// Lane l gets, of matrix i, the two 16-bit values at row l / 4, columns 2(l % 4), +1 (.trans:
// rows 2(l % 4), +1 of column l / 4); the 8 row addresses of matrix i come from lanes 8i..8i+7.
inline void ldmatrix_x4_impl(std::uint32_t (&r)[4], const void* smem, bool trans, const char* what) {
  ::cuemu::check_shared(smem, 16, 16, what);
  const auto* all = ::cuemu::warp_collective(what, &smem, sizeof smem);
  const int lane = ::cuemu::self().lane;
  const int g = lane / 4, c = lane % 4;
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const auto* row = ::cuemu::lane_value<const unsigned char*>(all, 8 * i + g);
      std::memcpy(&r[i], row + 4 * c, 4);
    } else {
      const auto* row0 = ::cuemu::lane_value<const unsigned char*>(all, 8 * i + 2 * c);
      const auto* row1 = ::cuemu::lane_value<const unsigned char*>(all, 8 * i + 2 * c + 1);
      std::uint16_t lo, hi;
      std::memcpy(&lo, row0 + 2 * g, 2);
      std::memcpy(&hi, row1 + 2 * g, 2);
      r[i] = static_cast<std::uint32_t>(lo) | (static_cast<std::uint32_t>(hi) << 16);
    }
  }
}

inline void ldmatrix_x4(std::uint32_t (&r)[4], const void* smem) { ldmatrix_x4_impl(r, smem, false, "ldmatrix.x4"); }

inline void ldmatrix_x4_trans(std::uint32_t (&r)[4], const void* smem) {
  ldmatrix_x4_impl(r, smem, true, "ldmatrix.x4.trans");
}

inline std::uint32_t lop3_and_or(std::uint32_t a, std::uint32_t b, std::uint32_t c) { return (a & b) | c; }

// d += a * b for one m16n8k16 tile: lane (g, c) owns D rows g and g + 8, columns 2c and 2c + 1.
template <typename T>
inline void mma_16816(float (&d)[4], const std::uint32_t (&a)[4], std::uint32_t b0, std::uint32_t b1) {
  struct Operands {
    std::uint32_t a[4];
    std::uint32_t b[2];
  };
  const Operands mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const auto* all = ::cuemu::warp_collective("mma.m16n8k16", &mine, sizeof mine);
  const int lane = ::cuemu::self().lane;
  // A[row][k]: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8), half k % 2.
  auto A = [&](int row, int k) {
    const Operands o = ::cuemu::lane_value<Operands>(all, (row % 8) * 4 + (k % 8) / 2);
    return emulated::element<T>(o.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
  };
  // B[k][col]: lane col * 4 + (k % 8) / 2, register k >= 8, half k % 2.
  auto B = [&](int k, int col) {
    const Operands o = ::cuemu::lane_value<Operands>(all, col * 4 + (k % 8) / 2);
    return emulated::element<T>(o.b[k >= 8 ? 1 : 0], k % 2);
  };
  const int g = lane / 4, c = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * c + (i & 1);
    float sum = d[i];
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    d[i] = sum;
  }
}

// Two fp32 values rounded to T (to nearest even, as the T(float) conversions do) and packed, `lo`
// in the low half.
template <typename T>
inline std::uint32_t pack2(float lo, float hi) {
  const T pair[2] = {T(lo), T(hi)};
  std::uint32_t r;
  std::memcpy(&r, pair, sizeof r);
  return r;
}

}  // namespace edgespec
