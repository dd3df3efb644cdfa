"""All input validation of the public API, in one place, run before any backend.

Each ``*_args`` function checks the user's arguments and returns the normalised keyword
arguments every backend receives (python floats/ints/strs, alpha/weight as tensors on the
logits' device). Exceptions:
  TypeError   wrong kind of object or dtype (non-floating logits, float target where class
              indices are required, bool keep, ...)
  ValueError  wrong shape, rank, device, length or value (including unknown reduction/backend)
Every message starts with the name of the offending argument.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from typing import Any

import torch

REDUCTIONS = ("none", "mean", "sum")
BACKENDS = ("cuda", "triton", "cpu", "reference")
_INDEX_DTYPES = (torch.int64, torch.int32)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# ib has no ignore_index: a sentinel no valid class index can equal keeps its range check strict.
_NO_IGNORE = -(2 ** 63)


def _type_error(arg: str, msg: str):
    raise TypeError(f"{arg}: {msg}")


def _value_error(arg: str, msg: str):
    raise ValueError(f"{arg}: {msg}")


# --------------------------------------------------------------------------------------------
# Scalars and options
# --------------------------------------------------------------------------------------------
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


def _is_int(value) -> bool:
    """An int (SymInt too: torch.compile(dynamic=True) makes int arguments symbolic)."""
    return not isinstance(value, bool) and isinstance(value, (numbers.Integral, torch.SymInt))


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat))


def _real(arg: str, value, *, low=None, low_inclusive=True, high=None, high_inclusive=True) -> float:
    """A finite real number (inf and NaN are meaningless for every float argument here).
    Comparisons only: under torch.compile(dynamic=True) `value` may be symbolic, which
    math.isnan/isinf cannot take (the checks then run on the traced value, as guards)."""
    if not _is_real(value):
        _type_error(arg, f"expected a real number, got {type(value).__name__}")
    value = float(value)
    if value != value:
        _value_error(arg, "must not be NaN")
    if value == math.inf or value == -math.inf:
        _value_error(arg, f"must be finite, got {value}")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        _value_error(arg, f"must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        _value_error(arg, f"must be {'<=' if high_inclusive else '<'} {high}, got {value}")
    return value


def _int(arg: str, value, *, low=None) -> int:
    if not _is_int(value):
        _type_error(arg, f"expected an int, got {type(value).__name__}")
    value = int(value)
    if not _INT64_MIN <= value <= _INT64_MAX:
        _value_error(arg, f"must fit in int64, got {value}")
    if low is not None and value < low:
        _value_error(arg, f"must be >= {low}, got {value}")
    return value


def _bool(arg: str, value) -> bool:
    if not isinstance(value, bool):
        _type_error(arg, f"expected a bool, got {type(value).__name__}")
    return value


def _vmap_active() -> bool:
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def reduction_arg(reduction) -> str:
    if reduction not in REDUCTIONS:
        _value_error("reduction", f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
    return reduction


def backend_arg(backend) -> str | None:
    """The requested backend name (argument, else FUSED_LOSSES_BACKEND), or None for automatic."""
    source = "backend"
    if backend is None:
        backend = os.environ.get("FUSED_LOSSES_BACKEND") or None
        source = "FUSED_LOSSES_BACKEND"
    if backend is not None and backend not in BACKENDS:
        _value_error(source, f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------
def _logits(logits, min_dim: int, what: str) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        _type_error("logits", f"expected a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOAT_DTYPES:
        _type_error("logits", f"expected a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    if logits.dim() < min_dim:
        hint = ""
        if logits.dim() == 1 and min_dim == 2:
            hint = ("; (N,) logits hold one binary logit per sample: use fused_losses.sigmoid_focal(logits, "
                    "target.float()) (a float 0/1 target of the logits' shape), or give the logits a class dim "
                    "(N, C) for class indices")
        _value_error("logits", f"expected {what}, got shape {tuple(logits.shape)}{hint}")
    return logits


def _same_device(arg: str, tensor: torch.Tensor, logits: torch.Tensor):
    if tensor.device != logits.device:
        _value_error(arg, f"is on {tensor.device} but logits are on {logits.device}")


def _index_target(target, logits: torch.Tensor, expected_shape, what: str) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        _type_error("target", f"expected a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in _INDEX_DTYPES:
        _type_error("target", f"expected class indices as int64 or int32, got {target.dtype}"
                    + (" (float targets are not accepted by the softmax family)" if target.is_floating_point() else ""))
    _same_device("target", target, logits)
    if tuple(target.shape) != tuple(expected_shape):
        _value_error("target", f"expected shape {tuple(expected_shape)} ({what}), got {tuple(target.shape)}")
    return target


def _host_check_default(tensor: torch.Tensor, validate) -> bool:
    """validate=None means: read values on the host only for CPU tensors (on CUDA it would cost a
    host sync) and not while torch.compile traces (a host read would break the graph)."""
    if validate is None:
        return tensor.device.type == "cpu" and not torch.compiler.is_compiling()
    return bool(validate)


def _target_range_op():
    """torch.ops.fused_losses.target_range when the compiled extension is loaded, else None."""
    from fused_losses import _ext
    if not _ext.loaded():
        return None
    return getattr(torch.ops.fused_losses, "target_range", None)


def _check_range(target: torch.Tensor, ignore_index: int, high: int, validate) -> None:
    """Valid entries of target must lie in [0, high] (ignore_index excluded first).
    validate=None checks on CPU only (on CUDA it would cost a host sync), and not while
    torch.compile traces the call (reading values on the host would break the graph; the CPU
    kernels and the reference check the range themselves and raise RuntimeError)."""
    validate = _host_check_default(target, validate)
    if not validate or target.numel() == 0:
        return
    # Under torch.func.vmap the target is a batched wrapper (boolean-mask indexing and host reads
    # are refused): check the values of every batch element on the tensor underneath.
    while torch._C._functorch.is_functorch_wrapped_tensor(target):
        target = torch._C._functorch.get_unwrapped(target)
    target_range = _target_range_op() if target.device.type == "cpu" and target.dtype in _INDEX_DTYPES else None
    if target_range is not None:
        # One pass in the extension (csrc/cpu/common.cpp target_range): min, max and count of
        # the entries that are not ignore_index.
        lo, hi, count = target_range(target, ignore_index).tolist()
        if count == 0:
            return
    else:
        # Ignored entries are mapped to 0 (always in range): one elementwise pass and one
        # reduction, no boolean-mask gather (which cost about a quarter of the fused kernel's
        # time on segmentation shapes).
        lo, hi = (int(v) for v in torch.aminmax(torch.where(target == ignore_index, 0, target)))
    bad = lo if lo < 0 else hi
    if lo < 0 or hi > high:
        _value_error("target", f"value {bad} is out of range [0, {high}] (ignore_index={ignore_index})")


def _user_stacklevel() -> int:
    """warnings.warn stacklevel of the first frame outside fused_losses and torch.nn's Module
    call machinery: the user's call site (their ghmc(...) call or their loss_module(...) call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    module_py = os.path.join("torch", "nn", "modules", "module.py")
    frame, level = sys._getframe(1), 1
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep)
                                 or frame.f_code.co_filename.endswith(module_py)):
        frame, level = frame.f_back, level + 1
    return level


