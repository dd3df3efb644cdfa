"""The compiled backends against the float64 reference, one module for both devices.

What runs where. Every test takes a ``dev`` parameter, one of

  cpu   backend='cpu' (fused C++ kernels, csrc/cpu) on CPU tensors. Runs wherever the extension
        is built, i.e. in every CI run. Matrix dtypes float32, bfloat16, float64; N in {0, 1, 7}.
  cuda  backend='cuda' (hand-written kernels, csrc/cuda/*.cu) on CUDA tensors. Runs
        only where fl.backends()['cuda'].available (extension built with its CUDA part, every op
        with a CUDA kernel, a GPU visible). Elsewhere its cases are not collected and the one test
        test_backend_unavailable[cuda] is skipped with the backend's reason and the number of
        cases left out (the CUDA object is still compiled by every build that finds nvcc, and
        tests/test_api.py checks compiled_with_cuda()). Matrix dtypes float32, bfloat16, float16;
        N in {0, 1, 7, 4096} (4096 for every third configuration of a matrix).
  cuda_emu  backend='cuda_emu' (tests/cuda_emu/backend.py): the same CUDA kernels compiled for
        the CPU emulator (csrc/cuda_emu), on CPU tensors; runs under `make test-cuda-emu` (which
        sets FL_CUDA_EMU to a schedule). Every test of the cuda side except the ones that need a
        real GPU (no host sync, numel > 2^31) and the automatic choice; sizes as cuda except
        N = 1024 for the big cases (CI time). Determinism is also checked across emulator
        schedules (thread order, block order, multiprocessor count).

On both: the loss matrices and the special shapes/inputs of every loss against the reference,
torch.library.opcheck on every op, torch.compile(fullgraph=True), bitwise determinism, GHM-C EMA
state, IB feature gradient, retain_graph, double backward, the automatic backend choice. Where
the two differ (dtypes, shapes, samples, compile cases), the per-device lists sit next to the
test, keyed by device.

Only cpu: float64 gradcheck, determinism for any thread count, the (4096, 80) focal case,
GHMCLoss owning its state, forward-only calls, out-of-range targets rejected by direct op calls,
reuse of output buffers never visible to the caller.

Only cuda: every reference comparison also compares cuda against the cpu backend (when
available; both run csrc/losses_math.h), row lengths at every register-layout boundary of the
row kernels, misaligned views, no host synchronisation (torch.cuda.set_sync_debug_mode('error')),
fresh outputs never aliasing the inputs, numel > 2^31 in bf16 (skipped below 40 GB of free GPU
memory).

Every comparison runs the same public function twice: the backend under test on the test
dtype and backend='reference' on a float64 copy (on the same device), and applies the exactness
rule of tests/utils.py (fp16/bf16: at least as close as the eager reference run in the same low
precision).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import fused_losses as fl
from fused_losses import _backends, _validate, reference
from tests.cuda_emu import backend as cuda_emu
from tests.utils import (LOW_PRECISION, TOL, UNIT_ROUNDOFF, assert_matches_reference, assert_rel_close, loss_and_grad,
                         opcheck_loss_op, rel_error, sigmoid_case, softmax_case)

OPS = torch.ops.fused_losses
CLASSES = [1, 3, 80, 1203]
BIG_N = 4096


@dataclass(frozen=True)
class Device:
    """One side of the module: a compiled backend and the tensors it serves."""
    name: str  # test id, and the key of the per-device lists
    backend: str  # the backend under test
    device: str  # where its tensors live
    dtypes: tuple  # logits dtypes of the matrices
    ns: tuple  # N of the (N, C) matrices
    wide: torch.dtype  # the widest logits dtype the backend takes
    available: bool
    reason: str
    ops: object = OPS  # the op namespace of its kernels (direct op calls)


def _device(name, dtypes, ns, wide):
    status = fl.backends()[name]
    return Device(name, name, name, dtypes, ns, wide, status.available, f"{name} backend unavailable: {status.reason}")


CPU = _device("cpu", (torch.float32, torch.bfloat16, torch.float64), (0, 1, 7), torch.float64)
CUDA = _device("cuda", (torch.float32, torch.bfloat16, torch.float16), (0, 1, 7, BIG_N), torch.float32)
EMU_BIG_N = 1024
CUDA_EMU = Device("cuda_emu", "cuda_emu", "cpu", (torch.float32, torch.bfloat16, torch.float16), (0, 1, 7, EMU_BIG_N),
                  torch.float32, cuda_emu.available(), f"cuda_emu backend unavailable: {cuda_emu.reason()}",
                  cuda_emu.ops() if cuda_emu.available() else None)


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


_NOT_RUN = {"cpu": 0, "cuda": 0, "cuda_emu": 0}  # cases left out because the device's backend is unavailable


def on(*devices: Device, args: str = "", cases=None):
    """parametrize('dev', *args) over `devices`: cases(dev) yields the values of `args` for that
    device (a value, or a tuple when there are several args). The cases of an unavailable device
    are left out and counted; test_backend_unavailable skips once for them, with the reason."""
    names = [a.strip() for a in args.split(",") if a.strip()]

    def decorate(fn):
        params = []
        for dev in devices:
            per_device = [case if len(names) != 1 else (case,) for case in (cases(dev) if names else [()])]
            if not dev.available:
                _NOT_RUN[dev.name] += len(per_device)
                continue
            params += [pytest.param(dev, *case, id="-".join([dev.name, *map(_id, case)])) for case in per_device]
        if not params:  # only unavailable devices: not collected (pytest would skip an empty parameter set)
            fn.__test__ = False
            return fn
        return pytest.mark.parametrize(["dev", *names], params)(fn)
    return decorate


# Normalised-argument defaults, to run the reference in low precision
# (reference.<loss>(..., upcast=False) takes the normalised kwargs of fused_losses._validate).
_DEFAULTS = {
    "focal": dict(gamma=2.0, alpha=None, ignore_index=-100, reduction="mean", from_logits=True),
    "sigmoid_focal": dict(alpha=0.25, gamma=2.0, ignore_index=-100, reduction="none"),
    "ohem": dict(keep=0.25, thresh=None, min_kept=None, ignore_index=-100, reduction="mean"),
    "ghmc": dict(bins=10, momentum=0.0, state=None, use_sigmoid=True, ignore_index=-100, reduction="mean"),
    "ib": dict(alpha=1000.0, epsilon=1e-3, weight=None, gamma=0.0, detach_factor=False, reduction="mean"),
}


def _to(device, value):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _eager_low_precision(loss, logits, target, extra, kwargs):
    """reference.<loss> run in the logits' low precision (upcast=False): the accuracy baseline."""
    full = {**_DEFAULTS[loss], **kwargs}
    norm = getattr(_validate, f"{loss}_args")(logits, target, *extra, **full, validate=False)
    fn = getattr(reference, loss)
    return loss_and_grad(lambda x, t, *e: fn(x, t, *e, **norm, upcast=False), logits, target, *extra)


