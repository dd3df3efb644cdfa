"""'cpu': fused C++ kernels of fused_losses._C for CPU tensors (csrc/cpu/*.cpp, one file per loss family).

Each function takes the normalised arguments of fused_losses._validate (like the matching
reference function) and calls one op of torch.ops.fused_losses; the ops' fake kernels and
autograd formulas are registered by fused_losses._ops.
"""
from __future__ import annotations

import torch

from fused_losses import _ext, _ops
from fused_losses._backends import Backend
from fused_losses.distributed import global_bin_weights
from fused_losses.reference import ohem_min_kept_total

_REQUIRED_OPS = ("softmax_focal_forward", "sigmoid_focal_forward", "ohem_forward", "ghmc_bin_weights",
                 "ghmc_forward", "ib_forward", "scale_grad", "scale_grad_",
                 "detector_sigmoid_forward")  # quality_focal / varifocal / asymmetric (#24)
_REQUIRED_OPS += ("distribution_focal_forward",)  # distribution focal (#24)


def _probe():
    if not _ext.loaded():
        return False, _ext.load_error()
    missing = [name for name in _REQUIRED_OPS if not hasattr(torch.ops.fused_losses, name)]
    if missing:
        reason = f"extension fused_losses._C lacks the ops {missing} (stale build? {_ext.REBUILD_HINT})"
        _ext.note_stale_build("cpu", reason)
        return False, reason
    _ops.register()
    return True, f"compiled C++ kernels (fused_losses._C) for CPU tensors; {_simd_description()}"


# What each SIMD variant of csrc/cpu/simd_kernels.cpp is (its name is the kernel table's isa).
_SIMD_VARIANTS = {
    "avx512": "AVX-512, 16 float lanes",
    "avx2": "AVX2+FMA, 8 float lanes",
    "baseline": "baseline: SSE2 on x86-64, NEON on arm64, 8 float lanes",
}


def simd_variant() -> str | None:
    """The SIMD variant the loaded fused_losses._C runs ('avx512', 'avx2' or 'baseline'), as its
    dispatcher picked it once at load (the best this CPU executes, or a lower one named by
    FUSED_LOSSES_SIMD): read from the library's own fused_losses::cpu::simd_isa(). None when the
    extension is not loaded or does not export it."""
    if not _ext.loaded():
        return None
    try:
        import ctypes

        from fused_losses import _C
        # dlopen of the already loaded library returns its handle (the same kernel table)
        simd_isa = ctypes.CDLL(_C.__file__)._ZN12fused_losses3cpu8simd_isaEv
        simd_isa.restype = ctypes.c_char_p
        return simd_isa().decode()
    except Exception:  # noqa: BLE001 - an older build without the symbol, or no ctypes
        return None


def _simd_description() -> str:
    variant = simd_variant()
    if variant is None:
        return "SIMD variant unknown (this build does not export fused_losses::cpu::simd_isa)"
    import os
    wanted = os.environ.get("FUSED_LOSSES_SIMD")
    how = (f"FUSED_LOSSES_SIMD={wanted} at load" if wanted else
           "the best this CPU runs, picked at load; FUSED_LOSSES_SIMD=avx2|baseline picks a lower one")
    return f"SIMD variant {variant} ({_SIMD_VARIANTS.get(variant, 'unknown')}; {how})"


# Decided once, at import: availability() is also called while torch.compile traces a call of
# the public API, so it must be a plain constant lookup (no import, no registration).
_AVAILABILITY = _probe()


def _availability():
    return _AVAILABILITY


def _ops_ns():
    return torch.ops.fused_losses


