"""The 'triton' backend against the float64 reference (exactness rule of tests/utils.py).

Without a GPU the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set by conftest before triton is imported), so sizes stay small (N x C <= ~1e4 per case); with a
GPU the interpreter is off and the same tests run on CUDA tensors instead.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_losses as fl
from fused_losses import reference
from tests.conftest import DEVICES
from tests.utils import (LOW_PRECISION, TOL, assert_matches_reference, assert_rel_close, loss_and_grad, opcheck_loss_op,
                         sigmoid_case, softmax_case)

# CPU tensors run Triton only through the interpreter, which conftest switches on when there is
# no GPU; with a GPU the interpreter is off and the same tests run on CUDA tensors instead.
DEVICES = [d for d in DEVICES if d in fl._backends.get("triton").device_types] or DEVICES
DTYPES = [torch.float32, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]
SOFTMAX_SHAPES = [(0, 3), (1, 1), (7, 3), (64, 80), (2, 3, 4, 5), (3, 80, 2, 3)]
SIGMOID_SHAPES = [(0, 3), (1, 1), (7, 3), (64, 80), (2, 5, 80)]


def test_backend_available():
    status = fl.backends()["triton"]
    assert status.available, status.reason
    assert DEVICES, "no device the triton backend serves"


def _alpha(kind, c, device):
    if kind == "none":
        return None
    if kind == "float":
        return 0.25
    return torch.linspace(0.2, 1.5, c, dtype=torch.float32, device=device)


def loss_and_grads(fn, logits, *args, cot_dtype, extra=None, **kwargs):
    """Like tests.utils.loss_and_grad (fixed random cotangent, ones for a scalar), but the
    cotangent is first rounded to cot_dtype (the kernel's input dtype), so the float64 reference and the eager
    low-precision baseline differentiate with exactly the cotangent the kernel gets (otherwise
    the rounding of the cotangent alone costs up to one bf16 ulp of 'error'). `extra`: a second
    differentiable input (ib features), whose gradient is returned too."""
    x = logits.detach().clone().requires_grad_(True)
    leaves = [x]
    if extra is not None:
        extra = extra.detach().clone().requires_grad_(True)
        leaves.append(extra)
        args = (*args, extra)
    out = fn(x, *args, **kwargs)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        g = torch.Generator().manual_seed(1)
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(cot_dtype)
        cot = cot.to(dtype=out.dtype, device=out.device)
    if out.requires_grad:
        out.backward(cot)
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    return (out.detach(), *(grad.detach() for grad in grads))


def _check(name, logits, target, *, triton_kwargs=None, **kw):
    """Loss and logits gradient of the triton backend vs the float64 reference (and, for
    fp16/bf16, vs the bound set by the eager reference in the same low precision)."""
    dtype = logits.dtype
    fn = getattr(fl, name)
    ref = getattr(reference, name)
    out, grad = loss_and_grads(fn, logits, target, backend="triton", cot_dtype=dtype, **kw, **(triton_kwargs or {}))
    out64, grad64 = loss_and_grads(ref, logits.double(), target, cot_dtype=dtype, **kw)
    eager = (None, None)
    if dtype in LOW_PRECISION:
        eager = loss_and_grads(ref, logits, target, upcast=False, cot_dtype=dtype, **kw)
    expected_dtype = dtype if kw.get("reduction", "mean") == "none" else torch.float32
    assert out.dtype == expected_dtype and grad.dtype == dtype
    assert out.device == logits.device and grad.device == logits.device
    assert_matches_reference(out, out64, dtype, f"{name} loss", eager[0])
    assert_matches_reference(grad, grad64, dtype, f"{name} grad", eager[1])


# --------------------------------------------------------------------------------------------
# Softmax focal (and cross entropy at gamma = 0)
# --------------------------------------------------------------------------------------------
FOCAL_PARAMS = [(0.0, "none"), (0.5, "float"), (2.0, "class"), (2.0, "none"), (0.0, "class")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal(device, dtype, shape, reduction):
    logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2 if shape[0] > 1 else 0.0)
    for gamma, alpha in FOCAL_PARAMS:
        _check("focal", logits, target, gamma=gamma, alpha=_alpha(alpha, shape[1], device), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16])
@pytest.mark.parametrize("shape", [(7, 3), (3, 80, 2, 3)], ids=str)
def test_focal_fp16(device, dtype, shape):
    logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2)
    for reduction, (gamma, alpha) in zip(REDUCTIONS, FOCAL_PARAMS):
        _check("focal", logits, target, gamma=gamma, alpha=_alpha(alpha, shape[1], device), reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_all_ignored_and_int32_target(device, reduction):
    logits, target = softmax_case((5, 4, 3), torch.float32, device, target_dtype=torch.int32)
    _check("focal", logits, target, gamma=2.0, reduction=reduction, ignore_index=-100)
    target = torch.full_like(target, 7)
    _check("focal", logits, target, gamma=2.0, reduction=reduction, ignore_index=7)
    out, grad = loss_and_grad(fl.focal, logits, target, ignore_index=7, reduction=reduction, backend="triton")
    assert not grad.any() and not out.any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_confident_rows_finite_gradient(device, gamma):
    """p_t -> 1: gamma < 1 must not give NaN/inf (the gradient is its limit)."""
    logits = torch.tensor([[40.0, 0.0, -5.0], [0.0, 30.0, 1.0], [2.0, 1.0, 0.5]], device=device)
    target = torch.tensor([0, 1, 2], device=device)
    for reduction in REDUCTIONS:
        _check("focal", logits, target, gamma=gamma, reduction=reduction)
    _, grad = loss_and_grad(fl.focal, logits, target, gamma=gamma, backend="triton")
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_from_probabilities(device, dtype, reduction):
    for shape in [(7, 3), (2, 5, 3, 2)]:
        logits, target = softmax_case(shape, torch.float64, device, ignore_frac=0.2)
        probs = torch.softmax(logits, dim=1).to(dtype)
        for gamma, alpha in FOCAL_PARAMS[:3]:
            _check("focal", probs, target, gamma=gamma, alpha=_alpha(alpha, shape[1], device), reduction=reduction,
                   from_logits=False)


@pytest.mark.parametrize("device", DEVICES)
def test_focal_strided_inputs(device):
    """Transposed (N, C) and channels_last (N, C, H, W) logits are read through their strides."""
    base, target = softmax_case((5, 7), torch.float32, device, ignore_frac=0.2)
    transposed = base.t().contiguous().t()
    assert not transposed.is_contiguous()
    _check("focal", transposed, target, gamma=2.0, reduction="none")
    logits, target = softmax_case((2, 6, 3, 4), torch.float32, device, ignore_frac=0.2)
    _check("focal", logits.to(memory_format=torch.channels_last), target, gamma=0.5, reduction="mean")
    sliced, _ = softmax_case((4, 9, 6), torch.float32, device)
    _, target = softmax_case((4, 5, 4), torch.float32, device, ignore_frac=0.2)
    _check("focal", sliced[:, ::2, 1:5], target, gamma=2.0, reduction="sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_logits_propagate_like_the_reference(device, reduction):
    """A NaN logit makes that sample's loss (and gradient row) NaN, exactly where the reference
    has NaN (rel_error checks the NaN pattern); an ignored row's NaN does not leak."""
    logits, target = softmax_case((6, 4), torch.float32, device)
    logits[1, 2] = float("nan")
    logits[4, 0] = float("nan")
    target[4] = -100
    _check("focal", logits, target, gamma=2.0, reduction=reduction)
    _check("focal", logits, target, gamma=0.5, reduction=reduction)
    slogits, labels = sigmoid_case((5, 3), torch.float32, device, kind="labels")
    slogits[2, 1] = float("nan")
    labels[3] = -100
    slogits[3, 0] = float("nan")
    _check("sigmoid_focal", slogits, labels, alpha=0.25, gamma=2.0, reduction=reduction)
    _check("ohem", logits, target, keep=0.5, reduction=reduction)
    for use_sigmoid, (x, t) in [(False, (logits, target)), (True, (slogits, labels))]:
        _check("ghmc", x, t, bins=10, use_sigmoid=use_sigmoid, reduction=reduction)


# --------------------------------------------------------------------------------------------
# Sigmoid focal
# --------------------------------------------------------------------------------------------
SIGMOID_PARAMS = [(0.25, 2.0), (-1.0, 0.0), (0.25, 0.5)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIGMOID_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["labels", "float", "soft"])
def test_sigmoid_focal(device, dtype, shape, kind):
    logits, target = sigmoid_case(shape, dtype, device, kind=kind, ignore_frac=0.2 if kind == "labels" else 0.0)
    for reduction, (alpha, gamma) in itertools.product(REDUCTIONS, SIGMOID_PARAMS):
        _check("sigmoid_focal", logits, target, alpha=alpha, gamma=gamma, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_sigmoid_focal_fp16_and_large_logits(device):
    logits, target = sigmoid_case((9, 5), torch.float16, device, kind="labels", ignore_frac=0.2)
    for reduction in REDUCTIONS:
        _check("sigmoid_focal", logits, target, alpha=0.25, gamma=2.0, reduction=reduction)
    logits, target = sigmoid_case((6, 4), torch.float32, device, kind="soft", scale=40.0)
    for alpha, gamma in SIGMOID_PARAMS:
        _check("sigmoid_focal", logits, target, alpha=alpha, gamma=gamma, reduction="none")


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
OHEM_MODES = [dict(keep=0.25), dict(keep=0.7), dict(keep=1.0), dict(keep=5), dict(keep=1000),
              dict(thresh=0.7, min_kept=3), dict(thresh=0.3, min_kept=0), dict(thresh=0.05, min_kept=10 ** 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (7, 3), (64, 80), (2, 3, 4, 5)], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ohem(device, dtype, shape, reduction):
    logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2 if shape[0] > 1 else 0.0)
    for mode in OHEM_MODES:
        _check("ohem", logits, target, reduction=reduction, **mode)


# --------------------------------------------------------------------------------------------
# GHM-C (sigmoid and softmax, with and without EMA state)
# --------------------------------------------------------------------------------------------
def _check_ghmc(logits, target, *, momentum, **kw):
    """ghmc with an EMA state: the loss, gradient and updated state of every call, twice in a row
    (state starts at zeros, as in GHMCLoss)."""
    bins = kw["bins"]
    dtype, device = logits.dtype, logits.device
    states = {key: torch.zeros(bins, dtype=torch.float32, device=device) for key in ("triton", "ref", "eager")}
    for step in range(2 if momentum > 0 else 1):
        x = logits if step == 0 else (logits.float() * 0.5).to(dtype)
        st = {k: (s if momentum > 0 else None) for k, s in states.items()}
        common = dict(kw, momentum=momentum, cot_dtype=dtype)
        out, grad = loss_and_grads(fl.ghmc, x, target, backend="triton", state=st["triton"], **common)
        out64, grad64 = loss_and_grads(reference.ghmc, x.double(), target, state=st["ref"], **common)
        eager = (None, None)
        if dtype in LOW_PRECISION:
            eager = loss_and_grads(reference.ghmc, x, target, state=st["eager"], upcast=False, **common)
        assert_matches_reference(out, out64, dtype, f"ghmc loss step {step}", eager[0])
        assert_matches_reference(grad, grad64, dtype, f"ghmc grad step {step}", eager[1])
        if momentum > 0:
            assert_rel_close(states["triton"], states["ref"], TOL[torch.float32], f"ghmc state step {step}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SIGMOID_SHAPES, ids=str)
@pytest.mark.parametrize("kind", ["labels", "float"])
def test_ghmc_sigmoid(device, dtype, shape, kind):
    logits, target = sigmoid_case(shape, dtype, device, kind=kind, ignore_frac=0.2 if kind == "labels" else 0.0)
    for reduction, bins, momentum in [("mean", 10, 0.0), ("none", 1, 0.0), ("sum", 30, 0.75), ("mean", 10, 0.75)]:
        _check_ghmc(logits, target, bins=bins, momentum=momentum, use_sigmoid=True, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (1, 1), (7, 3), (64, 80), (2, 3, 4, 5)], ids=str)
def test_ghmc_softmax(device, dtype, shape):
    logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2 if shape[0] > 1 else 0.0)
    for reduction, bins, momentum in [("mean", 10, 0.0), ("none", 1, 0.0), ("sum", 30, 0.75), ("mean", 10, 0.75)]:
        _check_ghmc(logits, target, bins=bins, momentum=momentum, use_sigmoid=False, reduction=reduction)


# --------------------------------------------------------------------------------------------
# IB / IB-focal: gradients w.r.t. logits and features
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 3), (1, 3), (7, 3), (64, 80)], ids=str)
@pytest.mark.parametrize("feature_kind", ["n", "n1", "nd"])
def test_ib(device, dtype, shape, feature_kind):
    logits, target = softmax_case(shape, dtype, device)
    n, c = shape
    g = torch.Generator().manual_seed(3)
    fshape = {"n": (n,), "n1": (n, 1), "nd": (n, 6)}[feature_kind]
    features = torch.rand(fshape, generator=g, dtype=torch.float64) + 0.1
    if feature_kind == "nd":
        features = features * torch.where(torch.rand(fshape, generator=g) < 0.3, -1.0, 1.0).double()
    features = features.to(dtype=torch.float32, device=device)
    weight = torch.linspace(0.5, 2.0, c, dtype=torch.float32, device=device)
    cases = [dict(gamma=0.0, weight=None, detach_factor=False, reduction="mean"),
             dict(gamma=2.0, weight=weight, detach_factor=False, reduction="none"),
             dict(gamma=0.5, weight=None, detach_factor=True, reduction="sum"),
             dict(gamma=0.0, weight=weight, detach_factor=True, reduction="none")]
    for kw in cases:
        kw = dict(kw, alpha=1000.0, epsilon=1e-3)
        out, gx, gf = loss_and_grads(fl.ib, logits, target, extra=features, backend="triton", cot_dtype=dtype, **kw)
        out64, gx64, gf64 = loss_and_grads(reference.ib, logits.double(), target, extra=features.double(),
                                           cot_dtype=dtype, **kw)
        eager = (None,) * 3
        if dtype in LOW_PRECISION:
            eager = loss_and_grads(reference.ib, logits, target, extra=features, upcast=False, cot_dtype=dtype,
                                   **kw)
        assert_matches_reference(out, out64, dtype, f"ib loss {kw}", eager[0])
        assert_matches_reference(gx, gx64, dtype, f"ib logits grad {kw}", eager[1])
        assert_matches_reference(gf, gf64, dtype, f"ib features grad {kw}", eager[2])


