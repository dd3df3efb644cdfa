// Sigmoid-type detector losses on the CPU (issue #24): quality focal, varifocal, asymmetric.
// One op, detector_sigmoid_forward (csrc/op_schemas.h), one elementwise pass over the (M, C)
// logits that writes the loss ('none': per row for QFL, per element otherwise) and the gradient;
// the per-element math is csrc/detector_sigmoid_math.h (shared with the CUDA kernel).
//
// Target forms: a dense float target of the logits' shape, or integer labels (M,) with a float
// score (M,) (label == C: background, label == ignore_index: the row gives 0 and is not counted;
// no one-hot is materialised). Determinism as every CPU kernel here: rows in fixed chunks, chunk
// sums in double added in order (csrc/cpu/common.h).
//
// The loop is scalar code the compiler is left to vectorise (exp_vectorizable / log1p of
// losses_math.h; the per-kind element function is a template argument so that the loss switch
// is outside the loop). Measured against the eager reference in benchmarks/bench.py
// (suite detector-sigmoid).

#include <torch/library.h>

#include <string>

#include "cpu/common.h"
#include "cpu/sigmoid.h"
#include "detector_sigmoid_math.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

int parse_detector_kind(c10::string_view name) {
  if (name == "quality_focal") return kQualityFocal;
  if (name == "varifocal") return kVarifocal;
  if (name == "asymmetric") return kAsymmetric;
  TORCH_CHECK(false, "loss: expected 'quality_focal', 'varifocal' or 'asymmetric', got '", std::string(name), "'");
}

