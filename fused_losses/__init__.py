"""fused_losses: fused softmax/sigmoid focal, OHEM, GHM-C, IB and class-balanced losses.

The losses (:func:`focal`, :func:`sigmoid_focal`, :func:`ohem`, :func:`ghmc`, :func:`ib`) and
:func:`class_weights` live in ``fused_losses.functional`` and are re-exported here; the same
losses as modules are in ``fused_losses.nn``, adapters with torchvision's and mmdet's
signatures in ``fused_losses.compat``, the float64 ground truth in ``fused_losses.reference``
and DDP helpers in ``fused_losses.distributed``. Importing never fails because a backend is
missing: see :func:`backends`.

Example:
    >>> import torch
    >>> import fused_losses as fl
    >>> logits = torch.randn(8, 5, requires_grad=True)
    >>> loss = fl.focal(logits, torch.randint(0, 5, (8,)))    # softmax focal, drop-in for F.cross_entropy
    >>> loss.backward()
    >>> fl.backends()["reference"].available
    True
"""
from fused_losses import nn, reference
from fused_losses import _backends
from fused_losses._backends import BackendStatus
from fused_losses._backends import status as _status
from fused_losses.functional import class_weights, focal, ghmc, ib, ohem, sigmoid_focal
from fused_losses.functional import asymmetric, quality_focal, varifocal  # quality_focal / varifocal / asymmetric (#24)
from fused_losses.functional import eqlv2, seesaw  # ---- seesaw / eqlv2 (#25) ----

from fused_losses.functional import distribution_focal  # distribution focal (#24)

_backends.preload()

# The installed distribution's version (importlib.metadata); a source tree that was never
# installed falls back to this copy of pyproject.toml's [project] version (tests/test_install.py
# keeps the two equal).
_FALLBACK_VERSION = "0.1.0"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("fused_losses")
    except PackageNotFoundError:
        return _FALLBACK_VERSION


__version__ = _version()
__all__ = ["focal", "sigmoid_focal", "ohem", "ghmc", "ib", "class_weights", "backends", "nn", "reference",
           "BackendStatus"]
__all__ += ["quality_focal", "varifocal", "asymmetric"]  # quality_focal / varifocal / asymmetric (#24)
__all__ += ["seesaw", "eqlv2"]  # ---- seesaw / eqlv2 (#25) ----
__all__ += ["distribution_focal"]  # distribution focal (#24)


def backends() -> dict:
    """Which backends can run on this machine, and why the others cannot.

    Returns:
        A dict ``{name: BackendStatus(available, reason)}`` for 'cuda', 'triton', 'cpu' and
        'reference', in the order an automatic choice tries them. ``reason`` says what the
        backend is, or why it is unavailable (no GPU, extension not built, built against another
        torch, older than the Python code, or the import error).

    Example:
        >>> import fused_losses as fl
        >>> status = fl.backends()
        >>> list(status)
        ['cuda', 'triton', 'cpu', 'reference']
        >>> status["reference"].available
        True
    """
    return _status()
