"""Plain-PyTorch reference implementations of every loss in the API contract.

Written for clarity and exactness, not speed: this is the ground truth of the tests and the
baseline of the benchmarks. Each function takes *validated, normalised* arguments (see
fused_losses._validate: per-class alpha/weight as tensors, weights already broadcast) and is
differentiable by autograd, to any order. The functions here do not validate: to run the
reference on raw arguments, call ``fused_losses.<loss>(..., backend="reference")``.

Precision: by default every computation runs in promote_types(logits.dtype, float32), so
float64 inputs give a float64 ground truth. ``upcast=False`` keeps the logits dtype (fp16/bf16)
for every op: that is the "eager PyTorch in low precision" accuracy baseline that fused kernels
must beat.

Output dtype: 'none' returns the logits dtype; 'mean' and 'sum' return the compute dtype.
'mean' never divides by zero: with no counted sample it returns 0 (and zero gradient).

Drop-in extras (docs/losses.md, "Sample weights, avg_factor, label smoothing, per-class
alpha"): ``weight`` (already broadcast by fused_losses._validate: the target's shape for the
softmax family; logits.shape[:-1] (per row) or logits.shape (per element) for the sigmoid
family) multiplies each entry's loss and gradient. A zero weight SELECTS a zero loss (the
entry's input is replaced, as for an ignored entry, before any arithmetic), so a NaN/inf logit
there gives exactly 0 loss and 0 gradient; 'mean' denominators do not change (mmdet's
weight_reduce_loss), except GHM-C, where a zero weight makes the entry invalid (mmdet's
label_weight > 0 mask). ``weight`` may require grad here (the functional layer routes such
calls to this backend). ``label_smoothing`` (softmax family): the target distribution
q_c = (1 - eps)[c == t] + eps / C. avg_factor is not an argument here: the functional layer
runs 'sum' and divides.

Example:
    >>> import torch
    >>> import fused_losses as fl
    >>> from fused_losses import reference
    >>> x, t = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 0])
    >>> truth = reference.focal(x, t, gamma=2.0)                 # float64 ground truth
    >>> fused = fl.focal(x.float(), t, gamma=2.0)
    >>> bool(abs(fused.double() - truth) <= 1e-5 * abs(truth))
    True
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["focal", "sigmoid_focal", "ohem", "ghmc", "ib", "class_weights", "focal_term", "ohem_min_kept_total", "ohem_kept_mask",
           "ghm_bin_weights"]


# --------------------------------------------------------------------------------------------
# Small pieces shared by the losses
# --------------------------------------------------------------------------------------------
def _compute_dtype(logits: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32) if upcast else logits.dtype


def _rows(logits: torch.Tensor, target: torch.Tensor):
    """(N, C, d...) logits, (N, d...) target -> (M, C) rows and (M,) targets (channel last)."""
    c = logits.shape[1]
    return logits.movedim(1, -1).reshape(-1, c), target.reshape(-1)


def _reduce(loss: torch.Tensor, reduction: str, count: torch.Tensor | int, out_dtype, shape):
    """'none' -> loss in out_dtype with `shape`; 'sum'; 'mean' = sum / max(count, 1)."""
    if reduction == "none":
        return loss.to(out_dtype).reshape(shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    if isinstance(count, torch.Tensor):
        count = count.clamp_min(1).to(total.dtype)
    else:
        count = max(count, 1)
    return total / count


class _Pointwise:
    """apply() picks the autograd.Function variant for the context: the one with a jvp in
    eager mode (torch.func and forward-mode AD need it); the one without while torch.compile
    traces, because dynamo cannot trace a custom jvp ("Unsupported") and would otherwise break
    the graph (torch.compile(fullgraph=True) of the reference failed)."""

    def __init__(self, eager, traced):
        self.eager, self.traced = eager, traced

    def apply(self, x, gamma):
        return (self.traced if torch.compiler.is_compiling() else self.eager).apply(x, gamma)


def _pointwise_function(name: str, doc: str, value, derivative):
    """An autograd.Function computing value(x, gamma) with the explicit derivative(x, gamma),
    in the forward/setup_context/jvp form with generate_vmap_rule, so that torch.func (grad,
    jvp, vmap) and forward-mode AD work; derivative is made of differentiable torch ops of the
    saved input, so higher orders work too. Returns a _Pointwise (see there: a variant without
    the jvp serves torch.compile)."""

    def setup_context(ctx, inputs, output):
        x, gamma = inputs
        ctx.save_for_backward(x)
        ctx.save_for_forward(x)
        ctx.gamma = gamma

    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * derivative(x, ctx.gamma), None

    def jvp(ctx, x_tangent, _gamma_tangent):
        (x,) = ctx.saved_tensors
        return x_tangent * derivative(x, ctx.gamma)

    def make(suffix, **extra):
        return type(name + suffix, (torch.autograd.Function,), dict(
            __doc__=doc, generate_vmap_rule=True, forward=staticmethod(value),
            setup_context=staticmethod(setup_context), backward=staticmethod(backward), **extra))

    return _Pointwise(make("", jvp=staticmethod(jvp)), make("Traced"))


def _focal_term_value(logpt: torch.Tensor, gamma: float) -> torch.Tensor:
    one_minus_pt = -torch.expm1(logpt)
    return one_minus_pt.pow(gamma) * (-logpt)


def _focal_term_derivative(logpt: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 0.0:
        return -torch.ones_like(logpt)
    one_minus_pt = -torch.expm1(logpt)
    mod = one_minus_pt.pow(gamma)
    r = torch.where(one_minus_pt > 0, logpt / one_minus_pt.clamp_min(torch.finfo(logpt.dtype).tiny),
                    torch.full_like(logpt, -1.0))
    return gamma * torch.exp(logpt) * mod * r - mod


_FocalTerm = _pointwise_function("_FocalTerm", """
    L(l) = (1 - e^l)^gamma * (-l) for l = log p_t <= 0, with an explicit gradient.

    dL/dl = gamma * p_t * (1 - p_t)^gamma * r(l) - (1 - p_t)^gamma, where
    r(l) = l / (1 - e^l) = l / -expm1(l) -> -1 as l -> 0. Autograd of the naive form computes
    gamma * (1 - p_t)^(gamma - 1) * ..., which is inf * 0 = NaN at p_t = 1 when gamma < 1; this
    form is finite everywhere and equals the limit (0 for gamma > 0, -1 for gamma = 0) at p_t = 1.
    1 - p_t is always -expm1(l), exact for p_t near 1.
    """, _focal_term_value, _focal_term_derivative)


def focal_term(logpt: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p_t)^gamma * (-log p_t) from log p_t, with a finite gradient at p_t = 1 for every gamma >= 0.

    Args:
        logpt: log p_t, any shape.
        gamma: exponent >= 0.

    Returns:
        A tensor of logpt's shape.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> reference.focal_term(torch.log(torch.tensor([0.5])), 2.0)
        tensor([0.1733])
    """
    return _FocalTerm.apply(logpt, float(gamma))


def _pow_safe_derivative(q: torch.Tensor, gamma: float) -> torch.Tensor:
    if gamma == 0.0:
        return torch.zeros_like(q)
    qs = torch.where(q > 0, q, torch.ones_like(q))
    return torch.where(q > 0, gamma * qs.pow(gamma - 1.0), torch.zeros_like(q))


_PowSafe = _pointwise_function("_PowSafe", """
    q^gamma for q in [0, 1] whose derivative at q = 0 is taken as 0 (the limit of the chained
    product in the sigmoid focal loss, where dq/dx -> 0 too) instead of inf.""",
                               lambda q, gamma: q.pow(gamma), _pow_safe_derivative)


def _alpha_t(alpha, target_rows: torch.Tensor, dtype, device):
    """None -> None; float -> python float; tensor (C,) -> alpha[t] per row."""
    if alpha is None:
        return None
    if isinstance(alpha, torch.Tensor):
        return alpha.to(device=device, dtype=dtype)[target_rows]
    return float(alpha)


