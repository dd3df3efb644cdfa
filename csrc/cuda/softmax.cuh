// Softmax family of the fused_losses CUDA kernels (focal, OHEM, IB, softmax GHM-C): the
// arguments of a softmax pass and the host-side set-up shared by the ops. The kernels and
// softmax_pass are in softmax_kernels.cu (compiled once, explicitly instantiated below), the op
// host functions in softmax_losses.cu and ghmc.cu.
#pragma once

#include "cuda/common.cuh"

namespace fused_losses {
namespace cuda {

// What a softmax-row kernel computes per active row from l = log p_t, p_t and 1 - p_t (each
// from the row's sums: log p_t = math::log_softmax_target_sums, 1 - p_t = sum_others / s):
//   Focal:    loss = alpha_t (1 - p_t)^gamma (-l),  k = scale * alpha_t * dFocal/dl
//             (math::focal_term_parts)
//   IB:       loss, k = scale * dloss/dl, d/dfeature from math::ib_row
//   OhemKept: loss = -l, k = -scale                      (rows of the `kept` mask only)
//   Ghmc:     loss = w[bin(1 - p_t)] (-l), k = -scale * w
//   Stats:    no loss; log p_t (and 1 - p_t) per row are the outputs
// and the gradient of every one is grad_c = k * ([c == t] - p_c) (losses_math.h), its target
// column k * (1 - p_t).
// Drop-in extras (csrc/op_schemas.h) run the kExtras instances of the warp-per-row and the
// channel-second sweep kernels (the plain instances compile them out): a per-row `weight` w
// multiplies loss and k (w == 0 makes the row inactive: exactly 0 loss and gradient, its
// logits never read); `label_smoothing` eps > 0 (Focal, OhemKept, Ghmc) adds a sweep, and its
// gradient is not of the k form (softmax_kernels.cu, "Label smoothing").
enum class SoftmaxLoss : int { Focal, IB, OhemKept, Ghmc, Stats };

// grad_t: element type of the gradient output (float, or at::BFloat16 for bf16 logits with a
// reduced loss; see dispatch_grad_t).
template <typename scalar_t, typename grad_t = float>
struct SoftmaxArgs {
  const scalar_t* logits = nullptr;  // (N, C, S) contiguous
  const int64_t* target = nullptr;   // (N * S,)
  int64_t N = 0, C = 0, S = 1;
  int64_t ignore_index = 0;
  SoftmaxLoss loss = SoftmaxLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  // Focal (gamma also serves IB-focal)
  const float* alpha_per_class = nullptr;
  float alpha = 1.0f, gamma = 0.0f;
  // IB
  const float* feature_norm = nullptr;
  const float* class_weight = nullptr;
  float ib_alpha = 0.0f, ib_epsilon = 0.0f;
  bool detach_factor = false;
  // OHEM
  const bool* kept = nullptr;
  // GHM-C
  const float* bin_weights = nullptr;
  int64_t bins = 1;
  // Drop-in extras: weight (N * S,) per row or nullptr; label smoothing eps (0: none).
  const float* weight = nullptr;
  float label_smoothing = 0.0f;
  // Outputs, nullptr when not wanted.
  grad_t* grad = nullptr;          // (N, C, S), the saved gradient (saved_grad_dtype)
  scalar_t* loss_rows = nullptr;   // 'none': (N * S,)
  float* log_pt_rows = nullptr;    // Stats: (N * S,), 0 for inactive rows
  float* one_minus_pt_rows = nullptr;  // Stats: (N * S,) 1 - p_t = sum_others / s, 0 for inactive rows
  float* grad_feature = nullptr;   // IB: (N,)
  double* partials = nullptr;      // 'mean'/'sum': one per block
};

struct SoftmaxShape {
  int64_t N, C, S;
};

// (N, C, S) view of (N, C, d...) logits, S = prod(d...).
SoftmaxShape softmax_shape(const at::Tensor& logits);

// The common set-up of the softmax-family ops: contiguous logits, int64 target, outputs.
struct SoftmaxCall {
  at::Tensor logits, target, grad, loss;
  SoftmaxShape sh;
  Reduction reduction;
};

SoftmaxCall softmax_call(const at::Tensor& logits_in, const at::Tensor& target_in, c10::string_view reduction_name,
                         bool compute_grad, bool zero_grad, const char* op);

// Arguments of a softmax pass over the call's logits. grad_t must be the element type of
// call.grad (dispatch_grad_t), except for Stats passes, which never write a gradient (grad_t =
// float, a.grad = nullptr whatever call.grad is).
template <typename scalar_t, typename grad_t = float>
SoftmaxArgs<scalar_t, grad_t> softmax_args(const SoftmaxCall& call, int64_t ignore_index, SoftmaxLoss loss) {
  SoftmaxArgs<scalar_t, grad_t> a;
  a.logits = call.logits.data_ptr<scalar_t>();
  a.target = call.target.data_ptr<int64_t>();
  a.N = call.sh.N;
  a.C = call.sh.C;
  a.S = call.sh.S;
  a.ignore_index = ignore_index;
  a.loss = loss;
  a.reduction = call.reduction;
  a.grad = loss != SoftmaxLoss::Stats && call.grad.numel() > 0 ? call.grad.data_ptr<grad_t>() : nullptr;
  a.loss_rows = call.reduction == Reduction::None && call.loss.numel() > 0 ? call.loss.data_ptr<scalar_t>() : nullptr;
  return a;
}

inline at::Tensor reduced_output(const SoftmaxCall& call) {
  return call.reduction == Reduction::None ? at::Tensor() : call.loss;
}

// One pass of the softmax kernels over a's rows (the kernel instance chosen from the shape,
// the alignment and from_probs), then the final reduction into `reduced` when it is defined
// ('mean'/'sum'). Instantiated in softmax_kernels.cu for the four (scalar_t, grad_t) pairs.
template <typename scalar_t, typename grad_t>
void softmax_pass(SoftmaxArgs<scalar_t, grad_t> a, bool from_probs, const at::Tensor& reduced);

extern template void softmax_pass<float, float>(SoftmaxArgs<float, float>, bool, const at::Tensor&);
extern template void softmax_pass<at::Half, float>(SoftmaxArgs<at::Half, float>, bool, const at::Tensor&);
extern template void softmax_pass<at::BFloat16, float>(SoftmaxArgs<at::BFloat16, float>, bool, const at::Tensor&);
extern template void softmax_pass<at::BFloat16, at::BFloat16>(SoftmaxArgs<at::BFloat16, at::BFloat16>, bool,
                                                              const at::Tensor&);

}  // namespace cuda
}  // namespace fused_losses
