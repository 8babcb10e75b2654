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
STAGES = ("build: skipped", "bench headline", "host profile (limit", "tests (limit", "bench more", "bench step", "report",
          "done;")


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
    assert "host profile: exit 0" in log, log[-3000:]
    profile = (out / "host_profile.md").read_text()
    for impl in ("eager", "abp_v1", "abp_v2", "abp_v2_a"):
        assert f"| {impl} |" in profile and f"## {impl}: top" in profile, profile[:3000]
    assert "failed:" not in profile, profile[:3000]
    results = sorted(out.glob("results/*/*.json"))
    assert len(results) == 3, results  # one file per bench stage, two folders down (the tool returns those)
    for path in results:
        data = json.loads(path.read_text())
        assert data["commit"] == "test" and data["rows"], path
        assert all(r["median_ms"] is not None or r.get("error") for r in data["rows"]), path
    assert "| shape |" in (out / "report.md").read_text()
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8, files


def _gpu_selection(name: str) -> str:
    """The -k expression the GPU run (not the rehearsal) gives bench stage ``name`` (HEADLINE, MORE, STEP)."""
    text = (REPO / "bench" / "gpu_session.sh").read_text()
    gpu_branch = text.split("\nelse\n", 1)[1].split("\nfi\n", 1)[0]
    line = next(ln.strip() for ln in gpu_branch.splitlines() if ln.strip().startswith(f"{name}="))
    return line.split("=", 1)[1].strip('"')


def _gpu_ids() -> list[str]:
    """Every case id of the GPU grids of the bench modules, as pytest names the items."""
    import importlib.util

    ids = []
    for path in sorted((REPO / "bench").glob("bench_*.py")):
        spec = importlib.util.spec_from_file_location(f"_gpu_ids_{path.stem}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        test = next(n for n in vars(mod) if n.startswith("test_"))
        ids += [f"{path.name}::{test}[{c['id']}]" for c in mod.cases("gpu")]
    return ids


def _selected(expr: str, ids: list[str]) -> set[str]:
    """What ``pytest -k expr`` keeps of ``ids``: each identifier a case-insensitive substring of the item's names."""
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expr)
    out = set()
    for item in ids:
        names = [n.lower() for n in item.replace("::", " ").split()]

        def match(word, **kwargs):
            return any(word.lower() in n for n in names)

        if compiled.evaluate(match):
            out.add(item.split("[", 1)[1][:-1])
    return out


def test_gpu_selections_measure_the_goals_first():
    """The GPU run's stages select what the script says: the headline holds both kernel versions against dense,
    eager and compile at BERT-base shapes, 1k and 4k tokens, bf16, without the operand-A variant, which the next
    stage measures at the same shapes beside the serving rows of both kernel forms."""
    ids = _gpu_ids()
    head, more = _selected(_gpu_selection("HEADLINE"), ids), _selected(_gpu_selection("MORE"), ids)
    for m in (1024, 4096):
        for kn in ("768x768", "768x3072", "3072x768"):
            for impl in ("dense", "eager", "abp", "abp_v2", "abp_fused_update", "abp_v2_fused_update"):
                assert f"linear_fwd_bwd-bf16-t{m}-{kn}-{impl}" in head, (m, kn, impl)
            assert f"linear_fwd_bwd-bf16-t{m}-{kn}-abp_v2_a" in more, (m, kn)
    assert "linear_fwd_bwd-bf16-t4096-768x3072-compile" in head
    assert not any(i.endswith("abp_v2_a") or "reference" in i for i in head)
    for m in (1, 16, 256):
        for impl in ("abp_gemm", "abp_gemm_a", "abp_gemv", "dense"):
            assert f"bitmask_linear-bf16-t{m}-4096x11008-{impl}" in more, (m, impl)
    assert {"linear_fwd_bwd-bf16-t16384-4096x11008-abp_v2", "linear_fwd_bwd-bf16-t16384-4096x11008-abp_v2_a"} <= more
    for impl in ("abp", "abp_gemm", "abp_gemm_a", "dense_per_task"):
        assert f"multi_bitmask_linear-bf16-tasks32-4096x11008-{impl}" in more, impl
    assert any("abp_step" in i and "b8-s128" in i for i in head)
