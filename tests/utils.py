"""Shared test helpers: one place for tolerances, the relative-error check and input makers.

Exactness rule (README, "Accuracy"): compare against the float64 reference by
    rel_error(out, ref) = ||out - ref|| / ||ref||      (NaN where the reference has NaN is a match)
  float64 inputs:  <= TOL[float64]
  float32 inputs:  <= TOL[float32] = 1e-5, for the loss and the gradient
  fp16/bf16:       compute in fp32; the result must be at least as close to float64 as the eager
                   reference run in the same low precision (reference(..., upcast=False)), or
                   within the unit roundoff of the dtype (nobody can beat rounding the output).
"""
from __future__ import annotations

import torch

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
UNIT_ROUNDOFF = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
LOW_PRECISION = (torch.float16, torch.bfloat16)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; positions where both are NaN (or equal infs) match."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), (
        f"NaN pattern differs: {int(nan_out.sum())} NaN in output vs {int(nan_ref.sum())} in reference")
    same_inf = torch.isinf(ref) & (out == ref)
    mask = ~nan_ref & ~same_inf
    diff = torch.linalg.vector_norm((out - ref)[mask])
    scale = torch.linalg.vector_norm(ref[mask])
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def _where(out, ref) -> str:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if out.numel() == 0:
        return "empty"
    d = (out - ref).abs().nan_to_num(0.0)
    i = int(d.reshape(-1).argmax())
    idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), out.shape)) if out.dim() else ()
    return f"max |diff| {float(d.reshape(-1)[i]):.3e} at {idx}: got {float(out.reshape(-1)[i])!r}, ref {float(ref.reshape(-1)[i])!r}"


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> float:
    err = rel_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}; {_where(out, ref)}"
    return err


def assert_matches_reference(out, ref64, dtype, what="", eager_lowp=None) -> float:
    """The exactness rule above for a result computed from `dtype` inputs."""
    if dtype in LOW_PRECISION:
        assert eager_lowp is not None, "low-precision checks need the eager low-precision result"
        bound = max(rel_error(eager_lowp, ref64), UNIT_ROUNDOFF[dtype])
        return assert_rel_close(out, ref64, bound, f"{what} ({dtype}, bound = eager low-precision error)")
    return assert_rel_close(out, ref64, TOL[dtype], f"{what} ({dtype})")


def softmax_case(shape, dtype=torch.float32, device="cpu", *, ignore_frac=0.0, ignore_index=-100, scale=3.0,
                 seed=0, target_dtype=torch.int64):
    """logits of `shape` = (N, C, d...) ~ scale * randn and a matching class-index target with
    about ignore_frac of the entries set to ignore_index."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    tshape = (shape[0], *shape[2:])
    target = torch.randint(0, shape[1], tshape, generator=g)
    if ignore_frac > 0:
        target[torch.rand(tshape, generator=g) < ignore_frac] = ignore_index
    return logits.to(device), target.to(device=device, dtype=target_dtype)


def sigmoid_case(shape, dtype=torch.float32, device="cpu", *, kind="labels", ignore_frac=0.0, ignore_index=-100,
                 scale=3.0, seed=0):
    """logits (..., C) and a target: kind='labels' integer labels in [0, C] (C = background),
    'float' hard 0/1 float targets, 'soft' targets in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    c = shape[-1]
    if kind == "labels":
        target = torch.randint(0, c + 1, shape[:-1], generator=g)
        if ignore_frac > 0:
            target[torch.rand(shape[:-1], generator=g) < ignore_frac] = ignore_index
    elif kind == "float":
        target = (torch.rand(shape, generator=g) < 0.1).to(dtype)
    elif kind == "soft":
        target = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype)
    else:
        raise ValueError(kind)
    return logits.to(device), target.to(device)