def _reference_loss_and_grad(fn, logits64, *args, cot_dtype, **kwargs):
    """loss_and_grad for the float64 reference, fed the cotangent the tested call received
    (loss_and_grad draws it in float64 and rounds it to the output dtype): the reference must
    see the same inputs, or a bf16 'none' test would charge the cotangent's rounding to the
    kernel."""
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


def check(dev, loss, logits, target, *extra, what="", **kwargs):
    """dev's backend on copies of the inputs on dev's device vs the float64 reference; loss and
    logits gradient. On cuda also vs the cpu backend (when available). Returns (loss, grad)."""
    fn = getattr(fl, loss)
    x, t = logits.to(dev.device), target.to(dev.device)
    ex = [e.to(dev.device) for e in extra]
    kw = {k: _to(dev.device, v) for k, v in kwargs.items()}
    out, grad = loss_and_grad(fn, x, t, *ex, backend=dev.backend, **kw)
    ex64 = [e.double() if e.is_floating_point() else e for e in ex]
    ref, ref_grad = _reference_loss_and_grad(fn, x.double(), t, *ex64, cot_dtype=out.dtype, backend="reference", **kw)
    dtype = logits.dtype
    eager_out = eager_grad = None
    if dtype in LOW_PRECISION:
        eager_out, eager_grad = _eager_low_precision(loss, x, t, ex, kw)
    label = f"{loss} {what} {kwargs if len(str(kwargs)) < 200 else ''}"
    expected_dtype = dtype if kwargs.get("reduction", _DEFAULTS[loss]["reduction"]) == "none" else \
        torch.promote_types(dtype, torch.float32)
    assert out.device == x.device and grad.device == x.device
    assert out.dtype == expected_dtype, f"{label}: loss dtype {out.dtype} != {expected_dtype}"
    assert out.shape == ref.shape, f"{label}: loss shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert grad.dtype == dtype and grad.shape == logits.shape
    _assert_accurate(out, ref, dtype, f"{label} loss", eager_out)
    _assert_accurate(grad, ref_grad, dtype, f"{label} grad", eager_grad)
    if dev.name != "cpu" and CPU.available and "state" not in kwargs:
        kw_cpu = {k: _to("cpu", v) for k, v in kwargs.items()}
        cpu_out, cpu_grad = loss_and_grad(fn, logits.cpu(), target.cpu(), *[e.cpu() for e in extra], backend="cpu",
                                          **kw_cpu)
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


def _matrix(dev, configs, *axes, ns=None):
    """(dtype, c, n, *axes, *config) over dev.dtypes x CLASSES x N x axes x configs; the largest
    N (cuda 4096, cuda_emu 1024) only for every third configuration."""
    for dtype, c, n, *rest, (index, config) in itertools.product(dev.dtypes, CLASSES, dev.ns if ns is None else ns,
                                                                 *axes, enumerate(configs)):
        if n < min(BIG_N, EMU_BIG_N) or index % 3 == 0:
            yield (dtype, c, n, *rest, *config)


def _alpha_value(kind, c):
    if kind == "none":
        return None
    if kind == "float":
        return 0.25
    return torch.linspace(0.1, 0.9, c).tolist()


# --------------------------------------------------------------------------------------------
# Softmax focal
# --------------------------------------------------------------------------------------------
_FOCAL_CONFIGS = [(0.0, "none"), (0.5, "per_class"), (2.0, "float"), (2.0, "none"), (0.5, "float"), (0.0, "per_class")]


@on(CPU, CUDA, CUDA_EMU, args="dtype, c, n, reduction, gamma, alpha_kind",
    cases=lambda dev: _matrix(dev, _FOCAL_CONFIGS, ["mean", "sum", "none"]))
def test_focal_matrix(dev, dtype, c, n, reduction, gamma, alpha_kind):
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 7 + c)
    check(dev, "focal", logits, target, gamma=gamma, alpha=_alpha_value(alpha_kind, c), reduction=reduction)


_ROW_LENGTHS = [4, 5, 8, 10, 16, 17, 32, 33, 40, 64, 72, 128, 129, 256, 512, 1000, 1024, 1032, 4096, 5000]


@on(CUDA, CUDA_EMU, args="dtype, c", cases=lambda dev: itertools.product(dev.dtypes, _ROW_LENGTHS))
def test_focal_every_row_kernel(dev, dtype, c):
    """Row lengths on both sides of every register layout (packs of 16 bytes when C is a
    multiple of 8 (fp16/bf16) or 4 (fp32), single values otherwise; boundaries at 4, 8, 10, 12,
    24, 48 and 128 packs per row: 9-10 packs take 2 lanes x 5, e.g. C = 10 single values, fp32
    C = 40, 16-bit C = 72 and 80) and the three-sweep kernel for long rows."""
    logits, target = softmax_case((37, c), dtype, ignore_frac=0.1, seed=c)
    check(dev, "focal", logits, target, gamma=2.0, reduction="none")
    check(dev, "focal", logits, target, gamma=0.5, alpha=0.25, reduction="mean")


_SPATIAL_SHAPES = [(2, 3, 5, 37), (3, 19, 8, 9), (1, 1, 4, 4), (2, 80, 33), (2, 5, 2, 3, 7)]
_SPATIAL = {  # shapes, reductions
    "cpu": (_SPATIAL_SHAPES, ["mean", "none"]),
    # and channel counts around the 32 classes the spatial kernel keeps in registers, and empty;
    # the last two: more positions than the one-SM emulator schedule has threads (S = 300 and
    # 1230 against grid strides of 256-1024), so the register kernel's row offset, advanced by the
    # grid stride, wraps into the next image.
    "cuda": (_SPATIAL_SHAPES + [(2, 32, 17, 3), (2, 33, 17, 3), (2, 150, 8, 9), (0, 4, 3, 3), (2, 4, 0),
                                (3, 19, 15, 20), (4, 19, 30, 41)],
             ["mean", "none", "sum"]),
}
_SPATIAL["cuda_emu"] = _SPATIAL["cuda"]


