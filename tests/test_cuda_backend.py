"""The 'cuda' backend (hand-written CUDA kernels, csrc/cuda/losses_cuda.cu) on CUDA tensors.

Runs only where the extension was built with its CUDA part and a GPU is visible; everywhere
else the whole module is skipped (the CUDA object is still compiled by every build, and
tests/test_api.py checks compiled_with_cuda()).

Every comparison runs the same public function on CUDA tensors with backend='cuda' and the
float64 reference (on the GPU, for speed), with the exactness rule of tests/utils.py (fp16/bf16:
at least as close as the eager reference run in the same low precision), and where the 'cpu'
backend is available also checks cuda against cpu (both run the formulas of csrc/losses_math.h).
Then: opcheck and torch.compile(fullgraph=True) on CUDA, bitwise run-to-run determinism,
no host synchronisation (torch.cuda.set_sync_debug_mode('error')), numel > 2^31 in bf16.
"""
from __future__ import annotations

import pytest
import torch

import fused_losses as fl
from fused_losses import _backends, _validate, reference
from tests.utils import (LOW_PRECISION, UNIT_ROUNDOFF, assert_matches_reference, assert_rel_close, loss_and_grad,
                         rel_error, sigmoid_case, softmax_case)

_STATUS = fl.backends()["cuda"]
pytestmark = pytest.mark.skipif(not _STATUS.available, reason=f"cuda backend unavailable: {_STATUS.reason}")

DEV = "cuda"
OPS = torch.ops.fused_losses
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CLASSES = [1, 3, 80, 1203]
NS = [0, 1, 7, 4096]

