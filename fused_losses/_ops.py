"""Python registration of the compiled loss ops (torch.ops.fused_losses.*): fake kernels for
torch.compile / meta tensors and autograd formulas. Device-independent: the CPU kernels
(csrc/cpu) and the CUDA kernels (csrc/cuda) implement the same schemas (csrc/ops.cpp), so one
registration serves both backends.

Forward/backward design (csrc/DESIGN.md): each ``*_forward`` op returns the loss and, when
called with compute_grad=True, the gradient of the loss for grad_output = 1, computed in the
same pass over the logits. That gradient is an op *output* (a fresh tensor, never an alias of
an input), marked non-differentiable and saved for backward. Its dtype is
:func:`saved_grad_dtype`, and it decides the backward:

* reduced loss ('mean'/'sum') with bf16/fp32/fp64 logits: the gradient is saved in the logits
  dtype and the backward is the in-place op ``scale_grad_(saved, grad_output, applied_scale)``
  (declared ``Tensor(a!)`` in its schema), which returns nothing; the backward then returns the
  saved tensor itself. ``applied_scale`` is a one-value tensor made here (1.0) that records on
  the device what the saved gradient was last multiplied by, so the kernel skips the pass when
  grad_output equals it (``loss.backward()``: no pass over the gradient, no host sync) and a
  retained graph's next backward rescales by grad_output / applied_scale (never scales twice).
  Without retain_graph the saved tensor is released once this node has run, so AccumulateGrad
  takes it as ``.grad`` without a copy. Under torch.compile, AOTAutograd functionalises the
  mutation (a copy in the compiled backward: correct, not free).
* 'none' (a per-sample grad_output), or fp16 logits: the gradient is saved in the math dtype
  (float32) and the backward is the out-of-place ``scale_grad(saved, grad_output, dtype)``,
  rounded once into the logits dtype. fp16 stays float32 because a GradScaler's grad_output
  (2^16 and more) must multiply the float32 values: a 'mean' gradient of a large batch,
  rounded to fp16 first, underflows to zero.

Double backward raises a clear error.

Call :func:`register` (idempotent) once the extension is loaded; the cpu/cuda backend modules
do so.
"""
from __future__ import annotations

import torch

from fused_losses import _ext

__all__ = ["register", "needs_grad", "saved_grad_dtype", "save_gradients", "logits_gradient",
           "DOUBLE_BACKWARD_ERROR"]

DOUBLE_BACKWARD_ERROR = (
    "fused_losses: double backward (create_graph=True, or differentiating a gradient) is not supported "
    "by the fused kernels; use backend='reference' for higher-order gradients")


def needs_grad(*tensors: torch.Tensor) -> bool:
    """True when autograd will ask for a gradient of any of `tensors` (the forward op must then
    compute it)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _loss_like(logits: torch.Tensor, none_shape, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return logits.new_empty(none_shape)
    return logits.new_empty((), dtype=torch.promote_types(logits.dtype, torch.float32))


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def saved_grad_dtype(dtype: torch.dtype, reduction: str) -> torch.dtype:
    """dtype of the gradient a forward op saves for logits of `dtype` (module docstring): the
    logits dtype for 'mean'/'sum' (scaled in place by scale_grad_), except fp16; the math dtype
    for 'none' and fp16 (scaled out of place by scale_grad, rounded once)."""
    if reduction != "none" and dtype != torch.float16:
        return dtype
    return _math_dtype(dtype)


def _grad_like(logits: torch.Tensor, compute_grad: bool, reduction: str) -> torch.Tensor:
    # Saved gradients are contiguous, in saved_grad_dtype.
    return logits.new_empty(logits.shape if compute_grad else (0,), dtype=saved_grad_dtype(logits.dtype, reduction))


def _softmax_none_shape(logits: torch.Tensor):
    return (logits.shape[0], *logits.shape[2:])


def _check_first_order(ctx):
    # During an ordinary backward grad mode is off; create_graph=True turns it on, and the
    # saved gradient has no graph to differentiate, so say so instead of returning a gradient
    # that silently lacks its second-order part.
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
    if not ctx.compute_grad:
        raise RuntimeError("fused_losses: the forward op ran with compute_grad=False, so it saved no gradient "
                           "(call it with compute_grad=True when the inputs require grad)")


# ---- autograd formulas: (loss, grad...) outputs; grads flow to the positional inputs ----------
def save_gradients(ctx, loss: torch.Tensor, grads, logits: torch.Tensor, compute_grad: bool) -> None:
    """setup_context part shared by every op layer (this one and fused_losses._triton.ops):
    saves the forward's gradients and decides the backward (module docstring). A 0-dim loss is
    a reduced one; when its logits gradient (grads[0]) is in the logits dtype it is scaled in
    place, and `applied_scale` (the multiplier the saved gradient carries, in the loss dtype =
    the gradient's math dtype, which grad_output arrives in) is saved after the gradients."""
    ctx.mark_non_differentiable(*grads)
    # Without this, autograd hands backward a materialised zero tensor for every unused output:
    # a gradient-sized fill (55 ms of a 140 ms focal step at 262144 x 80).
    ctx.set_materialize_grads(False)
    ctx.compute_grad = bool(compute_grad)
    ctx.logits_dtype = logits.dtype
    ctx.in_place = ctx.compute_grad and loss.dim() == 0 and grads[0].dtype == logits.dtype
    if ctx.in_place:
        ctx.save_for_backward(*grads, torch.ones((), dtype=loss.dtype, device=loss.device))
    else:
        ctx.save_for_backward(*grads)


def logits_gradient(ctx, saved, grad_loss, applied_scale, scale_in_place, scale_fresh):
    """The logits gradient of this backward: `saved` scaled in place by
    scale_in_place(saved, grad_loss, applied_scale) and returned itself, or
    scale_fresh(saved, grad_loss, logits dtype), a new tensor."""
    if ctx.in_place:
        scale_in_place(saved, grad_loss, applied_scale)
        return saved
    return scale_fresh(saved, grad_loss, ctx.logits_dtype)


def _setup_saved_grads(ctx, inputs, output):
    save_gradients(ctx, output[0], output[1:], inputs[0], inputs[-1])
    ctx.num_inputs = len(inputs)


def _logits_grad(ctx, saved, grad_loss, applied_scale=None):
    ops = torch.ops.fused_losses
    return logits_gradient(ctx, saved, grad_loss, applied_scale, ops.scale_grad_, ops.scale_grad)


def _backward_logits_only(ctx, grad_loss, *unused):
    _check_first_order(ctx)
    saved, *applied_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grad = _logits_grad(ctx, saved, grad_loss, *applied_scale) if ctx.needs_input_grad[0] else None
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def _backward_ib(ctx, grad_loss, *unused):
    _check_first_order(ctx)
    saved_logits, saved_feature, *applied_scale = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    scale = torch.ops.fused_losses.scale_grad
    grad_logits = _logits_grad(ctx, saved_logits, grad_loss, *applied_scale) if ctx.needs_input_grad[0] else None
    # feature_norm is passed in the math dtype, which is also the saved gradient's dtype.
    grad_feature = scale(saved_feature, grad_loss, saved_feature.dtype) if ctx.needs_input_grad[2] else None
    return (grad_logits, None, grad_feature) + (None,) * (ctx.num_inputs - 3)


def _setup_scale_grad(ctx, inputs, output):
    pass


def _backward_scale_grad(ctx, grad):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


# ---- fake (meta) kernels ----------------------------------------------------------------------
def _fake_softmax_focal(logits, target, alpha_per_class, alpha, gamma, ignore_index, reduction, from_logits,
                        compute_grad):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad, reduction)


