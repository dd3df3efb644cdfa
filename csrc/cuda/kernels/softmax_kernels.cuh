// Softmax-family kernels of fused_losses (no ATen; csrc/cuda/kernels/device.cuh): the
// arguments of a softmax pass, the row kernels for (N, C) logits, the channel-second kernel, the
// probabilities kernel, and the choice of the instance for a pass (softmax_launch_for). The
// launcher softmax_pass: csrc/cuda/softmax_kernels.cu; the per-loss host code:
// softmax_losses.cu, ghmc.cu. Conventions: csrc/cuda/common.cuh.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

// What a softmax-row kernel computes per active row from l = log p_t, p_t and 1 - p_t (each
// from the row's sums: log p_t = math::log_softmax_target_sums, 1 - p_t = sum_others / s):
//   Focal:    loss = alpha_t (1 - p_t)^gamma (-l),  k = scale * alpha_t * dFocal/dl
//             (math::focal_term_parts)
//   IB:       loss, k = scale * dloss/dl, d/dfeature from math::ib_row
//   OhemKept: loss = -l, k = -scale                      (rows of the `kept` mask only)
//   Ghmc:     loss = w[bin(1 - p_t)] (-l), k = -scale * w
//   Stats:    no loss; log p_t (and 1 - p_t) per row are the outputs
// and the gradient of every one is grad_c = k * ([c == t] - p_c) (losses_math.h), its target
// column k * (1 - p_t).
// Drop-in extras (csrc/op_schemas.h) run the kExtras instances of the warp-per-row and the
// channel-second sweep kernels (the plain instances compile them out): a per-row `weight` w
// multiplies loss and k (w == 0 makes the row inactive: exactly 0 loss and gradient, its
// logits never read); `label_smoothing` eps > 0 (Focal, OhemKept, Ghmc) adds a sweep, and its
// gradient is not of the k form (softmax_kernels.cu, "Label smoothing").
enum class SoftmaxLoss : int { Focal, IB, OhemKept, Ghmc, Stats };

// grad_t: element type of the gradient output (float, or fl_bf16 for bf16 logits with a
// reduced loss; see dispatch_grad_t).
template <typename scalar_t, typename grad_t = float>
struct SoftmaxArgs {
  const scalar_t* logits = nullptr;  // (N, C, S) contiguous
  const int64_t* target = nullptr;   // (N * S,)
  int64_t N = 0, C = 0, S = 1;
  int64_t ignore_index = 0;
  SoftmaxLoss loss = SoftmaxLoss::Focal;
  Reduction reduction = Reduction::None;
  MeanCount count;
  // Focal (gamma also serves IB-focal)
  const float* alpha_per_class = nullptr;
  float alpha = 1.0f, gamma = 0.0f;
  // IB
  const float* feature_norm = nullptr;
  const float* class_weight = nullptr;
  float ib_alpha = 0.0f, ib_epsilon = 0.0f;
  bool detach_factor = false;
  // OHEM
  const bool* kept = nullptr;
  // GHM-C
  const float* bin_weights = nullptr;
  int64_t bins = 1;
  // Drop-in extras: weight (N * S,) per row or nullptr; label smoothing eps (0: none).
  const float* weight = nullptr;
  float label_smoothing = 0.0f;
  // Poly-1 (#24, Focal only): epsilon (1 - p_t)^(gamma + 1) added per row (0: none); != 0 runs the
  // extras instances (softmax_launch_for), so the plain instances compile it out
  float epsilon = 0.0f;
  // Outputs, nullptr when not wanted.
  grad_t* grad = nullptr;          // (N, C, S), the saved gradient (saved_grad_dtype)
  scalar_t* loss_rows = nullptr;   // 'none': (N * S,)
  float* log_pt_rows = nullptr;    // Stats: (N * S,), 0 for inactive rows
  float* one_minus_pt_rows = nullptr;  // Stats: (N * S,) 1 - p_t = sum_others / s, 0 for inactive rows
  float* grad_feature = nullptr;   // IB: (N,)
  double* partials = nullptr;      // 'mean'/'sum': one per block
};

struct RowTarget {
  int64_t t;
  bool in_range;  // row < rows
  bool active;    // not ignored (and kept, for OHEM), a valid class, and a nonzero weight
};

// kWeighted: the kernel instance takes a per-row weight (a.weight, nullptr: none); the plain
// instances compile the weight out (their registers stay those of the no-extras kernels).
// As row_target, from the row's target value t_raw already loaded (a.target[row] when row <
// rows; the software pipeline of softmax_rows_kernel loads it an iteration ahead).
template <bool kWeighted, typename A>
__device__ __forceinline__ RowTarget row_target_of(const A& a, int64_t row, int64_t rows, int64_t t_raw) {
  RowTarget r{0, row < rows, false};
  if (!r.in_range) return r;
  r.t = t_raw;
  r.active = r.t != a.ignore_index && (a.kept == nullptr || a.kept[row]);
  if (r.active && (r.t < 0 || r.t >= a.C)) {
    FL_DEVICE_ASSERT(false, "fused_losses: target class index out of range [0, C)");
    r.active = false;
  }
  // A zero weight: exactly 0 loss and gradient (selected, not multiplied: a NaN logit of the
  // row never reaches the sums); the row is not read.
  if constexpr (kWeighted) {
    if (r.active && a.weight != nullptr && a.weight[row] == 0.0f) r.active = false;
  }
  return r;
}

template <bool kWeighted, typename A>
__device__ __forceinline__ RowTarget row_target(const A& a, int64_t row, int64_t rows) {
  return row_target_of<kWeighted>(a, row, rows, row < rows ? a.target[row] : int64_t(0));
}

