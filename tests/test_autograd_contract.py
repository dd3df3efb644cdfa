"""The autograd contract (README "Autograd contract"), on every backend against the float64
reference (issue 13, classes 1, 2, 3, 7, 8, 9's API side).

Backends: 'reference', 'cpu' and 'triton' on CPU tensors (Triton under TRITON_INTERPRET=1,
tests/conftest.py), and 'cuda'/'triton' on CUDA tensors where a GPU exists (the pairs of
tests/test_backward.py); an unavailable backend is skipped with its reason. Small shapes: the
module runs in well under a minute on one core.

1+2. Retained graphs: a gradient the library returned is never written again (neither by a
     later backward of the same graph nor by any other), a user's in-place edit of it never
     changes a later backward, and any sequence of grad_outputs (1, 5, 0, inf, 1e-40, -2, ...)
     gives the reference's gradients; torch.autograd.grad and .backward(); hooks on non-leaf
     logits; eager and torch.compile. The common case stays free (tests/test_backward.py).
3.   Forward-mode AD (torch.func.jvp, forward_ad.make_dual), torch.func.grad / vjp, vmap (and
     vmap of grad) on every backend; nested differentiation on the fused backends is an error.
7.   Model dtype casts never round a loss module's buffers (GHM-C's state stays float32); device
     moves still apply.
8.   torch.compile(fullgraph=True, dynamic=True) of every loss and module, defaults included.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import forward_ad as fwAD

import fused_losses as fl
from tests.conftest import DEVICES
from tests.test_backward import _require
from tests.utils import TOL, UNIT_ROUNDOFF, assert_rel_close, sigmoid_case, softmax_case

PAIRS = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
PAIRS += [("cuda", "cuda"), ("triton", "cuda"), ("reference", "cuda")] * ("cuda" in DEVICES)
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]
FUSED = [p for p in PAIRS if p[0] != "reference"]
FUSED_IDS = [f"{b}-{d}" for b, d in FUSED]


# (make(dtype, device) -> (logits, target, extra tensors), kwargs); every loss, small shapes.
def _features(n, device, seed):
    return (torch.rand(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1).to(device)


CASES = {
    "focal": (lambda dt, dev: softmax_case((13, 5), dt, dev, ignore_frac=0.2, seed=1) + ((),),
              dict(gamma=2.0, alpha=0.25)),
    "focal_spatial": (lambda dt, dev: softmax_case((2, 5, 3, 2), dt, dev, ignore_frac=0.2, seed=2) + ((),),
                      dict(gamma=1.5)),
    "sigmoid_focal": (lambda dt, dev: sigmoid_case((9, 6), dt, dev, kind="labels", seed=3) + ((),),
                      dict(alpha=0.25, gamma=2.0)),
    "ohem": (lambda dt, dev: softmax_case((16, 5), dt, dev, seed=4) + ((),), dict(keep=0.5)),
    "ghmc": (lambda dt, dev: sigmoid_case((9, 6), dt, dev, kind="float", seed=5) + ((),), dict(bins=5)),
    "ghmc_softmax": (lambda dt, dev: softmax_case((16, 5), dt, dev, seed=6) + ((),), dict(bins=5, use_sigmoid=False)),
    "ib": (lambda dt, dev: softmax_case((11, 5), dt, dev, scale=1.0, seed=7) + ((_features(11, dev, 8).to(dt),),),
           dict(alpha=10.0)),
}
LOSS_OF = {"focal_spatial": "focal", "ghmc_softmax": "ghmc"}


def _loss_fn(case: str):
    return getattr(fl, LOSS_OF.get(case, case))


def _make(case, dtype, device):
    make, kwargs = CASES[case]
    logits, target, extra = make(dtype, device)
    return logits, target, extra, kwargs


def _reference_vjp(case, logits, target, extra, reduction, cot, kwargs):
    """float64 reference gradient w.r.t. the logits for cotangent `cot` (a tensor)."""
    x = logits.detach().double().requires_grad_(True)
    ex = [e.detach().double() for e in extra]
    out = _loss_fn(case)(x, target, *ex, reduction=reduction, backend="reference", **kwargs)
    (g,) = torch.autograd.grad(out, x, cot.to(device=out.device, dtype=torch.float64))
    return g


def _unit_cotangent(out: torch.Tensor, seed=11):
    if out.dim() == 0:
        return torch.ones((), dtype=out.dtype, device=out.device)
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(out.shape, generator=g, dtype=torch.float64) + 0.5).to(device=out.device, dtype=out.dtype)


def _unchanged(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise the same values (NaN where NaN: a grad_output of inf gives inf * 0 = NaN)."""
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


