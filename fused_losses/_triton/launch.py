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
                    reduction="none", loss_dtype=None):
    """Runs softmax_rows_kernel; returns dict of its outputs."""
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
    if stats:
        out["logpt"], out["omp"] = (torch.empty(m, **f32) for _ in range(2))
        out["lse"] = torch.empty((m, 2), **f32)  # log-sum-exp as float32 (hi, lo) pairs
    if store_rows:
        out["rows"] = torch.empty(m, dtype=loss_dtype, device=dev)
    if reduce:
        out["partial"] = torch.empty(grid[0], **f32)
    write_grad = need_grad and not stats
    grad = _grad_like(logits, write_grad, reduction)
    out["grad"] = grad
    grad3 = grad.view(n, c, s) if write_grad else x3
    dfeat_needed = write_grad and kind == K.IB and not detach_factor
    if dfeat_needed:
        out["dfeat"] = torch.empty(m, **f32)
    K.softmax_rows_kernel[grid](
        x3, t, dummy if class_w is None else class_w, dummy if feat is None else feat, scale,
        out.get("rows", dummy), out.get("partial", dummy), out.get("logpt", dummy), out.get("omp", dummy),
        out.get("lse", dummy), grad3, out.get("dfeat", dummy),
        m, c, s, x3.stride(0), x3.stride(1), x3.stride(2), grad3.stride(0), grad3.stride(1), grad3.stride(2),
        float(gamma), float(alpha), float(epsilon), 0 if ignore_index is None else int(ignore_index),
        KIND=kind, HAS_CLASS_W=class_w is not None, HAS_IGNORE=ignore_index is not None, FROM_LOGITS=from_logits,
        DETACH_FACTOR=detach_factor, IB_FOCAL=ib_focal, WRITE_GRAD=write_grad, STORE_ROWS=store_rows,
        REDUCE=reduce, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return out


def _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, skip_zero_coef):
    """Second pass of OHEM / GHM-C softmax: grad = coef_i (softmax_i - onehot_i); lse: the (M, 2)
    float32 (hi, lo) log-sum-exp pairs of the STATS pass."""
    grad = _grad_like(logits, need_grad, reduction)
    if not need_grad:
        return grad
    x3, n, c, s = _rows3(logits)
    m = n * s
    block_m, block_c = _row_blocks(m, c, s)
    grad3 = grad.view(n, c, s)
    K.softmax_grad_kernel[(triton.cdiv(m, block_m),)](
        x3, target.reshape(-1), lse, coef, grad3,
        m, c, s, x3.stride(0), x3.stride(1), x3.stride(2), grad3.stride(0), grad3.stride(1), grad3.stride(2),
        int(ignore_index), SKIP_ZERO_COEF=skip_zero_coef, BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return grad


def softmax_focal(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits, need_grad):
    """Softmax focal loss (cross entropy at gamma = 0): one fused pass (+ in-kernel gradient pass)."""
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
                          reduction=reduction, loss_dtype=logits.dtype)
    loss = _finish(out.get("partial"), out.get("rows"), reduction, count, target.shape)
    return loss, out["grad"]


def _softmax_stats(logits, target, ignore_index):
    out = _softmax_launch(K.STATS, logits, target, scale=_ones(logits.device), ignore_index=ignore_index)
    valid = target.reshape(-1) != ignore_index
    return out["logpt"], out["omp"], out["lse"], valid


def _coupled_result(logits, target, loss_rows, coef, count, reduction):
    """loss and the per-row gradient coefficient of a batch-coupled softmax loss."""
    if reduction == "none":
        return loss_rows.to(logits.dtype).reshape(target.shape), coef
    total = loss_rows.sum()
    if reduction == "sum":
        return total, coef
    count = count.clamp_min(1).to(torch.float32)
    return total / count, coef / count


def ohem(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad):
    """OHEM over per-sample CE: stats pass, device-side selection by sort rank (or mmseg
    threshold), gradient pass over kept rows only."""
    if target.numel() == 0:
        return _empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction)
    logpt, _, lse, valid = _softmax_stats(logits, target, ignore_index)
    ce = torch.where(valid, -logpt, torch.zeros_like(logpt))
    kept = ohem_kept_mask(ce, torch.exp(logpt), valid, keep=keep, keep_is_int=keep_is_int, thresh=thresh,
                          min_kept_total=ohem_min_kept_total(logits, min_kept))
    loss_rows = torch.where(kept, ce, torch.zeros_like(ce))
    loss, coef = _coupled_result(logits, target, loss_rows, kept.to(torch.float32), kept.sum(), reduction)
    return loss, _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, True)


def _no_state(logits):
    return torch.empty(0, dtype=torch.float32, device=logits.device)


