// cuda_emu: a CUDA-on-CPU execution layer for testing the fused_losses kernels without a GPU.
//
// The real csrc/cuda/*.cu sources are compiled as C++ (g++, -x c++) with this header standing in
// for the CUDA language: qualifiers, built-in variables, warp shuffles, __syncthreads, integer
// atomics, static shared memory (FL_SHARED), device asserts and kernel launches (FL_LAUNCH).
// csrc/cuda_emu/runtime.cpp executes a launch: every block runs its CUDA threads as user-level
// fibers (one fiber per CUDA thread, a 64 KiB stack each, allocated once and reused), which switch
// only at synchronisation points:
//   * a shuffle is a warp collective: a lane waits until every lane named in the mask has
//     arrived at a shuffle of the same kind, call site, mask and width; then every lane gets its
//     value. A lane that exits, or waits elsewhere, while it is named in another lane's mask is a
//     reported error (deadlock), never a wrong value. Reading a lane outside the mask is an error.
//   * __syncthreads is a counted barrier of the block: every live thread must arrive at the same
//     call site; arrivals at different sites (divergence) and threads that exit while others use
//     the barrier (early exit) are reported.
//   * FL_SHARED arrays live in a per-block arena keyed by the declaration (per template instance),
//     a separate heap allocation each (AddressSanitizer sees overruns), filled with 0xFF bytes
//     (NaN for floats, -1 for integers) when a block first touches them: never zeroed, like a GPU,
//     so a read before the write shows up.
//   * device asserts are recorded (file, line, message); the thread continues, as with asserts
//     compiled out. By default a launch that recorded one then fails like the GPU's "device-side
//     assert triggered"; tests can switch to recording only and inspect them.
// Schedules (FL_CUDA_EMU, or fl_emu::configure): thread order forward / reverse / seeded random
// (reshuffled every round), block order forward / reverse, the multiprocessor count (grid sizes)
// and the occupancy answer (blocks per multiprocessor).
//
// Not modelled (see README "CUDA emulator"): timing and performance (coalescing, bank conflicts,
// occupancy limits), memory-model races between warps or blocks (every launch runs on one host
// thread, one fiber at a time, so memory is sequentially consistent and a race that needs real
// concurrency is invisible unless a schedule exposes a missing barrier), streams (every launch
// completes before it returns), bit-exact GPU arithmetic (expf/logf/... are the host's libm,
// no FMA contraction; nvcc contracts a * b + c into FMA by default), and registers/local-memory
// limits. This header needs no torch; csrc/cuda/platform.cuh maps the at::cuda helpers onto it.
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <tuple>
#include <type_traits>
#include <utility>

// ---- language -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
// Static shared memory must be declared with FL_SHARED (csrc/cuda/platform.cuh), so that the
// emulator can give every block its own copy; a bare __shared__ does not compile here.
#define __shared__ FL_EMU_declare_shared_memory_with_FL_SHARED

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;

constexpr int warpSize = 32;

namespace fl_emu {

struct Site {
  const char* file;
  int line;
};

enum class ShuffleKind : int { Index, Up, Down, Xor };

// Per-fiber state visible to kernel code (the built-in variables).
struct ThreadInfo {
  uint3 thread_idx;
  uint3 block_idx;
  uint3 block_dim;
  uint3 grid_dim;
};

extern __thread ThreadInfo* tls_thread;  // the running CUDA thread, nullptr on the host

[[noreturn]] void outside_kernel(const char* what);

inline ThreadInfo& thread_info(const char* what) {
  if (tls_thread == nullptr) outside_kernel(what);
  return *tls_thread;
}

// Runtime entry points (runtime.cpp).
uint64_t warp_shuffle(Site site, ShuffleKind kind, unsigned mask, uint64_t bits, int size, int arg, int width);
void sync_threads(Site site);
void* shared_array(const void* key, size_t bytes, size_t align, const char* name, Site site);
void device_assert(const char* cond, const char* msg, Site site);
void run_kernel(const char* name, dim3 grid, dim3 block, size_t dynamic_smem, void (*body)(void*), void* closure);

// Schedules and device facts: a spec "threads=forward|reverse|random,blocks=forward|reverse,
// sms=N,blocks_per_sm=N,seed=N,asserts=raise|record" (any subset; unnamed keys keep their
// value). The environment variable FL_CUDA_EMU is applied at the first launch. Returns the
// previous configuration as a full spec.
const char* configure(const char* spec);
const char* configuration();
int multiprocessor_count();
int blocks_per_multiprocessor();
// Device asserts recorded since the last call ("file:line: message" lines, '\n'-separated);
// clears them.
const char* take_device_asserts();
// Launch statistics: launches, blocks, CUDA threads run.
void statistics(int64_t out[3]);

template <typename T>
inline T shuffle(Site site, ShuffleKind kind, unsigned mask, T value, int arg, int width = warpSize) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle: up to 8-byte values");
  uint64_t bits = 0;
  memcpy(&bits, &value, sizeof(T));
  bits = warp_shuffle(site, kind, mask, bits, static_cast<int>(sizeof(T)), arg, width);
  T out;
  memcpy(&out, &bits, sizeof(T));
  return out;
}

