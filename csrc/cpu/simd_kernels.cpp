// Portable SIMD float32 loops of the CPU kernels (see simd_kernels.h).
//
// Each kernel is a template on the lane count W, written on GCC/Clang vector types (Vec<W>)
// so that the same source becomes AVX-512 (W = 16), AVX2+FMA (W = 8), SSE2 (x86-64 baseline,
// W = 8 as two registers) or NEON (aarch64, W = 8 as two registers) code. The transcendental
// functions are the branch-free polynomials of losses_math.h, lane-wise:
//   exp:   for x <= 0 (every exponent here is x - max or -|x|): Cody-Waite reduction
//          x = n ln2 + r, degree-6 polynomial (Cephes expf, < 2 ulp), 2^n built in the exponent
//          bits in two factors (subnormal results are right; one factor when the caller knows
//          every lane is above -87), x < -103.97 gives 0, NaN gives NaN;
//   log1p: for e in [0, 1] only, 2 atanh(e / (2 + e)) with a fitted degree-4 polynomial in
//          z^2 for atanh(z) / z (relative error 4.8e-9; losses_math.h log1p_unit_series).
// Ragged ends (a row length or tile width not a multiple of W) are loaded into a vector
// filled with a neutral value (-inf for a max, whose exp is 0) and stored partially, so every
// element goes through the same lane arithmetic.
#include "cpu/simd_kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <limits>

#include "losses_math.h"