# Each loss maps its arguments onto one op and calls it through _ops.call_loss, which runs it
# directly (the op's own autograd formula) or, under functorch transforms / forward AD, through
# the transform-aware path. The run functions take (compute_grad, logits, features, *tensors)
# and return (loss, grad_logits, grad_features or None).
# Drop-in extras (README "Sample weights, avg_factor, label smoothing"): `weight` arrives
# normalised by fused_losses._validate (None, or contiguous in the math dtype: the target's shape
# for the softmax family; logits.shape[:-1] or logits.shape for the sigmoid family) and is passed
# as an auxiliary tensor (no gradient); `label_smoothing` is a float; avg_factor never reaches a
# backend (the functional layer runs 'sum' and divides).
def focal(logits, target, *, gamma, alpha, ignore_index, reduction, from_logits, weight=None, label_smoothing=0.0,
          epsilon=None):
    alpha_per_class = alpha if isinstance(alpha, torch.Tensor) else None
    alpha_scalar = 1.0 if alpha is None or alpha_per_class is not None else float(alpha)
    # Poly-1's epsilon (#24) is passed only when != 0, so the plain call keeps the op's old arguments
    poly = () if epsilon is None else (float(epsilon),)

    def run(compute_grad, x, _features, t, a, w):
        loss, grad = _ops_ns().softmax_focal_forward(x, t, a, alpha_scalar, float(gamma), ignore_index, reduction,
                                                     from_logits, compute_grad, w, float(label_smoothing), *poly)
        return loss, grad, None

    return _ops.call_loss(run, logits, None, target, alpha_per_class, weight, channel_dim=1)


def sigmoid_focal(logits, target, *, alpha, gamma, ignore_index, reduction, weight=None, epsilon=None):
    # alpha: a float (torchvision's meaning; < 0 disables) or a (C,) tensor of per-class alphas.
    alpha_per_class = alpha if isinstance(alpha, torch.Tensor) else None
    alpha_scalar = -1.0 if alpha_per_class is not None else float(alpha)
    poly = () if epsilon is None else (float(epsilon),)  # Poly-1 (#24), only when != 0

    def run(compute_grad, x, _features, t, a, w):
        loss, grad = _ops_ns().sigmoid_focal_forward(x, t, alpha_scalar, float(gamma), ignore_index, reduction,
                                                     compute_grad, a, w, *poly)
        return loss, grad, None

    return _ops.call_loss(run, logits, None, target, alpha_per_class, weight, channel_dim=None)


def ohem(logits, target, *, keep, thresh, min_kept, ignore_index, reduction, weight=None, label_smoothing=0.0):
    keep_count = keep if isinstance(keep, int) else 0
    keep_fraction = float(keep) if not isinstance(keep, int) else 0.0
    min_kept_total = ohem_min_kept_total(logits, min_kept)

    def run(compute_grad, x, _features, t, w):
        loss, grad = _ops_ns().ohem_forward(x, t, keep_fraction, keep_count, thresh, min_kept_total, ignore_index,
                                            reduction, compute_grad, w, float(label_smoothing))
        return loss, grad, None

    return _ops.call_loss(run, logits, None, target, weight, channel_dim=1)


def _ghmc_softmax_one_pass(ns, logits, target, *, bins, momentum, state, ignore_index, reduction, weight):
    """GHM-C softmax on float32 CPU logits through the CPU-only op pair of
    csrc/cpu/ghmc.cpp (ghmc_softmax_prepass): one softmax pass writes the cross-entropy
    gradient and the rows' log p_t and g, the bins come from those g, and the loss op only
    scales the gradient rows, instead of a second softmax over the logits. Losses, bins and EMA
    state as ghmc_bin_weights + ghmc_forward bit for bit, gradients within 2 ulp
    (tests/test_cpu_kernels.py). ns: the caller's op namespace."""
    if state is None:
        state = torch.zeros(bins, dtype=torch.float32, device=logits.device)  # see ghmc below
    bin_weights, row_stats, unit_grad = ns.ghmc_softmax_prepass(logits.detach(), target, state, bins, float(momentum),
                                                                ignore_index, weight)

    def run(compute_grad, x, _features, t, bw, st, ug, w):
        loss, grad = ns.ghmc_softmax_scale(x, t, bw, st, ug, ignore_index, reduction, compute_grad, w)
        return loss, grad, None

    return _ops.call_loss(run, logits, None, target, bin_weights, row_stats, unit_grad, weight, channel_dim=1)


def _one_pass_ghmc(ns, logits, use_sigmoid, label_smoothing, process_group) -> bool:
    """Whether ghmc takes _ghmc_softmax_one_pass: float32 CPU logits, softmax, no label
    smoothing, no process group, eager (no torch.compile trace, no functorch transform or
    forward AD: those keep the ghmc_bin_weights + ghmc_forward pair), and the CPU-only ops
    present in the caller's op namespace `ns` (the emulator's, which rebinds ghmc's _ops_ns,
    has none: the emulated CUDA kernels keep their op pair)."""
    return (not use_sigmoid and label_smoothing == 0.0 and process_group is None
            and logits.dtype == torch.float32 and logits.device.type == "cpu"
            and not torch.compiler.is_compiling() and not _ops.transforms_active(logits, None)
            and hasattr(ns, "ghmc_softmax_prepass"))


