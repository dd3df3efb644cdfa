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
from typing import Callable, Optional, Union

import torch

from torch import nn

from fused_losses import functional as _functional

__all__ = ["sigmoid_focal_loss", "patch_torchvision", "TorchvisionPatch", "MMDetFocalLoss"]
__all__ += ["MMDetDistributionFocalLoss"]  # distribution focal (#24)


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: Union[float, torch.Tensor] = 0.25,
                       gamma: float = 2, reduction: str = "none") -> torch.Tensor:
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
    device_alpha = None
    if isinstance(alpha, torch.Tensor):
        # torchvision takes a 0-dim tensor alpha too (its `if alpha >= 0` reads it: a host sync on
        # CUDA). A CPU tensor is read here (no sync) and then is a float; any other device keeps it
        # on the device (_device_alpha), without a sync.
        if alpha.numel() != 1 or alpha.dim() > 1 or not (alpha.is_floating_point() or alpha.dtype in
                                                         (torch.int64, torch.int32)):
            raise ValueError(f"alpha: expected a float or a 0-dim real tensor (torchvision's contract), got a "
                             f"{alpha.dtype} tensor of shape {tuple(alpha.shape)}; for per-class alphas call "
                             "fused_losses.sigmoid_focal(..., alpha=per_class)")
        if alpha.device.type == "cpu":
            alpha = float(alpha.detach().reshape(()))
        else:
            device_alpha, alpha = alpha.detach().reshape(()), 0.25
    if not (0 <= alpha <= 1) and alpha != -1:
        raise ValueError(f"alpha: must be in [0, 1] or -1 to disable (torchvision's contract), got {alpha}")
    backend = None
    if targets.requires_grad and torch.is_grad_enabled():
        backend = "reference"
    if device_alpha is not None:
        return _device_alpha_loss(inputs, targets, device_alpha, gamma, reduction, backend)
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 0:
        # torchvision takes any shape; fused_losses.sigmoid_focal needs a class dim. Elementwise, so
        # a 0-dim pair is a (1,) pair.
        loss = _functional.sigmoid_focal(inputs.reshape(1), targets.reshape(1), alpha=alpha, gamma=gamma,
                                         reduction=reduction, backend=backend)
        return loss.reshape(()) if reduction == "none" else loss
    return _functional.sigmoid_focal(inputs, targets, alpha=alpha, gamma=gamma, reduction=reduction,
                                     backend=backend)


def _device_alpha_loss(inputs, targets, alpha: torch.Tensor, gamma, reduction, backend) -> torch.Tensor:
    """sigmoid_focal_loss with a 0-dim alpha tensor whose value is not read on the host (no
    sync): torchvision's alpha >= 0 is the per-class path with alpha for every class; its
    alpha < 0 (disabled, alpha_t = 1) is alpha = 0.5 everywhere (alpha_t = 0.5 for positives and
    negatives alike) times 2, exact in binary floating point. Chosen on the device by torch.where."""
    squeeze = inputs.dim() == 0
    if squeeze:
        inputs, targets = inputs.reshape(1), targets.reshape(1)
    math_dtype = torch.promote_types(inputs.dtype, torch.float32)
    alpha = alpha.to(device=inputs.device, dtype=math_dtype)
    disabled = alpha < 0
    per_class = torch.where(disabled, torch.full_like(alpha, 0.5), alpha).expand(inputs.shape[-1]).contiguous()
    loss = _functional.sigmoid_focal(inputs, targets, alpha=per_class, gamma=gamma, reduction=reduction,
                                     backend=backend)
    loss = loss * torch.where(disabled, 2.0, 1.0).to(loss.dtype)
    return loss.reshape(()) if squeeze and reduction == "none" else loss


# --------------------------------------------------------------------------------------------
# torchvision detection models: RetinaNet, FCOS
# --------------------------------------------------------------------------------------------
# torchvision.models.detection.retinanet and .fcos do `from ...ops import sigmoid_focal_loss` and
# their heads (RetinaNetClassificationHead.compute_loss, FCOSHead.compute_loss) call the module
# global `sigmoid_focal_loss(..., reduction="sum")`, looked up at call time: replacing that global
# swaps the loss of every model built before or after the patch (checked for torchvision 0.29.1).
# Besides these two, any other module of torchvision.models.detection with a module-level
# sigmoid_focal_loss is patched too (a later torchvision's new model).
_RETINANET_MODULE = "torchvision.models.detection.retinanet"
_FCOS_MODULE = "torchvision.models.detection.fcos"
_REQUIRED_MODULES = (_RETINANET_MODULE, _FCOS_MODULE)
_ATTRIBUTE = "sigmoid_focal_loss"
_lock = threading.Lock()


