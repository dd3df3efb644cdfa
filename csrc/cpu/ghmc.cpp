// GHM-C on the CPU: the bin histogram and weights, the loss (sigmoid and softmax), and the
// float32 softmax prepass / scale ops.

#include "cpu/ops_cpu.h"
#include "cpu/sigmoid.h"
#include "cpu/softmax.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

// Bin weights from the integer histogram (reference.ghmc): EMA update of `state` first (bins
// non-empty in this batch), divisor = state or counts, weight_b = n_valid / divisor_b /
// n_nonempty for non-empty bins, 0 otherwise; in the math dtype T.
template <typename T>
at::Tensor ghm_weights_from_counts(const std::vector<int64_t>& counts, int64_t n_valid,
                                   const c10::optional<at::Tensor>& state, double momentum,
                                   const at::TensorOptions& options) {
  const int64_t bins = static_cast<int64_t>(counts.size());
  std::vector<T> divisor(bins);
  int64_t nonempty = 0;
  for (int64_t b = 0; b < bins; ++b) nonempty += counts[b] > 0;
  if (state.has_value()) {
    TORCH_CHECK(state->scalar_type() == at::kFloat && state->numel() == bins && state->is_contiguous(),
                "state: expected a contiguous float32 tensor of shape (", bins, ",)");
    float* st = state->data_ptr<float>();
    const float m = static_cast<float>(momentum), one_minus = static_cast<float>(1.0 - momentum);
    for (int64_t b = 0; b < bins; ++b) {
      if (counts[b] > 0) st[b] = ghm_ema(st[b], static_cast<float>(counts[b]), m, one_minus);
      divisor[b] = static_cast<T>(st[b]);
    }
  } else {
    for (int64_t b = 0; b < bins; ++b) divisor[b] = static_cast<T>(static_cast<float>(counts[b]));
  }
  at::Tensor out = at::empty({bins}, options.dtype(c10::CppTypeToScalarType<T>::value));
  T* w = out.data_ptr<T>();
  const T nv = static_cast<T>(n_valid), ne = static_cast<T>(std::max<int64_t>(nonempty, 1));
  for (int64_t b = 0; b < bins; ++b) {
    const T d = divisor[b] > T(1e-12) ? divisor[b] : T(1e-12);
    w[b] = counts[b] > 0 ? (nv / d) / ne : T(0);
  }
  return out;
}

// Per-row g = 1 - p_t of a float32 softmax (0 for ignored rows): what GHM-C's softmax bins use,
// from the row's sums (sum_others / sum: exact relative, the same value ghmc_forward's float
// rows pass bins with). Reads the logits once.
template <typename scalar_t>
std::vector<float> ghm_softmax_g_float(const scalar_t* x, const int64_t* tgt, SoftmaxShape sh, int64_t ignore_index) {
  std::vector<float> g(sh.rows(), 0.0f);
  softmax_rows_pass<scalar_t, float>(x, tgt, sh, ignore_index, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
                                     [&](int64_t r, int64_t, const SoftmaxRow<float>& row) {
                                       g[r] = row.one_minus_pt;
                                       return 0.0f;
                                     });
  return g;
}

// Sigmoid-family bin of element i (row r = i / C, class c = i % C); -1 = no bin.
template <typename scalar_t, typename target_t>
inline int64_t ghm_sigmoid_bin(const scalar_t* x, const target_t* y, const int64_t* labels, int64_t i, int64_t C,
                               int64_t ignore_index, int64_t bins) {
  float yv;
  if (labels != nullptr) {
    const int64_t label = labels[i / C];
    if (label == ignore_index) return -1;
    check_class(label, C + 1, ignore_index);
    yv = label == i % C ? 1.0f : 0.0f;
  } else {
    yv = static_cast<float>(y[i]);
  }
  return ghm_bin(ghm_sigmoid_g(static_cast<float>(x[i]), yv), bins);
}

// The GHM-C histogram of one call (shared by ghmc_bin_weights and ghmc_bin_counts): counts[b] of
// the valid entries (not ignored, target in range, weight != 0) whose g falls in bin b (NaN g: no
// bin), and n_valid, the number of valid entries.
struct GhmHistogram {
  std::vector<int64_t> counts;
  int64_t n_valid = 0;
};

