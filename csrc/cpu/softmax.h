// The softmax rows / tiles machinery of the CPU kernels (softmax focal, OHEM, IB and GHM-C
// softmax): one pass over the rows of (N, C, S) logits with a per-row function, the
// label-smoothed pass, the two-pass losses' stats and gradient passes. Templates only (each loss
// instantiates them with its row function).
#pragma once

#include "cpu/common.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

struct SoftmaxShape {
  int64_t N, C, S;
  int64_t rows() const { return N * S; }
};

inline SoftmaxShape softmax_shape(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() >= 2, "logits: expected (N, C) or (N, C, d...), got ", logits.sizes());
  int64_t s = 1;
  for (int64_t d = 2; d < logits.dim(); ++d) s *= logits.size(d);
  return {logits.size(0), logits.size(1), s};
}

// Max, exponentials e_c = exp(x_c - max) (kept in `e`, w values per class) and their sums for
// the w rows of one tile: rows j = 0..w-1 at x[c * class_stride + j], target t[j] (-1: none);
// row_sum over every class, sum_others without the target column (log_softmax_target_sums).
// Unit stride: w = 1. The generic loops (fp64, bf16, fp16); fp32 takes cpu::softmax_row/tile.
template <bool kUnitStride, typename scalar_t, typename T>
inline void tile_exp_sums(const scalar_t* x, int64_t C, int64_t class_stride, int64_t w, const int32_t* t, T* e,
                          T* row_max, T* row_sum, T* sum_others) {
  if (kUnitStride) {
    T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t c = 0; c < C; ++c) {
      const T v = static_cast<T>(x[c]);
      m = v > m ? v : m;
    }
    T s = 0, so = 0;
    const int64_t tc = t[0];
#pragma omp simd reduction(+ : s, so)
    for (int64_t c = 0; c < C; ++c) {
      const T v = exp_vectorizable(static_cast<T>(x[c]) - m);
      e[c] = v;
      s += v;
      so += c == tc ? T(0) : v;
    }
    row_max[0] = m;
    row_sum[0] = s;
    sum_others[0] = so;
  } else {
    for (int64_t j = 0; j < w; ++j) {
      row_max[j] = -std::numeric_limits<T>::infinity();
      row_sum[j] = 0;
      sum_others[j] = 0;
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + c * class_stride;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const T v = static_cast<T>(xr[j]);
        row_max[j] = v > row_max[j] ? v : row_max[j];
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      const scalar_t* xr = x + c * class_stride;
      T* er = e + c * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) {
        const T v = exp_vectorizable(static_cast<T>(xr[j]) - row_max[j]);
        er[j] = v;
        row_sum[j] += v;
        sum_others[j] += c == t[j] ? T(0) : v;
      }
    }
  }
}

// What a softmax row gives its row function: l = log p_t (exact at every margin:
// log_softmax_target_sums), p_t = e_t / s and 1 - p_t = sum_others / s (exact relative, no
// cancellation, no transcendental call), the row max m and s = sum_c e^{x_c - m}.
template <typename T>
struct SoftmaxRow {
  T log_pt, p_t, one_minus_pt, max, sum, inv_sum;  // inv_sum = 1 / sum
};

// Max, exponentials and sums of a tile (tile_exp_sums; fp32 through the SIMD kernels).
template <bool kUnitStride, typename scalar_t, typename T>
inline void tile_stats(const scalar_t* xt, int64_t C, int64_t class_stride, int64_t w, const int32_t* t, T* e,
                       T* row_max, T* row_sum, T* sum_others) {
  if constexpr (std::is_same<scalar_t, float>::value && std::is_same<T, float>::value) {
    if (kUnitStride) {
      const cpu::SoftmaxRowStats st = cpu::softmax_row(xt, C, t[0], e);
      row_max[0] = st.max;
      row_sum[0] = st.sum;
      sum_others[0] = st.sum_others;
    } else {
      cpu::softmax_tile(xt, C, class_stride, w, t, e, row_max, row_sum, sum_others);
    }
  } else {
    tile_exp_sums<kUnitStride>(xt, C, class_stride, w, t, e, row_max, row_sum, sum_others);
  }
}