# --------------------------------------------------------------------------------------------
# Loops inside the kernels: several column blocks per row, several blocks per histogram program
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_online_softmax_over_several_column_blocks(device, monkeypatch):
    """Small forced tiles make every row span several BLOCK_C blocks (the online max/sum rescale)
    and every program several rows; plus one natural case with C > 2048."""
    from fused_losses._triton import launch

    logits, target = softmax_case((3, 2500), torch.float32, device, scale=8.0)
    _check("focal", logits, target, gamma=2.0, reduction="none")
    # The general row kernel (the one-pass tile kernel would take these (N, C) focal rows).
    monkeypatch.setattr(launch, "_ONE_PASS_MAX_C", 0)
    _check("focal", logits, target, gamma=2.0, reduction="none")
    monkeypatch.setattr(launch, "_row_blocks", lambda m, c, s: (4, 16))
    for shape in [(7, 80), (2, 37, 2, 3)]:
        for dtype in DTYPES:
            logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2, scale=8.0)
            n, c = shape[0], shape[1]
            _check("focal", logits, target, gamma=0.5, alpha=_alpha("class", c, device), reduction="none")
            _check("focal", torch.softmax(logits.float(), 1).to(dtype), target, gamma=2.0, from_logits=False)
            _check("ohem", logits, target, keep=0.5, reduction="sum")
            _check("ghmc", logits, target, bins=10, use_sigmoid=False, reduction="mean")
            if len(shape) == 2:
                features = torch.rand(n, device=device) + 0.1
                target = target.clamp_min(0)  # ib has no ignore_index
                kw = dict(alpha=1000.0, epsilon=1e-3, weight=None, gamma=2.0, detach_factor=False, reduction="none")
                out, gx, gf = loss_and_grads(fl.ib, logits, target, extra=features, backend="triton", cot_dtype=dtype,
                                             **kw)
                ref = loss_and_grads(reference.ib, logits.double(), target, extra=features.double(), cot_dtype=dtype,
                                     **kw)
                eager = (None,) * 3
                if dtype in LOW_PRECISION:
                    eager = loss_and_grads(reference.ib, logits, target, extra=features, upcast=False, cot_dtype=dtype,
                                           **kw)
                for got, want, lowp, what in zip((out, gx, gf), ref, eager, ("loss", "logits grad", "features grad")):
                    assert_matches_reference(got, want, dtype, f"ib {what}", lowp)


