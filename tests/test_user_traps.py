"""The traps a user hit (issue 14, section 4, and a silent wrong target gradient): each wrong call
gets an error that names the fix, and each fix gives the reference's numbers.

- channel-last softmax logits: ValueError naming the logits, suggesting logits.movedim(-1, 1);
- a one-hot/float target for the softmax family: TypeError suggesting target.argmax(1);
- ghmc's default use_sigmoid=True with classifier labels (no background label C): UserWarning,
  checked where target ranges are (CPU, validate=None, not while torch.compile traces);
- repr() of the nn modules shows every constructor argument, alpha/weight included;
- a float target that requires grad (sigmoid_focal, sigmoid ghmc): the automatic choice runs
  'reference' (the compiled kernels compute no target gradient), an explicit compiled backend
  raises.
"""
import warnings

import pytest
import torch
import torch.nn.functional as TF
from torchvision.ops import sigmoid_focal_loss as tv_sigmoid_focal_loss

import fused_losses as fl
from fused_losses import _backends
from tests.utils import TOL, assert_rel_close

SOFTMAX = {
    "focal": lambda x, t, **kw: fl.focal(x, t, **kw),
    "ohem": lambda x, t, **kw: fl.ohem(x, t, keep=0.5, **kw),
    "ghmc_softmax": lambda x, t, **kw: fl.ghmc(x, t, use_sigmoid=False, **kw),
}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Channel-last logits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", SOFTMAX)
@pytest.mark.parametrize("spatial", [(7,), (4, 5), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_channel_last_logits_are_named_with_the_fix(loss, spatial):
    g = _gen(0)
    n, c = 2, 3
    x_last = torch.randn(n, *spatial, c, generator=g)
    t = torch.randint(0, c, (n, *spatial), generator=g)
    with pytest.raises(ValueError, match=r"^logits: .*looks channel-last.*logits\.movedim\(-1, 1\)"):
        SOFTMAX[loss](x_last, t)
    # the suggested fix gives the float64 reference's numbers
    x = x_last.movedim(-1, 1)
    out = SOFTMAX[loss](x, t, reduction="none")
    ref = SOFTMAX[loss](x.double(), t, reduction="none", backend="reference")
    assert_rel_close(out, ref, TOL[torch.float32], loss)


def test_a_plain_target_shape_mismatch_still_blames_the_target():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="^target: expected shape"):
        fl.focal(x, torch.zeros(2, 4, 6, dtype=torch.long))
    # (N, L, C) logits whose L equals C are ambiguous and valid as channel-second: no error
    x = torch.randn(2, 3, 3)
    t = torch.randint(0, 3, (2, 3))
    ref = fl.focal(x.double(), t, backend="reference")
    assert_rel_close(fl.focal(x, t), ref, TOL[torch.float32], "square (N, C, L)")


# --------------------------------------------------------------------------------------------
# One-hot / float targets for the softmax family
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", SOFTMAX)
@pytest.mark.parametrize("spatial", [(), (4, 5)], ids=["rows", "2d"])
def test_one_hot_target_suggests_argmax(loss, spatial):
    g = _gen(1)
    n, c = 6, 4
    x = torch.randn(n, c, *spatial, generator=g)
    labels = torch.randint(0, c, (n, *spatial), generator=g)
    one_hot = TF.one_hot(labels, c).movedim(-1, 1).float()
    assert one_hot.shape == x.shape
    with pytest.raises(TypeError, match=r"^target: .*one-hot.*target\.argmax\(1\)"):
        SOFTMAX[loss](x, one_hot)
    with pytest.raises(TypeError, match=r"^target: .*target\.long\(\)"):
        SOFTMAX[loss](x, labels.float())
    fixed = one_hot.argmax(1)
    assert torch.equal(fixed, labels)
    out = SOFTMAX[loss](x, fixed, reduction="none")
    ref = SOFTMAX[loss](x.double(), labels, reduction="none", backend="reference")
    assert_rel_close(out, ref, TOL[torch.float32], loss)


def test_focal_with_argmax_target_is_cross_entropy_of_the_one_hot():
    g = _gen(2)
    x = torch.randn(8, 5, dtype=torch.float64, generator=g)
    one_hot = TF.one_hot(torch.randint(0, 5, (8,), generator=g), 5).double()
    out = fl.focal(x, one_hot.argmax(1), gamma=0.0)
    assert_rel_close(out, TF.cross_entropy(x, one_hot), 1e-12, "gamma=0 vs F.cross_entropy(probabilities)")


# --------------------------------------------------------------------------------------------
# ghmc: use_sigmoid=True with labels that never hold the background label C
# --------------------------------------------------------------------------------------------
X = torch.randn(6, 4, generator=_gen(3))
CLASSIFIER_LABELS = torch.tensor([0, 1, 2, 3, 1, 0])
DETECTION_LABELS = torch.tensor([0, 4, 2, 4, 1, 4])


def _ghmc_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if "use_sigmoid" in str(w.message)]


