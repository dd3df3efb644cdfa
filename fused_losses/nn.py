"""nn.Module wrappers of the functional API (same defaults as the functions).

Per-class tensors (alpha, weight) are registered as buffers, so ``module.to(device)`` moves
them once instead of copying a Python list to the device on every call.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from fused_losses import functional as F
from fused_losses._validate import _real

__all__ = ["FocalLoss", "SigmoidFocalLoss", "OHEMLoss", "GHMCLoss", "IBLoss", "IBFocalLoss"]


def _class_buffer(module: nn.Module, name: str, value):
    """A per-class sequence/tensor becomes a float32 buffer; None or a float stays an attribute."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        setattr(module, name, value)
    else:
        module.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).detach().clone())


class FocalLoss(nn.Module):
    """Softmax focal loss module; see :func:`fused_losses.focal`."""

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100, reduction: str = "mean",
                 from_logits: bool = True, backend: Optional[str] = None):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction = gamma, ignore_index, reduction
        self.from_logits, self.backend = from_logits, backend
        _class_buffer(self, "alpha", alpha)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.focal(logits, target, gamma=self.gamma, alpha=self.alpha, ignore_index=self.ignore_index,
                       reduction=self.reduction, from_logits=self.from_logits, backend=self.backend)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SigmoidFocalLoss(nn.Module):
    """Sigmoid focal loss module; see :func:`fused_losses.sigmoid_focal` (reduction 'none' by default,
    like torchvision)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, ignore_index: int = -100, reduction: str = "none",
                 backend: Optional[str] = None):
        super().__init__()
        self.alpha, self.gamma, self.ignore_index = alpha, gamma, ignore_index
        self.reduction, self.backend = reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.sigmoid_focal(logits, target, alpha=self.alpha, gamma=self.gamma, ignore_index=self.ignore_index,
                               reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class OHEMLoss(nn.Module):
    """Online hard example mining cross entropy; see :func:`fused_losses.ohem`."""

    def __init__(self, keep: Union[float, int] = 0.25, thresh: Optional[float] = None, min_kept: Optional[int] = None,
                 ignore_index: int = -100, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        self.keep, self.thresh, self.min_kept = keep, thresh, min_kept
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.ohem(logits, target, keep=self.keep, thresh=self.thresh, min_kept=self.min_kept,
                      ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, thresh={self.thresh}, min_kept={self.min_kept}, reduction={self.reduction!r}"


class GHMCLoss(nn.Module):
    """GHM-C loss that owns the EMA of bin counts (buffer ``acc_sum``, float32 (bins,), starts at
    zeros, updated in place on every call when momentum > 0, like mmdet's GHMC); see
    :func:`fused_losses.ghmc`."""

    def __init__(self, bins: int = 10, momentum: float = 0.75, use_sigmoid: bool = True, ignore_index: int = -100,
                 reduction: str = "mean", backend: Optional[str] = None):
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"bins: must be an int >= 1, got {bins!r}")
        self.bins = bins
        self.momentum = _real("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
        self.use_sigmoid, self.ignore_index, self.reduction, self.backend = use_sigmoid, ignore_index, reduction, backend
        self.register_buffer("acc_sum", torch.zeros(bins, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.ghmc(logits, target, bins=self.bins, momentum=self.momentum,
                      state=self.acc_sum if self.momentum > 0 else None, use_sigmoid=self.use_sigmoid,
                      ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, use_sigmoid={self.use_sigmoid}"


class IBLoss(nn.Module):
    """Influence-balanced loss; forward(logits, target, features); see :func:`fused_losses.ib`."""

    def __init__(self, alpha: float = 1000.0, epsilon: float = 1e-3, weight=None, detach_factor: bool = False,
                 reduction: str = "mean", backend: Optional[str] = None, gamma: float = 0.0):
        super().__init__()
        self.alpha, self.epsilon, self.gamma = alpha, epsilon, gamma
        self.detach_factor, self.reduction, self.backend = detach_factor, reduction, backend
        _class_buffer(self, "weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return F.ib(logits, target, features, alpha=self.alpha, epsilon=self.epsilon, weight=self.weight,
                    gamma=self.gamma, detach_factor=self.detach_factor, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, epsilon={self.epsilon}, gamma={self.gamma}, detach_factor={self.detach_factor}"


class IBFocalLoss(IBLoss):
    """IB-focal loss: IBLoss with the focal term (1 - exp(-CE_w))^gamma; gamma defaults to 1.0."""

    def __init__(self, alpha: float = 1000.0, epsilon: float = 1e-3, weight=None, gamma: float = 1.0,
                 detach_factor: bool = False, reduction: str = "mean", backend: Optional[str] = None):
        super().__init__(alpha=alpha, epsilon=epsilon, weight=weight, detach_factor=detach_factor,
                         reduction=reduction, backend=backend, gamma=gamma)
