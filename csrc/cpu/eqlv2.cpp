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

// Every column of a row as a negative: loss, statistic and (kGrad) gradient; straight-line on
// restrict pointers, no reduction and no label test, so GCC vectorises it (exp / log1p in their
// vectorisable forms). x: the row in the math type T; we: per-element weights or nullptr (then
// the row weight wr, which must be nonzero: a zero-weight row is written as zeros by the caller;
// with it the loop has no select, which GCC would turn into control flow and keep scalar).
template <typename T, typename G, bool kGrad, bool kElemW>
void eqlv2_negatives(const T* __restrict x, const T* __restrict we, T wr, const T* __restrict wneg, T inv,
                     T* __restrict lr, T* __restrict gn, G* __restrict gr, int64_t n) {
  if constexpr (!kElemW) {
    for (int64_t c = 0; c < n; ++c) {
      const T xc = x[c];
      const T ax = xc < T(0) ? -xc : xc;
      const T en = exp_vectorizable(-ax);
      const T inv1 = T(1) / (T(1) + en);
      const T sig_pos = xc >= T(0) ? inv1 : en * inv1;  // sigmoid(x)
      const T bce = (xc > T(0) ? xc : T(0)) + log1p_unit_vectorizable(en);
      const T wn = wneg[c];
      const T a = wr * wn;
      lr[c] = a * bce;
      gn[c] = sig_pos * wn * wr;
      if constexpr (kGrad) gr[c] = static_cast<G>(a * sig_pos * inv);
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    const T w = kElemW ? we[c] : wr;
    const T xc = x[c];
    const T ax = xc < T(0) ? -xc : xc;
    const T en = exp_vectorizable(-ax);
    const T inv1 = T(1) / (T(1) + en);
    const T sig_pos = xc >= T(0) ? inv1 : en * inv1;  // sigmoid(x)
    const T bce = (xc > T(0) ? xc : T(0)) + log1p_unit_vectorizable(en);
    const bool act = w != T(0);
    const T wn = wneg[c];
    const T a = w * wn;
    const T l = a * bce, st = sig_pos * wn * w, gv = a * sig_pos * inv;
    lr[c] = act ? l : T(0);
    gn[c] = act ? st : T(0);
    if constexpr (kGrad) gr[c] = static_cast<G>(act ? gv : T(0));
  }
}

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
      std::vector<T> lbuf(Ct), gneg(Ct), xbuf(std::is_same<scalar_t, T>::value ? 0 : Ct);
      for (int64_t ch = begin; ch < end; ++ch) {
        double* pos = partial.data() + ch * (2 * C + 1);
        double* neg = pos + C;
        double lsum = 0.0;
        const int64_t hi = std::min(M, (ch + 1) * kStatRows);
        for (int64_t r = ch * kStatRows; r < hi; ++r) {
          const scalar_t* xr = x + r * Ct;
          G* gr = g == nullptr ? nullptr : g + r * Ct;
          T* lr = loss_el == nullptr ? lbuf.data() : loss_el + r * Ct;
          const int64_t t = labels[r];
          if (t == ignore_index) {
            if (gr != nullptr) for (int64_t c = 0; c < Ct; ++c) gr[c] = G(0);
            if (loss_el != nullptr) for (int64_t c = 0; c < Ct; ++c) lr[c] = T(0);
            continue;
          }
          check_class(t, C + 1, ignore_index);
          const T wr = wptr == nullptr || per_element ? T(1) : wptr[r];
          const T* we = wptr != nullptr && per_element ? wptr + r * Ct : nullptr;
          // Every column as a negative first: straight-line, no reduction, no label test, so the
          // compiler vectorises it (exp / log1p in their vectorisable forms); the label's column
          // is then recomputed as a positive.
          T* gn = gneg.data();
          const T* wneg = w_neg.data();
          const T* xt_row;
          if constexpr (std::is_same<scalar_t, T>::value) {
            xt_row = xr;
          } else {
            for (int64_t c = 0; c < Ct; ++c) xbuf[c] = static_cast<T>(xr[c]);
            xt_row = xbuf.data();
          }
          if (we == nullptr && wr == T(0)) {  // a zero-weight row: zeros (a NaN logit there does not leak)
            for (int64_t c = 0; c < Ct; ++c) lr[c] = gn[c] = T(0);
            if (gr != nullptr) for (int64_t c = 0; c < Ct; ++c) gr[c] = G(0);
          } else if (we == nullptr) {
            if (gr != nullptr) eqlv2_negatives<T, G, true, false>(xt_row, we, wr, wneg, inv, lr, gn, gr, Ct);
            else eqlv2_negatives<T, G, false, false>(xt_row, we, wr, wneg, inv, lr, gn, gr, Ct);
          } else {
            if (gr != nullptr) eqlv2_negatives<T, G, true, true>(xt_row, we, wr, wneg, inv, lr, gn, gr, Ct);
            else eqlv2_negatives<T, G, false, true>(xt_row, we, wr, wneg, inv, lr, gn, gr, Ct);
          }
          if (t < Ct) {  // the positive (label == C: a background row, all negatives, except the objectness column)
            const T w = we == nullptr ? wr : we[t];
            const T xc = static_cast<T>(xr[t]);
            const T ax = xc < T(0) ? -xc : xc;
            const T en = exp_(-ax);
            const T inv1 = T(1) / (T(1) + en);
            const T sig_neg = xc >= T(0) ? en * inv1 : inv1;  // sigmoid(-x) = 1 - sigmoid(x)
            const T bce = (xc < T(0) ? -xc : T(0)) + log1p_(en);
            const bool act = w != T(0);
            lr[t] = act ? w * w_pos[t] * bce : T(0);
            if (gr != nullptr) gr[t] = static_cast<G>(act ? -(w * w_pos[t] * sig_neg * inv) : T(0));
            if (t < C) {
              pos[t] += static_cast<double>(act ? sig_neg * w_pos[t] * w : T(0));
              gn[t] = T(0);
            }
          }
          for (int64_t c = 0; c < C; ++c) neg[c] += static_cast<double>(gn[c]);
          // the row's loss: 16 lane sums in a fixed order, then the lanes
          T lanes[16] = {};
          int64_t c = 0;
          for (; c + 16 <= Ct; c += 16)
            for (int k = 0; k < 16; ++k) lanes[k] += lr[c + k];
          for (; c < Ct; ++c) lanes[c % 16] += lr[c];
          T row_loss = T(0);
          for (int k = 0; k < 16; ++k) row_loss += lanes[k];
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
