"""Launch configurations of the abp Triton kernels, and where those kernels can run.

Autotuning is keyed on the problem shape ``(M, N, K)``, with the token count ``M`` rounded up
to a power of two (:func:`m_bucket`); the autotuner adds the tensor dtypes to the key itself.

Each autotuned kernel (:data:`KERNEL_NAMES`) has its own candidate set per GPU family and
activation dtype class, :func:`candidates`: the Hopper table (sm90 and newer: H100/H200), the
Ampere table (sm80/86/89) or the fp32 table, minus the tiles :data:`SPILLS` lists for that
kernel there (``ptxas`` spills registers in them, as measured by :mod:`abp.kernels.compile_gate`).
A kernel's autotuner holds the union of its candidate sets, and the pruning hook installed by
:func:`autotune` keeps the one for the call's GPU and dtype, looked up at the first call rather
than at import, so importing never touches CUDA.

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
# 3.9 (compile only, no launch) and fits the H100's 227 KiB per block (NOTES.md has the numbers). Configs
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
# The FMA loop keeps a thread's accumulators (rows·cols / (32·warps)) and its operand fragments
# (growing with the reduction block) in registers: the first six spill in the forward/dX kernels
# (SPILLS); the last six have accumulators per thread × BLOCK_red ≤ 512 and compile without
# spills for every kernel, but one of them in the fused update on sm80 (SPILLS).
_FP32_TABLE = [
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 32, 32, 5, 2),
    (32, 64, 32, 5, 2),
    (64, 64, 32, 3, 4),
    (128, 128, 8, 4, 8),
    (128, 64, 16, 4, 8),
    (64, 128, 16, 4, 8),
    (64, 64, 32, 3, 8),
    (32, 64, 16, 4, 2),
    (64, 32, 16, 4, 2),
]
# Under the interpreter: few programs (Python overhead is per program and per op); with a group
# of 2 the swizzle's partial last group is exercised by sizes of a few tiles.
_INTERPRET_TILE = (32, 32, 32, 1, 4)
_INTERPRET_GROUP = 2
# With ABP_TRITON_AUTOTUNE=0: one conservative tile for every kernel, GPU and dtype, fp32 included
# (the compile gate checks it everywhere: it fits and does not spill); no benchmarking (tests of
# many odd shapes, debugging, reproducible timings).
_FIXED_TILE = (64, 64, 32, 3, 8)
GROUP_SIZE = 8

# The autotuned kernels, as ``autotune(kernel=...)`` names them; the compile gate uses the same names.
KERNEL_NAMES = ("masked_matmul", "masked_matmul_dx", "score_grad", "score_grad_update",
                "bitmask_matmul", "bitmask_matmul_dx", "multi_bitmask_matmul", "bitmask_matmul_t",
                "bitmask_matmul_dx_t", "multi_bitmask_matmul_t")
TABLES = {"hopper": _HOPPER_TABLE, "ampere": _AMPERE_TABLE, "fp32": _FP32_TABLE}
ARCHS = (9, 8)  # GPU families with a table: 9 = sm90 and newer (Hopper table), 8 = sm8x (Ampere table)
DTYPE_CLASSES = ("16bit", "fp32")

# Tiles that spill registers, per kernel and (arch, dtype class): measured by the compile gate
# (``python -P -m abp.kernels.compile_gate --all``: ptxas -v on the kernel compiled for sm_90a
# (arch 9) and sm_80 (arch 8) with Triton 3.9, at BERT-base shapes; "16bit" = bf16 or fp16,
# listed when either spills). The autotuner never offers them; the gate's --all run checks that
# each still spills, so the list cannot go stale. Spill sizes are in kernels/NOTES.md.
# Why they spill: the forward/dX kernels hold the fp32 score tile and the masked weight tile next
# to the accumulator; the score-grad kernels keep a [BLOCK_N, BLOCK_K] fp32 accumulator over all
# of M plus an epilogue with W, θ and σ(θ) tiles of the same shape. In fp32 the FMA dot needs
# the operand fragments in registers too (see _FP32_TABLE). Some of these get only 32 registers
# from ptxas (an allocation choice of ptxas at -O3 when the live set far exceeds 255; PTX
# ``.maxnreg 255``, Triton's ``maxnreg=255``, restores 255 but still spills; NOTES.md).
_FP32_FMA_SPILLS = frozenset(_FP32_TABLE[:6])
SPILLS: dict[str, dict[tuple[int, str], frozenset[tuple]]] = {
    "masked_matmul": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4)}),
        (9, "fp32"): _FP32_FMA_SPILLS,
        (8, "16bit"): frozenset({(64, 256, 32, 3, 4)}),
        (8, "fp32"): _FP32_FMA_SPILLS,
    },
    "masked_matmul_dx": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4)}),
        (9, "fp32"): _FP32_FMA_SPILLS,
        (8, "16bit"): frozenset({(64, 256, 32, 3, 4)}),
        (8, "fp32"): _FP32_FMA_SPILLS,
    },
    "score_grad": {
        (9, "16bit"): frozenset({(128, 256, 32, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                                 (128, 128, 64, 3, 4), (128, 128, 32, 4, 4), (64, 256, 32, 3, 8)}),
        (9, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
        (8, "16bit"): frozenset({(128, 256, 32, 3, 8), (64, 256, 32, 3, 4), (128, 128, 32, 4, 4),
                                 (128, 64, 32, 4, 4)}),  # the last: bf16 only (24 B)
        (8, "fp32"): frozenset({(64, 128, 32, 4, 4), (128, 128, 32, 4, 4)}),
    },
    "score_grad_update": {
        (9, "16bit"): frozenset({(128, 256, 32, 3, 8), (256, 128, 64, 3, 8), (128, 128, 64, 4, 8),
                                 (128, 128, 64, 3, 4), (128, 128, 32, 4, 4)}),
        (9, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
        (8, "16bit"): frozenset({(128, 256, 32, 3, 8), (64, 256, 32, 3, 4), (128, 128, 32, 4, 4)}),
        (8, "fp32"): frozenset({(128, 128, 32, 4, 4), (128, 64, 16, 4, 8)}),
    },
    # The 1-bit-mask kernels (bitmask_matmul.py): the fp32 FMA tiles, as in v1; in 16 bits, tiles that
    # use 254-255 registers without spilling in the forward and spill 16-128 B in dX (sm90) or in the
    # multi-task kernel (sm80, whose gathered row indices stay live through the K loop for the store).
    "bitmask_matmul": {
        (9, "fp32"): _FP32_FMA_SPILLS,
        (8, "fp32"): _FP32_FMA_SPILLS,
    },
    "bitmask_matmul_dx": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4)}),
        (9, "fp32"): _FP32_FMA_SPILLS,
        (8, "fp32"): _FP32_FMA_SPILLS,
    },
    "multi_bitmask_matmul": {
        (9, "fp32"): _FP32_FMA_SPILLS,
        (8, "16bit"): frozenset({(128, 256, 32, 3, 8), (64, 256, 32, 3, 4)}),
        (8, "fp32"): _FP32_FMA_SPILLS,
    },
    # The same matmuls with the masked weight as the MMA's left operand (ABP_BITMASK_OPERAND=a): the masked
    # [cols, red] tile is held in registers as the MMA's operand, so 128-column tiles with 4 warps (and
    # Ampere's 256-column dX tiles) reach 255 registers and spill 16-216 B; in fp32 only the largest FMA tile
    # spills, where the default form spills in six.
    "bitmask_matmul_t": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4)}),
        (9, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
        (8, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
    },
    "bitmask_matmul_dx_t": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4), (64, 128, 64, 4, 4)}),
        (9, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
        (8, "16bit"): frozenset({(128, 256, 32, 3, 8), (64, 256, 32, 3, 4), (128, 128, 32, 4, 4)}),
        (8, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
    },
    "multi_bitmask_matmul_t": {
        (9, "16bit"): frozenset({(128, 128, 64, 3, 4)}),
        (9, "fp32"): frozenset({(128, 128, 32, 4, 4)}),
        (8, "16bit"): frozenset({(128, 256, 32, 3, 8), (64, 256, 32, 3, 4)}),
        (8, "fp32"): frozenset({(128, 128, 32, 4, 4), (64, 32, 32, 5, 2)}),
    },
}
# Spilling tiles that are offered anyway, because that (kernel, arch, dtype class) has no
# spill-free tile: kernel -> {(arch, class): {tile: (max spill-store bytes, max spill-load bytes)
# measured, over the class's dtypes)}}, each with its reason in a comment. The gate reports them
# and fails if one spills more than recorded. Empty: every candidate set has spill-free tiles.
ACCEPTED_SPILLS: dict[str, dict[tuple[int, str], dict[tuple, tuple[int, int]]]] = {}


def arch_of(major: int) -> int:
    """The table family of a GPU's compute capability major: 9 (sm90 and newer) or 8."""
    return 9 if major >= 9 else 8