def test_ghmc_warns_for_classifier_labels_at_the_callers_line():
    caught = _ghmc_warnings(lambda: fl.ghmc(X, CLASSIFIER_LABELS))
    assert len(caught) == 1 and caught[0].category is UserWarning
    assert "use_sigmoid=False" in str(caught[0].message) and "C = 4" in str(caught[0].message)
    assert caught[0].filename == __file__
    module = fl.nn.GHMCLoss()
    caught = _ghmc_warnings(lambda: module(X, CLASSIFIER_LABELS))
    assert len(caught) == 1 and caught[0].filename == __file__


def test_ghmc_warning_is_shown_once_per_call_site_by_default():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for _ in range(3):
            fl.ghmc(X, CLASSIFIER_LABELS)
    assert len([w for w in caught if "use_sigmoid" in str(w.message)]) == 1


@pytest.mark.parametrize("case", ["background present", "all ignored", "softmax", "float target", "validate=False"])
def test_ghmc_does_not_warn(case):
    calls = {
        "background present": lambda: fl.ghmc(X, DETECTION_LABELS),
        "all ignored": lambda: fl.ghmc(X, torch.full((6,), -100)),
        "softmax": lambda: fl.ghmc(X, CLASSIFIER_LABELS, use_sigmoid=False),
        "float target": lambda: fl.ghmc(X, TF.one_hot(CLASSIFIER_LABELS, 4).float()),
        "validate=False": lambda: fl.ghmc(X, CLASSIFIER_LABELS, validate=False),
    }
    assert _ghmc_warnings(calls[case]) == []


def test_ghmc_warning_ignores_ignored_rows():
    labels = torch.tensor([0, 255, 2, 255, 1, 3])
    assert len(_ghmc_warnings(lambda: fl.ghmc(X, labels, ignore_index=255))) == 1
    labels = torch.tensor([0, 255, 2, 4, 1, 3])
    assert _ghmc_warnings(lambda: fl.ghmc(X, labels, ignore_index=255)) == []


def test_ghmc_warning_never_reads_device_values(monkeypatch):
    # Tensors whose values cannot be read on the host (meta: any read raises) stand in for CUDA
    # ones: with validate=None the check must not run there (it would cost a host sync).
    # (the validator itself: the reference ghmc's own boolean indexing has no meta kernel)
    from fused_losses import _validate
    meta_labels = CLASSIFIER_LABELS.to("meta")
    with pytest.raises(NotImplementedError):  # what reading the values would do
        bool((meta_labels[meta_labels != -100] == 4).any())
    assert _ghmc_warnings(lambda: _validate.ghmc_args(
        X.to("meta"), meta_labels, bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100,
        reduction="mean", validate=None)) == []
    # ... nor while torch.compile traces (reading values would break the graph)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert _ghmc_warnings(lambda: fl.ghmc(X, CLASSIFIER_LABELS, backend="reference")) == []


def test_ghmc_warning_does_not_change_the_result():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fl.ghmc(X, CLASSIFIER_LABELS, reduction="none")
        ref = fl.ghmc(X.double(), CLASSIFIER_LABELS, reduction="none", backend="reference")
    assert_rel_close(out, ref, TOL[torch.float32], "ghmc")


