"""The public functional API (re-exported as fused_losses.focal, ...).

Each function validates its arguments (fused_losses._validate, one place for every check),
picks a backend (fused_losses._backends.select, one place for the choice) and calls it.
The contract is in README.md: "API" (signatures, shapes, dtypes, the semantics table against
torchvision/mmcv/kornia), "Loss details and decisions", "Bad input" (the exceptions),
"Autograd contract" (retain_graph, hooks, forward AD, torch.func, torch.compile) and
"Accuracy".

``validate``: out-of-range target values (and non-finite sample weights, per-class values out
of range) are a ValueError naming the value. None (default) checks on CPU tensors only; on CUDA
the check costs a host sync, so it runs only with validate=True (without it an out-of-range
target never reads out of bounds: a device-side assert, as in torch).

Drop-in extras (README "Sample weights, avg_factor, label smoothing, per-class alpha"):
``weight`` multiplies each sample's (softmax family) or row's/element's (sigmoid family) loss
and gradient, a zero weight giving exactly 0 (a NaN logit there does not leak); 'mean'
denominators are unchanged by weights (mmdet's weight_reduce_loss), except GHM-C, where a zero
weight drops the entry. ``avg_factor`` (reduction='mean' only) replaces the mean's denominator:
the loss is the backend's 'sum' divided by avg_factor, a device-side division (no host sync).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from fused_losses import _backends, _validate, reference

Alpha = Union[None, float, Sequence[float], torch.Tensor]
SigmoidAlpha = Union[float, Sequence[float], torch.Tensor]
AvgFactor = Union[None, float, torch.Tensor]

__all__ = ["focal", "sigmoid_focal", "ohem", "ghmc", "ib", "class_weights"]


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
    if (chosen.name == "cpu" and loss in ("focal", "sigmoid_focal") and isinstance(weight, torch.Tensor)
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
          avg_factor: AvgFactor = None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax focal loss: loss_i = -alpha_{t_i} (1 - p_{t_i})^gamma log p_{t_i}.

    Args:
        logits: (N, C) or channel-second (N, C, d1, ...) float tensor (probabilities when
            from_logits=False).
        target: (N,) or (N, d1, ...) int64/int32 class indices in [0, C) or ignore_index.
        gamma: focusing parameter >= 0; gamma=0 with alpha=None is cross entropy.
        alpha: None (1), a float (every class), or C per-class factors (alpha_t = alpha[t]).
        ignore_index: target value that contributes no loss, no gradient and no count.
        reduction: 'none' (shape of target) | 'mean' (over non-ignored samples; 0 if none) | 'sum'.
        from_logits: False means logits already hold probabilities (no clamping).
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        weight: per-sample weights broadcastable to the target's shape (torch broadcasting:
            (N,) for (N,) targets, (N, 1, 1) per image or (N, H, W) per pixel for (N, H, W)):
            loss_i and its gradient are multiplied by w_i; w_i == 0 gives exactly 0 (a NaN
            logit there does not leak). 'mean' still divides by the non-ignored count.
        avg_factor: with reduction='mean' only: sum / avg_factor instead (a number, or a
            0-dim tensor on the logits' device, e.g. mmdet's num_pos; no host sync).
        label_smoothing: eps in [0, 1] (from_logits only): the target distribution
            q_c = (1 - eps) [c == t] + eps / C and loss_i = sum_c q_c a_c (1 - p_c)^gamma
            (-log p_c); gamma=0 without alpha is F.cross_entropy(..., label_smoothing=eps).
    """
    kwargs = _validate.focal_args(logits, target, gamma=gamma, alpha=alpha, ignore_index=ignore_index,
                                  reduction=reduction, from_logits=from_logits, validate=validate, weight=weight,
                                  label_smoothing=label_smoothing, avg_factor=avg_factor)
    return _run("focal", backend, logits, target, avg_factor=avg_factor, **kwargs)


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, *, alpha: SigmoidAlpha = 0.25, gamma: float = 2.0,
                  ignore_index: int = -100, reduction: str = "none", backend: Optional[str] = None,
                  validate: Optional[bool] = None, weight: Optional[torch.Tensor] = None,
                  avg_factor: AvgFactor = None) -> torch.Tensor:
    """Sigmoid focal loss (torchvision.ops.sigmoid_focal_loss semantics), elementwise.

    Args:
        logits: (..., C) float tensor.
        target: float tensor of logits' shape (soft targets allowed), or integer labels of shape
            logits.shape[:-1]: label in [0, C) marks that class positive, label == C is background
            (all negatives), label == ignore_index ignores the row (no one-hot is materialised).
        alpha: weight of positives (negatives get 1 - alpha); alpha < 0 disables it. Or C
            per-class values in [0, 1] (sequence or tensor): alpha_t = alpha[c] y + (1 - alpha[c])(1 - y).
        gamma: focusing parameter >= 0.
        reduction: 'none' (default, like torchvision) | 'mean' (over elements; with integer labels
            over non-ignored rows x C) | 'sum'. Detection heads usually want
            ``sigmoid_focal(..., weight=label_weights, reduction='mean', avg_factor=num_pos)``.
        weight: shape logits.shape[:-1] = one value per ROW (all C outputs; mmdet's (N,) anchor
            label_weights; taken per row even when N == C), or logits.shape = per ELEMENT, or
            anything else broadcastable to logits.shape. Multiplies loss and gradient; 0 gives
            exactly 0 (NaN logits there do not leak). 'mean' denominators are unchanged.
        avg_factor: with reduction='mean' only: sum / avg_factor (a number or a 0-dim tensor on
            the logits' device, e.g. num_pos; no host sync).

    A float target that requires grad (grad mode on, e.g. distillation targets) runs on the
    'reference' backend, the only one that differentiates the target (the compiled kernels write
    no target gradient); asking for 'cpu', 'triton' or 'cuda' explicitly then raises RuntimeError.
    """
    return _sigmoid_focal(logits, target, alpha=alpha, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                          backend=backend, validate=validate, weight=weight, avg_factor=avg_factor)


