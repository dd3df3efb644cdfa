// Host code of the sigmoid family (the kernel: kernels/sigmoid_kernels.cuh) and of
// sigmoid_focal_forward; the GHM-C sigmoid forward reuses sigmoid_forward (ghmc.cu).
// Conventions: common.cuh.
#include "cuda/sigmoid.cuh"

namespace fused_losses {
namespace cuda {


SigmoidCall sigmoid_call(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index, bool need_count,
                         const char* op) {
  SigmoidCall call;
  check_logits(logits_in, op);
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  call.logits = aligned_contiguous(logits_in, 16);
  call.C = call.logits.size(-1);
  call.M = call.C == 0 ? 0 : call.logits.numel() / call.C;
  if (target_in.is_floating_point()) {
    check_same_device(target_in, logits_in, "target");
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "target: a float target must have the logits' shape");
    const at::ScalarType td = target_in.scalar_type() == call.logits.scalar_type() ? target_in.scalar_type() : at::kFloat;
    const size_t vec = 16 / call.logits.element_size();
    call.float_target = aligned_contiguous(target_in.to(td), vec * at::elementSize(td));
  } else {
    call.labels = index_target(target_in, logits_in);
    TORCH_CHECK(call.labels.numel() == call.M, "target: integer labels must have shape logits.shape[:-1]");
    if (need_count) call.count = count_valid(call.labels, ignore_index, call.C + 1);
  }
  return call;
}

at::Tensor sigmoid_weight(const c10::optional<at::Tensor>& weight, const SigmoidCall& call) {
  return weight_vector(weight, call.logits, call.M, call.M * call.C);
}

MeanCount sigmoid_mean_count(const SigmoidCall& call) {
  MeanCount c;
  if (call.count.defined()) {
    c.count_dev = call.count.data_ptr<int64_t>();
    c.count_mult = call.C;
  } else {
    c.count_host = call.M * call.C;
  }
  return c;
}

// a.grad (a fresh buffer, or nullptr) is aligned for any pack: the CUDA caching allocator
// returns blocks aligned to far more than the 32 bytes of a Pack<float, 8>.
// One launch of a pack kernel (sigmoid_kernel or sigmoid_focal_kernel: a thread per 16-byte pack,
// grid-stride): the grid, the per-block partial sums of a reduced loss and their ordered finish.
template <typename Kernel, typename scalar_t, typename target_t, typename grad_t>
void launch_pack_kernel(Kernel kernel, SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (a.numel == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  const int64_t blocks = grid_for(kernel, a.numel, static_cast<int64_t>(kThreads) * VEC);
  at::Tensor partials;
  if (reduced.defined()) {
    partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
    a.partials = partials.data_ptr<double>();
  }
  TORCH_INTERNAL_ASSERT(a.grad == nullptr || aligned_to(a.grad, VEC * sizeof(grad_t)),
                        "fused_losses: misaligned gradient buffer");
  FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(a);
  FL_KERNEL_LAUNCH_CHECK();
  if (reduced.defined()) finish_loss(partials, a.count, a.reduction, reduced);
}

template <bool kLabels, bool kExtras, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid_kernel(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  launch_pack_kernel(sigmoid_kernel<scalar_t, target_t, grad_t, kLabels, kExtras>, a, reduced);
}

// The plain sigmoid focal loss: sigmoid_focal_kernel with gamma 0 / 2 compiled in, or any gamma.
template <bool kLabels, int kGamma, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid_focal_kernel(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  launch_pack_kernel(sigmoid_focal_kernel<scalar_t, target_t, grad_t, kLabels, kGamma>, a, reduced);
}

template <bool kLabels, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  if (a.alpha_per_class != nullptr || a.weight != nullptr || a.epsilon != 0.0f) {  // Poly-1 (#24): extras
    launch_sigmoid_kernel<kLabels, true>(a, reduced);
  } else if (a.loss != SigmoidLoss::Focal || a.numel == 0 || a.numel >= (int64_t(1) << 31) ||
             (kLabels && a.C < 16 / static_cast<int64_t>(sizeof(scalar_t)))) {
    launch_sigmoid_kernel<kLabels, false>(a, reduced);
  } else if (a.gamma == 2.0f) {
    launch_sigmoid_focal_kernel<kLabels, 2>(a, reduced);
  } else if (a.gamma == 0.0f) {
    launch_sigmoid_focal_kernel<kLabels, 0>(a, reduced);
  } else {
    launch_sigmoid_focal_kernel<kLabels, -1>(a, reduced);
  }
}

std::tuple<at::Tensor, at::Tensor> sigmoid_forward(const SigmoidCall& call, const at::Tensor& logits_in,
                                                  int64_t ignore_index, Reduction reduction, bool compute_grad,
                                                  const SigmoidLossParams& params) {
  at::Tensor grad = saved_grad_buffer(call.logits, compute_grad, false, reduction);
  at::Tensor loss = reduction == Reduction::None
                        ? at::empty(logits_in.sizes(), call.logits.options())
                        : at::empty({}, call.logits.options().dtype(at::promote_types(call.logits.scalar_type(), at::kFloat)));
  const at::Tensor reduced = reduction == Reduction::None ? at::Tensor() : loss;
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "sigmoid_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      auto fill = [&](auto& a) {
        a.logits = data_of<scalar_t>(call.logits);
        a.M = call.M;
        a.C = call.C;
        a.numel = call.logits.numel();
        a.ignore_index = ignore_index;
        a.reduction = reduction;
        a.count = params.count.count_dev != nullptr ? params.count : sigmoid_mean_count(call);
        a.grad = compute_grad && a.numel > 0 ? data_of<grad_t>(grad) : nullptr;
        a.loss_elems = reduction == Reduction::None && a.numel > 0 ? data_of<scalar_t>(loss) : nullptr;
        a.loss = params.loss;
        a.alpha = params.alpha;
        a.gamma = params.gamma;
        a.bin_weights = params.bin_weights;
        a.bins = params.bins;
        a.alpha_per_class = params.alpha_per_class;
        a.weight = params.weight;
        a.weight_per_element = params.weight_per_element;
        a.epsilon = params.epsilon;
      };
      if (call.labels.defined()) {
        SigmoidArgs<scalar_t, float, grad_t> a;
        fill(a);
        a.labels = call.labels.data_ptr<int64_t>();
        launch_sigmoid<true>(a, reduced);
      } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
        SigmoidArgs<scalar_t, scalar_t, grad_t> a;
        fill(a);
        a.target = data_of<scalar_t>(call.float_target);
        launch_sigmoid<false>(a, reduced);
      } else {
        if constexpr (!std::is_same_v<scalar_t, float>) {
          SigmoidArgs<scalar_t, float, grad_t> a;
          fill(a);
          a.target = call.float_target.data_ptr<float>();
          launch_sigmoid<false>(a, reduced);
        }
      }
    });
  });
  return {loss, grad};
}

