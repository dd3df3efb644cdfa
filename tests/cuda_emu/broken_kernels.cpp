// Self-test kernels of the CUDA emulator (csrc/cuda_emu): small kernels written like the
// library's, each either correct or broken in one way a GPU would punish, compiled through the
// same layer (cuda_emu.h + runtime.cpp; FL_SHARED / FL_LAUNCH as in csrc/cuda/platform.cuh).
// tests/cuda_emu/test_emulator.py builds this program (plain and with AddressSanitizer) and
// checks that every broken kernel is caught, under every schedule, and no correct one is.
//
//   broken_kernels CASE SCHEDULE   ->  prints "ok", "wrong <details>" or "error <message>"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_emu/cuda_emu.h"

namespace {

constexpr int kThreads = 256;
constexpr unsigned kFull = 0xffffffffu;

// ---- reductions: correct, and broken ---------------------------------------------------------
template <int G, bool kWrongStart>
__device__ float group_sum(float v) {
  for (int offset = kWrongStart ? G : G / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFull, v, offset);
  return v;
}

template <bool kBarrier>
__device__ float block_sum(float v) {
  FL_SHARED(float, warp_sums, kThreads / 32);
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFull, v, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  if (kBarrier) __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

// Sum of x[0..n) per block into out[blockIdx.x]; grid-stride loop (kBrokenStride: a block stride
// instead of the grid stride, so with several blocks elements are counted more than once).
template <bool kBarrier, bool kBrokenStride>
__global__ void sum_kernel(const float* x, int n, float* out) {
  float v = 0.0f;
  const int stride = kBrokenStride ? blockDim.x : blockDim.x * gridDim.x;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) v += x[i];
  const float total = block_sum<kBarrier>(v);
  if (threadIdx.x == 0) out[blockIdx.x] = total;
}

// Row sums of 16-lane groups (each group: one row of 16 values).
template <bool kWrongStart>
__global__ void group_sum_kernel(const float* x, int rows, float* out) {
  const int lane = threadIdx.x % 32;
  const int row = (blockIdx.x * kThreads + threadIdx.x) / 16;
  const float v = row < rows ? x[row * 16 + lane % 16] : 0.0f;
  const float s = group_sum<16, kWrongStart>(v);
  if (lane % 16 == 0 && row < rows) out[row] = s;
}

// A shuffle only half the warp executes (the other half skips it): deadlock on a GPU.
__global__ void divergent_shuffle_kernel(const float* x, float* out) {
  float v = x[threadIdx.x];
  if (threadIdx.x % 32 < 16) v += __shfl_xor_sync(kFull, v, 1);
  out[threadIdx.x] = v;
}

// Lanes of one warp at two different shuffles (an if/else around the collective).
__global__ void split_shuffle_kernel(const float* x, float* out) {
  float v = x[threadIdx.x];
  if (threadIdx.x % 2 == 0) {
    v += __shfl_xor_sync(kFull, v, 1);
  } else {
    v -= __shfl_xor_sync(kFull, v, 1);
  }
  out[threadIdx.x] = v;
}

// Threads leave before a barrier the others wait at.
__global__ void early_exit_kernel(const float* x, float* out) {
  FL_SHARED(float, tile, kThreads);
  if (threadIdx.x >= 128) return;
  tile[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[127 - threadIdx.x];
}

// __syncthreads in both branches of an if: two barriers, divergent.
__global__ void divergent_barrier_kernel(const float* x, float* out) {
  FL_SHARED(float, tile, kThreads);
  tile[threadIdx.x] = x[threadIdx.x];
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = tile[kThreads - 1 - threadIdx.x];
}

// Histogram in shared memory; kZero false: the counters are never zeroed (shared memory is not).
template <bool kZero>
__global__ void histogram_kernel(const int* bins, int n, unsigned long long* counts) {
  FL_SHARED(unsigned int, hist, 64);
  if (kZero) {
    for (int b = threadIdx.x; b < 64; b += kThreads) hist[b] = 0u;
    __syncthreads();
  }
  for (int i = blockIdx.x * kThreads + threadIdx.x; i < n; i += kThreads * gridDim.x) atomicAdd(&hist[bins[i]], 1u);
  __syncthreads();
  for (int b = threadIdx.x; b < 64; b += kThreads) {
    if (hist[b] != 0u) atomicAdd(&counts[b], static_cast<unsigned long long>(hist[b]));
  }
}

// out[i] = x[i] + x[i + 1] for i < n: reads x[n], one past the end (caught by AddressSanitizer).
template <bool kOffByOne>
__global__ void neighbour_sum_kernel(const float* x, int n, float* out) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i < n) out[i] = x[i] + (kOffByOne || i + 1 < n ? x[i + 1] : 0.0f);
}

// A device assert on a bad index; the thread continues (the index is clamped).
__global__ void assert_kernel(const int* index, int n, float* out) {
  const int i = threadIdx.x;
  if (i < n) {
    int t = index[i];
    if (t < 0 || t >= n) {
      CUDA_KERNEL_ASSERT_MSG(false, "index out of range");
      t = 0;
    }
    out[i] = static_cast<float>(t);
  }
}

