"""Launchers: allocate outputs, pick block sizes, run the kernels of fused_losses._triton.kernels.

Each function computes one loss *and*, when asked (need_grad), the gradient of the returned
loss w.r.t. the logits for a unit cotangent ('none': per row/element; 'mean' already divided by
the count), so the backward is a single multiply by grad_output. The batch-coupled parts
(OHEM's rank selection, GHM-C's bin counts and EMA) are torch ops on the device between a
statistics pass and a gradient pass: nothing here synchronises with the host (shapes are static
Python ints; counts stay device tensors).
"""
from __future__ import annotations

import math

import torch
import triton

from fused_losses._ops import saved_grad_dtype
from fused_losses._triton import kernels as K
from fused_losses.reference import ghm_bin_weights, ohem_kept_mask, ohem_min_kept_total

# Elements per program of the row kernels and of the elementwise kernels.
_TILE = 4096
_ELEM_BLOCK = 1024
_HIST_PROGRAMS = 512
# One-pass tile kernels (softmax_focal_tile_kernel, sigmoid_focal_labels_kernel): rows up to
# _ONE_PASS_MAX_C columns are held in registers; about _ONE_PASS_TILE elements per program.
_ONE_PASS_MAX_C = 4096
_ONE_PASS_TILE = 4096
_INT32_LIMIT = 2**31 - 1
# Tests set this to run the int64-offset variants on small tensors.
_FORCE_INT64 = False


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def _row_blocks(m: int, c: int, s: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C). Channel-second (S > 1): rows are the contiguous direction, so take
    64 rows for coalesced loads; (N, C): C is contiguous, take up to 2048 columns."""
    if s > 1:
        block_m = min(64, max(2, _pow2(m)))
        block_c = min(max(2, _pow2(c)), max(2, _TILE // block_m))
    else:
        block_c = min(max(2, _pow2(c)), 2048)
        block_m = max(2, min(_TILE // block_c, 64, _pow2(m)))
    return block_m, block_c


def _pieces(c: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B) of a one-pass row tile: A the largest power of two <= C, B the next
    power of two >= C - A (0 when C is a power of two); C = 80 -> 64 + 16, 1203 -> 1024 + 256."""
    a = 1 << (int(c).bit_length() - 1)
    return a, (_pow2(c - a) if c > a else 0)


