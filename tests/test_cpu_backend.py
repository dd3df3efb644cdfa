"""The 'cpu' backend (fused C++ kernels) against the float64 reference, plus the op contract:
float64 gradcheck, torch.library.opcheck on every op, torch.compile(fullgraph=True),
determinism (bitwise, any thread count), GHM-C EMA state, retain_graph and double backward.

Every comparison runs the same public function twice: backend='cpu' on the test dtype and
backend='reference' on the float64 copy, and applies the exactness rule of tests/utils.py
(fp16/bf16: at least as close as the eager reference run in the same low precision).
"""
from __future__ import annotations

import pytest
import torch

import fused_losses as fl
from fused_losses import _backends, _validate, reference
from tests.utils import (LOW_PRECISION, assert_matches_reference, assert_rel_close, loss_and_grad, opcheck_loss_op, rel_error, sigmoid_case,
                         softmax_case)

_STATUS = fl.backends()["cpu"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"cpu backend unavailable: {_STATUS.reason}")

OPS = torch.ops.fused_losses
DTYPES = [torch.float32, torch.bfloat16, torch.float64]
CLASSES = [1, 3, 80, 1203]
SMALL_N = [0, 1, 7]

# Normalised-argument validators and defaults, to run the reference in low precision
# (reference.<loss>(..., upcast=False) takes the normalised kwargs of fused_losses._validate).
_DEFAULTS = {
    "focal": dict(gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True),
    "sigmoid_focal": dict(alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none"),
    "ohem": dict(keep=0.25, thresh=None, min_kept=None, ignore_index=-100, reduction="mean"),
    "ghmc": dict(bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100, reduction="mean"),
    "ib": dict(alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0, detach_factor=False, reduction="mean"),
}


def _eager_low_precision(loss, logits, target, extra, kwargs):
    """reference.<loss> run in the logits' low precision (upcast=False): the accuracy baseline."""
    full = {**_DEFAULTS[loss], **kwargs}
    norm = getattr(_validate, f"{loss}_args")(logits, target, *extra, **full, validate=False)
    fn = getattr(reference, loss)
    return loss_and_grad(lambda x, t, *e: fn(x, t, *e, **norm, upcast=False), logits, target, *extra)


def _reference_loss_and_grad(fn, logits64, *args, cot_dtype, **kwargs):
    """loss_and_grad for the float64 reference, fed the cotangent the tested call received
    (loss_and_grad draws it in float64 and rounds it to the output dtype): the reference must
    see the same inputs, or a bf16 'none' test would charge the cotangent's rounding to the
    kernel."""
    x = logits64.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        g = torch.Generator().manual_seed(1)  # loss_and_grad's default grad_seed
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(cot_dtype).to(torch.float64)
    if out.requires_grad:
        out.backward(cot)
    return out.detach(), (x.grad if x.grad is not None else torch.zeros_like(x)).detach()


def check_against_reference(loss, logits, target, *extra, what="", **kwargs):
    """cpu backend on `logits` vs the reference on float64 copies; loss and logits gradient."""
    fn = getattr(fl, loss)
    out, grad = loss_and_grad(fn, logits, target, *extra, backend="cpu", **kwargs)
    extra64 = [e.double() if e.is_floating_point() else e for e in extra]
    ref, ref_grad = _reference_loss_and_grad(fn, logits.double(), target, *extra64, cot_dtype=out.dtype,
                                             backend="reference", **kwargs)
    dtype = logits.dtype
    eager_out = eager_grad = None
    if dtype in LOW_PRECISION:
        eager_out, eager_grad = _eager_low_precision(loss, logits, target, extra, kwargs)
    label = f"{loss} {what} {kwargs}"
    expected_dtype = dtype if kwargs.get("reduction", _DEFAULTS[loss]["reduction"]) == "none" else \
        torch.promote_types(dtype, torch.float32)
    assert out.dtype == expected_dtype, f"{label}: loss dtype {out.dtype} != {expected_dtype}"
    assert out.shape == ref.shape, f"{label}: loss shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_matches_reference(out, ref, dtype, f"{label} loss", eager_out)
    assert_matches_reference(grad, ref_grad, dtype, f"{label} grad", eager_grad)
    return out, grad


def _alpha_value(kind, c):
    if kind == "none":
        return None
    if kind == "float":
        return 0.25
    return torch.linspace(0.1, 0.9, c).tolist()


# --------------------------------------------------------------------------------------------
# Softmax focal
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("gamma,alpha_kind", [(0.0, "none"), (0.5, "per_class"), (2.0, "float"), (2.0, "none"),
                                              (0.5, "float"), (0.0, "per_class")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_matrix(dtype, c, n, gamma, alpha_kind, reduction):
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 7 + c)
    check_against_reference("focal", logits, target, gamma=gamma, alpha=_alpha_value(alpha_kind, c),
                            reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 37), (3, 19, 8, 9), (1, 1, 4, 4), (2, 80, 33), (2, 5, 2, 3, 7)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_spatial(dtype, shape, reduction):
    logits, target = softmax_case(shape, dtype, ignore_frac=0.15, ignore_index=255, seed=sum(shape))
    check_against_reference("focal", logits, target, gamma=2.0, alpha=0.5, ignore_index=255, reduction=reduction)


def test_focal_large():
    logits, target = softmax_case((4096, 80), torch.float32, ignore_frac=0.1, seed=3)
    check_against_reference("focal", logits, target, gamma=2.0, alpha=torch.rand(80).tolist())


def test_focal_int32_target_and_non_contiguous_logits():
    base, target = softmax_case((80, 37), torch.float32, seed=5)
    logits = base.t()  # (37, 80) non-contiguous view
    assert not logits.is_contiguous()
    check_against_reference("focal", logits, target[:37].to(torch.int32) % 80, gamma=0.5)
    strided = softmax_case((9, 20), torch.float32, seed=6)[0][:, ::2]
    check_against_reference("focal", strided, torch.randint(0, 10, (9,)), gamma=2.0, reduction="none")
    channels_last = softmax_case((2, 7, 5, 6), torch.float32, seed=7)[0].to(memory_format=torch.channels_last)
    check_against_reference("focal", channels_last, torch.randint(0, 7, (2, 5, 6)), gamma=2.0)


def test_focal_from_probabilities():
    logits, target = softmax_case((7, 5), torch.float32, ignore_frac=0.2, seed=9)
    probs = torch.softmax(logits, dim=1)
    for gamma in (0.0, 0.5, 2.0):
        check_against_reference("focal", probs, target, gamma=gamma, from_logits=False, alpha=0.3)
    probs4, target4 = softmax_case((2, 4, 3, 5), torch.float64, seed=10)
    check_against_reference("focal", torch.softmax(probs4, 1), target4, from_logits=False, reduction="none")


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 2.0])
def test_focal_gradient_finite_as_pt_goes_to_one(gamma):
    # p_t rounds to 1 in fp32 for margins over ~17 and in fp64 over ~37; the gradient must be
    # finite (the limit), equal to the reference's explicit formula.
    margins = torch.tensor([0.0, 5.0, 17.0, 40.0, 80.0, 200.0], dtype=torch.float64)
    logits = torch.zeros(6, 4, dtype=torch.float64)
    logits[:, 2] = margins
    target = torch.full((6,), 2)
    for dtype in (torch.float32, torch.float64):
        _, grad = check_against_reference("focal", logits.to(dtype), target, gamma=gamma, reduction="sum")
        assert torch.isfinite(grad).all()


