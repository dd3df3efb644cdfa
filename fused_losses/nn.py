"""nn.Module wrappers of the functional API (same defaults as the functions).

Per-call data goes to forward: ``loss(logits, target, weight=None, avg_factor=None)`` (sample
weights and the 'mean' denominator change with every batch); per-loss settings go to the
constructor (label_smoothing, per-class alpha, GHM-C's process_group).

Per-class tensors (alpha, weight) and GHM-C's EMA state are registered as float32 buffers, so
``module.to(device)`` moves them once instead of copying a Python list to the device on every
call. Dtype casts of the model that owns them never round them: ``model.half()`` and
``.to(torch.bfloat16)`` leave them float32 (the losses compute in float32 whatever the logits
dtype), ``model.double()`` makes alpha/weight float64 (exact); GHM-C's state stays float32
under every cast. Device moves always apply.

Example:
    >>> import torch
    >>> import fused_losses as fl
    >>> criterion = fl.nn.FocalLoss(gamma=2.0, alpha=[1.0, 2.0, 0.5])
    >>> logits = torch.randn(4, 3, requires_grad=True)
    >>> criterion(logits, torch.tensor([0, 2, 1, 0])).backward()
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fused_losses import functional as F
from fused_losses._validate import _real

__all__ = ["FocalLoss", "SigmoidFocalLoss", "OHEMLoss", "GHMCLoss", "IBLoss", "IBFocalLoss"]
__all__ += ["DistributionFocalLoss"]  # distribution focal (#24)


def _class_buffer(module: nn.Module, name: str, value):
    """A per-class sequence/tensor becomes a float32 buffer; None or a float stays an attribute."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        setattr(module, name, value)
    else:
        module.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).detach().clone())


def _repr_value(value) -> str:
    """A constructor argument as extra_repr shows it: per-class buffers as their values (the
    first 8 and the count beyond that), everything else as repr()."""
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta":
            return f"<{value.numel()} values on meta>"
        values = [round(v, 6) for v in value.detach().cpu().double().flatten().tolist()[:8]]
        more = f", ... ({value.numel()} values)" if value.numel() > 8 else ""
        return f"[{', '.join(repr(v) for v in values)}{more}]"
    return repr(value)


def _extra_repr(module: nn.Module, names) -> str:
    return ", ".join(f"{name}={_repr_value(getattr(module, name))}" for name in names)


class _Float32Buffers(nn.Module):
    """Buffers that dtype casts of the owning model must not round (``Module._apply`` runs the
    cast on each buffer): a cast to a lower precision (``.half()``, ``.to(torch.bfloat16)``)
    leaves a floating buffer's values as they were, moved to the cast's device; a cast to
    float64 is followed (exact). Names in ``_float32_only`` (GHM-C's EMA state) stay float32
    under every cast."""

    _float32_only: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: buf for name, buf in self._buffers.items() if buf is not None and buf.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is None or new.dtype == old.dtype:
                continue
            lower = torch.finfo(new.dtype).eps > torch.finfo(old.dtype).eps if new.is_floating_point() else True
            if lower or name in self._float32_only:
                self._buffers[name] = old.to(device=new.device)
        return self


