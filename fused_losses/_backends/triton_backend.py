"""'triton': Triton kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)
(kernels: issue #4)."""
import importlib.util

import torch

from fused_losses._backends import Backend


def _availability():
    facts = []
    if importlib.util.find_spec("triton") is None:
        facts.append("triton is not installed")
    if not torch.cuda.is_available():
        facts.append("no CUDA device is visible")
    facts.append("the Triton kernels are not implemented yet (issue #4)")
    return False, "; ".join(facts)


BACKEND = Backend(name="triton", availability=_availability, device_types=("cuda",))