def _detection_modules() -> list:
    """The modules to patch: RetinaNet's and FCOS's (required), then every other module of
    torchvision.models.detection that holds a module-level sigmoid_focal_loss."""
    import pkgutil

    modules = [importlib.import_module(name) for name in _REQUIRED_MODULES]
    package = importlib.import_module("torchvision.models.detection")
    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if info.name in _REQUIRED_MODULES or info.ispkg:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # noqa: BLE001 - a module that does not import is not patched
            continue
        if hasattr(module, _ATTRIBUTE):
            modules.append(module)
    return modules


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

    def __init__(self, previous: dict):
        # {module object: what its sigmoid_focal_loss was before this handle patched}
        self._previous: dict = dict(previous)
        self.active = True

    def restore(self) -> None:
        """Put back what this handle replaced (a no-op after the first call, or when something else
        has replaced the function since).
        """
        with _lock:
            if not self.active:
                return
            self.active = False
            for module, previous in self._previous.items():
                # Only undo our own change: if the global is no longer the fused function, someone
                # else patched it after us (or an outer handle already restored), so leave it.
                if getattr(module, _ATTRIBUTE, None) is sigmoid_focal_loss:
                    setattr(module, _ATTRIBUTE, previous)
            self._previous = {}

    @property
    def modules(self) -> list:
        """The names of the modules this handle patched (empty once restored)."""
        return [module.__name__ for module in self._previous]

    @property
    def originals(self) -> dict:
        """{module name: what its sigmoid_focal_loss was before this handle patched} (empty once
        restored)."""
        return {module.__name__: previous for module, previous in self._previous.items()}

    @property
    def original(self) -> Optional[Callable]:
        """What was in torchvision's RetinaNet module before this handle patched (None once
        restored); ``originals`` has every module's."""
        return self.originals.get(_RETINANET_MODULE)

    def __enter__(self) -> "TorchvisionPatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.restore()
        return False

    def __repr__(self) -> str:
        names = ", ".join(f"{name}.{_ATTRIBUTE}" for name in self.modules) or "nothing"
        return f"TorchvisionPatch({names}, active={self.active})"


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
    modules = _detection_modules()
    with _lock:
        for module in modules:
            if not hasattr(module, _ATTRIBUTE):
                import torchvision
                raise RuntimeError(f"{module.__name__} (torchvision {torchvision.__version__}) has no module-level "
                                   f"{_ATTRIBUTE} to replace; fused_losses.compat.patch_torchvision supports the "
                                   "layout of torchvision 0.29")
        previous = {module: getattr(module, _ATTRIBUTE) for module in modules}
        for module in modules:
            setattr(module, _ATTRIBUTE, sigmoid_focal_loss)
    return TorchvisionPatch(previous)


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
        # mmdet's labels: label == C is background also for C == 1 (no single-class warning)
        loss = _functional._sigmoid_focal(pred, target, alpha=self.alpha, gamma=self.gamma, ignore_index=-100,
                                          reduction=reduction, weight=weight, avg_factor=avg_factor,
                                          backend=self.backend, validate=None, single_class_warning=False)
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