#if defined(__GNUC__) && !defined(__clang__)
// Vector arguments of the always-inline helpers: no ABI is ever used (everything is inlined).
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FL_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fused_losses {
namespace cpu {
namespace {

template <int W>
struct Vec;
template <>
struct Vec<8> {
  typedef float F __attribute__((vector_size(32)));
  typedef int32_t I __attribute__((vector_size(32)));
  typedef int64_t I64 __attribute__((vector_size(32)));
};
template <>
struct Vec<16> {
  typedef float F __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  typedef int64_t I64 __attribute__((vector_size(64)));
};

template <int W>
struct Lanes {
  using F = typename Vec<W>::F;
  using I = typename Vec<W>::I;

  static FL_ALWAYS_INLINE F splat(float v) {
    F r = {};
    return r + v;
  }
  static FL_ALWAYS_INLINE I splat_i(int32_t v) {
    I r = {};
    return r + v;
  }
  static FL_ALWAYS_INLINE I iota() {
    I r = {};
    for (int i = 0; i < W; ++i) r[i] = i;
    return r;
  }
  static FL_ALWAYS_INLINE F load(const float* p) {
    F v;
    memcpy(&v, p, sizeof(F));
    return v;
  }
  // n < W values from p, the other lanes `fill`.
  static FL_ALWAYS_INLINE F load_part(const float* p, int64_t n, float fill) {
    F v = splat(fill);
    memcpy(&v, p, static_cast<size_t>(n) * sizeof(float));
    return v;
  }
  static FL_ALWAYS_INLINE I load_part_i(const int32_t* p, int64_t n, int32_t fill) {
    I v = splat_i(fill);
    memcpy(&v, p, static_cast<size_t>(n) * sizeof(int32_t));
    return v;
  }
  static FL_ALWAYS_INLINE void store(float* p, F v) { memcpy(p, &v, sizeof(F)); }
  static FL_ALWAYS_INLINE void store_part(float* p, F v, int64_t n) {
    memcpy(p, &v, static_cast<size_t>(n) * sizeof(float));
  }
  template <bool kFull>
  static FL_ALWAYS_INLINE F load_n(const float* p, int64_t n, float fill) {
    return kFull ? load(p) : load_part(p, n, fill);
  }
  template <bool kFull>
  static FL_ALWAYS_INLINE void store_n(float* p, F v, int64_t n) {
    if (kFull) {
      store(p, v);
    } else {
      store_part(p, v, n);
    }
  }
  // Fixed tree over the lanes (deterministic).
  static FL_ALWAYS_INLINE float hsum(F v) {
    float a[W];
    memcpy(a, &v, sizeof(F));
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) a[i] += a[i + h];
    return a[0];
  }
  static FL_ALWAYS_INLINE float hmax(F v) {
    float a[W];
    memcpy(a, &v, sizeof(F));
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) a[i] = a[i + h] > a[i] ? a[i + h] : a[i];
    return a[0];
  }
  static FL_ALWAYS_INLINE F vmax(F a, F b) { return b > a ? b : a; }  // NaN in b ignored, as the scalar max
  static FL_ALWAYS_INLINE F abs(F x) { return (F)((I)x & 0x7fffffff); }

  // exp_vectorizable of losses_math.h, lane-wise (subnormal results included), for x <= 0, -inf
  // or NaN only (every caller: softmax's x - max, the sigmoid's -|x|), so without its clamps.
  // Below kExpLo the lanes' integer exponent is garbage, but the underflow select gives
  // 0 there, as exp_vectorizable's clamp does; a positive x (only in lanes a ragged end never stores)
  // gives garbage.
  static FL_ALWAYS_INLINE F exp_nonpos(F x) { return exp_core(x, x < splat(kExpLo)); }

  // The same values again where every lane is in [kExpNormalLo, 0] or NaN (the caller knows it
  // for a whole row or tile: max - min <= 87): 2^n is then a normal float in every lane, and
  // p * 2^n is exactly exp_core's (p * 2^h) * 2^(n - h), both being the one rounding of the
  // exact product (p * 2^h is exact). No split scale, no underflow select: 8 of about 30
  // instructions less.
  static FL_ALWAYS_INLINE F exp_normal(F x) {
    F p;
    const F shifted = exp_poly(x, p);
    return p * (F)(((I)shifted - (0x4B400000 - 127)) << 23);
  }
  // exp_normal where kNormal, else exp_nonpos.
  template <bool kNormal>
  static FL_ALWAYS_INLINE F exp_nonpos_(F x) { return kNormal ? exp_normal(x) : exp_nonpos(x); }

  static constexpr float kExpLo = -103.972084f;
  static constexpr float kExpNormalLo = -87.0f;  // n = round(x log2 e) >= -126 above it
  static FL_ALWAYS_INLINE bool any(I m) {
    int32_t a[W];
    memcpy(a, &m, sizeof(I));
    int32_t r = 0;
    for (int i = 0; i < W; ++i) r |= a[i];
    return r != 0;
  }
  static FL_ALWAYS_INLINE F vmin(F a, F b) { return b < a ? b : a; }  // NaN in b ignored
  static FL_ALWAYS_INLINE float hmin(F v) {
    float a[W];
    memcpy(a, &v, sizeof(F));
    for (int h = W / 2; h >= 1; h /= 2)
      for (int i = 0; i < h; ++i) a[i] = a[i + h] < a[i] ? a[i + h] : a[i];
    return a[0];
  }

  // Cody-Waite reduction and the degree-6 polynomial: p = e^r, returns x log2 e + 1.5 * 2^23,
  // whose low bits are n = round(x log2 e).
  static FL_ALWAYS_INLINE F exp_poly(F xc, F& p) {
    const F shifted = xc * 1.44269504088896341f + 12582912.0f;  // + 1.5 * 2^23 rounds to an integer
    const F n = shifted - 12582912.0f;
    F r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    const F r2 = r * r;
    p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    return shifted;
  }
  static FL_ALWAYS_INLINE F exp_core(F xc, I underflow) {
    F p;
    const F shifted = exp_poly(xc, p);
    const I n_int = (I)shifted - 0x4B400000;  // bits of 1.5 * 2^23; n in [-150, 127]
    const I half = n_int >> 1;
    const F scale1 = (F)((half + 127) << 23), scale2 = (F)((n_int - half + 127) << 23);
    return underflow ? splat(0.0f) : (p * scale1) * scale2;
  }

  // log1p_unit_vectorizable of losses_math.h (e in [0, 1]), lane-wise: the same series.
  static FL_ALWAYS_INLINE F log1p_unit(F e) {
    const F z = e / (e + 2.0f);
    return 2.0f * z * math::log1p_unit_series(z * z);
  }

  // log1p(v) for v >= 0 (or NaN): log1p_unit(v) below 1 (exact relative as v -> 0), else
  // log(u), u = 1 + v = 2^k m, m in [1, 2), as k ln2 + log1p_unit(m - 1) (m - 1 exact; the
  // rounding of 1 + v costs at most 2^-24 absolute, < 1.5 ulp of log u >= log 2), ln2 in two
  // parts (k * 0.693359375 exact). NaN gives NaN; v < 2^24 (a softmax row's sums: <= C).
  static FL_ALWAYS_INLINE F log1p_pos(F v) {
    const I small = v < 1.0f;
    const I bits = (I)(1.0f + v);
    const I k = ((bits >> 23) & 0xff) - 127;
    const F m = (F)((bits & 0x7fffff) | 0x3f800000);
    const F arg = small ? v : m - 1.0f;
    const F kf = small ? splat(0.0f) : __builtin_convertvector(k, F);
    const F out = kf * 0.693359375f + (kf * -2.12194440e-4f + log1p_unit(arg));
    return v == v ? out : v;
  }
};

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kPosInf = std::numeric_limits<float>::infinity();

// ------------------------------------------------------------------------------------------
// Softmax rows and tiles
// ------------------------------------------------------------------------------------------
// e = exp(x - m) of the full vectors of a row (kNormal: exp_normal). The lane sums are a
// separate loop over e (in L1): an accumulator in this loop is spilled to the stack by GCC
// (the exponential's constants take the registers), and its store-to-load round trip then
// bounds the loop.
template <int W, bool kNormal>
FL_ALWAYS_INLINE void softmax_row_exps(const float* __restrict x, int64_t full, float m, float* __restrict e) {
  using L = Lanes<W>;
  for (int64_t i = 0; i < full; i += W) L::store(e + i, L::template exp_nonpos_<kNormal>(L::load(x + i) - m));
}

template <int W>
FL_ALWAYS_INLINE SoftmaxRowStats softmax_row_impl(const float* __restrict x, int64_t n, int64_t t,
                                                  float* __restrict e) {
  using L = Lanes<W>;
  using F = typename L::F;
  const int64_t full = n - n % W, rest = n - full;
  F mv = L::splat(kNegInf), nv = L::splat(kPosInf);
  for (int64_t i = 0; i < full; i += W) {
    const F v = L::load(x + i);
    mv = L::vmax(mv, v);
    nv = L::vmin(nv, v);
  }
  if (rest) mv = L::vmax(mv, L::load_part(x + full, rest, kNegInf));
  const float m = L::hmax(mv);
  // Every full vector's x - m in [kExpNormalLo, 0] (NaN lanes aside): the fast exponential.
  if (L::hmin(nv) - m >= L::kExpNormalLo) {
    softmax_row_exps<W, true>(x, full, m, e);
  } else {
    softmax_row_exps<W, false>(x, full, m, e);
  }
  F s = L::splat(0.0f);
  for (int64_t i = 0; i < full; i += W) s += L::load(e + i);
  if (rest) {
    const F v = L::exp_nonpos(L::load_part(x + full, rest, kNegInf) - m);
    L::store_part(e + full, v, rest);
    s += v;
  }
  // The sum of the others has the lanes of s but for the target's lane, which is that lane's
  // sum in the same order without the target's term: a few scalar adds of e after the loop
  // (the loop itself carries no target compare; the bits are those of a masked accumulation).
  float lanes[W];
  memcpy(lanes, &s, sizeof(F));
  if (t >= 0 && t < n) {
    const int64_t lane = t % W;
    float acc = 0.0f;
    for (int64_t i = lane; i < n; i += W)
      if (i != t) acc += e[i];
    lanes[lane] = acc;
  }
  F so;
  memcpy(&so, lanes, sizeof(F));
  return {m, L::hsum(s), L::hsum(so)};
}

template <int W, bool kFull, bool kNormal>
FL_ALWAYS_INLINE void softmax_tile_exps(const float* __restrict x, int64_t classes, int64_t stride, int64_t w,
                                        int64_t j0, int64_t nl, typename Vec<W>::F mv, float* __restrict e) {
  using L = Lanes<W>;
  for (int64_t c = 0; c < classes; ++c)
    L::template store_n<kFull>(e + c * w + j0,
                               L::template exp_nonpos_<kNormal>(L::template load_n<kFull>(x + c * stride + j0, nl, kNegInf) - mv),
                               nl);
}

template <int W, bool kFull>
FL_ALWAYS_INLINE void softmax_tile_group(const float* __restrict x, int64_t classes, int64_t stride, int64_t w,
                                         int64_t j0, int64_t nl, const int32_t* t, float* __restrict e,
                                         float* max, float* sum, float* sum_others) {
  using L = Lanes<W>;
  using F = typename L::F;
  using I = typename L::I;
  F mv = L::splat(kNegInf), nv = L::splat(kPosInf);
  for (int64_t c = 0; c < classes; ++c) {
    const F v = L::template load_n<kFull>(x + c * stride + j0, nl, kNegInf);
    mv = L::vmax(mv, v);
    nv = L::vmin(nv, v);
  }
  // The fast exponential when every lane's min - max >= kExpNormalLo, or is NaN (a ragged end's
  // -inf fill: those lanes are never stored). The sums are a second loop over e (in L1; see
  // softmax_row_exps).
  if (L::any((nv - mv) < L::kExpNormalLo)) {
    softmax_tile_exps<W, kFull, false>(x, classes, stride, w, j0, nl, mv, e);
  } else {
    softmax_tile_exps<W, kFull, true>(x, classes, stride, w, j0, nl, mv, e);
  }
  const I tv = L::load_part_i(t + j0, nl, -1);
  const F zero = L::splat(0.0f);
  F s = zero, so = zero;
  for (int64_t c = 0; c < classes; ++c) {
    const F v = L::template load_n<kFull>(e + c * w + j0, nl, 0.0f);
    s += v;
    so += tv == static_cast<int32_t>(c) ? zero : v;
  }
  L::template store_n<kFull>(max + j0, mv, nl);
  L::template store_n<kFull>(sum + j0, s, nl);
  L::template store_n<kFull>(sum_others + j0, so, nl);
}

template <int W>
FL_ALWAYS_INLINE void softmax_tile_impl(const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t,
                                        float* e, float* max, float* sum, float* sum_others) {
  int64_t j0 = 0;
  for (; j0 + W <= w; j0 += W) softmax_tile_group<W, true>(x, classes, stride, w, j0, W, t, e, max, sum, sum_others);
  if (j0 < w) softmax_tile_group<W, false>(x, classes, stride, w, j0, w - j0, t, e, max, sum, sum_others);
}

// kFromX: the exponential is recomputed from the logits (two-pass losses; kNormal: every lane's
// x - max >= kExpNormalLo, exp_normal); else read from e.
template <int W, bool kFull, bool kFromX, bool kNormal>
FL_ALWAYS_INLINE void softmax_grad_classes(float* __restrict g, const float* __restrict src, int64_t classes,
                                           int64_t stride, int64_t w, int64_t j0, int64_t nl,
                                           typename Vec<W>::I tv, typename Vec<W>::I active, typename Vec<W>::F cf,
                                           typename Vec<W>::F target, typename Vec<W>::F mx) {
  using L = Lanes<W>;
  using F = typename L::F;
  const F zero = L::splat(0.0f);
  for (int64_t c = 0; c < classes; ++c) {
    F v;
    if (kFromX) {
      v = cf * L::template exp_nonpos_<kNormal>(L::template load_n<kFull>(src + c * stride + j0, nl, 0.0f) - mx);
    } else {
      v = cf * L::template load_n<kFull>(src + c * w + j0, nl, 0.0f);
    }
    v = tv == static_cast<int32_t>(c) ? target : v;
    v = active ? v : zero;
    L::template store_n<kFull>(g + c * stride + j0, v, nl);
  }
}

template <int W, bool kFull, bool kFromX>
FL_ALWAYS_INLINE void softmax_grad_group(float* __restrict g, const float* __restrict src, int64_t classes,
                                         int64_t stride, int64_t w, int64_t j0, int64_t nl, const int32_t* t,
                                         const float* max, const float* coef, const float* target_value) {
  using L = Lanes<W>;
  using F = typename L::F;
  using I = typename L::I;
  const I tv = L::load_part_i(t + j0, nl, -1);
  const I active = tv >= 0;
  const F cf = L::template load_n<kFull>(coef + j0, nl, 0.0f);
  const F target = L::template load_n<kFull>(target_value + j0, nl, 0.0f);
  const F mx = kFromX ? L::template load_n<kFull>(max + j0, nl, 0.0f) : L::splat(0.0f);
  if (kFromX) {
    // The fast exponential when every active lane's min over the classes is within 87 of its max.
    F nv = L::splat(kPosInf);
    for (int64_t c = 0; c < classes; ++c) nv = L::vmin(nv, L::template load_n<kFull>(src + c * stride + j0, nl, 0.0f));
    if (!L::any(active & ((nv - mx) < L::kExpNormalLo))) {
      softmax_grad_classes<W, kFull, kFromX, true>(g, src, classes, stride, w, j0, nl, tv, active, cf, target, mx);
      return;
    }
  }
  softmax_grad_classes<W, kFull, kFromX, false>(g, src, classes, stride, w, j0, nl, tv, active, cf, target, mx);
}

template <int W, bool kFromX>
FL_ALWAYS_INLINE void softmax_grad_tile_impl(float* g, const float* src, int64_t classes, int64_t stride, int64_t w,
                                             const int32_t* t, const float* max, const float* coef,
                                             const float* target_value) {
  int64_t j0 = 0;
  for (; j0 + W <= w; j0 += W)
    softmax_grad_group<W, true, kFromX>(g, src, classes, stride, w, j0, W, t, max, coef, target_value);
  if (j0 < w) softmax_grad_group<W, false, kFromX>(g, src, classes, stride, w, j0, w - j0, t, max, coef, target_value);
}

template <int W>
FL_ALWAYS_INLINE void scale_to_impl(float* __restrict out, const float* __restrict in, float k, int64_t n) {
  using L = Lanes<W>;
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) L::store(out + i, L::load(in + i) * k);
  if (n > full) L::store_part(out + full, L::load_part(in + full, n - full, 0.0f) * k, n - full);
}

