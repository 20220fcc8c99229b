// Fiber contexts for the emulator's scheduler: start a function on its own stack, switch between
// stacks. On x86-64 a switch saves the callee-saved registers and the FP control words and swaps
// stack pointers (a few nanoseconds); elsewhere it falls back to ucontext, whose swapcontext also
// saves the signal mask with a system call on every switch (about 20x slower). The emulator
// switches twice per CUDA thread per warp collective, so this is most of its speed. Define
// CUEMU_UCONTEXT to use the portable path on x86-64 too.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && !defined(CUEMU_UCONTEXT)

extern "C" void cuemu_switch_stack(void** save_sp, void* load_sp);

namespace cuemu {

struct Context {
  void* sp = nullptr;
};

// Prepares `ctx` to run `entry` (which must never return) on [stack, stack + bytes).
inline void make_context(Context& ctx, void* stack, std::size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<std::uintptr_t>(stack) + bytes) & ~std::uintptr_t{15};
  auto* words = reinterpret_cast<std::uint64_t*>(top);
  words[-1] = 0;                                        // entry's (unused) return address
  words[-2] = reinterpret_cast<std::uint64_t>(entry);   // popped by the switch's ret
  for (int i = 3; i <= 8; ++i) words[-i] = 0;           // rbp, rbx, r12-r15
  std::uint32_t mxcsr;
  std::uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::uint64_t control = mxcsr | (static_cast<std::uint64_t>(fpucw) << 32);
  words[-9] = control;
  ctx.sp = &words[-9];
}

inline void switch_context(Context& from, Context& to) { cuemu_switch_stack(&from.sp, to.sp); }

}  // namespace cuemu

#else

#include <ucontext.h>

namespace cuemu {

struct Context {
  ucontext_t uc;
};

inline void make_context(Context& ctx, void* stack, std::size_t bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack;
  ctx.uc.uc_stack.ss_size = bytes;
  ctx.uc.uc_link = nullptr;  // entry never returns
  makecontext(&ctx.uc, entry, 0);
}

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace cuemu

#endif