@on(CPU, CUDA, CUDA_EMU, args="dtype, shape, reduction", cases=lambda dev: itertools.product(dev.dtypes, *_SPATIAL[dev.name]))
def test_focal_spatial(dev, dtype, shape, reduction):
    logits, target = softmax_case(shape, dtype, ignore_frac=0.15, ignore_index=255, seed=sum(shape))
    check(dev, "focal", logits, target, gamma=2.0, alpha=0.5, ignore_index=255, reduction=reduction)


@on(CPU)
def test_focal_large(dev):
    logits, target = softmax_case((4096, 80), torch.float32, ignore_frac=0.1, seed=3)
    check(dev, "focal", logits, target, gamma=2.0, alpha=torch.rand(80).tolist())


@on(CPU, CUDA, CUDA_EMU)
def test_focal_int32_target_and_non_contiguous_logits(dev):
    base, target = softmax_case((80, 37), torch.float32, seed=5)
    logits = base.t()  # (37, 80) non-contiguous view
    assert not logits.is_contiguous()
    check(dev, "focal", logits, target[:37].to(torch.int32) % 80, gamma=0.5)
    strided = softmax_case((9, 20), torch.float32, seed=6)[0][:, ::2]
    check(dev, "focal", strided, torch.randint(0, 10, (9,)), gamma=2.0, reduction="none")
    channels_last = softmax_case((2, 7, 5, 6), torch.float32, seed=7)[0].to(memory_format=torch.channels_last)
    check(dev, "focal", channels_last, torch.randint(0, 7, (2, 5, 6)), gamma=2.0)


@on(CUDA, CUDA_EMU)
def test_misaligned_views(dev):
    """Views that start off a 16-byte boundary (the public API would copy them in the test
    helpers, so the ops are called directly): softmax rows take the unpacked kernel, sigmoid
    inputs are copied once; results as for an aligned copy."""
    flat = (3 * torch.randn(8 * 64 + 3, device=dev.device)).bfloat16()
    view = flat[1:1 + 8 * 64].reshape(8, 64)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    t = torch.randint(0, 64, (8,), device=dev.device)
    for reduction in ("none", "sum"):
        loss_v, grad_v = dev.ops.softmax_focal_forward(view, t, None, 1.0, 2.0, -100, reduction, True, True)
        loss_c, grad_c = dev.ops.softmax_focal_forward(view.clone(), t, None, 1.0, 2.0, -100, reduction, True, True)
        assert_rel_close(loss_v, loss_c, 1e-2, "focal loss, misaligned view")  # bf16 'none' output
        assert_rel_close(grad_v, grad_c, 1e-5, "focal grad, misaligned view")
    labels = torch.randint(0, 65, (8,), device=dev.device)
    for target in (labels, (torch.rand(8, 64, device=dev.device) < 0.2).bfloat16()):
        loss_v, grad_v = dev.ops.sigmoid_focal_forward(view, target, 0.25, 2.0, -100, "none", True)
        loss_c, grad_c = dev.ops.sigmoid_focal_forward(view.clone(), target, 0.25, 2.0, -100, "none", True)
        assert torch.equal(loss_v, loss_c) and torch.equal(grad_v, grad_c)


@on(CPU, CUDA, CUDA_EMU)
def test_focal_from_probabilities(dev):
    logits, target = softmax_case((7, 5), torch.float32, ignore_frac=0.2, seed=9)
    probs = torch.softmax(logits, dim=1)
    for gamma in (0.0, 0.5, 2.0):
        check(dev, "focal", probs, target, gamma=gamma, from_logits=False, alpha=0.3)
    probs4, target4 = softmax_case((2, 4, 3, 5), dev.wide, seed=10)
    check(dev, "focal", torch.softmax(probs4, 1), target4, from_logits=False, reduction="none")


@on(CPU, CUDA, CUDA_EMU, args="gamma", cases=lambda dev: [0.0, 0.25, 0.5, 2.0])
def test_focal_gradient_finite_as_pt_goes_to_one(dev, gamma):
    # p_t rounds to 1 in fp32 for margins over ~17 and in fp64 over ~37; the gradient must be
    # finite (the limit), equal to the reference's explicit formula.
    margins = torch.tensor([0.0, 5.0, 17.0, 40.0, 80.0, 200.0], dtype=torch.float64)
    logits = torch.zeros(6, 4, dtype=torch.float64)
    logits[:, 2] = margins
    target = torch.full((6,), 2)
    for dtype in dev.dtypes:
        _, grad = check(dev, "focal", logits.to(dtype), target, gamma=gamma, reduction="sum")
        assert torch.isfinite(grad).all()


@on(CPU, CUDA, CUDA_EMU)
def test_all_ignored_gives_zero_and_zero_grad(dev):
    logits, target = softmax_case((5, 3), torch.float32, dev.device, seed=1)
    target[:] = -100
    for fn in (fl.focal, fl.ohem):
        out, grad = loss_and_grad(fn, logits, target, backend=dev.backend)
        assert out.item() == 0.0 and torch.count_nonzero(grad) == 0


@on(CPU, CUDA, CUDA_EMU)
def test_nan_logits_propagate_like_the_reference(dev):
    logits, target = softmax_case((6, 4), torch.float32, seed=2)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("nan")
    target[3] = -100  # NaN in an ignored row must not leak
    check(dev, "focal", logits, target, reduction="none")
    slogits, starget = sigmoid_case((6, 4), torch.float32, kind="float", seed=2)
    slogits[2, 1] = float("nan")
    check(dev, "sigmoid_focal", slogits, starget, reduction="none")


# --------------------------------------------------------------------------------------------
# Sigmoid focal
# --------------------------------------------------------------------------------------------
_SIGMOID_CONFIGS = [(2.0, 0.25, "none"), (0.5, -1.0, "mean"), (0.0, 0.75, "sum"), (0.5, 0.25, "none")]


@on(CPU, CUDA, CUDA_EMU, args="dtype, c, n, kind, gamma, alpha, reduction",
    cases=lambda dev: _matrix(dev, _SIGMOID_CONFIGS, ["labels", "float", "soft"]))
def test_sigmoid_focal_matrix(dev, dtype, c, n, kind, gamma, alpha, reduction):
    logits, target = sigmoid_case((n, c), dtype, kind=kind, ignore_frac=0.2, seed=n * 11 + c)
    check(dev, "sigmoid_focal", logits, target, gamma=gamma, alpha=alpha, reduction=reduction)


