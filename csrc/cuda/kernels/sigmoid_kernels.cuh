// Sigmoid-family kernels of fused_losses (no ATen; csrc/cuda/kernels/device.cuh): the kernel
// arguments (SigmoidArgs), the per-row label rule shared with the GHM-C histogram, and the
// elementwise kernel (sigmoid focal, sigmoid GHM-C forward). Launchers: csrc/cuda/sigmoid.cu;
// conventions: csrc/cuda/common.cuh.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

enum class SigmoidLoss : int { Focal, Ghmc };

// grad_t: element type of the gradient output, as in SoftmaxArgs (the histogram kernels write
// no gradient and use the default).
template <typename scalar_t, typename target_t, typename grad_t = float>
struct SigmoidArgs {
  const scalar_t* logits = nullptr;  // (M, C) contiguous
  const target_t* target = nullptr;  // float target (M, C), or nullptr with labels
  const int64_t* labels = nullptr;   // (M,) labels, or nullptr with a float target
  int64_t M = 0, C = 0, numel = 0;
  int64_t ignore_index = 0;
  SigmoidLoss loss = SigmoidLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  float alpha = 0.25f, gamma = 2.0f;   // Focal
  const float* bin_weights = nullptr;  // Ghmc
  int64_t bins = 1;
  // Drop-in extras (the kExtras kernel instances; the histogram reads `weight` too):
  const float* alpha_per_class = nullptr;  // Focal: (C,), replaces alpha
  const float* weight = nullptr;           // (M,) per row or (M * C,) per element
  bool weight_per_element = false;
  float epsilon = 0.0f;  // Focal, Poly-1 (#24): the kExtras instances only (launch_sigmoid); 0: none
  grad_t* grad = nullptr;              // (M, C) saved gradient (saved_grad_dtype) or nullptr
  scalar_t* loss_elems = nullptr;      // 'none': (M, C) or nullptr
  double* partials = nullptr;          // 'mean'/'sum': one per block
};

// Label of row r: the label itself, or -1 when the row is ignored (or out of [0, C]: device
// assert, then ignored). ignore_index is checked before the range, like the API says.
template <typename A>
__device__ __forceinline__ int64_t row_label(const A& a, int64_t r, bool& valid) {
  const int64_t label = a.labels[r];
  valid = label != a.ignore_index;
  if (valid && (label < 0 || label > a.C)) {
    FL_DEVICE_ASSERT(false, "fused_losses: label out of range [0, C]");
    valid = false;
  }
  return label;
}

// Row index of element i (i < numel): 32-bit division when the tensor allows (cheaper).
__device__ __forceinline__ int64_t row_of(int64_t i, int64_t C, bool small) {
  return small ? static_cast<int64_t>(static_cast<uint32_t>(i) / static_cast<uint32_t>(C)) : i / C;
}

// The weight of element i of row r (1 without weights).
template <typename A>
__device__ __forceinline__ float element_weight(const A& a, int64_t i, int64_t r) {
  return a.weight == nullptr ? 1.0f : a.weight[a.weight_per_element ? i : r];
}

