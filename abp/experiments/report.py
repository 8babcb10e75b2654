"""The grid's report, rebuilt from the record and the finished runs on disk (:mod:`abp.experiments.record`):
per-(task, model) JSON record, mask analysis, Fig. 2 / Fig. 3 plots and a Markdown table (mean ± std over
seeds). ``notes.md`` beside it (hand-written discussion) is appended to ``results.md`` as is.

The mask analysis needs the masks, which live only in run folders. Entries of ``analysis.json`` computed
earlier are kept for runs whose folder is gone, each tagged with the digest of the mask it was computed
from, and an overlap is kept only while both of its masks are the ones it was computed from.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from collections import defaultdict
from datetime import date
from pathlib import Path
from typing import Iterable, Optional, Sequence

from abp._atomic import write_text
from abp.experiments.analysis import COMPONENTS, load_keep_masks, mask_overlap, sparsity_breakdown
from abp.experiments.methods import ABP_OPTIONAL_SETTINGS, ABP_VARIANTS, DENSE_METHODS, LEARNT_METHODS, method_order
from abp.experiments.record import collect_results, record_doc
from abp.train.tasks import get_task


def _stats(values: Sequence[float]) -> Optional[tuple[float, float, int]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan")), len(values)


def _fmt(values: Sequence[float], digits: int = 4) -> str:
    st = _stats(values)
    if st is None:
        return "—"
    m, s, n = st
    return f"{m:.{digits}f} ± {s:.{digits}f} ({n})" if n > 1 else f"{m:.{digits}f} (1)"


def _mask_path(r: dict) -> Optional[Path]:
    if not r.get("mask_file"):
        return None
    p = Path(r["run_dir"]) / r["mask_file"]
    return p if p.is_file() else None


def _compact(b: dict, mask_id: str) -> dict:
    return {"overall": b["overall"]["sparsity"], "components": {c: v["sparsity"] for c, v in b["components"].items()},
            "layers": {l: v["sparsity"] for l, v in b["layers"].items()}, "mask": mask_id}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _mask_ids(results: Sequence[dict], previous_per_run: dict) -> dict[str, Optional[str]]:
    """Run folder name → digest of its mask: of the file on disk, else of the mask the earlier analysis saw
    (None for entries written before digests were kept)."""
    ids = {}
    for r in results:
        n, p = Path(r["run_dir"]).name, _mask_path(r)
        if p is not None:
            ids[n] = _digest(p)
        elif n in previous_per_run:
            ids[n] = previous_per_run[n].get("mask")
    return ids


def _overlap(a, b, ids: list, previous: Sequence[dict], match: dict) -> Optional[dict]:
    """Overlap of masks ``a`` and ``b`` (each a path or keep-mask dict, or None when not on disk): computed
    when both are there, else the earlier entry matching ``match`` if it came from these same masks."""
    if a is not None and b is not None:
        return {**match, **mask_overlap(a, b), "masks": ids}
    return next((o for o in previous if all(o.get(k) == v for k, v in match.items())
                 and o.get("masks", [None, None]) == ids), None)


def analyze_group(results: Sequence[dict], previous: Optional[dict] = None) -> dict:
    """Sparsity breakdown of every sparse run's mask, overlaps between methods (same sparsity and seed)
    and between seeds (same method and sparsity). ``previous``: this group's earlier ``analysis.json``
    entry, used for runs whose masks are no longer on disk."""
    previous = previous or {}
    old_runs = previous.get("per_run", {})

    def name(r):
        return Path(r["run_dir"]).name

    sparse = [r for r in results if r["method"] not in DENSE_METHODS and (_mask_path(r) or name(r) in old_runs)]
    ids = _mask_ids(sparse, old_runs)
    per_run, overlaps, seed_overlaps = {}, [], []
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in sparse:
        cells[(r["sparsity"], r["seed"])].append(r)
    for (s, seed), rs in sorted(cells.items()):
        rs = sorted(rs, key=lambda r: method_order(r["method"]))
        masks = {name(r): load_keep_masks(p) for r in rs if (p := _mask_path(r)) is not None}
        for r in rs:
            n = name(r)
            per_run[n] = _compact(sparsity_breakdown(masks[n]), ids[n]) if n in masks else old_runs[n]
        for ra, rb in itertools.combinations(rs, 2):
            o = _overlap(masks.get(name(ra)), masks.get(name(rb)), [ids[name(ra)], ids[name(rb)]],
                         previous.get("overlaps", ()), {"a": ra["method"], "b": rb["method"], "sparsity": s, "seed": seed})
            if o is not None:
                overlaps.append(o)
        del masks
    by_method: dict[tuple, list[dict]] = defaultdict(list)
    for r in sparse:
        by_method[(r["method"], r["sparsity"])].append(r)
    for (method, s), rs in sorted(by_method.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1])):
        if method not in LEARNT_METHODS or len(rs) < 2:
            continue
        for ra, rb in itertools.combinations(sorted(rs, key=lambda r: r["seed"]), 2):
            o = _overlap(_mask_path(ra), _mask_path(rb), [ids[name(ra)], ids[name(rb)]], previous.get("seed_overlaps", ()),
                         {"method": method, "sparsity": s, "seeds": [ra["seed"], rb["seed"]]})
            if o is not None:
                seed_overlaps.append(o)
    profiles: dict[str, dict] = {}
    for (method, s), rs in by_method.items():
        got = [per_run[name(r)] for r in rs]
        profiles.setdefault(method, {})[f"{s:g}"] = {
            "n": len(got),
            "overall": statistics.fmean(g["overall"] for g in got),
            "components": {c: statistics.fmean(g["components"][c] for g in got) for c in got[0]["components"]},
            "layers": {l: statistics.fmean(g["layers"][l] for g in got) for l in got[0]["layers"]},
        }
    return {"per_run": per_run, "profiles": profiles, "overlaps": overlaps, "seed_overlaps": seed_overlaps}


def cross_task_overlaps(groups: dict, analysis: dict, previous: Sequence[dict] = ()) -> list[dict]:
    """ABP masks of different tasks (same model, sparsity, seed): how task-specific the learnt masks are.
    ``analysis``: this report's per-group analysis (mask digests); ``previous``: the earlier cross-task list."""
    out = []
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for (task, model), rs in groups.items():
        for r in rs:
            if r["method"] in ABP_VARIANTS:
                by_key[(model, r["method"], r["sparsity"], r["seed"])][task] = r
    for (model, method, s, seed), tasks in sorted(by_key.items(), key=lambda kv: (kv[0][0], method_order(kv[0][1]), *kv[0][2:])):
        for ta, tb in itertools.combinations(sorted(tasks), 2):
            ids = [analysis[f"{t}-{model}"]["per_run"].get(Path(tasks[t]["run_dir"]).name, {}).get("mask") for t in (ta, tb)]
            o = _overlap(_mask_path(tasks[ta]), _mask_path(tasks[tb]), ids, previous,
                         {"model": model, "method": method, "sparsity": s, "seed": seed, "tasks": [ta, tb]})
            if o is not None:
                out.append(o)
    return out


