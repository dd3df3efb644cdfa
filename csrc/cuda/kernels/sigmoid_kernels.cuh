// Sigmoid-family kernels of fused_losses (no ATen; csrc/cuda/kernels/device.cuh): the kernel
// arguments (SigmoidArgs), the per-row label rule shared with the GHM-C histogram, and the
// elementwise kernel (sigmoid focal, sigmoid GHM-C forward). Launchers: csrc/cuda/sigmoid.cu;
// conventions: csrc/cuda/common.cuh.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

enum class SigmoidLoss : int { Focal, Ghmc };

// grad_t: element type of the gradient output, as in SoftmaxArgs (the histogram kernels write
// no gradient and use the default).
template <typename scalar_t, typename target_t, typename grad_t = float>
struct SigmoidArgs {
  const scalar_t* logits = nullptr;  // (M, C) contiguous
  const target_t* target = nullptr;  // float target (M, C), or nullptr with labels
  const int64_t* labels = nullptr;   // (M,) labels, or nullptr with a float target
  int64_t M = 0, C = 0, numel = 0;
  int64_t ignore_index = 0;
  SigmoidLoss loss = SigmoidLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  float alpha = 0.25f, gamma = 2.0f;   // Focal
  const float* bin_weights = nullptr;  // Ghmc
  int64_t bins = 1;
  // Drop-in extras (the kExtras kernel instances; the histogram reads `weight` too):
  const float* alpha_per_class = nullptr;  // Focal: (C,), replaces alpha
  const float* weight = nullptr;           // (M,) per row or (M * C,) per element
  bool weight_per_element = false;
  grad_t* grad = nullptr;              // (M, C) saved gradient (saved_grad_dtype) or nullptr
  scalar_t* loss_elems = nullptr;      // 'none': (M, C) or nullptr
  double* partials = nullptr;          // 'mean'/'sum': one per block
};

// Label of row r: the label itself, or -1 when the row is ignored (or out of [0, C]: device
// assert, then ignored). ignore_index is checked before the range, like the API says.
template <typename A>
__device__ __forceinline__ int64_t row_label(const A& a, int64_t r, bool& valid) {
  const int64_t label = a.labels[r];
  valid = label != a.ignore_index;
  if (valid && (label < 0 || label > a.C)) {
    FL_DEVICE_ASSERT(false, "fused_losses: label out of range [0, C]");
    valid = false;
  }
  return label;
}

// Row index of element i (i < numel): 32-bit division when the tensor allows (cheaper).
__device__ __forceinline__ int64_t row_of(int64_t i, int64_t C, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(C)) : i / C;
}

// The weight of element i of row r (1 without weights).
template <typename A>
__device__ __forceinline__ float element_weight(const A& a, int64_t i, int64_t r) {
  return a.weight == nullptr ? 1.0f : a.weight[a.weight_per_element ? i : r];
}

