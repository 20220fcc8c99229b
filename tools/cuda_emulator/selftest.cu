// Kernels that check the emulator itself (tests/test_cuda_emulator.py calls them through ctypes):
// the emulated tensor-core fragments against the layouts csrc/common/mma.cuh documents, the warp
// collectives, and each fault the emulator promises to report instead of hanging or corrupting.
// Written as ordinary CUDA, like the kernels of csrc/; compiled only into the emulated build.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "common/mma.cuh"
#include "kernels/sm90/gmma_desc.h"
#include "kernels/sm90/wgmma.cuh"

namespace {

using edgespec::cp_async_16;
using edgespec::cp_async_commit;
using edgespec::cp_async_wait;
using edgespec::ldmatrix_x4;
using edgespec::ldmatrix_x4_trans;
using edgespec::mma_16816;

constexpr unsigned kFull = 0xffffffffu;

__device__ std::uint32_t pair(const std::uint16_t* p) { return static_cast<std::uint32_t>(p[0]) | (static_cast<std::uint32_t>(p[1]) << 16); }

// D = A [16 x 16] * B [16 x 8] (+ D), fragments gathered from global memory by the documented
// layout (g = lane / 4, c = lane % 4): a[0] = A[g][2c..], a[1] = A[g+8][2c..], a[2] = A[g][2c+8..],
// a[3] = A[g+8][2c+8..]; b[0] = B[2c..2c+1][g], b[1] = B[2c+8..][g]; d = D[g][2c..], D[g+8][2c..].
template <typename T>
__global__ void mma_kernel(const std::uint16_t* a, const std::uint16_t* b_t, float* d) {
  const int lane = threadIdx.x, g = lane / 4, c = lane % 4;
  const std::uint32_t af[4] = {pair(a + g * 16 + 2 * c), pair(a + (g + 8) * 16 + 2 * c), pair(a + g * 16 + 2 * c + 8),
                               pair(a + (g + 8) * 16 + 2 * c + 8)};
  // b_t is B transposed ([n][k]), so B[k][g], B[k+1][g] are adjacent.
  const std::uint32_t b0 = pair(b_t + g * 16 + 2 * c), b1 = pair(b_t + g * 16 + 2 * c + 8);
  float acc[4] = {d[g * 8 + 2 * c], d[g * 8 + 2 * c + 1], d[(g + 8) * 8 + 2 * c], d[(g + 8) * 8 + 2 * c + 1]};
  mma_16816<T>(acc, af, b0, b1);
  d[g * 8 + 2 * c] = acc[0];
  d[g * 8 + 2 * c + 1] = acc[1];
  d[(g + 8) * 8 + 2 * c] = acc[2];
  d[(g + 8) * 8 + 2 * c + 1] = acc[3];
}

// Four 8 x 8 matrices of 16-bit values, rows of 8, staged in shared memory; lane 8i + r gives the
// address of row r of matrix i. Writes each lane's four registers to out[lane][4].
__global__ void ldmatrix_kernel(const std::uint16_t* m, std::uint32_t* out, int trans) {
  extern __shared__ __align__(16) std::uint16_t tile[];
  const int lane = threadIdx.x;
  cp_async_16(tile + lane * 8, m + lane * 8, true);  // 32 rows of 16 bytes
  cp_async_commit();
  cp_async_wait<0>();
  __syncwarp();
  std::uint32_t r[4];
  if (trans) {
    ldmatrix_x4_trans(r, tile + lane * 8);
  } else {
    ldmatrix_x4(r, tile + lane * 8);
  }
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// Per lane: shfl_xor(lane * 3, 5), shfl(lane * 3, 7), shfl_down(lane * 3, 3) (own value past the
// end), ballot(lane % 3 == 0), reduce_add(lane), match_any(lane % 5).
__global__ void collectives_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  int* o = out + threadIdx.x * 6;
  o[0] = __shfl_xor_sync(kFull, lane * 3, 5);
  o[1] = __shfl_sync(kFull, lane * 3, 7);
  o[2] = __shfl_down_sync(kFull, lane * 3, 3);
  o[3] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  o[4] = __reduce_add_sync(kFull, lane);
  o[5] = static_cast<int>(__match_any_sync(kFull, lane % 5));
}

// What a thread reads back from shared memory right after cp.async, before (0) or after (1)
// waiting for the copy: the emulator lands copies late under round-robin schedules, early under
// serial ones.
__global__ void cp_async_timing_kernel(const float* src, float* out, int wait_first) {
  extern __shared__ __align__(16) float staged[];
  cp_async_16(staged + threadIdx.x * 4, src + threadIdx.x * 4, true);
  cp_async_commit();
  if (wait_first) cp_async_wait<0>();
  out[threadIdx.x] = staged[threadIdx.x * 4];
  cp_async_wait<0>();
}

// Reads a static __shared__ word before anybody wrote it.
__global__ void static_shared_kernel(unsigned* out) {
  __shared__ unsigned never_written;
  out[0] = never_written;
}

// Faults ---------------------------------------------------------------------------------------

__global__ void divergent_collective_kernel(int* out) {
  const int lane = threadIdx.x;
  if (lane < 16) {
    out[lane] = __shfl_xor_sync(kFull, lane, 1);
  } else {
    out[lane] = static_cast<int>(__ballot_sync(kFull, 1));
  }
}

__global__ void exited_lane_collective_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

__global__ void deadlock_kernel(int* out) {
  // Lane 0 of warp 0 waits at the barrier for the others, which wait at a shuffle for lane 0.
  if (threadIdx.x == 0) {
    __syncthreads();
  } else if (threadIdx.x < 32) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
  }
}

