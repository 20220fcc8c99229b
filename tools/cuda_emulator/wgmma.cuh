// The emulated build's replacement for csrc/kernels/sm90/wgmma.cuh: the same functions in C++ that
// does what the PTX instructions do (PTX ISA: wgmma.mma_async, its fence / commit_group /
// wait_group, "Matrix Descriptor Format", the 128-byte swizzle). Fragment layouts: the top of
// csrc/kernels/sm90/wgmma.cuh; descriptors: csrc/kernels/sm90/gmma_desc.h.
//
// Asynchrony is modelled: a wgmma only records its operands when issued (the A registers, gathered
// from the warp, and the descriptors) and computes at the wgmma_wait that retires its group,
// reading shared memory then and writing the accumulators then. So a kernel that reads the
// accumulators before waiting, or overwrites the operand tiles while a product is in flight, gets
// wrong results here as it would on a GPU. The async proxy is modelled for cp.async: a wgmma that
// reads bytes a cp.async wrote before its thread ran fence_proxy_async() fails the launch (plain
// stores to shared memory are not tracked). Not modelled: the rounding order inside the tensor
// cores (the 16 products of a k16 step are summed in fp32 in k order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <functional>
#include <string>
#include <vector>

#include "common/mma.cuh"
#include "kernels/sm90/gmma_desc.h"

namespace edgespec {

namespace emulated_wgmma {

struct Pending {
  std::uint64_t launch = 0;  // the launch and block that issued these (a wgmma may not outlive its thread)
  unsigned block = 0;
  std::vector<std::function<void()>> open;
  std::deque<std::vector<std::function<void()>>> groups;
};

inline unsigned linear_block() { return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z); }

inline Pending& mine() {
  static std::vector<Pending> all;
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  if (all.size() <= t) all.resize(t + 1);
  Pending& p = all[t];
  if (p.launch != ::cuemu::launch_serial()) {
    // Whatever an earlier launch left (one that failed with products in flight) is not this one's.
    p = Pending{};
    p.launch = ::cuemu::launch_serial();
    p.block = linear_block();
  } else if (p.block != linear_block()) {
    if (!p.open.empty() || !p.groups.empty()) ::cuemu::fail("wgmma: a thread exited with products still in flight");
    p.block = linear_block();
  }
  return p;
}

// Warp index within its warpgroup (which 16 rows of the 64 it owns); the warpgroup must be whole.
inline int warp_in_group(const char* what) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  if ((t / 128 + 1) * 128 > threads) ::cuemu::fail(std::string(what) + ": the block's last warpgroup is incomplete");
  return static_cast<int>(t / 32 % 4);
}

struct Desc {
  std::uint32_t start, lbo, sbo;
};

inline Desc decode(std::uint64_t desc, const char* what) {
  if ((desc >> 62) != kGmmaSwizzle128) ::cuemu::fail(std::string(what) + ": only 128-byte-swizzle descriptors are emulated");
  if (((desc >> 49) & 7) != 0) ::cuemu::fail(std::string(what) + ": a descriptor base offset is not emulated");
  return {static_cast<std::uint32_t>(desc & 0x3FFF) << 4, static_cast<std::uint32_t>((desc >> 16) & 0x3FFF) << 4,
          static_cast<std::uint32_t>((desc >> 32) & 0x3FFF) << 4};
}

// The 128-byte swizzle acts on shared-window address bits: bits 4-6 ^= bits 7-9.
inline std::uint32_t swizzle128(std::uint32_t address) { return address ^ (((address >> 7) & 7) << 4); }

template <typename T>
float load(std::uint32_t address, const char* what) {
  std::uint16_t bits;
  std::memcpy(&bits, ::cuemu::async_proxy_pointer(swizzle128(address), 2, what), 2);
  return emulated::half_to_float(bits, static_cast<T*>(nullptr));
}

// Element (i, k) of a K-major operand (i: row of A or column of B, k < 16): 8-row groups SBO apart,
// rows 128 bytes apart, k contiguous.
template <typename T>
float k_major(const Desc& d, int i, int k, const char* what) {
  return load<T>(d.start + (i / 8) * d.sbo + (i % 8) * 128 + k * 2, what);
}

