"""'cuda': hand-written CUDA kernels of fused_losses._C for CUDA tensors (kernels: issue #7)."""
import torch

from fused_losses import _ext
from fused_losses._backends import Backend


def _availability():
    if not _ext.loaded():
        return False, _ext.load_error()
    facts = []
    if not _ext.compiled_with_cuda():
        facts.append("the extension was built without its CUDA part (torch without CUDA, no nvcc, "
                     "or FUSED_LOSSES_BUILD_CUDA=0)")
    if not torch.cuda.is_available():
        facts.append("no CUDA device is visible")
    facts.append("the fused CUDA kernels are not implemented yet (issue #7)")
    return False, "; ".join(facts)


BACKEND = Backend(name="cuda", availability=_availability, device_types=("cuda",))
