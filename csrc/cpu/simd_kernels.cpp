// Multiversioned float32 inner loops (see simd_kernels.h). The exponential is
// exp_vectorizable of losses_math.h (branch-free polynomial), so these loops vectorise.
#include "cpu/simd_kernels.h"

#include <limits>

#include "losses_math.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define FL_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FL_MULTIVERSION
#endif

namespace fused_losses {
namespace cpu {

using math::exp_vectorizable;

FL_MULTIVERSION MaxSum row_exp_sum(const float* __restrict x, int64_t n, float* __restrict e) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t c = 0; c < n; ++c) m = x[c] > m ? x[c] : m;
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < n; ++c) {
    const float v = exp_vectorizable(x[c] - m);
    e[c] = v;
    s += v;
  }
  return {m, s};
}

FL_MULTIVERSION void tile_exp_sum(const float* __restrict x, int64_t classes, int64_t stride, int64_t w,
                                  float* __restrict e, float* __restrict max, float* __restrict sum) {
  for (int64_t j = 0; j < w; ++j) {
    max[j] = -std::numeric_limits<float>::infinity();
    sum[j] = 0.0f;
  }
  for (int64_t c = 0; c < classes; ++c) {
    const float* xr = x + c * stride;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) max[j] = xr[j] > max[j] ? xr[j] : max[j];
  }
  for (int64_t c = 0; c < classes; ++c) {
    const float* xr = x + c * stride;
    float* er = e + c * w;
#pragma omp simd
    for (int64_t j = 0; j < w; ++j) {
      const float v = exp_vectorizable(xr[j] - max[j]);
      er[j] = v;
      sum[j] += v;
    }
  }
}

FL_MULTIVERSION void scale_to(float* __restrict out, const float* __restrict in, float k, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = k * in[i];
}

FL_MULTIVERSION void scaled_exp_to(float* __restrict out, const float* __restrict x, float shift, float k, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = k * exp_vectorizable(x[i] - shift);
}

FL_MULTIVERSION void multiply_to(float* __restrict out, const float* __restrict a, const float* __restrict b,
                                 int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

namespace {

// kGamma >= 0: gamma known at compile time (pow_gamma folds to multiplications); -1: runtime.
// Two plain loops (elementwise, then the sum) instead of one loop with a reduction: GCC
// vectorises these, but not the fused version (its omp-simd reduction over the struct
// returned by sigmoid_focal_element stayed scalar).
template <int kGamma, bool kLabels, bool kGrad>
__attribute__((always_inline)) inline float sigmoid_focal_row_impl(const float* __restrict x,
                                                                    const float* __restrict y, int64_t label,
                                                                    int64_t n, float alpha, float gamma_runtime,
                                                                    float grad_scale, float* __restrict loss,
                                                                    float* __restrict grad) {
  const float gamma = kGamma >= 0 ? static_cast<float>(kGamma) : gamma_runtime;
  const int32_t label32 = label < n ? static_cast<int32_t>(label) : -1;
  for (int32_t i = 0; i < static_cast<int32_t>(n); ++i) {
    const float xv = x[i];
    const float yv = kLabels ? (i == label32 ? 1.0f : 0.0f) : y[i];
    const float e = exp_vectorizable(-(xv < 0.0f ? -xv : xv));
    const math::LossGrad<float> lg = math::sigmoid_focal_element(xv, yv, alpha, gamma, e);
    loss[i] = lg.loss;
    if (kGrad) grad[i] = grad_scale * lg.grad;
  }
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += loss[i];
  return s;
}

template <int kGamma>
inline float sigmoid_focal_row_gamma(const float* x, const float* y, int64_t label, int64_t n, float alpha,
                                     float gamma, float grad_scale, float* loss, float* grad) {
  const bool labels = y == nullptr, with_grad = grad != nullptr;
  if (labels && with_grad) return sigmoid_focal_row_impl<kGamma, true, true>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  if (labels) return sigmoid_focal_row_impl<kGamma, true, false>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  if (with_grad) return sigmoid_focal_row_impl<kGamma, false, true>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  return sigmoid_focal_row_impl<kGamma, false, false>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
}

}  // namespace

FL_MULTIVERSION float sigmoid_focal_row(const float* x, const float* y, int64_t label, int64_t n, float alpha,
                                        float gamma, float grad_scale, float* loss, float* grad) {
  if (gamma == 2.0f) return sigmoid_focal_row_gamma<2>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  if (gamma == 0.0f) return sigmoid_focal_row_gamma<0>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  if (gamma == 1.0f) return sigmoid_focal_row_gamma<1>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  if (gamma == 3.0f) return sigmoid_focal_row_gamma<3>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
  return sigmoid_focal_row_gamma<-1>(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
}

}  // namespace cpu
}  // namespace fused_losses