def dtype_class(dtype: torch.dtype) -> str:
    """``"fp32"`` for fp32 activations, ``"16bit"`` for bf16/fp16."""
    return "fp32" if dtype == torch.float32 else "16bit"


def table_name(arch: int, dclass: str) -> str:
    """Which of :data:`TABLES` a kernel's candidates on ``arch`` for ``dclass`` come from."""
    if dclass == "fp32":
        return "fp32"
    return "hopper" if arch_of(arch) >= 9 else "ampere"


def candidates(kernel: str, arch: int, dclass: str) -> list[tuple]:
    """The tiles the autotuner offers ``kernel`` on a GPU of family ``arch`` (capability major)
    for activations of ``dclass``: that table minus :data:`SPILLS` (accepted spills included)."""
    arch = arch_of(arch)
    drop = SPILLS[kernel].get((arch, dclass), frozenset())
    return [t for t in TABLES[table_name(arch, dclass)] if t not in drop]


def _check_tables() -> None:
    """At import: every (kernel, arch, dtype class) has a candidate, SPILLS/ACCEPTED_SPILLS are consistent."""
    for table in (SPILLS, ACCEPTED_SPILLS):
        for kernel, per in table.items():
            if kernel not in KERNEL_NAMES:
                raise ValueError(f"unknown kernel {kernel!r} in configs (known: {KERNEL_NAMES})")
            for (arch, dclass), tiles in per.items():
                base = TABLES[table_name(arch, dclass)]
                stale = [t for t in tiles if t not in base]
                if arch not in ARCHS or dclass not in DTYPE_CLASSES or stale:
                    raise ValueError(f"configs: {kernel} ({arch}, {dclass!r}) lists tiles not in its table: {stale}")
    for kernel in KERNEL_NAMES:
        if kernel not in SPILLS:
            raise ValueError(f"configs.SPILLS has no entry for {kernel!r}")
        for arch in ARCHS:
            for dclass in DTYPE_CLASSES:
                accepted = ACCEPTED_SPILLS.get(kernel, {}).get((arch, dclass), {})
                if set(accepted) & SPILLS[kernel].get((arch, dclass), frozenset()):
                    raise ValueError(f"configs: {kernel} ({arch}, {dclass!r}): a tile is in both SPILLS and "
                                     "ACCEPTED_SPILLS")
                if not candidates(kernel, arch, dclass):
                    raise ValueError(f"configs: no candidate tile left for {kernel} on arch {arch} ({dclass}): "
                                     "add a spill-free tile or record one in ACCEPTED_SPILLS")


