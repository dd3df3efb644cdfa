"""Adapters with other libraries' exact signatures, so existing training code calls the fused kernels.

- :func:`sigmoid_focal_loss`: ``torchvision.ops.sigmoid_focal_loss``'s signature.
- :func:`patch_torchvision`: torchvision's detection heads use the fused loss (returns a
  :class:`TorchvisionPatch`, also a context manager).
- :class:`MMDetFocalLoss`: ``mmdet.models.losses.FocalLoss``'s signature (mmdet 3.x).

Nothing here imports torchvision at import time; patch_torchvision() imports it when called.
mmdet is never imported: MMDetFocalLoss reproduces its semantics with the fused kernels.

Example:
    >>> import torch
    >>> from fused_losses.compat import sigmoid_focal_loss, MMDetFocalLoss
    >>> x = torch.randn(8, 4, requires_grad=True)
    >>> y = (torch.rand(8, 4) < 0.25).float()
    >>> sigmoid_focal_loss(x, y, reduction="sum").backward()
    >>> loss = MMDetFocalLoss()(x, torch.randint(0, 5, (8,)), avg_factor=3.0)
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Optional

import torch

from torch import nn

from fused_losses import functional as _functional

__all__ = ["sigmoid_focal_loss", "patch_torchvision", "TorchvisionPatch", "MMDetFocalLoss"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, computed by the fused kernels (fused_losses.sigmoid_focal).

    Same signature (positional arguments included), same contract and same numbers:

        loss = alpha_t * (1 - p_t)^gamma * BCE-with-logits(inputs, targets), elementwise
        p = sigmoid(inputs), p_t = p t + (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t)

    Differences from torchvision: 'mean' and 'sum' return float32 for float16/bfloat16 inputs
    (accumulated in float32; torchvision returns the inputs' dtype); 'none' has the inputs' dtype
    even when targets have a wider one; 'mean' of an empty tensor is 0 (the package's rule for a
    mean over nothing), where torchvision returns NaN. Targets that require grad are served by
    the plain-PyTorch reference backend (the fused kernels write the gradient of the inputs
    only), so their gradient is exact too.

    Args:
        inputs: float tensor of any shape (logits).
        targets: float tensor of the inputs' shape, 0/1 or soft targets in [0, 1]. Integer labels
            (label == C meaning background) are fused_losses.sigmoid_focal's extension, not
            torchvision's: pass them there.
        alpha: in [0, 1], or -1 to disable (anything else is a ValueError, as in torchvision); a
            float or, as torchvision accepts, a 0-dim tensor.
        gamma: focusing parameter >= 0.
        reduction: 'none' (default) | 'mean' (over all elements) | 'sum'.

    Returns:
        The loss: the inputs' shape for 'none', else a 0-dim tensor.

    Raises:
        TypeError: targets that are not a float tensor (the message points integer labels to
            fused_losses.sigmoid_focal).
        ValueError: alpha outside [0, 1] and not -1, shapes that differ, an unknown reduction.

    Example:
        >>> import torch
        >>> from torchvision.ops import sigmoid_focal_loss as tv_loss
        >>> from fused_losses.compat import sigmoid_focal_loss
        >>> x, y = torch.randn(16, 3), (torch.rand(16, 3) < 0.3).float()
        >>> bool(torch.allclose(sigmoid_focal_loss(x, y, 0.25, 2, "mean"), tv_loss(x, y, 0.25, 2, "mean")))
        True
    """
    if not isinstance(targets, torch.Tensor) or not targets.is_floating_point():
        got = type(targets).__name__ if not isinstance(targets, torch.Tensor) else str(targets.dtype)
        raise TypeError(f"targets: expected a float tensor of the inputs' shape (torchvision's contract), got {got}; "
                        "for integer labels (label == C = background) call fused_losses.sigmoid_focal")
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"alpha: must be in [0, 1] or -1 to disable (torchvision's contract), got {alpha}")
    backend = None
    if targets.requires_grad and torch.is_grad_enabled():
        backend = "reference"
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 0:
        # torchvision takes any shape; fused_losses.sigmoid_focal needs a class dim. Elementwise, so
        # a 0-dim pair is a (1,) pair.
        loss = _functional.sigmoid_focal(inputs.reshape(1), targets.reshape(1), alpha=alpha, gamma=gamma,
                                         reduction=reduction, backend=backend)
        return loss.reshape(()) if reduction == "none" else loss
    return _functional.sigmoid_focal(inputs, targets, alpha=alpha, gamma=gamma, reduction=reduction,
                                     backend=backend)


# --------------------------------------------------------------------------------------------
# torchvision RetinaNet
# --------------------------------------------------------------------------------------------
# torchvision.models.detection.retinanet does `from ...ops import sigmoid_focal_loss` and
# RetinaNetClassificationHead.compute_loss calls the module global `sigmoid_focal_loss(...,
# reduction="sum")`, looked up at call time: replacing that global swaps the loss of every
# RetinaNet, built before or after the patch (checked for torchvision 0.29.1).
_RETINANET_MODULE = "torchvision.models.detection.retinanet"
_ATTRIBUTE = "sigmoid_focal_loss"
_lock = threading.Lock()


