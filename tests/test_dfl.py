"""Distribution focal loss (GFL, issue #24): fl.distribution_focal, nn.DistributionFocalLoss and
compat.MMDetDistributionFocalLoss on every backend against the float64 reference
(reference.distribution_focal, itself checked against mmdet's formula in
tests/test_reference_detector.py) and against mmdet's formula written out here.

Backends: 'cpu' (csrc/cpu/dfl.cpp), 'triton' (fused_losses/_triton/dfl.py; the interpreter on CPU
tensors without a GPU), 'cuda_emu' (csrc/cuda/dfl.cu on the CUDA emulator: `make test-cuda-emu`,
or FL_CUDA_EMU=<schedule> with -k cuda_emu), 'cuda' (a GPU), 'reference'. An unavailable backend's
cases are skipped with its reason. Exactness rule: tests/utils.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_losses as fl
import fused_losses.compat  # noqa: F401  (fl.compat)
from fused_losses import reference
from tests.cuda_emu import backend as cuda_emu
from tests.utils import LOW_PRECISION, TOL, UNIT_ROUNDOFF, assert_rel_close, rel_error

_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda_emu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "reference": (torch.float32, torch.float64),
}


def _device(backend: str) -> str:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _available(backend: str):
    if backend == "cuda_emu":
        return cuda_emu.available(), cuda_emu.reason()
    status = fl.backends()[backend]
    return status.available, status.reason


def _params(fused_only=False):
    out = []
    for backend in ("cpu", "triton", "cuda_emu", "cuda") + (() if fused_only else ("reference",)):
        ok, why = _available(backend)
        marks = () if ok else (pytest.mark.skip(reason=f"{backend}: {why}"),)
        out.append(pytest.param(backend, id=backend, marks=marks))
    return out


BACKENDS = _params()
FUSED = _params(fused_only=True)


def dfl_case(shape, dtype=torch.float32, *, seed=0, scale=3.0, device="cpu"):
    """(..., n + 1) logits ~ scale * randn and float32 labels in [0, n] with the edge values 0, n
    and an integer k < n among them."""
    g = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
    n = shape[-1] - 1
    target = (torch.rand(shape[:-1], generator=g, dtype=torch.float64) * n).to(torch.float32)
    flat = target.view(-1)
    edges = torch.tensor([0.0, float(n), float(min(2, n - 1)), n - 1e-3], dtype=torch.float32)
    flat[: min(flat.numel(), 4)] = edges[: min(flat.numel(), 4)]
    return logits.to(device), target.to(device)


def _loss_and_grad(fn, logits, *args, cot_dtype, **kwargs):
    """fn on a leaf copy of logits; backprop a fixed random cotangent (ones for a scalar) rounded
    to cot_dtype (so the float64 and low-precision baselines get exactly the kernel's)."""
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x, *args, **kwargs)
    if out.dim() == 0:
        cot = torch.ones_like(out)
    else:
        g = torch.Generator().manual_seed(1)
        cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(cot_dtype).to(out.dtype).to(out.device)
    out.backward(cot)
    return out.detach(), x.grad.detach()


def _ref64(logits, target, **kwargs):
    return _loss_and_grad(lambda x, t, **k: reference.distribution_focal(x, t, **k), logits.double(),
                          target.double(), cot_dtype=logits.dtype, **kwargs)


def _check(backend, logits, target, what, **kwargs):
    """The backend's loss and gradient against float64 (fp32/fp64: rel L2 <= TOL; fp16/bf16: at
    least as close as the eager reference in that precision, or within the unit roundoff)."""
    dtype = logits.dtype
    out, grad = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=dtype, backend=backend, **kwargs)
    ref_kwargs = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k == "weight" else v)
                  for k, v in kwargs.items()}
    ref_out, ref_grad = _ref64(logits, target, **ref_kwargs)
    assert out.dtype == (dtype if kwargs.get("reduction", "mean") == "none" else torch.promote_types(dtype, torch.float32))
    if dtype in LOW_PRECISION:
        low_out, low_grad = _loss_and_grad(
            lambda x, t, **k: reference.distribution_focal(x, t, upcast=False, **k), logits, target, cot_dtype=dtype,
            **kwargs)
        bound_out = max(rel_error(low_out, ref_out), UNIT_ROUNDOFF[dtype])
        bound_grad = max(rel_error(low_grad, ref_grad), UNIT_ROUNDOFF[dtype])
        assert_rel_close(out, ref_out, bound_out, f"{what} loss ({dtype})")
        assert_rel_close(grad, ref_grad, bound_grad, f"{what} grad ({dtype})")
    else:
        tol = TOL[dtype] if backend != "reference" or dtype == torch.float32 else 1e-12
        assert_rel_close(out, ref_out, tol, f"{what} loss ({dtype})")
        assert_rel_close(grad, ref_grad, tol, f"{what} grad ({dtype})")


