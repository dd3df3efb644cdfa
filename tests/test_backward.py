"""The backward of the compiled ops (fused_losses/_ops.py, csrc/ops.cpp): which gradient is
saved, what `loss.backward()` costs, retain_graph, torch.compile and the scale_grad_ op.

Runs for every compiled backend on the tensors it serves: 'cpu' on CPU tensors, 'triton' on CPU
tensors under TRITON_INTERPRET=1 (the CI set-up, tests/conftest.py) and on CUDA tensors, 'cuda'
on CUDA tensors, 'cuda_emu' (the CUDA kernels on the CPU emulator, tests/cuda_emu; under `make
test-cuda-emu`) on CPU tensors; a pair whose backend is unavailable here is skipped with the reason.

* A reduced loss ('mean'/'sum') with bf16/fp32/fp64 logits saves its gradient in the logits
  dtype; `loss.backward()` then dispatches exactly one op, fused_losses::scale_grad_, which
  touches nothing but two scalars (grad_output == applied_scale == 1), and the gradient the
  user gets is the saved buffer itself (no copy). 'none' and fp16 save float32 and scale out of
  place (fp16: GradScaler's 2^16 must multiply float32 values).
* retain_graph=True with changing grad_output never scales twice, eager and compiled.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_losses as fl
from fused_losses import _ops
from tests.conftest import DEVICES
from tests.cuda_emu import backend as cuda_emu
from tests.utils import TOL, UNIT_ROUNDOFF, assert_rel_close, sigmoid_case, softmax_case


PAIRS = [("cpu", "cpu"), ("triton", "cpu"), ("cuda_emu", "cpu")] + [("cuda", "cuda"), ("triton", "cuda")] * ("cuda" in DEVICES)
PAIR_IDS = [f"{b}-{d}" for b, d in PAIRS]


def _require(backend: str) -> str:
    available, reason = cuda_emu.BACKEND.availability() if backend == "cuda_emu" else fl.backends()[backend]
    if not available:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    return backend


def _dtypes(backend: str):
    return [torch.float32, torch.bfloat16, torch.float64] if backend == "cpu" else [torch.float32, torch.bfloat16]


# One small case per loss: (name, make(dtype, device) -> (logits, target, extra), kwargs).
def _focal_case(dtype, device):
    return softmax_case((37, 11), dtype, device, ignore_frac=0.2, seed=1) + ((),)


def _sigmoid_case(dtype, device):
    return sigmoid_case((37, 11), dtype, device, kind="labels", seed=2) + ((),)


def _ohem_case(dtype, device):
    return softmax_case((64, 7), dtype, device, seed=3) + ((),)


def _ghmc_case(dtype, device):
    return sigmoid_case((37, 11), dtype, device, kind="float", seed=4) + ((),)


def _ib_case(dtype, device):
    logits, target = softmax_case((37, 11), dtype, device, seed=5)
    features = torch.rand(37, 8, generator=torch.Generator().manual_seed(6)).to(device)
    return logits, target, (features,)


CASES = {
    "focal": (_focal_case, dict(gamma=2.0, alpha=0.25)),
    "sigmoid_focal": (_sigmoid_case, dict(alpha=0.25, gamma=2.0)),
    "ohem": (_ohem_case, dict(keep=0.5)),
    "ghmc": (_ghmc_case, dict(bins=10)),
    "ib": (_ib_case, dict(alpha=100.0)),
}


_NAMESPACES = {"triton": "fused_losses_triton", "cuda_emu": cuda_emu.NAMESPACE}


def _inplace_op_name(backend: str) -> str:
    return f"{_NAMESPACES.get(backend, 'fused_losses')}.scale_grad_"


def _inplace_op(backend: str):
    return getattr(torch.ops, _NAMESPACES.get(backend, "fused_losses")).scale_grad_


class _OpLog(TorchDispatchMode):
    """Every op dispatched while active (backward included: the engine runs on this thread
    for CPU tensors, and the mode is thread-local, so it is entered around backward)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _reference_grad(loss, logits, target, extra, reduction, cot, **kwargs):
    x = logits.detach().double().requires_grad_(True)
    ex = [e.double() for e in extra]
    out = getattr(fl, loss)(x, target, *ex, reduction=reduction, backend="reference", **kwargs)
    (g,) = torch.autograd.grad(out, x, cot.double() if isinstance(cot, torch.Tensor) else torch.tensor(cot, dtype=torch.float64, device=x.device))
    return g


