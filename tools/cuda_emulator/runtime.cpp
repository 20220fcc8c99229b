// Scheduler of the CPU emulator (see runtime.h) and the CUDA runtime API calls the kernels' host
// code makes, implemented for host memory.
#include "runtime.h"

#include "context.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__linux__) && !defined(CUEMU_UCONTEXT)
// cuemu_switch_stack(save_sp: rdi, load_sp: rsi): pushes what the SysV ABI says a callee must
// preserve (rbp, rbx, r12-r15, and the MXCSR / x87 control words), stores the stack pointer, loads
// the other one and pops the same frame from it (context.h builds the first frame of a fiber).
asm(R"(
    .text
    .globl cuemu_switch_stack
    .type cuemu_switch_stack, @function
cuemu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuemu_switch_stack, .-cuemu_switch_stack
)");
#endif

namespace cuemu {

uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {

enum class State { kRunnable, kAtBarrier, kAtWarpCollective, kDone };

struct Copy {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  Context context;
  State state = State::kRunnable;
  ThreadIndex index;
  int warp = 0;
  int collectives = 0;                   // warp collectives this thread has entered
  std::vector<Copy> open_group;          // cp.async since the last commit
  std::deque<std::vector<Copy>> groups;  // committed, not yet waited for
  std::vector<std::size_t> unfenced;     // 16-byte chunks its landed cp.async wrote since its last proxy fence
};

// Two rounds of slots per warp: a lane can be at most one collective ahead of the slowest lane
// (the next one waits for everybody), so round r and r + 1 never share a buffer.
struct WarpRounds {
  unsigned char data[2][kWarpSize][kSlotBytes];
  const char* what[2][kWarpSize];
  int round[2];
  int arrived[2];
};

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr std::size_t kGuardBytes = 4096;
constexpr std::size_t kCanaryBytes = 256;
constexpr unsigned char kCanary = 0xA5;
// Dynamic shared memory starts as 0xFF bytes: NaN in fp32, fp16 and bf16, so a value read
// before it is written shows up in the output.
constexpr unsigned char kSmemPoison = 0xFF;
constexpr std::size_t kDefaultMaxDynamicSmem = 48 * 1024;
// The opt-in dynamic shared memory limit of the emulated GPU: sm_90's 227 KB unless CUEMU_MAX_SMEM
// (bytes) says otherwise, e.g. 101376 (99 KB) to emulate sm_86/sm_89, 166912 (163 KB) for sm_80.
std::size_t hardware_max_dynamic_smem() {
  const char* env = std::getenv("CUEMU_MAX_SMEM");
  return env != nullptr && *env != '\0' ? static_cast<std::size_t>(std::strtoull(env, nullptr, 10)) : 227 * 1024;
}

std::vector<Fiber> fibers;
std::vector<WarpRounds> warps;
Fiber* current = nullptr;
Context scheduler;
const std::function<void()>* body = nullptr;
int live = 0;
int at_barrier = 0;
bool failed = false;
std::string failure;
cudaError_t last_error = cudaSuccess;
std::string last_message;
std::vector<unsigned char> smem;  // dynamic shared memory + canary
std::size_t smem_bytes = 0;
// The async proxy (what wgmma reads shared memory through): per 16-byte chunk of dynamic shared
// memory, 1 + the index of the fiber whose cp.async wrote it last, until that fiber runs
// fence.proxy.async; 0 when no such write is pending.
std::vector<int> proxy_pending;
std::uint64_t launches = 0;  // launches started so far
void* stacks = nullptr;
std::size_t stacks_count = 0;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
std::vector<std::pair<void*, std::size_t>> static_shared;  // every SharedRegion reached so far

std::string describe_thread(const Fiber& f) {
  return "thread (" + std::to_string(f.index.idx.x) + "," + std::to_string(f.index.idx.y) + "," +
         std::to_string(f.index.idx.z) + ") of block (" + std::to_string(block_idx.x) + "," +
         std::to_string(block_idx.y) + "," + std::to_string(block_idx.z) + ")";
}

void release_barrier_if_complete() {
  if (live == 0 || at_barrier < live) return;
  for (Fiber& f : fibers) {
    if (f.state == State::kAtBarrier) f.state = State::kRunnable;
  }
  at_barrier = 0;
}

// Lands the copies of the current fiber (they were issued by it).
void run_copies(const std::vector<Copy>& copies) {
  const int writer = static_cast<int>(current - fibers.data()) + 1;
  for (const Copy& c : copies) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
    const auto chunk = static_cast<std::size_t>(static_cast<unsigned char*>(c.dst) - smem.data()) / 16;
    proxy_pending[chunk] = writer;
    current->unfenced.push_back(chunk);
  }
}

void fiber_main() {
  Fiber* f = current;
  (*body)();
  // Copies still in flight complete when the thread exits.
  for (const auto& group : f->groups) run_copies(group);
  run_copies(f->open_group);
  f->groups.clear();
  f->open_group.clear();
  f->state = State::kDone;
  --live;
  // Lanes of this warp waiting at a collective can no longer complete it.
  const int first = f->warp * kWarpSize;
  for (int i = first; i < first + kWarpSize && i < static_cast<int>(fibers.size()); ++i) {
    if (fibers[i].state == State::kAtWarpCollective) {
      failed = true;
      failure = "warp collective never completes: " + describe_thread(*f) + " exited while " +
                describe_thread(fibers[i]) + " waits at one";
      return;
    }
  }
  release_barrier_if_complete();
}

[[noreturn]] void fiber_entry() {
  fiber_main();
  switch_context(current->context, scheduler);
  std::abort();  // a finished fiber is never resumed
}

void ensure_stacks(std::size_t count) {
  if (count <= stacks_count) return;
  if (stacks != nullptr) munmap(stacks, stacks_count * (kStackBytes + kGuardBytes));
  const std::size_t bytes = count * (kStackBytes + kGuardBytes);
  stacks = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) {
    std::fprintf(stderr, "cuemu: cannot map %zu bytes of fiber stacks\n", bytes);
    std::abort();
  }
  // A guard page below each stack turns a stack overflow into a fault instead of corruption.
  for (std::size_t i = 0; i < count; ++i) {
    mprotect(static_cast<char*>(stacks) + i * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  stacks_count = count;
}

// The order in which runnable threads (and blocks) are visited, from CUEMU_SCHEDULE:
// * forward (default), reverse, random:<seed>: round robin. Every runnable thread runs up to its
//   next synchronisation point in each pass, so warps stay within about one collective of each
//   other. cp.async copies land late, when their group is waited for: reading a stage before
//   waiting for it reads stale data (a read-after-write race shows).
// * serial, serial-reverse: the lowest (highest) numbered runnable thread always runs next, so
//   one warp runs as far as it can before the others move: a warp that reaches the next
//   iteration without a barrier overwrites what the others still read. cp.async copies land
//   early, when issued (a write-after-read race shows).
struct Schedule {
  enum class Kind { kForward, kReverse, kRandom, kSerial, kSerialReverse } kind = Kind::kForward;
  std::mt19937 rng;

  static Schedule from_env() {
    Schedule s;
    const char* env = std::getenv("CUEMU_SCHEDULE");
    const std::string value = env == nullptr ? "forward" : env;
    if (value == "reverse") {
      s.kind = Kind::kReverse;
    } else if (value == "serial") {
      s.kind = Kind::kSerial;
    } else if (value == "serial-reverse") {
      s.kind = Kind::kSerialReverse;
    } else if (value.rfind("random", 0) == 0) {
      s.kind = Kind::kRandom;
      const auto colon = value.find(':');
      s.rng.seed(colon == std::string::npos ? 0u : static_cast<unsigned>(std::stoul(value.substr(colon + 1))));
    }
    return s;
  }

  bool serial() const { return kind == Kind::kSerial || kind == Kind::kSerialReverse; }

  void order(std::vector<std::size_t>& items) {
    std::iota(items.begin(), items.end(), std::size_t{0});
    if (kind == Kind::kReverse || kind == Kind::kSerialReverse) std::reverse(items.begin(), items.end());
    if (kind == Kind::kRandom) std::shuffle(items.begin(), items.end(), rng);
  }
};

bool eager_copies = false;  // cp.async lands when issued (serial schedules) or when waited for

std::string deadlock_report() {
  std::string text = "deadlock in block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                     std::to_string(block_idx.z) + "): ";
  int barrier = 0, collective = 0, done = 0;
  for (const Fiber& f : fibers) {
    barrier += f.state == State::kAtBarrier;
    collective += f.state == State::kAtWarpCollective;
    done += f.state == State::kDone;
  }
  text += std::to_string(barrier) + " threads at __syncthreads, " + std::to_string(collective) +
          " at a warp collective, " + std::to_string(done) + " exited";
  for (const Fiber& f : fibers) {
    if (f.state == State::kAtWarpCollective) {
      const WarpRounds& w = warps[f.warp];
      const int b = (f.collectives - 1) & 1;
      text += std::string("; e.g. ") + describe_thread(f) + " waits at " + w.what[b][f.index.lane] + " with " +
              std::to_string(w.arrived[b]) + " of 32 lanes";
      break;
    }
  }
  return text;
}

// Runs one block; false (with `failure` set) when it failed.
bool run_block(Schedule& schedule) {
  const std::size_t n = fibers.size();
  for (std::size_t i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    f.state = State::kRunnable;
    f.collectives = 0;
    f.open_group.clear();
    f.groups.clear();
    f.unfenced.clear();
    make_context(f.context, static_cast<char*>(stacks) + i * (kStackBytes + kGuardBytes) + kGuardBytes, kStackBytes,
                 fiber_entry);
  }
  for (WarpRounds& w : warps) {
    w.round[0] = w.round[1] = -1;
    w.arrived[0] = w.arrived[1] = kWarpSize;
  }
  std::memset(smem.data(), kSmemPoison, smem_bytes);
  std::memset(smem.data() + smem_bytes, kCanary, kCanaryBytes);
  std::fill(proxy_pending.begin(), proxy_pending.end(), 0);
  for (const auto& [address, bytes] : static_shared) std::memset(address, kSmemPoison, bytes);
  live = static_cast<int>(n);
  at_barrier = 0;

  std::vector<std::size_t> order(n);
  while (live > 0) {
    bool ran = false;
    schedule.order(order);
    for (std::size_t i : order) {
      Fiber& f = fibers[i];
      if (f.state != State::kRunnable) continue;
      current = &f;
      switch_context(scheduler, f.context);
      current = nullptr;
      ran = true;
      if (failed) return false;
      if (schedule.serial()) break;  // start again from the first thread in the order
    }
    if (!ran) {
      failed = true;
      failure = deadlock_report();
      return false;
    }
  }
  for (std::size_t i = 0; i < kCanaryBytes; ++i) {
    if (smem[smem_bytes + i] != kCanary) {
      failed = true;
      failure = "a thread of block (" + std::to_string(block_idx.x) + "," + std::to_string(block_idx.y) + "," +
                std::to_string(block_idx.z) + ") wrote past the end of its " + std::to_string(smem_bytes) +
                " bytes of dynamic shared memory";
      return false;
    }
  }
  return true;
}

cudaError_t launch_error(const std::string& message) {
  last_error = cudaErrorLaunchFailure;
  last_message = message;
  return last_error;
}

}  // namespace

