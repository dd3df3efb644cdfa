"""'cuda': hand-written CUDA kernels for CUDA tensors (csrc/cuda/*.cu, the extension module
fused_losses._C_cuda, which registers them for the CUDA key of fused_losses._C's ops).

The CUDA kernels implement the same op schemas as the CPU kernels (csrc/ops.cpp), so this
backend maps the normalised arguments onto the ops exactly as the 'cpu' backend does: it reuses
the cpu backend's functions (fused_losses._backends.cpu_backend) and the one Python op layer
(fused_losses._ops: fake kernels and autograd formulas, shared by every dispatch key). Only the
availability and the device/dtype set differ.
"""
from __future__ import annotations

import torch

from fused_losses import _ext, _ops
from fused_losses._backends import Backend, cpu_backend

_REQUIRED_OPS = cpu_backend._REQUIRED_OPS


def _missing_cuda_kernels() -> list[str]:
    """Ops of _REQUIRED_OPS without a CUDA kernel in the loaded extension (a stale build)."""
    missing = []
    for name in _REQUIRED_OPS:
        if not hasattr(torch.ops.fused_losses, name):
            missing.append(name)
        elif not torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_losses::{name}", "CUDA"):
            missing.append(name)
    return missing


def _probe() -> tuple[bool, str]:
    """(available, reason); every fact that fails is named."""
    if not _ext.loaded():
        return False, _ext.load_error()
    facts = []
    if not _ext.compiled_with_cuda():
        facts.append(_ext.cuda_load_error())
    else:
        missing = _missing_cuda_kernels()
        if missing:
            facts.append(f"extension fused_losses._C_cuda lacks CUDA kernels for {missing} (stale build? "
                         f"{_ext.REBUILD_HINT})")
            _ext.note_stale_build("cuda", facts[-1])
    if not torch.cuda.is_available():
        facts.append("no CUDA device is visible")
    if facts:
        return False, "; ".join(facts)
    _ops.register()
    return True, "compiled CUDA kernels (fused_losses._C_cuda) for CUDA tensors"


# Decided once, at import, like the cpu backend: availability() is also called while
# torch.compile traces a call of the public API, so it must be a plain constant lookup.
_AVAILABILITY = _probe()


def _availability() -> tuple[bool, str]:
    return _AVAILABILITY


BACKEND = Backend(
    name="cuda",
    availability=_availability,
    device_types=("cuda",),
    losses=dict(cpu_backend.BACKEND.losses),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
)


# ---- seesaw / eqlv2 (#25) ----
# The cpu backend's entries run here only where _C_cuda registers their CUDA kernel.
for _loss, _op in (("seesaw", "seesaw_forward"), ("eqlv2", "eqlv2_forward")):
    if not (_ext.loaded() and hasattr(torch.ops.fused_losses, _op)
            and torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_losses::{_op}", "CUDA")):
        BACKEND.losses.pop(_loss, None)
