"""Triton kernel, launcher and op layer of the sigmoid-type detector losses (issue #24): quality
focal, varifocal and asymmetric, one kernel for the three (the loss is a constexpr).

The per-element formulas are those of csrc/detector_sigmoid_math.h (the CPU and CUDA kernels),
written again in Triton: float32 math for every input dtype, e = e^-|x|, p = 1 / (1 + e) or
e / (1 + e) and q = 1 - p computed the same way (no 1 - p anywhere), BCE = y softplus(-x) +
(1 - y) softplus(x) (a term skipped where its factor is 0), dBCE/dx = p (1 - y) - q y.

Layout: the logits are (M, C) rows (the loss functions below reshape (..., C) first). A program
owns BLOCK_R rows and walks the C columns in BLOCK_C chunks, so a row's loss (quality focal's
'none' is per row) is summed in registers; reductions write one float32 partial per program,
summed by torch (no atomics: deterministic). Labels are read once per row (no one-hot), the
logits and a dense target once, the gradient written once. Offsets are int64.

Op layer as fused_losses/_triton/ops.py: a custom op ``fused_losses_triton::detector_sigmoid``
returning (loss, unit-cotangent gradient), its fake kernel, and the autograd formula of
fused_losses._ops (save_gradients / logits_gradient).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_losses._ops import call_loss
from fused_losses._triton import launch
from fused_losses._triton.kernels import _cast, _exp_libm, _log1p
from fused_losses._triton.ops import _NS, _fake_grad, _fake_loss, _logits_grad, _nones, _save_grads

QUALITY_FOCAL, VARIFOCAL, ASYMMETRIC = 0, 1, 2
_KINDS = {"quality_focal": QUALITY_FOCAL, "varifocal": VARIFOCAL, "asymmetric": ASYMMETRIC}
_QFL = tl.constexpr(QUALITY_FOCAL)
_VFL = tl.constexpr(VARIFOCAL)
# flags bits (fused_losses._backends.cpu_backend.DETECTOR_FLAGS, csrc/detector_sigmoid_math.h)
_ACTIVATED, _IOU_WEIGHTED, _DETACH_MODULATION, _DETACH_FOCUSING = 1, 2, 4, 8


@triton.jit
def _det_pow(base, exponent):
    """base ** exponent for base >= 0 (0 ** 0 = 1, 0 ** e = 0), exponents 1, 2, 3, 4 as exact
    products (QFL/VFL's 2, ASL's 4 and their derivatives' 1 and 3), exp2(e log2 b) otherwise."""
    safe = tl.where(base > 0, base, 1.0)
    powered = tl.exp2(exponent * tl.log2(safe))
    b2 = base * base
    powered = tl.where(exponent == 1.0, base, powered)
    powered = tl.where(exponent == 2.0, b2, powered)
    powered = tl.where(exponent == 3.0, b2 * base, powered)
    powered = tl.where(exponent == 4.0, b2 * b2, powered)
    return tl.where(base > 0, powered, tl.where(exponent == 0, 1.0, 0.0))


@triton.jit
def _det_dpow(base, exponent):
    """d(base^e)/dbase, 0 at base = 0 (reference._PowSafe) and for e = 0."""
    return tl.where((base > 0) & (exponent != 0), exponent * _det_pow(base, exponent - 1.0), 0.0)


@triton.jit
def _element(x, y, positive, p0, p1, p2, p3, log_eps, KIND: tl.constexpr, ACTIVATED: tl.constexpr,
             IOU_WEIGHTED: tl.constexpr, DETACH: tl.constexpr):
    """(loss, dloss/dx) of one element (csrc/detector_sigmoid_math.h). DETACH: VFL's
    detach_modulation or ASL's detach_focusing."""
    if KIND == _QFL and ACTIVATED:
        s = x
        log_s = tl.maximum(tl.log(s), -100.0)
        log_1ms = tl.maximum(_log1p(-s), -100.0)
        bce = -(y * log_s + (1.0 - y) * log_1ms)
        dbce = (s - y) / tl.maximum((1.0 - s) * s, 1e-12)
        d = y - s
        dist = tl.abs(d)
        mod = _det_pow(dist, p0)
        dmod = _det_dpow(dist, p0)
        loss = bce * mod
        dloss = dbce * mod + tl.where(d > 0, -bce * dmod, bce * dmod)
    else:
        e = _exp_libm(-tl.abs(x))
        inv = 1.0 / (1.0 + e)
        p = tl.where(x >= 0, inv, e * inv)
        q = tl.where(x >= 0, e * inv, inv)
        l1p = _log1p(e)
        softplus_neg = tl.maximum(-x, 0.0) + l1p  # -log p
        softplus_pos = tl.maximum(x, 0.0) + l1p  # -log q
        bce = tl.where(y != 0, y * softplus_neg, 0.0) + tl.where(y != 1, (1.0 - y) * softplus_pos, 0.0)
        pmy = tl.where(y != 1, (1.0 - y) * p, 0.0) - tl.where(y != 0, y * q, 0.0)
        pq = p * q
        if KIND == _QFL:
            d = y * q - (1.0 - y) * p
            dist = tl.abs(d)
            mod = _det_pow(dist, p0)
            dmod = _det_dpow(dist, p0)
            loss = bce * mod
            dloss = pmy * mod + tl.where(dmod == 0, 0.0, tl.where(d > 0, -bce, bce) * dmod * pq)
        elif KIND == _VFL:
            if IOU_WEIGHTED:
                f = y
            else:
                f = tl.full(y.shape, 1.0, tl.float32)
            m = _det_pow(p, p1)
            if DETACH:
                chain = tl.zeros_like(m)
            else:
                chain = tl.where(p1 != 0, bce * p1 * m * q, 0.0)
            loss = tl.where(positive, bce * f, bce * (p0 * m))
            dloss = tl.where(positive, pmy * f, p0 * (pmy * m + chain))
        else:
            # ASL: p0 gamma_pos, p1 gamma_neg, p2 clip, p3 eps
            has_eps = p3 > 0
            log_sig_pos = tl.minimum(x, 0.0) - l1p
            log_sig_neg = tl.minimum(-x, 0.0) - l1p
            pos_clamped = has_eps & (log_sig_pos < log_eps)
            log_pos = tl.where(pos_clamped, log_eps, log_sig_pos)
            dlog_pos = tl.where(pos_clamped, 0.0, q)
            raw = q + p2
            pn = tl.minimum(raw, 1.0)
            dpn = tl.where(raw <= 1.0, -pq, 0.0)
            pn_clamped = has_eps & (pn < p3)
            log_neg_clip = tl.where(pn_clamped, log_eps, tl.log(tl.where(pn_clamped, 1.0, pn)))
            dlog_neg_clip = tl.where(pn_clamped, 0.0, dpn / pn)
            sh = p - p2
            shifted_clip = tl.maximum(sh, 0.0)
            dshifted_clip = tl.where(sh >= 0, pq, 0.0)
            neg_clamped = has_eps & (log_sig_neg < log_eps)
            log_neg_plain = tl.where(neg_clamped, log_eps, log_sig_neg)
            dlog_neg_plain = tl.where(neg_clamped, 0.0, -p)
            clipped = p2 > 0
            log_neg = tl.where(clipped, log_neg_clip, log_neg_plain)
            dlog_neg = tl.where(clipped, dlog_neg_clip, dlog_neg_plain)
            shifted = tl.where(clipped, shifted_clip, p)
            dshifted = tl.where(clipped, dshifted_clip, pq)
            base = -(y * log_pos + (1.0 - y) * log_neg)
            dbase = -(y * dlog_pos + (1.0 - y) * dlog_neg)
            omp = y * q + (1.0 - y) * shifted
            g = p0 * y + p1 * (1.0 - y)
            w = _det_pow(omp, g)
            loss = base * w
            dloss = dbase * w
            if not DETACH:
                domp = -y * pq + (1.0 - y) * dshifted
                dloss = dloss + base * _det_dpow(omp, g) * domp
    return loss, dloss


@triton.jit
def detector_sigmoid_kernel(
    X, T, SCORE, W, SCALE,  # inputs: logits (M, C), dense target (M, C) or labels (M,), score (M,), weight, grad scale
    LOSS, PARTIAL, GRAD,  # outputs
    M, C, ignore_index, p0, p1, p2, p3, log_eps,
    KIND: tl.constexpr, LABELS: tl.constexpr, ACTIVATED: tl.constexpr, IOU_WEIGHTED: tl.constexpr,
    DETACH: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_PER_ELEM: tl.constexpr, STORE_ELEMS: tl.constexpr,
    STORE_ROWS: tl.constexpr, REDUCE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """BLOCK_R rows per program, C walked in BLOCK_C columns. Ignored rows (labels ==
    ignore_index) and zero-weight entries: 0 loss, 0 gradient, logits not read (a NaN there
    cannot leak). STORE_ELEMS: elementwise 'none' loss; STORE_ROWS: per-row 'none' loss (QFL);
    REDUCE: one partial sum per program. GRAD = SCALE * dloss/dx."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_in = rows < M
    if LABELS:
        label = tl.load(T + rows, mask=row_in, other=0).to(tl.int64)
        row_valid = row_in & (label != ignore_index)
        score = tl.load(SCORE + rows, mask=row_valid, other=0.0).to(tl.float32)
    else:
        row_valid = row_in
    if HAS_WEIGHT:
        if not WEIGHT_PER_ELEM:
            w_row = tl.load(W + rows, mask=row_valid, other=0.0).to(tl.float32)
            row_valid = row_valid & (w_row != 0)
    if WRITE_GRAD:
        scale = tl.load(SCALE)
    row_acc = tl.zeros([BLOCK_R], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        col_in = cols < C
        offs = rows[:, None] * C + cols[None, :]
        in_range = row_in[:, None] & col_in[None, :]
        valid = row_valid[:, None] & col_in[None, :]
        if HAS_WEIGHT:
            if WEIGHT_PER_ELEM:
                w = tl.load(W + offs, mask=valid, other=0.0).to(tl.float32)
            else:
                w = tl.zeros([BLOCK_R, BLOCK_C], tl.float32) + w_row[:, None]
            valid = valid & (w != 0)
        if LABELS:
            positive = label[:, None] == cols[None, :]
            y = tl.where(positive, score[:, None], 0.0)
        else:
            y = tl.load(T + offs, mask=valid, other=0.0).to(tl.float32)
            positive = y > 0
        if ACTIVATED:
            x = tl.load(X + offs, mask=valid, other=0.5).to(tl.float32)
        else:
            x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
        loss, dloss = _element(x, y, positive, p0, p1, p2, p3, log_eps, KIND, ACTIVATED, IOU_WEIGHTED, DETACH)
        if HAS_WEIGHT:
            loss = w * loss
            dloss = w * dloss
        loss = tl.where(valid, loss, 0.0)
        if STORE_ELEMS:
            tl.store(LOSS + offs, _cast(loss, LOSS.dtype.element_ty), mask=in_range)
        if WRITE_GRAD:
            grad = tl.where(valid, dloss * scale, 0.0)
            tl.store(GRAD + offs, _cast(grad, GRAD.dtype.element_ty), mask=in_range)
        row_acc += tl.sum(loss, axis=1)
    if STORE_ROWS:
        tl.store(LOSS + rows, _cast(row_acc, LOSS.dtype.element_ty), mask=row_in)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(row_acc, axis=0))


def _blocks(m: int, c: int) -> tuple[int, int]:
    block_c = min(max(2, triton.next_power_of_2(c)), 256)
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(max(m, 1)), 64))
    return block_r, block_c


def detector_sigmoid(logits: Tensor, target: Tensor, score: Optional[Tensor], loss: str, p0: float, p1: float,
                     p2: float, p3: float, flags: int, ignore_index: int, reduction: str, need_grad: bool,
                     weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The launcher: (M, C) logits -> (loss, unit-cotangent gradient or an empty tensor)."""
    kind = _KINDS[loss]
    m, c = logits.shape
    per_row = kind == QUALITY_FOCAL
    none_shape = (m,) if per_row else (m, c)
    if logits.numel() == 0:
        return launch._empty_result(logits, none_shape, reduction), launch._grad_like(logits, need_grad, reduction)
    x = logits.contiguous()
    labels = not target.is_floating_point()
    t = target.contiguous()
    if labels:
        valid_rows = (t != ignore_index).sum()
        n_valid = valid_rows if per_row else valid_rows * c
    else:
        n_valid = torch.full((), m if per_row else m * c, dtype=torch.int64, device=x.device)
    count, scale = launch._sigmoid_scale(reduction, n_valid, x.device)
    block_r, block_c = _blocks(m, c)
    grid = (triton.cdiv(m, block_r),)
    dev = x.device
    out = torch.empty(none_shape, dtype=logits.dtype, device=dev) if reduction == "none" else scale
    partial = torch.empty(grid[0], dtype=torch.float32, device=dev) if reduction != "none" else scale
    grad = launch._grad_like(logits, need_grad, reduction)
    w, per_elem = launch._weight_args(weight, m * c)
    detector_sigmoid_kernel[grid](
        x, t, scale if score is None else score.contiguous(), scale if w is None else w, scale,
        out, partial, grad if need_grad else x,
        m, c, int(ignore_index), float(p0), float(p1), float(p2), float(p3),
        math.log(p3) if p3 > 0 else 0.0,
        KIND=kind, LABELS=labels, ACTIVATED=bool(flags & _ACTIVATED), IOU_WEIGHTED=bool(flags & _IOU_WEIGHTED),
        DETACH=bool(flags & (_DETACH_MODULATION | _DETACH_FOCUSING)), HAS_WEIGHT=w is not None,
        WEIGHT_PER_ELEM=per_elem, STORE_ELEMS=reduction == "none" and not per_row,
        STORE_ROWS=reduction == "none" and per_row, REDUCE=reduction != "none", WRITE_GRAD=need_grad,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return launch._finish(partial, out, reduction, count, none_shape), grad


# ---- op layer --------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::detector_sigmoid", mutates_args=())
def detector_sigmoid_op(logits: Tensor, target: Tensor, score: Optional[Tensor], loss: str, p0: float, p1: float,
                        p2: float, p3: float, flags: int, ignore_index: int, reduction: str, need_grad: bool,
                        weight: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    return detector_sigmoid(logits, target, score, loss, p0, p1, p2, p3, flags, ignore_index, reduction, need_grad,
                            weight)


@detector_sigmoid_op.register_fake
def _(logits, target, score, loss, p0, p1, p2, p3, flags, ignore_index, reduction, need_grad, weight=None):
    shape = logits.shape[:-1] if loss == "quality_focal" else logits.shape
    return _fake_loss(logits, shape, reduction), _fake_grad(logits, need_grad, reduction)


def _setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 10, 1, 11)
    ctx.channel_dim = 1 if inputs[3] == "quality_focal" else None


def _backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, ctx.channel_dim),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::detector_sigmoid", _backward, setup_context=_setup)


# ---- the loss functions the 'triton' backend serves (signatures of fused_losses.reference) ----
def _run(loss, logits, target, score, params, flags, ignore_index, reduction, weight):
    c = logits.shape[-1]
    shape = logits.shape
    x = logits.reshape(-1, c)
    t = target.reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
    s = None if score is None else score.reshape(-1)
    w = None if weight is None else weight.reshape(-1)
    p0, p1, p2, p3 = (float(v) for v in params)

    def run(need_grad, xx, _features, tt, ss, ww):
        out, grad = detector_sigmoid_op(xx, tt, ss, loss, p0, p1, p2, p3, int(flags), int(ignore_index), reduction,
                                        need_grad, ww)
        return out, grad, None

    per_row = loss == "quality_focal"
    out = call_loss(run, x, None, t, s, w, channel_dim=1 if per_row else None)
    if reduction == "none":
        return out.reshape(shape[:-1] if per_row else shape)
    return out


def quality_focal(logits, target, *, score=None, beta=2.0, activated=False, ignore_index=-100, reduction="mean",
                  weight=None):
    return _run("quality_focal", logits, target, score, (beta, 0.0, 0.0, 0.0), _ACTIVATED if activated else 0,
                ignore_index, reduction, weight)


def varifocal(logits, target, *, score=None, alpha=0.75, gamma=2.0, iou_weighted=True, detach_modulation=False,
              ignore_index=-100, reduction="mean", weight=None):
    flags = (_IOU_WEIGHTED if iou_weighted else 0) | (_DETACH_MODULATION if detach_modulation else 0)
    return _run("varifocal", logits, target, score, (alpha, gamma, 0.0, 0.0), flags, ignore_index, reduction, weight)


def asymmetric(logits, target, *, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, eps=1e-8, detach_focusing=False,
               reduction="sum", weight=None):
    return _run("asymmetric", logits, target, None, (gamma_pos, gamma_neg, 0.0 if clip is None else clip, eps),
                _DETACH_FOCUSING if detach_focusing else 0, -100, reduction, weight)