// What a softmax row gives the per-loss math (as the CPU's SoftmaxRow): l = log p_t, exact at
// every margin (lm::log_softmax_target_sums: -log1p(sum_others) when the target is the row max,
// where the rounded row sum 1 + sum_others would lose the loss of a confident sample), p_t = e_t
// / s and 1 - p_t = sum_others / s (exact relative, no cancellation; never 1 - p_t from p_t).
// Inactive rows keep the zeros (the Stats outputs of an ignored row).
struct RowValues {
  float log_pt;
  float p_t;
  float one_minus_pt;
};

// From the row's max m, s = sum_c e^{x_c - m}, sum_others = the same sum without the target
// column and e_t = e^{x_t - m} (the value the kernel's exponential gives the target column: same
// input, same function), with one reciprocal of s for p_t and 1 - p_t (<= 1.5 ulp each, as
// against 0.5 for a division: far inside the accuracy rule).
__device__ __forceinline__ RowValues softmax_row_values(float x_t, float row_max, float row_sum, float sum_others,
                                                        float e_t, float inv_s) {
  RowValues r;
  r.log_pt = lm::log_softmax_target_sums(x_t, row_max, row_sum, sum_others);
  r.p_t = e_t * inv_s;
  r.one_minus_pt = sum_others * inv_s;
  return r;
}

__device__ __forceinline__ RowValues softmax_row_values(float x_t, float row_max, float row_sum, float sum_others) {
  return softmax_row_values(x_t, row_max, row_sum, sum_others, lm::exp_(x_t - row_max), 1.0f / row_sum);
}

struct RowResult {
  float loss;
  float k;               // dLoss/dlog p_t, already scaled
  float dloss_dfeature;  // IB only
};

