"""Regression tests of CUDA kernel bugs found by the emulator (run by `make test-cuda-emu`, which
sets FL_CUDA_EMU; tests/cuda_emu/backend.py). The broad coverage is the cuda_emu half of
tests/test_compiled_backends.py and tests/test_backward.py; these are the cases that need the
emulator's controls (recorded device asserts, schedules).

Bugs:
* Out-of-range targets with device asserts compiled out were zeroed in the loss kernels but
  still counted in the 'mean' denominator (count_valid), in GHM-C's n_valid and bin 0 of its
  softmax histogram, and could be kept by OHEM (log p_t = 0 sorts as the easiest row, but a
  keep count larger than the valid rows kept it, and the threshold mode's n_valid counted it).
  Now such a row is treated exactly as an ignored one: the result equals the call with that
  target replaced by ignore_index, and the assert is recorded.
* OHEM on channel-second logits (N, C, d...) failed on CUDA: the validity mask kept the
  target's (N, d...) shape while log p_t is per row (the cuda_emu OHEM cases of
  test_compiled_backends.py cover it; one direct case here).
"""
from __future__ import annotations

import pytest
import torch

from tests.cuda_emu import backend as cuda_emu
from tests.utils import sigmoid_case, softmax_case

pytestmark = pytest.mark.skipif(not cuda_emu.available(), reason=cuda_emu.reason())

IGNORE = -100


@pytest.fixture
def recorded_asserts():
    """Device asserts recorded instead of raised (as with asserts compiled out); yields the
    function that returns and clears them."""
    with cuda_emu.configured("asserts=record"):
        cuda_emu.take_device_asserts()
        yield cuda_emu.take_device_asserts
        cuda_emu.take_device_asserts()


def _assert_same(got, want, what):
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, what
        assert torch.equal(g, w), f"{what}: {g} != {w}"


def _with_bad_targets(target, bad_values):
    """(target with some entries out of range, the same with those entries ignored)."""
    bad = target.clone().reshape(-1)
    ignored = target.clone().reshape(-1)
    for i, value in zip((1, 4, 6), bad_values):
        bad[i] = value
        ignored[i] = IGNORE
    return bad.reshape(target.shape), ignored.reshape(target.shape)


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 4)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_targets_are_ignored_softmax_focal(recorded_asserts, shape, reduction):
    logits, target = softmax_case(shape, torch.float32, seed=3)
    bad, ignored = _with_bad_targets(target, (shape[1], -3, 1000))
    ops = cuda_emu.ops()
    got = ops.softmax_focal_forward(logits, bad, None, 1.0, 2.0, IGNORE, reduction, True, True)
    messages = recorded_asserts()
    want = ops.softmax_focal_forward(logits, ignored, None, 1.0, 2.0, IGNORE, reduction, True, True)
    _assert_same(got, want, f"focal {shape} {reduction}")
    assert messages and all("out of range" in m for m in messages), messages


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_out_of_range_labels_are_ignored_sigmoid_focal(recorded_asserts, reduction):
    logits, labels = sigmoid_case((11, 6), torch.float32, kind="labels", seed=4)
    bad, ignored = _with_bad_targets(labels, (7, -2, 99))  # C = 6: label 6 is background, 7 is out of range
    ops = cuda_emu.ops()
    got = ops.sigmoid_focal_forward(logits, bad, 0.25, 2.0, IGNORE, reduction, True)
    messages = recorded_asserts()
    want = ops.sigmoid_focal_forward(logits, ignored, 0.25, 2.0, IGNORE, reduction, True)
    _assert_same(got, want, f"sigmoid_focal {reduction}")
    assert messages and all("out of range" in m for m in messages), messages


