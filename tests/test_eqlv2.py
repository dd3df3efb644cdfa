"""fl.eqlv2, nn.EQLv2Loss and compat.MMDetEQLv2 (issue #25) on every backend.

Against the float64 reference (fused_losses.reference.eqlv2) over consecutive steps with the
state carried (float32 inputs: loss and gradient within 1e-5 relative L2; the float32 state
within 1e-5: the fused kernels sum the statistics per fixed chunk of rows in float64, the
reference with torch.sum, so the state is equal up to that rounding, not bitwise), against the
EQLv2 authors' module as paraphrased in tests/test_reference_longtail.py (the compat drop-in,
with the forward collection and with a real backward hook), gradcheck with the state frozen,
low precision, module state, torch.compile, determinism and bad input. Backends: cpu, triton
(interpreter), cuda_emu (under `make test-cuda-emu`) and reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck

import fused_losses as fl
from fused_losses import reference as R
from fused_losses.compat import MMDetEQLv2
from tests.cuda_emu import backend as cuda_emu
from tests.test_reference_longtail import AuthorsEQLv2, _long_tail_labels
from tests.test_seesaw import backend_params
from tests.utils import UNIT_ROUNDOFF, assert_rel_close, rel_error

STEPS = 4
F64 = torch.float64


BACKENDS = backend_params("eqlv2")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(n, c, seed, objectness=False, dtype=torch.float32, ignore_frac=0.1, scale=3.0, lead=()):
    x = (scale * torch.randn(*lead, n, c + (1 if objectness else 0), generator=_gen(seed), dtype=F64)).to(dtype)
    labels = _long_tail_labels(n * max(1, len(lead) and lead[0]), c, seed, bg=c, ignore_frac=ignore_frac)
    return x, labels.reshape(x.shape[:-1])


def _weight(shape, seed):
    w = torch.rand(shape, generator=_gen(seed + 77), dtype=F64) + 0.5
    w.view(-1)[1] = 0.0
    return w


def _run(fn, x, *args, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    total = (out * torch.randn(out.shape, generator=_gen(5), dtype=F64).to(out.dtype)).sum() if out.dim() else out
    if total.requires_grad:
        total.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return out.detach().to(F64).reshape(-1), grad.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objectness", [False, True], ids=["plain", "objectness"])
@pytest.mark.parametrize("reduction,weighting,avg", [
    ("mean", None, None), ("sum", "row", None), ("none", "element", None), ("mean", "row", 7.0)])
def test_matches_reference_over_steps(backend, objectness, reduction, weighting, avg):
    c, n = 13, 150
    state, state_ref = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    for step in range(STEPS):
        x, labels = _case(n, c, 10 * step + 1, objectness)
        w = None if weighting is None else _weight(x.shape if weighting == "element" else x.shape[:-1], step)
        kw = dict(objectness=objectness, reduction=reduction, avg_factor=avg)
        lo, go = _run(fl.eqlv2, x, labels, state, weight=None if w is None else w.float(), backend=backend, **kw)
        lr, gr = _run(R.eqlv2, x.to(F64), labels, state_ref, weight=w, **kw)
        assert_rel_close(lo, lr, 1e-5, f"step {step}: loss")
        assert_rel_close(go, gr, 1e-5, f"step {step}: gradient")
        for row in range(3):
            assert_rel_close(state[row], state_ref[row], 1e-5, f"step {step}: state row {row}")
    assert (state[0] > 0).any() and (state[2] < 100).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_lvis_width(backend):
    """(B, A, C) anchors (rows over leading dims) and C = 1203 (wider than a Triton block)."""
    c = 1203
    state, state_ref = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    for step in range(2):
        x, labels = _case(20, c, 3 + step, lead=(2,))
        lo, go = _run(fl.eqlv2, x, labels, state, backend=backend)
        lr, gr = _run(R.eqlv2, x.to(F64), labels, state_ref)
        assert_rel_close(lo, lr, 1e-5, "loss")
        assert_rel_close(go, gr, 1e-5, "gradient")
        assert_rel_close(state, state_ref, 1e-5, "state")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", [False, True], ids=["forward-collect", "backward-hook"])
def test_compat_matches_authors_over_steps(backend, hook):
    """MMDetEQLv2 against the authors' EQLv2 (its forward collection, loss_weight 1.5: not in the
    statistics; and the statistics from a real backward hook on the logits, loss_weight 1: a hook
    would see it): loss, gradient and the three buffers."""
    c, n = 8, 60
    lw = 1.0 if hook else 1.5
    ours = MMDetEQLv2(num_classes=c, loss_weight=lw, backend=backend)
    peer = AuthorsEQLv2(c, hook=hook)
    for step in range(STEPS):
        x, labels = _case(n, c, 30 + step, objectness=True, ignore_frac=0.0)
        lo, go = _run(ours, x, labels, weight=torch.rand(n), avg_factor=3.0, reduction_override="sum")
        lp, gp = _run(lambda z: lw * peer(z, labels), x.to(F64))
        assert_rel_close(lo, lp, 1e-5, f"step {step}: loss")
        assert_rel_close(go, gp, 1e-5, f"step {step}: gradient")
        for name, row in zip(("pos_grad", "neg_grad", "pos_neg"), peer.state()):
            assert_rel_close(getattr(ours, name), row, 1e-5, f"step {step}: {name}")


def test_compat_state_dict_keys_and_activation():
    ours = MMDetEQLv2(num_classes=3)
    assert sorted(ours.state_dict()) == ["neg_grad", "pos_grad", "pos_neg"]
    assert ours.pos_neg.tolist() == [100.0] * 3
    half = copy.deepcopy(ours).half()
    assert all(getattr(half, k).dtype == torch.float32 for k in ("pos_grad", "neg_grad", "pos_neg"))
    x = torch.randn(5, 4)
    s = ours.get_activation(x)
    want = torch.sigmoid(x)
    want[:, :-1] *= 1 - want[:, -1:]
    assert torch.equal(s, want)


def test_first_step_weights_are_one():
    """From the initial state every weight is 1: the loss is the plain BCE sum / rows."""
    c = 6
    x, labels = _case(30, c, 2, ignore_frac=0.0)
    y = torch.nn.functional.one_hot(labels, c + 1)[:, :c].to(F64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x.to(F64), y, reduction="sum") / 30
    assert_rel_close(fl.eqlv2(x, labels, R.eqlv2_initial_state(c), backend="cpu"), bce, 1e-6, "first step")


@pytest.mark.parametrize("objectness", [False, True])
def test_gradcheck_state_frozen(objectness):
    c = 4
    x, labels = _case(7, c, 2, objectness, dtype=F64, ignore_frac=0.0)
    state = R.eqlv2_initial_state(c)
    for _ in range(2):  # a state with statistics, so the weights differ from 1
        R.eqlv2(x, labels, state, objectness=objectness)
    w = _weight(x.shape[:-1], 1)

    def f(z):
        return fl.eqlv2(z, labels, state.clone(), objectness=objectness, weight=w, backend="cpu")

    before = state.clone()
    assert gradcheck(f, (x.clone().requires_grad_(True),))
    assert torch.equal(state, before)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("cpu", "triton", "cuda_emu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_as_close_as_eager(backend, dtype):
    c, n = 30, 64
    state, state_ref, state_eager = (R.eqlv2_initial_state(c) for _ in range(3))
    for step in range(2):
        x, labels = _case(n, c, 60 + step, dtype=dtype)
        lo, go = _run(fl.eqlv2, x, labels, state, reduction="sum", backend=backend)
        lr, gr = _run(R.eqlv2, x.to(F64), labels, state_ref, reduction="sum")
        le, ge = _run(R.eqlv2, x, labels, state_eager, reduction="sum", upcast=False)
        for got, ref, eager, what in ((lo, lr, le, "loss"), (go, gr, ge, "gradient")):
            bound = max(rel_error(eager, ref), UNIT_ROUNDOFF[dtype])
            assert_rel_close(got, ref, bound, f"{what} ({dtype})")
        assert_rel_close(state, state_ref, max(rel_error(state_eager, state_ref), 1e-5), "state")


def _opcheck(op, args, in_place):
    """tests.utils.opcheck_loss_op's rule (a reduced loss's backward scales the op's gradient
    output in place, which AOTAutograd's dynamic check refuses for an op called directly: the
    public API never returns that output): every check without a gradient, all but
    test_aot_dispatch_dynamic with one. (Its need-grad detection reads the last bool argument,
    which is not compute_grad in these schemas.)"""
    if not in_place:
        torch.library.opcheck(op, args)
        return
    torch.library.opcheck(op, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("namespace", ["fused_losses", "fused_losses_triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(namespace, reduction):
    """The op's schema, fake kernel and autograd registration (torch.library.opcheck)."""
    if namespace == "fused_losses_triton":
        pytest.importorskip("fused_losses._triton.longtail")
    op = getattr(torch.ops, namespace).eqlv2_forward
    x, labels = _case(6, 4, 3)
    state = R.eqlv2_initial_state(4)
    state[2] = torch.tensor([0.5, 0.9, 1.2, 0.1])
    for need_grad in (False, True):
        args = (x.clone().requires_grad_(need_grad), labels, state, 12.0, 0.8, 4.0, False, -100, reduction, need_grad,
                torch.rand(6))
        _opcheck(op, args, need_grad and reduction != "none")


