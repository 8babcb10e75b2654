"""Compile gate: every Triton kernel of :mod:`abp.kernels`, compiled for real NVIDIA GPUs without one.

The interpreter tests (``TRITON_INTERPRET=1``) check what the kernels compute, not whether they
compile for a GPU or fit on one. This module compiles each kernel with Triton's own compiler,
``triton.compile(ASTSource, GPUTarget)``, for sm_90a (H100/H200) and sm_80 (A100), for each
autotune config that the kernel would try on that GPU, and checks the result against the limits
that decide whether a launch works and runs at speed:

- shared memory per block (the compiled kernel's ``metadata.shared``) within the GPU's opt-in
  maximum: 232448 bytes (227 KiB) on sm_90a, 166912 bytes (163 KiB) on sm_80. Triton only
  checks this at load time, on the GPU (``OutOfResources``), which CI never reaches;
- no register spills, from the resource report of the ptxas that Triton bundles (``-v``, run on
  the compiled PTX with the flags Triton's own cubin step uses), except for configs that
  ``configs.ACCEPTED_SPILLS`` records, which must spill no more than recorded;
- ``wgmma`` in the PTX on sm_90a for 16-bit tiles with at least 64 rows (Hopper's warp-group
  MMA; smaller tiles and fp32 with exact ``ieee`` products use other instructions).

Which configs: exactly what each kernel's autotuner can run, from the autotuner's own per-kernel
candidate sets (``configs.candidates``, the sets its pruning hook keeps): on sm_90a the Hopper
table and on sm_80 the Ampere table, each in bf16 and fp16, plus the fp32 table (fp32
activations, exact ``ieee`` products as under torch's default matmul precision) on both, each
minus the tiles ``configs.SPILLS`` lists for that kernel there; and the fixed tile of
``ABP_TRITON_AUTOTUNE=0``. ``--all`` compiles all of them, and also every ``SPILLS`` entry, to
check that it still spills (in bf16 or fp16 for a 16-bit entry): an entry that no longer does
fails, so the list cannot go stale silently. The default is a representative subset
(:func:`plan`): per ``@triton.jit`` kernel and target, the largest 16-bit candidate in bf16 and
the smallest in fp16, plus per target the forward's largest fp32 candidate and its smallest fp32
``SPILLS`` entry.

Launch arguments are those of a real call: each public entry point runs on ``meta`` tensors with
its autotuner replaced by a recorder, so argument order, strides, flags and dtypes come from the
launch code itself. Pointers are then given as 16-byte aligned and sizes are BERT-base shapes
(multiples of 16), so Triton specialises them as it would on a GPU (divisibility 16, unit strides
as constants); the options are those ``JITFunction.run`` derives for a launch. Variants: the
forward with a soft mask, bias and bias scores; dX with a soft mask; the score gradient and the
fused update (no recovery) with the bias-score programs; the 1-bit-mask forward with bias, its dX,
and the multi-task forward with bias over ``TASKS`` masks. These are the launches with the most
work per tile; the hard mask and the bias-free forms only drop code.

The kernels must be compiled-mode ``JITFunction`` objects, i.e. imported without
``TRITON_INTERPRET=1`` in the environment (Triton picks the interpreter when a kernel is
decorated); :func:`gate_rows` refuses otherwise. Compiled kernels land in Triton's cache, so a
second run with unchanged kernels only re-runs ptxas.

``python -P -m abp.kernels.compile_gate [--all] [--targets sm90a,sm80] [--kernels NAME,..] [--write-notes]``
prints the per-config table and exits non-zero if any config fails a limit; ``--kernels`` keeps
only the named launches (for working on one kernel); ``--write-notes`` also replaces the
generated section of ``NOTES.md`` (between the ``compile-gate`` marker comments).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pkgutil
import re
import shlex
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# ----------------------------------------------------------------------------------------------
# targets and limits
# ----------------------------------------------------------------------------------------------
# Triton 3.9 has no separate sm_90 target: capability 90 always compiles for sm_90a (its
# ``sm_arch_from_capability`` appends "a" from 90 up), which is what wgmma needs.


@dataclass(frozen=True)
class Target:
    """A GPU to compile for: Triton target, ptxas arch, shared memory limit, config family."""

    name: str
    capability: int
    shared_limit: int  # bytes per block (opt-in maximum)
    wgmma: bool  # Hopper: 16-bit tiles with >= 64 rows must use wgmma

    @property
    def gpu_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.capability, 32)

    @property
    def arch(self) -> int:
        """The key of ``configs.SPILLS`` and ``configs.candidates`` (capability major: 9 or 8)."""
        return self.capability // 10


TARGETS: dict[str, Target] = {
    "sm90a": Target("sm90a", 90, 232448, wgmma=True),
    "sm80": Target("sm80", 80, 166912, wgmma=False),
}
# activation dtypes of each dtype class of configs.py
CLASS_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "16bit": (torch.bfloat16, torch.float16),
    "fp32": (torch.float32,),
}
WGMMA_MIN_ROWS = 64
NOTES_BEGIN = "<!-- compile-gate:begin -->"
NOTES_END = "<!-- compile-gate:end -->"
NOTES_PATH = Path(__file__).resolve().with_name("NOTES.md")

# BERT-base FFN up-projection: tokens, out features, in features (all multiples of 16)
M, N, K = 4096, 3072, 768
TASKS = 4  # masks in the multi-task launch
SOFT_T = 0.5  # a finite temperature selects the soft-mask (sigmoid) branch


def _configs():
    from . import configs

    return configs


def offered_tiles(kernel: "Kernel", target: Target, dclass: str) -> list[tuple]:
    """What ``kernel``'s autotuner offers on ``target`` for ``dclass`` activations (its pruning hook's set)."""
    cfg = _configs()
    major = target.capability // 10
    dtype = CLASS_DTYPES[dclass][0]
    tiles = cfg.offered(kernel.name, major, dtype)
    order = cfg.candidates(kernel.name, major, cfg.dtype_class(dtype))
    return [t for t in order if t in tiles] + sorted(tiles - set(order))


def fixed_tile() -> tuple:
    """The one tile of ``ABP_TRITON_AUTOTUNE=0``, for every kernel, GPU and dtype."""
    (tile,) = _configs().offered(KERNELS[0].name, 9, torch.bfloat16, autotune_on=False)
    return tile


def spill_tiles(kernel: "Kernel", target: Target, dclass: str) -> list[tuple]:
    """``configs.SPILLS`` for ``kernel`` on ``target`` and ``dclass``, in table order."""
    cfg = _configs()
    listed = cfg.SPILLS[kernel.name].get((target.arch, dclass), frozenset())
    return [t for t in cfg.TABLES[cfg.table_name(target.arch, dclass)] if t in listed]


def accepted_spill(kernel_name: str, target: Target, dclass: str, tile: tuple) -> Optional[tuple[int, int]]:
    """``(stores, loads)`` bytes ``configs.ACCEPTED_SPILLS`` allows this config, or None."""
    return _configs().ACCEPTED_SPILLS.get(kernel_name, {}).get((target.arch, dclass), {}).get(tuple(tile))


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


# ----------------------------------------------------------------------------------------------
# kernels: recording the launch arguments of the public entry points
# ----------------------------------------------------------------------------------------------
class _AlignedPointer:
    """Stands in for a tensor argument: Triton reads only its dtype and its address (16-aligned)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def data_ptr(self) -> int:
        return 0