template <int W>
FL_ALWAYS_INLINE void scaled_exp_to_impl(float* __restrict out, const float* __restrict x, float shift, float k,
                                         int64_t n) {
  using L = Lanes<W>;
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) L::store(out + i, L::exp_nonpos(L::load(x + i) - shift) * k);
  if (n > full) L::store_part(out + full, L::exp_nonpos(L::load_part(x + full, n - full, 0.0f) - shift) * k, n - full);
}

template <int W>
FL_ALWAYS_INLINE void multiply_to_impl(float* __restrict out, const float* __restrict a, const float* __restrict b,
                                       int64_t n) {
  using L = Lanes<W>;
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) L::store(out + i, L::load(a + i) * L::load(b + i));
  if (n > full) L::store_part(out + full, L::load_part(a + full, n - full, 0.0f) * L::load_part(b + full, n - full, 0.0f), n - full);
}

// losses_math.h log_softmax_target_sums for w rows, lane-wise, with log1p_pos for the logs:
// x_t == max ? -log1p(sum_others) : (x_t - max) - log(sum), log(sum) = log1p_pos(sum - 1)
// (sum in [1, C]: sum - 1 is exact).
template <int W>
FL_ALWAYS_INLINE void log_softmax_target_rows_impl(const float* x_t, const float* max, const float* sum,
                                                   const float* sum_others, int64_t w, float* log_pt) {
  using L = Lanes<W>;
  using F = typename L::F;
  for (int64_t j = 0; j < w; j += W) {
    const int64_t nl = w - j < W ? w - j : W;
    const F xt = L::load_part(x_t + j, nl, 0.0f), mx = L::load_part(max + j, nl, 0.0f);
    const F s = L::load_part(sum + j, nl, 1.0f), so = L::load_part(sum_others + j, nl, 0.0f);
    const F confident = -L::log1p_pos(so);
    const F general = (xt - mx) - L::log1p_pos(s - 1.0f);
    L::store_part(log_pt + j, xt == mx ? confident : general, nl);
  }
}

