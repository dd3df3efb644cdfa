"""Drop-in extras (issue #14): sample weights, avg_factor, label smoothing, per-class sigmoid alpha.

Two halves:

(a) ``test_reference_*``: the float64 reference (fused_losses.reference, through the public API
    with backend='reference') against the peers' formulas written out here: F.cross_entropy(
    label_smoothing=...) with ignore_index and spatial shapes (to 1e-12), mmdet's
    weight_reduce_loss, torchvision's sigmoid_focal_loss times a weight, per-class alpha, mmdet's
    GHMC with label_weight masks; and the zero-weight rule (a NaN logit in a zero-weight entry
    gives 0 loss and 0 gradient).
(b) ``test_backend_*``: every new argument on every compiled backend ('cpu', 'triton' (the
    interpreter on CPU tensors without a GPU), 'cuda_emu' (FL_CUDA_EMU, tests/cuda_emu), 'cuda'
    where a GPU is visible) x fp32 / bf16 x shapes ((N, C), channel-second (N, C, H, W) with
    ignore 255, sigmoid integer labels and float targets), loss AND gradient against the float64
    reference with the exactness rule of tests/utils.py (fp32: rel-L2 1e-5; bf16: at least as
    close as the eager reference in bf16). Unavailable backends are left out with one skip each
    (the conventions of tests/test_compiled_backends.py).
``test_validate_*``: the argument checks (no backend involved).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl
from fused_losses import _validate, reference
from tests.test_reference import _mmdet_ghmc  # mmdet's GHMC.forward written out (label_weight > 0 mask)
from tests.test_compiled_backends import _DEFAULTS, CPU, CUDA, CUDA_EMU, Device, _assert_accurate, \
    _reference_loss_and_grad
from tests.utils import LOW_PRECISION, assert_rel_close, loss_and_grad, sigmoid_case, softmax_case

F64 = torch.float64
EXACT = 1e-12  # float64 reference vs a float64 peer formula


def _weights(shape, seed, zero_frac=0.25, low=0.0, high=2.0):
    """Random float32 weights in [low, high) with about zero_frac exact zeros."""
    g = torch.Generator().manual_seed(seed)
    w = low + (high - low) * torch.rand(shape, generator=g)
    w[torch.rand(shape, generator=g) < zero_frac] = 0.0
    return w


# ============================================================================================
# (a) The reference against the peers' formulas, float64
# ============================================================================================
def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None, eps=0.0):
    """mmdet.models.losses.utils.weight_reduce_loss, written out. mmdet adds
    eps = torch.finfo(torch.float32).eps to avg_factor; the functional API's avg_factor is a
    plain division (eps=0), fused_losses.compat.MMDetFocalLoss adds mmdet's eps."""
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]
    if reduction == "mean":
        return loss.sum() / (avg_factor + eps)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def _ref(fn, *args, **kwargs):
    return fn(*args, backend="reference", **kwargs)


