"""Quality focal, varifocal and asymmetric loss (issue #24) on every backend against the float64
reference (fused_losses.reference, itself checked against the peers' formulas in
tests/test_reference_detector.py): 'reference', 'cpu' (csrc/cpu/detector_sigmoid.cpp), 'triton'
(fused_losses/_triton/detector_sigmoid.py, through the interpreter on CPU tensors) and 'cuda_emu'
(csrc/cuda/detector_sigmoid.cu on the CPU emulator: a skip unless FL_CUDA_EMU is set, as under
`make test-cuda-emu`).

Exactness (tests/utils.py): float32 loss and gradient within 1e-5 relative L2 of float64; fp16 /
bf16 at least as close to float64 as the eager reference run in that precision. Plus the edge
rows (ignored, all ignored, zero weight with NaN logits, soft targets and scores 0 and 1),
every reduction and avg_factor, gradcheck in float64, torch.compile(fullgraph=True) on the cpu
backend, bitwise determinism and the bad-input rows of docs/bad-input.md.
"""
from __future__ import annotations

import pytest
import torch

import fused_losses as fl
from fused_losses import reference
from tests.cuda_emu import backend as cuda_emu
from tests.utils import LOW_PRECISION, assert_matches_reference, loss_and_grad, rel_error

IGNORE = -100


def _backend_params():
    params = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu")]
    status = fl.backends()
    triton_marks = [] if status["triton"].available else [pytest.mark.skip(reason=status["triton"].reason)]
    params.append(pytest.param("triton", id="triton", marks=triton_marks))
    emu_ok, emu_reason = cuda_emu.BACKEND.availability()
    emu_marks = [] if emu_ok else [pytest.mark.skip(reason=f"cuda_emu unavailable: {emu_reason}")]
    params.append(pytest.param("cuda_emu", id="cuda_emu", marks=emu_marks))
    return params


BACKENDS = _backend_params()
COMPILED = [p for p in BACKENDS if p.values[0] != "reference"]


# ---- inputs ------------------------------------------------------------------------------------
def _labels_case(shape, g, *, ignore=True):
    """Labels in [0, C] (C = background) with ignored rows, and scores with exact 0 and 1."""
    c = shape[-1]
    labels = torch.randint(0, c + 1, shape[:-1], generator=g)
    if ignore:
        labels[torch.rand(shape[:-1], generator=g) < 0.15] = IGNORE
    score = torch.rand(shape[:-1], generator=g, dtype=torch.float64)
    flat = score.reshape(-1)
    flat[0::5] = 0.0  # q = 0 at a positive
    flat[1::7] = 1.0  # q = 1
    return labels, score


def _dense_case(shape, g):
    """A soft target: mostly 0, some exact 1, some in (0, 1)."""
    u = torch.rand(shape, generator=g, dtype=torch.float64)
    y = torch.where(u < 0.8, torch.zeros_like(u), torch.rand(shape, generator=g, dtype=torch.float64))
    y[u > 0.95] = 1.0
    return y


# Each variant: (loss name, kwargs for fl.<loss> and reference.<loss>, target form)
VARIANTS = {
    "qfl-labels": ("quality_focal", {}, "labels"),
    "qfl-dense": ("quality_focal", {}, "dense"),
    "qfl-dense-beta": ("quality_focal", {"beta": 1.5}, "dense"),  # the CPU row's general exponent
    "qfl-activated-labels": ("quality_focal", {"activated": True}, "labels"),
    "qfl-activated-dense": ("quality_focal", {"activated": True, "beta": 1.5}, "dense"),
    "vfl-labels": ("varifocal", {}, "labels"),
    "vfl-dense": ("varifocal", {}, "dense"),
    "vfl-detach-noiou": ("varifocal", {"detach_modulation": True, "iou_weighted": False, "gamma": 1.5,
                                       "alpha": 0.5}, "labels"),
    "vfl-dense-detach": ("varifocal", {"detach_modulation": True}, "dense"),
    "asl-multihot": ("asymmetric", {}, "multihot"),
    "asl-soft": ("asymmetric", {"gamma_pos": 0.5, "gamma_neg": 3.0, "clip": 0.1}, "dense"),
    "asl-noclip-detach": ("asymmetric", {"clip": 0.0, "detach_focusing": True}, "multihot"),
    "asl-gamma0": ("asymmetric", {"gamma_pos": 0.0, "gamma_neg": 0.0, "clip": None}, "multihot"),
}


