// GHM-C of fused_losses, host side (kernels: kernels/ghmc_kernels.cuh): the histogram, the bin
// weights and EMA state update, and the forward (the sigmoid or softmax pass with the GHM-C
// loss). Conventions: common.cuh.
#include "cuda/sigmoid.cuh"
#include "cuda/softmax.cuh"
#include "cuda/kernels/ghmc_kernels.cuh"

namespace fused_losses {
namespace cuda {

// The valid entries of a GHM-C call (reference.ghmc; a zero weight is invalid, mmdet's
// label_weight > 0), as a count spec over n entries: softmax rows; sigmoid rows x C (no weight
// or a per-row weight) or elements (a per-element weight, or a float target).
struct ValidEntries {
  CountSpec spec;
  int64_t n = 0;
};

ValidEntries softmax_valid_entries(const SoftmaxCall& call, int64_t ignore_index, const at::Tensor& weight_vec) {
  ValidEntries v;
  v.n = call.sh.N * call.sh.S;
  v.spec.target = v.n > 0 ? call.target.data_ptr<int64_t>() : nullptr;
  v.spec.ignore_index = ignore_index;
  v.spec.upper = call.sh.C;
  v.spec.weight = data_or_null(weight_vec);
  return v;
}

ValidEntries sigmoid_valid_entries(const SigmoidCall& call, int64_t ignore_index, const at::Tensor& weight_vec,
                                   bool per_element) {
  ValidEntries v;
  v.spec.weight = data_or_null(weight_vec);
  if (call.labels.defined()) {
    v.spec.target = call.M > 0 ? call.labels.data_ptr<int64_t>() : nullptr;
    v.spec.ignore_index = ignore_index;
    v.spec.upper = call.C + 1;
  }
  if (per_element || (!call.labels.defined() && v.spec.weight == nullptr)) {
    v.n = call.M * call.C;  // per element (a float target without weight: every element)
    v.spec.per_target = call.C;
  } else {
    v.n = call.M;  // per row, each counting C elements
    v.spec.mult = call.C;
  }
  return v;
}

// The int64 (bins + 1,) counts of a GHM-C call (the ghmc_bin_counts op): the histogram of the
// valid entries' bins, then n_valid. One histogram kernel (+ a stats pass for softmax) and one
// count kernel; integer atomics only, nothing read on the host.
at::Tensor ghm_counts(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins, bool use_sigmoid,
                      int64_t ignore_index, const c10::optional<at::Tensor>& weight, const char* op) {
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  at::Tensor counts = at::zeros({bins + 1}, logits_in.options().dtype(at::kLong));
  auto* counts_ptr = reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>());
  int64_t* n_valid_ptr = counts.data_ptr<int64_t>() + bins;
  if (use_sigmoid) {
    const SigmoidCall call = sigmoid_call(logits_in, target_in, ignore_index, /*need_count=*/false, op);
    const at::Tensor weight_vec = sigmoid_weight(weight, call);
    const bool per_element = weight_vec.defined() && weight_vec.numel() == call.M * call.C && call.C != 1;
    const ValidEntries valid = sigmoid_valid_entries(call, ignore_index, weight_vec, per_element);
    count_valid_into(n_valid_ptr, valid.spec, valid.n);
    const int64_t numel = call.logits.numel();
    if (numel > 0) {
      FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghm_histogram_cuda", [&] {
        auto fill = [&](auto& a) {
          a.logits = data_of<scalar_t>(call.logits);
          a.M = call.M;
          a.C = call.C;
          a.numel = numel;
          a.ignore_index = ignore_index;
          a.bins = bins;
          a.weight = data_or_null(weight_vec);
          a.weight_per_element = per_element;
        };
        // The kWeighted instance only with a weight (the plain one keeps its registers).
        auto launch = [&](auto kernel_weighted, auto kernel_plain, const auto& a) {
          const auto kernel = weight_vec.defined() ? kernel_weighted : kernel_plain;
          FL_LAUNCH(grid_for(kernel, numel, kThreads * 4), kThreads, 0, current_stream(), kernel)(a, counts_ptr);
        };
        if (call.labels.defined()) {
          SigmoidArgs<scalar_t, float> a;
          fill(a);
          a.labels = call.labels.data_ptr<int64_t>();
          launch(ghm_sigmoid_histogram_kernel<scalar_t, float, true, true>,
                 ghm_sigmoid_histogram_kernel<scalar_t, float, true, false>, a);
        } else if (call.float_target.scalar_type() == call.logits.scalar_type()) {
          SigmoidArgs<scalar_t, scalar_t> a;
          fill(a);
          a.target = data_of<scalar_t>(call.float_target);
          launch(ghm_sigmoid_histogram_kernel<scalar_t, scalar_t, false, true>,
                 ghm_sigmoid_histogram_kernel<scalar_t, scalar_t, false, false>, a);
        } else {
          if constexpr (!std::is_same_v<scalar_t, float>) {
            SigmoidArgs<scalar_t, float> a;
            fill(a);
            a.target = call.float_target.data_ptr<float>();
            launch(ghm_sigmoid_histogram_kernel<scalar_t, float, false, true>,
                   ghm_sigmoid_histogram_kernel<scalar_t, float, false, false>, a);
          }
        }
        FL_KERNEL_LAUNCH_CHECK();
      });
    }
  } else {
    // "sum": the call's loss output is then a 0-dim tensor this op does not use (no rows buffer).
    const SoftmaxCall call = softmax_call(logits_in, target_in, "sum", false, false, op);
    const int64_t rows = call.sh.N * call.sh.S;
    const at::Tensor weight_vec = weight_vector(weight, call.logits, rows);
    const ValidEntries valid = softmax_valid_entries(call, ignore_index, weight_vec);
    count_valid_into(n_valid_ptr, valid.spec, valid.n);
    if (rows > 0) {
      const at::Tensor one_minus_pt = at::empty({rows}, call.logits.options().dtype(at::kFloat));
      FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghm_stats_cuda", [&] {
        SoftmaxArgs<scalar_t> a = softmax_args<scalar_t>(call, ignore_index, SoftmaxLoss::Stats);
        a.reduction = Reduction::None;
        a.loss_rows = nullptr;
        a.one_minus_pt_rows = one_minus_pt.data_ptr<float>();
        softmax_pass(a, false, at::Tensor());
      });
      const auto histogram = weight_vec.defined() ? ghm_softmax_histogram_kernel<true> : ghm_softmax_histogram_kernel<false>;
      FL_LAUNCH(grid_for(histogram, rows, kThreads * 4), kThreads, 0, current_stream(),
                histogram)(one_minus_pt.data_ptr<float>(), call.target.data_ptr<int64_t>(),
                                              data_or_null(weight_vec), rows, ignore_index, call.sh.C, bins, counts_ptr);
      FL_KERNEL_LAUNCH_CHECK();
    }
  }
  return counts;
}