# ---- distribution focal (#24) ----
class MMDetDistributionFocalLoss(nn.Module):
    """mmdet.models.losses.DistributionFocalLoss (mmdet 3.x), computed by the fused DFL kernels.

    Same constructor and forward signature, same numbers (mmdet's distribution_focal_loss followed
    by weight_reduce_loss, times loss_weight), without importing mmdet:

        loss = loss_weight * weight_reduce_loss(dfl(pred, target) * weight, reduction, avg_factor)
        'none' -> per row (avg_factor ignored); 'sum' -> loss.sum() (avg_factor: ValueError);
        'mean' -> loss.mean(), or with avg_factor loss.sum() / (avg_factor + float32 eps)

    Differences from mmdet (docs/losses/detector.md): a label equal to n (= reg_max) gives
    CE(x, n), where mmdet indexes bin n + 1 and fails (its GFL head never passes n); a zero weight
    gives exactly 0 where mmdet's ``loss * weight`` turns a NaN logit into NaN; 'mean' and 'sum'
    of float16/bfloat16 logits return float32.

    Args:
        reduction: 'none' | 'mean' | 'sum' (default 'mean').
        loss_weight: multiplies the loss.
        backend: not in mmdet's signature: as everywhere in fused_losses (None = automatic).

    Raises:
        ValueError: an unknown reduction.

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetDistributionFocalLoss
        >>> pred_corners = torch.randn(12, 17, requires_grad=True)   # 3 positives x 4 sides, reg_max 16
        >>> target_corners = torch.rand(12) * 15.99                  # bbox2distance(..., reg_max - 0.01)
        >>> weight_targets = torch.rand(3)                           # the positives' quality scores
        >>> loss_dfl = MMDetDistributionFocalLoss(loss_weight=0.25)
        >>> loss = loss_dfl(pred_corners, target_corners, weight=weight_targets[:, None].expand(-1, 4).reshape(-1),
        ...                 avg_factor=4.0)
        >>> loss.backward()
    """

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction: unknown reduction {reduction!r}; expected 'none', 'mean' or 'sum'")
        self.reduction, self.loss_weight, self.backend = reduction, loss_weight, backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None, reduction_override: Optional[str] = None) -> torch.Tensor:
        """The loss of one batch (mmdet's DistributionFocalLoss.forward).

        Args:
            pred: (N, n + 1) bin logits (any leading dims: rows).
            target: (N,) float labels in [0, n].
            weight: (N,) per-row weights (mmdet multiplies the (N,) loss by it), or None.
            avg_factor: a number or a 0-dim tensor, used with 'mean' only; ignored with 'none', a
                ValueError with 'sum', as in mmdet. No host sync.
            reduction_override: None, 'none', 'mean' or 'sum'.

        Returns:
            The loss: (N,) for 'none', else a 0-dim tensor.
        """
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override: expected None, 'none', 'mean' or 'sum', got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if avg_factor is not None:
            if reduction == "sum":
                raise ValueError('avg_factor: can not be used with reduction="sum" (mmdet\'s weight_reduce_loss)')
            avg_factor = None if reduction == "none" else avg_factor + _MMDET_EPS
        if weight is not None and isinstance(weight, torch.Tensor) and weight.shape != target.shape \
                and weight.numel() == target.numel():
            weight = weight.reshape(target.shape)
        loss = _functional.distribution_focal(pred, target, weight=weight, avg_factor=avg_factor,
                                              reduction=reduction, backend=self.backend)
        return loss if self.loss_weight == 1.0 else self.loss_weight * loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.loss_weight!r}, backend={self.backend!r}"


# ---- quality_focal / varifocal / asymmetric (#24) ----
__all__ += ["MMDetQualityFocalLoss", "MMDetVarifocalLoss", "VarifocalLoss"]


def _mmdet_reduction(reduction_override, default):
    if reduction_override not in (None, "none", "mean", "sum"):
        raise ValueError(f"reduction_override: expected None, 'none', 'mean' or 'sum', got {reduction_override!r}")
    return reduction_override if reduction_override else default


def _mmdet_avg_factor(avg_factor, reduction):
    """mmdet's weight_reduce_loss: avg_factor + float32 eps with 'mean', ignored with 'none', an
    error with 'sum'."""
    if avg_factor is None:
        return None
    if reduction == "sum":
        raise ValueError('avg_factor: can not be used with reduction="sum" (mmdet\'s weight_reduce_loss)')
    return None if reduction == "none" else avg_factor + _MMDET_EPS