def _tol(dtype):
    # Low precision: the saved gradient rounded once, then scaled and rounded again.
    return TOL[dtype] if dtype in TOL else 4 * UNIT_ROUNDOFF[dtype]


# --------------------------------------------------------------------------------------------
# 1 + 2: retained graphs, returned gradients, grad_output sequences, hooks
# --------------------------------------------------------------------------------------------
SEQUENCE = (1.0, 5.0, 0.0, math.inf, 1e-40, -2.0, 1.0)


def _run_sequence(backend, device, case, reduction, api, dtype):
    logits, target, extra, kwargs = _make(case, dtype, device)
    x = logits.clone().requires_grad_(True)
    out = _loss_fn(case)(x, target, *extra, reduction=reduction, backend=backend, **kwargs)
    base = _unit_cotangent(out)
    ref_unit = _reference_vjp(case, logits, target, extra, reduction, base, kwargs)
    handed = []  # (tensor the library returned, its value as we last left it)
    for step, scale in enumerate(SEQUENCE + (3.0,)):
        last = step == len(SEQUENCE)
        cot = base * scale
        if api == "grad":
            (g,) = torch.autograd.grad(out, x, cot, retain_graph=not last)
        else:
            x.grad = None
            out.backward(cot, retain_graph=not last)
            g = x.grad
        for prev, value in handed:
            assert _unchanged(prev, value), f"{case}: a returned gradient was written by a later backward (step {step})"
        assert all(g is not prev for prev, _ in handed)
        if math.isfinite(scale) and scale != 1e-40:
            assert_rel_close(g, ref_unit * scale, _tol(dtype),
                             f"{backend} {case} {reduction} {dtype} grad_output x{scale}")
        if step == 0:
            g.mul_(0.5)  # the user edits the gradient it holds: no later backward may see it
        handed.append((g, g.clone()))
    with pytest.raises(RuntimeError, match="second time|freed"):
        torch.autograd.grad(out, x, base)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("api", ["grad", "backward"])
def test_retained_graph_any_grad_output_sequence(backend, device, case, reduction, api):
    _run_sequence(_require(backend), device, case, reduction, api, torch.float32)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retained_graph_low_precision(backend, device, dtype, reduction):
    """bf16 'mean' saves its gradient in bf16 (in place path), fp16 and 'none' in float32
    (out-of-place path): both must follow the contract."""
    _run_sequence(_require(backend), device, "focal", reduction, "grad", dtype)


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_hooks_on_non_leaf_logits(backend, device, case):
    """A gradient captured by a hook on non-leaf logits is never changed by a later backward;
    the leaf upstream accumulates the reference's gradients."""
    backend = _require(backend)
    logits, target, extra, kwargs = _make(case, torch.float32, device)
    w = torch.tensor(1.5, device=device, requires_grad=True)
    z = logits * w  # non-leaf logits
    captured = []
    z.register_hook(lambda g: captured.append((g, g.clone())))
    out = _loss_fn(case)(z, target, *extra, reduction="mean", backend=backend, **kwargs)
    out.backward(torch.tensor(0.0, device=device), retain_graph=True)
    out.backward(torch.tensor(2.0, device=device), retain_graph=True)
    out.backward(torch.tensor(-1.0, device=device))
    for g, value in captured:
        assert _unchanged(g, value), "a gradient handed to a hook was written later"
    ref = _reference_vjp(case, logits * 1.5, target, extra, "mean", torch.tensor(1.0), kwargs)
    for (g, _), scale in zip(captured, (0.0, 2.0, -1.0)):
        assert_rel_close(g, ref * scale, TOL[torch.float32], f"{backend} {case} hook x{scale}")
    assert_rel_close(w.grad, (ref * logits.double()).sum() * 1.0, TOL[torch.float32], f"{backend} {case} w.grad")


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_retained_graph_copies_and_last_backward_hands_over(backend, device):
    """The design behind 1+2: while the graph is retained the node returns fresh tensors and
    keeps its buffer at the unit gradient; the last backward (graph freed) scales that buffer in
    place and hands it over (the free path of tests/test_backward.py)."""
    backend = _require(backend)
    logits, target, _, kwargs = _make("focal", torch.float32, device)
    x = logits.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fl.focal(x, target, backend=backend, **kwargs)
    buffer = next(t for t in saved if t.shape == logits.shape)
    unit = buffer.clone()
    (g1,) = torch.autograd.grad(out, x, torch.tensor(4.0, device=device), retain_graph=True)
    assert g1.data_ptr() != buffer.data_ptr() and torch.equal(buffer, unit)
    (g2,) = torch.autograd.grad(out, x, torch.tensor(1.0, device=device))
    assert g2.data_ptr() == buffer.data_ptr() and torch.equal(g2, unit)
    assert torch.equal(g1, unit * 4.0)