def ghmc_softmax(logits, target, state, bins, momentum, ignore_index, reduction, need_grad):
    """GHM-C over softmax samples: stats pass (g = 1 - p_t), bin counts and EMA with torch
    (integer scatter_add, exact), gradient pass with coef_i = w[bin_i] (/ n_valid)."""
    new_state = None
    if target.numel() == 0:
        loss, grad = _empty_result(logits, target.shape, reduction), _grad_like(logits, need_grad, reduction)
    else:
        logpt, g, lse, valid = _softmax_stats(logits, target, ignore_index)
        in_bin = valid & ~torch.isnan(g)
        idx = torch.clamp_max(torch.floor(torch.where(in_bin, g, torch.zeros_like(g)) * bins), bins - 1).long()
        counts = torch.zeros(bins, dtype=torch.int64, device=logits.device)
        counts = counts.scatter_add(0, idx, in_bin.long()).to(torch.float32)
        n_valid = valid.sum()
        bin_weight, new_state = ghm_bin_weights(counts, n_valid, state, momentum)
        weight = torch.where(in_bin, bin_weight[idx], torch.zeros_like(g))
        ce = torch.where(valid, -logpt, torch.zeros_like(logpt))
        loss, coef = _coupled_result(logits, target, weight * ce, weight, n_valid, reduction)
        grad = _softmax_grad(logits, target, lse, coef, ignore_index, need_grad, reduction, False)
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


def _sigmoid_launch(kind, logits, x, t, c, labels, *, scale, bin_w, alpha, gamma, ignore_index, bins, reduction,
                    need_grad):
    numel = x.numel()
    grid = (triton.cdiv(numel, _ELEM_BLOCK),)
    rows = torch.empty(numel, dtype=logits.dtype, device=x.device) if reduction == "none" else scale
    partial = torch.empty(grid[0], dtype=torch.float32, device=x.device) if reduction != "none" else scale
    grad = _grad_like(logits, need_grad, reduction)
    K.sigmoid_kernel[grid](
        x, t, bin_w, scale, rows, partial, grad if need_grad else x,
        numel, c, float(alpha), float(gamma), int(ignore_index), int(bins),
        KIND=kind, LABELS=labels, WRITE_GRAD=need_grad, STORE_ELEMS=reduction == "none",
        REDUCE=reduction != "none", BLOCK=_ELEM_BLOCK,
    )
    return rows, partial, grad


def _sigmoid_scale(reduction, n_valid, device):
    if reduction == "mean":
        count = n_valid.clamp_min(1).to(torch.float32)
        return count, (1.0 / count).reshape(1)
    return None, _ones(device)


def sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, need_grad):
    """Sigmoid focal loss, one elementwise pass writing loss (or partial sums) and gradient."""
    if logits.numel() == 0:
        return _empty_result(logits, logits.shape, reduction), _grad_like(logits, need_grad, reduction)
    x, t, c, labels, n_valid = _sigmoid_common(logits, target, ignore_index)
    count, scale = _sigmoid_scale(reduction, n_valid, logits.device)
    rows, partial, grad = _sigmoid_launch(K.SIGMOID_FOCAL, logits, x, t, c, labels, scale=scale, bin_w=scale,
                                          alpha=alpha, gamma=gamma, ignore_index=ignore_index, bins=1,
                                          reduction=reduction, need_grad=need_grad)
    return _finish(partial, rows, reduction, count, logits.shape), grad


def ghmc_sigmoid(logits, target, state, bins, momentum, ignore_index, reduction, need_grad):
    """GHM-C sigmoid: histogram pass (per-program integer histograms), bin weights and EMA with
    torch, then the loss/gradient pass gathering w[bin(g)]."""
    if logits.numel() == 0:
        loss, grad = _empty_result(logits, logits.shape, reduction), _grad_like(logits, need_grad, reduction)
        return loss, grad, _no_state(logits) if state is None else state.clone()
    x, t, c, labels, n_valid = _sigmoid_common(logits, target, ignore_index)
    numel = x.numel()
    nb = _pow2(bins + 1)
    programs = min(triton.cdiv(numel, _ELEM_BLOCK), _HIST_PROGRAMS)
    hist = torch.empty((programs, nb), dtype=torch.int32, device=x.device)
    K.ghm_sigmoid_hist_kernel[(programs,)](
        x, t, hist, numel, c, int(ignore_index), int(bins), programs,
        LABELS=labels, NUM_BINS_P2=nb, BLOCK=_ELEM_BLOCK,
    )
    counts = hist.sum(dim=0)[:bins].to(torch.float32)
    bin_weight, new_state = ghm_bin_weights(counts, n_valid, state, momentum)
    count, scale = _sigmoid_scale(reduction, n_valid, logits.device)
    rows, partial, grad = _sigmoid_launch(K.GHMC_SIGMOID, logits, x, t, c, labels, scale=scale,
                                          bin_w=bin_weight.contiguous(), alpha=0.0, gamma=0.0,
                                          ignore_index=ignore_index, bins=bins, reduction=reduction,
                                          need_grad=need_grad)
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
