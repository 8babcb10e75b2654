"""Per-call choice of the implementation behind each abp op, and a record of which one ran.

Backends:
- ``reference``: pure torch (:mod:`abp.reference`), any device; materialises W⊙M (it is the oracle).
- ``triton``: the fused kernels of :mod:`abp.kernels`, on CUDA (or on CPU through the Triton
  interpreter when ``TRITON_INTERPRET=1``; that is how CI tests them).
- ``cuda`` / ``cpp``: the compiled extension ``abp._C`` on CUDA / CPU tensors.

The rule, in one place (:func:`select`):
- a call's own ``backend=`` argument is strict: it runs there, or :class:`BackendUnavailableError` says why not;
- a *preference* (:func:`prefer` of a layer's or a config's backend, then :func:`use_backend`, then the
  ``ABP_BACKEND`` environment variable) is honoured where that backend implements the op and can run it here;
  otherwise the op takes ``auto`` and :func:`last_backend` (``why=True``) says which preference was passed over and
  why. A preferred backend that implements the op but cannot run (a broken fast path) also warns once;
- ``auto`` takes the fastest backend that can run the op on the tensors' device, and warns once on a GPU where
  the fast path is missing, with the reason. The serving ops keep their CUDA kernels to
  :data:`SERVE_KERNEL_MAX_TOKENS` tokens.

Which kernels a hard-mask layer trains with (v2: 1-bit mask, v1: fp32 scores) is :func:`kernels_version`.
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
    "masked_matmul_bits": ("triton", "reference"),
    "masked_matmul_bits_dx": ("triton", "reference"),
    "score_grad": ("triton", "reference"),
    "score_grad_update_": ("triton", "reference"),
    "multi_score_update_": ("cuda", "cpp", "reference"),
    "multi_score_adam_update_": ("cuda", "cpp", "reference"),
    "multi_adam_moments_": ("cuda", "cpp", "reference"),
    "multi_score_adam_mix_update_": ("cuda", "cpp", "reference"),
    "pack_mask": ("cuda", "cpp", "reference"),
    "pack_positive": ("cuda", "cpp", "reference"),
    "unpack_mask": ("cuda", "cpp", "reference"),
    # on CUDA: the GEMV kernel for few tokens, the Triton bit-mask GEMM past SERVE_KERNEL_MAX_TOKENS.
    # On CPU the cpp kernel decodes the bits per token: lean on memory but slower than materialising
    # (bench/results/cpu), so auto takes the reference there; backend="cpp" asks for it.
    "bitmask_linear": ("cuda", "triton", "reference", "cpp"),
    "multi_bitmask_linear": ("cuda", "triton", "reference", "cpp"),
}

#: Every abp op that goes through the dispatch.
OPS = tuple(_PREFERENCE)

#: The serving ops' CUDA kernels (csrc/bitmask_linear.cu) are GEMV / skinny-GEMM kernels: ``auto`` gives them at most
#: this many tokens and takes the Triton bit-mask GEMM (tensor cores, the same kernel as training's forward) past it,
#: or the reference (unpack, W⊙M, cuBLAS) where Triton cannot run; a ``MaskedLinear`` in inference serves from its
#: packed bits on CUDA up to the same count. On an H200 the GEMV kernel took 0.059 / 0.075 / 0.223 ms at 1 / 4 / 16
#: tokens against 0.55 ms for building W⊙M (``bench/results/nvidia-h200``); the GEMV/GEMM crossover is
#: not measured yet (``bench/bench_bitmask.py`` measures it).
SERVE_KERNEL_MAX_TOKENS = 16
_SERVING_OPS = ("bitmask_linear", "multi_bitmask_linear")
_PREFER = "prefer:"

#: Which Triton kernels a hard-mask ``MaskedLinear`` trains with (``ABP_KERNELS``, read at each call):
#: ``v2`` (default): forward and dX read the packed hard mask, 1 bit per weight (``abp.kernels.bitmask_matmul``);
#: ``v1``: they read the fp32 scores and form ``1[θ>0]`` on chip (``abp.kernels.masked_matmul``). The score gradient
#: reads the scores in both (it needs σ'(θ)). A soft mask (finite ``t_l``) always takes v1.
KERNEL_VERSIONS = ("v2", "v1")

_override: list[str] = []
_last: dict[str, tuple[str, str]] = {}  # op -> (backend, what auto passed over)
_warned: set[tuple[str, str]] = set()


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run this op here."""


def requested(backend: str | None = None) -> str:
    """The backend name in force for a call (``auto`` when none is named), strict or preferred alike."""
    return _resolve(backend)[0]


def prefer(name: str | None) -> str:
    """``name`` as a preference for :func:`select` (a layer's or a config's backend): used where it implements the
    op and can run, else ``auto``. None or ``""``: no preference of its own (``use_backend`` / ``ABP_BACKEND``)."""
    return _PREFER + _check_name(name) if name else ""