// Element loss and gradient (gradient already scaled):
//   Focal: math::sigmoid_focal_element (alpha_t * BCE * (1 - p_t)^gamma and its derivative)
//   Ghmc:  loss = w[bin(|p - y|)] * BCE, grad = scale * w * (p - y)
// alpha: the scalar alpha, or the element's class alpha (kExtras with alpha_per_class).
template <typename A>
__device__ __forceinline__ lm::LossGrad<float> sigmoid_element(const A& a, float x, float y, float scale, float alpha) {
  const float e = lm::exp_(-lm::abs_(x));
  lm::LossGrad<float> out;
  if (a.loss == SigmoidLoss::Focal) {
    out = lm::sigmoid_focal_element(x, y, alpha, a.gamma, e);
    if (a.epsilon != 0.0f) {  // Poly-1 (#24): + epsilon (1 - p_t)^(gamma + 1), not scaled by alpha
      const lm::LossGrad<float> pl = lm::sigmoid_poly1_element(x, y, a.gamma, a.epsilon, e);
      out.loss += pl.loss;
      out.grad += pl.grad;
    }
    out.grad *= scale;
  } else {
    const int64_t b = lm::ghm_bin(lm::ghm_sigmoid_g(x, y), a.bins);
    const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
    const lm::SigmoidParts<float> s = lm::sigmoid_parts(x, y, e);
    out.loss = w * s.bce;
    out.grad = scale * w * (s.p - y);
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// sigmoid_kernel: elementwise over (M, C). A thread takes packs of VEC = 16 / sizeof(scalar_t)
// consecutive elements (one 16-byte load of logits, one of a same-dtype target; a float32
// target of fp16/bf16 logits is two), the last numel % VEC elements one by one. Integer labels:
// y_c = [label == c] from the row's label (8 bytes per row, no one-hot); ignored rows give 0.
// Memory traffic per element: sizeof(scalar_t) read (+ sizeof(target_t) for a float target),
// sizeof(grad_t) written for the gradient (computed in float32, rounded once; a pack is 16
// bytes in the logits dtype, 4 * VEC of float32), + sizeof(scalar_t) for 'none' losses.
// kExtras (drop-in extras; the plain instances are unchanged): per-class alpha a_c replaces
// alpha, and the weight w of the element (per row or per element; + 4 bytes read) multiplies
// loss and gradient; w == 0 selects exactly 0 for both (a NaN logit there does not leak).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename target_t, typename grad_t, bool kLabels, bool kExtras>
__global__ void __launch_bounds__(kThreads) sigmoid_kernel(const SigmoidArgs<scalar_t, target_t, grad_t> a) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const float scale = grad_scale(a.reduction, a.count);
  const bool small = a.numel <= static_cast<int64_t>(UINT32_MAX);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double acc = 0.0;
  const int64_t packs = a.numel / VEC;
  for (int64_t p = first; p < packs; p += stride) {
    const int64_t i0 = p * VEC;
    const Pack<scalar_t, VEC> xs = load_pack<VEC>(a.logits + i0);
    float y[VEC];
    bool valid[VEC];
    [[maybe_unused]] float alpha[VEC];
    [[maybe_unused]] float w[VEC];
    if constexpr (kExtras && !kLabels) {  // the targets below; here the per-element extras
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
        w[e] = element_weight(a, i0 + e, r);
        if (++c == a.C) {
          c = 0;
          ++r;
        }
      }
    }
    if constexpr (kLabels) {
      int64_t r = row_of(i0, a.C, small);
      int64_t c = i0 - r * a.C;
      bool row_valid;
      int64_t label = row_label(a, r, row_valid);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = row_valid;
        y[e] = label == c ? 1.0f : 0.0f;
        if constexpr (kExtras) {
          alpha[e] = lm::class_alpha(a.alpha_per_class, a.alpha, c);
          w[e] = element_weight(a, i0 + e, r);
        }
        if (++c == a.C && e + 1 < VEC) {  // the next element starts row r + 1 (< M: it exists)
          c = 0;
          label = row_label(a, ++r, row_valid);
        }
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        valid[e] = true;
        y[e] = to_float(ts.v[e]);
      }
    }
    Pack<grad_t, VEC> grads;
    Pack<scalar_t, VEC> losses;
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      lm::LossGrad<float> lg{0.0f, 0.0f};
      if constexpr (kExtras) {
        if (valid[e] && w[e] != 0.0f) {
          lg = sigmoid_element(a, to_float(xs.v[e]), y[e], scale, alpha[e]);
          lg.loss *= w[e];
          lg.grad *= w[e];
        }
      } else {
        if (valid[e]) lg = sigmoid_element(a, to_float(xs.v[e]), y[e], scale, a.alpha);
      }
      pack_loss += lg.loss;
      grads.v[e] = from_float<grad_t>(lg.grad);
      losses.v[e] = from_float<scalar_t>(lg.loss);
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_elems != nullptr) store_pack<VEC>(a.loss_elems + i0, losses);
    acc += pack_loss;
  }
  for (int64_t i = packs * VEC + first; i < a.numel; i += stride) {
    float y;
    bool valid = true;
    const int64_t r = kLabels || kExtras ? row_of(i, a.C, small) : 0;
    if constexpr (kLabels) {
      const int64_t label = row_label(a, r, valid);
      y = label == i - r * a.C ? 1.0f : 0.0f;
    } else {
      y = to_float(a.target[i]);
    }
    lm::LossGrad<float> lg{0.0f, 0.0f};
    if constexpr (kExtras) {
      const float w = element_weight(a, i, r);
      if (valid && w != 0.0f) {
        lg = sigmoid_element(a, to_float(a.logits[i]), y, scale,
                             lm::class_alpha(a.alpha_per_class, a.alpha, i - r * a.C));
        lg.loss *= w;
        lg.grad *= w;
      }
    } else {
      if (valid) lg = sigmoid_element(a, to_float(a.logits[i]), y, scale, a.alpha);
    }
    if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(lg.grad);
    if (a.loss_elems != nullptr) a.loss_elems[i] = from_float<scalar_t>(lg.loss);
    acc += lg.loss;
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// Fast path of sigmoid focal (no extras): sigmoid_focal_kernel<.., kLabels, kGamma>.
// kGamma: 0 (gamma == 0), 2 (gamma == 2), -1 (any gamma > 0, runtime value); the launcher picks.
// Per element (x the logit, e = 2^(-|x| log2 e) = e^{-|x|}, hardware MUFU.EX2):
//   r = 1 / (1 + e) (MUFU.RCP), sigmoid(-|x|) = e r, p = x >= 0 ? r : e r, q = x >= 0 ? e r : r
//   log1p(e) = 2 w P(w^2), w = e / (2 + e) (MUFU.RCP; P = math::log1p_unit_series, 0.08 ulp)
//   bce = ((1 - y) x - min(x, 0)) + log1p(e); 1 - p_t, p_t, alpha_t: selects for labels
//   loss = alpha_t (1 - p_t)^gamma bce;  labels (closed form, csrc/DESIGN.md):
//   grad = -+ scale alpha_t (1 - p_t)^gamma ((1 - p_t) + gamma p_t bce)   (- for y = 1)
//   float targets: scale alpha_t ((p - y) m + bce dm/d(1-p_t) p q (1 - 2y)), m = (1 - p_t)^gamma
//   general gamma: m = 2^(gamma log2(1 - p_t)) (MUFU.LG2, MUFU.EX2; 0 at 1 - p_t = 0).
// Accuracy (fp32, against float64): ex2.approx and rcp.approx are within 2 ulp (+ the rounding of
// -|x| log2 e: |x| 2^-24 relative in e, 1.2e-6 at |x| = 20); the element loss and gradient stay
// within ~1e-6 relative for |x| <= 20 and within 1e-5 while (gamma + 1)|x| < 160. Results that
// underflow float32 (e < 2^-126: |x| > 87.3) are flushed to 0 (.ftz), within the rule's
// absolute 2^-126. NaN logits give NaN loss and gradient; +-inf give the reference's inf and, where
// the reference is NaN (0 * inf), NaN, like the general path.
// ------------------------------------------------------------------------------------------

// Hardware approximations (MUFU) and their emulator spellings (the emulator computes the exact
// functions, flushing results below float32's smallest normal like .ftz).
#ifdef FUSED_LOSSES_CUDA_EMU
__device__ __forceinline__ float fast_ex2(float x) {
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.0f : y;
}
__device__ __forceinline__ float fast_lg2(float x) { return x < 1.17549435e-38f && x >= 0.0f ? -INFINITY : log2f(x); }
__device__ __forceinline__ float fast_rcp(float x) { return 1.0f / x; }
#else
__device__ __forceinline__ float fast_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_lg2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_rcp(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
#endif

// Row constants of the fast path: alpha_t of a positive / negative element and the gradient
// factor -scale alpha_t / +scale alpha_t (labels: one select per element).
struct SigmoidFocalConsts {
  float a_pos, a_neg, g_pos, g_neg, gamma;
};

__device__ __forceinline__ SigmoidFocalConsts sigmoid_focal_consts(float alpha, float gamma, float scale) {
  SigmoidFocalConsts k;
  k.a_pos = alpha >= 0.0f ? alpha : 1.0f;
  k.a_neg = alpha >= 0.0f ? 1.0f - alpha : 1.0f;
  k.g_pos = -(scale * k.a_pos);
  k.g_neg = scale * k.a_neg;
  k.gamma = gamma;
  return k;
}

// The shared first steps: e = e^{-|x|}, p, q and log1p(e).
struct SigmoidFast {
  float p, q, log1p_e;
};

__device__ __forceinline__ SigmoidFast sigmoid_fast(float x) {
  constexpr float kMinusLog2e = -1.44269504088896341f;
  const float e = fast_ex2(lm::abs_(x) * kMinusLog2e);
  // One reciprocal for 1 / (1 + e) and 1 / (2 + e): R = 1 / ((1 + e)(2 + e)) (the product is in
  // [2, 6]: no overflow or subnormal), r = (2 + e) R, 1 / (2 + e) = (1 + e) R (about 2 ulp each
  // instead of 1; one MUFU op less per element).
  const float one_e = 1.0f + e, two_e = 2.0f + e;
  const float rr = fast_rcp(one_e * two_e);
  const float r = two_e * rr;
  const float small = e * r;  // sigmoid(-|x|)
  const bool pos = x >= 0.0f;
  SigmoidFast s;
  s.p = pos ? r : small;
  s.q = pos ? small : r;
  const float w = e * (one_e * rr);  // e / (2 + e); log1p(e) = 2 atanh(w)
  s.log1p_e = (w + w) * lm::log1p_unit_series(w * w);
  return s;
}

// (1 - p_t)^gamma for kGamma 0, 2 or any (runtime gamma > 0; 0 at 1 - p_t = 0).
template <int kGamma>
__device__ __forceinline__ float focal_modulation(float omp, float gamma) {
  if constexpr (kGamma == 0) {
    return 1.0f;
  } else if constexpr (kGamma == 2) {
    return omp * omp;
  } else {
    return fast_ex2(gamma * fast_lg2(omp));
  }
}

// Integer labels: element with y = ypos; returns the loss, sets grad (both before validity).
// In z = x (y = 0) or -x (y = 1): 1 - p_t = sigmoid(z), p_t = sigmoid(-z), bce = softplus(z) =
// max(z, 0) + log1p(e^{-|z|}) (|z| = |x|: the same e), so sigmoid_fast(z) gives 1 - p_t and p_t
// without selecting on y again (the same values, bit for bit, as from x).
template <int kGamma>
__device__ __forceinline__ float sigmoid_focal_label_fast(float x, bool ypos, const SigmoidFocalConsts& k,
                                                          float& grad) {
  const float z = ypos ? -x : x;
  const SigmoidFast s = sigmoid_fast(z);
  const float omp = s.p;  // 1 - p_t
  const float pt = s.q;
  const float bce = fmaxf(z, 0.0f) + s.log1p_e;
  const float mod = focal_modulation<kGamma>(omp, k.gamma);
  const float gamma = kGamma >= 0 ? static_cast<float>(kGamma) : k.gamma;
  const float gv = kGamma == 0 ? omp : mod * (omp + gamma * (pt * bce));
  grad = (ypos ? k.g_pos : k.g_neg) * gv;
  return (ypos ? k.a_pos : k.a_neg) * (bce * mod);
}

// Float targets y in [0, 1] (soft targets too): the general form.
template <int kGamma>
__device__ __forceinline__ float sigmoid_focal_target_fast(float x, float y, const SigmoidFocalConsts& k, float scale,
                                                           float& grad) {
  const SigmoidFast s = sigmoid_fast(x);
  const float omy = 1.0f - y;
  const float bce = (omy * x - (x < 0.0f ? x : 0.0f)) + s.log1p_e;
  const float omp = s.p * omy + s.q * y;  // 1 - p_t
  const float alpha_t = k.a_pos * y + k.a_neg * omy;
  const float mod = focal_modulation<kGamma>(omp, k.gamma);
  float gv = (s.p * omy - s.q * y) * mod;  // (p - y) (1 - p_t)^gamma
  if constexpr (kGamma != 0) {
    // d(1 - p_t)^gamma / d(1 - p_t) = gamma (1 - p_t)^(gamma - 1), times d(1 - p_t)/dx = p q (1 - 2y)
    const float dmod = kGamma == 2 ? 2.0f * omp : k.gamma * mod * fast_rcp(omp > 0.0f ? omp : 1.0f);
    const float chain = dmod * (s.p * s.q) * (1.0f - 2.0f * y);
    gv += bce * (omp > 0.0f ? chain : 0.0f);
  }
  grad = scale * (alpha_t * gv);
  return alpha_t * (bce * mod);
}

// ------------------------------------------------------------------------------------------
// sigmoid_focal_kernel: the plain sigmoid focal loss (no per-class alpha, no weight) over (M, C),
// a thread per 16-byte pack of VEC logits (grid-stride), the last numel % VEC elements one by one.
// The launcher (csrc/cuda/sigmoid.cu launch_sigmoid) runs it for numel < 2^31 only: index math
// in I = uint32_t; the 64-bit path beyond 2^31 elements (and C < VEC with labels, GHM-C, the
// extras) is sigmoid_kernel.
// Labels: the row r and column c of a thread's pack are advanced by the grid stride (no division
// in the loop); with C >= VEC a pack ends at most one row later, so two label loads give bit
// masks of the pack's positive elements and of its elements in valid rows. Ignored rows: exactly
// 0 (selected, so a NaN logit there does not leak).
// ------------------------------------------------------------------------------------------
template <typename I, typename scalar_t, typename target_t, typename grad_t, bool kLabels, int kGamma>
__device__ __forceinline__ void sigmoid_focal_loop(const SigmoidArgs<scalar_t, target_t, grad_t>& a, double& acc) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const float scale = grad_scale(a.reduction, a.count);
  const SigmoidFocalConsts k = sigmoid_focal_consts(a.alpha, a.gamma, scale);
  const I numel = static_cast<I>(a.numel), C = static_cast<I>(a.C);
  const I packs = numel / VEC;
  const I stride = static_cast<I>(gridDim.x) * kThreads;
  const I first = static_cast<I>(blockIdx.x) * kThreads + threadIdx.x;
  // Row and column of element first * VEC, and what one grid stride adds to them.
  I r = 0, c = 0, dr = 0, dc = 0;
  if constexpr (kLabels) {
    if (first < packs) {
      r = first * VEC / C;
      c = first * VEC - r * C;
      dr = stride * VEC / C;
      dc = stride * VEC - dr * C;
    }
  }
  for (I p = first; p < packs; p += stride) {
    const I i0 = p * VEC;
    const Pack<scalar_t, VEC> xs = load_pack<VEC>(a.logits + i0);
    bool ypos[VEC];
    bool valid[VEC];
    float y[VEC];
    if constexpr (kLabels) {
      bool v0;
      const int64_t lab0 = row_label(a, static_cast<int64_t>(r), v0);
      const I left = C - c;  // elements of row r in this pack (>= 1)
      // The pack index of a positive: lab - c in row r, left + lab in row r + 1 (an index
      // outside [0, VEC) matches no element; background label == C has none).
      // Bit e of pos / ok: element e of the pack is the row's positive / in a valid row.
      const I d0 = static_cast<I>(lab0) - c;
      uint32_t pos = v0 && lab0 < a.C && d0 < static_cast<I>(VEC) ? 1u << d0 : 0u;
      uint32_t ok = v0 ? (1u << VEC) - 1u : 0u;
      if (left < static_cast<I>(VEC)) {  // the pack ends in row r + 1 (C >= VEC: not later)
        bool v1;
        const int64_t lab1 = row_label(a, static_cast<int64_t>(r) + 1, v1);
        const uint32_t first_row = (1u << left) - 1u;
        ok = (ok & first_row) | (v1 ? ((1u << VEC) - 1u) & ~first_row : 0u);
        if (v1 && lab1 < a.C && left + static_cast<I>(lab1) < static_cast<I>(VEC)) pos |= 1u << (left + lab1);
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        ypos[e] = (pos >> e) & 1u;
        valid[e] = (ok >> e) & 1u;
      }
      c += dc;
      r += dr;
      if (c >= C) {
        c -= C;
        ++r;
      }
    } else {
      const Pack<target_t, VEC> ts = load_pack<VEC>(a.target + i0);
#pragma unroll
      for (int e = 0; e < VEC; ++e) y[e] = to_float(ts.v[e]);
    }
    Pack<grad_t, VEC> grads;
    float ls[VEC];
    float pack_loss = 0.0f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const float x = to_float(xs.v[e]);
      float g, l;
      if constexpr (kLabels) {
        l = sigmoid_focal_label_fast<kGamma>(x, ypos[e], k, g);
        l = valid[e] ? l : 0.0f;
        g = valid[e] ? g : 0.0f;
      } else {
        l = sigmoid_focal_target_fast<kGamma>(x, y[e], k, scale, g);
      }
      pack_loss += l;
      grads.v[e] = from_float<grad_t>(g);
      ls[e] = l;
    }
    if (a.grad != nullptr) store_pack<VEC>(a.grad + i0, grads);
    if (a.loss_elems != nullptr) {  // 'none' only: the rounding to scalar_t is not paid otherwise
      Pack<scalar_t, VEC> losses;
#pragma unroll
      for (int e = 0; e < VEC; ++e) losses.v[e] = from_float<scalar_t>(ls[e]);
      store_pack<VEC>(a.loss_elems + i0, losses);
    }
    acc += pack_loss;
  }
  // The tail: numel % VEC elements, one per thread.
  for (I i = packs * VEC + first; i < numel; i += stride) {
    const float x = to_float(a.logits[i]);
    float g, l;
    if constexpr (kLabels) {
      const I rr = i / C;
      bool v;
      const int64_t lab = row_label(a, static_cast<int64_t>(rr), v);
      l = sigmoid_focal_label_fast<kGamma>(x, static_cast<int64_t>(i - rr * C) == lab, k, g);
      l = v ? l : 0.0f;
      g = v ? g : 0.0f;
    } else {
      l = sigmoid_focal_target_fast<kGamma>(x, to_float(a.target[i]), k, scale, g);
    }
    if (a.grad != nullptr) a.grad[i] = from_float<grad_t>(g);
    if (a.loss_elems != nullptr) a.loss_elems[i] = from_float<scalar_t>(l);
    acc += l;
  }
}

template <typename scalar_t, typename target_t, typename grad_t, bool kLabels, int kGamma>
__global__ void __launch_bounds__(kThreads) sigmoid_focal_kernel(const SigmoidArgs<scalar_t, target_t, grad_t> a) {
  double acc = 0.0;
  sigmoid_focal_loop<uint32_t, scalar_t, target_t, grad_t, kLabels, kGamma>(a, acc);
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

}  // namespace cuda
}  // namespace fused_losses
