// cuda_emu runtime: runs a kernel launch on the host thread, every block's CUDA threads as
// fibers scheduled between synchronisation points. What is and is not modelled: cuda_emu.h.
//
// Fibers: on x86-64 a minimal context switch (callee-saved registers, stack pointer, SSE/x87
// control words; no signal-mask system call, unlike swapcontext); elsewhere ucontext. Stacks
// (64 KiB, 512 KiB under AddressSanitizer) are allocated once per CUDA thread index and reused by
// every block and launch. Under AddressSanitizer the switches are announced
// (__sanitizer_start/finish_switch_fiber) and a reused stack is unpoisoned.
//
// Scheduling of a block: rounds over the runnable threads in the configured order (forward,
// reverse, or a seeded random permutation drawn anew every round). A thread runs until it
// reaches a shuffle or __syncthreads (it then waits, unless it completes the collective) or
// returns. A round in which nothing could run while threads are still waiting is a deadlock,
// reported with what each warp waits for. Any error ends the launch with an exception (the
// remaining fibers are abandoned: kernel code holds no resources that need unwinding).
#include "cuda_emu/cuda_emu.h"

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <mutex>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FL_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FL_EMU_ASAN 1
#endif
#endif

#ifdef FL_EMU_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__) || defined(FL_EMU_UCONTEXT)
#define FL_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