# --------------------------------------------------------------------------------------------
# Softmax family
# --------------------------------------------------------------------------------------------
def _softmax_rows(logits, target, ignore_index, dtype, fill=0.0, weight=None):
    """Rows in compute dtype with inactive rows replaced by `fill` (so they get exactly zero
    gradient and a NaN there cannot leak), a safe (in-range) target, the valid (not ignored)
    mask, the active mask (valid and weight != 0) and the (M,) row weights (None without).
    fill is 0 for logits and 1 for probabilities (from_logits=False: log(1) is finite)."""
    x, t = _rows(logits, target)
    t = t.long()
    valid = t != ignore_index
    active, w = valid, None
    if weight is not None:
        w = weight.to(device=x.device, dtype=dtype).reshape(-1)
        active = valid & (w != 0)
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    x = torch.where(active[:, None], x.to(dtype), torch.full((), fill, dtype=dtype, device=x.device))
    return x, t_safe, valid, active, w


def _log_pt(x, t_safe, from_logits=True):
    """log p_t per row. from_logits=False: x holds probabilities, no clamping."""
    if from_logits:
        return torch.log_softmax(x, dim=-1).gather(1, t_safe[:, None]).squeeze(1)
    return torch.log(x.gather(1, t_safe[:, None]).squeeze(1))


def _smoothed_target(t_safe, c, eps, dtype, device):
    """(M, C) target distribution q_c = (1 - eps) [c == t] + eps / C (no gradient)."""
    hit = t_safe[:, None] == torch.arange(c, device=device)
    on, off = (1.0 - eps) + eps / c, eps / c
    return torch.where(hit, torch.full((), on, dtype=dtype, device=device),
                       torch.full((), off, dtype=dtype, device=device))


def _weighted(loss, active, w):
    """w * loss where active, exactly 0 elsewhere (a select, so inf/NaN there cannot leak)."""
    zero = torch.zeros((), dtype=loss.dtype, device=loss.device)
    return torch.where(active, loss if w is None else w * loss, zero)


def focal(logits, target, *, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean",
          from_logits=True, weight=None, label_smoothing=0.0, upcast=True):
    """Softmax focal loss: loss_i = -alpha_{t_i} (1 - p_{t_i})^gamma log p_{t_i}.

    'mean' divides by the number of non-ignored samples (zero-weight samples included: weights do
    not change it). With label_smoothing eps > 0 (from_logits only):
    loss_i = sum_c q_c a_c (1 - p_c)^gamma (-log p_c) with q_c = (1 - eps) [c == t_i] + eps / C
    and a_c = alpha[c] (per-class), alpha (float) or 1; gamma = 0 without alpha is
    F.cross_entropy(label_smoothing=eps).

    Args:
        logits: (N, C) or (N, C, d...) float tensor (probabilities when from_logits=False).
        target: (N,) or (N, d...) class indices.
        gamma: focusing parameter >= 0.
        alpha: None, a float, or a (C,) tensor of per-class factors.
        ignore_index: target value with no loss, gradient or count.
        reduction: 'none' | 'mean' | 'sum'.
        from_logits: False when logits hold probabilities.
        weight: None or a tensor of the target's shape: loss_i := w_i loss_i, exactly 0 (loss
            and gradient) where w_i == 0.
        label_smoothing: eps in [0, 1].
        upcast: True (default) computes in promote_types(logits.dtype, float32); False in the
            logits' own dtype (the low-precision eager baseline).

    Returns:
        The loss: the target's shape for 'none', else a 0-dim tensor.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
        >>> loss = reference.focal(x, torch.tensor([0, 2, 1, 0]), gamma=2.0)
        >>> loss.backward()
    """
    dtype = _compute_dtype(logits, upcast)
    x, t, valid, active, w = _softmax_rows(logits, target, ignore_index, dtype, 0.0 if from_logits else 1.0, weight)
    eps = float(label_smoothing)
    if eps > 0:
        logp = torch.log_softmax(x, dim=-1)
        per_class = _smoothed_target(t, x.shape[-1], eps, dtype, x.device) * focal_term(logp, gamma)
        if isinstance(alpha, torch.Tensor):
            per_class = per_class * alpha.to(device=x.device, dtype=dtype)
        elif alpha is not None:
            per_class = per_class * float(alpha)
        loss = per_class.sum(dim=-1)
    else:
        logpt = _log_pt(x, t, from_logits)
        loss = focal_term(logpt, gamma)
        a = _alpha_t(alpha, t, dtype, x.device)
        if a is not None:
            loss = loss * a
    loss = _weighted(loss, active, w)
    return _reduce(loss, reduction, valid.sum(), logits.dtype, target.shape)


def _smoothed_ce(x, t_safe, eps):
    """Per-row cross entropy against the smoothed target (eps = 0: -log p_t)."""
    if eps > 0:
        logp = torch.log_softmax(x, dim=-1)
        return -(_smoothed_target(t_safe, x.shape[-1], eps, x.dtype, x.device) * logp).sum(dim=-1)
    return -_log_pt(x, t_safe)


def _per_sample_ce(logits, target, ignore_index, dtype):
    """Per-row cross entropy (0 for ignored rows), probability p_t, valid mask."""
    x, t, valid, _, _ = _softmax_rows(logits, target, ignore_index, dtype)
    logpt = _log_pt(x, t)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    return torch.where(valid, -logpt, zero), torch.exp(logpt), valid


def ohem_min_kept_total(logits: torch.Tensor, min_kept) -> int:
    """OHEM's thresh mode keeps at least min_kept samples per image: x N for (N, C, d...) inputs, as
    given for (N, C) inputs (the batch is one image). None means 0. Every backend calls this, so
    the rule lives in one place.

    Args:
        logits: the loss's logits (only the shape is read).
        min_kept: None or an int >= 0.

    Returns:
        The total number of samples to keep at least, an int.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> reference.ohem_min_kept_total(torch.zeros(2, 3, 4, 4), 10)
        20
    """
    images = logits.shape[0] if logits.dim() > 2 else 1
    return int(min_kept or 0) * images


def ohem_kept_mask(ce: torch.Tensor, pt: torch.Tensor, valid: torch.Tensor, *, keep, keep_is_int: bool,
                   thresh, min_kept_total: int) -> torch.Tensor:
    """Which samples OHEM keeps (bool, like ce), computed on the device without a host sync.

    thresh None: the k hardest valid samples by CE, k = min(keep, n_valid) for an int keep, else
    max(1, floor(keep * n_valid)) (floor in float64); selection by the rank of a stable
    descending sort with ignored rows last, so ties go to the lower index. thresh given (mmseg):
    valid samples with p_t < max(thresh, sorted_p[min(min_kept_total, n_valid - 1)]).
    The reference and the Triton backend both select with this function.

    Args:
        ce: per-sample cross entropy, any shape.
        pt: per-sample true-class probability, ce's shape.
        valid: bool mask of non-ignored samples, ce's shape.
        keep: float fraction or int count (thresh None).
        keep_is_int: whether keep is a count.
        thresh: None or mmseg's probability threshold.
        min_kept_total: from :func:`ohem_min_kept_total`.

    Returns:
        A bool tensor of ce's shape.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> ce = torch.tensor([0.1, 2.0, 0.5, 3.0])
        >>> reference.ohem_kept_mask(ce, torch.exp(-ce), torch.ones(4, dtype=torch.bool), keep=0.5,
        ...                          keep_is_int=False, thresh=None, min_kept_total=0)
        tensor([False,  True, False,  True])
    """
    with torch.no_grad():
        n_valid = valid.sum()
        if thresh is None:
            if keep_is_int:
                k = torch.clamp_max(n_valid, int(keep))
            else:
                k = torch.clamp_min(torch.floor(keep * n_valid.to(torch.float64)).long(), 1)
            key = torch.where(valid, ce, torch.full_like(ce, -math.inf))
            order = torch.sort(key, descending=True, stable=True).indices
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel(), device=order.device)
            return (rank < k) & valid
        # Ignored samples sort as NaN (last, like NaN valid ones): the first n_valid sorted values
        # are then exactly mmseg's sort of the valid samples alone, NaN p_t included.
        p_sorted = torch.sort(torch.where(valid, pt, torch.full_like(pt, math.nan))).values
        idx = torch.clamp(torch.clamp_max(n_valid - 1, min_kept_total), min=0)
        at_idx = p_sorted.gather(0, idx.reshape(1)).squeeze(0) if p_sorted.numel() else pt.new_zeros(())
        min_threshold = torch.where(n_valid > 0, at_idx, torch.zeros_like(at_idx))
        threshold = torch.clamp_min(min_threshold, float(thresh))
        return (pt < threshold) & valid


