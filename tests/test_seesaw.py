"""fl.seesaw, nn.SeesawLoss and compat.MMDetSeesawLoss (issue #25) on every backend.

Against the float64 reference (fused_losses.reference.seesaw) over consecutive steps with the
state carried (float32 inputs: loss and gradient within 1e-5 relative L2, cum_samples bitwise
equal: integer counts), against mmdet 3.x's SeesawLoss as paraphrased in
tests/test_reference_longtail.py (the compat drop-in), gradcheck with the state frozen, low
precision against the eager reference in the same precision, module state, torch.compile,
determinism and bad input. Backends: cpu, triton (interpreter on CPU tensors), cuda_emu (the
CUDA kernels on the emulator, under `make test-cuda-emu`) and reference.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd import gradcheck

import fused_losses as fl
from fused_losses import reference as R
from fused_losses.compat import MMDetSeesawLoss
from tests.cuda_emu import backend as cuda_emu
from tests.test_reference_longtail import MMDET_EPS, MMDetSeesaw, _long_tail_labels
from tests.utils import UNIT_ROUNDOFF, assert_rel_close, rel_error

STEPS = 4
F64 = torch.float64


def backend_params(loss: str):
    """reference, cpu, triton (interpreter) and cuda_emu params for `loss` (also tests/test_eqlv2.py's)."""
    params = [pytest.param("cpu", id="cpu"), pytest.param("reference", id="reference")]
    triton_ok = fl.backends()["triton"].available and "cpu" in fl._backends.get("triton").device_types
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(
        not triton_ok, reason="triton on CPU tensors needs TRITON_INTERPRET=1")))
    emu_ok = cuda_emu.available() and loss in cuda_emu.BACKEND.losses
    params.append(pytest.param("cuda_emu", id="cuda_emu", marks=pytest.mark.skipif(
        not emu_ok, reason=cuda_emu.reason() if not cuda_emu.available() else f"emulator build lacks {loss}")))
    return params


BACKENDS = backend_params("seesaw")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _case(n, c, seed, objectness, dtype=torch.float32, ignore_frac=0.1, scale=3.0):
    x = (scale * torch.randn(n, c + (2 if objectness else 0), generator=_gen(seed), dtype=F64)).to(dtype)
    labels = _long_tail_labels(n, c, seed, bg=c if objectness else None, ignore_frac=ignore_frac)
    return x, labels


def _weight(n, seed):
    w = torch.rand(n, generator=_gen(seed + 77), dtype=F64) + 0.5
    w[1] = 0.0
    return w