@pytest.mark.compile
@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
@pytest.mark.parametrize("case", ["focal", "sigmoid_focal"])
def test_compiled_retained_graph(backend, device, case):
    backend = _require(backend)
    logits, target, extra, kwargs = _make(case, torch.float32, device)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: _loss_fn(case)(x, t, backend=backend, reduction="sum", **kwargs), fullgraph=True)
    x = logits.clone().requires_grad_(True)
    out = fn(x, target)
    ref = _reference_vjp(case, logits, target, extra, "sum", torch.tensor(1.0), kwargs)
    handed = []
    for step, scale in enumerate((1.0, 0.0, 5.0, 1e-40, 1.0, 2.0)):
        last = step == 5
        (g,) = torch.autograd.grad(out, x, torch.tensor(scale, device=device), retain_graph=not last)
        for prev, value in handed:
            assert _unchanged(prev, value), "compiled: a returned gradient was written by a later backward"
        if scale != 1e-40:
            assert_rel_close(g, ref * scale, TOL[torch.float32], f"compiled {backend} {case} x{scale}")
        if step == 0:
            g.mul_(0.5)
        handed.append((g, g.clone()))


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_create_graph_is_a_clear_error(backend, device):
    backend = _require(backend)
    logits, target, _, kwargs = _make("focal", torch.float32, device)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, backend=backend, **kwargs)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


# --------------------------------------------------------------------------------------------
# 3: forward-mode AD and torch.func
# --------------------------------------------------------------------------------------------
def _tangents(logits, extra, seed=21):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(logits.shape, generator=g, dtype=torch.float64).to(device=logits.device, dtype=logits.dtype)
    ve = tuple(torch.randn(e.shape, generator=g, dtype=torch.float64).to(device=e.device, dtype=e.dtype) for e in extra)
    return v, ve


def _reference_jvp(case, logits, target, extra, v, ve, reduction, kwargs):
    """float64 directional derivative of the reference loss: the contraction of its reverse-mode
    gradients with the tangents (independent of the forward-AD code under test)."""
    x = logits.detach().double().requires_grad_(True)
    ex = [e.detach().double().requires_grad_(True) for e in extra]
    out = _loss_fn(case)(x, target, *ex, reduction=reduction, backend="reference", **kwargs)
    flat = out.reshape(-1)
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], [x, *ex], retain_graph=True, allow_unused=True)
        total = sum(((gr if gr is not None else 0) * t.double()).sum() for gr, t in zip(grads, (v, *ve)))
        rows.append(total)
    return torch.stack(rows).reshape(out.shape) if rows else out.detach()


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("api", ["func.jvp", "make_dual"])
def test_forward_mode_ad(backend, device, case, reduction, api):
    backend = _require(backend)
    logits, target, extra, kwargs = _make(case, torch.float32, device)
    v, ve = _tangents(logits, extra)
    fn = _loss_fn(case)
    if api == "func.jvp":
        out, tangent = torch.func.jvp(lambda x, *e: fn(x, target, *e, reduction=reduction, backend=backend, **kwargs),
                                      (logits, *extra), (v, *ve))
    else:
        with fwAD.dual_level():
            duals = [fwAD.make_dual(a, t) for a, t in zip((logits, *extra), (v, *ve))]
            out_dual = fn(duals[0], target, *duals[1:], reduction=reduction, backend=backend, **kwargs)
            out, tangent = fwAD.unpack_dual(out_dual)
    assert tangent is not None, f"{backend} {case}: forward AD lost the tangent"
    assert tangent.dtype == out.dtype and tangent.shape == out.shape
    ref = _reference_jvp(case, logits, target, extra, v, ve, reduction, kwargs)
    assert_rel_close(tangent, ref, TOL[torch.float32], f"{backend} {case} {reduction} {api} tangent")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", list(CASES))
