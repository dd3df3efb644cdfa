"""Loading the compiled extension, never failing at import.

The extension is two modules that only register operators (torch.ops.fused_losses.*):

  fused_losses._C       the op schemas and the CPU kernels; always built
  fused_losses._C_cuda  the CUDA kernels for the same ops; built only where nvcc was found
                        (not by `make demo`), imported after _C when its file is present

Both are imported once, when this module is first imported (the backends decide their
availability at import, so that torch.compile sees constants). `load_error()` /
`cuda_load_error()` say why a module is not loaded, naming the real cause (not built, built
against another torch, ...) and the fix for pip and make users; the compiled backends report
those reasons, and `warn_fallback(device_type)` turns them into one UserWarning when a loss call
falls back to a slower backend because of them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings

import torch

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

REBUILD_HINT = ("fix: build it against the installed torch, from the fused_losses source tree: "
                "`pip install --no-build-isolation --force-reinstall --no-deps .` (pip; `-e .` for an "
                "editable install) or `make build` (Makefile)")


def _describe_failure(module: str, exc: BaseException) -> str:
    """One line: which module, what went wrong (in words, then the original text), the fix."""
    text = f"{type(exc).__name__}: {exc}"
    if "undefined symbol" in str(exc):
        cause = (f"it was built against another torch than the installed {torch.__version__} "
                 "(C++ ABI mismatch)")
    elif isinstance(exc, ImportError):
        cause = "it cannot be loaded"
    else:
        cause = "loading it raised an error"
    return f"compiled extension {module} is broken: {cause} ({text}); {REBUILD_HINT}"


def _missing(module: str, elsewhere: str | None = None) -> str:
    stem = module.rsplit(".", 1)[1]
    found = "" if elsewhere is None else f"; the one in {elsewhere}, another copy of fused_losses, is not used"
    return (f"compiled extension {module} is missing (no {stem}*.so in {_PACKAGE_DIR}{found}): the package "
            f"was installed or checked out without building it, or its build failed; {REBUILD_HINT}")


def _located_elsewhere(module: str) -> str | None:
    """The folder of `module`'s file when it is not this package's folder, else None.

    An editable install's finder answers for submodules missing from the package's own folder,
    so a source tree without its own build could otherwise load the .so of another tree (another
    checkout sharing the venv): an extension built from other sources.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.has_location or not spec.origin:
        return None
    folder = os.path.dirname(os.path.realpath(spec.origin))
    return None if folder == os.path.realpath(_PACKAGE_DIR) else folder


def _present(module: str) -> bool:
    """Whether `module` is found in this package's folder (or by a custom finder)."""
    try:
        return importlib.util.find_spec(module) is not None and _located_elsewhere(module) is None
    except Exception:  # noqa: BLE001 - a broken import system for this name: treat as absent
        return False


def _import(module: str) -> str | None:
    """None when `module` imported, else the one-line reason."""
    try:
        if importlib.util.find_spec(module) is None:
            return _missing(module)
        elsewhere = _located_elsewhere(module)
        if elsewhere is not None:
            return _missing(module, elsewhere)
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - ImportError (ABI, missing library) or a registration error
        return _describe_failure(module, exc)
    return None


def _load() -> tuple[str | None, str | None, bool]:
    """(error of _C, error of _C_cuda, whether _C_cuda's file exists here)."""
    c_error = _import("fused_losses._C")
    cuda_present = _present("fused_losses._C_cuda")
    if c_error is not None:
        cuda_error = "compiled extension fused_losses._C (which holds the op schemas) is not loaded"
    elif not cuda_present:
        cuda_error = ("the extension was built without its CUDA part fused_losses._C_cuda (torch without "
                      "CUDA, no nvcc, FUSED_LOSSES_BUILD_CUDA=0, or only `make demo` so far; `make build` or "
                      "`FUSED_LOSSES_BUILD_CUDA=1 pip install --no-build-isolation .` builds it)")
    else:
        cuda_error = _import("fused_losses._C_cuda")
    return c_error, cuda_error, cuda_present


_C_ERROR, _CUDA_ERROR, _CUDA_PRESENT = _load()


def load_error() -> str | None:
    """None when fused_losses._C is loaded, else a one-line reason."""
    return _C_ERROR


def loaded() -> bool:
    return _C_ERROR is None


def cuda_load_error() -> str | None:
    """None when fused_losses._C_cuda is loaded (after _C), else a one-line reason."""
    return _CUDA_ERROR


def compiled_with_cuda() -> bool:
    """Whether the CUDA part of the extension is loaded (it needs no GPU to load)."""
    return _CUDA_ERROR is None


# A broken, missing or stale extension makes the compiled backend of a device type unavailable,
# and the automatic choice then quietly takes a slower one. That deserves a warning, once per
# cause; a merely absent GPU, or a CUDA part that was never built (a build choice), does not.
_FALLBACK_CAUSE = {
    "cpu": _C_ERROR,
    "cuda": _C_ERROR if _C_ERROR is not None else (_CUDA_ERROR if _CUDA_PRESENT else None),
}
_warned: set[str] = set()


def note_stale_build(device_type: str, reason: str) -> None:
    """Called by a compiled backend that found the loaded extension lacking its ops (a build
    older than the Python code): a fallback for `device_type` then warns with `reason`."""
    if _FALLBACK_CAUSE.get(device_type) is None:
        _FALLBACK_CAUSE[device_type] = reason


def warn_fallback(device_type: str, backend: str) -> None:
    """Called by the automatic backend choice when it settles below the compiled backend of
    `device_type`: one UserWarning per cause and process if the extension is to blame."""
    cause = _FALLBACK_CAUSE.get(device_type)
    if cause is None or cause in _warned or torch.compiler.is_compiling():
        return
    _warned.add(cause)
    warnings.warn(f"fused_losses: {device_type} tensors run on the slower '{backend}' backend because the "
                  f"{cause}", UserWarning, stacklevel=5)
