"""torch.library registration of the Triton losses, namespace ``fused_losses_triton``.

Three layers (as flash-attention): custom ops (opaque to torch.compile, with fake kernels for
tracing) -> autograd formulas (register_autograd) -> loss functions with the signatures of
fused_losses.reference, which the 'triton' backend serves.

Every op returns the loss *and* the gradient w.r.t. the logits computed in the same pass for a
unit cotangent (empty when no gradient is needed), so forward + backward read the logits once.
The backward is the one of the C++ op layer (fused_losses._ops: save_gradients,
logits_gradient): a reduced loss's gradient saved in the logits dtype is scaled in place by
``fused_losses_triton::scale_grad_`` and returned itself by the backward that frees the graph
(free when grad_output equals the scale the kernel finds applied on the device); a backward
that keeps the graph, and every 'none'/fp16 backward, returns a fresh ``saved_grad x
grad_output`` and leaves the saved gradient untouched (README "Autograd contract"). Under
functorch transforms and forward AD the loss functions go through fused_losses._ops.call_loss.
Custom ops (not triton_op) are used so that torch.compile treats them as one opaque call on any
device: Inductor's path for user-defined Triton kernels needs a GPU, while these also run on
CPU tensors under TRITON_INTERPRET=1.

GHM-C's EMA state is not mutated by the op (register_autograd does not support mutating ops):
the op returns the updated state and the caller copies it into the user's tensor in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_losses._ops import call_loss, logits_gradient, save_gradients
from fused_losses._triton import launch

_NS = "fused_losses_triton"


def _fake_loss(logits: Tensor, shape, reduction: str) -> Tensor:
    if reduction == "none":
        return logits.new_empty(shape)
    return logits.new_empty((), dtype=torch.float32)


def _fake_grad(like: Tensor, need_grad: bool, reduction: str) -> Tensor:
    if not need_grad:
        return like.new_empty((0,))
    return like.new_empty(like.shape, dtype=launch.grad_dtype(like.dtype, reduction))


# scale_grad_ is declared with a schema (not custom_op): custom_op's in-place registration bumps
# the version counter of `grad`, which autograd would then refuse to unpack on a retained graph.
_LIB = torch.library.Library(_NS, "FRAGMENT")
_LIB.define("scale_grad_(Tensor(a!) grad, Tensor grad_output, Tensor(b!) applied_scale) -> ()")
for _key in ("CPU", "CUDA"):
    _LIB.impl("scale_grad_", launch.scale_grad_, _key)
torch.library.register_fake(f"{_NS}::scale_grad_", lambda grad, grad_output, applied_scale: None, lib=_LIB)


def _logits_grad(ctx, saved: Tensor, grad_out: Optional[Tensor], applied: list, channel_dim: Optional[int]):
    """applied: [applied_scale] after the saved gradients when they are scaled in place, else []."""
    if grad_out is None:  # save_gradients turns off materialize_grads
        return None
    return logits_gradient(ctx, saved, grad_out, applied[0] if applied else None, torch.ops.fused_losses_triton.scale_grad_,
                           lambda g, go, dtype: _scale(g, go, ctx.reduction, channel_dim, dtype))


def _scale(saved: Tensor, grad_out: Tensor, reduction: str, channel_dim: Optional[int], dtype) -> Tensor:
    """saved gradient (unit cotangent) x grad_output, as a fresh tensor in `dtype` (the input's).
    'mean'/'sum': a 0-dim fp32 cotangent; the saved gradient is in `dtype` (fp32/bf16) or fp32
    (fp16 inputs: rounded once, after the scale).
    'none': per-sample cotangent, broadcast over C for the softmax family (channel_dim); the
    saved gradient is fp32 for fp16/bf16 inputs, so the result is rounded once."""
    if reduction != "none":
        return (saved * grad_out).to(dtype)
    if channel_dim is not None:
        grad_out = grad_out.unsqueeze(channel_dim)
    return (saved * grad_out).to(dtype)


def _save_grads(ctx, inputs, output, reduction_pos: int, n_grads: int):
    ctx.reduction = inputs[reduction_pos]
    ctx.dtype = inputs[0].dtype
    ctx.mark_non_differentiable(*output[1 + n_grads:])  # e.g. GHM-C's new state; the grads: below
    save_gradients(ctx, output[0], output[1:1 + n_grads], inputs[0], inputs[-1])


# --------------------------------------------------------------------------------------------
# softmax focal
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::softmax_focal", mutates_args=())
def softmax_focal_op(logits: Tensor, target: Tensor, alpha_t: Optional[Tensor], alpha: float, gamma: float,
                     ignore_index: int, reduction: str, from_logits: bool, need_grad: bool) -> tuple[Tensor, Tensor]:
    return launch.softmax_focal(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits,
                                need_grad)


@softmax_focal_op.register_fake
def _(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits, need_grad):
    return _fake_loss(logits, target.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _softmax_focal_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 6, 1)


def _softmax_focal_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return _logits_grad(ctx, grad, grad_loss, applied, 1), None, None, None, None, None, None, None, None


torch.library.register_autograd(f"{_NS}::softmax_focal", _softmax_focal_backward,
                                setup_context=_softmax_focal_setup)


# --------------------------------------------------------------------------------------------
# sigmoid focal
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::sigmoid_focal", mutates_args=())
def sigmoid_focal_op(logits: Tensor, target: Tensor, alpha: float, gamma: float, ignore_index: int,
                     reduction: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    return launch.sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, need_grad)


@sigmoid_focal_op.register_fake
def _(logits, target, alpha, gamma, ignore_index, reduction, need_grad):
    return _fake_loss(logits, logits.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _sigmoid_focal_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 5, 1)


def _sigmoid_focal_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return _logits_grad(ctx, grad, grad_loss, applied, None), None, None, None, None, None, None


torch.library.register_autograd(f"{_NS}::sigmoid_focal", _sigmoid_focal_backward,
                                setup_context=_sigmoid_focal_setup)


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::ohem", mutates_args=())
def ohem_op(logits: Tensor, target: Tensor, keep: float, keep_is_int: bool, thresh: Optional[float],
            min_kept: int, ignore_index: int, reduction: str, need_grad: bool) -> tuple[Tensor, Tensor]:
    return launch.ohem(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad)


@ohem_op.register_fake
def _(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad):
    return _fake_loss(logits, target.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _ohem_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 7, 1)


def _ohem_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, 1),) + (None,) * 8


torch.library.register_autograd(f"{_NS}::ohem", _ohem_backward, setup_context=_ohem_setup)


# --------------------------------------------------------------------------------------------
# GHM-C (returns the updated EMA state; the caller copies it into the user's state)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::ghmc", mutates_args=())
def ghmc_op(logits: Tensor, target: Tensor, state: Optional[Tensor], bins: int, momentum: float,
            use_sigmoid: bool, ignore_index: int, reduction: str, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    fn = launch.ghmc_sigmoid if use_sigmoid else launch.ghmc_softmax
    return fn(logits, target, state, bins, momentum, ignore_index, reduction, need_grad)


@ghmc_op.register_fake
def _(logits, target, state, bins, momentum, use_sigmoid, ignore_index, reduction, need_grad):
    shape = logits.shape if use_sigmoid else target.shape
    new_state = state.new_empty(state.shape) if state is not None else logits.new_empty((0,), dtype=torch.float32)
    return _fake_loss(logits, shape, reduction), _fake_grad(logits, need_grad, reduction), new_state


def _ghmc_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 7, 1)
    ctx.channel_dim = None if inputs[5] else 1


def _ghmc_backward(ctx, grad_loss, _grad_grad, _grad_state):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, ctx.channel_dim),) + (None,) * 8


torch.library.register_autograd(f"{_NS}::ghmc", _ghmc_backward, setup_context=_ghmc_setup)


# --------------------------------------------------------------------------------------------
# IB
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::ib", mutates_args=())
def ib_op(logits: Tensor, target: Tensor, features: Tensor, weight: Optional[Tensor], alpha: float, epsilon: float,
          gamma: float, detach_factor: bool, reduction: str, need_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return launch.ib(logits, target, features, weight, alpha, epsilon, gamma, detach_factor, reduction, need_grad)


@ib_op.register_fake
def _(logits, target, features, weight, alpha, epsilon, gamma, detach_factor, reduction, need_grad):
    return (_fake_loss(logits, target.shape, reduction), _fake_grad(logits, need_grad, reduction),
            _fake_grad(features, need_grad and not detach_factor, reduction))


def _ib_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 8, 2)
    ctx.detach_factor = inputs[7]
    ctx.feature_dim = inputs[2].dim()
    ctx.feature_dtype = inputs[2].dtype


def _ib_backward(ctx, grad_loss, _grad_grad, _grad_feat):
    grad, grad_feat, *applied = ctx.saved_tensors
    grad_logits = _logits_grad(ctx, grad, grad_loss, applied, 1)
    grad_features = None
    if not ctx.detach_factor and grad_loss is not None:
        channel_dim = None if ctx.feature_dim == 1 else 1
        grad_features = _scale(grad_feat, grad_loss, ctx.reduction, channel_dim, ctx.feature_dtype)
    return (grad_logits, None, grad_features) + (None,) * 7


torch.library.register_autograd(f"{_NS}::ib", _ib_backward, setup_context=_ib_setup)


# --------------------------------------------------------------------------------------------
# The backend's loss functions: signatures of fused_losses.reference (normalised kwargs)
# --------------------------------------------------------------------------------------------
# Each function calls its op through fused_losses._ops.call_loss: directly (the op's autograd
# formula above) or, under functorch transforms / forward AD, through the transform-aware path.
def focal(logits, target, *, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True):
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    alpha_s = 1.0 if alpha is None or alpha_t is not None else float(alpha)

    def run(need_grad, x, _features, t, a):
        loss, grad = softmax_focal_op(x, t, a, alpha_s, float(gamma), int(ignore_index), reduction,
                                      bool(from_logits), need_grad)
        return loss, grad, None

    return call_loss(run, logits, None, target, alpha_t, channel_dim=1)


def sigmoid_focal(logits, target, *, alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none"):
    def run(need_grad, x, _features, t):
        loss, grad = sigmoid_focal_op(x, t, float(alpha), float(gamma), int(ignore_index), reduction, need_grad)
        return loss, grad, None

    return call_loss(run, logits, None, target, channel_dim=None)


def ohem(logits, target, *, keep=0.25, thresh=None, min_kept=None, ignore_index=-100, reduction="mean"):
    keep_is_int = isinstance(keep, int)

    def run(need_grad, x, _features, t):
        loss, grad = ohem_op(x, t, float(keep), keep_is_int, None if thresh is None else float(thresh),
                             int(min_kept or 0), int(ignore_index), reduction, need_grad)
        return loss, grad, None

    return call_loss(run, logits, None, target, channel_dim=1)


def ghmc(logits, target, *, bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100,
         reduction="mean"):
    def run(need_grad, x, _features, t, s):
        loss, grad, new_state = ghmc_op(x, t, s, int(bins), float(momentum), bool(use_sigmoid), int(ignore_index),
                                        reduction, need_grad)
        if s is not None:
            with torch.no_grad():
                s.copy_(new_state)
        return loss, grad, None

    return call_loss(run, logits, None, target, state, channel_dim=None if use_sigmoid else 1)


def ib(logits, target, features, *, alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0, detach_factor=False,
       reduction="mean"):
    def run(need_grad, x, f, t, w):
        return ib_op(x, t, f, w, float(alpha), float(epsilon), float(gamma), bool(detach_factor), reduction,
                     need_grad)

    return call_loss(run, logits, features, target, weight, channel_dim=1)