class MMDetQualityFocalLoss(nn.Module):
    """mmdet.models.losses.QualityFocalLoss (mmdet 3.x), computed by the fused kernels.

    Same constructor and forward signature and the same numbers as mmdet's
    ``quality_focal_loss`` / ``quality_focal_loss_with_prob`` / ``quality_focal_loss_tensor_target``
    followed by ``weight_reduce_loss`` (``loss(N,) * weight``, 'mean' = ``loss.mean()`` or
    ``loss.sum() / (avg_factor + float32 eps)``), times loss_weight, without importing mmdet.

    Differences from mmdet: the loss of a confident correct entry is exact (mmdet's
    ``binary_cross_entropy_with_logits`` rounds it to 0 in float32); 'mean'/'sum' of fp16/bf16
    logits return float32; a weight may also be per element (mmdet: per row).

    Args:
        use_sigmoid: must be True (mmdet supports only the sigmoid version).
        beta: exponent of ``|y - s|``.
        reduction: 'none' | 'mean' | 'sum' (default 'mean').
        loss_weight: multiplies the loss.
        activated: the predictions are probabilities.
        backend: not in mmdet's signature: as everywhere in fused_losses (None = automatic).

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetQualityFocalLoss
        >>> pred = torch.randn(6, 4, requires_grad=True)                # 6 anchors, C = 4
        >>> labels = torch.tensor([0, 4, 4, 2, 4, 4])                   # 4 = background
        >>> score = torch.tensor([0.9, 0.0, 0.0, 0.4, 0.0, 0.0])        # IoU at the positives
        >>> loss = MMDetQualityFocalLoss()(pred, (labels, score), torch.ones(6), avg_factor=2.0)
        >>> loss.backward()
    """

    def __init__(self, use_sigmoid: bool = True, beta: float = 2.0, reduction: str = "mean", loss_weight: float = 1.0,
                 activated: bool = False, backend: Optional[str] = None):
        super().__init__()
        if use_sigmoid is not True:
            raise NotImplementedError("use_sigmoid: mmdet's QualityFocalLoss supports only use_sigmoid=True")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction: unknown reduction {reduction!r}; expected 'none', 'mean' or 'sum'")
        self.use_sigmoid, self.beta, self.reduction = use_sigmoid, beta, reduction
        self.loss_weight, self.activated, self.backend = loss_weight, activated, backend

    def forward(self, pred: torch.Tensor, target, weight: Optional[torch.Tensor] = None, avg_factor=None,
                reduction_override: Optional[str] = None) -> torch.Tensor:
        """The loss of one batch (mmdet's QualityFocalLoss.forward).

        Args:
            pred: (N, C) logits (probabilities with activated=True).
            target: a tuple (label (N,), score (N,)): label in [0, C) is a positive with quality
                score, any other label (C, or < 0) background, as mmdet's ``(label >= 0) & (label <
                C)``; or a dense (N, C) soft target (cast to pred's dtype, mmdet's
                ``target.type(pred.dtype)``).
            weight: (N,) per row (mmdet's), or (N, C) per element, or None.
            avg_factor: a number or a 0-dim tensor, used with 'mean' only (+ float32 eps).
            reduction_override: None, 'none', 'mean' or 'sum'.

        Returns:
            The loss: (N,) for 'none', else a 0-dim tensor.
        """
        reduction = _mmdet_reduction(reduction_override, self.reduction)
        avg_factor = _mmdet_avg_factor(avg_factor, reduction)
        if isinstance(target, torch.Tensor):
            labels, score = target.to(pred.dtype), None
        else:
            labels, score = target
            c = pred.shape[-1]
            labels = torch.where((labels < 0) | (labels >= c), torch.full_like(labels, c), labels)
        if weight is not None and weight.shape != pred.shape:
            weight = weight.reshape(pred.shape[:-1])
        loss = _functional.quality_focal(pred, labels, score=score, beta=self.beta, activated=self.activated,
                                         reduction=reduction, weight=weight, avg_factor=avg_factor,
                                         backend=self.backend)
        return self.loss_weight * loss