@pytest.mark.parametrize("mode", ["count", "fraction", "thresh"])
def test_out_of_range_targets_are_never_kept_by_ohem(recorded_asserts, mode):
    logits, target = softmax_case((2, 5, 3, 4), torch.float32, seed=5)
    bad, ignored = _with_bad_targets(target, (5, -1, 17))
    args = {"count": (0.0, 100, None, 0), "fraction": (0.5, 0, None, 0), "thresh": (0.0, 0, 0.7, 30)}[mode]
    ops = cuda_emu.ops()
    for reduction in ("mean", "none"):
        got = ops.ohem_forward(logits, bad, *args, IGNORE, reduction, True)
        messages = recorded_asserts()
        want = ops.ohem_forward(logits, ignored, *args, IGNORE, reduction, True)
        _assert_same(got, want, f"ohem {mode} {reduction}")
        assert messages, "the stats pass must assert on the out-of-range targets"


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_out_of_range_targets_are_ignored_by_ghmc(recorded_asserts, use_sigmoid):
    if use_sigmoid:
        logits, target = sigmoid_case((12, 4), torch.float32, kind="labels", seed=6)
        bad, ignored = _with_bad_targets(target, (5, -7, 40))
    else:
        logits, target = softmax_case((12, 4), torch.float32, seed=6, scale=6.0)
        bad, ignored = _with_bad_targets(target, (4, -7, 40))
    ops = cuda_emu.ops()
    states = [torch.zeros(10), torch.zeros(10)]
    weights = []
    for t, state in zip((bad, ignored), states):
        weights.append(ops.ghmc_bin_weights(logits, t, state, 10, 0.75, use_sigmoid, IGNORE))
    messages = recorded_asserts()
    _assert_same(weights[:1], weights[1:], "ghmc bin weights (n_valid and the histogram)")
    _assert_same(states[:1], states[1:], "ghmc EMA state")
    for reduction in ("mean", "none"):
        got = ops.ghmc_forward(logits, bad, weights[1], use_sigmoid, IGNORE, reduction, True)
        want = ops.ghmc_forward(logits, ignored, weights[1], use_sigmoid, IGNORE, reduction, True)
        _assert_same(got, want, f"ghmc forward {reduction}")
    assert messages, "the histogram pass must assert on the out-of-range targets"


def test_out_of_range_target_raises_by_default():
    """With asserts on (the default), the launch fails like a GPU's device-side assert."""
    logits, target = softmax_case((4, 3), torch.float32, seed=7)
    target[2] = 3
    with cuda_emu.configured("asserts=raise"):
        with pytest.raises(RuntimeError, match="device-side assert.*out of range"):
            cuda_emu.ops().softmax_focal_forward(logits, target, None, 1.0, 2.0, IGNORE, "mean", True, True)
    cuda_emu.take_device_asserts()


@pytest.mark.parametrize("thresh", [None, 0.7])
def test_ohem_channel_second_logits(thresh):
    """Was: RuntimeError 'The size of tensor a (...) must match the size of tensor b' (the
    (N, d...) validity mask against the per-row log p_t)."""
    logits, target = softmax_case((2, 5, 3, 4), torch.float32, ignore_frac=0.2, seed=8)
    ops = cuda_emu.ops()
    keep = (0.0, 5, thresh, 6) if thresh is not None else (0.5, 0, None, 0)
    loss, grad = ops.ohem_forward(logits, target, *keep, IGNORE, "none", True)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 5)
    flat_loss, flat_grad = ops.ohem_forward(flat_logits, target.reshape(-1), *keep, IGNORE, "none", True)
    # The same rows through the spatial and the row kernel (sums in another order: ulps apart).
    torch.testing.assert_close(loss.reshape(-1), flat_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.permute(0, 2, 3, 1).reshape(-1, 5), flat_grad, rtol=1e-6, atol=1e-7)
    assert torch.equal(loss.reshape(-1) != 0, flat_loss != 0)  # the same rows kept


# --------------------------------------------------------------------------------------------
# Drop-in extras (issue #14: weight, label_smoothing, per-class sigmoid alpha, GHM-C's
# zero-weight-is-invalid rule, ghmc_bin_counts) on the kernels directly, against float64
# formulas written out here (the semantics of fused_losses/reference.py; the cross-backend
# matrix is tests/test_dropin.py). Kernel paths: (9, 5) the register row kernel, (6, 150) the
# warp-per-row kernel, (2, 5, 3, 4) the channel-second kernel; weights and label smoothing run the kExtras
# sweep instances of the last two whatever C.
# --------------------------------------------------------------------------------------------
SOFTMAX_SHAPES = [(9, 5), (6, 150), (2, 5, 3, 4)]


def _rows(logits, target):
    """(rows, C) float64 logits (requires grad through a leaf) and (rows,) target."""
    x = logits.detach().double().requires_grad_(True)
    C = x.shape[1]
    return x, x.movedim(1, -1).reshape(-1, C), target.reshape(-1)


