"""Every bad input of the README's "Bad input" table raises the documented exception, naming
the argument, before any backend runs (so nothing is written)."""
import pytest
import torch

import fused_losses as fl

X = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 1])
X4 = torch.randn(2, 3, 4, 5)
T4 = torch.randint(0, 3, (2, 4, 5))
LAB = torch.tensor([0, 3, 1, 2])  # sigmoid labels, 3 = background
F_ = torch.rand(4)

CASES = [
    # wrong ranks / mismatched shapes
    ("focal 1-D logits", lambda: fl.focal(torch.randn(3), T[:1]), ValueError, "logits"),
    ("focal target shape", lambda: fl.focal(X, T[:3]), ValueError, "target"),
    ("focal spatial target shape", lambda: fl.focal(X4, T4[:, :3]), ValueError, "target"),
    ("ohem target shape", lambda: fl.ohem(X, T[None]), ValueError, "target"),
    ("sigmoid float target shape", lambda: fl.sigmoid_focal(X, torch.rand(4, 2)), ValueError, "target"),
    ("sigmoid label shape", lambda: fl.sigmoid_focal(X, LAB[:2]), ValueError, "target"),
    ("ghmc label shape", lambda: fl.ghmc(X, LAB[None]), ValueError, "target"),
    ("ib 4-D logits", lambda: fl.ib(X4, T4, F_), ValueError, "logits"),
    ("focal channel-last logits", lambda: fl.focal(X4.movedim(1, -1), T4), ValueError,
     r"logits: .*channel-last.*movedim\(-1, 1\)"),
    ("ohem channel-last logits", lambda: fl.ohem(X4.movedim(1, -1), T4), ValueError, "logits: .*channel-last"),
    ("ghmc softmax channel-last logits", lambda: fl.ghmc(X4.movedim(1, -1), T4, use_sigmoid=False), ValueError,
     "logits: .*channel-last"),
    ("ib features rows", lambda: fl.ib(X, T, torch.rand(3)), ValueError, "features"),
    ("ib features 3-D", lambda: fl.ib(X, T, torch.rand(4, 2, 2)), ValueError, "features"),
    # dtypes
    ("focal float target", lambda: fl.focal(X, T.float()), TypeError, "target"),
    ("ohem float target", lambda: fl.ohem(X, T.float()), TypeError, r"target: .*target\.long\(\)"),
    ("focal one-hot target", lambda: fl.focal(X, torch.eye(3)[T]), TypeError, r"target: .*target\.argmax\(1\)"),
    ("focal spatial one-hot target", lambda: fl.focal(X4, torch.eye(3)[T4].movedim(-1, 1)), TypeError,
     r"target: .*target\.argmax\(1\)"),
    ("ghmc softmax float target", lambda: fl.ghmc(X, T.float(), use_sigmoid=False), TypeError, "target"),
    ("ib float target", lambda: fl.ib(X, T.float(), F_), TypeError, "target"),
    ("focal uint8 target", lambda: fl.focal(X, T.to(torch.uint8)), TypeError, "target"),
    ("focal int logits", lambda: fl.focal(T[:, None].expand(4, 3).contiguous(), T), TypeError, "logits"),
    ("sigmoid int logits", lambda: fl.sigmoid_focal(torch.ones(4, 3, dtype=torch.int32), LAB), TypeError, "logits"),
    ("ib int features", lambda: fl.ib(X, T, torch.ones(4, dtype=torch.long)), TypeError, "features"),
    ("focal logits not a tensor", lambda: fl.focal([[0.0, 1.0]], T[:1]), TypeError, "logits"),
    # devices (meta stands in for another device on a CPU-only machine)
    ("focal target device", lambda: fl.focal(X, T.to("meta")), ValueError, "target"),
    ("sigmoid target device", lambda: fl.sigmoid_focal(X, torch.rand(4, 3, device="meta")), ValueError, "target"),
    ("ib features device", lambda: fl.ib(X, T, F_.to("meta")), ValueError, "features"),
    ("ghmc state device", lambda: fl.ghmc(X, LAB, momentum=0.5, state=torch.zeros(10, device="meta")), ValueError,
     "state"),
    # alpha / weight length
    ("focal alpha length", lambda: fl.focal(X, T, alpha=[1.0, 2.0]), ValueError, "alpha"),
    ("focal alpha 2-D", lambda: fl.focal(X, T, alpha=torch.ones(3, 1)), ValueError, "alpha"),
    ("focal alpha string", lambda: fl.focal(X, T, alpha="balanced"), TypeError, "alpha"),
    ("ib weight length", lambda: fl.ib(X, T, F_, weight=[1.0] * 4), ValueError, "weight"),
    ("sigmoid alpha list length", lambda: fl.sigmoid_focal(X, LAB, alpha=[0.25] * 4), ValueError, "alpha"),
    ("sigmoid alpha string", lambda: fl.sigmoid_focal(X, LAB, alpha="balanced"), TypeError, "alpha"),
    ("sigmoid alpha out of [0, 1]", lambda: fl.sigmoid_focal(X, LAB, alpha=[0.25, 2.0, 0.5]), ValueError, "alpha"),
    # drop-in extras (more in tests/test_dropin.py)
    ("focal weight shape", lambda: fl.focal(X, T, weight=torch.ones(3)), ValueError, "weight"),
    ("sigmoid weight shape", lambda: fl.sigmoid_focal(X, LAB, weight=torch.ones(4, 2)), ValueError, "weight"),
    ("focal weight NaN", lambda: fl.focal(X, T, weight=torch.tensor([1.0, float("nan"), 1, 1])), ValueError, "weight"),
    ("focal weight not a tensor", lambda: fl.focal(X, T, weight=[1.0] * 4), TypeError, "weight"),
    ("focal weight on another device", lambda: fl.focal(X, T, weight=torch.ones(4, device="meta")), ValueError,
     "weight"),
    ("focal avg_factor with sum", lambda: fl.focal(X, T, reduction="sum", avg_factor=2), ValueError, "avg_factor"),
    ("focal avg_factor shape", lambda: fl.focal(X, T, avg_factor=torch.ones(2)), ValueError, "avg_factor"),
    ("focal avg_factor zero", lambda: fl.focal(X, T, avg_factor=0), ValueError, "avg_factor"),
    ("focal label_smoothing > 1", lambda: fl.focal(X, T, label_smoothing=1.5), ValueError, "label_smoothing"),
    ("focal label_smoothing with probabilities", lambda: fl.focal(X.softmax(1), T, label_smoothing=0.1,
                                                                  from_logits=False), ValueError, "label_smoothing"),
    ("ghmc sigmoid label_smoothing", lambda: fl.ghmc(X, LAB, label_smoothing=0.1), ValueError, "label_smoothing"),
    # gamma
    ("focal negative gamma", lambda: fl.focal(X, T, gamma=-0.5), ValueError, "gamma"),
    ("sigmoid negative gamma", lambda: fl.sigmoid_focal(X, LAB, gamma=-1.0), ValueError, "gamma"),
    ("ib negative gamma", lambda: fl.ib(X, T, F_, gamma=-1.0), ValueError, "gamma"),
    ("focal nan gamma", lambda: fl.focal(X, T, gamma=float("nan")), ValueError, "gamma"),
    # reduction / backend
    ("focal reduction", lambda: fl.focal(X, T, reduction="avg"), ValueError, "reduction"),
    ("sigmoid reduction", lambda: fl.sigmoid_focal(X, LAB, reduction="batchmean"), ValueError, "reduction"),
    ("ghmc reduction", lambda: fl.ghmc(X, LAB, reduction=None), ValueError, "reduction"),
    ("ib reduction", lambda: fl.ib(X, T, F_, reduction="max"), ValueError, "reduction"),
    ("unknown backend", lambda: fl.focal(X, T, backend="cudnn"), ValueError, "backend"),
    # keep / bins / momentum
    ("ohem keep 0", lambda: fl.ohem(X, T, keep=0), ValueError, "keep"),
    ("ohem keep negative", lambda: fl.ohem(X, T, keep=-3), ValueError, "keep"),
    ("ohem keep 0.0", lambda: fl.ohem(X, T, keep=0.0), ValueError, "keep"),
    ("ohem float keep > 1", lambda: fl.ohem(X, T, keep=1.5), ValueError, "keep"),
    ("ohem keep bool", lambda: fl.ohem(X, T, keep=True), TypeError, "keep"),
    ("ohem min_kept negative", lambda: fl.ohem(X, T, thresh=0.7, min_kept=-1), ValueError, "min_kept"),
    ("ghmc bins 0", lambda: fl.ghmc(X, LAB, bins=0), ValueError, "bins"),
    ("ghmc momentum 1", lambda: fl.ghmc(X, LAB, momentum=1.0, state=torch.zeros(10)), ValueError, "momentum"),
    ("ghmc momentum negative", lambda: fl.ghmc(X, LAB, momentum=-0.1), ValueError, "momentum"),
    ("ghmc momentum without state", lambda: fl.ghmc(X, LAB, momentum=0.75), ValueError, "state"),
    ("ghmc state shape", lambda: fl.ghmc(X, LAB, momentum=0.5, state=torch.zeros(5)), ValueError, "state"),
    ("ghmc state dtype", lambda: fl.ghmc(X, LAB, momentum=0.5, state=torch.zeros(10, dtype=torch.float64)),
     ValueError, "state"),
    ("GHMCLoss bins 0", lambda: fl.nn.GHMCLoss(bins=0), ValueError, "bins"),
    ("GHMCLoss momentum 1", lambda: fl.nn.GHMCLoss(momentum=1.0), ValueError, "momentum"),
    # empty class dim
    ("focal C=0", lambda: fl.focal(torch.randn(4, 0), T), ValueError, "logits"),
    ("sigmoid C=0", lambda: fl.sigmoid_focal(torch.randn(4, 0), LAB), ValueError, "logits"),
    ("ib C=0", lambda: fl.ib(torch.randn(4, 0), T, F_), ValueError, "logits"),
    # out-of-range targets (CPU: ValueError naming the value)
    ("focal target 3 of C=3", lambda: fl.focal(X, torch.tensor([0, 1, 3, 1])), ValueError, "target: value 3"),
    ("focal target -1", lambda: fl.focal(X, torch.tensor([0, -1, 2, 1])), ValueError, "target: value -1"),
    ("ohem target 9", lambda: fl.ohem(X4, torch.full((2, 4, 5), 9)), ValueError, "target: value 9"),
    ("sigmoid label C+1", lambda: fl.sigmoid_focal(X, torch.tensor([0, 4, 1, 2])), ValueError, "target: value 4"),
    ("ib target -100 (no ignore_index)", lambda: fl.ib(X, torch.tensor([0, -100, 1, 2]), F_), ValueError,
     "target: value -100"),
    # class weights
    ("class_weights zero count", lambda: fl.class_weights([10, 0, 5]), ValueError, "counts"),
    ("class_weights negative count", lambda: fl.class_weights(torch.tensor([10, -2])), ValueError, "counts"),
    ("class_weights empty", lambda: fl.class_weights([]), ValueError, "counts"),
    ("class_weights scheme", lambda: fl.class_weights([1, 2], scheme="sqrt"), ValueError, "scheme"),
    ("class_weights beta 1", lambda: fl.class_weights([1, 2], scheme="effective", beta=1.0), ValueError, "beta"),
    ("class_weights inf count", lambda: fl.class_weights([10.0, float("inf"), 5.0]), ValueError, "counts"),
    ("class_weights nan count", lambda: fl.class_weights(torch.tensor([10.0, float("nan")])), ValueError, "counts"),
    # ints that reach an int64 slot of an op schema (issue 13, class 9)
    ("focal ignore_index 2**63", lambda: fl.focal(X, T, ignore_index=2 ** 63), ValueError, "ignore_index"),
    ("focal ignore_index -2**63-1", lambda: fl.focal(X, T, ignore_index=-2 ** 63 - 1), ValueError, "ignore_index"),
    ("sigmoid ignore_index 2**64", lambda: fl.sigmoid_focal(X, LAB, ignore_index=2 ** 64), ValueError, "ignore_index"),
    ("ohem ignore_index 2**63", lambda: fl.ohem(X4, T4, ignore_index=2 ** 63), ValueError, "ignore_index"),
    ("ghmc ignore_index 2**63", lambda: fl.ghmc(X, LAB, ignore_index=2 ** 63), ValueError, "ignore_index"),
    ("ohem int keep 2**63", lambda: fl.ohem(X, T, keep=2 ** 63), ValueError, "keep"),
    ("ohem min_kept 2**63", lambda: fl.ohem(X, T, thresh=0.7, min_kept=2 ** 63), ValueError, "min_kept"),
    ("ohem min_kept x N overflows", lambda: fl.ohem(X4, T4, thresh=0.7, min_kept=2 ** 62), ValueError, "min_kept"),
    ("ghmc bins 2**63", lambda: fl.ghmc(X, LAB, bins=2 ** 63), ValueError, "bins"),
    # floats that are inf where inf is meaningless
    ("focal inf gamma", lambda: fl.focal(X, T, gamma=float("inf")), ValueError, "gamma"),
    ("focal inf alpha", lambda: fl.focal(X, T, alpha=float("inf")), ValueError, "alpha"),
    ("focal nan alpha", lambda: fl.focal(X, T, alpha=float("nan")), ValueError, "alpha"),
    ("sigmoid inf gamma", lambda: fl.sigmoid_focal(X, LAB, gamma=float("inf")), ValueError, "gamma"),
    ("sigmoid -inf alpha", lambda: fl.sigmoid_focal(X, LAB, alpha=-float("inf")), ValueError, "alpha"),
    ("ohem inf thresh", lambda: fl.ohem(X, T, thresh=float("inf")), ValueError, "thresh"),
    ("ohem nan keep", lambda: fl.ohem(X, T, keep=float("nan")), ValueError, "keep"),
    ("ib inf alpha", lambda: fl.ib(X, T, F_, alpha=float("inf")), ValueError, "alpha"),
    ("ib inf epsilon", lambda: fl.ib(X, T, F_, epsilon=float("inf")), ValueError, "epsilon"),
    ("ib nan gamma", lambda: fl.ib(X, T, F_, gamma=float("nan")), ValueError, "gamma"),
    ("focal per-class alpha inf", lambda: fl.focal(X, T, alpha=[1.0, float("inf"), 1.0]), ValueError, "alpha"),
    ("ib per-class weight nan", lambda: fl.ib(X, T, F_, weight=torch.tensor([1.0, float("nan"), 1.0])), ValueError,
     "weight"),
    ("FocalLoss per-class alpha nan", lambda: fl.nn.FocalLoss(alpha=[float("nan"), 1.0, 1.0])(X, T), ValueError,
     "alpha"),
    # a float target that requires grad, on a backend asked for explicitly that cannot differentiate it
    ("sigmoid target requires grad, backend cpu",
     lambda: fl.sigmoid_focal(X, torch.rand(4, 3, requires_grad=True), backend="cpu"), RuntimeError,
     "backend 'cpu' cannot run sigmoid_focal with a target that requires grad"),
    ("ghmc target requires grad, backend triton",
     lambda: fl.ghmc(X, torch.rand(4, 3, requires_grad=True), backend="triton"), RuntimeError,
     "backend 'triton' cannot run ghmc with a target that requires grad"),
    # a GHM state that requires grad (updated in place: autograd would be bypassed)
    ("ghmc state requires grad", lambda: fl.ghmc(X, LAB, momentum=0.5, state=torch.zeros(10, requires_grad=True)),
     ValueError, "state"),
]