def ohem(logits, target, *, keep=0.25, thresh=None, min_kept=None, ignore_index=-100,
         reduction="mean", weight=None, label_smoothing=0.0, upcast=True):
    """Online hard example mining over per-sample cross entropy.

    keep (float in (0, 1]): k = max(1, floor(keep * n_valid)); keep (int >= 1): k = min(keep,
    n_valid). The k samples with the largest CE are kept (ties: lower index first), computed on
    the device by sort rank. thresh (mmseg OHEMPixelSampler): threshold = max(thresh,
    sorted_p[min(min_kept_total, n_valid - 1)]); keep samples with p_t < threshold. Only kept
    samples contribute; 'mean' divides by the kept count. The selection ranks the unsmoothed CE /
    p_t of the logits as given and ignores weights; a kept sample's loss is w_i times its cross
    entropy against the smoothed target (label_smoothing).

    Args:
        logits: (N, C) or (N, C, d...) float tensor.
        target: (N,) or (N, d...) class indices.
        keep: float in (0, 1] or int >= 1 (see above).
        thresh: None, or mmseg's probability threshold.
        min_kept: with thresh: samples kept at least per image (x N for (N, C, d...) inputs, as
            given for (N, C)).
        ignore_index: target value that is never kept or counted.
        reduction: 'none' | 'mean' | 'sum'.
        weight: None or a tensor of the target's shape.
        label_smoothing: eps in [0, 1] for the kept samples' loss.
        upcast: True (default) computes in promote_types(logits.dtype, float32); False in the
            logits' own dtype (the low-precision eager baseline).

    Returns:
        The loss: the target's shape for 'none' (0 where not kept), else a 0-dim tensor.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> loss = reference.ohem(torch.randn(8, 3), torch.randint(0, 3, (8,)), keep=0.25, reduction="none")
        >>> int((loss > 0).sum())
        2
    """
    dtype = _compute_dtype(logits, upcast)
    ce, pt, valid = _per_sample_ce(logits.detach(), target, ignore_index, dtype)
    kept = ohem_kept_mask(ce, pt, valid, keep=keep, keep_is_int=not isinstance(keep, float),
                          thresh=thresh, min_kept_total=ohem_min_kept_total(logits, min_kept))
    x, t, _, active, w = _softmax_rows(logits, target, ignore_index, dtype, weight=weight)
    loss = _weighted(_smoothed_ce(x, t, float(label_smoothing)), kept & active, w)
    return _reduce(loss, reduction, kept.sum(), logits.dtype, target.shape)


# --------------------------------------------------------------------------------------------
# Sigmoid family
# --------------------------------------------------------------------------------------------
def _sigmoid_targets(logits, target, ignore_index, dtype):
    """Float target -> (target, valid=None). Integer labels of shape logits.shape[:-1]:
    one-hot (label == C: all zeros, background) and a per-element valid mask."""
    if target.is_floating_point():
        return target.to(dtype), None
    c = logits.shape[-1]
    labels = target.long()
    valid_rows = labels != ignore_index
    classes = torch.arange(c, device=logits.device)
    onehot = (labels[..., None] == classes).to(dtype)
    valid = valid_rows[..., None].expand(logits.shape)
    return onehot, valid


def _sigmoid_weight(weight, shape, dtype):
    """Validated sigmoid-family weight (logits.shape[:-1]: per row, or logits.shape: per
    element; told apart by numel as the kernels do) -> broadcastable to `shape`, in dtype."""
    if weight is None:
        return None
    per_element = weight.numel() == math.prod(shape)
    return weight.to(dtype).reshape(shape if per_element else (*shape[:-1], 1))


def sigmoid_focal(logits, target, *, alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none",
                  weight=None, upcast=True):
    """torchvision.ops.sigmoid_focal_loss, elementwise.

    BCE-with-logits(x, t) * (1 - p_t)^gamma * alpha_t, p_t = p t + (1 - p)(1 - t),
    alpha_t = alpha t + (1 - alpha)(1 - t); alpha < 0 disables alpha; a (C,) tensor alpha is
    per class: alpha_t = alpha[c] t + (1 - alpha[c])(1 - t). Integer labels of shape
    logits.shape[:-1] are one-hot encoded (label == C: all zeros, background); ignored rows give 0
    loss and 0 grad and are not counted in 'mean'.

    Args:
        logits: (..., C) float tensor.
        target: float targets of the logits' shape, or integer labels of shape logits.shape[:-1].
        alpha: a float (< 0 disables it) or a (C,) tensor.
        gamma: focusing parameter >= 0.
        ignore_index: integer label of rows to ignore.
        reduction: 'none' | 'mean' | 'sum'.
        weight: None, or per row (logits.shape[:-1]) or per element (logits.shape): multiplies
            loss and gradient; a zero weight selects 0.
        upcast: True (default) computes in promote_types(logits.dtype, float32); False in the
            logits' own dtype (the low-precision eager baseline).

    Returns:
        The loss: the logits' shape for 'none', else a 0-dim tensor. Differentiable in the logits
        and in a float target.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> reference.sigmoid_focal(torch.randn(3, 4), torch.tensor([0, 4, 1])).shape
        torch.Size([3, 4])
    """
    dtype = _compute_dtype(logits, upcast)
    y, valid = _sigmoid_targets(logits, target, ignore_index, dtype)
    x = logits.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    w = _sigmoid_weight(weight, logits.shape, dtype)
    active = valid
    if w is not None:
        active = (w != 0) if valid is None else valid & (w != 0)
    if active is not None:
        x = torch.where(active, x, zero)
        y = torch.where(active, y, zero)
    p = torch.sigmoid(x)
    q = torch.sigmoid(-x)  # 1 - p, exact for large x
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    one_minus_pt = p * (1 - y) + q * y
    loss = ce * _PowSafe.apply(one_minus_pt, float(gamma))
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(device=x.device, dtype=dtype)
        loss = (a * y + (1 - a) * (1 - y)) * loss
    elif alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    if active is not None:
        loss = _weighted(loss, active, w)
    count = valid.sum() if valid is not None else loss.numel()
    return _reduce(loss, reduction, count, logits.dtype, logits.shape)


# --------------------------------------------------------------------------------------------
# GHM-C
# --------------------------------------------------------------------------------------------
def ghm_bin_weights(counts: torch.Tensor, n_valid: torch.Tensor, state, momentum: float,
                    dtype: torch.dtype = torch.float32):
    """GHM-C per-bin weights from float32 bin counts, and the updated EMA state (None without one).

    Bins non-empty in this batch first update the state, new = m * state + (1 - m) * count
    (float32), which is then the divisor; without a state the divisor is the count.
    weight_b = n_valid / divisor_b / n_nonempty for non-empty bins, 0 for empty ones, in `dtype`
    (counts are exact integers). Device ops only; the reference and the Triton backend share it.

    Args:
        counts: float32 (bins,) valid entries per bin.
        n_valid: 0-dim tensor, the number of valid entries.
        state: None or the float32 (bins,) EMA state (not written: the new state is returned).
        momentum: EMA momentum in [0, 1).
        dtype: dtype of the returned weights.

    Returns:
        (weights (bins,) in dtype, the new state or None).

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> w, s = reference.ghm_bin_weights(torch.tensor([3.0, 0.0, 1.0]), torch.tensor(4.0), None, 0.0)
        >>> w
        tensor([0.6667, 0.0000, 2.0000])
    """
    nonempty = counts > 0
    new_state = None
    if state is not None:
        new_state = torch.where(nonempty, momentum * state + (1 - momentum) * counts, state)
        divisor = new_state
    else:
        divisor = counts
    divisor = divisor.to(dtype)
    weight = torch.where(nonempty, n_valid.to(dtype) / divisor.clamp_min(1e-12), torch.zeros_like(divisor))
    return weight / nonempty.sum().clamp_min(1).to(dtype), new_state


