"""Triton kernels of the 'triton' backend (launchers: fused_losses._triton.launch).

All math is float32 whatever the logits dtype (fp32/fp16/bf16 are loaded and upcast); every
offset is int64 (N x C over 2^31 elements happens). No float atomics: reductions are written as
one partial per program and summed by torch (deterministic).

Layouts
- Softmax family: logits seen as (N, C, S) with arbitrary strides (S = prod(d...), S = 1 for
  (N, C)), so channel-second (N, C, H, W) is read in place; row r = n * S + s is one sample.
  A program owns BLOCK_M rows and walks C in BLOCK_C columns.
- Sigmoid family: logits flattened to (numel,) = (rows x C), contiguous; float targets of the
  same layout, or integer labels per row (label == C is background, never a one-hot).

Every softmax-family gradient is  dL/dx_ij = coef_i * (softmax_ij - [j == t_i])  with one scalar
coef_i per row (from_logits=False: only the target column, dL/dp_t).
"""
import os

import triton
import triton.language as tl

from triton.language.extra import libdevice

# Under TRITON_INTERPRET (CPU tests) two things differ from the GPU: the interpreter's
# float32 -> bfloat16 cast truncates (the GPU rounds to nearest even), so bf16 outputs are
# rounded by hand; and libdevice is not available (tl.exp is numpy's exact exp there).
_INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# Kinds of the softmax row kernel (plain ints for the launchers; the kernels read the
# tl.constexpr twins, the only globals a compiled kernel may use).
FOCAL = 0  # softmax focal (gamma = 0, alpha = None: cross entropy)
STATS = 1  # per-row log p_t, 1 - p_t and logsumexp only (OHEM, GHM-C softmax)
IB = 2  # influence-balanced (and IB-focal)
# Kinds of the sigmoid elementwise kernel.
SIGMOID_FOCAL = 0
GHMC_SIGMOID = 1
_FOCAL = tl.constexpr(FOCAL)
_STATS = tl.constexpr(STATS)
_SIGMOID_FOCAL = tl.constexpr(SIGMOID_FOCAL)


# --------------------------------------------------------------------------------------------
# float32 helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _pow(base, exponent):
    """base ** exponent for base > 0, and 0 ** 0 = 1, 0 ** e = 0 for e > 0 (runtime exponent).
    Exponents 1 and 2 (gamma = 2 and its derivative) are exact products: exp2(e log2 b) costs
    |e log2 b| 2^-24 relative (4e-6 at b = 1e-13, a confident sample's 1 - p_t)."""
    safe = tl.where(base > 0, base, 1.0)
    powered = tl.exp2(exponent * tl.log2(safe))
    powered = tl.where(exponent == 2.0, base * base, tl.where(exponent == 1.0, base, powered))
    return tl.where(base > 0, powered, tl.where(exponent == 0, 1.0, 0.0))


@triton.jit
def _log1p(v):
    """log(1 + v) accurate for small v (Goldberg's trick; the exact log1p is not in tl)."""
    u = 1.0 + v
    d = u - 1.0
    return tl.where(d == 0, v, tl.log(u) * (v / tl.where(d == 0, 1.0, d)))


@triton.jit
def _expm1(v):
    """exp(v) - 1 accurate for small v (Kahan's trick)."""
    u = tl.exp(v)
    d = u - 1.0
    ok = (d != 0) & (d != -1.0)
    return tl.where(ok, d * (v / tl.log(tl.where(ok, u, 2.0))), tl.where(d == 0, v, d))


@triton.jit
def _cast(v, dtype: tl.constexpr):
    """float32 -> output dtype, round to nearest even (see _INTERPRETING)."""
    if _INTERPRETING and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v == v, rounded, v.to(tl.bfloat16))
    else:
        return v.to(dtype)


@triton.jit
def _exp_libm(v):
    """exp as torch computes it on CUDA (libdevice expf, range-reduced: ~1 ulp at any argument).
    tl.exp is the faster ex2.approx(v log2 e) path: a few ulps away, which would move a GHM-C g
    across a bin edge now and then, and its rounding of v log2 e costs |v| 2^-24 relative (6e-6
    at v = -100), so the softmax statistics (the loss of a confident sample is its s_oth) use
    this one too."""
    if _INTERPRETING:
        return tl.exp(v)
    else:
        return libdevice.exp(v)


@triton.jit
def _focal_term(logpt, one_minus_pt, gamma):
    """L(l) = (1 - p_t)^gamma * (-l) with l = log p_t and dL/dl, finite at p_t = 1 for every gamma:
    dL/dl = gamma * p_t * (1 - p_t)^gamma * r - (1 - p_t)^gamma, r = l / (1 - p_t) (-> -1)."""
    mod = _pow(one_minus_pt, gamma)
    value = mod * (-logpt)
    r = tl.where(one_minus_pt > 0, logpt / tl.where(one_minus_pt > 0, one_minus_pt, 1.0), -1.0)
    dvalue = tl.where(gamma == 0, -1.0, gamma * tl.exp(logpt) * mod * r - mod)
    return value, dvalue


@triton.jit
def _poly1_term(pt, one_minus_pt, gamma, poly_eps):
    """Poly-1 (#24; losses_math.h poly1_term_parts): epsilon (1 - p_t)^(gamma + 1) and its derivative
    in l = log p_t, -epsilon (gamma + 1) (1 - p_t)^gamma p_t (finite at p_t = 1 for every gamma)."""
    mod = _pow(one_minus_pt, gamma)
    return poly_eps * (mod * one_minus_pt), -poly_eps * (gamma + 1.0) * mod * pt


# --------------------------------------------------------------------------------------------
# Softmax family: one kernel for the per-row statistics, the loss and (optionally) the gradient
# --------------------------------------------------------------------------------------------
@triton.jit
def _two_sum(a, b):
    """(hi, lo) with hi = fl(a + b) and hi + lo = a + b exactly (Knuth's TwoSum, any magnitudes)."""
    hi = a + b
    b_virtual = hi - a
    lo = (a - (hi - b_virtual)) + (b - b_virtual)
    return hi, lo


@triton.jit
def _softmax_log_normaliser(m, s_all, s_oth, x_t):
    """log s = log sum_j e^(x_j - m) for a row with max m, and log p_t = (x_t - m) - log s.

    When the target is the row max (x_t = m, e^(x_t - m) = 1), log s = log1p(s_oth) with s_oth =
    sum_{j != t} e^(x_j - m): exact to a few ulps however small s_oth is (log(s_all) would lose
    s_oth below 2^-24: a confident sample's loss rounded to 0). Otherwise p_t <= 1/2 and log(s_all)
    is accurate to an absolute ~ulp, which is all log p_t (<= -log 2) and e^(x_j - lse) need."""
    log_s = tl.where(x_t == m, _log1p(s_oth), tl.log(s_all))
    return log_s, (x_t - m) - log_s