_DEFAULTS = {
    "focal": dict(gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True),
    "sigmoid_focal": dict(alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none"),
    "ohem": dict(keep=0.25, thresh=None, min_kept=None, ignore_index=-100, reduction="mean"),
    "ghmc": dict(bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100, reduction="mean"),
    "ib": dict(alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0, detach_factor=False, reduction="mean"),
}


def _cpu_available() -> bool:
    return fl.backends()["cpu"].available


def _eager_low_precision(loss, logits, target, extra, kwargs):
    """reference.<loss> in the logits' low precision (upcast=False): the accuracy baseline."""
    full = {**_DEFAULTS[loss], **kwargs}
    norm = getattr(_validate, f"{loss}_args")(logits, target, *extra, **full, validate=False)
    fn = getattr(reference, loss)
    return loss_and_grad(lambda x, t, *e: fn(x, t, *e, **norm, upcast=False), logits, target, *extra)


def _reference_loss_and_grad(fn, logits64, *args, cot_dtype, **kwargs):
    """loss_and_grad for the float64 reference, fed the cotangent the tested call received
    (drawn in float64 and rounded to the tested output dtype)."""
    x = logits64.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        g = torch.Generator().manual_seed(1)  # loss_and_grad's default grad_seed
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(cot_dtype).to(torch.float64).to(out.device)
    if out.requires_grad:
        out.backward(cot)
    return out.detach(), (x.grad if x.grad is not None else torch.zeros_like(x)).detach()


def _on(device, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def check(loss, logits, target, *extra, what="", cross=True, **kwargs):
    """cuda backend on CUDA copies of the inputs vs the float64 reference (and vs the cpu backend
    when available); loss and logits gradient. Returns the cuda (loss, grad)."""
    fn = getattr(fl, loss)
    x, t = logits.to(DEV), target.to(DEV)
    ex = [e.to(DEV) for e in extra]
    kw = {k: _on(DEV, v) for k, v in kwargs.items()}
    out, grad = loss_and_grad(fn, x, t, *ex, backend="cuda", **kw)
    ex64 = [e.double() if e.is_floating_point() else e for e in ex]
    ref, ref_grad = _reference_loss_and_grad(fn, x.double(), t, *ex64, cot_dtype=out.dtype, backend="reference", **kw)
    dtype = logits.dtype
    eager_out = eager_grad = None
    if dtype in LOW_PRECISION:
        eager_out, eager_grad = _eager_low_precision(loss, x, t, ex, kw)
    label = f"{loss} {what} {kwargs if len(str(kwargs)) < 200 else ''}"
    expected_dtype = dtype if kwargs.get("reduction", _DEFAULTS[loss]["reduction"]) == "none" else \
        torch.promote_types(dtype, torch.float32)
    assert out.device.type == "cuda" and grad.device.type == "cuda"
    assert out.dtype == expected_dtype, f"{label}: loss dtype {out.dtype} != {expected_dtype}"
    assert out.shape == ref.shape, f"{label}: loss shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert grad.dtype == dtype and grad.shape == logits.shape
    _assert_accurate(out, ref, dtype, f"{label} loss", eager_out)
    _assert_accurate(grad, ref_grad, dtype, f"{label} grad", eager_grad)
    if cross and _cpu_available() and "state" not in kwargs:
        kw_cpu = {k: _on("cpu", v) for k, v in kwargs.items()}
        cpu_out, cpu_grad = loss_and_grad(fn, logits, target, *extra, backend="cpu", **kw_cpu)
        # Both are within the bound of the float64 reference, so within twice of each other.
        bound = 2e-5 if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype]
        assert_rel_close(out, cpu_out, bound, f"{label} loss, cuda vs cpu")
        assert_rel_close(grad, cpu_grad, bound, f"{label} grad, cuda vs cpu")
    return out, grad


def _assert_accurate(out, ref, dtype, what, eager):
    """The exactness rule of tests/utils.py; where the eager low-precision baseline itself
    overflowed (NaN/inf where the float64 reference is finite: IB's factor, GHM's n_valid / count
    over 65504 in fp16), it bounds nothing, and the kernel (float32 math, rounded once) must be
    within 4 unit roundoffs of every element, or one subnormal step (tiny 'mean' gradients)."""
    if eager is not None and not torch.equal(torch.isfinite(eager), torch.isfinite(ref)):
        info = torch.finfo(dtype)
        torch.testing.assert_close(out.double(), ref.double().to(out.device), rtol=4 * UNIT_ROUNDOFF[dtype],
                                   atol=info.smallest_normal * info.eps, equal_nan=True,
                                   msg=lambda m: f"{what} ({dtype}; eager baseline overflowed): {m}")
        return
    assert_matches_reference(out, ref, dtype, what, eager)


def _alpha_value(kind, c):
    if kind == "none":
        return None
    if kind == "float":
        return 0.25
    return torch.linspace(0.1, 0.9, c).tolist()


def _small_or_few(n, index):
    """The full matrix for small N; N = 4096 for one parameter combination in three."""
    return n < 4096 or index % 3 == 0


# --------------------------------------------------------------------------------------------
# Softmax focal
# --------------------------------------------------------------------------------------------
_FOCAL_CONFIGS = [(0.0, "none"), (0.5, "per_class"), (2.0, "float"), (2.0, "none"), (0.5, "float"), (0.0, "per_class")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("config", range(len(_FOCAL_CONFIGS)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_matrix(dtype, c, n, config, reduction):
    if not _small_or_few(n, config):
        pytest.skip("N=4096 runs a third of the configurations")
    gamma, alpha_kind = _FOCAL_CONFIGS[config]
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 7 + c)
    check("focal", logits, target, gamma=gamma, alpha=_alpha_value(alpha_kind, c), reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", [4, 5, 8, 16, 17, 32, 33, 40, 64, 128, 129, 256, 512, 1000, 1024, 1032, 4096, 5000])
def test_focal_every_row_kernel(dtype, c):
    """Row lengths on both sides of every register layout (packs of 16 bytes when C is a
    multiple of 8 (fp16/bf16) or 4 (fp32), single values otherwise; boundaries at 4, 16, 32 and
    128 packs per row) and the three-sweep kernel for long rows."""
    logits, target = softmax_case((37, c), dtype, ignore_frac=0.1, seed=c)
    check("focal", logits, target, gamma=2.0, reduction="none")
    check("focal", logits, target, gamma=0.5, alpha=0.25, reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 37), (3, 19, 8, 9), (1, 1, 4, 4), (2, 80, 33), (2, 5, 2, 3, 7),
                                   (2, 32, 17, 3), (2, 33, 17, 3), (2, 150, 8, 9), (0, 4, 3, 3), (2, 4, 0)])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
def test_focal_spatial(dtype, shape, reduction):
    logits, target = softmax_case(shape, dtype, ignore_frac=0.15, ignore_index=255, seed=sum(shape))
    check("focal", logits, target, gamma=2.0, alpha=0.5, ignore_index=255, reduction=reduction)


def test_focal_int32_target_and_non_contiguous_logits():
    base, target = softmax_case((80, 37), torch.float32, seed=5)
    logits = base.t()
    check("focal", logits, target[:37].to(torch.int32) % 80, gamma=0.5)
    strided = softmax_case((9, 20), torch.float32, seed=6)[0][:, ::2]
    check("focal", strided, torch.randint(0, 10, (9,)), gamma=2.0, reduction="none")
    channels_last = softmax_case((2, 7, 5, 6), torch.float32, seed=7)[0].to(memory_format=torch.channels_last)
    check("focal", channels_last, torch.randint(0, 7, (2, 5, 6)), gamma=2.0)


def test_misaligned_views():
    """Views that start off a 16-byte boundary (the public API would copy them in the test
    helpers, so the ops are called directly): softmax rows take the unpacked kernel, sigmoid
    inputs are copied once; results as for an aligned copy."""
    flat = (3 * torch.randn(8 * 64 + 3, device=DEV)).bfloat16()
    view = flat[1:1 + 8 * 64].reshape(8, 64)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    t = torch.randint(0, 64, (8,), device=DEV)
    for reduction in ("none", "sum"):
        loss_v, grad_v = OPS.softmax_focal_forward(view, t, None, 1.0, 2.0, -100, reduction, True, True)
        loss_c, grad_c = OPS.softmax_focal_forward(view.clone(), t, None, 1.0, 2.0, -100, reduction, True, True)
        assert_rel_close(loss_v, loss_c, 1e-2, "focal loss, misaligned view")  # bf16 'none' output
        assert_rel_close(grad_v, grad_c, 1e-5, "focal grad, misaligned view")
    labels = torch.randint(0, 65, (8,), device=DEV)
    for target in (labels, (torch.rand(8, 64, device=DEV) < 0.2).bfloat16()):
        loss_v, grad_v = OPS.sigmoid_focal_forward(view, target, 0.25, 2.0, -100, "none", True)
        loss_c, grad_c = OPS.sigmoid_focal_forward(view.clone(), target, 0.25, 2.0, -100, "none", True)
        assert torch.equal(loss_v, loss_c) and torch.equal(grad_v, grad_c)


def test_focal_from_probabilities():
    logits, target = softmax_case((7, 5), torch.float32, ignore_frac=0.2, seed=9)
    probs = torch.softmax(logits, dim=1)
    for gamma in (0.0, 0.5, 2.0):
        check("focal", probs, target, gamma=gamma, from_logits=False, alpha=0.3)
    probs4, target4 = softmax_case((2, 4, 3, 5), torch.float32, seed=10)
    check("focal", torch.softmax(probs4, 1), target4, from_logits=False, reduction="none")


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 2.0])
def test_focal_gradient_finite_as_pt_goes_to_one(gamma):
    margins = torch.tensor([0.0, 5.0, 17.0, 40.0, 80.0, 200.0], dtype=torch.float64)
    logits = torch.zeros(6, 4, dtype=torch.float64)
    logits[:, 2] = margins
    target = torch.full((6,), 2)
    for dtype in DTYPES:
        _, grad = check("focal", logits.to(dtype), target, gamma=gamma, reduction="sum")
        assert torch.isfinite(grad).all()


