// Sigmoid family of the fused_losses CUDA kernels (sigmoid focal, sigmoid GHM-C): the kernel
// arguments, the per-row label rule shared with the GHM-C histogram, and the host-side set-up.
// Kernels and sigmoid_forward: sigmoid.cu; GHM-C: ghmc.cu.
#pragma once

#include "cuda/common.cuh"

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
    CUDA_KERNEL_ASSERT_MSG(false, "fused_losses: label out of range [0, C]");
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

// The common set-up of the sigmoid-family ops.
struct SigmoidCall {
  at::Tensor logits;        // contiguous, 16-byte aligned
  at::Tensor float_target;  // contiguous, aligned; logits dtype or float32; undefined with labels
  at::Tensor labels;        // int64 (M,); undefined with a float target
  at::Tensor count;         // labels: valid rows on the device (for 'mean' and GHM)
  int64_t M = 0, C = 0;
};

SigmoidCall sigmoid_call(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index, bool need_count,
                         const char* op);

// The denominator of 'mean' of a sigmoid-family call (valid labels x C, or every element).
MeanCount sigmoid_mean_count(const SigmoidCall& call);

// The loss fields of a sigmoid pass.
struct SigmoidLossParams {
  SigmoidLoss loss = SigmoidLoss::Focal;
  float alpha = 0.25f, gamma = 2.0f;   // Focal
  const float* bin_weights = nullptr;  // Ghmc
  int64_t bins = 1;
  const float* alpha_per_class = nullptr;  // Focal, (C,)
  const float* weight = nullptr;           // (M,) or (M * C,) (sigmoid_weight)
  bool weight_per_element = false;
  MeanCount count;                         // 'mean' denominator; count_dev nullptr: sigmoid_mean_count
};

// `weight` of a sigmoid-family op on the call's logits: per row (M values) or per element
// (M * C); undefined without one.
at::Tensor sigmoid_weight(const c10::optional<at::Tensor>& weight, const SigmoidCall& call);

// Runs the sigmoid kernel over the call's elements (its target kind decides the instance):
// returns (loss, saved gradient).
std::tuple<at::Tensor, at::Tensor> sigmoid_forward(const SigmoidCall& call, const at::Tensor& logits_in,
                                                  int64_t ignore_index, Reduction reduction, bool compute_grad,
                                                  const SigmoidLossParams& params);

}  // namespace cuda
}  // namespace fused_losses