class TorchvisionPatch:
    """Handle returned by patch_torchvision(): the patch is applied when it is created.

    restore() (or leaving the `with` block, also on an exception) puts back, in each patched
    module, exactly the object that was there when this handle patched, unless something else has
    replaced the function since (then it leaves that alone). Calling it twice is harmless.

    Attributes:
        active: True until restore() runs.

    Example:
        >>> from fused_losses.compat import patch_torchvision
        >>> handle = patch_torchvision()
        >>> handle.active
        True
        >>> handle.restore()
        >>> handle.active
        False
    """

    def __init__(self, module, previous: Callable):
        self._module = module
        self._previous: Optional[Callable] = previous
        self.active = True

    def restore(self) -> None:
        """Put back what this handle replaced (a no-op after the first call, or when something else
        has replaced the function since).
        """
        with _lock:
            if not self.active:
                return
            self.active = False
            # Only undo our own change: if the global is no longer the fused function, someone
            # else patched it after us (or an outer handle already restored), so leave it.
            if getattr(self._module, _ATTRIBUTE) is sigmoid_focal_loss:
                setattr(self._module, _ATTRIBUTE, self._previous)
            self._previous = None

    @property
    def original(self) -> Optional[Callable]:
        """What was in torchvision's module before this handle patched (None once restored)."""
        return self._previous

    def __enter__(self) -> "TorchvisionPatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        return f"TorchvisionPatch({_RETINANET_MODULE}.{_ATTRIBUTE}, active={self.active})"


def patch_torchvision() -> TorchvisionPatch:
    """Make torchvision's detection models that call sigmoid_focal_loss (RetinaNet's and FCOS's
    classification losses) use the fused sigmoid focal loss.

    A plain call patches until ``handle.restore()``; as a context manager it restores on exit.
    Idempotent: patching an already patched module changes nothing, and nested blocks restore in
    order (the innermost leaves the fused loss in place, the outermost puts the original back).
    The heads compute their sums and divisions as before; only the classification loss's kernel
    changes (same numbers to float32 rounding).

    Returns:
        A :class:`TorchvisionPatch` handle (the patch is already applied).

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: this torchvision's RetinaNet or FCOS module has no module-level
            sigmoid_focal_loss (the layout this patch relies on; checked with torchvision 0.29.1);
            nothing is patched then.

    Example:
        >>> import torchvision.models.detection.retinanet as tv_retinanet
        >>> from fused_losses.compat import patch_torchvision, sigmoid_focal_loss
        >>> with patch_torchvision():              # only inside the block
        ...     tv_retinanet.sigmoid_focal_loss is sigmoid_focal_loss
        True
        >>> tv_retinanet.sigmoid_focal_loss is sigmoid_focal_loss
        False
    """
    module = importlib.import_module(_RETINANET_MODULE)
    with _lock:
        if not hasattr(module, _ATTRIBUTE):
            import torchvision
            raise RuntimeError(f"{_RETINANET_MODULE} (torchvision {torchvision.__version__}) has no module-level "
                               f"{_ATTRIBUTE} to replace; fused_losses.compat.patch_torchvision supports the layout "
                               "of torchvision 0.29")
        previous = getattr(module, _ATTRIBUTE)
        setattr(module, _ATTRIBUTE, sigmoid_focal_loss)
    return TorchvisionPatch(module, previous)


# --------------------------------------------------------------------------------------------
# mmdet's FocalLoss
# --------------------------------------------------------------------------------------------
_MMDET_EPS = torch.finfo(torch.float32).eps  # mmdet's weight_reduce_loss adds it to avg_factor