// ------------------------------------------------------------------------------------------
// Sigmoid focal row: math::sigmoid_focal_element lane-wise (see losses_math.h for the
// formulas). kGamma >= 0: gamma folded at compile time, the derivative of (1 - p_t)^gamma as
// gamma (1 - p_t)^(gamma - 1) without a division; -1: runtime gamma, pow_gamma lane by lane.
// ------------------------------------------------------------------------------------------
// kExtras (sigmoid_focal_row_ex): alpha_t from the per-class a_pos[c], a_neg[c] (n values) and
// every loss and gradient lane multiplied by its weight (weight[c], or row_weight when weight is
// null), a zero weight selecting 0 (a NaN logit there gives 0, not NaN).
struct RowExtras {
  const float* a_pos = nullptr;
  const float* a_neg = nullptr;
  const float* weight = nullptr;
  float row_weight = 1.0f;
};

template <int W, int kGamma, bool kLabels, bool kGrad, bool kLoss, bool kFull, bool kExtras, bool kNormal, bool kNeg>
FL_ALWAYS_INLINE typename Vec<W>::F sigmoid_focal_group(const float* __restrict x, const float* __restrict y,
                                                        const typename Vec<W>::I& idx,
                                                        const typename Vec<W>::I& label, int64_t i,
                                                        int64_t nl, float a_pos, float a_neg, float gamma,
                                                        float grad_scale, float* __restrict loss,
                                                        float* __restrict grad, const RowExtras& ex) {
  using L = Lanes<W>;
  using F = typename L::F;
  using I = typename L::I;
  const F zero = L::splat(0.0f), one = L::splat(1.0f);
  const F xv = L::template load_n<kFull>(x + i, nl, 0.0f);
  F yv;
  // kLabels: y = 1 where ypos; kNeg (a row without a positive label: background): y = 0 in every
  // lane, the selects below fold to their y = 0 operand (the same values).
  const I ypos = kNeg ? I{} : idx == label;
  if (kLabels) {
    yv = ypos ? one : zero;
  } else {
    yv = L::template load_n<kFull>(y + i, nl, 0.0f);
  }
  const F omy = 1.0f - yv;
  const F e = L::template exp_nonpos_<kNormal>(-L::abs(xv));
  const F inv = 1.0f / (1.0f + e);
  const F small = e * inv;
  const I pos = xv >= zero;
  const F p = pos ? inv : small;
  const F q = pos ? small : inv;
  const F bce = (omy * xv - (xv < zero ? xv : zero)) + L::log1p_unit(e);
  // Integer labels (y exactly 0 or 1): selects instead of the products, the same values (p, q
  // in [0, 1] or NaN, finite alphas).
  const F omp = kLabels ? (ypos ? q : p) : p * omy + q * yv;  // 1 - p_t
  F alpha_t;
  if (kExtras) {
    const F ap = L::template load_n<kFull>(ex.a_pos + i, nl, 0.0f), an = L::template load_n<kFull>(ex.a_neg + i, nl, 0.0f);
    alpha_t = kLabels ? (ypos ? ap : an) : ap * yv + an * omy;
  } else {
    alpha_t = kLabels ? (ypos ? L::splat(a_pos) : L::splat(a_neg)) : a_pos * yv + a_neg * omy;
  }
  F mod, dmod;  // (1 - p_t)^gamma and its derivative in 1 - p_t
  if (kGamma == 0) {
    mod = one;
    dmod = zero;
  } else if (kGamma == 1) {
    mod = omp;
    dmod = one;
  } else if (kGamma == 2) {
    mod = omp * omp;
    dmod = 2.0f * omp;
  } else if (kGamma == 3) {
    const F omp2 = omp * omp;
    mod = omp2 * omp;
    dmod = 3.0f * omp2;
  } else {
    for (int l = 0; l < W; ++l) mod[l] = math::pow_gamma(omp[l], gamma);
    dmod = gamma * mod / (omp > zero ? omp : one);
  }
  F lv = alpha_t * (bce * mod);
  F wv = one;
  I wzero = {};
  if (kExtras) {
    wv = ex.weight != nullptr ? L::template load_n<kFull>(ex.weight + i, nl, 0.0f) : L::splat(ex.row_weight);
    wzero = wv == zero;
    lv = wzero ? zero : wv * lv;
  }
  if (kLoss) L::template store_n<kFull>(loss + i, lv, nl);
  if (kGrad) {
    F out;
    if (kLabels) {
      // y in {0, 1}: with d(1 - p_t)/dx = -+p q = -+p_t (1 - p_t) (- for y = 1), the gradient
      // (p - y) (1 - p_t)^gamma + bce d(1 - p_t)^gamma/dx is -+(1 - p_t)^gamma ((1 - p_t) + gamma p_t bce):
      // no derivative of the power (no division, no 0^(gamma - 1) guard) and 4 operations less.
      const F pt = ypos ? p : q;
      const F gv = kGamma == 0 ? omp : mod * (omp + (kGamma > 0 ? static_cast<float>(kGamma) : gamma) * (pt * bce));
      if (kExtras) {
        out = grad_scale * (alpha_t * (ypos ? -gv : gv));
      } else {
        // grad_scale * alpha_t with its sign, one select of two row constants (kNeg: one constant).
        out = (ypos ? L::splat(-(grad_scale * a_pos)) : L::splat(grad_scale * a_neg)) * gv;
      }
    } else {
      F gv = (p * omy - q * yv) * mod;  // (p - y) (1 - p_t)^gamma
      if (kGamma != 0) {
        const F dpq = dmod * (p * q);
        const F chain = dpq * (1.0f - 2.0f * yv);  // d(1 - p_t)^gamma / dx
        gv += bce * (omp > zero ? chain : zero);
      }
      out = grad_scale * (alpha_t * gv);
    }
    if (kExtras) out = wzero ? zero : wv * out;
    L::template store_n<kFull>(grad + i, out, nl);
  }
  return kFull ? lv : (idx < static_cast<int32_t>(i + nl) ? lv : zero);
}

