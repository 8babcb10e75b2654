"""Which launch configs the abp Triton autotuners keep per GPU and activation dtype (pure Python, no GPU).

Each kernel's autotuner holds the union of its candidate sets; the pruning hook that
``configs.autotune`` installs keeps, at the first call of each tuning key, the set for the GPU
family (``torch.cuda.get_device_capability``, monkeypatched here) and the activation dtype (the
first tensor argument of the launch), or only the fixed tile under ``ABP_TRITON_AUTOTUNE=0``.
A config the hook keeps runs on a real GPU, so it must be one the compile gate compiled and
cleared there: the gate's generated table in ``kernels/NOTES.md`` is the record of what it cleared.

The hook is exercised as the autotuner runs it: on the kernel modules' own autotuner objects
(their hooks are closures over the tile names each module passed), with the configs such an
autotuner holds on a GPU, and with the arguments of a real launch, recorded from the public
entry point called on ``meta`` tensors (the launch list and calls of ``compile_gate.KERNELS``).
"""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from abp.kernels import compile_gate as G  # noqa: E402
from abp.kernels import configs as C  # noqa: E402

NOTES = Path(C.__file__).resolve().with_name("NOTES.md")
KERNELS = {k.name: k for k in G.KERNELS}
GATE_ARCH = {"sm90a": 9, "sm80": 8}
DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _tuner(kernel: str):
    spec = KERNELS[kernel]
    return getattr(importlib.import_module(f"abp.kernels.{spec.module}"), spec.tuner)


def _launch(kernel: str, dtype: torch.dtype, monkeypatch) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the launch the public entry point makes for ``dtype`` activations (meta tensors)."""
    spec = KERNELS[kernel]
    mod = importlib.import_module(f"abp.kernels.{spec.module}")
    calls = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((args, kwargs))

    with monkeypatch.context() as m:
        m.setattr(mod, spec.tuner, Recorder())
        m.setattr(mod, "check_device", lambda **tensors: torch.device("meta"))
        spec.call(mod, dtype)
    assert len(calls) == 1, f"{kernel}: expected one launch, got {len(calls)}"
    return calls[0]


def _tile(cfg, names) -> tuple:
    rows, cols, red = names[:3]
    return cfg.kwargs[rows], cfg.kwargs[cols], cfg.kwargs[red], cfg.num_stages, cfg.num_warps


def kept(kernel: str, capability: tuple[int, int], dtype: torch.dtype, monkeypatch, launch=None) -> list[tuple]:
    """The tiles ``kernel``'s own pruning hook keeps on a GPU of ``capability`` for ``dtype`` activations.

    The autotuner is given the configs it holds on a GPU (under the interpreter it holds one), its
    named arguments are those of a real launch (``launch`` replaces them), and it prunes through
    Triton's ``Autotuner.prune_configs`` as on its first call of a tuning key.
    """
    tuner = _tuner(kernel)
    names = list(tuner.configs[0].kwargs)  # (rows, cols, red, group): the names the module passed
    args, kwargs = launch if launch is not None else _launch(kernel, dtype, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(C, "INTERPRET", False)
        gpu_configs = C.matmul_configs(kernel, *names)
        m.setattr(tuner, "configs", gpu_configs)
        m.setattr(tuner, "nargs", dict(zip(tuner.arg_names, args)), raising=False)
        m.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        pruned = tuner.prune_configs(kwargs)
    tiles = [_tile(c, names) for c in pruned]
    assert len(set(tiles)) == len(tiles), f"{kernel}: a tile kept twice: {tiles}"
    return tiles


def expected(kernel: str, family: str, arch: int, dclass: str) -> set[tuple]:
    """``family``'s table minus what SPILLS lists for ``kernel`` on ``arch`` for ``dclass``."""
    return set(C.TABLES[family]) - C.SPILLS[kernel].get((arch, dclass), frozenset())


@pytest.fixture(autouse=True)
def autotune_on(monkeypatch):
    monkeypatch.delenv("ABP_TRITON_AUTOTUNE", raising=False)