def make_case(variant, shape=(13, 7), dtype=torch.float32, seed=0, weight=None):
    """(logits in dtype, target, extra kwargs incl. score / weight) for a variant. weight: None,
    'row' or 'element' (with exact zeros)."""
    loss, kwargs, form = VARIANTS[variant]
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(shape, generator=g, dtype=torch.float64)
    if kwargs.get("activated"):
        logits = torch.sigmoid(logits)
    kwargs = dict(kwargs)
    if form == "labels":
        target, score = _labels_case(shape, g)
        kwargs["score"] = score.to(dtype)
    elif form == "dense":
        target = _dense_case(shape, g).to(dtype)
    else:
        target = (torch.rand(shape, generator=g) < 0.2).to(dtype)
    if weight == "row":
        w = torch.rand(shape[:-1], generator=g, dtype=torch.float64) * 2
        w.reshape(-1)[2::4] = 0.0
        kwargs["weight"] = w.to(torch.float32)
    elif weight == "element":
        w = torch.rand(shape, generator=g, dtype=torch.float64) * 2
        w.reshape(-1)[3::5] = 0.0
        kwargs["weight"] = w.to(torch.float32)
    return loss, logits.to(dtype), target, kwargs


def _fn(loss, backend):
    def call(x, t, **kw):
        return getattr(fl, loss)(x, t, backend=backend, **kw)
    return call


def _ref(loss, logits, target, kwargs, *, upcast=True, dtype=torch.float64):
    """The reference on float64 (or, upcast=False, the eager low-precision) inputs: loss, grad."""
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kwargs.items()}
    t = target.to(dtype) if target.is_floating_point() else target
    fn = getattr(reference, loss)
    return loss_and_grad(lambda x, *a, **k: fn(x, *a, upcast=upcast, **k), logits.to(dtype), t, **kw)


def _check(backend, variant, dtype, reduction, *, shape=(13, 7), weight=None, avg_factor=None, seed=0):
    loss, logits, target, kwargs = make_case(variant, shape, dtype, seed=seed, weight=weight)
    kwargs = dict(kwargs, reduction=reduction)
    if avg_factor is not None:
        kwargs["avg_factor"] = avg_factor
    out, grad = loss_and_grad(_fn(loss, backend), logits, target, **kwargs)
    ref_out, ref_grad = _ref(loss, logits, target, kwargs)
    eager_out = eager_grad = None
    if dtype in LOW_PRECISION:
        eager_out, eager_grad = _ref(loss, logits, target, kwargs, upcast=False, dtype=dtype)
    assert out.shape == ref_out.shape
    expected_dtype = dtype if reduction == "none" else torch.promote_types(dtype, torch.float32)
    assert out.dtype == expected_dtype, (out.dtype, expected_dtype)
    assert grad.dtype == dtype
    assert_matches_reference(out, ref_out, dtype, f"{backend} {variant} {reduction} loss", eager_out)
    assert_matches_reference(grad, ref_grad, dtype, f"{backend} {variant} {reduction} grad", eager_grad)


# ---- against the float64 reference -------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_matches_reference(backend, variant, reduction):
    _check(backend, variant, torch.float32, reduction)