class MMDetFocalLoss(nn.Module):
    """mmdet.models.losses.FocalLoss (mmdet 3.x), computed by the fused sigmoid focal kernels.

    Same constructor and forward signature, same numbers (mmdet's py_sigmoid_focal_loss followed
    by weight_reduce_loss, times loss_weight), without importing mmdet:

        loss = loss_weight * weight_reduce_loss(focal(pred, target) * weight, reduction, avg_factor)
        weight_reduce_loss: 'none' -> loss; 'sum' -> loss.sum(); 'mean' -> loss.mean(), or with
        avg_factor loss.sum() / (avg_factor + float32 eps)

    Differences from mmdet: 'mean' and 'sum' of float16/bfloat16 logits return float32 (the
    fused kernels accumulate in float32; mmdet returns the logits' dtype); ``activated`` (the
    loss on probabilities) is not offered; alpha may also be C per-class values (mmdet: a float).

    Args:
        use_sigmoid: must be True (mmdet's FocalLoss supports only the sigmoid focal loss).
        gamma: focusing parameter >= 0.
        alpha: weight of positives in [0, 1] (negatives get 1 - alpha), or C per-class values.
        reduction: 'none' | 'mean' | 'sum' (default 'mean').
        loss_weight: multiplies the loss.
        backend: not in mmdet's signature: as everywhere in fused_losses (None = automatic).

    Raises:
        NotImplementedError: use_sigmoid is not True (use fused_losses.nn.FocalLoss for softmax).
        ValueError: an unknown reduction.

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetFocalLoss
        >>> pred = torch.randn(10, 4, requires_grad=True)            # 10 anchors, C = 4
        >>> labels = torch.tensor([0, 4, 4, 1, 4, 4, 3, 4, 4, 4])    # 4 = background
        >>> label_weights = torch.ones(10)
        >>> loss = MMDetFocalLoss(loss_weight=1.0)(pred, labels, label_weights, avg_factor=3.0)
        >>> loss.backward()
    """

    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha=0.25, reduction: str = "mean",
                 loss_weight: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        if use_sigmoid is not True:
            raise NotImplementedError("use_sigmoid: mmdet's FocalLoss supports only the sigmoid focal loss "
                                      "(use_sigmoid=True); for the softmax focal loss use fused_losses.nn.FocalLoss")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction: unknown reduction {reduction!r}; expected 'none', 'mean' or 'sum'")
        self.use_sigmoid, self.gamma, self.alpha = use_sigmoid, gamma, alpha
        self.reduction, self.loss_weight, self.backend = reduction, loss_weight, backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None, reduction_override: Optional[str] = None) -> torch.Tensor:
        """The loss of one batch (mmdet's FocalLoss.forward).

        Args:
            pred: (N, C) logits.
            target: (N,) integer labels in [0, C], label == C being background (all C outputs
                negative; mmdet's one_hot(target, C + 1)[:, :C]), or one-hot / soft targets of
                pred's shape (any dtype; cast to pred's, as mmdet's target.type_as(pred)).
            weight: mmdet's reshaping: a weight of loss's shape is per element; otherwise one with
                weight.size(0) == N is per row (mmdet's weight.view(-1, 1), the usual (N,) anchor
                label_weights), else its numel must be N x C (weight.view(N, -1), FSAF's flattened
                per-class weights).
            avg_factor: a number or a 0-dim tensor (e.g. num_pos, also after reduce_mean), used with
                'mean' only; with 'none' it is ignored and with 'sum' it is a ValueError, as in
                mmdet. No host sync: the division runs on the device.
            reduction_override: None, 'none', 'mean' or 'sum'.

        Returns:
            The loss: pred's shape for 'none', else a 0-dim tensor.

        Raises:
            ValueError: avg_factor with 'sum', an unknown reduction_override, a weight of none of
                the shapes above.
            TypeError: a weight that is not a tensor.
        """
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override: expected None, 'none', 'mean' or 'sum', got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if isinstance(target, torch.Tensor) and isinstance(pred, torch.Tensor) and target.dim() == pred.dim():
            target = target.to(pred.dtype)  # one-hot / soft targets: mmdet's target.type_as(pred)
        if weight is not None:
            weight = _mmdet_weight(weight, pred)
        if avg_factor is not None:
            if reduction == "sum":
                raise ValueError('avg_factor: can not be used with reduction="sum" (mmdet\'s weight_reduce_loss)')
            if reduction == "none":
                avg_factor = None  # mmdet returns the weighted elementwise loss and ignores avg_factor
            else:
                avg_factor = avg_factor + _MMDET_EPS
        loss = _functional.sigmoid_focal(pred, target, alpha=self.alpha, gamma=self.gamma, reduction=reduction,
                                         weight=weight, avg_factor=avg_factor, backend=self.backend)
        return loss if self.loss_weight == 1.0 else self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f"use_sigmoid={self.use_sigmoid!r}, gamma={self.gamma!r}, alpha={self.alpha!r}, "
                f"reduction={self.reduction!r}, loss_weight={self.loss_weight!r}, backend={self.backend!r}")


def _mmdet_weight(weight: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """mmdet's py_sigmoid_focal_loss reshaping of `weight` to the loss's shape (pred's)."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected None or a tensor, got {type(weight).__name__}")
    if weight.shape == pred.shape:
        return weight
    n = pred.shape[0] if pred.dim() else 1
    if weight.dim() and weight.shape[0] == n:
        if weight.numel() != n:
            raise ValueError(f"weight: shape {tuple(weight.shape)} with size(0) == N = {n} is taken per row "
                             f"(mmdet's weight.view(-1, 1)) and needs N values, got {weight.numel()}")
        return weight.reshape(pred.shape[:1])
    if weight.numel() != pred.numel():
        raise ValueError(f"weight: shape {tuple(weight.shape)} is neither the loss's shape {tuple(pred.shape)}, nor "
                         f"per row (size(0) == N = {n}), nor N x C = {pred.numel()} values (mmdet's "
                         "weight.view(N, -1))")
    return weight.reshape(pred.shape)
