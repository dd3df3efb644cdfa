// Seesaw loss (issue #25) on the CPU: one pass per row writes the loss and the gradient.
// Semantics: fused_losses/reference.py seesaw and docs/losses/longtail.md. The caller has
// already added this batch's label counts to cum_samples (mmdet's order); this op only reads it.
//
// Per foreground row with label t (classes x_0..x_{C-1}):
//   s = softmax(x) (no gradient), c_t = m + log(sum e^{x - m}) + log(max(s_t, eps)), so that
//   log(s_j / max(s_t, eps)) = x_j - c_t;
//   z_j = x_j + p min(0, log N_j - log N_t) + q max(0, x_j - c_t) for j != t, z_t = x_t
//   (N clamped to >= 1: the mitigation (N_j / N_i)^p where N_j < N_i and the compensation
//   (s_j / s_i)^q where that ratio > 1, as logs);
//   loss = -log softmax(z)_t, gradient w (softmax(z) - onehot) / D (the factors carry none).
// Objectness pair (columns C, C + 1; target 1 for background rows): a 2-class cross entropy.
// Row values depend only on the row; sums are taken per fixed chunk, then in order (common.h).

#include <torch/library.h>

#include "cpu/common.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

template <typename scalar_t>
void seesaw_rows(const at::Tensor& logits, const int64_t* tgt, const float* cum, int64_t N, int64_t Ct, int64_t C,
                 bool objectness, double p_in, double q_in, double eps_in, int64_t ignore_index,
                 const at::opmath_type<scalar_t>* wptr, at::opmath_type<scalar_t> inv_fg,
                 at::opmath_type<scalar_t> inv_valid, const at::Tensor& grad, bool compute_grad,
                 std::vector<at::opmath_type<scalar_t>>& cls_loss, std::vector<at::opmath_type<scalar_t>>& obj_loss) {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const T p = static_cast<T>(p_in), q = static_cast<T>(q_in), eps = static_cast<T>(eps_in);
  std::vector<T> log_n(C);
  for (int64_t j = 0; j < C; ++j) log_n[j] = log_(static_cast<T>(std::max(cum[j], 1.0f)));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  constexpr bool simd_rows = std::is_same<T, float>::value;  // fp32 / fp16 / bf16 logits
  with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    using G = std::remove_pointer_t<decltype(g)>;
    const int64_t grain = std::max<int64_t>(1, kWorkGrain / std::max<int64_t>(Ct, 1));
    parallel_for_balanced(0, N, grain, [&](int64_t begin, int64_t end) {
      std::vector<T> e(C);
      std::vector<float> zb(simd_rows ? C : 0), xb(simd_rows && !std::is_same<scalar_t, float>::value ? C : 0);
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = x + r * Ct;
        G* gr = g == nullptr ? nullptr : g + r * Ct;
        const int64_t t = tgt[r];
        const bool valid = t != ignore_index;
        if (valid) check_class(t, objectness ? C + 1 : C, ignore_index);
        const T w = wptr == nullptr ? T(1) : wptr[r];
        const bool active = valid && w != T(0);
        const bool fg = active && t < C;
        T lc = T(0), lo = T(0);
        if (fg) {
          if constexpr (simd_rows) {
            // float math: the SIMD softmax rows of csrc/cpu/simd_kernels.cpp (vectorised exp and sums)
            const float* xf;
            if constexpr (std::is_same<scalar_t, float>::value) {
              xf = xr;
            } else {
              for (int64_t j = 0; j < C; ++j) xb[j] = static_cast<float>(xr[j]);
              xf = xb.data();
            }
            const cpu::SoftmaxRowStats s1 = cpu::softmax_row(xf, C, t, e.data());
            const float xt = xf[t];
            const float st = e.data()[t] / s1.sum;
            const float c_t = s1.max + log_(s1.sum) + log_(std::max(st, static_cast<float>(eps)));
            const float lnt = static_cast<float>(log_n[t]);
            const float pf = static_cast<float>(p), qf = static_cast<float>(q);
            float* z = zb.data();
            const float* ln = log_n.data();
            if (pf > 0.0f && qf > 0.0f) {
              for (int64_t j = 0; j < C; ++j)
                z[j] = xf[j] + pf * std::min(0.0f, ln[j] - lnt) + qf * std::max(0.0f, xf[j] - c_t);
            } else if (pf > 0.0f) {
              for (int64_t j = 0; j < C; ++j) z[j] = xf[j] + pf * std::min(0.0f, ln[j] - lnt);
            } else if (qf > 0.0f) {
              for (int64_t j = 0; j < C; ++j) z[j] = xf[j] + qf * std::max(0.0f, xf[j] - c_t);
            } else {
              for (int64_t j = 0; j < C; ++j) z[j] = xf[j];
            }
            z[t] = xt;  // the label's column carries no factor
            float* ef = e.data();
            const cpu::SoftmaxRowStats s2 = cpu::softmax_row(z, C, t, ef);
            const float log_pt = log_softmax_target_sums(xt, s2.max, s2.sum, s2.sum_others);
            lc = -static_cast<T>(log_pt) * w;
            if (gr != nullptr) {
              const float k = static_cast<float>(w * inv_fg);
              if constexpr (std::is_same<G, float>::value) {
                cpu::scale_to(gr, ef, k / s2.sum, C);
              } else {
                const float ks = k / s2.sum;
                for (int64_t j = 0; j < C; ++j) gr[j] = static_cast<G>(ks * ef[j]);
              }
              gr[t] = static_cast<G>(-k * one_minus_pt_from_log(log_pt));
            }
          } else {
            T m = neg_inf;
            for (int64_t j = 0; j < C; ++j) m = std::max(m, static_cast<T>(xr[j]));
            T s = T(0);
            for (int64_t j = 0; j < C; ++j) s += exp_vectorizable(static_cast<T>(xr[j]) - m);
            const T xt = static_cast<T>(xr[t]);
            const T st = exp_(xt - m) / s;
            const T c_t = m + log_(s) + log_(std::max(st, eps));
            const T lnt = log_n[t];
            for (int64_t j = 0; j < C; ++j) {
              const T xj = static_cast<T>(xr[j]);
              T zj = xj;
              if (p > T(0)) zj += p * std::min(T(0), log_n[j] - lnt);
              if (q > T(0)) zj += q * std::max(T(0), xj - c_t);
              e[j] = zj;
            }
            e[t] = xt;  // the label's column carries no factor
            T mz = neg_inf;
            for (int64_t j = 0; j < C; ++j) mz = std::max(mz, e[j]);
            T sz = T(0), others = T(0);
            for (int64_t j = 0; j < C; ++j) {
              e[j] = exp_vectorizable(e[j] - mz);
              sz += e[j];
              others += j == t ? T(0) : e[j];
            }
            const T log_pt = log_softmax_target_sums(xt, mz, sz, others);
            lc = -log_pt * w;
            if (gr != nullptr) {
              const T k = w * inv_fg / sz;
              for (int64_t j = 0; j < C; ++j) gr[j] = static_cast<G>(k * e[j]);
              gr[t] = static_cast<G>(-(w * inv_fg) * one_minus_pt_from_log(log_pt));
            }
          }
        } else if (gr != nullptr) {
          for (int64_t j = 0; j < C; ++j) gr[j] = G(0);
        }
        if (objectness) {
          if (active) {
            const int64_t o = t == C ? 1 : 0;
            const T a = static_cast<T>(xr[C + o]), b = static_cast<T>(xr[C + 1 - o]);  // target, other
            const T m2 = std::max(a, b);
            const T ea = exp_(a - m2), eb = exp_(b - m2);
            const T log_po = log_softmax_target_sums(a, m2, ea + eb, eb);
            lo = -log_po * w;
            if (gr != nullptr) {
              const T k = w * inv_valid;
              const T other_p = eb / (ea + eb);
              gr[C + o] = static_cast<G>(-k * one_minus_pt_from_log(log_po));
              gr[C + 1 - o] = static_cast<G>(k * other_p);
            }
          } else if (gr != nullptr) {
            gr[C] = G(0);
            gr[C + 1] = G(0);
          }
        }
        cls_loss[r] = lc;
        obj_loss[r] = lo;
      }
    });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> seesaw_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                                const at::Tensor& cum_samples, double p, double q,
                                                                double eps, bool objectness, int64_t ignore_index,
                                                                c10::string_view reduction_name, bool compute_grad,
                                                                const c10::optional<at::Tensor>& weight, bool split) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() == 2, "logits: expected (N, C) rows, got ", logits_in.dim(), " dims");
  const at::Tensor logits = logits_in.contiguous();
  const int64_t N = logits.size(0), Ct = logits.size(1);
  const int64_t C = Ct - (objectness ? 2 : 0);
  TORCH_CHECK(C >= 1, "logits: expected at least ", objectness ? 3 : 1, " columns, got ", Ct);
  TORCH_CHECK(target_in.numel() == N, "target: expected ", N, " labels, got ", target_in.numel());
  TORCH_CHECK(cum_samples.scalar_type() == at::kFloat && cum_samples.is_contiguous() && cum_samples.dim() == 1 &&
                  cum_samples.numel() == C + (objectness ? 1 : 0),
              "cum_samples: expected a contiguous float32 tensor of shape (", C + (objectness ? 1 : 0), ",)");
  const at::Tensor target = index_target(target_in);
  const int64_t* tgt = target.data_ptr<int64_t>();
  const at::ScalarType math = at::toOpMathType(logits.scalar_type());
  const at::Tensor weight_t = extra_weight(weight, math, {N});
  int64_t n_valid = 0, n_fg = 0;
  for (int64_t r = 0; r < N; ++r) {
    n_valid += tgt[r] != ignore_index;
    n_fg += tgt[r] != ignore_index && tgt[r] >= 0 && tgt[r] < C;
  }
  const at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss, loss_obj;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "seesaw_forward_cpu", [&] {
    using T = at::opmath_type<scalar_t>;
    const bool mean = reduction == Reduction::Mean;
    const T inv_fg = mean ? T(1) / static_cast<T>(std::max<int64_t>(n_fg, 1)) : T(1);
    const T inv_valid = mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    std::vector<T> cls(N), obj(N);
    seesaw_rows<scalar_t>(logits, tgt, cum_samples.data_ptr<float>(), N, Ct, C, objectness, p, q, eps, ignore_index,
                          weight_ptr<T>(weight_t), inv_fg, inv_valid, grad, compute_grad, cls, obj);
    const Reduction part = mean ? Reduction::Mean : reduction;
    if (split) {
      loss = finish_loss<scalar_t, T>(logits, cls, {N}, static_cast<double>(n_fg), part);
      loss_obj = objectness ? finish_loss<scalar_t, T>(logits, obj, {N}, static_cast<double>(n_valid), part)
                            : at::empty({0}, logits.options().dtype(reduced_dtype(logits)));
      return;
    }
    if (reduction == Reduction::None) {
      std::vector<T> both(N);
      for (int64_t r = 0; r < N; ++r) both[r] = cls[r] + obj[r];
      loss = finish_loss<scalar_t, T>(logits, both, {N}, 0.0, Reduction::None);
    } else {
      double total = ordered_sum(cls.data(), N);
      if (mean) total /= static_cast<double>(std::max<int64_t>(n_fg, 1));
      if (objectness) {
        double t_obj = ordered_sum(obj.data(), N);
        if (mean) t_obj /= static_cast<double>(std::max<int64_t>(n_valid, 1));
        total += t_obj;
      }
      loss = at::scalar_tensor(total, logits.options().dtype(reduced_dtype(logits)));
    }
    loss_obj = at::empty({0}, logits.options().dtype(reduced_dtype(logits)));
  });
  return {loss, loss_obj, grad};
}

}  // namespace cpu_impl

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) { m.impl("seesaw_forward", &cpu_impl::seesaw_forward_cpu); }

}  // namespace fused_losses