// The SoftmaxRow of row j of a tile with target t (>= 0) from tile_stats' values (float:
// log p_t from log_softmax_target_sums, or given: the tile's SIMD batch, cpu::log_softmax_target_rows).
template <typename T>
inline SoftmaxRow<T> softmax_row_values(T x_t, T e_t, T row_max, T row_sum, T sum_others, const T* log_pt = nullptr) {
  SoftmaxRow<T> row;
  if constexpr (std::is_same<T, double>::value) {
    // fp64 keeps the log-sum form of the float64 reference (tests/test_reference.py pins it to the
    // naive autograd form at 1e-6); its rounding (~1e-16 absolute in log p_t) is far below fp32's.
    row.inv_sum = T(1) / row_sum;
    row.log_pt = log_softmax_target(x_t, row_max, log_(row_sum));
    row.p_t = exp_(row.log_pt);
    row.one_minus_pt = one_minus_pt_from_log(row.log_pt);
  } else {
    row.log_pt = log_pt != nullptr ? *log_pt : log_softmax_target_sums(x_t, row_max, row_sum, sum_others);
    row.inv_sum = T(1) / row_sum;  // one division per row (p_t, 1 - p_t and the gradient's coefficient)
    row.p_t = e_t * row.inv_sum;
    row.one_minus_pt = sum_others * row.inv_sum;
  }
  row.max = row_max;
  row.sum = row_sum;
  return row;
}

// Whether row r takes part: target != ignore_index (checked to be a class), and, when given,
// active_rows[r] != 0 and weight[r] != 0 (a zero weight gives exactly 0 loss and gradient, so a
// NaN logit there does not leak).
template <typename T>
inline bool row_active(const int64_t* target, int64_t r, int64_t C, int64_t ignore_index, const uint8_t* active_rows,
                       const T* weight) {
  const int64_t tr = target[r];
  if (tr == ignore_index) return false;
  check_class(tr, C, ignore_index);
  return (active_rows == nullptr || active_rows[r] != 0) && (weight == nullptr || weight[r] != T(0));
}

// Tiles of a softmax pass over (N, C, S): unit stride (S = 1) one row per tile, else tile_width(C)
// consecutive spatial positions of one image; grain = tiles per parallel_for grain.
struct Tile {
  int64_t w;       // rows in this tile
  int64_t row0;    // first row (n * S + s0)
  int64_t offset;  // element offset of (n, class 0, s0)
};

struct TileGrid {
  int64_t width, class_stride, tiles_per_image, tiles, grain, S, C;
  TileGrid(SoftmaxShape sh, bool unit_stride)
      : width(unit_stride ? 1 : tile_width(sh.C)),
        class_stride(unit_stride ? 1 : sh.S),
        tiles_per_image(unit_stride ? 1 : ceil_div(sh.S, width)),
        tiles(sh.N * tiles_per_image),
        grain(std::max<int64_t>(1, kWorkGrain / (sh.C * width))),
        S(sh.S),
        C(sh.C) {}
  Tile tile(int64_t i) const {
    const int64_t n = i / tiles_per_image;
    const int64_t s0 = (i % tiles_per_image) * width;
    return {std::min(width, S - s0), n * S + s0, n * C * S + s0};
  }
};

// t[j] = the target of the tile's row j when row_active, else -1; returns whether any row is.
template <typename T>
inline bool tile_targets(const int64_t* target, const Tile& tl, int64_t C, int64_t ignore_index,
                         const uint8_t* active_rows, const T* weight, int32_t* t) {
  bool any_active = false;
  for (int64_t j = 0; j < tl.w; ++j) {
    const bool active = row_active<T>(target, tl.row0 + j, C, ignore_index, active_rows, weight);
    t[j] = active ? static_cast<int32_t>(target[tl.row0 + j]) : -1;
    any_active |= active;
  }
  return any_active;
}

