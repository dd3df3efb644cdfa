// Per-row and per-element formulas of every fused_losses loss, shared by the CPU kernels
// (csrc/cpu/*.cpp, g++) and the CUDA kernels (csrc/cuda/*.cu, nvcc).
//
// Rules for this header, so that it compiles for the host and the device alike:
//   * every function is FL_HOST_DEVICE inline and templated on the math type T (float for
//     fp16/bf16/fp32 inputs, double for fp64): callers convert loaded values to T first;
//   * only the C math library (expf/exp, log1pf/log1p, ...) through the overloads below, no
//     std:: calls (nvcc device code lacks most of <cmath>'s std:: overloads), no exceptions,
//     no allocation;
//   * exact forms near the limits: 1 - p_t is -expm1(log p_t), log(1 + e^-|x|) is log1p.
//
// The reference semantics are fused_losses/reference.py; each function names the reference
// expression it reproduces.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FL_HOST_DEVICE __host__ __device__
#else
#define FL_HOST_DEVICE
#endif
#define FL_INLINE FL_HOST_DEVICE inline
// Always inlined, for the helpers the CPU SIMD loops call on vector types: those loops are
// compiled once per instruction set (target attributes), and an out-of-line template instance
// would be one shared copy with one vector calling convention for all of them.
#if defined(__GNUC__) || defined(__clang__)
#define FL_FORCE_INLINE FL_INLINE __attribute__((always_inline))
#else
#define FL_FORCE_INLINE FL_INLINE
#endif

