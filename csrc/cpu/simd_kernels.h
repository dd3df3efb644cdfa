// Inner float32 loops of the CPU kernels, written once on portable SIMD vectors (GCC/Clang
// vector extensions: 8 or 16 float lanes, lowered to AVX-512, AVX2+FMA, SSE2 or NEON by the
// compiler) with branch-free polynomial exp / log1p (losses_math.h's formulas, lane-wise).
// On x86-64 each kernel is compiled three times (AVX-512 with 16 lanes, AVX2+FMA with 8,
// baseline SSE2 with 8) and the best one for the running CPU is picked once at load; other
// architectures (aarch64: NEON is baseline) get the portable build. Plain functions on raw
// pointers; no ATen here (csrc/cpu/simd_kernels.cpp).
//
// Every sum below is taken in a fixed lane order (vector accumulators, then a fixed tree), so a
// result depends only on the row and the instruction set, never on the thread count.
#pragma once

#include <stdint.h>

namespace fused_losses {
namespace cpu {

// "avx512f", "avx2+fma" or "baseline": the variant the dispatcher picked.
const char* simd_isa();

constexpr int64_t kMaxTile = 512;  // most lanes (spatial positions) of a channel-second tile

struct SoftmaxRowStats {
  float max;         // max_c x[c]
  float sum;         // sum_c e[c]
  float sum_others;  // sum_{c != t} e[c] (== sum when t is outside [0, n))
};

// One contiguous row: e[c] = exp(x[c] - max) and the sums (losses_math.h
// log_softmax_target_sums turns them into an exact log p_t).
SoftmaxRowStats softmax_row(const float* x, int64_t n, int64_t t, float* e);

// A tile of w <= kMaxTile rows stored class-major (x[c * stride + j], j < w) with targets t[j]
// (-1: ignored; its values are computed but never used): per row max[j], sum[j],
// sum_others[j] and e[c * w + j] = exp(x[c * stride + j] - max[j]).
void softmax_tile(const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t, float* e,
                  float* max, float* sum, float* sum_others);

// Gradient of a tile from the exponentials of softmax_tile:
// g[c * stride + j] = t[j] < 0 ? 0 : c == t[j] ? target_value[j] : coef[j] * e[c * w + j].
void softmax_grad_tile(float* g, int64_t classes, int64_t stride, int64_t w, const int32_t* t, const float* e,
                       const float* coef, const float* target_value);

// Gradient of a tile of the two-pass losses, from the logits and the row max:
// g[c * stride + j] = t[j] < 0 ? 0 : c == t[j] ? target_value[j] : coef[j] * exp(x[c * stride + j] - max[j]).
// max[j] must be the row's max (x - max <= 0: the exponential has no overflow clamp).
void softmax_grad_tile_exp(float* g, const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t,
                           const float* max, const float* coef, const float* target_value);

// out[i] = k * in[i]
void scale_to(float* out, const float* in, float k, int64_t n);

// out[i] = k * exp(x[i] - shift), shift >= every x[i] (the row max: no overflow clamp)
void scaled_exp_to(float* out, const float* x, float shift, float k, int64_t n);

// out[i] = a[i] * b[i]
void multiply_to(float* out, const float* a, const float* b, int64_t n);

// log p_t of w rows from a tile's sums (losses_math.h log_softmax_target_sums, lane-wise, with a
// polynomial log of about 1 ulp instead of libm's scalar logf / log1pf):
// log_pt[j] = x_t[j] == max[j] ? -log1p(sum_others[j]) : (x_t[j] - max[j]) - log(sum[j]).
void log_softmax_target_rows(const float* x_t, const float* max, const float* sum, const float* sum_others, int64_t w,
                             float* log_pt);

// Min, max and count of the n values of t that are not `ignore` (lo = INT64_MAX, hi = INT64_MIN
// when none is): the validation scan of integer targets (common.cpp target_range), 4 or 8
// lanes of int64 at a time instead of a branch per value. Exact in every variant.
struct IndexRange {
  int64_t lo, hi, count;
};
IndexRange index_range(const int64_t* t, int64_t n, int64_t ignore);

// Sigmoid focal loss over one row of n classes (math::sigmoid_focal_element): target y[i], or,
// when y == nullptr, y_i = [i == label] (label >= n: background); n < 2^31. Writes loss[i]
// when loss is not null and grad[i] = grad_scale * dloss/dx_i when grad is not null; returns
// the row's loss sum. gamma in {0, 1, 2, 3} is folded at compile time; other gammas take powf
// lane by lane.
float sigmoid_focal_row(const float* x, const float* y, int64_t label, int64_t n, float alpha, float gamma,
                        float grad_scale, float* loss, float* grad);

// sigmoid_focal_row with the drop-in extras: alpha_t = a_pos[i] y_i + a_neg[i] (1 - y_i) (n
// per-class values each) and loss and gradient multiplied by the weight (weight[i] when weight is
// not null, else row_weight); a zero weight gives exactly 0 loss and gradient (a NaN logit there
// does not leak). A separate compiled variant: the plain row's code is unchanged.
float sigmoid_focal_row_ex(const float* x, const float* y, int64_t label, int64_t n, const float* a_pos,
                           const float* a_neg, const float* weight, float row_weight, float gamma, float grad_scale,
                           float* loss, float* grad);

}  // namespace cpu
}  // namespace fused_losses