const ThreadIndex& self() { return current->index; }

SharedRegion::SharedRegion(void* address, std::size_t bytes) {
  // Reached by the first thread to pass the declaration, before any thread has used the variable.
  std::memset(address, kSmemPoison, bytes);
  static_shared.emplace_back(address, bytes);
}

void fail(const std::string& message) {
  if (current == nullptr) {
    std::fprintf(stderr, "cuemu: %s (outside a kernel)\n", message.c_str());
    std::abort();
  }
  failed = true;
  failure = message + " (" + describe_thread(*current) + ")";
  switch_context(current->context, scheduler);  // never resumed
  std::abort();
}

void fail(const char* message) { fail(std::string(message)); }

void sync_block() {
  Fiber* f = current;
  f->state = State::kAtBarrier;
  ++at_barrier;
  release_barrier_if_complete();
  if (f->state != State::kRunnable) switch_context(f->context, scheduler);
}

const unsigned char* warp_collective(const char* what, const void* data, std::size_t bytes) {
  Fiber* f = current;
  if (bytes > kSlotBytes) fail(std::string(what) + ": more data than a collective slot holds");
  const int lane = f->index.lane;
  const int first = f->warp * kWarpSize;
  if (first + kWarpSize > static_cast<int>(fibers.size())) {
    fail(std::string(what) + " in a partial warp (block size not a multiple of 32)");
  }
  for (int i = first; i < first + kWarpSize; ++i) {
    if (fibers[i].state == State::kDone) {
      fail(std::string(what) + " with full mask after lane " + std::to_string(i - first) + " of the warp exited");
    }
  }
  WarpRounds& w = warps[f->warp];
  const int round = f->collectives++;
  const int b = round & 1;
  if (w.round[b] != round) {
    if (w.arrived[b] != kWarpSize) fail(std::string(what) + ": lanes of the warp are out of step");
    w.round[b] = round;
    w.arrived[b] = 0;
  }
  if (bytes > 0) std::memcpy(w.data[b][lane], data, bytes);
  w.what[b][lane] = what;
  if (++w.arrived[b] == kWarpSize) {
    for (int i = 0; i < kWarpSize; ++i) {
      if (std::strcmp(w.what[b][i], what) != 0) {
        fail(std::string("divergent warp: lane ") + std::to_string(i) + " is at " + w.what[b][i] + " while lane " +
             std::to_string(lane) + " is at " + what);
      }
    }
    for (int i = first; i < first + kWarpSize; ++i) {
      if (fibers[i].state == State::kAtWarpCollective) fibers[i].state = State::kRunnable;
    }
  } else {
    f->state = State::kAtWarpCollective;
    switch_context(f->context, scheduler);
  }
  return &w.data[b][0][0];
}