def ghmc(logits, target, *, bins, momentum, state, use_sigmoid, ignore_index, reduction, weight=None,
         label_smoothing=0.0, process_group=None):
    if state is not None and not state.is_contiguous():
        # The kernels take a contiguous state (csrc: ghmc_bin_weights); a strided view (a column of
        # a per-head state matrix) is updated through a contiguous copy written back in place.
        scratch = state.contiguous()
        loss = ghmc(logits, target, bins=bins, momentum=momentum, state=scratch, use_sigmoid=use_sigmoid,
                    ignore_index=ignore_index, reduction=reduction, weight=weight, label_smoothing=label_smoothing,
                    process_group=process_group)
        state.copy_(scratch)
        return loss
    ns = _ops_ns()
    if _one_pass_ghmc(ns, logits, use_sigmoid, label_smoothing, process_group):
        return _ghmc_softmax_one_pass(ns, logits, target, bins=bins, momentum=momentum, state=state,
                                      ignore_index=ignore_index, reduction=reduction, weight=weight)
    if process_group is not None:
        # The histogram of the global batch: this rank's counts, all-reduced on the device,
        # then the weights and the EMA update from them (fused_losses.distributed).
        counts = _ops_ns().ghmc_bin_counts(logits.detach(), target, bins, use_sigmoid, ignore_index, weight)
        bin_weights = global_bin_weights(counts, state, momentum, torch.promote_types(logits.dtype, torch.float32),
                                         process_group)
    else:
        if state is None:
            # Inductor cannot lower a None passed for the optional mutable `state` ("getitem is
            # not an OpOverload"). Validation guarantees momentum == 0 here, and a scratch zero
            # state with momentum 0 becomes 0 * 0 + 1 * count = count: the same divisor, bit for bit.
            state = torch.zeros(bins, dtype=torch.float32, device=logits.device)
        # Step 1 (no gradient): histogram, EMA update of `state` in place, per-bin weights.
        bin_weights = _ops_ns().ghmc_bin_weights(logits.detach(), target, state, bins, float(momentum), use_sigmoid,
                                                 ignore_index, weight)

    def run(compute_grad, x, _features, t, bw, w):
        loss, grad = _ops_ns().ghmc_forward(x, t, bw, use_sigmoid, ignore_index, reduction, compute_grad, w,
                                            float(label_smoothing))
        return loss, grad, None

    return _ops.call_loss(run, logits, None, target, bin_weights, weight, channel_dim=None if use_sigmoid else 1)


def ib(logits, target, features, *, alpha, epsilon, weight, gamma, detach_factor, reduction):
    # The (N,)-sized feature reduction stays in torch ops (autograd gives sign(f) for (N, D));
    # the O(N x C) work is the fused op.
    math_dtype = torch.promote_types(logits.dtype, torch.float32)
    f = features.to(math_dtype)
    if f.dim() == 2 and f.shape[1] > 1:
        f = f.abs().sum(dim=1)
    f = f.reshape(-1)
    if detach_factor:
        f = f.detach()

    def run(compute_grad, x, feature_norm, t, w):
        return _ops_ns().ib_forward(x, t, feature_norm, w, float(alpha), float(epsilon), float(gamma), detach_factor,
                                    reduction, compute_grad)

    return _ops.call_loss(run, logits, f, target, weight, channel_dim=1)


BACKEND = Backend(
    name="cpu",
    availability=_availability,
    device_types=("cpu",),
    losses={"focal": focal, "sigmoid_focal": sigmoid_focal, "ohem": ohem, "ghmc": ghmc, "ib": ib},
)


# ---- quality_focal / varifocal / asymmetric (#24) ----
# One op for the three (csrc/cpu/detector_sigmoid.cpp, csrc/cuda/detector_sigmoid.cu): the
# logits are viewed as (M, C) rows (so a per-row 'none' loss of quality_focal broadcasts over the
# class dim 1 in the backward, as the softmax family's), the loss reshaped back.
DETECTOR_FLAGS = {"activated": 1, "iou_weighted": 2, "detach_modulation": 4, "detach_focusing": 8}