SHAPES = [(1, 17), (37, 17), (5, 4, 17), (13, 5), (6, 40), (3, 300)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_float64_reference(backend, reduction):
    device = _device(backend)
    for dtype in _DTYPES[backend]:
        for i, shape in enumerate(SHAPES):
            if dtype != torch.float32 and i % 2:  # every shape in fp32, half of them in the others
                continue
            logits, target = dfl_case(shape, dtype, seed=i, device=device)
            _check(backend, logits, target, f"{backend} {shape}", reduction=reduction)
            w = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(i)).to(device)
            _check(backend, logits, target, f"{backend} {shape} weighted", reduction=reduction, weight=w)


@pytest.mark.parametrize("backend", BACKENDS)
def test_avg_factor_and_broadcast_weight(backend):
    device = _device(backend)
    logits, target = dfl_case((6, 4, 17), device=device, seed=3)
    w = torch.rand(6, 1, device=device)  # per box, broadcast over the four sides
    _check(backend, logits, target, "avg_factor 4.0", reduction="mean", weight=w.expand(6, 4), avg_factor=4.0)
    total = fl.distribution_focal(logits, target, weight=w, reduction="sum", backend=backend)
    mean = fl.distribution_focal(logits, target, weight=w, reduction="mean", backend=backend,
                                 avg_factor=torch.tensor(7.0, device=device))
    assert torch.allclose(mean, total / 7.0, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peer_formula_mmdet(backend):
    """mmdet 3.x distribution_focal_loss written out (labels < n, where mmdet is defined), with
    weight_reduce_loss's avg_factor + float32 eps through the compat drop-in."""
    device = _device(backend)
    logits, target = dfl_case((40, 17), device=device, seed=5)
    target = target.clamp(max=16 - 0.01)  # mmdet's head: bbox2distance(..., reg_max - 0.01)
    x = logits.double()
    dis_left = target.long()
    dis_right = dis_left + 1
    weight_left = dis_right.double() - target.double()
    weight_right = target.double() - dis_left.double()
    mmdet = (F.cross_entropy(x, dis_left, reduction="none") * weight_left
             + F.cross_entropy(x, dis_right, reduction="none") * weight_right)
    ours = fl.distribution_focal(logits, target, reduction="none", backend=backend)
    assert_rel_close(ours, mmdet, 1e-5 if backend != "reference" else 1e-6, "DFL vs mmdet")
    w = torch.rand(40, device=device)
    eps = torch.finfo(torch.float32).eps
    module = fl.compat.MMDetDistributionFocalLoss(loss_weight=0.25, backend=backend)
    got = module(logits, target, weight=w, avg_factor=4.0)
    want = 0.25 * (mmdet * w.double()).sum() / (4.0 + eps)
    assert_rel_close(got, want, 1e-5, "MMDetDistributionFocalLoss avg_factor")
    assert_rel_close(module(logits, target, weight=w, reduction_override="none"), 0.25 * mmdet * w.double(), 1e-5,
                     "MMDetDistributionFocalLoss 'none'")
    assert_rel_close(module(logits, target), 0.25 * mmdet.mean(), 1e-5, "MMDetDistributionFocalLoss 'mean'")
    with pytest.raises(ValueError, match="^avg_factor"):
        module(logits, target, avg_factor=4.0, reduction_override="sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_labels(backend):
    """A label on a bin edge k is CE to bin k (mmdet); at 0: CE(x, 0); at n: CE(x, n) (the limit
    from below; docs/losses/detector.md); the gradient there is softmax - onehot."""
    device = _device(backend)
    logits = (3 * torch.randn(5, 9, generator=torch.Generator().manual_seed(7), dtype=torch.float64)).float()
    logits = logits.to(device)
    target = torch.tensor([0.0, 3.0, 7.0, 8.0, 8.0], device=device)
    logits[4, 8] = 30.0  # a confident row at y = n: its tiny loss must stay accurate
    out, grad = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=torch.float32, backend=backend,
                               reduction="sum")
    ce = F.cross_entropy(logits.double(), target.long(), reduction="none")
    per_row = fl.distribution_focal(logits, target, reduction="none", backend=backend)
    assert_rel_close(per_row, ce, 1e-5, "edge rows vs cross entropy")
    # the confident row: -log p_n = log1p(sum_{c != n} e^{x_c - x_n}) exactly (float64's log of the
    # sum, as in F.cross_entropy, is off by ~1e-16 absolute: 1e-3 relative of this 3e-13 loss)
    x4 = logits[4].double()
    exact = torch.log1p(torch.exp(x4[:8] - x4[8]).sum())
    if backend != "reference":  # torch's float32 log_softmax loses it (the reason for the fused exact form)
        assert_rel_close(per_row[4], exact, 1e-5, "confident row at y = n")
    want_grad = torch.softmax(logits.double(), 1) - F.one_hot(target.long(), 9).double()
    assert_rel_close(grad, want_grad, 1e-5, "edge rows gradient")
    assert float(out) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_weight_with_nan_logits_gives_exact_zero(backend):
    device = _device(backend)
    logits, target = dfl_case((6, 17), device=device, seed=9)
    logits[2] = float("nan")
    logits[4, 3] = float("inf")
    w = torch.ones(6, device=device)
    w[2] = 0.0
    w[4] = 0.0
    for reduction in ("none", "mean", "sum"):
        out, grad = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=torch.float32, backend=backend,
                                   reduction=reduction, weight=w)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all()
        assert torch.equal(grad[2], torch.zeros(17, device=device)) and torch.equal(grad[4], torch.zeros(17, device=device))
        if reduction == "none":
            assert out[2] == 0 and out[4] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_row(backend):
    device = _device(backend)
    empty = torch.zeros(0, 17, device=device, requires_grad=True)
    for reduction in ("none", "mean", "sum"):
        out = fl.distribution_focal(empty, torch.zeros(0, device=device), reduction=reduction, backend=backend)
        assert out.shape == ((0,) if reduction == "none" else ())
        if reduction != "none":
            assert float(out.detach()) == 0.0
            out.backward()
            assert empty.grad.shape == (0, 17)


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] in ("cpu", "reference")])
def test_gradcheck_float64(backend):
    logits, target = dfl_case((4, 2, 6), torch.float64, seed=11)
    w = torch.rand(4, 2, dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):
        assert torch.autograd.gradcheck(
            lambda x: fl.distribution_focal(x, target, weight=w, reduction=reduction, backend=backend),
            (logits.clone().requires_grad_(),))


