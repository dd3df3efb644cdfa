"""'triton': Triton kernels (fused_losses._triton) for CUDA tensors, and for CPU tensors under
TRITON_INTERPRET=1 (explicit backend='triton' only: the interpreter is for tests, not speed).

The automatic choice uses it for CUDA tensors when the compiled 'cuda' backend is unavailable.
The kernels are imported lazily, so a missing or broken triton only makes this backend
unavailable, with the reason.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from fused_losses._backends import LOSSES, Backend


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import fused_losses._triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure makes the backend unavailable
        return f"the Triton kernels failed to import: {type(exc).__name__}: {exc}"
    return None


_status: tuple[bool, str] | None = None


def _availability() -> tuple[bool, str]:
    """Computed once (importing triton and the kernels is costly); a plain global, so that
    torch.compile traces a call through the public API as a constant."""
    global _status
    if _status is None:
        _status = _compute_availability()
    return _status


def _compute_availability() -> tuple[bool, str]:
    error = _import_error()
    if error is not None:
        return False, error
    if torch.cuda.is_available():
        extra = " (and CPU tensors: TRITON_INTERPRET=1)" if _interpreter() else ""
        return True, "Triton kernels for CUDA tensors" + extra
    if _interpreter():
        return True, ("Triton kernels on CPU tensors through the Triton interpreter "
                      "(TRITON_INTERPRET=1; slow, for tests)")
    return False, "no CUDA device is visible (set TRITON_INTERPRET=1 before importing triton to run on CPU tensors)"


def _lazy(loss: str):
    def run(*args, **kwargs):
        import fused_losses._triton as kernels
        return getattr(kernels, loss)(*args, **kwargs)
    run.__name__ = loss
    return run


BACKEND = Backend(
    name="triton",
    availability=_availability,
    device_types=("cuda", "cpu") if _interpreter() else ("cuda",),
    auto_device_types=("cuda",),
    losses={loss: _lazy(loss) for loss in LOSSES},
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
)


# ---- seesaw / eqlv2 (#25) ----
def _lazy_longtail(loss: str):
    def run(*args, **kwargs):
        import fused_losses._triton.longtail as kernels
        return getattr(kernels, loss)(*args, **kwargs)
    run.__name__ = loss
    return run


BACKEND.losses["seesaw"] = _lazy_longtail("seesaw")
BACKEND.losses["eqlv2"] = _lazy_longtail("eqlv2")