def _reduce(loss_rows, valid, reduction, count):
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / max(count, 1) if reduction == "mean" else total


def _focal64(logits, target, *, gamma, alpha, eps, weight, reduction):
    """sum_c q_c a_c (1 - p_c)^gamma (-log p_c) x w per sample; 'mean' over the non-ignored."""
    x, xr, t = _rows(logits, target)
    C = xr.shape[1]
    valid = t != IGNORE
    logp = torch.log_softmax(xr, -1)
    onehot = torch.nn.functional.one_hot(t.clamp_min(0), C).double()
    q = (1 - eps) * onehot + eps / C
    a = alpha.double() if isinstance(alpha, torch.Tensor) else torch.full((C,), float(alpha), dtype=torch.float64)
    term = q * a * (-torch.expm1(logp)).pow(gamma) * (-logp)
    loss = term.sum(-1) * (weight.double() if weight is not None else 1.0)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    out = _reduce(loss, valid, reduction, int(valid.sum()))
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def _sigmoid_focal64(logits, labels, *, alpha_vec, gamma, weight, reduction):
    """torchvision's sigmoid focal loss with alpha_t = a_c y + (1 - a_c)(1 - y), times w."""
    x = logits.detach().double().requires_grad_(True)
    C = x.shape[-1]
    valid = (labels != IGNORE).unsqueeze(-1).expand_as(x)
    y = torch.nn.functional.one_hot(labels.clamp_min(0), C + 1)[..., :C].double()
    p = torch.sigmoid(x)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    a = alpha_vec.double()
    loss = (a * y + (1 - a) * (1 - y)) * ce * (1 - p_t) ** gamma
    if weight is not None:
        w = weight.double()
        loss = loss * (w if w.shape == x.shape else w.unsqueeze(-1))
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    out = _reduce(loss, valid, reduction, int(valid.sum()))
    (grad,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), grad


def _close(got, want, what, rtol=2e-5):
    got = got.double()
    err = (got - want).norm() / max(float(want.norm()), 1e-30)
    assert err <= rtol, f"{what}: relative L2 error {err:.3g}"


def _row_weight(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g) * 2.0 - 0.25  # a few negative (allowed: just multiplied)
    w[::4] = 0.0
    return w


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("gamma,eps", [(0.0, 0.0), (2.0, 0.0), (0.0, 0.1), (2.0, 0.2), (0.5, 0.05)])
@pytest.mark.parametrize("alpha", ["none", "per_class"])
def test_softmax_focal_weight_and_label_smoothing(shape, gamma, eps, alpha):
    logits, target = softmax_case(shape, torch.float32, ignore_frac=0.2, seed=20)
    C = shape[1]
    alpha_vec = torch.linspace(0.2, 1.0, C) if alpha == "per_class" else None
    weight = _row_weight(target.numel(), 21)
    ops = cuda_emu.ops()
    for reduction in ("mean", "sum", "none"):
        loss, grad = ops.softmax_focal_forward(logits, target, alpha_vec, 1.0, gamma, IGNORE, reduction, True, True,
                                               weight, eps)
        want_loss, want_grad = _focal64(logits, target, gamma=gamma, alpha=alpha_vec if alpha_vec is not None else 1.0,
                                        eps=eps, weight=weight, reduction=reduction)
        _close(loss.reshape(-1) if reduction == "none" else loss, want_loss, f"loss {reduction}")
        _close(grad, want_grad, f"grad {reduction}")


def test_label_smoothing_gamma0_is_cross_entropy():
    """gamma = 0, no alpha: F.cross_entropy(label_smoothing=eps), per sample and 'mean' (the
    ignored rows left out of the denominator), spatial shape included."""
    for shape in SOFTMAX_SHAPES:
        logits, target = softmax_case(shape, torch.float32, ignore_frac=0.2, seed=22)
        x = logits.double().requires_grad_(True)
        want = torch.nn.functional.cross_entropy(x, target, ignore_index=IGNORE, label_smoothing=0.15)
        (want_grad,) = torch.autograd.grad(want, x)
        loss, grad = cuda_emu.ops().softmax_focal_forward(logits, target, None, 1.0, 0.0, IGNORE, "mean", True, True,
                                                          None, 0.15)
        _close(loss, want.detach(), f"loss {shape}")
        _close(grad, want_grad, f"grad {shape}")