// One pass over softmax rows: per row the SoftmaxRow, then
//   k = row_fn(row, t, SoftmaxRow) = dLoss/dlog p_t   (row_fn also records the row's loss)
// and, when grad != nullptr, grad_c = k * ([c == t] - p_c) (d log p_t / dx_c) with p_c =
// e^{x_c - m} / s, the target column as k * (1 - p_t).
// Rows with target == ignore_index, or weight[r] == 0 when a weight is given, get no row_fn call
// and a zero gradient row.
// Memory traffic: reads the logits once, writes the gradient once (if asked); the row or tile
// being worked on stays in L1/L2 (scratch of C x tile_width(C) values of T). fp32 runs the SIMD
// kernels of simd_kernels.cpp (AVX-512 / AVX2+FMA / baseline, picked at load).
template <typename scalar_t, typename T, bool kUnitStride, typename G, typename RowFn>
void softmax_rows_pass_impl(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                            const T* weight, G* grad, RowFn&& row_fn) {
  const TileGrid grid(sh, kUnitStride);
  const int64_t C = sh.C, class_stride = grid.class_stride;
  constexpr bool kFloat = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value;
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> e(C * grid.width);
    T row_max[kTile], row_sum[kTile], sum_others[kTile], coef[kTile], target_value[kTile], x_t[kTile], log_pt[kTile];
    int32_t t[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      const scalar_t* xt = x + offset;
      if (!tile_targets<T>(target, tl, C, ignore_index, nullptr, weight, t)) {
        if (grad != nullptr) {
          for (int64_t c = 0; c < C; ++c)
            for (int64_t j = 0; j < w; ++j) grad[offset + c * class_stride + j] = G(0);
        }
        continue;
      }
      tile_stats<kUnitStride>(xt, C, class_stride, w, t, e.data(), row_max, row_sum, sum_others);
      // Tiles of float rows: the w logs in one SIMD batch (a libm logf per row costs as much as
      // the row's 19 exponentials).
      T* lp = nullptr;
      if constexpr (kFloat && !kUnitStride) {
        for (int64_t j = 0; j < w; ++j) x_t[j] = t[j] >= 0 ? xt[t[j] * class_stride + j] : 0.0f;
        cpu::log_softmax_target_rows(x_t, row_max, row_sum, sum_others, w, log_pt);
        lp = log_pt;
      }
      for (int64_t j = 0; j < w; ++j) {
        coef[j] = 0;
        target_value[j] = 0;
        if (t[j] < 0) continue;
        const SoftmaxRow<T> row = softmax_row_values(static_cast<T>(xt[t[j] * class_stride + j]), e[t[j] * w + j],
                                                     row_max[j], row_sum[j], sum_others[j], lp != nullptr ? lp + j : nullptr);
        const T k = row_fn(row0 + j, static_cast<int64_t>(t[j]), row);
        coef[j] = -k * row.inv_sum;
        target_value[j] = k * row.one_minus_pt;
      }
      if (grad == nullptr) continue;
      G* gt = grad + offset;
      if (kUnitStride) {
        const T* er = e.data();
        if constexpr (kFloat && std::is_same<G, float>::value) {
          cpu::scale_to(gt, er, coef[0], C);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gt[c] = static_cast<G>(coef[0] * er[c]);
        }
        gt[t[0]] = static_cast<G>(target_value[0]);
      } else {
        if constexpr (kFloat && std::is_same<G, float>::value) {
          cpu::softmax_grad_tile(gt, C, class_stride, w, t, e.data(), coef, target_value);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            G* gr = gt + c * class_stride;
            const T* er = e.data() + c * w;
            for (int64_t j = 0; j < w; ++j)
              gr[j] = t[j] < 0 ? G(0) : static_cast<G>(c == t[j] ? target_value[j] : coef[j] * er[j]);
          }
        }
      }
    }
  });
}

template <typename scalar_t, typename T, typename G, typename RowFn>
void softmax_rows_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                       const T* weight, G* grad, RowFn&& row_fn) {
  if (sh.S == 1) {
    softmax_rows_pass_impl<scalar_t, T, true>(x, target, sh, ignore_index, weight, grad, row_fn);
  } else {
    softmax_rows_pass_impl<scalar_t, T, false>(x, target, sh, ignore_index, weight, grad, row_fn);
  }
}