def _tolerance(dtype):
    # A reduced loss's gradient in low precision is rounded once (grad_output = 1) or twice
    # (saved in bf16, then rescaled): within a few units of roundoff of float64.
    return TOL[dtype] if dtype in TOL else 4 * UNIT_ROUNDOFF[dtype]


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", list(CASES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_saved_gradient_dtype(backend, device, loss, reduction):
    backend = _require(backend)
    make, kwargs = CASES[loss]
    for dtype in _dtypes(backend) + [torch.float16]:
        logits, target, extra = make(dtype, device)
        x = logits.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            getattr(fl, loss)(x, target, *extra, reduction=reduction, backend=backend, **kwargs)
        big = [t for t in saved if t.shape == logits.shape]
        assert len(big) == 1, f"{loss}: expected one logits-sized saved tensor, got {[t.shape for t in saved]}"
        assert big[0].dtype == _ops.saved_grad_dtype(dtype, reduction)
        expected = dtype if reduction != "none" and dtype != torch.float16 else torch.promote_types(dtype, torch.float32)
        assert big[0].dtype == expected


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", list(CASES))
def test_unit_backward_is_one_scalar_op_and_no_copy(backend, device, loss):
    """loss.backward() on a reduced loss: the only op is scale_grad_ (which reads two scalars
    and finds them equal), and the leaf's .grad is the forward's gradient buffer itself."""
    if device != "cpu":
        pytest.skip("the dispatch log is taken on the CPU engine thread; CUDA is covered by the counts test")
    backend = _require(backend)
    make, kwargs = CASES[loss]
    for dtype in _dtypes(backend):
        logits, target, extra = make(dtype, device)
        x = logits.clone().requires_grad_(True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = getattr(fl, loss)(x, target, *extra, reduction="mean", backend=backend, **kwargs)
        buffer_ptr = next(t for t in saved if t.shape == logits.shape).data_ptr()
        del saved
        log = _OpLog()
        with log:
            out.backward()
        grad_ops = [op for op in log.ops if op not in ("aten.ones_like", "aten.empty_like", "aten.detach")]
        # ib: the (N,)-sized feature gradient goes through scale_grad and torch's own abs/sum
        # backward; nothing logits-sized but scale_grad_.
        if loss == "ib":
            assert grad_ops.count(_inplace_op_name(backend)) == 1, f"ib {dtype}: backward dispatched {log.ops}"
        else:
            assert grad_ops == [_inplace_op_name(backend)], f"{loss} {dtype}: backward dispatched {log.ops}"
        assert x.grad.dtype == dtype
        assert x.grad.data_ptr() == buffer_ptr, f"{loss} {dtype}: .grad is a copy of the saved gradient"


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", list(CASES))
def test_retain_graph_never_scales_twice(backend, device, loss):
    backend = _require(backend)
    make, kwargs = CASES[loss]
    for dtype in _dtypes(backend):
        logits, target, extra = make(dtype, device)
        for reduction in ("mean", "sum"):
            x = logits.clone().requires_grad_(True)
            out = getattr(fl, loss)(x, target, *extra, reduction=reduction, backend=backend, **kwargs)
            grads = []
            for go in (1.0, 3.0, 3.0, 1.0, -0.5):
                (g,) = torch.autograd.grad(out, x, torch.tensor(go, dtype=out.dtype, device=device), retain_graph=True)
                grads.append(g.clone())
                ref = _reference_grad(loss, logits, target, extra, reduction, go, **kwargs)
                assert_rel_close(g, ref, _tolerance(dtype), f"{loss} {reduction} {dtype} grad_output {go}")
            # The same grad_output again: the kernel finds it applied and touches nothing.
            assert torch.equal(grads[1], grads[2]), "the same grad_output twice must give the same gradient"


@pytest.mark.compile
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
@pytest.mark.parametrize("loss", ["focal", "sigmoid_focal"])
def test_compiled_retain_graph_never_scales_twice(backend, device, loss):
    backend = _require(backend)
    make, kwargs = CASES[loss]
    logits, target, extra = make(torch.float32, device)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t: getattr(fl, loss)(x, t, backend=backend, reduction="mean", **kwargs),
                       fullgraph=True)
    x = logits.clone().requires_grad_(True)
    out = fn(x, target)
    for go in (1.0, 3.0, 1.0, 2.0):
        (g,) = torch.autograd.grad(out, x, torch.tensor(go, device=device), retain_graph=True)
        ref = _reference_grad(loss, logits, target, extra, "mean", go, **kwargs)
        assert_rel_close(g, ref, TOL[torch.float32], f"compiled {loss}, grad_output {go}")


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_fp16_large_mean_with_a_gradscaler_scale_does_not_underflow(backend, device):
    """fp16 keeps a float32 saved gradient: at 65536 rows x 8 classes a 'mean' gradient is
    ~2e-6 per element, near fp16's subnormals; GradScaler's 2^16 must multiply the float32 value."""
    backend = _require(backend)
    if backend == "triton" and device == "cpu":
        pytest.skip("524288 elements is too many for the Triton interpreter in CI (fp16 rule: launch.grad_dtype)")
    logits, target = softmax_case((65536, 8), torch.float16, device, seed=7)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, gamma=2.0, backend=backend)
    (g,) = torch.autograd.grad(out, x, torch.tensor(65536.0, device=device))
    ref = _reference_grad("focal", logits, target, (), "mean", 65536.0, gamma=2.0)
    assert_rel_close(g, ref, 2 * UNIT_ROUNDOFF[torch.float16], "fp16 focal, grad_output 2^16")