_check_tables()


def _make(table, rows: str, cols: str, red: str, group: str, group_size: int = GROUP_SIZE) -> list[triton.Config]:
    return [
        triton.Config({rows: r, cols: c, red: k, group: group_size}, num_stages=s, num_warps=w)
        for r, c, k, s, w in table
    ]


def matmul_configs(kernel: str, rows: str, cols: str, red: str, group: str) -> list[triton.Config]:
    """Configs of ``kernel`` (one of :data:`KERNEL_NAMES`), a tiled kernel whose output tile is
    ``rows×cols`` and reduces over ``red``.

    The names are the kernel's constexpr parameters (e.g. ``BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_SIZE_M``). On a GPU: the union of the kernel's :func:`candidates` over GPU families
    and dtype classes, plus the fixed tile, pruned per device and activation dtype at each new
    tuning key by the hook :func:`autotune` installs.
    """
    if kernel not in KERNEL_NAMES:
        raise ValueError(f"unknown kernel {kernel!r}; known: {KERNEL_NAMES}")
    if INTERPRET:
        return _make([_INTERPRET_TILE], rows, cols, red, group, _INTERPRET_GROUP)
    union = [t for arch in ARCHS for dclass in DTYPE_CLASSES for t in candidates(kernel, arch, dclass)]
    return _make(list(dict.fromkeys(union + [_FIXED_TILE])), rows, cols, red, group)


def offered(kernel: str, major: int, act_dtype: torch.dtype, autotune_on: bool = True) -> set[tuple]:
    """The tiles the pruning hook keeps for ``kernel`` on a GPU of capability major ``major`` with
    ``act_dtype`` activations (``autotune_on=False``: ``ABP_TRITON_AUTOTUNE=0``, the fixed tile).
    Empty for a dtype other than fp32/fp16/bf16: no table was measured for it, so the hook raises
    rather than run another dtype's tiles."""
    if act_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return set()
    if not autotune_on:
        return {_FIXED_TILE}
    return set(candidates(kernel, arch_of(major), dtype_class(act_dtype)))


def autotune(kernel: str, rows: str, cols: str, red: str, group: str, key: list[str], restore_value=None):
    """``triton.autotune`` over ``kernel``'s :func:`matmul_configs`, keyed on ``key``, pruned to the
    GPU's and dtype's candidate set (:func:`offered`). The autotuner records ``kernel`` as its
    ``abp_kernel`` attribute (the compile gate checks it).

    ``restore_value`` names the tensors a kernel writes in place (the fused score update), so
    that benchmarking several configs does not apply the update several times.
    """
    configs = matmul_configs(kernel, rows, cols, red, group)

    def prune_for_device(configs, named_args, **kwargs):
        if len(configs) <= 1:
            return configs
        # the first tensor argument is the activation operand (x or dY)
        first = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
        major, _ = torch.cuda.get_device_capability(first.device)
        table = offered(kernel, major, first.dtype, os.environ.get("ABP_TRITON_AUTOTUNE", "1") != "0")
        kept = [c for c in configs
                if (c.kwargs[rows], c.kwargs[cols], c.kwargs[red], c.num_stages, c.num_warps) in table]
        if not kept:  # never fall back to configs the gate did not clear for this GPU and dtype
            raise RuntimeError(f"abp.kernels: no autotune config for {kernel} on sm{major}x with {first.dtype}")
        return kept

    decorate = triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune_for_device},
        restore_value=restore_value,
    )

    def wrap(fn):
        tuner = decorate(fn)
        tuner.abp_kernel = kernel
        return tuner

    return wrap


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