def _budget_text(results: Sequence[dict]) -> str:
    budgets = {}
    for r in results:
        for k, v in r["budget"].items():
            if k != "abp":  # Algorithm 1's settings: listed per method (_abp_settings_text)
                budgets.setdefault(k, set()).add(json.dumps(v))
    return ", ".join(f"{k}={'/'.join(sorted(v))}" for k, v in budgets.items())


def _abp_settings_text(results: Sequence[dict]) -> str:
    """Each Algorithm-1 method's settings as recorded in its runs: ``abp``'s in full, the others where they
    differ from it (several recorded settings under one name are all listed, never merged). A setting a budget
    leaves out is at its neutral value (``ABP_OPTIONAL_SETTINGS``)."""
    seen: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(results, key=lambda r: method_order(r["method"])):
        st = r["budget"].get("abp")
        if st is not None and st not in seen[r["method"]]:
            seen[r["method"]].append(st)
    base = seen.get("abp", [None])[0]
    parts = []
    for method, settings in seen.items():
        for st in settings:
            if base is None or method == "abp":
                shown = st
            else:
                full = {**st, **{k: v for k, v in ABP_OPTIONAL_SETTINGS.items() if k not in st}}
                ref = {**ABP_OPTIONAL_SETTINGS, **base}
                shown = {k: v for k, v in full.items() if ref.get(k) != v}
            parts.append(f"`{method}`: " + (", ".join(f"{k}={json.dumps(v)}" for k, v in shown.items()) or "as `abp`"))
    return "; ".join(parts)