// Integer atomics only (the library's rule: no float atomics, results are bitwise
// deterministic). One host thread runs every fiber, so these are trivially atomic; the builtins
// keep the same code valid if blocks ever run on several host threads.
template <typename T, typename U>
inline T atomic_add(T* address, U value) {
  static_assert(std::is_integral<T>::value, "fused_losses: integer atomics only (no float atomics)");
  return __atomic_fetch_add(address, static_cast<T>(value), __ATOMIC_RELAXED);
}

template <typename T>
inline T* shared(const void* key, size_t count, const char* name, Site site) {
  return static_cast<T*>(shared_array(key, count * sizeof(T), alignof(T), name, site));
}

// FL_LAUNCH(grid, block, smem, stream, kernel)(args...): converts the arguments to the kernel's
// parameter types (as a launch copies them to the device) and runs the grid to completion.
template <typename... P>
struct Launch {
  const char* name;
  dim3 grid, block;
  size_t smem;
  void (*kernel)(P...);

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launch: wrong number of arguments");
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto body = [&]() { std::apply(kernel, params); };
    run_kernel(name, grid, block, smem, &invoke<decltype(body)>, &body);
  }

 private:
  template <typename B>
  static void invoke(void* closure) {
    (*static_cast<B*>(closure))();
  }
};

template <typename... P>
inline Launch<P...> launch(const char* name, dim3 grid, dim3 block, size_t smem, cudaStream_t, void (*kernel)(P...)) {
  return Launch<P...>{name, grid, block, smem, kernel};
}

}  // namespace fl_emu

// ---- built-in variables and functions ---------------------------------------------------------
#define FL_EMU_SITE (::fl_emu::Site{__FILE__, __LINE__})
#define threadIdx (::fl_emu::thread_info("threadIdx").thread_idx)
#define blockIdx (::fl_emu::thread_info("blockIdx").block_idx)
#define blockDim (::fl_emu::thread_info("blockDim").block_dim)
#define gridDim (::fl_emu::thread_info("gridDim").grid_dim)

#define __syncthreads() ::fl_emu::sync_threads(FL_EMU_SITE)
#define __shfl_sync(mask, value, ...) \
  ::fl_emu::shuffle(FL_EMU_SITE, ::fl_emu::ShuffleKind::Index, mask, value, __VA_ARGS__)
#define __shfl_up_sync(mask, value, ...) \
  ::fl_emu::shuffle(FL_EMU_SITE, ::fl_emu::ShuffleKind::Up, mask, value, __VA_ARGS__)
#define __shfl_down_sync(mask, value, ...) \
  ::fl_emu::shuffle(FL_EMU_SITE, ::fl_emu::ShuffleKind::Down, mask, value, __VA_ARGS__)
#define __shfl_xor_sync(mask, value, ...) \
  ::fl_emu::shuffle(FL_EMU_SITE, ::fl_emu::ShuffleKind::Xor, mask, value, __VA_ARGS__)

template <typename T, typename U>
inline T atomicAdd(T* address, U value) {
  return ::fl_emu::atomic_add(address, value);
}

// Round-to-nearest float arithmetic without contraction (the emulated build also passes
// -ffp-contract=off, so plain a * b + c is not fused either).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

#ifdef CUDA_KERNEL_ASSERT_MSG
#undef CUDA_KERNEL_ASSERT_MSG
#endif
#define CUDA_KERNEL_ASSERT_MSG(cond, msg)                                    \
  do {                                                                       \
    if (!(cond)) ::fl_emu::device_assert(#cond, msg, FL_EMU_SITE);           \
  } while (0)
#ifdef CUDA_KERNEL_ASSERT
#undef CUDA_KERNEL_ASSERT
#endif
#define CUDA_KERNEL_ASSERT(cond) CUDA_KERNEL_ASSERT_MSG(cond, #cond)

// Occupancy: the configured blocks per multiprocessor (the emulator has no register limits).
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int, size_t) {
  *blocks = ::fl_emu::blocks_per_multiprocessor();
  return cudaSuccess;
}

// The library's portable spellings (csrc/cuda/platform.cuh gives the nvcc ones).
#define FL_LAUNCH(grid, block, smem, stream, ...) \
  ::fl_emu::launch(#__VA_ARGS__, grid, block, smem, stream, __VA_ARGS__)
#define FL_EMU_CAT2(a, b) a##b
#define FL_EMU_CAT(a, b) FL_EMU_CAT2(a, b)
#define FL_SHARED(type, name, count)                            \
  static const char FL_EMU_CAT(fl_emu_shared_key_, __LINE__) = 0; \
  type* const name = ::fl_emu::shared<type>(&FL_EMU_CAT(fl_emu_shared_key_, __LINE__), count, #name, FL_EMU_SITE)

// Device code takes the device branches of shared headers (csrc/losses_math.h). Defined last,
// after every system and torch header the including file needs (they must see a host build).
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif
#define FL_CUDA_EMU 1
