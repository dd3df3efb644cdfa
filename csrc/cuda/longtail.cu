// Seesaw and EQLv2 (issue #25), host side (kernels: kernels/longtail_kernels.cuh). The state
// updates (Seesaw's counts before the loss, EQLv2's statistics after it) are torch ops on the
// device in fused_losses/_longtail.py; these ops only read the state. Nothing is read on the
// host (no sync): the 'mean' counts are made by count kernels and read by the loss kernels.
// Conventions: common.cuh.
#include "cuda/common.cuh"
#include "cuda/kernels/longtail_kernels.cuh"

namespace fused_losses {
namespace cuda {

namespace {

at::Tensor optional_weight(const c10::optional<at::Tensor>& weight, const at::Tensor& logits, int64_t allowed_a,
                           int64_t allowed_b) {
  if (!weight.has_value()) return at::Tensor();
  check_same_device(*weight, logits, "weight");
  const at::Tensor w = weight->to(at::kFloat).contiguous().reshape({-1});
  TORCH_CHECK(w.numel() == allowed_a || w.numel() == allowed_b, "weight: expected ", allowed_a,
              allowed_a == allowed_b ? "" : " or " + std::to_string(allowed_b), " values, got ", w.numel());
  return w;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> seesaw_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                 const at::Tensor& cum_samples, double p, double q,
                                                                 double eps, bool objectness, int64_t ignore_index,
                                                                 c10::string_view reduction_name, bool compute_grad,
                                                                 const c10::optional<at::Tensor>& weight, bool split) {
  const DeviceGuard guard(logits_in.device());
  check_logits(logits_in, "seesaw_forward");
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() == 2, "logits: expected (N, C) rows, got ", logits_in.dim(), " dims");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), Ct = logits.size(1);
  const int64_t C = Ct - (objectness ? 2 : 0);
  TORCH_CHECK(C >= 1, "logits: expected at least ", objectness ? 3 : 1, " columns, got ", Ct);
  check_same_device(cum_samples, logits, "cum_samples");
  TORCH_CHECK(cum_samples.scalar_type() == at::kFloat && cum_samples.dim() == 1 &&
                  cum_samples.numel() == C + (objectness ? 1 : 0),
              "cum_samples: expected a float32 tensor of shape (", C + (objectness ? 1 : 0), ",)");
  const at::Tensor target = index_target(target_in, logits);
  TORCH_CHECK(target.numel() == N, "target: expected ", N, " labels, got ", target.numel());
  const at::Tensor weight_vec = optional_weight(weight, logits, N, N);
  const at::Tensor log_n = cum_samples.slice(0, 0, C).clamp_min(1.0).log().contiguous();  // (C,) on the device
  at::Tensor counts = at::zeros({2}, logits.options().dtype(at::kLong));
  CountSpec fg_spec, valid_spec;
  fg_spec.target = valid_spec.target = N > 0 ? target.data_ptr<int64_t>() : nullptr;
  fg_spec.ignore_index = valid_spec.ignore_index = ignore_index;
  fg_spec.upper = C;
  valid_spec.upper = C + (objectness ? 1 : 0);
  count_valid_into(counts.data_ptr<int64_t>(), fg_spec, N);
  count_valid_into(counts.data_ptr<int64_t>() + 1, valid_spec, N);
  const at::Tensor grad = saved_grad_buffer(logits, compute_grad, false, reduction);
  const at::TensorOptions reduced = logits.options().dtype(at::kFloat);
  at::Tensor loss, loss_obj = at::empty({0}, reduced);
  if (reduction == Reduction::None) {
    loss = at::zeros({N}, logits.options());
    if (split && objectness) loss_obj = at::zeros({N}, logits.options());
  } else {
    loss = at::empty({}, reduced);
    if (split && objectness) loss_obj = at::empty({}, reduced);
  }
  FL_DISPATCH_CUDA_FLOATING_TYPES(logits.scalar_type(), "seesaw_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SeesawArgs<scalar_t, grad_t> a;
      a.logits = N > 0 ? data_of<scalar_t>(logits) : nullptr;
      a.target = N > 0 ? target.data_ptr<int64_t>() : nullptr;
      a.log_n = log_n.data_ptr<float>();
      a.weight = weight_vec.defined() ? weight_vec.data_ptr<float>() : nullptr;
      a.counts = counts.data_ptr<int64_t>();
      a.grad = compute_grad && N > 0 ? data_of<grad_t>(grad) : nullptr;
      a.N = N;
      a.C = C;
      a.Ct = Ct;
      a.ignore_index = ignore_index;
      a.p = static_cast<float>(p);
      a.q = static_cast<float>(q);
      a.eps = static_cast<float>(eps);
      a.objectness = objectness;
      a.mean = reduction == Reduction::Mean;
      a.split = split && objectness;
      const auto kernel = seesaw_kernel<scalar_t, grad_t>;
      const int64_t blocks = grid_for(kernel, N, 1);
      at::Tensor partials;
      if (reduction == Reduction::None) {
        a.loss_rows = N > 0 ? data_of<scalar_t>(loss) : nullptr;
        a.obj_rows = a.split && N > 0 ? data_of<scalar_t>(loss_obj) : nullptr;
      } else {
        partials = at::zeros({2, blocks}, logits.options().dtype(at::kDouble));
        a.partials = partials.data_ptr<double>();
      }
      if (N > 0) {
        FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(a);
        FL_KERNEL_LAUNCH_CHECK();
      }
      if (reduction != Reduction::None) {
        FL_LAUNCH(1, 1, 0, current_stream(), seesaw_finish_kernel<>)(
            a.partials, blocks, a.counts, a.mean, objectness, a.split, loss.data_ptr<float>(),
            a.split ? loss_obj.data_ptr<float>() : nullptr);
        FL_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {loss, loss_obj, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> eqlv2_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                const at::Tensor& state, double gamma, double mu,
                                                                double alpha, bool objectness, int64_t ignore_index,
                                                                c10::string_view reduction_name, bool compute_grad,
                                                                const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  check_logits(logits_in, "eqlv2_forward");
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t Ct = logits.size(-1);
  const int64_t C = Ct - (objectness ? 1 : 0);
  TORCH_CHECK(C >= 1, "logits: expected at least ", objectness ? 2 : 1, " columns, got ", Ct);
  const int64_t M = logits.numel() / Ct;
  check_same_device(state, logits, "state");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.dim() == 2 && state.size(0) == 3 && state.size(1) == C,
              "state: expected a float32 tensor of shape (3, ", C, ")");
  const at::Tensor target = index_target(target_in, logits);
  TORCH_CHECK(target.numel() == M, "target: expected ", M, " labels, got ", target.numel());
  const at::Tensor weight_vec = optional_weight(weight, logits, M, M * Ct);
  const at::Tensor pos_neg = state.select(0, 2).contiguous();
  at::Tensor count = count_valid(target, ignore_index, C + 1);
  const at::Tensor grad = saved_grad_buffer(logits, compute_grad, false, reduction);
  const int64_t chunks = (M + kEqlRows - 1) / kEqlRows;
  at::Tensor stat_partials = at::empty({chunks, 2 * C}, logits.options().dtype(at::kFloat));
  at::Tensor stats = at::zeros({2, C}, logits.options().dtype(at::kDouble));
  at::Tensor loss = reduction == Reduction::None ? at::empty(logits.sizes(), logits.options())
                                                 : at::empty({}, logits.options().dtype(at::kFloat));
  at::Tensor loss_partials = at::zeros({chunks > 0 ? chunks : 1}, logits.options().dtype(at::kDouble));
  FL_DISPATCH_CUDA_FLOATING_TYPES(logits.scalar_type(), "eqlv2_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      Eqlv2Args<scalar_t, grad_t> a;
      a.logits = M > 0 ? data_of<scalar_t>(logits) : nullptr;
      a.target = M > 0 ? target.data_ptr<int64_t>() : nullptr;
      a.pos_neg = pos_neg.data_ptr<float>();
      a.weight = weight_vec.defined() ? weight_vec.data_ptr<float>() : nullptr;
      a.weight_per_element = weight_vec.defined() && weight_vec.numel() == M * Ct && Ct > 1;
      a.count = count.data_ptr<int64_t>();
      a.grad = compute_grad && M > 0 ? data_of<grad_t>(grad) : nullptr;
      a.loss_elements = reduction == Reduction::None && M > 0 ? data_of<scalar_t>(loss) : nullptr;
      a.loss_partials = loss_partials.data_ptr<double>();
      a.stat_partials = M > 0 ? stat_partials.data_ptr<float>() : nullptr;
      a.M = M;
      a.C = C;
      a.Ct = Ct;
      a.ignore_index = ignore_index;
      a.gamma = static_cast<float>(gamma);
      a.mu = static_cast<float>(mu);
      a.alpha = static_cast<float>(alpha);
      a.mean = reduction == Reduction::Mean;
      if (chunks > 0) {
        FL_LAUNCH(chunks, kThreads, 0, current_stream(), eqlv2_kernel<scalar_t, grad_t>)(a);
        FL_KERNEL_LAUNCH_CHECK();
        const auto stats_kernel = eqlv2_stats_kernel<>;
        FL_LAUNCH(grid_for(stats_kernel, 2 * C, kThreads), kThreads, 0, current_stream(), stats_kernel)(
            stat_partials.data_ptr<float>(), chunks, 2 * C, stats.data_ptr<double>());
        FL_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  if (reduction != Reduction::None) {
    MeanCount mc;
    mc.count_dev = count.data_ptr<int64_t>();
    finish_loss(loss_partials, mc, reduction, loss);
  }
  return {loss, grad, stats};
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(FL_OPS_NAMESPACE, FL_KERNEL_DISPATCH_KEY, m) {
  m.impl("seesaw_forward", &cuda::seesaw_forward_cuda);
  m.impl("eqlv2_forward", &cuda::eqlv2_forward_cuda);
}

}  // namespace fused_losses