GhmHistogram ghmc_histogram(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins, bool use_sigmoid,
                            int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  GhmHistogram out;
  if (use_sigmoid) {
    const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(in.logits.scalar_type()), {in.M, in.M * in.C});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "ghmc_histogram", [&] {
      using T = at::opmath_type<scalar_t>;
      const scalar_t* x = in.logits.data_ptr<scalar_t>();
      const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
      const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
      with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
        out.counts = chunked_histogram(in.M * in.C, bins, [&](int64_t i) {
          if (sw.w != nullptr && sw.w[sw.per_element ? i : i / in.C] == T(0)) return int64_t(-1);
          return ghm_sigmoid_bin(x, y, labels, i, in.C, ignore_index, bins);
        });
      });
      out.n_valid = sigmoid_valid_count(in, sw, ignore_index);
    });
  } else {
    const at::Tensor logits = logits_in.contiguous();
    const at::Tensor target = index_target(target_in);
    const SoftmaxShape sh = softmax_shape(logits);
    TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
    const int64_t* tgt = target.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ghmc_histogram", [&] {
      using T = at::opmath_type<scalar_t>;
      const T* wp = weight_ptr<T>(weight_t);
      const std::vector<float> g = ghm_softmax_g_float(logits.data_ptr<scalar_t>(), tgt, sh, ignore_index);
      out.counts = chunked_histogram(sh.rows(), bins, [&](int64_t r) {
        const bool valid = tgt[r] != ignore_index && (wp == nullptr || wp[r] != T(0));
        return valid ? ghm_bin(g[r], bins) : int64_t(-1);
      });
      out.n_valid = count_valid(tgt, sh.rows(), ignore_index, wp);
    });
  }
  return out;
}

}  // namespace

at::Tensor ghmc_bin_weights_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                const c10::optional<at::Tensor>& state, int64_t bins, double momentum,
                                bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const GhmHistogram hist = ghmc_histogram(logits_in, target_in, bins, use_sigmoid, ignore_index, weight);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits_in.scalar_type(), "ghmc_bin_weights", [&] {
    using T = at::opmath_type<scalar_t>;
    out = ghm_weights_from_counts<T>(hist.counts, hist.n_valid, state, momentum, logits_in.options());
  });
  return out;
}

// int64 (bins + 1,): the histogram of ghmc_bin_weights, then n_valid (for an all-reduce across
// ranks before the weights: fused_losses.distributed.global_bin_weights).
at::Tensor ghmc_bin_counts_cpu(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t bins,
                               bool use_sigmoid, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  const GhmHistogram hist = ghmc_histogram(logits_in, target_in, bins, use_sigmoid, ignore_index, weight);
  at::Tensor out = at::empty({bins + 1}, logits_in.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < bins; ++b) o[b] = hist.counts[b];
  o[bins] = hist.n_valid;
  return out;
}

