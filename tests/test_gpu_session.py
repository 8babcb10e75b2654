"""``bench/gpu_session.sh rehearse``: the one prepared GPU command runs every stage's plumbing on CPU.

A lent GPU gives one try of about 9 minutes, so the script must not fail for a typo, a wrong path or a
result file that does not come back. The rehearsal runs the same stages (build, headline bench, tests,
the rest of the bench, the report) on the quick grid with no build, and this test checks what the real run
would hand back: each stage ran and said so, every bench stage wrote its own JSON with rows, the report
rendered, and no more files than the device tool returns (8) are left under ``$OUT``.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build: skipped", "bench headline", "tests (limit", "bench more", "bench step", "report", "done;")


def test_rehearsal_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, ABP_BENCH_THREADS="1", ABP_BENCH_COMMIT="test")
    env.pop("ABP_BENCH_QUICK", None)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "rehearse"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in STAGES:
        assert f"== gpu_session +" in log and stage in log, f"stage {stage!r} missing from session.log:\n{log[-3000:]}"
    for stage in ("headline", "more", "step"):
        assert f"bench {stage}: exit 0" in log, log[-3000:]
    assert "tests: exit 0" in log, (out / "tests.log").read_text()[-3000:]
    results = sorted(out.glob("results/*/*.json"))
    assert len(results) == 3, results  # one file per bench stage, two folders down (the tool returns those)
    for path in results:
        data = json.loads(path.read_text())
        assert data["commit"] == "test" and data["rows"], path
        assert all(r["median_ms"] is not None or r.get("error") for r in data["rows"]), path
    assert "| shape |" in (out / "report.md").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files
