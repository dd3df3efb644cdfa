"""Seesaw and EQLv2 (issue #25) on the compiled ops: the state updates around the fused op, and
the op layer (fake kernels, autograd formulas) of ``seesaw_forward`` / ``eqlv2_forward``.

Shared by the 'cpu' and 'cuda' backends (and the tests' emulated CUDA backend, which passes its
own op namespace and backward kernels). Semantics: fused_losses/reference.py and
docs/losses/longtail.md. The states are float32 tensors the caller owns, updated in place on
their device with torch ops (no host sync):

* Seesaw: this batch's int64 label counts (index_add_ of integers: exact, deterministic),
  all-reduced (SUM) over ``process_group``, are added to ``cum_samples`` FIRST (mmdet's order),
  then the fused op reads the updated counts: one pass per row writes loss and gradient.
* EQLv2: the fused op reads the state (the weights of this step come from the statistics after
  the previous step) and returns, with loss and gradient, the batch's float64 per-class sums of
  the gradient magnitudes (per fixed chunk of rows, then in order); with ``process_group`` they
  are gathered and added in rank order in float64 (reference.rank_sums_in_order); then added to
  the state once, and pos_neg recomputed: the authors' order (collect_grad after the loss).

Not supported on the fused backends: torch.func transforms and forward-mode AD (the state
update couples the batch and escapes the transform): a RuntimeError says so ('reference' runs
them).
"""
from __future__ import annotations

import torch

from fused_losses import _ops
from fused_losses.reference import EQLV2_RATIO_EPS, _all_reduce_sum, rank_sums_in_order

__all__ = ["seesaw_update_counts", "eqlv2_update_state", "seesaw", "eqlv2", "register"]

_TRANSFORMS_ERROR = ("{loss}: the fused backends do not run under torch.func transforms or forward-mode AD (the "
                     "state is updated in place from the whole batch); use backend='reference'")


def seesaw_update_counts(target: torch.Tensor, cum_samples: torch.Tensor, ignore_index: int, process_group) -> None:
    """cum_samples[label] += (non-ignored rows with that label), in place; the int64 counts are
    all-reduced over process_group first, then added once in float32 (as mmdet's buffer)."""
    labels = target.reshape(-1).long()
    valid = labels != ignore_index
    counts = torch.zeros(cum_samples.shape[0], dtype=torch.int64, device=cum_samples.device)
    counts.index_add_(0, torch.where(valid, labels, torch.zeros_like(labels)), valid.to(torch.int64))
    if process_group is not None:
        _all_reduce_sum(counts, process_group)
    with torch.no_grad():
        cum_samples.add_(counts.to(torch.float32))


def eqlv2_update_state(state: torch.Tensor, batch_stats: torch.Tensor, process_group) -> None:
    """state[:2] := fp32(fp64(state[:2]) + sums) and pos_neg := pos / (neg + 1e-10) in float32,
    in place; sums = batch_stats (float64 (2, C)), summed over process_group in rank order."""
    if process_group is not None:
        batch_stats = rank_sums_in_order(batch_stats, process_group)
    with torch.no_grad():
        state[:2].copy_(state[:2].to(torch.float64) + batch_stats)
        state[2].copy_(state[0] / (state[1] + EQLV2_RATIO_EPS))


def _check_no_transform(loss: str, logits: torch.Tensor) -> None:
    if _ops.transforms_active(logits):
        raise RuntimeError(_TRANSFORMS_ERROR.format(loss=loss))


def seesaw(ns, logits, target, cum_samples, *, p, q, eps, objectness, return_dict, ignore_index, reduction,
           weight=None, avg_factor=None, process_group=None):
    """Backend body of fl.seesaw on the op namespace `ns` (validated arguments)."""
    _check_no_transform("seesaw", logits)
    if not cum_samples.is_contiguous():
        scratch = cum_samples.contiguous()
        out = seesaw(ns, logits, target, scratch, p=p, q=q, eps=eps, objectness=objectness, return_dict=return_dict,
                     ignore_index=ignore_index, reduction=reduction, weight=weight, avg_factor=avg_factor,
                     process_group=process_group)
        with torch.no_grad():
            cum_samples.copy_(scratch)
        return out
    seesaw_update_counts(target, cum_samples, ignore_index, process_group)
    split = bool(return_dict and objectness)
    op_reduction = "sum" if avg_factor is not None else reduction
    loss, loss_obj, _ = ns.seesaw_forward(logits, target, cum_samples, float(p), float(q), float(eps), objectness,
                                          ignore_index, op_reduction, _ops.needs_grad(logits), weight, split)
    if avg_factor is not None:
        loss = loss / (avg_factor.to(loss.dtype) if isinstance(avg_factor, torch.Tensor) else avg_factor)
        if split:
            loss_obj = loss_obj / (avg_factor.to(loss_obj.dtype) if isinstance(avg_factor, torch.Tensor)
                                   else avg_factor)
    if not return_dict:
        return loss
    if split:
        return {"loss_cls_objectness": loss_obj, "loss_cls_classes": loss}
    return {"loss_cls_classes": loss}


