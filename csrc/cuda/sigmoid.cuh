// Sigmoid family of the fused_losses CUDA kernels (sigmoid focal, sigmoid GHM-C): the host-side
// set-up. Kernels and their arguments: kernels/sigmoid_kernels.cuh (no ATen); sigmoid_forward:
// sigmoid.cu; GHM-C: ghmc.cu.
#pragma once

#include "cuda/common.cuh"
#include "cuda/kernels/sigmoid_kernels.cuh"

namespace fused_losses {
namespace cuda {


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
  float epsilon = 0.0f;                    // Focal, Poly-1 (#24)
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
