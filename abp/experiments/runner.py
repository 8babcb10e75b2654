"""The grid: tasks × methods × sparsities × seeds, one folder per run, finished runs skipped, then the report.

Layout under ``output``::

    runs/<task>-<model>/<method>-s<sparsity>-seed<seed>/   (dense methods: <method>-seed<seed>)
        budget.json      written when the run starts: a later grid with another budget refuses to mix in
        result.json      written last: its presence means "done" (the run is skipped next time)
        mask.safetensors the final mask + head (abp eval/info read it); checkpoints are deleted when done
    runs/<task>-<model>/imp-rounds-seed<seed>/   IMP rounds shared by every sparsity of one seed
    <task>-<model>.json  the record (:mod:`abp.experiments.record`): every finished run's result and the
                         rows {task, model, method, sparsity, seed, metric, value}; a run it holds is done
    analysis.json        sparsity by layer/component of every mask, overlaps between masks
    fig2-<task>-<model>.png, fig3-<task>-<model>.png, results.md

Order: seed-major (all methods of seed 0, then seed 1 …), so a grid stopped early still has every method
for the seeds it finished; within a seed ``abp`` runs before ``abp_mask`` and ``abp_shuffled`` (which retrain a head on
its mask).
A run interrupted mid-way resumes from its checkpoint (Trainer ``resume``; the fine-tuning loop of finetune, mp
and an IMP round: ``finetune_checkpoint.safetensors``, ``imp-rounds-seed<seed>/checkpoint-round….safetensors``) or
finished phase files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from abp._atomic import write_text
from abp.experiments.methods import (ABP_VARIANTS, DENSE_METHODS, FROM_ABP_MASK, METHODS, RESULT, ExperimentConfig,
                                     model_label, read_result, run_method)
from abp.experiments.record import collect_results, read_record, record_doc, record_path, run_folder
from abp.train.tasks import get_task

log = logging.getLogger("abp")


class BudgetMismatchError(ValueError):
    """A run folder holds a run made with other settings than the grid's."""


@dataclass(frozen=True)
class RunSpec:
    task: str
    method: str
    sparsity: Optional[float]
    seed: int

    @property
    def name(self) -> str:
        if self.sparsity is None:
            return f"{self.method}-seed{self.seed}"
        return f"{self.method}-s{self.sparsity:g}-seed{self.seed}"


def plan(tasks: Sequence[str], methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]) -> list[RunSpec]:
    """The runs of a grid, seed-major; methods in :data:`METHODS` order (abp before abp_mask and abp_shuffled)."""
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    bad_s = [s for s in sparsities if not 0 < s < 1]
    if bad_s:
        raise ValueError(f"sparsities must be in (0, 1), got {bad_s}")
    if any(m not in DENSE_METHODS for m in methods) and not sparsities:
        raise ValueError("sparse methods need at least one --sparsities value")
    tasks = [get_task(t).name for t in tasks]
    runs = []
    for seed in seeds:
        for task in tasks:
            for method in (m for m in METHODS if m in methods):
                for s in ([None] if method in DENSE_METHODS else sparsities):
                    runs.append(RunSpec(task, method, None if s is None else float(s), int(seed)))
    return runs


def run_dir(output: str | os.PathLike, exp: ExperimentConfig, spec: RunSpec) -> Path:
    return run_folder(output, spec.task, model_label(exp.model), spec.name)


def imp_rounds_dir(output: str | os.PathLike, exp: ExperimentConfig, spec: RunSpec) -> Path:
    """Where the IMP rounds of one task and seed are kept (shared by every sparsity of the grid)."""
    return run_dir(output, exp, spec).parent / f"imp-rounds-seed{spec.seed}"


def _budget_mismatch(where: Path, have: dict, want: dict) -> BudgetMismatchError:
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    return BudgetMismatchError(
        f"{where} holds a run with other settings ({', '.join(f'{k}: {have.get(k)!r} there, {want.get(k)!r} now' for k in diff)}); "
        f"use another --output, or delete that run (its folder, or its entry in the record)")


def _want(exp: ExperimentConfig, method: str, task: str) -> dict:
    return json.loads(json.dumps(exp.budget(method, task)))  # as it reads back from JSON (tuples become lists)


def _check_budget(d: Path, spec: RunSpec, exp: ExperimentConfig) -> None:
    want = _want(exp, spec.method, spec.task)
    for name in (RESULT, "budget.json"):
        p = d / name
        if p.is_file():
            have = json.loads(p.read_text())
            have = have.get("budget", have)
            if have != want:
                raise _budget_mismatch(d, have, want)


def _identical_run(output: Path, exp: ExperimentConfig, record: dict, model: str, spec: RunSpec) -> Optional[dict]:
    """A finished run of another ABP variant with exactly this run's budget (settings included), task,
    sparsity and seed, e.g. ``abp`` once the default equals ``abp_magnitude``; its result with ``run``."""
    if spec.method not in ABP_VARIANTS:
        return None
    want = _want(exp, spec.method, spec.task)
    for other in ABP_VARIANTS:
        if other == spec.method:
            continue
        twin = RunSpec(spec.task, other, spec.sparsity, spec.seed)
        r = read_result(run_dir(output, exp, twin)) or record.get((spec.task, model, twin.name))
        if r is not None and r["budget"] == want and not r.get("reused_from"):
            return {**r, "run": twin.name}
    return None