// Label-smoothed softmax rows (label_smoothing eps > 0), q_c = (1 - eps) [c == t] + eps / C,
// a_c = alpha_per_class[c] or alpha_scalar:
//   value_r = sum_c q_c a_c F(l_c),  F(l) = (1 - e^l)^gamma (-l),  l_c = log p_c
//   (OHEM and GHM-C: gamma 0 and a_c = 1, the smoothed cross entropy), then
//   k = row_fn(r, t, SoftmaxRow, value_r) (row_fn records the row's loss) and
//   grad_j = k (h_j - p_j H),  h_c = q_c a_c F'(l_c),  H = sum_c h_c
// with the target column as k (h_t (1 - p_t) - p_t (H - h_t)) (1 - p_t exact from the sums; no
// cancellation for a confident row). l_t and 1 - p_t of the target are SoftmaxRow's (exact at
// every margin); for c != t, l_c = (x_c - m) - log s and 1 - p_c = 1 - e_c / s (p_c <= 1/2 unless c
// is the row max; then the target's own term dominates the row). Rows are active as in
// row_active (active_rows: OHEM's kept rows); the others get no row_fn call and a zero gradient.
// One pass per element with a transcendental call or two (pow for a gamma outside {0, 0.5, 1, 2,
// 3}): reads the logits once, writes the gradient once, no N x C intermediate (the per-class h of
// a tile stays in a scratch buffer next to the exponentials).
template <typename scalar_t, typename T, bool kUnitStride, typename G, typename RowFn>
void softmax_smooth_pass_impl(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                              const uint8_t* active_rows, const T* weight, T eps, T gamma,
                              const T* alpha_per_class, T alpha_scalar, G* grad, RowFn&& row_fn,
                              T poly_epsilon = T(0)) {
  const TileGrid grid(sh, kUnitStride);
  const int64_t C = sh.C, class_stride = grid.class_stride;
  const T q_off = eps / static_cast<T>(C), q_on = (T(1) - eps) + eps / static_cast<T>(C);
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    std::vector<T> e(C * grid.width), h(C * grid.width);
    T row_max[kTile], row_sum[kTile], sum_others[kTile], k[kTile], h_t[kTile], h_others[kTile], p_t[kTile],
        omp_t[kTile];
    int32_t t[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      const scalar_t* xt = x + offset;
      if (tile_targets<T>(target, tl, C, ignore_index, active_rows, weight, t)) tile_stats<kUnitStride>(xt, C, class_stride, w, t, e.data(), row_max, row_sum, sum_others);
      for (int64_t j = 0; j < w; ++j) {
        if (t[j] < 0) continue;
        const int64_t tc = t[j];
        const SoftmaxRow<T> row = softmax_row_values(static_cast<T>(xt[tc * class_stride + j]), e[tc * w + j],
                                                     row_max[j], row_sum[j], sum_others[j]);
        const T log_s = log_(row_sum[j]);
        T value = 0, ho = 0;
        for (int64_t c = 0; c < C; ++c) {
          const T a = alpha_per_class != nullptr ? alpha_per_class[c] : alpha_scalar;
          if (c == tc) {
            const FocalTerm<T> ft = focal_term_parts(row.log_pt, row.p_t, row.one_minus_pt, gamma);
            value += q_on * a * ft.value;
            h_t[j] = q_on * a * ft.dvalue_dlogpt;
          } else {
            const T p = e[c * w + j] / row_sum[j];
            const T l = (static_cast<T>(xt[c * class_stride + j]) - row_max[j]) - log_s;
            const FocalTerm<T> ft = focal_term_parts(l, p, T(1) - p, gamma);
            value += q_off * a * ft.value;
            const T hc = q_off * a * ft.dvalue_dlogpt;
            h[c * w + j] = hc;
            ho += hc;
          }
        }
        if (poly_epsilon != T(0)) {
          // Poly-1 (#24): epsilon (1 - P)^(gamma + 1), P = sum_c q_c p_c = q_off + (1 - eps) p_t, so
          // 1 - P = (1 - eps)(1 - p_t) + (eps - q_off) (no cancellation) and dP/dl_t = (1 - eps) p_t:
          // a function of log p_t alone, whose derivative joins h_t (not scaled by alpha).
          const T u = (T(1) - eps) * row.one_minus_pt + (eps - q_off);
          const FocalTerm<T> pt = poly1_term_parts((T(1) - eps) * row.p_t, u, gamma, poly_epsilon);
          value += pt.value;
          h_t[j] += pt.dvalue_dlogpt;
        }
        h_others[j] = ho;
        p_t[j] = row.p_t;
        omp_t[j] = row.one_minus_pt;
        k[j] = row_fn(row0 + j, tc, row, value);
      }
      if (grad == nullptr) continue;
      G* gt = grad + offset;
      for (int64_t c = 0; c < C; ++c) {
        G* gr = gt + c * class_stride;
        const T* er = e.data() + c * w;
        const T* hr = h.data() + c * w;
        for (int64_t j = 0; j < w; ++j) {
          T v = T(0);
          if (t[j] >= 0) {
            v = c == t[j] ? k[j] * (h_t[j] * omp_t[j] - p_t[j] * h_others[j])
                          : k[j] * (hr[j] - (er[j] / row_sum[j]) * (h_t[j] + h_others[j]));
          }
          gr[j] = static_cast<G>(v);
        }
      }
    }
  });
}

template <typename scalar_t, typename T, typename G, typename RowFn>
void softmax_smooth_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                         const uint8_t* active_rows, const T* weight, T eps, T gamma, const T* alpha_per_class,
                         T alpha_scalar, G* grad, RowFn&& row_fn, T poly_epsilon = T(0)) {
  if (sh.S == 1) {
    softmax_smooth_pass_impl<scalar_t, T, true>(x, target, sh, ignore_index, active_rows, weight, eps, gamma,
                                                alpha_per_class, alpha_scalar, grad, row_fn, poly_epsilon);
  } else {
    softmax_smooth_pass_impl<scalar_t, T, false>(x, target, sh, ignore_index, active_rows, weight, eps, gamma,
                                                 alpha_per_class, alpha_scalar, grad, row_fn, poly_epsilon);
  }
}

