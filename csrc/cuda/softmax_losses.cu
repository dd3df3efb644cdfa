// Host functions of the softmax-family ops softmax_focal_forward, ohem_forward and ib_forward
// (one softmax pass each; OHEM adds a stats pass and the selection in torch ops on the device).
// Conventions: common.cuh; kernels: softmax_kernels.cu.
#include "cuda/softmax.cuh"

namespace fused_losses {
namespace cuda {

// softmax_focal_forward: count pass (for 'mean') + one softmax pass. Traffic per element:
// read the logits once (sizeof(scalar_t)), write the gradient once (sizeof(grad_t): 2 bytes
// for bf16 'mean'/'sum', else 4); per row 8 (count) + 8 bytes of target.
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            const c10::optional<at::Tensor>& alpha_per_class,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction, bool from_logits,
                                                            bool compute_grad, const c10::optional<at::Tensor>& weight,
                                                            double label_smoothing, double epsilon) {
  const DeviceGuard guard(logits_in.device());
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(std::isfinite(epsilon), "epsilon: expected a finite number, got ", epsilon);
  TORCH_CHECK(label_smoothing == 0.0 || from_logits, "label_smoothing: only with from_logits=True");
  const SoftmaxCall call =
      softmax_call(logits_in, target_in, reduction, compute_grad, /*zero_grad=*/!from_logits, "softmax_focal_forward");
  at::Tensor alpha_vec, count;
  if (alpha_per_class.has_value()) alpha_vec = float_vector(*alpha_per_class, call.logits, call.sh.C, "alpha");
  // Per-row weights do not change the 'mean' denominator (mmdet's weight_reduce_loss).
  const at::Tensor weight_vec = weight_vector(weight, call.logits, call.sh.N * call.sh.S);
  if (call.reduction == Reduction::Mean) count = count_valid(call.target, ignore_index, call.sh.C);
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "softmax_focal_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::Focal);
      a.alpha_per_class = alpha_vec.defined() ? alpha_vec.data_ptr<float>() : nullptr;
      a.alpha = static_cast<float>(alpha);
      a.gamma = static_cast<float>(gamma);
      a.weight = data_or_null(weight_vec);
      a.label_smoothing = static_cast<float>(label_smoothing);
      a.epsilon = static_cast<float>(epsilon);
      if (count.defined()) a.count.count_dev = count.data_ptr<int64_t>();
      softmax_pass(a, !from_logits, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

// ohem_forward: stats pass (log p_t per row: read the logits once, write 4 bytes per row;
// without weight or smoothing, whatever the call has),
// selection on the N-sized arrays with torch ops on the device (the reference's sort-rank or
// mmseg-threshold rule, no host read), then the loss/gradient pass over the kept rows (read the
// logits again, write the gradient once).
std::tuple<at::Tensor, at::Tensor> ohem_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   double keep_fraction, int64_t keep_count,
                                                   c10::optional<double> thresh, int64_t min_kept_total,
                                                   int64_t ignore_index, c10::string_view reduction, bool compute_grad,
                                                   const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const DeviceGuard guard(logits_in.device());
  check_label_smoothing(label_smoothing);
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction, compute_grad, false, "ohem_forward");
  const int64_t rows = call.sh.N * call.sh.S;
  // Weights and smoothing act on the kept rows' loss only: the selection below ranks by the
  // unsmoothed CE (or p_t) of the stats pass and ignores weights; 'mean' divides by n_kept.
  const at::Tensor weight_vec = weight_vector(weight, call.logits, rows);
  const at::Tensor log_pt = at::empty({rows}, call.logits.options().dtype(at::kFloat));
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ohem_stats_cuda", [&] {
    SoftmaxArgs<scalar_t> a = softmax_args<scalar_t>(call, ignore_index, SoftmaxLoss::Stats);  // no gradient
    a.reduction = Reduction::None;
    a.grad = nullptr;
    a.loss_rows = nullptr;
    a.log_pt_rows = log_pt.data_ptr<float>();
    softmax_pass(a, false, at::Tensor());
  });
  // Valid rows: not ignored and a class index in [0, C) (an out-of-range target is asserted on by
  // the stats pass and treated as ignored: never kept, not counted). The target is (N, d...):
  // flattened to the rows of log_pt.
  const at::Tensor target_rows = call.target.reshape({-1});
  const at::Tensor valid =
      target_rows.ne(ignore_index).logical_and_(target_rows.ge(0)).logical_and_(target_rows.lt(call.sh.C));
  const at::Tensor n_valid = valid.sum();  // int64, on the device
  at::Tensor kept;
  if (!thresh.has_value()) {
    const at::Tensor k = keep_count > 0 ? at::clamp_max(n_valid, keep_count)
                                        : at::clamp_min(at::floor(n_valid.to(at::kDouble) * keep_fraction).to(at::kLong), 1);
    // Descending cross entropy, ignored rows last, ties to the lower index (stable sort).
    const at::Tensor key = at::where(valid, log_pt.neg(), -std::numeric_limits<float>::infinity());
    const at::Tensor order = std::get<1>(at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/true));
    at::Tensor rank = at::empty_like(order);
    rank.scatter_(0, order, at::arange(rows, order.options()));  // order is a permutation
    kept = rank.lt(k).logical_and_(valid);
  } else {
    const at::Tensor p = log_pt.exp();
    // Ignored rows sort as NaN (last, with NaN valid ones): the first n_valid sorted values are
    // mmseg's sort of the valid rows alone (reference.ohem_kept_mask does the same).
    const at::Tensor p_sorted =
        std::get<0>(at::sort(at::where(valid, p, std::numeric_limits<float>::quiet_NaN()), /*stable=*/true, 0, false));
    const at::Tensor idx = at::clamp_min(at::clamp_max(n_valid - 1, min_kept_total), 0);
    const at::Tensor at_idx = rows > 0 ? p_sorted.gather(0, idx.reshape({1})).squeeze(0) : p.new_zeros({});
    const at::Tensor min_threshold = at::where(n_valid.gt(0), at_idx, at::zeros_like(at_idx));
    const at::Tensor threshold = at::clamp_min(min_threshold, *thresh);
    kept = p.lt(threshold).logical_and_(valid);
  }
  const at::Tensor n_kept = kept.sum();  // int64, on the device
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ohem_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::OhemKept);
      a.kept = kept.data_ptr<bool>();
      a.count.count_dev = n_kept.data_ptr<int64_t>();
      a.weight = data_or_null(weight_vec);
      a.label_smoothing = static_cast<float>(label_smoothing);
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