@on(CPU, CUDA, CUDA_EMU)
def test_sigmoid_focal_shapes_tails_layouts_and_mixed_targets(dev):
    logits, labels = sigmoid_case((4096, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=4)
    check(dev, "sigmoid_focal", logits, labels, reduction="sum")
    logits, target = sigmoid_case((2, 3, 5, 7), torch.float32, kind="soft", seed=5)
    check(dev, "sigmoid_focal", logits, target, reduction="none")
    logits, labels = sigmoid_case((2, 3, 5, 7), torch.bfloat16, kind="labels", ignore_frac=0.2, seed=6)
    check(dev, "sigmoid_focal", logits, labels.to(torch.int32), reduction="mean")
    logits, target = sigmoid_case((9,), dev.wide, kind="float", seed=7)  # 1-D logits: one sample
    check(dev, "sigmoid_focal", logits, target, reduction="mean")
    # numel not a multiple of the 16-byte pack; rows shorter than a pack (labels change inside a pack).
    for shape in [(13, 3), (5, 1), (7, 9), (3, 2, 5)]:
        for dtype in dev.dtypes:
            logits, labels = sigmoid_case(shape, dtype, kind="labels", ignore_frac=0.3, seed=sum(shape))
            check(dev, "sigmoid_focal", logits, labels, reduction="none")
    logits, target = sigmoid_case((40, 12), torch.float32, kind="soft", seed=8)
    check(dev, "sigmoid_focal", logits.t(), target.t(), reduction="none")  # non-contiguous
    check(dev, "sigmoid_focal", logits, target.double(), reduction="sum")  # float64 target, float32 logits
    check(dev, "sigmoid_focal", logits.bfloat16(), target, reduction="mean")  # float32 target, bf16 logits
    if torch.float16 in dev.dtypes:
        check(dev, "sigmoid_focal", logits.half(), target.bfloat16(), reduction="none")


# --------------------------------------------------------------------------------------------
# OHEM
# --------------------------------------------------------------------------------------------
_OHEM_CONFIGS = [(0.25, "mean"), (3, "none"), (1.0, "sum"), (100, "mean")]


@on(CPU, CUDA, CUDA_EMU, args="dtype, c, n, keep, reduction", cases=lambda dev: _matrix(dev, _OHEM_CONFIGS))
def test_ohem_matrix(dev, dtype, c, n, keep, reduction):
    logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 13 + c)
    check(dev, "ohem", logits, target, keep=keep, reduction=reduction)


@on(CPU, CUDA, CUDA_EMU, args="dtype, thresh, min_kept",
    cases=lambda dev: [(dtype, *pair) for dtype in dev.dtypes for pair in [(0.7, 0), (0.7, 50), (0.05, 10), (1.1, 5)]])
def test_ohem_threshold_mode(dev, dtype, thresh, min_kept):
    logits, target = softmax_case((2, 19, 6, 11), dtype, ignore_frac=0.1, ignore_index=255, seed=21)
    check(dev, "ohem", logits, target, thresh=thresh, min_kept=min_kept, ignore_index=255)
    logits, target = softmax_case((50, 7), dtype, ignore_frac=0.1, seed=22)
    check(dev, "ohem", logits, target, thresh=thresh, min_kept=min_kept, reduction="none")


@on(CPU, CUDA, CUDA_EMU)
def test_ohem_ties_go_to_the_lower_index_and_large(dev):
    logits = torch.zeros(12, 4)
    target = torch.zeros(12, dtype=torch.long)  # every CE equal: kept = the first k rows
    out, _ = loss_and_grad(fl.ohem, logits.to(dev.device), target.to(dev.device), keep=5, reduction="none",
                           backend=dev.backend)
    assert torch.equal((out != 0).cpu(), torch.arange(12) < 5)
    check(dev, "ohem", logits, target, keep=0.5, reduction="none")
    logits, target = softmax_case((4096, 80), torch.float32, ignore_frac=0.1, seed=23)
    check(dev, "ohem", logits, target, keep=0.3)
    logits, target = softmax_case((2, 19, 32, 40), torch.float32, ignore_frac=0.1, ignore_index=255, seed=24)
    check(dev, "ohem", logits, target, keep=0.3, ignore_index=255)


# --------------------------------------------------------------------------------------------
# GHM-C
# --------------------------------------------------------------------------------------------
_GHMC_CONFIGS = [(10, "mean"), (1, "sum"), (30, "none")]


@on(CPU, CUDA, CUDA_EMU, args="dtype, c, n, mode, bins, reduction",
    cases=lambda dev: _matrix(dev, _GHMC_CONFIGS, ["labels", "float", "softmax"]))
def test_ghmc_matrix(dev, dtype, c, n, mode, bins, reduction):
    if mode == "softmax":
        logits, target = softmax_case((n, c), dtype, ignore_frac=0.2, seed=n * 17 + c)
    else:
        logits, target = sigmoid_case((n, c), dtype, kind=mode, ignore_frac=0.2, seed=n * 17 + c)
    check(dev, "ghmc", logits, target, bins=bins, use_sigmoid=mode != "softmax", reduction=reduction)