def test_one_pass_tiles_from_c():
    """The one-pass tiles: A the largest power of two <= C, B the next power of two >= C - A."""
    from fused_losses._triton import launch

    assert launch._pieces(80) == (64, 16) and launch._pieces(1203) == (1024, 256)
    assert launch._pieces(64) == (64, 0) and launch._pieces(1) == (1, 0) and launch._pieces(3) == (2, 1)
    for c in (1, 3, 19, 80, 100, 1203, 2049, 4096):
        cfg = launch._one_pass_config(10 ** 6, c)
        a, b = cfg["BLOCK_A"], cfg["BLOCK_B"]
        assert a <= c <= a + b or (b == 0 and a == c)
        assert cfg["BLOCK_M"] * (a + b) <= max(launch._ONE_PASS_TILE, a + b)
        assert cfg["num_warps"] in (4, 8) and cfg["num_stages"] == 1
    assert launch._gamma_mode(0.0) == 0 and launch._gamma_mode(2.0) == 2 and launch._gamma_mode(1.5) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int64, emulate", [(False, False), (True, False), (False, True)])
def test_one_pass_kernels(device, int64, emulate, monkeypatch):
    """The one-pass tile kernels (softmax focal, sigmoid focal with integer labels): rows of two
    pieces with a masked edge (C = 37, 200), a single piece (C = 64), every gamma specialisation,
    class alpha, weights, background labels, the int64-offset variant (forced), and (emulate,
    interpreter only) the GPU's approximate ex2/lg2/rcp error bounds applied in one direction
    (kernels._EMULATE_APPROX), plus confident rows, which the accuracy rule must survive."""
    import triton.language as tl

    from fused_losses._triton import kernels, launch

    monkeypatch.setattr(launch, "_FORCE_INT64", int64)
    monkeypatch.setattr(kernels, "_EMULATE_APPROX", tl.constexpr(emulate))
    confident = torch.tensor([[40.0, 0.0, -5.0], [0.0, 30.0, 1.0], [2.0, 1.0, 0.5], [-3.0, 12.0, 11.5]],
                             device=device)
    for gamma in (0.0, 0.5, 2.0):
        for reduction in REDUCTIONS:
            _check("focal", confident, torch.tensor([0, 1, 2, 1], device=device), gamma=gamma, reduction=reduction)
            _check("sigmoid_focal", confident * 0.5, torch.tensor([0, 1, 3, 1], device=device), alpha=0.25,
                   gamma=gamma, reduction=reduction)
    for c in (37, 64, 200):
        logits, target = softmax_case((9, c), torch.float32, device, ignore_frac=0.2, scale=6.0)
        for gamma, alpha in [(0.0, "none"), (2.0, "class"), (0.7, "float")]:
            for reduction in REDUCTIONS:
                _check("focal", logits, target, gamma=gamma, alpha=_alpha(alpha, c, device), reduction=reduction)
        _check_extras("focal", logits, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean",
                      from_logits=True, weight=_row_weights(target.shape, device), label_smoothing=0.0)
        slogits, labels = sigmoid_case((9, c), torch.float32, device, kind="labels", ignore_frac=0.2)
        labels[0] = c  # background
        for alpha, gamma in SIGMOID_PARAMS + [(0.75, 1.5)]:
            for reduction in REDUCTIONS:
                _check("sigmoid_focal", slogits, labels, alpha=alpha, gamma=gamma, reduction=reduction)