def _adopt(twin: dict, d: Path, spec: RunSpec) -> None:
    """Write ``twin``'s result as this run's (its mask copied when on disk), marked ``reused_from``."""
    src = d.parent / twin["run"]
    d.mkdir(parents=True, exist_ok=True)
    if twin.get("mask_file") and (src / twin["mask_file"]).is_file():
        shutil.copyfile(src / twin["mask_file"], d / twin["mask_file"])
    result = {k: v for k, v in twin.items() if k not in ("run", "task_dir", "run_dir")}
    result.update(method=spec.method, reused_from=twin["run"])
    if "task" not in result:
        result["task"] = spec.task
    write_text(d / RESULT, json.dumps(result, indent=1))


def write_record(output: str | os.PathLike, task: str, model: str) -> Path:
    """Rewrite the record file of ``(task, model)`` from the record and the finished runs on disk, so that a
    finished run is in the record (the file to commit) at once. Concurrent grids writing the same record heal
    each other: each write merges everything on disk."""
    rs = collect_results(output).get((task, model), [])
    path = record_path(output, task, model)
    write_text(path, json.dumps(record_doc(task, model, rs), indent=1))
    return path


def run_grid(exp: ExperimentConfig, tasks: Sequence[str], methods: Sequence[str], sparsities: Sequence[float],
             seeds: Sequence[int], output: str | os.PathLike, *, time_limit: Optional[float] = None,
             progress: bool = True, run_progress: bool = False, report: bool = True, plots: bool = True) -> dict:
    """Run every missing run of the grid (skipping finished ones; each finished run goes into the record at
    once, :func:`write_record`), then write the report.

    ``time_limit`` (seconds): no new run starts after it (the one in flight finishes); the rest is listed
    as ``left`` and a later call picks it up. Returns ``{"ran", "skipped", "left", "seconds"}``.
    """
    from tqdm.auto import tqdm

    exp.validate()
    runs = plan(tasks, methods, sparsities, seeds)
    output = Path(output)
    record = read_record(output)
    model = model_label(exp.model)
    for spec in runs:  # refuse a mixed budget before spending any time
        _check_budget(run_dir(output, exp, spec), spec, exp)
        recorded = record.get((spec.task, model, spec.name))
        if recorded is not None and recorded["budget"] != _want(exp, spec.method, spec.task):
            raise _budget_mismatch(record_path(output, spec.task, model), recorded["budget"], _want(exp, spec.method, spec.task))
        if spec.method == "imp":
            _check_budget(imp_rounds_dir(output, exp, spec), spec, exp)
    t0 = time.time()
    ran, skipped, left = [], [], []
    bar = tqdm(runs, desc="abp experiment", disable=not progress, dynamic_ncols=True)
    for spec in bar:
        d = run_dir(output, exp, spec)
        if read_result(d) is not None or (spec.task, model, spec.name) in record:
            skipped.append(f"{spec.task}/{spec.name}")
            continue
        if time_limit is not None and time.time() - t0 > time_limit:
            left.append(f"{spec.task}/{spec.name}")
            continue
        twin = _identical_run(output, exp, record, model, spec)
        if twin is not None:  # another name for the same settings: the same (deterministic) run, not run twice
            _adopt(twin, d, spec)
            write_record(output, spec.task, model)
            ran.append(f"{spec.task}/{spec.name}")
            (bar.write if progress else log.info)(f"{spec.task} {spec.name}: the same run as {twin['run']}, reused")
            continue
        bar.set_postfix_str(f"{spec.task} {spec.name}")
        d.mkdir(parents=True, exist_ok=True)
        write_text(d / "budget.json", json.dumps(exp.budget(spec.method, spec.task), indent=1))
        source, rounds = None, None
        if spec.method == "imp":
            rounds = imp_rounds_dir(output, exp, spec)
            rounds.mkdir(parents=True, exist_ok=True)
            write_text(rounds / "budget.json", json.dumps(exp.budget("imp", spec.task), indent=1))
        if spec.method in FROM_ABP_MASK:  # reuse the grid's own ABP run when it was made with this budget
            src = run_dir(output, exp, RunSpec(spec.task, "abp", spec.sparsity, spec.seed))
            done = read_result(src)
            source = src if done is not None and done["budget"] == _want(exp, "abp", spec.task) else None
        r = run_method(spec.method, exp, spec.task, spec.sparsity, spec.seed, d, abp_source=source,
                       imp_rounds_dir=rounds, progress=run_progress)
        write_record(output, spec.task, model)
        ran.append(f"{spec.task}/{spec.name}")
        msg = (f"{spec.task} {spec.name}: {r['metric_name']} {r['metrics'][r['metric_name']]:.4f}"
               + (f", sparsity {r['sparsity_reached']:.4f}" if r["sparsity_reached"] is not None else "")
               + f", {r['seconds']:.0f} s")
        if progress:
            bar.write(msg)
        else:
            log.info(msg)
    bar.close()
    summary = {"ran": ran, "skipped": skipped, "left": left, "seconds": round(time.time() - t0, 1)}
    if report:
        from abp.experiments.report import write_report

        summary["report"] = [str(p) for p in write_report(output, plots=plots)]
    return summary
