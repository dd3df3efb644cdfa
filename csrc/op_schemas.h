// The operator schemas of the fused_losses library, in one place: csrc/ops.cpp defines them in
// the `fused_losses` namespace (TORCH_LIBRARY) for every user build; the emulated CUDA build of
// the tests (tests/cuda_emu) defines the same schemas in its own `fused_losses_emu` namespace.
// Each backend file only adds a TORCH_LIBRARY_IMPL for its dispatch key.
#pragma once

#include <torch/library.h>

namespace fused_losses {

inline void define_op_schemas(torch::Library& m) {
  // A trivial elementwise op (2 * x + 1, float32) implemented by the CPU and the CUDA
  // kernel files: proves that compiling, linking and dispatcher registration work end to end.
  m.def("build_probe(Tensor x) -> Tensor");

  // Loss kernels. Each *_forward op computes the loss and, when compute_grad, the gradient of
  // the reduced loss w.r.t. its differentiable inputs in the same pass (for grad_output = 1;
  // 'mean' already divides by its count). compute_grad=False returns empty (0,) gradients.
  // reduction: 'none' | 'mean' | 'sum'. Loss dtype: logits dtype for 'none', else
  // promote_types(logits dtype, float32). Semantics: fused_losses/reference.py.
  //
  // dtype of grad_logits (the "saved gradient dtype", fused_losses/_ops.py saved_grad_dtype):
  //   'mean' / 'sum' with bf16, fp32 or fp64 logits: the logits dtype. The autograd formula
  //     returns this very tensor as the logits' gradient after scale_grad_ (in place; free when
  //     grad_output == 1), so forward + backward write the gradient once, in the logits dtype.
  //   'none', or fp16 logits: the math dtype (float32; float64 for fp64), and the backward is the
  //     out-of-place scale_grad, which rounds saved * grad_output once. fp16 stays float32
  //     because a GradScaler's grad_output (2^16 and up) must multiply the float32 gradient:
  //     rounded to fp16 first, a 'mean' gradient of a large batch underflows to zero.
  // grad_feature_norm (IB) is always in the math dtype (it is (N,)-sized).
  //
  // Drop-in extras (README "Sample weights, avg_factor, label smoothing"), trailing arguments
  // with defaults so that a call without them is the plain loss:
  //   weight: None, or a contiguous tensor in the math dtype: softmax family (N, d...) flattened
  //     (one value per row, the target's numel); sigmoid family one value per row
  //     (logits.numel() / C values) or per element (logits.numel() values). loss and gradient
  //     are multiplied by it; a zero weight gives exactly 0 loss and 0 gradient (a NaN logit
  //     there does not leak). 'mean' denominators are unchanged, except GHM-C, where a zero
  //     weight marks the entry invalid (excluded from the histogram and n_valid, as mmdet's
  //     label_weight).
  //   label_smoothing eps in [0, 1]: q_c = (1 - eps) [c == t] + eps / C; softmax focal loss =
  //     sum_c q_c a_c (1 - p_c)^gamma (-log p_c) (a_c: alpha_per_class[c], or the scalar alpha);
  //     OHEM and GHM-C (softmax): the smoothed cross entropy (gamma 0, a_c 1); their selection
  //     and bins use the unsmoothed CE / p_t. Only with from_logits.
  //   alpha_per_class (sigmoid): (C,) in the math dtype; alpha_t = a_c y + (1 - a_c)(1 - y);
  //     replaces the scalar alpha.
  //   epsilon (Poly-1, #24; softmax and sigmoid focal): adds epsilon (1 - p_t)^(gamma + 1) per
  //     sample / element, not scaled by alpha, scaled by the weight (reference.focal_poly1,
  //     sigmoid_focal_poly1; with label smoothing 1 - p_t = 1 - sum_c q_c p_c). 0: the plain loss.
  // Softmax focal over (N, C) or channel-second (N, C, d...) logits; target (N, d...) int64/int32.
  // alpha_per_class (C,) in the math dtype when given, else the scalar alpha (1.0 = no alpha).
  m.def(
      "softmax_focal_forward(Tensor logits, Tensor target, Tensor? alpha_per_class, float alpha, "
      "float gamma, int ignore_index, str reduction, bool from_logits, bool compute_grad, Tensor? weight=None, "
      "float label_smoothing=0.0, float epsilon=0.0) -> (Tensor loss, Tensor grad_logits)");
  // Sigmoid focal over (..., C) logits; target float of the logits' shape, or integer labels of
  // shape logits.shape[:-1] (label == C: background, label == ignore_index: ignored row).
  m.def(
      "sigmoid_focal_forward(Tensor logits, Tensor target, float alpha, float gamma, int ignore_index, "
      "str reduction, bool compute_grad, Tensor? alpha_per_class=None, Tensor? weight=None, float epsilon=0.0) "
      "-> (Tensor loss, Tensor grad_logits)");
  // OHEM over per-sample cross entropy. keep_count > 0: keep min(keep_count, n_valid) hardest;
  // else keep max(1, floor(keep_fraction * n_valid)). thresh given: mmseg mode with
  // min_kept_total (= min_kept x images), keep_* ignored.
  m.def(
      "ohem_forward(Tensor logits, Tensor target, float keep_fraction, int keep_count, float? thresh, "
      "int min_kept_total, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None, "
      "float label_smoothing=0.0) -> (Tensor loss, Tensor grad_logits)");
  // GHM-C, step 1 (no gradient): histogram of g over the valid entries, EMA update of `state`
  // in place when given (float32 (bins,)), and the per-bin weights
  // n_valid / divisor[b] / n_nonempty (0 for empty bins) in the math dtype.
  m.def(
      "ghmc_bin_weights(Tensor logits, Tensor target, Tensor(a!)? state, int bins, float momentum, "
      "bool use_sigmoid, int ignore_index, Tensor? weight=None) -> Tensor");
  // GHM-C histogram only (for a histogram all-reduced across ranks before the weights):
  // int64 (bins + 1,): the count of valid entries in each bin, then n_valid.
  m.def(
      "ghmc_bin_counts(Tensor logits, Tensor target, int bins, bool use_sigmoid, int ignore_index, "
      "Tensor? weight=None) -> Tensor");
  // GHM-C, step 2: loss = bin_weights[bin(g)] * CE per element (sigmoid) or row (softmax).
  m.def(
      "ghmc_forward(Tensor logits, Tensor target, Tensor bin_weights, bool use_sigmoid, int ignore_index, "
      "str reduction, bool compute_grad, Tensor? weight=None, float label_smoothing=0.0) "
      "-> (Tensor loss, Tensor grad_logits)");
  // Influence-balanced loss on (N, C) logits; feature_norm (N,) in the math dtype (the caller
  // reduces (N, D) features); class_weight (C,) or None.
  m.def(
      "ib_forward(Tensor logits, Tensor target, Tensor feature_norm, Tensor? class_weight, float alpha, "
      "float epsilon, float gamma, bool detach_factor, str reduction, bool compute_grad) "
      "-> (Tensor loss, Tensor grad_logits, Tensor grad_feature_norm)");
  // Backward of every *_forward op: a fresh tensor saved_grad * grad_output of `dtype` (the
  // input's dtype; saved_grad is in its math dtype, so the product is rounded once),
  // grad_output being a scalar (mean/sum), of saved_grad's shape (elementwise 'none'), or of
  // saved_grad's shape without dim 1 (softmax 'none': broadcast over the class dim).
  m.def("scale_grad(Tensor saved_grad, Tensor grad_output, ScalarType dtype) -> Tensor");
  // Backward of a reduced ('mean' / 'sum') loss whose gradient is saved in the logits dtype:
  // `grad` holds saved * applied_scale; afterwards it holds saved * grad_output, and
  // applied_scale = grad_output. Both scalars are 0-dim tensors in the math dtype, read by the
  // kernel on the device (no host sync). grad_output == applied_scale (the common
  // loss.backward(): both 1): nothing is read or written beyond the two scalars. Otherwise one
  // pass grad *= grad_output / applied_scale (a retained graph's second backward rescales from
  // what the first one applied, so nothing is ever scaled twice). The version counters are
  // not bumped: `grad` is a saved tensor of the forward op, mutated only by this op, and
  // applied_scale records what was done to it.
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output, Tensor(b!) applied_scale) -> ()");