def test_all_ignored_gives_zero_and_zero_grad():
    logits, target = softmax_case((5, 3), torch.float32, device=DEV, seed=1)
    target[:] = -100
    for fn in (fl.focal, fl.ohem):
        out, grad = loss_and_grad(fn, logits, target, backend="cuda")
        assert out.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_nan_logits_propagate_like_the_reference():
    logits, target = softmax_case((6, 4), torch.float32, seed=2)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("nan")
    target[3] = -100
    check("focal", logits, target, reduction="none")
    slogits, starget = sigmoid_case((6, 4), torch.float32, kind="float", seed=2)
    slogits[2, 1] = float("nan")
    check("sigmoid_focal", slogits, starget, reduction="none")


# --------------------------------------------------------------------------------------------
# Sigmoid focal
# --------------------------------------------------------------------------------------------
_SIGMOID_CONFIGS = [(2.0, 0.25, "none"), (0.5, -1.0, "mean"), (0.0, 0.75, "sum"), (0.5, 0.25, "none")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind", ["labels", "float", "soft"])
@pytest.mark.parametrize("config", range(len(_SIGMOID_CONFIGS)))
def test_sigmoid_focal_matrix(dtype, c, n, kind, config):
    if not _small_or_few(n, config):
        pytest.skip("N=4096 runs a third of the configurations")
    gamma, alpha, reduction = _SIGMOID_CONFIGS[config]
    logits, target = sigmoid_case((n, c), dtype, kind=kind, ignore_frac=0.2, seed=n * 11 + c)
    check("sigmoid_focal", logits, target, gamma=gamma, alpha=alpha, reduction=reduction)


def test_sigmoid_focal_batched_shapes_tails_and_mixed_targets():
    logits, labels = sigmoid_case((4096, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=4)
    check("sigmoid_focal", logits, labels, reduction="sum")
    logits, target = sigmoid_case((2, 3, 5, 7), torch.float32, kind="soft", seed=5)
    check("sigmoid_focal", logits, target, reduction="none")
    logits, labels = sigmoid_case((2, 3, 5, 7), torch.bfloat16, kind="labels", ignore_frac=0.2, seed=6)
    check("sigmoid_focal", logits, labels.to(torch.int32), reduction="mean")
    # numel not a multiple of the 16-byte pack; rows shorter than a pack (labels change inside a pack).
    for shape in [(13, 3), (5, 1), (7, 9), (3, 2, 5)]:
        for dtype in DTYPES:
            logits, labels = sigmoid_case(shape, dtype, kind="labels", ignore_frac=0.3, seed=sum(shape))
            check("sigmoid_focal", logits, labels, reduction="none")
    logits, target = sigmoid_case((40, 12), torch.float32, kind="soft", seed=8)
    check("sigmoid_focal", logits.t(), target.t(), reduction="none")
    check("sigmoid_focal", logits.bfloat16(), target, reduction="mean")  # float32 target, bf16 logits
    check("sigmoid_focal", logits.half(), target.bfloat16(), reduction="none")


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
_OHEM_CONFIGS = [(0.25, "mean"), (3, "none"), (1.0, "sum"), (100, "mean")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("config", range(len(_OHEM_CONFIGS)))
def test_ohem_matrix(dtype, c, n, config):
    if not _small_or_few(n, config):
        pytest.skip("N=4096 runs a third of the configurations")
    keep, reduction = _OHEM_CONFIGS[config]
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 13 + c)
    check("ohem", logits, target, keep=keep, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("thresh,min_kept", [(0.7, 0), (0.7, 50), (0.05, 10), (1.1, 5)])
def test_ohem_threshold_mode(dtype, thresh, min_kept):
    logits, target = softmax_case((2, 19, 6, 11), dtype, ignore_frac=0.1, ignore_index=255, seed=21)
    check("ohem", logits, target, thresh=thresh, min_kept=min_kept, ignore_index=255)
    logits, target = softmax_case((50, 7), dtype, ignore_frac=0.1, seed=22)
    check("ohem", logits, target, thresh=thresh, min_kept=min_kept, reduction="none")


def test_ohem_ties_go_to_the_lower_index_and_large():
    logits = torch.zeros(12, 4, device=DEV)
    target = torch.zeros(12, dtype=torch.long, device=DEV)
    out, _ = loss_and_grad(fl.ohem, logits, target, keep=5, reduction="none", backend="cuda")
    assert torch.equal((out != 0).cpu(), torch.arange(12) < 5)
    check("ohem", logits.cpu(), target.cpu(), keep=0.5, reduction="none")
    logits, target = softmax_case((4096, 80), torch.float32, ignore_frac=0.1, seed=23)
    check("ohem", logits, target, keep=0.3)
    logits, target = softmax_case((2, 19, 32, 40), torch.float32, ignore_frac=0.1, ignore_index=255, seed=24)
    check("ohem", logits, target, keep=0.3, ignore_index=255)


# --------------------------------------------------------------------------------------------
# GHM-C
# --------------------------------------------------------------------------------------------
_GHMC_CONFIGS = [(10, "mean"), (1, "sum"), (30, "none")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("c", CLASSES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("mode", ["labels", "float", "softmax"])
@pytest.mark.parametrize("config", range(len(_GHMC_CONFIGS)))
def test_ghmc_matrix(dtype, c, n, mode, config):
    if not _small_or_few(n, config):
        pytest.skip("N=4096 runs a third of the configurations")
    bins, reduction = _GHMC_CONFIGS[config]
    if mode == "softmax":
        logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 17 + c)
    else:
        logits, target = sigmoid_case((n, c), dtype, kind=mode, ignore_frac=0.2, seed=n * 17 + c)
    check("ghmc", logits, target, bins=bins, use_sigmoid=mode != "softmax", reduction=reduction)


def test_ghmc_spatial_and_many_bins():
    logits, target = softmax_case((2, 19, 16, 20), torch.float32, ignore_frac=0.1, ignore_index=255, seed=32)
    check("ghmc", logits, target, use_sigmoid=False, ignore_index=255, reduction="none")
    # More bins than the shared-memory histogram holds: the global-atomic path.
    logits, labels = sigmoid_case((512, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=33)
    check("ghmc", logits, labels, bins=5000)


@pytest.mark.parametrize("use_sigmoid", [True, False])
def test_ghmc_ema_state(use_sigmoid):
    """state updated in place on the device first (only bins non-empty in this batch), then
    used; bitwise the reference's state after every step."""
    momentum = 0.75
    state_cuda = torch.zeros(10, device=DEV)
    state_ref = torch.zeros(10, device=DEV)
    for step in range(3):
        if use_sigmoid:
            logits, target = sigmoid_case((64, 5), torch.float32, DEV, kind="labels", ignore_frac=0.1,
                                          seed=40 + step, scale=1.0 + step)
        else:
            logits, target = softmax_case((64, 5), torch.float32, DEV, ignore_frac=0.1, seed=40 + step,
                                          scale=1.0 + step)
        before = state_cuda.clone()
        out, grad = loss_and_grad(fl.ghmc, logits, target, momentum=momentum, state=state_cuda,
                                  use_sigmoid=use_sigmoid, backend="cuda")
        ref, ref_grad = loss_and_grad(fl.ghmc, logits, target, momentum=momentum, state=state_ref,
                                      use_sigmoid=use_sigmoid, backend="reference")
        assert torch.equal(state_cuda, state_ref), f"step {step}: state {state_cuda} != reference {state_ref}"
        assert not torch.equal(state_cuda, before)
        assert_rel_close(out, ref, 1e-5, f"ghmc ema step {step} loss")
        assert_rel_close(grad, ref_grad, 1e-5, f"ghmc ema step {step} grad")


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
@pytest.mark.parametrize("n", [1, 7, 4096])
@pytest.mark.parametrize("feature_kind", ["norm", "norm_col", "raw"])
@pytest.mark.parametrize("config", range(4))
def test_ib_matrix(dtype, c, n, feature_kind, config):
    if not _small_or_few(n, config):
        pytest.skip("N=4096 runs a third of the configurations")
    gamma, weighted, detach, reduction = [(0.0, False, False, "mean"), (2.0, True, False, "sum"),
                                          (0.5, False, True, "none"), (0.0, True, True, "mean")][config]
    logits, target = softmax_case((n, c), dtype, seed=n * 19 + c, scale=1.0)
    features = _features(feature_kind, n, dtype, seed=n + c)
    weight = torch.linspace(0.5, 2.0, c).tolist() if weighted else None
    check("ib", logits, target, features, alpha=100.0, gamma=gamma, weight=weight, detach_factor=detach,
          reduction=reduction)


def test_ib_feature_gradient():
    for kind in ("norm", "norm_col", "raw"):
        logits, target = softmax_case((9, 4), torch.float32, DEV, seed=51, scale=1.0)
        grads = []
        for backend, dtype in (("cuda", torch.float32), ("reference", torch.float64)):
            f = _features(kind, 9, dtype, seed=52).to(DEV).requires_grad_(True)
            fl.ib(logits.to(dtype), target, f, alpha=10.0, gamma=0.5, backend=backend).backward()
            grads.append(f.grad)
        assert rel_error(grads[0], grads[1]) <= 1e-5, kind


# --------------------------------------------------------------------------------------------
# opcheck on every op, on CUDA
# --------------------------------------------------------------------------------------------
def _opcheck_samples():
    def rg(t):
        return t.clone().requires_grad_(True)

    x, t = softmax_case((6, 5), torch.float32, DEV, ignore_frac=0.2, seed=70)
    xs, ts = softmax_case((2, 5, 3, 4), torch.float32, DEV, ignore_frac=0.2, seed=71)
    xb, tb = softmax_case((6, 5), torch.bfloat16, DEV, seed=72)
    xh, th = softmax_case((4, 80), torch.float16, DEV, seed=73)
    sx, sl = sigmoid_case((6, 5), torch.float32, DEV, kind="labels", ignore_frac=0.2, seed=74)
    _, sf = sigmoid_case((6, 5), torch.float32, DEV, kind="soft", seed=75)
    alpha = torch.rand(5, device=DEV)
    f = torch.rand(6, device=DEV) + 0.1
    samples = {
        "softmax_focal_forward": [
            (rg(x), t, None, 1.0, 2.0, -100, "mean", True, True),
            (rg(xs), ts, alpha, 1.0, 0.5, -100, "none", True, True),
            (rg(xb), tb, None, 0.25, 2.0, -100, "sum", True, True),
            (x, t, None, 1.0, 2.0, -100, "mean", True, False),
            (rg(torch.softmax(xh.float(), 1).half()), th, None, 1.0, 1.0, -100, "none", False, True),
        ],
        "sigmoid_focal_forward": [
            (rg(sx), sl, 0.25, 2.0, -100, "none", True),
            (rg(sx), sf, -1.0, 0.5, -100, "mean", True),
            (rg(xb), (torch.rand(6, 5, device=DEV) < 0.3).bfloat16(), 0.25, 2.0, -100, "sum", True),
            (sx, sl, 0.25, 2.0, -100, "mean", False),
        ],
        "ohem_forward": [
            (rg(x), t, 0.5, 0, None, 0, -100, "mean", True),
            (rg(xs), ts, 0.0, 5, None, 0, -100, "none", True),
            (rg(xs), ts, 0.0, 0, 0.7, 4, -100, "sum", True),
        ],
        "ghmc_bin_weights": [
            (sx, sl, None, 10, 0.0, True, -100),
            (sx, sf, torch.zeros(10, device=DEV), 10, 0.75, True, -100),
            (xs, ts, torch.zeros(5, device=DEV), 5, 0.5, False, -100),
        ],
        "ghmc_forward": [
            (rg(sx), sl, torch.rand(10, device=DEV), True, -100, "mean", True),
            (rg(sx), sf, torch.rand(10, device=DEV), True, -100, "none", True),
            (rg(xs), ts, torch.rand(5, device=DEV), False, -100, "sum", True),
        ],
        "ib_forward": [
            (rg(x), t.clamp_min(0), rg(f), None, 100.0, 1e-3, 0.0, False, "mean", True),
            (rg(x), t.clamp_min(0), rg(f), alpha, 100.0, 1e-3, 2.0, False, "none", True),
            (rg(xb), tb, f, None, 10.0, 1e-3, 0.5, True, "sum", True),
        ],
        "scale_grad": [
            (torch.randn(6, 5, device=DEV), torch.tensor(0.5, device=DEV), torch.float32),
            (torch.randn(2, 5, 3, 4, device=DEV), torch.randn(2, 3, 4, device=DEV), torch.float32),
            (torch.randn(6, 5, device=DEV), torch.randn(6, 5, device=DEV).bfloat16(), torch.bfloat16),
            (torch.randn(3, 4, device=DEV), torch.randn(3, device=DEV).half(), torch.float16),
        ],
    }
    return [(name, args) for name, per_op in samples.items() for args in per_op]


_OPCHECK_COUNT = 25


@pytest.mark.parametrize("index", range(_OPCHECK_COUNT))
def test_opcheck(index):
    samples = _opcheck_samples()
    assert len(samples) == _OPCHECK_COUNT
    name, args = samples[index]
    torch.library.opcheck(getattr(OPS, name).default, args)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) on CUDA
# --------------------------------------------------------------------------------------------
@pytest.mark.compile
@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal", "ohem", "ghmc",
                                  "ghmc_no_state",
                                  "ib"])
def test_torch_compile_fullgraph(loss):
    torch._dynamo.reset()
    extra = ()
    if loss in ("focal", "ohem"):
        logits, target = softmax_case((2, 5, 4, 6), torch.float32, DEV, ignore_frac=0.2, seed=80)
        kwargs = dict(gamma=2.0, alpha=0.25) if loss == "focal" else dict(keep=0.5)
    elif loss == "ib":
        logits, target = softmax_case((16, 7), torch.float32, DEV, seed=80)
        extra = (torch.rand(16, device=DEV) + 0.1,)
        kwargs = dict(alpha=10.0)
    else:
        logits, target = sigmoid_case((16, 7), torch.float32, DEV, kind="labels", ignore_frac=0.2, seed=81)
        kwargs = dict(reduction="sum")
    fn = getattr(fl, loss.replace("_no_state", ""))

    def make_step():
        # ghmc: each run gets its own EMA state (the op updates it in place).
        state = dict(momentum=0.75, state=torch.zeros(10, device=DEV)) if loss == "ghmc" else {}

        def step(x, t, *e):
            return fn(x, t, *e, backend="cuda", validate=False, **kwargs, **state)
        return step

    compiled = torch.compile(make_step(), fullgraph=True, backend="inductor")
    out, grad = loss_and_grad(compiled, logits, target, *extra)
    eager_out, eager_grad = loss_and_grad(make_step(), logits, target, *extra)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)


# --------------------------------------------------------------------------------------------
# Determinism, no host sync, retain_graph, automatic choice
# --------------------------------------------------------------------------------------------
def _determinism_cases():
    x, t = softmax_case((30000, 80), torch.bfloat16, DEV, ignore_frac=0.1, seed=90)
    xs, ts = softmax_case((2, 19, 40, 50), torch.float32, DEV, ignore_frac=0.1, ignore_index=255, seed=91)
    sx, sl = sigmoid_case((30000, 80), torch.float32, DEV, kind="labels", ignore_frac=0.1, seed=92)
    f = torch.rand(30000, device=DEV) + 0.1
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
def test_bitwise_deterministic_run_to_run(case):
    fn, x, rest, kwargs = _determinism_cases()[case]
    runs = [loss_and_grad(fn, x, *rest, backend="cuda", **kwargs) for _ in range(3)]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@pytest.mark.parametrize("loss", ["focal", "focal_spatial", "sigmoid_focal", "ohem", "ohem_thresh", "ghmc",
                                  "ghmc_softmax", "ib"])
def test_no_host_sync_in_forward_and_backward(loss):
    if loss.startswith("focal") or loss.startswith("ohem") or loss in ("ghmc_softmax", "ib"):
        shape = (64, 19, 8, 8) if loss == "focal_spatial" else (256, 19)
        x, t = softmax_case(shape, torch.bfloat16, DEV, ignore_frac=0.1, seed=93)
    else:
        x, t = sigmoid_case((256, 19), torch.bfloat16, DEV, kind="labels", ignore_frac=0.1, seed=94)
    extra, kwargs = (), {}
    name = loss.split("_")[0] if loss != "sigmoid_focal" else loss
    if loss == "ohem_thresh":
        kwargs = dict(thresh=0.7, min_kept=10)
    if loss == "ghmc_softmax":
        kwargs = dict(use_sigmoid=False, momentum=0.75, state=torch.zeros(10, device=DEV))
    if loss == "ib":  # no ignore_index in IB: every target must be a class
        t = t.clamp_min(0)
        extra = (torch.rand(x.shape[0], device=DEV) + 0.1,)
    fn = getattr(fl, name)
    xr = x.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(xr, t, *extra, backend="cuda", **kwargs)
        (out.sum() if out.dim() else out).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


def test_retain_graph_backward_twice_gives_the_same_gradient():
    logits, target = softmax_case((7, 5), torch.float32, DEV, seed=95)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, reduction="none", backend="cuda")
    cot = torch.randn(out.shape, device=DEV)
    (g1,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g3,) = torch.autograd.grad(out, x, 2 * cot)
    assert torch.equal(g1, g2) and torch.equal(g3, 2 * g1)