def ghmc(logits, target, *, bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100,
         reduction="mean", weight=None, label_smoothing=0.0, process_group=None, upcast=True):
    """Gradient harmonized classification loss (Li et al., AAAI 2019).

    g = |sigmoid(x) - y| per element (use_sigmoid) or 1 - p_t per sample (softmax), always in
    float32; bin = min(floor(g * bins), bins - 1), NaN g in no bin. count per bin over valid
    entries; with `state` (float32 (bins,), updated in place first): state[b] = m * state[b] +
    (1 - m) * count[b] for non-empty bins and the bin's divisor is state[b], else count[b].
    weight = n_valid / divisor[bin] / n_nonempty_bins (no gradient); loss = weight * CE,
    'mean' = sum / n_valid. Sample weights: an entry with weight 0 is invalid (mmdet's
    label_weight > 0 mask: not in the histogram, n_valid or the 'mean' denominator; 0 loss and
    gradient); a nonzero weight w multiplies the entry's loss: w * bin_weight * CE.

    Args:
        logits: use_sigmoid: (..., C); softmax: (N, C) or (N, C, d...).
        target: sigmoid-family targets (use_sigmoid) or class indices.
        bins: number of bins >= 1.
        momentum: EMA momentum in [0, 1).
        state: None or the float32 (bins,) EMA state, updated in place.
        use_sigmoid: True: C sigmoids (label == C is background); False: softmax.
        ignore_index: target value to ignore.
        reduction: 'none' | 'mean' | 'sum'.
        weight: None or the broadcast weight (see above).
        label_smoothing: softmax only: CE against the smoothed target; g and the bins stay
            unsmoothed.
        process_group: None, or a torch.distributed group: the counts (and n_valid) are summed
            over its ranks (fused_losses.distributed.global_bin_weights) before the weights and the
            EMA update; 'mean' still divides by this rank's n_valid.
        upcast: True (default) computes in promote_types(logits.dtype, float32); False in the
            logits' own dtype (the low-precision eager baseline).

    Returns:
        The loss: the per-entry loss for 'none', else a 0-dim tensor.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> loss = reference.ghmc(torch.randn(8, 3), torch.randint(0, 3, (8,)), use_sigmoid=False)
    """
    dtype = _compute_dtype(logits, upcast)
    zero = torch.zeros((), dtype=dtype, device=logits.device)
    if use_sigmoid:
        y, valid = _sigmoid_targets(logits, target, ignore_index, dtype)
        x = logits.to(dtype)
        w = _sigmoid_weight(weight, logits.shape, dtype)
        if valid is None:
            valid = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        if w is not None:
            valid = valid & (w != 0)
        x = torch.where(valid, x, zero)
        y = torch.where(valid, y, zero)
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        with torch.no_grad():
            g = (torch.sigmoid(x.detach().float()) - y.detach().float()).abs()
        out_shape = logits.shape
    else:
        x, t, _, valid, w = _softmax_rows(logits, target, ignore_index, dtype, weight=weight)
        ce = torch.where(valid, _smoothed_ce(x, t, float(label_smoothing)), zero)
        with torch.no_grad():
            xg, tg, _, _, _ = _softmax_rows(logits.detach(), target, ignore_index, torch.float32,
                                             weight=None if weight is None else weight.detach())
            g = -torch.expm1(_log_pt(xg, tg))
        out_shape = target.shape
    with torch.no_grad():
        in_bin = valid & ~torch.isnan(g)
        idx = torch.clamp_max(torch.floor(torch.where(in_bin, g, torch.zeros_like(g)) * bins), bins - 1).long()
        n_valid = valid.sum()
        if process_group is None:
            counts = torch.zeros(bins, dtype=torch.float32, device=ce.device)
            counts.scatter_add_(0, idx[in_bin].reshape(-1), torch.ones_like(g[in_bin]).reshape(-1))
            bin_weight, new_state = ghm_bin_weights(counts, n_valid, state, momentum, dtype)
            if state is not None:
                state.copy_(new_state)
        else:
            from fused_losses.distributed import global_bin_weights  # noqa: PLC0415 - only with a group
            counts = torch.bincount(idx[in_bin].reshape(-1), minlength=bins)
            bin_weight = global_bin_weights(torch.cat([counts, n_valid.reshape(1)]), state, momentum, dtype,
                                            process_group)
        bin_weight_i = torch.where(in_bin, bin_weight[idx], torch.zeros((), dtype=dtype, device=ce.device))
    loss = _weighted(bin_weight_i * ce, valid, w)
    return _reduce(loss, reduction, n_valid, logits.dtype, out_shape)


# --------------------------------------------------------------------------------------------
# Influence-balanced loss
# --------------------------------------------------------------------------------------------
def ib(logits, target, features, *, alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0,
       detach_factor=False, reduction="mean", upcast=True):
    """Influence-balanced loss (Park et al., ICCV 2021), as the official code computes it.

    g_i = ||softmax_i - onehot_i||_1 = 2 (1 - p_t); f_i = features (N,)/(N, 1) as given, or
    sum_d |features_id| for (N, D); factor_i = alpha / (g_i f_i + epsilon);
    CE_w,i = weight[t_i] * CE_i; loss_i = factor_i * CE_w,i, and with gamma > 0 (IB-focal)
    loss_i = factor_i * (1 - exp(-CE_w,i))^gamma * CE_w,i. 'mean' divides by N.

    Args:
        logits: (N, C) float tensor.
        target: (N,) class indices.
        features: (N,), (N, 1) or (N, D).
        alpha: numerator of the factor.
        epsilon: added to the factor's denominator.
        weight: None or a (C,) tensor of per-class weights.
        gamma: IB-focal exponent >= 0.
        detach_factor: True stops the gradient through the factor.
        reduction: 'none' | 'mean' | 'sum'.
        upcast: True (default) computes in promote_types(logits.dtype, float32); False in the
            logits' own dtype (the low-precision eager baseline).

    Returns:
        The loss: (N,) for 'none', else a 0-dim tensor.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> loss = reference.ib(torch.randn(8, 3), torch.randint(0, 3, (8,)), torch.rand(8))
    """
    dtype = _compute_dtype(logits, upcast)
    x = logits.to(dtype)
    t = target.long()
    logp = torch.log_softmax(x, dim=-1)
    logpt = logp.gather(1, t[:, None]).squeeze(1)
    f = features.to(dtype)
    if f.dim() == 2 and f.shape[1] > 1:
        f = f.abs().sum(dim=1)
    f = f.reshape(-1)
    g = 2.0 * (-torch.expm1(logpt))
    factor = alpha / (g * f + epsilon)
    if detach_factor:
        factor = factor.detach()
    ce_w = -logpt
    if weight is not None:
        ce_w = ce_w * weight.to(device=x.device, dtype=dtype)[t]
    per_sample = focal_term(-ce_w, gamma) if gamma > 0 else ce_w
    loss = factor * per_sample
    return _reduce(loss, reduction, t.numel(), logits.dtype, target.shape)


