// Sigmoid-family losses on the CPU: sigmoid focal (the elementwise pass is csrc/cpu/sigmoid.h).

#include "cpu/ops_cpu.h"
#include "cpu/sigmoid.h"

#include <string>

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

// Poly-1 (#24) of one fp32 row after the SIMD focal row (cpu::sigmoid_focal_row[_ex]): adds
// w_c epsilon u^(gamma + 1) to loss[c] and scale w_c epsilon (gamma + 1) u^gamma p q (1 - 2y) to
// grad[c] (u = 1 - p_t; math::sigmoid_poly1_element; a zero weight adds exactly 0), and returns
// the row's added loss. No log, no division beyond sigmoid's. poly1_span: the elements [0, n) of
// a span with targets y[c] (kTarget) or 0 (the negatives of a labelled row), branch-free with
// unconditional loads and stores so that the loop vectorises; a labelled row is two spans of
// negatives around its one positive (poly1_row_add). flatten: exp_vectorizable inlined (GCC left
// it out of line in this file, and the loop then ran scalar: 7x slower).
template <int kGamma, bool kTarget, bool kWeight, bool kLoss, bool kGrad>
__attribute__((flatten)) float poly1_span(const float* __restrict x, const float* __restrict y, int64_t n, float gamma, float eps,
                 float dscale, const float* __restrict wrow, float wr, float* __restrict loss,
                 float* __restrict grad) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) {
    const float xv = x[c];
    const float yv = kTarget ? y[c] : 0.0f;
    const float e = exp_vectorizable(-fabsf(xv));
    const float inv = 1.0f / (1.0f + e);
    const float small = e * inv;
    const float p = xv >= 0.0f ? inv : small;
    const float q = xv >= 0.0f ? small : inv;
    const float u = p * (1.0f - yv) + q * yv;
    const float mod = kGamma == 0 ? 1.0f : kGamma == 1 ? u : kGamma == 2 ? u * u : pow_gamma(u, gamma);
    const float wv = kWeight ? wrow[c] : wr;
    const float lv = wv == 0.0f ? 0.0f : wv * (eps * (mod * u));
    sum += lv;
    if (kLoss) loss[c] += lv;
    if (kGrad) grad[c] += wv == 0.0f ? 0.0f : wv * (dscale * mod * (p * q) * (1.0f - 2.0f * yv));
  }
  return sum;
}

template <int kGamma, bool kTarget, bool kWeight>
float poly1_span_io(const float* x, const float* y, int64_t n, float gamma, float eps, float dscale, const float* wrow,
                    float wr, float* loss, float* grad) {
  if (n <= 0) return 0.0f;
  if (loss != nullptr && grad != nullptr)
    return poly1_span<kGamma, kTarget, kWeight, true, true>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
  if (grad != nullptr)
    return poly1_span<kGamma, kTarget, kWeight, false, true>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
  if (loss != nullptr)
    return poly1_span<kGamma, kTarget, kWeight, true, false>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
  return poly1_span<kGamma, kTarget, kWeight, false, false>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
}

template <int kGamma, bool kWeight>
float poly1_row_add(const float* x, const float* y, int64_t label, int64_t n, float gamma, float eps, float scale,
                    const float* wrow, float wr, float* loss, float* grad) {
  const float dscale = scale * (eps * (gamma + 1.0f));
  if (y != nullptr) return poly1_span_io<kGamma, true, kWeight>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
  if (label < 0 || label >= n)  // background: every element a negative
    return poly1_span_io<kGamma, false, kWeight>(x, y, n, gamma, eps, dscale, wrow, wr, loss, grad);
  const float one = 1.0f;
  auto at = [&](int64_t c0) { return c0; };
  const int64_t l = at(label);
  float s = poly1_span_io<kGamma, false, kWeight>(x, y, l, gamma, eps, dscale, wrow, wr, loss, grad);
  s += poly1_span_io<kGamma, true, kWeight>(x + l, &one, 1, gamma, eps, dscale, kWeight ? wrow + l : wrow, wr,
                                            loss != nullptr ? loss + l : nullptr, grad != nullptr ? grad + l : nullptr);
  s += poly1_span_io<kGamma, false, kWeight>(x + l + 1, y, n - l - 1, gamma, eps, dscale,
                                             kWeight ? wrow + l + 1 : wrow, wr, loss != nullptr ? loss + l + 1 : nullptr,
                                             grad != nullptr ? grad + l + 1 : nullptr);
  return s;
}

template <int kGamma>
float poly1_row_add_w(const float* x, const float* y, int64_t label, int64_t n, float gamma, float eps, float scale,
                      const float* wrow, float wr, float* loss, float* grad) {
  return wrow != nullptr ? poly1_row_add<kGamma, true>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad)
                         : poly1_row_add<kGamma, false>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
}

