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
  dtype. A backward that frees the graph (the default) runs the in-place op
  ``scale_grad_(saved, grad_output, applied_scale)`` (declared ``Tensor(a!)`` in its schema,
  returns nothing) and returns the saved tensor itself. ``applied_scale`` is a one-value tensor
  made here (1.0) that the kernel compares with grad_output on the device, so it skips the pass
  when they are equal (``loss.backward()``: no pass over the gradient, no host sync). The saved
  tensor is released once this node has run, so AccumulateGrad takes it as ``.grad`` without a
  copy, and the library never refers to it again. A backward that keeps the graph
  (retain_graph=True: :func:`graph_retained`) leaves the buffer at the unit gradient and returns
  a fresh ``saved x grad_output`` (:func:`unit_gradient_times`): a gradient handed to the user
  is never written later, and any sequence of grad_outputs (0, inf, 1e-40, ...) starts from the
  unit gradient (README "Autograd contract"). Under torch.compile the traced backward is always
  that fresh product (the compiled graph is replayed for every later backward).
* 'none' (a per-sample grad_output), or fp16 logits: the gradient is saved in the math dtype
  (float32) and the backward is the out-of-place ``scale_grad(saved, grad_output, dtype)``,
  rounded once into the logits dtype. fp16 stays float32 because a GradScaler's grad_output
  (2^16 and more) must multiply the float32 values: a 'mean' gradient of a large batch,
  rounded to fp16 first, underflows to zero.

Double backward raises a clear error. Under functorch transforms (torch.func.grad, vjp, jvp,
vmap, ...) and forward-mode AD the op layers go through :func:`call_loss`'s transform-aware
path (_TransformedLoss: setup_context, jvp, generated vmap rule); nested differentiation raises.

Call :func:`register` (idempotent) once the extension is loaded; the cpu/cuda backend modules
do so.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad as _fwad

from fused_losses import _ext

__all__ = ["register", "needs_grad", "saved_grad_dtype", "save_gradients", "logits_gradient", "graph_retained",
           "unit_gradient_times", "transforms_active", "call_loss", "DOUBLE_BACKWARD_ERROR"]

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


def graph_retained() -> bool:
    """Whether this backward may be followed by another backward of the same node: the graph
    is kept (retain_graph=True; torch.autograd.grad's default without create_graph is not to
    keep it), or no eager engine runs this code (torch.compile traces the backward once for
    every later call, so the traced backward must never hand out the saved buffer)."""
    if torch.compiler.is_compiling():
        return True
    # The engine's own flag for the running graph task (True outside any backward); the same
    # one AOTAutograd's compiled backward reads to decide whether saved tensors are used once.
    return torch._C._autograd._get_current_graph_task_keep_graph()


def unit_gradient_times(saved: torch.Tensor, grad_loss: torch.Tensor, dtype: torch.dtype,
                        channel_dim=None) -> torch.Tensor:
    """A fresh ``saved x grad_loss`` in `dtype`, multiplied in the math dtype and rounded once
    (saved: a unit-cotangent gradient; grad_loss: 0-dim, or per sample ('none'), unsqueezed at
    `channel_dim` for the softmax family). Plain torch ops, so torch.compile and functorch
    transforms see through it."""
    math_dtype = _math_dtype(saved.dtype)
    if grad_loss.dim() > 0 and channel_dim is not None:
        grad_loss = grad_loss.unsqueeze(channel_dim)
    return (saved.to(math_dtype) * grad_loss.to(math_dtype)).to(dtype)