def _one_pass_config(rows: int, c: int, elementwise: bool = False) -> dict:
    """Tile and launch configuration of the one-pass kernels, from C: BLOCK_M rows of A + B
    columns, about _ONE_PASS_TILE elements per program (>= 1 row); 4 warps (a thread holds at
    most 32 elements), and 8 for the elementwise sigmoid from 2048 padded columns (fewer registers
    at the same count; the softmax row's reductions and row math cost more over 8 warps: +0.1 to
    +0.4 warp-instructions per element, NOTES.md); no loop, so one stage."""
    a, b = _pieces(c)
    width = a + b
    block_m = max(1, min(_ONE_PASS_TILE // width, 64, _pow2(rows)))
    block_m = 1 << (block_m.bit_length() - 1)
    num_warps = 8 if elementwise and width >= 2048 else 4
    return dict(BLOCK_A=a, BLOCK_B=b, BLOCK_M=block_m, num_warps=num_warps, num_stages=1)


def _gamma_mode(gamma: float) -> int:
    """Specialisation of the one-pass kernels: 0 for gamma = 0, 2 for gamma = 2, 1 otherwise."""
    return 0 if gamma == 0 else 2 if gamma == 2 else 1


def _needs_int64(rows: int, block: int, *row_strides: int, c: int) -> bool:
    """Whether some offset of a one-pass launch (padded to whole programs) passes int32."""
    padded = triton.cdiv(rows, block) * block
    return _FORCE_INT64 or any(padded * stride + c > _INT32_LIMIT for stride in row_strides) or padded > _INT32_LIMIT


def _rows3(logits: torch.Tensor):
    """(N, C, d...) -> (N, C, S) view (a copy only if the spatial dims cannot be merged)."""
    n, c = logits.shape[0], logits.shape[1]
    s = math.prod(logits.shape[2:])
    return logits.reshape(n, c, s), n, c, s


def grad_dtype(dtype: torch.dtype, reduction: str) -> torch.dtype:
    """dtype of the saved gradient: the rule of every backend (fused_losses._ops.saved_grad_dtype).
    'none' with fp16/bf16 logits keeps it in float32: the backward multiplies by a per-sample
    cotangent, and rounding the saved gradient first would round twice (measurably worse than
    eager in bf16). 'mean'/'sum' are scaled by a scalar, exact when it is 1, so the logits
    dtype is kept (half the memory), except fp16: a GradScaler's grad_output (2^16 and more)
    must multiply float32 values, or a large batch's 'mean' gradient underflows."""
    return saved_grad_dtype(dtype, reduction)


def _grad_like(logits: torch.Tensor, need_grad: bool, reduction: str = "sum") -> torch.Tensor:
    if need_grad:
        return torch.empty(logits.shape, dtype=grad_dtype(logits.dtype, reduction), device=logits.device)
    return logits.new_empty((0,))


def _ones(device) -> torch.Tensor:
    return torch.ones(1, dtype=torch.float32, device=device)


def _finish(partial: torch.Tensor | None, rows: torch.Tensor | None, reduction: str, count, shape):
    """'none' -> rows reshaped; 'sum' -> sum of partials (fp32); 'mean' -> sum / max(count, 1)."""
    if reduction == "none":
        return rows.reshape(shape)
    total = partial.sum()
    if reduction == "sum":
        return total
    return total / count


def _empty_result(logits, shape, reduction):
    if reduction == "none":
        return torch.zeros(shape, dtype=logits.dtype, device=logits.device)
    return torch.zeros((), dtype=torch.float32, device=logits.device)


# --------------------------------------------------------------------------------------------
# Softmax family
# --------------------------------------------------------------------------------------------
def _softmax_launch(kind, logits, target, *, scale, class_w=None, feat=None, gamma=0.0, alpha=1.0, epsilon=1.0,
                    ignore_index=None, from_logits=True, detach_factor=False, ib_focal=False, need_grad=False,
                    reduction="none", loss_dtype=None, weight=None, label_smoothing=0.0, poly_eps=0.0):
    """Runs softmax_rows_kernel; returns dict of its outputs (STATS with label smoothing: also
    "ce_smooth", the smoothed cross entropy per row)."""
    x3, n, c, s = _rows3(logits)
    m = n * s
    t = target.reshape(-1)
    block_m, block_c = _row_blocks(m, c, s)
    grid = (triton.cdiv(m, block_m),)
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    out = {}
    dummy = scale
    stats = kind == K.STATS
    store_rows = not stats and reduction == "none"
    reduce = not stats and reduction != "none"
    smooth = label_smoothing > 0
    if stats:
        out["logpt"], out["omp"] = (torch.empty(m, **f32) for _ in range(2))
        out["lse"] = torch.empty((m, 2), **f32)  # log-sum-exp as float32 (hi, lo) pairs
        if smooth:
            out["ce_smooth"] = torch.empty(m, **f32)
    if store_rows:
        out["rows"] = torch.empty(m, dtype=loss_dtype, device=dev)
    if reduce:
        out["partial"] = torch.empty(grid[0], **f32)
    write_grad = need_grad and not stats
    grad = _grad_like(logits, write_grad, reduction)
    out["grad"] = grad
    grad3 = grad.view(n, c, s) if write_grad else x3
    dfeat_needed = write_grad and kind == K.IB and not detach_factor
    if (kind == K.FOCAL and from_logits and not smooth and s == 1 and c <= _ONE_PASS_MAX_C and x3.stride(1) == 1
            and (not write_grad or grad3.stride(1) == 1) and poly_eps == 0.0):  # Poly-1 (#24): the rows kernel
        cfg = _one_pass_config(m, c)
        block_m = cfg.pop("BLOCK_M")
        grid = (triton.cdiv(m, block_m),)
        if reduce:
            out["partial"] = torch.empty(grid[0], **f32)
        K.softmax_focal_tile_kernel[grid](
            x3, t, dummy if class_w is None else class_w, scale, dummy if weight is None else weight.reshape(-1),
            out.get("rows", dummy), out.get("partial", dummy), grad3,
            m, c, x3.stride(0), grad3.stride(0), float(gamma), float(alpha),
            0 if ignore_index is None else int(ignore_index),
            GAMMA_MODE=_gamma_mode(gamma), HAS_CLASS_W=class_w is not None, HAS_IGNORE=ignore_index is not None,
            HAS_WEIGHT=weight is not None, WRITE_GRAD=write_grad, STORE_ROWS=store_rows, REDUCE=reduce,
            INT64=_needs_int64(m, block_m, x3.stride(0), grad3.stride(0), c=c), BLOCK_M=block_m, **cfg,
        )
        return out
    if dfeat_needed:
        out["dfeat"] = torch.empty(m, **f32)
    K.softmax_rows_kernel[grid](
        x3, t, dummy if class_w is None else class_w, dummy if feat is None else feat, scale,
        dummy if weight is None else weight.reshape(-1),
        out.get("rows", out.get("ce_smooth", dummy)), out.get("partial", dummy), out.get("logpt", dummy),
        out.get("omp", dummy), out.get("lse", dummy), grad3, out.get("dfeat", dummy),
        m, c, s, x3.stride(0), x3.stride(1), x3.stride(2), grad3.stride(0), grad3.stride(1), grad3.stride(2),
        float(gamma), float(alpha), float(epsilon), float(label_smoothing),
        0 if ignore_index is None else int(ignore_index),
        KIND=kind, HAS_CLASS_W=class_w is not None, HAS_IGNORE=ignore_index is not None, FROM_LOGITS=from_logits,
        DETACH_FACTOR=detach_factor, IB_FOCAL=ib_focal, WRITE_GRAD=write_grad, STORE_ROWS=store_rows,
        REDUCE=reduce, HAS_WEIGHT=weight is not None, SMOOTH=smooth, BLOCK_M=block_m, BLOCK_C=block_c,
        **({} if poly_eps == 0.0 else dict(poly_eps=float(poly_eps), POLY=True)),
    )
    return out


def _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, skip_zero_coef, weight=None,
                  label_smoothing=0.0):
    """Second pass of OHEM / GHM-C softmax: grad = coef_i (softmax_i - q_i) (q_i: the one-hot
    target, smoothed by label_smoothing); lse: the (M, 2) float32 (hi, lo) log-sum-exp pairs of
    the STATS pass; rows with weight 0 are written as 0 without reading their logits."""
    grad = _grad_like(logits, need_grad, reduction)
    if not need_grad:
        return grad
    x3, n, c, s = _rows3(logits)
    m = n * s
    block_m, block_c = _row_blocks(m, c, s)
    grad3 = grad.view(n, c, s)
    K.softmax_grad_kernel[(triton.cdiv(m, block_m),)](
        x3, target.reshape(-1), lse, coef, coef if weight is None else weight.reshape(-1), grad3,
        m, c, s, x3.stride(0), x3.stride(1), x3.stride(2), grad3.stride(0), grad3.stride(1), grad3.stride(2),
        int(ignore_index), float(label_smoothing), SKIP_ZERO_COEF=skip_zero_coef, HAS_WEIGHT=weight is not None,
        SMOOTH=label_smoothing > 0, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return grad


def softmax_focal(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits, need_grad, weight=None,
                  label_smoothing=0.0, epsilon=0.0):
    """Softmax focal loss (cross entropy at gamma = 0): one fused pass (+ in-kernel gradient pass;
    label smoothing: one more pass over each row). 'mean' counts the non-ignored samples, whatever
    their weights."""
    if target.numel() == 0:
        return _empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction)
    count = None
    if reduction == "mean":
        count = (target != ignore_index).sum().clamp_min(1).to(torch.float32)
        scale = (1.0 / count).reshape(1)
    else:
        scale = _ones(logits.device)
    out = _softmax_launch(K.FOCAL, logits, target, scale=scale, class_w=alpha_t, gamma=gamma, alpha=alpha,
                          ignore_index=ignore_index, from_logits=from_logits, need_grad=need_grad,
                          reduction=reduction, loss_dtype=logits.dtype, weight=weight,
                          label_smoothing=label_smoothing, poly_eps=epsilon)
    loss = _finish(out.get("partial"), out.get("rows"), reduction, count, target.shape)
    return loss, out["grad"]


def _softmax_stats(logits, target, ignore_index, label_smoothing=0.0):
    """Per row: log p_t, 1 - p_t, the lse pair, the non-ignored mask and the cross entropy (smoothed
    by label_smoothing; 0 on ignored rows)."""
    out = _softmax_launch(K.STATS, logits, target, scale=_ones(logits.device), ignore_index=ignore_index,
                          label_smoothing=label_smoothing)
    valid = target.reshape(-1) != ignore_index
    logpt = out["logpt"]
    ce = out["ce_smooth"] if label_smoothing > 0 else torch.where(valid, -logpt, torch.zeros_like(logpt))
    return logpt, out["omp"], out["lse"], valid, ce


def _coupled_result(logits, target, loss_rows, coef, count, reduction):
    """loss and the per-row gradient coefficient of a batch-coupled softmax loss."""
    if reduction == "none":
        return loss_rows.to(logits.dtype).reshape(target.shape), coef
    total = loss_rows.sum()
    if reduction == "sum":
        return total, coef
    count = count.clamp_min(1).to(torch.float32)
    return total / count, coef / count


def ohem(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad, weight=None,
         label_smoothing=0.0):
    """OHEM over per-sample CE: stats pass, device-side selection by sort rank (or mmseg
    threshold) of the unsmoothed, unweighted CE, gradient pass over kept rows only. A kept row's
    loss is w_i x its (smoothed) CE; 'mean' divides by the kept count."""
    if target.numel() == 0:
        return _empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction)
    logpt, _, lse, valid, ce_loss = _softmax_stats(logits, target, ignore_index, label_smoothing)
    ce = torch.where(valid, -logpt, torch.zeros_like(logpt))
    kept = ohem_kept_mask(ce, torch.exp(logpt), valid, keep=keep, keep_is_int=keep_is_int, thresh=thresh,
                          min_kept_total=ohem_min_kept_total(logits, min_kept))
    carried = kept
    coef = kept.to(torch.float32)
    if weight is not None:
        w = weight.reshape(-1)
        carried = kept & (w != 0)
        coef = torch.where(carried, w, torch.zeros_like(w))
        ce_loss = w * ce_loss
    loss_rows = torch.where(carried, ce_loss, torch.zeros_like(ce_loss))
    loss, coef = _coupled_result(logits, target, loss_rows, coef, kept.sum(), reduction)
    return loss, _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, True,
                               label_smoothing=label_smoothing)