// GHM-C loss: loss = w[bin(g)] * CE, 'mean' over n_valid. Sigmoid: one elementwise pass
// (grad = scale * w * (p - y)). Softmax, math type float: one rows pass (bin, loss and
// gradient grad_c = scale * w * (p_c - [c == t]) per row); fp64: a float32 stats pass for g, a
// double stats pass for the CE, then the gradient pass.
// weight: zero-weight entries are invalid (0 loss and gradient, not in n_valid); the others'
// loss and gradient are multiplied by it. label_smoothing (softmax): the smoothed CE through
// softmax_smooth_pass, binned by the unsmoothed g = 1 - p_t.
std::tuple<at::Tensor, at::Tensor> ghmc_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  const at::Tensor& bin_weights_in, bool use_sigmoid,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const Reduction reduction = parse_reduction(reduction_name);
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(label_smoothing == 0.0 || !use_sigmoid, "label_smoothing: only with use_sigmoid=False");
  at::Tensor grad, loss;
  if (use_sigmoid) {
    const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
    const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(in.logits.scalar_type()), {in.M, in.M * in.C});
    grad = grad_buffer(in.logits, compute_grad, reduction);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "ghmc_forward", [&] {
      using T = at::opmath_type<scalar_t>;
      const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
      const double n_valid = static_cast<double>(sigmoid_valid_count(in, sw, ignore_index));
      const at::Tensor bw = bin_weights_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
      const T* w = bw.data_ptr<T>();
      const scalar_t* x = in.logits.data_ptr<scalar_t>();
      const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
      at::Tensor loss_none = reduction == Reduction::None ? empty_output(logits_in.sizes(), in.logits.options()) : at::Tensor();
      scalar_t* lo = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
      const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max(n_valid, 1.0)) : T(1);
      double total = 0.0;
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, [&](T xv, T yv, T e, int64_t) {
          const int64_t b = ghm_bin(ghm_sigmoid_g(static_cast<float>(xv), static_cast<float>(yv)), bins);
          const T wt = b >= 0 ? w[b] : T(0);
          const SigmoidParts<T> s = sigmoid_parts(xv, yv, e);
          LossGrad<T> lg;
          lg.loss = wt * s.bce;
          lg.grad = scale * wt * s.p_minus_y;
          return lg;
        });
      });
      });
      loss = loss_none.defined() ? loss_none : reduced_loss(in.logits, total, n_valid, reduction);
    });
    return {loss, grad};
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  grad = grad_buffer(logits, compute_grad, reduction);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ghmc_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::Tensor bw = bin_weights_in.to(c10::CppTypeToScalarType<T>::value).contiguous();
    const T* w = bw.data_ptr<T>();
    const T* wp = weight_ptr<T>(weight_t);
    const int64_t n_valid = count_valid(tgt, sh.rows(), ignore_index, wp);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    std::vector<T> row_loss(sh.rows(), T(0));
    constexpr bool kFloatMath = std::is_same<T, float>::value;
    if (label_smoothing > 0.0) {
      // Bins from the float32 g = 1 - p_t: the smooth pass's own row for float math (the same
      // rows stats as ghmc_bin_weights), a float32 pass for fp64.
      std::vector<float> g_f;
      if (!kFloatMath) g_f = ghm_softmax_g_float(x, tgt, sh, ignore_index);
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, nullptr, wp, static_cast<T>(label_smoothing), T(0),
                                         nullptr, T(1), g,
                                         [&](int64_t r, int64_t, const SoftmaxRow<T>& row, T value) {
                                           const float gv = kFloatMath ? static_cast<float>(row.one_minus_pt) : g_f[r];
                                           const int64_t b = ghm_bin(gv, bins);
                                           const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
                                           row_loss[r] = wt * value;
                                           return scale * wt;
                                         });
      });
      loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
      return;
    }
    if constexpr (kFloatMath) {
      // fp32/bf16/fp16: the float32 log p_t that picks the bin is the one of the CE, so one
      // pass does it all (the same rows pass as ghmc_bin_weights' stats, hence the same bins):
      // reads the logits once, writes the gradient once.
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_rows_pass<scalar_t, T>(x, tgt, sh, ignore_index, wp, g, [&](int64_t r, int64_t, const SoftmaxRow<T>& row) {
          const T lp = row.log_pt;
          const int64_t b = ghm_bin(static_cast<float>(row.one_minus_pt), bins);
          const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
          row_loss[r] = wt * -lp;
          return -scale * wt;
        });
      });
      loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
      return;
    }
    // fp64: bins from a float32 stats pass (as in ghmc_bin_weights), the CE from a double one.
    const std::vector<float> g_f = ghm_softmax_g_float(x, tgt, sh, ignore_index);
    const RowStats<T> st = softmax_stats_pass<scalar_t, T>(x, tgt, sh, ignore_index);
    std::vector<T> k(sh.rows(), T(0));
    std::vector<uint8_t> active(sh.rows(), 0);
    for (int64_t r = 0; r < sh.rows(); ++r) {
      if (tgt[r] == ignore_index || (wp != nullptr && wp[r] == T(0))) continue;
      active[r] = 1;
      const int64_t b = ghm_bin(g_f[r], bins);
      const T wt = (b >= 0 ? w[b] : T(0)) * (wp != nullptr ? wp[r] : T(1));
      row_loss[r] = wt * -st.log_pt[r];
      k[r] = -scale * wt;
    }
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      if (g != nullptr) softmax_grad_pass<scalar_t, T>(x, tgt, sh, ignore_index, st.max.data(), st.sum.data(), st.one_minus_pt.data(), k.data(), active.data(), g);
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// GHM-C softmax on float32 logits as two CPU-only ops (cpu_backend.ghmc's path without label
// smoothing, process_group or a transform; defined in csrc/cpu/common.cpp's TORCH_LIBRARY_FRAGMENT,
// not in op_schemas.h: there is no CUDA or emulator kernel). The softmax does not depend on the
// bins, only each row's factor does, so the one softmax pass comes first:
//   ghmc_softmax_prepass: one rows pass that writes the cross-entropy gradient
//     unit_grad = p - onehot of every active row (target != ignore_index, weight != 0; 0
//     elsewhere) and row_stats (2, rows) float32 = log p_t and the row's bin code (the bin of
//     g = 1 - p_t; -1: valid without a bin (NaN g); -2: not valid), then ghmc_bin_weights'
//     histogram, EMA update of `state` and bin weights from those bins (the same rows pass as
//     ghmc_bin_weights', hence the same bins);
//   ghmc_softmax_scale: ghmc_forward's loss, and the gradient as a fresh tensor
//     (scale * w_bin * weight_r) * unit_grad: a pass like a copy, no exponential.
// One exponential per element instead of two (ghmc_bin_weights + ghmc_forward each run a
// softmax); one more logits-sized float32 buffer while the call runs. The losses are
// ghmc_forward's bit for bit; a gradient element is the product of the same two factors
// rounded in another order (within 2 ulp of ghmc_forward's; tests/test_cpu_kernels.py).
// ------------------------------------------------------------------------------------------
constexpr int64_t kGhmStats = 2;  // row_stats rows: log p_t, bin code
constexpr float kGhmInvalid = -2.0f, kGhmNoBin = -1.0f;

