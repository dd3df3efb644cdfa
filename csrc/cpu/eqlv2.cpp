// EQLv2 (issue #25) on the CPU: one pass over the elements writes the loss, the gradient and
// this batch's per-class gradient statistics. Semantics: fused_losses/reference.py eqlv2 and
// docs/losses/longtail.md. The state is read only here (its pos_neg row: the weights of this
// step); the caller adds batch_stats to it afterwards (fused_losses/_longtail.py), so the weights
// come from the previous step's statistics and the update from this batch's gradient, the order
// of the authors' forward.
//
// Element (row i, class c), y = [label_i == c], w the sample weight (row or element):
//   f_c = sigmoid(gamma (pos_neg_c - mu)), eqlw = y (1 + alpha (1 - f_c)) + (1 - y) f_c
//   (the objectness column: 1), loss = w eqlw BCE(x, y), grad = w eqlw (sigmoid(x) - y) / D,
//   statistic g = |sigmoid(x) - y| eqlw w (not divided by D): pos[c] += g y, neg[c] += g (1 - y).
// The statistics are summed in double per fixed chunk of kStatRows rows, then the chunks in
// order: bitwise the same for any thread count.

#include <torch/library.h>

#include <ATen/ops/zeros.h>

#include "cpu/common.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

constexpr int64_t kStatRows = 256;  // rows per chunk of the statistics' ordered sums