__global__ void shared_overflow_kernel() {
  extern __shared__ float scratch[];
  scratch[blockDim.x + threadIdx.x] = 1.f;  // one float per thread past the 4 * blockDim bytes
}

__global__ void misaligned_cp_async_kernel(const float* src) {
  extern __shared__ __align__(16) float staged[];
  cp_async_16(staged + threadIdx.x * 4 + 1, src, true);
  cp_async_commit();
  cp_async_wait<0>();
}

// One warpgroup stages two 64 x 64 bf16 tiles with cp.async (zero-filled) and multiplies them with
// wgmma without fence.proxy.async between the copies and the product: the async proxy may read
// stale bytes on a GPU, so the emulator fails the launch.
__global__ void unfenced_wgmma_kernel(const float* src) {
  extern __shared__ __align__(16) unsigned char raw[];
  const std::uint32_t raw_addr = edgespec::smem_address(raw);
  const std::uint32_t pad = (1024 - raw_addr % 1024) % 1024;
  for (int i = threadIdx.x; i < 2 * 8192 / 16; i += blockDim.x) cp_async_16(raw + pad + 16 * i, src, false);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();  // a barrier orders the generic proxy only
  float d[32] = {};
  edgespec::wgmma_fence();
  edgespec::wgmma_ss<__nv_bfloat16, 64>(d, edgespec::gmma_desc_sw128(raw_addr + pad, 16, 1024),
                                        edgespec::gmma_desc_sw128(raw_addr + pad + 8192, 16, 1024), 0);
  edgespec::wgmma_commit();
  edgespec::wgmma_wait<0>();
}

// One warpgroup that only waits for its (no) products in flight, with no shared memory: a product
// left queued by an earlier launch would run here and fail, reading outside shared memory.
__global__ void wgmma_wait_only_kernel() { edgespec::wgmma_wait<0>(); }

// One instance per test case: the opt-in attribute is remembered per kernel.
template <int kCase>
__global__ void big_shared_kernel(float* out) {
  extern __shared__ float big[];
  big[threadIdx.x] = 1.f;
  out[threadIdx.x] = big[threadIdx.x];
}

// Each thread copies src[threadIdx.x]: with fewer than blockDim.x floats behind src, the last
// threads read past the allocation (what tools/cuda_emulator/asan.sh must catch).
__global__ void global_read_kernel(const float* src, float* out) { out[threadIdx.x] = src[threadIdx.x]; }