// Element loss and gradient (gradient already scaled):
//   Focal: math::sigmoid_focal_element (alpha_t * BCE * (1 - p_t)^gamma and its derivative)
//   Ghmc:  loss = w[bin(|p - y|)] * BCE, grad = scale * w * (p - y)
// alpha: the scalar alpha, or the element's class alpha (kExtras with alpha_per_class).
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> sigmoid_element(const A& a, float x, float y, float scale, float alpha) {
  const float e = lm::exp_(-lm::abs_(x));
  lm::LossGrad<float> out;
  if (a.loss == SigmoidLoss::Focal) {
    out = lm::sigmoid_focal_element(x, y, alpha, a.gamma, e);
    out.grad *= scale;
  } else {
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(x, y), a.bins);
    const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
    const lm::SigmoidParts<float> s = lm::sigmoid_parts(x, y, e);
    out.loss = w * s.bce;
    out.grad = scale * w * (s.p - y);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// sigmoid_kernel: elementwise over (M, C). A thread takes packs of VEC = 16 / sizeof(scalar_t)
// consecutive elements (one 16-byte load of logits, one of a same-dtype target; a float32
// target of fp16/bf16 logits is two), the last numel % VEC elements one by one. Integer labels:
// y_c = [label == c] from the row's label (8 bytes per row, no one-hot); ignored rows give 0.
// Memory traffic per element: sizeof(scalar_t) read (+ sizeof(target_t) for a float target),
// sizeof(grad_t) written for the gradient (computed in float32, rounded once; a pack is 16
// bytes in the logits dtype, 4 * VEC of float32), + sizeof(scalar_t) for 'none' losses.
// kExtras (drop-in extras; the plain instances are unchanged): per-class alpha a_c replaces
// alpha, and the weight w of the element (per row or per element; + 4 bytes read) multiplies
// loss and gradient; w == 0 selects exactly 0 for both (a NaN logit there does not leak).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename target_t, typename grad_t, bool kLabels, bool kExtras>
__global__ void __launch_bounds__(kThreads) sigmoid_kernel(const SigmoidArgs<scalar_t, target_t, grad_t> a) {
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
    bool valid[VEC];
    [[maybe_unused]] float alpha[VEC];
    [[maybe_unused]] float w[VEC];
    if constexpr (kExtras && !kLabels) {  // the targets below; here the per-element extras
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
        w[e] = element_weight(a, i0 + e, r);
        if (++c == a.C) {
          c = 0;
          ++r;
        }
      }
    }
    if constexpr (kLabels) {
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
      bool row_valid;
      int64_t label = row_label(a, r, row_valid);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = row_valid;
        y[e] = label == c ? 1.0f : 0.0f;
        if constexpr (kExtras) {
          alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
          w[e] = element_weight(a, i0 + e, r);
        }
        if (++c == a.C && e + 1 < VEC) {  // the next element starts row r + 1 (< M: it exists)
          c = 0;
          label = row_label(a, ++r, row_valid);
        }
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = true;
        y[e] = to_float(ts.v[e]);
      }
    }
    Pack<grad_t, VEC> grads;
    Pack<scalar_t, VEC> losses;
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      lm::LossGrad<float> lg{0.0f, 0.0f};
      if constexpr (kExtras) {
        if (valid[e] && w[e] != 0.0f) {
          lg = sigmoid_element(a, to_float(xs.v[e]), y[e], scale, alpha[e]);
          lg.loss *= w[e];
          lg.grad *= w[e];
        }
      } else {
        if (valid[e]) lg = sigmoid_element(a, to_float(xs.v[e]), y[e], scale, a.alpha);
      }
      pack_loss += lg.loss;
      grads.v[e] = from_float<grad_t>(lg.grad);
      losses.v[e] = from_float<scalar_t>(lg.loss);
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_elems != nullptr) store_pack<VEC>(a.loss_elems + i0, losses);
    acc += pack_loss;
  }
  for (int64_t i = packs * VEC + first; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    const int64_t r = kLabels || kExtras ? row_of(i, a.C, small) : 0;
    if constexpr (kLabels) {
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = to_float(a.target[i]);
    }
    lm::LossGrad<float> lg{0.0f, 0.0f};
    if constexpr (kExtras) {
      const float w = element_weight(a, i, r);
      if (valid && w != 0.0f) {
        lg = sigmoid_element(a, to_float(a.logits[i]), y, scale,
                             lm::class_alpha(a.alpha_per_class, a.alpha, i - r * a.C));
        lg.loss *= w;
        lg.grad *= w;
      }
    } else {
      if (valid) lg = sigmoid_element(a, to_float(a.logits[i]), y, scale, a.alpha);
    }
    if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(lg.grad);
    if (a.loss_elems != nullptr) a.loss_elems[i] = from_float<scalar_t>(lg.loss);
    acc += lg.loss;
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

}  // namespace cuda
}  // namespace fused_losses