def test_all_ignored_gives_zero_and_zero_grad():
    logits, target = softmax_case((5, 3), torch.float32, seed=1)
    target[:] = -100
    out, grad = loss_and_grad(fl.focal, logits, target, backend="cpu")
    assert out.item() == 0.0 and torch.count_nonzero(grad) == 0
    out, grad = loss_and_grad(fl.ohem, logits, target, backend="cpu")
    assert out.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_nan_logits_propagate_like_the_reference():
    logits, target = softmax_case((6, 4), torch.float32, seed=2)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("nan")
    target[3] = -100  # NaN in an ignored row must not leak
    check_against_reference("focal", logits, target, reduction="none")
    slogits, starget = sigmoid_case((6, 4), torch.float32, kind="float", seed=2)
    slogits[2, 1] = float("nan")
    check_against_reference("sigmoid_focal", slogits, starget, reduction="none")


# --------------------------------------------------------------------------------------------
# Sigmoid focal
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("kind", ["labels", "float", "soft"])
@pytest.mark.parametrize("gamma,alpha,reduction", [(2.0, 0.25, "none"), (0.5, -1.0, "mean"), (0.0, 0.75, "sum"),
                                                   (0.5, 0.25, "none")])
def test_sigmoid_focal_matrix(dtype, c, n, kind, gamma, alpha, reduction):
    logits, target = sigmoid_case((n, c), dtype, kind=kind, ignore_frac=0.2, seed=n * 11 + c)
    check_against_reference("sigmoid_focal", logits, target, gamma=gamma, alpha=alpha, reduction=reduction)


