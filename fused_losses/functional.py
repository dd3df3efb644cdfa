"""The public functional API, re-exported at the top level (``fused_losses.focal`` is
:func:`fused_losses.functional.focal`).

Each function validates its arguments (``fused_losses._validate``, one place for every check),
picks a backend (``fused_losses._backends.select``, one place for the choice) and calls it. The
contract (formulas, shapes, dtypes, the semantics against torchvision, mmcv, kornia, MONAI and
mmdet, the bad-input table, the autograd contract and the accuracy rules) is in the
documentation: docs/losses.md, docs/bad-input.md and docs/contract.md.

Arguments every loss takes:

- ``backend``: None (automatic: 'cuda', then 'triton' for CUDA tensors, 'cpu' for CPU tensors,
  else 'reference'), or one of 'cuda', 'triton', 'cpu', 'reference'. An explicit backend that
  cannot serve the call raises RuntimeError; the automatic choice never fails.
  ``FUSED_LOSSES_BACKEND=<name>`` sets it globally.
- ``validate``: out-of-range target values (and non-finite sample weights, per-class values
  out of range) are a ValueError naming the value. None (default) checks CPU tensors only; on
  CUDA the check costs a host sync, so it runs only with validate=True (without it an
  out-of-range target never reads out of bounds: a device-side assert, as in torch).
- ``weight`` multiplies each sample's (softmax family) or row's/element's (sigmoid family) loss
  and gradient, a zero weight giving exactly 0 (a NaN logit there does not leak); 'mean'
  denominators are unchanged by weights (mmdet's weight_reduce_loss), except GHM-C, where a
  zero weight drops the entry.
- ``avg_factor`` (reduction='mean' only) replaces the mean's denominator: the loss is the
  backend's 'sum' divided by avg_factor, a device-side division (no host sync).

Example:
    >>> import torch
    >>> import fused_losses as fl
    >>> logits = torch.randn(4, 3, requires_grad=True)
    >>> loss = fl.focal(logits, torch.tensor([0, 2, 1, 0]))
    >>> loss.backward()
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fused_losses import _backends, _validate, reference

Alpha = Union[None, float, Sequence[float], torch.Tensor]
SigmoidAlpha = Union[float, Sequence[float], torch.Tensor]
AvgFactor = Union[None, float, torch.Tensor]

__all__ = ["focal", "sigmoid_focal", "ohem", "ghmc", "ib", "class_weights"]
__all__ += ["distribution_focal"]  # distribution focal (#24)


def _run(loss: str, backend, logits: torch.Tensor, *tensors, avg_factor=None, **kwargs) -> torch.Tensor:
    # avg_factor was checked by the loss's _validate.*_args; this only normalises it (no host read)
    avg_factor = _validate.avg_factor_arg(avg_factor, kwargs["reduction"], logits)
    requested = _validate.backend_arg(backend)
    if loss in ("sigmoid_focal", "ghmc"):  # float targets: only 'reference' differentiates them
        requested = _validate.target_grad_backend(loss, tensors[0], requested)
    # a weight that requires grad (learned weights): only 'reference' differentiates it
    requested = _validate.weight_grad_backend(loss, kwargs.get("weight"), requested)
    chosen = _backends.select(loss, logits, requested)
    if avg_factor is None:
        return chosen.losses[loss](logits, *tensors, **kwargs)
    weight = kwargs.get("weight")
    if (chosen.name == "cpu" and loss in ("focal", "sigmoid_focal", "distribution_focal") and isinstance(weight, torch.Tensor)
            and not (isinstance(avg_factor, torch.Tensor) and avg_factor.requires_grad)):
        # The CPU kernels scale the loss and the gradient by the weight in their one pass, so
        # sum(weight / avg_factor * loss) there is the same value (up to rounding) without the
        # backward's extra pass over the gradient that grad_output = 1 / avg_factor costs.
        return chosen.losses[loss](logits, *tensors, **{**kwargs, "reduction": "sum", "weight": weight / avg_factor})
    # mmdet's weight_reduce_loss(reduction='mean', avg_factor=...): sum / avg_factor, on the device.
    total = chosen.losses[loss](logits, *tensors, **{**kwargs, "reduction": "sum"})
    if isinstance(avg_factor, torch.Tensor):
        return total / avg_factor.to(total.dtype)
    return total / avg_factor


def focal(logits: torch.Tensor, target: torch.Tensor, *, gamma: float = 2.0, alpha: Alpha = None,
          ignore_index: int = -100, reduction: str = "mean", from_logits: bool = True,
          backend: Optional[str] = None, validate: Optional[bool] = None, weight: Optional[torch.Tensor] = None,
          avg_factor: AvgFactor = None, label_smoothing: float = 0.0, epsilon: float = 0.0) -> torch.Tensor:
    """Softmax focal loss, ``loss_i = -alpha_{t_i} (1 - p_{t_i})^gamma log p_{t_i}``.

    p = softmax(logits) over the class dim. With gamma=0 and alpha=None this is
    ``F.cross_entropy`` (also with ignore_index, spatial shapes and label_smoothing), except
    that an all-ignored 'mean' is 0, not NaN.

    Args:
        logits: (N, C) or channel-second (N, C, d1, ...) float tensor (float32, float16,
            bfloat16; float64 on CPU). Probabilities instead of scores when from_logits=False.
        target: (N,) or (N, d1, ...) int64/int32 class indices in [0, C), or ignore_index.
        gamma: focusing parameter >= 0; gamma=0 with alpha=None is cross entropy.
        alpha: None (1 for every class), a float (every class), or C per-class factors (a
            sequence or a (C,) tensor): alpha_t = alpha[t].
        ignore_index: target value that contributes no loss, no gradient and no count.
        reduction: 'none' (the target's shape, the logits' dtype), 'mean' (over non-ignored
            samples; 0 if there are none) or 'sum'.
        from_logits: False means logits already hold probabilities (no clamping: p_t = 0 gives
            inf, like ``F.nll_loss(p.log())``; the gradient lands on the target column only).
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference' (module docstring).
        validate: None (check target values on CPU tensors), True (also on CUDA: a host sync)
            or False (never).
        weight: per-sample weights broadcastable to the target's shape (torch broadcasting:
            (N,) for (N,) targets, (N, 1, 1) per image or (N, H, W) per pixel for (N, H, W)):
            loss_i and its gradient are multiplied by w_i; w_i == 0 gives exactly 0 (a NaN
            logit there does not leak). 'mean' still divides by the non-ignored count.
        avg_factor: with reduction='mean' only: sum / avg_factor instead (a number > 0, or a
            0-dim tensor on the logits' device, e.g. mmdet's num_pos; no host sync).
        label_smoothing: eps in [0, 1] (from_logits only): the target distribution
            q_c = (1 - eps) [c == t] + eps / C and loss_i = sum_c q_c a_c (1 - p_c)^gamma
            (-log p_c); gamma=0 without alpha is ``F.cross_entropy(..., label_smoothing=eps)``.
        epsilon: Poly-1 (Leng et al. 2022): adds ``epsilon (1 - p_t)^(gamma + 1)`` per sample,
            computed in the same fused pass; gamma=0 gives Poly-1 cross entropy
            (``CE + epsilon (1 - p_t)``). Not scaled by alpha (the paper's code), scaled by
            ``weight``, 0 on ignored samples; with label_smoothing ``p_t = sum_c q_c p_c``. Any
            finite value; 0 (default) is the plain loss exactly (docs/losses/detector.md).

    Returns:
        The loss: shape of target for 'none' (logits dtype), a 0-dim tensor for 'mean'/'sum'
        (``promote_types(logits.dtype, float32)``). Differentiable in logits (first order;
        forward-mode AD and torch.func transforms too).

    Raises:
        TypeError: logits not a floating tensor, a target of the wrong dtype (a float target of
            the logits' shape for the softmax family: the message suggests ``target.argmax(1)``),
            a weight that is not a real tensor.
        ValueError: mismatched shapes or devices, out-of-range argument values, out-of-range
            target values (CPU tensors, or validate=True), channel-last logits (the message
            suggests ``logits.movedim(-1, 1)``); every message starts with the argument's name.
        RuntimeError: an explicitly requested backend that is unavailable or cannot serve the
            call (the message says why).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> import fused_losses as fl
        >>> logits = torch.randn(4, 3, requires_grad=True)
        >>> target = torch.tensor([0, 2, 1, 0])
        >>> loss = fl.focal(logits, target, gamma=2.0, alpha=[1.0, 2.0, 0.5])
        >>> loss.backward()
        >>> ce = fl.focal(logits, target, gamma=0.0)
        >>> bool(torch.allclose(ce, F.cross_entropy(logits, target)))
        True
        >>> poly1_ce = fl.focal(logits, target, gamma=0.0, epsilon=1.0)   # Poly-1 cross entropy
        >>> p_t = logits.softmax(1).gather(1, target[:, None])[:, 0]
        >>> bool(torch.allclose(poly1_ce, F.cross_entropy(logits, target) + (1 - p_t).mean()))
        True
    """
    kwargs = _validate.focal_args(logits, target, gamma=gamma, alpha=alpha, ignore_index=ignore_index,
                                  reduction=reduction, from_logits=from_logits, validate=validate, weight=weight,
                                  label_smoothing=label_smoothing, avg_factor=avg_factor, epsilon=epsilon)
    return _run("focal", backend, logits, target, avg_factor=avg_factor, **kwargs)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, *, alpha: SigmoidAlpha = 0.25, gamma: float = 2.0,
                  ignore_index: int = -100, reduction: str = "none", backend: Optional[str] = None,
                  validate: Optional[bool] = None, weight: Optional[torch.Tensor] = None,
                  avg_factor: AvgFactor = None, epsilon: float = 0.0) -> torch.Tensor:
    """Sigmoid focal loss (``torchvision.ops.sigmoid_focal_loss`` semantics), elementwise.

    ``loss = alpha_t (1 - p_t)^gamma BCE(x, y)`` with p = sigmoid(x), p_t = p y + (1 - p)(1 - y)
    and alpha_t = alpha y + (1 - alpha)(1 - y).

    Args:
        logits: (..., C) float tensor.
        target: a float tensor of the logits' shape (0/1 or soft targets), or integer labels of
            shape ``logits.shape[:-1]``: label in [0, C) marks that class positive, label == C
            is background (all C outputs negative), label == ignore_index ignores the row (no
            one-hot is materialised).
        alpha: weight of positives (negatives get 1 - alpha); alpha < 0 disables it. Or C
            per-class values in [0, 1] (sequence or tensor):
            alpha_t = alpha[c] y + (1 - alpha[c]) (1 - y).
        gamma: focusing parameter >= 0.
        ignore_index: integer label of rows that contribute nothing.
        reduction: 'none' (default, like torchvision: the logits' shape) | 'mean' (over
            elements; with integer labels over non-ignored rows x C) | 'sum'. Detection heads
            usually want ``sigmoid_focal(..., weight=label_weights, reduction='mean',
            avg_factor=num_pos)``.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check label values on CPU tensors), True (also on CUDA) or False.
        weight: shape ``logits.shape[:-1]`` = one value per ROW (all C outputs; mmdet's (N,)
            anchor label_weights; taken per row even when N == C), or ``logits.shape`` = per
            ELEMENT, or anything else broadcastable to ``logits.shape``. Multiplies loss and
            gradient; 0 gives exactly 0 (NaN logits there do not leak). 'mean' denominators are
            unchanged.
        avg_factor: with reduction='mean' only: sum / avg_factor (a number or a 0-dim tensor on
            the logits' device, e.g. num_pos; no host sync).
        epsilon: Poly-1 (Leng et al. 2022): adds ``epsilon (1 - p_t)^(gamma + 1)`` to each
            element in the same fused pass (Poly-1 focal). Not scaled by alpha (the paper's
            code), scaled by ``weight``, 0 on ignored rows. Any finite value; 0 (default) is the
            plain loss exactly.

    Returns:
        The loss: the logits' shape for 'none' (logits dtype), a 0-dim tensor for 'mean'/'sum'.
        A float target that requires grad (grad mode on, e.g. distillation targets) runs on the
        'reference' backend, the only one that differentiates the target.

    Raises:
        TypeError: logits not a floating tensor, a target of the wrong dtype (a float target of
            the logits' shape for the softmax family: the message suggests ``target.argmax(1)``),
            a weight that is not a real tensor.
        ValueError: mismatched shapes or devices, out-of-range argument values, out-of-range
            target values (CPU tensors, or validate=True), channel-last logits (the message
            suggests ``logits.movedim(-1, 1)``); every message starts with the argument's name.
        RuntimeError: an explicitly requested backend that is unavailable or cannot serve the
            call (the message says why), e.g. 'cpu' with a float target that
            requires grad.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> cls_logits = torch.randn(6, 4, requires_grad=True)      # 6 anchors, C = 4
        >>> labels = torch.tensor([0, 4, 4, 2, 4, -100])           # 4 = background, -100 ignored
        >>> num_pos = (labels.clamp(min=0) < 4).sum().clamp(min=1)
        >>> loss = fl.sigmoid_focal(cls_logits, labels, reduction="mean", avg_factor=num_pos)
        >>> loss.backward()
        >>> fl.sigmoid_focal(cls_logits, labels).shape              # 'none': elementwise
        torch.Size([6, 4])
        >>> poly = fl.sigmoid_focal(cls_logits, labels, epsilon=1.0)  # Poly-1 focal
        >>> bool((poly >= fl.sigmoid_focal(cls_logits, labels)).all())
        True
    """
    return _sigmoid_focal(logits, target, alpha=alpha, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                          backend=backend, validate=validate, weight=weight, avg_factor=avg_factor, epsilon=epsilon)


def _sigmoid_focal(logits, target, *, alpha, gamma, ignore_index, reduction, backend, validate, weight, avg_factor,
                   single_class_warning=True, epsilon=0.0):
    # single_class_warning=False: compat.MMDetFocalLoss, whose labels follow mmdet's C = background convention
    kwargs = _validate.sigmoid_focal_args(logits, target, alpha=alpha, gamma=gamma, ignore_index=ignore_index,
                                          reduction=reduction, validate=validate, weight=weight,
                                          avg_factor=avg_factor, single_class_warning=single_class_warning,
                                          epsilon=epsilon)
    return _run("sigmoid_focal", backend, logits, target, avg_factor=avg_factor, **kwargs)


def ohem(logits: torch.Tensor, target: torch.Tensor, *, keep: Union[float, int] = 0.25,
         thresh: Optional[float] = None, min_kept: Optional[int] = None, ignore_index: int = -100,
         reduction: str = "mean", backend: Optional[str] = None, validate: Optional[bool] = None,
         weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None,
         label_smoothing: float = 0.0) -> torch.Tensor:
    """Online hard example mining: cross entropy over the hardest samples only.

    Softmax-family shapes, as :func:`focal`. Dropped samples get 0 loss ('none') and no
    gradient; 'mean' divides by the kept count.

    Args:
        logits: (N, C) or channel-second (N, C, d1, ...) float tensor.
        target: (N,) or (N, d1, ...) int64/int32 class indices, or ignore_index.
        keep: float in (0, 1] keeps k = max(1, floor(keep * n_valid)) hardest samples (by
            cross entropy); int >= 1 keeps min(keep, n_valid). k is computed on the device;
            ties go to the lower index.
        thresh: mmseg ``OHEMPixelSampler`` mode (keep is then ignored): keep the samples whose
            true-class probability is below max(thresh, sorted_p[min(min_kept_total,
            n_valid - 1)]).
        min_kept: with thresh: samples kept at least, per image (x N for (N, C, d...) inputs;
            as given for (N, C)). Without thresh it is a ValueError.
        ignore_index: target value that is never kept and never counted.
        reduction: 'none' | 'mean' (over the kept samples) | 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check target values on CPU tensors), True (also on CUDA) or False.
        weight: as :func:`focal`; the selection ignores weights (a zero-weight sample can be
            kept and then contributes 0, and is counted by 'mean').
        avg_factor: as :func:`focal`.
        label_smoothing: a kept sample's loss is the cross entropy against the smoothed target
            (as :func:`focal` with gamma=0); the selection ranks the unsmoothed CE / p_t.

    Returns:
        The loss: the target's shape for 'none' (0 where not kept), else a 0-dim tensor.

    Raises:
        TypeError: logits not a floating tensor, a target of the wrong dtype (a float target of
            the logits' shape for the softmax family: the message suggests ``target.argmax(1)``),
            a weight that is not a real tensor.
        ValueError: mismatched shapes or devices, out-of-range argument values, out-of-range
            target values (CPU tensors, or validate=True), channel-last logits (the message
            suggests ``logits.movedim(-1, 1)``); every message starts with the argument's name.
        RuntimeError: an explicitly requested backend that is unavailable or cannot serve the
            call (the message says why).

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(2, 5, 8, 8, requires_grad=True)     # (N, C, H, W)
        >>> target = torch.randint(0, 5, (2, 8, 8))
        >>> target[:, 0] = 255                                        # void pixels
        >>> loss = fl.ohem(logits, target, thresh=0.7, min_kept=16, ignore_index=255)
        >>> loss.backward()
        >>> kept = fl.ohem(logits, target, keep=0.25, ignore_index=255, reduction="none")
        >>> int((kept > 0).sum())                                     # a quarter of 112 pixels
        28
    """
    kwargs = _validate.ohem_args(logits, target, keep=keep, thresh=thresh, min_kept=min_kept,
                                 ignore_index=ignore_index, reduction=reduction, validate=validate, weight=weight,
                                 label_smoothing=label_smoothing, avg_factor=avg_factor)
    return _run("ohem", backend, logits, target, avg_factor=avg_factor, **kwargs)


def ghmc(logits: torch.Tensor, target: torch.Tensor, *, bins: int = 10, momentum: float = 0.0,
         state: Optional[torch.Tensor] = None, use_sigmoid: bool = True, ignore_index: int = -100,
         reduction: str = "mean", backend: Optional[str] = None, validate: Optional[bool] = None,
         weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None, label_smoothing: float = 0.0,
         process_group=None) -> torch.Tensor:
    """Gradient harmonized classification loss (GHM-C, Li et al., AAAI 2019).

    NOTE the default use_sigmoid=True is mmdet's detection variant: C independent sigmoids, and
    integer targets are detection labels in [0, C] where label == C is BACKGROUND (all C outputs
    negative). A softmax classifier (or segmentation net) with labels in [0, C) must pass
    use_sigmoid=False; with the default, every row would get one positive class and C - 1
    sigmoid negatives. On CPU targets (validate=None; any device with validate=True) a
    UserWarning says so when the non-ignored integer labels never contain C (Python's default
    filter: once per call site).

    g = |sigmoid(x) - y| per element (use_sigmoid=True) or 1 - p_t per sample (False), in
    float32; bin = min(floor(g * bins), bins - 1); bin weight = n_valid / count(bin) /
    n_nonempty_bins (no gradient through it); loss = bin weight * CE, 'mean' divides by n_valid.

    Args:
        logits: use_sigmoid=True: (..., C); use_sigmoid=False: (N, C) or (N, C, d1, ...).
        target: use_sigmoid=True: float targets of the logits' shape or integer labels of shape
            ``logits.shape[:-1]`` (C = background); use_sigmoid=False: class indices.
        bins: number of bins >= 1.
        momentum: EMA momentum in [0, 1); > 0 needs a state.
        state: float32 (bins,) EMA of the bin counts, updated in place (first, then used) for
            the bins non-empty in this batch: state = momentum * state + (1 - momentum) * count.
            :class:`fused_losses.nn.GHMCLoss` owns one. May be a non-contiguous view.
        use_sigmoid: True (detection variant, default) or False (softmax classifier).
        ignore_index: target value that is not binned, counted or differentiated.
        reduction: 'none' | 'mean' (over valid entries) | 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check target values on CPU tensors), True (also on CUDA) or False.
        weight: shapes as :func:`focal` (use_sigmoid=False) or :func:`sigmoid_focal` (True).
            Unlike the other losses, a ZERO weight marks the entry invalid, as mmdet's GHMC
            label_weight: not in the histogram, n_valid or the 'mean' denominator; nonzero
            weights multiply the loss after the bin weight.
        avg_factor: as :func:`focal`.
        label_smoothing: use_sigmoid=False only: CE against the smoothed target; g = 1 - p_t
            and the bins stay unsmoothed.
        process_group: a torch.distributed group: the bin counts and n_valid are all-reduced
            (SUM, on the device) before the weights and the EMA update, so every rank weights by
            the global batch's histogram and keeps an identical ``state``. 'mean' still divides
            by this rank's n_valid (DDP averages the gradients: equal shards give the
            single-process loss).

    Returns:
        The loss: the per-entry loss for 'none', else a 0-dim tensor. A float target that
        requires grad runs on the 'reference' backend.

    Raises:
        TypeError: logits not a floating tensor, a target of the wrong dtype (a float target of
            the logits' shape for the softmax family: the message suggests ``target.argmax(1)``),
            a weight that is not a real tensor.
        ValueError: mismatched shapes or devices, out-of-range argument values, out-of-range
            target values (CPU tensors, or validate=True), channel-last logits (the message
            suggests ``logits.movedim(-1, 1)``); every message starts with the argument's name.
        RuntimeError: under ``torch.func.vmap`` (the bins couple the batch); an explicitly requested backend that is unavailable or cannot serve the
            call (the message says why).

    Warns:
        UserWarning: use_sigmoid=True with integer labels that never contain the background C.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(16, 5, requires_grad=True)
        >>> y = torch.randint(0, 5, (16,))
        >>> state = torch.zeros(10)
        >>> loss = fl.ghmc(logits, y, use_sigmoid=False, momentum=0.75, state=state)
        >>> loss.backward()
        >>> float(state.sum())                     # (1 - 0.75) x 16 valid samples
        4.0
    """
    kwargs = _validate.ghmc_args(logits, target, bins=bins, momentum=momentum, state=state, use_sigmoid=use_sigmoid,
                                 ignore_index=ignore_index, reduction=reduction, validate=validate, weight=weight,
                                 label_smoothing=label_smoothing, process_group=process_group, avg_factor=avg_factor)
    return _run("ghmc", backend, logits, target, avg_factor=avg_factor, **kwargs)


def ib(logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor, *, alpha: float = 1000.0,
       epsilon: float = 1e-3, weight: Alpha = None, gamma: float = 0.0, detach_factor: bool = False,
       reduction: str = "mean", backend: Optional[str] = None, validate: Optional[bool] = None) -> torch.Tensor:
    """Influence-balanced loss (Park et al., ICCV 2021); IB-focal with gamma > 0.

    factor_i = alpha / (2 (1 - p_t) f_i + epsilon); loss_i = factor_i * CE_w,i (gamma = 0) or
    factor_i * (1 - exp(-CE_w,i))^gamma * CE_w,i, with CE_w,i = weight[t_i] * CE_i. The
    gradient flows through the factor into logits and features (as the official code) unless
    detach_factor=True. Use it after a cross-entropy warm-up, as the paper does.

    Args:
        logits: (N, C) float tensor.
        target: (N,) int64/int32 class indices in [0, C) (no ignore_index).
        features: (N,) or (N, 1) feature norms used as given, or (N, D) raw features (e.g. the
            penultimate activations) reduced to sum_d |f|.
        alpha: numerator of the influence factor.
        epsilon: > 0, added to the factor's denominator.
        weight: None or C per-class weights of the cross entropy (e.g.
            ``class_weights(counts, 'inverse')``).
        gamma: IB-focal exponent >= 0 (0: plain IB).
        detach_factor: True stops the gradient through the factor.
        reduction: 'none' | 'mean' (divides by N, also when weight is set, as the official
            code) | 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check target values on CPU tensors), True (also on CUDA) or False.

    Returns:
        The loss: (N,) for 'none', else a 0-dim tensor; differentiable in logits and features.

    Raises:
        TypeError: logits not a floating tensor, a target of the wrong dtype (a float target of
            the logits' shape for the softmax family: the message suggests ``target.argmax(1)``),
            a weight that is not a real tensor.
        ValueError: mismatched shapes or devices, out-of-range argument values, out-of-range
            target values (CPU tensors, or validate=True), channel-last logits (the message
            suggests ``logits.movedim(-1, 1)``); every message starts with the argument's name.
        RuntimeError: an explicitly requested backend that is unavailable or cannot serve the
            call (the message says why).

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> features = torch.randn(8, 16, requires_grad=True)
        >>> target = torch.randint(0, 3, (8,))
        >>> loss = fl.ib(logits, target, features, alpha=1000.0)
        >>> loss.backward()
        >>> features.grad.shape
        torch.Size([8, 16])
    """
    kwargs = _validate.ib_args(logits, target, features, alpha=alpha, epsilon=epsilon, weight=weight, gamma=gamma,
                               detach_factor=detach_factor, reduction=reduction, validate=validate)
    return _run("ib", backend, logits, target, features, **kwargs)


def class_weights(counts, scheme: str = "inverse", beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights from per-class sample counts, float32 (C,), normalised to sum C.

    Args:
        counts: per-class sample counts: a sequence or a 1-D tensor of C positive numbers (e.g.
            ``torch.bincount(train_labels, minlength=C)``).
        scheme: 'inverse' (proportional to 1 / n_k) or 'effective' ((1 - beta) / (1 - beta^n_k),
            the effective number of samples, Cui et al., CVPR 2019).
        beta: the 'effective' scheme's beta, in (0, 1).

    Returns:
        A float32 (C,) tensor on the counts' device (CPU for a sequence) summing to C: pass it
        as ``alpha`` of :func:`focal` or ``weight`` of :func:`ib`.

    Raises:
        TypeError: counts that are not a sequence or tensor of real numbers.
        ValueError: a zero, negative, infinite or NaN count, counts that are not a non-empty 1-D
            sequence, an unknown scheme, a beta outside (0, 1).

    Example:
        >>> import fused_losses as fl
        >>> fl.class_weights([100, 200, 50])
        tensor([0.8571, 0.4286, 1.7143])
    """
    return reference.class_weights(*_validate.class_weights_args(counts, scheme, beta))


# ---- distribution focal (#24) ----
def distribution_focal(logits: torch.Tensor, target: torch.Tensor, *, weight: Optional[torch.Tensor] = None,
                       avg_factor: AvgFactor = None, reduction: str = "mean", backend: Optional[str] = None,
                       validate: Optional[bool] = None) -> torch.Tensor:
    """Distribution focal loss (DFL, GFL: Li et al. 2020), mmdet's ``distribution_focal_loss``.

    The logits of a row are a distribution over the bins 0..n of one box side; the float label
    y in [0, n] lies between the bins l = floor(y) and r = l + 1 (l = n - 1 at y = n) and the loss
    is the cross entropy to both, weighted by the distance: ``(r - y) CE(x, l) + (y - l) CE(x, r)``.
    One fused pass per row (softmax, two gathers, loss and gradient). y = n gives ``CE(x, n)``
    (mmdet's formula indexes bin n + 1 there; docs/losses/detector.md); labels are never clamped
    or written.

    Args:
        logits: (..., n + 1) float tensor of bin logits (n + 1 >= 2; GFL: 17 bins, reg_max 16),
            e.g. (num_pos * 4, 17), or (num_pos, 4, 17) for the four sides.
        target: float labels of shape ``logits.shape[:-1]`` in [0, n] (integer tensors are read as
            bin indices). Not differentiated (a target that requires grad runs on 'reference').
        weight: per-row weights broadcastable to the target's shape (mmdet's per-side weights,
            e.g. the quality score repeated 4 times); a zero weight gives exactly 0 (a NaN logit
            there does not leak). 'mean' still divides by the number of rows.
        avg_factor: with reduction='mean' only: sum / avg_factor (a number or a 0-dim tensor on
            the logits' device; mmdet's GFL head passes 4.0; no host sync).
        reduction: 'none' (the target's shape, the logits' dtype), 'mean' (over rows) or 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check label values on CPU tensors), True (also on CUDA: a host sync) or
            False (never; the kernels then clamp an out-of-range label into [0, n]).

    Returns:
        The loss: the target's shape for 'none', else a 0-dim tensor in
        ``promote_types(logits.dtype, float32)``. Differentiable in logits.

    Raises:
        TypeError: logits not a floating tensor, a target that is neither float nor int64/int32.
        ValueError: fewer than 2 bins, a target not of shape logits.shape[:-1], labels outside
            [0, n] or NaN (CPU tensors, or validate=True), a weight that does not broadcast,
            avg_factor without reduction='mean'; every message starts with the argument's name.
        RuntimeError: an explicitly requested backend that is unavailable or cannot serve the call.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> pred = torch.randn(8, 4, 17, requires_grad=True)      # 8 positives x 4 sides x 17 bins
        >>> target = torch.rand(8, 4) * 16                        # distances in bin units, [0, 16]
        >>> loss = fl.distribution_focal(pred, target, reduction="mean", avg_factor=4.0)
        >>> loss.backward()
        >>> y = torch.tensor([3.0])                               # on a bin edge: CE to bin 3
        >>> x = torch.randn(1, 17)
        >>> bool(torch.allclose(fl.distribution_focal(x, y), torch.nn.functional.cross_entropy(x, y.long())))
        True
    """
    kwargs = _validate.distribution_focal_args(logits, target, weight=weight, avg_factor=avg_factor,
                                               reduction=reduction, validate=validate)
    # the labels are not differentiated by the fused kernels: a target that requires grad runs on 'reference'
    requested = _validate.target_grad_backend("distribution_focal", target, _validate.backend_arg(backend))
    return _run("distribution_focal", requested, logits, target, avg_factor=avg_factor, **kwargs)


# ---- quality_focal / varifocal / asymmetric (#24) ----
__all__ += ["quality_focal", "varifocal", "asymmetric"]


def _detector_run(loss: str, backend, logits, target, soft, *, avg_factor, **kwargs):
    # A float target (or score) that requires grad: only 'reference' differentiates it, as
    # sigmoid_focal's float target (_validate.target_grad_backend).
    requested = _validate.backend_arg(backend)
    if soft is not None:
        requested = _validate.target_grad_backend(loss, soft, requested)
    return _run(loss, requested, logits, target, avg_factor=avg_factor, **kwargs)


def quality_focal(logits: torch.Tensor, target: torch.Tensor, *, score: Optional[torch.Tensor] = None,
                  beta: float = 2.0, activated: bool = False, ignore_index: int = -100, reduction: str = "mean",
                  backend: Optional[str] = None, validate: Optional[bool] = None,
                  weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None) -> torch.Tensor:
    """Quality focal loss (GFL, Li et al. 2020), mmdet 3.x ``QualityFocalLoss`` semantics.

    Per element ``|y - s|^beta * BCE(s, y)`` with s = sigmoid(logits) (or the logits themselves
    with activated=True), summed over the C classes of each row. Fused: one pass over the logits
    writes the loss and the gradient; no one-hot is built for the label form.

    Args:
        logits: (..., C) float tensor (scores; probabilities in [0, 1] with activated=True).
        target: integer labels of shape ``logits.shape[:-1]`` in [0, C] (C = background: every
            class negative) or ignore_index, together with ``score``; or a dense float soft
            target of the logits' shape in [0, 1] (mmdet 3.x's tensor target; 0 is a negative).
        score: with integer labels: the quality (e.g. IoU) at the label's class, a float tensor
            of shape ``logits.shape[:-1]`` in [0, 1]. None with a dense target.
        beta: exponent of the modulating factor ``|y - s|`` (>= 0).
        activated: logits hold probabilities (mmdet's ``activated=True``): torch's
            ``binary_cross_entropy`` (logs clamped at -100).
        ignore_index: label of rows with no loss, no gradient and no count (label form).
        reduction: 'none' (per row: ``logits.shape[:-1]``, the logits' dtype), 'mean' (over
            non-ignored rows, as mmdet's mean over N) or 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check labels, scores and soft targets on CPU tensors), True (also on
            CUDA: a host sync) or False.
        weight: per row (``logits.shape[:-1]``, mmdet's) or per element (``logits.shape``,
            applied before the class sum); 0 gives exactly 0 (NaN logits there do not leak).
        avg_factor: with reduction='mean' only: sum / avg_factor (a number or a 0-dim tensor;
            no host sync). mmdet adds a float32 eps: ``compat.MMDetQualityFocalLoss`` does.

    Returns:
        The loss: per row for 'none', a 0-dim tensor (``promote_types(logits.dtype, float32)``)
        for 'mean'/'sum'. A score or soft target that requires grad runs on 'reference'.

    Raises:
        TypeError: logits not a floating tensor, a score that is not a floating tensor.
        ValueError: shapes or devices that do not match, labels outside [0, C], scores or soft
            targets outside [0, 1] (CPU tensors, or validate=True), probabilities outside [0, 1]
            with activated=True; every message starts with the argument's name.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(6, 4, requires_grad=True)          # 6 anchors, C = 4
        >>> labels = torch.tensor([0, 4, 4, 2, 4, -100])            # 4 = background, -100 ignored
        >>> iou = torch.tensor([0.8, 0.0, 0.0, 0.35, 0.0, 0.0])     # quality at the label's class
        >>> loss = fl.quality_focal(logits, labels, score=iou, reduction="mean", avg_factor=2.0)
        >>> loss.backward()
        >>> fl.quality_focal(logits, labels, score=iou, reduction="none").shape
        torch.Size([6])
    """
    kwargs = _validate.quality_focal_args(logits, target, score=score, beta=beta, activated=activated,
                                          ignore_index=ignore_index, reduction=reduction, validate=validate,
                                          weight=weight, avg_factor=avg_factor)
    soft = score if score is not None else target
    return _detector_run("quality_focal", backend, logits, target, soft, avg_factor=avg_factor, **kwargs)


def varifocal(logits: torch.Tensor, target: torch.Tensor, *, score: Optional[torch.Tensor] = None,
              alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True, detach_modulation: bool = False,
              ignore_index: int = -100, reduction: str = "mean", backend: Optional[str] = None,
              validate: Optional[bool] = None, weight: Optional[torch.Tensor] = None,
              avg_factor: AvgFactor = None) -> torch.Tensor:
    """Varifocal loss (VarifocalNet, Zhang et al. 2021), elementwise.

    ``BCE(s, y) * (y if iou_weighted else 1)`` on positives and ``BCE(s, 0) * alpha * s^gamma``
    on negatives, s = sigmoid(logits). mmdet's ``varifocal_loss`` with a dense target (positives:
    y > 0); RT-DETR's ``loss_labels_vfl`` and ultralytics' ``VarifocalLoss`` with the label form
    (the label's class is the positive, whatever its score).

    Args:
        logits: (..., C) float tensor (e.g. RT-DETR's (B, Q, C)).
        target: a dense float target of the logits' shape in [0, 1] (IoU at the positives, 0
            elsewhere), or integer labels of shape ``logits.shape[:-1]`` in [0, C] (C =
            background) or ignore_index, with ``score``.
        score: with integer labels: the IoU at the label's class (``logits.shape[:-1]``, in
            [0, 1]); a positive with score 0 has zero loss (RT-DETR, ultralytics).
        alpha: weight of the negatives (>= 0).
        gamma: exponent of the negatives' modulating factor s^gamma (>= 0).
        iou_weighted: positives weighted by their target y (else by 1).
        detach_modulation: no gradient through ``alpha * s^gamma`` (RT-DETR's official code
            detaches it). Default False: mmdet and ultralytics (and the VarifocalNet authors'
            mmdet code) differentiate it, the derivative of the loss as the paper defines it;
            the loss value is the same either way, the negatives' gradients differ.
        ignore_index: label of rows with no loss, no gradient and no count (label form).
        reduction: 'none' (elementwise, the logits' dtype), 'mean' (over non-ignored elements,
            mmdet's) or 'sum'. RT-DETR's ``loss.mean(1).sum() * Q / num_boxes`` is 'mean' with
            ``avg_factor=num_boxes``.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check on CPU tensors), True (also on CUDA) or False.
        weight: per row (``logits.shape[:-1]``) or per element (``logits.shape``); 0 gives
            exactly 0.
        avg_factor: with reduction='mean' only: sum / avg_factor (a number or a 0-dim tensor).

    Returns:
        The loss: the logits' shape for 'none', a 0-dim tensor for 'mean'/'sum'.

    Raises:
        TypeError: logits not a floating tensor, a score that is not a floating tensor.
        ValueError: shapes or devices that do not match, labels outside [0, C], scores or soft
            targets outside [0, 1] (CPU tensors, or validate=True); each message names the argument.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(2, 5, 3, requires_grad=True)      # (B, Q, C) queries
        >>> labels = torch.tensor([[1, 3, 3, 0, 3], [3, 2, 3, 3, 3]])   # 3 = no object
        >>> iou = torch.rand(2, 5)
        >>> loss = fl.varifocal(logits, labels, score=iou, detach_modulation=True,
        ...                     avg_factor=3.0)                      # RT-DETR: sum / num_boxes
        >>> loss.backward()
    """
    kwargs = _validate.varifocal_args(logits, target, score=score, alpha=alpha, gamma=gamma,
                                      iou_weighted=iou_weighted, detach_modulation=detach_modulation,
                                      ignore_index=ignore_index, reduction=reduction, validate=validate,
                                      weight=weight, avg_factor=avg_factor)
    soft = score if score is not None else target
    return _detector_run("varifocal", backend, logits, target, soft, avg_factor=avg_factor, **kwargs)


def asymmetric(logits: torch.Tensor, target: torch.Tensor, *, gamma_pos: float = 1.0, gamma_neg: float = 4.0,
               clip: Optional[float] = 0.05, eps: float = 1e-8, detach_focusing: bool = False,
               reduction: str = "sum", backend: Optional[str] = None, validate: Optional[bool] = None,
               weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None) -> torch.Tensor:
    """Asymmetric loss (ASL, Ridnik et al. 2021) for multi-label classification, elementwise.

    timm's ``AsymmetricLossMultiLabel``: with p = sigmoid(x), the negatives' probability is
    shifted, p_m = max(p - clip, 0); ``loss = -(y log p (1 - p)^gamma_pos + (1 - y)
    log(1 - p_m) p_m^gamma_neg)`` (for soft y the focusing exponent is
    ``gamma_pos y + gamma_neg (1 - y)``), logs clamped at log(eps).

    Args:
        logits: (..., C) float tensor.
        target: multi-hot or soft float target of the logits' shape, in [0, 1].
        gamma_pos: focusing exponent of the positives (>= 0).
        gamma_neg: focusing exponent of the negatives (>= 0).
        clip: the probability shift m of the negatives, in [0, 1] (None or 0: none).
        eps: clamp of the probabilities inside the logs (timm's 1e-8), in [0, 1].
        detach_focusing: no gradient through the focusing weight (timm's
            ``disable_torch_grad_focal_loss``).
        reduction: 'sum' (default: timm's ``-loss.sum()``, the ASL authors' code), 'mean' (over
            elements; ``avg_factor=N`` gives newer timm's 'batchmean') or 'none' (elementwise).
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check the target on CPU tensors), True (also on CUDA) or False.
        weight: per row (``logits.shape[:-1]``) or per element (``logits.shape``; timm's per-class
            weight is ``w.expand_as(logits)``); 0 gives exactly 0.
        avg_factor: with reduction='mean' only: sum / avg_factor.

    Returns:
        The loss: the logits' shape for 'none', a 0-dim tensor for 'mean'/'sum'.

    Raises:
        TypeError: logits not a floating tensor, an integer target (pass ``target.float()``).
        ValueError: shapes or devices that do not match, targets outside [0, 1] (CPU tensors,
            or validate=True), out-of-range parameters; each message names the argument.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> target = (torch.rand(4, 10) < 0.2).float()             # multi-hot
        >>> loss = fl.asymmetric(logits, target)                    # gamma_pos 1, gamma_neg 4, clip 0.05
        >>> loss.backward()
        >>> batchmean = fl.asymmetric(logits, target, reduction="mean", avg_factor=4)
    """
    kwargs = _validate.asymmetric_args(logits, target, gamma_pos=gamma_pos, gamma_neg=gamma_neg, clip=clip, eps=eps,
                                       detach_focusing=detach_focusing, reduction=reduction, validate=validate,
                                       weight=weight, avg_factor=avg_factor)
    return _detector_run("asymmetric", backend, logits, target, target, avg_factor=avg_factor, **kwargs)


# ---- seesaw / eqlv2 (#25) ----
__all__ += ["seesaw", "eqlv2"]


def _run_stateful(loss: str, backend, logits, target, state, kwargs, avg_factor):
    """Backend dispatch of the stateful long-tail losses: avg_factor goes to the backend (Seesaw's
    return_dict divides each loss of the dict)."""
    avg_factor = _validate.avg_factor_arg(avg_factor, kwargs["reduction"], logits)
    requested = _validate.weight_grad_backend(loss, kwargs.get("weight"), _validate.backend_arg(backend))
    chosen = _backends.select(loss, logits, requested)
    return chosen.losses[loss](logits, target, state, avg_factor=avg_factor, **kwargs)


def seesaw(logits: torch.Tensor, target: torch.Tensor, cum_samples: torch.Tensor, *, p: float = 0.8, q: float = 2.0,
           eps: float = 1e-2, objectness: bool = False, return_dict: bool = False, ignore_index: int = -100,
           weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None, reduction: str = "mean",
           backend: Optional[str] = None, validate: Optional[bool] = None, process_group=None):
    """Seesaw loss (Wang et al., CVPR 2021), mmdet 3.x ``SeesawLoss``; UPDATES ``cum_samples`` in place.

    First ``cum_samples[label] += count`` for this batch's non-ignored labels (mmdet's order),
    then, for a row with label i, the cross entropy of ``z = x + log(factors)`` over the C class
    logits, where the factor of another class j is the mitigation ``(N_j / N_i)^p`` where
    ``N_j < N_i`` (counts clamped to >= 1) times the compensation ``(s_j / max(s_i, eps))^q``
    where that ratio is > 1 (s = softmax of the detached logits). The factors carry no
    gradient: ``dloss/dx = w (softmax(z) - onehot) / D``. Semantics and every difference from
    mmdet: docs/losses/longtail.md.

    Args:
        logits: (N, C), or (N, C + 2) with ``objectness=True`` (mmdet's layout: the last two
            columns an objectness pair, foreground then background).
        target: (N,) int64/int32 labels in [0, C) (with objectness: [0, C], C = background), or
            ignore_index (a row removed: no loss, gradient, count or denominator).
        cum_samples: float32 (C,) (with objectness (C + 1,), mmdet's buffer) cumulative label
            counts, on the logits' device, not requiring grad; updated in place.
            :class:`fused_losses.nn.SeesawLoss` owns one.
        p: mitigation exponent >= 0 (0 disables it).
        q: compensation exponent >= 0 (0 disables it).
        eps: > 0, the floor of the label's probability in the compensation ratio.
        objectness: mmdet's (N, C + 2) layout: the classes loss on foreground rows plus the
            objectness pair's cross entropy on every non-ignored row.
        return_dict: False: one tensor (with objectness, classes + objectness loss); True:
            mmdet's dict ``{'loss_cls_objectness', 'loss_cls_classes'}`` (without objectness
            ``{'loss_cls_classes'}``).
        ignore_index: target value that is ignored.
        weight: (N,) per-row weights multiplying both losses (a zero weight gives exactly 0; the
            row is still counted in cum_samples, as mmdet counts every label).
        avg_factor: with reduction='mean' only: each loss is its sum / avg_factor.
        reduction: 'none' ((N,) per loss, 0 on background and ignored rows), 'mean' (classes
            over the foreground rows, objectness over the non-ignored rows) or 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check target values on CPU tensors), True (also on CUDA) or False.
        process_group: a torch.distributed group: the int64 counts are all-reduced (SUM, exact)
            before they are added, so every rank holds the same cum_samples ('mean' still divides
            by this rank's rows).

    Returns:
        The loss (a tensor, or the dict of return_dict), differentiable in logits.

    Raises:
        TypeError: logits not a floating tensor, a target that is not int64/int32, a state that
            is not a tensor.
        ValueError: shapes, out-of-range labels (CPU tensors, or validate=True), cum_samples of
            the wrong shape, dtype or device or requiring grad; each message names the argument.
        RuntimeError: an explicitly requested backend that cannot run the call; torch.func
            transforms on a fused backend.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(6, 4 + 2, requires_grad=True)      # C = 4 classes + objectness pair
        >>> labels = torch.tensor([0, 1, 4, 4, 2, 0])               # 4 = background
        >>> cum_samples = torch.zeros(4 + 1)
        >>> losses = fl.seesaw(logits, labels, cum_samples, objectness=True, return_dict=True)
        >>> sorted(losses)
        ['loss_cls_classes', 'loss_cls_objectness']
        >>> sum(losses.values()).backward()
        >>> cum_samples                                              # updated in place
        tensor([2., 1., 1., 0., 2.])
    """
    kwargs = _validate.seesaw_args(logits, target, cum_samples, p=p, q=q, eps=eps, objectness=objectness,
                                   return_dict=return_dict, ignore_index=ignore_index, reduction=reduction,
                                   validate=validate, weight=weight, avg_factor=avg_factor,
                                   process_group=process_group)
    return _run_stateful("seesaw", backend, logits, target, cum_samples, kwargs, avg_factor)


def eqlv2(logits: torch.Tensor, target: torch.Tensor, state: torch.Tensor, *, gamma: float = 12.0, mu: float = 0.8,
          alpha: float = 4.0, objectness: bool = False, ignore_index: int = -100,
          weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None, reduction: str = "mean",
          backend: Optional[str] = None, validate: Optional[bool] = None, process_group=None) -> torch.Tensor:
    """Equalization loss v2 (Tan et al., CVPR 2021), the authors' ``EQLv2``; UPDATES ``state`` in place.

    C independent sigmoids. With the state's ratio r_c = pos_c / neg_c (after the previous
    step), ``f_c = sigmoid(gamma (r_c - mu))``: negatives weigh ``f_c``, positives
    ``1 + alpha (1 - f_c)``; ``loss = w (w+ y + f (1 - y)) BCE(x, y)``. Then, from this batch's
    gradient magnitudes ``|sigmoid(x) - y| * eqlv2 weight * w`` (what the fused pass knows), the
    state's positive and negative sums are updated and r recomputed: the authors' order (the
    update in forward, after the loss: identical to a backward hook's order in a training step,
    docs/losses/longtail.md).

    Args:
        logits: (..., C), or (..., C + 1) with ``objectness=True`` (the authors' layout: the last
            column a background logit, weight 1, no statistics).
        target: integer labels of shape logits.shape[:-1] in [0, C] (C = background: all
            negatives), or ignore_index (a row removed, statistics included).
        state: float32 (3, C) = [pos_grad, neg_grad, pos_neg] on the logits' device, not
            requiring grad (``fused_losses.reference.eqlv2_initial_state(C)``: [0, 0, 100], the
            authors' start, every weight 1); updated in place. :class:`fused_losses.nn.EQLv2Loss`
            owns one.
        gamma: the slope of the weight function (12).
        mu: its centre (0.8).
        alpha: the positive weight's extra factor (4).
        objectness: the authors' (..., C + 1) layout.
        ignore_index: target value that is ignored.
        weight: per row (logits.shape[:-1]) or per element (logits.shape); in the loss and the
            statistics (an integer weight k counts as k copies of the row).
        avg_factor: with reduction='mean' only: sum / avg_factor.
        reduction: 'none' (elementwise, the logits' shape), 'mean' (over the non-ignored ROWS,
            the authors' / n_i) or 'sum'.
        backend: None (automatic) or 'cuda', 'triton', 'cpu', 'reference'.
        validate: None (check target values on CPU tensors), True (also on CUDA) or False.
        process_group: a torch.distributed group: every rank's (2, C) batch sums are gathered
            and added in rank order in float64, then to the state once: every rank holds the same
            state (equal to one process on the whole batch up to the rounding of the per-rank
            partial sums).

    Returns:
        The loss: the logits' shape for 'none', else a 0-dim tensor; differentiable in logits.

    Raises:
        TypeError: logits not a floating tensor, a target that is not int64/int32, a state that
            is not a tensor.
        ValueError: shapes, out-of-range labels (CPU tensors, or validate=True), a state of the
            wrong shape, dtype or device or requiring grad; each message names the argument.
        RuntimeError: an explicitly requested backend that cannot run the call; torch.func
            transforms on a fused backend.

    Example:
        >>> import torch
        >>> import fused_losses as fl
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> labels = torch.tensor([0, 1, 3, 3, 2, 3, 0, 3])          # 3 = background
        >>> state = fl.reference.eqlv2_initial_state(3)
        >>> fl.eqlv2(logits, labels, state).backward()
        >>> bool((state[0] > 0).all()), state.shape                   # positives seen for every class
        (True, torch.Size([3, 3]))
    """
    kwargs = _validate.eqlv2_args(logits, target, state, gamma=gamma, mu=mu, alpha=alpha, objectness=objectness,
                                  ignore_index=ignore_index, reduction=reduction, validate=validate, weight=weight,
                                  avg_factor=avg_factor, process_group=process_group)
    return _run_stateful("eqlv2", backend, logits, target, state, kwargs, avg_factor)