def test_one_pass_kernels_are_the_ones_launched(monkeypatch):
    """The hot cases go to the one-pass kernels (recorded launches, nothing run)."""
    from fused_losses._triton import launch
    from benchmarks.gpu_budget import record_triton_launches as _record

    x = torch.zeros(64, 80)
    t = torch.zeros(64, dtype=torch.int64)
    names = [l[0].fn.__name__ for l in _record(lambda: launch.softmax_focal(x, t, None, 1.0, 2.0, -100, "mean",
                                                                            True, True))]
    assert names == ["softmax_focal_tile_kernel"]
    names = [l[0].fn.__name__ for l in _record(lambda: launch.sigmoid_focal(x, t, 0.25, 2.0, -100, "mean", True))]
    assert names == ["sigmoid_focal_labels_kernel"]
    launches = _record(lambda: launch.softmax_focal(x, t, None, 1.0, 2.0, -100, "mean", True, True))
    assert launches[0][2]["num_warps"] == 4 and launches[0][2]["GAMMA_MODE"] == 2 and not launches[0][2]["INT64"]


@pytest.mark.parametrize("device", DEVICES)
def test_ghm_histogram_grid_stride(device, monkeypatch):
    """Two histogram programs over 5 blocks: each program loops over several blocks."""
    from fused_losses._triton import launch

    monkeypatch.setattr(launch, "_HIST_PROGRAMS", 2)
    for kind in ["labels", "float"]:
        logits, target = sigmoid_case((64, 80), torch.float32, device, kind=kind, ignore_frac=0.2)
        _check_ghmc(logits, target, bins=10, momentum=0.75, use_sigmoid=True, reduction="mean")


