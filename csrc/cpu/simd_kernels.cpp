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

}  // namespace cpu
}  // namespace fused_losses
