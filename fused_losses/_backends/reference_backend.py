"""'reference': the plain-PyTorch implementations of fused_losses.reference, on any device."""
from fused_losses import reference
from fused_losses._backends import LOSSES, Backend

BACKEND = Backend(
    name="reference",
    availability=lambda: (True, "plain PyTorch (autograd), any device; computes in at least float32"),
    device_types=("cpu", "cuda", "meta"),
    losses={loss: getattr(reference, loss) for loss in LOSSES},
)


# ---- distribution focal / Poly-1 (#24) ----
# focal / sigmoid_focal with Poly-1's epsilon (passed only when != 0: _validate._extras) are the
# references focal_poly1 / sigmoid_focal_poly1; without it the plain references, unchanged.
def _poly1(plain, poly):
    def run(*args, epsilon=None, **kwargs):
        return plain(*args, **kwargs) if epsilon is None else poly(*args, epsilon=epsilon, **kwargs)
    run.__name__ = plain.__name__
    return run


BACKEND.losses["focal"] = _poly1(reference.focal, reference.focal_poly1)
BACKEND.losses["sigmoid_focal"] = _poly1(reference.sigmoid_focal, reference.sigmoid_focal_poly1)
