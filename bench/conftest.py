"""abp's benchmark harness: grids, timing, peak memory, and one JSON file of rows per run.

Run from the repository root (see bench/README.md)::

    python -m pytest bench/ --import-mode=importlib -p no:cacheprovider

What every bench gets from here (fixtures):

- ``case``: one point of the bench module's grid. Each ``bench_*.py`` defines ``cases(grid)``; the grid is
  ``gpu`` when CUDA is available, else ``cpu``, or ``quick`` (tiny, for CI) with ``--abp-quick`` or
  ``ABP_BENCH_QUICK=1``.
- ``harness``: :class:`Harness`, which times a zero-argument callable (warm-up excluded, median of many),
  measures its peak memory in a separate untimed call, and records one row.
- ``eager_masked_linear_fn``: the "what other tools do" masked linear (materialise ``W⊙M``, dense ``dW``).

Timing. GPU: CUDA events around each call, no host sync between calls (as ``triton.testing.do_bench``),
median of the per-call times; pytest-benchmark also times the same callable with a
``torch.cuda.synchronize()`` after each call (its table, and ``host_median_ms`` in the row). CPU: the
pytest-benchmark rounds themselves (``time.perf_counter``, one call per round). Inputs are rotated among
a few pre-allocated copies (:meth:`Harness.copies`), so a call never finds its operands hot in cache
because the previous call just read them.

Peak memory (``peak_mem_mb``): the most memory allocated during one call beyond what was allocated just
before it (outputs, saved activations, gradients, temporaries). GPU: ``torch.cuda.max_memory_allocated``
minus ``memory_allocated`` before the call. CPU: the running sum of torch's CPU allocations and frees
recorded by ``torch.profiler`` (``profile_memory=True``) during the call, its maximum. (Neither
``tracemalloc`` nor RSS works for this: torch's CPU allocator bypasses the former, and glibc keeps freed
pages resident, so RSS deltas depend on what ran before.)

Each session writes ``<results>/<device-slug>/<YYYYmmdd-HHMMSS>-<commit>.json`` at its end
(``--abp-results-dir`` or ``ABP_BENCH_RESULTS``, default ``bench/results``; quick runs go to
``<device-slug>-quick``).
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F

from abp import reference
from abp.provenance import git_state

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

try:
    import pytest_benchmark  # noqa: F401  (only whether it is installed matters)

    HAVE_PYTEST_BENCHMARK = True
except ImportError:  # the suite still runs and writes its JSON; only pytest-benchmark's table is lost
    HAVE_PYTEST_BENCHMARK = False

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Timing budgets per grid: warm-up (seconds, at least `min_warm` calls), then enough calls to fill
# `rep_s`, clamped to [min_rounds, max_rounds]. The quick grid only checks that the benches run.
BUDGETS = {
    "quick": dict(warm_s=0.0, min_warm=1, rep_s=0.0, min_rounds=3, max_rounds=3),
    "cpu": dict(warm_s=0.1, min_warm=2, rep_s=1.0, min_rounds=7, max_rounds=100),
    "gpu": dict(warm_s=0.025, min_warm=3, rep_s=0.1, min_rounds=10, max_rounds=1000),
}
HOST_ROUNDS_GPU = 10  # pytest-benchmark's synchronised host-clock pass on GPU (its table only)


# --------------------------------------------------------------------------- pytest wiring

def pytest_addoption(parser):
    g = parser.getgroup("abp-bench")
    g.addoption("--abp-quick", action="store_true", default=False,
                help="tiny grid (CI): checks every bench runs and writes well-formed rows; also ABP_BENCH_QUICK=1")
    g.addoption("--abp-results-dir", default=None,
                help="where the run's JSON goes (default bench/results, or ABP_BENCH_RESULTS)")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` (pytest's default only collects ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        # (a file named on the command line is collected by pytest itself)
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def grid_name(config) -> str:
    """``quick`` | ``gpu`` | ``cpu``: the grid this run measures."""
    if config.getoption("--abp-quick", default=False) or os.environ.get("ABP_BENCH_QUICK") == "1":
        return "quick"
    return "gpu" if torch.cuda.is_available() else "cpu"


def pytest_configure(config):
    threads = os.environ.get("ABP_BENCH_THREADS")
    if threads:  # e.g. 1 on a small shared CPU box, where 2 OpenMP threads stall on each other
        torch.set_num_threads(int(threads))
    config._abp_harness = Harness(grid_name(config), config)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.module.cases(grid_name(metafunc.config))
        metafunc.parametrize("case", cases, ids=[c["id"] for c in cases])


@pytest.fixture
def harness(request) -> "Harness":
    return request.config._abp_harness


@pytest.fixture
def bench_fixture(request):
    """pytest-benchmark's ``benchmark`` fixture, or None where the plugin is missing or disabled
    (``-p no:benchmark``): the harness then times on its own and only pytest-benchmark's table is lost."""
    if not HAVE_PYTEST_BENCHMARK or not request.config.pluginmanager.hasplugin("benchmark"):
        return None
    return request.getfixturevalue("benchmark")