# --------------------------------------------------------------------------------------------
# repr of the nn modules
# --------------------------------------------------------------------------------------------
MODULES = [
    (fl.nn.FocalLoss, dict(gamma=1.5, alpha=[0.25, 0.5, 0.75], ignore_index=255, reduction="sum",
                           from_logits=False, backend="reference"),
     "alpha=[0.25, 0.5, 0.75]"),
    (fl.nn.FocalLoss, dict(alpha=0.3), "alpha=0.3"),
    (fl.nn.SigmoidFocalLoss, dict(alpha=-1.0, gamma=0.5, ignore_index=7, reduction="mean", backend="cpu"),
     "alpha=-1.0"),
    (fl.nn.OHEMLoss, dict(keep=64, thresh=0.7, min_kept=16, ignore_index=255, reduction="none",
                          backend="reference"), "keep=64"),
    (fl.nn.GHMCLoss, dict(bins=30, momentum=0.5, use_sigmoid=False, ignore_index=255, reduction="sum",
                          backend="cpu"), "bins=30"),
    (fl.nn.IBLoss, dict(alpha=500.0, epsilon=0.01, weight=[1.0, 2.0, 0.5], detach_factor=True, reduction="sum",
                        backend="reference", gamma=0.5), "weight=[1.0, 2.0, 0.5]"),
    (fl.nn.IBFocalLoss, dict(alpha=10.0, gamma=2.0), "gamma=2.0"),
    (fl.nn.FocalLoss, dict(alpha=[1.0, 2.0], label_smoothing=0.1), "label_smoothing=0.1"),
    (fl.nn.SigmoidFocalLoss, dict(alpha=[0.25, 0.5, 0.75]), "alpha=[0.25, 0.5, 0.75]"),
    (fl.nn.OHEMLoss, dict(keep=0.5, label_smoothing=0.2), "label_smoothing=0.2"),
    (fl.nn.GHMCLoss, dict(use_sigmoid=False, label_smoothing=0.05), "label_smoothing=0.05"),
]


@pytest.mark.parametrize("cls,kwargs,shown", MODULES, ids=[f"{m[0].__name__}-{i}" for i, m in enumerate(MODULES)])
def test_repr_shows_every_argument(cls, kwargs, shown):
    module = cls(**kwargs)
    text = repr(module)
    assert text.startswith(cls.__name__ + "(")
    assert shown in text
    for name, value in kwargs.items():
        if isinstance(value, list):
            value = "[" + ", ".join(repr(float(v)) for v in value) + "]"
        else:
            value = repr(value)
        assert f"{name}={value}" in text, (name, text)
    # every constructor argument is shown, given or default
    import inspect
    for name in inspect.signature(cls.__init__).parameters:
        if name != "self":
            assert f"{name}=" in text, (name, text)


def test_repr_of_a_cast_model_and_a_long_alpha():
    module = torch.nn.Sequential(fl.nn.FocalLoss(alpha=[0.1, 0.2, 0.3])).half()
    assert "alpha=[0.1, 0.2, 0.3]" in repr(module)
    long_alpha = fl.nn.FocalLoss(alpha=torch.arange(20.0))
    assert "alpha=[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, ... (20 values)]" in repr(long_alpha)
    assert "<3 values on meta>" in repr(fl.nn.FocalLoss(alpha=[1.0, 2.0, 3.0]).to("meta"))


# --------------------------------------------------------------------------------------------
# Float targets that require grad: only 'reference' differentiates them
# --------------------------------------------------------------------------------------------
def _chosen_backends(monkeypatch):
    chosen = []
    select = _backends.select

    def spy(loss, logits, requested):
        backend = select(loss, logits, requested)
        chosen.append(backend.name)
        return backend

    monkeypatch.setattr(_backends, "select", spy)
    return chosen


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0), (0.6, 0.5)])
def test_sigmoid_focal_target_gradient(monkeypatch, reduction, alpha, gamma):
    g = _gen(4)
    x0 = torch.randn(5, 7, 3, generator=g)
    t0 = torch.rand(5, 7, 3, generator=g)
    upstream = torch.randn(x0.shape if reduction == "none" else (), generator=g)
    chosen = _chosen_backends(monkeypatch)

    def grads(fn, x0, t0):
        x = x0.clone().requires_grad_()
        t = t0.clone().requires_grad_()
        out = fn(x, t)
        assert out.requires_grad
        out.backward(upstream.to(out.dtype))
        assert t.grad is not None
        return out.detach(), x.grad, t.grad

    out, gx, gt = grads(lambda x, t: fl.sigmoid_focal(x, t, alpha=alpha, gamma=gamma, reduction=reduction), x0, t0)
    assert chosen == ["reference"]
    ref = grads(lambda x, t: fl.sigmoid_focal(x, t, alpha=alpha, gamma=gamma, reduction=reduction,
                                              backend="reference"), x0.double(), t0.double())
    tv = grads(lambda x, t: tv_sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma, reduction=reduction),
               x0.double(), t0.double())
    for got, want, peer, what in zip((out, gx, gt), ref, tv, ("loss", "logits grad", "target grad")):
        assert_rel_close(got, want, TOL[torch.float32], what)
        assert_rel_close(want, peer, TOL[torch.float64], f"reference vs torchvision, {what}")


