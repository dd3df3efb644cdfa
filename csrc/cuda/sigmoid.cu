// Sigmoid-family kernel of fused_losses (elementwise over (M, C), 16-byte packs) and the host
// code of sigmoid_focal_forward; the GHM-C sigmoid forward reuses sigmoid_forward (ghmc.cu).
// Conventions: common.cuh.
#include "cuda/sigmoid.cuh"

namespace fused_losses {
namespace cuda {

// Element loss and gradient (gradient already scaled):
//   Focal: math::sigmoid_focal_element (alpha_t * BCE * (1 - p_t)^gamma and its derivative)
//   Ghmc:  loss = w[bin(|p - y|)] * BCE, grad = scale * w * (p - y)
// alpha: the scalar alpha, or the element's class alpha (kExtras with alpha_per_class).
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> sigmoid_element(const A& a, float x, float y, float scale, float alpha) {
  const float e = lm::exp_(-lm::abs_(x));
  lm::LossGrad<float> out;
  if (a.loss == SigmoidLoss::Focal) {
    out = lm::sigmoid_focal_element(x, y, alpha, a.gamma, e);
    out.grad *= scale;
  } else {
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(x, y), a.bins);
    const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
    const lm::SigmoidParts<float> s = lm::sigmoid_parts(x, y, e);
    out.loss = w * s.bce;
    out.grad = scale * w * (s.p - y);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// sigmoid_kernel: elementwise over (M, C). A thread takes packs of VEC = 16 / sizeof(scalar_t)
// consecutive elements (one 16-byte load of logits, one of a same-dtype target; a float32
// target of fp16/bf16 logits is two), the last numel % VEC elements one by one. Integer labels:
// y_c = [label == c] from the row's label (8 bytes per row, no one-hot); ignored rows give 0.
// Memory traffic per element: sizeof(scalar_t) read (+ sizeof(target_t) for a float target),
// sizeof(grad_t) written for the gradient (computed in float32, rounded once; a pack is 16
// bytes in the logits dtype, 4 * VEC of float32), + sizeof(scalar_t) for 'none' losses.
// kExtras (drop-in extras; the plain instances are unchanged): per-class alpha a_c replaces
// alpha, and the weight w of the element (per row or per element; + 4 bytes read) multiplies
// loss and gradient; w == 0 selects exactly 0 for both (a NaN logit there does not leak).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename target_t, typename grad_t, bool kLabels, bool kExtras>
__global__ void __launch_bounds__(kThreads) sigmoid_kernel(const SigmoidArgs<scalar_t, target_t, grad_t> a) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const float scale = grad_scale(a.reduction, a.count);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double acc = 0.0;
  const int64_t packs = a.numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const int64_t i0 = p * VEC;
    const Pack<scalar_t, VEC> xs = load_pack<VEC>(a.logits + i0);
    float y[VEC];
    bool valid[VEC];
    [[maybe_unused]] float alpha[VEC];
    [[maybe_unused]] float w[VEC];
    if constexpr (kExtras && !kLabels) {  // the targets below; here the per-element extras
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
        w[e] = element_weight(a, i0 + e, r);
        if (++c == a.C) {
          c = 0;
          ++r;
        }
      }
    }
    if constexpr (kLabels) {
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
      bool row_valid;
      int64_t label = row_label(a, r, row_valid);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = row_valid;
        y[e] = label == c ? 1.0f : 0.0f;
        if constexpr (kExtras) {
          alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
          w[e] = element_weight(a, i0 + e, r);
        }
        if (++c == a.C && e + 1 < VEC) {  // the next element starts row r + 1 (< M: it exists)
          c = 0;
          label = row_label(a, ++r, row_valid);
        }
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = true;
        y[e] = static_cast<float>(ts.v[e]);
      }
    }
    Pack<grad_t, VEC> grads;
    Pack<scalar_t, VEC> losses;
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      lm::LossGrad<float> lg{0.0f, 0.0f};
      if constexpr (kExtras) {
        if (valid[e] && w[e] != 0.0f) {
          lg = sigmoid_element(a, static_cast<float>(xs.v[e]), y[e], scale, alpha[e]);
          lg.loss *= w[e];
          lg.grad *= w[e];
        }
      } else {
        if (valid[e]) lg = sigmoid_element(a, static_cast<float>(xs.v[e]), y[e], scale, a.alpha);
      }
      pack_loss += lg.loss;
      grads.v[e] = static_cast<grad_t>(lg.grad);
      losses.v[e] = static_cast<scalar_t>(lg.loss);
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_elems != nullptr) store_pack<VEC>(a.loss_elems + i0, losses);
    acc += pack_loss;
  }
  for (int64_t i = packs * VEC + first; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    const int64_t r = kLabels || kExtras ? row_of(i, a.C, small) : 0;
    if constexpr (kLabels) {
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = static_cast<float>(a.target[i]);
    }
    lm::LossGrad<float> lg{0.0f, 0.0f};
    if constexpr (kExtras) {
      const float w = element_weight(a, i, r);
      if (valid && w != 0.0f) {
        lg = sigmoid_element(a, static_cast<float>(a.logits[i]), y, scale,
                             lm::class_alpha(a.alpha_per_class, a.alpha, i - r * a.C));
        lg.loss *= w;
        lg.grad *= w;
      }
    } else {
      if (valid) lg = sigmoid_element(a, static_cast<float>(a.logits[i]), y, scale, a.alpha);
    }
    if (a.grad != nullptr) a.grad[i] = static_cast<grad_t>(lg.grad);
    if (a.loss_elems != nullptr) a.loss_elems[i] = static_cast<scalar_t>(lg.loss);
    acc += lg.loss;
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

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
template <bool kLabels, bool kExtras, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid_kernel(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  if (a.numel == 0) {
    if (reduced.defined()) reduced.zero_();
    return;
  }
  const auto kernel = sigmoid_kernel<scalar_t, target_t, grad_t, kLabels, kExtras>;
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

template <bool kLabels, typename scalar_t, typename target_t, typename grad_t>
void launch_sigmoid(SigmoidArgs<scalar_t, target_t, grad_t> a, const at::Tensor& reduced) {
  if (a.alpha_per_class != nullptr || a.weight != nullptr) {
    launch_sigmoid_kernel<kLabels, true>(a, reduced);
  } else {
    launch_sigmoid_kernel<kLabels, false>(a, reduced);
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
        a.logits = call.logits.data_ptr<scalar_t>();
        a.M = call.M;
        a.C = call.C;
        a.numel = call.logits.numel();
        a.ignore_index = ignore_index;
        a.reduction = reduction;
        a.count = params.count.count_dev != nullptr ? params.count : sigmoid_mean_count(call);
        a.grad = compute_grad && a.numel > 0 ? grad.data_ptr<grad_t>() : nullptr;
        a.loss_elems = reduction == Reduction::None && a.numel > 0 ? loss.data_ptr<scalar_t>() : nullptr;
        a.loss = params.loss;
        a.alpha = params.alpha;
        a.gamma = params.gamma;
        a.bin_weights = params.bin_weights;
        a.bins = params.bins;
        a.alpha_per_class = params.alpha_per_class;
        a.weight = params.weight;
        a.weight_per_element = params.weight_per_element;
      };
      if (call.labels.defined()) {
        SigmoidArgs<scalar_t, float, grad_t> a;
        fill(a);
        a.labels = call.labels.data_ptr<int64_t>();
        launch_sigmoid<true>(a, reduced);
      } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
        SigmoidArgs<scalar_t, scalar_t, grad_t> a;
        fill(a);
        a.target = call.float_target.data_ptr<scalar_t>();
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
                                                            const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  const Reduction reduction = parse_reduction(reduction_name);
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
  return sigmoid_forward(call, logits_in, ignore_index, reduction, compute_grad, params);
}

}  // namespace cuda
}  // namespace fused_losses
