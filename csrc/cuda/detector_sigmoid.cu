// Host code of the sigmoid-type detector losses (issue #24: quality focal, varifocal,
// asymmetric): detector_sigmoid_forward (csrc/op_schemas.h). Kernels:
// kernels/detector_sigmoid_kernels.cuh; the set-up (contiguous aligned logits and target, labels,
// the device-side count of valid rows) is the sigmoid family's sigmoid_call (sigmoid.cu).
// Conventions: common.cuh (no host sync, no float atomics).
// sigmoid.cuh first: it includes ATen (common.cuh), which must come before the kernel headers
// (under the emulator they end with cuda_emu.h, after every host header).
#include "cuda/sigmoid.cuh"
#include "cuda/kernels/detector_sigmoid_kernels.cuh"

namespace fused_losses {
namespace cuda {

namespace {

int parse_detector_kind(c10::string_view name) {
  if (name == "quality_focal") return lm::kQualityFocal;
  if (name == "varifocal") return lm::kVarifocal;
  if (name == "asymmetric") return lm::kAsymmetric;
  TORCH_CHECK(false, "loss: expected 'quality_focal', 'varifocal' or 'asymmetric', got '", std::string(name), "'");
}

template <typename scalar_t, typename target_t, typename grad_t, bool kLabels>
void launch_detector(DetectorArgs<scalar_t, target_t, grad_t> a, bool per_row, const at::Tensor& reduced) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (a.numel == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  TORCH_INTERNAL_ASSERT(a.grad == nullptr || aligned_to(a.grad, VEC * sizeof(grad_t)),
                        "fused_losses: misaligned gradient buffer");
  if (per_row) {  // quality focal 'none'
    auto kernel = detector_row_kernel<scalar_t, target_t, grad_t, kLabels>;
    const int64_t blocks = grid_for(kernel, a.M, kWarps);
    FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(a);
    FL_KERNEL_LAUNCH_CHECK();
    return;
  }
  auto kernel = detector_sigmoid_kernel<scalar_t, target_t, grad_t, kLabels>;
  const int64_t blocks = grid_for(kernel, a.numel, static_cast<int64_t>(kThreads) * VEC);
  at::Tensor partials;
  if (reduced.defined()) {
    partials = at::empty({blocks}, reduced.options().dtype(at::kDouble));
    a.partials = partials.data_ptr<double>();
  }
  FL_LAUNCH(blocks, kThreads, 0, current_stream(), kernel)(a);
  FL_KERNEL_LAUNCH_CHECK();
  if (reduced.defined()) finish_loss(partials, a.count, a.reduction, reduced);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> detector_sigmoid_forward_cuda(
    const at::Tensor& logits_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& score_in,
    c10::string_view loss_name, double p0, double p1, double p2, double p3, int64_t flags, int64_t ignore_index,
    c10::string_view reduction_name, bool compute_grad, const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  const int kind = parse_detector_kind(loss_name);
  const Reduction reduction = parse_reduction(reduction_name);
  const bool labels = !target_in.is_floating_point();
  TORCH_CHECK(!(labels && kind == lm::kAsymmetric), "target: asymmetric takes a float (multi-hot or soft) target");
  const SigmoidCall call =
      sigmoid_call(logits_in, target_in, ignore_index, reduction == Reduction::Mean, "detector_sigmoid_forward");
  at::Tensor score_vec;
  if (labels) {
    TORCH_CHECK(score_in.has_value(), "score: integer labels need a score (the quality at the label's class)");
    score_vec = float_vector(*score_in, call.logits, call.M, "score");
  } else {
    TORCH_CHECK(!score_in.has_value(), "score: only with integer labels");
  }
  const at::Tensor weight_vec = sigmoid_weight(weight, call);
  const bool per_row_loss = kind == lm::kQualityFocal;
  at::Tensor grad = saved_grad_buffer(call.logits, compute_grad, false, reduction);
  at::Tensor loss;
  if (reduction == Reduction::None) {
    loss = per_row_loss ? at::empty(logits_in.sizes().slice(0, logits_in.dim() - 1), call.logits.options())
                        : at::empty(logits_in.sizes(), call.logits.options());
  } else {
    loss = at::empty({}, call.logits.options().dtype(at::kFloat));
  }
  const at::Tensor reduced = reduction == Reduction::None ? at::Tensor() : loss;
  MeanCount count;
  if (call.count.defined()) {
    count.count_dev = call.count.data_ptr<int64_t>();
    count.count_mult = per_row_loss ? 1 : call.C;
  } else {
    count.count_host = per_row_loss ? call.M : call.M * call.C;
  }
  lm::DetectorParams<float> params{};
  params.flags = static_cast<int>(flags);
  params.p0 = static_cast<float>(p0);
  params.p1 = static_cast<float>(p1);
  params.p2 = static_cast<float>(p2);
  params.p3 = static_cast<float>(p3);
  params.log_eps = p3 > 0 ? static_cast<float>(std::log(p3)) : 0.0f;
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "detector_sigmoid_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      auto fill = [&](auto& a) {
        a.logits = data_of<scalar_t>(call.logits);
        a.M = call.M;
        a.C = call.C;
        a.numel = call.logits.numel();
        a.ignore_index = ignore_index;
        a.kind = kind;
        a.params = params;
        a.reduction = reduction;
        a.count = count;
        a.weight = data_or_null(weight_vec);
        a.weight_per_element = weight_vec.defined() && weight_vec.numel() == call.M * call.C && call.C != 1;
        a.grad = compute_grad && a.numel > 0 ? data_of<grad_t>(grad) : nullptr;
        a.loss_out = reduction == Reduction::None && a.numel > 0 ? data_of<scalar_t>(loss) : nullptr;
      };
      if (labels) {
        DetectorArgs<scalar_t, float, grad_t> a;
        fill(a);
        a.labels = call.labels.data_ptr<int64_t>();
        a.score = data_or_null(score_vec);
        launch_detector<scalar_t, float, grad_t, true>(a, per_row_loss && reduction == Reduction::None, reduced);
      } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
        DetectorArgs<scalar_t, scalar_t, grad_t> a;
        fill(a);
        a.target = data_of<scalar_t>(call.float_target);
        launch_detector<scalar_t, scalar_t, grad_t, false>(a, per_row_loss && reduction == Reduction::None, reduced);
      } else {
        if constexpr (!std::is_same_v<scalar_t, float>) {
          DetectorArgs<scalar_t, float, grad_t> a;
          fill(a);
          a.target = call.float_target.data_ptr<float>();
          launch_detector<scalar_t, float, grad_t, false>(a, per_row_loss && reduction == Reduction::None, reduced);
        }
      }
    });
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(FL_OPS_NAMESPACE, FL_KERNEL_DISPATCH_KEY, m) {
  m.impl("detector_sigmoid_forward", &detector_sigmoid_forward_cuda);
}

}  // namespace cuda
}  // namespace fused_losses