namespace fl_emu {

__thread ThreadInfo* tls_thread = nullptr;

namespace {

#ifndef FL_EMU_USE_UCONTEXT
// switch_context(&save, next): saves the callee-saved registers and the MXCSR / x87 control
// words on the current stack, stores the stack pointer in *save, continues at `next`.
extern "C" void fl_emu_switch_context(void** save, void* next);
asm(R"(
  .text
  .globl fl_emu_switch_context
  .hidden fl_emu_switch_context
  .type fl_emu_switch_context,@function
fl_emu_switch_context:
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
  .size fl_emu_switch_context, .-fl_emu_switch_context
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

#ifdef FL_EMU_ASAN
constexpr size_t kStackBytes = 512 * 1024;
#else
constexpr size_t kStackBytes = 64 * 1024;
#endif
constexpr int kMaxThreads = 1024;
constexpr size_t kMaxStaticShared = 48 * 1024;  // CUDA's limit for static __shared__ per block

enum class State : uint8_t { Ready, Shuffle, Barrier, Done };

struct Fiber {
  ThreadInfo info{};
  int linear = 0;  // thread index in the block (x fastest)
  State state = State::Ready;
  char* stack = nullptr;
#ifdef FL_EMU_USE_UCONTEXT
  ucontext_t context;
#else
  void* sp = nullptr;
#endif
#ifdef FL_EMU_ASAN
  void* fake_stack = nullptr;
#endif
  // Pending collective
  Site site{nullptr, 0};
  ShuffleKind kind = ShuffleKind::Index;
  unsigned mask = 0;
  int size = 0, arg = 0, width = 32;
  uint64_t value = 0, result = 0;
};

struct SharedEntry {
  const void* key;
  void* data;
  size_t bytes;
};

struct Config {
  std::string threads = "forward";  // forward | reverse | random
  std::string blocks = "forward";   // forward | reverse
  int sms = 132;
  int blocks_per_sm = 2;
  uint64_t seed = 0;
  bool raise_asserts = true;
};

struct Runtime {
  std::mutex mutex;  // one launch at a time
  Config config;
  bool env_applied = false;
  std::string config_text;
  std::vector<Fiber> fibers;
  int num_threads = 0;
  int done = 0;
  int barrier_waiting = 0;
  std::vector<SharedEntry> shared;
  size_t shared_bytes = 0;
  const char* kernel_name = "";
  uint3 block{};
  std::string error;  // first error of this launch
  std::vector<std::string> asserts;
  size_t asserts_this_launch = 0;
  std::string asserts_text;
  std::mt19937_64 rng;
  int64_t stats[3] = {0, 0, 0};
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
#ifdef FL_EMU_USE_UCONTEXT
  ucontext_t host_context;
#else
  void* host_sp = nullptr;
#endif
#ifdef FL_EMU_ASAN
  void* host_fake_stack = nullptr;
  const void* host_stack_bottom = nullptr;
  size_t host_stack_size = 0;
#endif
  Fiber* running = nullptr;
};

Runtime& rt() {
  static Runtime* instance = new Runtime();  // never destroyed: fibers may outlive static dtors
  return *instance;
}

std::string where(Site s) { return std::string(s.file ? s.file : "?") + ":" + std::to_string(s.line); }

std::string describe(const Fiber& f) {
  std::ostringstream out;
  out << "thread (" << f.info.thread_idx.x << "," << f.info.thread_idx.y << "," << f.info.thread_idx.z << ")";
  return out.str();
}

void fail(const std::string& message) {
  Runtime& r = rt();
  if (r.error.empty()) {
    std::ostringstream out;
    out << "cuda_emu: kernel " << r.kernel_name << ", block (" << r.block.x << "," << r.block.y << ","
        << r.block.z << "): " << message;
    r.error = out.str();
  }
}

// ---- context switching ------------------------------------------------------------------------
void switch_to_host(Fiber* f);

[[noreturn]] void fiber_main() {
  Runtime& r = rt();
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &r.host_stack_bottom, &r.host_stack_size);
#endif
  Fiber* f = r.running;
  r.body(r.closure);
  f->state = State::Done;
  ++r.done;
  if (r.barrier_waiting > 0) {
    fail(describe(*f) + " exited while " + std::to_string(r.barrier_waiting) +
         " threads wait at __syncthreads (early exit before a barrier)");
  }
  // Lanes of this warp waiting for a shuffle that names this lane can never complete.
  const int warp_first = (f->linear / 32) * 32;
  for (int i = warp_first; i < std::min(warp_first + 32, r.num_threads); ++i) {
    const Fiber& o = r.fibers[i];
    if (o.state == State::Shuffle && (o.mask >> (f->linear - warp_first) & 1u)) {
      fail(describe(*f) + " exited while lane " + std::to_string(i - warp_first) + " waits for it at the shuffle at " +
           where(o.site) + " (mask 0x" + [&] {
             char b[16];
             snprintf(b, sizeof b, "%08x", o.mask);
             return std::string(b);
           }() + ")");
      break;
    }
  }
#ifdef FL_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, r.host_stack_bottom, r.host_stack_size);
#endif
#ifdef FL_EMU_USE_UCONTEXT
  setcontext(&r.host_context);
#else
  void* dead;
  fl_emu_switch_context(&dead, r.host_sp);
#endif
  abort();  // never resumed
}

#ifdef FL_EMU_USE_UCONTEXT
void ucontext_entry() { fiber_main(); }
#endif

void start_fiber(Fiber& f) {
  if (f.stack == nullptr) {
    f.stack = static_cast<char*>(malloc(kStackBytes));
    if (f.stack == nullptr) throw std::bad_alloc();
  }
#ifdef FL_EMU_ASAN
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
#ifdef FL_EMU_USE_UCONTEXT
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = nullptr;
  makecontext(&f.context, &ucontext_entry, 0);
#else
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + kStackBytes) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;                                             // fake return address of fiber_main
  *--sp = reinterpret_cast<uint64_t>(&fiber_main);       // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = 0;                 // rbp rbx r12 r13 r14 r15
  *--sp = 0x1F80ull | (0x037Full << 32);                 // MXCSR default, x87 control word default
  f.sp = sp;
#endif
}

// Runs `f` until it waits or returns.
void run_fiber(Fiber& f) {
  Runtime& r = rt();
  r.running = &f;
  tls_thread = &f.info;
#ifdef FL_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.host_fake_stack, f.stack, kStackBytes);
#endif
#ifdef FL_EMU_USE_UCONTEXT
  swapcontext(&r.host_context, &f.context);
#else
  fl_emu_switch_context(&r.host_sp, f.sp);
#endif
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.host_fake_stack, nullptr, nullptr);
#endif
  tls_thread = nullptr;
  r.running = nullptr;
}