@pytest.mark.parametrize("backend", FUSED)
def test_bitwise_deterministic(backend):
    device = _device(backend)
    logits, target = dfl_case((300, 17), torch.float32 if backend != "triton" else torch.bfloat16, device=device,
                              seed=12)
    w = torch.rand(300, device=device)
    first = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=logits.dtype, backend=backend, weight=w)
    again = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=logits.dtype, backend=backend, weight=w)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    if backend == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            other = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=logits.dtype, backend=backend,
                                   weight=w)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
    if backend == "cuda_emu":
        for spec in ("threads=reverse,blocks=reverse,sms=1", "threads=random,seed=7,sms=3,blocks_per_sm=1"):
            with cuda_emu.configured(spec):
                other = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=logits.dtype,
                                       backend=backend, weight=w)
            assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1]), spec


@pytest.mark.skipif(not fl.backends()["cpu"].available, reason="cpu backend unavailable")
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    logits, target = dfl_case((8, 4, 17), seed=13)
    w = torch.rand(8, 4)

    def step(x, t, w):
        return fl.distribution_focal(x, t, weight=w, reduction="mean", avg_factor=4.0, backend="cpu", validate=False)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    out, grad = _loss_and_grad(compiled, logits, target, w, cot_dtype=torch.float32)
    eager_out, eager_grad = _loss_and_grad(step, logits, target, w, cot_dtype=torch.float32)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)