def copies_of_default(results: Sequence[dict]) -> set[str]:
    """The variants whose every run is the source of an ``abp`` run (``reused_from``): today's default pinned
    under its own name. Tables and figures show their runs once, as ``abp``'s."""
    sources = {r["reused_from"] for r in results if r["method"] == "abp" and r.get("reused_from")}
    names: dict[str, list[str]] = defaultdict(list)
    for r in results:
        if r["method"] != "abp":
            names[r["method"]].append(Path(r["run_dir"]).name)
    return {m for m, runs in names.items() if m in ABP_VARIANTS and all(n in sources for n in runs)}


def write_report(output: str | Path, *, plots: bool = True) -> list[Path]:
    """Rebuild every report file from the record and the finished runs under ``output/runs``; returns the
    files written."""
    output = Path(output)
    groups = collect_results(output)
    written: list[Path] = []
    if not groups:
        return written
    p = output / "analysis.json"
    previous = json.loads(p.read_text()) if p.is_file() else {}
    analysis = {f"{t}-{m}": analyze_group(rs, previous.get(f"{t}-{m}")) for (t, m), rs in groups.items()}
    analysis["cross_task"] = cross_task_overlaps(groups, analysis, previous.get("cross_task", ()))
    write_text(p, json.dumps(analysis, indent=1))
    written.append(p)
    for (task, model), rs in groups.items():
        doc = record_doc(task, model, rs)
        p = output / f"{task}-{model}.json"
        write_text(p, json.dumps(doc, indent=1))
        written.append(p)
        if plots:
            from abp.experiments.plots import plot_metric_vs_sparsity, plot_sparsity_profile

            metric = get_task(task).primary_metric
            hidden = copies_of_default(rs)
            p = output / f"fig2-{task}-{model}.png"
            rows = [row for row in doc["rows"] if row["method"] not in hidden]
            plot_metric_vs_sparsity(rows, metric, p, title=f"{task} / {model}: dev {metric} vs sparsity\n"
                                    f"(mean ± std over seeds; {rs[0]['steps']} steps)")
            written.append(p)
            prof = analysis[f"{task}-{model}"]["profiles"]
            learnt = {f"{m} s={s}": v for m in LEARNT_METHODS if m not in hidden for s, v in sorted(prof.get(m, {}).items())}
            if learnt:
                p = output / f"fig3-{task}-{model}.png"
                plot_sparsity_profile(learnt, p, title=f"{task} / {model}: where the learnt masks prune "
                                      "(mean over seeds)")
                written.append(p)
    p = output / "results.md"
    write_text(p, render_markdown(output, groups, analysis))
    written.append(p)
    return written


# ------------------------------------------------------------------------------------------ the paper's claims


def _mean(rs: Sequence[dict], method: str, sparsity: Optional[float], metric: str) -> Optional[tuple[float, int]]:
    vals = [r["metrics"][metric] for r in rs if r["method"] == method and r["sparsity"] == sparsity]
    return (statistics.fmean(vals), len(vals)) if vals else None