// Called on a fiber: back to the scheduler until the fiber is made Ready again.
void switch_to_host(Fiber* f) {
  Runtime& r = rt();
#ifdef FL_EMU_ASAN
  __sanitizer_start_switch_fiber(&f->fake_stack, r.host_stack_bottom, r.host_stack_size);
#endif
#ifdef FL_EMU_USE_UCONTEXT
  swapcontext(&f->context, &r.host_context);
#else
  fl_emu_switch_context(&f->sp, r.host_sp);
#endif
#ifdef FL_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->fake_stack, &r.host_stack_bottom, &r.host_stack_size);
#endif
  r.running = f;
  tls_thread = &f->info;
}

Fiber* current_fiber(const char* what) {
  Runtime& r = rt();
  if (r.running == nullptr) outside_kernel(what);
  return r.running;
}

std::string hex(unsigned v) {
  char b[16];
  snprintf(b, sizeof b, "0x%08x", v);
  return b;
}

const char* kind_name(ShuffleKind k) {
  switch (k) {
    case ShuffleKind::Index: return "__shfl_sync";
    case ShuffleKind::Up: return "__shfl_up_sync";
    case ShuffleKind::Down: return "__shfl_down_sync";
    case ShuffleKind::Xor: return "__shfl_xor_sync";
  }
  return "?";
}

// Completes the collective of the lanes of `mask` in the warp starting at `first` if every one
// of them has arrived; returns whether it did. Mismatches are errors.
bool try_complete_shuffle(int first, unsigned mask, const Fiber& arriving) {
  Runtime& r = rt();
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const int i = first + l;
    if (i >= r.num_threads) {
      fail(describe(arriving) + ": " + kind_name(arriving.kind) + " at " + where(arriving.site) + " names lane " +
           std::to_string(l) + ", which does not exist in this block (mask " + hex(mask) + ")");
      return false;
    }
    const Fiber& o = r.fibers[i];
    if (o.state == State::Done) {
      fail(describe(arriving) + ": " + kind_name(arriving.kind) + " at " + where(arriving.site) + " names lane " +
           std::to_string(l) + ", which has exited (mask " + hex(mask) + ")");
      return false;
    }
    if (o.state != State::Shuffle) return false;  // not there yet
  }
  // Everyone named is at a shuffle: it must be the same one.
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    const Fiber& o = r.fibers[first + l];
    if (o.kind != arriving.kind || o.mask != arriving.mask || o.width != arriving.width ||
        o.size != arriving.size || o.site.line != arriving.site.line || strcmp(o.site.file, arriving.site.file) != 0) {
      fail("warp " + std::to_string(first / 32) + ": lanes disagree on the shuffle (divergent shuffle): lane " +
           std::to_string(arriving.linear - first) + " is at " + kind_name(arriving.kind) + " " +
           where(arriving.site) + " mask " + hex(arriving.mask) + " width " + std::to_string(arriving.width) +
           ", lane " + std::to_string(l) + " at " + kind_name(o.kind) + " " + where(o.site) + " mask " + hex(o.mask) +
           " width " + std::to_string(o.width));
      return false;
    }
  }
  const int width = arriving.width;
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail(std::string(kind_name(arriving.kind)) + " at " + where(arriving.site) + ": width " + std::to_string(width) +
         " is not a power of two <= 32");
    return false;
  }
  for (int l = 0; l < 32; ++l) {
    if (!(mask >> l & 1u)) continue;
    Fiber& o = r.fibers[first + l];
    const int seg_first = l & ~(width - 1);
    const int seg_last = seg_first + width - 1;
    int src = l;
    switch (o.kind) {
      case ShuffleKind::Index: src = seg_first + (o.arg & (width - 1)); break;
      case ShuffleKind::Up: src = l - o.arg; if (src < seg_first) src = l; break;
      case ShuffleKind::Down: src = l + o.arg; if (src > seg_last) src = l; break;
      case ShuffleKind::Xor: src = l ^ o.arg; if (src > seg_last || src < 0 || src > 31) src = l; break;
    }
    if (!(mask >> src & 1u)) {
      fail("lane " + std::to_string(l) + " of warp " + std::to_string(first / 32) + ": " + kind_name(o.kind) + " at " +
           where(o.site) + " reads lane " + std::to_string(src) + ", which is not in the mask " + hex(mask) +
           " (undefined value)");
      return false;
    }
    o.result = r.fibers[first + src].value;
  }
  for (int l = 0; l < 32; ++l) {
    if (mask >> l & 1u) r.fibers[first + l].state = State::Ready;
  }
  return true;
}