std::tuple<at::Tensor, at::Tensor, at::Tensor> ghmc_softmax_prepass_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& state, int64_t bins,
    double momentum, int64_t ignore_index, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(bins >= 1, "bins: must be >= 1, got ", bins);
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat, "ghmc_softmax_prepass: float32 logits only");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  const int64_t rows = sh.rows();
  TORCH_CHECK(target.numel() == rows, "target: expected ", rows, " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::kFloat, {rows});
  const float* wp = weight_ptr<float>(weight_t);
  const int64_t* tgt = target.data_ptr<int64_t>();
  TORCH_CHECK(bins < (int64_t(1) << 24), "bins: at most 2^24 - 1 here, got ", bins);
  at::Tensor stats = at::empty({kGhmStats, rows}, logits.options());
  at::Tensor unit_grad = empty_output(logits.sizes(), logits.options());
  float* lp = stats.data_ptr<float>();
  float* code = lp + rows;
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      lp[r] = 0.0f;
      code[r] = kGhmInvalid;
    }
  });
  // Active rows are the valid ones (row_active: target != ignore_index, weight != 0).
  softmax_rows_pass<float, float>(logits.data_ptr<float>(), tgt, sh, ignore_index, wp, unit_grad.data_ptr<float>(),
                                  [&](int64_t r, int64_t, const SoftmaxRow<float>& row) {
                                    lp[r] = row.log_pt;
                                    const int64_t b = ghm_bin(static_cast<float>(row.one_minus_pt), bins);
                                    code[r] = b >= 0 ? static_cast<float>(b) : kGhmNoBin;
                                    return -1.0f;  // k = dCE/dlog p_t: grad = p - onehot
                                  });
  const std::vector<int64_t> counts =
      chunked_histogram(rows, bins, [&](int64_t r) { return code[r] >= 0.0f ? static_cast<int64_t>(code[r]) : int64_t(-1); });
  const int64_t n_valid = count_valid(tgt, rows, ignore_index, wp);
  return {ghm_weights_from_counts<float>(counts, n_valid, state, momentum, logits.options()), stats, unit_grad};
}

