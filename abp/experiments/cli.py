"""``abp experiment``: run (or resume) the reproduction grid and rebuild its report.

Registered by :mod:`abp.cli` through :func:`add_experiment_parser`. Every :class:`ExperimentConfig`
field is an option (``--max-steps``, ``--backbone-lr`` …), generated from the dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from abp.experiments.methods import METHODS, ExperimentConfig


def _none_or(kind):
    def parse(v: str):
        return None if v.lower() in ("none", "auto") else kind(v)
    parse.__name__ = kind.__name__
    return parse


_DEFAULT_METHODS = ("abp", "random", "mp", "feature_extraction", "finetune")


def add_experiment_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("experiment", help="run the paper's grid of methods × sparsities × seeds and its report",
                              description="Run every missing run of the grid (finished runs are skipped, interrupted "
                                          "ones resume), then write OUTPUT/<task>-<model>.json, plots and results.md.")
    p.add_argument("--tasks", nargs="+", default=["sst2", "stsb"])
    p.add_argument("--methods", nargs="+", default=list(_DEFAULT_METHODS),
                   choices=METHODS, metavar="METHOD", help=f"any of: {', '.join(METHODS)}")
    p.add_argument("--sparsities", nargs="*", type=float, default=[0.5, 0.9])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output", "-o", required=True, help="results folder (e.g. bench/results/paper)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no new run after this (rerun later to finish the grid)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    p.add_argument("--budget-curve", nargs="+", default=None, metavar="GRID",
                   help="instead of running: plot the dev metric against steps from these grid folders (one per "
                        "--max-steps) into --output (budget.md, budget.json, budget-<task>-s<s>.png), at --sparsities; "
                        "--methods limits it when given explicitly")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-report", action="store_true",
                   help="run the cells only (e.g. several lanes side by side); rebuild with --report-only after")
    p.add_argument("--run-progress", action="store_true", help="a progress bar inside each run too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU). On a CPU shared with other jobs 1 can be several times "
                        "faster than the default (measured: 66 s vs 263 s for one 20-step MiniLM run)")
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple:  # a list of numbers, e.g. --imp-milestones 0.2 0.5
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, nargs="*", type=args[0],
                           default=f.default, help=f"(default: {' '.join(map(str, f.default))})")
            continue
        kind = hint if hint in (int, float, str) else next((a for a in args if a in (int, float, str)), str)
        parse = kind if hint in (int, float, str) else _none_or(kind)
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=parse, default=f.default,
                       help=f"(default: {f.default!r})")
    p.set_defaults(func=_cmd_experiment)
    return p


def _cmd_experiment(a: argparse.Namespace) -> int:
    from abp.experiments.report import write_report
    from abp.experiments.runner import run_grid

    if a.threads is not None:
        import torch

        if a.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {a.threads}")
        torch.set_num_threads(a.threads)
    if a.budget_curve:
        from abp.experiments.budget import write_budget_curve

        methods = a.methods if a.methods != _DEFAULT_METHODS else ()
        files = write_budget_curve(a.budget_curve, a.output, methods=methods, sparsities=a.sparsities,
                                   plots=not a.no_plots)
        print(json.dumps({"budget_curve": [str(f) for f in files]}, indent=1))
        return 0
    if a.report_only:
        files = write_report(a.output, plots=not a.no_plots)
        print(json.dumps({"report": [str(f) for f in files]}, indent=1))
        return 0
    exp = ExperimentConfig(**{f.name: tuple(v) if isinstance(v := getattr(a, f.name), list) else v
                              for f in dataclasses.fields(ExperimentConfig)})
    summary = run_grid(exp, a.tasks, a.methods, a.sparsities, a.seeds, a.output, time_limit=a.time_limit,
                       progress=not a.quiet, run_progress=a.run_progress, report=not a.no_report,
                       plots=not a.no_plots)
    print(json.dumps({"ran": len(summary["ran"]), "skipped": len(summary["skipped"]), "left": summary["left"],
                      "seconds": summary["seconds"], "report": summary.get("report", [])}, indent=1))
    return 0