def _no_state(logits):
    return torch.empty(0, dtype=torch.float32, device=logits.device)


def _softmax_ghm_counts(g, valid, bins):
    """int64 (bins + 1,): the valid rows (not ignored, weight != 0) per bin of g (NaN g: no bin),
    then n_valid (NaN rows included). Integer scatter_add over rows: exact, deterministic."""
    in_bin = valid & ~torch.isnan(g)
    idx = torch.clamp_max(torch.floor(torch.where(in_bin, g, torch.zeros_like(g)) * bins), bins - 1).long()
    counts = torch.zeros(bins, dtype=torch.int64, device=g.device).scatter_add(0, idx, in_bin.long())
    return torch.cat([counts, valid.sum().reshape(1)]), idx, in_bin


def _ghm_weights(counts, bins, state, momentum, bin_weights):
    """(per-bin weights, new state or None): from this call's counts, or the given bin_weights
    (process_group: global_bin_weights already made them and updated the state)."""
    if bin_weights is not None:
        return bin_weights.to(torch.float32), None
    return ghm_bin_weights(counts[:bins].to(torch.float32), counts[bins], state, momentum)


def ghmc_softmax(logits, target, state, bins, momentum, ignore_index, reduction, need_grad, weight=None,
                 label_smoothing=0.0, counts=None, bin_weights=None):
    """GHM-C over softmax samples: stats pass (g = 1 - p_t), bin counts and EMA with torch
    (integer scatter_add, exact), gradient pass with coef_i = w_i bw[bin_i] (/ n_valid). A row
    with weight 0 is invalid (no bin, not in n_valid, loss and grad 0). counts/bin_weights: this
    rank's counts and the global weights of the process_group path (the state is then not
    touched here)."""
    new_state = None
    if target.numel() == 0:
        loss, grad = _empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction)
    else:
        _, g, lse, valid, ce = _softmax_stats(logits, target, ignore_index, label_smoothing)
        if weight is not None:
            w = weight.reshape(-1)
            valid = valid & (w != 0)
        local, idx, in_bin = _softmax_ghm_counts(g, valid, bins)
        if counts is None:
            counts = local
        bin_weight, new_state = _ghm_weights(counts, bins, state, momentum, bin_weights)
        coef = torch.where(in_bin, bin_weight[idx], torch.zeros_like(g))
        if weight is not None:
            coef = coef * w
        loss_rows = torch.where(valid, coef * ce, torch.zeros_like(ce))
        loss, coef = _coupled_result(logits, target, loss_rows, coef, counts[bins], reduction)
        grad = _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, False, weight,
                             label_smoothing)
    if state is not None and new_state is None:
        new_state = state.clone()
    return loss, grad, _no_state(logits) if new_state is None else new_state


