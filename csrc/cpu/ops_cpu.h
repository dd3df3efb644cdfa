// The CPU implementations of the fused_losses ops, registered in csrc/cpu/common.cpp; one
// file per loss family (csrc/DESIGN.md "Files").
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_losses {

at::Tensor build_probe_cpu(const at::Tensor& x);  // common.cpp

namespace cpu_impl __attribute__((visibility("hidden"))) {

// common.cpp
at::Tensor target_range_cpu(const at::Tensor& target_in, int64_t ignore_index);

// softmax_losses.cpp
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const c10::optional<at::Tensor>& alpha_per_class_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool from_logits,
                                                           bool compute_grad, const c10::optional<at::Tensor>& weight,
                                                           double label_smoothing, double epsilon);
std::tuple<at::Tensor, at::Tensor> ohem_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  double keep_fraction, int64_t keep_count,
                                                  c10::optional<double> thresh, int64_t min_kept_total,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          const at::Tensor& feature_norm_in,
                                                          const c10::optional<at::Tensor>& class_weight_in,
                                                          double alpha, double epsilon, double gamma,
                                                          bool detach_factor, c10::string_view reduction_name,
                                                          bool compute_grad);

// sigmoid.cpp
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool compute_grad,
                                                           const c10::optional<at::Tensor>& alpha_per_class,
                                                           const c10::optional<at::Tensor>& weight, double epsilon);

// ghmc.cpp
at::Tensor ghmc_bin_weights_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight);
at::Tensor ghmc_bin_counts_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins,
                               bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ghmc_softmax_prepass_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& state, int64_t bins,
    double momentum, int64_t ignore_index, const c10::optional<at::Tensor>& weight);
std::tuple<at::Tensor, at::Tensor> ghmc_softmax_scale_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                        const at::Tensor& bin_weights_in, const at::Tensor& stats,
                                                        const at::Tensor& unit_grad, int64_t ignore_index,
                                                        c10::string_view reduction_name, bool compute_grad,
                                                        const c10::optional<at::Tensor>& weight);

// scale_grad.cpp
at::Tensor scale_grad_cpu(const at::Tensor& saved_in, const at::Tensor& grad_output, at::ScalarType dtype);
void scale_grad_inplace_cpu(const at::Tensor& grad, const at::Tensor& grad_output, const at::Tensor& applied_scale);

}  // namespace cpu_impl
}  // namespace fused_losses