class _Recorder:
    """Replaces an autotuner: ``rec[grid](*args, **kwargs)`` stores the call instead of launching."""

    def __init__(self):
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@dataclass(frozen=True)
class Kernel:
    """One kernel launch to gate: which module-level autotuner it goes through, and a call that makes it."""

    name: str
    module: str  # submodule of abp.kernels
    tuner: str  # module attribute holding the triton.autotune object
    call: Callable[[object, torch.dtype], None]  # (module, dtype) -> calls the public entry point
    footprint: Callable[[tuple, int], int]  # (tile, element bytes) -> pipelined operand bytes
    swapped: bool = False  # the tile's columns are the MMA's rows (the masked weight as its left operand)

    def mma_rows(self, tile: tuple) -> int:
        """The MMA's row count for ``tile``: what decides whether Hopper can issue ``wgmma`` (≥ 64)."""
        return tile[1] if self.swapped else tile[0]


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _call_forward(mod, dt):
    mod.masked_matmul(_meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N, K), _meta(N, dtype=dt), _meta(N),
                      t_l=SOFT_T)


def _call_dx(mod, dt):
    mod.masked_matmul_dx(_meta(M, N, dtype=dt), _meta(N, K, dtype=dt), _meta(N, K), t_l=SOFT_T)


def _call_score_grad(mod, dt):
    mod.score_grad(_meta(M, N, dtype=dt), _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N, K),
                   _meta(N, dtype=dt), _meta(N), t_s=1.0)


def _call_score_update(mod, dt):
    mod.score_grad_update_(_meta(M, N, dtype=dt), _meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N, K),
                           lr=0.1, gamma=_meta(1), active=_meta(1), recovery=False,
                           counts=_meta(2, dtype=torch.int64), bias=_meta(N, dtype=dt), bias_scores=_meta(N),
                           t_s=1.0)


def _call_bitmask(mod, dt):
    mod.bitmask_matmul(_meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N * K // 8, dtype=torch.uint8),
                       _meta(N, dtype=dt))


