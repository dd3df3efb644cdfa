// Softmax family of the fused_losses CUDA kernels (focal, OHEM, IB, softmax GHM-C): the
// host-side set-up shared by the ops. The kernels and their arguments (SoftmaxArgs) are in
// kernels/softmax_kernels.cuh (no ATen); softmax_pass is in softmax_kernels.cu (compiled once, explicitly instantiated below), the op
// host functions in softmax_losses.cu and ghmc.cu.
#pragma once

#include "cuda/common.cuh"
#include "cuda/kernels/softmax_kernels.cuh"

namespace fused_losses {
namespace cuda {


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
  a.logits = data_of<scalar_t>(call.logits);
  a.target = call.target.data_ptr<int64_t>();
  a.N = call.sh.N;
  a.C = call.sh.C;
  a.S = call.sh.S;
  a.ignore_index = ignore_index;
  a.loss = loss;
  a.reduction = call.reduction;
  a.grad = loss != SoftmaxLoss::Stats && call.grad.numel() > 0 ? data_of<grad_t>(call.grad) : nullptr;
  a.loss_rows = call.reduction == Reduction::None && call.loss.numel() > 0 ? data_of<scalar_t>(call.loss) : nullptr;
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
extern template void softmax_pass<fl_half, float>(SoftmaxArgs<fl_half, float>, bool, const at::Tensor&);
extern template void softmax_pass<fl_bf16, float>(SoftmaxArgs<fl_bf16, float>, bool, const at::Tensor&);
extern template void softmax_pass<fl_bf16, fl_bf16>(SoftmaxArgs<fl_bf16, fl_bf16>, bool,
                                                              const at::Tensor&);

}  // namespace cuda
}  // namespace fused_losses