def ib(logits, target, features, weight, alpha, epsilon, gamma, detach_factor, reduction, need_grad):
    """Influence-balanced loss: one fused pass; d/dfeatures from the per-row dl/df."""
    n = logits.shape[0]
    need_feat = need_grad and not detach_factor
    if n == 0:
        return (_empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction),
                _grad_like(features, need_feat, reduction))
    f = features.to(torch.float32)
    if f.dim() == 2 and f.shape[1] > 1:
        f = f.abs().sum(dim=1)
    f = f.reshape(-1).contiguous()
    if reduction == "mean":
        scale = torch.full((1,), 1.0 / n, dtype=torch.float32, device=logits.device)
    else:
        scale = _ones(logits.device)
    out = _softmax_launch(K.IB, logits, target, scale=scale, class_w=weight, feat=f, gamma=gamma, alpha=alpha,
                          epsilon=epsilon, detach_factor=detach_factor, ib_focal=gamma > 0, need_grad=need_grad,
                          reduction=reduction, loss_dtype=logits.dtype)
    loss = _finish(out.get("partial"), out.get("rows"), reduction, n, target.shape)
    grad_feat = _grad_like(features, False)
    if need_feat:
        dfeat = out["dfeat"]
        if features.dim() == 2 and features.shape[1] > 1:
            grad_feat = dfeat[:, None] * torch.sign(features.to(torch.float32))
            grad_feat = grad_feat.to(grad_dtype(features.dtype, reduction))
        else:
            grad_feat = dfeat.reshape(features.shape).to(grad_dtype(features.dtype, reduction))
    return loss, out["grad"], grad_feat