def pytest_sessionfinish(session, exitstatus):
    h = getattr(session.config, "_abp_harness", None)
    if h is not None and h.rows:
        h.path = h.write()


def pytest_terminal_summary(terminalreporter):
    h = getattr(terminalreporter.config, "_abp_harness", None)
    if h is not None and getattr(h, "path", None):
        terminalreporter.write_line(f"abp bench: {len(h.rows)} rows written to {h.path}")


# --------------------------------------------------------------------------- the eager baseline

class EagerMaskedLinear(torch.autograd.Function):
    """The masked linear as other pruning tools write it: ``W⊙M`` materialised (and saved), ``F.linear``,
    and a backward that builds the dense ``dW = dYᵀX`` before applying the paper's surrogate to it."""

    @staticmethod
    def forward(ctx, x, weight, scores, bias, t_s):
        w_eff = weight * reference.mask_from_scores(scores).to(weight.dtype)
        ctx.save_for_backward(x, weight, scores, w_eff)
        ctx.t_s = t_s
        return F.linear(x, w_eff, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scores, w_eff = ctx.saved_tensors
        dx = dy @ w_eff if ctx.needs_input_grad[0] else None
        ds = None
        if ctx.needs_input_grad[2]:
            dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # the dense dW abp never builds
            ds = dw.float() * weight.float() * reference.surrogate_factor(scores, ctx.t_s)
        return dx, None, ds, None, None


def eager_masked_linear(x, weight, scores, bias=None, t_s: float = 1.0):
    """:class:`EagerMaskedLinear` with autocast handled as :func:`abp.masked_linear` does (cast, then run)."""
    if torch.is_autocast_enabled(x.device.type):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return EagerMaskedLinear.apply(x, weight, scores, bias, t_s)


@pytest.fixture
def eager_masked_linear_fn():
    return eager_masked_linear


# --------------------------------------------------------------------------- helpers

class Rotation:
    """Cycles through pre-allocated input sets: each call gets the next one."""

    def __init__(self, sets: list):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets, self.i = sets, -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]

    def __len__(self):
        return len(self.sets)


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))