@pytest.mark.parametrize("kind", ["labels", "float"])
def test_sigmoid_focal_per_class_alpha_and_weights(kind):
    """Per-class alpha and per-row / per-element weights against the float64 formula; a per-row
    weight gives bitwise the result of the same weight expanded per element."""
    C = 6
    logits, labels = sigmoid_case((13, C), torch.float32, kind="labels", ignore_frac=0.2, seed=23)
    alpha_vec = torch.linspace(0.1, 0.9, C)
    w_row = _row_weight(13, 24)
    w_elem = w_row.unsqueeze(-1).expand(13, C).contiguous()
    ops = cuda_emu.ops()
    if kind == "float":  # the same numbers as one-hot float targets (no ignored rows there)
        labels = labels.clamp_min(0)
        target = torch.nn.functional.one_hot(labels, C + 1)[:, :C].float()
    else:
        target = labels
    for reduction in ("mean", "sum", "none"):
        by_row = ops.sigmoid_focal_forward(logits, target, -1.0, 2.0, IGNORE, reduction, True, alpha_vec, w_row)
        by_elem = ops.sigmoid_focal_forward(logits, target, -1.0, 2.0, IGNORE, reduction, True, alpha_vec, w_elem)
        _assert_same(by_row, by_elem, f"per row vs per element {reduction}")
        want_loss, want_grad = _sigmoid_focal64(logits, labels, alpha_vec=alpha_vec, gamma=2.0, weight=w_row,
                                                reduction=reduction)
        _close(by_row[0], want_loss, f"loss {reduction}")
        _close(by_row[1], want_grad, f"grad {reduction}")
    # A genuinely per-element weight.
    w = torch.rand(13, C, generator=torch.Generator().manual_seed(25))
    w[w < 0.3] = 0.0
    loss, grad = ops.sigmoid_focal_forward(logits, target, -1.0, 2.0, IGNORE, "mean", True, alpha_vec, w)
    want_loss, want_grad = _sigmoid_focal64(logits, labels, alpha_vec=alpha_vec, gamma=2.0, weight=w, reduction="mean")
    _close(loss, want_loss, "per-element loss")
    _close(grad, want_grad, "per-element grad")


def _nan_row(logits, row_index, channel_second=False):
    bad = logits.clone()
    if channel_second:
        bad[0, :, 0, 0] = float("nan")
    else:
        bad[row_index] = float("nan")
    return bad


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES)
@pytest.mark.parametrize("op", ["focal", "focal_smooth", "ohem_smooth", "ghmc", "ghmc_smooth"])
def test_nan_in_zero_weight_row_does_not_leak(shape, op):
    """A NaN logit row with weight 0: loss and gradient exactly those of the same call with that
    row finite (selected, not multiplied), and finite."""
    logits, target = softmax_case(shape, torch.float32, seed=26)
    weight = torch.rand(target.numel(), generator=torch.Generator().manual_seed(27)) + 0.5
    weight[0] = 0.0  # row 0: logits[0] for (N, C), position (0, :, 0, 0) channel-second
    bad = _nan_row(logits, 0, channel_second=len(shape) > 2)
    ops = cuda_emu.ops()
    eps = 0.1 if op.endswith("smooth") else 0.0
    for reduction in ("mean", "none"):
        def run(x):
            if op.startswith("focal"):
                return ops.softmax_focal_forward(x, target, None, 1.0, 2.0, IGNORE, reduction, True, True, weight, eps)
            if op.startswith("ohem"):
                return ops.ohem_forward(x, target, 0.0, 4, None, 0, IGNORE, reduction, True, weight, eps)
            bw = ops.ghmc_bin_weights(logits, target, None, 10, 0.0, False, IGNORE, weight)
            assert torch.equal(bw, ops.ghmc_bin_weights(x, target, None, 10, 0.0, False, IGNORE, weight))
            return ops.ghmc_forward(x, target, bw, False, IGNORE, reduction, True, weight, eps)
        got, want = run(bad), run(logits)
        if not op.startswith("ohem"):  # OHEM's selection ranks the NaN row (ignores weights)
            _assert_same(got, want, f"{op} {reduction}")
        assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all(), f"{op} {reduction}"