// One warpgroup: D = A [64 x 16] . B [16 x 64] with A and B^T staged K-major in 128-byte-swizzled
// shared memory (gmma_desc.h: element (i, k) at sw128_offset), then E = A . V [16 x 64] with A from
// registers (the mma.m16n8k16 A layout per warp) and V staged MN-major (element (k, n) at
// sw128_offset(16, k, n)). Every thread writes, per accumulator of d[4i + e] (row 16w + g + 8(e/2),
// column 8i + 2c + e % 2): `before` its value between the wgmma and its wait (a wgmma completes at
// the wait that retires it), then D and E. a, bt, v: bf16 bits, row-major [64][16], [64][16], [16][64].
__global__ void wgmma_kernel(const std::uint16_t* a, const std::uint16_t* bt, const std::uint16_t* v,
                             float* before, float* d_out, float* e_out) {
  extern __shared__ __align__(16) unsigned char raw[];
  const std::uint32_t raw_addr = edgespec::smem_address(raw);
  const std::uint32_t pad = (1024 - raw_addr % 1024) % 1024;
  unsigned char* tiles = raw + pad;  // A (8 KB: 64 rows of 128 bytes), B^T (8 KB), V (2 KB)
  const std::uint32_t base = raw_addr + pad;
  const int t = threadIdx.x, lane = t % 32, w = t / 32, g = lane / 4, c = lane % 4;
  for (int i = t; i < 64 * 16; i += 128) {
    const int r = i / 16, k = i % 16;
    std::memcpy(tiles + edgespec::sw128_offset(64, r, k), a + i, 2);
    std::memcpy(tiles + 8192 + edgespec::sw128_offset(64, r, k), bt + i, 2);
  }
  for (int i = t; i < 16 * 64; i += 128) std::memcpy(tiles + 16384 + edgespec::sw128_offset(16, i / 64, i % 64), v + i, 2);
  edgespec::fence_proxy_async();
  __syncthreads();
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 7.f;
  edgespec::wgmma_fence();
  edgespec::wgmma_ss<__nv_bfloat16, 64>(d, edgespec::gmma_desc_sw128(base, 16, 1024),
                                        edgespec::gmma_desc_sw128(base + 8192, 16, 1024), 1);
  edgespec::wgmma_commit();
  auto at = [&](int i) { return (16 * w + g + 8 * ((i % 4) / 2)) * 64 + 8 * (i / 4) + 2 * c + i % 2; };
  for (int i = 0; i < 32; ++i) before[at(i)] = d[i];
  edgespec::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) d_out[at(i)] = d[i];
  const int r0 = 16 * w + g;
  const std::uint32_t af[4] = {pair(a + r0 * 16 + 2 * c), pair(a + (r0 + 8) * 16 + 2 * c), pair(a + r0 * 16 + 2 * c + 8),
                               pair(a + (r0 + 8) * 16 + 2 * c + 8)};
  float e[32] = {};
  edgespec::wgmma_fence();
  edgespec::wgmma_rs_mn<__nv_bfloat16, 64>(e, af, edgespec::gmma_desc_sw128(base + 16384, 8192, 1024), 0);
  edgespec::wgmma_commit();
  edgespec::wgmma_wait<0>();
  for (int i = 0; i < 32; ++i) e_out[at(i)] = e[i];
}

}  // namespace

extern "C" {

int cuemu_selftest_mma(const std::uint16_t* a, const std::uint16_t* b_t, float* d, int bf16) {
  if (bf16) {
    mma_kernel<__nv_bfloat16><<<1, 32>>>(a, b_t, d);
  } else {
    mma_kernel<__half><<<1, 32>>>(a, b_t, d);
  }
  return cudaGetLastError();
}

int cuemu_selftest_ldmatrix(const std::uint16_t* m, std::uint32_t* out, int trans) {
  ldmatrix_kernel<<<1, 32, 32 * 16>>>(m, out, trans);
  return cudaGetLastError();
}

int cuemu_selftest_wgmma(const std::uint16_t* a, const std::uint16_t* bt, const std::uint16_t* v, float* before,
                         float* d, float* e) {
  wgmma_kernel<<<1, 128, 1024 + 8192 + 8192 + 2048>>>(a, bt, v, before, d, e);
  return cudaGetLastError();
}

int cuemu_selftest_wgmma_wait_only() {
  wgmma_wait_only_kernel<<<1, 128>>>();
  return cudaGetLastError();
}

int cuemu_selftest_collectives(int* out, int threads) {
  collectives_kernel<<<1, threads>>>(out);
  return cudaGetLastError();
}

int cuemu_selftest_cp_async_timing(const float* src, float* out, int wait_first) {
  cp_async_timing_kernel<<<1, 32, 32 * 16>>>(src, out, wait_first);
  return cudaGetLastError();
}

int cuemu_selftest_static_shared(unsigned* out) {
  static_shared_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

int cuemu_selftest_fault(int which, int* ints, float* floats) {
  switch (which) {
    case 0: divergent_collective_kernel<<<1, 32>>>(ints); break;
    case 1: exited_lane_collective_kernel<<<1, 32>>>(ints); break;
    case 2: deadlock_kernel<<<1, 64>>>(ints); break;
    case 3: shared_overflow_kernel<<<1, 32, 32 * 4>>>(); break;
    case 4: misaligned_cp_async_kernel<<<1, 32, 32 * 16 + 16>>>(floats); break;
    case 5: big_shared_kernel<5><<<1, 32, 64 * 1024>>>(floats); break;
    case 6:
      cudaFuncSetAttribute(big_shared_kernel<6>, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024);
      big_shared_kernel<6><<<1, 32, 64 * 1024>>>(floats);
      break;
    case 7: unfenced_wgmma_kernel<<<1, 128, 1024 + 2 * 8192>>>(floats); break;
    default: return -1;
  }
  return cudaGetLastError();
}

int cuemu_selftest_global_read(const float* src, float* out, int threads) {
  global_read_kernel<<<1, threads>>>(src, out);
  return cudaGetLastError();
}

// The message of the last failed launch (valid until the next failure).
const char* cuemu_selftest_message() { return cudaGetErrorString(cudaErrorLaunchFailure); }

}  // extern "C"
