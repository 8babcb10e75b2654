"""Render abp's benchmark results: a Markdown table and PNG plots.

    python bench/report.py --markdown              # the table, from every JSON under bench/results/
    python bench/report.py                         # the table, and the plots into bench/results/plots/
    python bench/report.py FILE.json ... --plots   # only the plots, from the given files

Rows from several files are merged per device; when the same (bench, impl, dtype, shape) was measured more
than once on a device, the newest run's row wins. Quick (CI) runs are left out unless ``--include-quick``.
In the tables ``×dense`` and ``×eager`` are time ratios (0.5 = twice as fast as the baseline); the "dense"
baseline of ``abp_step`` is plain fine-tuning, of ``multi_bitmask_linear`` one dense copy per task.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results"
BENCH_ORDER = ("linear_fwd", "linear_fwd_bwd", "abp_step", "bitmask_linear", "multi_bitmask_linear", "multitask_serve")
IMPL_ORDER = ("dense", "finetune", "frozen", "dense_per_task", "eager", "compile", "materialise", "reference", "abp_v1", "abp",
              "abp_v2", "abp_v2_a", "abp_fused_update", "abp_v2_fused_update", "abp_gemv", "abp_gemm", "abp_gemm_a",
              "abp_adam", "abp_mix")
ROW_KEYS = ("bench", "impl", "dtype", "shape", "median_ms")


# --------------------------------------------------------------------------- loading

# The "dense" baseline of each bench (``x_dense``); ``x_eager`` is always relative to impl "eager".
DENSE_BASELINE = {"abp_step": "finetune", "multi_bitmask_linear": "dense_per_task", "multitask_serve": "dense_per_task"}


def add_ratios(rows: list[dict]) -> None:
    """Set ``x_dense`` / ``x_eager`` on every row: its time over its group's (bench, dtype, shape) baseline."""
    times = {(r["bench"], r["dtype"], r["shape"], r["impl"]): r.get("median_ms") for r in rows}
    for r in rows:
        key = (r["bench"], r["dtype"], r["shape"])
        for field, impl in (("x_dense", DENSE_BASELINE.get(r["bench"], "dense")), ("x_eager", "eager")):
            base = times.get(key + (impl,))
            r[field] = (r["median_ms"] / base) if (base and r.get("median_ms")) else None


def load(paths: list[Path], include_quick: bool = False) -> dict[str, dict]:
    """``{device: {"meta": newest run's header, "runs": [...], "rows": [...]}}`` merged over ``paths``."""
    runs = []
    for p in paths:
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"report: cannot read {p}: {e}")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise SystemExit(f"report: {p} is not an abp bench result (no 'rows' list)")
        for r in data["rows"]:
            missing = [k for k in ROW_KEYS if k not in r]
            if missing:
                raise SystemExit(f"report: a row of {p} lacks {missing}: {r}")
        if data.get("grid") == "quick" and not include_quick:
            continue
        runs.append((data.get("date", ""), p, data))
    out: dict[str, dict] = {}
    for date, p, data in sorted(runs, key=lambda t: t[0]):  # newest last: its rows win
        dev = data.get("device_slug") or _slug(data.get("device", "unknown"))
        entry = out.setdefault(dev, {"runs": [], "rows": {}})
        entry["runs"].append({k: v for k, v in data.items() if k != "rows"} | {"file": str(p)})
        for r in data["rows"]:
            entry["rows"][(r["bench"], r["impl"], r["dtype"], r["shape"])] = r
    for entry in out.values():
        entry["meta"] = entry["runs"][-1]
        entry["rows"] = list(entry["rows"].values())
        add_ratios(entry["rows"])  # again after merging: a baseline may come from another run
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_files() -> list[Path]:
    """Kernel bench results: ``bench/results/<device>/*.json`` (``plots/`` and ``paper/`` hold other things)."""
    return sorted(p for p in RESULTS.glob("*/*.json") if p.parent.name not in ("plots", "paper"))


def parse_shape(shape: str) -> dict:
    """``"tokens=64,in=384,out=1536"`` → ``{"tokens": 64, "in": 384, "out": 1536}`` (numbers where numeric)."""
    out = {}
    for part in shape.split(","):
        k, _, v = part.partition("=")
        out[k] = int(v) if v.isdigit() else v
    return out


def _shape_key(shape: str):
    return tuple((k, (0, v) if isinstance(v, int) else (1, str(v))) for k, v in parse_shape(shape).items())


def _impl_key(impl: str):
    return (IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER), impl)


# --------------------------------------------------------------------------- markdown

def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        mag = abs(v)
        return f"{v:.{digits}g}" if mag < 1000 else f"{v:,.0f}"
    return str(v)


def _ratio(v):
    return "" if v is None else f"×{v:.2f}"


COLUMNS = [  # header, row → cell
    ("shape", lambda r: r["shape"]),
    ("dtype", lambda r: r["dtype"]),
    ("impl", lambda r: r["impl"]),
    ("backend", lambda r: r.get("backend") or ""),
    ("ms", lambda r: _fmt(r.get("median_ms")) if r.get("median_ms") is not None else f"skipped: {r.get('error', '?')}"),
    ("req/s", lambda r: _fmt(r.get("requests_per_s"))),
    ("TFLOP/s", lambda r: _fmt(r.get("tflops"))),
    ("×dense", lambda r: _ratio(r.get("x_dense"))),
    ("×eager", lambda r: _ratio(r.get("x_eager"))),
    ("peak MB", lambda r: _fmt(r.get("peak_mem_mb"))),
    ("state MB", lambda r: _fmt(r.get("state_mb"))),
    ("total MB", lambda r: _fmt(r.get("total_mb"))),
    ("stored MB", lambda r: _fmt(r.get("stored_mb"))),
]