void apply_spec(Config& c, const std::string& spec) {
  std::stringstream in(spec);
  std::string item;
  while (std::getline(in, item, ',')) {
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) throw std::invalid_argument("cuda_emu: bad configuration item '" + item + "'");
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    if (key == "threads") {
      if (value != "forward" && value != "reverse" && value != "random")
        throw std::invalid_argument("cuda_emu: threads must be forward, reverse or random, got " + value);
      c.threads = value;
    } else if (key == "blocks") {
      if (value != "forward" && value != "reverse")
        throw std::invalid_argument("cuda_emu: blocks must be forward or reverse, got " + value);
      c.blocks = value;
    } else if (key == "sms") {
      c.sms = std::stoi(value);
      if (c.sms < 1) throw std::invalid_argument("cuda_emu: sms must be >= 1");
    } else if (key == "blocks_per_sm") {
      c.blocks_per_sm = std::stoi(value);
      if (c.blocks_per_sm < 1) throw std::invalid_argument("cuda_emu: blocks_per_sm must be >= 1");
    } else if (key == "seed") {
      c.seed = std::stoull(value);
    } else if (key == "asserts") {
      if (value != "raise" && value != "record")
        throw std::invalid_argument("cuda_emu: asserts must be raise or record, got " + value);
      c.raise_asserts = value == "raise";
    } else {
      throw std::invalid_argument("cuda_emu: unknown configuration key '" + key + "'");
    }
  }
}

std::string spec_of(const Config& c) {
  return "threads=" + c.threads + ",blocks=" + c.blocks + ",sms=" + std::to_string(c.sms) +
         ",blocks_per_sm=" + std::to_string(c.blocks_per_sm) + ",seed=" + std::to_string(c.seed) +
         ",asserts=" + (c.raise_asserts ? "raise" : "record");
}

void apply_env_once(Runtime& r) {
  if (r.env_applied) return;
  r.env_applied = true;
  const char* env = getenv("FL_CUDA_EMU");
  if (env != nullptr) apply_spec(r.config, env);
  r.rng.seed(r.config.seed);
}

void release_shared(Runtime& r) {
  for (SharedEntry& e : r.shared) free(e.data);
  r.shared.clear();
  r.shared_bytes = 0;
}

std::string deadlock_report(Runtime& r) {
  std::ostringstream out;
  out << "deadlock: no thread can run;";
  int shown = 0;
  for (int i = 0; i < r.num_threads && shown < 8; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::Shuffle) {
      out << " lane " << i % 32 << " of warp " << i / 32 << " waits at " << kind_name(f.kind) << " " << where(f.site)
          << " (mask " << hex(f.mask) << ");";
      ++shown;
    } else if (f.state == State::Barrier) {
      out << " " << describe(f) << " waits at __syncthreads " << where(f.site) << ";";
      ++shown;
    }
  }
  out << " " << r.done << " of " << r.num_threads << " threads have exited";
  return out.str();
}

