"""The benchmark suite at its tiny CI grid: every bench runs, and its JSON and report are well formed.

No timing is asserted (CI machines are noisy); what is checked is that each bench produces one row per
impl and shape with sane fields, that the ×dense/×eager ratios refer to the right baselines, and that
``bench/report.py`` renders the table and the plots from the file.
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
HEADER = ("device", "device_slug", "torch", "triton", "cuda", "commit", "date", "grid", "timer", "mem_method", "rows")
ROW = ("bench", "impl", "dtype", "shape", "median_ms", "tflops", "peak_mem_mb", "backend", "x_dense", "x_eager")


def _module(name):
    spec = importlib.util.spec_from_file_location(f"_quick_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_suite(out: Path, *extra, files=("bench/",)):
    env = dict(os.environ, ABP_BENCH_THREADS="1")
    env.pop("ABP_BENCH_QUICK", None)
    cmd = [sys.executable, "-m", "pytest", *files, "--import-mode=importlib", "-p", "no:cacheprovider", "-q",
           "--abp-quick", f"--abp-results-dir={out}", *extra]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    files = sorted(out.rglob("*.json"))
    assert len(files) == 1, f"expected one result file, got {files}\n{proc.stdout[-2000:]}"
    return json.loads(files[0].read_text()), files[0], proc.stdout


def _expected_cases():
    cases = []
    for name in ("bench_linear", "bench_step", "bench_bitmask", "bench_multitask"):
        cases += _module(name).cases("quick")
    return {(c["bench"], c["impl"], c["dtype"], c["shape"]) for c in cases}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-results")
    return _run_suite(out)


def test_one_row_per_case_and_wellformed_header(quick_run):
    data, path, stdout = quick_run
    for k in HEADER:
        assert k in data, f"result file lacks {k!r}"
    assert data["grid"] == "quick" and data["device_slug"].endswith("-quick")
    assert path.parent.name == data["device_slug"]
    assert "rows written to" in stdout
    got = [(r["bench"], r["impl"], r["dtype"], r["shape"]) for r in data["rows"]]
    assert len(got) == len(set(got)), "duplicate rows"
    assert set(got) == _expected_cases()
    assert {r["bench"] for r in data["rows"]} == {"linear_fwd", "linear_fwd_bwd", "abp_step", "bitmask_linear",
                                                  "multi_bitmask_linear", "multitask_serve"}


def test_rows_fields(quick_run):
    data = quick_run[0]
    for r in data["rows"]:
        for k in ROW:
            assert k in r, f"row lacks {k!r}: {r}"
        if r["median_ms"] is None:  # only torch.compile may be skipped, and then it says why
            assert r["impl"] == "compile" and r.get("error"), r
            continue
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0, r
        assert r["q1_ms"] <= r["median_ms"] <= r["q3_ms"], r
        assert r["rounds"] >= 3 and r["timer"] in ("perf_counter", "cuda_events")
        assert isinstance(r["backend"], str) and r["backend"] and "?" not in r["backend"], r
        assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0, r
        if r["bench"] == "multitask_serve":  # whole-model serving: requests per second, no FLOP count
            assert r["tflops"] is None and r["stored_mb"] > 0, r
            assert r["requests_per_s"] == pytest.approx(r["requests"] / (r["median_ms"] * 1e-3), rel=1e-9)
        elif r["bench"] != "abp_step":
            s = dict(p.split("=") for p in r["shape"].split(","))
            flops = 2 * int(s["tokens"]) * int(s["in"]) * int(s["out"]) * (3 if r["bench"] == "linear_fwd_bwd" else 1)
            assert r["tflops"] == pytest.approx(flops / (r["median_ms"] * 1e-3) / 1e12, rel=1e-9)
        else:
            assert r["state_mb"] > 0 and r["total_mb"] == pytest.approx(r["state_mb"] + r["peak_mem_mb"])


def test_ratios_refer_to_baselines(quick_run):
    rows = quick_run[0]["rows"]
    base = {"abp_step": "finetune", "multi_bitmask_linear": "dense_per_task", "multitask_serve": "dense_per_task"}
    times = {(r["bench"], r["dtype"], r["shape"], r["impl"]): r["median_ms"] for r in rows}
    for r in rows:
        if r["median_ms"] is None:
            continue
        dense = times[(r["bench"], r["dtype"], r["shape"], base.get(r["bench"], "dense"))]
        assert r["x_dense"] == pytest.approx(r["median_ms"] / dense)
        eager = times.get((r["bench"], r["dtype"], r["shape"], "eager"))
        assert (r["x_eager"] is None) == (eager is None)
        if r["impl"] == "eager":
            assert r["x_eager"] == pytest.approx(1.0)


def test_abp_rows_name_the_backend_that_ran(quick_run):
    import torch

    for r in quick_run[0]["rows"]:
        if r["impl"] in ("reference",) and r["median_ms"] is not None:
            assert r["backend"] == "reference"
        if r["impl"] == "abp" and not torch.cuda.is_available():
            # auto on CPU: the compiled C++ op where abp._C has it, else the reference (comma-joined per op)
            assert set(r["backend"].split(",")) <= {"reference", "cpp"}, r


def test_report_renders_table_and_plots(quick_run, tmp_path):
    _, path, _ = quick_run
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(path), "--include-quick",
                           "--plots-dir", str(plots)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    for bench in ("linear_fwd", "linear_fwd_bwd", "abp_step", "bitmask_linear", "multi_bitmask_linear", "multitask_serve"):
        assert f"#### {bench}\n" in proc.stdout
    assert "| shape | dtype | impl |" in proc.stdout
    pngs = sorted(plots.glob("*.png"))
    assert any("abp_step" in p.name for p in pngs) and any("linear_fwd_bwd" in p.name for p in pngs), pngs
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    # without --include-quick a quick run is not rendered, and that is said
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(path), "--markdown"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1 and "--include-quick" in proc.stderr


def test_report_rejects_foreign_json(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": [{"bench": "linear_fwd"}]}))
    proc = subprocess.run([sys.executable, str(BENCH / "report.py"), str(bad), "--markdown"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode != 0 and "lacks" in proc.stderr


def test_suite_runs_without_pytest_benchmark(tmp_path):
    """With the plugin disabled the harness times on its own and still writes its rows."""
    data, _, _ = _run_suite(tmp_path, "-p", "no:benchmark", files=("bench/bench_bitmask.py",))
    assert data["rows"] and all(r["median_ms"] > 0 for r in data["rows"])