// ---- cases ---------------------------------------------------------------------------------------
std::vector<float> iota_values(int n) {
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i % 7) - 3.0f + 0.25f * static_cast<float>(i % 3);
  return x;
}

std::string compare(const std::vector<float>& got, const std::vector<float>& want) {
  for (size_t i = 0; i < want.size(); ++i) {
    if (!(fabsf(got[i] - want[i]) <= 1e-3f * (1.0f + fabsf(want[i])))) {
      char buf[128];
      snprintf(buf, sizeof buf, "wrong at %zu: got %g, expected %g", i, got[i], want[i]);
      return buf;
    }
  }
  return "ok";
}

template <bool kBarrier, bool kBrokenStride>
std::string run_sum(int blocks) {
  const int n = 5000;
  std::vector<float> x = iota_values(n), out(blocks, 0.0f);
  FL_LAUNCH(blocks, kThreads, 0, nullptr, sum_kernel<kBarrier, kBrokenStride>)(x.data(), n, out.data());
  double total = 0.0, want = 0.0;
  for (float v : out) total += v;
  for (float v : x) want += v;
  return compare({static_cast<float>(total)}, {static_cast<float>(want)});
}

template <bool kWrongStart>
std::string run_group_sum() {
  const int rows = 37;
  std::vector<float> x = iota_values(rows * 16), out(rows, 0.0f), want(rows, 0.0f);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < 16; ++c) want[r] += x[r * 16 + c];
  FL_LAUNCH((rows * 16 + kThreads - 1) / kThreads, kThreads, 0, nullptr, group_sum_kernel<kWrongStart>)(x.data(), rows,
                                                                                                        out.data());
  return compare(out, want);
}

template <bool kZero>
std::string run_histogram() {
  const int n = 3000;
  std::vector<int> bins(n);
  std::vector<unsigned long long> counts(64, 0), want(64, 0);
  for (int i = 0; i < n; ++i) {
    bins[i] = (i * 7) % 64;
    ++want[bins[i]];
  }
  FL_LAUNCH(4, kThreads, 0, nullptr, histogram_kernel<kZero>)(bins.data(), n, counts.data());
  for (int b = 0; b < 64; ++b) {
    if (counts[b] != want[b]) return "wrong counts[" + std::to_string(b) + "] = " + std::to_string(counts[b]);
  }
  return "ok";
}

template <bool kOffByOne>
std::string run_neighbour() {
  const int n = 300;
  // A separate heap block of exactly n floats, so reading x[n] is a heap overflow.
  float* x = static_cast<float*>(malloc(n * sizeof(float)));
  std::vector<float> values = iota_values(n), out(n), want(n);
  memcpy(x, values.data(), n * sizeof(float));
  for (int i = 0; i < n; ++i) want[i] = values[i] + (i + 1 < n ? values[i + 1] : 0.0f);
  FL_LAUNCH(2, kThreads, 0, nullptr, neighbour_sum_kernel<kOffByOne>)(x, n, out.data());
  free(x);
  if (kOffByOne) return "ok";  // without AddressSanitizer the stray read goes unseen
  return compare(out, want);
}

std::string run_simple(void (*kernel)(const float*, float*)) {
  std::vector<float> x = iota_values(kThreads), out(kThreads, 0.0f);
  FL_LAUNCH(1, kThreads, 0, nullptr, kernel)(x.data(), out.data());
  return "ok";
}

std::string run_assert() {
  std::vector<int> index = {0, 1, 7, 2};
  std::vector<float> out(4, -1.0f);
  FL_LAUNCH(1, 32, 0, nullptr, assert_kernel)(index.data(), 4, out.data());
  return "ok";
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s CASE SCHEDULE\n", argv[0]);
    return 2;
  }
  const std::map<std::string, std::function<std::string()>> cases = {
      {"block_sum", [] { return run_sum<true, false>(3); }},
      {"missing_barrier", [] { return run_sum<false, false>(3); }},
      {"grid_stride", [] { return run_sum<true, false>(4); }},
      {"broken_grid_stride", [] { return run_sum<true, true>(4); }},
      {"group_sum", [] { return run_group_sum<false>(); }},
      {"butterfly_wrong_start", [] { return run_group_sum<true>(); }},
      {"divergent_shuffle", [] { return run_simple(divergent_shuffle_kernel); }},
      {"split_shuffle", [] { return run_simple(split_shuffle_kernel); }},
      {"early_exit_barrier", [] { return run_simple(early_exit_kernel); }},
      {"divergent_barrier", [] { return run_simple(divergent_barrier_kernel); }},
      {"histogram", [] { return run_histogram<true>(); }},
      {"unzeroed_shared", [] { return run_histogram<false>(); }},
      {"neighbour_sum", [] { return run_neighbour<false>(); }},
      {"off_by_one_read", [] { return run_neighbour<true>(); }},
      {"device_assert", [] { return run_assert(); }},
  };
  const auto it = cases.find(argv[1]);
  if (it == cases.end()) {
    fprintf(stderr, "unknown case %s\n", argv[1]);
    return 2;
  }
  std::string result;
  try {
    fl_emu::configure(argv[2]);
    result = it->second();
  } catch (const std::exception& e) {
    result = std::string("error ") + e.what();
  }
  printf("%s\n", result.c_str());
  return 0;
}