template <int W, int kGamma, bool kLabels, bool kGrad, bool kLoss, bool kExtras, bool kNormal, bool kNeg>
FL_ALWAYS_INLINE float sigmoid_focal_row_loop(const float* x, const float* y, int64_t label, int64_t n, float a_pos,
                                              float a_neg, float gamma, float grad_scale, float* loss, float* grad,
                                              const RowExtras& ex) {
  using L = Lanes<W>;
  using F = typename L::F;
  using I = typename L::I;
  const I lab = L::splat_i(label >= 0 && label < n ? static_cast<int32_t>(label) : -1);
  I idx = L::iota();
  F s = L::splat(0.0f);
  const int64_t full = n - n % W;
  for (int64_t i = 0; i < full; i += W) {
    s += sigmoid_focal_group<W, kGamma, kLabels, kGrad, kLoss, true, kExtras, kNormal, kNeg>(
        x, y, idx, lab, i, W, a_pos, a_neg, gamma, grad_scale, loss, grad, ex);
    idx += W;
  }
  if (n > full)
    s += sigmoid_focal_group<W, kGamma, kLabels, kGrad, kLoss, false, kExtras, kNormal, kNeg>(
        x, y, idx, lab, full, n - full, a_pos, a_neg, gamma, grad_scale, loss, grad, ex);
  return L::hsum(s);
}