@on(CPU, CUDA, CUDA_EMU)
def test_ghmc_large_spatial_and_many_bins(dev):
    logits, labels = sigmoid_case((4096, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=31)
    check(dev, "ghmc", logits, labels)
    logits, target = softmax_case((2, 19, 16, 20), torch.float32, ignore_frac=0.1, ignore_index=255, seed=32)
    check(dev, "ghmc", logits, target, use_sigmoid=False, ignore_index=255, reduction="none")
    # More bins than the CUDA shared-memory histogram holds (there: the global-atomic path).
    logits, labels = sigmoid_case((512, 80), torch.float32, kind="labels", ignore_frac=0.05, seed=33)
    check(dev, "ghmc", logits, labels, bins=5000)


@on(CPU, CUDA, CUDA_EMU, args="use_sigmoid", cases=lambda dev: [True, False])
def test_ghmc_ema_state(dev, use_sigmoid):
    """state: updated in place on the device first (only bins non-empty in this batch), then
    used; bitwise the reference's state after every step."""
    momentum = 0.75
    state = torch.zeros(10, device=dev.device)
    state_ref = torch.zeros(10, device=dev.device)
    for step in range(3):
        if use_sigmoid:
            logits, target = sigmoid_case((64, 5), torch.float32, dev.device, kind="labels", ignore_frac=0.1,
                                          seed=40 + step, scale=1.0 + step)
        else:
            logits, target = softmax_case((64, 5), torch.float32, dev.device, ignore_frac=0.1, seed=40 + step,
                                          scale=1.0 + step)
        before = state.clone()
        out, grad = loss_and_grad(fl.ghmc, logits, target, momentum=momentum, state=state,
                                  use_sigmoid=use_sigmoid, backend=dev.backend)
        ref, ref_grad = loss_and_grad(fl.ghmc, logits.to(dev.wide), target, momentum=momentum, state=state_ref,
                                      use_sigmoid=use_sigmoid, backend="reference")
        assert torch.equal(state, state_ref), f"step {step}: state {state} != reference {state_ref}"
        assert not torch.equal(state, before)
        assert_rel_close(out, ref, TOL[torch.float32], f"ghmc ema step {step} loss")
        assert_rel_close(grad, ref_grad, TOL[torch.float32], f"ghmc ema step {step} grad")
    # A batch that fills only some bins leaves the other bins' state untouched.
    logits = torch.full((8, 3), 10.0, device=dev.device)
    target = torch.ones(8, 3, device=dev.device)  # g = |sigmoid(10) - 1| ~ 4.5e-5: only bin 0
    before = state.clone()
    fl.ghmc(logits, target, momentum=momentum, state=state, backend=dev.backend)
    assert torch.equal(state[1:], before[1:]) and state[0] != before[0]


@on(CPU)
def test_ghmc_module_owns_state(dev):
    module = fl.nn.GHMCLoss(bins=10, momentum=0.75)
    logits, labels = sigmoid_case((32, 4), torch.float32, dev.device, kind="labels", seed=44)
    module(logits, labels)
    assert module.acc_sum.abs().sum() > 0


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


_IB_CONFIGS = [(0.0, False, False, "mean"), (2.0, True, False, "sum"), (0.5, False, True, "none"),
               (0.0, True, True, "mean")]


@on(CPU, CUDA, CUDA_EMU, args="dtype, c, n, feature_kind, gamma, weighted, detach, reduction",
    cases=lambda dev: _matrix(dev, _IB_CONFIGS, ["norm", "norm_col", "raw"], ns=[n for n in dev.ns if n > 0]))
def test_ib_matrix(dev, dtype, c, n, feature_kind, gamma, weighted, detach, reduction):
    logits, target = softmax_case((n, c), dtype, seed=n * 19 + c, scale=1.0)
    features = _features(feature_kind, n, dtype, seed=n + c)
    weight = torch.linspace(0.5, 2.0, c).tolist() if weighted else None
    check(dev, "ib", logits, target, features, alpha=100.0, gamma=gamma, weight=weight, detach_factor=detach,
          reduction=reduction)


@on(CPU, CUDA, CUDA_EMU)
def test_ib_empty_large_and_feature_gradient(dev):
    logits, target = softmax_case((0, 5), torch.float32)
    check(dev, "ib", logits, target, torch.rand(0))
    logits, target = softmax_case((4096, 80), torch.float32, seed=50, scale=1.0)
    check(dev, "ib", logits, target, torch.rand(4096) + 0.1, gamma=1.0)
    # Gradient w.r.t. the features, for every feature layout, in the widest dtype the backend takes.
    for kind in ("norm", "norm_col", "raw"):
        logits, target = softmax_case((9, 4), dev.wide, dev.device, seed=51, scale=1.0)
        grads = []
        for backend, dtype in ((dev.backend, dev.wide), ("reference", torch.float64)):
            f = _features(kind, 9, dtype, seed=52).to(dev.device).requires_grad_(True)
            fl.ib(logits.to(dtype), target, f, alpha=10.0, gamma=0.5, backend=backend).backward()
            grads.append(f.grad)
        assert rel_error(grads[0], grads[1]) <= TOL[dev.wide], kind


# --------------------------------------------------------------------------------------------
# float64 gradcheck (cpu: the only compiled backend with float64 kernels)
# --------------------------------------------------------------------------------------------
def _gradcheck_cases():
    x, t = softmax_case((5, 4), torch.float64, ignore_frac=0.2, seed=60, scale=1.0)
    xs, ts = softmax_case((2, 3, 2, 3), torch.float64, ignore_frac=0.2, seed=61, scale=1.0)
    sx, sl = sigmoid_case((5, 4), torch.float64, kind="labels", ignore_frac=0.2, seed=62, scale=1.0)
    _, sf = sigmoid_case((5, 4), torch.float64, kind="soft", seed=63, scale=1.0)
    f = torch.rand(5, dtype=torch.float64) + 0.5
    return [
        ("focal", x, (t,), dict(gamma=2.0, alpha=[0.1, 0.2, 0.3, 0.4])),
        ("focal", xs, (ts,), dict(gamma=0.5, reduction="none")),
        ("focal", torch.softmax(x, 1), (t,), dict(gamma=1.5, from_logits=False, reduction="sum")),
        ("sigmoid_focal", sx, (sl,), dict(gamma=2.0, reduction="mean")),
        ("sigmoid_focal", sx, (sf,), dict(gamma=0.5, reduction="none")),
        ("ohem", x, (t,), dict(keep=0.5)),
        ("ohem", xs, (ts,), dict(thresh=0.5, min_kept=2, reduction="none")),
        ("ghmc", sx, (sl,), dict(bins=5)),
        ("ghmc", xs, (ts,), dict(bins=5, use_sigmoid=False, reduction="sum")),
        ("ib", x, (t.clamp_min(0), f), dict(alpha=10.0)),
        ("ib", x, (t.clamp_min(0), f), dict(alpha=10.0, gamma=2.0, weight=[1.0, 2.0, 0.5, 1.0], reduction="none")),
    ]


@on(CPU, args="case", cases=lambda dev: range(len(_gradcheck_cases())))
def test_gradcheck_float64(dev, case):
    loss, x, rest, kwargs = _gradcheck_cases()[case]
    fn = getattr(fl, loss)
    if loss == "ib":
        target, f = rest
        assert torch.autograd.gradcheck(
            lambda xx, ff: fn(xx, target, ff, backend=dev.backend, **kwargs),
            (x.clone().requires_grad_(True), f.clone().requires_grad_(True)))
    else:
        assert torch.autograd.gradcheck(lambda xx: fn(xx, *rest, backend=dev.backend, **kwargs),
                                        (x.clone().requires_grad_(True),))


# --------------------------------------------------------------------------------------------
# opcheck on every op
# --------------------------------------------------------------------------------------------
def _opcheck_samples(dev, device):
    """(op, args) samples on `device`, 3-5 per op, with logits requiring grad where the op is
    differentiable; the third logits dtype of dev (cpu: float64, cuda: float16) in a few."""
    def rg(t):
        return t.clone().requires_grad_(True)

    x, t = softmax_case((6, 5), torch.float32, device, ignore_frac=0.2, seed=70)
    xs, ts = softmax_case((2, 5, 3, 4), torch.float32, device, ignore_frac=0.2, seed=71)
    xb, tb = softmax_case((6, 5), torch.bfloat16, device, seed=72)
    sx, sl = sigmoid_case((6, 5), torch.float32, device, kind="labels", ignore_frac=0.2, seed=74)
    _, sf = sigmoid_case((6, 5), torch.float32, device, kind="soft", seed=75)
    alpha = torch.rand(5, device=device)
    if torch.float64 in dev.dtypes:
        xd, td = softmax_case((4, 3), torch.float64, device, seed=73)
        probabilities = (rg(torch.softmax(xd, 1)), td, None, 1.0, 1.0, -100, "none", False, True)
        ib_third = (rg(xd), td, torch.rand(4, dtype=torch.float64, device=device), None, 10.0, 1e-3, 0.5, True,
                    "sum", True)
        scale_third = (torch.randn(3, 4, dtype=torch.float64, device=device),
                       torch.randn(3, dtype=torch.float64, device=device), torch.float64)
    else:
        xh, th = softmax_case((4, 80), torch.float16, device, seed=73)
        probabilities = (rg(torch.softmax(xh.float(), 1).half()), th, None, 1.0, 1.0, -100, "none", False, True)
        ib_third = (rg(xb), tb, torch.rand(6, device=device) + 0.1, None, 10.0, 1e-3, 0.5, True, "sum", True)
        scale_third = (torch.randn(3, 4, device=device), torch.randn(3, device=device).half(), torch.float16)
    samples = {
        "softmax_focal_forward": [
            (rg(x), t, None, 1.0, 2.0, -100, "mean", True, True),
            (rg(xs), ts, alpha, 1.0, 0.5, -100, "none", True, True),
            (rg(xb), tb, None, 0.25, 2.0, -100, "sum", True, True),
            (x, t, None, 1.0, 2.0, -100, "mean", True, False),
            probabilities,
        ],
        "sigmoid_focal_forward": [
            (rg(sx), sl, 0.25, 2.0, -100, "none", True),
            (rg(sx), sf, -1.0, 0.5, -100, "mean", True),
            (rg(xb), (torch.rand(6, 5, device=device) < 0.3).bfloat16(), 0.25, 2.0, -100, "sum", True),
            (sx, sl, 0.25, 2.0, -100, "mean", False),
        ],
        "ohem_forward": [
            (rg(x), t, 0.5, 0, None, 0, -100, "mean", True),
            (rg(xs), ts, 0.0, 5, None, 0, -100, "none", True),
            (rg(xs), ts, 0.0, 0, 0.7, 4, -100, "sum", True),
        ],
        "ghmc_bin_weights": [
            (sx, sl, None, 10, 0.0, True, -100),
            (sx, sf, torch.zeros(10, device=device), 10, 0.75, True, -100),
            (xs, ts, torch.zeros(5, device=device), 5, 0.5, False, -100),
        ],
        "ghmc_forward": [
            (rg(sx), sl, torch.rand(10, device=device), True, -100, "mean", True),
            (rg(sx), sf, torch.rand(10, device=device), True, -100, "none", True),
            (rg(xs), ts, torch.rand(5, device=device), False, -100, "sum", True),
        ],
        "ib_forward": [
            (rg(x), t.clamp_min(0), rg(torch.rand(6, device=device) + 0.1), None, 100.0, 1e-3, 0.0, False, "mean",
             True),
            (rg(x), t.clamp_min(0), rg(torch.rand(6, device=device) + 0.1), alpha, 100.0, 1e-3, 2.0, False, "none",
             True),
            ib_third,
        ],
        "scale_grad": [
            (torch.randn(6, 5, device=device), torch.tensor(0.5, device=device), torch.float32),
            (torch.randn(2, 5, 3, 4, device=device), torch.randn(2, 3, 4, device=device), torch.float32),
            (torch.randn(6, 5, device=device), torch.randn(6, 5, device=device).bfloat16(), torch.bfloat16),
            scale_third,
        ],
    }
    return [(name, args) for name, per_op in samples.items() for args in per_op]


def _opcheck_ids(dev):
    # The ops of the samples, named from a CPU build of them (no device work at collection).
    return [f"{name}-{i}" for i, (name, _) in enumerate(_opcheck_samples(dev, "cpu"))]


@on(CPU, CUDA, CUDA_EMU, args="sample", cases=_opcheck_ids)
def test_opcheck(dev, sample):
    name, index = sample.rsplit("-", 1)
    op_name, args = _opcheck_samples(dev, dev.device)[int(index)]
    assert op_name == name
    opcheck_loss_op(getattr(dev.ops, name).default, args)


# --------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# --------------------------------------------------------------------------------------------
_COMPILE_CASES = {
    "cpu": ["focal", "sigmoid_focal", "ghmc_no_state"],
    "cuda": ["focal", "sigmoid_focal", "ohem", "ghmc", "ghmc_no_state", "ib"],
    "cuda_emu": ["focal", "ohem", "ghmc", "ib"],
}


@pytest.mark.compile
@on(CPU, CUDA, CUDA_EMU, args="case", cases=lambda dev: _COMPILE_CASES[dev.name])
def test_torch_compile_fullgraph(dev, case):
    """Compiled forward + backward bitwise equal to eager; focal and sigmoid_focal also on a
    second shape (recompile or dynamic shapes). ghmc_no_state: state=None once failed in
    inductor (a None optional mutable argument); the backend now passes a scratch state, which
    must give the eager numbers exactly, and those of the reference."""
    torch._dynamo.reset()
    device = dev.device
    extra, second = (), None
    if case in ("focal", "ohem"):
        logits, target = softmax_case((2, 5, 4, 6), torch.float32, device, ignore_frac=0.2, seed=80)
        kwargs = dict(gamma=2.0, alpha=0.25, reduction="mean") if case == "focal" else dict(keep=0.5)
        second = softmax_case((3, 5, 2, 7), torch.float32, device, seed=82) if case == "focal" else None
    elif case == "ib":
        logits, target = softmax_case((16, 7), torch.float32, device, seed=80)
        extra = (torch.rand(16, device=device) + 0.1,)
        kwargs = dict(alpha=10.0)
    elif case == "ghmc_no_state":
        logits, target = sigmoid_case((16, 7), torch.float32, device, kind="labels", ignore_frac=0.2, seed=84)
        kwargs = dict(bins=10)
    else:  # sigmoid_focal, ghmc (with a state)
        logits, target = sigmoid_case((16, 7), torch.float32, device, kind="labels", ignore_frac=0.2, seed=81)
        kwargs = dict(gamma=2.0, alpha=0.25, reduction="sum") if case == "sigmoid_focal" else dict(reduction="sum")
        if case == "sigmoid_focal":
            second = sigmoid_case((9, 7), torch.float32, device, kind="labels", seed=83)
    fn = getattr(fl, case.replace("_no_state", ""))

    def make_step():
        # ghmc: each run gets its own EMA state (the op updates it in place).
        state = dict(momentum=0.75, state=torch.zeros(10, device=device)) if case == "ghmc" else {}

        def step(x, t, *e):
            return fn(x, t, *e, backend=dev.backend, validate=False, **kwargs, **state)
        return step

    compiled = torch.compile(make_step(), fullgraph=True, backend="inductor")
    out, grad = loss_and_grad(compiled, logits, target, *extra)
    eager_out, eager_grad = loss_and_grad(make_step(), logits, target, *extra)
    assert torch.equal(out, eager_out) and torch.equal(grad, eager_grad)
    if second is not None:
        out2, grad2 = loss_and_grad(compiled, *second)
        eager_out2, eager_grad2 = loss_and_grad(make_step(), *second)
        assert torch.equal(out2, eager_out2) and torch.equal(grad2, eager_grad2)
    if case == "ghmc_no_state":
        ref = reference.ghmc(logits.double(), target, bins=10, momentum=0.0, state=None, use_sigmoid=True,
                             ignore_index=-100, reduction="mean")
        assert_rel_close(out, ref, 1e-5, "ghmc loss")


# --------------------------------------------------------------------------------------------
# Determinism, no host sync, retain_graph, double backward, direct-op calls, automatic choice
# --------------------------------------------------------------------------------------------
_DETERMINISM_INPUTS = {"cpu": (3000, torch.float32), "cuda": (30000, torch.bfloat16),
                       "cuda_emu": (3000, torch.bfloat16)}  # rows, focal/ib dtype
# cuda_emu: the same result under every schedule of the emulator (thread and block order,
# multiprocessor count and so grid size; csrc/cuda_emu/cuda_emu.h).
_EMU_SCHEDULES = ("threads=forward,blocks=forward,sms=132", "threads=reverse,blocks=reverse,sms=1",
                  "threads=random,seed=7,sms=3,blocks_per_sm=1")


def _determinism_cases(dev):
    rows, dtype = _DETERMINISM_INPUTS[dev.name]
    x, t = softmax_case((rows, 80), dtype, dev.device, ignore_frac=0.1, seed=90)
    xs, ts = softmax_case((2, 19, 40, 50), torch.float32, dev.device, ignore_frac=0.1, ignore_index=255, seed=91)
    sx, sl = sigmoid_case((rows, 80), torch.float32, dev.device, kind="labels", ignore_frac=0.1, seed=92)
    f = torch.rand(rows, device=dev.device) + 0.1
    return [
        (fl.focal, x, (t,), dict(gamma=2.0)),
        (fl.focal, xs, (ts,), dict(gamma=0.5, ignore_index=255)),
        (fl.sigmoid_focal, sx, (sl,), dict(reduction="sum")),
        (fl.ohem, xs, (ts,), dict(keep=0.3, ignore_index=255)),
        (fl.ghmc, sx, (sl,), dict()),
        (fl.ghmc, xs, (ts,), dict(use_sigmoid=False, ignore_index=255)),
        (fl.ib, x, (t.clamp_min(0), f), dict(alpha=100.0)),
    ]


@on(CPU, CUDA, CUDA_EMU, args="case", cases=lambda dev: range(7))
def test_bitwise_deterministic(dev, case):
    """Bitwise equal results run to run; on cpu for any thread count (1, 2, 1, 3 threads), on
    cuda_emu under every emulator schedule."""
    fn, x, rest, kwargs = _determinism_cases(dev)[case]
    runs = []
    before = torch.get_num_threads()
    try:
        if dev.name == "cuda_emu":
            for spec in _EMU_SCHEDULES:
                with cuda_emu.configured(spec):
                    runs.append(loss_and_grad(fn, x, *rest, backend=dev.backend, **kwargs))
        for threads in ((1, 2, 1, 3) if dev.name == "cpu" else (None, None, None)):
            if threads is not None:
                torch.set_num_threads(threads)
            runs.append(loss_and_grad(fn, x, *rest, backend=dev.backend, **kwargs))
    finally:
        torch.set_num_threads(before)
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@on(CUDA, args="loss", cases=lambda dev: ["focal", "focal_spatial", "sigmoid_focal", "ohem", "ohem_thresh", "ghmc",
                                          "ghmc_softmax", "ib"])
def test_no_host_sync_in_forward_and_backward(dev, loss):
    if loss.startswith("focal") or loss.startswith("ohem") or loss in ("ghmc_softmax", "ib"):
        shape = (64, 19, 8, 8) if loss == "focal_spatial" else (256, 19)
        x, t = softmax_case(shape, torch.bfloat16, dev.device, ignore_frac=0.1, seed=93)
    else:
        x, t = sigmoid_case((256, 19), torch.bfloat16, dev.device, kind="labels", ignore_frac=0.1, seed=94)
    extra, kwargs = (), {}
    name = loss.split("_")[0] if loss != "sigmoid_focal" else loss
    if loss == "ohem_thresh":
        kwargs = dict(thresh=0.7, min_kept=10)
    if loss == "ghmc_softmax":
        kwargs = dict(use_sigmoid=False, momentum=0.75, state=torch.zeros(10, device=dev.device))
    if loss == "ib":  # no ignore_index in IB: every target must be a class
        t = t.clamp_min(0)
        extra = (torch.rand(x.shape[0], device=dev.device) + 0.1,)
    fn = getattr(fl, name)
    xr = x.clone().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fn(xr, t, *extra, backend=dev.backend, **kwargs)
        (out.sum() if out.dim() else out).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert xr.grad is not None and torch.isfinite(xr.grad).all()


@on(CPU, CUDA, CUDA_EMU)
def test_retain_graph_backward_twice_gives_the_same_gradient(dev):
    logits, target = softmax_case((7, 5), torch.float32, dev.device, seed=95)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, reduction="none", backend=dev.backend)
    cot = torch.randn(out.shape, device=dev.device)
    (g1,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x, cot, retain_graph=True)
    (g3,) = torch.autograd.grad(out, x, 2 * cot)
    assert torch.equal(g1, g2) and torch.equal(g3, 2 * g1)
    x64 = logits.double().requires_grad_(True)
    (ref,) = torch.autograd.grad(fl.focal(x64, target, reduction="none", backend="reference"), x64, cot.double())
    assert_matches_reference(g1, ref, torch.float32, "focal grad after retain_graph")


