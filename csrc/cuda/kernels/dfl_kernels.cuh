// Distribution focal loss kernel of fused_losses (issue #24; no ATen: csrc/cuda/kernels/device.cuh).
// The launcher and the op's host function: csrc/cuda/dfl.cu. Conventions: csrc/cuda/common.cuh.
//
// Per row of n + 1 bins (reference.distribution_focal; math::dfl_bins): label y in [0, n],
// l = min(floor(y), n - 1), r = l + 1, w_r = y - l, w_l = 1 - w_r,
//   loss = w * -(w_l log p_l + w_r log p_r),   grad_c = scale * w * (p_c - w_l [c == l] - w_r [c == r])
// with m = the row max, e_c = e^{x_c - m}, s = sum_c e_c. Of the two bins, `sel` is the one with
// the larger logit: its log p is math::log_softmax_target_sums (exact at every margin: -log1p of
// the sum of the others when it is the row max), its gradient (1 - w_sel) - (1 - p_sel) =
// w_oth - sum_others / s (exact for p_sel near 1); the other bin is not above it, so p <= 1/2
// there (unless both are the max) and (x - m) - log s is accurate.
//
// Rows are short (GFL: 17 bins): a group of G lanes holds a row in registers, ITEMS values a lane
// (value c at lane c % G, item c / G), 32 / G rows per warp; the group's max and sums are
// shuffle butterflies (kernel_utils.cuh group_max / group_sum: fixed order, every lane of the
// group gets bitwise the same value). ITEMS == 0: the long-row instance (G = 32, a warp per row)
// loops over the row in global memory (three sweeps: max, sums, gradient; rows of more than 256
// bins only). Traffic per element: read once (sizeof(scalar_t)), gradient written once
// (sizeof(grad_t)); per row 4 bytes of label (+ 4 of weight), and the two bins' logits read again
// (L1 hits). A zero weight selects exactly 0 loss and gradient without reading the row (a NaN
// logit there does not leak). A label outside [0, n] or NaN is a device assert; the bins are then
// clamped into [0, n] (math::dfl_bins), so nothing is read out of bounds.
#pragma once

#include "cuda/kernels/common_kernels.cuh"

