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

// float32 logits: tiles of up to kDflTile rows transposed into class-major scratch (xt[c * w + j]),
// so that the SIMD channel-second kernels of simd_kernels.cpp run across the tile's rows (a row of
// 17 bins fills one vector and a scalar tail; across rows every lane is busy): softmax_tile (max,
// exponentials, the sums with and without `sel`), log_softmax_target_rows for both bins (the
// exact forms), softmax_grad_tile (coef e_c and the `sel` column), the `oth` column patched, and
// the gradient tile transposed back. Same per-row formulas as the generic loop below.
constexpr int64_t kDflTile = 128;

void dfl_rows_float(const float* x, const float* y, const float* wp, int64_t M, int64_t C, float scale,
                    float* row_loss, float* g) {
  const int64_t n = C - 1;
  const int64_t tiles = ceil_div(M, kDflTile);
  parallel_for_balanced(0, tiles, std::max<int64_t>(1, kWorkGrain / (C * kDflTile)), [&](int64_t begin, int64_t end) {
    std::vector<float> xt(C * kDflTile), e(C * kDflTile), gt(g != nullptr ? C * kDflTile : 0);
    float mx[kDflTile], sm[kDflTile], so[kDflTile], so_oth[kDflTile], xs[kDflTile], xo[kDflTile], lps[kDflTile],
        lpo[kDflTile], coef[kDflTile], tv[kDflTile], w_sel[kDflTile], w_oth[kDflTile], k[kDflTile];
    int32_t ts[kDflTile], to[kDflTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t r0 = tile * kDflTile, w = std::min(kDflTile, M - r0);
      const float* xr = x + r0 * C;
      for (int64_t c = 0; c < C; ++c)  // contiguous writes; the reads stay in the tile (L1)
        for (int64_t j = 0; j < w; ++j) xt[c * w + j] = xr[j * C + c];
      for (int64_t j = 0; j < w; ++j) {
        const float wr = wp != nullptr ? wp[r0 + j] : 1.0f;
        if (wr == 0.0f) {  // selects 0: a NaN logit or label there does not leak
          ts[j] = -1;
          to[j] = 0;
          xs[j] = xo[j] = w_sel[j] = w_oth[j] = k[j] = 0.0f;
          continue;
        }
        const float yv = y[r0 + j];
        check_dfl_label(yv, n);
        // dfl_bins for a checked label y in [0, n]: floor is the truncation (no libm floorf call)
        const int64_t l = std::min<int64_t>(static_cast<int64_t>(yv), n - 1);
        const float w_r = yv - static_cast<float>(l), w_l = 1.0f - w_r;
        const float x_l = xt[l * w + j], x_r = xt[(l + 1) * w + j];
        const bool left = x_l >= x_r;
        ts[j] = static_cast<int32_t>(left ? l : l + 1);
        to[j] = static_cast<int32_t>(left ? l + 1 : l);
        xs[j] = left ? x_l : x_r;
        xo[j] = left ? x_r : x_l;
        w_sel[j] = left ? w_l : w_r;
        w_oth[j] = left ? w_r : w_l;
        k[j] = scale * wr;
      }
      cpu::softmax_tile(xt.data(), C, w, w, ts, e.data(), mx, sm, so);
      // the other bin's "sum of the others" matters only when it is the row max too (a tie with
      // `sel`): then s >= 2 and s - e_oth = s - 1 has no cancellation
      for (int64_t j = 0; j < w; ++j) so_oth[j] = sm[j] - e[to[j] * w + j];
      cpu::log_softmax_target_rows(xs, mx, sm, so, w, lps);
      cpu::log_softmax_target_rows(xo, mx, sm, so_oth, w, lpo);
      for (int64_t j = 0; j < w; ++j) {
        const bool on = ts[j] >= 0;
        row_loss[r0 + j] = on ? (wp != nullptr ? wp[r0 + j] : 1.0f) * -(w_sel[j] * lps[j] + w_oth[j] * lpo[j]) : 0.0f;
        const float inv_s = 1.0f / sm[j];
        coef[j] = on ? k[j] * inv_s : 0.0f;
        tv[j] = on ? k[j] * (w_oth[j] - so[j] * inv_s) : 0.0f;
      }
      if (g == nullptr) continue;
      cpu::softmax_grad_tile(gt.data(), C, w, w, ts, e.data(), coef, tv);
      for (int64_t j = 0; j < w; ++j)
        if (ts[j] >= 0) gt[to[j] * w + j] = k[j] * (e[to[j] * w + j] / sm[j] - w_oth[j]);
      float* gr = g + r0 * C;
      for (int64_t j = 0; j < w; ++j)
        for (int64_t c = 0; c < C; ++c) gr[j * C + c] = gt[c * w + j];
    }
  });
}

// The per-row loop for T = float with fp32 logits (dfl_rows_float), else false (the generic loop).
template <typename scalar_t, typename T, typename G>
bool dfl_float_path(const scalar_t* x, const T* y, const T* wp, int64_t M, int64_t C, T scale, T* row_loss, G* g) {
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value && std::is_same<G, float>::value) {
    if (C <= 4096) {
      dfl_rows_float(x, y, wp, M, C, scale, row_loss, g);
      return true;
    }
  }
  return false;
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
      if (dfl_float_path<scalar_t, T, G>(x, y, wp, M, C, scale, row_loss.data(), g)) return;
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
