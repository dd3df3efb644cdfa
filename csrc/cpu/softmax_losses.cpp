// Softmax-family losses on the CPU: softmax focal, OHEM, influence-balanced (IB); the rows
// machinery is csrc/cpu/softmax.h.

#include "cpu/ops_cpu.h"
#include "cpu/softmax.h"

namespace fused_losses {
namespace cpu_impl __attribute__((visibility("hidden"))) {

namespace {

// ------------------------------------------------------------------------------------------
// OHEM: stats pass (log p_t, max, sum per row) -> selection on the N-sized CE array (top-k by
// sort rank with ties to the lower index, or the mmseg probability threshold) -> gradient
// pass for kept rows, grad_c = scale * (p_c - [c == t]). Reads the logits twice.
// The selection is a radix select (11-bit digits, per-chunk histograms in parallel, merged in
// chunk order) of the k-th key instead of a sort: O(rows) work, exact, and independent of the
// thread count.
// ------------------------------------------------------------------------------------------
// Unsigned key with the order of the float (-0 and +0 get one key: they compare equal).
inline uint32_t order_key(float v) {
  v = v + 0.0f;
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double v) {
  v = v + 0.0;
  uint64_t u;
  std::memcpy(&u, &v, sizeof(u));
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}
template <typename K, typename T>
T from_order_key(K key) {
  constexpr K kSign = K(1) << (sizeof(K) * 8 - 1);
  const K u = (key & kSign) ? (key & ~kSign) : ~key;
  T v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// The key of rank `rank` (0-based) in ascending order of keys[0..n): radix select, 11-bit digits
// from the top, one chunked histogram of the keys that match the digits chosen so far per digit.
template <typename K>
K kth_smallest_key(const std::vector<K>& keys, int64_t rank) {
  constexpr int kDigitBits = 11;
  const int64_t n = static_cast<int64_t>(keys.size());
  K prefix = 0, prefix_mask = 0;
  int shift = static_cast<int>(sizeof(K) * 8);
  while (shift > 0) {
    const int bits = std::min(kDigitBits, shift);
    shift -= bits;
    const int64_t bins = int64_t(1) << bits;
    const std::vector<int64_t> counts = chunked_histogram(n, bins, [&](int64_t i) {
      const K key = keys[i];
      return (key & prefix_mask) == prefix ? static_cast<int64_t>((key >> shift) & K(bins - 1)) : int64_t(-1);
    });
    int64_t digit = 0;
    for (; digit < bins && rank >= counts[digit]; ++digit) rank -= counts[digit];
    TORCH_INTERNAL_ASSERT(digit < bins, "kth_smallest_key: rank out of range");
    prefix |= K(digit) << shift;
    prefix_mask |= K(bins - 1) << shift;
  }
  return prefix;
}

template <typename T>
std::vector<uint8_t> ohem_select(const RowStats<T>& st, const int64_t* tgt, int64_t rows, int64_t ignore_index,
                                 double keep_fraction, int64_t keep_count, c10::optional<double> thresh,
                                 int64_t min_kept_total) {
  using K = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  constexpr K kMaxKey = ~K(0);
  std::vector<uint8_t> kept(rows, 0);
  const int64_t n_valid = count_valid(tgt, rows, ignore_index);
  if (n_valid == 0) return kept;
  std::vector<K> keys(rows);
  if (!thresh.has_value()) {
    const int64_t k = keep_count > 0 ? std::min(keep_count, n_valid)
                                     : std::max<int64_t>(1, static_cast<int64_t>(std::floor(keep_fraction * static_cast<double>(n_valid))));
    if (k >= n_valid) {
      for (int64_t r = 0; r < rows; ++r) kept[r] = tgt[r] != ignore_index;
      return kept;
    }
    // Descending CE = ascending log p_t; NaN ranks first (torch.sort puts NaN above +inf), key
    // 0; ignored rows rank last (kMaxKey: no valid key reaches it). Equal keys keep the lower
    // index first (stable sort): the kept rows are those below the k-th key and the first ones,
    // in index order, of those equal to it.
    at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T v = st.log_pt[r];
        keys[r] = tgt[r] == ignore_index ? kMaxKey : isnan_(v) ? K(0) : order_key(v);
      }
    });
    const K kth = kth_smallest_key(keys, k - 1);
    int64_t below = 0;
    for (int64_t r = 0; r < rows; ++r) below += keys[r] < kth;
    int64_t equal_wanted = k - below;
    for (int64_t r = 0; r < rows; ++r) {
      const K key = keys[r];
      if (key < kth || (key == kth && equal_wanted-- > 0)) kept[r] = 1;
    }
    return kept;
  }
  // mmseg: threshold = max(thresh, sorted_p[min(min_kept_total, n_valid - 1)]), p ascending
  // with NaN last (as ignored rows: kMaxKey; the rank is < n_valid, so a rank among the valid
  // rows or a NaN); keep p_t < threshold. p_t = e_t / s from the stats pass.
  const std::vector<T>& p = st.p_t;
  at::parallel_for(0, rows, kWorkGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) keys[r] = tgt[r] == ignore_index || isnan_(p[r]) ? kMaxKey : order_key(p[r]);
  });
  const int64_t idx = std::max<int64_t>(0, std::min(n_valid - 1, min_kept_total));
  const K key = kth_smallest_key(keys, idx);
  const T at_idx = key == kMaxKey ? std::numeric_limits<T>::quiet_NaN() : from_order_key<K, T>(key);
  const T th = static_cast<T>(*thresh);
  const T threshold = isnan_(at_idx) ? at_idx : (at_idx > th ? at_idx : th);
  for (int64_t r = 0; r < rows; ++r) kept[r] = tgt[r] != ignore_index && p[r] < threshold;
  return kept;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Softmax focal