template <bool kWeighted, typename A>
__device__ __forceinline__ RowResult softmax_row_result(const A& a, int64_t row, int64_t t, const RowValues& rv,
                                                        float scale) {
  RowResult out{0.0f, 0.0f, 0.0f};
  const float log_pt = rv.log_pt;
  switch (a.loss) {
    case SoftmaxLoss::Focal: {
      const float alpha_t = lm::class_alpha(a.alpha_per_class, a.alpha, t);
      const lm::FocalTerm<float> ft = lm::focal_term_parts(log_pt, rv.p_t, rv.one_minus_pt, a.gamma);
      out.loss = alpha_t * ft.value;
      out.k = scale * alpha_t * ft.dvalue_dlogpt;
      if constexpr (kWeighted) {  // Poly-1 (#24): the extras instances only (softmax_launch_for)
        if (a.epsilon != 0.0f) {  // not scaled by alpha
          const lm::FocalTerm<float> pt = lm::poly1_term_parts(rv.p_t, rv.one_minus_pt, a.gamma, a.epsilon);
          out.loss += pt.value;
          out.k += scale * pt.dvalue_dlogpt;
        }
      }
      break;
    }
    case SoftmaxLoss::IB: {
      const float w = a.class_weight != nullptr ? a.class_weight[t] : 1.0f;
      const lm::IBRow<float> ib =
          lm::ib_row(log_pt, w, a.feature_norm[row], a.ib_alpha, a.ib_epsilon, a.gamma, a.detach_factor);
      out.loss = ib.loss;
      out.k = scale * ib.dloss_dlogpt;
      out.dloss_dfeature = scale * ib.dloss_dfeature;
      break;
    }
    case SoftmaxLoss::OhemKept:
      out.loss = -log_pt;
      out.k = -scale;
      break;
    case SoftmaxLoss::Ghmc: {
      // g = 1 - p_t as sum_others / s, the value the Stats pass of ghmc_bin_weights bins with.
      const int64_t b = lm::ghm_bin(rv.one_minus_pt, a.bins);
      const float w = b >= 0 ? a.bin_weights[b] : 0.0f;
      out.loss = w * -log_pt;
      out.k = -scale * w;
      break;
    }
    case SoftmaxLoss::Stats:
      break;
  }
  if constexpr (kWeighted) {
    if (a.weight != nullptr) {  // the row's weight (nonzero: zero-weight rows are inactive)
      const float w = a.weight[row];
      out.loss *= w;
      out.k *= w;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------
// Label smoothing (the kExtras kernel instances with eps > 0; reference.focal / ohem / ghmc):
//   q_c = (1 - eps) [c == t] + eps / C,  a_c = alpha_per_class[c] or the scalar alpha (Focal;
//   1 for OhemKept and Ghmc),  gamma (Focal; 0 for the others: the smoothed cross entropy),
//   loss = mult * sum_c q_c a_c F(l_c),  F(l) = (1 - e^l)^gamma (-l),  l_c = log p_c,
//   mult = weight (x GHM-C's bin weight of the unsmoothed g = 1 - p_t).
// Gradient (D = dF/dl, h_c = q_c a_c D(l_c), H = sum_c h_c):
//   dloss/dx_j = mult * (h_j - p_j H);  target column: mult * (h_t (1 - p_t) - p_t H_o),
//   H_o = sum_{c != t} h_c (1 - p_t = sum_others / s, exact as the target's l_t).
// Non-target classes: l_c = (x_c - m) - log s, p_c = e^{x_c - m} / s, 1 - p_c = -expm1(l_c);
// gamma = 0: F = -l_c, D = -1 (no per-class transcendental beyond the exponential).
// ------------------------------------------------------------------------------------------
struct SmoothRow {
  float eps_c;  // eps / C: q_c of a non-target class
  float gamma;
  const float* alpha_per_class;
  float alpha;
  float log_s;  // log of the row sum s
  float inv_s;  // 1 / s
  // Filled by smooth_finish: the per-row pieces of the gradient (already scaled).
  float gs;           // scale * mult
  float h_total;      // H
  float target_grad;  // gradient of the target column
};

template <typename A>
__device__ __forceinline__ SmoothRow smooth_row(const A& a, float row_sum) {
  SmoothRow sr;
  const bool focal = a.loss == SoftmaxLoss::Focal;
  sr.eps_c = a.label_smoothing / static_cast<float>(a.C);
  sr.gamma = focal ? a.gamma : 0.0f;
  sr.alpha_per_class = focal ? a.alpha_per_class : nullptr;
  sr.alpha = focal ? a.alpha : 1.0f;
  sr.log_s = lm::log_(row_sum);
  sr.inv_s = 1.0f / row_sum;
  sr.gs = sr.h_total = sr.target_grad = 0.0f;
  return sr;
}

// a_c F(l_c) and a_c D(l_c) of a non-target class c from x_c - m.
__device__ __forceinline__ lm::FocalTerm<float> smooth_class_term(const SmoothRow& sr, float x_minus_max, int64_t c) {
  const float a_c = lm::class_alpha(sr.alpha_per_class, sr.alpha, c);
  const float l = x_minus_max - sr.log_s;
  lm::FocalTerm<float> ft{-l, -1.0f};
  if (sr.gamma != 0.0f) ft = lm::focal_term_parts(l, lm::exp_(x_minus_max) * sr.inv_s, -lm::expm1_(l), sr.gamma);
  ft.value *= a_c;
  ft.dvalue_dlogpt *= a_c;
  return ft;
}

// The row's loss (returned) and gradient pieces (into sr) from the target's values and the sums
// over the other classes of a_c F(l_c) (sum_f) and a_c D(l_c) (sum_d).
template <typename A>
__device__ __forceinline__ float smooth_finish(const A& a, int64_t row, int64_t t, const RowValues& rv, float sum_f,
                                               float sum_d, float scale, SmoothRow& sr) {
  float mult = a.weight != nullptr ? a.weight[row] : 1.0f;
  if (a.loss == SoftmaxLoss::Ghmc) {
    const int64_t b = lm::ghm_bin(rv.one_minus_pt, a.bins);  // the unsmoothed g, as the histogram
    mult *= b >= 0 ? a.bin_weights[b] : 0.0f;
  }
  const float q_t = (1.0f - a.label_smoothing) + sr.eps_c;
  const float a_t = lm::class_alpha(sr.alpha_per_class, sr.alpha, t);
  lm::FocalTerm<float> ft{-rv.log_pt, -1.0f};
  if (sr.gamma != 0.0f) ft = lm::focal_term_parts(rv.log_pt, rv.p_t, rv.one_minus_pt, sr.gamma);
  float h_t = q_t * a_t * ft.dvalue_dlogpt;
  float poly = 0.0f;
  if (a.loss == SoftmaxLoss::Focal && a.epsilon != 0.0f) {
    // Poly-1 (#24): 1 - sum_c q_c p_c = (1 - eps)(1 - p_t) + (eps - eps/C), a function of l_t alone
    // (d/dl_t: (1 - eps) p_t), so its derivative joins h_t (csrc/cpu/softmax.h, the same steps).
    const float u = (1.0f - a.label_smoothing) * rv.one_minus_pt + (a.label_smoothing - sr.eps_c);
    const lm::FocalTerm<float> pt =
        lm::poly1_term_parts((1.0f - a.label_smoothing) * rv.p_t, u, sr.gamma, a.epsilon);
    h_t += pt.dvalue_dlogpt;
    poly = pt.value;
  }
  const float h_others = sr.eps_c * sum_d;
  sr.gs = scale * mult;
  sr.h_total = h_t + h_others;
  sr.target_grad = sr.gs * (h_t * rv.one_minus_pt - rv.p_t * h_others);
  return mult * (q_t * a_t * ft.value + sr.eps_c * sum_f + poly);
}

// Gradient of a non-target class j: gs * (eps/C a_j D(l_j) - p_j H).
__device__ __forceinline__ float smooth_class_grad(const SmoothRow& sr, float x_minus_max, int64_t j) {
  const lm::FocalTerm<float> ft = smooth_class_term(sr, x_minus_max, j);
  return sr.gs * (sr.eps_c * ft.dvalue_dlogpt - lm::exp_(x_minus_max) * sr.inv_s * sr.h_total);
}

// Per-row outputs, written once per row by one thread; returns the loss to accumulate.
template <typename scalar_t, typename grad_t>
__device__ __forceinline__ float write_row_outputs(const SoftmaxArgs<scalar_t, grad_t>& a, int64_t row,
                                                   const RowResult& res, const RowValues& rv) {
  if (a.loss_rows != nullptr) a.loss_rows[row] = from_float<scalar_t>(res.loss);
  if (a.log_pt_rows != nullptr) a.log_pt_rows[row] = rv.log_pt;
  if (a.one_minus_pt_rows != nullptr) a.one_minus_pt_rows[row] = rv.one_minus_pt;
  if (a.grad_feature != nullptr) a.grad_feature[row] = res.dloss_dfeature;
  return res.loss;
}

// ------------------------------------------------------------------------------------------
// softmax_rows_kernel: (N, C) rows (S = 1), C <= G * ITEMS * VEC. A group of G lanes per row
// (32 / G rows per warp: short rows keep every lane busy, and the per-row work (target, log,
// loss, reciprocal, butterflies) is shared by 32 / G rows per instruction); lane j of the group
// holds packs j, j + G, ... (VEC values each) in registers, so the row is read once and its
// exponentials are computed once:
//   m = max_c x_c (group butterfly), e_c = fast_exp(x_c - m) (FMUL + MUFU.EX2, device.cuh),
//   sum_others = sum_{c != t} e_c (group butterfly), e_t = fast_exp(x_t - m), s = sum_others +
//   e_t (one rounding; no second per-element sum or butterfly), one reciprocal 1 / s,
//   RowValues (log p_t, p_t = e_t / s, 1 - p_t = sum_others / s), (loss, k) =
//   softmax_row_result(...), grad_c = -k e_c / s for c != t, grad_{c=t} = k (1 - p_t)
//   (sum_others / s: 1 - e_t / s would cancel as p_t -> 1),
// each computed in float32 and rounded once to the gradient's element type grad_t. Class
// indices are 32-bit in the loops (C <= G * ITEMS * VEC <= 1280), the row offset 64-bit once per
// row. Budget (H100, 3.35 TB/s, 4 warp-instructions/cycle/SM at 1.98 GHz, 132 SMs): fwd+bwd
// reads and writes each element once, so ~2.5 warp-instructions per fp32 element and ~1.25 per
// bf16 element at the roofline; `make gpu-budget` counts them in the SASS.
// Memory traffic per element: sizeof(scalar_t) read + sizeof(grad_t) written (VEC-value packs:
// 16 bytes of bf16 gradient for bf16 'mean'/'sum', 4 * VEC bytes of float32 otherwise); per
// row: 8 bytes of target (+ sizeof(scalar_t) for 'none' losses, 4 for Stats log p_t). Ignored rows
// skip the logits read from memory (not a group's first row with kPrefetch; with kHoist their
// loads read the tensor's first bytes, cached, below) and write a zero gradient.
// No minimum of resident blocks is asked of ptxas (a minimum, even 1, changes its choices: fp32
// C = 80 80 -> 88 registers); sm_90: fp32 C = 80 80 registers (3 blocks per SM), bf16/fp16
// C = 80 64 (4 blocks).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int VEC, int G, int ITEMS>
__global__ void __launch_bounds__(kThreads) softmax_rows_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  static_assert(G * ITEMS * VEC <= 2048, "register rows are short (32-bit class indices)");
  constexpr int kRowsPerWarp = 32 / G;
  // The lane's max and sum go into kParts independent partials (value j of the lane into
  // partial j % kParts), combined by parts_max / parts_sum (kernel_utils.cuh): dependency chains
  // of about ITEMS * VEC / kParts + log2 kParts operations instead of ITEMS * VEC (a warp waits
  // on each link of a chain). 4, not 8: 8 live partials made the bf16 C = 80 layout spill under
  // the 3-block bound it then had.
  constexpr int kParts = ITEMS * VEC >= 4 ? 4 : ITEMS * VEC >= 2 ? 2 : 1;
  // Software pipeline for short rows (a lane's part of a row <= 64 bytes: C = 80 and the other
  // classification widths): the packs and x_t of the group's NEXT row are loaded before the
  // current row is reduced, its target an iteration before that, so every warp has a row's loads
  // in flight while it computes (without it: target, packs, x_t and the per-row math one after
  // the other, the memory idle meanwhile unless other warps fill it). Costs the raw packs of one
  // row in registers (<= 16). fp32 only: the 16-bit layouts (C = 80: 4 lanes x 5 packs of 4)
  // need 109 registers with it on sm_90 (2 blocks per SM; simulated 59% of copy against 64% with
  // kHoist at 4 blocks) and spill under a 3-block bound.
  // kHoist (the other rows of <= 24 values per lane): the row's loads are all issued before the
  // first value is used, below. Long rows (C up to 1280 in registers, 40 values per lane) keep a
  // load per pack before its use: hoisted, bf16 C = 1203 took 145 registers (1 block per SM),
  // not measured on a GPU (csrc/cuda/NOTES.md).
  constexpr bool kPrefetch = sizeof(scalar_t) == 4 && ITEMS * VEC <= 12;
  constexpr bool kHoist = !kPrefetch && ITEMS * VEC <= 24;
  const int lane = threadIdx.x % 32;
  const int group = lane / G;
  const int member = lane % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t rows = a.N;
  const int64_t step = warps * kRowsPerWarp;
  const int C = static_cast<int>(a.C);  // <= G * ITEMS * VEC (softmax_launch_for)
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  // The packs of the next row (active rows only, but for the first row: see below) and its
  // target logit.
  Pack<scalar_t, VEC> next[ITEMS];
  float next_x_t = 0.0f;
  RowTarget next_rt{0, false, false};
  int64_t ahead_t = 0;  // the target of the row after next (kPrefetch)
  const auto load_packs = [&](bool load, int64_t row) {
    const scalar_t* x = a.logits + (row < rows ? row : int64_t(0)) * a.C;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c0 = (member + i * G) * VEC;
      if (load && c0 < C) next[i] = load_pack<VEC>(x + c0);
    }
  };
  const auto load_x_t = [&](const RowTarget& rt, int64_t row) {
    next_x_t = rt.active ? to_float(a.logits[row * a.C + rt.t]) : 0.0f;
  };
  int64_t first = warp * kRowsPerWarp;
  if constexpr (kPrefetch) {
    // The first row: its packs are loaded together with its target (every row in range, ignored
    // ones too, when there is no OHEM `kept` mask: one round trip to memory instead of two at the
    // start; an ignored row's values are never used); later rows only when active.
    const int64_t row0 = first + group;
    const int64_t t0 = row0 < rows ? a.target[row0] : int64_t(0);
    ahead_t = row0 + step < rows ? a.target[row0 + step] : int64_t(0);
    const bool speculate = a.kept == nullptr;
    load_packs(speculate && row0 < rows, row0);
    next_rt = row_target_of<false>(a, row0, rows, t0);
    load_packs(!speculate && next_rt.active, row0);
    load_x_t(next_rt, row0);
  }
  // The loop bound is the same for every lane of the warp (the shuffles need all 32 lanes).
  for (; first < rows; first += step) {
    const int64_t row = first + group;
    const RowTarget rt = kPrefetch ? next_rt : row_target<false>(a, row, rows);
    const int t = rt.active ? static_cast<int>(rt.t) : -1;  // in [0, C) when active
    const int64_t row_offset = (rt.in_range ? row : int64_t(0)) * a.C;
    const scalar_t* x = a.logits + row_offset;
    // kHoist: every pack of the row is loaded before the first one is used (a load and its use
    // in one branch, as below without kHoist, make the warp wait for memory once per pack:
    // ITEMS round trips per row, on sm_90 too). The loads are not predicated (a predicated load
    // keeps the register's old value where it is off, so ptxas keeps the packs alive from row to
    // row: 184-236 bytes of spills): an inactive row and the columns past C read the tensor's
    // first bytes instead (cached; never used).
    if constexpr (kHoist) {
      const scalar_t* src = rt.active ? x : a.logits;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c0 = (member + i * G) * VEC;
        next[i] = load_pack<VEC>(src + (rt.active && c0 < C ? c0 : 0));
      }
    }
    float v[ITEMS][VEC];
    float part[kParts];  // the lane's max, then its sum (kParts above)
#pragma unroll
    for (int k = 0; k < kParts; ++k) part[k] = -INFINITY;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c0 = (member + i * G) * VEC;
      if (rt.active && c0 < C) {
        if constexpr (!kPrefetch && !kHoist) next[i] = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          v[i][e] = to_float(next[i].v[e]);
          float& m = part[(i * VEC + e) % kParts];
          m = v[i][e] > m ? v[i][e] : m;
        }
      }
    }
    float row_max = parts_max(part);
    float current_x_t = 0.0f;
    if constexpr (kPrefetch) {  // issue the next row's loads and the target after it
      current_x_t = next_x_t;
      const int64_t row_n = row + step;
      next_rt = row_target_of<false>(a, row_n, rows, ahead_t);
      load_packs(next_rt.active, row_n);
      load_x_t(next_rt, row_n);
      ahead_t = row_n + step < rows ? a.target[row_n + step] : int64_t(0);
    }
    row_max = group_max<G>(row_max);
