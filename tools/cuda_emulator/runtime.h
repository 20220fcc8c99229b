// The CUDA execution model on the CPU, for testing the kernels of csrc/ on machines without a GPU.
//
// Every CUDA thread of a block is a fiber (context.h) on one host thread; blocks run one after
// another. A fiber runs until it reaches a barrier (__syncthreads) or a warp collective (shuffle,
// ballot, ldmatrix, mma), so between two synchronisation points the threads of a block run in
// some order, which the schedule (CUEMU_SCHEDULE, see Schedule in runtime.cpp) chooses: round
// robin forward, reverse or random:<seed> with cp.async copies landing when waited for, or
// serial / serial-reverse (one warp runs ahead as far as it can) with copies landing when issued.
// A kernel whose result depends on the schedule has a race; the tests run kernels under several
// schedules and compare the outputs bit for bit.
//
// What it checks on top of running the code (each a launch error with a message, like a CUDA
// error, instead of a hang or silent garbage): warp collectives reached by only some lanes or by
// lanes at different collectives, deadlocked barriers, cp.async / ldmatrix addresses that are
// misaligned or outside the block's dynamic shared memory, writes past the end of dynamic shared
// memory (a canary), more than 48 KB of dynamic shared memory without the opt-in attribute,
// wgmma operands that a cp.async wrote with no fence.proxy.async by its thread since (the async
// proxy), and launch shapes over the hardware limits. Dynamic shared memory starts as NaN bytes.
//
// What it does not model: timing, memory coalescing, bank conflicts, register limits, the
// weak memory ordering between blocks (blocks run one at a time) and the exact rounding order
// inside an mma (it sums the 16 products in fp32 in k order).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace cuemu {

constexpr int kWarpSize = 32;
// Bytes one lane can publish in a warp collective (an mma publishes 6 words).
constexpr std::size_t kSlotBytes = 64;

// The running CUDA thread.
struct ThreadIndex {
  uint3 idx;
  int lane;
};
const ThreadIndex& self();
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

// __syncthreads(): waits until every thread of the block that has not exited arrives.
void sync_block();

// A warp collective: publishes `bytes` of this lane's data and returns the 32 lanes' data (lane
// i at offset i * kSlotBytes) once every lane of the warp has arrived at the same collective
// `what`. The data stays valid until this lane's next collective.
const unsigned char* warp_collective(const char* what, const void* data, std::size_t bytes);

template <typename T>
T lane_value(const unsigned char* all, int lane) {
  T value;
  std::memcpy(&value, all + lane * kSlotBytes, sizeof(T));
  return value;
}

// Ends the launch with a CUDA error carrying `message` (cudaGetLastError returns it).
[[noreturn]] void fail(const char* message);
[[noreturn]] void fail(const std::string& message);

// A static __shared__ variable: filled with 0xFF bytes (NaN in every float type, -1 in integers)
// when first reached and again before every block, so a read before the block wrote it shows.
struct SharedRegion {
  SharedRegion(void* address, std::size_t bytes);
};

// Dynamic shared memory of the running block (extern __shared__ arrays point here).
void* dynamic_shared();
// Shared-window addresses (what __cvta_generic_to_shared gives, what wgmma descriptors hold): the
// dynamic shared memory starts at kSharedWindowBase, on purpose not a multiple of 1024, so a kernel
// that needs 1024-byte-aligned swizzle atoms must align them itself, as on a GPU.
constexpr std::uint32_t kSharedWindowBase = 0x480;
std::uint32_t shared_window_address(const void* ptr);
// The bytes at a shared-window address; fails unless [address, address + bytes) is dynamic shared memory.
const unsigned char* shared_window_pointer(std::uint32_t address, std::size_t bytes, const char* what);
// Fails unless [ptr, ptr + bytes) lies in the block's dynamic shared memory and ptr is aligned.
void check_shared(const void* ptr, std::size_t bytes, std::size_t align, const char* what);

// The async proxy: fence.proxy.async of the current thread, and the bytes at a shared-window
// address read through the async proxy (wgmma operands), which fails when a cp.async wrote them and
// its thread has not fenced since: on a GPU wgmma may then read stale bytes.
void fence_proxy_async();
const unsigned char* async_proxy_pointer(std::uint32_t address, std::size_t bytes, const char* what);

// cp.async: queued per thread, copied when a wait_group retires the group.
void cp_async(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);

// The number of launches started so far: per-thread state kept outside the runtime (wgmma.cuh's
// products in flight) belongs to the launch that made it, including one that failed midway.
std::uint64_t launch_serial();

// Runs `body` once per thread of every block of `grid`.
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem, const std::function<void()>& body);

template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  std::size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // Kernel parameters are copied, like the arguments of a real launch.
    const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const auto fn = kernel;
    launch(reinterpret_cast<const void*>(fn), grid, block, smem, [&params, fn] { std::apply(fn, params); });
  }
};

// What `kernel<<<grid, block, smem, stream>>>(args)` becomes (tools/cuda_emulator/build.py).
template <typename... Params>
Launch<Params...> configure(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t smem = 0,
                            cudaStream_t = nullptr) {
  return Launch<Params...>{kernel, grid, block, smem};
}

}  // namespace cuemu

// ---- CUDA built-in variables and device functions ----------------------------------------------