# --------------------------------------------------------------------------------------------
# Sigmoid family
# --------------------------------------------------------------------------------------------
def _sigmoid_common(logits, target, ignore_index):
    labels = not target.is_floating_point()
    x = logits.reshape(-1)
    if not x.is_contiguous():
        x = x.contiguous()
    t = target.reshape(-1).contiguous()
    c = logits.shape[-1]
    if labels:
        n_valid = (t != ignore_index).sum() * c
    else:
        n_valid = torch.full((), x.numel(), dtype=torch.int64, device=x.device)
    return x, t, c, labels, n_valid


def _weight_args(weight, numel):
    """(flat weight or None, per element?): per row (numel / C values) or per element (numel)."""
    if weight is None:
        return None, False
    w = weight.reshape(-1)
    return w, w.numel() == numel


def _sigmoid_launch(kind, logits, x, t, c, labels, *, scale, bin_w, alpha, gamma, ignore_index, bins, reduction,
                    need_grad, weight=None, alpha_c=None, poly_eps=0.0):
    numel = x.numel()
    if (kind == K.SIGMOID_FOCAL and labels and weight is None and alpha_c is None and c <= _ONE_PASS_MAX_C
            and poly_eps == 0.0):  # Poly-1 (#24): the elementwise kernel
        return _sigmoid_focal_labels_launch(logits, x, t, c, scale=scale, alpha=alpha, gamma=gamma,
                                            ignore_index=ignore_index, reduction=reduction, need_grad=need_grad)
    grid = (triton.cdiv(numel, _ELEM_BLOCK),)
    rows = torch.empty(numel, dtype=logits.dtype, device=x.device) if reduction == "none" else scale
    partial = torch.empty(grid[0], dtype=torch.float32, device=x.device) if reduction != "none" else scale
    grad = _grad_like(logits, need_grad, reduction)
    w, per_elem = _weight_args(weight, numel)
    K.sigmoid_kernel[grid](
        x, t, bin_w, scale, scale if w is None else w, scale if alpha_c is None else alpha_c,
        rows, partial, grad if need_grad else x,
        numel, c, float(alpha), float(gamma), int(ignore_index), int(bins),
        KIND=kind, LABELS=labels, WRITE_GRAD=need_grad, STORE_ELEMS=reduction == "none",
        REDUCE=reduction != "none", HAS_WEIGHT=w is not None, WEIGHT_PER_ELEM=per_elem,
        ALPHA_PER_CLASS=alpha_c is not None, BLOCK=_ELEM_BLOCK,
        **({} if poly_eps == 0.0 else dict(poly_eps=float(poly_eps), POLY=True)),
    )
    return rows, partial, grad


