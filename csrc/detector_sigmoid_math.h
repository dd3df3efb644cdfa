// Per-element formulas of the sigmoid-type detector losses (issue #24): quality focal (QFL),
// varifocal (VFL) and asymmetric (ASL), shared by the CPU kernel (csrc/cpu/detector_sigmoid.cpp)
// and the CUDA kernel (csrc/cuda/kernels/detector_sigmoid_kernels.cuh). Same rules as
// losses_math.h (FL_HOST_DEVICE, C math only, templated on the math type T).
//
// The reference semantics are fused_losses/reference.py (quality_focal, varifocal, asymmetric)
// and docs/losses/detector.md. Every element gets (loss, dloss/dx); the caller applies the
// weight (a zero weight selects 0), the ignored rows and the reduction's scale.
//
// Notation: x the logit, e = exp(-|x|), p = sigmoid(x), q = sigmoid(-x) = 1 - p (both exact,
// losses_math.h sigmoid_parts), y the soft target of the element, BCE(x, y) the exact
// (1 - y) softplus(x) + y softplus(-x) (sigmoid_parts' bce), dBCE/dx = p - y.
#pragma once

#include "losses_math.h"

namespace fused_losses {
namespace math {

// The loss an op call computes (the op's `loss` string, parsed on the host).
enum DetectorKind : int { kQualityFocal = 0, kVarifocal = 1, kAsymmetric = 2 };
// Bits of the op's `flags`.
enum DetectorFlag : int {
  kDetActivated = 1,         // QFL: probabilities in (mmdet's activated=True)
  kDetIouWeighted = 2,       // VFL: positives weighted by their target y
  kDetDetachModulation = 4,  // VFL: no gradient through alpha * s^gamma (RT-DETR)
  kDetDetachFocusing = 8,    // ASL: no gradient through the focusing weight (timm's flag)
};

// The op's scalar parameters, in the math type. QFL: p0 = beta. VFL: p0 = alpha, p1 = gamma.
// ASL: p0 = gamma_pos, p1 = gamma_neg, p2 = clip, p3 = eps (log_eps = log(eps) when eps > 0).
template <typename T>
struct DetectorParams {
  int flags;
  T p0, p1, p2, p3, log_eps;
};

// q^g for q >= 0 with the exponents these losses meet computed by multiplication (2 and 4 are
// the defaults of QFL/VFL and ASL's gamma_neg), pow otherwise. q = 0: 0 for g > 0, 1 for g = 0
// (torch.pow(0, 0) = 1).
template <typename T>
FL_INLINE T det_pow(T q, T g) {
  if (g == T(0)) return T(1);
  if (g == T(1)) return q;
  if (g == T(2)) return q * q;
  if (g == T(3)) return q * q * q;
  if (g == T(4)) {
    const T q2 = q * q;
    return q2 * q2;
  }
  return pow_(q, g);
}

// d(q^g)/dq with reference._PowSafe's convention: 0 at q = 0 (and for g = 0).
template <typename T>
FL_INLINE T det_dpow(T q, T g) {
  return (q > T(0) && g != T(0)) ? g * det_pow(q, g - T(1)) : T(0);
}

// QFL, one element: |y - s|^beta * BCE(s, y) (reference.quality_focal).
// From logits: y - s = y q - (1 - y) p (exact near s = 0 and s = 1), d(y - s)/dx = -p q.
// activated (s = x, a probability): torch's binary_cross_entropy (each log clamped at -100) and
// its backward's dBCE/ds = (s - y) / max((1 - s) s, 1e-12), as the reference's autograd gives.
template <typename T>
FL_INLINE LossGrad<T> quality_focal_element(const DetectorParams<T>& P, T x, T y, T exp_neg_abs_x) {
  const T beta = P.p0;
  LossGrad<T> out;
  if (P.flags & kDetActivated) {
    const T s = x;
    const T log_s = log_(s), log_1ms = log1p_(-s);
    const T bce = -(y * (log_s > T(-100) ? log_s : T(-100)) + (T(1) - y) * (log_1ms > T(-100) ? log_1ms : T(-100)));
    const T denom = (T(1) - s) * s;
    const T dbce = (s - y) / (denom > T(1e-12) ? denom : T(1e-12));
    const T d = y - s;
    const T dist = abs_(d);
    const T mod = det_pow(dist, beta);
    const T dmod = det_dpow(dist, beta);
    out.loss = bce * mod;
    // d|y - s|/ds = -sign(y - s)
    out.grad = dbce * mod + (d > T(0) ? -bce * dmod : bce * dmod);
    return out;
  }
  const SigmoidParts<T> s = sigmoid_parts(x, y, exp_neg_abs_x);
  const T d = y * s.q - (T(1) - y) * s.p;
  const T dist = abs_(d);
  const T mod = det_pow(dist, beta);
  const T dmod = det_dpow(dist, beta);
  const T pq = s.p * s.q;
  out.loss = s.bce * mod;
  // d|d|/dx = sign(d) * (-p q)
  out.grad = s.p_minus_y * mod + (d > T(0) ? -s.bce * dmod * pq : s.bce * dmod * pq);
  return out;
}

// VFL, one element (reference.varifocal): positive: BCE * (iou_weighted ? y : 1); negative:
// BCE * alpha * p^gamma, d(p^gamma)/dx = gamma p^gamma q (dropped with detach_modulation).
// `positive`: y > 0 (dense target) or the label's class (label form).
template <typename T>
FL_INLINE LossGrad<T> varifocal_element(const DetectorParams<T>& P, T x, T y, bool positive, T exp_neg_abs_x) {
  const SigmoidParts<T> s = sigmoid_parts(x, y, exp_neg_abs_x);
  LossGrad<T> out;
  if (positive) {
    const T f = (P.flags & kDetIouWeighted) ? y : T(1);
    out.loss = s.bce * f;
    out.grad = s.p_minus_y * f;
    return out;
  }
  const T alpha = P.p0, gamma = P.p1;
  const T m = det_pow(s.p, gamma);
  const T chain = (gamma != T(0) && !(P.flags & kDetDetachModulation)) ? s.bce * gamma * m * s.q : T(0);
  out.loss = s.bce * (alpha * m);
  out.grad = alpha * (s.p_minus_y * m + chain);
  return out;
}

// ASL, one element (reference.asymmetric), m = clip:
//   L+ = max(logsigmoid(x), log eps), L- = log(max(min(q + m, 1), eps)) (m > 0) or
//   max(logsigmoid(-x), log eps) (m = 0); 1 - p_t = y q + (1 - y) max(p - m, 0);
//   w = (1 - p_t)^(gamma_pos y + gamma_neg (1 - y)); loss = -(y L+ + (1 - y) L-) w.
// The clamps pass the gradient where torch.clamp's backward does (min: x >= lo, max: x <= hi).
template <typename T>
FL_INLINE LossGrad<T> asymmetric_element(const DetectorParams<T>& P, T x, T y, T exp_neg_abs_x) {
  const T gamma_pos = P.p0, gamma_neg = P.p1, clip = P.p2, eps = P.p3;
  const SigmoidParts<T> s = sigmoid_parts(x, y, exp_neg_abs_x);
  const T pq = s.p * s.q;
  const T l1p = log1p_unit_vectorizable(exp_neg_abs_x);
  const T log_sig_pos = (x < T(0) ? x : T(0)) - l1p;   // logsigmoid(x)
  const T log_sig_neg = (x > T(0) ? -x : T(0)) - l1p;  // logsigmoid(-x)
  const bool has_eps = eps > T(0);
  T log_pos = log_sig_pos, dlog_pos = s.q;
  if (has_eps && !(log_sig_pos >= P.log_eps)) {
    log_pos = P.log_eps;
    dlog_pos = T(0);
  }
  T log_neg, dlog_neg, shifted, dshifted;
  if (clip > T(0)) {
    const T raw = s.q + clip;
    const T pn = raw <= T(1) ? raw : T(1);
    const T dpn = raw <= T(1) ? -pq : T(0);
    if (has_eps && !(pn >= eps)) {
      log_neg = log_(eps);
      dlog_neg = T(0);
    } else {
      log_neg = log_(pn);
      dlog_neg = dpn / pn;
    }
    const T sh = s.p - clip;
    shifted = sh >= T(0) ? sh : T(0);
    dshifted = sh >= T(0) ? pq : T(0);
  } else {
    log_neg = log_sig_neg;
    dlog_neg = -s.p;
    if (has_eps && !(log_sig_neg >= P.log_eps)) {
      log_neg = P.log_eps;
      dlog_neg = T(0);
    }
    shifted = s.p;
    dshifted = pq;
  }
  const T base = -(y * log_pos + (T(1) - y) * log_neg);
  const T dbase = -(y * dlog_pos + (T(1) - y) * dlog_neg);
  const T omp = y * s.q + (T(1) - y) * shifted;
  const T g = gamma_pos * y + gamma_neg * (T(1) - y);
  const T w = det_pow(omp, g);
  LossGrad<T> out;
  out.loss = base * w;
  out.grad = dbase * w;
  if (!(P.flags & kDetDetachFocusing)) {
    const T domp = -y * pq + (T(1) - y) * dshifted;
    out.grad += base * det_dpow(omp, g) * domp;
  }
  return out;
}

template <int Kind, typename T>
FL_INLINE LossGrad<T> detector_element(const DetectorParams<T>& P, T x, T y, bool positive, T exp_neg_abs_x) {
  if (Kind == kQualityFocal) return quality_focal_element(P, x, y, exp_neg_abs_x);
  if (Kind == kVarifocal) return varifocal_element(P, x, y, positive, exp_neg_abs_x);
  return asymmetric_element(P, x, y, exp_neg_abs_x);
}

}  // namespace math
}  // namespace fused_losses