//   loss_r = alpha_t * (1 - p_t)^gamma * (-log p_t),  grad_c = scale * alpha_t * dL/dl * ([c == t] - p_c)
// (from_logits=False: l = log x_t and the gradient is scale * alpha_t * dL/dl / x_t on the
// target column only). One pass: reads the logits once, writes loss rows and the gradient once.
// weight w_r: loss and k multiplied by it (w_r == 0: an inactive row, 0 loss and gradient; the
// 'mean' count is unchanged). label_smoothing > 0: softmax_smooth_pass (per-class terms).
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor> softmax_focal_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                           const c10::optional<at::Tensor>& alpha_per_class_in,
                                                           double alpha, double gamma, int64_t ignore_index,
                                                           c10::string_view reduction_name, bool from_logits,
                                                           bool compute_grad, const c10::optional<at::Tensor>& weight,
                                                           double label_smoothing, double epsilon) {
  const Reduction reduction = parse_reduction(reduction_name);
  check_label_smoothing(label_smoothing);
  TORCH_CHECK(label_smoothing == 0.0 || from_logits, "label_smoothing: needs from_logits=True");
  TORCH_CHECK(std::isfinite(epsilon), "epsilon: expected a finite number, got ", epsilon);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  const int64_t n_valid = count_valid(tgt, sh.rows(), ignore_index);
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "softmax_focal_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    at::Tensor alpha_vec;
    const T* alpha_ptr = nullptr;
    if (alpha_per_class_in.has_value()) {
      alpha_vec = alpha_per_class_in->to(c10::CppTypeToScalarType<T>::value).contiguous();
      TORCH_CHECK(alpha_vec.numel() == sh.C, "alpha: expected ", sh.C, " values, got ", alpha_vec.numel());
      alpha_ptr = alpha_vec.data_ptr<T>();
    }
    const T alpha_t_scalar = static_cast<T>(alpha), gamma_t = static_cast<T>(gamma);
    // Poly-1 (#24): epsilon (1 - p_t)^(gamma + 1) added after the focal term (poly1_term_parts);
    // epsilon == 0 takes exactly the plain loss's code.
    const T eps_poly = static_cast<T>(epsilon);
    const bool poly = epsilon != 0.0;
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_valid, 1)) : T(1);
    const T* wp = weight_ptr<T>(weight_t);
    std::vector<T> row_loss(sh.rows(), T(0));
    const scalar_t* x = logits.data_ptr<scalar_t>();
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
    using G = std::remove_pointer_t<decltype(g)>;
    if (from_logits && label_smoothing > 0.0) {
      softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, nullptr, wp, static_cast<T>(label_smoothing), gamma_t,
                                       alpha_ptr, alpha_t_scalar, g,
                                       [&](int64_t r, int64_t, const SoftmaxRow<T>&, T value) {
                                         const T wr = wp != nullptr ? wp[r] : T(1);
                                         row_loss[r] = wr * value;
                                         return scale * wr;
                                       }, eps_poly);
    } else if (from_logits && poly) {
      softmax_rows_pass<scalar_t, T>(x, tgt, sh, ignore_index, wp, g, [&](int64_t r, int64_t t, const SoftmaxRow<T>& row) {
        const T a = class_alpha(alpha_ptr, alpha_t_scalar, t);
        const T wr = wp != nullptr ? wp[r] : T(1);
        const FocalTerm<T> ft = focal_term_parts(row.log_pt, row.p_t, row.one_minus_pt, gamma_t);
        const FocalTerm<T> pt = poly1_term_parts(row.p_t, row.one_minus_pt, gamma_t, eps_poly);
        row_loss[r] = wr * (a * ft.value + pt.value);
        return (scale * wr) * (a * ft.dvalue_dlogpt + pt.dvalue_dlogpt);
      });
    } else if (from_logits) {
      // wr == 1 without a weight: the products below are then exactly today's.
      softmax_rows_pass<scalar_t, T>(x, tgt, sh, ignore_index, wp, g, [&](int64_t r, int64_t t, const SoftmaxRow<T>& row) {
        const T a = class_alpha(alpha_ptr, alpha_t_scalar, t);
        const T wr = wp != nullptr ? wp[r] : T(1);
        const FocalTerm<T> ft = focal_term_parts(row.log_pt, row.p_t, row.one_minus_pt, gamma_t);
        row_loss[r] = wr * (a * ft.value);
        return (scale * wr) * a * ft.dvalue_dlogpt;
      });
    } else {
      // Probabilities: only x_t is read per row; the gradient row is zero but for x_t.
      const int64_t C = sh.C, S = sh.S;
      parallel_for_balanced(0, sh.rows(), std::max<int64_t>(1, kWorkGrain / C), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t n = r / S, s = r % S;
          const int64_t t = tgt[r];
          const int64_t base = n * C * S + s;
          if (g != nullptr)
            for (int64_t c = 0; c < C; ++c) g[base + c * S] = G(0);
          if (!row_active<T>(tgt, r, C, ignore_index, nullptr, wp)) continue;
          const T p_t = static_cast<T>(x[base + t * S]);
          const T a = class_alpha(alpha_ptr, alpha_t_scalar, t);
          const T wr = wp != nullptr ? wp[r] : T(1);
          const FocalTerm<T> ft = focal_term(log_(p_t), gamma_t);
          if (poly) {
            // d/dx_t of epsilon (1 - x_t)^(gamma + 1) = poly's dvalue/dlog p_t / p_t
            const FocalTerm<T> pt = poly1_term_parts(p_t, T(1) - p_t, gamma_t, eps_poly);
            row_loss[r] = wr * (a * ft.value + pt.value);
            if (g != nullptr)
              g[base + t * S] = static_cast<G>((scale * wr) * (a * ft.dvalue_dlogpt + pt.dvalue_dlogpt) / p_t);
            continue;
          }
          row_loss[r] = wr * (a * ft.value);
          if (g != nullptr) g[base + t * S] = static_cast<G>((scale * wr) * a * ft.dvalue_dlogpt / p_t);
        }
      });
    }
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_valid), reduction);
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> ohem_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                  double keep_fraction, int64_t keep_count,
                                                  c10::optional<double> thresh, int64_t min_kept_total,
                                                  int64_t ignore_index, c10::string_view reduction_name,
                                                  bool compute_grad, const c10::optional<at::Tensor>& weight, double label_smoothing) {
  const Reduction reduction = parse_reduction(reduction_name);
  check_label_smoothing(label_smoothing);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.rows(), "target: expected ", sh.rows(), " class indices, got ", target.numel());
  const at::Tensor weight_t = extra_weight(weight, at::toOpMathType(logits.scalar_type()), {sh.rows()});
  const int64_t* tgt = target.data_ptr<int64_t>();
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ohem_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const RowStats<T> st = softmax_stats_pass<scalar_t, T>(x, tgt, sh, ignore_index);
    const std::vector<uint8_t> kept =
        ohem_select(st, tgt, sh.rows(), ignore_index, keep_fraction, keep_count, thresh, min_kept_total);
    const int64_t n_kept = at::parallel_reduce(
        0, sh.rows(), kWorkGrain, int64_t(0),
        [&](int64_t begin, int64_t end, int64_t acc) {
          for (int64_t r = begin; r < end; ++r) acc += kept[r];
          return acc;
        },
        [](int64_t a, int64_t b) { return a + b; });
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(n_kept, 1)) : T(1);
    const T* wp = weight_ptr<T>(weight_t);
    std::vector<T> row_loss(sh.rows(), T(0));
    if (label_smoothing > 0.0) {
      // Kept rows' loss w * smoothed CE, from a second pass over the kept rows (loss and gradient).
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        softmax_smooth_pass<scalar_t, T>(x, tgt, sh, ignore_index, kept.data(), wp, static_cast<T>(label_smoothing),
                                         T(0), nullptr, T(1), g,
                                         [&](int64_t r, int64_t, const SoftmaxRow<T>&, T value) {
                                           const T wr = wp != nullptr ? wp[r] : T(1);
                                           row_loss[r] = wr * value;
                                           return scale * wr;
                                         });
      });
    } else {
      // Kept rows with a zero weight: 0 loss and gradient (inactive in the gradient pass).
      std::vector<uint8_t> active;
      if (wp != nullptr) active.assign(sh.rows(), 0);
      std::vector<T> k(sh.rows());
      parallel_for_balanced(0, sh.rows(), kWorkGrain, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const bool on = kept[r] && (wp == nullptr || wp[r] != T(0));
          const T wr = wp != nullptr ? wp[r] : T(1);
          row_loss[r] = on ? wr * -st.log_pt[r] : T(0);
          k[r] = on ? -scale * wr : T(0);  // d(-log p_t)/dl = -1
          if (wp != nullptr) active[r] = on;
        }
      });
      with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
        if (g != nullptr)
          softmax_grad_pass<scalar_t, T>(x, tgt, sh, ignore_index, st.max.data(), st.sum.data(), st.one_minus_pt.data(), k.data(), wp != nullptr ? active.data() : kept.data(), g);
      });
    }
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(n_kept), reduction);
  });
  return {loss, grad};
}