def check_findings(rs: Sequence[dict], metric: str) -> list[dict]:
    """The paper's findings (as the reproduction issue words them), checked on one task's finished runs.

    One row per claim and sparsity: ABP ≥ MP, ≥ IMP and ≥ Wanda at every s ≥ 0.5, ABP within 2 points of full
    fine-tuning at s = 0.5, ABP above feature extraction at s ≥ 0.5 and at least equal to it below, and ABP
    above ABP without connection recovery.
    Means over seeds. A claim whose other method (or ABP) never ran gets one row with ``holds`` None and
    ``sparsity`` None (untested, not passed); sparsities only one side ran are left out.
    """
    sparsities = sorted({r["sparsity"] for r in rs if r["sparsity"] is not None})
    claims = [("ABP ≥ MP", "mp", s, False, 0.0) for s in sparsities if s >= 0.5]
    claims += [("ABP ≥ IMP", "imp", s, False, 0.0) for s in sparsities if s >= 0.5]
    claims += [("ABP ≥ Wanda", "wanda", s, False, 0.0) for s in sparsities if s >= 0.5]
    claims += [("ABP ≥ feature extraction", "feature_extraction", s, True, 0.0) for s in sparsities if s < 0.5]
    claims += [("ABP within 2 points of fine-tuning", "finetune", 0.5, True, -0.02)]
    claims += [("ABP > feature extraction", "feature_extraction", s, True, 0.0) for s in sparsities if s >= 0.5]
    claims += [("ABP > no recovery", "abp_norecovery", s, False, 0.0) for s in sparsities]
    ran = {r["method"] for r in rs}
    out, untested = [], set()
    for claim, other, s, other_dense, margin in claims:
        a = _mean(rs, "abp", s, metric)
        b = _mean(rs, other, None if other_dense else s, metric)
        if other not in ran or "abp" not in ran:  # one row says the claim was not tested at all
            if claim not in untested:
                untested.add(claim)
                out.append({"claim": claim, "sparsity": None, "abp": None, "other": None, "other_method": other,
                            "difference": None, "holds": None})
            continue
        if a is None or b is None:  # a sparsity only one side ran: nothing to compare
            continue
        diff = round(a[0] - b[0], 9)  # a tie of means is a tie
        holds = diff > margin if claim.startswith("ABP >") else diff >= margin
        out.append({"claim": claim, "sparsity": s, "abp": a, "other": b, "other_method": other,
                    "difference": diff, "holds": holds})
    return out


def _findings_lines(task: str, model: str, metric: str, rs: Sequence[dict]) -> list[str]:
    rows = check_findings(rs, metric)
    if not rows:
        return []

    def cell(v):
        return "not run" if v is None else f"{v[0]:.4f} ({v[1]})"
    body = [[f["claim"], "—" if f["sparsity"] is None else f"{f['sparsity']:g}", cell(f["abp"]), f"{f['other_method']}: {cell(f['other'])}",
             "—" if f["difference"] is None else f"{100 * f['difference']:+.1f}",
             {True: "yes", False: "**no**", None: "untested"}[f["holds"]]] for f in rows]
    held = sum(f["holds"] is True for f in rows)
    tested = sum(f["holds"] is not None for f in rows)
    return [f"### {task} / {model}: the paper's findings, checked ({held} of {tested} tested hold)", "",
            f"Dev {metric}, mean over seeds (runs); difference in points (×100). Computed from the rows above.", ""] + \
        _table(["claim", "s", "abp", "compared with", "difference", "holds"], body) + [""]