std::tuple<at::Tensor, at::Tensor> ghmc_softmax_scale_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                        const at::Tensor& bin_weights_in, const at::Tensor& stats,
                                                        const at::Tensor& unit_grad, int64_t ignore_index,
                                                        c10::string_view reduction_name, bool compute_grad,
                                                        const c10::optional<at::Tensor>& weight) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.scalar_type() == at::kFloat, "ghmc_softmax_scale: float32 logits only");
  const int64_t bins = bin_weights_in.numel();
  TORCH_CHECK(bins >= 1, "bin_weights: expected at least one bin");
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits_in);
  const int64_t rows = sh.rows();
  TORCH_CHECK(target.numel() == rows, "target: expected ", rows, " class indices, got ", target.numel());
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == kGhmStats && stats.size(1) == rows,
              "row_stats: expected the contiguous float32 (", kGhmStats, ", ", rows,
              ") tensor of ghmc_softmax_prepass for these logits, got ", stats.scalar_type(), " of shape ", stats.sizes());
  TORCH_CHECK(unit_grad.scalar_type() == at::kFloat && unit_grad.is_contiguous() && unit_grad.sizes() == logits_in.sizes(),
              "unit_grad: expected the contiguous float32 gradient of ghmc_softmax_prepass for these logits");
  const at::Tensor weight_t = extra_weight(weight, at::kFloat, {rows});
  const float* wp = weight_ptr<float>(weight_t);
  const at::Tensor bw = bin_weights_in.to(at::kFloat).contiguous();
  const float* w = bw.data_ptr<float>();
  const float* lp = stats.data_ptr<float>();
  const float* code = lp + rows;
  // The prepass checked the targets and binned the rows: valid rows have code >= -1.
  const int64_t n_valid = at::parallel_reduce(
      0, rows, kWorkGrain, int64_t(0),
      [&](int64_t begin, int64_t end, int64_t acc) {
        for (int64_t r = begin; r < end; ++r) {
          TORCH_CHECK(code[r] < static_cast<float>(bins), "row_stats: a bin beyond bin_weights' ", bins);
          acc += code[r] >= kGhmNoBin;
        }
        return acc;
      },
      std::plus<int64_t>());
  const float scale = reduction == Reduction::Mean ? 1.0f / static_cast<float>(std::max<int64_t>(n_valid, 1)) : 1.0f;
  std::vector<float> row_loss(rows), factor(rows);
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      // ghmc_forward's row function on the same values: loss w * CE, dLoss/dCE = scale * w.
      const float c = code[r];
      const float wt = (c >= 0.0f ? w[static_cast<int64_t>(c)] : 0.0f) * (wp != nullptr ? wp[r] : 1.0f);
      row_loss[r] = c >= kGhmNoBin ? wt * -lp[r] : 0.0f;
      factor[r] = c >= kGhmNoBin ? scale * wt : 0.0f;
    }
  });
  at::Tensor grad = grad_buffer(logits_in, compute_grad, reduction);
  if (compute_grad) {
    const float* u = unit_grad.data_ptr<float>();
    float* out = grad.data_ptr<float>();
    const int64_t C = sh.C, S = sh.S;
    const float* f = factor.data();
    if (S == 1) {
      parallel_for_balanced(0, rows, std::max<int64_t>(1, kWorkGrain / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) cpu::scale_to(out + r * C, u + r * C, f[r], C);
      });
    } else {
      // (N, C, S): element (n, c, s) belongs to row n * S + s.
      parallel_for_balanced(0, sh.N * C, std::max<int64_t>(1, kWorkGrain / S), [&](int64_t begin, int64_t end) {
        for (int64_t nc = begin; nc < end; ++nc)
          cpu::multiply_to(out + nc * S, u + nc * S, f + (nc / C) * S, S);
      });
    }
  }
  return {finish_loss<float>(logits_in, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction), grad};
}

}  // namespace cpu_impl
}  // namespace fused_losses