def test_ghmc_float_target_gradient(monkeypatch):
    g = _gen(5)
    bins = 5
    x0 = torch.randn(40, 3, generator=g)
    t0 = torch.rand(40, 3, generator=g)
    chosen = _chosen_backends(monkeypatch)
    x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
    fl.ghmc(x, t, bins=bins).backward()
    assert chosen == ["reference"] and t.grad is not None
    # mmdet's GHMC written out in float64 (bins from g in float32, as the README says)
    x64, t64 = x0.double().requires_grad_(), t0.double().requires_grad_()
    gnorm = (torch.sigmoid(x0) - t0).abs()
    idx = torch.clamp_max(torch.floor(gnorm * bins), bins - 1).long()
    counts = torch.bincount(idx.flatten(), minlength=bins).double()
    weights = (x0.numel() / counts[idx]) / int((counts > 0).sum())
    peer = TF.binary_cross_entropy_with_logits(x64, t64, weight=weights, reduction="sum") / x0.numel()
    peer.backward()
    assert_rel_close(x.grad, x64.grad, TOL[torch.float32], "logits grad")
    assert_rel_close(t.grad, t64.grad, TOL[torch.float32], "target grad")


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("loss", ["sigmoid_focal", "ghmc"])
def test_explicit_compiled_backend_with_a_target_requiring_grad_raises(monkeypatch, backend, loss):
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.rand(4, 3, requires_grad=True)
    call = getattr(fl, loss)
    with pytest.raises(RuntimeError, match=rf"^backend '{backend}' cannot run {loss} with a target that requires grad"):
        call(x, t, backend=backend)
    monkeypatch.setenv("FUSED_LOSSES_BACKEND", backend)
    with pytest.raises(RuntimeError, match=rf"^backend '{backend}' .*target\.detach\(\)"):
        call(x, t)


def test_compiled_backend_still_runs_when_no_target_gradient_is_needed(monkeypatch):
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.rand(4, 3, requires_grad=True)
    ref = fl.sigmoid_focal(x.detach().double(), t.detach().double(), backend="reference")
    assert_rel_close(fl.sigmoid_focal(x, t.detach(), backend="cpu"), ref, TOL[torch.float32], "detached target")
    with torch.no_grad():
        assert_rel_close(fl.sigmoid_focal(x, t, backend="cpu"), ref, TOL[torch.float32], "no_grad")
    automatic = [_backends.select(loss, x, None).name for loss in ("sigmoid_focal", "sigmoid_focal", "ghmc")]
    chosen = _chosen_backends(monkeypatch)
    fl.sigmoid_focal(x, t.detach())
    fl.sigmoid_focal(x, (t > 0.5).long().argmax(-1))
    fl.ghmc(x, t.detach())
    assert chosen == automatic


def _tv_sum(x):
    return lambda t: tv_sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction="sum")


