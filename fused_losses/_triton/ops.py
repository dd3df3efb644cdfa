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
from fused_losses.distributed import global_bin_weights

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


def _save_grads(ctx, inputs, output, reduction_pos: int, n_grads: int, need_grad_pos: int):
    """need_grad_pos: where need_grad is in the op's schema (the drop-in extras, weight,
    label_smoothing, ..., follow it with defaults, so it is not inputs[-1])."""
    ctx.reduction = inputs[reduction_pos]
    ctx.dtype = inputs[0].dtype
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1 + n_grads:])  # e.g. GHM-C's new state; the grads: below
    save_gradients(ctx, output[0], output[1:1 + n_grads], inputs[0], inputs[need_grad_pos])


def _nones(ctx, used: int) -> tuple:
    """None for the inputs after the first `used` (the backward returns one value per input)."""
    return (None,) * (ctx.num_inputs - used)


# --------------------------------------------------------------------------------------------
# softmax focal
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::softmax_focal", mutates_args=())
def softmax_focal_op(logits: Tensor, target: Tensor, alpha_t: Optional[Tensor], alpha: float, gamma: float,
                     ignore_index: int, reduction: str, from_logits: bool, need_grad: bool,
                     weight: Optional[Tensor] = None, label_smoothing: float = 0.0,
                     epsilon: float = 0.0) -> tuple[Tensor, Tensor]:
    return launch.softmax_focal(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits,
                                need_grad, weight, label_smoothing, epsilon)


@softmax_focal_op.register_fake
def _(logits, target, alpha_t, alpha, gamma, ignore_index, reduction, from_logits, need_grad, weight=None,
      label_smoothing=0.0, epsilon=0.0):
    return _fake_loss(logits, target.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _softmax_focal_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 6, 1, 8)


def _softmax_focal_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, 1),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::softmax_focal", _softmax_focal_backward,
                                setup_context=_softmax_focal_setup)


# --------------------------------------------------------------------------------------------
# sigmoid focal
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::sigmoid_focal", mutates_args=())
def sigmoid_focal_op(logits: Tensor, target: Tensor, alpha: float, gamma: float, ignore_index: int,
                     reduction: str, need_grad: bool, alpha_per_class: Optional[Tensor] = None,
                     weight: Optional[Tensor] = None, epsilon: float = 0.0) -> tuple[Tensor, Tensor]:
    return launch.sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, need_grad, alpha_per_class,
                                weight, epsilon)


@sigmoid_focal_op.register_fake
def _(logits, target, alpha, gamma, ignore_index, reduction, need_grad, alpha_per_class=None, weight=None,
      epsilon=0.0):
    return _fake_loss(logits, logits.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _sigmoid_focal_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 5, 1, 6)


def _sigmoid_focal_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, None),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::sigmoid_focal", _sigmoid_focal_backward,
                                setup_context=_sigmoid_focal_setup)


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::ohem", mutates_args=())
def ohem_op(logits: Tensor, target: Tensor, keep: float, keep_is_int: bool, thresh: Optional[float],
            min_kept: int, ignore_index: int, reduction: str, need_grad: bool, weight: Optional[Tensor] = None,
            label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    return launch.ohem(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad,
                       weight, label_smoothing)


@ohem_op.register_fake
def _(logits, target, keep, keep_is_int, thresh, min_kept, ignore_index, reduction, need_grad, weight=None,
      label_smoothing=0.0):
    return _fake_loss(logits, target.shape, reduction), _fake_grad(logits, need_grad, reduction)


def _ohem_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 7, 1, 8)


def _ohem_backward(ctx, grad_loss, _grad_grad):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, 1),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::ohem", _ohem_backward, setup_context=_ohem_setup)