// Integer labels without a positive class in this row (background, label >= n): every y is 0
// and the row takes kNeg (about 8 of 70 instructions less per vector; the same values).
template <int W, int kGamma, bool kLabels, bool kGrad, bool kLoss, bool kExtras, bool kNormal>
FL_ALWAYS_INLINE float sigmoid_focal_row_labels(const float* x, const float* y, int64_t label, int64_t n, float a_pos,
                                                float a_neg, float gamma, float grad_scale, float* loss, float* grad,
                                                const RowExtras& ex) {
  if (kLabels && !(label >= 0 && label < n))
    return sigmoid_focal_row_loop<W, kGamma, kLabels, kGrad, kLoss, kExtras, kNormal, kLabels>(
        x, y, label, n, a_pos, a_neg, gamma, grad_scale, loss, grad, ex);
  return sigmoid_focal_row_loop<W, kGamma, kLabels, kGrad, kLoss, kExtras, kNormal, false>(
      x, y, label, n, a_pos, a_neg, gamma, grad_scale, loss, grad, ex);
}

// A first pass for max |x| (in L1 after it): every |x| <= 87 (NaN aside) lets the row take
// exp_normal for e^{-|x|} (bit-identical, 8 instructions less per vector).
template <int W, int kGamma, bool kLabels, bool kGrad, bool kLoss, bool kExtras>
FL_ALWAYS_INLINE float sigmoid_focal_row_impl(const float* x, const float* y, int64_t label, int64_t n, float a_pos,
                                              float a_neg, float gamma, float grad_scale, float* loss, float* grad,
                                              const RowExtras& ex) {
  using L = Lanes<W>;
  using F = typename L::F;
  const int64_t full = n - n % W;
  F mv = L::splat(0.0f);
  for (int64_t i = 0; i < full; i += W) mv = L::vmax(mv, L::abs(L::load(x + i)));
  if (n > full) mv = L::vmax(mv, L::abs(L::load_part(x + full, n - full, 0.0f)));
  if (L::hmax(mv) <= -L::kExpNormalLo)
    return sigmoid_focal_row_labels<W, kGamma, kLabels, kGrad, kLoss, kExtras, true>(x, y, label, n, a_pos, a_neg, gamma,
                                                                                    grad_scale, loss, grad, ex);
  return sigmoid_focal_row_labels<W, kGamma, kLabels, kGrad, kLoss, kExtras, false>(x, y, label, n, a_pos, a_neg, gamma,
                                                                                   grad_scale, loss, grad, ex);
}

template <int W, int kGamma, bool kExtras>
FL_ALWAYS_INLINE float sigmoid_focal_row_gamma(const float* x, const float* y, int64_t label, int64_t n, float a_pos,
                                               float a_neg, float gamma, float grad_scale, float* loss, float* grad,
                                               const RowExtras& ex) {
#define FL_SIGMOID_ROW(LABELS, GRAD, LOSS)                                                                     \
  return sigmoid_focal_row_impl<W, kGamma, LABELS, GRAD, LOSS, kExtras>(x, y, label, n, a_pos, a_neg, gamma, \
                                                                        grad_scale, loss, grad, ex)
  const bool labels = y == nullptr, with_grad = grad != nullptr, with_loss = loss != nullptr;
  if (labels) {
    if (with_grad) {
      if (with_loss) FL_SIGMOID_ROW(true, true, true);
      FL_SIGMOID_ROW(true, true, false);
    }
    if (with_loss) FL_SIGMOID_ROW(true, false, true);
    FL_SIGMOID_ROW(true, false, false);
  }
  if (with_grad) {
    if (with_loss) FL_SIGMOID_ROW(false, true, true);
    FL_SIGMOID_ROW(false, true, false);
  }
  if (with_loss) FL_SIGMOID_ROW(false, false, true);
  FL_SIGMOID_ROW(false, false, false);
#undef FL_SIGMOID_ROW
}

template <int W, bool kExtras>
FL_ALWAYS_INLINE float sigmoid_focal_row_dispatch(const float* x, const float* y, int64_t label, int64_t n,
                                                  float alpha, float gamma, float grad_scale, float* loss,
                                                  float* grad, const RowExtras& ex) {
  // alpha_t = a_pos y + a_neg (1 - y); alpha < 0 disables it (1 for every y).
  const float a_pos = alpha >= 0.0f ? alpha : 1.0f, a_neg = alpha >= 0.0f ? 1.0f - alpha : 1.0f;
#define FL_SIGMOID_GAMMA(G) \
  return sigmoid_focal_row_gamma<W, G, kExtras>(x, y, label, n, a_pos, a_neg, gamma, grad_scale, loss, grad, ex)
  if (gamma == 2.0f) FL_SIGMOID_GAMMA(2);
  if (gamma == 0.0f) FL_SIGMOID_GAMMA(0);
  if (gamma == 1.0f) FL_SIGMOID_GAMMA(1);
  if (gamma == 3.0f) FL_SIGMOID_GAMMA(3);
  FL_SIGMOID_GAMMA(-1);
#undef FL_SIGMOID_GAMMA
}

