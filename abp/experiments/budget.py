"""The budget curve: dev metric against training steps, from several grids that differ only in ``max_steps``.

Each grid is an ordinary ``abp experiment`` output folder (its record and runs; the runner refuses to mix
budgets inside one folder, so each step count gets its own). ``write_budget_curve`` reads them all and writes
``budget.json`` (one row per task, method, sparsity and step count: mean, std, n), ``budget.md`` and one plot
per task and sparsity (``budget-<task>-s<sparsity>.png``; dense methods drawn at every sparsity).
It answers whether more steps close a gap between methods, measured.
"""
from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from abp._atomic import write_text
from abp.experiments.methods import DENSE_METHODS, method_order
from abp.experiments.record import collect_results
from abp.train.tasks import get_task


def budget_rows(folders: Sequence[str | Path]) -> list[dict]:
    """Mean ± std of each (task, model, method, sparsity, steps) cell over seeds, across ``folders``."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for folder in folders:
        for (task, model), results in collect_results(folder).items():
            metric = get_task(task).primary_metric
            for r in results:
                key = (task, model, r["method"], r["sparsity"], int(r["budget"]["max_steps"]), metric)
                cells[key].append(float(r["metrics"][metric]))
    rows = []
    for (task, model, method, sparsity, steps, metric), vals in cells.items():
        rows.append({"task": task, "model": model, "method": method, "sparsity": sparsity, "steps": steps,
                     "metric": metric, "mean": statistics.fmean(vals),
                     "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)})
    rows.sort(key=lambda r: (r["task"], r["model"], method_order(r["method"]), r["sparsity"] or 0.0, r["steps"]))
    return rows


def write_budget_curve(folders: Sequence[str | Path], output: str | Path, *, methods: Sequence[str] = (),
                       sparsities: Sequence[float] = (), plots: bool = True) -> list[Path]:
    """Write the budget curve of ``folders`` into ``output``; ``methods`` and ``sparsities`` limit it (default:
    all; dense methods are always kept)."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = [r for r in budget_rows(folders) if (not methods or r["method"] in methods)
            and (not sparsities or r["sparsity"] is None or r["sparsity"] in sparsities)]
    if not rows:
        raise ValueError(f"no finished runs in {', '.join(map(str, folders))}")
    written = [output / "budget.json"]
    write_text(written[0], json.dumps({"folders": [str(f) for f in folders], "rows": rows}, indent=1) + "\n")
    steps = sorted({r["steps"] for r in rows})
    lines = ["# Budget curve: dev metric against training steps", "",
             f"From {', '.join(f'`{f}`' for f in folders)}; mean ± std over seeds (n). Every other setting as in "
             "each folder's `results.md`.", ""]
    for (task, model) in sorted({(r["task"], r["model"]) for r in rows}):
        mine = [r for r in rows if r["task"] == task and r["model"] == model]
        lines += [f"## {task} / {model}: dev {mine[0]['metric']}", "",
                  "| method | s | " + " | ".join(f"{n} steps" for n in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        for method, s in sorted({(r["method"], r["sparsity"]) for r in mine},
                                key=lambda k: (method_order(k[0]), k[1] or 0.0)):
            by = {r["steps"]: r for r in mine if r["method"] == method and r["sparsity"] == s}
            cells = [f"{by[n]['mean']:.4f} ± {by[n]['std']:.4f} ({by[n]['n']})" if n in by else "—" for n in steps]
            lines.append(f"| {method} | {'dense' if s is None else f'{s:g}'} | " + " | ".join(cells) + " |")
        lines.append("")
        if plots:
            for s in sorted({r["sparsity"] for r in mine if r["sparsity"] is not None}):
                path = output / f"budget-{task}-s{s:g}.png"
                _plot(mine, s, path, title=f"{task} / {model}, s = {s:g}")
                written.append(path)
    written.append(output / "budget.md")
    write_text(written[-1], "\n".join(lines) + "\n")
    return written


def _plot(rows: Sequence[dict], sparsity: float, path: Path, *, title: str) -> None:
    from abp.experiments.plots import METHOD_STYLE, pyplot, finish_line_plot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in sorted({r["method"] for r in rows}, key=method_order):
        pts = sorted((r for r in rows if r["method"] == method and r["sparsity"] in (sparsity, None)
                      and (r["sparsity"] is None) == (method in DENSE_METHODS)), key=lambda r: r["steps"])
        if not pts:
            continue
        color, marker = METHOD_STYLE.get(method, ("k", "."))
        ax.errorbar([r["steps"] for r in pts], [r["mean"] for r in pts], yerr=[r["std"] for r in pts],
                    color=color, marker=marker or "o", ls="--" if method in DENSE_METHODS else "-", capsize=3,
                    label=method)
    ax.set_xscale("log")
    ax.set_xlabel("training steps (batch 16; log scale)")
    ax.set_ylabel(f"dev {rows[0]['metric']}")
    finish_line_plot(plt, fig, ax, path, title)
