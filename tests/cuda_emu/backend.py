"""The test-only backend 'cuda_emu': the real CUDA kernels (csrc/cuda/*.cu) run on CPU tensors
through the emulator (csrc/cuda_emu), registered into fused_losses._backends' registry from the
tests (never by the package).

Enabled when the environment variable FL_CUDA_EMU is set (the schedule spec of
csrc/cuda_emu/cuda_emu.h, e.g. "threads=random,seed=1,sms=1"; `make test-cuda-emu` sets it and
builds the library first); FL_CUDA_EMU_ASAN=1 selects the AddressSanitizer + UBSan build (python
must then run with the sanitizer runtime preloaded). Otherwise the backend reports itself
unavailable and the test modules leave its cases out with one skip, like an absent GPU.

It maps the normalised arguments onto torch.ops.fused_losses_emu exactly as the 'cuda' backend
maps them onto torch.ops.fused_losses: the functions are the 'cpu'/'cuda' backends' own
(fused_losses/_backends/cpu_backend.py), rebound to the emulated namespace. Fake kernels are
fused_losses/_ops.py's; the autograd formulas are built from _ops's shared pieces
(save_gradients, logits_gradient), calling the emulated scale_grad / scale_grad_ kernels.
"""
from __future__ import annotations

import os
import types

import torch

from fused_losses import _backends, _ops, _validate
from fused_losses._backends import Backend, cpu_backend
from tests.cuda_emu import build

NAME = "cuda_emu"
NAMESPACE = "fused_losses_emu"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ENV = "FL_CUDA_EMU"


def ops():
    return getattr(torch.ops, NAMESPACE)


def _asan() -> bool:
    return os.environ.get("FL_CUDA_EMU_ASAN", "0") not in ("", "0")


# ---- autograd: the formulas of fused_losses._ops, with this namespace's backward kernels -------
def _scale_in_place(saved, grad_loss, applied_scale):
    ops().scale_grad_(saved, grad_loss, applied_scale)


def _scale_fresh(saved, grad_loss, dtype):
    return ops().scale_grad(saved, grad_loss, dtype)


def _backward_logits_only(ctx, grad_loss, *unused):
    _ops._check_first_order(ctx)
    saved, *applied_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grad = None
    if ctx.needs_input_grad[0]:
        grad = _ops.logits_gradient(ctx, saved, grad_loss, *(applied_scale or [None]), _scale_in_place, _scale_fresh)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def _backward_ib(ctx, grad_loss, *unused):
    _ops._check_first_order(ctx)
    saved_logits, saved_feature, *applied_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grad_logits = None
    if ctx.needs_input_grad[0]:
        grad_logits = _ops.logits_gradient(ctx, saved_logits, grad_loss, *(applied_scale or [None]), _scale_in_place,
                                           _scale_fresh)
    grad_feature = _scale_fresh(saved_feature, grad_loss, saved_feature.dtype) if ctx.needs_input_grad[2] else None
    return (grad_logits, None, grad_feature) + (None,) * (ctx.num_inputs - 3)


def _register_op_layer() -> None:
    for name, (fake, backward) in _ops._FORWARD_OPS.items():
        qualname = f"{NAMESPACE}::{name}"
        torch.library.register_fake(qualname)(fake)
        formula = _backward_ib if backward is _ops._backward_ib else _backward_logits_only
        torch.library.register_autograd(qualname, formula, setup_context=_ops.setup_saved_grads_for(name))
    torch.library.register_fake(f"{NAMESPACE}::ghmc_bin_weights")(_ops._fake_ghmc_bin_weights)
    torch.library.register_fake(f"{NAMESPACE}::ghmc_bin_counts")(_ops._fake_ghmc_bin_counts)
    torch.library.register_fake(f"{NAMESPACE}::scale_grad")(_ops._fake_scale_grad)
    torch.library.register_fake(f"{NAMESPACE}::scale_grad_")(_ops._fake_scale_grad_)
    torch.library.register_autograd(f"{NAMESPACE}::scale_grad", _ops._backward_scale_grad,
                                    setup_context=_ops._setup_scale_grad)


# ---- the loss functions: the cpu/cuda backends' own, on the emulated namespace -----------------
def _rebound(fn):
    """cpu_backend's function `fn` calling torch.ops.fused_losses_emu instead of
    torch.ops.fused_losses (its only namespace lookup is the module's _ops_ns())."""
    scope = dict(fn.__globals__)
    scope["_ops_ns"] = ops
    copy = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _probe() -> tuple[bool, str]:
    if ENV not in os.environ:
        return False, f"the CUDA emulator runs only when {ENV} is set (`make test-cuda-emu`)"
    # FL_CUDA_EMU_LIBRARY: another build of the library (tests/cuda_emu/mutants.py).
    path = os.environ.get("FL_CUDA_EMU_LIBRARY") or os.path.join(
        build.build_dir(_asan()), "fused_losses_emu_asan.so" if _asan() else "fused_losses_emu.so")
    if not os.path.exists(path):
        return False, f"{path} is not built (`make test-cuda-emu`, or python -m tests.cuda_emu.build)"
    try:
        torch.ops.load_library(path)
        _ops.register()  # the shared fakes need the main extension's op layer too
        _register_op_layer()
    except Exception as exc:  # noqa: BLE001 - reported as the reason
        return False, f"loading {path} failed: {type(exc).__name__}: {exc}"
    return True, f"CUDA kernels on the CPU emulator ({ops().emu_configuration()})"


_AVAILABILITY = _probe()

BACKEND = Backend(
    name=NAME,
    availability=lambda: _AVAILABILITY,
    device_types=("cpu",),
    auto_device_types=(),
    losses={loss: _rebound(fn) for loss, fn in cpu_backend.BACKEND.losses.items()},
    dtypes=DTYPES,
)
# Registered under its name for explicit requests only (it is not in the automatic ORDER); the
# package has no hook for extra backends, so the tests add it to the registry and to the names
# the argument validation accepts.
_backends._loaded[NAME] = BACKEND
if NAME not in _validate.BACKENDS:
    _validate.BACKENDS = _validate.BACKENDS + (NAME,)


def available() -> bool:
    return _AVAILABILITY[0]


def reason() -> str:
    return _AVAILABILITY[1]


class configured:
    """Context manager: the emulator under another schedule spec (cuda_emu.h), restored after."""

    def __init__(self, spec: str):
        self.spec = spec
        self.previous = None

    def __enter__(self):
        self.previous = ops().emu_configure(self.spec)
        return self

    def __exit__(self, *exc):
        ops().emu_configure(self.previous)
        return False


def take_device_asserts() -> list[str]:
    return list(ops().emu_take_device_asserts())


# ---- seesaw / eqlv2 (#25) ----
# Their op layer (fused_losses/_longtail.py) on this namespace's backward kernels; the losses
# leave the registry when the emulated build lacks their kernels.
if _AVAILABILITY[0]:
    from fused_losses import _longtail

    _longtail.register(NAMESPACE, _scale_in_place, _scale_fresh)
for _loss, _op in (("seesaw", "seesaw_forward"), ("eqlv2", "eqlv2_forward")):
    if not (_AVAILABILITY[0] and hasattr(ops(), _op)):
        BACKEND.losses.pop(_loss, None)