def test_module_state_dict_deepcopy_and_casts():
    c = 5
    m = fl.nn.EQLv2Loss(num_classes=c)
    assert torch.equal(m.state, R.eqlv2_initial_state(c))
    x, labels = _case(12, c, 8)
    m(x, labels)
    clone = copy.deepcopy(m)
    assert torch.equal(clone.state, m.state) and clone.state is not m.state
    fresh = fl.nn.EQLv2Loss(num_classes=c)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.state, m.state)
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16, torch.nn.Module.double):
        casted = cast(copy.deepcopy(m))
        assert casted.state.dtype == torch.float32 and torch.equal(casted.state, m.state)
    m2, state = fl.nn.EQLv2Loss(num_classes=c), R.eqlv2_initial_state(c)
    for step in range(2):
        x, labels = _case(12, c, 20 + step)
        assert torch.equal(m2(x, labels), fl.eqlv2(x, labels, state))
    assert torch.equal(m2.state, state)


def test_torch_compile_fullgraph_cpu():
    c = 6

    def step(x, labels, state):
        return fl.eqlv2(x, labels, state, objectness=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    se, sc = R.eqlv2_initial_state(c), R.eqlv2_initial_state(c)
    for s in range(3):
        x, labels = _case(16, c, 90 + s, objectness=True)
        le, ge = _run(step, x, labels, se)
        lc, gc = _run(compiled, x, labels, sc)
        assert torch.equal(se, sc)
        assert torch.equal(lc, le) and torch.equal(gc, ge)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_deterministic_run_to_run_and_across_threads(backend):
    c, n = 40, 700
    x, labels = _case(n, c, 4)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            state = R.eqlv2_initial_state(c)
            R.eqlv2(x, labels, state)
            results.append((*_run(fl.eqlv2, x, labels, state, backend=backend), state))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_recomputes_the_ratio_as_the_authors(backend):
    c = 3
    x, _ = _case(4, c, 1)
    state = R.eqlv2_initial_state(c)
    loss, grad = _run(fl.eqlv2, x, torch.full((4,), -100), state, backend=backend)
    assert loss.abs().sum() == 0 and grad.abs().sum() == 0
    assert state[:2].abs().sum() == 0 and state[2].abs().sum() == 0  # 0 / (0 + 1e-10)


def test_functorch_transform_raises_on_fused_backend():
    x, labels = _case(6, 3, 1, ignore_frac=0.0)
    with pytest.raises(RuntimeError, match="eqlv2: the fused backends do not run under torch.func"):
        torch.func.grad(lambda z: fl.eqlv2(z, labels, R.eqlv2_initial_state(3), backend="cpu"))(x)


X = torch.randn(4, 3)
LAB = torch.tensor([0, 3, 1, 2])
S = R.eqlv2_initial_state(3)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fl.eqlv2(X, torch.tensor([0, 4, 1, 2]), S.clone()), ValueError, r"target: value 4 is out of range \[0, 3\]"),
    (lambda: fl.eqlv2(X, torch.tensor([0, -2, 1, 2]), S.clone()), ValueError, "target: value -2"),
    (lambda: fl.eqlv2(X, LAB, S[:, :2].clone()), ValueError, r"state: expected a float32 tensor of shape \(3, 3\)"),
    (lambda: fl.eqlv2(X, LAB, S.double()), ValueError, "state: .*float64"),
    (lambda: fl.eqlv2(X, LAB, S.to("meta")), ValueError, "state: is on meta"),
    (lambda: fl.eqlv2(X, LAB, S.clone().requires_grad_(True)), ValueError, "state: must not require grad"),
    (lambda: fl.eqlv2(X, LAB, None), TypeError, "state"),
    (lambda: fl.eqlv2(X, LAB.float(), S.clone()), TypeError, "target"),
    (lambda: fl.eqlv2(X, LAB[:3], S.clone()), ValueError, "target"),
    (lambda: fl.eqlv2(X, torch.tensor([0, 2, 1, 2]), S.clone(), objectness=True), ValueError, r"state: expected .* \(3, 2\)"),
    (lambda: fl.eqlv2(X, LAB, S.clone(), reduction="none", avg_factor=2.0), ValueError, "avg_factor"),
    (lambda: fl.eqlv2(X, LAB, S.clone(), gamma=float("nan")), ValueError, "gamma"),
], ids=["label>C", "label<0", "state shape", "state dtype", "state device", "state requires grad", "state None",
        "float target", "target shape", "objectness state shape", "avg_factor with none", "gamma nan"])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=f"^{match}"):
        call()


def test_failed_call_leaves_the_state_unchanged():
    state = S.clone()
    with pytest.raises(ValueError):
        fl.eqlv2(X, torch.tensor([0, 9, 1, 2]), state)
    assert torch.equal(state, S)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_element", [False, True])
def test_nan_logit_at_zero_weight_does_not_leak(backend, per_element):
    c = 5
    x, labels = _case(8, c, 6, ignore_frac=0.0)
    x[2, 1] = float("nan")
    w = torch.ones(x.shape if per_element else x.shape[:-1])
    if per_element:
        w[2, 1] = 0.0
    else:
        w[2] = 0.0
    state = R.eqlv2_initial_state(c)
    loss, grad = _run(fl.eqlv2, x, labels, state, weight=w, reduction="sum", backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all() and torch.isfinite(state).all()
    assert grad[2, 1] == 0