def _warn_labels_without_background(target: torch.Tensor, ignore_index: int, c: int, validate) -> None:
    """ghmc(use_sigmoid=True) reads integer labels as detection labels (label == C: background,
    all C outputs negative). A classifier's labels, all in [0, C), then give every row exactly one
    positive: almost always a forgotten use_sigmoid=False. Warn (UserWarning; Python's default
    filter shows it once per call site) when the non-ignored labels never equal C. Runs where
    _check_range runs (validate=None: CPU tensors, not while torch.compile traces; True: also on
    CUDA, a host sync; False: never) and after it, so the labels are known to be in [0, C]."""
    validate = _host_check_default(target, validate)
    if not validate or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(target):
        return
    valid = target != ignore_index
    if not bool(valid.any()) or bool((valid & (target == c)).any()):
        return
    warnings.warn(f"ghmc: use_sigmoid=True (the default) reads integer targets as detection labels with label == "
                  f"C = {c} meaning background, but no target here is {c}: every row gets one positive class and "
                  f"C - 1 negatives (independent sigmoids). For a softmax classifier over C classes pass "
                  f"use_sigmoid=False (see the ghmc docstring).",
                  UserWarning, stacklevel=_user_stacklevel())


def _class_vector(arg: str, value, c: int, logits: torch.Tensor, validate=None) -> torch.Tensor:
    """A length-C sequence/tensor of per-class factors -> tensor on the logits' device.
    Finite values are checked like target ranges (_check_range): validate=None checks where the
    values are on the host (a sequence or a CPU tensor), True always (a host sync on CUDA),
    False never."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in _INDEX_DTYPES):
            _type_error(arg, f"expected a real tensor, got {value.dtype}")
        tensor = value.detach()
    else:
        try:
            tensor = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            _type_error(arg, f"expected None, a float or a length-C sequence, got {type(value).__name__}")
    if tensor.dim() != 1 or tensor.numel() != c:
        _value_error(arg, f"expected {c} values (one per class), got shape {tuple(tensor.shape)}")
    validate = _host_check_default(tensor, validate)
    if validate and not torch.compiler.is_compiling() and tensor.is_floating_point():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            first = int((~finite).nonzero()[0, 0])
            _value_error(arg, f"every per-class value must be finite; class {first} has {tensor[first].item()}")
    return tensor.to(device=logits.device, dtype=dtype)


def _alpha(alpha, c: int, logits: torch.Tensor, validate=None):
    if alpha is None:
        return None
    if _is_real(alpha):
        return _real("alpha", alpha)
    return _class_vector("alpha", alpha, c, logits, validate)


def _softmax_target_traps(target, logits: torch.Tensor) -> None:
    """Clearer errors for the two common wrong calls of the softmax family, raised where
    _index_target would raise anyway (same exception type), with the fix in the message:
    a float one-hot/probability target of the logits' shape (TypeError: target.argmax(1)), and
    channel-last logits (N, d1, ..., C) with an (N, d1, ...) target (ValueError naming the
    logits: logits.movedim(-1, 1))."""
    if not isinstance(target, torch.Tensor):
        return
    shape, lshape = tuple(target.shape), tuple(logits.shape)
    if target.is_floating_point():
        if shape == lshape:
            _type_error("target", f"expected class indices as int64 or int32, got a {target.dtype} target of the "
                        f"logits' shape {lshape}, which looks like one-hot or class probabilities; the softmax "
                        "family takes class indices: pass target.argmax(1) (classes in dim 1, as in the logits)")
        if shape == (lshape[0], *lshape[2:]):
            _type_error("target", f"expected class indices as int64 or int32, got {target.dtype} of the right shape "
                        f"{shape}: pass target.long()")
        return
    if (target.dtype in _INDEX_DTYPES and target.device == logits.device and logits.dim() >= 3
            and shape == lshape[:-1] and shape != (lshape[0], *lshape[2:])):
        _value_error("logits", f"shape {lshape} with a target of shape {shape} looks channel-last (classes in the "
                     f"last dim, C={lshape[-1]}); the softmax family takes channel-second logits (N, C, d1, ...): "
                     "pass logits.movedim(-1, 1)")


def _softmax_inputs(logits, target, ignore_index, validate):
    """Shared by the softmax family: (N, C, d...) logits and (N, d...) index target."""
    _logits(logits, 2, "(N, C) or (N, C, d1, ...)")
    c = logits.shape[1]
    if c == 0:
        _value_error("logits", "the class dimension (dim 1) is empty (C=0)")
    ignore_index = _int("ignore_index", ignore_index)
    _softmax_target_traps(target, logits)
    _index_target(target, logits, (logits.shape[0], *logits.shape[2:]), "(N,) or (N, d1, ...) class indices")
    _check_range(target, ignore_index, c - 1, validate)
    return c, ignore_index


def _sigmoid_label_shape_traps(target, logits: torch.Tensor, loss: str) -> None:
    """Clearer errors for integer labels of the wrong shape in the sigmoid family, raised where
    _index_target would raise anyway (same ValueError), with the fix in the message: (N,) logits
    with (N,) labels (one binary logit per sample: a float target), and channel-second (N, C, d1,
    ...) logits with (N, d1, ...) labels (ghmc: use_sigmoid=False; sigmoid_focal: channel-last)."""
    if not (isinstance(target, torch.Tensor) and target.dtype in _INDEX_DTYPES and target.device == logits.device):
        return
    shape, lshape = tuple(target.shape), tuple(logits.shape)
    if shape == lshape[:-1]:
        return
    expected = (f"integer labels need shape logits.shape[:-1] = {lshape[:-1]} (the last dim of the logits holds the "
                "C classes)")
    if logits.dim() == 1 and shape == lshape:
        _value_error("target", f"{expected}, got {shape}: (N,) logits hold one binary logit per sample; pass a float "
                     "0/1 target of the logits' shape, target.float() (1 = positive, as torchvision's "
                     "sigmoid_focal_loss)")
    if logits.dim() >= 3 and shape == (lshape[0], *lshape[2:]):
        if loss == "ghmc":
            _value_error("target", f"{expected}, got {shape}, the shape of class indices for channel-second logits "
                         f"(N, C, d1, ...) = {lshape}: for a softmax loss over the C = {lshape[1]} classes (semantic "
                         "segmentation, mmseg) pass use_sigmoid=False (the default use_sigmoid=True is mmdet's "
                         "detection variant: (..., C) logits)")
        _value_error("target", f"{expected}, got {shape}, the shape of class indices for channel-second logits "
                     f"(N, C, d1, ...) = {lshape}: the sigmoid family takes channel-last logits (..., C); pass "
                     "logits.movedim(1, -1)")


def _warn_single_class_labels(target, logits: torch.Tensor) -> None:
    """sigmoid_focal with integer labels and C == 1: label 0 is the class, label 1 == C is
    background (mmdet's convention), so binary 0/1 labels meaning 1 = positive are read inverted.
    Decided from dtype and shape only (no value is read: no host sync on CUDA, works in every
    validate mode); not while torch.compile traces. UserWarning at the caller's line, shown once
    per call site by Python's default filter."""
    if logits.shape[-1] != 1 or target.is_floating_point() or target.numel() == 0 or torch.compiler.is_compiling():
        return
    warnings.warn("sigmoid_focal: integer labels with C = 1 (logits.shape[-1] == 1) read label 0 as the positive "
                  "class and label 1 == C as BACKGROUND (mmdet's convention), so binary labels with 1 = positive "
                  "come out inverted. For binary classification pass a float 0/1 target of the logits' shape: "
                  "target.float()[:, None] for (N, 1) logits (torchvision's convention), or C = 2 logits (one per "
                  "class) with labels in [0, 2). If "
                  "label 1 means background, silence this with warnings.filterwarnings('ignore', "
                  "message='sigmoid_focal: integer labels with C = 1').",
                  UserWarning, stacklevel=_user_stacklevel())


def _sigmoid_inputs(logits, target, ignore_index, validate, loss="sigmoid_focal"):
    """Sigmoid family: float target of logits' shape, or integer labels of shape[:-1] with
    label == C meaning background."""
    _logits(logits, 1, "(..., C)")
    c = logits.shape[-1]
    if c == 0:
        _value_error("logits", "the class dimension (last dim) is empty (C=0)")
    ignore_index = _int("ignore_index", ignore_index)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        _same_device("target", target, logits)
        if target.shape != logits.shape:
            _value_error("target", f"a float target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    else:
        _sigmoid_label_shape_traps(target, logits, loss)
        _index_target(target, logits, logits.shape[:-1], "integer labels of shape logits.shape[:-1], C = background")
        _check_range(target, ignore_index, c, validate)
    return c, ignore_index


# --------------------------------------------------------------------------------------------
# Drop-in extras: sample weights, avg_factor, label smoothing, per-class sigmoid alpha
# --------------------------------------------------------------------------------------------
_REAL_DTYPES = _FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


def _math_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _host_readable(tensor: torch.Tensor, validate) -> bool:
    """Whether the values of `tensor` may be read on the host now (_host_check_default, and not
    a functorch-wrapped tensor, whose values cannot be read)."""
    return (_host_check_default(tensor, validate) and not torch.compiler.is_compiling()
            and not torch._C._functorch.is_functorch_wrapped_tensor(tensor))


def _weight_tensor(weight, logits: torch.Tensor, validate) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        _type_error("weight", f"expected None or a real tensor, got {type(weight).__name__}")
    if weight.dtype not in _REAL_DTYPES:
        _type_error("weight", f"expected a real (floating, integer or bool) tensor, got {weight.dtype}")
    _same_device("weight", weight, logits)
    if weight.is_floating_point() and weight.numel() and _host_readable(weight, validate):
        finite = torch.isfinite(weight.detach())
        if not bool(finite.all()):
            first = tuple(int(i) for i in (~finite).nonzero()[0])
            _value_error("weight", f"must be finite; weight{list(first)} = {weight.detach()[first].item()} (a zero "
                         "weight, not NaN/inf, drops an entry)")
    return weight


def _weight_shape_error(weight: torch.Tensor, expected: str, hint: str = ""):
    _value_error("weight", f"shape {tuple(weight.shape)} does not broadcast to {expected}{hint}")


def _softmax_weight(weight, logits: torch.Tensor, target: torch.Tensor, validate):
    """None, or `weight` broadcast to the target's shape (one value per sample), contiguous, in
    the math dtype (torch's broadcasting: trailing dims align, as mmdet's loss * weight)."""
    if weight is None:
        return None
    w = _weight_tensor(weight, logits, validate)
    shape = tuple(target.shape)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(w.shape), shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        hint = ""
        if w.dim() == 1 and len(shape) > 1 and w.shape[0] == shape[0]:
            hint = f"; a per-image weight of (N, d1, ...) targets needs shape {(shape[0],) + (1,) * (len(shape) - 1)}"
        _weight_shape_error(w, f"the target's shape {shape} (one value per sample)", hint)
    return w.to(_math_dtype(logits)).expand(shape).contiguous()


def _sigmoid_weight(weight, logits: torch.Tensor, validate):
    """None, or `weight` as one value per ROW (shape logits.shape[:-1], applies to all C outputs
    of the row; mmdet's (N,) anchor label_weights) or per ELEMENT (logits.shape), contiguous, in
    the math dtype. Shape logits.shape[:-1] is per row even where torch would broadcast it along
    the classes (N == C); other shapes broadcast to logits.shape (kept per row when constant
    along the class dim: shape (..., 1) or 0-dim)."""
    if weight is None:
        return None
    w = _weight_tensor(weight, logits, validate)
    shape, rows = tuple(logits.shape), tuple(logits.shape[:-1])
    if tuple(w.shape) not in (rows, shape):
        try:
            ok = tuple(torch.broadcast_shapes(tuple(w.shape), shape)) == shape
        except RuntimeError:
            ok = False
        if not ok:
            _weight_shape_error(w, f"the logits' shape {shape}", f" (expected {rows} per row or {shape} per element)")
        w = w.expand(*rows, 1)[..., 0] if w.dim() == 0 or w.shape[-1] == 1 else w.expand(shape)
    return w.to(_math_dtype(logits)).contiguous()


def avg_factor_arg(avg_factor, reduction: str, logits: torch.Tensor):
    """None, a Python number (finite, > 0) or a 0-dim real tensor on the logits' device (its value
    is not read: no host sync). Only with reduction='mean' (mmdet's weight_reduce_loss)."""
    if avg_factor is None:
        return None
    if reduction != "mean":
        _value_error("avg_factor", f"only applies with reduction='mean' (it replaces the mean's denominator), got "
                     f"reduction={reduction!r}; as in mmdet's weight_reduce_loss")
    if isinstance(avg_factor, torch.Tensor):
        if avg_factor.dtype not in _REAL_DTYPES or avg_factor.dtype == torch.bool:
            _type_error("avg_factor", f"expected a real tensor, got {avg_factor.dtype}")
        if avg_factor.dim() != 0:
            _value_error("avg_factor", f"expected a 0-dim tensor (a number), got shape {tuple(avg_factor.shape)}")
        _same_device("avg_factor", avg_factor, logits)
        return avg_factor
    return _real("avg_factor", avg_factor, low=0.0, low_inclusive=False)


def _label_smoothing(value, *, from_logits=True, use_sigmoid=False) -> float:
    eps = _real("label_smoothing", value, low=0.0, high=1.0)
    if eps > 0 and not from_logits:
        _value_error("label_smoothing", f"{eps} needs from_logits=True (the smoothed loss is computed from logits)")
    if eps > 0 and use_sigmoid:
        _value_error("label_smoothing", f"{eps} applies to the softmax family only: pass use_sigmoid=False (GHM-C "
                     "over a softmax) or smooth a float target yourself")
    return eps


def _sigmoid_alpha(alpha, c: int, logits: torch.Tensor, validate):
    """A float (torchvision's meaning; < 0 disables) or C per-class alphas in [0, 1] (a (C,)
    tensor in the math dtype on the logits' device; the range is checked where the values are on
    the host, as _class_vector's finiteness)."""
    if _is_real(alpha):
        return _real("alpha", alpha)
    if alpha is None:
        _type_error("alpha", "expected a float (< 0 disables it) or C per-class values in [0, 1], got None")
    tensor = _class_vector("alpha", alpha, c, logits, validate)
    # a sequence's values are on the host already (no device read); a tensor's where _host_readable says
    host = alpha.detach() if isinstance(alpha, torch.Tensor) else torch.as_tensor(alpha, dtype=torch.float64)
    if _host_readable(host, validate):
        bad = (host < 0) | (host > 1)
        if bool(bad.any()):
            first = int(bad.nonzero()[0, 0])
            _value_error("alpha", f"per-class alphas must lie in [0, 1]; class {first} has {host[first].item()}")
    return tensor


def _extras(**extras) -> dict[str, Any]:
    """(avg_factor is checked by each *_args function but never returned: the functional layer
    applies it, see avg_factor_arg.) The extras a backend receives, only where they differ from their defaults (a call without
    them is the plain loss, and backends that predate them keep working)."""
    return {k: v for k, v in extras.items() if v is not None and not (k == "label_smoothing" and v == 0.0)}


# --------------------------------------------------------------------------------------------
# Per-loss argument sets
# --------------------------------------------------------------------------------------------
def focal_args(logits, target, *, gamma, alpha, ignore_index, reduction, from_logits, validate, weight=None,
               label_smoothing=0.0, avg_factor=None, epsilon=0.0) -> dict[str, Any]:
    c, ignore_index = _softmax_inputs(logits, target, ignore_index, validate)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    from_logits = _bool("from_logits", from_logits)
    return dict(gamma=_real("gamma", gamma, low=0.0), alpha=_alpha(alpha, c, logits, validate),
                ignore_index=ignore_index, reduction=reduction_arg(reduction), from_logits=from_logits,
                **_extras(weight=_softmax_weight(weight, logits, target, validate),
                          label_smoothing=_label_smoothing(label_smoothing, from_logits=from_logits),
                          epsilon=poly1_epsilon_arg(epsilon)))


def sigmoid_focal_args(logits, target, *, alpha, gamma, ignore_index, reduction, validate,
                       weight=None, avg_factor=None, single_class_warning=True, epsilon=0.0) -> dict[str, Any]:
    c, ignore_index = _sigmoid_inputs(logits, target, ignore_index, validate)
    if single_class_warning:
        _warn_single_class_labels(target, logits)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(alpha=_sigmoid_alpha(alpha, c, logits, validate), gamma=_real("gamma", gamma, low=0.0),
                ignore_index=ignore_index, reduction=reduction_arg(reduction),
                **_extras(weight=_sigmoid_weight(weight, logits, validate), epsilon=poly1_epsilon_arg(epsilon)))


def ohem_args(logits, target, *, keep, thresh, min_kept, ignore_index, reduction, validate, weight=None,
              label_smoothing=0.0, avg_factor=None) -> dict[str, Any]:
    _, ignore_index = _softmax_inputs(logits, target, ignore_index, validate)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    if not _is_real(keep):
        _type_error("keep", f"expected a float in (0, 1] or an int >= 1, got {type(keep).__name__}")
    if _is_int(keep):
        keep = _int("keep", keep)
        if keep <= 0:
            _value_error("keep", f"an int keep must be >= 1, got {keep}")
    else:
        keep = float(keep)
        if not (0.0 < keep and keep <= 1.0):
            _value_error("keep", f"a float keep must be in (0, 1], got {keep}")
    if thresh is not None:
        thresh = _real("thresh", thresh)
    if min_kept is not None:
        if thresh is None:
            _value_error("min_kept", "only applies together with thresh")
        min_kept = _int("min_kept", min_kept, low=0)
        images = logits.shape[0] if logits.dim() > 2 else 1  # reference.ohem_min_kept_total's rule
        if min_kept * images > _INT64_MAX:
            _value_error("min_kept", f"min_kept x N = {min_kept} x {images} (per image, N images) overflows int64")
    return dict(keep=keep, thresh=thresh, min_kept=min_kept, ignore_index=ignore_index,
                reduction=reduction_arg(reduction),
                **_extras(weight=_softmax_weight(weight, logits, target, validate),
                          label_smoothing=_label_smoothing(label_smoothing)))


def ghmc_args(logits, target, *, bins, momentum, state, use_sigmoid, ignore_index, reduction, validate,
              weight=None, label_smoothing=0.0, process_group=None, avg_factor=None) -> dict[str, Any]:
    use_sigmoid = _bool("use_sigmoid", use_sigmoid)
    if use_sigmoid:
        _, ignore_index = _sigmoid_inputs(logits, target, ignore_index, validate, loss="ghmc")
    else:
        _, ignore_index = _softmax_inputs(logits, target, ignore_index, validate)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    bins = _int("bins", bins, low=1)
    momentum = _real("momentum", momentum, low=0.0, high=1.0, high_inclusive=False)
    if state is None:
        if momentum > 0:
            _value_error("state", f"momentum={momentum} > 0 needs a state tensor (the EMA of bin counts); "
                         "use fused_losses.nn.GHMCLoss, which owns one")
    else:
        if not isinstance(state, torch.Tensor):
            _type_error("state", f"expected a float32 tensor, got {type(state).__name__}")
        if state.dtype != torch.float32 or tuple(state.shape) != (bins,):
            _value_error("state", f"expected a float32 tensor of shape ({bins},), got {state.dtype} {tuple(state.shape)}")
        _same_device("state", state, logits)
        if state.requires_grad:
            _value_error("state", "must not require grad (it is updated in place, like batch norm's running stats; "
                         "pass a buffer or state.detach())")
    if use_sigmoid and not target.is_floating_point():
        _warn_labels_without_background(target, ignore_index, logits.shape[-1], validate)
    if _vmap_active():
        raise RuntimeError("ghmc: torch.func.vmap is not supported (the bins are counted over the whole batch and the "
                           "EMA state is updated in place); call it once per batch element")
    weight = (_sigmoid_weight(weight, logits, validate) if use_sigmoid
              else _softmax_weight(weight, logits, target, validate))
    return dict(bins=bins, momentum=momentum, state=state, use_sigmoid=use_sigmoid, ignore_index=ignore_index,
                reduction=reduction_arg(reduction),
                **_extras(weight=weight, label_smoothing=_label_smoothing(label_smoothing, use_sigmoid=use_sigmoid),
                          process_group=process_group))


def ib_args(logits, target, features, *, alpha, epsilon, weight, gamma, detach_factor, reduction,
            validate) -> dict[str, Any]:
    _logits(logits, 2, "(N, C)")
    if logits.dim() != 2:
        _value_error("logits", f"ib takes (N, C) logits only, got shape {tuple(logits.shape)}")
    n, c = logits.shape
    if c == 0:
        _value_error("logits", "the class dimension (dim 1) is empty (C=0)")
    _index_target(target, logits, (n,), "(N,) class indices")
    _check_range(target, _NO_IGNORE, c - 1, validate)
    if not isinstance(features, torch.Tensor):
        _type_error("features", f"expected a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        _type_error("features", f"expected a floating tensor, got {features.dtype}")
    _same_device("features", features, logits)
    if not (features.shape in ((n,), (n, 1)) or (features.dim() == 2 and features.shape[0] == n)):
        _value_error("features", f"expected (N,), (N, 1) or (N, D) with N={n}, got {tuple(features.shape)}")
    return dict(alpha=_real("alpha", alpha), epsilon=_real("epsilon", epsilon, low=0.0, low_inclusive=False),
                weight=None if weight is None else _class_vector("weight", weight, c, logits, validate),
                gamma=_real("gamma", gamma, low=0.0), detach_factor=_bool("detach_factor", detach_factor),
                reduction=reduction_arg(reduction))


def target_grad_backend(loss: str, target: torch.Tensor, requested: str | None) -> str | None:
    """The backend for a call whose float target must be differentiated (sigmoid_focal, sigmoid
    ghmc).

    The compiled backends (cuda, triton, cpu) compute no derivative for the target: their result
    would require grad while target.grad stays None (or drop a forward-mode tangent), silently
    wrong. Such calls (grad mode on and a float target with requires_grad, or a float target
    with a forward-mode tangent) run on 'reference' (plain autograd, differentiates the
    target) when the backend is chosen automatically; a compiled backend asked for explicitly
    (argument or FUSED_LOSSES_BACKEND) is a RuntimeError. Otherwise `requested` is returned."""
    if not target.is_floating_point():
        return requested
    return _differentiated_input_backend(loss, "a target", "target", target, requested)


def weight_grad_backend(loss: str, weight: torch.Tensor | None, requested: str | None) -> str | None:
    """As target_grad_backend, for a sample `weight` that requires grad (learned weights): the
    compiled kernels take the weight as a constant, so such calls run on 'reference'."""
    if weight is None:
        return requested
    return _differentiated_input_backend(loss, "a weight", "weight", weight, requested)


def _differentiated_input_backend(loss: str, what: str, name: str, tensor: torch.Tensor,
                                  requested: str | None) -> str | None:
    if not ((torch.is_grad_enabled() and tensor.requires_grad) or _has_forward_tangent(tensor)):
        return requested
    if requested is None or requested == "reference":
        return "reference"
    raise RuntimeError(f"backend {requested!r} cannot run {loss} with {what} that requires grad (or carries a "
                       f"forward-mode tangent): its kernels compute no derivative for the {name} ({name}.grad "
                       f"would stay None); pass backend=None or 'reference' to differentiate the {name}, or "
                       f"{name}.detach() if no {name} derivative is wanted")


def _has_forward_tangent(tensor: torch.Tensor) -> bool:
    """True when forward-mode AD (torch.autograd.forward_ad dual tensors, torch.func.jvp) gives
    `tensor` a tangent at the current level. Not while torch.compile traces (forward AD is not
    traced there); a tensor whose tangent cannot be read (vmap nested in jvp) counts as dual."""
    from torch.autograd import forward_ad
    if torch.compiler.is_compiling() or forward_ad._current_level < 0:
        return False
    try:
        return forward_ad.unpack_dual(tensor).tangent is not None
    except RuntimeError:
        return True


def class_weights_args(counts, scheme, beta) -> tuple[torch.Tensor, str, float]:
    if scheme not in ("inverse", "effective"):
        _value_error("scheme", f"unknown scheme {scheme!r}; expected 'inverse' or 'effective'")
    beta = _real("beta", beta, low=0.0, low_inclusive=False, high=1.0, high_inclusive=False)
    if isinstance(counts, torch.Tensor):
        tensor = counts.detach()
        if not (tensor.is_floating_point() or tensor.dtype in _INDEX_DTYPES or tensor.dtype in (torch.int16, torch.uint8)):
            _type_error("counts", f"expected real counts, got {tensor.dtype}")
    else:
        try:
            tensor = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            _type_error("counts", f"expected a sequence or tensor of per-class counts, got {type(counts).__name__}")
    if tensor.dim() != 1 or tensor.numel() == 0:
        _value_error("counts", f"expected a non-empty 1-D sequence of per-class counts, got shape {tuple(tensor.shape)}")
    bad = (tensor <= 0) | ~torch.isfinite(tensor.to(torch.float64))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        _value_error("counts", f"every class needs a finite count > 0; class {first} has {tensor[first].item()}")
    return tensor, scheme, beta


# --------------------------------------------------------------------------------------------
# ---- distribution focal / Poly-1 (#24) ----
# --------------------------------------------------------------------------------------------
def poly1_epsilon_arg(epsilon):
    """Poly-1's epsilon (focal / sigmoid_focal): a finite real number, any sign (docs/losses/detector.md:
    epsilon >= -1 keeps a loss without alpha >= 0, but a negative epsilon is the paper's own
    ablation and is not refused). Returns None for 0 (the plain loss: backends receive no
    `epsilon` then, _extras), else the float."""
    value = _real("epsilon", epsilon)
    return None if value == 0.0 else value


def _dfl_weight(weight, logits: torch.Tensor, target: torch.Tensor, validate):
    """None, or `weight` broadcast to the target's shape (one value per row of bins), contiguous, in
    the math dtype."""
    if weight is None:
        return None
    w = _weight_tensor(weight, logits, validate)
    shape = tuple(target.shape)
    try:
        ok = tuple(torch.broadcast_shapes(tuple(w.shape), shape)) == shape
    except RuntimeError:
        ok = False
    if not ok:
        _weight_shape_error(w, f"the target's shape {shape} (one value per row of bins)")
    return w.to(_math_dtype(logits)).expand(shape).contiguous()


def _check_dfl_range(target: torch.Tensor, n: int, validate) -> None:
    """Labels of distribution_focal must lie in [0, n] (NaN is out of range); read on the host only
    where _host_check_default allows (CPU tensors, or validate=True)."""
    if not _host_check_default(target, validate) or target.numel() == 0:
        return
    while torch._C._functorch.is_functorch_wrapped_tensor(target):
        target = torch._C._functorch.get_unwrapped(target)
    t = target.detach()
    lo, hi = (float(v) for v in torch.aminmax(t))  # one pass; a NaN label makes both NaN
    if lo >= 0 and hi <= n:
        return
    bad = ~((t >= 0) & (t <= n))  # NaN compares False: bad
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        _value_error("target", f"value {t[first].item()} at {list(first)} is out of range [0, {n}] (distribution_focal "
                     f"labels lie in [0, n], n + 1 = logits.shape[-1] = {n + 1} bins)")


def distribution_focal_args(logits, target, *, weight=None, avg_factor=None, reduction="mean",
                            validate=None) -> dict[str, Any]:
    """distribution_focal: logits (..., n + 1) with n + 1 >= 2 bins, a real target of shape
    logits.shape[:-1] with values in [0, n] (float, or integer bin indices), weight per row."""
    _logits(logits, 1, "(..., n + 1) bin logits")
    bins = logits.shape[-1]
    if bins < 2:
        _value_error("logits", f"expected n + 1 >= 2 bins in the last dim, got shape {tuple(logits.shape)}")
    if not isinstance(target, torch.Tensor):
        _type_error("target", f"expected a torch.Tensor, got {type(target).__name__}")
    if not (target.is_floating_point() or target.dtype in _INDEX_DTYPES):
        _type_error("target", f"expected float labels in [0, n] (or int64/int32 bin indices), got {target.dtype}")
    _same_device("target", target, logits)
    if tuple(target.shape) != tuple(logits.shape[:-1]):
        _value_error("target", f"expected shape {tuple(logits.shape[:-1])} (logits.shape[:-1]: one label per row of "
                     f"n + 1 = {bins} bins), got {tuple(target.shape)}")
    _check_dfl_range(target, bins - 1, validate)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(reduction=reduction_arg(reduction), **_extras(weight=_dfl_weight(weight, logits, target, validate)))


# ---- quality_focal / varifocal / asymmetric (#24) ----
def _unit_interval(arg: str, tensor: torch.Tensor, validate, what: str, nan_ok: bool = False) -> None:
    """Values of a float tensor must lie in [0, 1] (NaN is out of range unless nan_ok: logits,
    whose NaN a zero weight may mask); read on the host where _host_readable allows (CPU tensors
    by default, CUDA with validate=True: a host sync)."""
    if tensor.numel() == 0 or not _host_readable(tensor, validate):
        return
    t = tensor.detach()
    # one pass without logits-sized temporaries (aminmax propagates NaN); the mask only to name
    # the first bad entry
    lo, hi = (float(v) for v in torch.aminmax(t))
    if lo >= 0 and hi <= 1:
        return
    bad = ((t < 0) | (t > 1)) if nan_ok else ~((t >= 0) & (t <= 1))
    if bool(bad.any()):
        first = tuple(int(i) for i in bad.nonzero()[0])
        _value_error(arg, f"{what} must lie in [0, 1]; {arg}{list(first)} = {t[first].item()}")


def _detector_targets(logits, target, score, ignore_index, validate, loss: str, *, label_form: bool = True):
    """(..., C) logits with a dense float target of their shape in [0, 1], or (label_form) integer
    labels of shape logits.shape[:-1] in [0, C] (C = background) or ignore_index with a float
    `score` of the same shape in [0, 1]. Returns (C, ignore_index)."""
    _logits(logits, 1, "(..., C)")
    c = logits.shape[-1]
    if c == 0:
        _value_error("logits", "the class dimension (last dim) is empty (C=0)")
    ignore_index = _int("ignore_index", ignore_index)
    if not isinstance(target, torch.Tensor):
        _type_error("target", f"expected a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if score is not None:
            _value_error("score", f"{loss}: score goes with integer labels; a float target already holds the soft "
                         "targets (pass score=None)")
        _same_device("target", target, logits)
        if target.shape != logits.shape:
            _value_error("target", f"a float target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
        _unit_interval("target", target, validate, "soft targets")
        return c, ignore_index
    if not label_form:
        _type_error("target", f"{loss} takes a float (multi-hot or soft) target of the logits' shape, got "
                    f"{target.dtype}; pass target.float()")
    _sigmoid_label_shape_traps(target, logits, loss)
    _index_target(target, logits, logits.shape[:-1], "integer labels of shape logits.shape[:-1], C = background")
    _check_range(target, ignore_index, c, validate)
    if score is None:
        _value_error("score", f"{loss}: integer labels need score= (the quality, e.g. the IoU, at the label's class; "
                     "shape logits.shape[:-1]), or pass a dense float target of the logits' shape")
    if not isinstance(score, torch.Tensor) or not score.is_floating_point():
        _type_error("score", f"expected a floating tensor, got {type(score).__name__ if not isinstance(score, torch.Tensor) else score.dtype}")
    _same_device("score", score, logits)
    if tuple(score.shape) != tuple(logits.shape[:-1]):
        _value_error("score", f"expected shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(score.shape)}")
    _unit_interval("score", score, validate, "scores")
    return c, ignore_index


def quality_focal_args(logits, target, *, score, beta, activated, ignore_index, reduction, validate, weight=None,
                       avg_factor=None) -> dict[str, Any]:
    _detector_targets(logits, target, score, ignore_index, validate, "quality_focal")
    ignore_index = _int("ignore_index", ignore_index)
    activated = _bool("activated", activated)
    if activated:
        _unit_interval("logits", logits, validate, "with activated=True the logits are probabilities and",
                       nan_ok=True)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(score=score, beta=_real("beta", beta, low=0.0), activated=activated, ignore_index=ignore_index,
                reduction=reduction_arg(reduction), **_extras(weight=_sigmoid_weight(weight, logits, validate)))


def varifocal_args(logits, target, *, score, alpha, gamma, iou_weighted, detach_modulation, ignore_index, reduction,
                   validate, weight=None, avg_factor=None) -> dict[str, Any]:
    _detector_targets(logits, target, score, ignore_index, validate, "varifocal")
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(score=score, alpha=_real("alpha", alpha, low=0.0), gamma=_real("gamma", gamma, low=0.0),
                iou_weighted=_bool("iou_weighted", iou_weighted),
                detach_modulation=_bool("detach_modulation", detach_modulation),
                ignore_index=_int("ignore_index", ignore_index), reduction=reduction_arg(reduction),
                **_extras(weight=_sigmoid_weight(weight, logits, validate)))


def asymmetric_args(logits, target, *, gamma_pos, gamma_neg, clip, eps, detach_focusing, reduction, validate,
                    weight=None, avg_factor=None) -> dict[str, Any]:
    _detector_targets(logits, target, None, -100, validate, "asymmetric", label_form=False)
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    clip = 0.0 if clip is None else _real("clip", clip, low=0.0, high=1.0)
    return dict(gamma_pos=_real("gamma_pos", gamma_pos, low=0.0), gamma_neg=_real("gamma_neg", gamma_neg, low=0.0),
                clip=clip, eps=_real("eps", eps, low=0.0, high=1.0),
                detach_focusing=_bool("detach_focusing", detach_focusing), reduction=reduction_arg(reduction),
                **_extras(weight=_sigmoid_weight(weight, logits, validate)))


# ---- seesaw / eqlv2 (#25) ----
def _longtail_state(arg: str, state, shape: tuple, logits: torch.Tensor, loss: str) -> torch.Tensor:
    """A float32 state tensor of `shape` on the logits' device that does not require grad (updated
    in place by the call; docs/losses/longtail.md)."""
    if not isinstance(state, torch.Tensor):
        _type_error(arg, f"expected a float32 tensor, got {type(state).__name__}")
    if state.dtype != torch.float32 or tuple(state.shape) != tuple(shape):
        _value_error(arg, f"expected a float32 tensor of shape {tuple(shape)}, got {state.dtype} {tuple(state.shape)}")
    _same_device(arg, state, logits)
    if state.requires_grad:
        _value_error(arg, "must not require grad (it is updated in place, like batch norm's running stats; pass a "
                     "buffer or its .detach())")
    if _vmap_active():
        raise RuntimeError(f"{loss}: torch.func.vmap is not supported (the statistics are taken over the whole batch "
                           f"and the state is updated in place); call it once per batch element")
    return state


def seesaw_args(logits, target, cum_samples, *, p, q, eps, objectness, return_dict, ignore_index, reduction, validate,
                weight=None, avg_factor=None, process_group=None) -> dict[str, Any]:
    objectness = _bool("objectness", objectness)
    _logits(logits, 2, "(N, C) or, with objectness, (N, C + 2)")
    if logits.dim() != 2:
        _value_error("logits", f"seesaw takes (N, C) logits (or (N, C + 2) with objectness), got shape "
                     f"{tuple(logits.shape)}")
    c = logits.shape[1] - (2 if objectness else 0)
    if c < 1:
        _value_error("logits", f"expected at least {3 if objectness else 1} columns, got {logits.shape[1]}")
    ignore_index = _int("ignore_index", ignore_index)
    _index_target(target, logits, (logits.shape[0],), "(N,) class indices" + (", C = background" if objectness else ""))
    _check_range(target, ignore_index, c if objectness else c - 1, validate)
    _longtail_state("cum_samples", cum_samples, (c + 1,) if objectness else (c,), logits, "seesaw")
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(p=_real("p", p, low=0.0), q=_real("q", q, low=0.0), eps=_real("eps", eps, low=0.0, low_inclusive=False),
                objectness=objectness, return_dict=_bool("return_dict", return_dict), ignore_index=ignore_index,
                reduction=reduction_arg(reduction),
                **_extras(weight=_softmax_weight(weight, logits, target, validate), process_group=process_group))


def eqlv2_args(logits, target, state, *, gamma, mu, alpha, objectness, ignore_index, reduction, validate,
               weight=None, avg_factor=None, process_group=None) -> dict[str, Any]:
    objectness = _bool("objectness", objectness)
    _logits(logits, 1, "(..., C) or, with objectness, (..., C + 1)")
    c = logits.shape[-1] - (1 if objectness else 0)
    if c < 1:
        _value_error("logits", f"expected at least {2 if objectness else 1} classes in the last dim, got "
                     f"{logits.shape[-1]}")
    ignore_index = _int("ignore_index", ignore_index)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        _type_error("target", f"expected integer labels (int64 or int32) of shape logits.shape[:-1], C = background, "
                    f"got {target.dtype}")
    _sigmoid_label_shape_traps(target, logits, "eqlv2")
    _index_target(target, logits, logits.shape[:-1], "integer labels of shape logits.shape[:-1], C = background")
    _check_range(target, ignore_index, c, validate)
    _longtail_state("state", state, (3, c), logits, "eqlv2")
    avg_factor_arg(avg_factor, reduction_arg(reduction), logits)
    return dict(gamma=_real("gamma", gamma), mu=_real("mu", mu), alpha=_real("alpha", alpha),
                objectness=objectness, ignore_index=ignore_index, reduction=reduction_arg(reduction),
                **_extras(weight=_sigmoid_weight(weight, logits, validate), process_group=process_group))