def _run(fn, x, *args, **kwargs):
    """(losses as a flat tensor, gradient of a fixed combination) of one call."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    parts = list(out.values()) if isinstance(out, dict) else [out]
    g = _gen(5)
    total = sum(((p * torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)).sum() if p.dim() else p * (k + 1))
                for k, p in enumerate(parts))
    if total.requires_grad:
        total.backward()
    grad = x.grad if x.grad is not None else torch.zeros_like(x)
    return torch.cat([p.detach().reshape(-1).to(F64) for p in parts]), grad.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("objectness", [True, False], ids=["objectness", "plain"])
@pytest.mark.parametrize("reduction,return_dict,weighted,avg", [
    ("mean", False, False, None), ("mean", True, True, None), ("sum", True, False, None), ("none", False, True, None),
    ("none", True, False, None), ("mean", True, True, 5.0)])
def test_matches_reference_over_steps(backend, objectness, reduction, return_dict, weighted, avg):
    c, n = 11, 40
    cum, cum_ref = torch.zeros(c + (1 if objectness else 0)), torch.zeros(c + (1 if objectness else 0))
    for step in range(STEPS):
        x, labels = _case(n, c, 10 * step + 1, objectness)
        w = _weight(n, step) if weighted else None
        kw = dict(objectness=objectness, reduction=reduction, return_dict=return_dict, avg_factor=avg)
        lo, go = _run(fl.seesaw, x, labels, cum, weight=None if w is None else w.float(), backend=backend, **kw)
        lr, gr = _run(R.seesaw, x.to(F64), labels, cum_ref, weight=w, **kw)
        assert torch.equal(cum, cum_ref), f"step {step}: cum_samples"
        assert_rel_close(lo, lr, 1e-5, f"step {step}: loss")
        assert_rel_close(go, gr, 1e-5, f"step {step}: gradient")
    assert cum.sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_lvis_sized_row_and_long_tail_counts(backend):
    """C = 1203 (LVIS): rows longer than a Triton block, counts spanning 1 to thousands."""
    c, n = 1203, 24
    cum = torch.zeros(c + 1)
    cum[:c] = torch.logspace(4, 0, c).round()
    cum_ref = cum.clone()
    for step in range(2):
        x, labels = _case(n, c, 3 + step, True)
        lo, go = _run(fl.seesaw, x, labels, cum, objectness=True, backend=backend)
        lr, gr = _run(R.seesaw, x.to(F64), labels, cum_ref, objectness=True)
        assert torch.equal(cum, cum_ref)
        assert_rel_close(lo, lr, 1e-5, "loss")
        assert_rel_close(go, gr, 1e-5, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("return_dict", [True, False])
@pytest.mark.parametrize("reduction,avg", [("mean", None), ("mean", 6.0), ("sum", None)])
def test_compat_matches_mmdet_over_steps(backend, return_dict, reduction, avg):
    """MMDetSeesawLoss (loss_weight 2) against mmdet 3.x SeesawLoss as paraphrased in
    tests/test_reference_longtail.py: losses, gradient and the cum_samples buffer, 4 steps."""
    c, n = 9, 30
    ours = MMDetSeesawLoss(num_classes=c, loss_weight=2.0, return_dict=return_dict, backend=backend)
    peer = MMDetSeesaw(c, return_dict=return_dict)
    for step in range(STEPS):
        x, labels = _case(n, c, 40 + step, True, ignore_frac=0.0)
        w = _weight(n, step)
        lo, go = _run(ours, x, labels, w.float(), avg_factor=avg, reduction_override=reduction)
        lp, gp = _run(lambda z: {k: 2.0 * v for k, v in peer(z, labels, w, avg, reduction).items()}
                      if return_dict else 2.0 * peer(z, labels, w, avg, reduction), x.to(F64))
        assert torch.equal(ours.cum_samples, peer.cum_samples), f"step {step}"
        assert_rel_close(lo, lp, 1e-5, f"step {step}: losses")
        assert_rel_close(go, gp, 1e-5, f"step {step}: gradient")


def test_compat_none_reduction_shapes_and_activation():
    c = 4
    ours, peer = MMDetSeesawLoss(num_classes=c), MMDetSeesaw(c)
    x, labels = _case(10, c, 1, True, ignore_frac=0.0)
    got = ours(x, labels, reduction_override="none")
    want = peer(x.to(F64), labels, None, None, "none")
    for key in want:
        assert got[key].shape == want[key].shape
        assert_rel_close(got[key], want[key], 1e-5, key)
    scores = ours.get_activation(x)
    assert scores.shape == (10, c + 1)
    assert_rel_close(scores.sum(-1), torch.ones(10, dtype=F64), 1e-6, "scores sum to 1")
    acc = ours.get_accuracy(x, labels)
    assert set(acc) == {"acc_objectness", "acc_classes"}


@pytest.mark.parametrize("objectness", [True, False])
def test_gradcheck_state_frozen(objectness):
    c, n = 5, 8
    x, labels = _case(n, c, 2, objectness, dtype=F64, ignore_frac=0.0)
    cum = torch.tensor([30.0, 5.0, 1.0, 12.0, 2.0] + ([9.0] if objectness else []))
    w = _weight(n, 3)

    def f(z):  # q = 0: the compensation uses the detached softmax, which finite differences would see
        return fl.seesaw(z, labels, cum.clone(), q=0.0, objectness=objectness, weight=w, backend="cpu")

    assert gradcheck(f, (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("cpu", "triton", "cuda_emu")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_as_close_as_eager(backend, dtype):
    c, n = 40, 64
    cum, cum_ref, cum_eager = (torch.zeros(c + 1) for _ in range(3))
    for step in range(2):
        x, labels = _case(n, c, 60 + step, True, dtype=dtype)
        lo, go = _run(fl.seesaw, x, labels, cum, objectness=True, reduction="sum", backend=backend)
        lr, gr = _run(R.seesaw, x.to(F64), labels, cum_ref, objectness=True, reduction="sum")
        le, ge = _run(R.seesaw, x, labels, cum_eager, objectness=True, reduction="sum", upcast=False)
        assert torch.equal(cum, cum_ref)
        for got, ref, eager, what in ((lo, lr, le, "loss"), (go, gr, ge, "gradient")):
            bound = max(rel_error(eager, ref), UNIT_ROUNDOFF[dtype])
            assert_rel_close(got, ref, bound, f"{what} ({dtype})")


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
@pytest.mark.parametrize("split", [False, True])
def test_opcheck(namespace, reduction, split):
    """The op's schema, fake kernel and autograd registration (torch.library.opcheck)."""
    if namespace == "fused_losses_triton":
        pytest.importorskip("fused_losses._triton.longtail")
    op = getattr(torch.ops, namespace).seesaw_forward
    x, labels = _case(6, 4, 3, True)
    w = torch.rand(6)
    for need_grad in (False, True):
        args = (x.clone().requires_grad_(need_grad), labels, torch.tensor([3.0, 1.0, 0.0, 9.0, 4.0]), 0.8, 2.0, 0.01,
                True, -100, reduction, need_grad, w, split)
        _opcheck(op, args, need_grad and reduction != "none")