namespace fused_losses {
namespace cuda {

template <typename scalar_t, typename grad_t = float>
struct DflArgs {
  const scalar_t* logits = nullptr;  // (M, C) contiguous, C = n + 1 >= 2
  const float* target = nullptr;     // (M,) float32 labels
  const float* weight = nullptr;     // (M,) or nullptr
  int64_t M = 0, C = 0;
  Reduction reduction = Reduction::None;
  MeanCount count;                   // 'mean': the number of rows (count_host = M)
  grad_t* grad = nullptr;            // (M, C) saved gradient (saved_grad_dtype) or nullptr
  scalar_t* loss_rows = nullptr;     // 'none': (M,) or nullptr
  double* partials = nullptr;        // 'mean'/'sum': one per block
};

// The per-row scalars every lane of the row's group computes alike.
struct DflRow {
  int64_t sel, oth;       // bin with the larger logit of (l, r), and the other one
  float w_sel, w_oth;     // their label weights
  float x_sel, x_oth;     // their logits
  float k;                // scale * row weight
};

template <typename A>
__device__ __forceinline__ DflRow dfl_row(const A& a, int64_t row, float w, float scale) {
  const int64_t n = a.C - 1;
  const float y = a.target[row];
  if (!(y >= 0.0f && y <= static_cast<float>(n))) {
    FL_DEVICE_ASSERT(false, "fused_losses: distribution_focal label out of range [0, n]");
  }
  const lm::DflBins<float> b = lm::dfl_bins(y, n);
  const int64_t l = b.left, r = b.left + 1;
  const float x_l = to_float(a.logits[row * a.C + l]), x_r = to_float(a.logits[row * a.C + r]);
  DflRow d;
  const bool left = x_l >= x_r;
  d.sel = left ? l : r;
  d.oth = left ? r : l;
  d.w_sel = left ? b.w_left : b.w_right;
  d.w_oth = left ? b.w_right : b.w_left;
  d.x_sel = left ? x_l : x_r;
  d.x_oth = left ? x_r : x_l;
  d.k = scale * w;
  return d;
}

// The row's loss (unweighted by scale; times the row weight w) from the max, the sums and d.
__device__ __forceinline__ float dfl_row_loss(const DflRow& d, float m, float s, float sum_others, float w) {
  const float lp_sel = lm::log_softmax_target_sums(d.x_sel, m, s, sum_others);
  const float lp_oth = (d.x_oth - m) - lm::log_(s);
  return w * -(d.w_sel * lp_sel + d.w_oth * lp_oth);
}

// Gradient of bin c with e = e^{x_c - m}.
__device__ __forceinline__ float dfl_grad(const DflRow& d, int64_t c, float e, float inv_s, float sum_others) {
  if (c == d.sel) return d.k * (d.w_oth - sum_others * inv_s);
  if (c == d.oth) return d.k * (e * inv_s - d.w_oth);
  return d.k * (e * inv_s);
}

template <typename scalar_t, typename grad_t, int G, int ITEMS>
__global__ void __launch_bounds__(kThreads) dfl_kernel(const DflArgs<scalar_t, grad_t> a) {
  static_assert(G >= 1 && G <= 32 && (G & (G - 1)) == 0, "G: a power of two <= 32");
  static_assert(ITEMS > 0 || G == 32, "the long-row instance takes a warp per row");
  constexpr int kRowsPerWarp = 32 / G;
  const float scale = grad_scale(a.reduction, a.count);
  const int64_t C = a.C;
  const int lane = threadIdx.x % G;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int sub = (threadIdx.x % 32) / G;  // the lane group's row within the warp's rows
  double acc = 0.0;
  // The loop bound is the warp's (every lane of the warp takes part in the shuffles).
  for (int64_t row0 = warp * kRowsPerWarp; row0 < a.M; row0 += warps * kRowsPerWarp) {
    const int64_t row = row0 + sub;
    const bool in_range = row < a.M;
    const float w = in_range ? (a.weight != nullptr ? a.weight[row] : 1.0f) : 0.0f;
    const bool active = in_range && w != 0.0f;
    const scalar_t* x = a.logits + (in_range ? row : 0) * C;
    DflRow d{0, 1, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    if (active) d = dfl_row(a, row, w, scale);
    float m, s, so;
    [[maybe_unused]] float e[ITEMS > 0 ? ITEMS : 1];
    if constexpr (ITEMS > 0) {
      float v[ITEMS];
      float mloc = -INFINITY;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t c = lane + static_cast<int64_t>(G) * i;
        v[i] = active && c < C ? to_float(x[c]) : 0.0f;
        if (c < C) mloc = v[i] > mloc ? v[i] : mloc;
      }
      m = group_max<G>(mloc);
      float sloc = 0.0f, soloc = 0.0f;
#pragma unroll
      for (int i = 0; i < ITEMS; ++i) {
        const int64_t c = lane + static_cast<int64_t>(G) * i;
        e[i] = c < C ? lm::exp_(v[i] - m) : 0.0f;
        sloc += e[i];
        soloc += c != d.sel ? e[i] : 0.0f;
      }
      s = group_sum<G>(sloc);
      so = group_sum<G>(soloc);
    } else {
      float mloc = -INFINITY;
      for (int64_t c = lane; c < C; c += 32) {
        const float v = active ? to_float(x[c]) : 0.0f;
        mloc = v > mloc ? v : mloc;
      }
      m = group_max<32>(mloc);
      float sloc = 0.0f, soloc = 0.0f;
      for (int64_t c = lane; c < C; c += 32) {
        const float ev = lm::exp_((active ? to_float(x[c]) : 0.0f) - m);
        sloc += ev;
        soloc += c != d.sel ? ev : 0.0f;
      }
      s = group_sum<32>(sloc);
      so = group_sum<32>(soloc);
    }
    const float inv_s = 1.0f / s;
    const float loss = active ? dfl_row_loss(d, m, s, so, w) : 0.0f;
    if (lane == 0 && in_range) {
      if (a.loss_rows != nullptr) a.loss_rows[row] = from_float<scalar_t>(loss);
      acc += loss;
    }
    if (a.grad != nullptr && in_range) {
      grad_t* g = a.grad + row * C;
      if constexpr (ITEMS > 0) {
#pragma unroll
        for (int i = 0; i < ITEMS; ++i) {
          const int64_t c = lane + static_cast<int64_t>(G) * i;
          if (c < C) g[c] = from_float<grad_t>(active ? dfl_grad(d, c, e[i], inv_s, so) : 0.0f);
        }
      } else {
        for (int64_t c = lane; c < C; c += 32) {
          const float ev = active ? lm::exp_(to_float(x[c]) - m) : 0.0f;
          g[c] = from_float<grad_t>(active ? dfl_grad(d, c, ev, inv_s, so) : 0.0f);
        }
      }
    }
  }
  if (a.partials != nullptr) {
    const double total = block_sum(acc);
    if (threadIdx.x == 0) a.partials[blockIdx.x] = total;
  }
}

}  // namespace cuda
}  // namespace fused_losses