// ------------------------------------------------------------------------------------------
// Influence-balanced loss on (N, C): one softmax pass, per row ib_row (losses_math.h) gives the
// loss, dloss/dlog p_t (-> grad_c = scale * dloss/dl * ([c == t] - p_c)) and dloss/df.
// 'mean' divides by N. Reads the logits once, writes the gradients once.
// ------------------------------------------------------------------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor> ib_forward_cpu(const at::Tensor& logits_in, const at::Tensor& target_in,
                                                          const at::Tensor& feature_norm_in,
                                                          const c10::optional<at::Tensor>& class_weight_in,
                                                          double alpha, double epsilon, double gamma,
                                                          bool detach_factor, c10::string_view reduction_name,
                                                          bool compute_grad) {
  const Reduction reduction = parse_reduction(reduction_name);
  TORCH_CHECK(logits_in.dim() == 2, "logits: ib takes (N, C) logits, got ", logits_in.sizes());
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor target = index_target(target_in);
  const SoftmaxShape sh = softmax_shape(logits);
  TORCH_CHECK(target.numel() == sh.N && feature_norm_in.numel() == sh.N,
              "target, feature_norm: expected ", sh.N, " values each");
  const int64_t* tgt = target.data_ptr<int64_t>();
  at::Tensor grad = grad_buffer(logits, compute_grad, reduction);
  at::Tensor grad_feature, loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ib_forward", [&] {
    using T = at::opmath_type<scalar_t>;
    const at::ScalarType math = c10::CppTypeToScalarType<T>::value;
    const at::Tensor f = feature_norm_in.to(math).contiguous().reshape({-1});
    grad_feature = compute_grad ? at::empty({sh.N}, logits.options().dtype(math)) : at::empty({0}, logits.options().dtype(math));
    at::Tensor cw;
    const T* cw_ptr = nullptr;
    if (class_weight_in.has_value()) {
      cw = class_weight_in->to(math).contiguous();
      TORCH_CHECK(cw.numel() == sh.C, "weight: expected ", sh.C, " values, got ", cw.numel());
      cw_ptr = cw.data_ptr<T>();
    }
    const T* fp = f.data_ptr<T>();
    T* gf = compute_grad ? grad_feature.data_ptr<T>() : nullptr;
    const T a = static_cast<T>(alpha), eps = static_cast<T>(epsilon), gm = static_cast<T>(gamma);
    const T scale = reduction == Reduction::Mean ? T(1) / static_cast<T>(std::max<int64_t>(sh.N, 1)) : T(1);
    std::vector<T> row_loss(sh.rows(), T(0));
    // No ignore_index in IB: a sentinel no class index can equal.
    const int64_t no_ignore = std::numeric_limits<int64_t>::min();
    with_grad_ptr<scalar_t, T>(grad, compute_grad, [&](auto* g) {
      softmax_rows_pass<scalar_t, T>(logits.data_ptr<scalar_t>(), tgt, sh, no_ignore, static_cast<const T*>(nullptr), g,
                                     [&](int64_t r, int64_t t, const SoftmaxRow<T>& softmax_row) {
                                       const T log_pt = softmax_row.log_pt;
                                       const T w = cw_ptr != nullptr ? cw_ptr[t] : T(1);
                                       const IBRow<T> row = ib_row(log_pt, w, fp[r], a, eps, gm, detach_factor);
                                       row_loss[r] = row.loss;
                                       if (gf != nullptr) gf[r] = scale * row.dloss_dfeature;
                                       return scale * row.dloss_dlogpt;
                                     });
    });
    loss = finish_loss<scalar_t>(logits, row_loss, target_in.sizes(), static_cast<double>(sh.N), reduction);
  });
  return {loss, grad, grad_feature};
}

}  // namespace cpu_impl
}  // namespace fused_losses
