"""Figures like the paper's: Fig. 2 (dev metric vs sparsity per method, mean ± std over seeds) and Fig. 3
(where the learnt masks prune: sparsity per layer and per component). Matplotlib, Agg backend, PNG."""
from __future__ import annotations

import math
import os
import statistics
from typing import Mapping, Sequence

from abp.experiments.analysis import COMPONENTS
from abp.experiments.methods import DENSE_METHODS, METHODS

METHOD_STYLE = {"abp": ("tab:red", "o"), "random": ("tab:gray", "x"), "mp": ("tab:blue", "s"), "imp": ("tab:cyan", "D"),
          "wanda": ("tab:green", "^"), "abp_shuffled": ("tab:pink", "v"), "abp_mask": ("maroon", "o"),
          "abp_reinit": ("tab:orange", "P"),
          "abp_norecovery": ("tab:brown", "*"), "finetune": ("black", None), "feature_extraction": ("tab:purple", None),
          "abp_paper": ("tab:olive", "<"), "abp_uniform": ("salmon", "o"), "abp_magnitude": ("darkred", "h"),
          "abp_adam": ("indigo", "p"), "abp_uniform_adam": ("plum", "p"), "abp_usage": ("crimson", "d"),
          "abp_adam_tensor": ("darkorange", "8"),
          "abp_adam_floor": ("teal", "P"), "abp_adam_ceiling": ("olive", "X"), "abp_hard": ("firebrick", "1"),
          "abp_cubic": ("goldenrod", "2"), "abp_quadratic": ("peru", "3"),
          "abp_cubic_tensor": ("darkcyan", "4"),
          "abp_cubic_mix": ("navy", "v"), "abp_per_tensor": ("deeppink", "d"),
          "abp_refit": ("orangered", "*")}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _x(sparsity: float) -> float:
    """Fig. 2's x axis: −log10(remaining share), so 0.9, 0.95 and 0.99 are as far apart as the paper's grid needs."""
    return -math.log10(1 - sparsity)


def plot_metric_vs_sparsity(rows: Sequence[Mapping], metric: str, path: str | os.PathLike, *, title: str = "") -> None:
    """Fig. 2: one line per sparse method (mean ± std over seeds as error bars), dense methods
    (fine-tuning, feature extraction) as horizontal lines with a ±std band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    rows = [r for r in rows if r["metric"] == metric]
    sparsities = sorted({r["sparsity"] for r in rows if r["sparsity"] is not None})
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        color, marker = METHOD_STYLE.get(method, ("k", "."))
        if method in DENSE_METHODS:
            m, s = _mean_std([r["value"] for r in mine])
            ax.axhline(m, color=color, ls="--", lw=1.2, label=f"{method} (n={len(mine)})")
            if s > 0:
                ax.axhspan(m - s, m + s, color=color, alpha=0.08)
            continue
        xs, ms, ss, ns = [], [], [], []
        for sp in sparsities:
            vals = [r["value"] for r in mine if r["sparsity"] == sp]
            if vals:
                m, s = _mean_std(vals)
                xs.append(_x(sp))
                ms.append(m)
                ss.append(s)
                ns.append(len(vals))
        ax.errorbar(xs, ms, yerr=ss, color=color, marker=marker, capsize=3, lw=1.4,
                    label=f"{method} (n={min(ns)}–{max(ns)})" if min(ns) != max(ns) else f"{method} (n={ns[0]})")
    ax.set_xlabel("sparsity (share of masked weights pruned; log scale of the share kept)")
    ax.set_ylabel(f"dev {metric}")
    if sparsities:
        ax.set_xticks([_x(sp) for sp in sparsities], [f"{sp:g}" for sp in sparsities])
    finish_line_plot(plt, fig, ax, path, title)


def finish_line_plot(plt, fig, ax, path: str | os.PathLike, title: str) -> None:
    """Grid, title, legend, save as PNG and close: the common end of every line plot here."""
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sparsity_profile(profiles: Mapping[str, Mapping[str, Mapping]], path: str | os.PathLike, *,
                          title: str = "") -> None:
    """Fig. 3: ``profiles[label] = {"layers": {layer: sparsity}, "components": {component: sparsity}}``
    (e.g. label ``"abp s=0.5"``): sparsity per layer (left) and per component (right)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = list(profiles)
    for i, label in enumerate(labels):
        layers = profiles[label]["layers"]
        ax1.plot(range(len(layers)), list(layers.values()), marker="o", label=label)
        ax1.set_xticks(range(len(layers)))
        ax1.set_xticklabels(["emb" if k == "embeddings" else k for k in layers], fontsize=8)
    comps = [c for c in COMPONENTS if any(c in p["components"] for p in profiles.values())]
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        vals = [profiles[label]["components"].get(c, float("nan")) for c in comps]
        ax2.bar([j + (i - (len(labels) - 1) / 2) * width for j in range(len(comps))], vals, width=width, label=label)
    ax2.set_xticks(range(len(comps)))
    ax2.set_xticklabels([c.replace("attention_output", "attn out") for c in comps], rotation=30, fontsize=8)
    ax1.set_xlabel("layer")
    for ax in (ax1, ax2):
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