def test_forward_mode_target_tangent_runs_on_reference(monkeypatch):
    import torch.autograd.forward_ad as fwAD

    g = _gen(6)
    x, t, v = (torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g), torch.randn(5, 4, generator=g))
    x64, t64, v64 = x.double(), t.double(), v.double()
    _, want = torch.func.jvp(_tv_sum(x64), (t64,), (v64,))
    chosen = _chosen_backends(monkeypatch)
    _, got = torch.func.jvp(lambda t: fl.sigmoid_focal(x, t, reduction="sum"), (t,), (v,))
    assert_rel_close(got, want, TOL[torch.float32], "torch.func.jvp over the target")
    with fwAD.dual_level():
        out = fl.sigmoid_focal(x, fwAD.make_dual(t, v), reduction="sum")
        assert_rel_close(fwAD.unpack_dual(out).tangent, want, TOL[torch.float32], "forward_ad dual target")
        with pytest.raises(RuntimeError, match="^backend 'cpu' cannot run sigmoid_focal with a target"):
            fl.sigmoid_focal(x, fwAD.make_dual(t, v), backend="cpu")
    assert chosen == ["reference", "reference"]
    # vmap inside jvp: the tangent cannot be read under vmap, so the call counts as dual
    _, want = torch.func.jvp(lambda t: torch.func.vmap(_tv_sum(x64[0]))(t), (t64,), (v64,))
    _, got = torch.func.jvp(lambda t: torch.func.vmap(lambda r: fl.sigmoid_focal(x[0], r, reduction="sum"))(t),
                            (t,), (v,))
    assert_rel_close(got, want, TOL[torch.float32], "jvp(vmap) over the target")


def test_torch_func_grad_over_the_target():
    g = _gen(7)
    x, t = torch.randn(5, 4, generator=g), torch.rand(5, 4, generator=g)
    want = torch.func.grad(_tv_sum(x.double()))(t.double())
    got = torch.func.grad(lambda t: fl.sigmoid_focal(x, t, reduction="sum"))(t)
    assert_rel_close(got, want, TOL[torch.float32], "torch.func.grad over the target")


def test_torchvision_adapter_differentiates_the_target():
    from fused_losses.compat import sigmoid_focal_loss

    g = _gen(8)
    x0, t0 = torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g)
    x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
    sigmoid_focal_loss(x, t, 0.25, 2, "mean").backward()
    x64, t64 = x0.double().requires_grad_(), t0.double().requires_grad_()
    tv_sigmoid_focal_loss(x64, t64, 0.25, 2, "mean").backward()
    assert_rel_close(x.grad, x64.grad, TOL[torch.float32], "logits grad")
    assert_rel_close(t.grad, t64.grad, TOL[torch.float32], "target grad")


@pytest.mark.compile
def test_compiled_call_with_a_target_requiring_grad_differentiates_it():
    # torch.compile (no fullgraph): the routing is traced (requires_grad and grad mode are guarded)
    # and the reference runs behind a graph break; a detached target stays on the compiled kernels.
    g = _gen(9)
    x0, t0 = torch.randn(6, 5, generator=g), torch.rand(6, 5, generator=g)
    fn = torch.compile(lambda x, t: fl.sigmoid_focal(x, t, reduction="sum"))
    x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_()
    fn(x, t).backward()
    x64, t64 = x0.double().requires_grad_(), t0.double().requires_grad_()
    tv_sigmoid_focal_loss(x64, t64, reduction="sum").backward()
    assert_rel_close(x.grad, x64.grad, TOL[torch.float32], "logits grad")
    assert_rel_close(t.grad, t64.grad, TOL[torch.float32], "target grad")
    x.grad = None
    fn(x, t0).backward()
    assert_rel_close(x.grad, x64.grad, TOL[torch.float32], "logits grad, detached target")


# --------------------------------------------------------------------------------------------
# Issue 26: binary labels with C == 1, shape messages that name the fix, compat's tensor alpha,
# a strided GHM-C state, patch_torchvision for FCOS, the CPU SIMD variant in backends()
# --------------------------------------------------------------------------------------------
def _single_class_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = call()
    return out, [w for w in caught if "integer labels with C = 1" in str(w.message)]


