"""Distribution focal loss (GFL, issue #24) on the 'triton' backend: the kernel, its launcher, the
custom op ``fused_losses_triton::distribution_focal`` (fake kernel, autograd: the shared layer of
fused_losses._triton.ops) and the loss function the backend serves.

One pass per tile of BLOCK_M rows x BLOCK_C (the next power of two >= n + 1) bins: the row is read
once, the exponentials computed once, loss and gradient written from the same registers
(reference.distribution_focal; the per-row steps of csrc/losses_math.h dfl_bins and
csrc/cuda/kernels/dfl_kernels.cuh). Of the two bins l = min(floor(y), n - 1) and r = l + 1, the
one with the larger logit (`sel`) takes log p = -log1p(sum of the others) when it is the row max
(exact for a confident row) and its gradient as w_oth - s_oth / s (no cancellation).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses._ops import call_loss
from fused_losses._triton import launch
from fused_losses._triton.kernels import _cast, _exp_libm, _log1p
from fused_losses._triton.ops import _NS, _fake_grad, _fake_loss, _logits_grad, _nones, _save_grads

__all__ = ["distribution_focal"]


@triton.jit
def dfl_kernel(
    X, T, W,  # logits (M, C) contiguous, float32 labels (M,), weights (M,)
    LOSS, PARTIAL, GRAD,  # outputs
    M, C, scale,
    HAS_WEIGHT: tl.constexpr, WRITE_GRAD: tl.constexpr, STORE_ROWS: tl.constexpr, REDUCE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per row: y in [0, n] (n = C - 1; outside or NaN: clamped into a bin pair, never out of
    bounds; the host validates), l, r, w_l = 1 - w_r, w_r = y - l, loss = w -(w_l log p_l + w_r
    log p_r), GRAD_c = scale w (p_c - w_l [c == l] - w_r [c == r]). Zero-weight rows: 0 loss and
    gradient, logits not read. PARTIAL: one sum per program (ordered finish by the launcher)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    y = tl.load(T + rows, mask=in_range, other=0.0).to(tl.float32)
    valid = in_range
    w = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if HAS_WEIGHT:
        w = tl.load(W + rows, mask=in_range, other=0.0).to(tl.float32)
        valid = valid & (w != 0)
    top = (C - 2).to(tl.float32)
    f = tl.minimum(tl.floor(y), top)
    f = tl.where(f >= 0, f, 0.0)  # also NaN -> 0
    left = f.to(tl.int64)
    right = left + 1
    w_r = y - f
    w_l = 1.0 - w_r
    base = rows * C
    x_l = tl.load(X + base + left, mask=valid, other=0.0).to(tl.float32)
    x_r = tl.load(X + base + right, mask=valid, other=0.0).to(tl.float32)
    is_left = x_l >= x_r
    sel = tl.where(is_left, left, right)
    oth = tl.where(is_left, right, left)
    w_sel = tl.where(is_left, w_l, w_r)
    w_oth = tl.where(is_left, w_r, w_l)
    x_sel = tl.where(is_left, x_l, x_r)
    x_oth = tl.where(is_left, x_r, x_l)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    mask = valid[:, None] & cmask[None, :]
    x = tl.load(X + base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=1)
    m = tl.where(valid, m, 0.0)
    e = _exp_libm(x - m[:, None])
    e = tl.where(mask, e, 0.0)
    s = tl.sum(e, axis=1)
    s_oth = tl.sum(tl.where(cols[None, :] == sel[:, None], 0.0, e), axis=1)
    s = tl.where(valid, s, 1.0)
    s_oth = tl.where(valid, s_oth, 0.0)
    x_sel = tl.where(valid, x_sel, m)
    log_s = tl.log(s)
    lp_sel = tl.where(x_sel == m, -_log1p(s_oth), (x_sel - m) - log_s)
    lp_oth = (x_oth - m) - log_s
    loss = -(w_sel * lp_sel + w_oth * lp_oth)
    if HAS_WEIGHT:
        loss = w * loss
    loss = tl.where(valid, loss, 0.0)
    if STORE_ROWS:
        tl.store(LOSS + rows, _cast(loss, LOSS.dtype.element_ty), mask=in_range)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
    if WRITE_GRAD:
        k = scale * w
        inv_s = 1.0 / s
        p = e * inv_s[:, None]
        g = tl.where(cols[None, :] == sel[:, None], (w_oth - s_oth * inv_s)[:, None], p)
        g = tl.where(cols[None, :] == oth[:, None], p - w_oth[:, None], g)
        g = tl.where(mask, k[:, None] * g, 0.0)
        tl.store(GRAD + base[:, None] + cols[None, :], _cast(g, GRAD.dtype.element_ty),
                 mask=in_range[:, None] & cmask[None, :])


def _launch(logits: Tensor, target: Tensor, reduction: str, need_grad: bool, weight: Optional[Tensor]):
    """(loss, saved gradient) of (M, C) logits; 'mean' divides by M."""
    m, c = logits.shape
    grad = launch._grad_like(logits, need_grad, reduction)
    if m == 0:
        return launch._empty_result(logits, (0,), reduction), grad
    x = logits.contiguous()
    t = target.reshape(-1).to(torch.float32).contiguous()
    block_c = max(2, triton.next_power_of_2(c))
    block_m = max(1, min(128, 4096 // block_c, triton.next_power_of_2(m)))
    grid = (triton.cdiv(m, block_m),)
    store_rows, reduce = reduction == "none", reduction != "none"
    rows = torch.empty(m, dtype=logits.dtype, device=logits.device) if store_rows else x
    partial = torch.empty(grid[0], dtype=torch.float32, device=logits.device) if reduce else x
    w = None if weight is None else weight.reshape(-1).to(torch.float32).contiguous()
    dfl_kernel[grid](
        x, t, x if w is None else w, rows, partial, grad if need_grad else x,
        m, c, 1.0 / m if reduction == "mean" else 1.0,
        HAS_WEIGHT=w is not None, WRITE_GRAD=need_grad, STORE_ROWS=store_rows, REDUCE=reduce,
        BLOCK_M=block_m, BLOCK_C=block_c,
    )
    if store_rows:
        return rows, grad
    total = partial.sum()
    return (total / m if reduction == "mean" else total), grad


@torch.library.custom_op(f"{_NS}::distribution_focal", mutates_args=())
def distribution_focal_op(logits: Tensor, target: Tensor, reduction: str, need_grad: bool,
                          weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return _launch(logits, target, reduction, need_grad, weight)


@distribution_focal_op.register_fake
def _(logits, target, reduction, need_grad, weight=None):
    return _fake_loss(logits, logits.shape[:-1], reduction), _fake_grad(logits, need_grad, reduction)


def _dfl_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 2, 1, 3)


def _dfl_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, 1),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::distribution_focal", _dfl_backward, setup_context=_dfl_setup)


def distribution_focal(logits, target, *, reduction="mean", weight=None):
    """The backend's loss (normalised kwargs of fused_losses._validate): (..., n + 1) logits viewed
    as (rows, n + 1), so a per-row cotangent broadcasts over dim 1."""
    bins = logits.shape[-1]

    def run(need_grad, x, _features, t, w):
        loss, grad = distribution_focal_op(x, t, reduction, need_grad, w)
        return loss, grad, None

    loss = call_loss(run, logits.reshape(-1, bins), None, target.reshape(-1),
                     None if weight is None else weight.reshape(-1), channel_dim=1)
    return loss.reshape(target.shape) if reduction == "none" else loss
