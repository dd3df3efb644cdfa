// Host function of distribution_focal_forward (issue #24): one pass of dfl_kernel over the rows of
// (..., n + 1) bin logits (kernels/dfl_kernels.cuh), then the ordered finish of a reduced loss.
// Conventions: common.cuh. Registered here (own TORCH_LIBRARY_IMPL block, csrc/DESIGN.md "Files").
#include "cuda/common.cuh"
#include "cuda/kernels/dfl_kernels.cuh"

namespace fused_losses {
namespace cuda {

namespace {

// The instance for rows of C bins: a lane group of G lanes with ITEMS values each (G * ITEMS >= C),
// or the long-row loop (ITEMS 0) beyond 256 bins.
template <typename scalar_t, typename grad_t>
void launch_dfl(const DflArgs<scalar_t, grad_t>& a, const at::Tensor& reduced) {
  auto run = [&](auto kernel, int64_t rows_per_block) {
    const int64_t blocks = grid_for(kernel, a.M, rows_per_block);
    DflArgs<scalar_t, grad_t> args = a;
    at::Tensor partials;
    if (reduced.defined()) {
      partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
      args.partials = partials.data_ptr<double>();
    }
    FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(args);
    FL_KERNEL_LAUNCH_CHECK();
    if (reduced.defined()) finish_loss(partials, args.count, args.reduction, reduced);
  };
  if (a.C <= 20) {
    run(dfl_kernel<scalar_t, grad_t, 4, 5>, kThreads / 4);  // GFL's 17 bins: 8 rows per warp
  } else if (a.C <= 32) {
    run(dfl_kernel<scalar_t, grad_t, 8, 4>, kThreads / 8);
  } else if (a.C <= 256) {
    run(dfl_kernel<scalar_t, grad_t, 32, 8>, kWarps);
  } else {
    run(dfl_kernel<scalar_t, grad_t, 32, 0>, kWarps);
  }
}

}  // namespace

// distribution_focal_forward: logits (..., n + 1), target (...,) labels in [0, n] (any real dtype:
// converted to float32), weight per row; 'mean' divides by the number of rows.
std::tuple<at::Tensor, at::Tensor> distribution_focal_forward_cuda(const at::Tensor& logits_in,
                                                                 const at::Tensor& target_in,
                                                                 c10::string_view reduction_name, bool compute_grad,
                                                                 const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  check_logits(logits_in, "distribution_focal_forward");
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() >= 1 && logits_in.size(-1) >= 2,
              "logits: expected (..., n + 1) with n + 1 >= 2 bins, got ", logits_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t C = logits.size(-1);
  const int64_t M = logits.numel() / C;
  check_same_device(target_in, logits, "target");
  TORCH_CHECK(target_in.numel() == M, "target: expected ", M, " labels (logits.shape[:-1]), got ", target_in.numel());
  TORCH_CHECK(!target_in.is_complex() && target_in.scalar_type() != at::kBool,
              "target: expected real labels, got ", target_in.scalar_type());
  const at::Tensor target = target_in.to(at::kFloat).contiguous().reshape({-1});
  const at::Tensor weight_vec = weight_vector(weight, logits, M);
  const at::Tensor grad = saved_grad_buffer(logits, compute_grad, false, reduction);
  const at::Tensor loss =
      reduction == Reduction::None
          ? at::empty(logits.sizes().slice(0, logits.dim() - 1), logits.options())
          : at::empty({}, logits.options().dtype(at::promote_types(logits.scalar_type(), at::kFloat)));
  const at::Tensor reduced = reduction == Reduction::None ? at::Tensor() : loss;
  if (M == 0) {
    if (reduced.defined()) reduced.zero_();
    return {loss, grad};
  }
  FL_DISPATCH_CUDA_FLOATING_TYPES(logits.scalar_type(), "distribution_focal_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      DflArgs<scalar_t, grad_t> a;
      a.logits = data_of<scalar_t>(logits);
      a.target = target.data_ptr<float>();
      a.weight = data_or_null(weight_vec);
      a.M = M;
      a.C = C;
      a.reduction = reduction;
      a.count.count_host = M;
      a.grad = compute_grad ? data_of<grad_t>(grad) : nullptr;
      a.loss_rows = reduction == Reduction::None ? data_of<scalar_t>(loss) : nullptr;
      launch_dfl(a, reduced);
    });
  });
  return {loss, grad};
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(FL_OPS_NAMESPACE, FL_KERNEL_DISPATCH_KEY, m) {
  m.impl("distribution_focal_forward", &cuda::distribution_focal_forward_cuda);
}

}  // namespace fused_losses