@on(CPU, CUDA, CUDA_EMU)
def test_double_backward_raises_a_clear_error(dev):
    logits, target = softmax_case((4, 3), dev.wide, dev.device, seed=96)
    x = logits.clone().requires_grad_(True)
    out = fl.focal(x, target, backend=dev.backend)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out, x, create_graph=True)


@on(CPU)
def test_inference_does_no_gradient_work_and_forward_only_matches(dev):
    logits, target = softmax_case((7, 5), torch.float32, dev.device, seed=97)
    with torch.no_grad():
        loss, grad = OPS.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "mean", True, False)
    assert grad.numel() == 0
    assert not loss.requires_grad
    assert loss == fl.focal(logits, target, backend=dev.backend)


@on(CPU)
def test_direct_op_call_rejects_out_of_range_targets(dev):
    logits = torch.randn(4, 3, device=dev.device)
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.softmax_focal_forward(logits, torch.tensor([0, 1, 3, 2]), None, 1.0, 2.0, -100, "mean", True, False)
    with pytest.raises(RuntimeError, match="out of range"):
        OPS.sigmoid_focal_forward(logits, torch.tensor([0, 1, 4, 2]), 0.25, 2.0, -100, "mean", False)
    with pytest.raises(RuntimeError, match="reduction"):
        OPS.softmax_focal_forward(logits, torch.tensor([0, 1, 2, 2]), None, 1.0, 2.0, -100, "avg", True, False)