@pytest.mark.parametrize("shape", [(9, 5), (3, 4, 5, 6), (2, 7, 3, 2, 4)], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
def test_reference_label_smoothing_is_cross_entropy(shape, reduction, eps):
    logits, target = softmax_case(shape, F64, ignore_frac=0.3, ignore_index=255, seed=len(shape))
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = _ref(fl.focal, x1, target, gamma=0.0, label_smoothing=eps, ignore_index=255, reduction=reduction)
    peer = F.cross_entropy(x2, target, label_smoothing=eps, ignore_index=255, reduction=reduction)
    assert_rel_close(ours, peer, EXACT, "focal(gamma=0, label_smoothing) vs F.cross_entropy")
    cot = torch.randn(peer.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    (g1,), (g2,) = torch.autograd.grad(ours, x1, cot), torch.autograd.grad(peer, x2, cot)
    assert_rel_close(g1, g2, EXACT, "grad")


def _smoothed_focal_formula(logits, target, eps, gamma, alpha, ignore_index):
    """loss_i = sum_c q_c a_c (1 - p_c)^gamma (-log p_c), written naively (autograd of it is fine
    away from p_c = 1), per sample, 0 for ignored samples; logits (N, C, d...)."""
    c = logits.shape[1]
    x = logits.movedim(1, -1).reshape(-1, c)
    t = target.reshape(-1)
    valid = t != ignore_index
    logp = torch.log_softmax(x, dim=-1)
    q = F.one_hot(torch.where(valid, t, 0), c).to(F64) * (1 - eps) + eps / c
    a = torch.ones(c, dtype=F64) if alpha is None else torch.as_tensor(alpha, dtype=F64)
    loss = (q * a * (1 - logp.exp()) ** gamma * (-logp)).sum(-1)
    return torch.where(valid, loss, 0.0).reshape(target.shape), valid


@pytest.mark.parametrize("shape", [(11, 6), (2, 5, 3, 4)], ids=str)
@pytest.mark.parametrize("gamma, alpha", [(2.0, None), (0.5, "per_class"), (2.0, 0.25), (1.0, "per_class")])
def test_reference_smoothed_focal_formula(shape, gamma, alpha):
    logits, target = softmax_case(shape, F64, ignore_frac=0.2, ignore_index=255, seed=5)
    if alpha == "per_class":
        alpha = torch.linspace(0.2, 1.5, shape[1], dtype=F64).tolist()
    w = _weights(target.shape, seed=7).to(F64)
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = _ref(fl.focal, x1, target, gamma=gamma, alpha=alpha, label_smoothing=0.15, ignore_index=255,
                weight=w, reduction="none")
    per_sample, valid = _smoothed_focal_formula(x2, target, 0.15, gamma, alpha, 255)
    peer = per_sample * w
    assert_rel_close(ours, peer, EXACT, "smoothed focal vs formula")
    (g1,), (g2,) = torch.autograd.grad(ours.sum(), x1), torch.autograd.grad(peer.sum(), x2)
    assert_rel_close(g1, g2, 1e-10, "grad")
    # 'mean' divides by the non-ignored count, unchanged by weights (zeros included)
    mean = _ref(fl.focal, logits, target, gamma=gamma, alpha=alpha, label_smoothing=0.15, ignore_index=255, weight=w)
    assert_rel_close(mean, peer.sum() / valid.sum(), EXACT, "mean")


def test_reference_label_smoothing_zero_is_plain_focal():
    logits, target = softmax_case((13, 7), F64, ignore_frac=0.2, seed=2)
    alpha = torch.linspace(0.1, 0.9, 7).tolist()
    a = _ref(fl.focal, logits, target, gamma=2.0, alpha=alpha, reduction="none")
    b = _ref(fl.focal, logits, target, gamma=2.0, alpha=alpha, reduction="none", label_smoothing=0.0)
    assert torch.equal(a, b)
    # and eps -> 0 is continuous
    c = _ref(fl.focal, logits, target, gamma=2.0, alpha=alpha, reduction="none", label_smoothing=1e-9)
    assert_rel_close(c, a, 1e-7, "eps -> 0")


@pytest.mark.parametrize("loss", ["focal", "ohem_all"])
@pytest.mark.parametrize("shape", [(12, 5), (2, 4, 3, 5)], ids=str)
def test_reference_weight_is_weight_reduce_loss(loss, shape):
    """mmdet: loss = weight_reduce_loss(loss_none, weight, reduction, avg_factor). Without
    ignored samples the 'mean' denominators agree (mmdet's mean counts zero-weight entries too);
    OHEM keeping every sample is the weighted cross entropy."""
    logits, target = softmax_case(shape, F64, seed=11)
    w = _weights(target.shape, seed=12, low=-0.5, high=3.0)  # negative and > 1 weights just multiply
    kw = dict(gamma=2.0, alpha=0.25) if loss == "focal" else dict(keep=1.0)
    fn = fl.focal if loss == "focal" else fl.ohem
    unweighted = _ref(fn, logits, target, reduction="none", **kw)
    for reduction in ("none", "mean", "sum"):
        ours = _ref(fn, logits, target, weight=w.to(F64), reduction=reduction, **kw)
        assert_rel_close(ours, weight_reduce_loss(unweighted, w.to(F64), reduction), EXACT, reduction)
    af = torch.tensor(7.5, dtype=F64)
    ours = _ref(fn, logits, target, weight=w.to(F64), avg_factor=af, **kw)
    assert_rel_close(ours, weight_reduce_loss(unweighted, w.to(F64), "mean", avg_factor=af), EXACT, "avg_factor")
    ours = _ref(fn, logits, target, weight=w.to(F64), avg_factor=7.5, **kw)
    assert_rel_close(ours, weight_reduce_loss(unweighted, w.to(F64), "mean", avg_factor=7.5), EXACT, "avg_factor float")


def test_reference_weight_broadcasts_like_mmdet():
    """A softmax weight broadcastable to the target's shape is applied as torch broadcasts it."""
    logits, target = softmax_case((3, 4, 5, 6), F64, ignore_frac=0.2, ignore_index=255, seed=1)
    unweighted = _ref(fl.focal, logits, target, ignore_index=255, reduction="none")
    for shape in [(3, 1, 1), (5, 6), (6,), (), (1, 5, 1)]:
        w = _weights(shape, seed=4, zero_frac=0.0).to(F64)
        ours = _ref(fl.focal, logits, target, ignore_index=255, weight=w, reduction="none")
        assert_rel_close(ours, unweighted * w, EXACT, f"weight shape {shape}")


@pytest.mark.parametrize("kind", ["float", "soft", "labels"])
@pytest.mark.parametrize("wkind", ["row", "element", "column"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_reference_sigmoid_weight_is_torchvision_times_weight(kind, wkind, reduction):
    from torchvision.ops import sigmoid_focal_loss
    logits, target = sigmoid_case((10, 6), F64, kind=kind, seed=3)
    n, c = logits.shape
    if kind == "labels":
        dense = F.one_hot(target, c + 1)[:, :c].to(F64)  # label == C: background row
    else:
        dense = target
    w = _weights({"row": (n,), "element": (n, c), "column": (n, 1)}[wkind], seed=9).to(F64)
    dense_w = w[:, None] if wkind == "row" else w
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    ours = _ref(fl.sigmoid_focal, x1, target, alpha=0.25, gamma=2.0, weight=w, reduction=reduction)
    peer = weight_reduce_loss(sigmoid_focal_loss(x2, dense, alpha=0.25, gamma=2.0), dense_w.expand(n, c), reduction)
    assert_rel_close(ours, peer, EXACT, "sigmoid_focal(weight) vs torchvision * weight")
    cot = torch.randn(peer.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    (g1,), (g2,) = torch.autograd.grad(ours, x1, cot), torch.autograd.grad(peer, x2, cot)
    assert_rel_close(g1, g2, EXACT, "grad")


@pytest.mark.parametrize("kind", ["float", "soft", "labels"])
def test_reference_per_class_sigmoid_alpha(kind):
    """alpha_t = a_c y + (1 - a_c)(1 - y): torchvision's loss without alpha times alpha_t."""
    from torchvision.ops import sigmoid_focal_loss
    logits, target = sigmoid_case((3, 8, 5), F64, kind=kind, ignore_frac=0.2 if kind == "labels" else 0.0, seed=6)
    c = logits.shape[-1]
    a = torch.tensor([0.1, 0.9, 0.25, 0.0, 1.0], dtype=F64)
    if kind == "labels":
        valid = (target != -100)[..., None].to(F64)
        dense = F.one_hot(torch.where(target == -100, c, target), c + 1)[..., :c].to(F64)
    else:
        valid, dense = torch.ones_like(logits), target
    x1 = logits.clone().requires_grad_(True)
    x2 = logits.clone().requires_grad_(True)
    for alpha in (a, a.tolist(), tuple(a.tolist())):
        ours = _ref(fl.sigmoid_focal, x1, target, alpha=alpha, gamma=1.5, reduction="none")
        alpha_t = a * dense + (1 - a) * (1 - dense)
        peer = sigmoid_focal_loss(x2, dense, alpha=-1, gamma=1.5) * alpha_t * valid
        assert_rel_close(ours, peer, EXACT, "per-class alpha")
    (g1,), (g2,) = torch.autograd.grad(ours.sum(), x1), torch.autograd.grad(peer.sum(), x2)
    assert_rel_close(g1, g2, EXACT, "grad")
    # a constant per-class alpha is the float alpha
    same = _ref(fl.sigmoid_focal, logits, target, alpha=[0.25] * c, reduction="sum")
    assert_rel_close(same, _ref(fl.sigmoid_focal, logits, target, alpha=0.25, reduction="sum"), EXACT, "constant")


@pytest.mark.parametrize("wkind", ["row", "element"])
@pytest.mark.parametrize("momentum", [0.0, 0.75])
def test_reference_ghmc_weight_is_mmdet_label_weight(wkind, momentum):
    """mmdet's GHMC takes label_weight as a 0/1 mask (per element; mmdet expands (N,) anchor
    weights to (N, C)): a zero weight drops the entry from the histogram, the valid count and
    the 'mean' denominator."""
    logits, target = sigmoid_case((40, 5), F64, kind="float", seed=8)
    n, c = logits.shape
    mask = (_weights((n,) if wkind == "row" else (n, c), seed=2, zero_frac=0.3) > 0).to(F64)
    dense_mask = mask[:, None].expand(n, c) if wkind == "row" else mask
    state, acc_sum = torch.zeros(10), torch.zeros(10, dtype=F64)
    for step in range(3):  # the EMA over a few batches
        x = (logits * (1 + step)).clone()
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        ours = _ref(fl.ghmc, x1, target, momentum=momentum, state=state if momentum else None, weight=mask)
        peer = _mmdet_ghmc(x2, target, dense_mask, 10, acc_sum=acc_sum, mmt=momentum)
        assert_rel_close(ours, peer, EXACT, f"ghmc(weight) vs mmdet GHMC step {step}")
        (g1,), (g2,) = torch.autograd.grad(ours, x1), torch.autograd.grad(peer, x2)
        assert_rel_close(g1, g2, EXACT, "grad")
        if momentum:
            assert_rel_close(state, acc_sum, 1e-6, "EMA state (float32)")
    # nonzero weights multiply the loss after the bin weight; the histogram is the mask's
    w = mask * (1 + torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
    plain = _ref(fl.ghmc, logits, target, weight=mask, reduction="none")
    scaled = _ref(fl.ghmc, logits, target, weight=w, reduction="none")
    assert_rel_close(scaled, plain * (w[:, None] if wkind == "row" else w), EXACT, "weights multiply")


def test_reference_ghmc_softmax_weight_and_smoothing():
    """GHM-C over a softmax: zero weights are invalid (histogram, n_valid, denominator); g and
    the bins use the unsmoothed p_t; the loss is w * bin_weight * smoothed CE."""
    logits, target = softmax_case((50, 4), F64, ignore_frac=0.1, seed=3)
    w = _weights((50,), seed=5, zero_frac=0.3).to(F64)
    active = (w != 0) & (target != -100)
    # bin weights of the active samples alone = GHM-C without weights on the active subset
    sub = _ref(fl.ghmc, logits[active], target[active], use_sigmoid=False, reduction="none")
    ce_sub = F.cross_entropy(logits[active], target[active], reduction="none")
    bin_w = sub / ce_sub
    ours = _ref(fl.ghmc, logits, target, use_sigmoid=False, weight=w, label_smoothing=0.2, reduction="none")
    smoothed = F.cross_entropy(logits[active], target[active], reduction="none", label_smoothing=0.2)
    expected = torch.zeros(50, dtype=F64)
    expected[active] = w[active] * bin_w * smoothed
    assert_rel_close(ours, expected, EXACT, "ghmc softmax weight + smoothing")
    mean = _ref(fl.ghmc, logits, target, use_sigmoid=False, weight=w, label_smoothing=0.2)
    assert_rel_close(mean, expected.sum() / active.sum(), EXACT, "mean over the active samples")


def test_reference_ohem_selection_ignores_weights_and_smoothing():
    logits, target = softmax_case((30, 5), F64, ignore_frac=0.1, seed=4)
    w = _weights((30,), seed=6).to(F64)
    kept = _ref(fl.ohem, logits, target, keep=10, reduction="none") > 0  # CE > 0 everywhere here
    assert int(kept.sum()) == 10
    ours = _ref(fl.ohem, logits, target, keep=10, weight=w, label_smoothing=0.1, reduction="none")
    smoothed = F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    assert_rel_close(ours, torch.where(kept, w * smoothed, 0.0), EXACT, "kept: w * smoothed CE")
    mean = _ref(fl.ohem, logits, target, keep=10, weight=w, label_smoothing=0.1)
    assert_rel_close(mean, ours.sum() / 10, EXACT, "'mean' divides by the kept count")


_NAN_CASES = {
    "focal": lambda x, t, w, **kw: fl.focal(x, t, weight=w, label_smoothing=0.1, **kw),
    "focal_alpha": lambda x, t, w, **kw: fl.focal(x, t, weight=w, gamma=0.5, alpha=[0.5, 1, 2, 1.5], **kw),
    "ohem": lambda x, t, w, **kw: fl.ohem(x, t, weight=w, keep=1.0, **kw),
    "ghmc_softmax": lambda x, t, w, **kw: fl.ghmc(x, t, weight=w, use_sigmoid=False, label_smoothing=0.1, **kw),
}
_NAN_SIGMOID_CASES = {
    "sigmoid_focal": lambda x, t, w, **kw: fl.sigmoid_focal(x, t, weight=w, alpha=[0.1, 0.2, 0.3, 0.4], **kw),
    "ghmc_sigmoid": lambda x, t, w, **kw: fl.ghmc(x, t, weight=w, **kw),
}


def _nan_case(name, dtype, device="cpu"):
    """Inputs with NaN/inf logits in zero-weight rows, the same inputs with those logits zeroed."""
    if name in _NAN_CASES:
        logits, target = softmax_case((9, 4), dtype, seed=1)
        w = _weights((9,), seed=2, zero_frac=0.0)
        fn = _NAN_CASES[name]
    else:
        logits, target = sigmoid_case((9, 4), dtype, kind="labels", seed=1)
        target[0] = 4  # a background row (ghmc would warn about labels without one)
        w = _weights((9,), seed=2, zero_frac=0.0)
        fn = _NAN_SIGMOID_CASES[name]
    w[[1, 4, 6]] = 0.0
    bad = logits.clone()
    bad[1, 0], bad[4, 2], bad[6, :] = math.nan, math.inf, -math.inf
    clean = logits.clone()
    clean[[1, 4, 6]] = 0.0
    return fn, bad.to(device), clean.to(device), target.to(device), w.to(device)


@pytest.mark.parametrize("name", [*_NAN_CASES, *_NAN_SIGMOID_CASES])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reference_zero_weight_selects_zero(name, reduction):
    """A zero weight gives exactly 0 loss and 0 gradient, even for a NaN/inf logit (a select,
    not a multiply: mmdet's loss * weight would give NaN there)."""
    fn, bad, clean, target, w = _nan_case(name, F64)
    out, grad = loss_and_grad(fn, bad, target, w.to(F64), reduction=reduction, backend="reference")
    want, want_grad = loss_and_grad(fn, clean, target, w.to(F64), reduction=reduction, backend="reference")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert torch.equal(grad[[1, 4, 6]], torch.zeros_like(grad[[1, 4, 6]]))
    assert_rel_close(out, want, EXACT, "loss")
    assert_rel_close(grad, want_grad, EXACT, "grad")


def test_reference_weight_requiring_grad_is_differentiated():
    """A learned weight runs on 'reference' (automatic choice) and gets its gradient: d loss /
    d w_i = loss_i where w_i != 0, and 0 where w_i == 0 (the select drops the entry, its
    gradient included); an explicit compiled backend refuses."""
    logits, target = softmax_case((8, 3), torch.float32, ignore_frac=0.2, seed=1)
    w = _weights((8,), seed=3).requires_grad_(True)
    loss = fl.focal(logits, target, weight=w, reduction="sum")
    (gw,) = torch.autograd.grad(loss, w)
    per_sample = fl.focal(logits, target, reduction="none", backend="reference")
    assert_rel_close(gw, torch.where(w != 0, per_sample, 0.0), 1e-6, "d loss / d weight")
    assert (w == 0).any() and (per_sample[w == 0] > 0).any()
    with pytest.raises(RuntimeError, match="^backend 'cpu' cannot run focal with a weight that requires grad"):
        fl.focal(logits, target, weight=w, backend="cpu")
    with torch.no_grad():  # nothing to differentiate: the compiled backend may run it
        assert _validate.weight_grad_backend("focal", w, "cpu") == "cpu"


@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal", "ohem", "ghmc"])
def test_reference_avg_factor_is_sum_over_avg_factor(loss):
    """avg_factor: the 'sum' divided by it, for a Python number and a 0-dim tensor (int or float);
    differentiable through a tensor avg_factor that requires grad."""
    if loss in ("focal", "ohem"):
        logits, target = softmax_case((3, 4, 5), F64, ignore_frac=0.2, seed=2)
    else:
        logits, target = sigmoid_case((12, 4), F64, kind="labels", seed=2)
    fn = getattr(fl, loss)
    total = _ref(fn, logits, target, reduction="sum")
    for af in (3, 2.5, torch.tensor(4), torch.tensor(4.25, dtype=F64), torch.tensor(0.5, dtype=torch.float32)):
        ours = _ref(fn, logits, target, reduction="mean", avg_factor=af)
        assert ours.dtype == total.dtype and ours.dim() == 0
        assert_rel_close(ours, total / float(af), EXACT, f"avg_factor={af!r}")
    af = torch.tensor(2.0, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(_ref(fn, logits, target, reduction="mean", avg_factor=af), af)
    assert_rel_close(g, -total / 4.0, EXACT, "d / d avg_factor")


def test_reference_nn_modules_take_the_extras():
    """nn modules: weight/avg_factor per forward call, label_smoothing / per-class alpha /
    process_group from the constructor; the same numbers as the functions."""
    x, t = softmax_case((2, 4, 3, 5), F64, ignore_frac=0.2, ignore_index=255, seed=3)
    w = _weights(t.shape, seed=1).to(F64)
    af = torch.tensor(6.0, dtype=F64)
    module = fl.nn.FocalLoss(gamma=1.0, alpha=[1.0, 0.5, 2.0, 1.5], ignore_index=255, label_smoothing=0.1,
                             backend="reference").double()
    want = _ref(fl.focal, x, t, gamma=1.0, alpha=[1.0, 0.5, 2.0, 1.5], ignore_index=255, label_smoothing=0.1,
                weight=w, avg_factor=af)
    assert_rel_close(module(x, t, weight=w, avg_factor=af), want, EXACT, "FocalLoss")
    assert_rel_close(module(x, t, w, af), want, EXACT, "FocalLoss, positional")
    ohem = fl.nn.OHEMLoss(keep=0.5, ignore_index=255, label_smoothing=0.2, backend="reference")
    assert_rel_close(ohem(x, t, weight=w), _ref(fl.ohem, x, t, keep=0.5, ignore_index=255, label_smoothing=0.2,
                                                weight=w), EXACT, "OHEMLoss")
    xs, ls = sigmoid_case((7, 4), F64, kind="labels", seed=2)
    sig = fl.nn.SigmoidFocalLoss(alpha=[0.1, 0.2, 0.3, 0.4], reduction="mean", backend="reference")
    assert sig.alpha.dtype == torch.float32 and "alpha" in dict(sig.named_buffers())
    rows = _weights((7,), seed=4).to(F64)
    # the buffer holds the float32-rounded alphas (nn module convention)
    want = _ref(fl.sigmoid_focal, xs, ls, alpha=sig.alpha.double(), reduction="mean", weight=rows, avg_factor=3)
    assert_rel_close(sig.double()(xs, ls, weight=rows, avg_factor=3), want, EXACT, "SigmoidFocalLoss")
    ghmc = fl.nn.GHMCLoss(momentum=0.5, use_sigmoid=False, label_smoothing=0.1, backend="reference")
    state = torch.zeros(10)
    for _ in range(2):
        got = ghmc(x, t.masked_fill(t == 255, -100), weight=w)
        want = _ref(fl.ghmc, x, t.masked_fill(t == 255, -100), momentum=0.5, state=state, use_sigmoid=False,
                    label_smoothing=0.1, weight=w)
        assert_rel_close(got, want, EXACT, "GHMCLoss")
    assert torch.equal(ghmc.acc_sum, state)


# ============================================================================================
# Argument checks
# ============================================================================================
def _sm(shape=(4, 3)):
    return softmax_case(shape, torch.float32, seed=0)


def _sg(shape=(4, 3)):
    return sigmoid_case(shape, torch.float32, kind="labels", seed=0)


_BAD = [
    # (call, exception, message start)
    (lambda: fl.focal(*_sm(), weight=torch.ones(5)), ValueError, r"weight: shape \(5,\) does not broadcast"),
    (lambda: fl.focal(*_sm((2, 3, 4)), weight=torch.ones(2)), ValueError,
     r"weight: shape \(2,\) does not broadcast .*per-image weight .* \(2, 1\)"),
    (lambda: fl.focal(*_sm(), weight=torch.ones(4, 3)), ValueError, r"weight: shape \(4, 3\) does not broadcast"),
    (lambda: fl.focal(*_sm(), weight=[1.0] * 4), TypeError, "weight: expected None or a real tensor"),
    (lambda: fl.focal(*_sm(), weight=torch.ones(4, dtype=torch.complex64)), TypeError, "weight: expected a real"),
    (lambda: fl.focal(*_sm(), weight=torch.tensor([1.0, math.nan, 1.0, 1.0])), ValueError,
     r"weight: must be finite; weight\[1\] = nan"),
    (lambda: fl.ohem(*_sm(), weight=torch.tensor([1.0, 1.0, math.inf, 1.0])), ValueError, "weight: must be finite"),
    (lambda: fl.sigmoid_focal(*_sg(), weight=torch.ones(3, 4)), ValueError,
     r"weight: shape \(3, 4\) does not broadcast to the logits' shape \(4, 3\)"),
    (lambda: fl.ghmc(*_sg(), weight=torch.ones(5)), ValueError, "weight: shape"),
    (lambda: fl.ghmc(*_sm(), use_sigmoid=False, weight=torch.ones(4, 3)), ValueError, "weight: shape"),
    (lambda: fl.focal(*_sm(), reduction="sum", avg_factor=2.0), ValueError, "avg_factor: only applies with "
                                                                            "reduction='mean'"),
    (lambda: fl.sigmoid_focal(*_sg(), avg_factor=2.0), ValueError, "avg_factor: only applies"),  # default 'none'
    (lambda: fl.focal(*_sm(), avg_factor=torch.ones(1)), ValueError, "avg_factor: expected a 0-dim tensor"),
    (lambda: fl.focal(*_sm(), avg_factor=0.0), ValueError, "avg_factor: must be > 0"),
    (lambda: fl.focal(*_sm(), avg_factor=math.nan), ValueError, "avg_factor: must not be NaN"),
    (lambda: fl.focal(*_sm(), avg_factor="4"), TypeError, "avg_factor: expected a real number"),
    (lambda: fl.focal(*_sm(), avg_factor=torch.tensor(True)), TypeError, "avg_factor: expected a real tensor"),
    (lambda: fl.focal(*_sm(), label_smoothing=1.5), ValueError, "label_smoothing: must be <= 1.0"),
    (lambda: fl.focal(*_sm(), label_smoothing=-0.1), ValueError, "label_smoothing: must be >= 0.0"),
    (lambda: fl.focal(*_sm(), label_smoothing=0.1, from_logits=False), ValueError,
     "label_smoothing: 0.1 needs from_logits=True"),
    (lambda: fl.ghmc(*_sg(), label_smoothing=0.1), ValueError, "label_smoothing: 0.1 applies to the softmax family"),
    (lambda: fl.ohem(*_sm(), label_smoothing=math.inf), ValueError, "label_smoothing: must be finite"),
    (lambda: fl.sigmoid_focal(*_sg(), alpha=[0.25, 0.5]), ValueError, r"alpha: expected 3 values \(one per class\)"),
    (lambda: fl.sigmoid_focal(*_sg(), alpha=[0.25, 0.5, 1.5]), ValueError,
     r"alpha: per-class alphas must lie in \[0, 1\]; class 2 has 1.5"),
    (lambda: fl.sigmoid_focal(*_sg(), alpha=torch.tensor([-0.1, 0.5, 0.5])), ValueError, "alpha: per-class alphas"),
    (lambda: fl.sigmoid_focal(*_sg(), alpha=[0.25, math.nan, 0.5]), ValueError, "alpha: every per-class value must "
                                                                                 "be finite"),
    (lambda: fl.sigmoid_focal(*_sg(), alpha=None), TypeError, "alpha: expected a float"),
]


@pytest.mark.parametrize("index", range(len(_BAD)))
def test_validate_bad_extras(index):
    call, exc, message = _BAD[index]
    with pytest.raises(exc, match="^" + message):
        call()


def test_validate_weight_normalised_for_backends():
    """What a backend receives: contiguous, math dtype, logits' device; softmax: the target's
    shape; sigmoid: logits.shape[:-1] (per row) or logits.shape (per element)."""
    x, t = softmax_case((4, 3, 5), torch.bfloat16, seed=0)
    kw = _validate.focal_args(x, t, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True,
                              validate=None, weight=torch.arange(5, dtype=torch.int64), label_smoothing=0.0)
    w = kw["weight"]
    assert w.shape == (4, 5) and w.dtype == torch.float32 and w.is_contiguous()
    assert torch.equal(w, torch.arange(5.0).expand(4, 5))
    assert "label_smoothing" not in kw  # defaults are left out: a plain call is the plain loss
    xs, ts = sigmoid_case((6, 4), torch.float64, kind="labels", seed=0)
    norm = lambda w: _validate.sigmoid_focal_args(xs, ts, alpha=0.25, gamma=2.0, ignore_index=-100,  # noqa: E731
                                                  reduction="sum", validate=None, weight=w)["weight"]
    assert norm(torch.ones(6)).shape == (6,) and norm(torch.ones(6)).dtype == F64
    assert norm(torch.ones(6, 1)).shape == (6,)  # constant along the classes: per row
    assert norm(torch.tensor(2.0)).shape == (6,)
    assert norm(torch.ones(6, 4)).shape == (6, 4)
    assert norm(torch.ones(4)).shape == (6, 4)  # per class: materialised per element
    assert norm(torch.ones(4).t().expand(6, 4).t().t()).is_contiguous()
    square = torch.randn(4, 4)
    sq = _validate.sigmoid_focal_args(square, torch.zeros(4, dtype=torch.long), alpha=0.25, gamma=2.0,
                                      ignore_index=-100, reduction="sum", validate=None, weight=torch.arange(4.0))
    assert sq["weight"].shape == (4,)  # (N,) with N == C is per row (mmdet's anchor weights), not per class
    alpha = _validate.sigmoid_focal_args(xs, ts, alpha=[0.1, 0.2, 0.3, 0.4], gamma=2.0, ignore_index=-100,
                                         reduction="sum", validate=None)["alpha"]
    assert alpha.dtype == F64 and alpha.shape == (4,)


def test_validate_no_host_read_with_validate_false():
    """validate=False reads no weight values (a NaN weight passes through to the loss)."""
    x, t = softmax_case((4, 3), F64, seed=0)
    w = torch.tensor([1.0, math.nan, 1.0, 1.0], dtype=F64)
    out = fl.focal(x, t, weight=w, validate=False, backend="reference", reduction="none")
    assert math.isnan(float(out[1])) and torch.isfinite(out[[0, 2, 3]]).all()


# ============================================================================================
# (b) Every compiled backend against the float64 reference
# ============================================================================================
def _triton_device() -> Device:
    status = fl.backends()["triton"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    serves = device in fl._backends.get("triton").device_types
    return Device("triton", "triton", device, (torch.float32, torch.bfloat16), (), torch.float32,
                  status.available and serves, f"triton backend unavailable: {status.reason}")


TRITON = _triton_device()
# 'reference' in fp32/bf16 (computing in float32) checks the harness itself and the functional
# layer's avg_factor in low precision.
REFERENCE = Device("reference", "reference", "cpu", (torch.float32, torch.bfloat16), (), torch.float64, True, "")
BACKENDS = [REFERENCE, CPU, TRITON, CUDA_EMU, CUDA]
DTYPES = (torch.float32, torch.bfloat16)


def _softmax(shape, seed, ignore=255):
    return softmax_case(shape, ignore_frac=0.2, ignore_index=ignore, seed=seed)


def _cases():
    """name -> (loss, logits float32, target, kwargs). Shapes small: the Triton interpreter runs
    these on CPU."""
    out = {}
    for sname, shape in (("2d", (13, 5)), ("nchw", (2, 5, 3, 4))):
        x, t = _softmax(shape, seed=len(shape))
        softmax_cases = {}
        w = _weights(t.shape, seed=3, low=-0.5, high=2.0)
        af = torch.tensor(5.5)
        pc = torch.linspace(0.25, 1.5, shape[1]).tolist()
        softmax_cases.update({
            f"focal-weight-{sname}-none": ("focal", x, t, dict(weight=w, reduction="none")),
            f"focal-weight-{sname}-mean": ("focal", x, t, dict(weight=w, gamma=0.5, alpha=pc)),
            f"focal-weight-{sname}-sum": ("focal", x, t, dict(weight=w, gamma=0.0, reduction="sum")),
            f"focal-ls-ce-{sname}-mean": ("focal", x, t, dict(gamma=0.0, label_smoothing=0.1)),
            f"focal-ls-{sname}-none": ("focal", x, t, dict(gamma=2.0, alpha=pc, label_smoothing=0.2,
                                                           reduction="none")),
            f"focal-ls-weight-{sname}-sum": ("focal", x, t, dict(gamma=0.5, alpha=0.25, label_smoothing=0.1, weight=w,
                                                                 reduction="sum")),
            f"focal-avg-factor-{sname}": ("focal", x, t, dict(weight=w, avg_factor=af)),
            f"ohem-weight-{sname}-mean": ("ohem", x, t, dict(weight=w, keep=0.5)),
            f"ohem-ls-thresh-{sname}-none": ("ohem", x, t, dict(thresh=0.7, min_kept=2, label_smoothing=0.1,
                                                                reduction="none")),
            f"ohem-ls-weight-{sname}-avg-factor": ("ohem", x, t, dict(keep=5, weight=w, label_smoothing=0.2,
                                                                      avg_factor=3)),
            f"ghmc-softmax-weight-ls-{sname}-mean": ("ghmc", x, t, dict(use_sigmoid=False, weight=w.abs(),
                                                                        label_smoothing=0.1)),
            f"ghmc-softmax-weight-{sname}-none": ("ghmc", x, t, dict(use_sigmoid=False, weight=w.abs(), bins=5,
                                                                     reduction="none")),
        })
        out.update({k: (loss, x, t, {**kw, "ignore_index": 255}) for k, (loss, x, t, kw) in softmax_cases.items()})
    for kind in ("labels", "float"):
        x, t = sigmoid_case((11, 6), kind=kind, ignore_frac=0.2, seed=5)
        row, elem = _weights((11,), seed=6, high=3.0), _weights((11, 6), seed=7, low=-1.0)
        pc = torch.linspace(0.0, 1.0, 6)
        out.update({
            f"sigmoid-focal-row-{kind}-none": ("sigmoid_focal", x, t, dict(weight=row)),
            f"sigmoid-focal-element-{kind}-mean": ("sigmoid_focal", x, t, dict(weight=elem, reduction="mean")),
            f"sigmoid-focal-alpha-{kind}-sum": ("sigmoid_focal", x, t, dict(alpha=pc, gamma=1.5, reduction="sum")),
            f"sigmoid-focal-alpha-row-{kind}-avg-factor": ("sigmoid_focal", x, t, dict(alpha=pc.tolist(), weight=row,
                                                                                       reduction="mean",
                                                                                       avg_factor=torch.tensor(4))),
            f"ghmc-sigmoid-row-{kind}-mean": ("ghmc", x, t, dict(weight=row)),
            f"ghmc-sigmoid-element-{kind}-none": ("ghmc", x, t, dict(weight=elem.abs(), reduction="none")),
        })
    x, t = sigmoid_case((2, 7, 5), kind="labels", ignore_frac=0.2, seed=9)
    out["sigmoid-focal-3d-row-alpha-mean"] = ("sigmoid_focal", x, t, dict(weight=_weights((2, 7), seed=1),
                                                                         alpha=[0.1, 0.3, 0.5, 0.7, 0.9],
                                                                         reduction="mean"))
    return out


CASES = _cases()


def _backend_params():
    params, left_out = [], {}
    for dev in BACKENDS:
        for dtype in DTYPES:
            if dtype not in dev.dtypes:
                continue
            for name in CASES:
                if dev.available:
                    params.append(pytest.param(dev, dtype, name, id=f"{dev.name}-{str(dtype)[6:]}-{name}"))
                else:
                    left_out[dev.name] = left_out.get(dev.name, 0) + 1
    return params, left_out


_PARAMS, _LEFT_OUT = _backend_params()


@pytest.mark.parametrize("name", [d.name for d in BACKENDS])
def test_backend_unavailable(name):
    """One skip per unavailable backend, with the reason and the number of cases left out."""
    dev = next(d for d in BACKENDS if d.name == name)
    if not dev.available:
        pytest.skip(f"{dev.reason} ({_LEFT_OUT.get(name, 0)} cases of tests/test_dropin.py not run)")


def _eager_low_precision(loss, x, t, kw):
    """reference.<loss> in the logits' low precision (upcast=False), the bf16 accuracy bound;
    avg_factor as the functional layer applies it (sum, then divide)."""
    kw = dict(kw)
    af = kw.pop("avg_factor", None)
    full = {**_DEFAULTS[loss], **kw}
    norm = getattr(_validate, f"{loss}_args")(x, t, **full, validate=False)
    if af is not None:
        norm["reduction"] = "sum"
    fn = getattr(reference, loss)

    def run(x, t):
        out = fn(x, t, **norm, upcast=False)
        return out if af is None else out / (af.to(out.dtype) if isinstance(af, torch.Tensor) else af)
    return loss_and_grad(run, x, t)


def check(dev: Device, loss, logits, target, **kwargs):
    """dev's backend vs the float64 reference (loss and logits gradient), exactness rule of
    tests/utils.py; bf16 against the eager bf16 reference's error."""
    fn = getattr(fl, loss)
    move = lambda v: v.to(dev.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    x, t = logits.to(dev.device), target.to(dev.device)
    kw = {k: move(v) for k, v in kwargs.items()}
    out, grad = loss_and_grad(fn, x, t, backend=dev.backend, **kw)
    t64 = t.double() if t.is_floating_point() else t
    ref, ref_grad = _reference_loss_and_grad(fn, x.double(), t64, cot_dtype=out.dtype, backend="reference", **kw)
    dtype = logits.dtype
    eager_out = eager_grad = None
    if dtype in LOW_PRECISION:
        eager_out, eager_grad = _eager_low_precision(loss, x, t, kw)
    reduction = kwargs.get("reduction", _DEFAULTS[loss]["reduction"])
    expected_dtype = dtype if reduction == "none" else torch.promote_types(dtype, torch.float32)
    assert out.dtype == expected_dtype and out.shape == ref.shape and out.device == x.device
    assert grad.dtype == dtype and grad.shape == logits.shape
    _assert_accurate(out, ref, dtype, f"{dev.name} {loss} loss", eager_out)
    _assert_accurate(grad, ref_grad, dtype, f"{dev.name} {loss} grad", eager_grad)


@pytest.mark.parametrize("dev, dtype, name", _PARAMS)
def test_backend_extras_vs_float64(dev, dtype, name):
    loss, logits, target, kwargs = CASES[name]
    target = target.to(dtype) if target.is_floating_point() else target
    check(dev, loss, logits.to(dtype), target, **kwargs)


_NAN_PARAMS = [pytest.param(dev, name, id=f"{dev.name}-{name}") for dev in BACKENDS if dev.available
               for name in [*_NAN_CASES, *_NAN_SIGMOID_CASES]]


@pytest.mark.parametrize("dev, name", _NAN_PARAMS)
def test_backend_zero_weight_selects_zero(dev, name):
    """NaN/inf logits in zero-weight rows: finite loss, exactly zero gradient there, and the same
    result as with those logits replaced by 0 (fp32)."""
    for reduction in ("none", "sum", "mean"):
        fn, bad, clean, target, w = _nan_case(name, torch.float32, dev.device)
        out, grad = loss_and_grad(fn, bad, target, w, reduction=reduction, backend=dev.backend)
        want, want_grad = loss_and_grad(fn, clean, target, w, reduction=reduction, backend=dev.backend)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all(), f"{name} {reduction}: NaN leaked"
        assert torch.equal(grad[[1, 4, 6]], torch.zeros_like(grad[[1, 4, 6]]))
        assert torch.equal(out, want) and torch.equal(grad, want_grad), f"{name} {reduction}"


def _compile_cases():
    x, t = _softmax(((6, 5, 2, 3)), seed=1)
    xs, ls = sigmoid_case((9, 4), kind="labels", seed=2)
    w, rows = _weights(t.shape, seed=3), _weights((9,), seed=4)
    return [
        ("focal", x, t, dict(weight=w, avg_factor=torch.tensor(3.0), label_smoothing=0.1, alpha=[1.0, 2, 1, 1, 0.5],
                             ignore_index=255)),
        ("ohem", x, t, dict(weight=w, label_smoothing=0.2, keep=0.5, ignore_index=255)),
        ("ghmc", x, t, dict(weight=w, use_sigmoid=False, label_smoothing=0.1, ignore_index=255)),
        ("sigmoid_focal", xs, ls, dict(alpha=torch.tensor([0.1, 0.2, 0.3, 0.4]), weight=rows, reduction="mean",
                                       avg_factor=2.0)),
        ("ghmc", xs, ls, dict(weight=rows)),
    ]


_COMPILE_PARAMS = [pytest.param(dev, i, id=f"{dev.name}-{i}-{case[0]}") for dev in (REFERENCE, CPU, CUDA_EMU, CUDA)
                   if dev.available for i, case in enumerate(_compile_cases())]


@pytest.mark.parametrize("dev, index", _COMPILE_PARAMS)
def test_backend_compile_fullgraph_with_extras(dev, index):
    """torch.compile(fullgraph=True) of a call with the extras: the same loss and gradient as
    eager (the weight and avg_factor are graph inputs; no host read while tracing)."""
    loss, logits, target, kwargs = _compile_cases()[index]
    fn = getattr(fl, loss)
    move = lambda v: v.to(dev.device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    kw = {k: move(v) for k, v in kwargs.items()}
    x, t = logits.to(dev.device), target.to(dev.device)

    def call(x, t):
        return fn(x, t, backend=dev.backend, **kw)
    torch._dynamo.reset()
    got, got_grad = loss_and_grad(torch.compile(call, fullgraph=True), x, t)
    want, want_grad = loss_and_grad(call, x, t)
    assert_rel_close(got, want, 1e-6, "loss")
    assert_rel_close(got_grad, want_grad, 1e-6, "grad")
