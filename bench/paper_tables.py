"""The README's grid tables, built from a grid's record (``abp experiment`` output): mean ± std over seeds.

    python -P bench/paper_tables.py bench/results/paper          # prints the markdown tables

Cells with one run say ``(n = 1)``; a run that missed its target sparsity is marked with the sparsity it reached.
The rows and their labels are the README's; a method the record lacks is left out. ``abp_refit`` (today's
default, pinned) is not a row: its runs are the ``abp`` row's. Rows without "hard mask" in their label ran the forward
σ(1e5·θ), and rows without a ramp named ran the linear one.
"""
from __future__ import annotations

import statistics
import sys
from collections import defaultdict

from abp.experiments.record import collect_results
from abp.train.tasks import get_task

ROWS = [
    ("abp", "ABP, abp's default (θ0 ∝ \\|w\\|, Adam with v̂^(1−s)·mean(v̂)^s, hard mask, cubic ramp, then its head "
            "trained max_steps more steps on the final mask)"),
    ("abp_cubic_mix", "ABP, the same with the head as the run ends (--head-refit-steps 0; the previous default)"),
    ("abp_mask", "ABP's mask (the default's), a fresh head trained on it for the budget as every fixed mask's is"),
    ("abp_per_tensor", "ABP, the previous default with each tensor pruned to s on its own (per-tensor γ)"),
    ("abp_cubic", "ABP, θ0 ∝ \\|w\\| + Adam, hard mask, cubic ramp"),
    ("abp_adam", "ABP, θ0 ∝ \\|w\\| + Adam, σ(1e5·θ), linear ramp"),
    ("abp_hard", "ABP, θ0 ∝ \\|w\\| + Adam, hard mask, linear ramp"),
    ("abp_quadratic", "ABP, θ0 ∝ \\|w\\| + Adam, hard mask, quadratic ramp"),
    ("abp_cubic_tensor", "ABP, θ0 ∝ \\|w\\| + per-tensor Adam, hard mask, cubic ramp"),
    ("abp_adam_tensor", "ABP, θ0 ∝ \\|w\\| + Adam with one second moment per tensor"),
    ("abp_adam_ceiling", "ABP, θ0 ∝ \\|w\\| + Adam, second moment capped at the tensor's mean"),
    ("abp_adam_floor", "ABP, θ0 ∝ \\|w\\| + Adam, second moment floored at the tensor's mean"),
    ("abp_uniform", "ABP, uniform θ0 + plain SGD"),
    ("abp_magnitude", "ABP, θ0 ∝ \\|w\\| + plain SGD"),
    ("abp_uniform_adam", "ABP, uniform θ0 + Adam"),
    ("abp_usage", "ABP, θ0 ∝ \\|w\\| + Adam + unused token rows first"),
    ("abp_paper", "ABP with the paper's α, β, γ, θ0"),
    ("random", "random mask (head trained)"),
    ("mp", "magnitude pruning (Zhu & Gupta, mask on the original weights)"),
    ("imp", "IMP (rewinding; one trajectory per seed)"),
    ("wanda", "Wanda (training-free)"),
    ("feature_extraction", "feature extraction (dense, frozen)"),
    ("finetune", "full fine-tuning (dense)"),
]
SPARSITIES = (0.2, 0.5, 0.7, 0.9, 0.95, 0.99)


def cell(runs: list[dict], metric: str) -> str:
    vals = [float(r["metrics"][metric]) for r in runs]
    if not vals:
        return ""
    missed = [r["sparsity_reached"] for r in runs
              if r.get("sparsity") is not None and r.get("sparsity_reached") is not None
              and r["sparsity_reached"] < r["sparsity"] - 0.005]
    note = f" [s {min(missed):.3f}]" if missed else ""
    if len(vals) == 1:
        return f"{vals[0]:.3f} (n = 1){note}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}{note}" + ("" if len(vals) == 3 else f" (n = {len(vals)})")


def tables(output: str) -> str:
    out = []
    for (task, _model), results in collect_results(output).items():
        metric = get_task(task).primary_metric
        by = defaultdict(list)
        for r in results:
            by[(r["method"], r["sparsity"])].append(r)
        out += [f"| {task} dev {metric} | dense | " + " | ".join(f"s = {s:g}" for s in SPARSITIES) + " |",
                "|---|---|" + "---|" * len(SPARSITIES)]
        for method, label in ROWS:
            if not any(m == method for m, _ in by):
                continue
            cells = [cell(by.get((method, None), []), metric)] + [cell(by.get((method, s), []), metric) for s in SPARSITIES]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1] if len(sys.argv) > 1 else "bench/results/paper"))