// One pass over the (M, C) rows. y: dense target (M, C) in T, or nullptr with labels (M,) and
// score (M,). loss_out: nullptr (reduced), (M,) per row (row_loss) or (M, C). grad: nullptr or
// (M, C). Returns the sum of the (weighted) losses, unscaled.
template <int Kind, typename T, typename scalar_t, typename G>
double detector_pass(const DetectorParams<T>& P, const scalar_t* x, const T* y, const int64_t* labels,
                     const T* score, int64_t M, int64_t C, int64_t ignore_index, scalar_t* loss_out,
                     bool row_loss, G* grad, SigmoidWeight<T> weight, T scale) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kSumChunk / std::max<int64_t>(C, 1));
  const int64_t chunks = ceil_div(M, rows_per_chunk);
  std::vector<double> partial(chunks, 0.0);
  parallel_for_balanced(0, chunks, std::max<int64_t>(1, kWorkGrain / (rows_per_chunk * std::max<int64_t>(C, 1))),
                        [&](int64_t begin, int64_t end) {
    for (int64_t ch = begin; ch < end; ++ch) {
      double chunk_sum = 0.0;
      const int64_t r_end = std::min(M, (ch + 1) * rows_per_chunk);
      for (int64_t r = ch * rows_per_chunk; r < r_end; ++r) {
        const int64_t base = r * C;
        auto zero_row = [&] {
          if (loss_out != nullptr) {
            if (row_loss) {
              loss_out[r] = scalar_t(0);
            } else {
              for (int64_t c = 0; c < C; ++c) loss_out[base + c] = scalar_t(0);
            }
          }
          if (grad != nullptr) {
            for (int64_t c = 0; c < C; ++c) grad[base + c] = G(0);
          }
        };
        int64_t label = -1;
        T label_score = T(0);
        if (labels != nullptr) {
          label = labels[r];
          if (label == ignore_index) {
            zero_row();
            continue;
          }
          check_class(label, C + 1, ignore_index);
          label_score = score[r];
        }
        const T* row_w = weight.w != nullptr && weight.per_element ? weight.w + base : nullptr;
        const T wr = weight.w != nullptr && !weight.per_element ? weight.w[r] : T(1);
        if (wr == T(0)) {
          zero_row();
          continue;
        }
        const T row_scale = wr * scale;
        T row_sum = T(0);
        const scalar_t* xr = x + base;
        G* gr = grad != nullptr ? grad + base : nullptr;
        scalar_t* lr = loss_out != nullptr && !row_loss ? loss_out + base : nullptr;
        for (int64_t c = 0; c < C; ++c) {
          const T xv = static_cast<T>(xr[c]);
          const T yv = labels != nullptr ? (c == label ? label_score : T(0)) : y[base + c];
          const bool positive = labels != nullptr ? c == label : yv > T(0);
          const LossGrad<T> lg = detector_element<Kind, T>(P, xv, yv, positive, exp_vectorizable(-abs_(xv)));
          const T we = row_w != nullptr ? row_w[c] : wr;
          // a zero weight selects 0 (a NaN logit there does not leak)
          const T loss = we == T(0) ? T(0) : we * lg.loss;
          const T g = we == T(0) ? T(0) : (row_w != nullptr ? we * scale : row_scale) * lg.grad;
          row_sum += loss;
          if (lr != nullptr) lr[c] = static_cast<scalar_t>(loss);
          if (gr != nullptr) gr[c] = static_cast<G>(g);
        }
        if (loss_out != nullptr && row_loss) loss_out[r] = static_cast<scalar_t>(row_sum);
        chunk_sum += static_cast<double>(row_sum);
      }
      partial[ch] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> detector_sigmoid_forward_cpu(
    const at::Tensor& logits_in, const at::Tensor& target_in, const c10::optional<at::Tensor>& score_in,
    c10::string_view loss_name, double p0, double p1, double p2, double p3, int64_t flags, int64_t ignore_index,
    c10::string_view reduction_name, bool compute_grad, const c10::optional<at::Tensor>& weight) {
  const int kind = parse_detector_kind(loss_name);
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t C = logits.size(-1);
  const int64_t M = C == 0 ? 0 : logits.numel() / C;
  const at::ScalarType math = at::toOpMathType(logits.scalar_type());
  at::Tensor dense, labels, score;
  double count = 0;
  if (target_in.is_floating_point()) {
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "target: a float target must have the logits' shape");
    TORCH_CHECK(!score_in.has_value(), "score: only with integer labels");
    dense = target_in.to(math).contiguous();
    count = kind == kQualityFocal ? static_cast<double>(M) : static_cast<double>(M * C);
  } else {
    TORCH_CHECK(kind != kAsymmetric, "target: asymmetric takes a float (multi-hot or soft) target");
    TORCH_CHECK(target_in.numel() == M, "target: integer labels must have shape logits.shape[:-1]");
    TORCH_CHECK(score_in.has_value(), "score: integer labels need a score (the quality at the label's class)");
    TORCH_CHECK(score_in->numel() == M, "score: expected shape logits.shape[:-1]");
    labels = index_target(target_in);
    score = score_in->to(math).contiguous().reshape({-1});
    const int64_t valid = count_valid(labels.data_ptr<int64_t>(), M, ignore_index);
    count = kind == kQualityFocal ? static_cast<double>(valid) : static_cast<double>(valid * C);
  }
  const at::Tensor weight_t = extra_weight(weight, math, {M, M * C});
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  const bool row_loss = kind == kQualityFocal;
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "detector_sigmoid_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    DetectorParams<T> P;
    P.flags = static_cast<int>(flags);
    P.p0 = static_cast<T>(p0);
    P.p1 = static_cast<T>(p1);
    P.p2 = static_cast<T>(p2);
    P.p3 = static_cast<T>(p3);
    P.log_eps = p3 > 0 ? static_cast<T>(std::log(p3)) : T(0);
    const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, M);
    at::Tensor loss_none;
    if (reduction == Reduction::None) {
      loss_none = row_loss ? empty_output(logits_in.sizes().slice(0, logits_in.dim() - 1), logits.options())
                           : empty_output(logits_in.sizes(), logits.options());
    }
    scalar_t* lo = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max(count, 1.0)) : T(1);
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const T* y = dense.defined() ? dense.data_ptr<T>() : nullptr;
    const int64_t* lab = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
    const T* sc = score.defined() ? score.data_ptr<T>() : nullptr;
    double total = 0.0;
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      switch (kind) {
        case kQualityFocal:
          total = detector_pass<kQualityFocal, T>(P, x, y, lab, sc, M, C, ignore_index, lo, row_loss, g, sw, scale);
          break;
        case kVarifocal:
          total = detector_pass<kVarifocal, T>(P, x, y, lab, sc, M, C, ignore_index, lo, row_loss, g, sw, scale);
          break;
        default:
          total = detector_pass<kAsymmetric, T>(P, x, y, lab, sc, M, C, ignore_index, lo, row_loss, g, sw, scale);
      }
    });
    loss = loss_none.defined() ? loss_none : reduced_loss(logits, total, count, reduction);
  });
  return {loss, grad};
}

}  // namespace cpu_impl

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("detector_sigmoid_forward", &cpu_impl::detector_sigmoid_forward_cpu);
}

}  // namespace fused_losses