#pragma unroll
    for (int k = 0; k < kParts; ++k) part[k] = 0.0f;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int c0 = (member + i * G) * VEC;
      if (rt.active && c0 < C) {
        // The pack's exponentials, then their sums (in this order in the PTX too: an addition
        // waiting on the exponential just issued stalls the warp for the MUFU latency; ptxas
        // schedules the same way for sm_90, a PTX-level simulator runs the PTX order).
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[i][e] = fast_exp(v[i][e] - row_max);
        const int te = t - c0;
#pragma unroll
        for (int e = 0; e < VEC; ++e) part[(i * VEC + e) % kParts] += e == te ? 0.0f : v[i][e];
      }
    }
    const float sum_others = group_sum<G>(parts_sum(part));
    RowResult res{0.0f, 0.0f, 0.0f};
    RowValues rv{0.0f, 0.0f, 0.0f};
    float inv_s = 0.0f;
    if (rt.active) {
      const float x_t = kPrefetch ? current_x_t : to_float(x[t]);
      const float e_t = fast_exp(x_t - row_max);
      const float row_sum = sum_others + e_t;
      inv_s = 1.0f / row_sum;
      rv = softmax_row_values(x_t, row_max, row_sum, sum_others, e_t, inv_s);
      res = softmax_row_result<false>(a, row, rt.t, rv, scale);
    }
    if (a.grad != nullptr && rt.in_range) {
      grad_t* g = a.grad + row_offset;
      // -k / s as one product (__fmul_rn: the compiler moved the negation of -k * (1 / s) into
      // every gradient value, an instruction per value).
      const float p_scale = __fmul_rn(-res.k, inv_s);
      const float target_grad = res.k * rv.one_minus_pt;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int c0 = (member + i * G) * VEC;
        if (c0 < C) {
          // One branch per pack on the row's activity (per value, the compiler branched per value).
          Pack<grad_t, VEC> out;
          if (rt.active) {
            const int te = t - c0;  // the target's place in the pack (any other value: none)
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
              const float pv = p_scale * v[i][e];
              out.v[e] = from_float<grad_t>(e == te ? target_grad : pv);
            }
          } else {
            out = Pack<grad_t, VEC>{};  // zeros
          }
          store_pack<VEC>(g + c0, out);
        }
      }
    }
    if (member == 0 && rt.in_range) acc += write_row_outputs(a, row, res, rv);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// softmax_rows_large_kernel: (N, C) rows too long for registers. A warp per row, three sweeps