// ------------------------------------------------------------------------------------------
// index_range: int64 lanes (W / 2 of them: the float vector's width), selects instead of a
// branch per value; the lane results are merged exactly (min, max, integer sum).
// ------------------------------------------------------------------------------------------
template <int W>
FL_ALWAYS_INLINE IndexRange index_range_impl(const int64_t* t, int64_t n, int64_t ignore) {
  using V = typename Vec<W>::I64;
  constexpr int kLanes = W / 2;
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max(), kMin = std::numeric_limits<int64_t>::min();
  V lo = V{} + kMax, hi = V{} + kMin, count = V{};
  const V ig = V{} + ignore;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    V v;
    memcpy(&v, t + i, sizeof(V));
    const V skip = v == ig;  // -1 where ignored, 0 elsewhere
    lo = (skip ? lo : v) < lo ? v : lo;
    hi = (skip ? hi : v) > hi ? v : hi;
    count += skip + 1;
  }
  IndexRange r{kMax, kMin, 0};
  for (int l = 0; l < kLanes; ++l) {
    r.lo = lo[l] < r.lo ? lo[l] : r.lo;
    r.hi = hi[l] > r.hi ? hi[l] : r.hi;
    r.count += count[l];
  }
  for (; i < n; ++i) {
    const int64_t v = t[i];
    if (v == ignore) continue;
    r.lo = v < r.lo ? v : r.lo;
    r.hi = v > r.hi ? v : r.hi;
    ++r.count;
  }
  return r;
}

// ------------------------------------------------------------------------------------------
// Variants and dispatch
// ------------------------------------------------------------------------------------------
struct KernelTable {
  const char* isa;
  SoftmaxRowStats (*softmax_row)(const float*, int64_t, int64_t, float*);
  void (*softmax_tile)(const float*, int64_t, int64_t, int64_t, const int32_t*, float*, float*, float*, float*);
  void (*softmax_grad_tile)(float*, int64_t, int64_t, int64_t, const int32_t*, const float*, const float*,
                            const float*);
  void (*softmax_grad_tile_exp)(float*, const float*, int64_t, int64_t, int64_t, const int32_t*, const float*,
                                const float*, const float*);
  void (*scale_to)(float*, const float*, float, int64_t);
  void (*scaled_exp_to)(float*, const float*, float, float, int64_t);
  void (*multiply_to)(float*, const float*, const float*, int64_t);
  float (*sigmoid_focal_row)(const float*, const float*, int64_t, int64_t, float, float, float, float*, float*);
  float (*sigmoid_focal_row_ex)(const float*, const float*, int64_t, int64_t, const float*, const float*,
                                const float*, float, float, float, float*, float*);
  void (*log_softmax_target_rows)(const float*, const float*, const float*, const float*, int64_t, float*);
  IndexRange (*index_range)(const int64_t*, int64_t, int64_t);
};

#define FL_DEFINE_VARIANT(NAME, ATTR, W)                                                                             \
  ATTR SoftmaxRowStats softmax_row_##NAME(const float* x, int64_t n, int64_t t, float* e) {                          \
    return softmax_row_impl<W>(x, n, t, e);                                                                          \
  }                                                                                                                  \
  ATTR void softmax_tile_##NAME(const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t,        \
                                float* e, float* mx, float* sum, float* so) {                                        \
    softmax_tile_impl<W>(x, classes, stride, w, t, e, mx, sum, so);                                                  \
  }                                                                                                                  \
  ATTR void softmax_grad_tile_##NAME(float* g, int64_t classes, int64_t stride, int64_t w, const int32_t* t,         \
                                     const float* e, const float* coef, const float* tv) {                           \
    softmax_grad_tile_impl<W, false>(g, e, classes, stride, w, t, nullptr, coef, tv);                                \
  }                                                                                                                  \
  ATTR void softmax_grad_tile_exp_##NAME(float* g, const float* x, int64_t classes, int64_t stride, int64_t w,       \
                                         const int32_t* t, const float* mx, const float* coef, const float* tv) {    \
    softmax_grad_tile_impl<W, true>(g, x, classes, stride, w, t, mx, coef, tv);                                      \
  }                                                                                                                  \
  ATTR void scale_to_##NAME(float* out, const float* in, float k, int64_t n) { scale_to_impl<W>(out, in, k, n); }    \
  ATTR void scaled_exp_to_##NAME(float* out, const float* x, float shift, float k, int64_t n) {                      \
    scaled_exp_to_impl<W>(out, x, shift, k, n);                                                                      \
  }                                                                                                                  \
  ATTR void multiply_to_##NAME(float* out, const float* a, const float* b, int64_t n) {                              \
    multiply_to_impl<W>(out, a, b, n);                                                                               \
  }                                                                                                                  \
  ATTR float sigmoid_focal_row_##NAME(const float* x, const float* y, int64_t label, int64_t n, float alpha,         \
                                      float gamma, float grad_scale, float* loss, float* grad) {                     \
    return sigmoid_focal_row_dispatch<W, false>(x, y, label, n, alpha, gamma, grad_scale, loss, grad, RowExtras());  \
  }                                                                                                                  \
  ATTR float sigmoid_focal_row_ex_##NAME(const float* x, const float* y, int64_t label, int64_t n,                   \
                                         const float* a_pos, const float* a_neg, const float* weight,                \
                                         float row_weight, float gamma, float grad_scale, float* loss, float* grad) { \
    RowExtras ex;                                                                                                    \
    ex.a_pos = a_pos;                                                                                                \
    ex.a_neg = a_neg;                                                                                                \
    ex.weight = weight;                                                                                              \
    ex.row_weight = row_weight;                                                                                      \
    return sigmoid_focal_row_dispatch<W, true>(x, y, label, n, 0.0f, gamma, grad_scale, loss, grad, ex);              \
  }                                                                                                                  \
  ATTR void log_softmax_target_rows_##NAME(const float* x_t, const float* mx, const float* sum, const float* so,       \
                                           int64_t w, float* log_pt) {                                                \
    log_softmax_target_rows_impl<W>(x_t, mx, sum, so, w, log_pt);                                                    \
  }                                                                                                                  \
  ATTR IndexRange index_range_##NAME(const int64_t* t, int64_t n, int64_t ignore) {                                  \
    return index_range_impl<W>(t, n, ignore);                                                                        \
  }                                                                                                                  \
  const KernelTable kTable_##NAME = {#NAME,                   softmax_row_##NAME,   softmax_tile_##NAME,             \
                                     softmax_grad_tile_##NAME, softmax_grad_tile_exp_##NAME, scale_to_##NAME,       \
                                     scaled_exp_to_##NAME,     multiply_to_##NAME,   sigmoid_focal_row_##NAME,      \
                                     sigmoid_focal_row_ex_##NAME, log_softmax_target_rows_##NAME, index_range_##NAME};