#define threadIdx (::cuemu::self().idx)
#define blockIdx (::cuemu::block_idx)
#define blockDim (::cuemu::block_dim)
#define gridDim (::cuemu::grid_dim)

inline void __syncthreads() { ::cuemu::sync_block(); }
// Blocks run one at a time, so every global write is visible to later blocks without a fence.
inline void __threadfence() {}

namespace cuemu {
inline void require_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + ": the emulator supports only the full-warp mask");
}
}  // namespace cuemu

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuemu::require_full_mask(mask, "__syncwarp");
  ::cuemu::warp_collective("__syncwarp", nullptr, 0);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= ::cuemu::kSlotBytes, "shuffled type too large");
  ::cuemu::require_full_mask(mask, "__shfl_xor_sync");
  const auto* all = ::cuemu::warp_collective("__shfl_xor_sync", &var, sizeof(T));
  const int lane = ::cuemu::self().lane;
  const int src = lane ^ lane_mask;
  // A source outside this lane's width-segment returns the lane's own value.
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) return var;
  return ::cuemu::lane_value<T>(all, src);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  ::cuemu::require_full_mask(mask, "__shfl_sync");
  const auto* all = ::cuemu::warp_collective("__shfl_sync", &var, sizeof(T));
  const int lane = ::cuemu::self().lane;
  return ::cuemu::lane_value<T>(all, (lane & ~(width - 1)) + (src_lane & (width - 1)));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  ::cuemu::require_full_mask(mask, "__shfl_down_sync");
  const auto* all = ::cuemu::warp_collective("__shfl_down_sync", &var, sizeof(T));
  const int lane = ::cuemu::self().lane;
  const int src = lane + static_cast<int>(delta);
  if ((src & ~(width - 1)) != (lane & ~(width - 1))) return var;
  return ::cuemu::lane_value<T>(all, src);
}

namespace cuemu {
// A warp-wide collective `what` over every lane's `value`: f(lane, its value) for each lane.
template <typename T, typename F>
void each_lane(const char* what, unsigned mask, T value, F f) {
  require_full_mask(mask, what);
  const auto* all = warp_collective(what, &value, sizeof(T));
  for (int i = 0; i < kWarpSize; ++i) f(i, lane_value<T>(all, i));
}
}  // namespace cuemu

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned bits = 0;
  ::cuemu::each_lane("__ballot_sync", mask, static_cast<int>(predicate != 0),
                     [&](int i, int on) { bits |= static_cast<unsigned>(on) << i; });
  return bits;
}

// The lanes whose value equals this lane's.
template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(std::is_integral_v<T>, "__match_any_sync takes 32- or 64-bit integers");
  unsigned bits = 0;
  ::cuemu::each_lane("__match_any_sync", mask, value,
                     [&](int i, T other) { bits |= static_cast<unsigned>(other == value) << i; });
  return bits;
}

inline int __all_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) == 0xffffffffu; }
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0u; }

template <typename T>
T __reduce_add_sync(unsigned mask, T value) {
  static_assert(std::is_integral_v<T>, "__reduce_add_sync takes int or unsigned");
  T sum = 0;
  ::cuemu::each_lane("__reduce_add_sync", mask, value, [&](int, T other) { sum += other; });
  return sum;
}

// Atomics: fibers switch only at synchronisation points, so a read-modify-write is atomic.
namespace cuemu {
template <typename T, typename F>
T read_modify_write(T* address, F next) {
  const T old = *address;
  *address = static_cast<T>(next(old));
  return old;
}
}  // namespace cuemu

template <typename T, typename U>
T atomicAdd(T* address, U value) {
  return ::cuemu::read_modify_write(address, [&](T old) { return old + value; });
}
template <typename T, typename U>
T atomicOr(T* address, U value) {
  return ::cuemu::read_modify_write(address, [&](T old) { return old | value; });
}
template <typename T, typename U>
T atomicAnd(T* address, U value) {
  return ::cuemu::read_modify_write(address, [&](T old) { return old & value; });
}
template <typename T, typename U>
T atomicMax(T* address, U value) {
  return ::cuemu::read_modify_write(address, [&](T old) { return old < static_cast<T>(value) ? static_cast<T>(value) : old; });
}
template <typename T, typename U>
T atomicExch(T* address, U value) {
  return ::cuemu::read_modify_write(address, [&](T) { return value; });
}
template <typename T, typename U, typename V>
T atomicCAS(T* address, U compare, V value) {
  return ::cuemu::read_modify_write(address, [&](T old) { return old == static_cast<T>(compare) ? static_cast<T>(value) : old; });
}

template <typename T>
T __ldg(const T* ptr) {
  return *ptr;
}
template <typename T>
T __ldcg(const T* ptr) {
  return *ptr;
}

using std::isfinite;
using std::isinf;
using std::isnan;

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __fdividef(float a, float b) { return a / b; }
// IEEE round-to-nearest single operations that nvcc never fuses into an FMA. The emulator is
// built without FMA contraction, so plain operators already round each operation alone.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, sizeof i);
  return i;
}
inline unsigned __float_as_uint(float x) { return static_cast<unsigned>(__float_as_int(x)); }
inline float __uint_as_float(unsigned x) { return __int_as_float(static_cast<int>(x)); }

// Device min/max overloads (host C++ has only std::min/std::max).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }

// The runtime's C++ overload (cuda_runtime.h) that takes the kernel itself.
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attribute, value);
}