def test_func_grad_and_vjp(backend, device, case):
    backend = _require(backend)
    logits, target, extra, kwargs = _make(case, torch.float32, device)
    fn = _loss_fn(case)
    g = torch.func.grad(lambda x: fn(x, target, *extra, reduction="mean", backend=backend, **kwargs))(logits)
    ref = _reference_vjp(case, logits, target, extra, "mean", torch.tensor(1.0), kwargs)
    assert_rel_close(g, ref, TOL[torch.float32], f"{backend} {case} torch.func.grad")
    out, vjp_fn = torch.func.vjp(lambda x: fn(x, target, *extra, reduction="none", backend=backend, **kwargs), logits)
    cot = _unit_cotangent(out)
    (gv,) = vjp_fn(cot)
    ref = _reference_vjp(case, logits, target, extra, "none", cot, kwargs)
    assert_rel_close(gv, ref, TOL[torch.float32], f"{backend} {case} torch.func.vjp 'none'")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", ["focal", "sigmoid_focal", "ib"])
def test_jacrev_and_jacfwd(backend, device, case):
    """Per-sample Jacobians of the 'none' loss, reverse (vmap of vjp) and forward (vmap of jvp)."""
    backend = _require(backend)
    logits, target, extra, kwargs = _make(case, torch.float32, device)
    fn = _loss_fn(case)
    f = lambda x: fn(x, target, *extra, reduction="none", backend=backend, **kwargs)  # noqa: E731
    ref = torch.func.jacrev(lambda x: fn(x, target, *[e.double() for e in extra], reduction="none",
                                          backend="reference", **kwargs))(logits.double())
    assert_rel_close(torch.func.jacrev(f)(logits), ref, TOL[torch.float32], f"{backend} {case} jacrev")
    assert_rel_close(torch.func.jacfwd(f)(logits), ref, TOL[torch.float32], f"{backend} {case} jacfwd")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", [c for c in CASES if LOSS_OF.get(c, c) != "ghmc"])
def test_vmap_and_per_sample_grads(backend, device, case):
    """vmap over a leading batch dim is one independent loss per batch element (the fused ops
    run once per element: torch's fallback for ops without a batching rule)."""
    backend = _require(backend)
    parts = [_make(case, torch.float32, device) for _ in range(3)]
    kwargs = parts[0][3]
    for i, p in enumerate(parts):  # three different batch elements
        parts[i] = (p[0] * (1 + 0.2 * i), p[1], p[2], p[3])
    xs = torch.stack([p[0] for p in parts])
    ts = torch.stack([p[1] for p in parts])
    es = tuple(torch.stack([p[2][k] for p in parts]) for k in range(len(parts[0][2])))
    fn = _loss_fn(case)

    def loss(x, t, *e):
        return fn(x, t, *e, reduction="mean", backend=backend, **kwargs)

    out = torch.func.vmap(loss)(xs, ts, *es)
    grads = torch.func.vmap(torch.func.grad(loss))(xs, ts, *es)
    for i, (x, t, e, _) in enumerate(parts):
        ref_out = fn(x.double(), t, *[a.double() for a in e], reduction="mean", backend="reference", **kwargs)
        assert_rel_close(out[i], ref_out, TOL[torch.float32], f"{backend} {case} vmap loss [{i}]")
        ref = _reference_vjp(case, x, t, e, "mean", torch.tensor(1.0), kwargs)
        assert_rel_close(grads[i], ref, TOL[torch.float32], f"{backend} {case} vmap(grad) [{i}]")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("case", ["ghmc", "ghmc_softmax"])
