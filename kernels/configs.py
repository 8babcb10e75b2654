"""Launch configurations of the abp Triton kernels, and where those kernels can run.

Autotuning is keyed on the problem shape ``(M, N, K)``, with the token count ``M`` rounded up
to a power of two (:func:`m_bucket`); the autotuner adds the tensor dtypes to the key itself.
The config list is the union of a Hopper table (sm90: H100/H200), an Ampere table (sm80/86/89)
and an fp32 table; the pruning hook installed by :func:`autotune` keeps the one for the call's
GPU and activation dtype, looked up at the first call rather than at import, so importing never
touches CUDA.

``ABP_TRITON_AUTOTUNE=0`` (read at each new tuning key) replaces tuning by one conservative
tile. Under ``TRITON_INTERPRET=1`` (CPU tests) a single small config is used: with one config the
autotuner never benchmarks, which would be far too slow in the interpreter.

The interpreter is chosen by Triton when ``@triton.jit`` runs, i.e. when the kernel modules are
imported, so :data:`INTERPRET` records the environment *at import*; setting the variable later
has no effect on already-imported kernels (:func:`triton_available` says so).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
# Triton's own library (tl.cdiv, tl.sigmoid, tl.sum...) is decorated when triton is imported: if
# that happened before TRITON_INTERPRET=1 was set, it is compiled-mode and the interpreter
# cannot call it, even though our kernels were decorated for the interpreter.
_STDLIB_COMPILED: bool = isinstance(tl.cdiv, JITFunction)

# (BLOCK_rows, BLOCK_cols, BLOCK_reduction, num_stages, num_warps).
# The forward/dX kernels pipeline an fp32 score tile beside each weight tile, so they need more
# shared memory than a plain matmul: every 16-bit entry below was compiled for sm90 with Triton
# 3.9 (no GPU at hand) and fits the H100's 227 KiB per block (NOTES.md has the numbers). Configs
# that do not fit a given GPU fail with OutOfResources and the autotuner skips them.
_HOPPER_TABLE = [
    (128, 256, 32, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 128, 64, 3, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 256, 32, 3, 8),
    (32, 64, 64, 4, 4),   # few tokens: fewer wasted rows (BLOCK < 64 uses mma.sync, not wgmma)
    (16, 128, 64, 4, 4),
]
# Triton tutorial 03's CUDA table, shrunk where the score tile overflows an A100 (163 KiB).
_AMPERE_TABLE = [
    (128, 256, 32, 3, 8),
    (64, 256, 32, 3, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 5, 2),
    (32, 64, 32, 5, 2),
    (16, 64, 64, 4, 4),
]
# fp32 activations, any GPU: with exact fp32 ("ieee") tl.dot is an FMA loop, tiles are twice as
# big in bytes, and large fp32 configs took up to 100 s each to compile; these all fit 163 KiB.
_FP32_TABLE = [
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 32, 32, 5, 2),
    (32, 64, 32, 5, 2),
    (64, 64, 32, 3, 4),
]
# Under the interpreter: few programs (Python overhead is per program and per op); with a group
# of 2 the swizzle's partial last group is exercised by sizes of a few tiles.
_INTERPRET_TILE = (32, 32, 32, 1, 4)
_INTERPRET_GROUP = 2
# With ABP_TRITON_AUTOTUNE=0: one conservative tile that fits shared memory for fp32 too; no
# benchmarking (tests of many odd shapes, debugging, reproducible timings).
_FIXED_TILE = (64, 64, 32, 3, 4)
GROUP_SIZE = 8


def _make(table, rows: str, cols: str, red: str, group: str, group_size: int = GROUP_SIZE) -> list[triton.Config]:
    return [
        triton.Config({rows: r, cols: c, red: k, group: group_size}, num_stages=s, num_warps=w)
        for r, c, k, s, w in table
    ]


def _table_for(device: torch.device, act_dtype: torch.dtype) -> list[tuple]:
    if act_dtype == torch.float32:
        return _FP32_TABLE
    major, _ = torch.cuda.get_device_capability(device)
    return _HOPPER_TABLE if major >= 9 else _AMPERE_TABLE


def matmul_configs(rows: str, cols: str, red: str, group: str) -> list[triton.Config]:
    """Configs for a tiled kernel whose output tile is ``rows×cols`` and reduces over ``red``.

    The names are the kernel's constexpr parameters (e.g. ``BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_SIZE_M``). On a GPU: the union of all tables, pruned per device and activation dtype
    at each new tuning key by the hook :func:`autotune` installs.
    """
    if INTERPRET:
        return _make([_INTERPRET_TILE], rows, cols, red, group, _INTERPRET_GROUP)
    union = list(dict.fromkeys(_HOPPER_TABLE + _AMPERE_TABLE + _FP32_TABLE + [_FIXED_TILE]))
    return _make(union, rows, cols, red, group)


def autotune(rows: str, cols: str, red: str, group: str, key: list[str], restore_value=None):
    """``triton.autotune`` over :func:`matmul_configs`, keyed on ``key``, pruned to the GPU's table.

    ``restore_value`` names the tensors a kernel writes in place (the fused score update), so
    that benchmarking several configs does not apply the update several times.
    """

    def prune_for_device(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        if os.environ.get("ABP_TRITON_AUTOTUNE", "1") == "0":
            table = {_FIXED_TILE}
        else:  # the first tensor argument is the activation operand (x or dY)
            first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
            table = set(_table_for(first.device, first.dtype))
        kept = [c for c in configs
                if (c.kwargs[rows], c.kwargs[cols], c.kwargs[red], c.num_stages, c.num_warps) in table]
        return kept or list(configs)

    return triton.autotune(
        configs=matmul_configs(rows, cols, red, group),
        key=key,
        prune_configs_by={"early_config_prune": prune_for_device},
        restore_value=restore_value,
    )


def m_bucket(m: int) -> int:
    """Tuning key for the token dimension: the next power of two (at least 16).

    ``M`` is batch×sequence and changes from batch to batch; keying the autotuner on the exact
    ``M`` would re-benchmark every config at each new value. Kernels take it as an argument
    that only the autotuner reads.
    """
    return max(16, triton.next_power_of_2(m))


def triton_available(device) -> tuple[bool, str]:
    """Whether the abp Triton kernels can run on ``device``, and why (not)."""
    device = torch.device(device)
    if INTERPRET:
        if _STDLIB_COMPILED:
            return False, ("triton was imported before TRITON_INTERPRET=1 was set, so its library is "
                           "compiled-mode and the interpreter cannot run it: set the variable before "
                           "anything imports triton (e.g. at the top of conftest.py)")
        if device.type not in ("cpu", "cuda"):
            return False, f"the Triton interpreter runs on cpu or cuda tensors, not {device.type!r}"
        return True, "Triton interpreter (TRITON_INTERPRET=1 was set before abp.kernels was imported)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA device requested but torch.cuda.is_available() is False"
        return True, f"compiled Triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, ("TRITON_INTERPRET=1 was set after abp.kernels was imported; the kernels are "
                       "compiled-mode and need CUDA (set it before the first import)")
    return False, (f"Triton kernels need a CUDA device (got {device.type!r}); on CPU they run only "
                   "in the interpreter (TRITON_INTERPRET=1 set before importing abp.kernels)")


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands, following torch's own fp32 matmul setting.

    ``highest`` (torch's default) → exact fp32 ("ieee"), otherwise TF32. Ignored for 16-bit inputs.
    """
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"