// Per-row statistics of a stats pass (two-pass losses): log p_t, the max m and s = sum_c
// e^{x_c - m}, so that the gradient pass computes p_c = e^{x_c - m} / s exactly (not
// exp(x_c - lse) with the log-sum-exp rounded to the math type: 1e-5 relative error at logits
// of +1000 in float32).
template <typename T>
struct RowStats {
  std::vector<T> log_pt, p_t, one_minus_pt, max, sum;
};

// Gradient pass of the two-pass losses (OHEM, GHM-C softmax fp64): from a stats pass's per-row
// max, sum and 1 - p_t, grad_c = k_r * ([c == t] - e^{x_c - m_r} / s_r) for active rows (active[r] != 0, or
// target != ignore_index when active == nullptr), 0 elsewhere.
// Memory traffic: reads the logits once, writes the gradient once.
template <typename scalar_t, typename T, typename G>
void softmax_grad_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index,
                       const T* row_max, const T* row_sum, const T* one_minus_pt, const T* k,
                       const uint8_t* active_rows, G* grad) {
  const int64_t C = sh.C, S = sh.S;
  const bool unit = S == 1;
  const TileGrid grid(sh, unit);
  constexpr bool kFloat = std::is_same<scalar_t, float>::value && std::is_same<T, float>::value &&
                          std::is_same<G, float>::value;
  parallel_for_balanced(0, grid.tiles, grid.grain, [&](int64_t begin, int64_t end) {
    int32_t t[kTile];
    T coef[kTile], target_value[kTile], mx[kTile];
    for (int64_t tile = begin; tile < end; ++tile) {
      const Tile tl = grid.tile(tile);
      const int64_t w = tl.w, row0 = tl.row0, offset = tl.offset;
      for (int64_t j = 0; j < w; ++j) {
        const int64_t r = row0 + j;
        const bool active = active_rows != nullptr ? active_rows[r] != 0 : target[r] != ignore_index;
        t[j] = active ? static_cast<int32_t>(target[r]) : -1;
        coef[j] = active ? -k[r] / row_sum[r] : T(0);
        target_value[j] = active ? k[r] * one_minus_pt[r] : T(0);
        mx[j] = row_max[r];
      }
      const scalar_t* xt = x + offset;
      G* gt = grad + offset;
      if (unit) {
        if (t[0] < 0) {
          for (int64_t c = 0; c < C; ++c) gt[c] = G(0);
          continue;
        }
        if constexpr (kFloat) {
          cpu::scaled_exp_to(gt, xt, mx[0], coef[0], C);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) gt[c] = static_cast<G>(coef[0] * exp_vectorizable(static_cast<T>(xt[c]) - mx[0]));
        }
        gt[t[0]] = static_cast<G>(target_value[0]);
      } else if constexpr (kFloat) {
        cpu::softmax_grad_tile_exp(gt, xt, C, S, w, t, mx, coef, target_value);
      } else {
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* xr = xt + c * S;
          G* gr = gt + c * S;
          for (int64_t j = 0; j < w; ++j) {
            const T v = c == t[j] ? target_value[j] : coef[j] * exp_vectorizable(static_cast<T>(xr[j]) - mx[j]);
            gr[j] = t[j] < 0 ? G(0) : static_cast<G>(v);
          }
        }
      }
    }
  });
}

// Stats pass: per-row log p_t, max and exponential sum in math type T (0 for ignored rows).
// Reads the logits once.
template <typename scalar_t, typename T>
RowStats<T> softmax_stats_pass(const scalar_t* x, const int64_t* target, SoftmaxShape sh, int64_t ignore_index) {
  RowStats<T> st;
  st.log_pt.assign(sh.rows(), T(0));
  st.p_t.assign(sh.rows(), T(0));
  st.one_minus_pt.assign(sh.rows(), T(0));
  st.max.assign(sh.rows(), T(0));
  st.sum.assign(sh.rows(), T(1));
  softmax_rows_pass<scalar_t, T>(x, target, sh, ignore_index, static_cast<const T*>(nullptr), static_cast<T*>(nullptr),
                                 [&](int64_t r, int64_t, const SoftmaxRow<T>& row) {
                                   st.log_pt[r] = row.log_pt;
                                   st.p_t[r] = row.p_t;
                                   st.one_minus_pt[r] = row.one_minus_pt;
                                   st.max[r] = row.max;
                                   st.sum[r] = row.sum;
                                   return T(0);
                                 });
  return st;
}

}  // namespace cpu_impl
}  // namespace fused_losses