def _fake_sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, compute_grad):
    return _loss_like(logits, logits.shape, reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ohem(logits, target, keep_fraction, keep_count, thresh, min_kept_total, ignore_index, reduction,
               compute_grad):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ghmc_bin_weights(logits, target, state, bins, momentum, use_sigmoid, ignore_index):
    return logits.new_empty((bins,), dtype=torch.promote_types(logits.dtype, torch.float32))


def _fake_ghmc(logits, target, bin_weights, use_sigmoid, ignore_index, reduction, compute_grad):
    shape = logits.shape if use_sigmoid else _softmax_none_shape(logits)
    return _loss_like(logits, shape, reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ib(logits, target, feature_norm, class_weight, alpha, epsilon, gamma, detach_factor, reduction,
             compute_grad):
    math_dtype = _math_dtype(logits.dtype)
    grad_feature = logits.new_empty((logits.shape[0] if compute_grad else 0,), dtype=math_dtype)
    return (_loss_like(logits, (logits.shape[0],), reduction), _grad_like(logits, compute_grad, reduction), grad_feature)


def _fake_scale_grad(saved_grad, grad_output, dtype):
    return saved_grad.new_empty(saved_grad.shape, dtype=dtype)


def _fake_scale_grad_(grad, grad_output, applied_scale):
    return None


_FORWARD_OPS = {
    "softmax_focal_forward": (_fake_softmax_focal, _backward_logits_only),
    "sigmoid_focal_forward": (_fake_sigmoid_focal, _backward_logits_only),
    "ohem_forward": (_fake_ohem, _backward_logits_only),
    "ghmc_forward": (_fake_ghmc, _backward_logits_only),
    "ib_forward": (_fake_ib, _backward_ib),
}


_registered = False


def register() -> None:
    """Register fake kernels and autograd formulas for every loss op (once; call at import
    time, never from code torch.compile traces)."""
    global _registered
    if _registered:
        return
    if not _ext.loaded():
        raise RuntimeError(_ext.load_error())
    _registered = True
    for name, (fake, backward) in _FORWARD_OPS.items():
        qualname = f"fused_losses::{name}"
        torch.library.register_fake(qualname)(fake)
        torch.library.register_autograd(qualname, backward, setup_context=_setup_saved_grads)
    torch.library.register_fake("fused_losses::ghmc_bin_weights")(_fake_ghmc_bin_weights)
    torch.library.register_fake("fused_losses::scale_grad")(_fake_scale_grad)
    torch.library.register_fake("fused_losses::scale_grad_")(_fake_scale_grad_)
    torch.library.register_autograd("fused_losses::scale_grad", _backward_scale_grad, setup_context=_setup_scale_grad)