# --------------------------------------------------------------------------------------------
# The op itself
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_scale_grad_inplace_op(backend, device):
    _require(backend)
    for dtype in _dtypes(backend):
        math = torch.promote_types(dtype, torch.float32)
        grad = torch.randn(6, 5, dtype=dtype, device=device)
        before = grad.clone()
        applied = torch.ones((), dtype=math, device=device)
        _inplace_op(backend)(grad, torch.ones((), dtype=math, device=device), applied)
        assert torch.equal(grad, before) and applied.item() == 1.0
        _inplace_op(backend)(grad, torch.tensor(4.0, dtype=math, device=device), applied)
        assert torch.equal(grad, (before.to(math) * 4).to(dtype)) and applied.item() == 4.0
        _inplace_op(backend)(grad, torch.tensor(2.0, dtype=math, device=device), applied)
        assert torch.equal(grad, (before.to(math) * 2).to(dtype)) and applied.item() == 2.0
        assert grad._version == 0, "scale_grad_ must not bump the saved tensor's version counter"
        # A contiguous view at an odd offset (not 16-byte aligned: the CUDA kernel's scalar path).
        base = torch.randn(1 + 8 * 3 + 5, dtype=dtype, device=device)
        view, expect = base[1:], (base[1:].to(math) * -0.5).to(dtype)
        applied = torch.ones((), dtype=math, device=device)
        _inplace_op(backend)(view, torch.tensor(-0.5, dtype=math, device=device), applied)
        assert torch.equal(view, expect) and applied.item() == -0.5
        with pytest.raises(RuntimeError, match="applied_scale"):
            _inplace_op(backend)(grad, torch.ones((), dtype=math, device=device), torch.ones(2, dtype=math, device=device))


@pytest.mark.parametrize("backend,device", PAIRS, ids=PAIR_IDS)
def test_scale_grad_inplace_opcheck(backend, device):
    _require(backend)
    for dtype in _dtypes(backend):
        math = torch.promote_types(dtype, torch.float32)
        for go in (1.0, 0.25):
            args = (torch.randn(4, 3, dtype=dtype, device=device), torch.tensor(go, dtype=math, device=device),
                    torch.ones((), dtype=math, device=device))
            torch.library.opcheck(_inplace_op(backend).default, args)