// over the row (max; s and sum_others of e_c; gradient with e_c recomputed from the row's m and
// s, never as exp(x_c - lse)), VEC-value packs. Same RowValues as softmax_rows_kernel. The second and
// third sweeps re-read the row just read, from L1/L2: device-memory traffic stays one read and
// one write per element (rows up to ~100 KB per warp stay cached). Gradient in grad_t, as above.
// The three sweeps are not unrolled (#pragma unroll 1; each iteration is already VEC values):
// unrolled, the <float, float, 4> instance grew enough that ptxas spilled on the per-row path
// (24 B stack, 40 B spill stores; tests/cuda_emu/resource_check.py fails on any spill).
// kExtras (drop-in extras, any C; the plain instances compile them out): the per-row weight
// (row_target, softmax_row_result), and with label smoothing eps > 0 a sweep more between the
// sums and the gradient, for the sums over the other classes of a_c F(l_c) and a_c D(l_c)
// ("Label smoothing" above); the gradient sweep then writes mult * (h_j - p_j H).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int VEC, bool kExtras>
__global__ void __launch_bounds__(kThreads) softmax_rows_large_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t rows = a.N;
  const int64_t C = a.C;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  for (int64_t row = warp; row < rows; row += warps) {  // one row per warp: warp-uniform branches
    const RowTarget rt = row_target<kExtras>(a, row, rows);
    const scalar_t* x = a.logits + row * C;
    float row_max = -INFINITY;
    float row_sum = 0.0f, sum_others = 0.0f;
    RowResult res{0.0f, 0.0f, 0.0f};
    RowValues rv{0.0f, 0.0f, 0.0f};
    [[maybe_unused]] SmoothRow sr{};
    const bool smooth = kExtras && a.label_smoothing > 0.0f;  // uniform over the launch
    if (rt.active) {
#pragma unroll 1
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float value = to_float(p.v[e]);
          row_max = value > row_max ? value : row_max;
        }
      }
      row_max = group_max<32>(row_max);
