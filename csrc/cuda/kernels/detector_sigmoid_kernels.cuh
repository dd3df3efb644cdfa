// Kernels of the sigmoid-type detector losses (issue #24): quality focal, varifocal, asymmetric
// (no ATen; csrc/cuda/kernels/device.cuh). The per-element math is csrc/detector_sigmoid_math.h,
// the same functions the CPU kernel (csrc/cpu/detector_sigmoid.cpp) runs. Launchers:
// csrc/cuda/detector_sigmoid.cu; conventions: csrc/cuda/common.cuh.
//
// Two kernels:
//   detector_sigmoid_kernel: elementwise over (M, C), the structure of sigmoid_kernel
//     (sigmoid_kernels.cuh): a thread per 16-byte pack of VEC = 16 / sizeof(scalar_t) logits
//     (one LDG.128; a dense target of the logits' dtype one more, a float32 target of fp16/bf16
//     logits two), grid-stride, the last numel % VEC elements one by one; the row of an element
//     from a 32-bit division when numel fits (row_of), else 64-bit. Writes the gradient, the
//     elementwise 'none' loss (VFL, ASL) and one double partial per block (fixed-order block
//     sum; the partials summed in block order by finish_loss: deterministic).
//   detector_row_kernel: quality focal with reduction 'none' (the loss is per row): a warp per
//     row, lanes over the columns (coalesced 4-byte loads), the row sum by a fixed butterfly
//     (group_sum), written by lane 0 together with the gradient.
// Labels form: the row's label (8 bytes) and score (4 bytes) per row, y = score at the label's
// column, no one-hot. Out-of-range labels: device assert, then the row is ignored (row_label).
// Weights (per row or per element): loss and gradient multiplied, a zero weight selects 0 (the
// logit is not used: a NaN there does not leak).
#pragma once

#include "cuda/kernels/sigmoid_kernels.cuh"
#include "detector_sigmoid_math.h"