def test_nan_in_zero_weight_sigmoid_element_does_not_leak():
    logits, labels = sigmoid_case((10, 4), torch.float32, kind="labels", seed=28)
    w = torch.ones(10, 4)
    w[3, 2] = 0.0
    bad = logits.clone()
    bad[3, 2] = float("nan")
    ops = cuda_emu.ops()
    for reduction in ("mean", "none"):
        got = ops.sigmoid_focal_forward(bad, labels, 0.25, 2.0, IGNORE, reduction, True, None, w)
        want = ops.sigmoid_focal_forward(logits, labels, 0.25, 2.0, IGNORE, reduction, True, None, w)
        _assert_same(got, want, f"sigmoid focal {reduction}")
        bw = ops.ghmc_bin_weights(logits, labels, None, 10, 0.0, True, IGNORE, w)
        assert torch.equal(bw, ops.ghmc_bin_weights(bad, labels, None, 10, 0.0, True, IGNORE, w))
        got = ops.ghmc_forward(bad, labels, bw, True, IGNORE, reduction, True, w)
        want = ops.ghmc_forward(logits, labels, bw, True, IGNORE, reduction, True, w)
        _assert_same(got, want, f"sigmoid ghmc {reduction}")


def _ghm_counts64(g, valid, bins):
    """[count per bin of the valid g, n_valid] as int64 (reference.ghmc's binning: float32 g,
    floor(g * bins) clamped to bins - 1, NaN in no bin)."""
    g = g[valid]
    idx = torch.floor(g * bins).clamp_max(bins - 1)
    idx = idx[~torch.isnan(idx)].long()
    return torch.cat([torch.bincount(idx, minlength=bins), valid.sum().reshape(1)])


@pytest.mark.parametrize("weight_kind", ["none", "row", "element"])
@pytest.mark.parametrize("kind", ["labels", "float"])
def test_ghmc_bin_counts_sigmoid(kind, weight_kind):
    C, bins = 5, 10
    logits, target = sigmoid_case((40, C), torch.float32, kind=kind, ignore_frac=0.2 if kind == "labels" else 0.0,
                                  seed=29)
    g = torch.Generator().manual_seed(30)
    weight = {"none": None, "row": (torch.rand(40, generator=g) > 0.3).float() * 0.7,
              "element": (torch.rand(40, C, generator=g) > 0.3).float() * 1.3}[weight_kind]
    if kind == "labels":
        y = torch.nn.functional.one_hot(target.clamp_min(0), C + 1)[:, :C].float()
        valid = (target != IGNORE).unsqueeze(-1).expand(40, C)
    else:
        y, valid = target, torch.ones(40, C, dtype=torch.bool)
    if weight is not None:
        valid = valid & ((weight if weight.dim() == 2 else weight.unsqueeze(-1)) != 0)
    want = _ghm_counts64((torch.sigmoid(logits) - y).abs(), valid, bins)
    ops = cuda_emu.ops()
    counts = ops.ghmc_bin_counts(logits, target, bins, True, IGNORE, weight)
    assert counts.dtype == torch.int64 and torch.equal(counts, want), (counts, want)
    # ghmc_bin_weights is built on the same counts: the reference's weight formula.
    weights = ops.ghmc_bin_weights(logits, target, None, bins, 0.0, True, IGNORE, weight)
    nonempty = (counts[:bins] > 0)
    expected = torch.where(nonempty, counts[bins].float() / counts[:bins].float().clamp_min(1e-12),
                           torch.zeros(bins)) / nonempty.sum().clamp_min(1).float()
    torch.testing.assert_close(weights, expected, rtol=1e-6, atol=0)
    # 'mean' of ghmc_forward divides by the same n_valid.
    loss_sum, _ = ops.ghmc_forward(logits, target, weights, True, IGNORE, "sum", False, weight)
    loss_mean, _ = ops.ghmc_forward(logits, target, weights, True, IGNORE, "mean", False, weight)
    torch.testing.assert_close(loss_mean, loss_sum / counts[bins].clamp_min(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(30, 4), (2, 4, 5, 3)])