#pragma unroll 1
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float ex = lm::exp_(to_float(p.v[e]) - row_max);
          row_sum += ex;
          sum_others += c0 + e == rt.t ? 0.0f : ex;
        }
      }
      row_sum = group_sum<32>(row_sum);
      sum_others = group_sum<32>(sum_others);
      rv = softmax_row_values(to_float(x[rt.t]), row_max, row_sum, sum_others);
      if (smooth) {
        sr = smooth_row(a, row_sum);
        float sum_f = 0.0f, sum_d = 0.0f;
#pragma unroll 1
        for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
          const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            if (c0 + e != rt.t) {
              const lm::FocalTerm<float> ft = smooth_class_term(sr, to_float(p.v[e]) - row_max, c0 + e);
              sum_f += ft.value;
              sum_d += ft.dvalue_dlogpt;
            }
          }
        }
        sum_f = group_sum<32>(sum_f);
        sum_d = group_sum<32>(sum_d);
        res.loss = smooth_finish(a, row, rt.t, rv, sum_f, sum_d, scale, sr);
      } else {
        res = softmax_row_result<kExtras>(a, row, rt.t, rv, scale);
      }
    }
    if (a.grad != nullptr) {
      grad_t* g = a.grad + row * C;
      const float p_scale = -res.k / row_sum;
      const float target_grad = smooth ? sr.target_grad : res.k * rv.one_minus_pt;
#pragma unroll 1
      for (int64_t c0 = static_cast<int64_t>(lane) * VEC; c0 < C; c0 += 32 * VEC) {
        Pack<grad_t, VEC> out;
        if (rt.active) {
          const Pack<scalar_t, VEC> p = load_pack<VEC>(x + c0);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            const float xm = to_float(p.v[e]) - row_max;
            out.v[e] = from_float<grad_t>(c0 + e == rt.t ? target_grad
                                           : smooth       ? smooth_class_grad(sr, xm, c0 + e)
                                                         : p_scale * lm::exp_(xm));
          }
        } else {
#pragma unroll
          for (int e = 0; e < VEC; ++e) out.v[e] = from_float<grad_t>(0.0f);
        }
        store_pack<VEC>(g + c0, out);
      }
    }
    if (lane == 0) acc += write_row_outputs(a, row, res, rv);
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// softmax_spatial_kernel: channel-second (N, C, S) logits, S > 1, read in place. A thread per
// row r = n * S + s; consecutive threads take consecutive s, so for each class c a warp reads
// 32 consecutive values (coalesced) at n*C*S + c*S + s. kRegs > 0 (C <= kRegs): the row lives
// in registers (one read, exponentials once; class offsets c S in 32 bits, C S < 2^32, per row
// no division: the row offset is advanced by the grid stride). kRegs == 0: three sweeps (max, sum,
// gradient), the later two from L1/L2 (a block's rows are 256 * C * sizeof(scalar_t) bytes).
// Same formulas as softmax_rows_kernel (s and sum_others summed in class order by the row's thread). Memory traffic per element: sizeof(scalar_t) read,
// sizeof(grad_t) gradient written (single values, coalesced across the warp); per row 8 bytes
// of target. kExtras (weight, label smoothing; kRegs == 0 only): as softmax_rows_large_kernel
// (a fourth sweep with eps > 0). Resident blocks: 2 per SM stated (sm_90 kRegs = 32: 101
// registers, 2 blocks as without it; without it ptxas for sm_80, the simulator's PTX, capped that
// instance at 80 registers and spilled, and GPGPU-Sim rejects a kernel with a stack).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, int kRegs, bool kExtras>
__global__ void __launch_bounds__(kThreads, 2) softmax_spatial_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  static_assert(!kExtras || kRegs == 0, "the drop-in extras run the sweep variant");
  const int64_t rows = a.N * a.S;
  const int64_t C = a.C, S = a.S;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  // The row's offset base = n C S + s (row = n S + s) and its s, advanced by the grid stride
  // (first / S and stride / S with their remainders once per thread, no division per row: a
  // division per row was ~1/5 of the loop).
  const int64_t CS = C * S;
  int64_t s = first % S;
  int64_t base = first / S * CS + s;
  const int64_t ds = stride % S;
  const int64_t dbase = stride / S * CS + ds;
  // kRegs > 0: class offsets c S in 32 bits (softmax_launch_for runs these instances only for
  // C S <= 2^32 - 1; larger images take the kRegs == 0 sweep with 64-bit offsets).
  [[maybe_unused]] const uint32_t S32 = static_cast<uint32_t>(S);
  for (int64_t row = first; row < rows; row += stride) {
    const RowTarget rt = row_target<kExtras>(a, row, rows);
    const scalar_t* x = a.logits + base;
    constexpr int kSlots = kRegs > 0 ? kRegs : 1;
    [[maybe_unused]] float v[kSlots];
    float row_max = -INFINITY;
    float row_sum = 0.0f, sum_others = 0.0f;
    RowResult res{0.0f, 0.0f, 0.0f};
    RowValues rv{0.0f, 0.0f, 0.0f};
    [[maybe_unused]] SmoothRow sr{};
    const bool smooth = kExtras && a.label_smoothing > 0.0f;  // uniform over the launch
    float inv_s = 0.0f;  // 1 / s of an active row
    if (rt.active) {
      if constexpr (kRegs > 0) {
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            v[c] = to_float(x[c * S32]);
            row_max = v[c] > row_max ? v[c] : row_max;
          }
        }
        const int t = static_cast<int>(rt.t);  // in [0, C) (active)
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            v[c] = fast_exp(v[c] - row_max);
            sum_others += c == t ? 0.0f : v[c];
          }
        }
        // As softmax_rows_kernel: s = sum_others + e_t, one reciprocal.
        const float x_t = to_float(x[static_cast<uint32_t>(t) * S32]);
        const float e_t = fast_exp(x_t - row_max);
        row_sum = sum_others + e_t;
        inv_s = 1.0f / row_sum;
        rv = softmax_row_values(x_t, row_max, row_sum, sum_others, e_t, inv_s);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const float value = to_float(x[c * S]);
          row_max = value > row_max ? value : row_max;
        }
        for (int64_t c = 0; c < C; ++c) {
          const float ex = lm::exp_(to_float(x[c * S]) - row_max);
          row_sum += ex;
          sum_others += c == rt.t ? 0.0f : ex;
        }
        rv = softmax_row_values(to_float(x[rt.t * S]), row_max, row_sum, sum_others);
        inv_s = 1.0f / row_sum;
      }
      if (smooth) {
        sr = smooth_row(a, row_sum);
        float sum_f = 0.0f, sum_d = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
          if (c != rt.t) {
            const lm::FocalTerm<float> ft = smooth_class_term(sr, to_float(x[c * S]) - row_max, c);
            sum_f += ft.value;
            sum_d += ft.dvalue_dlogpt;
          }
        }
        res.loss = smooth_finish(a, row, rt.t, rv, sum_f, sum_d, scale, sr);
      } else {
        res = softmax_row_result<kExtras>(a, row, rt.t, rv, scale);
      }
    }
    if (a.grad != nullptr) {
      grad_t* g = a.grad + base;
      const float p_scale = -res.k * inv_s;
      const float target_grad = smooth ? sr.target_grad : res.k * rv.one_minus_pt;
      if constexpr (kRegs > 0) {
#pragma unroll
        for (int c = 0; c < kRegs; ++c) {
          if (c < C) {
            g[c * S32] = from_float<grad_t>(!rt.active ? 0.0f : (c == rt.t ? target_grad : p_scale * v[c]));
          }
        }
      } else {
        for (int64_t c = 0; c < C; ++c) {
          float value = 0.0f;
          if (rt.active) {
            const float xm = to_float(x[c * S]) - row_max;
            value = c == rt.t ? target_grad : smooth ? smooth_class_grad(sr, xm, c) : p_scale * lm::exp_(xm);
          }
          g[c * S] = from_float<grad_t>(value);
        }
      }
    }
    acc += write_row_outputs(a, row, res, rv);
    s += ds;
    base += dbase;
    if (s >= S) {
      s -= S;
      base += CS - S;
    }
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