class MMDetVarifocalLoss(nn.Module):
    """mmdet.models.losses.VarifocalLoss (mmdet 3.x), computed by the fused kernels.

    mmdet's ``varifocal_loss`` (dense target: positives are y > 0, weighted by y when
    iou_weighted; negatives by ``alpha * sigmoid(pred)^gamma``, the gradient flowing through it)
    followed by ``weight_reduce_loss`` (elementwise ``loss * weight``; 'mean' = ``loss.mean()``
    over N x C or ``loss.sum() / (avg_factor + float32 eps)``), times loss_weight.

    Differences from mmdet: exact BCE for confident entries; 'mean'/'sum' of fp16/bf16 logits in
    float32.

    Args:
        use_sigmoid: must be True.
        alpha: weight of the negatives.
        gamma: exponent of the negatives' modulating factor.
        iou_weighted: positives weighted by their target.
        reduction: 'none' | 'mean' | 'sum' (default 'mean').
        loss_weight: multiplies the loss.
        backend: not in mmdet's signature (None = automatic).

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetVarifocalLoss
        >>> pred = torch.randn(6, 3, requires_grad=True)
        >>> target = torch.zeros(6, 3)
        >>> target[0, 1], target[3, 2] = 0.8, 0.55                      # IoU-aware targets
        >>> MMDetVarifocalLoss()(pred, target, avg_factor=2.0).backward()
    """

    def __init__(self, use_sigmoid: bool = True, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True,
                 reduction: str = "mean", loss_weight: float = 1.0, backend: Optional[str] = None):
        super().__init__()
        if use_sigmoid is not True:
            raise NotImplementedError("use_sigmoid: mmdet's VarifocalLoss supports only use_sigmoid=True")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction: unknown reduction {reduction!r}; expected 'none', 'mean' or 'sum'")
        self.use_sigmoid, self.alpha, self.gamma, self.iou_weighted = use_sigmoid, alpha, gamma, iou_weighted
        self.reduction, self.loss_weight, self.backend = reduction, loss_weight, backend

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None, reduction_override: Optional[str] = None) -> torch.Tensor:
        """The loss of one batch (mmdet's VarifocalLoss.forward).

        Args:
            pred: (N, C) logits.
            target: (N, C) IoU-aware soft target (cast to pred's dtype).
            weight: of pred's shape (per element), (N,) per row, or N x C values, or None.
            avg_factor: a number or a 0-dim tensor, used with 'mean' only (+ float32 eps).
            reduction_override: None, 'none', 'mean' or 'sum'.

        Returns:
            The loss: pred's shape for 'none', else a 0-dim tensor.
        """
        reduction = _mmdet_reduction(reduction_override, self.reduction)
        avg_factor = _mmdet_avg_factor(avg_factor, reduction)
        if weight is not None:
            weight = _mmdet_weight(weight, pred)
        loss = _functional.varifocal(pred, target.to(pred.dtype), alpha=self.alpha, gamma=self.gamma,
                                     iou_weighted=self.iou_weighted, reduction=reduction, weight=weight,
                                     avg_factor=avg_factor, backend=self.backend)
        return self.loss_weight * loss