void run_block(Runtime& r, uint3 block, dim3 grid, dim3 bdim) {
  r.block = block;
  r.done = 0;
  r.barrier_waiting = 0;
  for (int i = 0; i < r.num_threads; ++i) {
    Fiber& f = r.fibers[i];
    f.linear = i;
    f.info.thread_idx = uint3{static_cast<unsigned>(i % bdim.x), static_cast<unsigned>(i / bdim.x % bdim.y),
                              static_cast<unsigned>(i / (bdim.x * bdim.y))};
    f.info.block_idx = block;
    f.info.block_dim = uint3{bdim.x, bdim.y, bdim.z};
    f.info.grid_dim = uint3{grid.x, grid.y, grid.z};
    f.state = State::Ready;
    start_fiber(f);
  }
  std::vector<int> order(r.num_threads);
  for (int i = 0; i < r.num_threads; ++i) order[i] = r.config.threads == "reverse" ? r.num_threads - 1 - i : i;
  while (r.done < r.num_threads && r.error.empty()) {
    if (r.config.threads == "random") std::shuffle(order.begin(), order.end(), r.rng);
    bool ran = false;
    for (int i : order) {
      Fiber& f = r.fibers[i];
      if (f.state != State::Ready) continue;
      run_fiber(f);
      ran = true;
      if (!r.error.empty()) break;
    }
    if (!ran && r.error.empty()) fail(deadlock_report(r));
  }
  release_shared(r);
  ++r.stats[1];
  r.stats[2] += r.num_threads;
}

}  // namespace

[[noreturn]] void outside_kernel(const char* what) {
  throw std::logic_error(std::string("cuda_emu: ") + what + " used outside a kernel");
}

uint64_t warp_shuffle(Site site, ShuffleKind kind, unsigned mask, uint64_t bits, int size, int arg, int width) {
  Fiber* f = current_fiber(kind_name(kind));
  const int lane = f->linear % 32;
  f->site = site;
  f->kind = kind;
  f->mask = mask;
  f->size = size;
  f->arg = arg;
  f->width = width;
  f->value = bits;
  f->state = State::Shuffle;
  if (!(mask >> lane & 1u)) {
    fail(describe(*f) + ": " + kind_name(kind) + " at " + where(site) + " by lane " + std::to_string(lane) +
         ", which is not in its own mask " + hex(mask));
  } else if (try_complete_shuffle(f->linear - lane, mask, *f)) {
    return f->result;  // the last lane to arrive continues at once
  }
  switch_to_host(f);
  return f->result;
}

void sync_threads(Site site) {
  Runtime& r = rt();
  Fiber* f = current_fiber("__syncthreads");
  f->site = site;
  f->state = State::Barrier;
  ++r.barrier_waiting;
  if (r.done > 0) {
    fail(describe(*f) + " reached __syncthreads at " + where(site) + " after " + std::to_string(r.done) +
         " threads of the block exited (early exit before a barrier)");
  }
  if (r.barrier_waiting == r.num_threads - r.done && r.error.empty()) {
    for (int i = 0; i < r.num_threads; ++i) {
      const Fiber& o = r.fibers[i];
      if (o.state == State::Barrier &&
          (o.site.line != site.line || strcmp(o.site.file, site.file) != 0)) {
        fail("__syncthreads at different call sites (divergent barrier): " + describe(*f) + " at " + where(site) +
             ", " + describe(o) + " at " + where(o.site));
        break;
      }
    }
    if (r.error.empty()) {
      for (int i = 0; i < r.num_threads; ++i) {
        if (r.fibers[i].state == State::Barrier) r.fibers[i].state = State::Ready;
      }
      r.barrier_waiting = 0;
      f->state = State::Ready;
      return;
    }
  }
  switch_to_host(f);
}