@on(CPU, CUDA)
def test_backend_is_the_automatic_choice(dev):
    logits, _ = softmax_case((4, 3), torch.float32, dev.device)
    for loss in _backends.LOSSES:
        assert _backends.select(loss, logits, None).name == dev.backend
    if dev.name == "cuda":
        assert _backends.select("focal", logits.double(), None).name != "cuda"  # fp64: not a CUDA-kernel dtype


@on(CPU)
def test_reused_output_buffers_are_never_visible_to_the_caller(dev):
    """Big outputs come from a small pool of buffers of earlier calls (csrc/DESIGN.md); a buffer
    the caller still references (tensor or view) must never be handed out again."""
    logits, target = softmax_case((4096, 80), torch.float32, dev.device, seed=98)  # 1.3 MB gradient
    _, grad_kept = loss_and_grad(fl.focal, logits, target, backend=dev.backend)
    kept_copy = grad_kept.clone()
    _, grad_view_base = loss_and_grad(fl.focal, logits * 0.5, target, backend=dev.backend)
    view = grad_view_base[:7, 3:9]
    view_copy = view.clone()
    del grad_view_base
    sig_logits, sig_target = sigmoid_case((4096, 80), torch.float32, dev.device, kind="soft", seed=99)
    loss_none = fl.sigmoid_focal(sig_logits, sig_target, reduction="none", backend=dev.backend)
    loss_copy = loss_none.clone()
    for seed in range(6):
        other, other_target = softmax_case((4096, 80), torch.float32, dev.device, seed=200 + seed)
        loss_and_grad(fl.focal, other, other_target, backend=dev.backend)
        fl.sigmoid_focal(other, torch.rand(4096, 80, device=dev.device), reduction="none", backend=dev.backend)
    assert torch.equal(grad_kept, kept_copy)
    assert torch.equal(view, view_copy)
    assert torch.equal(loss_none, loss_copy)