# --------------------------------------------------------------------------------------------
# Autograd contract, determinism, registration, torch.compile
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_backward_twice_and_inputs_untouched(device):
    """retain_graph: a second backward gives the same gradient (never scaled twice); the user's
    logits are never overwritten; two runs are bitwise identical."""
    logits, target = softmax_case((6, 5, 3), torch.float32, device, ignore_frac=0.2)
    labels_logits, labels = sigmoid_case((6, 4), torch.float32, device)
    for fn, x, t, kw in [(fl.focal, logits, target, dict(reduction="none")),
                         (fl.ohem, logits, target, dict(keep=0.5)),
                         (fl.sigmoid_focal, labels_logits, labels, dict(reduction="mean"))]:
        leaf = x.clone().requires_grad_(True)
        before = leaf.detach().clone()
        out = fn(leaf, t, backend="triton", **kw)
        cot = torch.rand_like(out)
        (g1,) = torch.autograd.grad(out, leaf, cot, retain_graph=True)
        (g2,) = torch.autograd.grad(out, leaf, cot)
        assert torch.equal(g1, g2)
        assert torch.equal(leaf.detach(), before)
        out2 = fn(leaf, t, backend="triton", **kw)
        assert torch.equal(out.detach(), out2.detach())


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_path(device):
    logits, target = softmax_case((7, 3), torch.float32, device, ignore_frac=0.2)
    with torch.no_grad():
        out = fl.focal(logits.clone().requires_grad_(True), target, backend="triton")
    assert not out.requires_grad
    assert_rel_close(out, reference.focal(logits.double(), target), TOL[torch.float32], "no-grad focal")


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """Schema, fake kernels and autograd registration of every op (torch.library.opcheck)."""
    ops = torch.ops.fused_losses_triton
    fl.focal(torch.zeros(1, 2, device=device), torch.zeros(1, dtype=torch.long, device=device), backend="triton")
    logits, target = softmax_case((5, 3), torch.float32, device, ignore_frac=0.2)
    slogits, labels = sigmoid_case((5, 3), torch.float32, device)
    features = torch.rand(5, device=device) + 0.1
    x = logits.clone().requires_grad_(True)
    samples = [
        (ops.softmax_focal, (x, target, None, 1.0, 2.0, -100, "mean", True, True)),
        (ops.softmax_focal, (x, target, torch.rand(3, device=device), 1.0, 0.5, -100, "none", True, True)),
        (ops.sigmoid_focal, (slogits.clone().requires_grad_(True), labels, 0.25, 2.0, -100, "sum", True)),
        (ops.ohem, (x, target, 0.5, False, None, 0, -100, "mean", True)),
        (ops.ghmc, (x, target, torch.zeros(10, device=device), 10, 0.75, False, -100, "mean", True)),
        (ops.ghmc, (slogits.clone().requires_grad_(True), labels, None, 10, 0.0, True, -100, "none", True)),
        (ops.ib, (x, target.clamp_min(0), features.clone().requires_grad_(True), None, 1000.0, 1e-3, 0.0, False,
                  "mean", True)),
        (ops.ib, (x, target.clamp_min(0), torch.randn(5, 4, device=device).requires_grad_(True),
                  torch.rand(3, device=device), 1000.0, 1e-3, 2.0, False, "none", True)),
        (ops.softmax_focal, (logits, target, None, 0.25, 0.0, -100, "sum", True, False)),  # no grad
    ]
    for op, args in samples:
        opcheck_loss_op(op, args)  # schema, fake kernel, autograd registration, AOT dispatch


@pytest.mark.compile
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """focal and sigmoid_focal through the public API under torch.compile(fullgraph=True): the
    custom ops trace as opaque calls (on CPU the kernels still run in the interpreter)."""
    torch._dynamo.reset()
    logits, target = softmax_case((6, 5, 2), torch.float32, device, ignore_frac=0.2)
    slogits, labels = sigmoid_case((6, 5), torch.float32, device)
    # The first call of a backend imports its module, which dynamo will not trace.
    fl.focal(logits, target, backend="triton")

    def focal(x, t):
        return fl.focal(x, t, gamma=2.0, backend="triton", validate=False)

    def sigmoid(x, t):
        return fl.sigmoid_focal(x, t, reduction="sum", backend="triton", validate=False)

    for fn, x, t, ref in [(focal, logits, target, reference.focal),
                          (sigmoid, slogits, labels, lambda a, b: reference.sigmoid_focal(a, b, reduction="sum"))]:
        compiled = torch.compile(fn, fullgraph=True)
        out, grad = loss_and_grad(compiled, x, t)
        out64, grad64 = loss_and_grad(ref, x.double(), t)
        assert_rel_close(out, out64, TOL[torch.float32], "compiled loss")
        assert_rel_close(grad, grad64, TOL[torch.float32], "compiled grad")

    # GHM-C's in-place EMA state under compile: two steps, state compared with the reference's.
    state, state64 = (torch.zeros(10, device=device) for _ in range(2))

    def ghmc(x, t):
        return fl.ghmc(x, t, momentum=0.75, state=state, use_sigmoid=False, backend="triton", validate=False)

    compiled = torch.compile(ghmc, fullgraph=True)
    for step in range(2):
        out, grad = loss_and_grad(compiled, logits, target)
        out64, grad64 = loss_and_grad(reference.ghmc, logits.double(), target, momentum=0.75, state=state64,
                                      use_sigmoid=False)
        assert_rel_close(out, out64, TOL[torch.float32], f"compiled ghmc loss, step {step}")
        assert_rel_close(grad, grad64, TOL[torch.float32], f"compiled ghmc grad, step {step}")
        assert_rel_close(state, state64, TOL[torch.float32], f"compiled ghmc state, step {step}")