void* dynamic_shared() { return smem.data(); }

std::uint32_t shared_window_address(const void* ptr) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (p < smem.data() || p > smem.data() + smem_bytes) fail("shared address of a pointer outside dynamic shared memory");
  return kSharedWindowBase + static_cast<std::uint32_t>(p - smem.data());
}

std::uint64_t launch_serial() { return launches; }

void fence_proxy_async() {
  const int me = static_cast<int>(current - fibers.data()) + 1;
  for (std::size_t chunk : current->unfenced) {
    if (proxy_pending[chunk] == me) proxy_pending[chunk] = 0;
  }
  current->unfenced.clear();
}

const unsigned char* async_proxy_pointer(std::uint32_t address, std::size_t bytes, const char* what) {
  const unsigned char* p = shared_window_pointer(address, bytes, what);
  const std::size_t first = (address - kSharedWindowBase) / 16, last = (address - kSharedWindowBase + bytes - 1) / 16;
  for (std::size_t chunk = first; chunk <= last; ++chunk) {
    if (proxy_pending[chunk] != 0) {
      fail(std::string(what) + ": reads shared memory (offset " + std::to_string(chunk * 16) + ") that a cp.async of " +
           describe_thread(fibers[proxy_pending[chunk] - 1]) +
           " wrote, with no fence.proxy.async by that thread since (the async proxy may see stale bytes)");
    }
  }
  return p;
}