# ------------------------------------------------------------------------------------------ markdown


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def render_markdown(output: Path, groups: dict, analysis: dict) -> str:
    everything = [r for rs in groups.values() for r in rs]
    lines = ["# Adapting by Pruning (Gao et al. 2021): reproduction with abp", "",
             f"Generated by `abp experiment` on {date.today().isoformat()} from the record (`<task>-<model>.json`, every "
             "finished run's result) and the finished runs under `runs/` (the tables are rebuilt on every call; the "
             "discussion at the end is `notes.md`, written by hand).", "",
             f"- **Budget (every run)**: {_budget_text(everything)}; dev sets in full, evaluated once at the end of "
             "each run (no selection on dev).",
             f"- **Algorithm 1's settings**: {_abp_settings_text(everything) or 'no ABP run'}.",
             f"- **Device**: {', '.join(sorted({r['device'] for r in everything}))}; seeds "
             f"{', '.join(map(str, sorted({r['seed'] for r in everything})))}.",
             "- **Cells**: mean ± sample std over seeds (n runs). `dense` = no mask (fine-tuning changes every weight; "
             "feature extraction keeps every weight frozen). Sparsity = share of the masked weights (all linear layers "
             "and embedding tables of the encoder, pooler excluded) that are pruned.",
             "- **Weights**: every method except `finetune` and `abp_reinit` ends with the pre-trained weights exactly as "
             "loaded (SHA-256 of all backbone parameters checked on every run: "
             f"{sum(bool(r['weights_untouched']) for r in everything if r['weights_must_be_untouched'])}/"
             f"{sum(bool(r['weights_must_be_untouched']) for r in everything)} runs pass).", ""]
    for (task, model), rs in groups.items():
        spec = get_task(task)
        sparsities = sorted({r["sparsity"] for r in rs if r["sparsity"] is not None})
        hidden = copies_of_default(rs)
        methods = sorted({r["method"] for r in rs} - hidden, key=method_order)
        for metric in spec.metric_keys():
            lines += [f"## {task} / {model}: dev {metric}", ""]
            body = []
            for m in methods:
                mine = [r for r in rs if r["method"] == m]
                if m in DENSE_METHODS:
                    body.append([m, _fmt([r["metrics"][metric] for r in mine])] + ["" for _ in sparsities])
                else:
                    body.append([m, ""] + [_fmt([r["metrics"][metric] for r in mine if r["sparsity"] == s])
                                           for s in sparsities])
            mp_ft = [r for r in rs if r["method"] == "mp" and (r.get("phase1") or {}).get("finetuned_metrics")]
            if mp_ft:
                body.append(["mp, its fine-tuned weights (not kept: reference only)", ""] + [
                    _fmt([r["phase1"]["finetuned_metrics"][metric] for r in mp_ft if r["sparsity"] == s]) for s in sparsities])
            lines += _table(["method", "dense"] + [f"s={s:g}" for s in sparsities], body) + [""]
            if hidden:
                lines += [", ".join(f"`{m}`" for m in sorted(hidden, key=method_order)) + " (today's default, pinned under "
                          "its own name) holds exactly the runs of `abp` and is not repeated in this section.", ""]
        lines += _findings_lines(task, model, spec.primary_metric, rs)
        lines += [f"### {task} / {model}: sparsity reached (mean over seeds)", ""]
        body = []
        for m in methods:
            if m in DENSE_METHODS:
                continue
            body.append([m] + [_fmt([r["sparsity_reached"] for r in rs if r["method"] == m and r["sparsity"] == s])
                               for s in sparsities])
        lines += _table(["method"] + [f"s={s:g}" for s in sparsities], body) + [""]
        rec = [r for r in rs if r.get("recovery")]
        if rec:
            lines += [f"### {task} / {model}: connection recovery", "",
                      "Share of the finally kept weights that were pruned (θ ≤ 0) at some sampled step; masks sampled "
                      "after every score step until the stop rule froze them (exact at step granularity). "
                      "`ever pruned` = share of all masked weights pruned at some step. The Jaccard column compares the final "
                      "pruned set with the set that prunes the lowest initial scores θ₀ of each tensor (same counts): 1 = "
                      "the mask is its initialisation's order; runs recorded before it was measured show —.", ""]
            body = []
            for m in sorted({r["method"] for r in rec} - hidden, key=method_order):
                for s in sparsities:
                    mine = [r["recovery"] for r in rec if r["method"] == m and r["sparsity"] == s]
                    if mine:
                        init = [x["init_order"] for x in mine if "init_order" in x]
                        body.append([m, f"{s:g}", _fmt([x["share_recovered"] for x in mine]),
                                     _fmt([x["ever_pruned_share"] for x in mine]),
                                     f"{_fmt([o['jaccard_pruned'] for o in init], 3)} [{statistics.fmean(o['jaccard_chance'] for o in init):.3f}]"
                                     if init else "—",
                                     "yes" if all(x["complete"] for x in mine) else "no (resumed without tracker state)"])
            lines += _table(["method", "s", "kept weights that were pruned before", "ever pruned",
                             "pruned set vs θ₀'s lowest (Jaccard [chance])", "complete"], body) + [""]
        prof = analysis[f"{task}-{model}"]["profiles"]
        learnt = [(m, s) for m in LEARNT_METHODS if m not in hidden for s in sorted(prof.get(m, {}))]
        if learnt:
            comps = [c for c in COMPONENTS if any(c in prof[m][s]["components"] for m, s in learnt)]
            lines += [f"### {task} / {model}: where the learnt masks prune (sparsity per component, mean over seeds)", ""]
            lines += _table(["method", "s"] + comps, [[m, s] + [f"{prof[m][s]['components'].get(c, float('nan')):.3f}"
                                                                  for c in comps] for m, s in learnt]) + [""]
            layers = list(prof[learnt[0][0]][learnt[0][1]]["layers"])
            lines += [f"### {task} / {model}: sparsity per layer (mean over seeds)", ""]
            lines += _table(["method", "s"] + layers, [[m, s] + [f"{prof[m][s]['layers'].get(l, float('nan')):.3f}"
                                                                   for l in layers] for m, s in learnt]) + [""]
        ov = analysis[f"{task}-{model}"]["overlaps"]
        baselines = ("random", "mp", "imp", "wanda")
        pairs = sorted({(o["a"], o["b"]) for o in ov if (o["a"] == "abp" and o["b"] != "abp_shuffled" and o["b"] not in hidden)
                        or (o["a"] in baselines and o["b"] in baselines and "random" not in (o["a"], o["b"]))},
                       key=lambda ab: (method_order(ab[0]), method_order(ab[1])))
        if pairs:
            lines += [f"### {task} / {model}: mask overlap (Jaccard of the pruned sets; chance level for independent "
                      "random masks of the same sparsities in brackets)", ""]
            body = []
            for a, b in pairs:
                row = [f"{a} vs {b}"]
                for s in sparsities:
                    mine = [o for o in ov if (o["a"], o["b"]) == (a, b) and o["sparsity"] == s]
                    row.append(f"{_fmt([o['jaccard_pruned'] for o in mine], 3)} [{statistics.fmean(o['jaccard_random'] for o in mine):.3f}]"
                               if mine else "—")
                body.append(row)
            for o_m in sorted({o["method"] for o in analysis[f"{task}-{model}"]["seed_overlaps"]} - hidden, key=method_order):
                row = [f"{o_m}, seed vs seed"]
                for s in sparsities:
                    mine = [o for o in analysis[f"{task}-{model}"]["seed_overlaps"] if o["method"] == o_m and o["sparsity"] == s]
                    row.append(f"{_fmt([o['jaccard_pruned'] for o in mine], 3)} [{statistics.fmean(o['jaccard_random'] for o in mine):.3f}]"
                               if mine else "—")
                body.append(row)
            lines += _table(["pair"] + [f"s={s:g}" for s in sparsities], body) + [""]
        lines += [f"### {task} / {model}: wall-clock per run (seconds, mean over seeds and sparsities)", ""]
        lines += _table(["method", "seconds", "runs"], [[m, f"{statistics.fmean(r['seconds'] for r in rs if r['method'] == m):.0f}",
                                                         str(sum(r["method"] == m for r in rs))] for m in methods]) + [""]
        imp = [r for r in rs if r["method"] == "imp" and "rounds_computed_here" in (r.get("phase1") or {})]
        if imp:
            computed = sum(r["phase1"]["rounds_computed_here"] for r in imp)
            lines += [f"IMP shares its rounds along one trajectory per seed (each run counts the seconds of the rounds it "
                      f"computed): {computed} rounds of {imp[0]['phase1']['round_steps']} steps in all, "
                      f"{sum(r['seconds'] for r in imp) / max(1, computed):.0f} s per round with its share of the head "
                      "training.", ""]
        lines += [f"Figures: `fig2-{task}-{model}.png` (metric vs sparsity), `fig3-{task}-{model}.png` (learnt-mask sparsity "
                  "profile). Rows: `" + f"{task}-{model}.json`.", ""]
    ct = analysis.get("cross_task", [])
    if ct:
        lines += ["## ABP masks across tasks (Jaccard of the pruned sets, same sparsity and seed)", ""]
        body = []
        for (ta, tb), s in sorted({(tuple(o["tasks"]), o["sparsity"]) for o in ct}):
            mine = [o for o in ct if tuple(o["tasks"]) == (ta, tb) and o["sparsity"] == s]
            body.append([f"{ta} vs {tb}", f"{s:g}", _fmt([o["jaccard_pruned"] for o in mine], 3),
                         f"{statistics.fmean(o['jaccard_random'] for o in mine):.3f}"])
        lines += _table(["tasks", "s", "Jaccard", "chance"], body) + [""]
    notes = output / "notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    return "\n".join(lines)