def _every_loss_forward_backward(device):
    """One closure per loss/mode that runs forward + backward on fresh leaves (validate=False:
    the CPU range check reads the target on the host by design)."""
    logits, target = softmax_case((6, 5, 3), torch.float32, device, ignore_frac=0.2)
    slogits, labels = sigmoid_case((6, 5), torch.float32, device, ignore_frac=0.2)
    soft = torch.rand(6, 5, device=device)
    features = torch.rand(6, 4, device=device)
    state = torch.zeros(10, device=device)
    kw = dict(validate=False, backend="triton")
    alpha = torch.linspace(0.2, 1.0, 5, device=device)  # a Python list would be copied to the GPU (a sync)
    losses = [lambda x, sx, f: fl.focal(x, target, alpha=alpha, **kw),
              lambda x, sx, f: fl.focal(x.softmax(1), target, from_logits=False, **kw),
              lambda x, sx, f: fl.ohem(x, target, keep=0.3, **kw),
              lambda x, sx, f: fl.ohem(x, target, keep=3, reduction="none", **kw),
              lambda x, sx, f: fl.ohem(x, target, thresh=0.7, min_kept=2, **kw),
              lambda x, sx, f: fl.ghmc(x, target, momentum=0.75, state=state, use_sigmoid=False, **kw),
              lambda x, sx, f: fl.sigmoid_focal(sx, labels, reduction="mean", **kw),
              lambda x, sx, f: fl.ghmc(sx, labels, momentum=0.75, state=state, **kw),
              lambda x, sx, f: fl.ghmc(sx, soft, reduction="none", **kw),
              lambda x, sx, f: fl.ib(x[:, :, 0], target[:, 0].clamp_min(0), f, gamma=2.0, **kw)]
    # The drop-in extras, through the backend functions (normalised arguments).
    w, sw = torch.rand(6, 3, device=device), torch.rand(6, 5, device=device)
    soft_kw = dict(ignore_index=-100, reduction="mean", weight=w, label_smoothing=0.1)
    sig_kw = dict(ignore_index=-100, reduction="sum", weight=sw)
    losses += [lambda x, sx, f: _triton("focal")(x, target, gamma=2.0, alpha=alpha, from_logits=True, **soft_kw),
               lambda x, sx, f: _triton("ohem")(x, target, keep=0.3, thresh=None, min_kept=None, **soft_kw),
               lambda x, sx, f: _triton("ghmc")(x, target, bins=10, momentum=0.75, state=state, use_sigmoid=False,
                                               **soft_kw),
               lambda x, sx, f: _triton("sigmoid_focal")(sx, labels, alpha=alpha, gamma=2.0, **sig_kw),
               lambda x, sx, f: _triton("ghmc")(sx, labels, bins=10, momentum=0.75, state=state, use_sigmoid=True,
                                               process_group=object(), **sig_kw)]

    def run(loss):
        leaves = [t.clone().requires_grad_(True) for t in (logits, slogits, features)]
        loss(*leaves).sum().backward()

    return [lambda loss=loss: run(loss) for loss in losses]