// ------------------------------------------------------------------------------------------
// focal_probs_kernel: focal with from_logits=False (the input holds probabilities). A thread
// per row reads only x_t: loss = w alpha_t (1 - x_t)^gamma (-log x_t) (w: the row's weight,
// kWeighted instances only; a zero weight makes the row inactive), and writes the one
// nonzero gradient value grad_{c=t} = scale * alpha_t * dFocal/dl / x_t (rounded once to the
// gradient's element type grad_t) into a gradient the host zeroed in that type. Traffic: per row 8
// bytes of target + one scattered logit read + one gradient write, plus the zero fill of the
// gradient (sizeof(grad_t) per element).
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename grad_t, bool kWeighted>
__global__ void __launch_bounds__(kThreads) focal_probs_kernel(const SoftmaxArgs<scalar_t, grad_t> a) {
  const int64_t rows = a.N * a.S;
  const int64_t C = a.C, S = a.S;
  const float scale = grad_scale(a.reduction, a.count);
  double acc = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; row < rows; row += stride) {
    const RowTarget rt = row_target<kWeighted>(a, row, rows);
    RowResult res{0.0f, 0.0f, 0.0f};
    if (rt.active) {
      const int64_t n = row / S;
      const int64_t at_t = n * C * S + (row - n * S) + rt.t * S;
      const float p_t = to_float(a.logits[at_t]);
      float alpha_t = lm::class_alpha(a.alpha_per_class, a.alpha, rt.t);
      if constexpr (kWeighted) alpha_t *= a.weight[row];
      const lm::FocalTerm<float> ft = lm::focal_term(lm::log_(p_t), a.gamma);
      if (a.epsilon == 0.0f) {
        res.loss = alpha_t * ft.value;
        if (a.grad != nullptr) a.grad[at_t] = from_float<grad_t>(scale * alpha_t * ft.dvalue_dlogpt / p_t);
      } else {  // Poly-1 (#24): epsilon (1 - x_t)^(gamma + 1), weighted, not scaled by alpha
        float w = 1.0f;
        if constexpr (kWeighted) w = a.weight[row];
        const lm::FocalTerm<float> pt = lm::poly1_term_parts(p_t, 1.0f - p_t, a.gamma, a.epsilon);
        res.loss = alpha_t * ft.value + w * pt.value;
        if (a.grad != nullptr)
          a.grad[at_t] = from_float<grad_t>(scale * (alpha_t * ft.dvalue_dlogpt + w * pt.dvalue_dlogpt) / p_t);
      }
    }
    acc += write_row_outputs(a, row, res, RowValues{0.0f, 0.0f, 0.0f});
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

template <typename scalar_t, typename grad_t>
struct SoftmaxLaunch {
  void (*kernel)(const SoftmaxArgs<scalar_t, grad_t>);
  int64_t rows_per_block;
};

// The kernel instance for (N, C) rows with VEC-value packs: the smallest register layout that
// holds the row, or the three-sweep kernel for long rows.
template <typename scalar_t, typename grad_t, int VEC>
inline SoftmaxLaunch<scalar_t, grad_t> pick_rows_kernel(int64_t C) {
  // Lanes per row G and packs per lane ITEMS: enough rows per warp that most lanes hold a pack
  // (C = 80: fp32 20 packs -> 8 lanes x 3, 4 rows per warp), a warp per row up to 1280 values in
  // registers (LVIS C = 1203: read once), longer rows the three-sweep kernel.
  // 16-bit rows of 9-10 packs of 8 (C = 72, 80) take packs of 4 values (8-byte loads; the row
  // is 8-byte aligned as it is 16-byte aligned), 4 lanes x 5, 8 rows per warp: every lane holds 5
  // packs (4 x 3 packs of 8 left the third pack of half the lanes empty, its instructions on 16
  // lanes), 20 values per lane, so all five loads are issued before the first use (kHoist) in 64
  // registers (4 blocks per SM). The 2 x 5 packs of 8 used before 2026-12-07 (40 values per lane)
  // fit 80 registers only with a load per pack before its use: 5 round trips to memory per row.
  constexpr int kLongItems = 1280 / (32 * VEC);  // 40 single values, 10 fp32 packs, 5 16-bit packs
  const int64_t packs = (C + VEC - 1) / VEC;
  if (packs <= 4) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 4, 1>, kWarps * 8};
  if (VEC == 8 && packs > 8 && packs <= 10) return {softmax_rows_kernel<scalar_t, grad_t, 4, 4, 5>, kWarps * 8};
  if (packs <= 12) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 4, 3>, kWarps * 8};
  if (packs <= 24) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 8, 3>, kWarps * 4};
  if (packs <= 48) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 16, 3>, kWarps * 2};
  if (packs <= 128) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 32, 4>, kWarps};
  if (packs <= 32 * kLongItems) return {softmax_rows_kernel<scalar_t, grad_t, VEC, 32, kLongItems>, kWarps};
  return {softmax_rows_large_kernel<scalar_t, grad_t, VEC, false>, kWarps};
}


