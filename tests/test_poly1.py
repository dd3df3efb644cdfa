"""Poly-1 (Leng et al. 2022, issue #24): ``epsilon`` on fl.focal and fl.sigmoid_focal (and their
nn modules), computed in the same fused ops as the plain losses, on every backend against the
float64 references reference.focal_poly1 / sigmoid_focal_poly1 (checked against the paper's code in
tests/test_reference_detector.py) and against the peers' formulas written out here
(polyloss-pytorch's Poly1CrossEntropyLoss / Poly1FocalLoss).

Backends as tests/test_dfl.py: cpu, triton (interpreter without a GPU), cuda_emu (FL_CUDA_EMU set),
cuda (a GPU), reference; unavailable ones are skipped with their reason.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl
from fused_losses import reference
from tests.test_dfl import BACKENDS, FUSED, _DTYPES, _device, _loss_and_grad
from tests.utils import LOW_PRECISION, TOL, UNIT_ROUNDOFF, assert_rel_close, rel_error, sigmoid_case, softmax_case


def _double(kwargs):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}


def _check(fn, ref_fn, backend, logits, target, what, **kwargs):
    """fn(..., backend) against ref_fn in float64 (loss and gradient; exactness rule of tests/utils.py)."""
    dtype = logits.dtype
    out, grad = _loss_and_grad(fn, logits, target, cot_dtype=dtype, backend=backend, **kwargs)
    t64 = target.double() if target.is_floating_point() else target
    ref_out, ref_grad = _loss_and_grad(ref_fn, logits.double(), t64, cot_dtype=dtype, **_double(kwargs))
    if dtype in LOW_PRECISION:
        t_low = target.to(dtype) if target.is_floating_point() else target
        low_out, low_grad = _loss_and_grad(lambda x, t, **k: ref_fn(x, t, upcast=False, **k), logits, t_low,
                                           cot_dtype=dtype, **kwargs)
        assert_rel_close(out, ref_out, max(rel_error(low_out, ref_out), UNIT_ROUNDOFF[dtype]), f"{what} loss ({dtype})")
        assert_rel_close(grad, ref_grad, max(rel_error(low_grad, ref_grad), UNIT_ROUNDOFF[dtype]),
                         f"{what} grad ({dtype})")
    else:
        tol = TOL[dtype] if not (backend == "reference" and dtype == torch.float64) else 1e-12
        assert_rel_close(out, ref_out, tol, f"{what} loss ({dtype})")
        assert_rel_close(grad, ref_grad, tol, f"{what} grad ({dtype})")


FOCAL_CASES = [
    dict(gamma=2.0),
    dict(gamma=0.0),  # Poly-1 cross entropy
    dict(gamma=1.5, alpha=0.25),
    dict(gamma=0.5, alpha="per_class"),
    dict(gamma=2.0, label_smoothing=0.1),
    dict(gamma=2.0, label_smoothing=0.2, alpha="per_class"),
    dict(gamma=2.0, weight="per_sample"),
]


def _focal_kwargs(case, c, n_rows_shape, device, seed):
    kwargs = dict(case)
    g = torch.Generator().manual_seed(seed)
    if kwargs.get("alpha") == "per_class":
        kwargs["alpha"] = torch.linspace(0.2, 1.5, c).to(device)
    if kwargs.get("weight") == "per_sample":
        kwargs["weight"] = torch.rand(n_rows_shape, generator=g).to(device)
    return kwargs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", [1.0, -0.5])
def test_focal_matches_float64_reference(backend, epsilon):
    device = _device(backend)
    for dtype in _DTYPES[backend]:
        for i, case in enumerate(FOCAL_CASES):
            if dtype != torch.float32 and i % 2:
                continue
            shape = (37, 7) if i % 3 else (2, 5, 3, 4)  # channel-second too
            logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2, seed=i)
            kwargs = _focal_kwargs(case, shape[1], target.shape, device, i)
            for reduction in ("none", "mean", "sum"):
                _check(fl.focal, reference.focal_poly1, backend, logits, target, f"{backend} focal {case}",
                       epsilon=epsilon, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_focal_from_probabilities(backend):
    device = _device(backend)
    logits, target = softmax_case((20, 6), torch.float32, device, ignore_frac=0.1, seed=21)
    probs = torch.softmax(logits, 1)
    for gamma in (0.0, 2.0):
        _check(fl.focal, reference.focal_poly1, backend, probs, target, f"{backend} probs gamma {gamma}",
               epsilon=2.0, gamma=gamma, from_logits=False, reduction="sum")


SIGMOID_CASES = [
    dict(kind="labels"),
    dict(kind="soft"),
    dict(kind="float", gamma=0.0),
    dict(kind="labels", alpha=-1.0, gamma=1.5),
    dict(kind="labels", alpha="per_class"),
    dict(kind="soft", weight="per_row"),
    dict(kind="labels", weight="per_element", gamma=3.0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", [1.0, -0.5])
def test_sigmoid_focal_matches_float64_reference(backend, epsilon):
    device = _device(backend)
    for dtype in _DTYPES[backend]:
        for i, case in enumerate(SIGMOID_CASES):
            if dtype != torch.float32 and i % 2:
                continue
            kwargs = dict(case)
            shape = (29, 6) if i % 2 else (3, 5, 6)
            logits, target = sigmoid_case(shape, dtype, device, kind=kwargs.pop("kind"), ignore_frac=0.2, seed=i)
            g = torch.Generator().manual_seed(i)
            if kwargs.get("alpha") == "per_class":
                kwargs["alpha"] = torch.linspace(0.1, 0.9, 6).to(device)
            if kwargs.get("weight") == "per_row":
                kwargs["weight"] = torch.rand(shape[:-1], generator=g).to(device)
            elif kwargs.get("weight") == "per_element":
                kwargs["weight"] = torch.rand(shape, generator=g).to(device)
            if target.is_floating_point():
                target = target.float()
            for reduction in ("none", "mean", "sum"):
                _check(fl.sigmoid_focal, reference.sigmoid_focal_poly1, backend, logits, target,
                       f"{backend} sigmoid {case}", epsilon=epsilon, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peer_formulas_polyloss(backend):
    """polyloss-pytorch (abhuse/polyloss-pytorch 80416ae9) written out: Poly1CrossEntropyLoss =
    CE + eps (1 - sum(onehot * softmax)); Poly1FocalLoss = torchvision's focal (alpha on the focal
    part only) + eps (1 - p_t)^(gamma + 1) with p_t = y p + (1 - y)(1 - p)."""
    device = _device(backend)
    logits, target = softmax_case((40, 5), torch.float32, device, seed=31)
    x = logits.double()
    pt = (F.one_hot(target, 5).double() * torch.softmax(x, 1)).sum(1)
    poly_ce = F.cross_entropy(x, target, reduction="none") + 2.0 * (1 - pt)
    assert_rel_close(fl.focal(logits, target, gamma=0.0, epsilon=2.0, reduction="none", backend=backend), poly_ce,
                     1e-5, "Poly-1 CE")
    sx, sy = sigmoid_case((30, 4), torch.float32, device, kind="float", seed=32)
    x, y = sx.double(), sy.double()
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = y * p + (1 - y) * (1 - p)
    focal = ce * (1 - p_t) ** 2.0 * (0.25 * y + 0.75 * (1 - y))
    poly = focal + 1.0 * (1 - p_t) ** 3.0
    assert_rel_close(fl.sigmoid_focal(sx, sy, epsilon=1.0, backend=backend), poly, 1e-5, "Poly-1 focal")


@pytest.mark.parametrize("backend", FUSED)
def test_epsilon_zero_is_the_plain_loss_bitwise(backend):
    """epsilon=0 takes the plain loss's code (the kernels' epsilon == 0 branch, which the op also
    takes when called with an explicit 0.0)."""
    device = _device(backend)
    logits, target = softmax_case((50, 9), torch.float32, device, ignore_frac=0.2, seed=41)
    for kwargs in (dict(gamma=2.0), dict(gamma=2.0, label_smoothing=0.1), dict(gamma=1.0, alpha=0.3)):
        a = _loss_and_grad(fl.focal, logits, target, cot_dtype=torch.float32, backend=backend, **kwargs)
        b = _loss_and_grad(fl.focal, logits, target, cot_dtype=torch.float32, backend=backend, epsilon=0.0, **kwargs)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    sx, sl = sigmoid_case((50, 9), torch.float32, device, kind="labels", ignore_frac=0.2, seed=42)
    a = _loss_and_grad(fl.sigmoid_focal, sx, sl, cot_dtype=torch.float32, backend=backend, reduction="sum")
    b = _loss_and_grad(fl.sigmoid_focal, sx, sl, cot_dtype=torch.float32, backend=backend, reduction="sum", epsilon=0.0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    if backend in ("cpu", "cuda"):
        ops = torch.ops.fused_losses
        plain = ops.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "mean", True, True)
        explicit = ops.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "mean", True, True, None, 0.0, 0.0)
        assert all(torch.equal(u, v) for u, v in zip(plain, explicit))
        plain = ops.sigmoid_focal_forward(sx, sl, 0.25, 2.0, -100, "sum", True)
        explicit = ops.sigmoid_focal_forward(sx, sl, 0.25, 2.0, -100, "sum", True, None, None, 0.0)
        assert all(torch.equal(u, v) for u, v in zip(plain, explicit))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_and_zero_weight(backend):
    device = _device(backend)
    logits, target = softmax_case((8, 5), torch.float32, device, seed=51)
    all_ignored = torch.full_like(target, -100)
    out, grad = _loss_and_grad(fl.focal, logits, all_ignored, cot_dtype=torch.float32, backend=backend, epsilon=1.0)
    assert float(out) == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    target[2] = -100
    logits[2] = float("nan")  # an ignored row is not read
    logits[5] = float("nan")
    w = torch.ones(8, device=device)
    w[5] = 0.0  # a zero weight selects 0
    for reduction in ("none", "mean", "sum"):
        out, grad = _loss_and_grad(fl.focal, logits, target, cot_dtype=torch.float32, backend=backend, epsilon=1.0,
                                   weight=w, reduction=reduction)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        assert not grad[2].any() and not grad[5].any()
    sx, sl = sigmoid_case((6, 4), torch.float32, device, kind="labels", seed=52)
    sl[1] = -100
    sx[1] = float("nan")
    out, grad = _loss_and_grad(fl.sigmoid_focal, sx, sl, cot_dtype=torch.float32, backend=backend, epsilon=1.0)
    assert torch.isfinite(out).all() and not out[1].any() and not grad[1].any()
    # 'mean' over non-ignored entries: the denominator is unchanged by epsilon
    mean = fl.sigmoid_focal(sx, sl, epsilon=1.0, reduction="mean", backend=backend)
    total = fl.sigmoid_focal(sx, sl, epsilon=1.0, reduction="sum", backend=backend)
    assert torch.allclose(mean, total / (5 * 4), rtol=1e-6)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_gradcheck_float64(backend):
    logits, target = softmax_case((6, 4), torch.float64, ignore_frac=0.2, seed=61)
    for kwargs in (dict(gamma=2.0), dict(gamma=0.0), dict(gamma=1.5, label_smoothing=0.1, alpha=0.5)):
        assert torch.autograd.gradcheck(
            lambda x: fl.focal(x, target, epsilon=0.7, reduction="sum", backend=backend, **kwargs),
            (logits.clone().requires_grad_(),))
    sx, sl = sigmoid_case((5, 3), torch.float64, kind="labels", seed=62)
    assert torch.autograd.gradcheck(lambda x: fl.sigmoid_focal(x, sl, epsilon=-0.3, gamma=1.5, backend=backend),
                                    (sx.clone().requires_grad_(),))


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend):
    device = _device(backend)
    logits, target = softmax_case((500, 19), torch.float32, device, ignore_frac=0.1, seed=71)
    sx, sl = sigmoid_case((500, 19), torch.float32, device, kind="labels", ignore_frac=0.1, seed=72)
    runs = []
    for _ in range(2):
        runs.append(_loss_and_grad(fl.focal, logits, target, cot_dtype=torch.float32, backend=backend, epsilon=1.0)
                    + _loss_and_grad(fl.sigmoid_focal, sx, sl, cot_dtype=torch.float32, backend=backend, epsilon=1.0,
                                     reduction="sum"))
    assert all(torch.equal(u, v) for u, v in zip(*runs))


@pytest.mark.skipif(not fl.backends()["cpu"].available, reason="cpu backend unavailable")
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    logits, target = softmax_case((2, 5, 3, 4), torch.float32, ignore_frac=0.2, seed=81)
    sx, sl = sigmoid_case((16, 7), torch.float32, kind="labels", ignore_frac=0.2, seed=82)

    def step(x, t, sx, sl):
        return (fl.focal(x, t, epsilon=1.0, backend="cpu", validate=False)
                + fl.sigmoid_focal(sx, sl, epsilon=0.5, reduction="sum", backend="cpu", validate=False))

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out = compiled(logits.requires_grad_(), target, sx.requires_grad_(), sl)
    out.backward()
    got = (out.detach(), logits.grad.clone(), sx.grad.clone())
    logits.grad, sx.grad = None, None
    eager = step(logits, target, sx, sl)
    eager.backward()
    assert torch.equal(got[0], eager.detach()) and torch.equal(got[1], logits.grad) and torch.equal(got[2], sx.grad)


def test_modules_and_bad_epsilon():
    logits, target = softmax_case((6, 4), torch.float32, seed=91)
    m = fl.nn.FocalLoss(gamma=0.0, epsilon=1.0)
    assert "epsilon=1.0" in repr(m) and "epsilon=0.0" in repr(fl.nn.FocalLoss())
    assert torch.allclose(m(logits, target), fl.focal(logits, target, gamma=0.0, epsilon=1.0))
    sx, sl = sigmoid_case((6, 4), torch.float32, kind="labels", seed=92)
    s = fl.nn.SigmoidFocalLoss(epsilon=2.0, reduction="sum")
    assert torch.allclose(s(sx, sl), fl.sigmoid_focal(sx, sl, epsilon=2.0, reduction="sum"))
    for bad, exc in ((float("nan"), ValueError), (float("inf"), ValueError), ("1", TypeError), (None, TypeError)):
        with pytest.raises(exc, match="^epsilon"):
            fl.focal(logits, target, epsilon=bad)
        with pytest.raises(exc, match="^epsilon"):
            fl.sigmoid_focal(sx, sl, epsilon=bad)