def _check_name(name: str) -> str:
    name = name.lower()
    if name not in NAMES:
        raise ValueError(f"unknown abp backend {name!r}; choose one of {', '.join(NAMES)} (ABP_BACKEND or backend=)")
    return name


def _resolve(backend: str | None) -> tuple[str, bool, str]:
    """(name, strict, where it came from) of a call's ``backend`` argument."""
    if backend and not backend.startswith(_PREFER):
        return _check_name(backend), True, "backend="
    if backend:
        return _check_name(backend[len(_PREFER):]), False, "the layer's (or run's) backend"
    if _override:
        return _check_name(_override[-1]), False, "use_backend"
    env = os.environ.get("ABP_BACKEND", "")
    return (_check_name(env), False, "ABP_BACKEND") if env else ("auto", False, "")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Prefer backend ``name`` (``auto`` included) for the ops inside the block (see :func:`select`)."""
    requested(name)
    _override.append(name)
    try:
        yield
    finally:
        _override.pop()


def kernels_version() -> str:
    """``ABP_KERNELS`` (``v2`` or ``v1``; unset: ``v2``), see :data:`KERNEL_VERSIONS`."""
    v = os.environ.get("ABP_KERNELS", "v2").lower() or "v2"
    if v not in KERNEL_VERSIONS:
        raise ValueError(f"ABP_KERNELS must be one of {', '.join(KERNEL_VERSIONS)}, got {v!r}")
    return v


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


def select(op: str, device: torch.device, backend: str | None = None, *, tokens: int | None = None) -> str:
    """Pick the backend for one call of ``op`` on ``device`` (``tokens``: rows of a serving op) and record it."""
    choice, strict, source = _resolve(backend)
    passed_over = ""
    if choice != "auto":
        ok, why = available(choice, op, device)
        if ok:
            return _record(op, choice, "")
        if strict:
            raise BackendUnavailableError(f"backend {choice!r} cannot run {op} on {device}: {why}")
        passed_over = f"{choice} from {source} passed over: {why}"
        if choice in _PREFERENCE[op] and (op, choice) not in _warned:
            _warned.add((op, choice))
            warnings.warn(f"abp: {op} cannot run on the {choice} backend asked for by {source} on {device} ({why}); "
                          "it takes auto", stacklevel=3)
    reasons = []
    many_tokens = (op in _SERVING_OPS and device.type == "cuda" and tokens is not None
                   and tokens > SERVE_KERNEL_MAX_TOKENS)
    for name in _PREFERENCE[op]:
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is for tests: it is never chosen automatically
        if name == "cuda" and many_tokens:
            passed_over = "; ".join(filter(None, (passed_over, f"{tokens} tokens > SERVE_KERNEL_MAX_TOKENS = "
                                                               f"{SERVE_KERNEL_MAX_TOKENS}")))
            continue
        ok, why = available(name, op, device)
        if ok:
            if reasons and device.type == "cuda" and (op, name) not in _warned:
                _warned.add((op, name))
                warnings.warn(f"abp: {op} runs on the {name} backend on {device}: " + "; ".join(reasons), stacklevel=3)
            skipped = reasons if device.type == "cuda" else []  # a missing fast path matters on a GPU
            return _record(op, name, "; ".join(filter(None, (passed_over, *skipped))))
        reasons.append(why)
    raise BackendUnavailableError(f"no abp backend can run {op} on {device}: " + "; ".join(filter(None, (passed_over, *reasons))))


def _record(op: str, name: str, why: str) -> str:
    _last[op] = (name, why)
    return name


def clear_record() -> None:
    """Forget which backend ran each op, so that :func:`last_backend` then tells what ran since (a trainer calls it
    when its run starts: its ``metrics.json`` lists the ops that run ran, not those of an earlier run in the process)."""
    _last.clear()


def last_backend(op: str | None = None, *, why: bool = False) -> str | dict[str, str] | None:
    """The backend that ran ``op`` last (or a dict for every op that ran). ``why=True`` adds, in parentheses, what
    ``auto`` passed over to get there (a preference that could not run, a slower kernel's reason)."""
    def show(entry: tuple[str, str]) -> str:
        name, reason = entry
        return f"{name} ({reason})" if why and reason else name

    if op is None:
        return {k: show(v) for k, v in _last.items()}
    return show(_last[op]) if op in _last else None


def dispatch(op: str, impls: dict[str, Callable], device: torch.device, backend: str | None, *args,
             tokens: int | None = None):
    """Run ``impls[select(op, device, backend, tokens=tokens)](*args)``."""
    return impls[select(op, device, backend, tokens=tokens)](*args)
