"""The grid's record: ``OUTPUT/<task>-<model>.json``, one entry per finished run, committed with the report.

Run folders under ``OUTPUT/runs/`` hold masks and checkpoints (about 3 MB to 90 MB each) and are never
committed, so they are not the source of truth: the record is. A finished run on disk adds its entry to
the record or replaces the entry of the same name; an entry whose folder is gone stays. A fresh checkout
therefore rebuilds the same tables, and a grid resumed there skips the runs its record already holds.

Each entry is the run's ``result.json`` (budget included) with its folder name as ``run``; the file also
holds the flat rows ``{task, model, method, sparsity, seed, metric, value}`` that plots and readers use.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from abp.experiments.methods import RESULT, method_order

RunKey = tuple[str, str, str]  # (task, model, run folder name)
_REQUIRED = ("run", "method", "sparsity", "seed", "metric_name", "metrics", "budget")


def run_folder(output: str | os.PathLike, task: str, model: str, run: str) -> Path:
    return Path(output) / "runs" / f"{task}-{model}" / run


def record_path(output: str | os.PathLike, task: str, model: str) -> Path:
    return Path(output) / f"{task}-{model}.json"


def _is_record(doc) -> bool:
    return isinstance(doc, dict) and {"task", "model", "runs"} <= set(doc) and isinstance(doc["runs"], list)


def read_record(output: str | os.PathLike) -> dict[RunKey, dict]:
    """Every run the record files in ``output`` hold, as results (``task``, ``model``, ``run_dir`` added)."""
    out: dict[RunKey, dict] = {}
    for p in sorted(Path(output).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{p} is not valid JSON ({e}); restore it from git before running the grid") from e
        if not _is_record(doc):
            continue  # analysis.json, probes, ablations: not records
        for i, entry in enumerate(doc["runs"]):
            missing = [k for k in _REQUIRED if k not in entry]
            if missing:
                raise ValueError(f"{p}: run #{i} ({entry.get('run', '?')}) lacks {', '.join(missing)}")
            r = {**entry, "task": doc["task"], "model": doc["model"],
                 "run_dir": str(run_folder(output, doc["task"], doc["model"], entry["run"]))}
            out[(doc["task"], doc["model"], entry["run"])] = r
    return out


def disk_results(output: str | os.PathLike) -> dict[RunKey, dict]:
    """Every finished run folder under ``output/runs`` (its ``result.json``, ``run_dir`` added)."""
    out: dict[RunKey, dict] = {}
    root = Path(output) / "runs"
    if root.is_dir():
        for p in sorted(root.glob(f"*/*/{RESULT}")):
            r = json.loads(p.read_text())
            r["run_dir"] = str(p.parent)
            out[(r["task"], r["model"], p.parent.name)] = r
    return out


def collect_results(output: str | os.PathLike) -> dict[tuple[str, str], list[dict]]:
    """The record merged with the finished runs on disk (disk wins), grouped by ``(task, model)``, in a
    stable order (method, sparsity, seed)."""
    merged = {**read_record(output), **disk_results(output)}
    groups: dict[tuple[str, str], list[dict]] = {}
    for (task, model, _), r in merged.items():
        groups.setdefault((task, model), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: (method_order(r["method"]), -1 if r["sparsity"] is None else r["sparsity"], r["seed"]))
    return dict(sorted(groups.items()))


def rows_of(results: Sequence[dict]) -> list[dict]:
    """Flat rows ``{task, model, method, sparsity, seed, metric, value}``, one per dev metric of each run."""
    return [{"task": r["task"], "model": r["model"], "method": r["method"], "sparsity": r["sparsity"],
             "seed": r["seed"], "metric": k, "value": v} for r in results for k, v in r["metrics"].items()]


def record_doc(task: str, model: str, results: Sequence[dict]) -> dict:
    """The record file of one ``(task, model)``: budgets seen, flat rows, and every run's result."""
    budget_keys = sorted({k for r in results for k in r["budget"]})
    return {"task": task, "model": model,
            "budget": {k: sorted({json.dumps(r["budget"].get(k)) for r in results}) for k in budget_keys},
            "rows": rows_of(results),
            "runs": [{"run": Path(r["run_dir"]).name,
                      **{k: v for k, v in r.items() if k not in ("task", "model", "run_dir", "run")}} for r in results]}