  // ---- quality_focal / varifocal / asymmetric (#24) ----
  // The sigmoid-type detector losses over (..., C) logits, one op for the three (one element
  // function each, csrc/detector_sigmoid_math.h): loss = 'quality_focal' (p0 = beta; flags 1:
  // activated), 'varifocal' (p0 = alpha, p1 = gamma; flags 2: iou_weighted, 4:
  // detach_modulation) or 'asymmetric' (p0 = gamma_pos, p1 = gamma_neg, p2 = clip, p3 = eps;
  // flags 8: detach_focusing). target: a float target of the logits' shape, or integer labels
  // of shape logits.shape[:-1] (C = background, ignore_index: ignored row) with `score` (the
  // quality at the label's class, shape logits.shape[:-1]; QFL and VFL only). 'none': per row
  // for quality_focal (logits.shape[:-1]), elementwise otherwise; 'mean' over rows (QFL) or
  // elements (VFL, ASL), ignored rows not counted. weight per row or per element.
  m.def(
      "detector_sigmoid_forward(Tensor logits, Tensor target, Tensor? score, str loss, float p0, float p1, "
      "float p2, float p3, int flags, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None) "
      "-> (Tensor loss, Tensor grad_logits)");
  // ---- seesaw / eqlv2 (#25) ----
  // Seesaw loss (fused_losses/reference.py seesaw; docs/losses/longtail.md) on (N, C) logits, or
  // (N, C + 2) with objectness (the last two columns an objectness pair, label C = background).
  // cum_samples: float32 (C,) or (C + 1,), ALREADY updated with this batch's counts (mmdet's
  // order: the caller adds the counts first); read only here. split=False: loss = classes +
  // objectness (per row for 'none'), loss_objectness is an empty (0,) tensor; split=True: loss is
  // the classes loss and loss_objectness the objectness loss (the backward scales the class
  // columns and the pair columns of grad_logits by their own grad_outputs). 'mean': classes /
  // foreground rows, objectness / non-ignored rows.
  m.def(
      "seesaw_forward(Tensor logits, Tensor target, Tensor cum_samples, float p, float q, float eps, "
      "bool objectness, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None, bool split=False) "
      "-> (Tensor loss, Tensor loss_objectness, Tensor grad_logits)");
  // EQLv2 (fused_losses/reference.py eqlv2) on (M, C) logits, or (M, C + 1) with objectness;
  // labels (M,) in [0, C] (C = background) or ignore_index; state float32 (3, C) read only (its
  // pos_neg row gives the weights of this step). batch_stats: float64 (2, C), this batch's
  // per-class sums of |sigmoid(x) - y| * eqlv2 weight * sample weight over positives (row 0)
  // and negatives (row 1), summed per fixed chunk of rows then the chunks in order (any thread
  // count: bitwise the same). The caller adds them to the state (fused_losses/_longtail.py).
  m.def(
      "eqlv2_forward(Tensor logits, Tensor target, Tensor state, float gamma, float mu, float alpha, "
      "bool objectness, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None) "
      "-> (Tensor loss, Tensor grad_logits, Tensor batch_stats)");
  // ---- distribution focal (#24) ----
  // Distribution focal loss (GFL) over (..., n + 1) logits (bins 0..n), target (...,) float labels
  // in [0, n]: loss = -(w_l log p_l + w_r log p_r), l = min(floor(y), n - 1), r = l + 1,
  // w_r = y - l, w_l = 1 - w_r (reference.distribution_focal). weight: one value per row.
  // 'none' returns logits.shape[:-1]; 'mean' divides by the number of rows.
  m.def(
      "distribution_focal_forward(Tensor logits, Tensor target, str reduction, bool compute_grad, "
      "Tensor? weight=None) -> (Tensor loss, Tensor grad_logits)");
}

}  // namespace fused_losses