def test_ghmc_under_vmap_is_a_clear_error(backend, device, case):
    backend = _require(backend)
    logits, target, _, kwargs = _make(case, torch.float32, device)
    xs, ts = torch.stack([logits, logits]), torch.stack([target, target])
    with pytest.raises(RuntimeError, match="^ghmc: torch.func.vmap is not supported"):
        torch.func.vmap(lambda x, t: fl.ghmc(x, t, backend=backend, **kwargs))(xs, ts)


@pytest.mark.parametrize("backend,device", FUSED, ids=FUSED_IDS)
def test_nested_differentiation_is_a_clear_error(backend, device):
    """The fused ops' derivative is a saved constant: a second derivative would silently miss
    terms, so nested transforms raise (backend='reference' supports them)."""
    backend = _require(backend)
    logits, target, _, kwargs = _make("focal", torch.float32, device)

    def f(x):
        return fl.focal(x, target, backend=backend, **kwargs)

    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.hessian(f)(logits)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda x: torch.func.grad(f)(x).sum())(logits)
    # The reference differentiates twice: its Hessian-vector product matches a finite difference.
    ref = lambda x: fl.focal(x, target, backend="reference", **kwargs)  # noqa: E731
    x64, v = logits.double(), torch.randn(logits.shape, dtype=torch.float64, device=logits.device)
    hvp = torch.func.jvp(torch.func.grad(ref), (x64,), (v,))[1]
    eps = 1e-6
    fd = (torch.func.grad(ref)(x64 + eps * v) - torch.func.grad(ref)(x64 - eps * v)) / (2 * eps)
    assert_rel_close(hvp, fd, 1e-6, "reference Hessian-vector product")


# --------------------------------------------------------------------------------------------
# 7: module buffers across model dtype casts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cast", ["double", "half", "bfloat16", "float"])
def test_ghmc_module_survives_model_casts(cast):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    model.loss = fl.nn.GHMCLoss(bins=5, momentum=0.5)
    x = torch.randn(8, 4)
    y = (torch.rand(8, 6) < 0.3).float()
    with torch.no_grad():
        model.loss(model[0](x), y)
    before = model.loss.acc_sum.clone()
    {"double": model.double, "half": model.half, "bfloat16": lambda: model.to(torch.bfloat16),
     "float": model.float}[cast]()
    dtype = model[0].weight.dtype
    assert model.loss.acc_sum.dtype == torch.float32 and torch.equal(model.loss.acc_sum, before)
    logits = model[0](x.to(dtype))
    out = model.loss(logits, y.to(dtype))
    state = before.clone()
    ref = fl.ghmc(logits.detach().double(), y.double(), bins=5, momentum=0.5, state=state, backend="reference")
    assert torch.equal(model.loss.acc_sum, state), "the EMA state moved differently from the reference's"
    tol = TOL[torch.float32] if dtype in (torch.float32, torch.float64) else UNIT_ROUNDOFF[dtype]
    assert_rel_close(out, ref, tol, f"GHMCLoss after .{cast}()")
    out.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.dtype == dtype


def test_module_buffers_are_never_rounded_by_casts_and_follow_devices():
    focal = fl.nn.FocalLoss(alpha=[1 / 3, 1.0, 2.0])
    ib = fl.nn.IBLoss(weight=[0.1, 0.7, 2.2])
    ghmc = fl.nn.GHMCLoss(bins=4)
    for m, name, follows_float64 in ((focal, "alpha", True), (ib, "weight", True), (ghmc, "acc_sum", False)):
        value = getattr(m, name).clone()
        m.half()
        assert getattr(m, name).dtype == torch.float32 and torch.equal(getattr(m, name), value), f"{name} after .half()"
        m.to(torch.float64)
        wide = torch.float64 if follows_float64 else torch.float32
        assert getattr(m, name).dtype == wide and torch.equal(getattr(m, name), value.to(wide)), f"{name} .double()"
        m.to("cpu", torch.bfloat16)
        assert getattr(m, name).device.type == "cpu" and getattr(m, name).dtype == wide
        assert torch.equal(getattr(m, name), value.to(wide))
        m.to("meta")  # a device move still applies (meta stands in for another device)
        assert getattr(m, name).device.type == "meta" and getattr(m, name).dtype == wide
    logits, target = softmax_case((6, 3), torch.float16, seed=3)
    out = fl.nn.FocalLoss(alpha=[1 / 3, 1.0, 2.0]).half()(logits, target)
    ref = fl.focal(logits.double(), target, alpha=[1 / 3, 1.0, 2.0], backend="reference")
    assert_rel_close(out, ref, UNIT_ROUNDOFF[torch.float16], "FocalLoss(alpha).half() on fp16 logits")