namespace fused_losses {
namespace cuda {

template <typename scalar_t, typename target_t, typename grad_t = float>
struct DetectorArgs {
  const scalar_t* logits = nullptr;  // (M, C) contiguous, 16-byte aligned
  const target_t* target = nullptr;  // dense target (M, C), or nullptr with labels
  const int64_t* labels = nullptr;   // (M,) labels, or nullptr
  const float* score = nullptr;      // (M,) with labels
  int64_t M = 0, C = 0, numel = 0;
  int64_t ignore_index = 0;
  int kind = lm::kQualityFocal;
  lm::DetectorParams<float> params{};
  Reduction reduction = Reduction::None;
  MeanCount count;
  const float* weight = nullptr;  // (M,) per row or (M * C,) per element
  bool weight_per_element = false;
  grad_t* grad = nullptr;        // (M, C) or nullptr
  scalar_t* loss_out = nullptr;  // 'none': (M, C) elementwise, or (M,) per row (detector_row_kernel)
  double* partials = nullptr;    // 'mean'/'sum': one per block
};

// (loss, dloss/dx) of one valid element (the kind is uniform over the launch).
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> detector_element(const A& a, float x, float y, bool positive) {
  const float e = lm::exp_(-lm::abs_(x));
  if (a.kind == lm::kQualityFocal) return lm::detector_element<lm::kQualityFocal, float>(a.params, x, y, positive, e);
  if (a.kind == lm::kVarifocal) return lm::detector_element<lm::kVarifocal, float>(a.params, x, y, positive, e);
  return lm::detector_element<lm::kAsymmetric, float>(a.params, x, y, positive, e);
}

// The element's loss and scaled gradient, times its weight w (0 if the element is inactive).
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> detector_weighted(const A& a, float x, float y, bool positive,
                                                                 bool valid, float w, float scale) {
  lm::LossGrad<float> lg{0.0f, 0.0f};
  if (valid && w != 0.0f) {
    lg = detector_element(a, x, y, positive);
    lg.loss *= w;
    lg.grad *= w * scale;
  }
  return lg;
}

template <typename scalar_t, typename target_t, typename grad_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) detector_sigmoid_kernel(const DetectorArgs<scalar_t, target_t, grad_t> a) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const float scale = grad_scale(a.reduction, a.count);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double acc = 0.0;
  const int64_t packs = a.numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const int64_t i0 = p * VEC;
    const Pack<scalar_t, VEC> xs = load_pack<VEC>(a.logits + i0);
    float y[VEC];
    bool positive[VEC];
    bool valid[VEC];
    float w[VEC];
    int64_t r = row_of(i0, a.C, small);
    int64_t c = i0 - r * a.C;
    if constexpr (kLabels) {
      bool row_valid;
      int64_t label = row_label(a, r, row_valid);
      float score = row_valid ? a.score[r] : 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = row_valid;
        positive[e] = label == c;
        y[e] = label == c ? score : 0.0f;
        w[e] = element_weight(a, i0 + e, r);
        if (++c == a.C && e + 1 < VEC) {  // the next element starts row r + 1 (< M: it exists)
          c = 0;
          label = row_label(a, ++r, row_valid);
          score = row_valid ? a.score[r] : 0.0f;
        }
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = true;
        y[e] = to_float(ts.v[e]);
        positive[e] = y[e] > 0.0f;
        w[e] = element_weight(a, i0 + e, r);
        if (++c == a.C) {
          c = 0;
          ++r;
        }
      }
    }
    Pack<grad_t, VEC> grads;
    Pack<scalar_t, VEC> losses;
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const lm::LossGrad<float> lg = detector_weighted(a, to_float(xs.v[e]), y[e], positive[e], valid[e], w[e], scale);
      pack_loss += lg.loss;
      grads.v[e] = from_float<grad_t>(lg.grad);
      losses.v[e] = from_float<scalar_t>(lg.loss);
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_out != nullptr) store_pack<VEC>(a.loss_out + i0, losses);
    acc += pack_loss;
  }
  for (int64_t i = packs * VEC + first; i < a.numel; i += stride) {
    const int64_t r = row_of(i, a.C, small);
    const int64_t c = i - r * a.C;
    bool valid = true;
    float y;
    bool positive;
    if constexpr (kLabels) {
      const int64_t label = row_label(a, r, valid);
      positive = label == c;
      y = positive && valid ? a.score[r] : 0.0f;
    } else {
      y = to_float(a.target[i]);
      positive = y > 0.0f;
    }
    const lm::LossGrad<float> lg =
        detector_weighted(a, to_float(a.logits[i]), y, positive, valid, element_weight(a, i, r), scale);
    if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(lg.grad);
    if (a.loss_out != nullptr) a.loss_out[i] = from_float<scalar_t>(lg.loss);
    acc += lg.loss;
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// Quality focal 'none': a warp per row (grid-stride over rows), the per-row loss and the gradient.
template <typename scalar_t, typename target_t, typename grad_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) detector_row_kernel(const DetectorArgs<scalar_t, target_t, grad_t> a) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; r < a.M; r += warps) {
    bool row_valid = true;
    int64_t label = -1;
    float score = 0.0f;
    if constexpr (kLabels) {
      label = row_label(a, r, row_valid);
      if (row_valid) score = a.score[r];
    }
    float sum = 0.0f;
    for (int64_t c = lane; c < a.C; c += 32) {
      const int64_t i = r * a.C + c;
      float y;
      bool positive;
      if constexpr (kLabels) {
        positive = label == c;
        y = positive ? score : 0.0f;
      } else {
        y = to_float(a.target[i]);
        positive = y > 0.0f;
      }
      const lm::LossGrad<float> lg =
          detector_weighted(a, to_float(a.logits[i]), y, positive, row_valid, element_weight(a, i, r), 1.0f);
      sum += lg.loss;
      if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(lg.grad);
    }
    sum = group_sum<32>(sum);
    if (lane == 0) a.loss_out[r] = from_float<scalar_t>(sum);
  }
}

}  // namespace cuda
}  // namespace fused_losses