// ib_forward: one softmax pass on (N, C); per row math::ib_row. 'mean' divides by N.
// Traffic per element: read once, gradient written once (in saved_grad_dtype); per row 8
// (target) + 4 (feature norm) + 4 (feature gradient, always float32) bytes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const at::Tensor& feature_norm_in,
                                                           const c10::optional<at::Tensor>& class_weight_in,
                                                           double alpha, double epsilon, double gamma,
                                                           bool detach_factor, c10::string_view reduction,
                                                           bool compute_grad) {
  const DeviceGuard guard(logits_in.device());
  TORCH_CHECK(logits_in.dim() == 2, "logits: ib takes (N, C) logits, got ", logits_in.sizes());
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction, compute_grad, false, "ib_forward");
  const int64_t N = call.sh.N;
  const at::Tensor feature_norm = float_vector(feature_norm_in, call.logits, N, "feature_norm");
  at::Tensor class_weight;
  if (class_weight_in.has_value()) class_weight = float_vector(*class_weight_in, call.logits, call.sh.C, "weight");
  const at::Tensor grad_feature = at::empty({compute_grad ? N : 0}, call.logits.options().dtype(at::kFloat));
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ib_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      // No ignore_index in IB: a sentinel no class index can equal.
      SoftmaxArgs<scalar_t, grad_t> a =
          softmax_args<scalar_t, grad_t>(call, std::numeric_limits<int64_t>::min(), SoftmaxLoss::IB);
      a.feature_norm = feature_norm.data_ptr<float>();
      a.class_weight = class_weight.defined() ? class_weight.data_ptr<float>() : nullptr;
      a.ib_alpha = static_cast<float>(alpha);
      a.ib_epsilon = static_cast<float>(epsilon);
      a.gamma = static_cast<float>(gamma);
      a.detach_factor = detach_factor;
      a.grad_feature = compute_grad && N > 0 ? grad_feature.data_ptr<float>() : nullptr;
      a.count.count_host = N;
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad, grad_feature};
}

}  // namespace cuda
}  // namespace fused_losses
