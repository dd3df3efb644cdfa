// Distribution focal loss (GFL, issue #24) on the CPU: one softmax pass per row of n + 1 bins
// with two gathers (the bins left and right of the float label), loss and gradient written in
// that pass. Semantics: fused_losses/reference.py distribution_focal; per-row formula:
// csrc/losses_math.h dfl_bins. Own TORCH_LIBRARY_IMPL block (csrc/DESIGN.md "Files").
#include <torch/library.h>

#include "cpu/softmax.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

// A label outside [0, n] (or NaN) is a RuntimeError naming the value (the validation layer
// raises the ValueError first; this guards direct op calls and torch.compile traces).
template <typename T>
inline void check_dfl_label(T y, int64_t n) {
  TORCH_CHECK(y >= T(0) && y <= static_cast<T>(n), "target: value ", static_cast<double>(y),
              " is out of range [0, ", n, "] (distribution_focal labels lie in [0, n], n + 1 = logits.shape[-1])");
}

}  // namespace

// distribution_focal_forward: logits (..., n + 1), target (...,) float in [0, n]; loss per row
// -(w_l log p_l + w_r log p_r) (times the row weight), gradient scale * w * (p_c - w_l [c == l]
// - w_r [c == r]). 'mean' divides by the number of rows. Reads the logits once, writes the
// gradient once; per row one target value (and weight) read.
std::tuple<at::Tensor, at::Tensor> distribution_focal_forward_cpu(const at::Tensor& logits_in,
                                                                const at::Tensor& target_in,
                                                                c10::string_view reduction_name, bool compute_grad,
                                                                const c10::optional<at::Tensor>& weight) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() >= 1 && logits_in.size(-1) >= 2,
              "logits: expected (..., n + 1) with n + 1 >= 2 bins, got ", logits_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const int64_t C = logits.size(-1), n = C - 1;
  const int64_t M = logits.numel() / C;
  TORCH_CHECK(target_in.numel() == M, "target: expected ", M, " labels (logits.shape[:-1]), got ", target_in.numel());
  const at::ScalarType math = at::toOpMathType(logits.scalar_type());
  const at::Tensor target = target_in.to(math).contiguous();
  const at::Tensor weight_t = extra_weight(weight, math, {M});
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "distribution_focal_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const T* y = target.data_ptr<T>();
    const T* wp = weight_ptr<T>(weight_t);
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(M, 1)) : T(1);
    std::vector<T> row_loss(M, T(0));
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      using G = std::remove_pointer_t<decltype(g)>;
      parallel_for_balanced(0, M, std::max<int64_t>(1, kWorkGrain / C), [&](int64_t begin, int64_t end) {
        std::vector<T> e(C);
        for (int64_t r = begin; r < end; ++r) {
          const scalar_t* xr = x + r * C;
          G* gr = g != nullptr ? g + r * C : nullptr;
          const T wr = wp != nullptr ? wp[r] : T(1);
          if (wr == T(0)) {  // selects 0: a NaN logit or label there does not leak
            if (gr != nullptr)
              for (int64_t c = 0; c < C; ++c) gr[c] = G(0);
            continue;
          }
          const T yv = y[r];
          check_dfl_label(yv, n);
          const DflBins<T> b = dfl_bins(yv, n);
          const int64_t l = b.left, rt = b.left + 1;
          const T x_l = static_cast<T>(xr[l]), x_r = static_cast<T>(xr[rt]);
          const int64_t sel = x_l >= x_r ? l : rt;
          // max, e_c = exp(x_c - max), s and the sum without `sel` (fp32: the SIMD row of simd_kernels.cpp)
          T m, s, so;
          const int32_t t32 = static_cast<int32_t>(sel);
          tile_stats<true>(xr, C, 1, 1, &t32, e.data(), &m, &s, &so);
          const T log_s = log_(s);
          const T x_sel = sel == l ? x_l : x_r, x_oth = sel == l ? x_r : x_l;
          const T w_sel = sel == l ? b.w_left : b.w_right, w_oth = sel == l ? b.w_right : b.w_left;
          T lp_sel, lp_oth;
          if constexpr (std::is_same<T, double>::value) {
            lp_sel = (x_sel - m) - log_s;  // the float64 reference's log-sum form
          } else {
            lp_sel = log_softmax_target_sums(x_sel, m, s, so);
          }
          lp_oth = (x_oth - m) - log_s;
          const T loss_r = -(w_sel * lp_sel + w_oth * lp_oth);
          row_loss[r] = wr * loss_r;
          if (gr == nullptr) continue;
          const T k = scale * wr;
          const T inv_s = T(1) / s;
          const T coef = k * inv_s;
          for (int64_t c = 0; c < C; ++c) gr[c] = static_cast<G>(coef * e[c]);
          // p_sel - w_sel = (1 - w_sel) - (1 - p_sel) = w_oth - so / s (exact for p_sel near 1);
          // p_oth - w_oth = e_oth / s - w_oth.
          const int64_t oth = sel == l ? rt : l;
          const T p_sel_minus_w = std::is_same<T, double>::value ? e[sel] * inv_s - w_sel : w_oth - so * inv_s;
          gr[sel] = static_cast<G>(k * p_sel_minus_w);
          gr[oth] = static_cast<G>(k * (e[oth] * inv_s - w_oth));
        }
      });
    });
    loss = finish_loss<scalar_t>(logits, row_loss, logits.sizes().slice(0, logits.dim() - 1), static_cast<double>(M),
                                 reduction);
  });
  return {loss, grad};
}

}  // namespace cpu_impl

TORCH_LIBRARY_IMPL(fused_losses, CPU, m) {
  m.impl("distribution_focal_forward", &cpu_impl::distribution_focal_forward_cpu);
}

}  // namespace fused_losses
