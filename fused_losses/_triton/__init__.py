"""Triton kernels of the 'triton' backend: kernels.py (the @triton.jit kernels), launch.py
(launchers, device-side glue for the batch-coupled losses), ops.py (torch.library custom ops
``fused_losses_triton::*`` with fake kernels and autograd, and the loss functions the backend
serves). Importing this package imports triton."""
from fused_losses._triton.ops import focal, ghmc, ib, ohem, sigmoid_focal

__all__ = ["focal", "sigmoid_focal", "ohem", "ghmc", "ib"]
# ---- quality_focal / varifocal / asymmetric (#24) ----
from fused_losses._triton.detector_sigmoid import asymmetric, quality_focal, varifocal  # noqa: E402

__all__ += ["quality_focal", "varifocal", "asymmetric"]

# ---- distribution focal (#24) ----
from fused_losses._triton.dfl import distribution_focal  # noqa: E402

__all__ += ["distribution_focal"]
