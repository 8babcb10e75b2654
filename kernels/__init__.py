"""abp.kernels: fused Triton kernels of abp (masked matmul, its dX, score grad and fused score update;
the same matmuls through a packed 1-bit mask, and many packed masks over one weight in one launch).

The masks are made on chip, from the fp32 scores or from the packed bits; neither ``W⊙M`` nor
the dense ``dW`` is ever written to memory. Contract: :mod:`abp.reference`. Design notes: ``NOTES.md`` beside this file.

``triton_available(device) -> (bool, reason)`` says whether the kernels can run on a device:
on CUDA when Triton imports; on CPU only when ``TRITON_INTERPRET=1`` was set before this package
was imported (Triton picks the interpreter when the kernels are decorated, i.e. at import).
If Triton itself cannot be imported, this package still imports: ``triton_available`` says why,
and asking for a kernel raises ImportError with that reason.
"""
from __future__ import annotations

__all__ = ["masked_matmul", "masked_matmul_dx", "score_grad", "score_grad_update_", "bitmask_matmul",
           "bitmask_matmul_dx", "multi_bitmask_matmul", "triton_available", "INTERPRET"]
_KERNEL_FUNCTIONS = ("masked_matmul", "masked_matmul_dx", "score_grad", "score_grad_update_", "bitmask_matmul",
                     "bitmask_matmul_dx", "multi_bitmask_matmul")

try:
    import triton  # noqa: F401
except ImportError as exc:  # e.g. a CPU-only install without Triton
    _IMPORT_ERROR = f"triton is not importable: {exc}"
    INTERPRET = False

    def triton_available(device) -> tuple[bool, str]:
        """Whether the abp Triton kernels can run on ``device``: never, Triton is missing."""
        return False, _IMPORT_ERROR

    def __getattr__(name):
        if name in _KERNEL_FUNCTIONS:
            raise ImportError(f"abp.kernels.{name} is unavailable: {_IMPORT_ERROR}")
        raise AttributeError(f"module 'abp.kernels' has no attribute {name!r}")
else:
    from .bitmask_matmul import bitmask_matmul, bitmask_matmul_dx, multi_bitmask_matmul
    from .configs import INTERPRET, triton_available
    from .masked_matmul import masked_matmul, masked_matmul_dx
    from .score_grad import score_grad, score_grad_update_