def logits_gradient(ctx, saved, grad_loss, applied_scale, scale_in_place, scale_fresh):
    """The logits gradient of this backward (the autograd contract, README "Autograd contract").

    A gradient saved in the logits dtype (reduced loss) is handed out only by the node's last
    backward: when the graph is not retained, it is scaled in place by
    scale_in_place(saved, grad_loss, applied_scale) (free for grad_output == 1: no pass) and
    returned itself; autograd then releases the node's reference, so nothing the library owns
    refers to the tensor the user now holds. When the graph is retained (another backward of
    this node may follow) the saved buffer is left untouched and a fresh saved x grad_output is
    returned, so a returned gradient is never written again and any sequence of grad_outputs
    (0, inf, 1e-40, ...) starts from the unit gradient. Otherwise ('none', fp16) the saved
    float32 gradient is never written: scale_fresh(saved, grad_loss, logits dtype) is a new
    tensor. Under create_graph=True it raises (the saved gradient is a constant to autograd, so
    a second derivative would silently miss terms)."""
    if torch.is_grad_enabled():
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)
    if ctx.in_place:
        if not graph_retained():
            scale_in_place(saved, grad_loss, applied_scale)
            return saved
        return unit_gradient_times(saved, grad_loss, ctx.logits_dtype)
    return scale_fresh(saved, grad_loss, ctx.logits_dtype)


# Position of `compute_grad` in each forward op's schema (csrc/op_schemas.h): optional extras
# (weight, label_smoothing, ...) follow it.
COMPUTE_GRAD_POS = {"softmax_focal_forward": 8, "sigmoid_focal_forward": 6, "ohem_forward": 8, "ghmc_forward": 6,
                    "ib_forward": 9, "ghmc_softmax_scale": 7}
COMPUTE_GRAD_POS["distribution_focal_forward"] = 3  # distribution focal (#24)


def setup_saved_grads_for(name: str):
    """The setup_context of forward op `name`: saves its gradients (save_gradients)."""
    pos = COMPUTE_GRAD_POS[name]

    def setup(ctx, inputs, output):
        save_gradients(ctx, output[0], output[1:], inputs[0], inputs[pos])
        ctx.num_inputs = len(inputs)

    return setup


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


# ---- functorch transforms and forward-mode AD ----------------------------------------------
# register_autograd's generated autograd.Function has neither setup_context (functorch's grad,
# vjp, jacrev refuse it) nor a jvp (forward AD would silently see a zero tangent). Under a
# transform, or with a forward-AD tangent on an input, the op layers (cpu/cuda backend,
# fused_losses._triton.ops) call the op through _TransformedLoss instead: the same op with
# compute_grad=True, whose saved gradient gives the backward (always out of place) and the jvp
# (the gradient contracted with the tangent). vmap: generate_vmap_rule runs the op per batch
# element (torch's fallback for ops without a batching rule). Higher-order derivatives raise.