@pytest.mark.parametrize("name,call,exc,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(name, call, exc, names):
    with pytest.raises(exc, match=f"^{names}"):
        call()


def test_ignore_index_is_checked_before_the_range():
    assert torch.isfinite(fl.focal(X, torch.tensor([0, 255, 2, 1]), ignore_index=255))
    assert torch.isfinite(fl.sigmoid_focal(X, torch.tensor([0, 255, 3, 1]), ignore_index=255).sum())


def test_validate_false_skips_the_range_scan():
    # validate=False is the CUDA default; on CPU the reference then fails inside torch instead.
    with pytest.raises(RuntimeError):
        fl.focal(X, torch.tensor([0, 1, 7, 1]), validate=False)


def test_failed_call_writes_nothing():
    state = torch.full((10,), 3.0)
    with pytest.raises(ValueError):
        fl.ghmc(X, torch.tensor([0, 9, 1, 2]), momentum=0.5, state=state)
    assert torch.all(state == 3.0)
    for backend in ("reference", "cpu"):
        state = torch.full((10,), 3.0, requires_grad=True)
        with pytest.raises(ValueError, match="^state: must not require grad"):
            fl.ghmc(X, LAB, momentum=0.5, state=state, backend=backend)
        assert torch.all(state == 3.0) and state.grad is None and state._version == 0
        with pytest.raises(ValueError, match="^ignore_index"):
            fl.ghmc(X, LAB, momentum=0.5, state=state.detach(), ignore_index=2 ** 63, backend=backend)
        assert torch.all(state == 3.0)


def test_int64_extremes_that_fit_still_work():
    # ignore_index at the int64 bounds is a valid value (it just matches no target).
    for ii in (2 ** 63 - 1, -(2 ** 63)):
        ref = fl.focal(X.double(), T, ignore_index=ii, backend="reference")
        assert torch.allclose(fl.focal(X, T, ignore_index=ii), ref.float(), rtol=1e-5)
    # min_kept x N just inside int64: the kernels clamp it to the number of valid samples.
    big = (2 ** 63 - 1) // 2
    ref = fl.ohem(X4.double(), T4, thresh=0.7, min_kept=big, backend="reference")
    assert torch.allclose(fl.ohem(X4, T4, thresh=0.7, min_kept=big), ref.float(), rtol=1e-5)


def test_unavailable_backend_requested_explicitly_is_a_clear_error(monkeypatch):
    from fused_losses import _backends

    unavailable = _backends.Backend("cuda", lambda: (False, "no CUDA device is visible"), ("cuda",))
    monkeypatch.setitem(_backends._loaded, "cuda", unavailable)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: no CUDA device"):
        fl.focal(X, T, backend="cuda")
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        fl.focal(X, T)
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", "fast")
    with pytest.raises(ValueError, match="^FUSED_LOSSES_BACKEND: unknown backend 'fast'"):
        fl.focal(X, T)
