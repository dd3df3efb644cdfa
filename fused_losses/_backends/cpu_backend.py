"""'cpu': fused C++ kernels of fused_losses._C for CPU tensors (kernels: issue #3)."""
from fused_losses import _ext
from fused_losses._backends import Backend


def _availability():
    if not _ext.loaded():
        return False, _ext.load_error()
    return False, "extension fused_losses._C is built, but the fused CPU kernels are not implemented yet (issue #3)"


BACKEND = Backend(name="cpu", availability=_availability, device_types=("cpu",))