def transforms_active(*tensors) -> bool:
    """True under a functorch transform (grad, vjp, jacrev, jacfwd, jvp, vmap, ...) or when
    an input carries a forward-AD tangent. False while torch.compile traces (dynamo handles
    the ops itself). A few hundred ns; the common path pays only this."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    if _fwad._current_level < 0:
        return False
    return any(t is not None and _fwad.unpack_dual(t).tangent is not None for t in tensors)


def _differentiation_depth() -> int:
    """How many differentiating transforms are active: functorch grad/vjp levels plus the
    forward-AD levels (torch.func.jvp's, or a plain dual level)."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    keys = [i.key() for i in retrieve_all_functorch_interpreters()]
    jvp = sum(k == TransformType.Jvp for k in keys)
    return sum(k == TransformType.Grad for k in keys) + max(jvp, int(_fwad._current_level >= 0))


def _contract(grad: torch.Tensor, tangent: torch.Tensor, reduced: bool, channel_dim) -> torch.Tensor:
    """jvp of a loss whose unit-cotangent gradient is `grad`: <grad, tangent> summed over the
    whole tensor (reduced), over the class dim (softmax 'none'), or elementwise (sigmoid)."""
    prod = grad.to(_math_dtype(grad.dtype)) * tangent.to(_math_dtype(grad.dtype))
    if reduced:
        return prod.sum()
    return prod.sum(dim=channel_dim) if channel_dim is not None else prod


class _TransformedLoss(torch.autograd.Function):
    """forward(run, channel_dim, logits, features, *aux) -> (loss, grad_logits, grad_features),
    with run(compute_grad, logits, features, *aux) -> (loss, grad_logits, grad_features or None)
    calling the fused op. The gradients are outputs so that they stay visible to functorch."""

    generate_vmap_rule = True

    @staticmethod
    def forward(run, channel_dim, logits, features, *aux):
        loss, grad_logits, grad_features = run(True, logits, features, *aux)
        if grad_features is None:
            grad_features = logits.new_empty((0,))
        return loss, grad_logits, grad_features

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, channel_dim, logits, features, *_ = inputs
        loss, grad_logits, grad_features = output
        ctx.mark_non_differentiable(grad_logits, grad_features)
        ctx.set_materialize_grads(False)
        ctx.channel_dim = channel_dim
        ctx.reduced = loss.dim() == 0
        ctx.loss_dtype = loss.dtype
        ctx.logits_dtype = logits.dtype
        ctx.features_dtype = None if features is None else features.dtype
        # Feature norms (N,) get one value per sample; raw (N, D) features (Triton's ib) a row.
        ctx.features_dim = None if features is None or features.dim() < 2 else 1
        ctx.save_for_backward(grad_logits, grad_features)
        ctx.save_for_forward(grad_logits, grad_features)

    @staticmethod
    def backward(ctx, grad_loss, _grad_logits, _grad_features):
        grad_logits, grad_features = ctx.saved_tensors
        n_aux = len(ctx.needs_input_grad) - 4
        if grad_loss is None:
            return (None,) * (4 + n_aux)
        gl = unit_gradient_times(grad_logits, grad_loss, ctx.logits_dtype, ctx.channel_dim) \
            if ctx.needs_input_grad[2] else None
        gf = None
        if ctx.features_dtype is not None and ctx.needs_input_grad[3] and grad_features.numel() > 0:
            gf = unit_gradient_times(grad_features, grad_loss, ctx.features_dtype, ctx.features_dim)
        return (None, None, gl, gf) + (None,) * n_aux

    @staticmethod
    def jvp(ctx, _run, _channel_dim, tangent_logits, tangent_features, *_aux):
        grad_logits, grad_features = ctx.saved_tensors
        out = None
        if tangent_logits is not None:
            out = _contract(grad_logits, tangent_logits, ctx.reduced, ctx.channel_dim)
        if tangent_features is not None and ctx.features_dtype is not None and grad_features.numel() > 0:
            term = _contract(grad_features, tangent_features, ctx.reduced, ctx.features_dim)
            out = term if out is None else out + term
        return (None if out is None else out.to(ctx.loss_dtype)), None, None


def call_loss(run, logits: torch.Tensor, features, *aux, channel_dim):
    """Run a fused loss op: ``run(compute_grad, logits, features, *aux)`` returns (loss,
    grad_logits, grad_features or None). The common path calls it directly (the op's own
    autograd formula: the free backward); under a functorch transform or forward AD it goes
    through _TransformedLoss. channel_dim: the class dim a per-sample ('none') cotangent is
    broadcast over (softmax family: 1; elementwise sigmoid family: None)."""
    if not transforms_active(logits, features):
        return run(needs_grad(logits) if features is None else needs_grad(logits, features),
                   logits, features, *aux)[0]
    if _differentiation_depth() > 1:
        raise RuntimeError(DOUBLE_BACKWARD_ERROR.replace(
            "(create_graph=True, or differentiating a gradient)",
            "(nested differentiating transforms, e.g. torch.func.hessian or jacfwd of a gradient)"))
    return _TransformedLoss.apply(run, channel_dim, logits, features, *aux)[0]


# ---- fake (meta) kernels ----------------------------------------------------------------------
def _fake_softmax_focal(logits, target, alpha_per_class, alpha, gamma, ignore_index, reduction, from_logits,
                        compute_grad, weight=None, label_smoothing=0.0, epsilon=0.0):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad, reduction)