@on(CUDA, CUDA_EMU)
def test_fresh_outputs_never_alias_the_inputs(dev):
    logits, target = softmax_case((8, 5), torch.float32, dev.device, seed=98)
    before = logits.clone()
    loss, grad = dev.ops.softmax_focal_forward(logits, target, None, 1.0, 2.0, -100, "none", True, True)
    assert torch.equal(logits, before)
    assert grad.data_ptr() != logits.data_ptr() and loss.data_ptr() != logits.data_ptr()
    scaled = dev.ops.scale_grad(grad, torch.ones((), device=dev.device), torch.float32)
    assert scaled.data_ptr() != grad.data_ptr() and torch.equal(scaled, grad)


# --------------------------------------------------------------------------------------------
# numel > 2^31 (int64 indexing), bf16, cuda
# --------------------------------------------------------------------------------------------
def _free_gib() -> float:
    free, _ = torch.cuda.mem_get_info()
    return free / 2 ** 30


@on(CUDA, args="loss", cases=lambda dev: ["focal", "sigmoid_focal"])
def test_more_than_2_pow_31_elements_bf16(dev, loss):
    """N x C > 2^31 (2^21 + 7 rows of 1024 classes, bf16): the rows past 2^31 / C must be right.
    Checked against the reference on a slice of rows near the end (the full reference would not fit)."""
    if _free_gib() < 40:
        pytest.skip("needs 40 GB of free GPU memory")
    n, c = 2 ** 21 + 7, 1024
    assert n * c > 2 ** 31
    g = torch.Generator(device=dev.device).manual_seed(99)
    x = (3 * torch.randn(n, c, device=dev.device, generator=g)).bfloat16().requires_grad_(True)
    if loss == "focal":
        t = torch.randint(0, c, (n,), device=dev.device, generator=g)
        out = fl.focal(x, t, reduction="sum", backend=dev.backend)
    else:
        t = torch.randint(0, c + 1, (n,), device=dev.device, generator=g)
        out = fl.sigmoid_focal(x, t, reduction="sum", backend=dev.backend)
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


# --------------------------------------------------------------------------------------------
# One skip per unavailable device, for all its cases (counted by `on` above)
# --------------------------------------------------------------------------------------------
_UNAVAILABLE = [dev for dev in (CPU, CUDA, CUDA_EMU) if not dev.available]
if _UNAVAILABLE:
    @pytest.mark.parametrize("dev", _UNAVAILABLE, ids=lambda dev: dev.name)
    def test_backend_unavailable(dev):
        """Not a check: the one place that reports, as a skip, the cases of an unavailable device
        that `on` left out (defined only when a device is unavailable)."""
        pytest.skip(f"{dev.reason}: its {_NOT_RUN[dev.name]} cases in this module do not run")