def eqlv2(ns, logits, target, state, *, gamma, mu, alpha, objectness, ignore_index, reduction, weight=None,
          avg_factor=None, process_group=None):
    """Backend body of fl.eqlv2 on the op namespace `ns` (validated arguments)."""
    _check_no_transform("eqlv2", logits)
    if not state.is_contiguous():
        scratch = state.contiguous()
        out = eqlv2(ns, logits, target, scratch, gamma=gamma, mu=mu, alpha=alpha, objectness=objectness,
                    ignore_index=ignore_index, reduction=reduction, weight=weight, avg_factor=avg_factor,
                    process_group=process_group)
        with torch.no_grad():
            state.copy_(scratch)
        return out
    op_reduction = "sum" if avg_factor is not None else reduction
    loss, _, stats = ns.eqlv2_forward(logits, target, state, float(gamma), float(mu), float(alpha), objectness,
                                      ignore_index, op_reduction, _ops.needs_grad(logits), weight)
    eqlv2_update_state(state, stats, process_group)
    if avg_factor is not None:
        loss = loss / (avg_factor.to(loss.dtype) if isinstance(avg_factor, torch.Tensor) else avg_factor)
    return loss


# ---- op layer -----------------------------------------------------------------------------------
def _fake_seesaw(logits, target, cum_samples, p, q, eps, objectness, ignore_index, reduction, compute_grad,
                 weight=None, split=False):
    loss = _ops._loss_like(logits, (logits.shape[0],), reduction)
    if split and objectness:
        loss_obj = _ops._loss_like(logits, (logits.shape[0],), reduction)
    else:
        loss_obj = logits.new_empty((0,), dtype=torch.promote_types(logits.dtype, torch.float32))
    return loss, loss_obj, _ops._grad_like(logits, compute_grad, reduction)


def _fake_eqlv2(logits, target, state, gamma, mu, alpha, objectness, ignore_index, reduction, compute_grad,
                weight=None):
    c = logits.shape[-1] - (1 if objectness else 0)
    return (_ops._loss_like(logits, logits.shape, reduction), _ops._grad_like(logits, compute_grad, reduction),
            logits.new_empty((2, c), dtype=torch.float64))


def _setup_seesaw(ctx, inputs, output):
    loss, loss_obj, grad = output
    ctx.split = bool(inputs[11]) if len(inputs) > 11 else False
    ctx.split = ctx.split and bool(inputs[6])
    ctx.num_inputs = len(inputs)
    if not ctx.split:
        _ops.save_gradients(ctx, loss, (grad,), inputs[0], inputs[9])
        return
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.compute_grad = bool(inputs[9])
    ctx.logits_dtype = inputs[0].dtype
    ctx.in_place = False
    ctx.save_for_backward(grad)


def _split_gradient(saved, grad_cls, grad_obj, dtype):
    """The gradient of (classes, objectness) losses with their own cotangents: the class columns
    of the unit gradient times grad_cls, the pair columns times grad_obj (a fresh tensor)."""
    math = torch.promote_types(saved.dtype, torch.float32)
    n_cls = saved.shape[-1] - 2
    is_cls = torch.arange(saved.shape[-1], device=saved.device) < n_cls

    def column_scale(g):
        if g is None:
            return torch.zeros((), dtype=math, device=saved.device)
        g = g.to(math)
        return g[:, None] if g.dim() > 0 else g

    scale = torch.where(is_cls, column_scale(grad_cls), column_scale(grad_obj))
    return (saved.to(math) * scale).to(dtype)


def _make_backward_seesaw(scale_in_place, scale_fresh):
    def backward(ctx, grad_loss, grad_obj, _grad):
        _ops._check_first_order(ctx)
        if not ctx.needs_input_grad[0]:
            return (None,) * ctx.num_inputs
        if not ctx.split:
            saved, *applied_scale = ctx.saved_tensors
            if grad_loss is None:
                return (None,) * ctx.num_inputs
            grad = _ops.logits_gradient(ctx, saved, grad_loss, *(applied_scale or [None]), scale_in_place,
                                        scale_fresh)
            return (grad,) + (None,) * (ctx.num_inputs - 1)
        (saved,) = ctx.saved_tensors
        if grad_loss is None and grad_obj is None:
            return (None,) * ctx.num_inputs
        return (_split_gradient(saved, grad_loss, grad_obj, ctx.logits_dtype),) + (None,) * (ctx.num_inputs - 1)
    return backward


def _setup_eqlv2(ctx, inputs, output):
    loss, grad, stats = output
    ctx.mark_non_differentiable(stats)
    _ops.save_gradients(ctx, loss, (grad, stats), inputs[0], inputs[9])
    ctx.num_inputs = len(inputs)


def _make_backward_eqlv2(scale_in_place, scale_fresh):
    def backward(ctx, grad_loss, _grad, _stats):
        _ops._check_first_order(ctx)
        saved, _saved_stats, *applied_scale = ctx.saved_tensors
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return (None,) * ctx.num_inputs
        grad = _ops.logits_gradient(ctx, saved, grad_loss, *(applied_scale or [None]), scale_in_place, scale_fresh)
        return (grad,) + (None,) * (ctx.num_inputs - 1)
    return backward


def register(namespace: str, scale_in_place, scale_fresh) -> None:
    """Fake kernels and autograd formulas of seesaw_forward / eqlv2_forward in `namespace`
    ('fused_losses', or the emulator's), when its library defines them (a stale build may not)."""
    ns = getattr(torch.ops, namespace)
    if hasattr(ns, "seesaw_forward"):
        torch.library.register_fake(f"{namespace}::seesaw_forward")(_fake_seesaw)
        torch.library.register_autograd(f"{namespace}::seesaw_forward",
                                        _make_backward_seesaw(scale_in_place, scale_fresh),
                                        setup_context=_setup_seesaw)
    if hasattr(ns, "eqlv2_forward"):
        torch.library.register_fake(f"{namespace}::eqlv2_forward")(_fake_eqlv2)
        torch.library.register_autograd(f"{namespace}::eqlv2_forward",
                                        _make_backward_eqlv2(scale_in_place, scale_fresh),
                                        setup_context=_setup_eqlv2)
