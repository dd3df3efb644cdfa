"""'reference': the plain-PyTorch implementations of fused_losses.reference, on any device."""
from fused_losses import reference
from fused_losses._backends import LOSSES, Backend

BACKEND = Backend(
    name="reference",
    availability=lambda: (True, "plain PyTorch (autograd), any device; computes in at least float32"),
    device_types=("cpu", "cuda", "meta"),
    losses={loss: getattr(reference, loss) for loss in LOSSES},
)