def test_sigmoid_focal_large_and_batched_shapes():
    logits, labels = sigmoid_case((4096, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=4)
    check_against_reference("sigmoid_focal", logits, labels, reduction="sum")
    logits, target = sigmoid_case((2, 3, 5, 7), torch.float32, kind="soft", seed=5)
    check_against_reference("sigmoid_focal", logits, target, reduction="none")
    logits, labels = sigmoid_case((2, 3, 5, 7), torch.bfloat16, kind="labels", ignore_frac=0.2, seed=6)
    check_against_reference("sigmoid_focal", logits, labels.to(torch.int32), reduction="mean")
    logits, target = sigmoid_case((9,), torch.float64, kind="float", seed=7)
    check_against_reference("sigmoid_focal", logits, target, reduction="mean")


def test_sigmoid_focal_non_contiguous_and_mixed_target_dtype():
    logits, target = sigmoid_case((40, 12), torch.float32, kind="soft", seed=8)
    check_against_reference("sigmoid_focal", logits.t(), target.t(), reduction="none")
    check_against_reference("sigmoid_focal", logits, target.double(), reduction="sum")
    blogits = logits.bfloat16()
    check_against_reference("sigmoid_focal", blogits, target, reduction="mean")


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("keep,reduction", [(0.25, "mean"), (3, "none"), (1.0, "sum"), (100, "mean")])
def test_ohem_matrix(dtype, c, n, keep, reduction):
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 13 + c)
    check_against_reference("ohem", logits, target, keep=keep, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 0), (0.7, 50), (0.05, 10), (1.1, 5)])
def test_ohem_threshold_mode(dtype, thresh, min_kept):
    logits, target = softmax_case((2, 19, 6, 11), dtype, ignore_frac=0.1, ignore_index=255, seed=21)
    check_against_reference("ohem", logits, target, thresh=thresh, min_kept=min_kept, ignore_index=255)
    logits, target = softmax_case((50, 7), dtype, ignore_frac=0.1, seed=22)
    check_against_reference("ohem", logits, target, thresh=thresh, min_kept=min_kept, reduction="none")


