// GHM-C kernels of fused_losses (no ATen; csrc/cuda/kernels/device.cuh): the gradient-norm
// histograms (shared-memory bins per block, integer atomics) and the bin weights / EMA update.
// Launchers: csrc/cuda/ghmc.cu; the forward is the sigmoid or softmax pass with the GHM-C loss.
#pragma once

#include "cuda/kernels/sigmoid_kernels.cuh"

namespace fused_losses {
namespace cuda {


// Histogram of the sigmoid-family bins bin(|sigmoid(x) - y|) over the valid elements (not in
// an ignored row, and a nonzero weight when a weight is given: mmdet's label_weight > 0): per block
// in shared memory (bins <= kSharedBins), then one integer atomic per non-empty bin per block
// into counts (int64, zeroed). Traffic per element: one logits read (+ a float target read).
constexpr int64_t kSharedBins = 4096;

// One block's bin counts: in shared memory when bins <= kSharedBins (then one global integer
// atomic per non-empty bin per block in flush()), else straight into the global int64 counts.
// Integer atomics only, so the counts are exact and deterministic. `bins` is the same for every
// thread of the block, so the __syncthreads() calls are reached uniformly.
struct BlockHistogram {
  unsigned int* hist;
  unsigned long long* counts;
  int64_t bins;
  bool in_shared;

  __device__ BlockHistogram(unsigned int* shared_hist, unsigned long long* global_counts, int64_t num_bins)
      : hist(shared_hist), counts(global_counts), bins(num_bins), in_shared(num_bins <= kSharedBins) {
    if (in_shared) {
      for (int64_t b = threadIdx.x; b < bins; b += kThreads) hist[b] = 0u;
      __syncthreads();
    }
  }

  __device__ void add(int64_t b) {
    if (in_shared) {
      atomicAdd(&hist[b], 1u);
    } else {
      atomicAdd(&counts[b], 1ull);
    }
  }

  __device__ void flush() {
    if (!in_shared) return;
    __syncthreads();
    for (int64_t b = threadIdx.x; b < bins; b += kThreads) {
      if (hist[b] != 0u) atomicAdd(&counts[b], static_cast<unsigned long long>(hist[b]));
    }
  }
};

template <typename scalar_t, typename target_t, bool kLabels, bool kWeighted>
__global__ void __launch_bounds__(kThreads) ghm_sigmoid_histogram_kernel(const SigmoidArgs<scalar_t, target_t> a,
                                                                         unsigned long long* __restrict__ counts) {
  FL_SHARED(unsigned int, hist, kSharedBins);
  BlockHistogram histogram(hist, counts, a.bins);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    if constexpr (kLabels) {
      const int64_t r = row_of(i, a.C, small);
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = to_float(a.target[i]);
    }
    if (!valid) continue;
    if constexpr (kWeighted) {  // a zero weight: invalid (not binned)
      if (element_weight(a, i, row_of(i, a.C, small)) == 0.0f) continue;
    }
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(to_float(a.logits[i]), y), a.bins);
    if (b >= 0) histogram.add(b);
  }
  histogram.flush();
}

// Histogram of the softmax bins bin(g), g = 1 - p_t = sum_others / s (float32, exact relative
// at every margin), of the valid rows (a valid target, and weight[r] != 0 when given), from the g of a stats pass: the value ghmc_forward's
// softmax pass bins with, so both pick the same bin. Traffic per row: 4 + 8 bytes.
template <bool kWeighted>
__global__ void __launch_bounds__(kThreads) ghm_softmax_histogram_kernel(const float* __restrict__ one_minus_pt,
                                                                         const int64_t* __restrict__ target,
                                                                         const float* __restrict__ weight,
                                                                         int64_t rows, int64_t ignore_index,
                                                                         int64_t C, int64_t bins,
                                                                         unsigned long long* __restrict__ counts) {
  FL_SHARED(unsigned int, hist, kSharedBins);
  BlockHistogram histogram(hist, counts, bins);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows; r += stride) {
    const int64_t t = target[r];
    // Ignored rows, and out-of-range targets (asserted on by the stats pass, treated as ignored:
    // their g of 0 would otherwise land in bin 0).
    if (t == ignore_index || t < 0 || t >= C) continue;
    if constexpr (kWeighted) {
      if (weight[r] == 0.0f) continue;  // a zero weight: invalid (not binned)
    }
    const int64_t b = lm::ghm_bin(one_minus_pt[r], bins);
    if (b >= 0) histogram.add(b);
  }
  histogram.flush();
}

// Bin weights from the counts (reference.ghmc, the CPU's ghm_weights_from_counts): EMA update
// of `state` first (bins non-empty in this batch: acc = m * acc + (1 - m) * count, float32),
// divisor = state or count, weight_b = n_valid / max(divisor_b, 1e-12) / n_nonempty for
// non-empty bins, 0 otherwise. One thread: bins-sized work.
// counts: (bins + 1,), the histogram then n_valid (ghm_counts).
// A template (instantiated as ghm_weights_kernel<>) so that the header can be included by every file.
template <typename = void>
__global__ void ghm_weights_kernel(const int64_t* __restrict__ counts, int64_t bins,
                                   float* __restrict__ state, float momentum, float one_minus_momentum,
                                   float* __restrict__ weights) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  int64_t nonempty = 0;
  for (int64_t b = 0; b < bins; ++b) nonempty += counts[b] > 0;
  const float nv = static_cast<float>(counts[bins]);
  const float ne = static_cast<float>(nonempty > 1 ? nonempty : int64_t(1));
  for (int64_t b = 0; b < bins; ++b) {
    float divisor = static_cast<float>(counts[b]);
    if (state != nullptr) {
      if (counts[b] > 0) state[b] = lm::ghm_ema(state[b], static_cast<float>(counts[b]), momentum, one_minus_momentum);
      divisor = state[b];
    }
    const float d = divisor > 1e-12f ? divisor : 1e-12f;
    weights[b] = counts[b] > 0 ? (nv / d) / ne : 0.0f;
  }
}

}  // namespace cuda
}  // namespace fused_losses