def test_sigmoid_focal_binary_int_labels_with_one_logit_warn_with_the_fix():
    g = _gen(26)
    x = torch.randn(32, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (32,), generator=g)
    want = tv_sigmoid_focal_loss(x, y.double(), reduction="mean")  # 1 = positive
    out, caught = _single_class_warnings(lambda: fl.sigmoid_focal(x[:, None].float(), y, reduction="mean"))
    assert len(caught) == 1 and caught[0].category is UserWarning and caught[0].filename == __file__
    message = str(caught[0].message)
    assert "y.float()[:, None]".replace("y", "target") in message and "BACKGROUND" in message
    # what the warning is about: label 1 == C is background, so the labels are read inverted
    inverted = tv_sigmoid_focal_loss(x, 1.0 - y.double(), reduction="mean")
    assert_rel_close(out, inverted, TOL[torch.float32], "integer labels, C == 1 (mmdet's convention)")
    assert abs(float(out) - float(want)) > 1e-3
    # the fix in the message gives torchvision's numbers, silently
    fixed, caught = _single_class_warnings(lambda: fl.sigmoid_focal(x[:, None].float(), y.float()[:, None],
                                                                    reduction="mean"))
    assert caught == []
    assert_rel_close(fixed, want, TOL[torch.float32], "float target")
    # the module warns at the user's line too
    _, caught = _single_class_warnings(lambda: fl.nn.SigmoidFocalLoss()(x[:, None].float(), y))
    assert len(caught) == 1 and caught[0].filename == __file__