class FocalLoss(_Float32Buffers):
    """Softmax focal loss, ``loss_i = -alpha_{t_i} (1 - p_{t_i})^gamma log p_{t_i}``; see
    :func:`fused_losses.focal`.

    Args:
        gamma: focusing parameter >= 0 (0 with alpha=None is cross entropy). Default 2.0.
        alpha: None, one float, or C per-class factors (a float32 buffer ``alpha``; a model
            cast to half/bf16 leaves it float32, one to float64 makes it float64).
        ignore_index: target value with no loss, gradient or count. Default -100.
        reduction: 'none' | 'mean' (over non-ignored samples) | 'sum'. Default 'mean'.
        from_logits: False when the input already holds probabilities.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        label_smoothing: eps in [0, 1] (F.cross_entropy's meaning at gamma=0). Default 0.0.
        epsilon: Poly-1's epsilon: adds epsilon (1 - p_t)^(gamma + 1) per sample (Poly-1 cross
            entropy at gamma=0). Default 0.0 (the plain loss).

    Example:
        >>> import torch
        >>> from fused_losses.nn import FocalLoss
        >>> criterion = FocalLoss(gamma=2.0, ignore_index=255)
        >>> logits = torch.randn(2, 4, 8, 8, requires_grad=True)      # (N, C, H, W)
        >>> target = torch.randint(0, 4, (2, 8, 8))
        >>> criterion(logits, target).backward()
    """

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100, reduction: str = "mean",
                 from_logits: bool = True, backend: Optional[str] = None, label_smoothing: float = 0.0,
                 epsilon: float = 0.0):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        self.from_logits, self.backend, self.label_smoothing = from_logits, backend, label_smoothing
        self.epsilon = epsilon  # Poly-1 (#24)
        _class_buffer(self, "alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.focal`.

        Args:
            logits: (N, C) or channel-second (N, C, d1, ...) float tensor.
            target: (N,) or (N, d1, ...) int64/int32 class indices, or ignore_index.
            weight: per-sample weights broadcastable to the target's shape (a zero weight gives
                exactly 0), or None.
            avg_factor: with reduction='mean' only: the sum is divided by it (a number or a 0-dim
                tensor on the logits' device), or None.

        Returns:
            The loss: the target's shape for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.focal`.
        """
        return F.focal(logits, target, gamma=self.gamma, alpha=self.alpha, ignore_index=self.ignore_index,
                       reduction=self.reduction, from_logits=self.from_logits, backend=self.backend, weight=weight,
                       avg_factor=avg_factor, label_smoothing=self.label_smoothing, epsilon=self.epsilon)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("gamma", "alpha", "ignore_index", "reduction", "from_logits", "backend",
                                  "label_smoothing", "epsilon"))


class SigmoidFocalLoss(_Float32Buffers):
    """Sigmoid focal loss (torchvision's formula, elementwise); see :func:`fused_losses.sigmoid_focal`.

    Args:
        alpha: weight of positives (negatives get 1 - alpha); < 0 disables it. Default 0.25.
            Or C per-class alphas in [0, 1] (a float32 buffer ``alpha``, like FocalLoss's).
        gamma: focusing parameter >= 0. Default 2.0.
        ignore_index: integer label of rows to ignore. Default -100.
        reduction: 'none' (default, like torchvision) | 'mean' | 'sum'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        epsilon: Poly-1's epsilon: adds epsilon (1 - p_t)^(gamma + 1) per element (Poly-1
            focal). Default 0.0 (the plain loss).

    Example:
        >>> import torch
        >>> from fused_losses.nn import SigmoidFocalLoss
        >>> criterion = SigmoidFocalLoss(reduction="mean")
        >>> logits = torch.randn(6, 4, requires_grad=True)
        >>> labels = torch.tensor([0, 4, 4, 2, 4, 1])                 # 4 = background
        >>> criterion(logits, labels, avg_factor=3.0).backward()
    """

    def __init__(self, alpha=0.25, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "none",
                 backend: Optional[str] = None, epsilon: float = 0.0):
        super().__init__()
        self.gamma, self.ignore_index = gamma, ignore_index
        self.reduction, self.backend = reduction, backend
        self.epsilon = epsilon  # Poly-1 (#24)
        _class_buffer(self, "alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.sigmoid_focal`.

        Args:
            logits: (..., C) float tensor.
            target: a float tensor of the logits' shape, or integer labels of shape
                ``logits.shape[:-1]`` (label == C is background, ignore_index ignores the row).
            weight: per row (``logits.shape[:-1]``), per element (``logits.shape``), or anything
                broadcastable to the logits' shape; or None.
            avg_factor: with reduction='mean' only (e.g. num_pos), or None.

        Returns:
            The loss: the logits' shape for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.sigmoid_focal`.
        """
        return F.sigmoid_focal(logits, target, alpha=self.alpha, gamma=self.gamma, ignore_index=self.ignore_index,
                               reduction=self.reduction, backend=self.backend, weight=weight, avg_factor=avg_factor,
                               epsilon=self.epsilon)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("alpha", "gamma", "ignore_index", "reduction", "backend", "epsilon"))


class OHEMLoss(nn.Module):
    """Online hard example mining cross entropy; see :func:`fused_losses.ohem`.

    Args:
        keep: float in (0, 1] (fraction of valid samples) or int >= 1 (count). Default 0.25.
        thresh: mmseg OHEMPixelSampler mode: keep samples with p_t below this (keep ignored).
        min_kept: with thresh, samples kept at least, per image (x N for (N, C, d...) inputs).
        ignore_index: target value to ignore. Default -100.
        reduction: 'none' | 'mean' (over kept samples) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        label_smoothing: eps in [0, 1] for the kept samples' cross entropy (the selection ranks
            the unsmoothed one). Default 0.0.

    Example:
        >>> import torch
        >>> from fused_losses.nn import OHEMLoss
        >>> criterion = OHEMLoss(thresh=0.7, min_kept=32, ignore_index=255)
        >>> logits = torch.randn(2, 5, 8, 8, requires_grad=True)
        >>> criterion(logits, torch.randint(0, 5, (2, 8, 8))).backward()
    """

    def __init__(self, keep: Union[float, int] = 0.25, thresh: Optional[float] = None, min_kept: Optional[int] = None,
                 ignore_index: int = -100, reduction: str = "mean", backend: Optional[str] = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.keep, self.thresh, self.min_kept = keep, thresh, min_kept
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.ohem`.

        Args:
            logits: (N, C) or channel-second (N, C, d1, ...) float tensor.
            target: (N,) or (N, d1, ...) int64/int32 class indices, or ignore_index.
            weight: per-sample weights broadcastable to the target's shape (a zero weight gives
                exactly 0), or None.
            avg_factor: with reduction='mean' only: the sum is divided by it (a number or a 0-dim
                tensor on the logits' device), or None.

        Returns:
            The loss: the target's shape for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.ohem`.
        """
        return F.ohem(logits, target, keep=self.keep, thresh=self.thresh, min_kept=self.min_kept,
                      ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend, weight=weight,
                      avg_factor=avg_factor, label_smoothing=self.label_smoothing)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("keep", "thresh", "min_kept", "ignore_index", "reduction", "backend",
                                  "label_smoothing"))


class GHMCLoss(_Float32Buffers):
    """GHM-C loss that owns the EMA of bin counts; see :func:`fused_losses.ghmc`.

    The buffer ``acc_sum`` (float32 (bins,), starts at zeros) is updated in place on every call
    when momentum > 0, in train and eval mode, like mmdet's GHMC. It stays float32 when the
    model is cast (``model.half()``, ``.double()``, ``.to(torch.bfloat16)``); ``.to(device)``
    moves it.

    Args:
        bins: number of gradient-norm bins >= 1. Default 10.
        momentum: EMA momentum in [0, 1); 0 uses this batch's counts only. Default 0.75.
        use_sigmoid: True (default, mmdet's detection variant): C independent sigmoids; integer
            labels in [0, C] with label == C = BACKGROUND, or float targets of the logits' shape.
            False: softmax over C with class indices in [0, C) -- what a classifier wants. With
            the default and labels that never contain C, a UserWarning says so (CPU targets).
        ignore_index: target value to ignore. Default -100.
        reduction: 'none' | 'mean' (over valid entries) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        label_smoothing: eps in [0, 1], use_sigmoid=False only. Default 0.0.
        process_group: a torch.distributed group whose ranks share one histogram: the bin
            counts are all-reduced before the weights and the EMA update, so ``acc_sum`` stays
            identical on every rank. Default None (this rank's batch only).

    Raises:
        ValueError: bins not an int >= 1, momentum outside [0, 1).

    Example:
        >>> import torch
        >>> from fused_losses.nn import GHMCLoss
        >>> criterion = GHMCLoss(bins=10, momentum=0.75, use_sigmoid=False)   # a classifier
        >>> logits = torch.randn(16, 5, requires_grad=True)
        >>> criterion(logits, torch.randint(0, 5, (16,))).backward()
        >>> float(criterion.acc_sum.sum())                                    # 0.25 x 16 samples
        4.0
    """

    _float32_only = ("acc_sum",)

    def __init__(self, bins: int = 10, momentum: float = 0.75, use_sigmoid: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None, label_smoothing: float = 0.0,
                 process_group=None):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= 2 ** 63 - 1:
            raise ValueError(f"bins: must be an int >= 1 that fits in int64, got {bins!r}")
        self.bins = bins
        self.momentum = _real("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        self.use_sigmoid, self.ignore_index, self.reduction, self.backend = use_sigmoid, ignore_index, reduction, backend
        self.label_smoothing, self.process_group = label_smoothing, process_group
        self.register_buffer("acc_sum", torch.zeros(bins, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch (updates ``acc_sum`` when momentum > 0); see :func:`fused_losses.ghmc`.

        Args:
            logits: use_sigmoid=True: (..., C); use_sigmoid=False: (N, C) or (N, C, d1, ...).
            target: use_sigmoid=True: float targets of the logits' shape or integer labels with
                C = background; use_sigmoid=False: class indices.
            weight: as :func:`fused_losses.ghmc`: a zero weight drops the entry (mmdet's
                label_weight mask); or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss: the per-entry loss for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.ghmc`.
        """
        return F.ghmc(logits, target, bins=self.bins, momentum=self.momentum,
                      state=self.acc_sum if self.momentum > 0 else None, use_sigmoid=self.use_sigmoid,
                      ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend, weight=weight,
                      avg_factor=avg_factor, label_smoothing=self.label_smoothing, process_group=self.process_group)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("bins", "momentum", "use_sigmoid", "ignore_index", "reduction", "backend",
                                  "label_smoothing", "process_group"))


class IBLoss(_Float32Buffers):
    """Influence-balanced loss (Park et al. 2021); see :func:`fused_losses.ib`.

    Args:
        alpha: numerator of the influence factor. Default 1000.0.
        epsilon: > 0, added to the denominator. Default 1e-3.
        weight: None or C per-class weights of the cross entropy (a float32 buffer ``weight``).
        detach_factor: True stops the gradient through the factor. Default False.
        reduction: 'none' | 'mean' (divides by N) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        gamma: IB-focal exponent >= 0 (0: plain IB). Default 0.0.

    Example:
        >>> import torch
        >>> from fused_losses.nn import IBLoss
        >>> criterion = IBLoss(alpha=1000.0)
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> features = torch.randn(8, 16, requires_grad=True)   # penultimate activations
        >>> criterion(logits, torch.randint(0, 3, (8,)), features).backward()
    """

    def __init__(self, alpha: float = 1000.0, epsilon: float = 1e-3, weight=None, detach_factor: bool = False,
                 reduction: str = "mean", backend: Optional[str] = None, gamma: float = 0.0):
        super().__init__()
        self.alpha, self.epsilon, self.gamma = alpha, epsilon, gamma
        self.detach_factor, self.reduction, self.backend = detach_factor, reduction, backend
        _class_buffer(self, "weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.ib`.

        Args:
            logits: (N, C) float tensor.
            target: (N,) int64/int32 class indices (no ignore_index).
            features: (N,) or (N, 1) feature norms, or (N, D) features reduced to sum |f|.

        Returns:
            The loss: (N,) for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.ib`.
        """
        return F.ib(logits, target, features, alpha=self.alpha, epsilon=self.epsilon, weight=self.weight,
                    gamma=self.gamma, detach_factor=self.detach_factor, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("alpha", "epsilon", "weight", "gamma", "detach_factor", "reduction", "backend"))


class IBFocalLoss(IBLoss):
    """IB-focal loss: :class:`IBLoss` with the focal term (1 - exp(-CE_w))^gamma; see
    :func:`fused_losses.ib`.

    Args:
        alpha: numerator of the influence factor. Default 1000.0.
        epsilon: > 0, added to the denominator. Default 1e-3.
        weight: None or C per-class weights of the cross entropy.
        gamma: focal exponent >= 0. Default 1.0.
        detach_factor: True stops the gradient through the factor. Default False.
        reduction: 'none' | 'mean' (divides by N) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.nn import IBFocalLoss
        >>> criterion = IBFocalLoss(gamma=1.0)
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> criterion(logits, torch.randint(0, 3, (8,)), torch.rand(8)).backward()
    """

    def __init__(self, alpha: float = 1000.0, epsilon: float = 1e-3, weight=None, gamma: float = 1.0,
                 detach_factor: bool = False, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(alpha=alpha, epsilon=epsilon, weight=weight, detach_factor=detach_factor,
                         reduction=reduction, backend=backend, gamma=gamma)


# ---- distribution focal (#24) ----
class DistributionFocalLoss(nn.Module):
    """Distribution focal loss (GFL) over rows of n + 1 bin logits; see
    :func:`fused_losses.distribution_focal`.

    Args:
        reduction: 'none' | 'mean' (over rows) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.nn import DistributionFocalLoss
        >>> criterion = DistributionFocalLoss()
        >>> pred = torch.randn(32, 17, requires_grad=True)          # 8 boxes x 4 sides, 17 bins
        >>> target = torch.rand(32) * 16
        >>> criterion(pred, target, weight=torch.rand(32), avg_factor=4.0).backward()
    """

    def __init__(self, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.distribution_focal`.

        Args:
            logits: (..., n + 1) float tensor of bin logits.
            target: float labels in [0, n] of shape ``logits.shape[:-1]``.
            weight: per-row weights broadcastable to the target's shape, or None.
            avg_factor: with reduction='mean' only (a number or a 0-dim tensor), or None.

        Returns:
            The loss: the target's shape for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.distribution_focal`.
        """
        return F.distribution_focal(logits, target, weight=weight, avg_factor=avg_factor, reduction=self.reduction,
                                    backend=self.backend)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("reduction", "backend"))


# ---- quality_focal / varifocal / asymmetric (#24) ----
__all__ += ["QualityFocalLoss", "VarifocalLoss", "AsymmetricLoss"]


class QualityFocalLoss(nn.Module):
    """Quality focal loss (GFL); see :func:`fused_losses.quality_focal`.

    Args:
        beta: exponent of ``|y - s|`` (>= 0). Default 2.0.
        activated: the logits are probabilities. Default False.
        ignore_index: label of rows to ignore (label form). Default -100.
        reduction: 'none' (per row) | 'mean' (default) | 'sum'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.nn import QualityFocalLoss
        >>> criterion = QualityFocalLoss()
        >>> logits = torch.randn(6, 4, requires_grad=True)
        >>> labels, iou = torch.tensor([0, 4, 4, 2, 4, 1]), torch.rand(6)   # 4 = background
        >>> criterion(logits, labels, score=iou, avg_factor=3.0).backward()
    """

    def __init__(self, beta: float = 2.0, activated: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__()
        self.beta, self.activated, self.ignore_index = beta, activated, ignore_index
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor, score: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None, avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.quality_focal`.

        Args:
            logits: (..., C) float tensor.
            target: integer labels of shape ``logits.shape[:-1]`` (C = background) with ``score``,
                or a dense soft target of the logits' shape.
            score: the quality at the label's class (label form), or None.
            weight: per row or per element, or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss: per row for 'none', else a 0-dim tensor.
        """
        return F.quality_focal(logits, target, score=score, beta=self.beta, activated=self.activated,
                               ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                               weight=weight, avg_factor=avg_factor)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("beta", "activated", "ignore_index", "reduction", "backend"))


class VarifocalLoss(nn.Module):
    """Varifocal loss (VarifocalNet); see :func:`fused_losses.varifocal`.

    Args:
        alpha: weight of the negatives. Default 0.75.
        gamma: exponent of the negatives' s^gamma. Default 2.0.
        iou_weighted: positives weighted by their target. Default True.
        detach_modulation: no gradient through alpha * s^gamma (RT-DETR). Default False (mmdet,
            ultralytics).
        ignore_index: label of rows to ignore (label form). Default -100.
        reduction: 'none' (elementwise) | 'mean' (default) | 'sum'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.nn import VarifocalLoss
        >>> criterion = VarifocalLoss(detach_modulation=True)             # RT-DETR's
        >>> logits = torch.randn(2, 5, 3, requires_grad=True)             # (B, Q, C)
        >>> labels, iou = torch.tensor([[0, 3, 3, 1, 3], [2, 3, 3, 3, 3]]), torch.rand(2, 5)
        >>> criterion(logits, labels, score=iou, avg_factor=3.0).backward()
    """

    def __init__(self, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True,
                 detach_modulation: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 backend: Optional[str] = None):
        super().__init__()
        self.alpha, self.gamma, self.iou_weighted = alpha, gamma, iou_weighted
        self.detach_modulation, self.ignore_index = detach_modulation, ignore_index
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor, score: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None, avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.varifocal`.

        Args:
            logits: (..., C) float tensor.
            target: a dense float target of the logits' shape, or integer labels with ``score``.
            score: the IoU at the label's class (label form), or None.
            weight: per row or per element, or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss: the logits' shape for 'none', else a 0-dim tensor.
        """
        return F.varifocal(logits, target, score=score, alpha=self.alpha, gamma=self.gamma,
                           iou_weighted=self.iou_weighted, detach_modulation=self.detach_modulation,
                           ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                           weight=weight, avg_factor=avg_factor)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("alpha", "gamma", "iou_weighted", "detach_modulation", "ignore_index", "reduction",
                                  "backend"))


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (ASL) for multi-label classification; see :func:`fused_losses.asymmetric`.

    Args:
        gamma_pos: focusing exponent of the positives. Default 1.0.
        gamma_neg: focusing exponent of the negatives. Default 4.0.
        clip: probability shift of the negatives (None or 0: none). Default 0.05.
        eps: clamp of the probabilities inside the logs. Default 1e-8.
        detach_focusing: no gradient through the focusing weight (timm's
            ``disable_torch_grad_focal_loss``). Default False.
        reduction: 'sum' (default, timm's ``-loss.sum()``) | 'mean' | 'none'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.

    Example:
        >>> import torch
        >>> from fused_losses.nn import AsymmetricLoss
        >>> criterion = AsymmetricLoss()
        >>> logits = torch.randn(4, 10, requires_grad=True)
        >>> criterion(logits, (torch.rand(4, 10) < 0.2).float()).backward()
    """

    def __init__(self, gamma_pos: float = 1.0, gamma_neg: float = 4.0, clip: Optional[float] = 0.05,
                 eps: float = 1e-8, detach_focusing: bool = False, reduction: str = "sum",
                 backend: Optional[str] = None):
        super().__init__()
        self.gamma_pos, self.gamma_neg, self.clip, self.eps = gamma_pos, gamma_neg, clip, eps
        self.detach_focusing, self.reduction, self.backend = detach_focusing, reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch; see :func:`fused_losses.asymmetric`.

        Args:
            logits: (..., C) float tensor.
            target: multi-hot or soft float target of the logits' shape.
            weight: per row or per element, or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss: the logits' shape for 'none', else a 0-dim tensor.
        """
        return F.asymmetric(logits, target, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg, clip=self.clip,
                            eps=self.eps, detach_focusing=self.detach_focusing, reduction=self.reduction,
                            backend=self.backend, weight=weight, avg_factor=avg_factor)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("gamma_pos", "gamma_neg", "clip", "eps", "detach_focusing", "reduction", "backend"))


# ---- seesaw / eqlv2 (#25) ----
__all__ += ["SeesawLoss", "EQLv2Loss"]


class SeesawLoss(_Float32Buffers):
    """Seesaw loss that owns the cumulative label counts; see :func:`fused_losses.seesaw`.

    The buffer ``cum_samples`` (float32, (num_classes,), or (num_classes + 1,) with objectness,
    starts at zeros) is updated in place on every call, in train and eval mode, like mmdet's
    SeesawLoss. It stays float32 when the model is cast (``model.half()``, ``.double()``,
    ``.to(torch.bfloat16)``), is saved in ``state_dict`` and copied by ``deepcopy``;
    ``.to(device)`` moves it.

    Args:
        num_classes: C, the number of classes (without background).
        p: mitigation exponent >= 0. Default 0.8.
        q: compensation exponent >= 0. Default 2.0.
        eps: floor of the label's probability in the compensation. Default 1e-2.
        objectness: mmdet's (N, C + 2) layout with an objectness pair, labels in [0, C] (C =
            background). Default False: (N, C) logits, labels in [0, C).
        return_dict: True: mmdet's dict of losses; False (default): one tensor.
        ignore_index: target value to ignore. Default -100.
        reduction: 'none' | 'mean' | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        process_group: a torch.distributed group whose ranks share the counts (all-reduced before
            they are added: ``cum_samples`` stays identical on every rank). Default None.

    Example:
        >>> import torch
        >>> from fused_losses.nn import SeesawLoss
        >>> criterion = SeesawLoss(num_classes=5)
        >>> logits = torch.randn(8, 5, requires_grad=True)
        >>> criterion(logits, torch.tensor([0, 1, 1, 2, 4, 4, 4, 3])).backward()
        >>> criterion.cum_samples
        tensor([1., 2., 1., 1., 3.])
    """

    _float32_only = ("cum_samples",)

    def __init__(self, num_classes: int, p: float = 0.8, q: float = 2.0, eps: float = 1e-2, objectness: bool = False,
                 return_dict: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.p, self.q, self.eps = num_classes, p, q, eps
        self.objectness, self.return_dict, self.ignore_index = objectness, return_dict, ignore_index
        self.reduction, self.backend, self.process_group = reduction, backend, process_group
        self.register_buffer("cum_samples", torch.zeros(num_classes + (1 if objectness else 0), dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None):
        """The loss of one batch (updates ``cum_samples`` first); see :func:`fused_losses.seesaw`.

        Args:
            logits: (N, C), or (N, C + 2) with objectness.
            target: (N,) labels (C = background with objectness) or ignore_index.
            weight: (N,) per-row weights, or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss, or mmdet's dict with return_dict=True.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.seesaw`.
        """
        return F.seesaw(logits, target, self.cum_samples, p=self.p, q=self.q, eps=self.eps,
                        objectness=self.objectness, return_dict=self.return_dict, ignore_index=self.ignore_index,
                        weight=weight, avg_factor=avg_factor, reduction=self.reduction, backend=self.backend,
                        process_group=self.process_group)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("num_classes", "p", "q", "eps", "objectness", "return_dict", "ignore_index",
                                  "reduction", "backend", "process_group"))


class EQLv2Loss(_Float32Buffers):
    """EQLv2 loss that owns its gradient statistics; see :func:`fused_losses.eqlv2`.

    The buffer ``state`` (float32 (3, num_classes) = [pos_grad, neg_grad, pos_neg], starting at
    [0, 0, 100], the authors' start: every weight 1 at the first step) is updated in place on
    every call after the loss is formed (the authors' order). It stays float32 under model casts,
    is saved in ``state_dict`` and copied by ``deepcopy``; ``.to(device)`` moves it. Note: a call
    on a batch whose rows are all ignored still recomputes pos_neg (= pos / (neg + 1e-10)), as the
    authors' module does on an empty batch: from the initial state that turns 100 into 0.

    Args:
        num_classes: C, the number of classes (without background).
        gamma: slope of the weight function. Default 12.0.
        mu: its centre. Default 0.8.
        alpha: the positive weight's extra factor. Default 4.0.
        objectness: the authors' (..., C + 1) layout (a background logit last). Default False.
        ignore_index: target value to ignore. Default -100.
        reduction: 'none' | 'mean' (over non-ignored rows) | 'sum'. Default 'mean'.
        backend: None (automatic), 'cuda', 'triton', 'cpu' or 'reference'.
        process_group: a torch.distributed group whose ranks share the statistics (gathered and
            added in rank order: ``state`` stays identical on every rank). Default None.

    Example:
        >>> import torch
        >>> from fused_losses.nn import EQLv2Loss
        >>> criterion = EQLv2Loss(num_classes=3)
        >>> logits = torch.randn(8, 3, requires_grad=True)
        >>> criterion(logits, torch.tensor([0, 1, 3, 3, 2, 3, 0, 3])).backward()
        >>> criterion.state.shape, criterion.state.dtype
        (torch.Size([3, 3]), torch.float32)
    """

    _float32_only = ("state",)

    def __init__(self, num_classes: int, gamma: float = 12.0, mu: float = 0.8, alpha: float = 4.0,
                 objectness: bool = False, ignore_index: int = -100, reduction: str = "mean",
                 backend: Optional[str] = None, process_group=None):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: must be an int >= 1, got {num_classes!r}")
        from fused_losses.reference import eqlv2_initial_state  # noqa: PLC0415
        self.num_classes, self.gamma, self.mu, self.alpha = num_classes, gamma, mu, alpha
        self.objectness, self.ignore_index, self.reduction = objectness, ignore_index, reduction
        self.backend, self.process_group = backend, process_group
        self.register_buffer("state", eqlv2_initial_state(num_classes))

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor=None) -> torch.Tensor:
        """The loss of one batch (then updates ``state``); see :func:`fused_losses.eqlv2`.

        Args:
            logits: (..., C), or (..., C + 1) with objectness.
            target: labels of shape logits.shape[:-1] (C = background) or ignore_index.
            weight: per row or per element, or None.
            avg_factor: with reduction='mean' only, or None.

        Returns:
            The loss: the logits' shape for 'none', else a 0-dim tensor.

        Raises:
            TypeError, ValueError, RuntimeError: as :func:`fused_losses.eqlv2`.
        """
        return F.eqlv2(logits, target, self.state, gamma=self.gamma, mu=self.mu, alpha=self.alpha,
                       objectness=self.objectness, ignore_index=self.ignore_index, weight=weight,
                       avg_factor=avg_factor, reduction=self.reduction, backend=self.backend,
                       process_group=self.process_group)

    def extra_repr(self) -> str:
        return _extra_repr(self, ("num_classes", "gamma", "mu", "alpha", "objectness", "ignore_index", "reduction",
                                  "backend", "process_group"))