def _sigmoid_focal_labels_launch(logits, x, t, c, *, scale, alpha, gamma, ignore_index, reduction, need_grad):
    """sigmoid_focal_labels_kernel over (numel / C) rows of C: one-pass tiles chosen from C."""
    numel = x.numel()
    r = numel // c
    cfg = _one_pass_config(r, c, elementwise=True)
    block_r = cfg.pop("BLOCK_M")
    grid = (triton.cdiv(r, block_r),)
    rows = torch.empty(numel, dtype=logits.dtype, device=x.device) if reduction == "none" else scale
    partial = torch.empty(grid[0], dtype=torch.float32, device=x.device) if reduction != "none" else scale
    grad = _grad_like(logits, need_grad, reduction)
    K.sigmoid_focal_labels_kernel[grid](
        x, t, scale, rows, partial, grad if need_grad else x,
        r, c, float(alpha), float(gamma), int(ignore_index),
        GAMMA_MODE=_gamma_mode(gamma), WRITE_GRAD=need_grad, STORE_ELEMS=reduction == "none",
        REDUCE=reduction != "none", INT64=_needs_int64(r, block_r, c, c=c), BLOCK_R=block_r, **cfg,
    )
    return rows, partial, grad


def _sigmoid_scale(reduction, n_valid, device):
    if reduction == "mean":
        count = n_valid.clamp_min(1).to(torch.float32)
        return count, (1.0 / count).reshape(1)
    return None, _ones(device)


def sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, need_grad, alpha_per_class=None,
                  weight=None, epsilon=0.0):
    """Sigmoid focal loss, one elementwise pass writing loss (or partial sums) and gradient.
    alpha_per_class (C,) replaces the scalar alpha; weight: per row or per element. 'mean'
    counts the non-ignored elements, whatever their weights."""
    if logits.numel() == 0:
        return _empty_result(logits, logits.shape, reduction), _grad_like(logits, need_grad, reduction)
    x, t, c, labels, n_valid = _sigmoid_common(logits, target, ignore_index)
    count, scale = _sigmoid_scale(reduction, n_valid, logits.device)
    rows, partial, grad = _sigmoid_launch(K.SIGMOID_FOCAL, logits, x, t, c, labels, scale=scale, bin_w=scale,
                                          alpha=alpha, gamma=gamma, ignore_index=ignore_index, bins=1,
                                          reduction=reduction, need_grad=need_grad, weight=weight,
                                          alpha_c=alpha_per_class, poly_eps=epsilon)
    return _finish(partial, rows, reduction, count, logits.shape), grad