@pytest.mark.parametrize("variant", ["qfl-labels", "qfl-activated-dense", "vfl-labels", "vfl-dense", "asl-multihot",
                                     "asl-soft"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", COMPILED)
def test_low_precision_as_close_as_eager(backend, variant, dtype, reduction):
    _check(backend, variant, dtype, reduction, shape=(37, 11))


@pytest.mark.parametrize("variant", ["qfl-labels", "qfl-dense", "qfl-activated-labels", "vfl-labels", "vfl-dense",
                                     "asl-soft"])
@pytest.mark.parametrize("weight", ["row", "element"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_and_avg_factor(backend, variant, weight):
    _check(backend, variant, torch.float32, "mean", weight=weight, avg_factor=3.5)
    _check(backend, variant, torch.float32, "none", weight=weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_wide_rows(backend):
    """(B, Q, C) logits (RT-DETR's) and a row longer than one SIMD/block width."""
    _check(backend, "vfl-labels", torch.float32, "mean", shape=(2, 5, 3))
    _check(backend, "qfl-labels", torch.float32, "none", shape=(2, 3, 4))
    _check(backend, "asl-soft", torch.float32, "sum", shape=(3, 1030))


def test_avg_factor_tensor_no_host_read():
    loss, logits, target, kwargs = make_case("qfl-labels")
    a = torch.tensor(2.5)
    got = fl.quality_focal(logits, target, avg_factor=a, backend="cpu", **kwargs)
    want = fl.quality_focal(logits, target, reduction="sum", backend="cpu", **kwargs) / 2.5
    assert torch.allclose(got, want, rtol=1e-6)


# ---- edge rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["quality_focal", "varifocal"])
@pytest.mark.parametrize("backend", COMPILED)
def test_all_ignored(backend, loss):
    x = torch.randn(5, 4, requires_grad=True)
    labels = torch.full((5,), IGNORE)
    score = torch.rand(5)
    out = getattr(fl, loss)(x, labels, score=score, backend=backend)
    out.backward()
    assert out.item() == 0.0
    assert torch.equal(x.grad, torch.zeros_like(x))
    none = getattr(fl, loss)(x.detach(), labels, score=score, backend=backend, reduction="none")
    assert torch.equal(none, torch.zeros_like(none))


@pytest.mark.parametrize("variant", ["qfl-labels", "qfl-dense", "qfl-activated-dense", "vfl-labels", "vfl-dense",
                                     "asl-multihot"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_nan_logits(backend, variant):
    loss, logits, target, kwargs = make_case(variant, weight="element")
    w = kwargs["weight"]
    bad = logits.clone()
    bad[w == 0] = float("nan")
    bad_row = bad.clone()
    # a whole row with a zero weight (NaN probabilities with activated=True: inf is out of [0, 1], bad input)
    bad_row[0] = float("nan") if VARIANTS[variant][1].get("activated") else float("inf")
    row_w = torch.ones(logits.shape[:-1])
    row_w[0] = 0.0
    for weight, x in ((w, bad), (w * row_w[:, None], bad_row)):
        out, grad = loss_and_grad(_fn(loss, backend), x, target, **dict(kwargs, weight=weight, reduction="sum"))
        assert torch.isfinite(out), out
        assert torch.equal(grad[weight == 0], torch.zeros_like(grad[weight == 0]))
        ref_out, ref_grad = _ref(loss, x, target, dict(kwargs, weight=weight, reduction="sum"))
        assert rel_error(out, ref_out) <= 1e-5 and rel_error(grad, ref_grad) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_and_scores_at_0_and_1(backend):
    """Exact soft targets 0 and 1 and scores q = 0 and q = 1 on confident and uncertain logits."""
    x = torch.tensor([[-30.0, -2.0, 0.0, 2.0, 30.0]] * 4)
    y = torch.tensor([[0.0] * 5, [1.0] * 5, [0.0, 1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 1.0, 0.0, 1.0]])
    labels = torch.tensor([0, 4, 2, 5])
    for score in (torch.zeros(4), torch.ones(4)):
        for loss in ("quality_focal", "varifocal"):
            kw = dict(score=score, reduction="none")
            out, grad = loss_and_grad(_fn(loss, backend), x, labels, **kw)
            ref_out, ref_grad = _ref(loss, x, labels, kw)
            assert rel_error(out, ref_out) <= 1e-5 and rel_error(grad, ref_grad) <= 1e-5, (loss, score)
    for loss in ("quality_focal", "varifocal", "asymmetric"):
        out, grad = loss_and_grad(_fn(loss, backend), x, y, reduction="none")
        ref_out, ref_grad = _ref(loss, x, y, {"reduction": "none"})
        assert rel_error(out, ref_out) <= 1e-5 and rel_error(grad, ref_grad) <= 1e-5, loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_vfl_positive_with_zero_score(backend):
    """Label form: the label's class is a positive whatever its score (q = 0: zero loss and
    gradient, RT-DETR / ultralytics); the dense form reads y = 0 as a negative (mmdet)."""
    x = torch.tensor([[1.5, -0.5, 0.25]])
    out = fl.varifocal(x, torch.tensor([1]), score=torch.zeros(1), reduction="none", backend=backend)
    assert out[0, 1].item() == 0.0
    dense = fl.varifocal(x, torch.zeros(1, 3), reduction="none", backend=backend)
    assert dense[0, 1].item() > 0.0


@pytest.mark.parametrize("backend", COMPILED)
def test_detach_flags_change_only_the_gradient(backend):
    loss, logits, target, kwargs = make_case("vfl-dense")
    a = loss_and_grad(_fn(loss, backend), logits, target, **kwargs)
    b = loss_and_grad(_fn(loss, backend), logits, target, **dict(kwargs, detach_modulation=True))
    assert torch.equal(a[0], b[0])
    pos = target > 0
    assert torch.equal(a[1][pos], b[1][pos]) and not torch.equal(a[1][~pos], b[1][~pos])
    loss, logits, target, kwargs = make_case("asl-multihot")
    a = loss_and_grad(_fn(loss, backend), logits, target, **kwargs)
    b = loss_and_grad(_fn(loss, backend), logits, target, **dict(kwargs, detach_focusing=True))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])


# ---- gradcheck, compile, determinism -----------------------------------------------------------
@pytest.mark.parametrize("variant", [v for v, (_, kw, _) in VARIANTS.items()
                                     if not (kw.get("detach_modulation") or kw.get("detach_focusing"))])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_gradcheck_float64(backend, variant):
    """(The detach variants' gradient is not the derivative by design: checked against the
    reference, which detaches with autograd, in the tests above.)"""
    loss, logits, target, kwargs = make_case(variant, shape=(4, 5), dtype=torch.float64, seed=2, weight="element")
    if kwargs.get("activated"):
        logits = logits.clamp(0.05, 0.95)  # away from the clamped logs
    x = logits.clone().requires_grad_(True)
    for reduction in ("sum", "none"):
        assert torch.autograd.gradcheck(lambda z: getattr(fl, loss)(z, target, backend=backend, reduction=reduction,
                                                                    **kwargs), (x,), eps=1e-6, atol=1e-7)


def test_compile_fullgraph_cpu():
    cases = [make_case(v, shape=(9, 6), seed=4) for v in ("qfl-labels", "vfl-dense", "asl-multihot")]

    def step(*xs):
        total = 0
        for x, (loss, _, target, kwargs) in zip(xs, cases):
            total = total + getattr(fl, loss)(x, target, backend="cpu", **kwargs)
        return total

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    xs = [c[1].clone().requires_grad_(True) for c in cases]
    ys = [c[1].clone().requires_grad_(True) for c in cases]
    eager = step(*xs)
    eager.backward()
    got = compiled(*ys)
    got.backward()
    assert torch.allclose(got, eager, rtol=1e-6)
    for x, y in zip(xs, ys):
        assert torch.allclose(y.grad, x.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", ["qfl-labels", "vfl-dense", "asl-soft"])
@pytest.mark.parametrize("backend", COMPILED)
def test_bitwise_deterministic(backend, variant):
    loss, logits, target, kwargs = make_case(variant, shape=(301, 23), seed=5, weight="row")
    first = loss_and_grad(_fn(loss, backend), logits, target, **kwargs)
    second = loss_and_grad(_fn(loss, backend), logits, target, **kwargs)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_cpu_thread_count_invariant():
    loss, logits, target, kwargs = make_case("vfl-labels", shape=(4000, 20), seed=6)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = loss_and_grad(_fn(loss, "cpu"), logits, target, **kwargs)
        torch.set_num_threads(2)
        two = loss_and_grad(_fn(loss, "cpu"), logits, target, **kwargs)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_score_that_requires_grad_runs_on_reference():
    x = torch.randn(4, 3, requires_grad=True)
    score = torch.rand(4, requires_grad=True)
    out = fl.quality_focal(x, torch.tensor([0, 1, 3, 2]), score=score)
    out.backward()
    assert score.grad is not None
    with pytest.raises(RuntimeError, match="score|target"):
        fl.quality_focal(x, torch.tensor([0, 1, 3, 2]), score=score, backend="cpu")


# ---- bad input (docs/bad-input.md) -------------------------------------------------------------
X = torch.randn(4, 3)
LAB = torch.tensor([0, 3, 1, 2])
SC = torch.rand(4)
Y = (torch.rand(4, 3) < 0.3).float()

BAD = [
    ("qfl label out of range", lambda: fl.quality_focal(X, torch.tensor([0, 4, 1, 2]), score=SC), ValueError,
     "target"),
    ("qfl negative label", lambda: fl.quality_focal(X, torch.tensor([0, -1, 1, 2]), score=SC), ValueError, "target"),
    ("vfl label out of range", lambda: fl.varifocal(X, torch.tensor([0, 9, 1, 2]), score=SC), ValueError, "target"),
    ("qfl score above 1", lambda: fl.quality_focal(X, LAB, score=SC + 1), ValueError, "score"),
    ("vfl negative score", lambda: fl.varifocal(X, LAB, score=-SC), ValueError, "score"),
    ("qfl NaN score", lambda: fl.quality_focal(X, LAB, score=torch.full((4,), float("nan"))), ValueError, "score"),
    ("qfl soft target above 1", lambda: fl.quality_focal(X, Y * 2), ValueError, "target"),
    ("vfl negative soft target", lambda: fl.varifocal(X, -Y), ValueError, "target"),
    ("asl target above 1", lambda: fl.asymmetric(X, Y + 0.5), ValueError, "target"),
    ("qfl labels without score", lambda: fl.quality_focal(X, LAB), ValueError, "score"),
    ("qfl dense target with score", lambda: fl.quality_focal(X, Y, score=SC), ValueError, "score"),
    ("qfl score shape", lambda: fl.quality_focal(X, LAB, score=SC[:3]), ValueError, "score"),
    ("vfl label shape", lambda: fl.varifocal(X, LAB[:3], score=SC), ValueError, "target"),
    ("vfl dense target shape", lambda: fl.varifocal(X, Y[:, :2]), ValueError, "target"),
    ("asl target shape", lambda: fl.asymmetric(X, Y[:3]), ValueError, "target"),
    ("asl integer target", lambda: fl.asymmetric(X, Y.long()), TypeError, r"target: .*target\.float\(\)"),
    ("qfl score device", lambda: fl.quality_focal(X, LAB, score=SC.to("meta")), ValueError, "score"),
    ("asl target device", lambda: fl.asymmetric(X, Y.to("meta")), ValueError, "target"),
    ("qfl activated probabilities above 1", lambda: fl.quality_focal(X.abs() + 1, LAB, score=SC, activated=True),
     ValueError, "logits"),
    ("qfl negative beta", lambda: fl.quality_focal(X, LAB, score=SC, beta=-1.0), ValueError, "beta"),
    ("vfl negative alpha", lambda: fl.varifocal(X, LAB, score=SC, alpha=-0.5), ValueError, "alpha"),
    ("asl clip above 1", lambda: fl.asymmetric(X, Y, clip=1.5), ValueError, "clip"),
    ("asl negative gamma_neg", lambda: fl.asymmetric(X, Y, gamma_neg=-1.0), ValueError, "gamma_neg"),
    ("asl avg_factor with sum", lambda: fl.asymmetric(X, Y, avg_factor=2.0), ValueError, "avg_factor"),
    ("vfl weight shape", lambda: fl.varifocal(X, LAB, score=SC, weight=torch.ones(3, 3)), ValueError, "weight"),
    ("qfl int logits", lambda: fl.quality_focal(LAB[:, None].expand(4, 3).contiguous(), LAB, score=SC), TypeError,
     "logits"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case):
    _, call, exc, match = case
    with pytest.raises(exc, match=f"^{match}" if not match.startswith("target:") else match):
        call()


# ---- compat drop-ins against the peers' formulas (written here from their code) ---------------
# mmdet 3.x models/losses/gfocal_loss.py, varifocal_loss.py, utils.py (weight_reduce_loss);
# ultralytics utils/loss.py (VarifocalLoss); timm loss/asymmetric_loss.py (AsymmetricLossMultiLabel).
import torch.nn.functional as torch_F  # noqa: E402

from fused_losses import compat  # noqa: E402

MMDET_EPS = torch.finfo(torch.float32).eps


def _mmdet_weight_reduce(loss, weight, reduction, avg_factor):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if reduction == "mean":
        return loss.sum() / (avg_factor + MMDET_EPS)
    return loss  # 'none'


def _mmdet_qfl(pred, target, beta, activated):
    """mmdet's quality_focal_loss / _with_prob (tuple target) and _tensor_target, (N,)."""
    s = pred if activated else pred.sigmoid()
    bce = torch_F.binary_cross_entropy if activated else torch_F.binary_cross_entropy_with_logits
    loss = bce(pred, torch.zeros_like(pred), reduction="none") * s.pow(beta)
    if isinstance(target, torch.Tensor):
        pos = target != 0
        loss = torch.where(pos, bce(pred, target, reduction="none") * (target - s).abs().pow(beta), loss)
        return loss.sum(dim=1)
    label, score = target
    c = pred.shape[1]
    pos = ((label >= 0) & (label < c)).nonzero().squeeze(1)
    pl = label[pos].long()
    loss = loss.clone()
    loss[pos, pl] = bce(pred[pos, pl], score[pos], reduction="none") * (score[pos] - s[pos, pl]).abs().pow(beta)
    return loss.sum(dim=1)


def _mmdet_vfl(pred, target, alpha, gamma, iou_weighted):
    s = pred.sigmoid()
    pos = (target > 0).to(pred.dtype)
    first = target * pos if iou_weighted else pos
    focal_weight = first + alpha * (s - target).abs().pow(gamma) * (target <= 0).to(pred.dtype)
    return torch_F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def _ultralytics_vfl(pred_score, gt_score, label, alpha=0.75, gamma=2.0):
    weight = alpha * pred_score.sigmoid().pow(gamma) * (1 - label) + gt_score * label
    return (torch_F.binary_cross_entropy_with_logits(pred_score, gt_score, reduction="none") * weight).mean(1).sum()


def _timm_asl(x, y, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8):
    xs_pos = torch.sigmoid(x)
    xs_neg = 1 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = y * torch.log(xs_pos.clamp(min=eps)) + (1 - y) * torch.log(xs_neg.clamp(min=eps))
    pt = xs_pos * y + xs_neg * (1 - y)
    loss = loss * torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -loss.sum()


def _both(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    out.sum().backward()
    return out.detach(), x.grad


def _peer_case(seed=0, n=24, c=6):
    g = torch.Generator().manual_seed(seed)
    pred = 2 * torch.randn(n, c, generator=g, dtype=torch.float64)
    label = torch.randint(-1, c + 1, (n,), generator=g)  # -1 and C: background in mmdet's QFL
    score = torch.rand(n, generator=g, dtype=torch.float64)
    dense = _dense_case((n, c), g)
    weight = torch.rand(n, generator=g, dtype=torch.float64)
    return pred, label, score, dense, weight


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("activated", [False, True])
@pytest.mark.parametrize("form", ["tuple", "tensor"])
@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("mean", 7.0), ("sum", None), ("none", None),
                                                  ("none", 3.0)])
def test_mmdet_quality_focal(backend, activated, form, reduction, avg_factor):
    pred, label, score, dense, weight = _peer_case(1)
    if activated:
        pred = pred.sigmoid()
    target = (label, score) if form == "tuple" else dense
    loss_fn = compat.MMDetQualityFocalLoss(activated=activated, loss_weight=0.5, backend=backend)
    got = _both(lambda x: loss_fn(x, target, weight, avg_factor=avg_factor, reduction_override=reduction), pred)
    want = _both(lambda x: 0.5 * _mmdet_weight_reduce(_mmdet_qfl(x, target, 2.0, activated), weight, reduction,
                                                      avg_factor), pred)
    for g, w, what in zip(got, want, ("loss", "grad")):
        assert rel_error(g, w) <= 1e-10, (what, rel_error(g, w))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("iou_weighted", [True, False])
@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("mean", 5.0), ("sum", None), ("none", None)])
def test_mmdet_varifocal(backend, iou_weighted, reduction, avg_factor):
    pred, _, _, dense, weight = _peer_case(2)
    loss_fn = compat.MMDetVarifocalLoss(iou_weighted=iou_weighted, loss_weight=2.0, backend=backend)
    w = weight[:, None].expand_as(pred)
    got = _both(lambda x: loss_fn(x, dense, w, avg_factor=avg_factor, reduction_override=reduction), pred)
    want = _both(lambda x: 2.0 * _mmdet_weight_reduce(_mmdet_vfl(x, dense, 0.75, 2.0, iou_weighted), w, reduction,
                                                      avg_factor), pred)
    for g, ww, what in zip(got, want, ("loss", "grad")):
        assert rel_error(g, ww) <= 1e-10, (what, rel_error(g, ww))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_ultralytics_varifocal(backend):
    g = torch.Generator().manual_seed(3)
    pred = 2 * torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    cls = torch.randint(0, 5, (2, 7), generator=g)  # 4 = no object
    label = torch_F.one_hot(cls, 5)[..., :4].to(torch.float64)
    iou = torch.rand(2, 7, 1, generator=g, dtype=torch.float64)
    iou[0, :3] = 0.0  # positives with IoU 0
    gt_score = label * iou
    got = _both(lambda x: compat.VarifocalLoss(backend=backend)(x, gt_score, label), pred)
    want = _both(lambda x: _ultralytics_vfl(x, gt_score, label), pred)
    for a, b, what in zip(got, want, ("loss", "grad")):
        assert rel_error(a, b) <= 1e-10, (what, rel_error(a, b))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_timm_asymmetric(backend, clip):
    g = torch.Generator().manual_seed(4)
    x = 2 * torch.randn(16, 9, generator=g, dtype=torch.float64)
    y = (torch.rand(16, 9, generator=g) < 0.25).to(torch.float64)
    got = _both(lambda z: fl.asymmetric(z, y, clip=clip, backend=backend), x)
    want = _both(lambda z: _timm_asl(z, y, clip=clip), x)
    for a, b, what in zip(got, want, ("loss", "grad")):
        assert rel_error(a, b) <= 1e-10, (what, rel_error(a, b))
    # newer timm's 'batchmean' = sum / N
    got = fl.asymmetric(x, y, clip=clip, reduction="mean", avg_factor=16, backend=backend)
    assert rel_error(got, _timm_asl(x, y, clip=clip) / 16) <= 1e-10


def test_nn_modules_match_functional():
    loss, logits, target, kwargs = make_case("qfl-labels")
    m = fl.nn.QualityFocalLoss(reduction="sum", backend="cpu")
    assert torch.equal(m(logits, target, score=kwargs["score"]),
                       fl.quality_focal(logits, target, score=kwargs["score"], reduction="sum", backend="cpu"))
    loss, logits, target, kwargs = make_case("vfl-dense")
    m = fl.nn.VarifocalLoss(detach_modulation=True, backend="cpu")
    assert torch.equal(m(logits, target), fl.varifocal(logits, target, detach_modulation=True, backend="cpu"))
    loss, logits, target, kwargs = make_case("asl-multihot")
    m = fl.nn.AsymmetricLoss(gamma_neg=2.0, backend="cpu")
    assert torch.equal(m(logits, target), fl.asymmetric(logits, target, gamma_neg=2.0, backend="cpu"))
    assert "gamma_neg=2.0" in repr(m)


# ---- the CUDA kernels on the emulator: what needs its controls ---------------------------------
_EMU_SKIP = pytest.mark.skipif(not cuda_emu.available(), reason=f"cuda_emu unavailable: {cuda_emu.reason()}")


@_EMU_SKIP
@pytest.mark.parametrize("loss", ["quality_focal", "varifocal"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cuda_emu_out_of_range_labels_are_ignored(loss, reduction):
    """Asserts compiled out (recorded): an out-of-range label's row is treated as ignored in the
    loss, the gradient and the 'mean' count (the count_valid rule of csrc/cuda/common.cuh)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(11, 6, generator=g)
    labels = torch.randint(0, 7, (11,), generator=g)
    score = torch.rand(11, generator=g)
    bad, ignored = labels.clone(), labels.clone()
    for i, v in zip((1, 4, 6), (7, -2, 99)):
        bad[i], ignored[i] = v, IGNORE
    ops = cuda_emu.ops()
    with cuda_emu.configured("asserts=record"):
        cuda_emu.take_device_asserts()
        got = ops.detector_sigmoid_forward(x, bad, score, loss, 2.0, 2.0, 0.0, 0.0, 2, IGNORE, reduction, True)
        messages = cuda_emu.take_device_asserts()
    want = ops.detector_sigmoid_forward(x, ignored, score, loss, 2.0, 2.0, 0.0, 0.0, 2, IGNORE, reduction, True)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert messages and all("out of range" in m for m in messages), messages


@_EMU_SKIP
@pytest.mark.parametrize("variant", ["qfl-labels", "qfl-dense", "vfl-labels", "asl-soft"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_emu_pack_tails_and_row_kernel(variant, dtype):
    """Rows that do not fill a 16-byte pack (C = 5, 13) and a numel % VEC tail, per element and
    per row weights, through the pack kernel ('mean') and, for quality focal, the row kernel ('none')."""
    for shape in ((7, 5), (9, 13), (3, 40)):
        for weight in (None, "row", "element"):
            for reduction in ("mean", "none"):
                _check("cuda_emu", variant, dtype, reduction, shape=shape, weight=weight)


# ---- the CPU row's instruction-set variants (picked once per process: a subprocess each) -------
_SIMD_SCRIPT = """
import torch
from tests.test_detector_sigmoid import VARIANTS, make_case, _fn, _ref
from tests.utils import loss_and_grad, rel_error
worst = 0.0
for variant in VARIANTS:
    for weight in (None, "element"):
        loss, logits, target, kwargs = make_case(variant, shape=(29, 37), weight=weight)
        out, grad = loss_and_grad(_fn(loss, "cpu"), logits, target, **kwargs, reduction="sum")
        ref_out, ref_grad = _ref(loss, logits, target, dict(kwargs, reduction="sum"))
        worst = max(worst, rel_error(out, ref_out), rel_error(grad, ref_grad))
print(worst)
"""


@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_simd_variants(isa):
    """The AVX2 and baseline builds of the vectorised row (the default run takes the best this
    CPU has) against the float64 reference."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FUSED_LOSSES_SIMD=isa, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", _SIMD_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) <= 1e-5


# ---- op registration: opcheck (schema, fake kernel, autograd registration), functorch ---------
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["labels", "dense"])
def test_opcheck_cpu_op(form, reduction):
    from tests.utils import opcheck_loss_op
    x = torch.randn(6, 5, requires_grad=True)
    if form == "labels":
        target, score = torch.tensor([0, 5, 2, -100, 4, 1]), torch.rand(6)
    else:
        target, score = torch.rand(6, 5), None
    for loss in ("quality_focal", "varifocal"):
        opcheck_loss_op(torch.ops.fused_losses.detector_sigmoid_forward,
                        (x, target, score, loss, 2.0, 2.0, 0.0, 0.0, 2, IGNORE, reduction, True, torch.rand(6)))
    if form == "dense":
        opcheck_loss_op(torch.ops.fused_losses.detector_sigmoid_forward,
                        (x, target, None, "asymmetric", 1.0, 4.0, 0.05, 1e-8, 0, IGNORE, reduction, True))


@pytest.mark.parametrize("backend", COMPILED)
def test_functorch_grad_and_jvp(backend):
    """torch.func.grad / jvp go through fused_losses._ops.call_loss's transform path (QFL's
    per-row 'none' cotangent broadcast over the class dim)."""
    loss, logits, target, kwargs = make_case("qfl-labels", seed=8)
    weights = torch.randn(logits.shape[0], dtype=torch.float32)

    def f(z):
        return (fl.quality_focal(z, target, reduction="none", backend=backend, **kwargs) * weights).sum()

    got = torch.func.grad(f)(logits)
    want = loss_and_grad(lambda z: f(z), logits)[1]
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)
    tangent = torch.randn_like(logits)
    _, jvp = torch.func.jvp(f, (logits,), (tangent,))
    assert torch.allclose(jvp, (want * tangent).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.zeros(0, 5, requires_grad=True)
    for loss, args in (("quality_focal", (torch.zeros(0, dtype=torch.long),)),
                       ("varifocal", (torch.zeros(0, 5),)), ("asymmetric", (torch.zeros(0, 5),))):
        kw = {"score": torch.zeros(0)} if loss == "quality_focal" else {}
        out = getattr(fl, loss)(x, *args, backend=backend, reduction="mean", **kw)
        out.backward()
        assert out.item() == 0.0 and x.grad.shape == (0, 5)
        none = getattr(fl, loss)(x.detach(), *args, backend=backend, reduction="none", **kw)
        assert none.shape == ((0,) if loss == "quality_focal" else (0, 5))
        x.grad = None
