// Kernels shared by every loss family (no ATen; csrc/cuda/kernels/device.cuh): the reduction
// kind, the 'mean' denominator, the grid-size rule, the count and final-reduction kernels and the
// build probe. Launchers: csrc/cuda/common.cu; conventions: csrc/cuda/common.cuh.
#pragma once

#include "cuda/kernel_utils.cuh"
#include "losses_math.h"

namespace fused_losses {
namespace cuda {

namespace lm = fused_losses::math;

enum class Reduction : int { None, Mean, Sum };

// The denominator of 'mean': count_dev[0] * count_mult when count_dev is given (a count made on
// the device), else count_host (known on the host: N for IB, numel for float targets).
struct MeanCount {
  const int64_t* count_dev = nullptr;
  int64_t count_mult = 1;
  int64_t count_host = 0;
};

__device__ __forceinline__ int64_t mean_count(const MeanCount& c) {
  return c.count_dev != nullptr ? c.count_dev[0] * c.count_mult : c.count_host;
}

// 1 / max(count, 1) for 'mean' (as the CPU kernels: float(1) / float(count)), else 1.
__device__ __forceinline__ float grad_scale(Reduction reduction, const MeanCount& c) {
  if (reduction != Reduction::Mean) return 1.0f;
  const int64_t n = mean_count(c);
  return 1.0f / static_cast<float>(n > 1 ? n : int64_t(1));
}

// The grid-size rule of every launch (grid_for in common.cuh, and the standalone drivers):
// blocks for `work` independent items of `per_block` each, at most the number of blocks the
// device holds at once, multiprocessors x the resident blocks per multiprocessor of the kernel
// (the occupancy calculator's answer for kThreads threads: its real registers and shared
// memory), at least 1. A persistent grid whose size, and so the order of every sum, depends only
// on the size, the kernel and the device.
inline int64_t grid_size(int multiprocessors, int blocks_per_sm, int64_t work, int64_t per_block) {
  const int64_t resident = static_cast<int64_t>(multiprocessors) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t wanted = (work + per_block - 1) / per_block;
  const int64_t blocks = wanted < resident ? wanted : resident;
  return blocks > 1 ? blocks : 1;
}

// What count_valid_into counts: entry i of n is valid when its target value
// target[i / per_target] is a valid index (!= ignore_index and in [0, upper); no target: every
// entry) and, when weight is given, weight[i] != 0 (GHM-C: a zero weight marks an entry
// invalid). The count is multiplied by `mult` (sigmoid labels: valid rows x C).
struct CountSpec {
  const int64_t* target = nullptr;
  int64_t per_target = 1;
  int64_t ignore_index = 0;
  int64_t upper = 0;
  const float* weight = nullptr;
  int64_t mult = 1;
};

// y = 2 * x + 1; grid-stride loop with int64 indices.
// A template (instantiated as build_probe_kernel<>) so that the header can be included by every file.
template <typename = void>
__global__ void build_probe_kernel(const float* __restrict__ in, float* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = 2.0f * in[i] + 1.0f;
  }
}

// Final reduction: loss = sum of the block partials, in block order (one block; thread i sums
// partials i, i + kThreads, ... then the fixed block tree), divided by max(count, 1) for
// 'mean'; written as float32 (the reduced loss dtype of fp16/bf16/fp32 inputs).
// Traffic: 8 bytes per block of the loss kernel.
// A template (instantiated as finish_loss_kernel<>) so that the header can be included by every file.
template <typename = void>
__global__ void __launch_bounds__(kThreads) finish_loss_kernel(const double* __restrict__ partials, int64_t n,
                                                               MeanCount count, bool mean, float* __restrict__ out) {
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) s += partials[i];
  const double total = block_sum(s);
  if (threadIdx.x == 0) {
    double value = total;
    if (mean) {
      const int64_t c = mean_count(count);
      value /= static_cast<double>(c > 1 ? c : int64_t(1));
    }
    out[0] = static_cast<float>(value);
  }
}

// count[0] += spec.mult x the number of valid entries i < n (CountSpec, common.cuh: target
// value target[i / per_target] != ignore_index and in [0, upper), weight[i] != 0 when given;
// count zeroed by the caller). Out-of-range targets are not counted: the loss kernels assert on
// them and treat the row as ignored, so the 'mean' denominator and GHM-C's n_valid must too.
// Per block an integer sum, then one integer atomic per block (exact). Traffic: 8 bytes per
// target value (+ 4 per weight).
// kGeneral: the instance for every CountSpec; the plain one (a target per entry, no weight, mult
// 1: the 'mean' count of the no-extras losses) keeps the registers it had before the extras.
template <bool kGeneral>
__global__ void __launch_bounds__(kThreads) count_valid_kernel(const CountSpec spec, int64_t n,
                                                               int64_t* __restrict__ count) {
  long long local = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    if constexpr (kGeneral) {
      bool valid = true;
      if (spec.target != nullptr) {
        const int64_t t = spec.target[spec.per_target == 1 ? i : i / spec.per_target];
        valid = t != spec.ignore_index && t >= 0 && t < spec.upper;
      }
      if (spec.weight != nullptr) valid = valid && spec.weight[i] != 0.0f;
      local += valid;
    } else {
      const int64_t t = spec.target[i];
      local += t != spec.ignore_index && t >= 0 && t < spec.upper;
    }
  }
  const long long total = block_sum(local);
  if (threadIdx.x == 0 && total != 0) {
    atomicAdd(reinterpret_cast<unsigned long long*>(count), static_cast<unsigned long long>(total * spec.mult));
  }
}

}  // namespace cuda
}  // namespace fused_losses
