"""Backend registry and the one dispatch point of the public API.

A backend is a module in this package exposing ``BACKEND``, a :class:`Backend`. The
preference order for an automatic choice is ORDER: 'cuda' (compiled CUDA kernels, CUDA
tensors), 'triton' (CUDA tensors when the extension lacks CUDA), 'cpu' (compiled C++ kernels,
CPU tensors), 'reference' (plain PyTorch, any device). An explicit request (argument or
FUSED_LOSSES_BACKEND) that cannot be served raises; the automatic choice falls through quietly,
except that falling below the compiled backend because the extension is broken or missing warns
once (fused_losses._ext.warn_fallback; an absent GPU never warns).
Backend modules are imported lazily, and a backend whose module fails to import is reported
unavailable with the error, so importing fused_losses never fails because of a backend.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from fused_losses import _ext

ORDER = ("cuda", "triton", "cpu", "reference")
LOSSES = ("focal", "sigmoid_focal", "ohem", "ghmc", "ib")
# ---- quality_focal / varifocal / asymmetric (#24) ----
LOSSES += ("quality_focal", "varifocal", "asymmetric")
LOSSES += ("seesaw", "eqlv2")  # ---- seesaw / eqlv2 (#25) ----
LOSSES += ("distribution_focal",)  # distribution focal (#24)
_MODULES = {name: f"fused_losses._backends.{name}_backend" for name in ORDER}


class BackendStatus(NamedTuple):
    """Whether a backend can run here (``available``) and, in words, what it is or why not (``reason``).

    Attributes:
        available: True when the backend can serve calls on this machine.
        reason: what the backend is, or why it is unavailable.
    """
    available: bool
    reason: str


@dataclass
class Backend:
    """What a backend offers.

    availability: () -> (bool, reason), cheap, cached by the backend if costly.
    device_types: tensor device types it serves when asked for explicitly ('cpu', 'cuda').
    auto_device_types: device types an automatic choice may use it for (default: device_types);
            e.g. Triton serves CPU tensors under TRITON_INTERPRET=1, but only on request.
    losses: loss name -> implementation called with the logits, target (and features for ib)
            and the normalised keyword arguments of fused_losses._validate.
    dtypes: logits dtypes it accepts.
    """

    name: str
    availability: Callable[[], tuple[bool, str]]
    device_types: tuple[str, ...]
    losses: dict[str, Callable] = field(default_factory=dict)
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    auto_device_types: tuple[str, ...] | None = None

    def cannot_run(self, loss: str, logits: torch.Tensor) -> str | None:
        """None if this backend can run `loss` on these logits, else why not."""
        if loss not in self.losses:
            return f"it has no {loss} kernel yet"
        if logits.device.type not in self.device_types:
            return f"it serves {'/'.join(self.device_types)} tensors, not {logits.device.type}"
        if logits.dtype not in self.dtypes:
            return f"it does not take {logits.dtype} logits"
        return None


def _unimportable(name: str, exc: Exception) -> Backend:
    reason = f"backend module failed to import: {type(exc).__name__}: {exc}"
    return Backend(name, lambda: (False, reason), ())


_loaded: dict[str, Backend] = {}


def get(name: str) -> Backend:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name]).BACKEND
        except Exception as exc:  # noqa: BLE001 - any failure makes the backend unavailable
            _loaded[name] = _unimportable(name, exc)
    return _loaded[name]


def preload() -> None:
    """Import every backend module now (each failure is captured by get()). Called when
    fused_losses is imported, so that a first call traced by torch.compile finds the registry
    filled and never meets importlib (which dynamo cannot trace). Cheap: backends defer their
    costly imports (triton, kernels) to their first use."""
    for name in ORDER:
        get(name)


def status() -> dict[str, BackendStatus]:
    """Every backend in preference order with (available, reason)."""
    return {name: BackendStatus(*get(name).availability()) for name in ORDER}


def select(loss: str, logits: torch.Tensor, requested: str | None) -> Backend:
    """The backend that runs `loss` on `logits`: the requested one (or an error saying why it
    cannot), else the first of ORDER that is available and can run it."""
    if requested is not None:
        backend = get(requested)
        ok, why = backend.availability()
        if not ok:
            raise RuntimeError(f"backend {requested!r} is not available: {why}")
        why = backend.cannot_run(loss, logits)
        if why is not None:
            raise RuntimeError(f"backend {requested!r} cannot run {loss} on {logits.device.type} "
                               f"{logits.dtype} logits: {why}")
        return backend
    for name in ORDER:
        backend = get(name)
        auto_types = backend.device_types if backend.auto_device_types is None else backend.auto_device_types
        if (logits.device.type in auto_types and backend.availability()[0]
                and backend.cannot_run(loss, logits) is None):
            if name != logits.device.type:
                # Below the compiled backend of this device type ('cpu' / 'cuda' share the
                # device type's name): warn once if a broken or missing extension is the cause.
                _ext.warn_fallback(logits.device.type, name)
            return backend
    raise RuntimeError(f"no backend can run {loss} on {logits.device.type} {logits.dtype} logits")  # unreachable: reference runs all