@pytest.mark.skipif(not fl.backends()["cpu"].available, reason="cpu backend unavailable")
def test_op_check_and_direct_call_range():
    """opcheck of the op (fake kernel, schema, autograd registration) and the kernel's own label
    check for direct op calls (validate=False or torch.compile paths)."""
    from tests.utils import opcheck_loss_op
    logits, target = dfl_case((7, 17), seed=14)
    for reduction in ("none", "mean"):
        opcheck_loss_op(torch.ops.fused_losses.distribution_focal_forward, (logits, target, reduction, False, None))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fused_losses.distribution_focal_forward(logits, target + 17.0, "mean", False)


def test_transforms_cpu():
    """torch.func.grad and vmap through the op layer (the transform-aware path of _ops.call_loss)."""
    if not fl.backends()["cpu"].available:
        pytest.skip("cpu backend unavailable")
    logits, target = dfl_case((5, 17), seed=15)
    g = torch.func.grad(lambda x: fl.distribution_focal(x, target, backend="cpu"))(logits)
    _, want = _loss_and_grad(fl.distribution_focal, logits, target, cot_dtype=torch.float32, backend="cpu")
    assert torch.allclose(g, want, rtol=1e-6, atol=1e-9)


def test_module_and_validation_messages():
    logits, target = dfl_case((6, 4, 17), seed=16)
    module = fl.nn.DistributionFocalLoss(reduction="sum")
    assert "reduction='sum'" in repr(module)
    assert torch.allclose(module(logits, target), fl.distribution_focal(logits, target, reduction="sum"))
    bad = [
        (lambda: fl.distribution_focal(logits, target + 16.5), ValueError, "target: value 1[6-9]"),
        (lambda: fl.distribution_focal(logits, target - 17.0), ValueError, "target: value -"),
        (lambda: fl.distribution_focal(logits, torch.full((6, 4), float("nan"))), ValueError, "target: value nan"),
        (lambda: fl.distribution_focal(logits, target[:, :3]), ValueError, "target: expected shape"),
        (lambda: fl.distribution_focal(logits[..., :1], target), ValueError, "logits"),
        (lambda: fl.distribution_focal(logits, target.bool()), TypeError, "target"),
        (lambda: fl.distribution_focal(logits.long(), target), TypeError, "logits"),
        (lambda: fl.distribution_focal(logits, target, weight=torch.ones(5)), ValueError, "weight"),
        (lambda: fl.distribution_focal(logits, target, weight=torch.full((6, 4), float("inf"))), ValueError, "weight"),
        (lambda: fl.distribution_focal(logits, target, reduction="sum", avg_factor=2.0), ValueError, "avg_factor"),
        (lambda: fl.distribution_focal(logits, target, reduction="avg"), ValueError, "reduction"),
        (lambda: fl.distribution_focal(logits, target.to("meta")), ValueError, "target"),
    ]
    for call, exc, match in bad:
        with pytest.raises(exc, match=f"^{match}"):
            call()
    # integer labels are bin indices; validate=False skips the host scan (CPU kernels still check)
    assert torch.allclose(fl.distribution_focal(logits, target.round().long()),
                          fl.distribution_focal(logits, target.round()))
    with pytest.raises(RuntimeError, match="out of range"):
        fl.distribution_focal(logits, target + 17.0, validate=False, backend="cpu")


def test_target_that_requires_grad_runs_on_reference():
    logits, target = dfl_case((4, 17), seed=17)
    y = target.clone().requires_grad_()
    loss = fl.distribution_focal(logits, y)
    loss.backward()
    assert y.grad is not None  # the reference differentiates the label (mmdet's weights are linear in it)
    if fl.backends()["cpu"].available:
        with pytest.raises(RuntimeError, match="backend 'cpu' cannot run distribution_focal with a target"):
            fl.distribution_focal(logits, y, backend="cpu")
