"""The optional compiled extension ``abp._C``: load it, register its fake kernels, say what it has.

``abp._C`` (built by setup.py from csrc/) registers the ``abp_C::`` operators with torch: CPU
implementations always, CUDA ones when it was built with CUDA. It is optional: when it is missing
(a pure-Python install) or cannot load (built against another torch), abp warns once at import
with the reason and the ``cpp``/``cuda`` backends report themselves unavailable through
:func:`has_op`; the reference and Triton backends are unaffected.

The fake (meta) kernels below let ``torch.compile`` and ``torch.library.opcheck`` trace the ops
without running them; their shapes mirror the C++ implementations.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

import torch

Tensor = torch.Tensor

#: The abp_C operators this extension defines (the public ``abp::`` op of the same name calls it).
OPS = ("pack_mask", "pack_positive", "unpack_mask", "multi_score_update_", "multi_score_adam_update_",
       "multi_adam_moments_", "multi_score_adam_mix_update_", "bitmask_linear", "multi_bitmask_linear")


class ExtensionWarning(UserWarning):
    """abp._C is missing or failed to load (filter this category to silence it)."""


def _load():
    """Import abp._C; return (module or None, why it is unavailable or None)."""
    try:
        # import_module, not `from abp import _C`: only it tells a missing module (ModuleNotFoundError
        # naming abp._C) from one that exists but fails to load. Loading it registers torch.ops.abp_C.*.
        _C = importlib.import_module("abp._C")
    except ModuleNotFoundError as e:
        if e.name != "abp._C":
            return None, f"abp._C could not be imported: {e}"
        return None, ("abp._C is not built (the cpp/cuda backends are unavailable); build it with "
                      "`pip install --no-build-isolation -e .` or `python setup.py build_ext --inplace`")
    except (ImportError, OSError) as e:
        return None, (f"abp._C failed to load ({e}); it was probably built against another torch than "
                      f"{torch.__version__}: rebuild it with `pip install --no-build-isolation -e .`")
    built = getattr(_C, "TORCH_VERSION", "")
    if built and built.split("+")[0] != torch.__version__.split("+")[0]:
        warnings.warn(f"abp._C was built against torch {built} but torch {torch.__version__} is loaded; "
                      "rebuild it if its ops misbehave", ExtensionWarning, stacklevel=3)
    return _C, None


_C, LOAD_ERROR = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"abp: {LOAD_ERROR}", ExtensionWarning, stacklevel=2)


def available() -> bool:
    """Whether abp._C is loaded (its CPU ops are then always there)."""
    return _C is not None


def has_cuda() -> bool:
    """Whether abp._C was built with its CUDA ops (a GPU may still be absent)."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def info() -> dict:
    """What this build holds: loaded, CPU ops, CUDA ops, CUDA targets, the torch/CUDA it was built with."""
    return {
        "loaded": _C is not None,
        "error": LOAD_ERROR,
        "cpu": _C is not None,
        "cuda": has_cuda(),
        "cuda_archs": [a for a in getattr(_C, "CUDA_ARCHS", "").split("_") if a],
        "cuda_version": getattr(_C, "CUDA_VERSION", "") or None,
        "torch_version": getattr(_C, "TORCH_VERSION", "") or None,
    }


def describe() -> str:
    """One line for ``abp info`` and error messages."""
    if _C is None:
        return LOAD_ERROR or "abp._C is not loaded"
    i = info()
    cuda = (f"CUDA ops for {', '.join(i['cuda_archs'])} (CUDA {i['cuda_version']})" if i["cuda"]
            else "no CUDA ops (built without CUDA)")
    return f"abp._C: CPU ops, {cuda}; built with torch {i['torch_version']}"


def has_op(op: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``abp_C::<op>`` can run on ``device``; the string says why not (the backends' contract)."""
    if _C is None:
        return False, LOAD_ERROR or "abp._C is not loaded"
    if op not in OPS:
        return False, f"abp._C has no {op} op"
    device = torch.device(device)
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if not has_cuda():
            return False, "abp._C was built without its CUDA ops (see `abp info`; rebuild where nvcc is present)"
        return True, ""
    return False, f"abp._C has no {device.type} implementation of {op}"


# --------------------------------------------------------------------------- fake (meta) kernels

def _register_fakes() -> None:
    def nbytes(numel):
        return (numel + 7) // 8

    @torch.library.register_fake("abp_C::pack_mask")
    def _(mask: Tensor) -> Tensor:
        torch._check(mask.dtype == torch.bool, lambda: f"abp_C::pack_mask: `mask` must be bool, got {mask.dtype}")
        return mask.new_empty(nbytes(mask.numel()), dtype=torch.uint8)

    @torch.library.register_fake("abp_C::pack_positive")
    def _(scores: Tensor) -> Tensor:
        torch._check(scores.dtype == torch.float32,
                     lambda: f"abp_C::pack_positive: `scores` must be float32, got {scores.dtype}")
        return scores.new_empty(nbytes(scores.numel()), dtype=torch.uint8)

    @torch.library.register_fake("abp_C::unpack_mask")
    def _(packed: Tensor, numel: int) -> Tensor:
        torch._check(packed.numel() == nbytes(numel),
                     lambda: f"abp_C::unpack_mask: `packed` must hold ceil({numel}/8) bytes, got {packed.numel()}")
        return packed.new_empty(numel, dtype=torch.bool)

    @torch.library.register_fake("abp_C::multi_score_update_")
    def _(scores, grads, lr, gamma, active, recovery, counts) -> None:
        return None

    @torch.library.register_fake("abp_C::multi_score_adam_update_")
    def _(scores, grads, exp_avg, exp_avg_sq, inv_bias1, inv_bias2, lr, beta1, beta2, eps, gamma, active, recovery,
          counts) -> None:
        return None

    @torch.library.register_fake("abp_C::multi_adam_moments_")
    def _(grads, exp_avg, exp_avg_sq, inv_bias2, beta1, beta2, sums) -> None:
        return None

    @torch.library.register_fake("abp_C::multi_score_adam_mix_update_")
    def _(scores, exp_avg, exp_avg_sq, mean_sq, inv_bias1, inv_bias2, mix, lr, eps, gamma, active, recovery,
          counts) -> None:
        return None

    def linear_out(x: Tensor, weight: Tensor) -> Tensor:
        torch._check(x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1],
                     lambda: f"abp_C bitmask linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} mismatch")
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("abp_C::bitmask_linear")
    def _(x: Tensor, weight: Tensor, packed: Tensor, bias: Optional[Tensor]) -> Tensor:
        return linear_out(x, weight)

    @torch.library.register_fake("abp_C::multi_bitmask_linear")
    def _(x: Tensor, weight: Tensor, packed: Tensor, task_ids: Tensor, bias: Optional[Tensor]) -> Tensor:
        return linear_out(x, weight)


if _C is not None:
    _register_fakes()