def test_module_state_dict_deepcopy_and_casts():
    c = 6
    m = fl.nn.SeesawLoss(num_classes=c, objectness=True)
    x, labels = _case(12, c, 8, True)
    m(x, labels)
    assert m.cum_samples.sum() == (labels != -100).sum()
    clone = copy.deepcopy(m)
    assert torch.equal(clone.cum_samples, m.cum_samples) and clone.cum_samples is not m.cum_samples
    fresh = fl.nn.SeesawLoss(num_classes=c, objectness=True)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.cum_samples, m.cum_samples)
    for cast in (torch.nn.Module.half, torch.nn.Module.bfloat16, torch.nn.Module.double):
        casted = cast(copy.deepcopy(m))
        assert casted.cum_samples.dtype == torch.float32
        assert torch.equal(casted.cum_samples, m.cum_samples)
    # two steps of the module equal two steps of the function with a state carried
    m2, state = fl.nn.SeesawLoss(num_classes=c, objectness=True), torch.zeros(c + 1)
    for step in range(2):
        x, labels = _case(12, c, 20 + step, True)
        assert torch.equal(m2(x, labels), fl.seesaw(x, labels, state, objectness=True))
    assert torch.equal(m2.cum_samples, state)


def test_compat_buffer_stays_float32_and_loads_mmdet_state_dict():
    m = MMDetSeesawLoss(num_classes=3).half()
    assert m.cum_samples.dtype == torch.float32
    m.load_state_dict({"cum_samples": torch.tensor([4.0, 1.0, 0.0, 7.0])})
    assert m.cum_samples.tolist() == [4.0, 1.0, 0.0, 7.0]


def test_torch_compile_fullgraph_cpu():
    c = 7

    def step(x, labels, cum):
        return fl.seesaw(x, labels, cum, objectness=True, return_dict=True)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    cum_e, cum_c = torch.zeros(c + 1), torch.zeros(c + 1)
    for s in range(2):
        x, labels = _case(16, c, 90 + s, True)
        le, ge = _run(step, x, labels, cum_e)
        lc, gc = _run(compiled, x, labels, cum_c)
        assert torch.equal(cum_e, cum_c)
        assert_rel_close(lc, le, 1e-6, "compiled loss")
        assert_rel_close(gc, ge, 1e-6, "compiled gradient")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "reference"])