def _fake_sigmoid_focal(logits, target, alpha, gamma, ignore_index, reduction, compute_grad, alpha_per_class=None,
                        weight=None, epsilon=0.0):
    return _loss_like(logits, logits.shape, reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ohem(logits, target, keep_fraction, keep_count, thresh, min_kept_total, ignore_index, reduction,
               compute_grad, weight=None, label_smoothing=0.0):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ghmc_bin_weights(logits, target, state, bins, momentum, use_sigmoid, ignore_index, weight=None):
    return logits.new_empty((bins,), dtype=torch.promote_types(logits.dtype, torch.float32))


def _fake_ghmc_bin_counts(logits, target, bins, use_sigmoid, ignore_index, weight=None):
    return logits.new_empty((bins + 1,), dtype=torch.int64)


def _fake_ghmc(logits, target, bin_weights, use_sigmoid, ignore_index, reduction, compute_grad, weight=None,
               label_smoothing=0.0):
    shape = logits.shape if use_sigmoid else _softmax_none_shape(logits)
    return _loss_like(logits, shape, reduction), _grad_like(logits, compute_grad, reduction)


def _fake_ghmc_softmax_prepass(logits, target, state, bins, momentum, ignore_index, weight=None):
    rows = logits.numel() // logits.shape[1] if logits.dim() > 1 and logits.shape[1] > 0 else 0
    return (logits.new_empty((bins,), dtype=torch.float32), logits.new_empty((2, rows), dtype=torch.float32),
            torch.empty_like(logits, dtype=torch.float32, memory_format=torch.contiguous_format))


def _fake_ghmc_softmax_scale(logits, target, bin_weights, row_stats, unit_grad, ignore_index, reduction, compute_grad,
                             weight=None):
    return _loss_like(logits, _softmax_none_shape(logits), reduction), _grad_like(logits, compute_grad, reduction)


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


# ---- distribution focal (#24) ----
def _fake_distribution_focal(logits, target, reduction, compute_grad, weight=None):
    return _loss_like(logits, logits.shape[:-1], reduction), _grad_like(logits, compute_grad, reduction)


_FORWARD_OPS["distribution_focal_forward"] = (_fake_distribution_focal, _backward_logits_only)


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
        torch.library.register_autograd(qualname, backward, setup_context=setup_saved_grads_for(name))
    if hasattr(torch.ops.fused_losses, "ghmc_softmax_prepass"):
        # CPU-only ops (csrc/cpu/common.cpp registers them): not in _FORWARD_OPS, which the emulator's
        # namespace mirrors.
        torch.library.register_fake("fused_losses::ghmc_softmax_prepass")(_fake_ghmc_softmax_prepass)
        torch.library.register_fake("fused_losses::ghmc_softmax_scale")(_fake_ghmc_softmax_scale)
        torch.library.register_autograd("fused_losses::ghmc_softmax_scale", _backward_logits_only,
                                        setup_context=setup_saved_grads_for("ghmc_softmax_scale"))
    torch.library.register_fake("fused_losses::ghmc_bin_weights")(_fake_ghmc_bin_weights)
    torch.library.register_fake("fused_losses::ghmc_bin_counts")(_fake_ghmc_bin_counts)
    torch.library.register_fake("fused_losses::scale_grad")(_fake_scale_grad)
    torch.library.register_fake("fused_losses::scale_grad_")(_fake_scale_grad_)
    torch.library.register_autograd("fused_losses::scale_grad", _backward_scale_grad, setup_context=_setup_scale_grad)
    # ---- seesaw / eqlv2 (#25) ----
    from fused_losses import _longtail  # noqa: PLC0415 - imports this module
    _longtail.register("fused_losses", torch.ops.fused_losses.scale_grad_, torch.ops.fused_losses.scale_grad)


# ---- quality_focal / varifocal / asymmetric (#24) ----
def _fake_detector_sigmoid(logits, target, score, loss, p0, p1, p2, p3, flags, ignore_index, reduction,
                           compute_grad, weight=None):
    # quality_focal's 'none' loss is per row (the class sum), the others' elementwise
    none_shape = logits.shape[:-1] if loss == "quality_focal" else logits.shape
    return _loss_like(logits, none_shape, reduction), _grad_like(logits, compute_grad, reduction)


COMPUTE_GRAD_POS["detector_sigmoid_forward"] = 11
_FORWARD_OPS["detector_sigmoid_forward"] = (_fake_detector_sigmoid, _backward_logits_only)
