"""Triton kernels of Seesaw and EQLv2 (issue #25), namespace ``fused_losses_triton``.

The ops have the schemas of the compiled ones (csrc/op_schemas.h: ``seesaw_forward``,
``eqlv2_forward``), so the one op layer of fused_losses._longtail (fake kernels, autograd, the
in-place state updates around the op, process_group) serves them as it serves the C++/CUDA
kernels. All math is float32 (fp16/bf16 loaded and upcast); no float atomics: each program
writes its own partial (per-row losses; EQLv2's per-class statistics per block of rows), summed
afterwards by torch in a fixed order (float64 for the statistics).

- ``seesaw_row_kernel``: one program per row, BLOCK_C columns at a time: max and sum of the
  exponentials (the detached softmax), c_t = m + log s + log max(s_t, eps), then z = x + p
  min(0, log N_j - log N_t) + q max(0, x_j - c_t) (z_t = x_t), its max, its sums, the loss
  -log softmax(z)_t and the gradient w (softmax(z) - onehot) / D; the objectness pair.
- ``eqlv2_block_kernel``: one program per ROWS rows, BLOCK_C columns at a time: loss, gradient
  and the column sums of |sigmoid(x) - y| * eqlv2 weight * w over positives and negatives.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses import _longtail
from fused_losses._triton import launch
from fused_losses._triton.kernels import _cast, _log1p

_NS = "fused_losses_triton"
_EQLV2_ROWS = 64  # rows per EQLv2 program (the statistics' partial sums)


@triton.jit
def seesaw_row_kernel(X, T, LOGN, W, GRAD, LOSS_CLS, LOSS_OBJ, INV, C, CT, ignore_index, p, q, eps,
                      OBJECTNESS: tl.constexpr, HAS_W: tl.constexpr, NEED_GRAD: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    xbase = X + row * CT
    gbase = GRAD + row * CT
    t = tl.load(T + row)
    valid = t != ignore_index
    w = 1.0
    if HAS_W:
        w = tl.load(W + row).to(tl.float32)
    active = valid & (w != 0.0)
    fg = active & (t < C)
    t_safe = tl.where(fg, t, 0)
    inv_fg = tl.load(INV)
    inv_valid = tl.load(INV + 1)
    cols0 = tl.arange(0, BLOCK_C)
    # the detached softmax: max and sum
    m = -float("inf")
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        x = tl.load(xbase + cols, mask=cols < C, other=-float("inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(x, axis=0))
    s = 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        x = tl.load(xbase + cols, mask=cols < C, other=-float("inf")).to(tl.float32)
        s += tl.sum(tl.where(cols < C, tl.exp(x - m), 0.0), axis=0)
    xt = tl.load(xbase + t_safe).to(tl.float32)
    st = tl.exp(xt - m) / s
    c_t = m + tl.log(s) + tl.log(tl.maximum(st, eps))
    lnt = tl.load(LOGN + t_safe)
    # z and its max
    mz = -float("inf")
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cm = cols < C
        x = tl.load(xbase + cols, mask=cm, other=0.0).to(tl.float32)
        ln = tl.load(LOGN + cols, mask=cm, other=0.0)
        z = x + p * tl.minimum(ln - lnt, 0.0) + q * tl.maximum(x - c_t, 0.0)
        z = tl.where(cols == t_safe, xt, z)
        mz = tl.maximum(mz, tl.max(tl.where(cm, z, -float("inf")), axis=0))
    sz = 0.0
    so = 0.0
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + cols0
        cm = cols < C
        x = tl.load(xbase + cols, mask=cm, other=0.0).to(tl.float32)
        ln = tl.load(LOGN + cols, mask=cm, other=0.0)
        z = x + p * tl.minimum(ln - lnt, 0.0) + q * tl.maximum(x - c_t, 0.0)
        z = tl.where(cols == t_safe, xt, z)
        e = tl.where(cm, tl.exp(z - mz), 0.0)
        sz += tl.sum(e, axis=0)
        so += tl.sum(tl.where(cols == t_safe, 0.0, e), axis=0)
    log_pt = tl.where(xt == mz, -_log1p(so), (xt - mz) - tl.log(sz))
    tl.store(LOSS_CLS + row, tl.where(fg, -log_pt * w, 0.0))
    if NEED_GRAD:
        k = tl.where(fg, w * inv_fg, 0.0)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cols0
            cm = cols < C
            x = tl.load(xbase + cols, mask=cm, other=0.0).to(tl.float32)
            ln = tl.load(LOGN + cols, mask=cm, other=0.0)
            z = x + p * tl.minimum(ln - lnt, 0.0) + q * tl.maximum(x - c_t, 0.0)
            z = tl.where(cols == t_safe, xt, z)
            g = k * tl.exp(z - mz) / sz
            g = tl.where(cols == t_safe, -k * (so / sz), g)
            g = tl.where(fg, g, 0.0)
            tl.store(gbase + cols, _cast(g, GRAD.dtype.element_ty), mask=cm)
    if OBJECTNESS:
        o = tl.where(t == C, 1, 0)
        a = tl.load(xbase + C + o).to(tl.float32)
        b = tl.load(xbase + C + 1 - o).to(tl.float32)
        m2 = tl.maximum(a, b)
        ea = tl.exp(a - m2)
        eb = tl.exp(b - m2)
        log_po = tl.where(a == m2, -_log1p(eb), (a - m2) - tl.log(ea + eb))
        tl.store(LOSS_OBJ + row, tl.where(active, -log_po * w, 0.0))
        if NEED_GRAD:
            k2 = tl.where(active, w * inv_valid, 0.0)
            other = eb / (ea + eb)
            tl.store(gbase + C + o, _cast(-k2 * other, GRAD.dtype.element_ty))
            tl.store(gbase + C + 1 - o, _cast(k2 * other, GRAD.dtype.element_ty))


@triton.jit
def eqlv2_block_kernel(X, T, W, RATIO, GRAD, LOSS_EL, LOSS_PART, STATS, INV, M, C, CT, ignore_index, gamma, mu,
                       alpha, HAS_W: tl.constexpr, PER_ELEMENT: tl.constexpr, NEED_GRAD: tl.constexpr,
                       NONE: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    t = tl.load(T + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    inv = tl.load(INV)
    loss_acc = tl.zeros((ROWS,), dtype=tl.float32)
    cols0 = tl.arange(0, BLOCK_C)
    for c0 in range(0, CT, BLOCK_C):
        cols = c0 + cols0
        cm = cols < CT
        ratio = tl.load(RATIO + cols, mask=cols < C, other=0.0)
        f = 1.0 / (1.0 + tl.exp(-(gamma * (ratio - mu))))
        w_neg = tl.where(cols < C, f, 1.0)
        w_pos = tl.where(cols < C, 1.0 + alpha * (1.0 - f), 1.0)
        offs = rows[:, None] * CT + cols[None, :]
        mask = rmask[:, None] & cm[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = t[:, None] == cols[None, :]
        w = tl.full((ROWS, BLOCK_C), 1.0, tl.float32)
        if HAS_W:
            if PER_ELEMENT:
                w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                w = w * tl.load(W + rows, mask=rmask, other=0.0).to(tl.float32)[:, None]
        act = mask & valid[:, None] & (w != 0.0)
        ax = tl.abs(x)
        en = tl.exp(-ax)
        inv1 = 1.0 / (1.0 + en)
        sig_pos = tl.where(x >= 0, inv1, en * inv1)
        sig_neg = tl.where(x >= 0, en * inv1, inv1)
        sp = _log1p(en)
        bce = tl.where(y, tl.maximum(-x, 0.0) + sp, tl.maximum(x, 0.0) + sp)
        eql = tl.where(y, w_pos[None, :], w_neg[None, :])
        l = tl.where(act, w * eql * bce, 0.0)
        loss_acc += tl.sum(l, axis=1)
        if NONE:
            tl.store(LOSS_EL + offs, _cast(l, LOSS_EL.dtype.element_ty), mask=mask)
        if NEED_GRAD:
            d = tl.where(y, -sig_neg, sig_pos)
            g = tl.where(act, w * eql * d * inv, 0.0)
            tl.store(GRAD + offs, _cast(g, GRAD.dtype.element_ty), mask=mask)
        gst = tl.where(act & (cols < C)[None, :], tl.where(y, sig_neg, sig_pos) * eql * w, 0.0)
        pos = tl.sum(tl.where(y, gst, 0.0), axis=0)
        neg = tl.sum(tl.where(y, 0.0, gst), axis=0)
        smask = cols < C
        tl.store(STATS + pid * 2 * C + cols, pos, mask=smask)
        tl.store(STATS + pid * 2 * C + C + cols, neg, mask=smask)
    tl.store(LOSS_PART + pid, tl.sum(loss_acc, axis=0))


def _block_c(n: int) -> int:
    return min(1024, triton.next_power_of_2(max(n, 16)))


def seesaw_forward_impl(logits: Tensor, target: Tensor, cum_samples: Tensor, p: float, q: float, eps: float,
                        objectness: bool, ignore_index: int, reduction: str, compute_grad: bool,
                        weight: Optional[Tensor] = None, split: bool = False):
    x = logits.contiguous()
    n, ct = x.shape
    c = ct - (2 if objectness else 0)
    t = target.reshape(-1).long().contiguous()
    valid = t != ignore_index
    n_valid = valid.sum()
    n_fg = (valid & (t < c)).sum()
    mean = reduction == "mean"
    inv = torch.stack([n_fg, n_valid]).clamp_min(1).to(torch.float32).reciprocal() if mean else \
        torch.ones(2, dtype=torch.float32, device=x.device)
    logn = cum_samples[:c].clamp_min(1.0).log().contiguous()
    loss_cls = torch.empty(n, dtype=torch.float32, device=x.device)
    loss_obj = torch.zeros(n, dtype=torch.float32, device=x.device)
    grad = launch._grad_like(x, compute_grad, reduction)
    w = weight.reshape(-1).contiguous() if weight is not None else loss_cls
    if n > 0:
        seesaw_row_kernel[(n,)](x, t, logn, w, grad if compute_grad else loss_cls, loss_cls, loss_obj, inv, c, ct,
                                ignore_index, float(p), float(q), float(eps), OBJECTNESS=objectness,
                                HAS_W=weight is not None, NEED_GRAD=compute_grad, BLOCK_C=_block_c(c))
    out_dtype = torch.promote_types(logits.dtype, torch.float32)
    empty = torch.empty(0, dtype=out_dtype, device=x.device)

    def reduce(v, count):
        if reduction == "none":
            return v.to(logits.dtype)
        total = v.to(torch.float64).sum()
        if mean:
            total = total / count.clamp_min(1).to(torch.float64)
        return total.to(out_dtype)

    if split:
        return reduce(loss_cls, n_fg), (reduce(loss_obj, n_valid) if objectness else empty), grad
    if reduction == "none":
        return (loss_cls + loss_obj).to(logits.dtype), empty, grad
    total = reduce(loss_cls, n_fg)
    if objectness:
        total = total + reduce(loss_obj, n_valid)
    return total, empty, grad


def eqlv2_forward_impl(logits: Tensor, target: Tensor, state: Tensor, gamma: float, mu: float, alpha: float,
                       objectness: bool, ignore_index: int, reduction: str, compute_grad: bool,
                       weight: Optional[Tensor] = None):
    x = logits.contiguous()
    ct = x.shape[-1]
    c = ct - (1 if objectness else 0)
    m = x.numel() // ct
    t = target.reshape(-1).long().contiguous()
    n_valid = (t != ignore_index).sum()
    inv = (n_valid.clamp_min(1).to(torch.float32).reciprocal() if reduction == "mean"
           else torch.ones((), dtype=torch.float32, device=x.device)).reshape(1)
    programs = triton.cdiv(m, _EQLV2_ROWS)
    stats = torch.zeros((max(programs, 1), 2 * c), dtype=torch.float32, device=x.device)
    loss_part = torch.zeros(max(programs, 1), dtype=torch.float32, device=x.device)
    none = reduction == "none"
    loss_el = torch.empty(x.shape, dtype=torch.float32, device=x.device) if none else loss_part
    grad = launch._grad_like(x, compute_grad, reduction)
    per_element = weight is not None and weight.numel() == x.numel() and ct > 1
    w = weight.reshape(-1).contiguous() if weight is not None else loss_part
    ratio = state[2].contiguous()
    if programs > 0:
        eqlv2_block_kernel[(programs,)](x, t, w, ratio, grad if compute_grad else loss_part, loss_el, loss_part, stats,
                                        inv, m, c, ct, ignore_index, float(gamma), float(mu), float(alpha),
                                        HAS_W=weight is not None, PER_ELEMENT=per_element, NEED_GRAD=compute_grad,
                                        NONE=none, ROWS=_EQLV2_ROWS, BLOCK_C=_block_c(ct))
    batch_stats = stats.to(torch.float64).sum(dim=0).reshape(2, c)
    if none:
        loss = loss_el.to(logits.dtype)
    else:
        loss = loss_part.to(torch.float64).sum()
        if reduction == "mean":
            loss = loss / n_valid.clamp_min(1).to(torch.float64)
        loss = loss.to(torch.promote_types(logits.dtype, torch.float32))
    return loss, grad, batch_stats


def _scale_fresh(saved: Tensor, grad_loss: Tensor, dtype: torch.dtype) -> Tensor:
    """saved x grad_output, fresh, in `dtype`: a per-row ('none' Seesaw) cotangent is broadcast
    over the columns; EQLv2's 'none' cotangent has the saved gradient's shape."""
    math = torch.promote_types(saved.dtype, torch.float32)
    if 0 < grad_loss.dim() < saved.dim():
        grad_loss = grad_loss.unsqueeze(-1)
    return (saved.to(math) * grad_loss.to(math)).to(dtype)


_LIB = torch.library.Library(_NS, "FRAGMENT")
_LIB.define(
    "seesaw_forward(Tensor logits, Tensor target, Tensor cum_samples, float p, float q, float eps, "
    "bool objectness, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None, bool split=False) "
    "-> (Tensor loss, Tensor loss_objectness, Tensor grad_logits)")
_LIB.define(
    "eqlv2_forward(Tensor logits, Tensor target, Tensor state, float gamma, float mu, float alpha, "
    "bool objectness, int ignore_index, str reduction, bool compute_grad, Tensor? weight=None) "
    "-> (Tensor loss, Tensor grad_logits, Tensor batch_stats)")
for _key in ("CPU", "CUDA"):
    _LIB.impl("seesaw_forward", seesaw_forward_impl, _key)
    _LIB.impl("eqlv2_forward", eqlv2_forward_impl, _key)
_longtail.register(_NS, torch.ops.fused_losses_triton.scale_grad_, _scale_fresh)


def _ns():
    return torch.ops.fused_losses_triton


def seesaw(logits, target, cum_samples, **kwargs):
    return _longtail.seesaw(_ns(), logits, target, cum_samples, **kwargs)


def eqlv2(logits, target, state, **kwargs):
    return _longtail.eqlv2(_ns(), logits, target, state, **kwargs)