namespace fused_losses {
namespace math {

// ------------------------------------------------------------------------------------------
// C math overloads for float and double (device code has the C names for both types).
// ------------------------------------------------------------------------------------------
FL_INLINE float exp_(float x) { return expf(x); }
FL_INLINE double exp_(double x) { return exp(x); }
FL_INLINE float expm1_(float x) { return expm1f(x); }
FL_INLINE double expm1_(double x) { return expm1(x); }
FL_INLINE float log_(float x) { return logf(x); }
FL_INLINE double log_(double x) { return log(x); }
FL_INLINE float log1p_(float x) { return log1pf(x); }
FL_INLINE double log1p_(double x) { return log1p(x); }
FL_INLINE float pow_(float x, float y) { return powf(x, y); }
FL_INLINE double pow_(double x, double y) { return pow(x, y); }
FL_INLINE float sqrt_(float x) { return sqrtf(x); }
FL_INLINE double sqrt_(double x) { return sqrt(x); }
FL_INLINE float abs_(float x) { return fabsf(x); }
FL_INLINE double abs_(double x) { return fabs(x); }
FL_INLINE float floor_(float x) { return floorf(x); }
FL_INLINE double floor_(double x) { return floor(x); }
template <typename T>
FL_INLINE bool isnan_(T x) { return x != x; }

// exp(x) for x <= 88 in a form compilers vectorise (no calls, no branches): Cody-Waite range
// reduction x = n ln2 + r, a degree-6 polynomial for e^r (Cephes expf, < 2 ulp) and 2^n
// built in the exponent bits as 2^(n - n/2) * 2^(n/2), so that results down to the smallest
// subnormal are right (-103.97 < x < -87.34: a subnormal, rounded once; the softmax of a
// confident sample needs them). x < -103.97 gives 0, NaN gives NaN. The CPU loops use it
// (csrc/cpu/simd_kernels.cpp has the same steps lane-wise); device code uses expf. Always inlined
// (as log1p_unit_vectorizable and sigmoid_parts): GCC does not inline a plain inline function into
// the target("avx2") / target("avx512f") loops of csrc/cpu/detector_sigmoid.cpp, and a call per
// element keeps such a loop scalar.
FL_FORCE_INLINE float exp_vectorizable(float x) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return expf(x);
#else
  const float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const bool underflow = x < -103.972084f;
  float xc = x < -103.972084f ? -103.972084f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float shifted = xc * 1.44269504088896341f + kRoundMagic;
  const float n = shifted - kRoundMagic;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  int32_t shifted_bits;
  memcpy(&shifted_bits, &shifted, sizeof(float));
  const int32_t n_int = shifted_bits - 0x4B400000;  // bits of kRoundMagic; n in [-150, 127]
  const int32_t half = n_int >> 1;
  const int32_t scale1_bits = (half + 127) << 23, scale2_bits = (n_int - half + 127) << 23;
  float scale1, scale2;
  memcpy(&scale1, &scale1_bits, sizeof(float));
  memcpy(&scale2, &scale2_bits, sizeof(float));
  return underflow ? 0.0f : (p * scale1) * scale2;
#endif
}
FL_INLINE double exp_vectorizable(double x) { return exp(x); }

// The series factor of log1p_unit_vectorizable: P(w) ~ atanh(z) / z = sum_k w^k / (2k + 1),
// w = z^2 in [0, 1/9], as 1 + w (c1 + w (c2 + w (c3 + w c4))) with coefficients fitted to that
// interval (iteratively reweighted least squares towards minimax, then rounded to float):
// relative error 4.8e-9 (0.08 ulp), where the odd series it replaces needed terms to z^17 (8
// multiply-adds instead of 4). log1p_unit_vectorizable itself stays within 2.8 ulp of log1p, as
// with the long series (the division z = e / (2 + e) dominates); P(0) = 1 exactly keeps the
// relative accuracy as e -> 0. A template so the CPU SIMD loops (csrc/cpu/simd_kernels.cpp)
// evaluate the same polynomial lane-wise on vector types (hence FL_FORCE_INLINE).
template <typename V>
FL_FORCE_INLINE V log1p_unit_series(V w) {
  V p = w * 0.14012232422828674f + 0.13999569416046143f;
  p = p * w + 0.20010849833488464f;
  p = p * w + 0.3333320617675781f;
  return p * w + 1.0f;
}

// log1p(e) for e in [0, 1] (the e^{-|x|} of the sigmoid family) in a form compilers vectorise:
// log1p(e) = 2 atanh(z), z = e / (2 + e) in [0, 1/3], with log1p_unit_series for atanh(z) / z.
// NaN gives NaN. Device: log1pf.
FL_FORCE_INLINE float log1p_unit_vectorizable(float e) {
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
  return log1pf(e);
#else
  const float z = e / (2.0f + e);
  return 2.0f * z * log1p_unit_series(z * z);
#endif
}
FL_INLINE double log1p_unit_vectorizable(double e) { return log1p(e); }

// q^gamma with the exponents the reference meets most computed as torch.pow computes them
// (x*x for 2, sqrt for 0.5), so results match bit for bit where possible and skip powf.
template <typename T>
FL_INLINE T pow_gamma(T q, T gamma) {
  if (gamma == T(0)) return T(1);
  if (gamma == T(1)) return q;
  if (gamma == T(2)) return q * q;
  if (gamma == T(3)) return q * q * q;
  if (gamma == T(0.5)) return sqrt_(q);
  return pow_(q, gamma);
}

// ------------------------------------------------------------------------------------------
// Softmax pieces. A row x_0..x_{C-1} with m = max_c x_c, s = sum_c e^{x_c - m}:
//   log p_t = (x_t - m) - log s,   p_c = e^{x_c - m} / s,   d(log p_t)/dx_c = [c == t] - p_c.
// Every softmax-family gradient here is dL/dx_c = k * ([c == t] - p_c) with the per-row
// scalar k = dL/dlog p_t (so with c_i = -k it is c_i * (p_c - onehot_c)).
// ------------------------------------------------------------------------------------------
template <typename T>
FL_INLINE T log_softmax_target(T x_t, T row_max, T log_sum) {
  return (x_t - row_max) - log_sum;
}

// log p_t from the row's pieces, exact to a few ulp relative at every margin: row_sum =
// sum_c e^{x_c - m}, sum_others = the same sum without the target column. When t is the row
// maximum (x_t = m), log p_t = -log(1 + sum_others) = -log1p(sum_others): the rounded row_sum
// (1 + sum_others in float) would lose sum_others below float resolution, and with it the
// loss of a confident sample (margin 17: relative error 0.17 in float32, eager fp32 1e-3). Else
// p_t <= 1/2, |log p_t| >= log 2 and (x_t - m) - log(row_sum) is accurate. 1 - p_t then comes
// from -expm1(log p_t) (one_minus_pt_from_log), exact as well.
template <typename T>
FL_INLINE T log_softmax_target_sums(T x_t, T row_max, T row_sum, T sum_others) {
  return x_t == row_max ? -log1p_(sum_others) : (x_t - row_max) - log_(row_sum);
}

// 1 - p_t = -expm1(log p_t): the target-column factor of the gradient, exact when p_t -> 1.
template <typename T>
FL_INLINE T one_minus_pt_from_log(T log_pt) { return -expm1_(log_pt); }

// The focal term of reference._FocalTerm and its derivative in l = log p_t <= 0:
//   L(l) = (1 - e^l)^gamma * (-l)
//   dL/dl = gamma * p_t * (1 - p_t)^gamma * r(l) - (1 - p_t)^gamma,  r(l) = l / (1 - e^l)
// with 1 - e^l = -expm1(l) and r = -1 where 1 - p_t = 0 (its limit), so dL/dl is finite for
// every gamma >= 0 (gamma < 1 included) and equals its limit at p_t = 1. gamma = 0 gives
// L = -l, dL/dl = -1 exactly.
template <typename T>
struct FocalTerm {
  T value;
  T dvalue_dlogpt;
};

// From l, p_t = e^l and 1 - p_t already in hand (the CPU softmax has them from its sums:
// p_t = e_t / s, 1 - p_t = sum_others / s, both exact relative): no transcendental call
// besides pow for a gamma outside {0, 0.5, 1, 2, 3}.
template <typename T>
FL_INLINE FocalTerm<T> focal_term_parts(T log_pt, T p_t, T one_minus_pt, T gamma) {
  FocalTerm<T> out;
  const T modulation = pow_gamma(one_minus_pt, gamma);
  out.value = modulation * (-log_pt);
  if (gamma == T(0)) {
    out.dvalue_dlogpt = T(-1);
  } else {
    const T r = one_minus_pt > T(0) ? log_pt / one_minus_pt : T(-1);
    out.dvalue_dlogpt = gamma * p_t * modulation * r - modulation;
  }
  return out;
}

template <typename T>
FL_INLINE FocalTerm<T> focal_term(T log_pt, T gamma) {
  return focal_term_parts(log_pt, exp_(log_pt), -expm1_(log_pt), gamma);
}

// alpha_t of the softmax focal loss: per-class vector when given, else the scalar (1 = none).
template <typename T>
FL_INLINE T class_alpha(const T* alpha_per_class, T alpha_scalar, int64_t t) {
  return alpha_per_class != nullptr ? alpha_per_class[t] : alpha_scalar;
}

// ------------------------------------------------------------------------------------------
// Sigmoid family, per element, logsigmoid form. p = sigmoid(x), q = 1 - p = sigmoid(-x),
// e = e^{-|x|} in (0, 1]:
//   BCE(x, y) = (1 - y) x - log sigmoid(x),  log sigmoid(x) = min(x, 0) - log1p(e)
//             (torch's binary_cross_entropy_with_logits form, so +-inf logits give the
//             reference's inf / NaN: x = +inf, y = 0 -> +inf; x = -inf, y = 1 -> NaN),
//             summed as ((1 - y) x - min(x, 0)) + log1p(e)
//   1 - p_t   = p (1 - y) + q y,  d(1 - p_t)/dx = p q (1 - 2y)
//   dBCE/dx   = p - y = p (1 - y) - q y   (no cancellation for hard labels: a confident
//             positive x = 20, y = 1 gives -q = -2.06e-9, not the 0 of sigmoid(x) - 1)
//   loss = alpha_t * BCE * (1 - p_t)^gamma,  alpha_t = alpha y + (1 - alpha)(1 - y) (alpha >= 0)
//   dloss/dx = alpha_t * [(p - y) (1 - p_t)^gamma + BCE * gamma (1 - p_t)^gamma p q (1 - 2y) / (1 - p_t)]
// where the last factor is taken as 0 when 1 - p_t = 0 (reference._PowSafe) and p q / (1 - p_t)
// <= 1 always, so it never overflows; with gamma = 0 the second term is absent (not BCE * 0,
// which is NaN at x = +-inf where the reference's gradient is finite).
// ------------------------------------------------------------------------------------------
template <typename T>
struct SigmoidParts {
  T p;          // sigmoid(x)
  T q;          // sigmoid(-x)
  T bce;        // binary cross entropy with logits
  T p_minus_y;  // dBCE/dx = p - y, as p (1 - y) - q y
};

// e = exp(-|x|) computed by the caller (so the CPU loop can use exp_vectorizable).
template <typename T>
FL_FORCE_INLINE SigmoidParts<T> sigmoid_parts(T x, T y, T exp_neg_abs_x) {
  SigmoidParts<T> s;
  const T inv = T(1) / (T(1) + exp_neg_abs_x);
  const T small = exp_neg_abs_x * inv;  // sigmoid(-|x|)
  s.p = x >= T(0) ? inv : small;
  s.q = x >= T(0) ? small : inv;
  // ((1 - y) x - min(x, 0)) + log1p(e): the bracket is exact for hard labels (x - x = 0 for a
  // confident negative), and +-inf give the reference's inf / NaN.
  s.bce = ((T(1) - y) * x - (x < T(0) ? x : T(0))) + log1p_unit_vectorizable(exp_neg_abs_x);
  s.p_minus_y = s.p * (T(1) - y) - s.q * y;
  return s;
}

template <typename T>
struct LossGrad {
  T loss;
  T grad;
};

template <typename T>
FL_INLINE LossGrad<T> sigmoid_focal_element(T x, T y, T alpha, T gamma, T exp_neg_abs_x) {
  const SigmoidParts<T> s = sigmoid_parts(x, y, exp_neg_abs_x);
  const T one_minus_pt = s.p * (T(1) - y) + s.q * y;
  const T modulation = pow_gamma(one_minus_pt, gamma);
  const T alpha_t = alpha >= T(0) ? alpha * y + (T(1) - alpha) * (T(1) - y) : T(1);
  // Computed for every lane, then selected (no division under a branch, so loops vectorise).
  const T pq_over = s.p * s.q / (one_minus_pt > T(0) ? one_minus_pt : T(1));
  const T dmod = one_minus_pt > T(0) ? gamma * modulation * pq_over * (T(1) - T(2) * y) : T(0);
  const T chain = gamma != T(0) ? s.bce * dmod : T(0);
  LossGrad<T> out;
  out.loss = alpha_t * (s.bce * modulation);
  out.grad = alpha_t * (s.p_minus_y * modulation + chain);
  return out;
}

// ------------------------------------------------------------------------------------------
// Influence-balanced loss, per row (reference.ib). l = log p_t, w = weight[t] (1 if none),
// f = feature norm, CE_w = -w l, g = ||softmax - onehot||_1 = 2 (1 - p_t) = -2 expm1(l),
// factor = alpha / (g f + eps), per_sample = CE_w (gamma = 0) or focal_term(-CE_w, gamma),
// loss = factor * per_sample. Derivatives (dg/dl = -2 p_t):
//   dloss/dl = factor * dper_sample/dl + per_sample * dfactor/dl,
//   dfactor/dl = factor / (g f + eps) * 2 p_t f   (0 with detach_factor),
//   dloss/df   = -per_sample * factor * g / (g f + eps)   (0 with detach_factor).
// ------------------------------------------------------------------------------------------
// (1 - p) + p log p for q = 1 - p in [0, 1] and log_p = log p, without cancellation: below
// q = 1/4 the series sum_{k >= 2} q^k / (k (k - 1)) (every term positive; float: k <= 13, double:
// k <= 28, the first term left out below 2^-24 resp. 2^-53 of the sum), above it the formula
// itself (cancels by at most a factor 8; p log p -> 0 as p -> 0).
template <typename T>
FL_INLINE T one_minus_p_plus_p_log_p(T q, T log_p) {
  if (q < T(0.25)) {
    const int top = sizeof(T) == 4 ? 13 : 28;
    T acc = T(1) / static_cast<T>(top * (top - 1));
    for (int k = top - 1; k >= 2; --k) acc = T(1) / static_cast<T>(k * (k - 1)) + q * acc;
    return q * q * acc;
  }
  return q + exp_(log_p) * log_p;
}

template <typename T>
struct IBRow {
  T loss;
  T dloss_dlogpt;
  T dloss_dfeature;
};

template <typename T>
FL_INLINE IBRow<T> ib_row(T log_pt, T class_weight, T feature, T alpha, T epsilon, T gamma, bool detach_factor) {
  const T g = T(-2) * expm1_(log_pt);
  const T denom = g * feature + epsilon;
  const T factor = alpha / denom;
  T per_sample, dper_sample;
  if (gamma > T(0)) {
    const FocalTerm<T> ft = focal_term(class_weight * log_pt, gamma);
    per_sample = ft.value;
    dper_sample = ft.dvalue_dlogpt * class_weight;
  } else {
    per_sample = -class_weight * log_pt;
    dper_sample = -class_weight;
  }
  IBRow<T> out;
  out.loss = factor * per_sample;
  out.dloss_dlogpt = factor * dper_sample;
  out.dloss_dfeature = T(0);
  if (!detach_factor) {
    if (gamma > T(0)) {
      out.dloss_dlogpt += per_sample * (factor / denom) * (T(2) * exp_(log_pt) * feature);
    } else {
      // factor dCE_w/dl + CE_w dfactor/dl = -(factor w / denom) (2 f ((1 - p_t) + p_t l) + eps): the two
      // terms nearly cancel for a confident sample with a large f; (1 - p_t) + p_t l >= 0 is summed
      // without cancellation (one_minus_p_plus_p_log_p).
      out.dloss_dlogpt = -(factor * class_weight / denom) *
                         (T(2) * feature * one_minus_p_plus_p_log_p(g / T(2), log_pt) + epsilon);
    }
    out.dloss_dfeature = -per_sample * factor * g / denom;
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// GHM-C (reference.ghmc): g always in float32, bin = min(floor(g * bins), bins - 1), NaN -> -1
// (no bin). Sigmoid: g = |sigmoid(x) - y| with x, y cast to float; softmax: g = 1 - p_t =
// -expm1(log p_t) from a float32 log-softmax.
// ------------------------------------------------------------------------------------------
FL_INLINE int64_t ghm_bin(float g, int64_t bins) {
  if (isnan_(g)) return -1;
  const float scaled = floor_(g * static_cast<float>(bins));
  // g in [0, 1] gives scaled in [0, bins]; the clamp matches torch.clamp_max(.., bins - 1).
  const int64_t b = static_cast<int64_t>(scaled);
  return b > bins - 1 ? bins - 1 : b;
}

FL_INLINE float ghm_sigmoid_g(float x, float y) {
  // torch.sigmoid in float32: 1 / (1 + exp(-x)).
  const float p = 1.0f / (1.0f + expf(-x));
  return fabsf(p - y);
}

FL_INLINE float ghm_softmax_g(float log_pt) { return -expm1f(log_pt); }

// EMA of a bin count, float32 like the reference's tensor ops (momentum * state rounds, then
// (1 - momentum) * count rounds, then the sum). Under nvcc, __fmul_rn keeps the products from
// being contracted into an FMA, which would change the last bit.
FL_INLINE float ghm_ema(float state, float count, float momentum, float one_minus_momentum) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(momentum, state), __fmul_rn(one_minus_momentum, count));
#else
  const float a = momentum * state;
  const float b = one_minus_momentum * count;
  return a + b;
#endif
}


// ---- distribution focal / Poly-1 (#24) ----------------------------------------------------
// Poly-1's added term (reference.poly1_term, focal_poly1, sigmoid_focal_poly1), applied after
// focal_term_parts / sigmoid_focal_element when epsilon != 0 (never scaled by alpha; scaled by
// the weight as the focal part). u = 1 - p_t:
//   value = epsilon u^(gamma + 1),   d value / d log p_t = -epsilon (gamma + 1) u^gamma p_t
// (du/dl = -p_t): the softmax rows' k form, grad_c = k ([c == t] - p_c). The exponent is >= 1,
// so the derivative is finite at u = 0 for every gamma >= 0.
template <typename T>
FL_INLINE FocalTerm<T> poly1_term_parts(T p_t, T one_minus_pt, T gamma, T epsilon) {
  const T modulation = pow_gamma(one_minus_pt, gamma);
  FocalTerm<T> out;
  out.value = epsilon * (modulation * one_minus_pt);
  out.dvalue_dlogpt = -epsilon * (gamma + T(1)) * modulation * p_t;
  return out;
}

// The sigmoid element's Poly-1 term from x (e = e^{-|x|} as sigmoid_focal_element) and y:
//   u = p (1 - y) + q y,  loss = epsilon u^(gamma + 1),  dloss/dx = epsilon (gamma + 1) u^gamma p q (1 - 2y).
template <typename T>
FL_INLINE LossGrad<T> sigmoid_poly1_element(T x, T y, T gamma, T epsilon, T exp_neg_abs_x) {
  const T inv = T(1) / (T(1) + exp_neg_abs_x);
  const T small = exp_neg_abs_x * inv;
  const T p = x >= T(0) ? inv : small;
  const T q = x >= T(0) ? small : inv;
  const T u = p * (T(1) - y) + q * y;
  const T modulation = pow_gamma(u, gamma);
  LossGrad<T> out;
  out.loss = epsilon * (modulation * u);
  out.grad = epsilon * (gamma + T(1)) * modulation * (p * q) * (T(1) - T(2) * y);
  return out;
}

// Distribution focal loss of one row of n + 1 bins (reference.distribution_focal): label y in
// [0, n], l = min(floor(y), n - 1), r = l + 1, w_r = y - l, w_l = 1 - w_r:
//   loss = -(w_l log p_l + w_r log p_r),   dloss/dx_c = p_c - w_l [c == l] - w_r [c == r]
// (w_l + w_r = 1). dfl_bins gives l and the two weights; a y outside [0, n] or NaN is clamped
// into a valid bin pair (the device kernels never read out of bounds; the host validates).
template <typename T>
struct DflBins {
  int64_t left;
  T w_left, w_right;
};

template <typename T>
FL_INLINE DflBins<T> dfl_bins(T y, int64_t n) {
  DflBins<T> b;
  T f = floor_(y);
  const T top = static_cast<T>(n - 1);
  f = f > top ? top : f;
  f = f >= T(0) ? f : T(0);  // also maps NaN to 0
  b.left = static_cast<int64_t>(f);
  b.w_right = y - f;
  b.w_left = T(1) - b.w_right;
  return b;
}

}  // namespace math
}  // namespace fused_losses