def detector_flags(**flags) -> int:
    """The op's `flags` bits from the named booleans (csrc/detector_sigmoid_math.h)."""
    return sum(DETECTOR_FLAGS[name] for name, on in flags.items() if on)


def _detector_sigmoid(ns, loss_name, logits, target, score, params, flags, ignore_index, reduction, weight):
    # ns: the caller's op namespace (its _ops_ns(), which the emulator's rebound copies redirect)
    c = logits.shape[-1]
    shape = logits.shape
    x = logits.reshape(-1, c)
    if target.is_floating_point():
        t = target.reshape(-1, c)
    else:
        t = target.reshape(-1)
        score = score.reshape(-1)
    w = None if weight is None else weight.reshape(-1)
    p0, p1, p2, p3 = (float(v) for v in params)

    def run(compute_grad, xx, _features, tt, ss, ww):
        out, grad = ns.detector_sigmoid_forward(xx, tt, ss, loss_name, p0, p1, p2, p3, flags,
                                                ignore_index, reduction, compute_grad, ww)
        return out, grad, None

    per_row = loss_name == "quality_focal"
    out = _ops.call_loss(run, x, None, t, score, w, channel_dim=1 if per_row else None)
    if reduction == "none":
        return out.reshape(shape[:-1] if per_row else shape)
    return out


def quality_focal(logits, target, *, score=None, beta, activated, ignore_index, reduction, weight=None):
    return _detector_sigmoid(_ops_ns(), "quality_focal", logits, target, score, (beta, 0.0, 0.0, 0.0),
                             detector_flags(activated=activated), ignore_index, reduction, weight)


def varifocal(logits, target, *, score=None, alpha, gamma, iou_weighted, detach_modulation, ignore_index, reduction,
              weight=None):
    return _detector_sigmoid(_ops_ns(), "varifocal", logits, target, score, (alpha, gamma, 0.0, 0.0),
                             detector_flags(iou_weighted=iou_weighted, detach_modulation=detach_modulation),
                             ignore_index, reduction, weight)


def asymmetric(logits, target, *, gamma_pos, gamma_neg, clip, eps, detach_focusing, reduction, weight=None):
    return _detector_sigmoid(_ops_ns(), "asymmetric", logits, target, None, (gamma_pos, gamma_neg, clip, eps),
                             detector_flags(detach_focusing=detach_focusing), -100, reduction, weight)


BACKEND.losses.update(quality_focal=quality_focal, varifocal=varifocal, asymmetric=asymmetric)


# ---- seesaw / eqlv2 (#25) ----
def seesaw(logits, target, cum_samples, **kwargs):
    return _longtail.seesaw(_ops_ns(), logits, target, cum_samples, **kwargs)


def eqlv2(logits, target, state, **kwargs):
    return _longtail.eqlv2(_ops_ns(), logits, target, state, **kwargs)


from fused_losses import _longtail  # noqa: E402

if _AVAILABILITY[0]:  # a stale build without the ops keeps every other loss
    if hasattr(torch.ops.fused_losses, "seesaw_forward"):
        BACKEND.losses["seesaw"] = seesaw
    if hasattr(torch.ops.fused_losses, "eqlv2_forward"):
        BACKEND.losses["eqlv2"] = eqlv2


# ---- distribution focal (#24) ----
def distribution_focal(logits, target, *, reduction, weight=None):
    """One fused softmax pass per row of bins (csrc/cpu/dfl.cpp, csrc/cuda/dfl.cu); the target is
    passed as given (the op converts it to the math dtype) and never differentiated."""

    def run(compute_grad, x, _features, t, w):
        loss, grad = _ops_ns().distribution_focal_forward(x, t, reduction, compute_grad, w)
        return loss, grad, None

    # (..., n + 1) -> (rows, n + 1) views: the op's 'none' backward (scale_grad) broadcasts a per-row
    # cotangent over dim 1, the bins of a 2-D gradient.
    bins = logits.shape[-1]
    rows = logits.reshape(-1, bins)
    loss = _ops.call_loss(run, rows, None, target.reshape(-1), None if weight is None else weight.reshape(-1),
                          channel_dim=1)
    return loss.reshape(target.shape) if reduction == "none" else loss


BACKEND.losses["distribution_focal"] = distribution_focal