def test_ghmc_bin_counts_softmax(shape):
    bins = 10
    logits, target = softmax_case(shape, torch.float32, ignore_frac=0.2, seed=31)
    weight = (torch.rand(target.numel(), generator=torch.Generator().manual_seed(32)) > 0.3).float() * 2.0
    _, xr, t = _rows(logits, target)
    valid = (t != IGNORE) & (weight != 0)
    g = -torch.expm1(torch.log_softmax(xr.detach().float(), -1).gather(1, t.clamp_min(0)[:, None])[:, 0])
    want = _ghm_counts64(g, valid, bins)
    ops = cuda_emu.ops()
    counts = ops.ghmc_bin_counts(logits, target, bins, False, IGNORE, weight)
    assert torch.equal(counts, want), (counts, want)
    assert torch.equal(ops.ghmc_bin_counts(logits, target, bins, False, IGNORE, None)[bins:],
                       (t != IGNORE).sum().reshape(1))
    weights = ops.ghmc_bin_weights(logits, target, None, bins, 0.0, False, IGNORE, weight)
    loss_sum, _ = ops.ghmc_forward(logits, target, weights, False, IGNORE, "sum", False, weight, 0.1)
    loss_mean, _ = ops.ghmc_forward(logits, target, weights, False, IGNORE, "mean", False, weight, 0.1)
    torch.testing.assert_close(loss_mean, loss_sum / counts[bins], rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 4)])
def test_ghmc_softmax_weight_and_label_smoothing(shape):
    """loss_i = w_i * bin_weight[bin(1 - p_t)] * smoothed CE (bins of the unsmoothed p_t); the
    gradient through the smoothed CE only."""
    bins, eps = 10, 0.1
    logits, target = softmax_case(shape, torch.float32, ignore_frac=0.2, seed=33)
    weight = _row_weight(target.numel(), 34)
    ops = cuda_emu.ops()
    bw = ops.ghmc_bin_weights(logits, target, None, bins, 0.0, False, IGNORE, weight)
    x, xr, t = _rows(logits, target)
    valid = (t != IGNORE) & (weight != 0)
    logp = torch.log_softmax(xr, -1)
    g = -torch.expm1(logp.detach().float().gather(1, t.clamp_min(0)[:, None])[:, 0])
    row_bw = bw.double()[torch.floor(g * bins).clamp_max(bins - 1).long()]
    q = (1 - eps) * torch.nn.functional.one_hot(t.clamp_min(0), shape[1]).double() + eps / shape[1]
    loss = torch.where(valid, weight.double() * row_bw * (q * -logp).sum(-1), torch.zeros(()).double())
    for reduction in ("mean", "none"):
        want = _reduce(loss, valid, reduction, int(valid.sum()))
        (want_grad,) = torch.autograd.grad(want.sum(), x, retain_graph=True)
        got, grad = ops.ghmc_forward(logits, target, bw, False, IGNORE, reduction, True, weight, eps)
        _close(got.reshape(-1) if reduction == "none" else got, want.detach(), f"loss {reduction}")
        _close(grad, want_grad, f"grad {reduction}")


@pytest.mark.parametrize("shape", [(9, 5), (2, 5, 3, 4)])
def test_ohem_weight_and_label_smoothing(shape):
    """Kept rows' loss = w * smoothed CE; the selection is the unweighted, unsmoothed one (the
    same kept rows as the plain call); 'mean' divides by the kept count."""
    eps, keep = 0.2, 6
    logits, target = softmax_case(shape, torch.float32, ignore_frac=0.2, seed=35)
    weight = _row_weight(target.numel(), 36)
    ops = cuda_emu.ops()
    plain, _ = ops.ohem_forward(logits, target, 0.0, keep, None, 0, IGNORE, "none", False)
    kept = plain.reshape(-1) != 0
    x, xr, t = _rows(logits, target)
    logp = torch.log_softmax(xr, -1)
    q = (1 - eps) * torch.nn.functional.one_hot(t.clamp_min(0), shape[1]).double() + eps / shape[1]
    loss = torch.where(kept, weight.double() * (q * -logp).sum(-1), torch.zeros(()).double())
    for reduction in ("mean", "sum", "none"):
        want = _reduce(loss, kept, reduction, int(kept.sum()))
        (want_grad,) = torch.autograd.grad(want.sum(), x, retain_graph=True)
        got, grad = ops.ohem_forward(logits, target, 0.0, keep, None, 0, IGNORE, reduction, True, weight, eps)
        _close(got.reshape(-1) if reduction == "none" else got, want.detach(), f"loss {reduction}")
        _close(grad, want_grad, f"grad {reduction}")


_SCHEDULES = ("threads=forward,blocks=forward,sms=132", "threads=random,seed=5,blocks=reverse,sms=1",
              "threads=reverse,sms=3,blocks_per_sm=1")


