// Shared-memory matrix descriptors of Hopper's wgmma (PTX ISA, "Matrix Descriptor Format"), for the
// one layout the sm90 kernels use: 128-byte swizzle. Plain arithmetic, shared by the kernels and the
// CPU emulator (tools/cuda_emulator/wgmma.cuh decodes what these encode).
//
// Bits: 0-13 start address >> 4, 16-29 leading-dimension byte offset (LBO) >> 4, 32-45 stride-
// dimension byte offset (SBO) >> 4, 49-51 base offset (0: every 1024-byte swizzle atom starts on a
// 1024-byte boundary of the shared window), 62-63 swizzle mode (1: 128-byte).
//
// The 128-byte swizzle: inside each 1024-byte atom of 8 rows x 128 bytes, the 16-byte chunk c of
// row r lives at chunk position c ^ r (address bits 4-6 XOR bits 7-9). A tile of 64-element
// (16-bit) rows is stored as "column blocks" of 64 elements: block b holds elements [64b, 64b + 64)
// of every row, rows 128 bytes apart, blocks `rows * 128` bytes apart. Read as an operand:
//   K-major (the reduction dim contiguous; Q and K of attention): a k16 slice starts 32 bytes
//     further into the rows (k % 64) or a block further (k / 64); SBO = 1024 (the next 8 rows);
//     LBO is not used (set to 16 bytes, as CUTLASS does).
//   MN-major (the output dim contiguous; V of attention, B[k][n] = V[key k][dim n]): a k16 slice
//     starts 16 rows (2048 bytes) further; SBO = 1024 (the next 8 k-rows), LBO = the distance
//     between 64-element blocks of n.
#pragma once

#include <cstdint>

namespace edgespec {

constexpr std::uint32_t kGmmaSwizzleAtomBytes = 1024;
constexpr std::uint64_t kGmmaSwizzle128 = 1;

__host__ __device__ constexpr std::uint64_t gmma_desc_sw128(std::uint32_t smem_addr, std::uint32_t lbo_bytes,
                                                            std::uint32_t sbo_bytes) {
  return (static_cast<std::uint64_t>(smem_addr >> 4) & 0x3FFF) |
         ((static_cast<std::uint64_t>(lbo_bytes >> 4) & 0x3FFF) << 16) |
         ((static_cast<std::uint64_t>(sbo_bytes >> 4) & 0x3FFF) << 32) | (kGmmaSwizzle128 << 62);
}

// Byte offset of 16-bit element (row, col) in a 128-byte-swizzled tile of `rows` rows (see above),
// relative to a 1024-byte-aligned tile start.
__host__ __device__ constexpr std::uint32_t sw128_offset(int rows, int row, int col) {
  return static_cast<std::uint32_t>((col / 64) * rows * 128 + row * 128 +
                                    ((((col % 64) / 8) ^ (row % 8)) << 4) + (col % 8) * 2);
}

}  // namespace edgespec
