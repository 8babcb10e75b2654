"""Compile gate: the Triton kernels of abp.kernels compiled by Triton for real GPUs (sm_90a, sm_80), no GPU needed.

The interpreter tests cannot see a kernel that fails to compile for a GPU or does not fit one.
These tests run :mod:`abp.kernels.compile_gate` and assert, per config the autotuners can run
(each kernel's candidates from ``configs.candidates``, and the ``ABP_TRITON_AUTOTUNE=0`` tile):
it compiles, its shared memory per block fits the target (232448 B on sm_90a, 166912 B on sm_80),
ptxas reports no spill bytes (a ``configs.ACCEPTED_SPILLS`` entry: no more than recorded), and on
sm_90a 16-bit tiles whose MMA has at least 64 rows use ``wgmma`` (the tile's rows; its columns for the
``_t`` kernels, whose MMA takes the masked weight as its left operand); and that each ``configs.SPILLS`` entry
compiled still spills (in bf16 or fp16 for a 16-bit entry).

By default they compile the gate's representative subset (per ``@triton.jit`` kernel and target,
the largest 16-bit candidate in bf16 and the smallest in fp16, plus per target the forward's
largest fp32 candidate and smallest fp32 SPILLS entry: 28 compiles). ``ABP_COMPILE_GATE_ALL=1``
compiles every runnable config and every SPILLS entry (680 compiles; 10-20 min on two busy cores with
Triton's cache warm for most kernels: the fp32 tiles kept as SPILLS entries are slow to compile).

The compiles run in a subprocess whose environment lacks ``TRITON_INTERPRET``: conftest.py sets
it for this session when there is no GPU, and Triton picks the interpreter when a kernel is
decorated, so kernels imported here would not be compilable. Missing Triton or a missing bundled
ptxas fails these tests; they skip only when the installed Triton has no NVIDIA backend at all.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALL = os.environ.get("ABP_COMPILE_GATE_ALL") == "1"
SHARED_LIMIT = {"sm90a": 232448, "sm80": 166912}
KERNELS = {"masked_matmul", "masked_matmul_dx", "score_grad", "score_grad_update", "bitmask_matmul",
           "bitmask_matmul_dx", "multi_bitmask_matmul", "bitmask_matmul_t", "bitmask_matmul_dx_t",
           "multi_bitmask_matmul_t"}


def _require_nvidia_toolchain() -> None:
    """Fail without Triton or its ptxas; skip only if this Triton has no NVIDIA backend."""
    try:
        from triton.backends import backends
    except ImportError as exc:
        pytest.fail(f"Triton is not importable, so the kernels cannot be compile-checked: {exc}")
    if "nvidia" not in backends:
        pytest.skip(f"the installed Triton has no NVIDIA backend (backends: {sorted(backends)})")
    from triton.backends.nvidia.compiler import get_ptxas

    for capability in (80, 90):
        try:
            get_ptxas(capability)
        except RuntimeError as exc:
            pytest.fail(f"Triton's NVIDIA backend has no usable ptxas for sm_{capability}: {exc}")


def _gate_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_python(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-P", *args], cwd=REPO, env=_gate_env(), capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    _require_nvidia_toolchain()
    out = tmp_path_factory.mktemp("compile-gate") / "rows.json"
    args = ["-m", "abp.kernels.compile_gate", "--quiet", "--json", str(out)] + (["--all"] if ALL else [])
    proc = _run_python(args, timeout=4 * 3600 if ALL else 1800)
    # exit status 1 means a config broke a limit: the tests below say which
    if proc.returncode not in (0, 1) or not out.is_file():
        pytest.fail(f"compile gate crashed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out.read_text())


def _label(r: dict) -> str:
    return f"{r['kernel']} {r['target']} {r['dtype']} tile {tuple(r['tile'])} ({r.get('role')})"


def _runnable(rows):
    """Rows of configs an autotuner can run: its candidates and the fixed tile (not SPILLS entries)."""
    return [r for r in rows if r.get("role") in ("offered", "fixed")]


def _fails(rows, bad) -> str:
    return "\n".join(f"{_label(r)}: {bad(r)}" for r in rows if bad(r))


def test_every_kernel_is_gated_on_both_targets(rows):
    uncovered = [r["kernel"] for r in rows if r["target"] == "-"]
    assert not uncovered, f"@triton.jit kernels in kernels/ that compile_gate.KERNELS does not launch: {uncovered}"
    for target in SHARED_LIMIT:
        got = {r["kernel"] for r in _runnable(rows) if r["target"] == target}
        assert got == KERNELS, f"{target}: gated {sorted(got)}, expected {sorted(KERNELS)}"
    assert {r["dtype"] for r in rows} >= {"bf16", "fp16", "fp32"}
    assert any(r["role"] == "spills" for r in rows), "no configs.SPILLS entry checked"


def test_gate_checks_what_the_autotuners_offer(rows):
    """Every runnable row is among its autotuner's configs and in its candidate set; none is a SPILLS entry."""
    msg = _fails(_runnable(rows), lambda r: r["in_tuner"] is False and "not among the autotuner's configs")
    assert not msg, msg
    code = (
        "import json, sys\n"
        "from abp.kernels import configs as C\n"
        "json.dump({k: {f'{a},{d}': sorted(C.candidates(k, a, d)) for a in C.ARCHS for d in C.DTYPE_CLASSES}"
        " for k in C.KERNEL_NAMES} | {'_spills': {k: {f'{a},{d}': sorted(v) for (a, d), v in per.items()}"
        " for k, per in C.SPILLS.items()}}, sys.stdout)\n"
    )
    proc = _run_python(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = json.loads(proc.stdout)
    spills = tables.pop("_spills")
    arch = {"sm90a": 9, "sm80": 8}
    for r in rows:
        if r["target"] == "-":
            continue
        key = f"{arch[r['target']]},{'fp32' if r['dtype'] == 'fp32' else '16bit'}"
        cands, listed = tables[r["kernel"]][key], spills[r["kernel"]].get(key, [])
        if r["role"] == "offered":
            assert r["tile"] in cands and r["tile"] not in listed, _label(r)
        elif r["role"] == "spills":
            assert r["tile"] in listed and r["tile"] not in cands, _label(r)


def test_compiles(rows):
    msg = _fails(rows, lambda r: None if r["compiled"] else r.get("error"))
    assert not msg, "configs that do not compile:\n" + msg


def test_shared_memory_fits(rows):
    msg = _fails(_runnable(rows), lambda r: r["compiled"] and r["shared"] > SHARED_LIMIT[r["target"]]
                 and f"{r['shared']} B shared memory > {SHARED_LIMIT[r['target']]} B")
    assert not msg, "configs over the shared memory limit:\n" + msg


def test_no_spills(rows):
    """No runnable config spills, except ACCEPTED_SPILLS entries, which spill no more than recorded."""
    def bad(r):
        if not r["compiled"] or r["spill_stores"] is None:
            return None
        limit = r.get("accepted") or [0, 0]
        if r["spill_stores"] > limit[0] or r["spill_loads"] > limit[1]:
            return (f"{r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads ({r['registers']} "
                    f"registers; allowed {limit[0]}/{limit[1]} B)")
        return None

    msg = _fails(_runnable(rows), bad)
    assert not msg, "configs that spill registers:\n" + msg
    accepted = [f"{_label(r)}: {r['spill_stores']}/{r['spill_loads']} B (≤ {r['accepted']})"
                for r in _runnable(rows) if r.get("accepted")]
    if accepted:  # shown with -rP / on failure: accepted spills are reported, not hidden
        print("accepted spills (configs.ACCEPTED_SPILLS):\n" + "\n".join(accepted))


def test_spills_entries_still_spill(rows):
    """Each configs.SPILLS entry compiled here spills in at least one of its dtypes (else it is stale)."""
    groups = {}
    for r in rows:
        if r.get("role") == "spills":
            key = (r["kernel"], r["target"], r["dtype"] == "fp32", tuple(r["tile"]))
            groups.setdefault(key, []).append(r)
    assert groups, "no SPILLS entry was compiled"
    stale = [f"{k[0]} {k[1]} {'fp32' if k[2] else '16bit'} tile {k[3]}" for k, g in groups.items()
             if not any(r["compiled"] and (r["spill_stores"] or r["spill_loads"]) for r in g)]
    assert not stale, "configs.SPILLS entries that no longer spill (remove them):\n" + "\n".join(stale)
    assert not _fails([r for g in groups.values() for r in g], lambda r: "; ".join(r["violations"]))


def test_wgmma_on_hopper(rows):
    msg = _fails(_runnable(rows), lambda r: r["compiled"] and r["target"] == "sm90a" and r["dtype"] != "fp32"
                 and r["mma_rows"] >= 64 and not r["wgmma"] and "no wgmma.mma_async in the PTX")
    assert not msg, "16-bit sm90a tiles whose MMA has >= 64 rows without wgmma:\n" + msg
    swapped = [r for r in _runnable(rows) if r["kernel"].endswith("_t")]
    assert swapped and all(r["mma_rows"] == r["tile"][1] for r in swapped)
    # the point of the _t kernels: wgmma takes the masked tile from registers (the default form from shared
    # memory), and a tile of fewer than 64 tokens still issues wgmma on Hopper
    hopper16 = [r for r in _runnable(rows) if r["target"] == "sm90a" and r["dtype"] != "fp32" and r["compiled"]]
    msg = _fails([r for r in hopper16 if r["kernel"].endswith("_t")],
                 lambda r: not r["wgmma_a_in_registers"] and "wgmma's A operand is not in registers")
    assert not msg, msg
    assert not any(r["wgmma_a_in_registers"] for r in hopper16
                   if r["kernel"] in ("bitmask_matmul", "masked_matmul", "multi_bitmask_matmul")
                   and r["wgmma"]), "the default form was expected to read both wgmma operands from shared memory"
    few = [r for r in swapped if r["target"] == "sm90a" and r["dtype"] != "fp32" and r["tile"][0] < 64]
    msg = _fails(few, lambda r: r["compiled"] and not r["wgmma"] and "no wgmma")
    assert not msg, msg


def test_gate_reports_an_oversized_config():
    """A tile with 16 pipeline stages cannot fit an A100's 163 KiB: the gate must say so."""
    _require_nvidia_toolchain()
    code = (
        "import json, sys, torch\n"
        "from abp.kernels import compile_gate as g\n"
        "g.require_compiled_mode()\n"
        "row = g.compile_config(g.KERNELS[0], g.TARGETS['sm80'], torch.float16, (32, 64, 64, 16, 4))\n"
        "json.dump(row, sys.stdout)\n"
    )
    proc = _run_python(["-c", code], timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["violations"], row
    if row["compiled"]:
        assert row["shared"] > SHARED_LIMIT["sm80"], row
        assert any("shared memory" in v for v in row["violations"]), row
    else:  # a Triton that checks shared memory at compile time
        assert "OutOfResources" in row["error"] or "shared" in row["error"], row


def test_check_row_flags_each_limit():
    from abp.kernels.compile_gate import check_row

    ok = {"kernel": "k", "target": "sm90a", "dtype": "bf16", "tile": [128, 128, 64, 3, 8], "compiled": True,
          "error": None, "shared": 1000, "shared_limit": 232448, "registers": 200, "spill_stores": 0,
          "spill_loads": 0, "wgmma": True, "wgmma_expected": True}
    assert check_row(ok) == []
    assert "does not compile" in check_row({**ok, "compiled": False, "error": "CompilationError: x"})[0]
    assert "shared memory" in check_row({**ok, "shared": 232449})[0]
    assert "spills" in check_row({**ok, "spill_loads": 4})[0]
    assert "no ptxas resource report" in check_row({**ok, "spill_stores": None})[0]
    assert "wgmma" in check_row({**ok, "wgmma": False})[0]
    assert check_row({**ok, "masked_operand": "a", "wgmma_a_in_registers": True}) == []
    assert "registers" in check_row({**ok, "masked_operand": "a", "wgmma_a_in_registers": False})[0]
    assert check_row({**ok, "wgmma": False, "wgmma_expected": False}) == []
    # ACCEPTED_SPILLS bounds: at most the recorded bytes
    assert check_row({**ok, "spill_stores": 8, "spill_loads": 4, "accepted": [8, 4]}) == []
    assert "ACCEPTED_SPILLS" in check_row({**ok, "spill_stores": 12, "spill_loads": 4, "accepted": [8, 4]})[0]
    # a SPILLS entry is not held to the limits of runnable configs
    assert check_row({**ok, "role": "spills", "spill_stores": 8, "shared": 10 ** 6, "wgmma": False}) == []


def test_stale_spills_entries_are_flagged():
    """A SPILLS entry fails when none of its dtypes spills; one spilling dtype of two is enough."""
    from abp.kernels.compile_gate import mark_stale_spills

    def row(dtype, st, tile=(128, 64, 32, 4, 4)):
        return {"kernel": "score_grad", "target": "sm80", "dtype": dtype, "tile": list(tile), "role": "spills",
                "compiled": True, "spill_stores": st, "spill_loads": st, "violations": []}

    rows = [row("bf16", 24), row("fp16", 0), row("bf16", 0, (64, 32, 32, 5, 2)), row("fp16", 0, (64, 32, 32, 5, 2))]
    mark_stale_spills(rows)
    assert [bool(r["violations"]) for r in rows] == [False, False, True, True]
    assert "SPILLS" in rows[2]["violations"][0]


def test_configs_tables_are_consistent(monkeypatch):
    """Every kernel has candidates everywhere, none of them listed in SPILLS; its autotuner's configs
    (as on a GPU, not the interpreter's one tile) are exactly its candidates and the fixed tile."""
    import abp.kernels.configs as C

    assert set(C.SPILLS) == set(C.KERNEL_NAMES)
    for kernel in C.KERNEL_NAMES:
        for arch in C.ARCHS:
            for dclass in C.DTYPE_CLASSES:
                cands = C.candidates(kernel, arch, dclass)
                assert cands, (kernel, arch, dclass)
                assert not set(cands) & C.SPILLS[kernel].get((arch, dclass), set()), (kernel, arch, dclass)
        with monkeypatch.context() as m:
            m.setattr(C, "INTERPRET", False)
            configs = C.matmul_configs(kernel, "R", "C", "K", "G")
        tiles = {(c.kwargs["R"], c.kwargs["C"], c.kwargs["K"], c.num_stages, c.num_warps) for c in configs}
        union = {t for a in C.ARCHS for d in C.DTYPE_CLASSES for t in C.candidates(kernel, a, d)}
        assert tiles == union | {C._FIXED_TILE}, kernel


def test_require_compiled_mode_refuses_interpreted_kernels():
    """Under this session's TRITON_INTERPRET=1 (no GPU) the gate must refuse, not compile interpreter objects."""
    import abp.kernels.configs as C
    from abp.kernels.compile_gate import require_compiled_mode

    if not C.INTERPRET:
        pytest.skip("kernels were imported in compiled mode in this process")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        require_compiled_mode()