FL_DEFINE_VARIANT(baseline, , 8)

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FL_X86_VARIANTS 1
FL_DEFINE_VARIANT(avx2, __attribute__((target("avx2,fma"))), 8)
FL_DEFINE_VARIANT(avx512, __attribute__((target("avx512f,avx2,fma"))), 16)
#endif

// The best variant for this CPU, once at load. FUSED_LOSSES_SIMD=baseline|avx2 picks a lower
// one (tests run every variant the machine can execute; an unsupported request is ignored).
const KernelTable* pick_table() {
  const char* want = getenv("FUSED_LOSSES_SIMD");
  const bool any = want == nullptr || want[0] == '\0';
  auto allowed = [&](const char* name) { return any || strcmp(want, name) == 0; };
#if defined(FL_X86_VARIANTS)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2 && __builtin_cpu_supports("avx512f") && allowed("avx512")) return &kTable_avx512;
  if (avx2 && (allowed("avx2") || (!any && strcmp(want, "avx512") == 0))) return &kTable_avx2;
#endif
  (void)allowed;
  return &kTable_baseline;
}

const KernelTable* const kKernels = pick_table();

}  // namespace

const char* simd_isa() { return kKernels->isa; }

SoftmaxRowStats softmax_row(const float* x, int64_t n, int64_t t, float* e) { return kKernels->softmax_row(x, n, t, e); }

void softmax_tile(const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t, float* e, float* max,
                  float* sum, float* sum_others) {
  kKernels->softmax_tile(x, classes, stride, w, t, e, max, sum, sum_others);
}

void softmax_grad_tile(float* g, int64_t classes, int64_t stride, int64_t w, const int32_t* t, const float* e,
                       const float* coef, const float* target_value) {
  kKernels->softmax_grad_tile(g, classes, stride, w, t, e, coef, target_value);
}

void softmax_grad_tile_exp(float* g, const float* x, int64_t classes, int64_t stride, int64_t w, const int32_t* t,
                           const float* max, const float* coef, const float* target_value) {
  kKernels->softmax_grad_tile_exp(g, x, classes, stride, w, t, max, coef, target_value);
}

void scale_to(float* out, const float* in, float k, int64_t n) { kKernels->scale_to(out, in, k, n); }

void scaled_exp_to(float* out, const float* x, float shift, float k, int64_t n) {
  kKernels->scaled_exp_to(out, x, shift, k, n);
}

void multiply_to(float* out, const float* a, const float* b, int64_t n) { kKernels->multiply_to(out, a, b, n); }

float sigmoid_focal_row(const float* x, const float* y, int64_t label, int64_t n, float alpha, float gamma,
                        float grad_scale, float* loss, float* grad) {
  return kKernels->sigmoid_focal_row(x, y, label, n, alpha, gamma, grad_scale, loss, grad);
}

float sigmoid_focal_row_ex(const float* x, const float* y, int64_t label, int64_t n, const float* a_pos,
                           const float* a_neg, const float* weight, float row_weight, float gamma, float grad_scale,
                           float* loss, float* grad) {
  return kKernels->sigmoid_focal_row_ex(x, y, label, n, a_pos, a_neg, weight, row_weight, gamma, grad_scale, loss,
                                        grad);
}

void log_softmax_target_rows(const float* x_t, const float* max, const float* sum, const float* sum_others, int64_t w,
                             float* log_pt) {
  kKernels->log_softmax_target_rows(x_t, max, sum, sum_others, w, log_pt);
}

IndexRange index_range(const int64_t* t, int64_t n, int64_t ignore) { return kKernels->index_range(t, n, ignore); }

}  // namespace cpu
}  // namespace fused_losses