def test_ohem_ties_go_to_the_lower_index_and_large():
    logits = torch.zeros(12, 4)
    target = torch.zeros(12, dtype=torch.long)  # every CE equal: kept = the first k rows
    out, grad = loss_and_grad(fl.ohem, logits, target, keep=5, reduction="none", backend="cpu")
    assert torch.equal(out != 0, torch.arange(12) < 5)
    check_against_reference("ohem", logits, target, keep=0.5, reduction="none")
    logits, target = softmax_case((4096, 80), torch.float32, ignore_frac=0.1, seed=23)
    check_against_reference("ohem", logits, target, keep=0.3)
    logits, target = softmax_case((2, 19, 32, 40), torch.float32, ignore_frac=0.1, ignore_index=255, seed=24)
    check_against_reference("ohem", logits, target, keep=0.3, ignore_index=255)


# --------------------------------------------------------------------------------------------
# GHM-C
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", SMALL_N)
@pytest.mark.parametrize("mode", ["labels", "float", "softmax"])
@pytest.mark.parametrize("bins,reduction", [(10, "mean"), (1, "sum"), (30, "none")])
def test_ghmc_matrix(dtype, c, n, mode, bins, reduction):
    if mode == "softmax":
        logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 17 + c)
    else:
        logits, target = sigmoid_case((n, c), dtype, kind=mode, ignore_frac=0.2, seed=n * 17 + c)
    check_against_reference("ghmc", logits, target, bins=bins, use_sigmoid=mode != "softmax", reduction=reduction)