def test_extras_bitwise_deterministic_across_schedules():
    """Weights, label smoothing, per-class alpha and the GHM-C counts give bitwise the same
    results under every emulator schedule (thread / block order, grid size)."""
    x, t = softmax_case((300, 80), torch.bfloat16, ignore_frac=0.1, seed=37)
    xs, ts = softmax_case((2, 7, 9, 10), torch.float32, ignore_frac=0.1, seed=38)
    sx, sl = sigmoid_case((300, 16), torch.float32, kind="labels", ignore_frac=0.1, seed=39)
    w, ws = _row_weight(300, 40), _row_weight(ts.numel(), 41)
    we = torch.rand(300, 16, generator=torch.Generator().manual_seed(42)).round()
    ops = cuda_emu.ops()
    calls = [
        lambda: ops.softmax_focal_forward(x, t, None, 1.0, 2.0, IGNORE, "mean", True, True, w, 0.0),
        lambda: ops.softmax_focal_forward(x, t, torch.rand(80, generator=torch.Generator().manual_seed(1)), 1.0, 2.0,
                                          IGNORE, "sum", True, True, w, 0.1),
        lambda: ops.softmax_focal_forward(xs, ts, None, 1.0, 0.0, IGNORE, "mean", True, True, ws, 0.1),
        lambda: ops.ohem_forward(xs, ts, 0.3, 0, None, 0, IGNORE, "mean", True, ws, 0.1),
        lambda: ops.sigmoid_focal_forward(sx, sl, -1.0, 2.0, IGNORE, "mean", True, torch.linspace(0, 1, 16), we),
        lambda: (ops.ghmc_bin_counts(sx, sl, 10, True, IGNORE, we),),
        lambda: ops.ghmc_forward(xs, ts, ops.ghmc_bin_weights(xs, ts, None, 10, 0.0, False, IGNORE, ws), False,
                                 IGNORE, "mean", True, ws, 0.1),
    ]
    for i, call in enumerate(calls):
        runs = []
        for spec in _SCHEDULES:
            with cuda_emu.configured(spec):
                runs.append(call())
        for run in runs[1:]:
            _assert_same(run, runs[0], f"call {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 1])
def test_inplace_rescale_touches_every_element_once(dtype, offset):
    """scale_grad_ over a multi-block grid (16-byte packs, offset 0; single values for an
    unaligned view, offset 1): every element is multiplied by grad_output / applied_scale exactly
    once. A grid-stride loop that strides by one block instead of the grid made later blocks
    rescale elements again (the mutant stride-scale_grad-scale_grad.cu of tests/cuda_emu/mutants.py
    survived every loss test: their in-place rescales ran on one block)."""
    numel = 5 * 4 * 256 + 3  # several blocks of 256 threads x 4-element packs, and a tail
    base = torch.randn(numel + offset, generator=torch.Generator().manual_seed(11)).to(dtype)
    grad = base.clone()[offset:]
    before = grad.clone()
    grad_output = torch.tensor(3.0)
    applied = torch.tensor(1.5)  # ratio 2: exact in every dtype, so the check is bitwise
    cuda_emu.ops().scale_grad_(grad, grad_output, applied)
    assert torch.equal(grad, before * 2)
    assert applied.item() == 3.0


# Row lengths on both sides of every register layout of softmax_rows_kernel (pick_rows_kernel in
# csrc/cuda/kernels/softmax_kernels.cuh: 4, 12, 24, 48 and 128 packs per row, then a warp per
# row up to 1280 values in registers, then the three-sweep kernel), for packs of 4 (fp32) and 8
# (fp16/bf16) values and single values (C not a multiple of the pack); test_compiled_backends.py
# test_focal_every_row_kernel has the older boundaries.
_LAYOUT_LENGTHS = [48, 52, 96, 100, 192, 196, 384, 392, 1279, 1280, 1281, 1284]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", _LAYOUT_LENGTHS)
def test_focal_register_layout_boundaries(dtype, c):
    from tests.test_compiled_backends import CUDA_EMU, check
    logits, target = softmax_case((37, c), dtype, ignore_frac=0.1, seed=c)
    check(CUDA_EMU, "focal", logits, target, gamma=2.0, reduction="none")
    check(CUDA_EMU, "focal", logits, target, gamma=0.5, alpha=0.25, reduction="mean")