@pytest.mark.parametrize("device", DEVICES)
def test_no_python_level_host_sync(device, monkeypatch):
    """Every loss, forward and backward, with the Tensor -> Python conversions that would sync a
    GPU (item, bool, int, float, index, tolist) made to raise: the call path (launchers, torch
    glue of OHEM/GHM-C, autograd) never reads a device value on the host. On CUDA,
    test_no_host_sync_on_cuda checks the same with torch.cuda's sync debug mode."""
    calls = _every_loss_forward_backward(device)
    for call in calls:  # warm-up outside the trap (first calls import and compile)
        call()

    def trap(*args, **kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "__bool__", "__int__", "__float__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, trap)
    for call in calls:
        call()
    monkeypatch.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (host-sync check)")
def test_no_host_sync_on_cuda():
    calls = _every_loss_forward_backward("cuda")
    for call in calls:  # warm-up: compiling the kernels may sync
        call()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter does not run Triton's compiler: lower one variant of every kernel kind to
    an sm_90 cubin (no GPU needed), in a fresh cache so that it really compiles."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "fused_losses._triton.compile_check", "--arch", "90"], env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(": ok (") >= 10, proc.stdout


def test_automatic_choice_and_device_types():
    backend = fl._backends.get("triton")
    assert backend.auto_device_types == ("cuda",)
    assert "cuda" in backend.device_types
    logits, target = softmax_case((3, 2))
    # CPU tensors are never routed to the interpreter automatically.
    assert fl._backends.select("focal", logits, None).name != "triton"
    if torch.cuda.is_available() and not fl.backends()["cuda"].available:
        # CUDA tensors go to triton when the compiled CUDA kernels are unavailable.
        assert fl._backends.select("focal", logits.cuda(), None).name == "triton"


# --------------------------------------------------------------------------------------------
# Drop-in extras (issue #14): sample weights, label smoothing, per-class sigmoid alpha, GHM-C
# process_group. The cross-backend matrix is tests/test_dropin.py; these cover what is specific
# to the Triton kernels: several column blocks per row, several histogram programs, the fp32
# accuracy of confident rows, NaN logits in zero-weight rows, the bin-count path, the op schemas.
# The backend functions are called with the arguments _validate gives them (weights already
# materialised in float32).
# --------------------------------------------------------------------------------------------
def _triton(name):
    return fl._backends.get("triton").losses[name]


def _check_extras(name, logits, target, **kw):
    """Like _check, calling the backend function directly (normalised arguments)."""
    dtype = logits.dtype
    # Copies of a GHM-C state before any run updates it in place.
    kw64 = _double_kwargs(kw)
    kw_eager = {k: (v.clone() if k == "state" and v is not None else v) for k, v in kw.items()}
    out, grad = loss_and_grads(_triton(name), logits, target, cot_dtype=dtype, **kw)
    out64, grad64 = loss_and_grads(getattr(reference, name), logits.double(), target, cot_dtype=dtype, **kw64)
    eager = (None, None)
    if dtype in LOW_PRECISION:
        eager = loss_and_grads(getattr(reference, name), logits, target, upcast=False, cot_dtype=dtype, **kw_eager)
    if kw.get("state") is not None:
        assert_rel_close(kw["state"], kw64["state"], TOL[torch.float32], f"{name} state {kw}")
    assert torch.isfinite(grad).all(), f"{name} {kw}: non-finite gradient"
    assert_matches_reference(out, out64, dtype, f"{name} loss {kw}", eager[0])
    assert_matches_reference(grad, grad64, dtype, f"{name} grad {kw}", eager[1])


def _double_kwargs(kw):
    """The float64 reference's copy of the keyword arguments: weights and per-class alpha in
    float64; a GHM-C state cloned (float32, as the reference keeps it), so both runs update their own."""
    return {k: (v.clone() if k == "state" else v.double()) if isinstance(v, torch.Tensor) else v
            for k, v in kw.items()}


def _row_weights(shape, device, seed=3):
    """Sample weights in [0, 2) with a few exact zeros and one negative value."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(shape, generator=g, dtype=torch.float32) * 2
    flat = w.view(-1)
    flat[1::5] = 0.0
    if flat.numel() > 3:
        flat[3] = -0.5
    return w.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropin_softmax_extras_over_several_column_blocks(device, dtype, monkeypatch):
    """Forced small tiles: every row spans several BLOCK_C blocks in all three passes of a
    label-smoothed row (statistics, smoothed sums, gradient), with weights, gamma and per-class
    alpha; OHEM and GHM-C (softmax) through the statistics/gradient kernels."""
    from fused_losses._triton import launch

    monkeypatch.setattr(launch, "_row_blocks", lambda m, c, s: (4, 16))
    monkeypatch.setattr(launch, "_ONE_PASS_MAX_C", 0)
    for shape in [(7, 80), (2, 37, 2, 3)]:
        logits, target = softmax_case(shape, dtype, device, ignore_frac=0.2, scale=8.0)
        c = shape[1]
        w = _row_weights(target.shape, device)
        for gamma, alpha, eps, weight in [(2.0, _alpha("class", c, device), 0.1, w), (0.0, None, 0.2, w),
                                          (0.5, 0.25, 0.05, None), (2.0, None, 0.0, w)]:
            for reduction in REDUCTIONS:
                _check_extras("focal", logits, target, gamma=gamma, alpha=alpha, ignore_index=-100,
                              reduction=reduction, from_logits=True, weight=weight, label_smoothing=eps)
        for reduction in REDUCTIONS:
            _check_extras("ohem", logits, target, keep=0.5, thresh=None, min_kept=None, ignore_index=-100,
                          reduction=reduction, weight=w, label_smoothing=0.1)
            _check_extras("ghmc", logits, target, bins=10, momentum=0.0, state=None, use_sigmoid=False,
                          ignore_index=-100, reduction=reduction, weight=w, label_smoothing=0.1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_dropin_label_smoothing_confident_rows(device, gamma):
    """p_t -> 1 with label smoothing: the target column's gradient h_t (1 - p_t) - p_t h_oth keeps
    fp32 accuracy (no p_t - 1 cancellation); weights and per-class alpha on top."""
    logits = torch.tensor([[40.0, 0.0, -5.0], [0.0, 30.0, 1.0], [2.0, 1.0, 0.5], [-3.0, 12.0, 11.5]], device=device)
    target = torch.tensor([0, 1, 2, 1], device=device)
    weight = torch.tensor([1.5, 0.5, 2.0, 1.0], device=device)
    for eps in [1e-6, 1e-3, 0.1, 1.0]:
        for alpha in [None, torch.tensor([0.2, 0.9, 0.6], device=device)]:
            for reduction in REDUCTIONS:
                _check_extras("focal", logits, target, gamma=gamma, alpha=alpha, ignore_index=-100,
                              reduction=reduction, from_logits=True, weight=weight, label_smoothing=eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropin_sigmoid_extras(device, dtype, monkeypatch):
    """Per-row and per-element weights, per-class alpha, integer labels and float targets; GHM-C
    sigmoid with weights over two histogram programs that each loop over several blocks."""
    from fused_losses._triton import launch

    monkeypatch.setattr(launch, "_HIST_PROGRAMS", 2)
    for shape in [(64, 80), (2, 5, 7)]:
        c = shape[-1]
        alpha_c = torch.linspace(0.1, 0.9, c, device=device)
        for kind in ["labels", "float"]:
            logits, target = sigmoid_case(shape, dtype, device, kind=kind, ignore_frac=0.2)
            for weight in [_row_weights(shape[:-1], device), _row_weights(shape, device)]:
                for reduction in REDUCTIONS:
                    for alpha in [alpha_c, 0.25]:
                        _check_extras("sigmoid_focal", logits, target, alpha=alpha, gamma=2.0, ignore_index=-100,
                                      reduction=reduction, weight=weight)
                    state = torch.rand(10, device=device) * 50
                    _check_extras("ghmc", logits, target, bins=10, momentum=0.75, state=state, use_sigmoid=True,
                                  ignore_index=-100, reduction=reduction, weight=weight)


def _nan_rows_case(device):
    """Softmax logits (6, 5, 3) and sigmoid logits (12, 4) with NaN in every entry whose weight is 0."""
    logits, target = softmax_case((6, 5, 3), torch.float32, device, ignore_frac=0.2)
    w = _row_weights(target.shape, device)
    logits = torch.where((w == 0)[:, None], torch.full_like(logits, math.nan), logits)
    slogits, labels = sigmoid_case((12, 4), torch.float32, device, ignore_frac=0.2)
    sw_row = _row_weights((12,), device)
    sw_elem = _row_weights((12, 4), device, seed=4)
    return logits, target, w, slogits, labels, sw_row, sw_elem


@pytest.mark.parametrize("device", DEVICES)
def test_dropin_zero_weight_hides_nan(device):
    """A NaN logit where the weight is 0 gives exactly what a finite logit there gives: loss and
    gradient of those entries 0, nothing else changed (bitwise), for every loss and reduction
    (OHEM: finite and 0 there; its selection, which ignores weights, may rank the NaN rows)."""
    logits, target, w, slogits, labels, sw_row, sw_elem = _nan_rows_case(device)
    softmax_runs = [("focal", dict(gamma=2.0, alpha=None, ignore_index=-100, from_logits=True, label_smoothing=0.1)),
                    ("ohem", dict(keep=0.5, thresh=None, min_kept=None, ignore_index=-100, label_smoothing=0.1)),
                    ("ghmc", dict(bins=10, momentum=0.0, state=None, use_sigmoid=False, ignore_index=-100,
                                  label_smoothing=0.1))]
    sigmoid_runs = [("sigmoid_focal", dict(alpha=0.25, gamma=2.0, ignore_index=-100)),
                    ("ghmc", dict(bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100))]
    cases = [(name, logits, target, w, kw) for name, kw in softmax_runs]
    for sw in (sw_row, sw_elem):
        for name, kw in sigmoid_runs:
            nan_mask = (sw == 0) if sw.dim() == 2 else (sw == 0)[:, None].expand_as(slogits)
            cases.append((name, torch.where(nan_mask, torch.full_like(slogits, math.nan), slogits), labels, sw, kw))
    for name, x, t, weight, kw in cases:
        for reduction in REDUCTIONS:
            out, grad = loss_and_grad(_triton(name), x, t, reduction=reduction, weight=weight, **kw)
            assert torch.isfinite(out).all() and torch.isfinite(grad).all(), f"{name} {reduction}: NaN leaked"
            assert not grad[torch.isnan(x)].any()
            if name == "ohem":
                continue  # OHEM's selection ranks every valid row, weights ignored: the kept set may differ
            clean = torch.nan_to_num(x, nan=0.0)
            out0, grad0 = loss_and_grad(_triton(name), clean, t, reduction=reduction, weight=weight, **kw)
            assert torch.equal(out, out0) and torch.equal(grad, grad0), f"{name} {reduction}"


@pytest.mark.parametrize("device", DEVICES)
def test_dropin_ghmc_bin_count_path(device):
    """The process_group path (ghmc_bin_counts op -> distributed.global_bin_weights -> the op with
    the given weights; here without torch.distributed initialised, so no all-reduce) gives the
    same loss, gradient and EMA state as the single-op path; the counts are the histogram of the
    valid, nonzero-weight entries, then n_valid."""
    slogits, labels = sigmoid_case((12, 4), torch.float32, device, ignore_frac=0.2)
    logits, target = softmax_case((6, 5, 3), torch.float32, device, ignore_frac=0.2)
    group = object()  # stands for a ProcessGroup; only passed on to torch.distributed when initialised
    cases = [(slogits, labels, True, _row_weights((12, 4), device), 0.0),
             (slogits, labels, True, None, 0.0),
             (logits, target, False, _row_weights(target.shape, device), 0.1)]
    for x, t, use_sigmoid, weight, eps in cases:
        extra = dict(label_smoothing=eps) if not use_sigmoid else {}
        counts = torch.ops.fused_losses_triton.ghmc_bin_counts(x, t, 10, use_sigmoid, -100, weight)
        assert counts.dtype == torch.int64 and counts.shape == (11,)
        ref_state = torch.zeros(10, device=device)
        reference.ghmc(x.double(), t, bins=10, momentum=0.0, state=ref_state, use_sigmoid=use_sigmoid,
                       ignore_index=-100, reduction="sum", weight=None if weight is None else weight.double(), **extra)
        assert torch.equal(counts[:10].to(torch.float32), ref_state), (counts, ref_state)  # momentum 0: the counts
        for reduction in REDUCTIONS:
            s1 = torch.rand(10, device=device) * 20
            s2 = s1.clone()
            kw = dict(bins=10, momentum=0.75, use_sigmoid=use_sigmoid, ignore_index=-100, reduction=reduction,
                      weight=weight, **extra)
            out, grad = loss_and_grad(_triton("ghmc"), x, t, state=s1, **kw)
            out_pg, grad_pg = loss_and_grad(_triton("ghmc"), x, t, state=s2, process_group=group, **kw)
            assert_rel_close(out_pg, out, 1e-6, f"ghmc pg loss {reduction}")
            assert_rel_close(grad_pg, grad, 1e-6, f"ghmc pg grad {reduction}")
            assert_rel_close(s2, s1, 1e-6, f"ghmc pg state {reduction}")


@pytest.mark.parametrize("device", DEVICES)
def test_dropin_opcheck(device):
    """Schemas, fake kernels and autograd of the ops with the trailing extras (need_grad is no
    longer the last argument: the autograd setup finds it by position)."""
    ops = torch.ops.fused_losses_triton
    logits, target = softmax_case((5, 3), torch.float32, device, ignore_frac=0.2)
    slogits, labels = sigmoid_case((5, 3), torch.float32, device)
    w = _row_weights((5,), device)
    we = _row_weights((5, 3), device)
    x = logits.clone().requires_grad_(True)
    sx = slogits.clone().requires_grad_(True)
    counts = ops.ghmc_bin_counts(slogits, labels, 10, True, -100, we)
    bin_w = torch.rand(10, device=device)
    samples = [
        (ops.softmax_focal, (x, target, torch.rand(3, device=device), 1.0, 2.0, -100, "none", True, True, w, 0.1)),
        (ops.softmax_focal, (logits, target, None, 1.0, 0.0, -100, "mean", True, True, w, 0.2)),
        (ops.sigmoid_focal, (sx, labels, -1.0, 2.0, -100, "none", True, torch.rand(3, device=device), we)),
        (ops.ohem, (x, target, 0.5, False, None, 0, -100, "none", True, w, 0.1)),
        (ops.ghmc, (x, target, torch.zeros(10, device=device), 10, 0.75, False, -100, "none", True, w, 0.1)),
        (ops.ghmc, (sx, labels, None, 10, 0.0, True, -100, "none", True, we, 0.0, counts, bin_w)),
        (ops.ghmc_bin_counts, (slogits, labels, 10, True, -100, w)),
        (ops.ghmc_bin_counts, (logits, target, 10, False, -100, None)),
    ]
    for op, args in samples:
        opcheck_loss_op(op, args)
    # need_grad=False with trailing extras: no gradient is computed or saved.
    loss, grad = ops.softmax_focal(x, target, None, 1.0, 2.0, -100, "sum", True, False, w, 0.1)
    assert grad.numel() == 0
