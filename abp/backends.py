"""Per-call choice of the implementation behind each abp op, and a record of which one ran.

Backends:
- ``reference``: pure torch (:mod:`abp.reference`), any device; materialises W⊙M (it is the oracle).
- ``triton``: the fused kernels of :mod:`abp.kernels`, on CUDA (or on CPU through the Triton
  interpreter when ``TRITON_INTERPRET=1``; that is how CI tests them).
- ``cuda`` / ``cpp``: the compiled extension ``abp._C`` on CUDA / CPU tensors.

The choice comes from, in order: the ``backend=`` argument of a call (``""`` or None: not given), :func:`use_backend`, the
``ABP_BACKEND`` environment variable, else ``auto``. ``auto`` takes the fastest backend that can
run the op on the tensors' device. Asking for a backend that cannot run raises
:class:`BackendUnavailableError`; ``auto`` on a GPU that lacks its fast path warns once with the reason
instead of hiding it. :func:`last_backend` tells which backend ran each op.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch

NAMES = ("auto", "reference", "triton", "cuda", "cpp")

# op name -> backends that implement it, fastest first (for ``auto``).
_PREFERENCE: dict[str, tuple[str, ...]] = {
    "masked_matmul": ("triton", "reference"),
    "masked_matmul_dx": ("triton", "reference"),
    "score_grad": ("triton", "reference"),
    "score_grad_update_": ("triton", "reference"),
    "multi_score_update_": ("cuda", "cpp", "reference"),
    "pack_mask": ("cuda", "cpp", "reference"),
    "unpack_mask": ("cuda", "cpp", "reference"),
    # on CPU the cpp kernel decodes the bits per token: lean on memory but slower than materialising
    # (bench/results/cpu), so auto takes the reference there; backend="cpp" asks for it.
    "bitmask_linear": ("cuda", "reference", "cpp"),
    "multi_bitmask_linear": ("cuda", "reference", "cpp"),
}

#: Every abp op that goes through the dispatch.
OPS = tuple(_PREFERENCE)

_override: list[str] = []
_last: dict[str, str] = {}
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run this op here."""


def requested(backend: str | None = None) -> str:
    """The backend in force for a call: argument, then :func:`use_backend`, then ``ABP_BACKEND``."""
    name = backend or (_override[-1] if _override else None) or os.environ.get("ABP_BACKEND", "auto") or "auto"
    name = name.lower()
    if name not in NAMES:
        raise ValueError(f"unknown abp backend {name!r}; choose one of {', '.join(NAMES)} (ABP_BACKEND or backend=)")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (``auto`` included)."""
    requested(name)
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def implementations(op: str) -> tuple[str, ...]:
    """The backends that implement ``op``, fastest first."""
    return _PREFERENCE[op]


def available(backend: str, op: str, device: torch.device) -> tuple[bool, str]:
    """Whether ``backend`` can run ``op`` on ``device``; the string says why not."""
    if backend not in _PREFERENCE.get(op, ()):
        return False, f"abp has no {backend} implementation of {op}"
    if backend == "reference":
        return True, ""
    if backend == "triton":
        from abp import _triton_bridge

        return _triton_bridge.available(device)
    from abp import _ext

    want = "cuda" if backend == "cuda" else "cpu"
    if device.type != want:
        return False, f"the {backend} backend runs on {want} tensors, these are on {device}"
    return _ext.has_op(op, device)


def select(op: str, device: torch.device, backend: str | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``device`` and record it."""
    choice = requested(backend)
    if choice == "auto":
        reasons = []
        for name in _PREFERENCE[op]:
            if name == "triton" and device.type != "cuda":
                continue  # the interpreter is for tests: it is never chosen automatically
            ok, why = available(name, op, device)
            if ok:
                if reasons and device.type == "cuda" and (op, name) not in _warned:
                    _warned.add((op, name))
                    warnings.warn(f"abp: {op} runs on the {name} backend on {device}: " + "; ".join(reasons), stacklevel=3)
                _last[op] = name
                return name
            reasons.append(why)
        raise BackendUnavailableError(f"no abp backend can run {op} on {device}: " + "; ".join(reasons))
    ok, why = available(choice, op, device)
    if not ok:
        raise BackendUnavailableError(f"backend {choice!r} cannot run {op} on {device}: {why}")
    _last[op] = choice
    return choice


def last_backend(op: str | None = None) -> str | dict[str, str] | None:
    """The backend that ran ``op`` last (or a dict for every op that ran)."""
    return dict(_last) if op is None else _last.get(op)


def dispatch(op: str, impls: dict[str, Callable], device: torch.device, backend: str | None, *args, **kwargs):
    """Run ``impls[select(...)]``."""
    return impls[select(op, device, backend)](*args, **kwargs)