# ----------------------------------------------------------------------------------------------
# the pruning hook
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
@pytest.mark.parametrize("capability", [(9, 0), (10, 0)], ids=["sm90", "sm100"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_hopper_16bit_keeps_the_hopper_table_minus_spills(kernel, capability, dtype, monkeypatch):
    """sm90 and newer with bf16/fp16: exactly the Hopper table without the kernel's sm90 16-bit SPILLS."""
    got = set(kept(kernel, capability, dtype, monkeypatch))
    assert got == expected(kernel, "hopper", 9, "16bit")
    assert got == C.offered(kernel, capability[0], dtype)


@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (8, 9)], ids=["sm80", "sm86", "sm89"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ampere_16bit_keeps_the_ampere_table_minus_spills(kernel, capability, dtype, monkeypatch):
    got = set(kept(kernel, capability, dtype, monkeypatch))
    assert got == expected(kernel, "ampere", 8, "16bit")
    assert got == C.offered(kernel, capability[0], dtype)


@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
@pytest.mark.parametrize("capability", [(9, 0), (8, 0)], ids=["sm90", "sm80"])
def test_fp32_keeps_the_fp32_table_minus_that_gpus_spills(kernel, capability, monkeypatch):
    """fp32 activations: the fp32 table on every GPU, minus what spills for the kernel on that GPU."""
    arch = capability[0]
    got = set(kept(kernel, capability, torch.float32, monkeypatch))
    assert got == expected(kernel, "fp32", arch, "fp32")
    assert got == C.offered(kernel, arch, torch.float32)


def test_the_sets_differ_by_gpu_and_dtype(monkeypatch):
    """The hook discriminates by both: the fused update's four sets (sm90/sm80 × bf16/fp32) all differ."""
    sets = {(cap, dt): frozenset(kept("score_grad_update", cap, dt, monkeypatch))
            for cap in ((9, 0), (8, 0)) for dt in (torch.bfloat16, torch.float32)}
    assert len(set(sets.values())) == 4, sets


@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
def test_autotune_off_keeps_only_the_fixed_tile(kernel, monkeypatch):
    """``ABP_TRITON_AUTOTUNE=0``: one conservative tile (64×64×32, 3 stages, 8 warps) on every GPU and dtype."""
    monkeypatch.setenv("ABP_TRITON_AUTOTUNE", "0")
    for capability in ((9, 0), (8, 0)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            assert kept(kernel, capability, dtype, monkeypatch) == [(64, 64, 32, 3, 8)], (capability, dtype)
    monkeypatch.setenv("ABP_TRITON_AUTOTUNE", "1")
    assert len(kept(kernel, (9, 0), torch.bfloat16, monkeypatch)) > 1


@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float8_e4m3fn], ids=str)
def test_a_dtype_without_a_table_raises_instead_of_falling_back(kernel, dtype, monkeypatch):
    """Activations of a dtype no table was measured for: the hook's RuntimeError, not another dtype's table
    (the entry points refuse such dtypes first; the hook must not rely on it)."""
    args, kwargs = _launch(kernel, torch.float32, monkeypatch)
    first = next(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    args = args[:first] + (args[first].to(dtype),) + args[first + 1:]
    for env in ("1", "0"):
        monkeypatch.setenv("ABP_TRITON_AUTOTUNE", env)
        with pytest.raises(RuntimeError, match=rf"no autotune config for {kernel} on sm9x with {dtype}"):
            kept(kernel, (9, 0), dtype, monkeypatch, launch=(args, kwargs))
    assert C.offered(kernel, 9, dtype) == set()


@pytest.mark.parametrize("kernel", C.KERNEL_NAMES)
def test_the_hook_reads_the_activation_dtype_not_the_scores(kernel, monkeypatch):
    """The launch's first tensor is the activation operand (x or dY): a 16-bit launch is pruned to the
    16-bit set although tensors of other dtypes (fp32 scores, uint8 mask bits) are among its arguments."""
    args, _ = _launch(kernel, torch.float16, monkeypatch)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    assert tensors[0].dtype == torch.float16 and any(t.dtype != torch.float16 for t in tensors)
    assert C.offered(kernel, 9, torch.float16) != C.offered(kernel, 9, torch.float32), "test precondition"
    assert set(kept(kernel, (9, 0), torch.float16, monkeypatch)) == C.offered(kernel, 9, torch.float16)


def test_the_hook_is_skipped_with_one_config(monkeypatch):
    """With a single config (the interpreter's tile) nothing is pruned and the GPU is never asked."""
    tuner = _tuner("masked_matmul")
    names = list(tuner.configs[0].kwargs)
    with monkeypatch.context() as m:
        m.setattr(C, "INTERPRET", True)
        one = C.matmul_configs("masked_matmul", *names)
    assert [_tile(c, names) for c in one] == [C._INTERPRET_TILE]

    def no_gpu(*a, **k):
        raise AssertionError("the hook asked for the device capability")

    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu)
    assert tuner.early_config_prune(one, {}) == one


# ----------------------------------------------------------------------------------------------
# the table helpers
# ----------------------------------------------------------------------------------------------
def test_arch_dtype_class_and_table_name():
    assert [C.arch_of(m) for m in (8, 9, 10, 12)] == [8, 9, 9, 9]
    assert C.dtype_class(torch.float32) == "fp32"
    assert C.dtype_class(torch.float16) == C.dtype_class(torch.bfloat16) == "16bit"
    assert C.table_name(9, "16bit") == C.table_name(10, "16bit") == "hopper"
    assert C.table_name(8, "16bit") == "ampere"
    assert C.table_name(9, "fp32") == C.table_name(8, "fp32") == "fp32"
    for kernel in C.KERNEL_NAMES:
        assert C.candidates(kernel, 10, "16bit") == C.candidates(kernel, 9, "16bit")
        assert C.candidates(kernel, 8, "fp32") == [t for t in C.TABLES["fp32"]
                                                  if t not in C.SPILLS[kernel].get((8, "fp32"), ())]


def test_an_empty_candidate_set_is_an_error(monkeypatch):
    """A (kernel, GPU, dtype class) whose whole table spills is refused at import, never left empty."""
    spills = {k: dict(v) for k, v in C.SPILLS.items()}
    spills["score_grad"][(8, "fp32")] = frozenset(C.TABLES["fp32"])
    monkeypatch.setattr(C, "SPILLS", spills)
    with pytest.raises(ValueError, match=r"no candidate tile left for score_grad on arch 8 \(fp32\)"):
        C._check_tables()


def test_spills_for_an_unknown_gpu_family_are_refused(monkeypatch):
    """SPILLS keyed by a GPU family that has no table (here sm7x) is an error, not silently ignored."""
    spills = {k: dict(v) for k, v in C.SPILLS.items()}
    spills["masked_matmul"][(7, "16bit")] = frozenset({C.TABLES["ampere"][0]})
    monkeypatch.setattr(C, "SPILLS", spills)
    with pytest.raises(ValueError, match=r"masked_matmul \(7, '16bit'\)"):
        C._check_tables()


# ----------------------------------------------------------------------------------------------
# what the compile gate cleared
# ----------------------------------------------------------------------------------------------
def _cleared() -> dict[tuple[str, int, torch.dtype], set[tuple]]:
    """From the gate's generated table in NOTES.md: (kernel, arch, dtype) -> the runnable tiles it passed."""
    text = NOTES.read_text()
    block = text[text.index(G.NOTES_BEGIN):text.index(G.NOTES_END)]
    out: dict[tuple[str, int, torch.dtype], set[tuple]] = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 10 or cells[0] not in C.KERNEL_NAMES:
            continue
        kernel, target, dtype, tile, config, *_, result = cells
        key = (kernel, GATE_ARCH[target], DTYPE_NAMES[dtype])
        out.setdefault(key, set())
        if config in ("autotune", "fixed tile") and result == "ok":
            out[key].add(tuple(int(x) for x in re.findall(r"\d+", tile)))
    return out


def test_every_kept_tile_was_cleared_by_the_compile_gate(monkeypatch):
    """Per kernel, GPU (sm90a, sm80) and dtype, each tile the hook keeps, and the fixed tile, passed the gate."""
    cleared = _cleared()
    want = {(k, a, d) for k in C.KERNEL_NAMES for a in (9, 8) for d in DTYPE_NAMES.values()}
    assert set(cleared) == want, f"the gate table in NOTES.md lacks {sorted(map(str, want - set(cleared)))}"
    for (kernel, arch, dtype), ok in cleared.items():
        tiles = kept(kernel, (arch, 0), dtype, monkeypatch)
        uncleared = [t for t in tiles if t not in ok]
        assert not uncleared, (f"{kernel} sm{arch}0 {dtype}: offered but not cleared by the compile gate "
                               f"(run python -P -m abp.kernels.compile_gate --all --write-notes): {uncleared}")
        assert C._FIXED_TILE in ok, (kernel, arch, dtype)