# --------------------------------------------------------------------------------------------
# GHM-C (returns the updated EMA state; the caller copies it into the user's state)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op(f"{_NS}::ghmc", mutates_args=())
def ghmc_op(logits: Tensor, target: Tensor, state: Optional[Tensor], bins: int, momentum: float,
            use_sigmoid: bool, ignore_index: int, reduction: str, need_grad: bool, weight: Optional[Tensor] = None,
            label_smoothing: float = 0.0, counts: Optional[Tensor] = None,
            bin_weights: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """counts (int64 (bins + 1,), this rank's) and bin_weights (bins,): the process_group path,
    where fused_losses.distributed.global_bin_weights made the weights (and updated the state):
    no histogram here, 'mean' divides by counts[bins]."""
    if use_sigmoid:
        return launch.ghmc_sigmoid(logits, target, state, bins, momentum, ignore_index, reduction, need_grad, weight,
                                   counts, bin_weights)
    return launch.ghmc_softmax(logits, target, state, bins, momentum, ignore_index, reduction, need_grad, weight,
                               label_smoothing, counts, bin_weights)


@ghmc_op.register_fake
def _(logits, target, state, bins, momentum, use_sigmoid, ignore_index, reduction, need_grad, weight=None,
      label_smoothing=0.0, counts=None, bin_weights=None):
    shape = logits.shape if use_sigmoid else target.shape
    new_state = state.new_empty(state.shape) if state is not None else logits.new_empty((0,), dtype=torch.float32)
    return _fake_loss(logits, shape, reduction), _fake_grad(logits, need_grad, reduction), new_state


def _ghmc_setup(ctx, inputs, output):
    _save_grads(ctx, inputs, output, 7, 1, 8)
    ctx.channel_dim = None if inputs[5] else 1


def _ghmc_backward(ctx, grad_loss, _grad_grad, _grad_state):
    grad, *applied = ctx.saved_tensors
    return (_logits_grad(ctx, grad, grad_loss, applied, ctx.channel_dim),) + _nones(ctx, 1)


torch.library.register_autograd(f"{_NS}::ghmc", _ghmc_backward, setup_context=_ghmc_setup)


@torch.library.custom_op(f"{_NS}::ghmc_bin_counts", mutates_args=())
def ghmc_bin_counts_op(logits: Tensor, target: Tensor, bins: int, use_sigmoid: bool, ignore_index: int,
                       weight: Optional[Tensor] = None) -> Tensor:
    """This rank's int64 (bins + 1,) GHM-C counts: valid entries per bin, then n_valid (no gradient)."""
    return launch.ghmc_counts(logits, target, bins, use_sigmoid, ignore_index, weight)


@ghmc_bin_counts_op.register_fake
def _(logits, target, bins, use_sigmoid, ignore_index, weight=None):
    return logits.new_empty((bins + 1,), dtype=torch.int64)


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
    _save_grads(ctx, inputs, output, 8, 2, 9)
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
    return (grad_logits, None, grad_features) + _nones(ctx, 3)


torch.library.register_autograd(f"{_NS}::ib", _ib_backward, setup_context=_ib_setup)


# --------------------------------------------------------------------------------------------
# The backend's loss functions: signatures of fused_losses.reference (normalised kwargs)
# --------------------------------------------------------------------------------------------
# Each function calls its op through fused_losses._ops.call_loss: directly (the op's autograd
# formula above) or, under functorch transforms / forward AD, through the transform-aware path.
def focal(logits, target, *, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True,
          weight=None, label_smoothing=0.0, epsilon=None):
    alpha_t = alpha if isinstance(alpha, Tensor) else None
    alpha_s = 1.0 if alpha is None or alpha_t is not None else float(alpha)
    poly = () if epsilon is None else (float(epsilon),)  # Poly-1 (#24), passed only when != 0

    def run(need_grad, x, _features, t, a, w):
        loss, grad = softmax_focal_op(x, t, a, alpha_s, float(gamma), int(ignore_index), reduction,
                                      bool(from_logits), need_grad, w, float(label_smoothing), *poly)
        return loss, grad, None

    return call_loss(run, logits, None, target, alpha_t, weight, channel_dim=1)


def sigmoid_focal(logits, target, *, alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none", weight=None,
                  epsilon=None):
    # alpha: a float (torchvision's meaning; < 0 disables) or a (C,) tensor of per-class alphas.
    alpha_c = alpha if isinstance(alpha, Tensor) else None
    alpha_s = -1.0 if alpha_c is not None else float(alpha)
    poly = () if epsilon is None else (float(epsilon),)  # Poly-1 (#24), passed only when != 0

    def run(need_grad, x, _features, t, a, w):
        loss, grad = sigmoid_focal_op(x, t, alpha_s, float(gamma), int(ignore_index), reduction, need_grad, a, w,
                                      *poly)
        return loss, grad, None

    return call_loss(run, logits, None, target, alpha_c, weight, channel_dim=None)


def ohem(logits, target, *, keep=0.25, thresh=None, min_kept=None, ignore_index=-100, reduction="mean", weight=None,
         label_smoothing=0.0):
    keep_is_int = isinstance(keep, int)

    def run(need_grad, x, _features, t, w):
        loss, grad = ohem_op(x, t, float(keep), keep_is_int, None if thresh is None else float(thresh),
                             int(min_kept or 0), int(ignore_index), reduction, need_grad, w, float(label_smoothing))
        return loss, grad, None

    return call_loss(run, logits, None, target, weight, channel_dim=1)


def ghmc(logits, target, *, bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100,
         reduction="mean", weight=None, label_smoothing=0.0, process_group=None):
    counts = bin_weights = None
    if process_group is not None:
        # The histogram of the global batch: this rank's counts, all-reduced on the device, then
        # the weights and the EMA update of `state` from them (fused_losses.distributed); the op
        # then takes the weights as given and divides 'mean' by this rank's own n_valid.
        counts = ghmc_bin_counts_op(logits.detach(), target, int(bins), bool(use_sigmoid), int(ignore_index), weight)
        bin_weights = global_bin_weights(counts, state, momentum, torch.promote_types(logits.dtype, torch.float32),
                                         process_group)
        state = None

    def run(need_grad, x, _features, t, s, w, cnt, bw):
        loss, grad, new_state = ghmc_op(x, t, s, int(bins), float(momentum), bool(use_sigmoid), int(ignore_index),
                                        reduction, need_grad, w, float(label_smoothing), cnt, bw)
        if s is not None:
            with torch.no_grad():
                s.copy_(new_state)
        return loss, grad, None

    return call_loss(run, logits, None, target, state, weight, counts, bin_weights,
                     channel_dim=None if use_sigmoid else 1)


def ib(logits, target, features, *, alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0, detach_factor=False,
       reduction="mean"):
    def run(need_grad, x, f, t, w):
        return ib_op(x, t, f, w, float(alpha), float(epsilon), float(gamma), bool(detach_factor), reduction,
                     need_grad)

    return call_loss(run, logits, features, target, weight, channel_dim=1)