def test_backend_is_the_automatic_choice_for_cuda_tensors():
    logits, target = softmax_case((4, 3), torch.float32, DEV)
    for loss in _backends.LOSSES:
        assert _backends.select(loss, logits, None).name == "cuda"
    assert _backends.select("focal", logits.double(), None).name != "cuda"  # fp64: not a CUDA-kernel dtype


def test_fresh_outputs_never_alias_the_inputs():
    logits, target = softmax_case((8, 5), torch.float32, DEV, seed=98)
    before = logits.clone()
    loss, grad = OPS.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "none", True, True)
    assert torch.equal(logits, before)
    assert grad.data_ptr() != logits.data_ptr() and loss.data_ptr() != logits.data_ptr()
    scaled = OPS.scale_grad(grad, torch.ones((), device=DEV), torch.float32)
    assert scaled.data_ptr() != grad.data_ptr() and torch.equal(scaled, grad)


# --------------------------------------------------------------------------------------------
# numel > 2^31 (int64 indexing), bf16
# --------------------------------------------------------------------------------------------
def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@pytest.mark.skipif(not torch.cuda.is_available() or _free_gib() < 40, reason="needs 40 GB of free GPU memory")
@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal"])
def test_more_than_2_pow_31_elements_bf16(loss):
    """N x C > 2^31 (2^21 + 7 rows of 1024 classes, bf16): the rows past 2^31 / C must be right.
    Checked against the reference on a slice of rows near the end (the full reference would not fit)."""
    n, c = 2 ** 21 + 7, 1024
    assert n * c > 2 ** 31
    g = torch.Generator(device=DEV).manual_seed(99)
    x = (3 * torch.randn(n, c, device=DEV, generator=g)).bfloat16().requires_grad_(True)
    if loss == "focal":
        t = torch.randint(0, c, (n,), device=DEV, generator=g)
        out = fl.focal(x, t, reduction="sum", backend="cuda")
    else:
        t = torch.randint(0, c + 1, (n,), device=DEV, generator=g)
        out = fl.sigmoid_focal(x, t, reduction="sum", backend="cuda")
    out.backward()
    rows = slice(n - 64, n)
    xs = x.detach()[rows].double().requires_grad_(True)
    fn = fl.focal if loss == "focal" else fl.sigmoid_focal
    ref = fn(xs, t[rows], reduction="sum", backend="reference")
    ref.backward()
    assert torch.isfinite(out)
    assert_rel_close(x.grad[rows], xs.grad, 2 * UNIT_ROUNDOFF[torch.bfloat16], f"{loss} grad of the last rows")
    del x, out
    torch.cuda.empty_cache()
