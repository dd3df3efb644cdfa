"""Adapters with other libraries' exact signatures, so existing training code calls the fused kernels.

    from fused_losses.compat import sigmoid_focal_loss      # torchvision.ops.sigmoid_focal_loss's signature
    from fused_losses.compat import patch_torchvision

    with patch_torchvision():            # torchvision's RetinaNet head uses the fused loss inside the block
        losses = model(images, targets)

Nothing here imports torchvision at import time; patch_torchvision() imports it when called.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, Optional

import torch

from fused_losses import functional as _functional

__all__ = ["sigmoid_focal_loss", "patch_torchvision", "TorchvisionPatch"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """torchvision.ops.sigmoid_focal_loss, computed by the fused kernels (fused_losses.sigmoid_focal).

    Same signature (positional arguments included), same contract and same numbers:

        loss = alpha_t * (1 - p_t)^gamma * BCE-with-logits(inputs, targets), elementwise
        p = sigmoid(inputs), p_t = p t + (1 - p)(1 - t), alpha_t = alpha t + (1 - alpha)(1 - t)

    Args:
        inputs: float tensor of any shape (logits).
        targets: float tensor of the inputs' shape, 0/1 or soft targets in [0, 1]. Integer labels
            (label == C meaning background) are fused_losses.sigmoid_focal's extension, not
            torchvision's: pass them there.
        alpha: in [0, 1], or -1 to disable (anything else is a ValueError, as in torchvision).
        gamma: focusing parameter >= 0.
        reduction: 'none' (default) | 'mean' (over all elements) | 'sum'.

    Differences from torchvision: 'mean' and 'sum' return float32 for float16/bfloat16 inputs
    (accumulated in float32; torchvision returns the inputs' dtype); 'none' has the inputs' dtype
    even when targets have a wider one; 'mean' of an empty tensor is 0 (the package's rule for a
    mean over nothing), where torchvision returns NaN. Targets that require grad are served by
    the plain-PyTorch reference backend (the fused kernels write the gradient of the inputs
    only), so their gradient is exact too.
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

    restore() (or leaving the `with` block, also on an exception) puts back exactly the object
    that was there when this handle patched, unless something else has replaced the function
    since (then it leaves that alone). Calling it twice is harmless.
    """

    def __init__(self, module, previous: Callable):
        self._module = module
        self._previous: Optional[Callable] = previous
        self.active = True

    def restore(self) -> None:
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
    """Make torchvision's RetinaNet classification head use the fused sigmoid focal loss.

    A plain call patches until ``handle.restore()``; as a context manager it restores on exit:

        fused_losses.compat.patch_torchvision()            # for the rest of the process
        with fused_losses.compat.patch_torchvision():      # only inside the block
            loss_dict = retinanet(images, targets)

    Idempotent: patching an already patched module changes nothing, and nested blocks restore in
    order (the innermost leaves the fused loss in place, the outermost puts the original back).
    The head computes sum / max(1, num_foreground) per image, as before; only the
    classification loss's kernel changes (same numbers to float32 rounding).

    Raises:
        ImportError: torchvision is not installed.
        RuntimeError: this torchvision's RetinaNet module has no module-level sigmoid_focal_loss
            (the layout this patch relies on; checked with torchvision 0.29.1).
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