def test_single_class_warning_is_decided_without_reading_values():
    # meta tensors stand in for CUDA ones: any value read raises, the warning needs none
    x, y = torch.randn(8, 1, device="meta"), torch.randint(0, 2, (8,)).to("meta")
    from fused_losses import _validate
    _, caught = _single_class_warnings(lambda: _validate.sigmoid_focal_args(
        x, y, alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none", validate=None))
    assert len(caught) == 1


@pytest.mark.parametrize("case", ["two classes", "float target", "mmdet adapter", "empty"])
def test_single_class_warning_only_where_it_applies(case):
    from fused_losses.compat import MMDetFocalLoss
    x1, x2 = torch.randn(6, 1), torch.randn(6, 2)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    calls = {
        "two classes": lambda: fl.sigmoid_focal(x2, y),
        "float target": lambda: fl.sigmoid_focal(x1, y.float()[:, None]),
        "mmdet adapter": lambda: MMDetFocalLoss()(x1, y),  # mmdet's labels: 1 == C is background there
        "empty": lambda: fl.sigmoid_focal(x1[:0], y[:0]),
    }
    assert _single_class_warnings(calls[case])[1] == []


def test_ghmc_channel_second_logits_with_the_sigmoid_default_name_use_sigmoid_false():
    g = _gen(27)
    x = torch.randn(2, 4, 5, 6, generator=g)
    t = torch.randint(0, 4, (2, 5, 6), generator=g)
    t[0, 0, :3] = 255
    with pytest.raises(ValueError, match=r"^target: .*pass use_sigmoid=False"):
        fl.ghmc(x, t, ignore_index=255)
    with pytest.raises(ValueError, match=r"^target: .*pass use_sigmoid=False"):
        fl.nn.GHMCLoss(momentum=0.0)(x, t)
    out = fl.ghmc(x, t, ignore_index=255, use_sigmoid=False)
    ref = fl.ghmc(x.double(), t, ignore_index=255, use_sigmoid=False, backend="reference")
    assert_rel_close(out, ref, TOL[torch.float32], "the fix")
    # sigmoid_focal with the same shapes: the fix there is channel-last logits
    with pytest.raises(ValueError, match=r"^target: .*logits\.movedim\(1, -1\)"):
        fl.sigmoid_focal(x, t)


def test_one_logit_per_sample_with_integer_labels_names_the_float_target():
    g = _gen(28)
    x = torch.randn(10, generator=g)
    y = torch.randint(0, 2, (10,), generator=g)
    with pytest.raises(ValueError, match=r"^target: .*\(N,\) logits.*target\.float\(\)"):
        fl.sigmoid_focal(x, y)
    with pytest.raises(ValueError, match=r"^logits: .*\(N,\) logits.*sigmoid_focal\(logits, target\.float\(\)\)"):
        fl.focal(x, y)
    out = fl.sigmoid_focal(x, y.float(), reduction="sum")
    assert_rel_close(out, tv_sigmoid_focal_loss(x.double(), y.double(), reduction="sum"), TOL[torch.float32], "fix")


@pytest.mark.parametrize("alpha", [0.25, 0.0, 1.0, -1.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_compat_sigmoid_focal_loss_takes_a_0dim_tensor_alpha(alpha, reduction):
    from fused_losses import compat
    g = _gen(29)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    t = (torch.rand(9, 4, generator=g) > 0.7).double()
    want = tv_sigmoid_focal_loss(x, t, torch.tensor(alpha), 2, reduction)
    xg = x.float().requires_grad_()
    out = compat.sigmoid_focal_loss(xg, t.float(), torch.tensor(alpha), 2, reduction)  # CPU: read on the host
    assert_rel_close(out, want, TOL[torch.float32], "cpu tensor alpha")
    # the device path (a CUDA tensor alpha: never read on the host), run here on CPU tensors
    xd = x.float().requires_grad_()
    dev = compat._device_alpha_loss(xd, t.float(), torch.tensor(alpha), 2, reduction, None)
    assert_rel_close(dev, want, TOL[torch.float32], "device alpha")
    upstream = torch.randn(out.shape, generator=g)
    out.backward(upstream)
    dev.backward(upstream)
    x64 = x.clone().requires_grad_()
    tv_sigmoid_focal_loss(x64, t, torch.tensor(alpha), 2, reduction).backward(upstream.double())
    assert_rel_close(xg.grad, x64.grad, TOL[torch.float32], "grad")
    assert_rel_close(xd.grad, x64.grad, TOL[torch.float32], "device alpha grad")


def test_compat_tensor_alpha_that_is_not_a_number_is_a_clear_error():
    from fused_losses import compat
    with pytest.raises(ValueError, match=r"^alpha: .*0-dim.*fused_losses\.sigmoid_focal"):
        compat.sigmoid_focal_loss(torch.randn(3, 2), torch.rand(3, 2), torch.tensor([0.25, 0.5]), 2, "sum")
    with pytest.raises(ValueError, match=r"^alpha: must be in \[0, 1\] or -1"):
        compat.sigmoid_focal_loss(torch.randn(3, 2), torch.rand(3, 2), torch.tensor(1.5), 2, "sum")


@pytest.mark.parametrize("use_sigmoid", [True, False])
@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_ghmc_state_may_be_a_column_of_a_state_matrix(use_sigmoid, backend, dev):
    if backend == "cuda":
        if dev.type != "cuda":
            pytest.skip("needs a CUDA device")
    elif dev.type != "cpu":
        pytest.skip("the cpu backend runs CPU tensors")
    g = _gen(30)
    n, c, bins = 40, 3, 7
    states = torch.rand(bins, 3, generator=g).to(dev)
    want_states = states.clone().cpu()
    for step in range(3):
        x = torch.randn(n, c, generator=g)
        t = torch.randint(0, c + 1 if use_sigmoid else c, (n,), generator=g)
        column = states[:, 1]
        assert not column.is_contiguous()
        out = fl.ghmc(x.to(dev), t.to(dev), bins=bins, momentum=0.6, state=column, use_sigmoid=use_sigmoid,
                      reduction="none", backend=backend)
        ref = fl.ghmc(x.double(), t, bins=bins, momentum=0.6, state=want_states[:, 1], use_sigmoid=use_sigmoid,
                      reduction="none", backend="reference")
        assert_rel_close(out.cpu(), ref, TOL[torch.float32], f"step {step}")
        # the user's view (the matrix's column) holds the EMA, the other columns are untouched
        assert torch.equal(states.cpu(), want_states), step


@pytest.fixture
def dev():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def test_patch_torchvision_covers_fcos_and_retinanet():
    import torchvision.models.detection.fcos as tv_fcos
    import torchvision.models.detection.retinanet as tv_retinanet
    from fused_losses import compat
    stock = (tv_fcos.sigmoid_focal_loss, tv_retinanet.sigmoid_focal_loss)
    with compat.patch_torchvision() as handle:
        assert tv_fcos.sigmoid_focal_loss is compat.sigmoid_focal_loss
        assert tv_retinanet.sigmoid_focal_loss is compat.sigmoid_focal_loss
        assert {"torchvision.models.detection.fcos", "torchvision.models.detection.retinanet"} <= set(handle.modules)
    assert (tv_fcos.sigmoid_focal_loss, tv_retinanet.sigmoid_focal_loss) == stock


def _fcos_head_loss(tv_fcos, dtype):
    head = tv_fcos.FCOSHead(in_channels=32, num_anchors=1, num_classes=5, num_convs=1).to(torch.float64)
    g = _gen(31)
    n_images, n_anchors, k = 2, 30, 5
    logits = 2 * torch.randn(n_images, n_anchors, k, generator=g, dtype=torch.float64)
    anchors = [torch.rand(n_anchors, 4, generator=g, dtype=torch.float64).sort(-1).values * 32 for _ in range(n_images)]
    targets, matched = [], []
    for i in range(n_images):
        boxes = torch.rand(3, 4, generator=g, dtype=torch.float64).sort(-1).values * 32
        targets.append({"boxes": boxes[:, [0, 1, 2, 3]], "labels": torch.randint(0, k, (3,), generator=g)})
        matched.append(torch.randint(-1, 3, (n_anchors,), generator=g))
    outputs = {"bbox_regression": torch.randn(n_images, n_anchors, 4, generator=g, dtype=torch.float64),
               "bbox_ctrness": torch.randn(n_images, n_anchors, 1, generator=g, dtype=torch.float64)}
    x = logits.to(dtype).requires_grad_()
    losses = head.compute_loss(targets, {**outputs, "cls_logits": x}, anchors, matched)
    losses["classification"].backward()
    return losses["classification"].detach(), x.grad


@pytest.mark.parametrize("model", ["fcos", "retinanet"])
def test_patched_fcos_and_retinanet_call_the_fused_loss_with_torchvisions_numbers(model, monkeypatch):
    import torchvision.models.detection.fcos as tv_fcos
    import torchvision.models.detection.retinanet as tv_retinanet
    from fused_losses import compat
    calls = []
    inner = compat._functional.sigmoid_focal
    monkeypatch.setattr(compat._functional, "sigmoid_focal", lambda *a, **k: calls.append(1) or inner(*a, **k))
    if model == "fcos":
        run = lambda dtype: _fcos_head_loss(tv_fcos, dtype)  # noqa: E731
    else:
        head = tv_retinanet.RetinaNetClassificationHead(in_channels=8, num_anchors=3, num_classes=6)
        g = _gen(32)
        logits = 2 * torch.randn(2, 40, 6, generator=g, dtype=torch.float64)
        matched = [torch.randint(-2, 3, (40,), generator=g) for _ in range(2)]
        targets = [{"labels": torch.randint(0, 6, (3,), generator=g)} for _ in range(2)]

        def run(dtype):
            x = logits.detach().to(dtype).clone().requires_grad_()
            loss = head.compute_loss(targets, {"cls_logits": x}, matched)
            loss.backward()
            return loss.detach(), x.grad
    ref, ref_grad = run(torch.float64)  # stock torchvision in float64
    assert calls == []
    with compat.patch_torchvision():
        out, grad = run(torch.float32)
    assert calls, "the patched head did not call the fused loss"
    assert_rel_close(out, ref, TOL[torch.float32], f"{model} classification loss")
    assert_rel_close(grad, ref_grad, TOL[torch.float32], f"{model} logits grad")
    assert float(ref) > 0


def _cpu_reason(simd):
    import subprocess
    import sys
    env = {k: v for k, v in __import__("os").environ.items() if k != "FUSED_LOSSES_SIMD"}
    if simd:
        env["FUSED_LOSSES_SIMD"] = simd
    code = "import fused_losses as fl; print(fl.backends()['cpu'].reason)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_backends_names_the_cpu_simd_variant():
    from tests.test_cpu_kernels import _variants
    variants = _variants()  # from /proc/cpuinfo: what this CPU executes, best last
    if not _backends.get("cpu").availability()[0]:
        pytest.skip("the cpu backend is not built")
    if "FUSED_LOSSES_SIMD" not in __import__("os").environ:
        assert f"SIMD variant {variants[-1]} " in fl.backends()["cpu"].reason
    assert f"SIMD variant {variants[-1]} " in _cpu_reason(None)
    for lower in variants[:-1]:
        reason = _cpu_reason(lower)
        assert f"SIMD variant {lower} " in reason and f"FUSED_LOSSES_SIMD={lower}" in reason