const unsigned char* shared_window_pointer(std::uint32_t address, std::size_t bytes, const char* what) {
  if (address < kSharedWindowBase || address - kSharedWindowBase + bytes > smem_bytes) {
    fail(std::string(what) + ": shared address " + std::to_string(address) + " (+" + std::to_string(bytes) +
         " bytes) is outside the block's " + std::to_string(smem_bytes) + " bytes of dynamic shared memory");
  }
  return smem.data() + (address - kSharedWindowBase);
}

void check_shared(const void* ptr, std::size_t bytes, std::size_t align, const char* what) {
  const auto* p = static_cast<const unsigned char*>(ptr);
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
    fail(std::string(what) + ": shared address not " + std::to_string(align) + "-byte aligned");
  }
  const unsigned char* base = smem.data();
  if (p < base || p + bytes > base + smem_bytes) {
    fail(std::string(what) + ": address outside the block's " + std::to_string(smem_bytes) +
         " bytes of dynamic shared memory (offset " + std::to_string(p - base) + ")");
  }
}

void cp_async(void* dst, const void* src, bool valid) {
  check_shared(dst, 16, 16, "cp.async");
  if (valid && reinterpret_cast<std::uintptr_t>(src) % 16 != 0) fail("cp.async: global address not 16-byte aligned");
  if (eager_copies) {
    run_copies({{dst, src, valid}});
  } else {
    current->open_group.push_back({dst, src, valid});
  }
}

