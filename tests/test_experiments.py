"""The reproduction's methods, runner and analysis on a tiny random BERT and tiny GLUE-layout data (CPU, fast).

Every method runs end to end and ends at its sparsity with the pre-trained weights as they were (where it
must); the runner skips finished runs, refuses a mixed budget, resumes a killed run to the same result and
writes well-formed JSON; mask surgery and the analysis are checked against hand-built masks and formulas.
"""
import json
import math
from pathlib import Path

import pytest
import torch

import abp
from abp.experiments import analysis as A
from abp.experiments import masks as MK
from abp.experiments import runner as R
from abp.experiments.record import collect_results
from abp.experiments.finetune import FineTuner, maskable_weights, trainer_mask_config
from abp.experiments.methods import (DENSE_METHODS, KEEPS_WEIGHTS, LEARNT_METHODS, METHODS, ExperimentConfig,
                                     cubic_sparsity, imp_schedule, model_label, weights_digest)
from abp.experiments.recovery import RecoveryTracker
from abp.experiments.report import write_report
from abp.train.score_optim import ScoreOptimizer
from abp.train.config import ABPConfig

pytestmark = pytest.mark.usefixtures("one_thread")

S = 0.5
SEED = 0


def _exp(model_dir, glue, **kw):
    base = dict(model=model_dir, glue_dir=glue, max_steps=12, batch_size=8, max_length=16, head_lr=3e-3,
                imp_round_steps=3, wanda_batches=2, device="cpu")
    base.update(kw)
    return ExperimentConfig(**base)


@pytest.fixture(scope="module")
def grid(tiny_model_dir, tiny_glue, tmp_path_factory):
    """Every method once on SST-2 (s = 0.5, seed 0), and a regression subset on STS-B."""
    out = tmp_path_factory.mktemp("paper")
    exp = _exp(tiny_model_dir, tiny_glue)
    summary = R.run_grid(exp, ["sst2"], list(METHODS), [S], [SEED], out, progress=False)
    summary_b = R.run_grid(exp, ["stsb"], ["abp", "mp", "wanda", "finetune"], [S], [SEED], out, progress=False)
    results = {r["method"]: r for r in collect_results(out)[("sst2", model_label(tiny_model_dir))]}
    return {"out": out, "exp": exp, "summary": summary, "summary_b": summary_b, "results": results}


def _tiny_masked_backbone(model_dir, glue=None):
    """Masked exactly as the Trainer masks it (pooler excluded)."""
    backbone, _ = abp.models.load_backbone(model_dir)
    return abp.mask_model(backbone, trainer_mask_config(_exp(model_dir, glue).abp_config("sst2", S, 0)))


