"""Loading the compiled extension fused_losses._C, never failing at import.

The extension only registers operators (torch.ops.fused_losses.*); importing it is all that is
needed. If it is missing or broken, `load_error()` says why and every compiled backend reports
itself unavailable with that reason.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when fused_losses._C is loaded, else a one-line reason."""
    try:
        from fused_losses import _C  # noqa: F401  (registers torch.ops.fused_losses.*)
    except ImportError as exc:  # not built, or built against another torch
        return f"compiled extension fused_losses._C not importable ({exc}); run `make build`"
    return None


def loaded() -> bool:
    return load_error() is None


@functools.lru_cache(maxsize=None)
def compiled_with_cuda() -> bool:
    return loaded() and bool(torch.ops.fused_losses.compiled_with_cuda())