def _cpu_cache_bytes() -> int:
    """Largest CPU cache (L3 usually), from sysfs; 32 MiB when unknown."""
    best = 0
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            txt = f.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1], 1)
            best = max(best, int(txt.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


def slugify(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- the harness

class Harness:
    """Times callables, measures their peak memory, and collects the run's rows."""

    def __init__(self, grid: str, config):
        self.grid = grid
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.budget = BUDGETS["quick" if grid == "quick" else ("gpu" if self.cuda else "cpu")]
        self.rows: list[dict] = []
        self.path: Optional[Path] = None
        opt = config.getoption("--abp-results-dir", default=None)
        self.results_dir = Path(opt or os.environ.get("ABP_BENCH_RESULTS") or BENCH_DIR / "results")
        self.started = datetime.datetime.now()
        self.loadavg_start = _loadavg()

    # ---------------------------------------------------------------- inputs

    def copies(self, bytes_per_set: int, lo: int = 2, hi: int = 16) -> int:
        """How many input sets to rotate: enough that together they are ≥ 2× the last-level cache
        (L2 on GPU), between ``lo`` and ``hi``."""
        if self.cuda:
            cache = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 64 << 20
        else:
            cache = _cpu_cache_bytes()
        return int(min(hi, max(lo, math.ceil(2 * cache / max(bytes_per_set, 1)))))

    @staticmethod
    def rotation(sets: list) -> Rotation:
        return Rotation(sets)

    @staticmethod
    def dtype(name: str) -> torch.dtype:
        if name not in DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}")
        return DTYPES[name]

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---------------------------------------------------------------- timing

    def _warm(self, fn: Callable[[], object]) -> float:
        """First call (compilation, autotuning, lazy init) then timed warm-up calls; seconds per call."""
        fn()
        self.sync()
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            self.sync()
            dt = time.perf_counter() - t0
            if n >= self.budget["min_warm"] and dt >= self.budget["warm_s"]:
                return dt / n

    def _rounds(self, per_call_s: float) -> int:
        b = self.budget
        want = math.ceil(b["rep_s"] / max(per_call_s, 1e-9))
        return int(min(b["max_rounds"], max(b["min_rounds"], want)))

    def time(self, benchmark, fn: Callable[[], object]) -> dict:
        """Warm up, then time ``fn``; returns ``median_ms``, ``q1_ms``, ``q3_ms``, ``rounds``, ``timer``."""
        rounds = self._rounds(self._warm(fn))
        if self.cuda:
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(rounds)]
            for s, e in zip(starts, ends):
                s.record()
                fn()
                e.record()
            torch.cuda.synchronize(self.device)
            ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
            out = dict(_summary(ms), rounds=rounds, timer="cuda_events")
            host = self._pytest_benchmark(benchmark, fn, min(rounds, HOST_ROUNDS_GPU), synced=True)
            if host is not None:
                out["host_median_ms"] = host["median_ms"]
            return out
        res = self._pytest_benchmark(benchmark, fn, rounds, synced=False)
        if res is None:  # pytest-benchmark missing or --benchmark-disable: time it here
            ms = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                fn()
                ms.append((time.perf_counter() - t0) * 1e3)
            res = _summary(ms)
        return dict(res, rounds=rounds, timer="perf_counter")

    def _pytest_benchmark(self, benchmark, fn, rounds: int, synced: bool) -> Optional[dict]:
        if benchmark is None:
            return None
        def synced_call():
            fn()
            torch.cuda.synchronize(self.device)

        benchmark.pedantic(synced_call if synced else fn, rounds=rounds, iterations=1, warmup_rounds=0)
        st = getattr(benchmark, "stats", None)
        if st is None or getattr(benchmark, "disabled", False):
            return None
        st = st.stats
        return {"median_ms": st.median * 1e3, "q1_ms": st.q1 * 1e3, "q3_ms": st.q3 * 1e3}

    # ---------------------------------------------------------------- memory

    def peak_mem_mb(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it (MiB)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / 2**20
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak / 2**20

    @property
    def mem_method(self) -> str:
        return "cuda_max_memory_allocated" if self.cuda else "torch_profiler_cpu_allocations"

    # ---------------------------------------------------------------- rows

    def run(self, case: dict, benchmark, fn: Callable[[], object], *, flops: Optional[float] = None,
            backend: Callable[[], object] | str = "torch", extra: Optional[dict] = None,
            may_fail: bool = False) -> dict:
        """Time ``fn``, measure its peak memory, record the row (``backend`` may be a callable read after
        the timed calls: which abp backend ran). With ``may_fail`` an exception becomes a recorded skip."""
        if benchmark is not None:  # before timing: pytest-benchmark reads the group when its stats are made
            benchmark.group = f"{case['bench']} {case['shape']} {case['dtype']}"
        try:
            timing = self.time(benchmark, fn)
            peak = self.peak_mem_mb(fn)
        except Exception as e:  # noqa: BLE001 - reported in the row and as a skip, never hidden
            if not may_fail:
                raise
            self.skip(case, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
        ran = backend() if callable(backend) else backend
        row = self.record(case, median_ms=timing.pop("median_ms"), peak_mem_mb=peak, backend=ran, flops=flops,
                          **timing, **(extra or {}))
        if benchmark is not None:
            benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("bench", "shape", "dtype")})
        return row

    def record(self, case: dict, *, median_ms: Optional[float], flops: Optional[float] = None, **fields) -> dict:
        row = {"bench": case["bench"], "impl": case["impl"], "dtype": case["dtype"], "shape": case["shape"],
               "median_ms": median_ms,
               "tflops": (flops / (median_ms * 1e-3) / 1e12) if (flops and median_ms) else None,
               "peak_mem_mb": None, "backend": None}
        row.update(fields)
        self.rows.append(row)
        return row

    def skip(self, case: dict, reason: str):
        """Record that ``case`` could not run (``median_ms`` null, ``error`` = reason) and skip the test."""
        self.record(case, median_ms=None, error=reason)
        pytest.skip(reason)

    # ---------------------------------------------------------------- the JSON file

    def header(self) -> dict:
        try:
            import triton

            triton_version = triton.__version__
        except Exception:  # noqa: BLE001 - optional
            triton_version = None
        if self.cuda:
            device = torch.cuda.get_device_name(self.device)
            slug = slugify(device)
        else:
            device = f"{_cpu_name()} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"
            slug = "cpu"
        state = git_state(REPO)
        commit = os.environ.get("ABP_BENCH_COMMIT") or state["commit"] or "unknown"
        return {
            "device": device, "device_slug": slug + ("-quick" if self.grid == "quick" else ""),
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "commit": commit, "dirty": state["dirty"],
            "date": self.started.isoformat(timespec="seconds"), "grid": self.grid,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "timer": "cuda_events" if self.cuda else "perf_counter", "mem_method": self.mem_method,
            # 1-minute load average at start and end: CPU timings are only as good as the machine was quiet
            "loadavg_1min": [self.loadavg_start, _loadavg()],
        }

    def write(self) -> Path:
        _report_module().add_ratios(self.rows)
        head = self.header()
        out_dir = self.results_dir / head["device_slug"]
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{self.started:%Y%m%d-%H%M%S}-{head['commit']}"
        path, n = out_dir / f"{stem}.json", 1
        while path.exists():
            n += 1
            path = out_dir / f"{stem}-{n}.json"
        path.write_text(json.dumps(dict(head, rows=self.rows), indent=1, default=_jsonable) + "\n")
        return path


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _report_module():
    """bench/report.py (a script, not a package module): the one definition of the ×dense/×eager ratios."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_abp_bench_report", BENCH_DIR / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _summary(ms: list[float]) -> dict:
    if len(ms) >= 2:
        q1, med, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = med = q3 = ms[0]
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3}


def _jsonable(v):
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if isinstance(v, Path):
        return str(v)
    raise TypeError(f"not JSON-serialisable: {type(v).__name__}")
