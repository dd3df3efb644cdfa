// Inner float32 loops of the CPU kernels, compiled for several instruction sets (AVX-512,
// AVX2, baseline x86-64) with GCC/Clang function multiversioning: the loader picks the best
// one for the running CPU, so the extension stays portable while the hot loops run 16 or 8
// lanes wide. Plain functions on raw pointers; no ATen here (csrc/cpu/simd_kernels.cpp).
#pragma once

#include <stdint.h>

namespace fused_losses {
namespace cpu {

struct MaxSum {
  float max;
  float sum;
};

// One contiguous row: max_c x[c], e[c] = exp(x[c] - max), sum_c e[c].
MaxSum row_exp_sum(const float* x, int64_t n, float* e);

// A tile of w rows stored class-major (x[c * stride + j], j < w): per row max, exp, sum;
// e[c * w + j] = exp(x[c * stride + j] - max[j]).
void tile_exp_sum(const float* x, int64_t classes, int64_t stride, int64_t w, float* e, float* max, float* sum);

// out[i] = k * in[i]
void scale_to(float* out, const float* in, float k, int64_t n);

// out[i] = k * exp(x[i] - shift)
void scaled_exp_to(float* out, const float* x, float shift, float k, int64_t n);

// out[i] = a[i] * b[i]
void multiply_to(float* out, const float* a, const float* b, int64_t n);

// Sigmoid focal loss over one row of n classes (math::sigmoid_focal_element): target y[i], or,
// when y == nullptr, y_i = [i == label] (label >= n: background); n < 2^31. Writes loss[i]
// (always: pass a scratch row if the losses are not wanted) and grad[i] = grad_scale *
// dloss/dx_i when grad is not null; returns the row's loss sum. Vectorised for gamma in
// {0, 1, 2, 3}; other gammas go through powf lane by lane.
float sigmoid_focal_row(const float* x, const float* y, int64_t label, int64_t n, float alpha, float gamma,
                        float grad_scale, float* loss, float* grad);

}  // namespace cpu
}  // namespace fused_losses