template <typename scalar_t>
void eqlv2_rows(const at::Tensor& logits, const int64_t* labels, const float* pos_neg, int64_t M, int64_t Ct,
                int64_t C, double gamma, double mu, double alpha, int64_t ignore_index,
                const at::opmath_type<scalar_t>* wptr, bool per_element, at::opmath_type<scalar_t> inv,
                const at::Tensor& grad, bool compute_grad, at::opmath_type<scalar_t>* loss_el, double* stats,
                double& total) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* x = logits.data_ptr<scalar_t>();
  std::vector<T> w_pos(Ct, T(1)), w_neg(Ct, T(1));
  for (int64_t c = 0; c < C; ++c) {
    const T z = static_cast<T>(gamma) * (static_cast<T>(pos_neg[c]) - static_cast<T>(mu));
    const T f = T(1) / (T(1) + exp_(-z));
    w_neg[c] = f;
    w_pos[c] = T(1) + static_cast<T>(alpha) * (T(1) - f);
  }
  const int64_t chunks = ceil_div(M, kStatRows);
  std::vector<double> partial(static_cast<size_t>(chunks) * (2 * C + 1), 0.0);
  with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    using G = std::remove_pointer_t<decltype(g)>;
    const int64_t grain = std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(kStatRows * Ct, 1));
    parallel_for_balanced(0, chunks, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> gst(Ct);
      for (int64_t ch = begin; ch < end; ++ch) {
        double* pos = partial.data() + ch * (2 * C + 1);
        double* neg = pos + C;
        double lsum = 0.0;
        const int64_t hi = std::min(M, (ch + 1) * kStatRows);
        for (int64_t r = ch * kStatRows; r < hi; ++r) {
          const scalar_t* xr = x + r * Ct;
          G* gr = g == nullptr ? nullptr : g + r * Ct;
          T* lr = loss_el == nullptr ? nullptr : loss_el + r * Ct;
          const int64_t t = labels[r];
          if (t == ignore_index) {
            if (gr != nullptr) for (int64_t c = 0; c < Ct; ++c) gr[c] = G(0);
            if (lr != nullptr) for (int64_t c = 0; c < Ct; ++c) lr[c] = T(0);
            continue;
          }
          check_class(t, C + 1, ignore_index);
          const T wr = wptr == nullptr || per_element ? T(1) : wptr[r];
          const T* we = wptr != nullptr && per_element ? wptr + r * Ct : nullptr;
          T row_loss = T(0);
          for (int64_t c = 0; c < Ct; ++c) {
            const T w = we == nullptr ? wr : we[c];
            const bool y = c == t;
            const T xc = static_cast<T>(xr[c]);
            // |x| and e^{-|x|}: sigmoid(x), sigmoid(-x) and softplus(+-x) without overflow
            const T ax = xc < T(0) ? -xc : xc;
            const T en = exp_vectorizable(-ax);
            const T inv1 = T(1) / (T(1) + en);
            const T sig_pos = xc >= T(0) ? inv1 : en * inv1;    // sigmoid(x)
            const T sig_neg = xc >= T(0) ? en * inv1 : inv1;    // sigmoid(-x) = 1 - sigmoid(x)
            const T sp = log1p_unit_vectorizable(en);            // softplus(-|x|)
            const T bce = y ? (xc < T(0) ? -xc + sp : sp) : (xc > T(0) ? xc + sp : sp);
            const T eql = y ? w_pos[c] : w_neg[c];
            const bool act = w != T(0);
            const T l = act ? w * eql * bce : T(0);
            const T d = y ? -sig_neg : sig_pos;  // sigmoid(x) - y
            if (gr != nullptr) gr[c] = static_cast<G>(act ? w * eql * d * inv : T(0));
            if (lr != nullptr) lr[c] = l;
            row_loss += l;
            gst[c] = act ? (y ? sig_neg : sig_pos) * eql * w : T(0);
          }
          for (int64_t c = 0; c < C; ++c) neg[c] += static_cast<double>(c == t ? T(0) : gst[c]);
          if (t < C) pos[t] += static_cast<double>(gst[t]);
          lsum += static_cast<double>(row_loss);
        }
        pos[2 * C] = lsum;
      }
    });
  });
  total = 0.0;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const double* part = partial.data() + ch * (2 * C + 1);
    for (int64_t k = 0; k < 2 * C; ++k) stats[k] += part[k];
    total += part[2 * C];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> eqlv2_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                               const at::Tensor& state, double gamma, double mu,
                                                               double alpha, bool objectness, int64_t ignore_index,
                                                               c10::string_view reduction_name, bool compute_grad,
                                                               const c10::optional<at::Tensor>& weight) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t Ct = logits.size(-1);
  const int64_t C = Ct - (objectness ? 1 : 0);
  TORCH_CHECK(C >= 1, "logits: expected at least ", objectness ? 2 : 1, " columns, got ", Ct);
  const int64_t M = logits.numel() / Ct;
  TORCH_CHECK(target_in.numel() == M, "target: expected ", M, " labels, got ", target_in.numel());
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.dim() == 2 && state.size(0) == 3 &&
                  state.size(1) == C,
              "state: expected a contiguous float32 tensor of shape (3, ", C, ")");
  const at::Tensor target = index_target(target_in);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const at::ScalarType math = at::toOpMathType(logits.scalar_type());
  const at::Tensor weight_t = extra_weight(weight, math, {M, M * Ct});
  const bool per_element = weight_t.defined() && weight_t.numel() == M * Ct && Ct > 1;
  const int64_t n_valid = count_valid(tgt, M, ignore_index);
  const at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor stats = at::zeros({2, C}, logits.options().dtype(at::kDouble));
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "eqlv2_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const T inv = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    std::vector<T> elements(reduction == Reduction::None ? M * Ct : 0);
    double total = 0.0;
    eqlv2_rows<scalar_t>(logits, tgt, state.data_ptr<float>() + 2 * C, M, Ct, C, gamma, mu, alpha, ignore_index,
                         weight_ptr<T>(weight_t), per_element, inv, grad, compute_grad,
                         reduction == Reduction::None ? elements.data() : nullptr, stats.data_ptr<double>(), total);
    if (reduction == Reduction::None) {
      loss = finish_loss<scalar_t, T>(logits, elements, logits.sizes(), 0.0, Reduction::None);
    } else {
      loss = reduced_loss(logits, total, static_cast<double>(n_valid), reduction);
    }
  });
  return {loss, grad, stats};
}

}  // namespace cpu_impl

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) { m.impl("eqlv2_forward", &cpu_impl::eqlv2_forward_cpu); }

}  // namespace fused_losses