# ------------------------------------------------------------------------------------------ methods end to end


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_and_ends_at_its_sparsity(grid, method):
    r = grid["results"][method]
    assert r["metric_name"] == "accuracy" and 0.0 <= r["metrics"]["accuracy"] <= 1.0
    if method in DENSE_METHODS:
        assert r["sparsity"] is None
        assert r["sparsity_reached"] in (None, 0.0)
        return
    assert r["sparsity"] == S
    masks = A.load_keep_masks(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", method, S, SEED))))
    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert r["sparsity_reached"] == pytest.approx(pruned / total, abs=1e-6)
    if method == "abp_paper":  # N(0.01, var 0.001) starts 38 % pruned; γ = 2e-7 moves scores 2.4e-6 in 12 steps
        assert 0.3 < r["sparsity_reached"] < S
    elif method in LEARNT_METHODS:  # the stop rule: at or just past the target, within one step's pruning
        assert S <= r["sparsity_reached"] < S + 0.1
        if method == "abp_refit":  # then its head trained on (max_steps more steps) on the abp run's very mask
            assert r["head_refit"]["steps"] == grid["exp"].max_steps
            assert r["metrics"]["accuracy"] == r["head_refit"]["dev_metric"]
            src = A.load_keep_masks(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", "abp", S, SEED))))
            assert all(torch.equal(m, src[k]) for k, m in masks.items())
    elif method == "abp_mask":  # the grid's ABP mask itself, its head retrained
        src = A.load_keep_masks(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", "abp", S, SEED))))
        assert masks.keys() == src.keys() and all(torch.equal(m, src[k]) for k, m in masks.items())
        assert r["phase1"]["source_mask"] == "../abp-s0.5-seed0/mask.safetensors"  # reused, not learnt again
        heads = [abp.read_mask_file(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", m, S, SEED)))).head
                 for m in ("abp", "abp_mask")]
        assert heads[0].keys() == heads[1].keys() and any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])
    elif method == "abp_shuffled":  # exactly the ABP mask's count in every tensor
        src = A.load_keep_masks(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", "abp", S, SEED))))
        for k, m in masks.items():
            assert int(m.sum()) == int(src[k].sum()), k
        assert any(not torch.equal(m, src[k]) for k, m in masks.items())
    else:  # exact methods: every tensor holds round(s·n) pruned entries (±1/n in sparsity)
        for k, m in masks.items():
            assert abs(int((~m).sum()) - S * m.numel()) <= 0.5, k


@pytest.mark.parametrize("method", METHODS)
def test_pretrained_weights_kept_where_they_must_be(grid, tiny_model_dir, method):
    r = grid["results"][method]
    assert r["weights_untouched"] == (method in KEEPS_WEIGHTS)
    assert r["code"]["abp"] == abp.__version__ and r["code"]["torch"] == torch.__version__  # which code measured it
    path = A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", method, None if method in DENSE_METHODS else S, SEED)))
    if path is None:
        assert method == "finetune"
        return
    fresh, _ = abp.models.load_backbone(tiny_model_dir)
    if method == "abp_reinit":  # the mask was learnt on perturbed weights: the fingerprint refuses the originals
        with pytest.raises(abp.MaskFileError, match="other base weights"):
            abp.load_mask(fresh, path)
    else:
        abp.load_mask(fresh, path)


def test_abp_mask_without_a_grid_run_learns_the_abp_methods_mask(tiny_model_dir, tiny_glue, tmp_path, grid):
    """``abp_mask`` called on its own (no ``abp`` run to reuse) learns its source with the ``abp`` method's settings,
    not the fixed-mask rows' uniform score init, so it gets the grid's own ABP mask (same seed, same budget)."""
    from abp.experiments.methods import run_method

    r = run_method("abp_mask", grid["exp"], "sst2", S, SEED, tmp_path)
    assert r["phase1"]["source_mask"] == "abp_source/mask.safetensors"
    cfg = json.loads((tmp_path / "abp_source" / "metrics.json").read_text())["config"]
    assert cfg["score_init_mode"] == ABPConfig().score_init_mode == "magnitude"
    mine = A.load_keep_masks(tmp_path / "abp_source" / "mask.safetensors")
    theirs = A.load_keep_masks(A.find_mask_file(R.run_dir(grid["out"], grid["exp"], R.RunSpec("sst2", "abp", S, SEED))))
    assert all(torch.equal(m, theirs[k]) for k, m in mine.items())


def test_weights_digest_sees_one_ulp(tiny_model_dir):
    backbone, _ = abp.models.load_backbone(tiny_model_dir)
    before = weights_digest(backbone)
    with torch.no_grad():
        w = backbone.encoder.layer[1].output.dense.weight
        w[3, 5] = torch.nextafter(w[3, 5], torch.tensor(math.inf))
    assert weights_digest(backbone) != before


def test_regression_task_runs(grid):
    rs = {r["method"]: r for r in collect_results(grid["out"])[("stsb", model_label(grid["exp"].model))]}
    assert set(rs) == {"abp", "mp", "wanda", "finetune"}
    for r in rs.values():
        assert r["metric_name"] == "pearson" and set(r["metrics"]) == {"pearson", "spearman"}
        assert all(math.isfinite(v) for v in r["metrics"].values())


def test_recovery_stats(grid):
    off = grid["results"]["abp_norecovery"]["recovery"]
    on = grid["results"]["abp"]["recovery"]
    assert off["complete"] and on["complete"] and off["samples"] > 1
    assert off["recovered"] == 0 and off["share_recovered"] == 0.0
    assert off["ever_pruned_share"] >= S  # everything pruned stayed pruned, and the mask is at the target
    assert 0.0 <= on["share_recovered"] <= 1.0
    for r in (on, off):
        assert 0.0 <= r["init_order"]["jaccard_pruned"] <= 1.0 and 0.0 < r["init_order"]["jaccard_chance"] < 1.0


def test_recovery_tracker_counts_by_hand():
    lin = abp.mask_model(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    s = lin[0].scores
    tr = RecoveryTracker(lin, every=2)
    with torch.no_grad():
        s.copy_(torch.tensor([[1.0, -1.0, 1.0], [1.0, 1.0, -1.0]]))
        tr.observe(1)  # not a sampling step (every=2): missed on purpose
        s.copy_(torch.tensor([[-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]))
        tr.observe(2)
        s.copy_(torch.tensor([[1.0, 1.0, -1.0], [1.0, -1.0, 1.0]]))
        tr.observe(4)
    final = A.load_keep_masks(lin)
    st = tr.stats(final)
    # ever pruned (sampled): (0,0) at step 2, (0,2) and (1,1) at step 4; finally kept: 4 weights, of which (0,0) was pruned
    assert st["kept"] == 4 and st["recovered"] == 1 and st["share_recovered"] == 0.25
    assert st["ever_pruned_share"] == pytest.approx(3 / 6) and st["samples"] == 3


def test_init_order_overlap_by_hand():
    from abp.experiments.recovery import init_order_overlap

    init = {"a": torch.tensor([[0.5, 0.1, 0.9], [0.3, 0.7, 0.2]]), "b": torch.tensor([0.4, 0.6])}
    # a: 2 pruned, the two lowest θ0 are 0.1 and 0.2 → (0,1), (1,2); the mask prunes (0,1) and (0,0)
    final = {"a": torch.tensor([[False, False, True], [True, True, True]]), "b": torch.tensor([False, False])}
    o = init_order_overlap(final, init)
    # pruned: a{(0,0),(0,1)}, b{0,1}; by θ0: a{(0,1),(1,2)}, b{0,1} → ∩ 3, ∪ 5
    assert o["jaccard_pruned"] == pytest.approx(3 / 5)
    assert o["jaccard_chance"] == pytest.approx((4 / 6 + 4 / 2) / ((4 - 4 / 6) + (4 - 4 / 2)))


def test_mask_from_init_order_when_the_gradient_is_off(tiny_model_dir, tiny_glue, tmp_path):
    """With α ≈ 0 only γ moves the scores, so ABP prunes in θ0's order: the tracker's Jaccard is 1."""
    from abp.experiments.trainers import TrackedTrainer

    cfg = _exp(tiny_model_dir, tiny_glue).abp_config("sst2", S, SEED, score_lr=1e-12)
    t = TrackedTrainer(cfg, tmp_path, progress=False)
    res = t.run()
    o = t.recovery_stats(res["mask_file"])["init_order"]
    assert o["jaccard_pruned"] == pytest.approx(1.0) and o["jaccard_chance"] < 0.5


# ------------------------------------------------------------------------------------------ the runner


def test_runner_skips_finished_runs_and_writes_json(grid, monkeypatch):
    out, exp = grid["out"], grid["exp"]
    assert len(grid["summary"]["ran"]) == len(METHODS) and not grid["summary"]["skipped"]

    def boom(*a, **k):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(R, "run_method", boom)
    again = R.run_grid(exp, ["sst2"], list(METHODS), [S], [SEED], out, progress=False, plots=False)
    assert not again["ran"] and len(again["skipped"]) == len(METHODS)
    doc = json.loads((out / f"sst2-{model_label(exp.model)}.json").read_text())
    assert doc["task"] == "sst2" and doc["rows"]
    for row in doc["rows"]:
        assert set(row) == {"task", "model", "method", "sparsity", "seed", "metric", "value"}
        assert row["sparsity"] is None if row["method"] in DENSE_METHODS else row["sparsity"] == S
        assert row["metric"] == "accuracy" and 0 <= row["value"] <= 1 and row["seed"] == SEED
    assert sorted(r["method"] for r in doc["rows"]) == sorted(METHODS)
    for f in ("results.md", "analysis.json", f"fig2-sst2-{model_label(exp.model)}.png", f"fig3-sst2-{model_label(exp.model)}.png"):
        assert (out / f).is_file(), f
    md = (out / "results.md").read_text()
    assert "## sst2" in md and "## stsb" in md and "max_steps=12" in md
    # no 91 MB checkpoints left behind once a run is done
    assert not list(out.glob("runs/*/*/checkpoint.safetensors"))


def test_runner_refuses_another_budget(grid):
    with pytest.raises(R.BudgetMismatchError, match="max_steps"):
        R.run_grid(_exp(grid["exp"].model, grid["exp"].glue_dir, max_steps=13), ["sst2"], ["abp"], [S], [SEED],
                   grid["out"], progress=False)


def test_killed_run_resumes_to_the_same_result(tiny_model_dir, tiny_glue, tmp_path, monkeypatch):
    exp = _exp(tiny_model_dir, tiny_glue)
    ref = R.run_grid(exp, ["sst2"], ["abp"], [S], [1], tmp_path / "a", progress=False, report=False)
    calls = {"n": 0}
    real_step = ScoreOptimizer.step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 5:  # after the step-3 checkpoint (checkpoints every 3 of 12 steps)
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(ScoreOptimizer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        R.run_grid(exp, ["sst2"], ["abp"], [S], [1], tmp_path / "b", progress=False, report=False)
    monkeypatch.setattr(ScoreOptimizer, "step", real_step)
    d = R.run_dir(tmp_path / "b", exp, R.RunSpec("sst2", "abp", S, 1))
    assert (d / "checkpoint.safetensors").is_file() and not (d / "result.json").is_file()
    again = R.run_grid(exp, ["sst2"], ["abp"], [S], [1], tmp_path / "b", progress=False, report=False)
    assert again["ran"] == ref["ran"] == ["sst2/abp-s0.5-seed1"]
    a = json.loads((R.run_dir(tmp_path / "a", exp, R.RunSpec("sst2", "abp", S, 1)) / "result.json").read_text())
    b = json.loads((d / "result.json").read_text())
    assert a["metrics"] == b["metrics"] and a["sparsity_reached"] == b["sparsity_reached"]
    assert a["recovery"] == b["recovery"] and b["recovery"]["complete"]
    # without a report, the record (the file to commit) already holds the finished run
    from abp.experiments.record import read_record, record_path

    model = R.model_label(exp.model)
    assert record_path(tmp_path / "b", "sst2", model).is_file()
    assert read_record(tmp_path / "b")[("sst2", model, "abp-s0.5-seed1")]["metrics"] == b["metrics"]


def test_code_version_names_the_commit_only_inside_a_checkout(tmp_path):
    from abp.provenance import git_state

    assert git_state(tmp_path) == {"commit": None, "dirty": None}  # not a repository: unknown, not a guess
    repo = Path(abp.__file__).resolve().parent.parent
    state = git_state(repo)
    if state["commit"] is not None:  # a source checkout (CI clones one): the short hash of HEAD
        assert len(state["commit"]) >= 7 and isinstance(state["dirty"], bool)


def _report_copy(grid, dest):
    """The grid's committed part only (record files, analysis.json): what a fresh checkout has."""
    import shutil

    dest.mkdir()
    for f in grid["out"].glob("*.json"):
        shutil.copy(f, dest / f.name)
    return dest


def test_report_rebuilds_from_the_record_without_run_folders(grid, tmp_path, monkeypatch):
    out, exp = grid["out"], grid["exp"]
    R.run_grid(exp, ["sst2"], list(METHODS), [S], [SEED], out, progress=False, plots=False)  # report as of now
    fresh = _report_copy(grid, tmp_path / "fresh")
    assert not (fresh / "runs").exists()
    files = write_report(fresh, plots=False)
    assert fresh / "results.md" in files
    for name in (f"sst2-{model_label(exp.model)}.json", f"stsb-{model_label(exp.model)}.json", "analysis.json"):
        assert json.loads((fresh / name).read_text()) == json.loads((out / name).read_text()), name
    md_a, md_b = ((d / "results.md").read_text().split("\n", 3)[3] for d in (out, fresh))  # after the dated line
    assert md_a == md_b

    def boom(*a, **k):
        raise AssertionError("a run the record holds was run again")

    monkeypatch.setattr(R, "run_method", boom)
    again = R.run_grid(exp, ["sst2"], list(METHODS), [S], [SEED], fresh, progress=False, report=False)
    assert not again["ran"] and len(again["skipped"]) == len(METHODS)


def test_record_refuses_another_budget_and_names_a_corrupt_file(grid, tmp_path):
    exp = grid["exp"]
    fresh = _report_copy(grid, tmp_path / "fresh")
    rec = fresh / f"sst2-{model_label(exp.model)}.json"
    with pytest.raises(R.BudgetMismatchError, match=rec.name):
        R.run_grid(_exp(exp.model, exp.glue_dir, max_steps=13), ["sst2"], ["abp"], [S], [SEED], fresh, progress=False)
    rec.write_text(rec.read_text()[:-40])
    with pytest.raises(ValueError, match=rec.name):
        write_report(fresh, plots=False)


def test_analysis_keeps_an_overlap_only_for_the_masks_it_was_computed_from(grid, tmp_path):
    """A run folder back on disk with another mask: its breakdown is recomputed, and its overlap with a run
    whose folder is gone (computed from its old mask) is dropped rather than kept stale."""
    import shutil

    exp = grid["exp"]
    fresh = _report_copy(grid, tmp_path / "fresh")
    before = json.loads((fresh / "analysis.json").read_text())[f"sst2-{model_label(exp.model)}"]
    src = {m: R.run_dir(grid["out"], exp, R.RunSpec("sst2", m, S, SEED)) for m in ("abp", "random")}
    back = R.run_dir(fresh, exp, R.RunSpec("sst2", "random", S, SEED))
    back.mkdir(parents=True)
    shutil.copy(src["random"] / "result.json", back / "result.json")
    shutil.copy(src["abp"] / "mask.safetensors", back / "mask.safetensors")  # not the mask it had
    write_report(fresh, plots=False)
    after = json.loads((fresh / "analysis.json").read_text())[f"sst2-{model_label(exp.model)}"]
    assert after["per_run"]["random-s0.5-seed0"]["overall"] == before["per_run"]["abp-s0.5-seed0"]["overall"]
    assert after["per_run"]["random-s0.5-seed0"]["mask"] == before["per_run"]["abp-s0.5-seed0"]["mask"]
    pairs = {(o["a"], o["b"]) for o in after["overlaps"]}
    assert ("abp", "random") not in pairs and ("random", "mp") not in pairs and ("abp", "mp") in pairs
    assert len(after["overlaps"]) == len(before["overlaps"]) - sum(1 for o in before["overlaps"] if "random" in (o["a"], o["b"]))


def test_cli_runs_and_reports(tiny_model_dir, tiny_glue, tmp_path, capsys):
    from abp.cli import main

    argv = ["experiment", "--tasks", "sst2", "--methods", "feature_extraction", "--seeds", "0", "--max-steps", "4",
            "--batch-size", "8", "--max-length", "16", "--model", tiny_model_dir, "--glue-dir", tiny_glue,
            "--device", "cpu", "--quiet", "--output", str(tmp_path)]
    def summary():  # the Trainer prints its eval line to stdout too: the summary is the last JSON object
        out = capsys.readouterr().out
        return json.loads(out[out.index("{\n"):])

    assert main(argv) == 0
    assert summary()["ran"] == 1
    assert main(argv) == 0
    assert summary()["skipped"] == 1
    assert main(["experiment", "--report-only", "--output", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").is_file()
    assert main(["experiment", "--methods", "abp", "--sparsities", "1.5", "--output", str(tmp_path)]) == 2
    assert "sparsities" in capsys.readouterr().err
    # a list option: the IMP milestones go into the run's budget and trajectory
    argv_imp = argv[:argv.index("--methods")] + ["--methods", "imp", "--sparsities", "0.5", "--imp-milestones", "0.3",
                                                "--imp-round-steps", "1"] + argv[argv.index("--seeds"):]
    assert main(argv_imp) == 0
    r = json.loads(next(tmp_path.glob("runs/*/imp-s0.5-seed0/result.json")).read_text())
    assert r["budget"]["imp_milestones"] == [0.3] and r["phase1"]["trajectory"][:2] == pytest.approx([1 - 0.7 ** 0.5, 0.3], abs=1e-6)
    assert main(argv_imp[:-2] + ["--imp-milestones", "1.2", "--output", str(tmp_path)]) == 2
    assert "imp_milestones" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ mask surgery


def _ref_prune(score, k):
    """float64 reference: the k lowest entries (ties by position) pruned."""
    flat = score.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (flat[i].item(), i))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = False
    return keep.view(score.shape)


@pytest.mark.parametrize("shape,sparsity", [((7, 13), 0.5), ((5, 9), 0.9), ((1, 31), 0.33), ((11,), 0.0)])
def test_prune_lowest_matches_reference_with_ties(shape, sparsity):
    g = torch.Generator().manual_seed(1)
    score = torch.randint(0, 6, shape, generator=g).float()  # many ties
    got = MK.prune_lowest(score, sparsity)
    assert torch.equal(got, _ref_prune(score, round(sparsity * score.numel())))


def test_prune_lowest_per_row_and_wanda_match_formula():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 7, generator=g)
    x = torch.rand(7, generator=g) + 0.1
    masks = MK.wanda_masks({"lin.weight": w, "emb.weight": w.clone()}, {"lin.weight": x}, 0.6)
    total = round(0.6 * 35)  # 21 pruned: 4 per row, and one more in the first row
    per_row = [5, 4, 4, 4, 4]
    score = (w.double().abs() * x.double()[None, :])
    for i in range(5):
        assert torch.equal(masks["lin.weight"][i], _ref_prune(score[i], per_row[i])), i
    assert int((~masks["lin.weight"]).sum()) == total
    assert torch.equal(masks["emb.weight"], _ref_prune(w.abs(), total))  # no activations: magnitude


def test_magnitude_masks_keep_pruned_weights_pruned():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 10, generator=g)
    first = MK.magnitude_masks({"a.weight": w}, 0.3)["a.weight"]
    w2 = w.clone()
    w2[~first] = 100.0  # a pruned weight growing large must not come back
    second = MK.magnitude_masks({"a.weight": w2}, 0.6, previous={"a.weight": first})["a.weight"]
    assert not (second & ~first).any() and int((~second).sum()) == 36


def test_shuffle_keeps_per_tensor_sparsity(tiny_model_dir):
    bb = _tiny_masked_backbone(tiny_model_dir)
    g = torch.Generator().manual_seed(4)
    names = [k for k, _ in abp.patch.score_tensors(bb)]
    want = {k: torch.rand(s.shape, generator=g) > (0.1 + 0.8 * i / len(names))
            for i, (k, s) in enumerate(abp.patch.score_tensors(bb))}
    MK.apply_masks_(bb, want)
    MK.shuffle_masks_(bb, seed=5)
    got = A.load_keep_masks(bb)
    for k in names:
        assert int(got[k].sum()) == int(want[k].sum()), k
        p = float(want[k].float().mean())
        if want[k].numel() >= 500:  # a random permutation changes about 2p(1-p) of the entries
            assert float((got[k] != want[k]).float().mean()) > 0.5 * 2 * p * (1 - p), k


def test_apply_masks_refuses_other_tensors(tiny_model_dir):
    bb = _tiny_masked_backbone(tiny_model_dir)
    masks = A.load_keep_masks(bb)
    masks.pop(next(iter(masks)))
    with pytest.raises(ValueError, match="only in model"):
        MK.apply_masks_(bb, masks)


def test_save_load_masks_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(6)
    masks = {"a.weight": torch.rand(3, 11, generator=g) > 0.5, "b.weight": torch.rand(17, generator=g) > 0.2}
    MK.save_masks(tmp_path / "m.safetensors", masks, {"x": 1})
    back, meta = MK.load_masks(tmp_path / "m.safetensors")
    assert meta == {"x": 1} and all(torch.equal(back[k], masks[k]) for k in masks)


def test_schedules():
    assert cubic_sparsity(10, 0.9, 10, 50) == 0.0 and cubic_sparsity(50, 0.9, 10, 50) == 0.9
    assert cubic_sparsity(30, 0.8, 10, 50) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    assert cubic_sparsity(99, 0.8, 10, 50) == 0.8
    for s in (0.5, 0.9, 0.97):  # no milestones: constant rate, fewest rounds
        path = imp_schedule(s, 0.2)
        rate = 1 - (1 - s) ** (1 / len(path))
        assert rate <= 0.2 + 1e-12 and path[-1] == s
        assert path == pytest.approx([1 - (1 - rate) ** r for r in range(1, len(path) + 1)])
        assert (1 - 0.2) ** (len(path) - 1) > 1 - s  # one round fewer would not reach s
    assert len(imp_schedule(0.5, 0.2)) == 4 and len(imp_schedule(0.9, 0.2)) == 11 and len(imp_schedule(0.99, 0.2)) == 21
    grid = (0.2, 0.5, 0.7, 0.9, 0.95, 0.99)
    paths = {s: imp_schedule(s, 0.2, grid) for s in grid + (0.8,)}
    assert [len(paths[s]) for s in grid] == [1, 4, 7, 12, 16, 24]  # 24 rounds serve the whole grid
    for s, path in paths.items():
        assert all(m in path for m in grid if m < s) and path[-1] == s
        stretches = zip([0.0] + path[:-1], path)
        assert all(0 < 1 - (1 - b) / (1 - a) <= 0.2 + 1e-12 for a, b in stretches)  # ≤ 20 % of the remaining each round
    assert paths[0.99][:12] == paths[0.9] and paths[0.8][:7] == paths[0.7] and paths[0.8][7] not in paths[0.9]
    with pytest.raises(ValueError, match="sparsity"):
        imp_schedule(1.0, 0.2)


def test_imp_trajectory_is_shared_between_sparsities(tiny_model_dir, tiny_glue, tmp_path):
    """The 0.7 run reuses the 0.2 → 0.5 rounds of the 0.5 run (same seed) and computes only its own 3;
    the 0.5 run's final mask is the trajectory's round at 0.5."""
    exp = _exp(tiny_model_dir, tiny_glue, imp_milestones=(0.2, 0.5))
    R.run_grid(exp, ["sst2"], ["imp"], [0.5, 0.7], [SEED], tmp_path, progress=False, report=False)
    res = {s: json.loads((R.run_dir(tmp_path, exp, R.RunSpec("sst2", "imp", s, SEED)) / "result.json").read_text())
           for s in (0.5, 0.7)}
    assert res[0.5]["phase1"]["rounds_computed_here"] == 4 and res[0.7]["phase1"]["rounds_computed_here"] == 3
    assert res[0.7]["phase1"]["trajectory"][:4] == res[0.5]["phase1"]["trajectory"]
    rounds = R.imp_rounds_dir(tmp_path, exp, R.RunSpec("sst2", "imp", 0.5, SEED))
    assert len(list(rounds.glob("round*.safetensors"))) == 7
    final = A.load_keep_masks(A.find_mask_file(R.run_dir(tmp_path, exp, R.RunSpec("sst2", "imp", 0.5, SEED))))
    at_half, _ = MK.load_masks(next(rounds.glob("round04-*.safetensors")))
    assert all(torch.equal(final[k], at_half[k]) for k in at_half)
    with pytest.raises(R.BudgetMismatchError, match="imp_milestones"):  # the rounds folder knows its trajectory
        R.run_grid(_exp(tiny_model_dir, tiny_glue, imp_milestones=(0.3,)), ["sst2"], ["imp"], [0.9], [SEED], tmp_path,
                   progress=False, report=False)


def test_wanda_input_norms_match_hidden_states(tiny_model_dir, tiny_glue):
    exp = _exp(tiny_model_dir, tiny_glue)
    ft = FineTuner(exp.abp_config("sst2", S, 0))
    norms = ft.input_norms(2)
    assert set(norms) == {k for k in ft.weights if "embeddings" not in k}
    ft.model.eval()
    sq = 0
    with torch.no_grad():
        for i, batch in enumerate(ft.train_batches.iter_batches(0)):
            if i == 2:
                break
            batch.pop("labels")
            hs = ft.model.backbone(**batch, output_hidden_states=True).hidden_states
            real = batch["attention_mask"].bool()
            sq = sq + hs[1][real].double().pow(2).sum(0)  # the input of layer 1's query is layer 0's output
    torch.testing.assert_close(norms["encoder.layer.1.attention.self.query.weight"].double(), sq.sqrt(), rtol=1e-5, atol=1e-6)


def test_maskable_weights_are_the_trainers_masked_tensors(tiny_model_dir, tiny_glue):
    exp = _exp(tiny_model_dir, tiny_glue)
    cfg = exp.abp_config("sst2", S, 0)
    backbone, _ = abp.models.load_backbone(tiny_model_dir)
    names = set(maskable_weights(backbone, cfg))
    assert names == set(A.load_keep_masks(_tiny_masked_backbone(tiny_model_dir)))
    assert not any("pooler" in n for n in names)


# ------------------------------------------------------------------------------------------ analysis


def _hand_masks():
    def m(shape, pruned):
        keep = torch.ones(shape, dtype=torch.bool).reshape(-1)
        keep[:pruned] = False
        return keep.view(shape)
    return {
        "embeddings.word_embeddings.weight": m((4, 5), 7),
        "embeddings.position_embeddings.weight": m((2, 5), 1),
        "encoder.layer.0.attention.self.query.weight": m((3, 3), 3),
        "encoder.layer.0.attention.self.key.weight": m((3, 3), 0),
        "encoder.layer.0.attention.output.dense.weight": m((3, 3), 9),
        "encoder.layer.1.attention.self.value.weight": m((3, 3), 6),
        "encoder.layer.1.intermediate.dense.weight": m((6, 3), 9),
        "encoder.layer.1.output.dense.weight": m((3, 6), 2),
        "pooler.dense.weight": m((3, 3), 1),
    }


def test_sparsity_breakdown_by_hand():
    b = A.sparsity_breakdown(_hand_masks())
    comp = {c: (v["pruned"], v["total"]) for c, v in b["components"].items()}
    assert comp == {"embeddings": (8, 30), "query": (3, 9), "key": (0, 9), "value": (6, 9), "attention_output": (9, 9),
                    "intermediate": (9, 18), "output": (2, 18), "other": (1, 9)}
    layers = {l: (v["pruned"], v["total"]) for l, v in b["layers"].items()}
    assert layers == {"embeddings": (8, 30), "0": (12, 27), "1": (17, 45), "other": (1, 9)}
    assert list(b["layers"]) == ["embeddings", "0", "1", "other"]
    assert b["overall"]["pruned"] == 38 and b["overall"]["total"] == 111
    assert b["overall"]["sparsity"] == pytest.approx(38 / 111)
    assert b["layer_components"]["1"]["intermediate"]["sparsity"] == pytest.approx(0.5)


def test_mask_overlap_by_hand():
    a = {"x.weight": torch.tensor([False, False, True, True, False, True])}  # pruned {0, 1, 4}
    b = {"x.weight": torch.tensor([False, True, False, True, True, True])}   # pruned {0, 2}
    o = A.mask_overlap(a, b)
    assert o["intersection"] == 1 and o["union"] == 4 and o["jaccard_pruned"] == 0.25
    assert o["agreement"] == pytest.approx(3 / 6)
    p, q = 0.5, 2 / 6
    assert o["jaccard_random"] == pytest.approx(p * q / (p + q - p * q))
    with pytest.raises(ValueError, match="different tensors"):
        A.mask_overlap(a, {"y.weight": b["x.weight"]})


# ------------------------------------------------------------------------------------------ the paper's claims


def test_findings_check_by_hand():
    from abp.experiments.report import check_findings

    def row(method, s, v):
        return {"method": method, "sparsity": s, "metrics": {"accuracy": v}}
    rs = [row("abp", 0.5, 0.80), row("abp", 0.5, 0.82), row("abp", 0.9, 0.70), row("mp", 0.5, 0.81),
          row("mp", 0.9, 0.75), row("finetune", None, 0.825), row("feature_extraction", None, 0.81),
          row("abp_norecovery", 0.5, 0.81), row("abp", 0.2, 0.83)]
    got = {(f["claim"], f["sparsity"]): f for f in check_findings(rs, "accuracy")}
    assert got[("ABP ≥ MP", 0.5)]["holds"] is True  # 0.81 vs 0.81: ties hold
    assert got[("ABP ≥ MP", 0.9)]["holds"] is False
    assert math.isclose(got[("ABP ≥ MP", 0.9)]["difference"], -0.05)
    assert ("ABP ≥ MP", 0.2) not in got  # the paper's claim is about s >= 0.5
    assert got[("ABP ≥ IMP", None)]["holds"] is None and ("ABP ≥ IMP", 0.5) not in got  # IMP never ran: one row
    assert got[("ABP within 2 points of fine-tuning", 0.5)]["holds"] is True  # -1.5 points
    assert got[("ABP > feature extraction", 0.5)]["holds"] is False  # a tie is not "above"
    assert got[("ABP > feature extraction", 0.9)]["holds"] is False
    assert got[("ABP > no recovery", 0.5)]["holds"] is False
    assert ("ABP > no recovery", 0.9) not in got  # only ABP ran at 0.9: nothing to compare
    assert got[("ABP ≥ MP", 0.5)]["abp"] == (pytest.approx(0.81), 2)
    assert got[("ABP ≥ Wanda", None)]["holds"] is None  # Wanda never ran
    assert got[("ABP ≥ feature extraction", 0.2)]["holds"] is True  # 0.83 vs 0.81 at s = 0.2
    assert ("ABP ≥ feature extraction", 0.5) not in got  # at s >= 0.5 the claim is "above"


def test_a_variant_with_the_defaults_settings_reuses_the_defaults_run(grid):
    """Two names for one setting (``abp`` and the variant that equals today's default) run once: the second
    adopts the first's result and mask, marked ``reused_from``."""
    from abp.experiments.methods import ABP_VARIANTS

    exp, res = grid["exp"], grid["results"]
    same = [m for m in ABP_VARIANTS if m != "abp" and exp.budget(m, "sst2") == exp.budget("abp", "sst2")]
    assert len(same) == 1, f"exactly one named variant should pin today's default, got {same}"
    twin = res[same[0]]
    assert twin["reused_from"] == R.RunSpec("sst2", "abp", S, SEED).name and twin["metrics"] == res["abp"]["metrics"]
    assert A.find_mask_file(R.run_dir(grid["out"], exp, R.RunSpec("sst2", same[0], S, SEED))) is not None
    others = [m for m in ABP_VARIANTS if m not in same]
    assert all("reused_from" not in res[m] for m in others)


def test_report_shows_the_pinned_default_once_and_names_neutral_settings():
    """``abp`` adopting the pinned variant's runs: the report's tables and figures show them once (as ``abp``), and a
    variant whose budget leaves an optional setting out is listed with that setting's neutral value."""
    from abp.experiments.report import _abp_settings_text, copies_of_default

    exp = ExperimentConfig(max_steps=40)

    def run(method, seed, reused=None):
        r = {"method": method, "sparsity": 0.5, "seed": seed, "budget": exp.budget(method, "sst2"),
             "run_dir": f"/x/{R.RunSpec('sst2', method, 0.5, seed).name}"}
        return {**r, "reused_from": reused} if reused else r

    pinned = [run("abp_refit", s) for s in (0, 1)]
    adopted = [run("abp", s, R.RunSpec("sst2", "abp_refit", 0.5, s).name) for s in (0, 1)]
    older = [run("abp_adam", 0), run("abp_cubic_mix", 0)]
    assert copies_of_default(pinned + adopted + older) == {"abp_refit"}
    assert copies_of_default(pinned + adopted[:1] + older) == set()  # seed 1 of abp_refit is its own
    text = _abp_settings_text(adopted + pinned + older)
    assert "`abp_refit`: as `abp`" in text and "head_refit_steps=40" in text  # the default's, resolved
    # left out of their budgets: the neutral values of t_l, schedule and head_refit_steps
    assert '`abp_adam`: score_optimizer="adam", t_l=100000.0, schedule="linear", head_refit_steps=0' in text
    assert "`abp_cubic_mix`: head_refit_steps=0" in text


def test_every_variant_setting_is_in_the_budget():
    """A run is reused only where its budget matches, so every ABPConfig field a variant sets must show in it:
    variants whose resolved settings differ have different budgets (else one would adopt the other's runs)."""
    import dataclasses

    from abp.experiments.methods import ABP_VARIANTS
    from abp.train.config import ABPConfig

    exp = ExperimentConfig(max_steps=40)
    resolved = {m: dataclasses.asdict(ABPConfig(**{"head_lr": exp.head_lr, **over})) for m, over in ABP_VARIANTS.items()}
    for a in ABP_VARIANTS:
        for b in ABP_VARIANTS:
            if a < b and resolved[a] != resolved[b]:
                diff = sorted(k for k in resolved[a] if resolved[a][k] != resolved[b][k])
                assert exp.budget(a, "sst2") != exp.budget(b, "sst2"), f"{a} and {b} differ in {diff} but share a budget"


def test_paper_probe_runs_on_the_grid(grid, tiny_model_dir, tiny_glue, tmp_path):
    """bench/paper_probe.py: loads the grid's feature-extraction head, prunes by each rule, writes its JSON."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "paper_probe.py"
    spec = importlib.util.spec_from_file_location("paper_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    assert probe.main(["--task", "sst2", "--model", tiny_model_dir, "--glue-dir", tiny_glue, "--grid", str(grid["out"]),
                       "--batches", "2", "--fraction", "0.25", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert set(doc["loss"]) == {"dense", "abp_rule", "random", "largest_abs_sum", "largest_sensitivity",
                                "smallest_sensitivity", "smallest_abs_sum"}
    assert all(math.isfinite(v) and v > 0 for v in doc["loss"].values())
    assert len(set(doc["loss"].values())) > 1  # the rules prune different weights
    assert "embeddings" in doc["loss_by_part"]["component"] and "0" in doc["loss_by_part"]["layer"]
    assert 0 <= doc["abp_picks_among_most_sensitive"]["median_over_tensors"] <= 1
    assert doc["budget"]["max_steps"] == grid["exp"].max_steps
    with pytest.raises(SystemExit, match="no finished run"):
        probe.main(["--task", "stsb", "--model", tiny_model_dir, "--grid", str(tmp_path), "--output", str(out)])


def test_linear_probe_reads_the_signal_the_features_hold(tiny_model_dir, tiny_glue, tmp_path):
    """bench/linear_probe.py on the few-word SST-2 (label = the sign of the sentiment words' count, which the token
    means carry): its fits beat the majority class, its JSON names every fit; a regression task is refused."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "linear_probe.py"
    spec = importlib.util.spec_from_file_location("linear_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    assert probe.main(["--task", "sst2", "--model", tiny_model_dir, "--glue-dir", tiny_glue, "--weight-decay", "1e-3",
                       "--max-iter", "100", "--output", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert (doc["train_examples"], doc["dev_examples"]) == (96, 40)
    assert [(f["features"], f["standardised"]) for f in doc["fits"]] == [
        ("last layer", False), ("last layer", True), ("all layers", False), ("all layers", True)]
    best = max(f["dev"]["accuracy"] for f in doc["fits"])
    assert best > doc["majority_class"]["accuracy"] + 0.1, (best, doc["majority_class"])
    with pytest.raises(SystemExit, match="stsb is a regression task"):
        probe.main(["--task", "stsb", "--model", tiny_model_dir, "--glue-dir", tiny_glue, "--output", str(out)])


def test_budget_curve_joins_grids_that_differ_in_steps(tmp_path):
    """Two grid folders (400 and 1600 steps): one row per method, sparsity and step count, means over seeds."""
    from abp.experiments.budget import write_budget_curve

    def record(folder, steps, values):
        runs = [{"run": f"{m}-s{s:g}-seed{seed}" if s else f"{m}-seed{seed}", "method": m, "sparsity": s, "seed": seed,
                 "metric_name": "accuracy", "metrics": {"accuracy": v}, "budget": {"max_steps": steps}}
                for (m, s), vs in values.items() for seed, v in enumerate(vs)]
        folder.mkdir()
        (folder / "sst2-tiny.json").write_text(json.dumps({"task": "sst2", "model": "tiny", "runs": runs, "rows": []}))
    record(tmp_path / "a", 400, {("abp", 0.5): [0.70, 0.72], ("mp", 0.5): [0.75], ("feature_extraction", None): [0.71]})
    record(tmp_path / "b", 1600, {("abp", 0.5): [0.80], ("mp", 0.5): [0.77], ("mp", 0.9): [0.6]})
    files = write_budget_curve([tmp_path / "a", tmp_path / "b"], tmp_path / "out", sparsities=[0.5])
    rows = json.loads((tmp_path / "out" / "budget.json").read_text())["rows"]
    got = {(r["method"], r["sparsity"], r["steps"]): (round(r["mean"], 6), r["n"]) for r in rows}
    assert got == {("abp", 0.5, 400): (0.71, 2), ("abp", 0.5, 1600): (0.8, 1), ("mp", 0.5, 400): (0.75, 1),
                   ("mp", 0.5, 1600): (0.77, 1), ("feature_extraction", None, 400): (0.71, 1)}
    assert (tmp_path / "out" / "budget-sst2-s0.5.png").is_file() and not (tmp_path / "out" / "budget-sst2-s0.9.png").exists()
    md = (tmp_path / "out" / "budget.md").read_text()
    assert "| abp | 0.5 | 0.7100 ± 0.0141 (2) | 0.8000 ± 0.0000 (1) |" in md and str(files[-1]).endswith("budget.md")
    with pytest.raises(ValueError, match="no finished runs"):
        write_budget_curve([tmp_path / "a"], tmp_path / "o2", methods=["imp"])