def _call_bitmask_dx(mod, dt):
    mod.bitmask_matmul_dx(_meta(M, N, dtype=dt), _meta(N, K, dtype=dt), _meta(N * K // 8, dtype=torch.uint8))


def _call_bitmask_t(mod, dt):
    mod.bitmask_matmul(_meta(M, K, dtype=dt), _meta(N, K, dtype=dt), _meta(N * K // 8, dtype=torch.uint8),
                       _meta(N, dtype=dt), operand="a")


def _call_bitmask_dx_t(mod, dt):
    mod.bitmask_matmul_dx(_meta(M, N, dtype=dt), _meta(N, K, dtype=dt), _meta(N * K // 8, dtype=torch.uint8),
                          operand="a")


def _call_multi_bitmask(mod, dt, operand="b"):
    # the task-id range check reads values back to the host, which meta tensors do not have
    check = mod.check_task_ids
    mod.check_task_ids = lambda task_ids, num_tasks: None
    try:
        mod.multi_bitmask_matmul(_meta(M, K, dtype=dt), _meta(N, K, dtype=dt),
                                 _meta(TASKS, N * K // 8, dtype=torch.uint8), _meta(M, dtype=torch.int64),
                                 _meta(N, dtype=dt), operand=operand)
    finally:
        mod.check_task_ids = check


def _call_multi_bitmask_t(mod, dt):
    _call_multi_bitmask(mod, dt, operand="a")


def _mm_footprint(tile, e):
    r, c, k, s, _ = tile  # per stage: A [r, k], W [k, c] (activation dtype), θ [k, c] fp32
    return s * (r * k * e + k * c * (e + 4))


def _bm_footprint(tile, e):
    # per stage: A [r, k], W [k, c] (activation dtype), and the mask byte of each W element [k, c]
    # (a per-element gather: 8 elements read the same byte, but each lane holds its own copy)
    r, c, k, s, _ = tile
    return s * (r * k * e + k * c * (e + 1))


def _sg_footprint(tile, e):
    r, c, k, s, _ = tile  # per stage: dYᵀ [r, k], X [k, c]
    return s * (r * k + k * c) * e


# names: those of configs.KERNEL_NAMES, which each autotuner records as its ``abp_kernel``
KERNELS: tuple[Kernel, ...] = (
    Kernel("masked_matmul", "masked_matmul", "_fwd_kernel", _call_forward, _mm_footprint),
    Kernel("masked_matmul_dx", "masked_matmul", "_dx_kernel", _call_dx, _mm_footprint),
    Kernel("score_grad", "score_grad", "_grad_kernel", _call_score_grad, _sg_footprint),
    Kernel("score_grad_update", "score_grad", "_update_kernel", _call_score_update, _sg_footprint),
    Kernel("bitmask_matmul", "bitmask_matmul", "_fwd_kernel", _call_bitmask, _bm_footprint),
    Kernel("bitmask_matmul_dx", "bitmask_matmul", "_dx_kernel", _call_bitmask_dx, _bm_footprint),
    Kernel("multi_bitmask_matmul", "bitmask_matmul", "_multi_kernel", _call_multi_bitmask, _bm_footprint),
    Kernel("bitmask_matmul_t", "bitmask_matmul", "_fwd_t_kernel", _call_bitmask_t, _bm_footprint, swapped=True),
    Kernel("bitmask_matmul_dx_t", "bitmask_matmul", "_dx_t_kernel", _call_bitmask_dx_t, _bm_footprint,
           swapped=True),
    Kernel("multi_bitmask_matmul_t", "bitmask_matmul", "_multi_t_kernel", _call_multi_bitmask_t, _bm_footprint,
           swapped=True),
)


# Default subset, per @triton.jit kernel: (launch compiled with the largest tile, with the smallest)
REPRESENTATIVE = (("masked_matmul", "masked_matmul_dx"), ("score_grad_update", "score_grad"),
                  ("bitmask_matmul", "bitmask_matmul_dx"), ("multi_bitmask_matmul", "multi_bitmask_matmul"),
                  ("bitmask_matmul_t", "bitmask_matmul_dx_t"), ("multi_bitmask_matmul_t", "multi_bitmask_matmul_t"))


def _module(name: str):
    # importlib: the package's attributes masked_matmul/score_grad are the functions, not the modules
    return importlib.import_module(f"{__package__}.{name}")


def require_compiled_mode() -> None:
    """Raise RuntimeError unless the kernels were decorated as compiled-mode ``JITFunction`` objects."""
    for kernel in KERNELS:
        fn = getattr(_module(kernel.module), kernel.tuner).fn
        if not isinstance(fn, JITFunction):
            raise RuntimeError(
                f"{kernel.name}: the kernel is a {type(fn).__name__}, not a compiled-mode JITFunction: "
                "abp.kernels was imported with TRITON_INTERPRET=1 in the environment. Run the compile "
                "gate in a process without it (e.g. `env -u TRITON_INTERPRET python -P -m "
                "abp.kernels.compile_gate`).")


def record_launch(kernel: Kernel, dtype: torch.dtype) -> tuple[JITFunction, list, tuple, dict]:
    """``(jit_fn, tuner_configs, args, kwargs)`` of one real launch of ``kernel`` for ``dtype`` activations.

    Calls the kernel's public entry point on meta tensors with its autotuner (and the device
    check, which wants a GPU) swapped out for the duration of the call; tensor arguments come
    back as 16-byte-aligned pointer stand-ins.
    """
    mod = _module(kernel.module)
    tuner = getattr(mod, kernel.tuner)
    if getattr(tuner, "abp_kernel", None) != kernel.name:
        raise RuntimeError(f"{kernel.module}.{kernel.tuner} was made by configs.autotune for "
                           f"{getattr(tuner, 'abp_kernel', None)!r}, not {kernel.name!r}: the gate would check "
                           "another kernel's configs")
    rec = _Recorder()
    saved = {kernel.tuner: tuner, "check_device": mod.check_device}
    try:
        setattr(mod, kernel.tuner, rec)
        mod.check_device = lambda **tensors: torch.device("meta")
        kernel.call(mod, dtype)
    finally:
        for k, v in saved.items():
            setattr(mod, k, v)
    if len(rec.calls) != 1:
        raise RuntimeError(f"{kernel.name}: expected one launch through {kernel.module}.{kernel.tuner}, "
                           f"got {len(rec.calls)}")
    args, kwargs = rec.calls[0]
    args = tuple(_AlignedPointer(a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: _AlignedPointer(v.dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return tuner.fn, list(tuner.configs), args, kwargs


def kernel_entry_points() -> set[str]:
    """Names of the ``@triton.jit`` functions in ``kernels/`` that no other jit function calls.

    These are the kernels that get launched (the rest are ``@triton.jit`` helpers inlined into
    them); each must be covered by :data:`KERNELS`, which :func:`uncovered_kernels` checks.
    """
    pkg = importlib.import_module(__package__)
    jit_fns: dict[str, JITFunction] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "compile_gate":
            continue
        mod = _module(info.name)
        for value in vars(mod).values():
            if isinstance(value, JITFunction) and value.__module__ == mod.__name__:
                jit_fns[value.__name__] = value
    called = {name for name in jit_fns
              for other, fn in jit_fns.items() if other != name and re.search(rf"\b{name}\s*\(", fn.src)}
    return set(jit_fns) - called


def uncovered_kernels() -> list[str]:
    """Kernels of ``kernels/`` (see :func:`kernel_entry_points`) that no entry of :data:`KERNELS` launches."""
    covered = {getattr(_module(k.module), k.tuner).fn.__name__ for k in KERNELS}
    return sorted(kernel_entry_points() - covered)


# ----------------------------------------------------------------------------------------------
# compiling one config
# ----------------------------------------------------------------------------------------------
def _tuner_config(tuner_configs, tile: tuple) -> Optional[triton.Config]:
    r, c, k, s, w = tile
    for cfg in tuner_configs:
        rows, cols, red = list(cfg.kwargs)[:3]
        if (cfg.kwargs[rows], cfg.kwargs[cols], cfg.kwargs[red], cfg.num_stages, cfg.num_warps) == tile:
            return cfg
    return None


def _config_for(tuner_configs, tile: tuple) -> triton.Config:
    """The autotuner's own Config for ``tile``; for a tile it lacks, one built the way configs.py builds them."""
    cfg = _tuner_config(tuner_configs, tile)
    if cfg is not None:
        return cfg
    names = list(tuner_configs[0].kwargs)
    r, c, k, s, w = tile
    return triton.Config(dict(zip(names, (r, c, k, tuner_configs[0].kwargs[names[3]]))), num_stages=s, num_warps=w)


def compile_launch(fn: JITFunction, args: tuple, kwargs: dict, target: Target):
    """``triton.compile`` one launch for ``target`` as ``JITFunction.run`` would, without a GPU."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    from triton import knobs

    backend = make_backend(target.gpu_target)
    kwargs = dict(kwargs)
    # the options JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target.gpu_target, options=options.__dict__)


def ptxas_report(ptx: str, capability: int, enable_fp_fusion: bool) -> dict:
    """Registers, spill bytes and warnings from ``ptxas -v`` on ``ptx``, with Triton's cubin flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d, "kernel.ptx")
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", *([] if enable_fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(d, "kernel.cubin"))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({proc.returncode}): {log.strip()}")
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
    if not regs:
        raise RuntimeError(f"no 'Used N registers' line in the ptxas report:\n{log}")
    return {
        "registers": max(regs),
        "spill_stores": sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", log)),
        "spill_loads": sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", log)),
        "ptxas_warnings": [ln.strip() for ln in log.splitlines() if "warning" in ln.lower()],
        "ptxas": os.path.basename(ptxas),
    }


def _first_lines(exc: BaseException, n: int = 3) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " | ".join(ln.strip() for ln in text.splitlines()[:n] if ln.strip())


ROLES = ("offered", "fixed", "spills")  # autotune candidate, ABP_TRITON_AUTOTUNE=0 tile, configs.SPILLS entry


def compile_config(kernel: Kernel, target: Target, dtype: torch.dtype, tile: tuple, table: str = "",
                   role: str = "offered") -> dict:
    """Compile ``kernel`` for ``target``, ``dtype`` activations and ``tile``; one result row (a dict).

    ``tile`` is ``(rows, cols, red, stages, warps)`` as in configs.py; it need not be in a table.
    ``role`` (:data:`ROLES`) says which checks apply: an ``"offered"`` or ``"fixed"`` config can
    run and must pass every limit (spilling at most its ``configs.ACCEPTED_SPILLS`` bytes, if
    listed there); a ``"spills"`` config is a ``configs.SPILLS`` entry the autotuner never runs,
    compiled to check that it still spills (:func:`mark_stale_spills`). The row holds the compile
    outcome, resources, and ``violations`` (see :func:`check_row`).
    """
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {ROLES}")
    rows, cols, red, stages, warps = tile
    accepted = accepted_spill(kernel.name, target, _configs().dtype_class(dtype), tile) if role == "offered" else None
    row = {"kernel": kernel.name, "target": target.name, "dtype": _dtype_name(dtype), "table": table,
           "role": role, "accepted": None if accepted is None else list(accepted),
           "tile": list(tile), "in_tuner": None, "compiled": False, "error": None,
           "shared": None, "shared_limit": target.shared_limit, "registers": None, "spill_stores": None,
           "spill_loads": None, "wgmma": None, "wgmma_a_in_registers": None, "mma_rows": kernel.mma_rows(tile),
           "masked_operand": "a" if kernel.swapped else "b",
           "wgmma_expected": role != "spills" and target.wgmma and dtype != torch.float32
                             and kernel.mma_rows(tile) >= WGMMA_MIN_ROWS,
           "ptxas_warnings": [], "seconds": None}
    t0 = time.perf_counter()
    try:
        fn, tuner_configs, args, kwargs = record_launch(kernel, dtype)
        row["in_tuner"] = _tuner_config(tuner_configs, tile) is not None
        cfg = _config_for(tuner_configs, tile)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            # Triton 3.9 warns once that fp fusion defaults to on; a launch gets the same default.
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            compiled = compile_launch(fn, args, {**kwargs, **cfg.all_kwargs()}, target)
        row["compiled"] = True
        row["shared"] = int(compiled.metadata.shared)
        ptx = compiled.asm["ptx"]
        row["wgmma"] = "wgmma.mma_async" in ptx
        # wgmma's operands: "{accumulators}, {A registers}, B descriptor" or "{accumulators}, A descriptor, ..."
        row["wgmma_a_in_registers"] = bool(re.search(r"wgmma\.mma_async[^;]*\}\s*,\s*\{", ptx))
        row.update(ptxas_report(ptx, target.capability, compiled.metadata.enable_fp_fusion))
    except Exception as exc:  # a config that does not compile is a finding, not a crash of the gate
        row["error"] = _first_lines(exc)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["violations"] = check_row(row)
    return row


def _spills(row: dict) -> bool:
    return bool(row.get("spill_stores") or row.get("spill_loads"))


def check_row(row: dict) -> list[str]:
    """The limits a row breaks (empty when it passes): compile, shared memory, spills, wgmma.

    A ``"spills"`` row (a ``configs.SPILLS`` entry, never run) only has to compile with a ptxas
    report; whether it still spills is decided over its dtypes by :func:`mark_stale_spills`. A
    row with ``accepted`` bytes (``configs.ACCEPTED_SPILLS``) may spill up to them.
    """
    if not row.get("compiled"):
        return [f"does not compile: {row.get('error')}"]
    out = []
    if row.get("spill_stores") is None or row.get("spill_loads") is None:
        out.append("no ptxas resource report")
    if row.get("role", "offered") == "spills":
        return out
    if row["shared"] > row["shared_limit"]:
        out.append(f"shared memory {row['shared']} B > {row['shared_limit']} B")
    accepted = row.get("accepted")
    if out or not _spills(row):
        pass
    elif accepted is None:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads")
    elif row["spill_stores"] > accepted[0] or row["spill_loads"] > accepted[1]:
        out.append(f"spills {row['spill_stores']} B stores / {row['spill_loads']} B loads, more than the "
                   f"{accepted[0]}/{accepted[1]} B recorded in configs.ACCEPTED_SPILLS")
    if row.get("wgmma_expected") and not row.get("wgmma"):
        out.append(f"no wgmma on {row['target']} for an MMA of {row.get('mma_rows', row['tile'][0])} rows")
    elif row.get("wgmma_expected") and row.get("masked_operand") == "a" and not row.get("wgmma_a_in_registers"):
        out.append("wgmma reads the masked tile from shared memory, not from registers (the point of the _t kernels)")
    return out


def mark_stale_spills(rows: list[dict]) -> None:
    """Add a violation to the ``"spills"`` rows of each SPILLS entry that no longer spills in any dtype.

    An entry is ``(kernel, target, dtype class, tile)``; a 16-bit one counts as spilling if bf16
    or fp16 spills (it is listed when either does). Entries with a row that did not compile are
    left to that row's own violation.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("role") == "spills":
            dclass = "fp32" if r["dtype"] == "fp32" else "16bit"
            groups.setdefault((r["kernel"], r["target"], dclass, tuple(r["tile"])), []).append(r)
    for (kernel, target, dclass, tile), group in groups.items():
        if all(r.get("compiled") and r.get("spill_stores") is not None for r in group) \
                and not any(_spills(r) for r in group):
            dts = "/".join(r["dtype"] for r in group)
            msg = (f"listed in configs.SPILLS[{kernel!r}][({TARGETS[target].arch}, {dclass!r})] but does not "
                   f"spill ({dts}): remove it from SPILLS so the autotuner offers it again")
            for r in group:
                r["violations"].append(msg)


# ----------------------------------------------------------------------------------------------
# which configs
# ----------------------------------------------------------------------------------------------
def plan(all_configs: bool = False, targets: Iterable[str] = ("sm90a", "sm80"),
         dtypes: Optional[Iterable[str]] = None, kernels: Optional[Iterable[str]] = None) -> list[tuple]:
    """``(kernel, target, dtype, tile, table, role)`` to compile: every config, or the representative subset.

    Every config: per kernel launch × target × dtype class × dtype of the class (``dtypes``,
    names such as ``"bf16"``, keeps only those; ``kernels``, names of :data:`KERNELS`, likewise),
    the autotuner's candidates there (role
    ``"offered"``), the fixed tile of ``ABP_TRITON_AUTOTUNE=0`` (``"fixed"``, unless it is a
    candidate) and the ``configs.SPILLS`` entries (``"spills"``). The representative subset covers
    each ``@triton.jit`` kernel on each target with two 16-bit candidates: the tile of the largest
    estimated pipelined operand footprint in bf16, through the launch with the most epilogue work
    (forward, fused update), and the smallest tile in fp16 through the other launch (dX, score
    grad); plus per target the forward's largest fp32 candidate and its smallest fp32 SPILLS entry.
    """
    cfg = _configs()
    keep = None if dtypes is None else set(dtypes)
    keep_kernels = None if kernels is None else set(kernels)
    by_name = {k.name: k for k in KERNELS}
    fixed = fixed_tile()
    out = []

    def add(kernel, target, dt, tile, role):
        if (keep is None or _dtype_name(dt) in keep) and (keep_kernels is None or kernel.name in keep_kernels):
            out.append((kernel, target, dt, tile, cfg.table_name(target.arch, cfg.dtype_class(dt)), role))

    for tname in targets:
        target = TARGETS[tname]
        if all_configs:
            for kernel in KERNELS:
                for dclass, dts in CLASS_DTYPES.items():
                    offered = offered_tiles(kernel, target, dclass)
                    tiles = [(t, "offered") for t in offered] + ([] if fixed in offered else [(fixed, "fixed")])
                    tiles += [(t, "spills") for t in spill_tiles(kernel, target, dclass)]
                    for tile, role in tiles:
                        for dt in dts:
                            add(kernel, target, dt, tile, role)
            continue
        big_dt, small_dt = CLASS_DTYPES["16bit"][0], CLASS_DTYPES["16bit"][-1]
        for big_name, small_name in REPRESENTATIVE:
            big, small = by_name[big_name], by_name[small_name]
            size = lambda t: (big.footprint(t, 2), t[0] * t[1])  # noqa: E731
            add(big, target, big_dt, max(offered_tiles(big, target, "16bit"), key=size), "offered")
            add(small, target, small_dt, min(offered_tiles(small, target, "16bit"), key=size), "offered")
        fwd = KERNELS[0]
        size = lambda t: (fwd.footprint(t, 4), t[0] * t[1])  # noqa: E731
        add(fwd, target, torch.float32, max(offered_tiles(fwd, target, "fp32"), key=size), "offered")
        listed = spill_tiles(fwd, target, "fp32")
        if listed:
            add(fwd, target, torch.float32, min(listed, key=size), "spills")
    return out


def gate_rows(all_configs: bool = False, targets: Iterable[str] = ("sm90a", "sm80"),
              dtypes: Optional[Iterable[str]] = None,
              progress: Optional[Callable[[dict], None]] = None,
              kernels: Optional[Iterable[str]] = None) -> list[dict]:
    """Compile the planned configs (see :func:`plan`) and return one row per config.

    A kernel of ``kernels/`` that :data:`KERNELS` does not cover gets a failing row of its own; an
    offered config missing from the autotuner's configs, or a SPILLS entry that no longer spills
    (:func:`mark_stale_spills`), fails too.
    """
    require_compiled_mode()
    rows = [{"kernel": name, "target": "-", "dtype": "-", "table": "-", "role": "-", "tile": [], "compiled": False,
             "error": "no launch in compile_gate.KERNELS", "violations": ["kernel not covered by the gate"]}
            for name in uncovered_kernels()]
    for kernel, target, dtype, tile, table, role in plan(all_configs, targets, dtypes, kernels):
        row = compile_config(kernel, target, dtype, tile, table, role)
        if role != "spills" and row["in_tuner"] is False:
            row["violations"].append("not among the autotuner's configs")
        rows.append(row)
        if progress is not None:
            progress(row)
    mark_stale_spills(rows)
    return rows


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def _kib(b: Optional[int]) -> str:
    return "–" if b is None else f"{b / 1024:.1f}"


def markdown_table(rows: list[dict]) -> str:
    """The rows as a markdown table, one line per config."""
    head = ("| kernel | target | dtype | tile (rows, cols, red, stages, warps) | config | smem KiB (limit) | regs "
            "| spill st/ld B | wgmma | result |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for r in rows:
        tile = ", ".join(map(str, r.get("tile", [])))
        role = r.get("role", "offered")
        if role != "spills" and r.get("table") and r.get("in_tuner") is False:
            tile += " (not in tuner)"
        config = {"offered": "autotune", "fixed": "fixed tile", "spills": "SPILLS (dropped)"}.get(role, role)
        if r.get("compiled"):
            smem = f"{_kib(r['shared'])} ({_kib(r['shared_limit'])})"
            spill = "–" if r.get("spill_stores") is None else f"{r['spill_stores']}/{r['spill_loads']}"
            wg = ("yes, A in registers" if r.get("wgmma_a_in_registers") else "yes") if r.get("wgmma") else (
                "**no**" if r.get("wgmma_expected") else "no")
            regs = "–" if r.get("registers") is None else str(r["registers"])
        else:
            smem = regs = spill = wg = "–"
        if r["violations"]:
            result = "**FAIL**: " + "; ".join(r["violations"])
        elif role == "spills":
            result = "spills, as listed" if _spills(r) else "no spill (another dtype does)"
        elif r.get("accepted") and _spills(r):
            result = f"accepted spill (ACCEPTED_SPILLS: ≤ {r['accepted'][0]}/{r['accepted'][1]} B)"
        else:
            result = "ok"
        lines.append(f"| {r['kernel']} | {r['target']} | {r['dtype']} | {tile} | {config} | {smem} | {regs} "
                     f"| {spill} | {wg} | {result} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """One line: how many runnable configs compile, fit, spill (accepted or not), lack wgmma; SPILLS checked; fails."""
    run = [r for r in rows if r.get("role") != "spills"]
    listed = [r for r in rows if r.get("role") == "spills"]
    compiled = [r for r in run if r.get("compiled")]
    fit = [r for r in compiled if r["shared"] <= r["shared_limit"]]
    spill = [r for r in compiled if _spills(r)]
    accepted = [r for r in spill if r.get("accepted")]
    no_wgmma = [r for r in compiled if r.get("wgmma_expected") and not r.get("wgmma")]
    failing = [r for r in rows if r["violations"]]
    entries = {(r["kernel"], r["target"], r["dtype"] == "fp32", tuple(r["tile"])) for r in listed}
    spilling = {(r["kernel"], r["target"], r["dtype"] == "fp32", tuple(r["tile"])) for r in listed if _spills(r)}
    text = (f"{len(run)} runnable configs (autotune candidates and the fixed tile): {len(compiled)} compile, "
            f"{len(fit)} fit shared memory, {len(spill)} spill ({len(accepted)} of them accepted in "
            f"ACCEPTED_SPILLS), {len(no_wgmma)} lack an expected wgmma.")
    if listed:
        text += (f" {len(entries)} SPILLS entries ({len(listed)} compiles): {len(spilling)} still spill.")
    return text + f" {len(failing)} compiles fail a check."


def _ptxas_versions(targets: Iterable[str]) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    parts = []
    for t in targets:
        tool = get_ptxas(TARGETS[t].capability)
        parts.append(f"{os.path.basename(tool.path)} {tool.version} for {t}")
    return ", ".join(parts)


def left_out(rows: list[dict]) -> str:
    """What of ``--all`` on every target the rows do not cover, e.g. ``"fp32 (48 configs)"``; empty if nothing."""
    done = {(r["kernel"], r["target"], r["dtype"], tuple(r["tile"]), r.get("role")) for r in rows}
    missing: dict[str, int] = {}
    for kernel, target, dtype, tile, table, role in plan(True, TARGETS):
        if (kernel.name, target.name, _dtype_name(dtype), tile, role) not in done:
            what = "SPILLS entries" if role == "spills" else f"{table} table"
            key = f"{target.name} {what} in {_dtype_name(dtype)}"
            missing[key] = missing.get(key, 0) + 1
    return ", ".join(f"{k} ({n} configs)" for k, n in missing.items())


def notes_section(rows: list[dict], command: str, targets: Iterable[str]) -> str:
    """The generated block for NOTES.md (without the marker lines)."""
    missing = left_out(rows)
    fill = lambda text: textwrap.fill(text, width=100, break_on_hyphens=False)  # noqa: E731
    return "\n".join([
        fill(f"Generated by `{command}` with Triton {triton.__version__} ({_ptxas_versions(targets)}); "
        "do not edit by hand. Shapes M, N, K = "
        f"{M}, {N}, {K} with 16-byte-aligned pointers; forward with soft mask, bias and bias scores, dX "
        "with soft mask, score grad and fused update (no recovery) with bias scores, 1-bit-mask forward "
        f"with bias, its dX, multi-task forward with bias over {TASKS} masks, the 1-bit-mask forward "
        "(with bias), its dX and the multi-task forward with the masked weight as the MMA's left operand "
        "(`_t`, whose MMA rows are the tile's columns); fp32 rows use exact "
        "`ieee` products. Configs: each kernel's autotune candidates (`configs.candidates`: its table "
        "minus `configs.SPILLS`) and the fixed tile, which must pass every limit: shared memory per block "
        "(sm90a 227 KiB, sm80 163 KiB), no spills (`configs.ACCEPTED_SPILLS`: at most the recorded "
        "bytes), `wgmma` on sm90a for 16-bit tiles whose MMA has ≥ 64 rows (for the `_t` kernels with the "
        "masked tile read from registers); and the `SPILLS` entries, which must "
        "still spill."),
        "",
        fill(f"**{summary(rows)}**" + (f" Not compiled here: {missing}." if missing else "")),
        "",
        markdown_table(rows),
    ])


def write_notes(section: str, path: Path = NOTES_PATH) -> None:
    """Replace the text between the compile-gate markers of ``path`` (appended with a heading if absent)."""
    text = path.read_text()
    block = f"{NOTES_BEGIN}\n{section}\n{NOTES_END}"
    if NOTES_BEGIN in text and NOTES_END in text:
        head, rest = text.split(NOTES_BEGIN, 1)
        _, tail = rest.split(NOTES_END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Compile gate (`abp.kernels.compile_gate`)\n" + block + "\n"
    path.write_text(text)


def main(argv: Optional[list[str]] = None) -> int:
    """Command line: compile, print the table, optionally write NOTES.md; exit 1 if a limit fails."""
    p = argparse.ArgumentParser(
        prog="python -P -m abp.kernels.compile_gate",
        description=("Compile every Triton kernel of abp.kernels with Triton's compiler for real NVIDIA "
                     "targets (no GPU needed) and check each autotune config: it compiles, its shared "
                     "memory fits the GPU, ptxas reports no spills (beyond configs.ACCEPTED_SPILLS), and "
                     "16-bit tiles of >= 64 rows use wgmma on sm90a; and that configs.SPILLS entries still "
                     "spill. Run without TRITON_INTERPRET=1."))
    p.add_argument("--all", action="store_true",
                   help=("every config each kernel's autotuner can run on each target (its candidates from "
                         "the Hopper table on sm90a, the Ampere table on sm80, each in bf16 and fp16, and the "
                         "fp32 table on both, minus configs.SPILLS; plus the ABP_TRITON_AUTOTUNE=0 tile), and "
                         "every configs.SPILLS entry, which must still spill. Default: a representative subset, "
                         "per @triton.jit kernel and target the largest 16-bit candidate in bf16 and the "
                         "smallest in fp16, plus per target the forward's largest fp32 candidate and smallest "
                         "fp32 SPILLS entry (28 compiles)."))
    p.add_argument("--targets", default="sm90a,sm80",
                   help=f"comma-separated targets, from {', '.join(TARGETS)} (default: both)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated activation dtypes to keep, from bf16, fp16, fp32 (default: all)")
    p.add_argument("--kernels", default=None,
                   help=(f"comma-separated kernel launches to keep, from {', '.join(k.name for k in KERNELS)} "
                         "(default: all; not with --write-notes, whose table covers every kernel)"))
    p.add_argument("--write-notes", action="store_true",
                   help=(f"replace the section between {NOTES_BEGIN} and {NOTES_END} in kernels/NOTES.md with "
                         "the table, the Triton version and this command"))
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON to PATH")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ns = p.parse_args(argv)
    targets = [t.strip() for t in ns.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        p.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(TARGETS)}")

    def progress(r):
        if not ns.quiet:
            state = "ok" if not r["violations"] else "FAIL"
            print(f"[{r['seconds']:6.1f}s] {r['kernel']:<20} {r['target']:<5} {r['dtype']} {r['tile']} "
                  f"{r['role']} {state}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    dtypes = None if ns.dtypes is None else [d.strip() for d in ns.dtypes.split(",") if d.strip()]
    if dtypes is not None and not set(dtypes) <= {"bf16", "fp16", "fp32"}:
        p.error(f"unknown dtype(s) in {ns.dtypes!r}; choose from bf16, fp16, fp32")
    kernels = None if ns.kernels is None else [k.strip() for k in ns.kernels.split(",") if k.strip()]
    if kernels is not None:
        bad = sorted(set(kernels) - {k.name for k in KERNELS})
        if bad:
            p.error(f"unknown kernel(s) {', '.join(bad)}; choose from {', '.join(k.name for k in KERNELS)}")
        if ns.write_notes:
            p.error("--write-notes needs every kernel: drop --kernels")
    rows = gate_rows(ns.all, targets, dtypes, progress, kernels)
    print(markdown_table(rows))
    print()
    print(summary(rows) + f" ({time.perf_counter() - t0:.0f} s)")
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=1))
    if ns.write_notes:
        args = ["--all"] if ns.all else []
        if ns.targets != "sm90a,sm80":
            args += ["--targets", ns.targets]
        if ns.dtypes is not None:
            args += ["--dtypes", ns.dtypes]
        command = shlex.join(["python", "-P", "-m", "abp.kernels.compile_gate", *args, "--write-notes"])
        write_notes(notes_section(rows, command, targets))
    return 1 if any(r["violations"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