class VarifocalLoss(nn.Module):
    """ultralytics' ``VarifocalLoss`` (ultralytics/utils/loss.py), computed by the fused kernels.

    ``forward(pred_score, gt_score, label)`` returns ultralytics' value,
    ``(BCE(pred, gt_score) * (alpha s^gamma (1 - label) + gt_score label)).mean(1).sum()``: the
    sum of the elementwise loss divided by ``pred_score.shape[1]`` (the queries of a (B, Q, C)
    DETR head), float32 math, the gradient flowing through ``s^gamma``. The positives are
    where label is 1 (a positive with gt_score 0 gives 0, as ultralytics: a per-element zero
    weight there); gt_score is expected to be 0 where label is 0, as ultralytics builds it
    (``one_hot * iou``).

    Args:
        gamma: exponent of the negatives' modulating factor. Default 2.0.
        alpha: weight of the negatives. Default 0.75.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.compat import VarifocalLoss
        >>> pred = torch.randn(2, 5, 3, requires_grad=True)             # (B, Q, C)
        >>> label = torch.zeros(2, 5, 3)
        >>> label[0, 1, 2] = label[1, 0, 0] = 1.0
        >>> gt_score = label * torch.rand(2, 5, 1)
        >>> VarifocalLoss()(pred, gt_score, label).backward()
    """

    def __init__(self, gamma: float = 2.0, alpha: float = 0.75, backend: Optional[str] = None):
        super().__init__()
        self.gamma, self.alpha, self.backend = gamma, alpha, backend

    def forward(self, pred_score: torch.Tensor, gt_score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """ultralytics' VarifocalLoss.forward: the loss summed over everything, divided by
        ``pred_score.shape[1]`` (a 0-dim float32 tensor for fp16/bf16/fp32 logits)."""
        target = gt_score.to(pred_score.dtype)
        # ultralytics: weight gt_score * label at a positive, so a positive with score 0 gives 0;
        # fused_losses' dense form would read y = 0 as a negative: a zero weight there instead.
        weight = None
        zero_positive = (label != 0) & (gt_score == 0)
        if pred_score.device.type != "cpu" or bool(zero_positive.any()):
            weight = (~zero_positive).to(torch.float32)
        return _functional.varifocal(pred_score, target, alpha=self.alpha, gamma=self.gamma, iou_weighted=True,
                                     reduction="mean", avg_factor=float(pred_score.shape[1]), weight=weight,
                                     backend=self.backend)


# ---- seesaw / eqlv2 (#25) ----
__all__ += ["MMDetSeesawLoss", "MMDetEQLv2"]


from fused_losses.nn import _Float32Buffers  # noqa: E402


class MMDetSeesawLoss(_Float32Buffers):
    """mmdet.models.losses.SeesawLoss (mmdet 3.x), computed by the fused Seesaw kernels.

    Same constructor and forward signature, same buffer (``cum_samples``, float32 (C + 1,): its
    state_dict loads into mmdet's and back), same numbers: logits (N, C + 2) (C classes, then the
    objectness pair), labels in [0, C] (C = background); ``cum_samples`` is updated with every
    label first, then the classes loss (foreground rows) and the objectness cross entropy (every
    row), each ``loss_weight x weight_reduce_loss(...)`` ('mean': over its rows, or sum /
    (avg_factor + float32 eps)).

    Differences from mmdet: 'mean'/'sum' of float16/bfloat16 logits are float32; the buffer stays
    float32 under ``model.half()`` (mmdet's would be cast); a label outside [0, C] is a ValueError
    (CPU tensors).

    Args:
        use_sigmoid: must be False (as mmdet asserts).
        p: mitigation exponent. Default 0.8.
        q: compensation exponent. Default 2.0.
        num_classes: C. Default 1203 (LVIS).
        eps: floor of the label's probability. Default 1e-2.
        reduction: 'none' | 'mean' | 'sum'. Default 'mean'.
        loss_weight: multiplies both losses. Default 1.0.
        return_dict: True (default, mmdet's): ``{'loss_cls_objectness', 'loss_cls_classes'}``;
            False: their sum.
        backend: not in mmdet's signature: as everywhere in fused_losses (None = automatic).
        process_group: not in mmdet's signature: the counts are all-reduced over this group
            (mmdet keeps per-rank counts). Default None.

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetSeesawLoss
        >>> criterion = MMDetSeesawLoss(num_classes=4)
        >>> cls_score = torch.randn(6, criterion.get_cls_channels(4), requires_grad=True)
        >>> labels = torch.tensor([0, 1, 4, 4, 2, 0])
        >>> losses = criterion(cls_score, labels, torch.ones(6), avg_factor=6.0)
        >>> sum(losses.values()).backward()
    """

    def __init__(self, use_sigmoid: bool = False, p: float = 0.8, q: float = 2.0, num_classes: int = 1203,
                 eps: float = 1e-2, reduction: str = "mean", loss_weight: float = 1.0, return_dict: bool = True,
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        if use_sigmoid:
            raise NotImplementedError("use_sigmoid: mmdet's SeesawLoss is a softmax loss (use_sigmoid=False)")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction: unknown reduction {reduction!r}; expected 'none', 'mean' or 'sum'")
        self.use_sigmoid, self.p, self.q, self.num_classes, self.eps = use_sigmoid, p, q, num_classes, eps
        self.reduction, self.loss_weight, self.return_dict = reduction, loss_weight, return_dict
        self.backend, self.process_group = backend, process_group
        self.custom_cls_channels = True
        self.custom_activation = True
        self.custom_accuracy = True
        self.register_buffer("cum_samples", torch.zeros(num_classes + 1, dtype=torch.float32))

    _float32_only = ("cum_samples",)

    def get_cls_channels(self, num_classes: int) -> int:
        """mmdet's: num_classes + 2 (the objectness pair)."""
        assert num_classes == self.num_classes
        return num_classes + 2

    def get_activation(self, cls_score: torch.Tensor) -> torch.Tensor:
        """mmdet's scores: softmax over the classes times the objectness foreground probability,
        then the background probability: (N, C + 1)."""
        classes, objectness = cls_score[..., :-2], cls_score[..., -2:]
        score_classes = torch.softmax(classes, dim=-1)
        score_objectness = torch.softmax(objectness, dim=-1)
        return torch.cat([score_classes * score_objectness[..., [0]], score_objectness[..., [1]]], dim=-1)

    def get_accuracy(self, cls_score: torch.Tensor, labels: torch.Tensor) -> dict:
        """mmdet's top-1 accuracies in percent: objectness over every row, classes over the
        foreground rows."""
        pos = labels < self.num_classes
        obj_labels = (labels == self.num_classes).long()
        classes, objectness = cls_score[..., :-2], cls_score[..., -2:]

        def accuracy(pred, target):
            if target.numel() == 0:
                return pred.new_tensor(0.0)
            return (pred.argmax(dim=-1) == target).float().sum() * (100.0 / target.numel())

        return {"acc_objectness": accuracy(objectness, obj_labels), "acc_classes": accuracy(classes[pos], labels[pos])}

    def forward(self, cls_score: torch.Tensor, labels: torch.Tensor, label_weights: Optional[torch.Tensor] = None,
                avg_factor=None, reduction_override: Optional[str] = None):
        """The loss of one batch (mmdet's SeesawLoss.forward; updates ``cum_samples`` first).

        Args:
            cls_score: (N, C + 2) logits.
            labels: (N,) labels in [0, C] (C = background).
            label_weights: (N,) row weights, or None.
            avg_factor: 'mean' only: each loss is sum / (avg_factor + float32 eps).
            reduction_override: None, 'none', 'mean' or 'sum'.

        Returns:
            mmdet's dict (return_dict=True) or the sum; 'none': classes (n_foreground,) and
            objectness (N,), as mmdet's.
        """
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override: expected None, 'none', 'mean' or 'sum', got {reduction_override!r}")
        reduction = reduction_override if reduction_override else self.reduction
        if avg_factor is not None and reduction == "none":
            avg_factor = None  # mmdet's weight_reduce_loss ignores it with 'none'
        if avg_factor is not None:
            if reduction == "sum":
                raise ValueError('avg_factor: can not be used with reduction="sum" (mmdet\'s weight_reduce_loss)')
            avg_factor = avg_factor + _MMDET_EPS
        if label_weights is not None:
            label_weights = label_weights.float()
        losses = _functional.seesaw(cls_score, labels, self.cum_samples, p=self.p, q=self.q, eps=self.eps,
                                    objectness=True, return_dict=True, weight=label_weights, avg_factor=avg_factor,
                                    reduction=reduction, backend=self.backend, process_group=self.process_group)
        classes, objectness = losses["loss_cls_classes"], losses["loss_cls_objectness"]
        if reduction == "none":
            classes = classes[labels < self.num_classes]  # mmdet's (n_foreground,) (a host sync on CUDA)
        if self.loss_weight != 1.0:
            classes, objectness = self.loss_weight * classes, self.loss_weight * objectness
        if self.return_dict:
            return {"loss_cls_objectness": objectness, "loss_cls_classes": classes}
        return classes + objectness

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes!r}, p={self.p!r}, q={self.q!r}, eps={self.eps!r}, "
                f"reduction={self.reduction!r}, loss_weight={self.loss_weight!r}, return_dict={self.return_dict!r}, "
                f"backend={self.backend!r}")