constexpr int kSpatialRegs = 32;  // channel-second rows of up to 32 classes stay in registers

// The kernel instance and rows per block of a softmax pass over a's rows (rows = N * S > 0),
// chosen from the shape, the pointers' alignment, from_probs and the extras. The launcher
// (softmax_pass, csrc/cuda/softmax_kernels.cu) and the standalone drivers launch
// grid_size(SMs, occupancy of .kernel, N * S, .rows_per_block) blocks of kThreads.
template <typename scalar_t, typename grad_t>
inline SoftmaxLaunch<scalar_t, grad_t> softmax_launch_for(const SoftmaxArgs<scalar_t, grad_t>& a, bool from_probs) {
  using Launch = SoftmaxLaunch<scalar_t, grad_t>;
  // Drop-in extras (a per-row weight, label smoothing; never in a Stats pass, no smoothing with
  // probabilities): the kExtras instances of the sweep kernels, whatever C (for (N, C) rows one
  // warp per row; fused, the row read once from memory), so that the plain instances keep the
  // registers of the no-extras kernels. focal_probs_kernel takes the weight itself.
  const bool extras = (a.weight != nullptr || a.label_smoothing > 0.0f || a.epsilon != 0.0f) &&  // + Poly-1 (#24)
                      a.loss != SoftmaxLoss::Stats;
  if (from_probs) {
    return a.weight != nullptr ? Launch{focal_probs_kernel<scalar_t, grad_t, true>, kThreads}
                               : Launch{focal_probs_kernel<scalar_t, grad_t, false>, kThreads};
  }
  if (a.S > 1) {
    return extras ? Launch{softmax_spatial_kernel<scalar_t, grad_t, 0, true>, kThreads}
           : a.C <= kSpatialRegs && a.C * a.S <= static_cast<int64_t>(UINT32_MAX)  // 32-bit class offsets
               ? Launch{softmax_spatial_kernel<scalar_t, grad_t, kSpatialRegs, false>, kThreads}
               : Launch{softmax_spatial_kernel<scalar_t, grad_t, 0, false>, kThreads};
  }
  // Packs of kVec values: 16 bytes of logits, kVec * sizeof(grad_t) bytes of gradient (16 for
  // a gradient in the logits dtype, 32 = two stores for a float32 gradient of fp16/bf16).
  // Row offsets are multiples of kVec values, so aligned base pointers keep every pack aligned.
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool packed = a.C % kVec == 0 && reinterpret_cast<uintptr_t>(a.logits) % 16 == 0 &&
                      (a.grad == nullptr || reinterpret_cast<uintptr_t>(a.grad) % (kVec * sizeof(grad_t)) == 0);
  if (extras) {
    return packed ? Launch{softmax_rows_large_kernel<scalar_t, grad_t, kVec, true>, kWarps}
                  : Launch{softmax_rows_large_kernel<scalar_t, grad_t, 1, true>, kWarps};
  }
  return packed ? pick_rows_kernel<scalar_t, grad_t, kVec>(a.C) : pick_rows_kernel<scalar_t, grad_t, 1>(a.C);
}

}  // namespace cuda
}  // namespace fused_losses