def markdown(results: dict[str, dict]) -> str:
    lines = []
    for dev in sorted(results):
        meta = results[dev]["meta"]
        lines += [f"### {meta.get('device', dev)}", "",
                  f"torch {meta.get('torch')}, triton {meta.get('triton')}, cuda {meta.get('cuda')}, "
                  f"commit {meta.get('commit')}{' (dirty)' if meta.get('dirty') else ''}, {meta.get('date')}, "
                  f"timer {meta.get('timer')}, memory {meta.get('mem_method')}, torch threads {meta.get('torch_threads')}, "
                  f"load average {meta.get('loadavg_1min')}; "
                  f"{len(results[dev]['runs'])} run(s) merged.", ""]
        by_bench = defaultdict(list)
        for r in results[dev]["rows"]:
            by_bench[r["bench"]].append(r)
        for bench in sorted(by_bench, key=lambda b: (BENCH_ORDER.index(b) if b in BENCH_ORDER else 99, b)):
            rows = sorted(by_bench[bench], key=lambda r: (r["dtype"], _shape_key(r["shape"]), _impl_key(r["impl"])))
            cols = [(h, f) for h, f in COLUMNS if any(f(r) for r in rows)]
            lines += [f"#### {bench}", "", "| " + " | ".join(h for h, _ in cols) + " |",
                      "|" + "|".join("---:" if h not in ("shape", "dtype", "impl", "backend") else "---" for h, _ in cols) + "|"]
            prev = None
            for r in rows:
                cells = [f(r) for _, f in cols]
                group = (r["shape"], r["dtype"])
                if group == prev:  # shape and dtype only on a group's first line
                    cells[0] = cells[1] = ""
                prev = group
                lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
            lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots

def plots(results: dict[str, dict], out_dir: Path) -> list[Path]:
    """Speed and peak memory vs tokens per shape (linear, bitmask), bars for the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for dev, entry in sorted(results.items()):
        rows = [r for r in entry["rows"] if r.get("median_ms") is not None]
        groups = defaultdict(list)
        for r in rows:
            groups[(r["bench"], r["dtype"])].append(r)
        for (bench, dtype), rs in sorted(groups.items()):
            if bench == "abp_step":
                written.append(_step_bars(plt, dev, dtype, rs, out_dir))
                continue
            xkey = "tasks" if bench in ("multi_bitmask_linear", "multitask_serve") else "tokens"
            metrics = [("speed", "TFLOP/s", "tflops")] if bench.startswith("linear") else [("time", "ms", "median_ms")]
            metrics.append(("mem", "peak MB", "peak_mem_mb"))
            for tag, label, field in metrics:
                written.append(_lines(plt, dev, bench, dtype, rs, xkey, label, field, out_dir / f"{dev}_{bench}_{dtype}_{tag}.png"))
    return [p for p in written if p is not None]


def _lines(plt, dev, bench, dtype, rows, xkey, label, field, path):
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        s = parse_shape(r["shape"])
        if r.get(field) is None or xkey not in s:
            continue
        panel = f"model={s['model']}" if "model" in s else f"in={s.get('in')} out={s.get('out')}"
        panels[panel][r["impl"]].append((s[xkey], r[field]))
    if not panels:
        return None
    names = sorted(panels, key=lambda n: [int(x) for x in re.findall(r"\d+", n)])
    cols = min(3, len(names))
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.3 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for impl in sorted(panels[name], key=_impl_key):
            pts = sorted(panels[name][impl])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xkey)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{bench} {dtype} — {dev}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _step_bars(plt, dev, dtype, rows, out_dir):
    configs = sorted({r["shape"] for r in rows}, key=_shape_key)
    impls = sorted({r["impl"] for r in rows}, key=_impl_key)
    val = {(r["shape"], r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(configs) * 2), 4))
    width = 0.8 / max(1, len(impls))
    for ax, (field, label) in zip(axes, (("median_ms", "ms per step"), ("total_mb", "memory (state + peak), MB"))):
        for i, impl in enumerate(impls):
            ys = [(val.get((c, impl)) or {}).get(field) or 0 for c in configs]
            ax.bar([j + i * width for j in range(len(configs))], ys, width, label=impl)
        ax.set_xticks([j + width * (len(impls) - 1) / 2 for j in range(len(configs))])
        ax.set_xticklabels([c.replace("model=", "").replace(",", "\n") for c in configs], fontsize=7)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"abp_step {dtype} — {dev}", fontsize=10)
    fig.tight_layout()
    path = out_dir / f"{dev}_abp_step_{dtype}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", type=Path, help="result JSON files (default: all under bench/results/)")
    ap.add_argument("--markdown", action="store_true", help="print the Markdown table (only)")
    ap.add_argument("--plots", action="store_true", help="write the PNG plots (only)")
    ap.add_argument("--plots-dir", type=Path, default=RESULTS / "plots", help="where plots go (default bench/results/plots)")
    ap.add_argument("--include-quick", action="store_true", help="also use quick (CI) runs")
    args = ap.parse_args(argv)
    files = args.files or default_files()
    if not files:
        print(f"report: no result files (looked under {RESULTS}); run the bench suite first", file=sys.stderr)
        return 1
    results = load(files, include_quick=args.include_quick)
    if not results:
        print("report: only quick (CI) runs found; pass --include-quick to render them", file=sys.stderr)
        return 1
    both = not (args.markdown or args.plots)
    if args.markdown or both:
        print(markdown(results))
    if args.plots or both:
        for p in plots(results, args.plots_dir):
            print(f"wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