def _sigmoid_focal(logits, target, *, alpha, gamma, ignore_index, reduction, backend, validate, weight, avg_factor,
                   single_class_warning=True):
    # single_class_warning=False: compat.MMDetFocalLoss, whose labels follow mmdet's C = background convention
    kwargs = _validate.sigmoid_focal_args(logits, target, alpha=alpha, gamma=gamma, ignore_index=ignore_index,
                                          reduction=reduction, validate=validate, weight=weight,
                                          avg_factor=avg_factor, single_class_warning=single_class_warning)
    return _run("sigmoid_focal", backend, logits, target, avg_factor=avg_factor, **kwargs)


def ohem(logits: torch.Tensor, target: torch.Tensor, *, keep: Union[float, int] = 0.25,
         thresh: Optional[float] = None, min_kept: Optional[int] = None, ignore_index: int = -100,
         reduction: str = "mean", backend: Optional[str] = None, validate: Optional[bool] = None,
         weight: Optional[torch.Tensor] = None, avg_factor: AvgFactor = None,
         label_smoothing: float = 0.0) -> torch.Tensor:
    """Online hard example mining over per-sample cross entropy (softmax family shapes).

    keep: float in (0, 1] keeps k = max(1, floor(keep * n_valid)) hardest samples; int >= 1 keeps
        min(keep, n_valid). k is computed on the device; ties go to the lower index.
    thresh, min_kept: mmseg OHEMPixelSampler mode (keep is ignored): keep samples whose true-class
        probability is below max(thresh, sorted_p[min(min_kept_total, n_valid - 1)]), where
        min_kept counts per image (x N for (N, C, d...) inputs; as given for (N, C)).
    Dropped samples get 0 loss ('none') and no gradient; 'mean' divides by the kept count.
    weight, avg_factor: as :func:`focal`; the selection ignores weights (a zero-weight sample
        can be kept and then contributes 0, and is counted by 'mean').
    label_smoothing: a kept sample's loss is the cross entropy against the smoothed target
        (as :func:`focal` with gamma=0); the selection ranks the unsmoothed CE / p_t.
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
    """Gradient harmonized classification loss (GHM-C, Li et al. 2019).

    NOTE the default use_sigmoid=True is mmdet's detection variant: C independent sigmoids, and
    integer targets are detection labels in [0, C] where label == C is BACKGROUND (all C outputs
    negative). A softmax classifier with labels in [0, C) must pass use_sigmoid=False; with the
    default, every row would get one positive class and C - 1 sigmoid negatives. On CPU targets
    (validate=None; any device with validate=True) a UserWarning says so when the non-ignored
    integer labels never contain C (Python's default filter: once per call site).

    use_sigmoid=True: sigmoid-family targets (float, or integer labels with C = background);
    g = |sigmoid(x) - y| per element. use_sigmoid=False: softmax class indices, g = 1 - p_t per
    sample. Bin = min(floor(g * bins), bins - 1) (g in float32). weight = n_valid / count(bin)
    / n_nonempty_bins, no gradient; loss = weight * CE, 'mean' divides by n_valid.
    state: float32 (bins,) EMA of bin counts, updated in place (first, then used) for bins
    non-empty in this batch: state = momentum * state + (1 - momentum) * count. momentum > 0
    needs a state; fused_losses.nn.GHMCLoss owns one.
    A float target that requires grad (grad mode on) runs on the 'reference' backend, the only one
    that differentiates the target; an explicit compiled backend then raises RuntimeError.

    weight: shapes as :func:`focal` (use_sigmoid=False) or :func:`sigmoid_focal` (True). Unlike
        the other losses, a ZERO weight marks the entry invalid, as mmdet's GHMC label_weight:
        not in the histogram, n_valid or the 'mean' denominator; nonzero weights multiply the
        loss after the bin weight. avg_factor: as :func:`focal`.
    label_smoothing: use_sigmoid=False only: CE against the smoothed target; g = 1 - p_t and the
        bins stay unsmoothed.
    process_group: a torch.distributed group: the bin counts and n_valid are all-reduced (SUM, on
        the device) before the weights and the EMA update, so every rank weights by the global
        batch's histogram and keeps an identical `state`. 'mean' still divides by this rank's
        n_valid (DDP averages the gradients: equal shards give the single-process loss).
    """
    kwargs = _validate.ghmc_args(logits, target, bins=bins, momentum=momentum, state=state, use_sigmoid=use_sigmoid,
                                 ignore_index=ignore_index, reduction=reduction, validate=validate, weight=weight,
                                 label_smoothing=label_smoothing, process_group=process_group, avg_factor=avg_factor)
    return _run("ghmc", backend, logits, target, avg_factor=avg_factor, **kwargs)


def ib(logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor, *, alpha: float = 1000.0,
       epsilon: float = 1e-3, weight: Alpha = None, gamma: float = 0.0, detach_factor: bool = False,
       reduction: str = "mean", backend: Optional[str] = None, validate: Optional[bool] = None) -> torch.Tensor:
    """Influence-balanced loss (Park et al., ICCV 2021; IB-focal with gamma > 0).

    logits: (N, C); target: (N,) class indices (no ignore_index); features: (N,) or (N, 1)
    feature norms used as given, or (N, D) raw features reduced to sum_d |f|.
    factor_i = alpha / (2 (1 - p_t) f_i + epsilon); loss_i = factor_i * CE_w,i (gamma = 0) or
    factor_i * (1 - exp(-CE_w,i))^gamma * CE_w,i, CE_w,i = weight[t_i] * CE_i. 'mean' divides by N
    (also when weight is set, as the official code). Gradient flows through the factor into
    logits and features unless detach_factor=True.
    """
    kwargs = _validate.ib_args(logits, target, features, alpha=alpha, epsilon=epsilon, weight=weight, gamma=gamma,
                               detach_factor=detach_factor, reduction=reduction, validate=validate)
    return _run("ib", backend, logits, target, features, **kwargs)


def class_weights(counts, scheme: str = "inverse", beta: float = 0.9999) -> torch.Tensor:
    """Per-class weights from per-class sample counts, float32 (C,), normalised to sum C.

    'inverse': proportional to 1 / n_k. 'effective': (1 - beta) / (1 - beta^n_k), the effective
    number of samples (Cui et al., CVPR 2019). A zero or negative count is a ValueError.
    """
    return reference.class_weights(*_validate.class_weights_args(counts, scheme, beta))
