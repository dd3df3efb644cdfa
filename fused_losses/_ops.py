"""Python registration of the compiled loss ops (torch.ops.fused_losses.*): fake kernels for
torch.compile / meta tensors and autograd formulas. Device-independent: the CPU kernels
(csrc/cpu) and the CUDA kernels (csrc/cuda) implement the same schemas (csrc/ops.cpp), so one
registration serves both backends.

Forward/backward design (csrc/DESIGN.md): each ``*_forward`` op returns the loss and, when
called with compute_grad=True, the gradient of the loss for grad_output = 1, computed in the
same pass over the logits, in the math dtype (float32 for fp16/bf16/fp32). That gradient is an
op *output* (a fresh tensor, never an alias of an input), marked non-differentiable and saved
for backward. The backward is one out-of-place op, ``scale_grad(saved, grad_output, dtype)``,
which returns a new tensor in the input's dtype (rounded once), so the saved gradient is
never modified: backward may run any number of times (retain_graph=True) and torch.compile
sees only functional ops. Double backward raises a clear error.

Call :func:`register` (idempotent) once the extension is loaded; the cpu/cuda backend modules
do so.
"""
from __future__ import annotations

import torch

from fused_losses import _ext

__all__ = ["register", "needs_grad", "DOUBLE_BACKWARD_ERROR"]

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


def _grad_like(logits: torch.Tensor, compute_grad: bool) -> torch.Tensor:
    # Saved gradients are contiguous, in the math dtype (float32 for fp16/bf16/fp32, float64
    # for fp64): the logits-dtype gradient is rounded once, by scale_grad.
    return logits.new_empty(logits.shape if compute_grad else (0,), dtype=_math_dtype(logits.dtype))


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
def _setup_saved_grads(ctx, inputs, output):
    saved = output[1:]
    ctx.mark_non_differentiable(*saved)
    # Without this, autograd hands backward a materialised zero tensor for every unused output:
    # a gradient-sized fill (55 ms of a 140 ms focal step at 262144 x 80).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*saved)
    ctx.compute_grad = bool(inputs[-1])
    ctx.num_inputs = len(inputs)
    ctx.logits_dtype = inputs[0].dtype


def _backward_logits_only(ctx, grad_loss, *unused):
    _check_first_order(ctx)
    (saved,) = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    grad = torch.ops.fused_losses.scale_grad(saved, grad_loss, ctx.logits_dtype) if ctx.needs_input_grad[0] else None
    return (grad,) + (None,) * (ctx.num_inputs - 1)


def _backward_ib(ctx, grad_loss, *unused):
    _check_first_order(ctx)
    saved_logits, saved_feature = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * ctx.num_inputs
    scale = torch.ops.fused_losses.scale_grad
    grad_logits = scale(saved_logits, grad_loss, ctx.logits_dtype) if ctx.needs_input_grad[0] else None
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
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad)


def _fake_sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, compute_grad):
    return _loss_like(logits, logits.shape, reduction), _grad_like(logits, compute_grad)


def _fake_ohem(logits, target, keep_fraction, keep_count, thresh, min_kept_total, ignore_index, reduction,
               compute_grad):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad)


def _fake_ghmc_bin_weights(logits, target, state, bins, momentum, use_sigmoid, ignore_index):
    return logits.new_empty((bins,), dtype=torch.promote_types(logits.dtype, torch.float32))


def _fake_ghmc(logits, target, bin_weights, use_sigmoid, ignore_index, reduction, compute_grad):
    shape = logits.shape if use_sigmoid else _softmax_none_shape(logits)
    return _loss_like(logits, shape, reduction), _grad_like(logits, compute_grad)


def _fake_ib(logits, target, feature_norm, class_weight, alpha, epsilon, gamma, detach_factor, reduction,
             compute_grad):
    math_dtype = _math_dtype(logits.dtype)
    grad_feature = logits.new_empty((logits.shape[0] if compute_grad else 0,), dtype=math_dtype)
    return (_loss_like(logits, (logits.shape[0],), reduction), _grad_like(logits, compute_grad), grad_feature)


def _fake_scale_grad(saved_grad, grad_output, dtype):
    return saved_grad.new_empty(saved_grad.shape, dtype=dtype)


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
    torch.library.register_autograd("fused_losses::scale_grad", _backward_scale_grad, setup_context=_setup_scale_grad)