void cp_async_commit() {
  Fiber* f = current;
  f->groups.push_back(std::move(f->open_group));
  f->open_group.clear();
}

void cp_async_wait(int pending) {
  Fiber* f = current;
  while (static_cast<int>(f->groups.size()) > pending) {
    run_copies(f->groups.front());
    f->groups.pop_front();
  }
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_smem,
                   const std::function<void()>& fn) {
  // One launch at a time: the scheduler's state is global (a server worker and a test thread may
  // both launch).
  static std::mutex one_launch;
  const std::lock_guard<std::mutex> hold(one_launch);
  ++launches;
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    return launch_error("block shape (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                        std::to_string(block.z) + ") is outside the hardware limits");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    return launch_error("grid (" + std::to_string(grid.x) + "," + std::to_string(grid.y) + "," +
                        std::to_string(grid.z) + ") is outside the hardware limits");
  }
  const auto attr = max_dynamic_smem.find(kernel);
  const std::size_t allowed = attr == max_dynamic_smem.end() ? kDefaultMaxDynamicSmem : attr->second;
  if (dynamic_smem > allowed) {
    return launch_error(std::to_string(dynamic_smem) + " bytes of dynamic shared memory, above the " +
                        std::to_string(allowed) + " the kernel is allowed (cudaFuncSetAttribute)");
  }
  fibers.assign(threads, Fiber{});
  warps.assign((threads + kWarpSize - 1) / kWarpSize, WarpRounds{});
  for (unsigned i = 0; i < threads; ++i) {
    fibers[i].index.idx = make_uint3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
    fibers[i].index.lane = static_cast<int>(i % kWarpSize);
    fibers[i].warp = static_cast<int>(i / kWarpSize);
  }
  ensure_stacks(threads);
  smem_bytes = dynamic_smem;
  smem.assign(dynamic_smem + kCanaryBytes, 0);
  proxy_pending.assign(dynamic_smem / 16 + 1, 0);
  block_dim = block;
  grid_dim = grid;
  body = &fn;
  failed = false;

  Schedule schedule = Schedule::from_env();
  eager_copies = schedule.serial();
  std::vector<std::size_t> blocks(1ull * grid.x * grid.y * grid.z);
  schedule.order(blocks);
  for (std::size_t linear : blocks) {
    block_idx = make_uint3(static_cast<unsigned>(linear % grid.x), static_cast<unsigned>(linear / grid.x % grid.y),
                           static_cast<unsigned>(linear / (1ull * grid.x * grid.y)));
    if (!run_block(schedule)) {
      body = nullptr;
      return launch_error("kernel failed in the CUDA emulator: " + failure);
    }
  }
  body = nullptr;
  return cudaSuccess;
}

}  // namespace cuemu

// ---- CUDA runtime API (the subset the host code of csrc/ calls) -------------------------------

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device != 0) return cuemu::launch_error("the emulator has one device, 0");
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = static_cast<int>(cuemu::hardware_max_dynamic_smem());
      return cudaSuccess;
    case cudaDevAttrMultiProcessorCount:
      *value = 132;  // an H100 SXM, as tests/conftest.py's EMULATED_SMS
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor:  // the sm90 kernels run here too (tools/cuda_emulator/wgmma.cuh)
      *value = 9;
      return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor:
      *value = 0;
      return cudaSuccess;
    default:
      return cuemu::launch_error("cudaDeviceGetAttribute: attribute " + std::to_string(static_cast<int>(attr)) +
                                 " is not emulated");
  }
}

cudaError_t cudaSetDevice(int device) {
  return device == 0 ? cudaSuccess : cuemu::launch_error("the emulator has one device, 0");
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuemu::last_error;
  cuemu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return cuemu::last_error; }

const char* cudaGetErrorName(cudaError_t error) {
  return error == cudaSuccess ? "cudaSuccess" : "cudaErrorLaunchFailure";
}

const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : cuemu::last_message.c_str();
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || static_cast<std::size_t>(value) > cuemu::hardware_max_dynamic_smem()) {
      return cuemu::launch_error("cudaFuncSetAttribute: " + std::to_string(value) +
                                 " bytes of dynamic shared memory exceed the hardware's " +
                                 std::to_string(cuemu::hardware_max_dynamic_smem()));
    }
    cuemu::max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

}  // extern "C"