# --------------------------------------------------------------------------------------------
# 8: torch.compile(fullgraph=True, dynamic=True), defaults included
# --------------------------------------------------------------------------------------------
def _all_losses(x, t, labels, soft, feats, gamma, alpha, keep):
    return (fl.focal(x, t) + fl.sigmoid_focal(x, labels).sum() + fl.ohem(x, t) + fl.ghmc(x, soft)
            + fl.ghmc(x, t, use_sigmoid=False) + fl.ib(x, t, feats) * 1e-3
            + fl.focal(x, t, gamma=gamma, alpha=alpha) + fl.sigmoid_focal(x, soft, alpha=alpha, gamma=gamma).mean()
            + fl.ohem(x, t, keep=keep))


def _all_modules(mods, x, t, labels, soft, feats):
    focal, sig, ohem, ghmc, ib, ibf = mods
    return focal(x, t) + sig(x, labels).sum() + ohem(x, t) + ghmc(x, soft) + (ib(x, t, feats) + ibf(x, t, feats)) * 1e-3


def _compile_inputs():
    logits, target = softmax_case((12, 5), seed=31)
    g = torch.Generator().manual_seed(32)
    labels = torch.randint(0, 6, (12,), generator=g)
    soft = (torch.rand(12, 5, generator=g) < 0.3).float()
    feats = torch.rand(12, 4, generator=g) + 0.1
    return logits, target, labels, soft, feats


@pytest.mark.compile
def test_dynamic_compile_every_loss_with_defaults_and_float_arguments():
    logits, target, labels, soft, feats = _compile_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(_all_losses, fullgraph=True, dynamic=True)
    for gamma, alpha, keep in ((2.0, 0.25, 0.5), (1.5, 0.5, 0.25)):
        x = logits.clone().requires_grad_(True)
        out = compiled(x, target, labels, soft, feats, gamma, alpha, keep)
        out.backward()
        x_ref = logits.clone().requires_grad_(True)
        ref = _all_losses(x_ref, target, labels, soft, feats, gamma, alpha, keep)
        ref.backward()
        assert_rel_close(out, ref, TOL[torch.float32], f"dynamic compile, gamma={gamma}")
        assert_rel_close(x.grad, x_ref.grad, TOL[torch.float32], f"dynamic compile grad, gamma={gamma}")


@pytest.mark.compile
def test_dynamic_compile_every_module():
    logits, target, labels, soft, feats = _compile_inputs()
    mods = (fl.nn.FocalLoss(), fl.nn.SigmoidFocalLoss(), fl.nn.OHEMLoss(), fl.nn.GHMCLoss(bins=5, momentum=0.0),
            fl.nn.IBLoss(), fl.nn.IBFocalLoss())
    torch._dynamo.reset()
    compiled = torch.compile(_all_modules, fullgraph=True, dynamic=True)
    for n in (12, 7):  # a second shape reuses the dynamic graph
        x = logits[:n].clone().requires_grad_(True)
        out = compiled(mods, x, target[:n], labels[:n], soft[:n], feats[:n])
        out.backward()
        x_ref = logits[:n].clone().requires_grad_(True)
        ref = _all_modules(mods, x_ref, target[:n], labels[:n], soft[:n], feats[:n])
        ref.backward()
        assert_rel_close(out, ref, TOL[torch.float32], f"dynamic compile modules, N={n}")
        assert_rel_close(x.grad, x_ref.grad, TOL[torch.float32], f"dynamic compile modules grad, N={n}")