def _sigmoid_ghm_counts(x, t, c, labels, bins, ignore_index, weight):
    """int64 (bins + 1,): valid elements per bin of g = |sigmoid(x) - y|, then n_valid (valid: not
    ignored, weight != 0; NaN g counted there but in no bin). Per-program integer histograms
    (ghm_sigmoid_hist_kernel) summed by torch: exact, deterministic."""
    numel = x.numel()
    nb = _pow2(bins + 2)
    programs = min(triton.cdiv(numel, _ELEM_BLOCK), _HIST_PROGRAMS)
    hist = torch.empty((programs, nb), dtype=torch.int32, device=x.device)
    w, per_elem = _weight_args(weight, numel)
    K.ghm_sigmoid_hist_kernel[(programs,)](
        x, t, x if w is None else w, hist, numel, c, int(ignore_index), int(bins), programs,
        LABELS=labels, HAS_WEIGHT=w is not None, WEIGHT_PER_ELEM=per_elem, NUM_BINS_P2=nb, BLOCK=_ELEM_BLOCK,
    )
    total = hist.to(torch.int64).sum(dim=0)
    return torch.cat([total[:bins], total[:bins + 1].sum().reshape(1)])


def ghmc_counts(logits, target, bins, use_sigmoid, ignore_index, weight=None):
    """This rank's int64 (bins + 1,) GHM-C counts (per bin, then n_valid): the ghmc_bin_counts op
    of the process_group path (fused_losses.distributed.global_bin_weights all-reduces them)."""
    if (logits.numel() if use_sigmoid else target.numel()) == 0:
        return torch.zeros(bins + 1, dtype=torch.int64, device=logits.device)
    if use_sigmoid:
        x, t, c, labels, _ = _sigmoid_common(logits, target, ignore_index)
        return _sigmoid_ghm_counts(x, t, c, labels, bins, ignore_index, weight)
    _, g, _, valid, _ = _softmax_stats(logits, target, ignore_index)
    if weight is not None:
        valid = valid & (weight.reshape(-1) != 0)
    return _softmax_ghm_counts(g, valid, bins)[0]


def ghmc_sigmoid(logits, target, state, bins, momentum, ignore_index, reduction, need_grad, weight=None,
                 counts=None, bin_weights=None):
    """GHM-C sigmoid: histogram pass (per-program integer histograms), bin weights and EMA with
    torch, then the loss/gradient pass gathering bw[bin(g)] (x the element's weight; weight 0:
    invalid). counts/bin_weights: the process_group path (see ghmc_softmax)."""
    if logits.numel() == 0:
        loss, grad = _empty_result(logits, logits.shape, reduction), _grad_like(logits, need_grad, reduction)
        return loss, grad, _no_state(logits) if state is None else state.clone()
    x, t, c, labels, _ = _sigmoid_common(logits, target, ignore_index)
    if counts is None:
        counts = _sigmoid_ghm_counts(x, t, c, labels, bins, ignore_index, weight)
    bin_weight, new_state = _ghm_weights(counts, bins, state, momentum, bin_weights)
    if new_state is None and state is not None:
        new_state = state.clone()
    count, scale = _sigmoid_scale(reduction, counts[bins], logits.device)
    rows, partial, grad = _sigmoid_launch(K.GHMC_SIGMOID, logits, x, t, c, labels, scale=scale,
                                          bin_w=bin_weight.contiguous(), alpha=0.0, gamma=0.0,
                                          ignore_index=ignore_index, bins=bins, reduction=reduction,
                                          need_grad=need_grad, weight=weight)
    loss = _finish(partial, rows, reduction, count, logits.shape)
    return loss, grad, _no_state(logits) if new_state is None else new_state


# --------------------------------------------------------------------------------------------
# In-place backward of reduced losses
# --------------------------------------------------------------------------------------------
def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, applied_scale: torch.Tensor) -> None:
    """grad *= grad_output / applied_scale unless equal, then applied_scale = grad_output; the
    scalars are compared by the kernel (no host read). Writes only through the kernels, so no
    version counter is bumped (the saved gradient stays unpackable under retain_graph)."""
    if not grad.is_contiguous():
        raise RuntimeError("scale_grad_: grad must be contiguous (the saved gradient of a forward op)")
    if grad_output.numel() != 1 or applied_scale.numel() != 1:
        raise RuntimeError("scale_grad_: grad_output and applied_scale must hold one value each")
    numel = grad.numel()
    if numel > 0:
        block = 4096
        K.rescale_grad_kernel[(triton.cdiv(numel, block),)](grad, grad_output, applied_scale, numel, BLOCK=block)
    K.record_scale_kernel[(1,)](grad_output, applied_scale)