at::Tensor ghmc_bin_counts_cuda(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins, bool use_sigmoid,
                                int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  return ghm_counts(logits_in, target_in, bins, use_sigmoid, ignore_index, weight, "ghmc_bin_counts");
}

at::Tensor ghmc_bin_weights_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                 const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                 bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const DeviceGuard guard(logits_in.device());
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  if (state.has_value()) {
    check_same_device(*state, logits_in, "state");
    TORCH_CHECK(state->scalar_type() == at::kFloat && state->numel() == bins && state->is_contiguous(),
                "state: expected a contiguous float32 tensor of shape (", bins, ",)");
  }
  const at::Tensor counts = ghm_counts(logits_in, target_in, bins, use_sigmoid, ignore_index, weight, "ghmc_bin_weights");
  at::Tensor weights = at::empty({bins}, logits_in.options().dtype(at::kFloat));
  FL_LAUNCH(1, 1, 0, current_stream(), ghm_weights_kernel<>)(
      counts.data_ptr<int64_t>(), bins, state.has_value() ? state->data_ptr<float>() : nullptr,
      static_cast<float>(momentum), static_cast<float>(1.0 - momentum), weights.data_ptr<float>());
  FL_KERNEL_LAUNCH_CHECK();
  return weights;
}

// ghmc_forward: sigmoid: one elementwise pass; softmax: one softmax pass (the weight of a row
// depends only on its own g and the bin weights). Traffic per element: one read, one gradient
// write (+ a float target read).
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cuda(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                   const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                   int64_t ignore_index, c10::string_view reduction_name,
                                                   bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const DeviceGuard guard(logits_in.device());
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(label_smoothing == 0.0 || !use_sigmoid, "label_smoothing: only with use_sigmoid=False");
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  check_logits(logits_in, "ghmc_forward");
  const at::Tensor bin_weights = float_vector(bin_weights_in, logits_in, bins, "bin_weights");
  const Reduction reduction = parse_reduction(reduction_name);
  // 'mean' divides by n_valid, the valid entries of the histogram (zero weights excluded).
  if (use_sigmoid) {
    const SigmoidCall call = sigmoid_call(logits_in, target_in, ignore_index,
                                          reduction == Reduction::Mean && !weight.has_value(), "ghmc_forward");
    const at::Tensor weight_vec = sigmoid_weight(weight, call);
    SigmoidLossParams params;
    params.loss = SigmoidLoss::Ghmc;
    params.bin_weights = bin_weights.data_ptr<float>();
    params.bins = bins;
    params.weight = data_or_null(weight_vec);
    params.weight_per_element = weight_vec.defined() && weight_vec.numel() == call.M * call.C && call.C != 1;
    at::Tensor count;
    if (reduction == Reduction::Mean && params.weight != nullptr) {
      count = at::zeros({1}, call.logits.options().dtype(at::kLong));
      const ValidEntries valid = sigmoid_valid_entries(call, ignore_index, weight_vec, params.weight_per_element);
      count_valid_into(count.data_ptr<int64_t>(), valid.spec, valid.n);
      params.count.count_dev = count.data_ptr<int64_t>();
    }
    return sigmoid_forward(call, logits_in, ignore_index, reduction, compute_grad, params);
  }
  const SoftmaxCall call = softmax_call(logits_in, target_in, reduction_name, compute_grad, false, "ghmc_forward");
  const at::Tensor weight_vec = weight_vector(weight, call.logits, call.sh.N * call.sh.S);
  at::Tensor count;
  if (call.reduction == Reduction::Mean) count = count_valid(call.target, ignore_index, call.sh.C, data_or_null(weight_vec));
  FL_DISPATCH_CUDA_FLOATING_TYPES(call.logits.scalar_type(), "ghmc_forward_cuda", [&] {
    dispatch_grad_t<scalar_t>(call.grad, [&](auto grad_tag) {
      using grad_t = typename decltype(grad_tag)::type;
      SoftmaxArgs<scalar_t, grad_t> a = softmax_args<scalar_t, grad_t>(call, ignore_index, SoftmaxLoss::Ghmc);
      a.bin_weights = bin_weights.data_ptr<float>();
      a.bins = bins;
      a.weight = data_or_null(weight_vec);
      a.label_smoothing = static_cast<float>(label_smoothing);
      if (count.defined()) a.count.count_dev = count.data_ptr<int64_t>();
      softmax_pass(a, false, reduced_output(call));
    });
  });
  return {call.loss, call.grad};
}

}  // namespace cuda
}  // namespace fused_losses