// Element (k, n) of an MN-major B (k < 16): n contiguous in 64-element blocks LBO apart, k rows
// 128 bytes apart in 8-row groups SBO apart.
template <typename T>
float mn_major(const Desc& d, int k, int n, const char* what) {
  return load<T>(d.start + (n / 64) * d.lbo + (n % 64) * 2 + (k % 8) * 128 + (k / 8) * d.sbo, what);
}

// Accumulator d[4i + e] of lane (g, c) in warp w: row 16w + g + 8 (e >= 2), column 8i + 2c + (e & 1).
template <int N, typename Element>
void accumulate_into(float* d, int warp, int lane, bool accumulate, Element element) {
  const int g = lane / 4, c = lane % 4;
  for (int i = 0; i < N / 8; ++i) {
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + g + (e >= 2 ? 8 : 0), col = 8 * i + 2 * c + (e & 1);
      float sum = accumulate ? d[4 * i + e] : 0.f;
      for (int k = 0; k < 16; ++k) sum += element(row, k, col);
      d[4 * i + e] = sum;
    }
  }
}

}  // namespace emulated_wgmma

inline void wgmma_fence() { ::cuemu::warp_collective("wgmma.fence", nullptr, 0); }

inline void wgmma_commit() {
  ::cuemu::warp_collective("wgmma.commit_group", nullptr, 0);
  auto& p = emulated_wgmma::mine();
  p.groups.push_back(std::move(p.open));
  p.open.clear();
}

template <int kPending>
inline void wgmma_wait() {
  ::cuemu::warp_collective("wgmma.wait_group", nullptr, 0);
  auto& p = emulated_wgmma::mine();
  while (static_cast<int>(p.groups.size()) > kPending) {
    for (auto& product : p.groups.front()) product();
    p.groups.pop_front();
  }
}

inline void fence_proxy_async() { ::cuemu::fence_proxy_async(); }
inline void wgmma_fence_operand(float&) {}
inline void wgmma_fence_operand(std::uint32_t&) {}

template <typename T, int N>
inline void wgmma_ss(float (&d)[N / 2], std::uint64_t desc_a, std::uint64_t desc_b, int accumulate) {
  using namespace emulated_wgmma;
  const char* what = "wgmma.m64nNk16 (A, B in shared memory)";
  const int warp = warp_in_group(what);
  ::cuemu::warp_collective(what, nullptr, 0);
  const int lane = ::cuemu::self().lane;
  const Desc a = decode(desc_a, what), b = decode(desc_b, what);
  float* out = d;
  mine().open.push_back([=] {
    accumulate_into<N>(out, warp, lane, accumulate != 0, [&](int row, int k, int col) {
      return k_major<T>(a, row, k, what) * k_major<T>(b, col, k, what);
    });
  });
}

template <typename T, int N>
inline void wgmma_rs_mn(float (&d)[N / 2], const std::uint32_t (&a)[4], std::uint64_t desc_b, int accumulate) {
  using namespace emulated_wgmma;
  const char* what = "wgmma.m64nNk16 (A in registers, B MN-major)";
  const int warp = warp_in_group(what);
  const std::uint32_t regs[4] = {a[0], a[1], a[2], a[3]};
  const auto* all = ::cuemu::warp_collective(what, regs, sizeof regs);
  // A[row][k] of this warp's 16 rows: lane (row % 8) * 4 + (k % 8) / 2, register (row >= 8) + 2 (k >= 8).
  std::vector<float> slice(16 * 16);
  for (int row = 0; row < 16; ++row) {
    for (int k = 0; k < 16; ++k) {
      std::uint32_t r[4];
      std::memcpy(r, all + ((row % 8) * 4 + (k % 8) / 2) * ::cuemu::kSlotBytes, sizeof r);
      slice[row * 16 + k] = emulated::element<T>(r[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k % 2);
    }
  }
  const int lane = ::cuemu::self().lane;
  const Desc b = decode(desc_b, what);
  float* out = d;
  mine().open.push_back([=] {
    accumulate_into<N>(out, warp, lane, accumulate != 0, [&](int row, int k, int col) {
      return slice[(row - 16 * warp) * 16 + k] * mn_major<T>(b, k, col, what);
    });
  });
}

}  // namespace edgespec