def test_ghmc_large_and_spatial():
    logits, labels = sigmoid_case((4096, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=31)
    check_against_reference("ghmc", logits, labels)
    logits, target = softmax_case((2, 19, 16, 20), torch.float32, ignore_frac=0.1, ignore_index=255, seed=32)
    check_against_reference("ghmc", logits, target, use_sigmoid=False, ignore_index=255, reduction="none")


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_ghmc_ema_state(use_sigmoid):
    """state: updated in place first (only bins non-empty in this batch), then used; same
    values as the reference's state after every step."""
    momentum = 0.75
    state_cpu = torch.zeros(10)
    state_ref = torch.zeros(10)
    for step in range(3):
        if use_sigmoid:
            logits, target = sigmoid_case((64, 5), torch.float32, kind="labels", ignore_frac=0.1, seed=40 + step,
                                          scale=1.0 + step)
        else:
            logits, target = softmax_case((64, 5), torch.float32, ignore_frac=0.1, seed=40 + step, scale=1.0 + step)
        before = state_cpu.clone()
        out, grad = loss_and_grad(fl.ghmc, logits, target, momentum=momentum, state=state_cpu,
                                  use_sigmoid=use_sigmoid, backend="cpu")
        ref, ref_grad = loss_and_grad(fl.ghmc, logits.double(), target, momentum=momentum, state=state_ref,
                                      use_sigmoid=use_sigmoid, backend="reference")
        assert torch.equal(state_cpu, state_ref), f"step {step}: state {state_cpu} != reference {state_ref}"
        assert not torch.equal(state_cpu, before)
        assert_matches_reference(out, ref, torch.float32, f"ghmc ema step {step} loss")
        assert_matches_reference(grad, ref_grad, torch.float32, f"ghmc ema step {step} grad")
    # A batch that fills only some bins leaves the other bins' state untouched.
    logits = torch.full((8, 3), 10.0)
    target = torch.ones(8, 3)  # g = |sigmoid(10) - 1| ~ 4.5e-5: only bin 0
    before = state_cpu.clone()
    fl.ghmc(logits, target, momentum=momentum, state=state_cpu, backend="cpu")
    assert torch.equal(state_cpu[1:], before[1:]) and state_cpu[0] != before[0]


def test_ghmc_module_owns_state():
    module = fl.nn.GHMCLoss(bins=10, momentum=0.75)
    logits, labels = sigmoid_case((32, 4), torch.float32, kind="labels", seed=44)
    module(logits, labels)
    assert module.acc_sum.abs().sum() > 0


# --------------------------------------------------------------------------------------------
# IB
# --------------------------------------------------------------------------------------------
def _features(kind, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "norm":
        return (torch.rand(n, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    if kind == "norm_col":
        return (torch.rand(n, 1, generator=g, dtype=torch.float64) + 0.1).to(dtype)
    return torch.randn(n, 6, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", [1, 7])
@pytest.mark.parametrize("feature_kind", ["norm", "norm_col", "raw"])
@pytest.mark.parametrize("gamma,weighted,detach,reduction", [(0.0, False, False, "mean"), (2.0, True, False, "sum"),
                                                             (0.5, False, True, "none"), (0.0, True, True, "mean")])
def test_ib_matrix(dtype, c, n, feature_kind, gamma, weighted, detach, reduction):
    logits, target = softmax_case((n, c), dtype, seed=n * 19 + c, scale=1.0)
    features = _features(feature_kind, n, dtype, seed=n + c)
    weight = torch.linspace(0.5, 2.0, c).tolist() if weighted else None
    check_against_reference("ib", logits, target, features, alpha=100.0, gamma=gamma, weight=weight,
                            detach_factor=detach, reduction=reduction)


def test_ib_empty_large_and_feature_gradient():
    logits, target = softmax_case((0, 5), torch.float32)
    check_against_reference("ib", logits, target, torch.rand(0))
    logits, target = softmax_case((4096, 80), torch.float32, seed=50, scale=1.0)
    check_against_reference("ib", logits, target, torch.rand(4096) + 0.1, gamma=1.0)
    # Gradient w.r.t. the features, for every feature layout.
    for kind in ("norm", "norm_col", "raw"):
        logits, target = softmax_case((9, 4), torch.float64, seed=51, scale=1.0)
        grads = []
        for backend in ("cpu", "reference"):
            f = _features(kind, 9, torch.float64, seed=52).requires_grad_(True)
            fl.ib(logits, target, f, alpha=10.0, gamma=0.5, backend=backend).backward()
            grads.append(f.grad)
        assert rel_error(grads[0], grads[1]) <= 1e-10, kind


# --------------------------------------------------------------------------------------------
# float64 gradcheck on the cpu backend
# --------------------------------------------------------------------------------------------
def _gradcheck_cases():
    x, t = softmax_case((5, 4), torch.float64, ignore_frac=0.2, seed=60, scale=1.0)
    xs, ts = softmax_case((2, 3, 2, 3), torch.float64, ignore_frac=0.2, seed=61, scale=1.0)
    sx, sl = sigmoid_case((5, 4), torch.float64, kind="labels", ignore_frac=0.2, seed=62, scale=1.0)
    _, sf = sigmoid_case((5, 4), torch.float64, kind="soft", seed=63, scale=1.0)
    f = torch.rand(5, dtype=torch.float64) + 0.5
    return [
        ("focal", x, (t,), dict(gamma=2.0, alpha=[0.1, 0.2, 0.3, 0.4])),
        ("focal", xs, (ts,), dict(gamma=0.5, reduction="none")),
        ("focal", torch.softmax(x, 1), (t,), dict(gamma=1.5, from_logits=False, reduction="sum")),
        ("sigmoid_focal", sx, (sl,), dict(gamma=2.0, reduction="mean")),
        ("sigmoid_focal", sx, (sf,), dict(gamma=0.5, reduction="none")),
        ("ohem", x, (t,), dict(keep=0.5)),
        ("ohem", xs, (ts,), dict(thresh=0.5, min_kept=2, reduction="none")),
        ("ghmc", sx, (sl,), dict(bins=5)),
        ("ghmc", xs, (ts,), dict(bins=5, use_sigmoid=False, reduction="sum")),
        ("ib", x, (t.clamp_min(0), f), dict(alpha=10.0)),
        ("ib", x, (t.clamp_min(0), f), dict(alpha=10.0, gamma=2.0, weight=[1.0, 2.0, 0.5, 1.0], reduction="none")),
    ]


@pytest.mark.parametrize("case", range(len(_gradcheck_cases())))
def test_gradcheck_float64(case):
    loss, x, rest, kwargs = _gradcheck_cases()[case]
    fn = getattr(fl, loss)
    if loss == "ib":
        target, f = rest
        assert torch.autograd.gradcheck(
            lambda xx, ff: fn(xx, target, ff, backend="cpu", **kwargs),
            (x.clone().requires_grad_(True), f.clone().requires_grad_(True)))
    else:
        assert torch.autograd.gradcheck(lambda xx: fn(xx, *rest, backend="cpu", **kwargs),
                                        (x.clone().requires_grad_(True),))


# --------------------------------------------------------------------------------------------
# opcheck on every op
# --------------------------------------------------------------------------------------------
def _opcheck_samples():
    """(op, args) samples, 3-5 per op, with logits requiring grad where the op is differentiable."""
    def rg(t):
        return t.clone().requires_grad_(True)

    x, t = softmax_case((6, 5), torch.float32, ignore_frac=0.2, seed=70)
    xs, ts = softmax_case((2, 5, 3, 4), torch.float32, ignore_frac=0.2, seed=71)
    xb, tb = softmax_case((6, 5), torch.bfloat16, seed=72)
    xd, td = softmax_case((4, 3), torch.float64, seed=73)
    sx, sl = sigmoid_case((6, 5), torch.float32, kind="labels", ignore_frac=0.2, seed=74)
    _, sf = sigmoid_case((6, 5), torch.float32, kind="soft", seed=75)
    alpha = torch.rand(5)
    samples = {
        "softmax_focal_forward": [
            (rg(x), t, None, 1.0, 2.0, -100, "mean", True, True),
            (rg(xs), ts, alpha, 1.0, 0.5, -100, "none", True, True),
            (rg(xb), tb, None, 0.25, 2.0, -100, "sum", True, True),
            (x, t, None, 1.0, 2.0, -100, "mean", True, False),
            (rg(torch.softmax(xd, 1)), td, None, 1.0, 1.0, -100, "none", False, True),
        ],
        "sigmoid_focal_forward": [
            (rg(sx), sl, 0.25, 2.0, -100, "none", True),
            (rg(sx), sf, -1.0, 0.5, -100, "mean", True),
            (rg(xb), (torch.rand(6, 5) < 0.3).bfloat16(), 0.25, 2.0, -100, "sum", True),
            (sx, sl, 0.25, 2.0, -100, "mean", False),
        ],
        "ohem_forward": [
            (rg(x), t, 0.5, 0, None, 0, -100, "mean", True),
            (rg(xs), ts, 0.0, 5, None, 0, -100, "none", True),
            (rg(xs), ts, 0.0, 0, 0.7, 4, -100, "sum", True),
        ],
        "ghmc_bin_weights": [
            (sx, sl, None, 10, 0.0, True, -100),
            (sx, sf, torch.zeros(10), 10, 0.75, True, -100),
            (xs, ts, torch.zeros(5), 5, 0.5, False, -100),
        ],
        "ghmc_forward": [
            (rg(sx), sl, torch.rand(10), True, -100, "mean", True),
            (rg(sx), sf, torch.rand(10), True, -100, "none", True),
            (rg(xs), ts, torch.rand(5), False, -100, "sum", True),
        ],
        "ib_forward": [
            (rg(x), t.clamp_min(0), rg(torch.rand(6) + 0.1), None, 100.0, 1e-3, 0.0, False, "mean", True),
            (rg(x), t.clamp_min(0), rg(torch.rand(6) + 0.1), alpha, 100.0, 1e-3, 2.0, False, "none", True),
            (rg(xd), td, torch.rand(4, dtype=torch.float64), None, 10.0, 1e-3, 0.5, True, "sum", True),
        ],
        "scale_grad": [
            (torch.randn(6, 5), torch.tensor(0.5), torch.float32),
            (torch.randn(2, 5, 3, 4), torch.randn(2, 3, 4), torch.float32),
            (torch.randn(6, 5), torch.randn(6, 5).bfloat16(), torch.bfloat16),
            (torch.randn(3, 4, dtype=torch.float64), torch.randn(3, dtype=torch.float64), torch.float64),
        ],
    }
    return [(name, args) for name, per_op in samples.items() for args in per_op]


_OPCHECK = _opcheck_samples()


@pytest.mark.parametrize("index", range(len(_OPCHECK)), ids=[f"{n}-{i}" for i, (n, _) in enumerate(_OPCHECK)])
def test_opcheck(index):
    name, args = _opcheck_samples()[index]
    opcheck_loss_op(getattr(OPS, name).default, args)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal"])
def test_torch_compile_fullgraph(loss):
    torch._dynamo.reset()
    if loss == "focal":
        logits, target = softmax_case((2, 5, 4, 6), torch.float32, ignore_frac=0.2, seed=80)
        kwargs = dict(gamma=2.0, alpha=0.25, reduction="mean")
    else:
        logits, target = sigmoid_case((16, 7), torch.float32, kind="labels", ignore_frac=0.2, seed=81)
        kwargs = dict(gamma=2.0, alpha=0.25, reduction="sum")
    fn = getattr(fl, loss)

    def step(x, t):
        return fn(x, t, backend="cpu", validate=False, **kwargs)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out, grad = loss_and_grad(compiled, logits, target)
    eager_out, eager_grad = loss_and_grad(step, logits, target)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)
    # A second shape runs too (recompile or dynamic shapes), still equal to eager.
    if loss == "focal":
        logits2, target2 = softmax_case((3, 5, 2, 7), torch.float32, seed=82)
    else:
        logits2, target2 = sigmoid_case((9, 7), torch.float32, kind="labels", seed=83)
    out2, grad2 = loss_and_grad(compiled, logits2, target2)
    eager_out2, eager_grad2 = loss_and_grad(step, logits2, target2)
    assert torch.equal(out2, eager_out2) and torch.equal(grad2, eager_grad2)


@pytest.mark.compile
def test_torch_compile_fullgraph_ghmc_without_state():
    # state=None once failed in inductor (a None optional mutable argument); the backend now
    # passes a scratch state, which must give the eager numbers exactly.
    torch._dynamo.reset()
    logits, target = sigmoid_case((16, 7), torch.float32, kind="labels", ignore_frac=0.2, seed=84)

    def step(x, t):
        return fl.ghmc(x, t, bins=10, backend="cpu", validate=False)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out, grad = loss_and_grad(compiled, logits, target)
    eager_out, eager_grad = loss_and_grad(step, logits, target)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)
    ref = reference.ghmc(logits.double(), target, bins=10, momentum=0.0, state=None, use_sigmoid=True,
                         ignore_index=-100, reduction="mean")
    assert_rel_close(out, ref, 1e-5, "ghmc loss")


# --------------------------------------------------------------------------------------------
# Determinism, retain_graph, double backward, direct-op errors
# --------------------------------------------------------------------------------------------
def _determinism_cases():
    x, t = softmax_case((3000, 80), torch.float32, ignore_frac=0.1, seed=90)
    xs, ts = softmax_case((2, 19, 40, 50), torch.float32, ignore_frac=0.1, ignore_index=255, seed=91)
    sx, sl = sigmoid_case((3000, 80), torch.float32, kind="labels", ignore_frac=0.1, seed=92)
    f = torch.rand(3000) + 0.1
    return [
        (fl.focal, x, (t,), dict(gamma=2.0)),
        (fl.focal, xs, (ts,), dict(gamma=0.5, ignore_index=255)),
        (fl.sigmoid_focal, sx, (sl,), dict(reduction="sum")),
        (fl.ohem, xs, (ts,), dict(keep=0.3, ignore_index=255)),
        (fl.ghmc, sx, (sl,), dict()),
        (fl.ghmc, xs, (ts,), dict(use_sigmoid=False, ignore_index=255)),
        (fl.ib, x, (t.clamp_min(0), f), dict(alpha=100.0)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bitwise_deterministic_for_any_thread_count(case):
    fn, x, rest, kwargs = _determinism_cases()[case]
    runs = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 1, 3):
            torch.set_num_threads(threads)
            runs.append(loss_and_grad(fn, x, *rest, backend="cpu", **kwargs))
    finally:
        torch.set_num_threads(before)
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_retain_graph_backward_twice_gives_the_same_gradient():
    logits, target = softmax_case((7, 5), torch.float32, seed=95)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, reduction="none", backend="cpu")
    cot = torch.randn(out.shape)
    (g1,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g3,) = torch.autograd.grad(out, x, 2 * cot)
    assert torch.equal(g1, g2) and torch.equal(g3, 2 * g1)
    x64 = logits.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(fl.focal(x64, target, reduction="none", backend="reference"), x64, cot.double())
    assert_matches_reference(g1, ref, torch.float32, "focal grad after retain_graph")


def test_double_backward_raises_a_clear_error():
    logits, target = softmax_case((4, 3), torch.float64, seed=96)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


def test_inference_does_no_gradient_work_and_forward_only_matches():
    logits, target = softmax_case((7, 5), torch.float32, seed=97)
    with torch.no_grad():
        loss, grad = OPS.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "mean", True, False)
    assert grad.numel() == 0
    assert not loss.requires_grad
    assert loss == fl.focal(logits, target, backend="cpu")


def test_direct_op_call_rejects_out_of_range_targets():
    logits = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.softmax_focal_forward(logits, torch.tensor([0, 1, 3, 2]), None, 1.0, 2.0, -100, "mean", True, False)
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.sigmoid_focal_forward(logits, torch.tensor([0, 1, 4, 2]), 0.25, 2.0, -100, "mean", False)
    with pytest.raises(RuntimeError, match="reduction"):
        OPS.softmax_focal_forward(logits, torch.tensor([0, 1, 2, 2]), None, 1.0, 2.0, -100, "avg", True, False)


def test_backend_is_the_automatic_choice_for_cpu_tensors():
    logits, target = softmax_case((4, 3), torch.float32)
    assert _backends.select("focal", logits, None).name == "cpu"
    for loss in _backends.LOSSES:
        assert _backends.select(loss, logits, None).name == "cpu"


def test_reused_output_buffers_are_never_visible_to_the_caller():
    """Big outputs come from a small pool of buffers of earlier calls (csrc/DESIGN.md); a buffer
    the caller still references (tensor or view) must never be handed out again."""
    logits, target = softmax_case((4096, 80), torch.float32, seed=98)  # 1.3 MB gradient
    _, grad_kept = loss_and_grad(fl.focal, logits, target, backend="cpu")
    kept_copy = grad_kept.clone()
    _, grad_view_base = loss_and_grad(fl.focal, logits * 0.5, target, backend="cpu")
    view = grad_view_base[:7, 3:9]
    view_copy = view.clone()
    del grad_view_base
    sig_logits, sig_target = sigmoid_case((4096, 80), torch.float32, kind="soft", seed=99)
    loss_none = fl.sigmoid_focal(sig_logits, sig_target, reduction="none", backend="cpu")
    loss_copy = loss_none.clone()
    for seed in range(6):
        other, other_target = softmax_case((4096, 80), torch.float32, seed=200 + seed)
        loss_and_grad(fl.focal, other, other_target, backend="cpu")
        fl.sigmoid_focal(other, torch.rand(4096, 80), reduction="none", backend="cpu")
    assert torch.equal(grad_kept, kept_copy)
    assert torch.equal(view, view_copy)
    assert torch.equal(loss_none, loss_copy)