# --------------------------------------------------------------------------------------------
# Class-balanced weights
# --------------------------------------------------------------------------------------------
def class_weights(counts: torch.Tensor, scheme: str = "inverse", beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights normalised to sum C (float32).

    'inverse': w_k = 1 / n_k; 'effective': w_k = (1 - beta) / (1 - beta^n_k) (Cui et al. 2019).

    Args:
        counts: validated positive (C,) tensor of per-class counts.
        scheme: 'inverse' or 'effective'.
        beta: the 'effective' scheme's beta, in (0, 1).

    Returns:
        A float32 (C,) tensor summing to C.

    Example:
        >>> import torch
        >>> from fused_losses import reference
        >>> reference.class_weights(torch.tensor([100.0, 200.0, 50.0]))
        tensor([0.8571, 0.4286, 1.7143])
    """
    n = counts.to(torch.float64)
    if scheme == "inverse":
        w = 1.0 / n
    else:
        w = (1.0 - beta) / (-torch.expm1(n * math.log(beta)))
    return (w * (n.numel() / w.sum())).to(torch.float32)


# ============================================================================================
# Detector losses (issue #24): quality focal, varifocal, distribution focal, asymmetric, Poly-1
# ============================================================================================
# The semantics, each decision and each difference from the peers (mmdet 3.x, ultralytics,
# RT-DETR, timm, the ASL and Poly-1 papers' code) are in docs/losses/detector.md; the tests
# (tests/test_reference_detector.py) check every function against the peers' formulas.
#
# Unlike the references above, these take ``avg_factor`` themselves (mmdet's weight_reduce_loss
# without its float32 eps, which the compat drop-ins add, as MMDetFocalLoss does): with
# reduction='mean' the loss is sum / avg_factor; with another reduction it is a ValueError (as
# fused_losses._validate.avg_factor_arg). Weights: a zero weight SELECTS a zero loss (the
# entry's input is replaced before any arithmetic: a NaN logit there gives 0 loss and 0 grad)
# and does not change the 'mean' denominator. The sigmoid-type losses take a weight per row
# (logits.shape[:-1]) or per element (logits.shape), told apart by numel as _sigmoid_weight.
__all__ += ["quality_focal", "varifocal", "distribution_focal", "asymmetric", "poly1_term", "focal_poly1",
            "sigmoid_focal_poly1"]


def _detector_reduce(loss: torch.Tensor, reduction: str, count, avg_factor, out_dtype):
    """'none' -> loss in out_dtype; 'sum'; 'mean' = sum / avg_factor, else sum / max(count, 1)."""
    if avg_factor is not None and reduction != "mean":
        raise ValueError(f"avg_factor: only applies with reduction='mean', got reduction={reduction!r}")
    if reduction == "none":
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == "sum":
        return total
    if avg_factor is not None:
        return total / (avg_factor.to(total.dtype) if isinstance(avg_factor, torch.Tensor) else avg_factor)
    if isinstance(count, torch.Tensor):
        return total / count.clamp_min(1).to(total.dtype)
    return total / max(count, 1)


def _softplus_exact(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) = max(x, 0) + log1p(e^-|x|), accurate for every x (torch's softplus returns x
    above its threshold 20, a relative error of e^-20 / 20 ~ 1e-10) with the derivative sigmoid(x),
    1/2 at x = 0 (the selects avoid clamp's and abs's one-sided derivatives there)."""
    pos = x > 0
    return torch.where(pos, x, torch.zeros_like(x)) + torch.log1p(torch.exp(torch.where(pos, -x, x)))


def _bce_with_logits_exact(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits as (1 - y) softplus(x) + y softplus(-x): each term accurate, so the loss
    of a confident correct entry (y = 1, x = 40: log1p(e^-40)) is not rounded to 0 as in
    torch's binary_cross_entropy_with_logits (which computes log(1 + e^-40) = 0 in float64)."""
    return (1 - y) * _softplus_exact(x) + y * _softplus_exact(-x)


def _sigmoid_label_rows(logits, target, score, ignore_index, dtype):
    """The (label, score) target form -> dense (..., C) soft target y = score at the label's class
    (label == C: background, all 0), the positive mask (the label's class, whatever its score)
    and the per-row valid mask (label != ignore_index)."""
    c = logits.shape[-1]
    labels = target.long()
    valid_rows = labels != ignore_index
    positive = labels[..., None] == torch.arange(c, device=logits.device)
    y = torch.where(positive, score.to(dtype)[..., None], torch.zeros((), dtype=dtype, device=logits.device))
    return y, positive, valid_rows


def _element_active(valid_rows, w, shape, device):
    """Per-element active mask (not ignored and weight != 0), or None when every entry is."""
    active = None if valid_rows is None else valid_rows[..., None].expand(shape)
    if w is not None:
        nonzero = (w != 0).expand(shape)
        active = nonzero if active is None else active & nonzero
    return active


def quality_focal(logits, target, *, score=None, beta=2.0, activated=False, weight=None, avg_factor=None,
                  reduction="mean", ignore_index=-100, upcast=True):
    """Quality focal loss (GFL, Li et al. 2020), mmdet 3.x QualityFocalLoss.

    Per element: |y - s|^beta * BCE(s, y), s = sigmoid(x) (activated=False) or s = x (activated:
    probabilities in, torch's binary_cross_entropy with its log clamped at -100, as mmdet);
    the loss of a row is the sum over its C classes (mmdet returns (N,)).
    Target forms: ``score`` given: target holds integer labels (...,) in [0, C] (C = background:
    every class negative) or ignore_index (the row: 0 loss, 0 grad, not counted), score (...,)
    the quality at the label's class; else target is a dense soft target of logits' shape in
    [0, 1]. 'none' returns the per-row loss (logits.shape[:-1]); 'mean' divides by the number of
    non-ignored rows (or avg_factor). weight: per row or per element (before the class sum).
    """
    dtype = _compute_dtype(logits, upcast)
    x = logits.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    if score is not None:
        y, _, valid_rows = _sigmoid_label_rows(logits, target, score, ignore_index, dtype)
    else:
        y, valid_rows = target.to(dtype), None
    w = _sigmoid_weight(weight, logits.shape, dtype)
    active = _element_active(valid_rows, w, logits.shape, x.device)
    if active is not None:
        x = torch.where(active, x, torch.full((), 0.5 if activated else 0.0, dtype=dtype, device=x.device))
        y = torch.where(active, y, zero)
    if activated:
        s = x
        bce = F.binary_cross_entropy(x, y, reduction="none")
        distance = (y - s).abs()
    else:
        bce = _bce_with_logits_exact(x, y)
        # y - s = y (1 - s) - (1 - y) s with 1 - s = sigmoid(-x): exact near s = 1 as near s = 0
        distance = (y * torch.sigmoid(-x) - (1 - y) * torch.sigmoid(x)).abs()
    loss = bce * _PowSafe.apply(distance, float(beta))
    if active is not None:
        loss = _weighted(loss, active, w)
    loss = loss.sum(dim=-1)
    count = valid_rows.sum() if valid_rows is not None else loss.numel()
    return _detector_reduce(loss, reduction, count, avg_factor, logits.dtype)


def varifocal(logits, target, *, score=None, alpha=0.75, gamma=2.0, iou_weighted=True, detach_modulation=False,
              weight=None, avg_factor=None, reduction="mean", ignore_index=-100, upcast=True):
    """Varifocal loss (VarifocalNet, Zhang et al. 2021), elementwise:

    BCE(s, y) * (y if iou_weighted else 1) on positives, BCE(s, 0) * alpha * s^gamma on negatives,
    s = sigmoid(x). Dense target (logits' shape, in [0, 1]): positives are the entries with
    y > 0 (mmdet's varifocal_loss; y = 0 is a negative). (label, score) form (``score`` given,
    labels in [0, C] or ignore_index): the positive is the label's class whatever its score, with
    y = score there, as RT-DETR's loss_labels_vfl and ultralytics' VarifocalLoss (a positive with
    q = 0 has zero loss). detach_modulation: s^gamma computed from the detached logits (RT-DETR);
    default False (mmdet, ultralytics: the gradient flows through it). 'none' returns the
    elementwise loss; 'mean' divides by the number of non-ignored elements (or avg_factor).
    """
    dtype = _compute_dtype(logits, upcast)
    x = logits.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    if score is not None:
        y, positive, valid_rows = _sigmoid_label_rows(logits, target, score, ignore_index, dtype)
    else:
        y, valid_rows = target.to(dtype), None
        positive = y > 0
    w = _sigmoid_weight(weight, logits.shape, dtype)
    active = _element_active(valid_rows, w, logits.shape, x.device)
    if active is not None:
        x = torch.where(active, x, zero)
        y = torch.where(active, y, zero)
    bce = _bce_with_logits_exact(x, y)
    s = torch.sigmoid(x.detach() if detach_modulation else x)
    negative_factor = float(alpha) * _PowSafe.apply(s, float(gamma))
    positive_factor = y if iou_weighted else torch.ones_like(y)
    loss = bce * torch.where(positive, positive_factor, negative_factor)
    if active is not None:
        loss = _weighted(loss, active, w)
    count = valid_rows.sum() * logits.shape[-1] if valid_rows is not None else loss.numel()
    return _detector_reduce(loss, reduction, count, avg_factor, logits.dtype)


def distribution_focal(logits, target, *, weight=None, avg_factor=None, reduction="mean", upcast=True):
    """Distribution focal loss (GFL): logits (..., n + 1) over the bins 0..n, float target (...,)
    in [0, n]. With l = floor(y) (l = n - 1 at y = n) and r = l + 1:
    loss = (r - y) * CE(x, l) + (y - l) * CE(x, r), mmdet's distribution_focal_loss. At y = n this
    is CE(x, n), the limit from below (mmdet's formula there indexes bin n + 1: an IndexError).
    On an integer y = k < n it is CE(x, k), as mmdet. weight: one per row (target's shape).
    'none' returns the per-row loss; 'mean' divides by the number of rows (or avg_factor).
    """
    dtype = _compute_dtype(logits, upcast)
    x = logits.to(dtype)
    y = target.to(dtype)
    n = x.shape[-1] - 1
    zero = torch.zeros((), dtype=dtype, device=x.device)
    w = None if weight is None else weight.to(dtype).reshape(y.shape)
    if w is not None:
        active = w != 0
        x = torch.where(active[..., None], x, zero)
        y = torch.where(active, y, zero)
    left = torch.clamp(torch.floor(y.detach()), 0, max(n - 1, 0)).long()
    right = torch.clamp_max(left + 1, n)
    w_right = y - left.to(dtype)
    w_left = 1 - w_right
    logp = torch.log_softmax(x, dim=-1)
    loss = -(w_left * logp.gather(-1, left[..., None])[..., 0] + w_right * logp.gather(-1, right[..., None])[..., 0])
    if w is not None:
        loss = _weighted(loss, active, w)
    return _detector_reduce(loss, reduction, loss.numel(), avg_factor, logits.dtype)


def _pow_tensor_safe(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """q^g for q >= 0 and a tensor exponent g >= 0, with a zero derivative at q = 0 (1 where
    g = 0, as torch.pow(0, 0)), instead of the inf * 0 = NaN of autograd through pow there."""
    pos = q > 0
    return torch.where(pos, torch.where(pos, q, torch.ones_like(q)).pow(g), (g == 0).to(q.dtype))


def asymmetric(logits, target, *, gamma_pos=1.0, gamma_neg=4.0, clip=0.05, eps=1e-8, detach_focusing=False,
               weight=None, avg_factor=None, reduction="sum", upcast=True):
    """Asymmetric loss (ASL, Ridnik et al. 2021), multi-label, timm's AsymmetricLossMultiLabel.

    Per element, p = sigmoid(x), target y in [0, 1] (multi-hot or soft), m = clip:
    p_neg = min(1 - p + m, 1) (m > 0; else 1 - p), L+ = log(max(p, eps)), L- = log(max(p_neg, eps)),
    1 - p_t = y (1 - p) + (1 - y)(1 - p_neg) (= max(p - m, 0) on a negative: the probability shift),
    w = (1 - p_t)^(gamma_pos y + gamma_neg (1 - y)), loss = -(y L+ + (1 - y) L-) * w.
    detach_focusing: w carries no gradient (timm's disable_torch_grad_focal_loss). Default
    reduction 'sum' (timm's return value -loss.sum(), the ASL code's); 'mean' divides by the
    number of elements (or avg_factor: timm's newer 'batchmean' is 'mean' with avg_factor = N).
    weight: per row or per element.
    """
    dtype = _compute_dtype(logits, upcast)
    x = logits.to(dtype)
    y = target.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    w = _sigmoid_weight(weight, logits.shape, dtype)
    active = _element_active(None, w, logits.shape, x.device)
    if active is not None:
        x = torch.where(active, x, zero)
        y = torch.where(active, y, zero)

    def parts(z):
        """(1 - p_neg) and log(clamped p_neg) from logits z."""
        if clip is not None and clip > 0:
            p_neg = torch.clamp(torch.sigmoid(-z) + float(clip), max=1.0)
            log_neg = torch.log(torch.clamp(p_neg, min=float(eps))) if eps > 0 else torch.log(p_neg)
            return torch.clamp(torch.sigmoid(z) - float(clip), min=0.0), log_neg
        log_neg = F.logsigmoid(-z)
        return torch.sigmoid(z), (torch.clamp(log_neg, min=math.log(eps)) if eps > 0 else log_neg)

    shifted_p, log_neg = parts(x)
    log_pos = F.logsigmoid(x)
    if eps > 0:
        log_pos = torch.clamp(log_pos, min=math.log(eps))
    loss = -(y * log_pos + (1 - y) * log_neg)
    if gamma_pos > 0 or gamma_neg > 0:
        if detach_focusing:
            xd, yd = x.detach(), y.detach()
            one_minus_pt = yd * torch.sigmoid(-xd) + (1 - yd) * parts(xd)[0]
            g = float(gamma_pos) * yd + float(gamma_neg) * (1 - yd)
        else:
            one_minus_pt = y * torch.sigmoid(-x) + (1 - y) * shifted_p
            g = float(gamma_pos) * y + float(gamma_neg) * (1 - y)
        loss = loss * _pow_tensor_safe(one_minus_pt, g)
    if active is not None:
        loss = _weighted(loss, active, w)
    return _detector_reduce(loss, reduction, loss.numel(), avg_factor, logits.dtype)


def poly1_term(one_minus_pt: torch.Tensor, gamma: float, epsilon: float) -> torch.Tensor:
    """Poly-1's added term, epsilon * (1 - p_t)^(gamma + 1) (gamma = 0: Poly-1 CE's epsilon (1 - p_t)).
    The exponent is >= 1, so autograd's derivative is finite everywhere."""
    return float(epsilon) * one_minus_pt.pow(float(gamma) + 1.0)


def focal_poly1(logits, target, *, epsilon=1.0, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean",
                from_logits=True, weight=None, label_smoothing=0.0, upcast=True):
    """Poly-1 softmax focal loss (Leng et al. 2022): focal(...) + epsilon (1 - p_t)^(gamma + 1) per
    sample; gamma = 0 without alpha is Poly-1 cross entropy, CE + epsilon (1 - p_t). alpha does
    not scale the added term (the paper's code); weight scales both; label_smoothing: p_t =
    sum_c q_c p_c (the paper's code: pt = sum(labels * softmax)). Counts as focal.
    ``focal(..., epsilon=e)`` of the public API is this function; epsilon = 0 is focal exactly.
    """
    dtype = _compute_dtype(logits, upcast)
    base = focal(logits.to(dtype), target, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction="none",
                 from_logits=from_logits, weight=weight, label_smoothing=label_smoothing, upcast=upcast)
    x, t, valid, active, w = _softmax_rows(logits, target, ignore_index, dtype, 0.0 if from_logits else 1.0, weight)
    eps = float(label_smoothing)
    if eps > 0:
        p = torch.softmax(x, dim=-1)
        one_minus_pt = 1 - (_smoothed_target(t, x.shape[-1], eps, dtype, x.device) * p).sum(dim=-1)
    else:
        one_minus_pt = -torch.expm1(_log_pt(x, t, from_logits))
    poly = _weighted(poly1_term(one_minus_pt, gamma, epsilon), active, w)
    loss = base.reshape(-1) + poly
    return _reduce(loss, reduction, valid.sum(), logits.dtype, target.shape)


def sigmoid_focal_poly1(logits, target, *, epsilon=1.0, alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none",
                        weight=None, upcast=True):
    """Poly-1 sigmoid focal loss, elementwise: sigmoid_focal(...) + epsilon (1 - p_t)^(gamma + 1),
    p_t = p y + (1 - p)(1 - y) (the paper's poly1_focal_loss; alpha does not scale the added term).
    Targets, weights, ignored rows and counts as sigmoid_focal. ``sigmoid_focal(..., epsilon=e)``
    of the public API is this function; epsilon = 0 is sigmoid_focal exactly.
    """
    dtype = _compute_dtype(logits, upcast)
    base = sigmoid_focal(logits.to(dtype), target, alpha=alpha, gamma=gamma, ignore_index=ignore_index,
                         reduction="none", weight=weight, upcast=upcast)
    y, valid = _sigmoid_targets(logits, target, ignore_index, dtype)
    x = logits.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    w = _sigmoid_weight(weight, logits.shape, dtype)
    active = valid
    if w is not None:
        active = (w != 0).expand(logits.shape) if valid is None else valid & (w != 0)
    if active is not None:
        x = torch.where(active, x, zero)
        y = torch.where(active, y, zero)
    one_minus_pt = torch.sigmoid(x) * (1 - y) + torch.sigmoid(-x) * y
    poly = poly1_term(one_minus_pt, gamma, epsilon)
    if active is not None:
        poly = _weighted(poly, active, w)
    loss = base + poly
    count = valid.sum() if valid is not None else loss.numel()
    return _reduce(loss, reduction, count, logits.dtype, logits.shape)


# ============================================================================================
# Long-tail losses with class statistics (issue #25): Seesaw, EQLv2, EFL
# ============================================================================================
# Semantics, the peer files and commits read and each difference from them are in
# docs/losses/longtail.md; tests/test_reference_longtail.py checks every function against the
# peers' code (mmdet 3.x SeesawLoss, the EQLv2 authors' EQLv2, United-Perception's
# EqualizedFocalLoss with its backward hook) over consecutive steps with the state carried.
#
# State, as ghmc's: a float32 tensor the caller owns (an nn module will keep it as a buffer), whatever
# the logits' dtype; it must not require grad; the call UPDATES IT IN PLACE (under no_grad) and
# returns only the loss, as the fused kernels will (on the device, no host sync). Per-batch sums
# are computed in the compute dtype and added to the float32 state as fp32(fp64(state) + sum)
# (PyTorch's in-place add of a float64 into a float32 buffer, what the peers do with float64
# inputs; with float32 inputs it is the float32 add). Reductions and avg_factor follow the
# detector section (_detector_reduce: avg_factor only with 'mean').
__all__ += ["seesaw", "seesaw_log_factors", "eqlv2", "eqlv2_initial_state", "eqlv2_class_weights"]

EQLV2_INITIAL_RATIO = 100.0  # the authors' pos_neg buffer starts at 100: f = sigmoid(gamma (100 - mu)) = 1
EQLV2_RATIO_EPS = 1e-10  # pos_neg = pos_grad / (neg_grad + 1e-10), in float32 (the authors' code)


def _add_to_state(state: torch.Tensor, batch_sum: torch.Tensor) -> None:
    """state := fp32(fp64(state) + batch_sum), in place (float32 batch sums: the float32 add)."""
    if batch_sum.dtype == torch.float32:
        state.add_(batch_sum)
    else:
        state.copy_(state.to(batch_sum.dtype) + batch_sum)


def seesaw_log_factors(cum_samples: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, *, p: float, q: float,
                       eps: float) -> torch.Tensor:
    """(M, C) log of Seesaw's factors for rows x (M, C) (compute dtype) with safe labels (M,):
    p log(N_j / N_i) where N_j < N_i (counts clamped to >= 1) plus q log(s_j / max(s_i, eps)) where
    s_j > max(s_i, eps) (s = softmax of the detached x); 0 in the label's column. No gradient."""
    with torch.no_grad():
        dtype = x.dtype
        m, c = x.shape
        log_f = torch.zeros((m, c), dtype=dtype, device=x.device)
        onehot = labels[:, None] == torch.arange(c, device=x.device)
        if p > 0:
            n = cum_samples.to(dtype).clamp_min(1)
            ratio = n[None, :] / n[labels][:, None]
            log_f = log_f + torch.where(ratio < 1, float(p) * torch.log(ratio), torch.zeros((), dtype=dtype,
                                                                                                device=x.device))
        if q > 0:
            s = torch.softmax(x.detach(), dim=-1)
            self_s = s.gather(1, labels[:, None]).clamp_min(float(eps))
            ratio = s / self_s
            log_f = log_f + torch.where(ratio > 1, float(q) * torch.log(ratio), torch.zeros((), dtype=dtype,
                                                                                                device=x.device))
        return torch.where(onehot, torch.zeros((), dtype=dtype, device=x.device), log_f)


def seesaw(logits, target, cum_samples, *, p=0.8, q=2.0, eps=1e-2, objectness=False, return_dict=False,
           ignore_index=-100, weight=None, avg_factor=None, reduction="mean", upcast=True, process_group=None):
    """Seesaw loss (Wang et al., CVPR 2021), mmdet 3.x SeesawLoss / seesaw_ce_loss. UPDATES cum_samples.

    objectness=False: logits (N, C), target (N,) in [0, C) or ignore_index; cum_samples float32 (C,).
    objectness=True (mmdet's layout, SeesawLoss.get_cls_channels = C + 2): logits (N, C + 2), the last
    two an objectness pair (column C: foreground, C + 1: background); target in [0, C] (C =
    background) or ignore_index; cum_samples float32 (C + 1,) as mmdet's buffer (index C counts the
    background rows and is never read).
    First cum_samples[label] += (number of non-ignored rows with that label) for every label, in
    place, THEN the loss with the updated counts (mmdet's order). Classes loss of a foreground row
    with label i: cross entropy of z = x + L (L = seesaw_log_factors: the factors multiply the other
    classes' exponentials), over the C class logits. objectness=True: the classes loss is taken
    on foreground rows only (0 on background rows) and an objectness cross entropy on the pair over
    every non-ignored row (target 0 for foreground, 1 for background) is added; return_dict gives
    {'loss_cls_objectness', 'loss_cls_classes'} (mmdet's keys), else their sum (return_dict=True
    with objectness=False: {'loss_cls_classes'}).
    weight (N,) per row multiplies both losses; a zero weight selects 0 but the row still counts
    in cum_samples (mmdet counts every label). 'mean': classes sum / n_foreground (non-ignored),
    objectness sum / n_non_ignored (mmdet's weight_reduce_loss over its subsets), or both / avg_factor.
    'none': (N,) per loss (0 on background and ignored rows; mmdet's classes loss is (n_fg,)).
    process_group: the int64 per-class counts are all-reduced (SUM) over the group before they are
    added (every rank then holds the same cum_samples); 'mean' divides by this rank's rows.
    """
    dtype = _compute_dtype(logits, upcast)
    n_cls = logits.shape[-1] - (2 if objectness else 0)
    labels = target.long().reshape(-1)
    valid = labels != ignore_index
    fg = valid & (labels < n_cls)
    with torch.no_grad():
        counted = torch.where(valid, labels, torch.zeros_like(labels))
        counts = torch.zeros(cum_samples.shape[0], dtype=torch.int64, device=cum_samples.device)
        counts.index_add_(0, counted, valid.to(torch.int64))
        if process_group is not None:
            _all_reduce_sum(counts, process_group)
        cum_samples.add_(counts.to(torch.float32))  # integer counts: exact in float32 up to 2^24 per class
    x_all = logits.reshape(-1, logits.shape[-1]).to(dtype)
    zero = torch.zeros((), dtype=dtype, device=x_all.device)
    w = None if weight is None else weight.to(device=x_all.device, dtype=dtype).reshape(-1)
    active_fg = fg if w is None else fg & (w != 0)
    x = torch.where(active_fg[:, None], x_all[:, :n_cls], zero)
    t = torch.where(fg, labels, torch.zeros_like(labels))
    z = x + seesaw_log_factors(cum_samples[:n_cls], t, x, p=p, q=q, eps=eps)
    classes = _weighted(-torch.log_softmax(z, dim=-1).gather(1, t[:, None]).squeeze(1), active_fg, w)
    loss_classes = _detector_reduce(classes, reduction, fg.sum(), avg_factor, logits.dtype)
    if not objectness:
        return {"loss_cls_classes": loss_classes} if return_dict else loss_classes
    active = valid if w is None else valid & (w != 0)
    pair = torch.where(active[:, None], x_all[:, n_cls:], zero)
    obj_t = (labels == n_cls).long()
    obj = _weighted(-torch.log_softmax(pair, dim=-1).gather(1, obj_t[:, None]).squeeze(1), active, w)
    loss_obj = _detector_reduce(obj, reduction, valid.sum(), avg_factor, logits.dtype)
    if return_dict:
        return {"loss_cls_objectness": loss_obj, "loss_cls_classes": loss_classes}
    return loss_classes + loss_obj


def _all_reduce_sum(tensor: torch.Tensor, group) -> None:
    """In place: the SUM over the ranks of `group` (integers: exact), when torch.distributed runs."""
    import torch.distributed as dist  # noqa: PLC0415
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def rank_sums_in_order(sums: torch.Tensor, group) -> torch.Tensor:
    """float64 sum over the ranks of `group` of each rank's `sums`, added in rank order (all_gather,
    then rank 0 + rank 1 + ...): the same on every rank and from run to run for a given world
    size, unlike an all_reduce whose summation order the backend picks. Without torch.distributed:
    sums in float64."""
    import torch.distributed as dist  # noqa: PLC0415
    sums = sums.detach().to(torch.float64).contiguous()
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    parts = [torch.empty_like(sums) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, sums, group=group)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


def eqlv2_initial_state(num_classes: int, device=None) -> torch.Tensor:
    """The EQLv2 state before any step: float32 (3, C) = [pos_grad (0), neg_grad (0), pos_neg (100)]."""
    state = torch.zeros((3, num_classes), dtype=torch.float32, device=device)
    state[2] = EQLV2_INITIAL_RATIO
    return state


def eqlv2_class_weights(state: torch.Tensor, *, gamma: float, mu: float, alpha: float, dtype=torch.float64):
    """Per-class (positive weight, negative weight) from the state's pos_neg row: f = sigmoid(gamma
    (pos_neg - mu)), negative weight f, positive weight 1 + alpha (1 - f); in `dtype`."""
    ratio = state[2].to(dtype)
    f = torch.sigmoid(float(gamma) * (ratio - float(mu)))
    return 1 + float(alpha) * (1 - f), f


def eqlv2(logits, target, state, *, gamma=12.0, mu=0.8, alpha=4.0, objectness=False, ignore_index=-100, weight=None,
          avg_factor=None, reduction="mean", upcast=True, process_group=None):
    """Equalization loss v2 (Tan et al., CVPR 2021), the authors' EQLv2 (tztztztztz/eqlv2). UPDATES state.

    C independent sigmoids; target (N,) labels in [0, C] (C = background: every class negative) or
    ignore_index (0 loss, 0 gradient, not counted, no statistics). objectness=False: logits (N, C).
    objectness=True (the authors' layout, get_channel_num = C + 1): logits (N, C + 1), the last
    column a background logit with target [label == C], weights 1 and no statistics.
    state: float32 (3, C) = [pos_grad, neg_grad, pos_neg] (eqlv2_initial_state), the authors'
    three buffers. With (w+, f) = eqlv2_class_weights(state) (the statistics after the previous
    step): loss_ic = w_i * (w+_c y_ic + f_c (1 - y_ic)) * BCE(x_ic, y_ic), w_i the sample weight
    (per row or per element). Then, in place, from this batch's detached gradient of the summed
    loss, g_ic = |sigmoid(x_ic) - y_ic| * w_i * weight_ic: pos_grad += sum_i g_ic y_ic,
    neg_grad += sum_i g_ic (1 - y_ic), pos_neg = pos_grad / (neg_grad + 1e-10) (float32), as the
    authors' forward does (collect_grad after the loss): equal to a backward hook's |dL/dx| x N
    (see docs/losses/longtail.md). 'mean' divides by the number of non-ignored ROWS (the authors'
    / n_i), or avg_factor; 'none' is elementwise (logits' shape).
    process_group: the batch sums (2, C) of every rank are gathered and added in rank order in
    float64 (rank_sums_in_order), then added to the state once: every rank holds the same state.
    """
    dtype = _compute_dtype(logits, upcast)
    c_all = logits.shape[-1]
    n_cls = c_all - (1 if objectness else 0)
    x = logits.reshape(-1, c_all).to(dtype)
    labels = target.long().reshape(-1)
    valid_rows = labels != ignore_index
    y = (labels[:, None] == torch.arange(c_all, device=x.device)).to(dtype)
    w = _sigmoid_weight(weight, x.shape, dtype)  # per row (M, 1) or per element (M, C), by numel
    active = _element_active(valid_rows, w, x.shape, x.device)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    x = torch.where(active, x, zero)
    y = torch.where(active, y, zero)
    w_pos, w_neg = eqlv2_class_weights(state, gamma=gamma, mu=mu, alpha=alpha, dtype=dtype)
    if objectness:
        one = torch.ones(1, dtype=dtype, device=x.device)
        w_pos, w_neg = torch.cat([w_pos, one]), torch.cat([w_neg, one])
    eql_w = w_pos * y + w_neg * (1 - y)
    loss = _weighted(eql_w * _bce_with_logits_exact(x, y), active, w)
    with torch.no_grad():
        xd = x.detach()
        g = torch.where(y > 0, torch.sigmoid(-xd), torch.sigmoid(xd)) * eql_w
        g = torch.where(active, g if w is None else g * w.expand(x.shape), zero)[:, :n_cls]
        yc = y[:, :n_cls]
        pos, neg = (g * yc).sum(dim=0), (g * (1 - yc)).sum(dim=0)
        if process_group is not None:
            pos, neg = rank_sums_in_order(torch.stack([pos, neg]), process_group)
        _add_to_state(state[0], pos)
        _add_to_state(state[1], neg)
        state[2].copy_(state[0] / (state[1] + EQLV2_RATIO_EPS))
    loss = loss.reshape(logits.shape)
    return _detector_reduce(loss, reduction, valid_rows.sum(), avg_factor, logits.dtype)


__all__ += ["efl", "efl_initial_state"]


def efl_initial_state(num_classes: int, device=None) -> torch.Tensor:
    """The EFL state before any step: float32 (3, C) = [pos_grad (0), neg_grad (0), pos_neg (1)]."""
    state = torch.zeros((3, num_classes), dtype=torch.float32, device=device)
    state[2] = 1.0
    return state


def efl(logits, target, state, *, gamma=2.0, alpha=0.25, scale_factor=8.0, ignore_index=-100, weight=None,
        avg_factor=None, reduction="mean", upcast=True):
    """Equalized focal loss (Li et al., CVPR 2022), United-Perception's EqualizedFocalLoss. UPDATES state.

    logits (..., C) (leading dims are rows), target (...,) labels in [0, C] (C = background) or
    ignore_index. state float32 (3, C) = [pos_grad, neg_grad, pos_neg] (efl_initial_state: pos_neg 1).
    Per class gamma_c = gamma + scale_factor (1 - pos_neg_c) (the state as passed); elementwise
    loss = alpha_t (gamma_c / gamma) (1 - p_t)^gamma_c BCE(x, y) * w (alpha_t = alpha y + (1 - alpha)
    (1 - y); alpha None or < 0: 1). 'mean': sum / avg_factor, else sum / non-ignored rows.
    Then, in place: the statistics of the gradient of the RETURNED loss ('none': of its sum),
    |dL/dx| = alpha_t (gamma_c / gamma) w (1 - p_t)^gamma_c ((1 - p_t) + gamma_c p_t BCE) / D (D the
    'mean' divisor, else 1), as the peer's backward hook sees it (without its loss_weight, which
    scales pos and neg alike): pos_grad += sum over positives, neg_grad += sum over negatives,
    pos_neg = clamp(pos_grad / (neg_grad + 1e-10), 0, 1) in float32.
    """
    dtype = _compute_dtype(logits, upcast)
    c = logits.shape[-1]
    x = logits.reshape(-1, c).to(dtype)
    labels = target.long().reshape(-1)
    valid_rows = labels != ignore_index
    y = (labels[:, None] == torch.arange(c, device=x.device)).to(dtype)
    w = _sigmoid_weight(weight, x.shape, dtype)
    active = _element_active(valid_rows, w, x.shape, x.device)
    zero = torch.zeros((), dtype=dtype, device=x.device)
    x = torch.where(active, x, zero)
    y = torch.where(active, y, zero)
    gamma_c = float(gamma) + float(scale_factor) * (1 - state[2].to(dtype))
    factor = (gamma_c / float(gamma)).expand(x.shape)
    if alpha is not None and alpha >= 0:
        factor = factor * (float(alpha) * y + (1 - float(alpha)) * (1 - y))
    one_minus_pt = y * torch.sigmoid(-x) + (1 - y) * torch.sigmoid(x)
    bce = _bce_with_logits_exact(x, y)
    loss = _weighted(factor * _pow_tensor_safe(one_minus_pt, gamma_c.expand(x.shape)) * bce, active, w)
    count = valid_rows.sum()
    with torch.no_grad():
        q, l = one_minus_pt.detach(), bce.detach()
        pt = y * torch.sigmoid(x.detach()) + (1 - y) * torch.sigmoid(-x.detach())
        g = factor * _pow_tensor_safe(q, gamma_c.expand(x.shape)) * (q + gamma_c * pt * l)
        g = torch.where(active, g if w is None else g * w.expand(x.shape), zero)
        if reduction == "mean":
            g = g / (avg_factor if avg_factor is not None else count.clamp_min(1).to(dtype))
        _add_to_state(state[0], (g * y).sum(dim=0))
        _add_to_state(state[1], (g * (1 - y)).sum(dim=0))
        state[2].copy_(torch.clamp(state[0] / (state[1] + EQLV2_RATIO_EPS), 0, 1))
    return _detector_reduce(loss.reshape(logits.shape), reduction, count, avg_factor, logits.dtype)
