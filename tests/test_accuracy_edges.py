"""Accuracy at the edges of the input range, every backend (issue 13, classes 4-6; README "Accuracy").

Backends (parameter `backend`): 'reference' (the plain-PyTorch reference run in the inputs' dtype:
the eager baseline; class 4 only, see below), 'cpu' (fused C++ kernels), 'triton' (CPU tensors
through the Triton interpreter, CUDA tensors where a GPU is visible), 'cuda_emu' (the CUDA kernels
csrc/cuda on the CPU emulator, tests/cuda_emu/backend.py; a skip where the emulated extension is
not built; `make test-cuda-emu` runs it) and 'cuda' (collected only where
fl.backends()['cuda'].available, as in tests/test_compiled_backends.py). Sizes stay small
(16 x 17): the interpreter is slow.

Ground truth: the reference backend in float64 on the same (fp32/bf16/fp16) values upcast. For
confident samples (class 5) it runs under tests.utils.accurate_float64_log_softmax: torch's
float64 log_softmax rounds log p_t to ~1e-16 absolute, which is a relative error of 1e-16 /
(1 - p_t) in the loss (1e-4 at a margin of 30), so plain float64 is no ground truth there.

Class 4, large offsets: fp32 logits randn * 3 + {0, 1000, 1e4, -1e4}; relative L2 error of the
  loss and of the logits gradient <= 1e-5 on every backend, eager included (a gradient computed
  as exp(x - lse) with lse rounded to float32 fails: x - lse loses the lse's rounding error,
  1000 x 2^-24 relative).
Class 5, confident samples: the target logit `margin` above the row's others (0 ... 100); batches
  of confident rows only, and mixed (every other row ordinary). The rule (README): every sample's
  loss and every sample's gradient row within 1e-5 relative of the ground truth, or within
  float32's smallest normal (2^-126) absolutely where the true value underflows float32; and so
  the whole batch at least as accurate as eager fp32 (asserted too). Eager fp32 itself fails the
  per-sample rule by orders of magnitude (its loss is 0 or one ulp of 1 for margins >= 17), so
  it is the baseline, not a parameter here.
Class 6, sigmoid_focal of confident positives and negatives (|x| in [6, 16], x = 20 with y = 1;
  float targets and integer labels; gamma 0/2, alpha -1/0.25): per element 1e-5 relative as
  above; +-inf logits: the reference's values where it has one, and where the reference gives
  NaN (torch's BCE computes 0 * inf) either NaN or the mathematical limit.
Low precision: class 4 and 5 inputs in bf16/fp16 with the rule of tests/utils.py (at least as
  close to the ground truth as the eager reference run in the same low precision, or within the
  dtype's unit roundoff).
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import fused_losses as fl
from fused_losses import _validate, reference
from tests.cuda_emu import backend as cuda_emu
from tests.utils import (FLOAT32_TINY, LOW_PRECISION, UNIT_ROUNDOFF, accurate_float64_log_softmax, assert_close_per_sample,
                         assert_matches_reference, assert_rel_close, rel_error)

RTOL = 1e-5
N, C = 16, 17
OFFSETS = [0.0, 1000.0, 1e4, -1e4]
MARGINS = [0.0, 5.0, 10.0, 17.0, 30.0, 60.0, 100.0]
REDUCTIONS = ["sum", "mean", "none"]


def _triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _backends(with_reference: bool):
    """pytest params (backend, device); an unavailable cpu/triton backend is a skip with its
    reason (CI builds the extension and has triton, so both run there); cuda is collected only
    where it is available."""
    params = [pytest.param(("reference", "cpu"), id="reference")] if with_reference else []
    for name, device in (("cpu", "cpu"), ("triton", _triton_device())):
        status = fl.backends()[name]
        marks = [] if status.available else [pytest.mark.skip(reason=f"{name} unavailable: {status.reason}")]
        params.append(pytest.param((name, device), id=name, marks=marks))
    emu_available, emu_reason = cuda_emu.BACKEND.availability()  # (bool, reason), not a BackendStatus
    marks = [] if emu_available else [pytest.mark.skip(reason=f"cuda_emu unavailable: {emu_reason}")]
    params.append(pytest.param(("cuda_emu", "cpu"), id="cuda_emu", marks=marks))
    if fl.backends()["cuda"].available:
        params.append(pytest.param(("cuda", "cuda"), id="cuda"))
    return params


# name -> (function, keyword arguments); ib also takes features.
SOFTMAX_LOSSES = {
    "focal_gamma0": ("focal", dict(gamma=0.0)),
    "focal_gamma0.5_alpha": ("focal", dict(gamma=0.5, alpha=0.25)),
    "focal_gamma2": ("focal", dict(gamma=2.0)),
    "ohem": ("ohem", dict(keep=0.75)),  # mixed batches: the 8 ordinary rows and 4 confident ones kept
    "ghmc_softmax": ("ghmc", dict(use_sigmoid=False, bins=10)),
    "ib": ("ib", dict()),
    "ib_focal": ("ib", dict(gamma=1.0)),
}


def _features(n: int) -> torch.Tensor:
    """IB feature norms in [0.5, 64.5]: the L1 norm of a penultimate layer's activations is large
    (the demo's 84 activations), and where g f >> eps the two terms of IB's gradient coefficient
    cancel as p_t -> 1 (a kernel summing them naively is off by 6e-5 at a margin of 5)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float() * 64 + 0.5


def _cotangent(shape, dtype) -> torch.Tensor:
    """Fixed random cotangent of a 'none' loss, rounded to the tested dtype (every run, the
    float64 one included, differentiates with exactly these values)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _loss_and_grad(fn, x, args, kwargs, cot_dtype):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    cot = torch.ones_like(out) if out.dim() == 0 else _cotangent(out.shape, cot_dtype).to(out.dtype).to(out.device)
    out.backward(cot)
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return out.detach().cpu(), grad.detach().cpu()


def _normalised(loss: str, logits, target, extra, kwargs) -> dict:
    """The normalised keyword arguments (fused_losses._validate) with the public defaults."""
    defaults = {k: p.default for k, p in inspect.signature(getattr(fl, loss)).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in ("backend", "validate")}
    return getattr(_validate, f"{loss}_args")(logits, target, *extra, **{**defaults, **kwargs}, validate=False)


def _run_all(loss, backend, device, logits, target, extra, kwargs, *, accurate_truth=False, eager=False):
    """(loss, grad) of `backend` on `logits` (on `device`), of the float64 ground truth on the same
    values upcast, and (eager=True) of the reference run in the logits' dtype with upcast=False."""
    dtype = logits.dtype
    fn = getattr(fl, loss)
    ex = [e.to(device) for e in extra]
    got = _loss_and_grad(fn, logits.to(device), (target.to(device), *ex), dict(kwargs, backend=backend), dtype)
    ex64 = [e.double() for e in extra]
    if accurate_truth:
        with accurate_float64_log_softmax():
            truth = _loss_and_grad(fn, logits.double(), (target, *ex64), dict(kwargs, backend="reference"), dtype)
    else:
        truth = _loss_and_grad(fn, logits.double(), (target, *ex64), dict(kwargs, backend="reference"), dtype)
    base = None
    if eager:
        norm = _normalised(loss, logits, target, extra, kwargs)
        base = _loss_and_grad(lambda x, t, *e: getattr(reference, loss)(x, t, *e, **norm, upcast=False), logits,
                              (target, *extra), {}, dtype)
    return got, truth, base


def _softmax_case(seed: int, offset: float = 0.0, margin: float | None = None, mixed: bool = False):
    """(N, C) float64 logits randn * 3 + offset, targets; with a margin, the target logit of the
    confident rows (all, or the even ones when mixed) is set `margin` above the row's maximum
    other logit."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3 + offset
    t = torch.randint(0, C, (N,), generator=g)
    if margin is not None:
        others = x.scatter(1, t[:, None], -math.inf).max(dim=1).values
        rows = torch.arange(N)
        confident = rows % 2 == 0 if mixed else torch.ones(N, dtype=torch.bool)
        x[rows[confident], t[confident]] = others[confident] + margin
    return x, t


def _extra(loss):
    return [_features(N)] if loss == "ib" else []


def _as_samples(value: torch.Tensor, softmax: bool) -> torch.Tensor:
    """(S, K) samples for assert_close_per_sample: a scalar is one sample; a softmax 'none' loss
    one sample per row; a softmax gradient one row of C per sample; sigmoid: one per element."""
    if value.dim() == 0:
        return value.reshape(1, 1)
    if softmax and value.dim() == 2 and value.shape[1] == C:
        return value
    return value.reshape(-1, 1)


# --------------------------------------------------------------------------------------------
# Class 4: large offsets
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(with_reference=True))
@pytest.mark.parametrize("case", list(SOFTMAX_LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_large_offsets_fp32(backend, case, reduction):
    name, device = backend
    loss, kwargs = SOFTMAX_LOSSES[case]
    for offset in OFFSETS:
        x, t = _softmax_case(seed=11, offset=offset)
        (out, grad), (ref, ref_grad), _ = _run_all(loss, name, device, x.float(), t, _extra(loss),
                                                   dict(kwargs, reduction=reduction))
        what = f"{name} {case} {reduction} offset {offset:g}"
        assert_rel_close(out, ref, RTOL, f"{what} loss")
        assert_rel_close(grad, ref_grad, RTOL, f"{what} grad")


@pytest.mark.parametrize("backend", _backends(with_reference=True))
@pytest.mark.parametrize("kind", ["float", "labels"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_large_offsets_fp32(backend, kind, reduction):
    name, device = backend
    for offset in OFFSETS:
        g = torch.Generator().manual_seed(12)
        x = torch.randn(N, C, generator=g, dtype=torch.float64) * 3 + offset
        if kind == "float":
            t = (torch.rand(N, C, generator=g) < 0.3).float()
        else:
            t = torch.randint(0, C + 1, (N,), generator=g)
        for gamma, alpha in [(2.0, 0.25), (0.0, -1.0)]:
            (out, grad), (ref, ref_grad), _ = _run_all("sigmoid_focal", name, device, x.float(), t, [],
                                                       dict(gamma=gamma, alpha=alpha, reduction=reduction))
            what = f"{name} sigmoid_focal {kind} gamma {gamma} alpha {alpha} {reduction} offset {offset:g}"
            assert_rel_close(out, ref, RTOL, f"{what} loss")
            assert_rel_close(grad, ref_grad, RTOL, f"{what} grad")


# --------------------------------------------------------------------------------------------
# Class 5: confident samples
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(with_reference=False))
@pytest.mark.parametrize("case", list(SOFTMAX_LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("batch", ["confident", "mixed"])
def test_softmax_confident_samples_fp32(backend, case, reduction, batch):
    name, device = backend
    loss, kwargs = SOFTMAX_LOSSES[case]
    for margin in MARGINS:
        x, t = _softmax_case(seed=21, margin=margin, mixed=batch == "mixed")
        (out, grad), (ref, ref_grad), (eager, eager_grad) = _run_all(
            loss, name, device, x.float(), t, _extra(loss), dict(kwargs, reduction=reduction), accurate_truth=True,
            eager=True)
        what = f"{name} {case} {reduction} {batch} margin {margin:g}"
        # Per sample: the rule of the README.
        assert_close_per_sample(_as_samples(out, True), _as_samples(ref, True), f"{what} loss", rtol=RTOL)
        assert_close_per_sample(_as_samples(grad, True), _as_samples(ref_grad, True), f"{what} grad", rtol=RTOL)
        # Whence the batch: at least as accurate as eager fp32 (or 1e-5).
        for got, truth, base, part in [(out, ref, eager, "loss"), (grad, ref_grad, eager_grad, "grad")]:
            assert_rel_close(got, truth, max(RTOL, rel_error(base, truth)), f"{what} {part} vs eager fp32")


def test_ground_truth_agrees_with_plain_float64_where_that_is_accurate():
    """The accurate float64 log-softmax of the class 5 ground truth equals torch's float64
    log_softmax to ~1e-12 where the latter is accurate (margins up to 10: 1 - p_t >= 1e-4), loss
    and gradient, and differs from it at margin 40 (where torch's rounds log p_t to 0)."""
    for margin in [0.0, 5.0, 10.0]:
        x, t = _softmax_case(seed=3, margin=margin, mixed=True)
        for loss, kwargs in SOFTMAX_LOSSES.values():
            plain = _loss_and_grad(getattr(fl, loss), x, (t, *[e.double() for e in _extra(loss)]),
                                   dict(kwargs, reduction="none", backend="reference"), torch.float64)
            with accurate_float64_log_softmax():
                accurate = _loss_and_grad(getattr(fl, loss), x, (t, *[e.double() for e in _extra(loss)]),
                                          dict(kwargs, reduction="none", backend="reference"), torch.float64)
            assert_rel_close(accurate[0], plain[0], 1e-12, f"{loss} {kwargs} margin {margin} loss")
            assert_rel_close(accurate[1], plain[1], 1e-12, f"{loss} {kwargs} margin {margin} grad")
    x, t = _softmax_case(seed=3, margin=40.0)
    assert not fl.focal(x, t, gamma=0.0, reduction="none", backend="reference").any()
    with accurate_float64_log_softmax():
        exact = fl.focal(x, t, gamma=0.0, reduction="none", backend="reference")
    # -log p_t = log1p(sum_{j != t} e^(x_j - x_t)), every term e^-40 or less, the largest e^-40.
    assert ((exact >= math.exp(-40)) & (exact <= (C - 1) * math.exp(-40))).all()


# --------------------------------------------------------------------------------------------
# Class 6: sigmoid_focal, confident positives and negatives, infinite logits
# --------------------------------------------------------------------------------------------
def _confident_sigmoid(kind: str):
    """Logits and targets: confident positives x = linspace(6, 16), x = 20 (y = 1), confident
    negatives x = -linspace(6, 16) (y = 0). float: one row of 2 x 11 + 1 elements; labels: 11
    rows of 3 classes, the label's logit positive, the others negative."""
    pos = torch.linspace(6, 16, 11, dtype=torch.float64)
    if kind == "float":
        x = torch.cat([pos, torch.tensor([20.0], dtype=torch.float64), -pos])[None]
        y = torch.cat([torch.ones(12), torch.zeros(11)])[None].float()
        return x, y
    labels = torch.arange(11) % 3
    x = -pos[:, None].repeat(1, 3)
    x[torch.arange(11), labels] = pos.flip(0)
    return x, labels


@pytest.mark.parametrize("backend", _backends(with_reference=False))
@pytest.mark.parametrize("kind", ["float", "labels"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_confident_fp32(backend, kind, gamma, alpha, reduction):
    name, device = backend
    x, y = _confident_sigmoid(kind)
    (out, grad), (ref, ref_grad), _ = _run_all("sigmoid_focal", name, device, x.float(), y, [],
                                               dict(gamma=gamma, alpha=alpha, reduction=reduction))
    what = f"{name} sigmoid_focal {kind} gamma {gamma} alpha {alpha} {reduction}"
    assert_close_per_sample(_as_samples(out, False), _as_samples(ref, False), f"{what} loss", rtol=RTOL)
    assert_close_per_sample(_as_samples(grad, False), _as_samples(ref_grad, False), f"{what} grad", rtol=RTOL)


def _limit(x: torch.Tensor, y: torch.Tensor, alpha: float):
    """Mathematical limits of the sigmoid focal loss and its gradient at x = +-inf, hard y, any
    gamma: p -> 1 or 0; loss a_t * (0 if p == y else inf), gradient a_t (p - y) (the modulating
    factor's derivative goes as |x| e^-|x| -> 0)."""
    p = (x > 0).to(torch.float64)
    a_t = torch.where(y == 1, alpha, 1 - alpha) if alpha >= 0 else torch.ones_like(p)
    loss = torch.where(p == y, 0.0, math.inf) * a_t
    return torch.where(a_t == 0, 0.0, loss), a_t * (p - y)


@pytest.mark.parametrize("backend", _backends(with_reference=False))
@pytest.mark.parametrize("gamma", [0.0, 2.0])
@pytest.mark.parametrize("alpha", [-1.0, 0.25])
def test_sigmoid_focal_infinite_logits(backend, gamma, alpha):
    """x = +-inf with y = 0 and 1 (float targets and integer labels), next to finite elements:
    'none' loss and gradient. Where the float64 reference has a value (x = +inf, y = 0: +inf;
    gamma = 0 gradients: finite), that value; where it has NaN (0 * inf in torch's BCE), NaN or
    the limit. Finite elements keep the 1e-5 rule."""
    name, device = backend
    inf = math.inf
    xf = torch.tensor([[inf, -inf, inf, -inf, 3.0, -2.0]], dtype=torch.float64)
    yf = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
    xl = torch.tensor([[inf, -inf, 1.0], [-inf, inf, -inf], [inf, 0.5, -1.0]], dtype=torch.float64)
    labels = torch.tensor([1, 3, 0])  # row 1 is background (label == C)
    for x, target in [(xf, yf), (xl, labels)]:
        y = target if target.is_floating_point() else torch.nn.functional.one_hot(target, 4)[:, :3].float()
        (out, grad), (ref, ref_grad), _ = _run_all("sigmoid_focal", name, device, x.float(), target, [],
                                                   dict(gamma=gamma, alpha=alpha, reduction="none"))
        lim, lim_grad = _limit(x, y.double(), alpha)
        lim_grad = lim_grad * _cotangent(out.shape, torch.float32).double()  # 'none': the backward's cotangent
        for got, truth, limit, part in [(out, ref, lim, "loss"), (grad, ref_grad, lim_grad, "grad")]:
            what = f"{name} sigmoid_focal gamma {gamma} alpha {alpha} {part} at {x.tolist()} / {target.tolist()}"
            got, truth = got.double(), truth.double()
            defined = ~torch.isnan(truth)
            assert torch.equal(torch.isinf(got) & defined, torch.isinf(truth)), f"{what}: {got.tolist()} vs {truth.tolist()}"
            assert (got[defined & torch.isinf(truth)] == truth[defined & torch.isinf(truth)]).all(), what
            finite = torch.isfinite(truth)
            torch.testing.assert_close(got[finite], truth[finite], rtol=RTOL, atol=FLOAT32_TINY,
                                       msg=lambda m: f"{what}: {m}")
            undefined = ~defined & torch.isinf(x)
            ok = torch.isnan(got) | (got == limit)
            assert ok[undefined].all(), f"{what}: where the reference is NaN, got {got[undefined].tolist()}, " \
                                        f"neither NaN nor the limit {limit[undefined].tolist()}"


# --------------------------------------------------------------------------------------------
# bf16 / fp16: classes 4 and 5 with the low-precision rule
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _backends(with_reference=False))
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("case", list(SOFTMAX_LOSSES))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_offsets_and_margins_low_precision(backend, dtype, case, reduction):
    name, device = backend
    loss, kwargs = SOFTMAX_LOSSES[case]
    inputs = [(f"offset {o:g}", _softmax_case(seed=31, offset=o)) for o in OFFSETS] + \
             [(f"margin {m:g}", _softmax_case(seed=32, margin=m, mixed=True)) for m in MARGINS]
    for label, (x, t) in inputs:
        (out, grad), (ref, ref_grad), (eager, eager_grad) = _run_all(
            loss, name, device, x.to(dtype), t, _extra(loss), dict(kwargs, reduction=reduction),
            accurate_truth=True, eager=True)
        what = f"{name} {case} {reduction} {label}"
        _assert_low_precision(out, ref, dtype, f"{what} loss", eager)
        _assert_low_precision(grad, ref_grad, dtype, f"{what} grad", eager_grad)


def _assert_low_precision(out, ref, dtype, what, eager):
    """The low-precision rule of tests/utils.py; where the eager baseline itself overflowed (inf/NaN
    where the ground truth is finite: IB's factor alpha / eps = 1e6 in fp16), it bounds nothing
    and every element must be within 4 unit roundoffs (or one subnormal step) of the truth."""
    if not torch.equal(torch.isfinite(eager), torch.isfinite(ref)):
        info = torch.finfo(dtype)
        torch.testing.assert_close(out.double(), ref.double(), rtol=4 * UNIT_ROUNDOFF[dtype],
                                   atol=info.smallest_normal * info.eps, equal_nan=True,
                                   msg=lambda m: f"{what} ({dtype}; eager baseline overflowed): {m}")
        return
    assert_matches_reference(out, ref, dtype, what, eager)