@triton.jit
def _store_softmax_grad(X, GRAD, xbase, gbase, t, lse_hi, lse_lo, pt_minus_1, coef, valid, in_range, C, sxc, sgc,
                        BLOCK_C: tl.constexpr):
    """GRAD[row, c] = coef_row * (p_rc - [c == t_row]) for valid rows, 0 for the other in-range
    rows: the softmax-family gradient, one read of the row's logits (skipped for invalid rows) and
    one write of its gradient, over C in blocks of BLOCK_C.

    p_rc = e^((x_rc - lse_hi) - lse_lo), the log-sum-exp carried as the unevaluated float32 sum
    hi + lo: a single float32 lse is off by up to half an ulp of |lse| (0.0005 at 1e4), and
    x - lse carries that into every p (relative 5e-4); x - hi is exact when they are close
    (Sterbenz), so p is good to a few ulps at any offset. The target column is pt_minus_1 =
    p_t - 1 = -(1 - p_t), computed by the caller without cancellation (p_t - 1 from p_t rounds
    a confident sample's gradient to 0)."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        cmask = (cols < C)[None, :]
        mask = valid[:, None] & cmask
        x = tl.load(X + xbase[:, None] + cols[None, :] * sxc, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp((x - lse_hi[:, None]) - lse_lo[:, None])
        grad = coef[:, None] * tl.where(cols[None, :] == t[:, None], pt_minus_1[:, None], p)
        grad = tl.where(mask, grad, 0.0)
        tl.store(GRAD + gbase[:, None] + cols[None, :] * sgc, _cast(grad, GRAD.dtype.element_ty),
                 mask=in_range[:, None] & cmask)


@triton.jit
def _one_minus_p_plus_p_log_p(q, logp):
    """(1 - p) + p log p for q = 1 - p in [0, 1] and logp = log p, without cancellation: the series
    sum_{k >= 2} q^k / (k (k - 1)) (every term positive) below q = 1/4, the formula itself above
    (where it cancels by at most a factor 8; p log p -> 0 as p -> 0, never 0 * inf)."""
    # Horner on q^2 (1/2 + q (1/6 + q (1/12 + ...))), k = 2..13: the first term left out, q^14 / 182,
    # is below 0.25^12 * 2 / 182 < 2^-30 of the first, q^2 / 2.
    acc = tl.zeros_like(q) + 1.0 / 156.0
    for k in tl.static_range(12, 1, -1):
        acc = 1.0 / (k * (k - 1)) + q * acc
    series = q * q * acc
    direct = q + tl.exp(logp) * logp
    return tl.where(q < 0.25, series, direct)


@triton.jit
def _class_alpha(CLASS_W, cols, cmask, alpha, HAS_CLASS_W: tl.constexpr):
    """a_c per column: the per-class vector, or the scalar alpha."""
    if HAS_CLASS_W:
        return tl.load(CLASS_W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        return tl.zeros_like(cols).to(tl.float32) + alpha


@triton.jit
def _smoothed_columns(X, CLASS_W, xbase, c0, t, valid, lse_hi, lse_lo, logpt, one_minus_pt, gamma, alpha, smoothing,
                      C, sxc, HAS_CLASS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Columns c0 .. c0 + BLOCK_C of a label-smoothed focal row, read from X (rows in `valid`):
    q_c a_c (q_c = (1 - eps) [c == t] + eps / C), L(l_c) and dL/dl_c (_focal_term) with l_c =
    log p_c = (x_c - hi) - lo, and p_c; with the column indices and masks. The target column
    takes the row's log p_t and 1 - p_t (exact for a confident sample); the other columns
    1 - p_c = -expm1(l_c)."""
    cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
    cmask = cols < C
    mask = valid[:, None] & cmask[None, :]
    x = tl.load(X + xbase[:, None] + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    a_c = _class_alpha(CLASS_W, cols, cmask, alpha, HAS_CLASS_W)
    is_t = cols[None, :] == t[:, None]
    l = (x - lse_hi[:, None]) - lse_lo[:, None]
    p = tl.exp(l)
    l = tl.where(is_t, logpt[:, None], l)
    omp = tl.where(is_t, one_minus_pt[:, None], -_expm1(l))
    value, dvalue = _focal_term(l, omp, gamma)
    qa = (smoothing / C + tl.where(is_t, 1.0 - smoothing, 0.0)) * a_c[None, :]
    return qa, value, dvalue, p, is_t, cols, cmask, mask


@triton.jit
def _smoothed_row_sums(X, CLASS_W, xbase, t, t_safe, valid, lse_hi, lse_lo, logpt, one_minus_pt, gamma, alpha,
                       smoothing, C, sxc, HAS_CLASS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Second pass over a row (label smoothing): loss = sum_c q_c a_c L(l_c), and h_t = q_t a_t
    L'(l_t), h_oth = sum_{c != t} q_c a_c L'(l_c) for the gradient (_store_smoothed_grad)."""
    loss = tl.zeros_like(lse_hi)
    h_oth = tl.zeros_like(lse_hi)
    for c0 in range(0, C, BLOCK_C):
        qa, value, dvalue, _p, is_t, _cols, _cmask, mask = _smoothed_columns(
            X, CLASS_W, xbase, c0, t, valid, lse_hi, lse_lo, logpt, one_minus_pt, gamma, alpha, smoothing, C, sxc,
            HAS_CLASS_W, BLOCK_C)
        loss += tl.sum(tl.where(mask, qa * value, 0.0), axis=1)
        h_oth += tl.sum(tl.where(mask & (~is_t), qa * dvalue, 0.0), axis=1)
    if HAS_CLASS_W:
        a_t = tl.load(CLASS_W + t_safe, mask=valid, other=0.0).to(tl.float32)
    else:
        a_t = tl.zeros_like(lse_hi) + alpha
    _v, d_t = _focal_term(logpt, one_minus_pt, gamma)
    h_t = (1.0 - smoothing + smoothing / C) * a_t * d_t
    return loss, tl.where(valid, h_t, 0.0), tl.where(valid, h_oth, 0.0)


@triton.jit
def _store_smoothed_grad(X, GRAD, CLASS_W, xbase, gbase, t, valid, in_range, lse_hi, lse_lo, logpt, one_minus_pt,
                         h_t, h_oth, coef, gamma, alpha, smoothing, C, sxc, sgc,
                         HAS_CLASS_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """GRAD[row, j] = coef_row * (h_j - p_j H), H = h_t + h_oth (h_c = q_c a_c L'(l_c)): the
    gradient of sum_c q_c a_c L(log p_c). The target column is written as h_t (1 - p_t) - p_t h_oth
    (the same value without the cancellation of h_t - p_t h_t for a confident sample). Invalid
    rows: 0, logits not read."""
    big_h = h_t + h_oth
    g_t = h_t * one_minus_pt - tl.exp(logpt) * h_oth
    for c0 in range(0, C, BLOCK_C):
        qa, _value, dvalue, p, is_t, cols, cmask, mask = _smoothed_columns(
            X, CLASS_W, xbase, c0, t, valid, lse_hi, lse_lo, logpt, one_minus_pt, gamma, alpha, smoothing, C, sxc,
            HAS_CLASS_W, BLOCK_C)
        grad = coef[:, None] * tl.where(is_t, g_t[:, None], qa * dvalue - p * big_h[:, None])
        grad = tl.where(mask, grad, 0.0)
        tl.store(GRAD + gbase[:, None] + cols[None, :] * sgc, _cast(grad, GRAD.dtype.element_ty),
                 mask=in_range[:, None] & cmask[None, :])


@triton.jit
def softmax_rows_kernel(
    X, T, CLASS_W, FEAT, SCALE, W,  # inputs: logits, targets, per-class alpha/weight, ib feature norms, grad scale,
    #                                 sample weights
    LOSS, PARTIAL, LOGPT, OMP, LSE, GRAD, DFEAT,  # outputs
    M, C, S, sxn, sxc, sxs, sgn, sgc, sgs,
    gamma, alpha, epsilon, smoothing, ignore_index,
    KIND: tl.constexpr, HAS_CLASS_W: tl.constexpr, HAS_IGNORE: tl.constexpr, FROM_LOGITS: tl.constexpr,
    DETACH_FACTOR: tl.constexpr, IB_FOCAL: tl.constexpr, WRITE_GRAD: tl.constexpr, STORE_ROWS: tl.constexpr,
    REDUCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    poly_eps=0.0, POLY: tl.constexpr = False,
):
    """Row-wise online softmax over C, then a per-row loss l_i and coefficient coef_i.
    POLY (FOCAL, #24): + poly_eps (1 - p_t)^(gamma + 1) per row (_poly1_term; not scaled by alpha;
    label smoothing: 1 - p_t = 1 - sum_c q_c p_c = (1 - eps)(1 - p_t) + eps (1 - 1/C), a function of
    log p_t whose derivative joins h_t); compiled out otherwise.

    Pass 1 (from_logits): m = max_j x_j, s = sum_j e^(x_j - m), s_t' = sum_{j != t} e^(x_j - m)
      (one rescale per block), log s (= log1p(s_t') when t is the max, _softmax_log_normaliser),
      log p_t = (x_t - m) - log s, 1 - p_t = s_t' / s, lse = m + log s kept as hi + lo
      (_two_sum). No cancellation anywhere: a confident sample (p_t -> 1) keeps its loss and its
      gradient to a few ulps, down to float32's smallest normal.
    FOCAL: l = alpha_t (1 - p_t)^gamma (-log p_t); coef = -alpha_t dL/dlog p_t.
           from_logits=False: x holds p; log p_t = log x_t, grad only at t: alpha_t dL/dl / x_t.
           HAS_WEIGHT: l and the gradient times w_row; a row with w = 0 is skipped like an ignored
           one (0, logits never read: a NaN there cannot leak). SMOOTH (label smoothing eps):
           l = sum_c q_c a_c L(log p_c), q_c = (1 - eps) [c == t] + eps / C, in a second pass over
           the row (_smoothed_row_sums) and the gradient in a third (_store_smoothed_grad).
    IB:    g = 2 (1 - p_t), factor = alpha / (g f + eps), h = CE_w or (1 - e^-CE_w)^gamma CE_w,
           l = factor h, coef = -(factor dh/dl + h dfactor/dl); DFEAT = dl/df = -h alpha g / (g f + eps)^2.
           For gamma = 0 the two terms of dl/dl cancel as p_t -> 1 (g f >> eps); they are summed
           in closed form instead: dl/dlog p_t = -(factor w / den) (2 f ((1 - p) + p log p) + eps).
    STATS: writes log p_t, 1 - p_t and lse as (hi, lo) pairs ((M, 2), no loss, no grad); the
           caller finishes with torch and softmax_grad_kernel. SMOOTH: also the smoothed cross
           entropy sum_c q_c (-log p_c) into LOSS (float32). Weights are the caller's business.
    Pass 2 (WRITE_GRAD): GRAD_ij = SCALE * coef_i * (p_ij - [j == t_i]) (_store_softmax_grad).
    Ignored rows: loss 0, grad 0, their logits are never read.
    Traffic: logits read once (twice with the gradient pass, the second mostly from cache for
    moderate C), targets once, grad written once; per row a few floats.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    t = tl.load(T + rows, mask=in_range, other=0).to(tl.int64)
    if HAS_IGNORE:
        valid = in_range & (t != ignore_index)
    else:
        valid = in_range
    w = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if HAS_WEIGHT and KIND == _FOCAL:
        w = tl.load(W + rows, mask=valid, other=0.0).to(tl.float32)
        valid = valid & (w != 0)
    t = tl.where(valid, t, 0)
    n = rows // S
    s_idx = rows - n * S
    xbase = n * sxn + s_idx * sxs
    gbase = n * sgn + s_idx * sgs
    # Out-of-range targets never read out of bounds: clamp for the gathers.
    t_safe = tl.minimum(tl.maximum(t, 0), C - 1)

    if FROM_LOGITS:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s_all = tl.zeros([BLOCK_M], tl.float32)
        s_oth = tl.zeros([BLOCK_M], tl.float32)
        x_t = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
            mask = valid[:, None] & (cols < C)[None, :]
            x = tl.load(X + xbase[:, None] + cols[None, :] * sxc, mask=mask, other=float("-inf")).to(tl.float32)
            is_t = cols[None, :] == t[:, None]
            x_t += tl.sum(tl.where(is_t & mask, x, 0.0), axis=1)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            rescale = _exp_libm(m - m_ref)
            e = _exp_libm(x - m_ref[:, None])
            s_all = s_all * rescale + tl.sum(e, axis=1)
            s_oth = s_oth * rescale + tl.sum(tl.where(is_t, 0.0, e), axis=1)
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        s_all = tl.where(valid, s_all, 1.0)  # ignored rows read nothing; keep their math finite
        x_t = tl.where(valid, x_t, m_ref)
        log_s, logpt = _softmax_log_normaliser(m_ref, s_all, s_oth, x_t)
        lse_hi, lse_lo = _two_sum(m_ref, log_s)
        one_minus_pt = s_oth / s_all
        logpt = tl.where(valid, logpt, 0.0)
        one_minus_pt = tl.where(valid, one_minus_pt, 0.0)
        lse_hi = tl.where(valid, lse_hi, 0.0)
        lse_lo = tl.where(valid, lse_lo, 0.0)
    else:
        p_t = tl.load(X + xbase + t_safe * sxc, mask=valid, other=1.0).to(tl.float32)
        logpt = tl.log(p_t)
        one_minus_pt = 1.0 - p_t
        lse_hi = tl.zeros([BLOCK_M], tl.float32)
        lse_lo = tl.zeros([BLOCK_M], tl.float32)

    scale = tl.load(SCALE)
    h_t = tl.zeros([BLOCK_M], tl.float32)
    h_oth = tl.zeros([BLOCK_M], tl.float32)
    if KIND == _STATS:
        tl.store(LOGPT + rows, logpt, mask=in_range)
        tl.store(OMP + rows, one_minus_pt, mask=in_range)
        tl.store(LSE + 2 * rows, lse_hi, mask=in_range)
        tl.store(LSE + 2 * rows + 1, lse_lo, mask=in_range)
        if SMOOTH:
            ce_s, _h_t, _h_oth = _smoothed_row_sums(X, CLASS_W, xbase, t, t_safe, valid, lse_hi, lse_lo, logpt,
                                                    one_minus_pt, 0.0, 1.0, smoothing, C, sxc, False, BLOCK_C)
            tl.store(LOSS + rows, tl.where(valid, ce_s, 0.0), mask=in_range)
    else:
        if KIND == _FOCAL:
            if SMOOTH:
                loss, h_t, h_oth = _smoothed_row_sums(X, CLASS_W, xbase, t, t_safe, valid, lse_hi, lse_lo, logpt,
                                                      one_minus_pt, gamma, alpha, smoothing, C, sxc, HAS_CLASS_W,
                                                      BLOCK_C)
                if POLY:
                    u = (1.0 - smoothing) * one_minus_pt + (smoothing - smoothing / C)
                    p_val, p_dl = _poly1_term((1.0 - smoothing) * tl.exp(logpt), u, gamma, poly_eps)
                    loss += tl.where(valid, p_val, 0.0)
                    h_t += tl.where(valid, p_dl, 0.0)
                dl = tl.zeros([BLOCK_M], tl.float32)
            else:
                if HAS_CLASS_W:
                    a_t = tl.load(CLASS_W + t_safe, mask=valid, other=0.0).to(tl.float32)
                else:
                    a_t = tl.zeros([BLOCK_M], tl.float32) + alpha
                value, dvalue = _focal_term(logpt, one_minus_pt, gamma)
                loss = a_t * value
                dl = a_t * dvalue  # dL/dlog p_t
                if POLY:
                    p_val, p_dl = _poly1_term(tl.exp(logpt), one_minus_pt, gamma, poly_eps)
                    loss += p_val
                    dl += p_dl
            if HAS_WEIGHT:
                loss = w * loss
                dl = w * dl
        else:  # IB
            if HAS_CLASS_W:
                w_t = tl.load(CLASS_W + t_safe, mask=valid, other=0.0).to(tl.float32)
            else:
                w_t = tl.zeros([BLOCK_M], tl.float32) + 1.0
            f = tl.load(FEAT + rows, mask=valid, other=0.0).to(tl.float32)
            g = 2.0 * one_minus_pt
            denom = g * f + epsilon
            factor = alpha / denom
            ce_w = -logpt * w_t
            if IB_FOCAL:
                u = w_t * logpt  # = -CE_w
                omq = -_expm1(u)
                mod = _pow(omq, gamma)
                h = mod * ce_w
                r = tl.where(omq > 0, u / tl.where(omq > 0, omq, 1.0), -1.0)
                dh = w_t * (gamma * tl.exp(u) * mod * r - mod)
            else:
                h = ce_w
                dh = -w_t
            loss = factor * h
            if DETACH_FACTOR:
                dl = factor * dh
            else:
                if IB_FOCAL:
                    dfactor = 2.0 * alpha * f * tl.exp(logpt) / (denom * denom)
                    dl = factor * dh + h * dfactor
                else:
                    # factor dh + h dfactor = -(factor w / den) (2 f ((1 - p) - p CE) + eps), and
                    # (1 - p) - p CE = (1 - p) + p log p >= 0: a sum of terms of one sign.
                    dl = -(factor * w_t / denom) * (2.0 * f * _one_minus_p_plus_p_log_p(one_minus_pt, logpt)
                                                    + epsilon)
                if WRITE_GRAD:
                    dfeat = -h * alpha * g / (denom * denom)
                    tl.store(DFEAT + rows, tl.where(valid, dfeat * scale, 0.0), mask=in_range)
        loss = tl.where(valid, loss, 0.0)
        dl = tl.where(valid, dl, 0.0)
        if STORE_ROWS:
            tl.store(LOSS + rows, _cast(loss, LOSS.dtype.element_ty), mask=in_range)
        if REDUCE:
            tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
        if WRITE_GRAD:
            if SMOOTH:
                _store_smoothed_grad(X, GRAD, CLASS_W, xbase, gbase, t, valid, in_range, lse_hi, lse_lo, logpt,
                                     one_minus_pt, h_t, h_oth, w * scale, gamma, alpha, smoothing, C, sxc, sgc,
                                     HAS_CLASS_W, BLOCK_C)
            elif FROM_LOGITS:
                _store_softmax_grad(X, GRAD, xbase, gbase, t, lse_hi, lse_lo, -one_minus_pt, -dl * scale, valid,
                                    in_range, C, sxc, sgc, BLOCK_C)
            else:
                # d log p_t / d p_t = 1 / p_t; ignored rows have p_t = 1 and dl = 0.
                grad_t = dl * scale / tl.where(valid, tl.exp(logpt), 1.0)
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
                    cmask = (cols < C)[None, :]
                    grad = tl.where((cols[None, :] == t[:, None]) & valid[:, None], grad_t[:, None], 0.0)
                    tl.store(GRAD + gbase[:, None] + cols[None, :] * sgc, _cast(grad, GRAD.dtype.element_ty),
                             mask=in_range[:, None] & cmask)


@triton.jit
def softmax_grad_kernel(
    X, T, LSE, COEF, W, GRAD,
    M, C, S, sxn, sxc, sxs, sgn, sgc, sgs,
    ignore_index, smoothing,
    SKIP_ZERO_COEF: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """GRAD_ij = COEF_i * (p_ij - [j == t_i]) for non-ignored rows, 0 elsewhere.

    Second pass of the batch-coupled losses (OHEM, GHM-C softmax), whose per-row coefficients
    come from torch ops on the row statistics of the STATS pass: LSE holds each row's
    log-sum-exp as a float32 pair (hi, lo) ((M, 2)), so p_ij = e^((x_ij - hi) - lo) and, for the
    target column, p_t - 1 = expm1(log p_t) with log p_t = (x_t - hi) - lo (x_t - hi exact where
    they are close: no cancellation, _store_softmax_grad). SKIP_ZERO_COEF (OHEM): rows with
    COEF_i = 0 are dropped samples, written as 0 without reading their logits (the reference
    masks them); GHM-C multiplies instead, so a NaN row with weight 0 stays NaN as in the
    reference. HAS_WEIGHT: rows whose sample weight W_i is 0 are skipped the same way (their
    loss and gradient are exactly 0; COEF already carries the weights). SMOOTH: the gradient of the
    label-smoothed cross entropy, COEF_i (p_ij - q_ij) (_store_smoothed_grad with gamma = 0).
    Traffic: logits read once (only rows that carry gradient) plus the target logit, grad
    written once, 3 floats + 1 target per row.
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    in_range = rows < M
    t = tl.load(T + rows, mask=in_range, other=0).to(tl.int64)
    coef = tl.load(COEF + rows, mask=in_range, other=0.0)
    valid = in_range & (t != ignore_index)
    if SKIP_ZERO_COEF:
        valid = valid & (coef != 0)
    if HAS_WEIGHT:
        valid = valid & (tl.load(W + rows, mask=valid, other=0.0) != 0)
    t = tl.where(valid, t, 0)
    lse_hi = tl.load(LSE + 2 * rows, mask=valid, other=0.0)
    lse_lo = tl.load(LSE + 2 * rows + 1, mask=valid, other=0.0)
    n = rows // S
    s_idx = rows - n * S
    xbase = n * sxn + s_idx * sxs
    gbase = n * sgn + s_idx * sgs
    x_t = tl.load(X + xbase + tl.minimum(tl.maximum(t, 0), C - 1) * sxc, mask=valid, other=0.0).to(tl.float32)
    logpt = (x_t - lse_hi) - lse_lo
    pt_minus_1 = _expm1(logpt)
    if SMOOTH:
        # gamma = 0, a = 1: h_c = -q_c, so h_t = -(1 - eps + eps / C) and h_oth = -eps (C - 1) / C.
        h_t = tl.zeros([BLOCK_M], tl.float32) - (1.0 - smoothing + smoothing / C)
        h_oth = tl.zeros([BLOCK_M], tl.float32) - smoothing * (C - 1) / C
        _store_smoothed_grad(X, GRAD, COEF, xbase, gbase, t, valid, in_range, lse_hi, lse_lo, logpt, -pt_minus_1,
                             h_t, h_oth, coef, 0.0, 1.0, smoothing, C, sxc, sgc, False, BLOCK_C)
    else:
        _store_softmax_grad(X, GRAD, xbase, gbase, t, lse_hi, lse_lo, pt_minus_1, coef, valid, in_range, C, sxc,
                            sgc, BLOCK_C)


# --------------------------------------------------------------------------------------------
# Sigmoid family: elementwise
# --------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid_inputs(X, T, W, offs, numel, C, ignore_index, LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                    WEIGHT_PER_ELEM: tl.constexpr):
    """x (fp32), y in [0, 1] (fp32), sample weight w (1 without), valid mask for flat offsets.
    Integer labels: y = [label == col], label == C (background) gives y = 0 everywhere, label ==
    ignore_index makes the row invalid. HAS_WEIGHT: W holds one value per element
    (WEIGHT_PER_ELEM) or per row (offs // C); w == 0 makes the element invalid (its logit is not
    read, so a NaN there cannot leak)."""
    in_range = offs < numel
    row = offs // C
    if LABELS:
        col = offs - row * C
        label = tl.load(T + row, mask=in_range, other=0).to(tl.int64)
        valid = in_range & (label != ignore_index)
        y = tl.where(label == col, 1.0, 0.0)
    else:
        valid = in_range
        y = tl.load(T + offs, mask=in_range, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        if WEIGHT_PER_ELEM:
            w = tl.load(W + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            w = tl.load(W + row, mask=valid, other=0.0).to(tl.float32)
        valid = valid & (w != 0)
    else:
        w = tl.zeros_like(offs).to(tl.float32) + 1.0
    x = tl.load(X + offs, mask=valid, other=0.0).to(tl.float32)
    return x, y, w, valid, in_range


@triton.jit
def _ghm_bin(x, y, valid, bins):
    """Bin of g = |sigmoid(x) - y| (float32, torch's formula 1 / (1 + exp(-x)), so the bins agree
    with every backend's), bins for invalid or NaN g (the 'no bin' slot)."""
    g = tl.abs(1.0 / (1.0 + _exp_libm(-x)) - y)
    in_bin = valid & (g == g)
    idx = tl.minimum(tl.floor(tl.where(in_bin, g, 0.0) * bins), bins - 1).to(tl.int32)
    return tl.where(in_bin, idx, bins), in_bin


@triton.jit
def sigmoid_kernel(
    X, T, BIN_W, SCALE, W, ALPHA_C,  # inputs: logits, targets/labels, GHM-C per-bin weights, grad scale,
    #                                  sample weights, per-class alpha
    LOSS, PARTIAL, GRAD,  # outputs
    numel, C, alpha, gamma, ignore_index, bins,
    KIND: tl.constexpr, LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, STORE_ELEMS: tl.constexpr,
    REDUCE: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_PER_ELEM: tl.constexpr, ALPHA_PER_CLASS: tl.constexpr,
    BLOCK: tl.constexpr,
    poly_eps=0.0, POLY: tl.constexpr = False,
):
    """Elementwise sigmoid losses. With e = e^-|x|: p = sigmoid(x) and q = 1 - p = sigmoid(-x),
    each 1 / (1 + e) or e / (1 + e) (no 1 - p anywhere); softplus(+-x) = max(+-x, 0) + log1p(e)
    (so log sigmoid(x) = -softplus(-x));
    CE = y softplus(-x) + (1 - y) softplus(x), dCE/dx = p - y = p (1 - y) - q y, a term skipped
    where its weight y or 1 - y is 0 (so x = +-inf gives 0 or inf, never 0 * inf; and a confident
    positive's gradient is -q, not the cancelled p - 1).
    SIGMOID_FOCAL: l = alpha_t CE (1 - p_t)^gamma, 1 - p_t = p (1 - y) + q y,
      alpha_t = alpha y + (1 - alpha)(1 - y) (alpha < 0: 1; ALPHA_PER_CLASS: alpha = ALPHA_C[col]);
      dl/dx = alpha_t [(p - y) m + CE gamma (1 - p_t)^(gamma - 1) p q (1 - 2y)], the last term
      taken as 0 where 1 - p_t = 0 or p q = 0 (its limit; at x = +-inf CE is inf and p q = 0).
    GHMC_SIGMOID: l = w[bin(g)] CE, dl/dx = w[bin] (p - y) (weights carry no gradient).
    HAS_WEIGHT: l and dl/dx times the element's weight; weight 0: invalid (_sigmoid_inputs).
    GRAD = SCALE * dl/dx; ignored rows (integer labels): 0 loss, 0 grad, logits not read.
    Traffic: logits read once, targets once (labels: one int per row, cached), loss written
    once ('none') or one float per program, grad written once.
    """
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    x, y, w, valid, in_range = _sigmoid_inputs(X, T, W, offs, numel, C, ignore_index, LABELS, HAS_WEIGHT,
                                               WEIGHT_PER_ELEM)
    e = _exp_libm(-tl.abs(x))  # a few ulps at any x (tl.exp: |x| 2^-24, 5e-6 at |x| = 87)
    inv = 1.0 / (1.0 + e)
    p = tl.where(x >= 0, inv, e * inv)
    q = tl.where(x >= 0, e * inv, inv)
    log1p_e = _log1p(e)
    softplus_neg = tl.maximum(-x, 0.0) + log1p_e  # -log p
    softplus_pos = tl.maximum(x, 0.0) + log1p_e  # -log q
    ce = tl.where(y != 0, y * softplus_neg, 0.0) + tl.where(y != 1, (1.0 - y) * softplus_pos, 0.0)
    dce = tl.where(y != 1, (1.0 - y) * p, 0.0) - tl.where(y != 0, y * q, 0.0)
    if KIND == _SIGMOID_FOCAL:
        one_minus_pt = p * (1.0 - y) + q * y
        mod = _pow(one_minus_pt, gamma)
        if ALPHA_PER_CLASS:
            a_c = tl.load(ALPHA_C + (offs - (offs // C) * C), mask=in_range, other=0.0).to(tl.float32)
            a_t = a_c * y + (1.0 - a_c) * (1.0 - y)
        else:
            a_t = tl.where(alpha >= 0, alpha * y + (1.0 - alpha) * (1.0 - y), 1.0)
        loss = a_t * ce * mod
        dmod = tl.where((one_minus_pt > 0) & (gamma != 0),
                        gamma * _pow(one_minus_pt, gamma - 1.0) * p * q * (1.0 - 2.0 * y), 0.0)
        dloss = a_t * (dce * mod + tl.where(dmod == 0, 0.0, ce * dmod))
        if POLY:  # Poly-1 (#24): + poly_eps (1 - p_t)^(gamma + 1), not scaled by alpha
            pmod = _pow(one_minus_pt, gamma)
            loss += poly_eps * (pmod * one_minus_pt)
            dloss += poly_eps * (gamma + 1.0) * pmod * (p * q) * (1.0 - 2.0 * y)
    else:
        idx, in_bin = _ghm_bin(x, y, valid, bins)
        bw = tl.load(BIN_W + idx, mask=in_bin, other=0.0)
        loss = bw * ce
        dloss = bw * dce
    if HAS_WEIGHT:
        loss = w * loss
        dloss = w * dloss
    loss = tl.where(valid, loss, 0.0)
    if STORE_ELEMS:
        tl.store(LOSS + offs, _cast(loss, LOSS.dtype.element_ty), mask=in_range)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
    if WRITE_GRAD:
        scale = tl.load(SCALE)
        grad = tl.where(valid, dloss * scale, 0.0)
        tl.store(GRAD + offs, _cast(grad, GRAD.dtype.element_ty), mask=in_range)


@triton.jit
def ghm_sigmoid_hist_kernel(
    X, T, W, HIST,
    numel, C, ignore_index, bins, num_programs,
    LABELS: tl.constexpr, HAS_WEIGHT: tl.constexpr, WEIGHT_PER_ELEM: tl.constexpr, NUM_BINS_P2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Per-program histogram of the GHM-C bins of g = |sigmoid(x) - y| over a grid-stride range:
    HIST[pid, b] = #{valid elements e of this program with bin(e) = b}, slot `bins` counts the
    valid elements with NaN g (in no bin, but counted in n_valid), slot `bins + 1` the invalid
    ones (ignored, zero weight, past the end). torch sums HIST over programs (integers: exact,
    deterministic).
    Traffic: logits and targets read once, NUM_BINS_P2 ints written per program.
    """
    pid = tl.program_id(0)
    hist = tl.zeros([NUM_BINS_P2], tl.int32)
    for start in range(pid.to(tl.int64) * BLOCK, numel, num_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        x, y, _w, valid, in_range = _sigmoid_inputs(X, T, W, offs, numel, C, ignore_index, LABELS, HAS_WEIGHT,
                                                    WEIGHT_PER_ELEM)
        idx, in_bin = _ghm_bin(x, y, valid, bins)
        hist += tl.histogram(tl.where(valid, idx, bins + 1), NUM_BINS_P2)
    tl.store(HIST + pid.to(tl.int64) * NUM_BINS_P2 + tl.arange(0, NUM_BINS_P2), hist)


# --------------------------------------------------------------------------------------------
# In-place backward of reduced losses (fused_losses._ops module docstring)
# --------------------------------------------------------------------------------------------
@triton.jit
def rescale_grad_kernel(GRAD, GO, APPLIED, numel, BLOCK: tl.constexpr):
    """GRAD *= GO / APPLIED in place, both scalars read here, on the device; when they are equal
    (the common loss.backward(): both 1) the program returns after the two scalar loads, so the
    gradient is neither read nor written. Traffic otherwise: one read + one write per element."""
    wanted = tl.load(GO).to(tl.float32)
    applied = tl.load(APPLIED).to(tl.float32)
    if wanted != applied:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        in_range = offs < numel
        g = tl.load(GRAD + offs, mask=in_range).to(tl.float32)
        tl.store(GRAD + offs, _cast(g * (wanted / applied), GRAD.dtype.element_ty), mask=in_range)


@triton.jit
def record_scale_kernel(GO, APPLIED):
    """APPLIED = GO, launched after rescale_grad_kernel (stream order: every program has read
    APPLIED by then)."""
    tl.store(APPLIED, tl.load(GO).to(APPLIED.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# One-pass kernels of the hot cases (issue #28): the row in registers from load to store
# --------------------------------------------------------------------------------------------
# Budget (H100 SXM, fwd+bwd: read the logits once, write the gradient once): 3.35 TB/s against
# 4 warp-instructions/cycle/SM x 132 SMs x 1.98 GHz gives about 2.5 warp-instructions per fp32
# element and 1.25 per bf16 element. Counted on the sm_90 SASS by
# `make gpu-budget` (benchmarks/gpu_budget.py) (fused_losses/_triton/NOTES.md has the table).
#
# Tiles: a row of C columns is held as two pieces, A = the largest power of two <= C and B =
# the next power of two >= C - A (0 when C is a power of two): C = 80 is 64 + 16 (no idle lane),
# C = 1203 is 1024 + 256 (6% idle instead of 41% for a 2048-wide tile).
# Offsets are int32 unless the launcher sets INT64 (a tensor over 2^31 elements).
# GAMMA_MODE (constexpr, the launcher picks): 0 -> gamma = 0, 2 -> gamma = 2 (closed forms, no
# pow), 1 -> any gamma (runtime, exp2/log2).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
# Under the interpreter the fast helpers below compute numpy's exact functions; with
# FUSED_LOSSES_TRITON_EMULATE_APPROX=1 they add the GPU instructions' error bound instead, all
# in one direction (the worst case for a sum): ex2.approx x (1 + 2^-22) with subnormal results
# flushed to 0 (.ftz), lg2.approx + 2^-22 absolute, rcp.approx x (1 + 2^-23). The tests run the
# one-pass kernels both ways (the accuracy rule must hold with the error bound applied).
_EMULATE_APPROX = tl.constexpr(os.environ.get("FUSED_LOSSES_TRITON_EMULATE_APPROX", "0") not in ("", "0"))


@triton.jit
def _ex2_fast(v):
    """2^v: tl.exp2 is ex2.approx.ftz.f32 on the GPU (~2 ulps, subnormal results flushed)."""
    if _INTERPRETING and _EMULATE_APPROX:
        r = tl.exp2(v) * (1.0 + 2.384185791015625e-07)
        return tl.where(r < 1.1754943508222875e-38, 0.0, r)
    else:
        return tl.exp2(v)


@triton.jit
def _lg2_fast(v):
    """log2(v), v > 0: lg2.approx.f32 on the GPU (absolute error about 2^-22, MUFU, one
    instruction); numpy's log2 under the interpreter. Callers use it only where the result is
    at least ~0.2 in magnitude (relative error <= 1e-6) or an absolute error is what counts."""
    if _INTERPRETING:
        if _EMULATE_APPROX:
            return tl.log2(v) + 2.384185791015625e-07
        else:
            return tl.log2(v)
    else:
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [v], dtype=tl.float32, is_pure=True,
                                         pack=1)


@triton.jit
def _log1p_small(v):
    """log(1 + v) for 0 <= v <= 1/4 to ~1 ulp: 2 atanh(z), z = v / (2 + v) <= 1/9, odd series to
    z^11 (the first term left out, z^13 / 13, is below 2^-40 of the sum)."""
    z = v * _rcp_fast(2.0 + v)
    z2 = z * z
    acc = 1.0 / 11.0 + z2 * 0.0
    acc = 1.0 / 9.0 + z2 * acc
    acc = 1.0 / 7.0 + z2 * acc
    acc = 1.0 / 5.0 + z2 * acc
    acc = 1.0 / 3.0 + z2 * acc
    return 2.0 * z + (2.0 * z) * (z2 * acc)


@triton.jit
def _log1p_fast(v):
    """log(1 + v), v >= 0, relative error <= ~1e-6: the series below 1/4, lg2.approx above (where
    log(1 + v) >= 0.22, so lg2's absolute error is a small relative one)."""
    small = v < 0.25
    series = _log1p_small(tl.where(small, v, 0.0))
    direct = _lg2_fast(1.0 + v) * _LN2
    return tl.where(small, series, direct)


@triton.jit
def _rcp_fast(v):
    """1 / v for 1 <= |v| <= 3: rcp.approx.ftz.f32 on the GPU (one MUFU, ~1 ulp; div.full costs
    a range test, a scaling and a multiply more), exact division under the interpreter."""
    if _INTERPRETING:
        if _EMULATE_APPROX:
            return (1.0 / v) * (1.0 + 1.1920928955078125e-07)
        else:
            return 1.0 / v
    else:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [v], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _log1p_unit(v):
    """log(1 + v) for 0 <= v <= 1 (softplus' tail), ~1 ulp: 2 atanh(z), z = v / (2 + v) <= 1/3,
    odd series to z^13 (the first term left out, z^15 / 15, is below 2^-26 of the sum)."""
    z = v * _rcp_fast(2.0 + v)
    z2 = z * z
    acc = 1.0 / 11.0 + z2 * (1.0 / 13.0)
    acc = 1.0 / 9.0 + z2 * acc
    acc = 1.0 / 7.0 + z2 * acc
    acc = 1.0 / 5.0 + z2 * acc
    acc = 1.0 / 3.0 + z2 * acc
    w = z + z
    return w + w * (z2 * acc)


@triton.jit
def _focal_row(logpt, omp, pt, gamma, GAMMA_MODE: tl.constexpr):
    """(L, dL/dlog p_t) of the softmax focal term L = (1 - p_t)^gamma (-log p_t) (_focal_term),
    closed forms for gamma = 0 and 2: dL/dl = gamma p_t (1 - p_t)^gamma l / (1 - p_t) - (1 - p_t)^gamma,
    at gamma = 2: 2 p_t (1 - p_t) l - (1 - p_t)^2 (no division, finite at p_t = 1)."""
    if GAMMA_MODE == 0:
        return -logpt, tl.zeros_like(logpt) - 1.0
    elif GAMMA_MODE == 2:
        mod = omp * omp
        return mod * (-logpt), 2.0 * pt * omp * logpt - mod
    else:
        return _focal_term(logpt, omp, gamma)


@triton.jit
def _row_piece(X, xbase, c0, valid, C, BLOCK: tl.constexpr, EDGE: tl.constexpr):
    """Columns c0 .. c0 + BLOCK of the rows at xbase (float32, -inf where masked); EDGE: the piece
    may pass C (piece B), else every column is in range (piece A) and the mask is per row only."""
    cols = c0 + tl.arange(0, BLOCK)
    if EDGE:
        mask = valid[:, None] & (cols < C)[None, :]
    else:
        mask = valid[:, None] & (cols >= 0)[None, :]
    x = tl.load(X + xbase[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    return x, cols


@triton.jit
def _store_grad_piece(GRAD, gbase, cols, e, inv_s, t, omp, coef, in_range, C, EDGE: tl.constexpr):
    """GRAD[row, cols] = coef (p - [col == t]) with p = e / s; the target column -coef (1 - p_t)."""
    grad = coef[:, None] * tl.where(cols[None, :] == t[:, None], -omp[:, None], e * inv_s[:, None])
    if EDGE:
        mask = in_range[:, None] & (cols < C)[None, :]
    else:
        mask = in_range[:, None] & (cols >= 0)[None, :]
    tl.store(GRAD + gbase[:, None] + cols[None, :], _cast(grad, GRAD.dtype.element_ty), mask=mask)


@triton.jit
def softmax_focal_tile_kernel(
    X, T, CLASS_W, SCALE, W,  # logits (rows of C contiguous columns), targets, per-class alpha, grad scale, weights
    LOSS, PARTIAL, GRAD,  # outputs
    M, C, sxn, sgn,
    gamma, alpha, ignore_index,
    GAMMA_MODE: tl.constexpr, HAS_CLASS_W: tl.constexpr, HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr, STORE_ROWS: tl.constexpr, REDUCE: tl.constexpr, INT64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Softmax focal loss (cross entropy at gamma = 0) and its gradient in one pass, for rows that
    fit one tile (C <= BLOCK_A + BLOCK_B, columns contiguous): the logits are read once, the
    exponentials computed once and the gradient written from the same registers.

    Per row: m = max x, e_j = 2^((x_j - m) log2 e) (ex2.approx: |x_j - m| 2^-24 + 2 ulps
    relative), s = sum e_j, s_t' = sum_{j != t} e_j, x_t gathered (one load per row, in L1),
    1 - p_t = s_t' / s, log p_t = (x_t - m) - log s with log s = log1p(s_t') when t is the max
    (exact for a confident sample, _log1p_fast) and lg2.approx(s) otherwise (then |log p_t| >=
    log 2, so its absolute error 2^-22 is relative <= 3e-7). Loss a_t w L, coef = -a_t w dL/dl
    x SCALE, GRAD_j = coef (e_j / s - [j == t]), the target column -coef (1 - p_t) (no
    cancellation). Ignored and zero-weight rows: loss 0, grad 0, logits not read. Semantics and
    outputs as softmax_rows_kernel (KIND = FOCAL, FROM_LOGITS, no label smoothing, S = 1).
    """
    pid = tl.program_id(0)
    if INT64:
        rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    else:
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    in_range = rows < M
    t = tl.load(T + rows, mask=in_range, other=0)
    if HAS_IGNORE:
        valid = in_range & (t != ignore_index)
    else:
        valid = in_range
    if HAS_WEIGHT:
        w = tl.load(W + rows, mask=valid, other=0.0).to(tl.float32)
        valid = valid & (w != 0)
    # The target as a column index (int32 unless INT64): out-of-range targets match no column and
    # gather a clamped one (as softmax_rows_kernel).
    t_safe = tl.minimum(tl.maximum(tl.where(valid, t, 0), 0), C - 1).to(rows.dtype)
    t_col = tl.where(valid & (t >= 0) & (t < C), t_safe, -1)
    xbase = rows * sxn
    xa, cols_a = _row_piece(X, xbase, 0, valid, C, BLOCK_A, False)
    m = tl.max(xa, axis=1)
    if BLOCK_B > 0:
        xb, cols_b = _row_piece(X, xbase, BLOCK_A, valid, C, BLOCK_B, True)
        m = tl.maximum(m, tl.max(xb, axis=1))
    x_t = tl.load(X + xbase + t_safe, mask=valid, other=0.0).to(tl.float32)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    ea = _ex2_fast((xa - m_ref[:, None]) * _LOG2E)
    s_all = tl.sum(ea, axis=1)
    s_oth = tl.sum(tl.where(cols_a[None, :] == t_col[:, None], 0.0, ea), axis=1)
    if BLOCK_B > 0:
        eb = _ex2_fast((xb - m_ref[:, None]) * _LOG2E)
        s_all += tl.sum(eb, axis=1)
        s_oth += tl.sum(tl.where(cols_b[None, :] == t_col[:, None], 0.0, eb), axis=1)
    s_all = tl.where(valid, s_all, 1.0)  # ignored rows read nothing; keep their math finite
    s_oth = tl.where(valid, s_oth, 0.0)
    x_t = tl.where(valid, x_t, m_ref)
    inv_s = _rcp_fast(s_all)  # s in [1, C] (or NaN)
    is_max = x_t == m_ref
    log_s = tl.where(is_max, _log1p_fast(s_oth), _lg2_fast(s_all) * _LN2)
    logpt = (x_t - m_ref) - log_s
    omp = s_oth * inv_s
    pt = _ex2_fast(logpt * _LOG2E)
    value, dvalue = _focal_row(logpt, omp, pt, gamma, GAMMA_MODE)
    if HAS_CLASS_W:
        a_t = tl.load(CLASS_W + t_safe, mask=valid, other=0.0).to(tl.float32)
        value = a_t * value
        dvalue = a_t * dvalue
    else:
        value = alpha * value
        dvalue = alpha * dvalue
    if HAS_WEIGHT:
        value = w * value
        dvalue = w * dvalue
    loss = tl.where(valid, value, 0.0)
    if STORE_ROWS:
        tl.store(LOSS + rows, _cast(loss, LOSS.dtype.element_ty), mask=in_range)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
    if WRITE_GRAD:
        coef = tl.where(valid, -dvalue * tl.load(SCALE), 0.0)
        gbase = rows * sgn
        _store_grad_piece(GRAD, gbase, cols_a, ea, inv_s, t_col, omp, coef, in_range, C, False)
        if BLOCK_B > 0:
            _store_grad_piece(GRAD, gbase, cols_b, eb, inv_s, t_col, omp, coef, in_range, C, True)


@triton.jit
def _sigmoid_focal_piece(X, LOSS, GRAD, base, c0, label, a_pos, a_neg, g_pos, g_neg, valid, in_range, C, gamma,
                         GAMMA_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, STORE_ELEMS: tl.constexpr,
                         BLOCK: tl.constexpr, EDGE: tl.constexpr):
    """Sigmoid focal loss and gradient of columns c0 .. c0 + BLOCK of integer-labelled rows
    (y = [col == label]); returns the per-row loss sum of the piece.

    With z = x (y = 0) or -x (y = 1): 1 - p_t = sigmoid(z), CE = softplus(z) = max(z, 0) +
    log1p(e), e = e^-|x| (ex2.approx), dCE/dx = sign sigmoid(z) (sign = 1 - 2y), so
    L = a_t CE (1 - p_t)^gamma and dL/dx = a_t sign (1 - p_t)^gamma ((1 - p_t) + gamma CE p_t).
    p_t = sigmoid(-z) and 1 - p_t each as 1 / (1 + e) or e / (1 + e): no 1 - p anywhere. Masked
    elements (ignored rows, columns past C) load x = -inf with no positive column (the caller
    sets their label to -1): z = -inf gives CE = 0, 1 - p_t = 0, so loss and gradient are exactly 0
    without a select; CE is clamped to FLT_MAX in CE p_t (x = +-inf: p_t = 0, never inf * 0).
    a_pos/a_neg: alpha_t of a positive/negative element, g_pos/g_neg: the signed gradient factors
    (a_t sign SCALE), per row, 0 for invalid rows."""
    cols = c0 + tl.arange(0, BLOCK)
    if EDGE:
        cmask = (cols < C)[None, :]
    else:
        cmask = (cols >= 0)[None, :]
    mask = valid[:, None] & cmask
    x = tl.load(X + base[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
    pos = cols[None, :] == label[:, None]
    z = tl.where(pos, -x, x)
    e = _ex2_fast(tl.abs(x) * (-_LOG2E))
    inv = _rcp_fast(1.0 + e)
    ez = e * inv
    omp = tl.where(z >= 0, inv, ez)  # sigmoid(z) = 1 - p_t
    pt = tl.where(z >= 0, ez, inv)  # sigmoid(-z) = p_t
    ce = tl.maximum(z, 0.0) + _log1p_unit(e)
    if GAMMA_MODE == 0:
        mod = tl.zeros_like(x) + 1.0
        inner = omp
    elif GAMMA_MODE == 2:
        mod = omp * omp
        inner = omp + 2.0 * (tl.minimum(ce, 3.4028234663852886e38) * pt)
    else:
        mod = _pow(omp, gamma)
        inner = omp + gamma * (tl.minimum(ce, 3.4028234663852886e38) * pt)
    loss = tl.where(pos, a_pos[:, None], a_neg[:, None]) * (ce * mod)
    if STORE_ELEMS:
        tl.store(LOSS + base[:, None] + cols[None, :], _cast(loss, LOSS.dtype.element_ty),
                 mask=in_range[:, None] & cmask)
    if WRITE_GRAD:
        grad = tl.where(pos, g_pos[:, None], g_neg[:, None]) * (mod * inner)
        tl.store(GRAD + base[:, None] + cols[None, :], _cast(grad, GRAD.dtype.element_ty),
                 mask=in_range[:, None] & cmask)
    return tl.sum(loss, axis=1)


@triton.jit
def sigmoid_focal_labels_kernel(
    X, T, SCALE,  # logits (rows x C, contiguous), integer labels per row, grad scale
    LOSS, PARTIAL, GRAD,  # outputs
    R, C, alpha, gamma, ignore_index,
    GAMMA_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, STORE_ELEMS: tl.constexpr, REDUCE: tl.constexpr,
    INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Sigmoid focal loss with integer labels (label == C: background, ignore_index: row ignored)
    and its gradient, one pass over a (BLOCK_R, C) tile: the label is loaded once per row and
    the column is the tile's own index (no division of flat offsets). Semantics and outputs as
    sigmoid_kernel (KIND = SIGMOID_FOCAL, LABELS, no weight, scalar alpha)."""
    pid = tl.program_id(0)
    if INT64:
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    else:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    in_range = rows < R
    label = tl.load(T + rows, mask=in_range, other=0)
    valid = in_range & (label != ignore_index)
    label = tl.where(valid & (label >= 0) & (label < C), label, -1).to(rows.dtype)
    base = rows * C
    if WRITE_GRAD:
        scale = tl.load(SCALE)
    else:
        scale = 1.0
    # alpha_t of a positive and of a negative element (alpha < 0: 1 for both), 0 on invalid rows.
    a_pos = tl.where(valid, tl.where(alpha >= 0, alpha, 1.0), 0.0)
    a_neg = tl.where(valid, tl.where(alpha >= 0, 1.0 - alpha, 1.0), 0.0)
    g_pos = tl.where(valid, -a_pos * scale, 0.0)
    g_neg = a_neg * scale
    loss = _sigmoid_focal_piece(X, LOSS, GRAD, base, 0, label, a_pos, a_neg, g_pos, g_neg, valid, in_range, C,
                                gamma, GAMMA_MODE, WRITE_GRAD, STORE_ELEMS, BLOCK_A, False)
    if BLOCK_B > 0:
        loss += _sigmoid_focal_piece(X, LOSS, GRAD, base, BLOCK_A, label, a_pos, a_neg, g_pos, g_neg, valid,
                                     in_range, C, gamma, GAMMA_MODE, WRITE_GRAD, STORE_ELEMS, BLOCK_B, True)
    if REDUCE:
        tl.store(PARTIAL + pid, tl.sum(loss, axis=0))
