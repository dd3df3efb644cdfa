// Shared pieces of the standalone drivers of `make gpu-sim` (benchmarks/gpusim/run.py): no torch,
// the project's kernel headers only. A driver is run as
//     driver CASE DTYPE ROWS C S GRID SMS
// (GRID: the launchers' grid_for value that run.py computed for the config's SMS multiprocessors
// from the sm_90 registers, 0: the work's own block count), launches the real kernel once, copies
// the outputs back, checks them against a float64 computation on the CPU and prints
//     CASE bytes=<device bytes the kernel must move> grid=<blocks> occupancy_api=<value or error>
// The grid is GRID capped at the work's blocks and at SMS x the simulator's own resident blocks
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor of its runtime, from ptxas for sm_80): a block
// beyond what the simulated SMs hold would run in a second wave, which the H100 grid never does.
//     CHECK ok=<0|1> loss_rel=<..> grad_rel=<..>
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#if defined(GPUSIM_DTYPE_BF16) && !defined(FL_DEVICE_ASSERT)
// The bf16 drivers' device asserts set a flag (drv_device_assert_failed; not read back: the
// drivers' targets are all in range and every result is checked against float64) instead of
// calling __assertfail: with the sim_bf16.h stand-in, sm_80 ptxas saved a register on
// the stack around that call in one instance the module holds (softmax_spatial_kernel<bf16, bf16,
// 0, true>: "8 bytes cumulative stack size"), and the simulator's parser of that ptxas line
// aborts the whole module (exit 43); PTX `trap` does not work either (the simulator's decoder
// asserts on its missing type). The check stays (a compare and a branch, never taken in these
// runs). The fp32 drivers keep assert(), as in every earlier measurement.
__device__ int drv_device_assert_failed = 0;
#define FL_DEVICE_ASSERT(cond, msg)               \
  do {                                            \
    if (!(cond)) drv_device_assert_failed = 1;    \
  } while (0)
#endif

#define DRV_CHECK(call)                                                                     \
  do {                                                                                      \
    cudaError_t err_ = (call);                                                              \
    if (err_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "driver: %s failed: %s\n", #call, cudaGetErrorString(err_));     \
      std::exit(2);                                                                         \
    }                                                                                       \
  } while (0)

namespace drv {

struct Args {
  std::string name, dtype;
  int64_t rows = 0, C = 0, S = 1;
  int64_t grid = 0;
  int64_t sms = 0;
};

inline Args parse(int argc, char** argv) {
  if (argc < 8) {
    std::fprintf(stderr, "usage: %s CASE DTYPE ROWS C S GRID SMS\n", argv[0]);
    std::exit(2);
  }
  Args a;
  a.name = argv[1];
  a.dtype = argv[2];
  a.rows = std::atoll(argv[3]);
  a.C = std::atoll(argv[4]);
  a.S = std::atoll(argv[5]);
  a.grid = std::atoll(argv[6]);
  a.sms = std::atoll(argv[7]);
  if (a.dtype != "fp32" && a.dtype != "bf16") {
    std::fprintf(stderr, "driver: dtype fp32 or bf16, got %s\n", a.dtype.c_str());
    std::exit(2);
  }
  return a;
}

// Deterministic inputs: a 64-bit LCG, normal-ish values from the sum of four uniforms.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  uint32_t next() {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(s >> 33);
  }
  double uniform() { return (next() + 0.5) / 2147483648.0; }  // (0, 1)
  double normal() { return (uniform() + uniform() + uniform() + uniform() - 2.0) * 1.7320508; }
};

// float -> bf16 (round to nearest even) and back, on the host, bit-exact with the device's.
inline uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Relative L2 error of got against the float64 truth.
inline double rel_l2(const std::vector<double>& got, const std::vector<double>& truth) {
  double num = 0.0, den = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = got[i] - truth[i];
    num += d * d;
    den += truth[i] * truth[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// A device buffer of T holding `host`'s values (T = float or __nv_bfloat16 from float values
// already rounded to bf16).
template <typename T>
T* to_device(const std::vector<float>& host) {
  std::vector<T> h(host.size());
  for (size_t i = 0; i < host.size(); ++i) h[i] = static_cast<T>(host[i]);
  T* d = nullptr;
  DRV_CHECK(cudaMalloc(&d, h.size() * sizeof(T) + 16));
  DRV_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<double> from_device(const T* d, size_t n) {
  std::vector<T> h(n);
  DRV_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<double>(static_cast<float>(h[i]));
  return out;
}

// What the simulator's runtime says the kernel's resident blocks per multiprocessor are (the
// value grid_for multiplies by the SM count), or the error it gives.
template <typename Kernel>
std::string occupancy_api(Kernel kernel, int threads) {
  int blocks = -1;
  const cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0);
  cudaGetLastError();
  if (e != cudaSuccess) {
    std::string s = cudaGetErrorString(e);
    for (char& ch : s)
      if (ch == ' ') ch = '_';
    return "error:" + s;
  }
  return std::to_string(blocks);
}

// The launch grid (see the top of this file); occ: occupancy_api's answer.
inline int64_t launch_grid(const Args& args, int64_t work_blocks, const std::string& occ) {
  int64_t grid = args.grid > 0 ? std::min(args.grid, work_blocks) : work_blocks;
  if (!occ.empty() && occ[0] != 'e' && args.sms > 0) {
    const int64_t sim_resident = args.sms * std::max<int64_t>(1, std::atoll(occ.c_str()));
    grid = std::min(grid, sim_resident);
  }
  return std::max<int64_t>(grid, 1);
}

inline void report(int64_t bytes, int64_t grid, const std::string& occ, double loss_rel, double grad_rel, double loss_tol,
                   double grad_tol) {
  std::printf("CASE bytes=%lld grid=%lld occupancy_api=%s\n", static_cast<long long>(bytes),
              static_cast<long long>(grid), occ.c_str());
  const bool ok = loss_rel <= loss_tol && grad_rel <= grad_tol && std::isfinite(loss_rel) && std::isfinite(grad_rel);
  std::printf("CHECK ok=%d loss_rel=%.3g grad_rel=%.3g loss_tol=%.3g grad_tol=%.3g\n", ok ? 1 : 0, loss_rel, grad_rel,
              loss_tol, grad_tol);
}

}  // namespace drv