def loss_and_grad(fn, logits: torch.Tensor, *args, grad_seed=1, **kwargs):
    """Run fn(logits_leaf, *args, **kwargs), backprop a fixed random cotangent (ones for a
    scalar) and return (loss, grad) detached."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        g = torch.Generator().manual_seed(grad_seed)
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype=out.dtype, device=out.device)
    if out.requires_grad:
        out.backward(cot)
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return out.detach(), grad.detach()


def opcheck_loss_op(op, args) -> None:
    """torch.library.opcheck of a loss op (C++ or Triton layer). A reduced loss's backward
    scales the op's own gradient output in place (scale_grad_, fused_losses/_ops.py); opcheck
    returns that output to its caller, and AOTAutograd cannot trace a backward that mutates a
    forward *output* ("... was invalid, but is output"). The public API never returns it, and
    its compiled forward + backward is tested (tests/test_backward.py). So for those samples:
    every check on inputs that need no gradient, and all but test_aot_dispatch_dynamic with them."""
    logits = args[0]
    # compute_grad / need_grad: the last bool before the optional trailing extras (weight,
    # label_smoothing, ...): the last bool argument of the call.
    need_grad = [a for a in args if isinstance(a, bool)][-1:] == [True]
    in_place = (isinstance(logits, torch.Tensor) and logits.requires_grad and need_grad
                and any(a in ("mean", "sum") for a in args if isinstance(a, str)) and logits.dtype != torch.float16)
    if not in_place:
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# Accuracy at the edges (tests/test_accuracy_edges.py; README "Accuracy")
# --------------------------------------------------------------------------------------------
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # 2^-126: below it float32 carries no full relative precision


def assert_close_per_sample(out: torch.Tensor, ref: torch.Tensor, what: str, *, rtol: float,
                            atol: float = FLOAT32_TINY) -> None:
    """Every sample within rtol of the reference: ||out_s - ref_s|| <= rtol ||ref_s|| + atol.

    out, ref: (S, K) = S samples of K values each (a softmax row's gradient, one loss value, one
    element of a sigmoid loss); the norm is the L2 norm over the sample's K values. atol (float32's
    smallest normal by default) only matters where the reference itself is below float32's normal
    range. NaN must match NaN; equal infinities match."""
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    assert out.shape == ref.shape and out.dim() == 2, f"{what}: shapes {tuple(out.shape)} / {tuple(ref.shape)}"
    nan_out, nan_ref = torch.isnan(out), torch.isnan(ref)
    assert torch.equal(nan_out, nan_ref), f"{what}: NaN at {nan_out.nonzero().tolist()}, reference at " \
                                          f"{nan_ref.nonzero().tolist()}"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf_ref) and torch.equal(out[inf_ref], ref[inf_ref]), \
        f"{what}: infinities differ from the reference's"
    keep = ~(nan_ref | inf_ref)
    diff = torch.linalg.vector_norm(torch.where(keep, out - ref, 0.0), dim=1)
    scale = torch.linalg.vector_norm(torch.where(keep, ref, 0.0), dim=1)
    bad = (diff > rtol * scale + atol).nonzero().flatten()
    if bad.numel():
        i = int(bad[torch.argmax((diff / scale.clamp_min(atol))[bad])])
        raise AssertionError(
            f"{what}: {bad.numel()} of {out.shape[0]} samples above rtol {rtol:.0e} (+ atol {atol:.1e}); worst: sample "
            f"{i}, relative error {float(diff[i] / scale[i]) if scale[i] > 0 else float('inf'):.3e}, got "
            f"{out[i, :4].tolist()}, reference {ref[i, :4].tolist()}")


class _LogSoftmaxFloat64(torch.autograd.Function):
    """log_softmax along `dim` without the one rounding that float64 torch cannot avoid:
    log p_argmax = -log1p(sum_{j != argmax} e^(x_j - m)) instead of -log(1 + that sum), and
    1 - p_argmax = that sum / (1 + that sum) in the backward instead of 1 - p_argmax. torch's
    float64 log_softmax has an absolute error of ~1e-16 in log p_t, i.e. a *relative* error of
    1e-16 / (1 - p_t) in a confident sample's loss (1e-4 at a margin of 30 logits), so it is no
    ground truth for the fp32 kernels there; this form stays at a few float64 ulps."""

    @staticmethod
    def forward(ctx, x, dim):
        xm = x.movedim(dim, -1)
        m, arg = xm.max(dim=-1, keepdim=True)
        shifted = xm - m
        e = torch.exp(shifted)
        rest = e.scatter(-1, arg, 0.0).sum(-1, keepdim=True)  # sum over j != argmax
        log_s = torch.log1p(rest)
        ctx.save_for_backward(e / (1.0 + rest), rest / (1.0 + rest), arg)
        ctx.dim = dim
        return (shifted - log_s).movedim(-1, dim)

    @staticmethod
    def backward(ctx, grad):
        p, one_minus_p_max, arg = ctx.saved_tensors
        g = grad.movedim(ctx.dim, -1)
        total = g.sum(-1, keepdim=True)
        out = g - p * total
        g_max = g.gather(-1, arg)
        # g_a - p_a total = g_a (1 - p_a) - p_a (total - g_a), without the cancellation of 1 - p_a.
        out = out.scatter(-1, arg, g_max * one_minus_p_max - p.gather(-1, arg) * (total - g_max))
        return out.movedim(-1, ctx.dim), None


class accurate_float64_log_softmax:
    """Context manager: while active, torch.log_softmax of float64 tensors (which the reference
    calls for every softmax loss) is _LogSoftmaxFloat64; other dtypes are untouched (so the
    reference's float32 GHM-C bins stay as they are). Makes the float64 reference a ground
    truth for confident samples (tests/test_accuracy_edges.py)."""

    def __enter__(self):
        self._original = torch.log_softmax
        original = self._original

        def log_softmax(x, dim=None, *args, **kwargs):
            if isinstance(x, torch.Tensor) and x.dtype == torch.float64 and dim is not None and not args and not kwargs:
                return _LogSoftmaxFloat64.apply(x, dim)
            return original(x, dim, *args, **kwargs)

        torch.log_softmax = log_softmax
        return self

    def __exit__(self, *exc):
        torch.log_softmax = self._original
        return False