class MMDetEQLv2(_Float32Buffers):
    """The EQLv2 authors' ``EQLv2`` (tztztztztz/eqlv2, an mmdet 2.x fork), computed by the fused kernels.

    Same constructor and forward signature and the same three float32 buffers (``pos_grad``,
    ``neg_grad``, ``pos_neg`` starting at 100: state_dicts load both ways), same numbers:
    logits (N, C + 1), the last column the background logit; labels in [0, C];
    ``loss = loss_weight x sum(w BCE) / N`` with the weights from the statistics of the previous
    steps, then the statistics updated from this batch (the authors' collect_grad in forward).

    As in the authors' code, ``weight``, ``avg_factor`` and ``reduction_override`` are accepted
    and IGNORED, and ``reduction`` is not used ('mean' over the rows). Differences: the BCE is
    computed exactly (the authors' ``binary_cross_entropy_with_logits`` rounds log1p(e^-40) to 0);
    the authors all-reduce the statistics over the default group whenever torch.distributed is
    initialised: here only with ``process_group`` (e.g. ``torch.distributed.group.WORLD``), summed
    in rank order.

    Args:
        use_sigmoid: must be True.
        reduction: accepted, unused (the authors' too).
        class_weight: accepted, unused (the authors' too).
        loss_weight: multiplies the loss. Default 1.0.
        num_classes: C. Default 1203.
        gamma: Default 12.
        mu: Default 0.8.
        alpha: Default 4.0.
        vis_grad: accepted, unused (the authors' plotting switch).
        test_with_obj: get_activation multiplies the class scores by (1 - background score).
        backend: not in the authors' signature (None = automatic).
        process_group: not in the authors' signature; see above.

    Example:
        >>> import torch
        >>> from fused_losses.compat import MMDetEQLv2
        >>> criterion = MMDetEQLv2(num_classes=3)
        >>> cls_score = torch.randn(8, criterion.get_channel_num(3), requires_grad=True)
        >>> criterion(cls_score, torch.tensor([0, 1, 3, 3, 2, 3, 0, 3])).backward()
        >>> sorted(criterion.state_dict())
        ['neg_grad', 'pos_grad', 'pos_neg']
    """

    _float32_only = ("pos_grad", "neg_grad", "pos_neg")

    def __init__(self, use_sigmoid: bool = True, reduction: str = "mean", class_weight=None, loss_weight: float = 1.0,
                 num_classes: int = 1203, gamma: float = 12, mu: float = 0.8, alpha: float = 4.0,
                 vis_grad: bool = False, test_with_obj: bool = True, backend: Optional[str] = None,
                 process_group=None):
        super().__init__()
        if not use_sigmoid:
            raise NotImplementedError("use_sigmoid: the authors' EQLv2 is a sigmoid loss (use_sigmoid=True)")
        self.use_sigmoid, self.reduction, self.class_weight = True, reduction, class_weight
        self.loss_weight, self.num_classes = loss_weight, num_classes
        self.gamma, self.mu, self.alpha = gamma, mu, alpha
        self.vis_grad, self.test_with_obj = vis_grad, test_with_obj
        self.backend, self.process_group = backend, process_group
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=torch.float32))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=torch.float32))
        self.register_buffer("pos_neg", torch.ones(num_classes, dtype=torch.float32) * 100)

    def get_channel_num(self, num_classes: int) -> int:
        """The authors': num_classes + 1 (the background logit)."""
        return num_classes + 1

    def get_activation(self, cls_score: torch.Tensor) -> torch.Tensor:
        """The authors' test-time scores: sigmoid, the class scores times (1 - background score)
        when test_with_obj (a new tensor; the authors write in place)."""
        score = torch.sigmoid(cls_score)
        if not self.test_with_obj:
            return score
        bg = score[:, -1:]
        return torch.cat([score[:, :-1] * (1 - bg), bg], dim=1)

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight=None, avg_factor=None,
                reduction_override=None, **kwargs) -> torch.Tensor:
        """The loss of one batch (then updates the three buffers); weight, avg_factor and
        reduction_override are ignored, as the authors' forward ignores them.

        Args:
            cls_score: (N, C + 1) logits.
            label: (N,) labels in [0, C] (C = background).
            weight: ignored.
            avg_factor: ignored.
            reduction_override: ignored.
            **kwargs: ignored.

        Returns:
            A 0-dim tensor.
        """
        state = torch.stack([self.pos_grad, self.neg_grad, self.pos_neg])
        loss = _functional.eqlv2(cls_score, label, state, gamma=self.gamma, mu=self.mu, alpha=self.alpha,
                                 objectness=True, reduction="mean", backend=self.backend,
                                 process_group=self.process_group)
        with torch.no_grad():
            self.pos_grad.copy_(state[0])
            self.neg_grad.copy_(state[1])
            self.pos_neg.copy_(state[2])
        return loss if self.loss_weight == 1.0 else self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes!r}, gamma={self.gamma!r}, mu={self.mu!r}, alpha={self.alpha!r}, "
                f"loss_weight={self.loss_weight!r}, backend={self.backend!r}")
