"""Every bad input of API.md raises the documented exception, naming the argument, before any
backend runs (so nothing is written)."""
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
    ("ib features rows", lambda: fl.ib(X, T, torch.rand(3)), ValueError, "features"),
    ("ib features 3-D", lambda: fl.ib(X, T, torch.rand(4, 2, 2)), ValueError, "features"),
    # dtypes
    ("focal float target", lambda: fl.focal(X, T.float()), TypeError, "target"),
    ("ohem float target", lambda: fl.ohem(X, T.float()), TypeError, "target"),
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
    ("sigmoid alpha list", lambda: fl.sigmoid_focal(X, LAB, alpha=[0.25] * 3), TypeError, "alpha"),
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