// sigmoid_focal_forward: one elementwise pass (+ the label count for 'mean').
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                            double alpha, double gamma, int64_t ignore_index,
                                                            c10::string_view reduction_name, bool compute_grad,
                                                            const c10::optional<at::Tensor>& alpha_per_class,
                                                            const c10::optional<at::Tensor>& weight, double epsilon) {
  const DeviceGuard guard(logits_in.device());
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(std::isfinite(epsilon), "epsilon: expected a finite number, got ", epsilon);
  const SigmoidCall call =
      sigmoid_call(logits_in, target_in, ignore_index, reduction == Reduction::Mean, "sigmoid_focal_forward");
  // Weights leave the 'mean' denominator unchanged (every element of a valid row).
  const at::Tensor weight_vec = sigmoid_weight(weight, call);
  at::Tensor alpha_vec;
  if (alpha_per_class.has_value()) alpha_vec = float_vector(*alpha_per_class, call.logits, call.C, "alpha");
  SigmoidLossParams params;
  params.loss = SigmoidLoss::Focal;
  params.alpha = static_cast<float>(alpha);
  params.gamma = static_cast<float>(gamma);
  params.alpha_per_class = data_or_null(alpha_vec);
  params.weight = data_or_null(weight_vec);
  params.weight_per_element = weight_vec.defined() && weight_vec.numel() == call.M * call.C && call.C != 1;
  params.epsilon = static_cast<float>(epsilon);
  return sigmoid_forward(call, logits_in, ignore_index, reduction, compute_grad, params);
}

}  // namespace cuda
}  // namespace fused_losses
