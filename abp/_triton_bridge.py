"""Lazy access to the Triton kernels (:mod:`abp.kernels`): importing abp must not import Triton."""
from __future__ import annotations

import os
from types import ModuleType

import torch

_module: ModuleType | None = None
_error: str | None = None


def kernels() -> ModuleType:
    """The :mod:`abp.kernels` module, imported on first use."""
    global _module, _error
    if _module is None and _error is None:
        try:
            import abp.kernels as k

            _module = k
        except Exception as e:  # Triton missing or broken: report it, never hide it
            _error = f"importing abp.kernels failed ({type(e).__name__}: {e})"
    if _module is None:
        raise RuntimeError(_error)
    return _module


def available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, "Triton runs on CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing abp)"
    if device.type not in ("cpu", "cuda"):
        return False, f"Triton kernels do not run on {device.type}"
    try:
        k = kernels()
    except RuntimeError as e:
        return False, str(e)
    try:
        return k.triton_available(device)
    except Exception as e:  # a broken Triton install: say so instead of crashing the dispatch
        return False, f"abp.kernels.triton_available failed ({type(e).__name__}: {e})"