float poly1_row_add_any(const float* x, const float* y, int64_t label, int64_t n, float gamma, float eps, float scale,
                        const float* wrow, float wr, float* loss, float* grad) {
  if (gamma == 2.0f) return poly1_row_add_w<2>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
  if (gamma == 0.0f) return poly1_row_add_w<0>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
  if (gamma == 1.0f) return poly1_row_add_w<1>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
  return poly1_row_add_w<-1>(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
}

// The best instruction set for poly1_row_add_any: the loops above vectorise for whatever target
// their caller is compiled for, so x86-64 gets AVX-512 and AVX2 copies (everything inlined by
// flatten) picked by the SIMD variant simd_kernels.cpp chose at load (FUSED_LOSSES_SIMD too).
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma"), flatten)) float poly1_row_add_avx512(
    const float* x, const float* y, int64_t label, int64_t n, float gamma, float eps, float scale, const float* wrow,
    float wr, float* loss, float* grad) {
  return poly1_row_add_any(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
}
__attribute__((target("avx2,fma"), flatten)) float poly1_row_add_avx2(const float* x, const float* y, int64_t label,
                                                                       int64_t n, float gamma, float eps, float scale,
                                                                       const float* wrow, float wr, float* loss,
                                                                       float* grad) {
  return poly1_row_add_any(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
}
#endif

float poly1_row_add_best(const float* x, const float* y, int64_t label, int64_t n, float gamma, float eps, float scale,
                         const float* wrow, float wr, float* loss, float* grad) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const int isa = [] {
    const std::string name = cpu::simd_isa();
    return name.rfind("avx512", 0) == 0 ? 2 : name.rfind("avx2", 0) == 0 ? 1 : 0;
  }();
  if (isa == 2) return poly1_row_add_avx512(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
  if (isa == 1) return poly1_row_add_avx2(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
#endif
  return poly1_row_add_any(x, y, label, n, gamma, eps, scale, wrow, wr, loss, grad);
}

}  // namespace

SigmoidInputs sigmoid_inputs(const at::Tensor& logits_in, const at::Tensor& target_in, int64_t ignore_index) {
  SigmoidInputs in;
  TORCH_CHECK(logits_in.dim() >= 1, "logits: expected (..., C), got a 0-dim tensor");
  in.logits = logits_in.contiguous();
  in.C = in.logits.size(-1);
  in.M = in.C == 0 ? 0 : in.logits.numel() / in.C;
  if (target_in.is_floating_point()) {
    TORCH_CHECK(target_in.sizes() == logits_in.sizes(), "target: a float target must have the logits' shape");
    const at::ScalarType math = at::toOpMathType(in.logits.scalar_type());
    const at::ScalarType td = target_in.scalar_type();
    in.float_target = (td == in.logits.scalar_type() ? target_in : target_in.to(math)).contiguous();
    in.count = static_cast<double>(in.logits.numel());
  } else {
    TORCH_CHECK(target_in.numel() == in.M, "target: integer labels must have shape logits.shape[:-1]");
    in.labels = index_target(target_in);
    in.count = static_cast<double>(count_valid(in.labels.data_ptr<int64_t>(), in.M, ignore_index) * in.C);
  }
  return in;
}

// Sigmoid focal: loss = alpha_t * BCE * (1 - p_t)^gamma elementwise (losses_math.h).
std::tuple<at::Tensor, at::Tensor> sigmoid_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool compute_grad,
                                                           const c10::optional<at::Tensor>& alpha_per_class,
                                                           const c10::optional<at::Tensor>& weight, double epsilon) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(std::isfinite(epsilon), "epsilon: expected a finite number, got ", epsilon);
  const SigmoidInputs in = sigmoid_inputs(logits_in, target_in, ignore_index);
  const at::ScalarType math = at::toOpMathType(in.logits.scalar_type());
  const at::Tensor weight_t = extra_weight(weight, math, {in.M, in.M * in.C});
  at::Tensor alpha_vec;
  if (alpha_per_class.has_value()) {
    alpha_vec = alpha_per_class->to(math).contiguous().reshape({-1});
    TORCH_CHECK(alpha_vec.numel() == in.C, "alpha: expected ", in.C, " per-class values, got ", alpha_vec.numel());
  }
  at::Tensor grad = grad_buffer(in.logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "sigmoid_focal_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const T a = static_cast<T>(alpha), gm = static_cast<T>(gamma);
    const T* apc = weight_ptr<T>(alpha_vec);
    const SigmoidWeight<T> sw = sigmoid_weight<T>(weight_t, in.M);
    // The SIMD row with extras takes alpha_t's two factors per class (a_c, 1 - a_c; both 1 when
    // the scalar alpha < 0 disables it), built once here.
    const bool extras = apc != nullptr || sw.w != nullptr;
    std::vector<float> a_pos, a_neg;  // used by the fp32 row only
    if (extras && std::is_same<T, float>::value) {
      a_pos.resize(in.C);
      a_neg.resize(in.C);
      for (int64_t c = 0; c < in.C; ++c) {
        const T ac = apc != nullptr ? apc[c] : a;
        const bool on = apc != nullptr || a >= T(0);
        a_pos[c] = static_cast<float>(on ? ac : T(1));
        a_neg[c] = static_cast<float>(on ? T(1) - ac : T(1));
      }
    }
    const scalar_t* x = in.logits.data_ptr<scalar_t>();
    at::Tensor loss_none = reduction == Reduction::None ? empty_output(logits_in.sizes(), in.logits.options()) : at::Tensor();
    scalar_t* lo = loss_none.defined() ? loss_none.data_ptr<scalar_t>() : nullptr;
    const int64_t* labels = in.labels.defined() ? in.labels.data_ptr<int64_t>() : nullptr;
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max(in.count, 1.0)) : T(1);
    double total = 0.0;
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    with_sigmoid_target<scalar_t, T>(in, [&](auto* y) {
      // flatten: sigmoid_focal_element inlined into the element loop. In this file of its own GCC
      // left it out of line for fp16/bf16 logits (a call per element: 10% slower than when the
      // family shared one file with the others).
      auto elem = [&](T xv, T yv, T e, int64_t c) __attribute__((flatten)) {
        // Per-class alpha: a_c y + (1 - a_c)(1 - y) (sigmoid_focal_element with alpha = a_c >= 0).
        LossGrad<T> lg = sigmoid_focal_element(xv, yv, apc != nullptr ? apc[c] : a, gm, e);
        lg.grad *= scale;
        return lg;
      };
      using target_t = std::remove_const_t<std::remove_pointer_t<decltype(y)>>;
      if (epsilon != 0.0) {
        // Poly-1 (#24): epsilon (1 - p_t)^(gamma + 1) added to each element (not scaled by alpha;
        // the weight applies to the sum in sigmoid_pass). fp32: the SIMD focal row, then the
        // vectorised poly1_row_add over the same row; other dtypes: the generic element loop.
        const T eps_poly = static_cast<T>(epsilon);
        if constexpr (std::is_same<scalar_t, float>::value && std::is_same<target_t, float>::value) {
          auto poly_row = [&](const float* xr, const float* yr, int64_t label, int64_t n, float* lr, float* gr,
                              const float* wrow, float wr) {
            const float focal = extras ? cpu::sigmoid_focal_row_ex(xr, yr, label, n, a_pos.data(), a_neg.data(), wrow,
                                                                   wr, gm, scale, lr, gr)
                                       : cpu::sigmoid_focal_row(xr, yr, label, n, a, gm, scale, lr, gr);
            return focal + poly1_row_add_best(xr, yr, label, n, gm, eps_poly, scale, wrow, wr, lr, gr);
          };
          auto unused_elem = [&](T, T, T, int64_t) { return LossGrad<T>{T(0), T(0)}; };
          total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, unused_elem, poly_row);
          return;
        }
        auto poly_elem = [&](T xv, T yv, T e, int64_t c) __attribute__((flatten)) {
          LossGrad<T> lg = sigmoid_focal_element(xv, yv, apc != nullptr ? apc[c] : a, gm, e);
          const LossGrad<T> pl = sigmoid_poly1_element(xv, yv, gm, eps_poly, e);
          lg.loss += pl.loss;
          lg.grad = (lg.grad + pl.grad) * scale;
          return lg;
        };
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, poly_elem);
        return;
      }
      if constexpr (std::is_same<scalar_t, float>::value && std::is_same<target_t, float>::value) {
        auto fast_row = [&](const float* xr, const float* yr, int64_t label, int64_t n, float* lr, float* gr,
                            const float* wrow, float wr) {
          if (!extras) return cpu::sigmoid_focal_row(xr, yr, label, n, a, gm, scale, lr, gr);
          return cpu::sigmoid_focal_row_ex(xr, yr, label, n, a_pos.data(), a_neg.data(), wrow, wr, gm, scale, lr, gr);
        };
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, elem, fast_row);
      } else {
        total = sigmoid_pass<T>(x, y, labels, in.M, in.C, ignore_index, lo, g, sw, elem);
      }
    });
    });
    loss = loss_none.defined() ? loss_none : reduced_loss(in.logits, total, in.count, reduction);
  });
  return {loss, grad};
}

}  // namespace cpu_impl
}  // namespace fused_losses