void* shared_array(const void* key, size_t bytes, size_t align, const char* name, Site site) {
  Runtime& r = rt();
  current_fiber("shared memory");
  for (const SharedEntry& e : r.shared) {
    if (e.key == key) return e.data;
  }
  if (r.shared_bytes + bytes > kMaxStaticShared) {
    fail("static shared memory over 48 KiB per block (" + std::string(name) + " at " + where(site) + ")");
  }
  void* data = nullptr;
  if (posix_memalign(&data, std::max<size_t>(align, 16), bytes == 0 ? 1 : bytes) != 0) throw std::bad_alloc();
  memset(data, 0xFF, bytes);  // never zeroed: NaN for floats, -1 for integers
  r.shared.push_back({key, data, bytes});
  r.shared_bytes += bytes;
  return data;
}

void device_assert(const char* cond, const char* msg, Site site) {
  Runtime& r = rt();
  Fiber* f = current_fiber("device assert");
  ++r.asserts_this_launch;
  if (r.asserts.size() < 64) {
    std::ostringstream out;
    out << where(site) << ": block (" << f->info.block_idx.x << "," << f->info.block_idx.y << ","
        << f->info.block_idx.z << "), " << describe(*f) << ": Assertion `" << cond << "` failed: " << msg
        << " (kernel " << r.kernel_name << ")";
    r.asserts.push_back(out.str());
  }
}

void run_kernel(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* closure) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  if (r.running != nullptr) throw std::logic_error("cuda_emu: kernel launch from device code");
  apply_env_once(r);
  const int64_t threads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads)
    throw std::invalid_argument(std::string("cuda_emu: launch of ") + name + " with " + std::to_string(threads) +
                                " threads per block (1..1024)");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    throw std::invalid_argument(std::string("cuda_emu: launch of ") + name + " with an invalid grid");
  if (dynamic_smem != 0) throw std::invalid_argument("cuda_emu: dynamic shared memory is not emulated");
  r.kernel_name = name;
  r.body = body;
  r.closure = closure;
  r.error.clear();
  r.asserts_this_launch = 0;
  if (r.fibers.size() < static_cast<size_t>(threads)) r.fibers.resize(threads);
  r.num_threads = static_cast<int>(threads);
  ++r.stats[0];
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  for (int64_t k = 0; k < blocks && r.error.empty(); ++k) {
    const int64_t b = r.config.blocks == "reverse" ? blocks - 1 - k : k;
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (static_cast<int64_t>(grid.x) * grid.y))};
    run_block(r, idx, grid, block);
  }
  release_shared(r);
  if (!r.error.empty()) {
    std::string message = r.error;
    r.error.clear();
    throw std::runtime_error(message);
  }
  if (r.asserts_this_launch > 0 && r.config.raise_asserts) {
    std::string message = "cuda_emu: device-side assert triggered in kernel " + std::string(name) + " (" +
                          std::to_string(r.asserts_this_launch) + " times); first: " +
                          r.asserts[r.asserts.size() - std::min(r.asserts.size(), r.asserts_this_launch)];
    r.asserts.clear();
    throw std::runtime_error(message);
  }
}

const char* configure(const char* spec) {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  apply_env_once(r);
  r.config_text = spec_of(r.config);
  Config next = r.config;
  apply_spec(next, spec);
  r.config = next;
  r.rng.seed(r.config.seed);
  return r.config_text.c_str();
}

const char* configuration() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  apply_env_once(r);
  r.config_text = spec_of(r.config);
  return r.config_text.c_str();
}

int multiprocessor_count() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  apply_env_once(r);
  return r.config.sms;
}

int blocks_per_multiprocessor() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  apply_env_once(r);
  return r.config.blocks_per_sm;
}

const char* take_device_asserts() {
  Runtime& r = rt();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.asserts_text.clear();
  for (const std::string& a : r.asserts) r.asserts_text += a + "\n";
  r.asserts.clear();
  return r.asserts_text.c_str();
}

void statistics(int64_t out[3]) {
  Runtime& r = rt();
  for (int i = 0; i < 3; ++i) out[i] = r.stats[i];
}

}  // namespace fl_emu
