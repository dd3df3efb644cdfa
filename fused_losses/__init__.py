"""fused_losses: fused softmax/sigmoid focal, OHEM, GHM-C, IB and class-balanced losses.

    import fused_losses as fl
    loss = fl.focal(logits, target)            # softmax focal, drop-in for F.cross_entropy
    loss = fl.sigmoid_focal(logits, labels, reduction="sum") / num_pos
    print(fl.backends())                       # which backends run here, and why not

Importing never fails because a backend is missing; see backends().
"""
from fused_losses import nn, reference
from fused_losses import _backends
from fused_losses._backends import BackendStatus
from fused_losses._backends import status as _status
from fused_losses.functional import class_weights, focal, ghmc, ib, ohem, sigmoid_focal

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


def backends() -> dict:
    """{name: BackendStatus(available, reason)} for 'cuda', 'triton', 'cpu', 'reference', in the
    order an automatic choice tries them."""
    return _status()
