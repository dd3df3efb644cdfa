// The launcher of the softmax-family kernels (kernels/softmax_kernels.cuh): softmax_pass, which
// picks (softmax_launch_for) and launches one of them, and the shared host set-up.
// Conventions: common.cuh; the per-loss host code: softmax_losses.cu, ghmc.cu.
#include "cuda/softmax.cuh"

namespace fused_losses {
namespace cuda {


template <typename scalar_t, typename grad_t>
void softmax_pass(SoftmaxArgs<scalar_t, grad_t> a, bool from_probs, const at::Tensor& reduced) {
  using Launch = SoftmaxLaunch<scalar_t, grad_t>;
  const int64_t rows = a.N * a.S;
  if (rows == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  TORCH_INTERNAL_ASSERT(!(a.label_smoothing > 0.0f && from_probs), "fused_losses: label smoothing needs logits");
  const Launch launch = softmax_launch_for(a, from_probs);
  const int64_t blocks = grid_for(launch.kernel, rows, launch.rows_per_block);
  at::Tensor partials;
  if (reduced.defined()) {
    partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
    a.partials = partials.data_ptr<double>();
  }
  FL_LAUNCH(blocks, kThreads, 0, current_stream(), launch.kernel)(a);
  FL_KERNEL_LAUNCH_CHECK();
  if (reduced.defined()) finish_loss(partials, a.count, a.reduction, reduced);
}

SoftmaxShape softmax_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 2, "logits: expected (N, C) or (N, C, d...), got ", logits.sizes());
  int64_t s = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) s *= logits.size(d);
  return {logits.size(0), logits.size(1), s};
}

SoftmaxCall softmax_call(const at::Tensor& logits_in, const at::Tensor& target_in, c10::string_view reduction_name,
                         bool compute_grad, bool zero_grad, const char* op) {
  SoftmaxCall call;
  check_logits(logits_in, op);
  call.reduction = parse_reduction(reduction_name);
  call.logits = logits_in.contiguous();
  call.sh = softmax_shape(call.logits);
  call.target = index_target(target_in, logits_in);
  TORCH_CHECK(call.target.numel() == call.sh.N * call.sh.S, "target: expected ", call.sh.N * call.sh.S,
              " class indices, got ", call.target.numel());
  call.grad = saved_grad_buffer(call.logits, compute_grad, zero_grad, call.reduction);
  call.loss = call.reduction == Reduction::None
                  ? at::empty(target_in.sizes(), call.logits.options())
                  : at::empty({}, call.logits.options().dtype(at::promote_types(call.logits.scalar_type(), at::kFloat)));
  return call;
}

template void softmax_pass<float, float>(SoftmaxArgs<float, float>, bool, const at::Tensor&);
template void softmax_pass<fl_half, float>(SoftmaxArgs<fl_half, float>, bool, const at::Tensor&);
template void softmax_pass<fl_bf16, float>(SoftmaxArgs<fl_bf16, float>, bool, const at::Tensor&);
template void softmax_pass<fl_bf16, fl_bf16>(SoftmaxArgs<fl_bf16, fl_bf16>, bool,
                                                       const at::Tensor&);

}  // namespace cuda
}  // namespace fused_losses