def test_deterministic_run_to_run_and_across_threads(backend):
    c, n = 50, 300
    x, labels = _case(n, c, 4, True)
    results = []
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2, 1):
            torch.set_num_threads(nt)
            cum = torch.full((c + 1,), 3.0)
            results.append((*_run(fl.seesaw, x, labels, cum, objectness=True, backend=backend), cum))
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_empty(backend):
    c = 4
    x, _ = _case(5, c, 1, True)
    cum = torch.tensor([1.0, 2.0, 0.0, 3.0, 4.0])
    loss, grad = _run(fl.seesaw, x, torch.full((5,), -100), cum, objectness=True, backend=backend)
    assert loss.abs().sum() == 0 and grad.abs().sum() == 0
    assert cum.tolist() == [1.0, 2.0, 0.0, 3.0, 4.0]
    loss, grad = _run(fl.seesaw, x[:0], torch.zeros(0, dtype=torch.long), cum, objectness=True, backend=backend)
    assert loss.abs().sum() == 0 and grad.shape == (0, c + 2)


def test_process_group_none_equals_no_group_in_one_process():
    """Without torch.distributed initialised, process_group only routes the counts through the
    all-reduce helper: the same state and loss as without it."""
    c = 5
    x, labels = _case(20, c, 7, True)
    a, b = torch.zeros(c + 1), torch.zeros(c + 1)
    la = fl.seesaw(x, labels, a, objectness=True, process_group=object())
    lb = fl.seesaw(x, labels, b, objectness=True)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_functorch_transform_raises_on_fused_backend():
    x, labels = _case(6, 3, 1, False, ignore_frac=0.0)
    with pytest.raises(RuntimeError, match="seesaw: the fused backends do not run under torch.func"):
        torch.func.grad(lambda z: fl.seesaw(z, labels, torch.zeros(3), backend="cpu"))(x)


X = torch.randn(4, 5)
LAB = torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("call,exc,match", [
    (lambda: fl.seesaw(X, torch.tensor([0, 1, 5, 2]), torch.zeros(5)), ValueError, "target: value 5 is out of range"),
    (lambda: fl.seesaw(X, torch.tensor([0, 1, -1, 2]), torch.zeros(5)), ValueError, "target"),
    (lambda: fl.seesaw(X, torch.tensor([0, 1, 4, 3]), torch.zeros(4), objectness=True), ValueError,
     r"target: value 4 is out of range \[0, 3\]"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(4)), ValueError, r"cum_samples: expected a float32 tensor of shape \(5,\)"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5)[None]), ValueError, "cum_samples"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5, dtype=torch.float64)), ValueError, "cum_samples: .*float64"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5, device="meta")), ValueError, "cum_samples: is on meta"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5, requires_grad=True)), ValueError, "cum_samples: must not require grad"),
    (lambda: fl.seesaw(X, LAB, [0.0] * 5), TypeError, "cum_samples"),
    (lambda: fl.seesaw(X, LAB.float(), torch.zeros(5)), TypeError, "target"),
    (lambda: fl.seesaw(X[None], LAB, torch.zeros(5)), ValueError, "logits"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5), p=-1.0), ValueError, "p: "),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5), eps=0.0), ValueError, "eps: "),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5), reduction="sum", avg_factor=2.0), ValueError, "avg_factor"),
    (lambda: fl.seesaw(X, LAB, torch.zeros(5), weight=torch.ones(3)), ValueError, "weight"),
], ids=["label>=C", "label<0", "objectness label>C", "state shape", "state rank", "state dtype", "state device",
        "state requires grad", "state not a tensor", "float target", "3-D logits", "p<0", "eps=0",
        "avg_factor with sum", "weight shape"])
def test_bad_input(call, exc, match):
    before = X.clone()
    with pytest.raises(exc, match=f"^{match}"):
        call()
    assert torch.equal(X, before)


def test_failed_call_leaves_the_state_unchanged():
    cum = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    with pytest.raises(ValueError):
        fl.seesaw(X, torch.tensor([0, 1, 9, 2]), cum)
    assert cum.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logit_at_zero_weight_does_not_leak(backend):
    c = 5
    x, labels = _case(8, c, 6, True, ignore_frac=0.0)
    x[2, 1] = float("nan")
    w = torch.ones(8)
    w[2] = 0.0
    cum = torch.zeros(c + 1)
    loss, grad = _run(fl.seesaw, x, labels, cum, objectness=True, weight=w, reduction="sum", backend=backend)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert grad[2].abs().sum() == 0
