"""Which weights does ABP's score gradient prune first, and what does removing them cost?

A one-shot probe of the mechanism behind the CPU grid's results (``bench/results/paper/notes.md``).
The frozen backbone and the task head of a finished ``feature_extraction`` run of the grid are loaded;
the surrogate score gradient ∂L/∂θ (Algorithm 1's, at θ = init for every weight, so m = 1) is summed
over ``--batches`` training batches; then ``--fraction`` of every masked tensor is pruned by one rule at
a time and the training loss is measured on 20 other batches (eval mode: no dropout). Rules:

- ``abp_rule``: the largest summed ∂L/∂θ, i.e. the scores that plain SGD drives below zero first;
- ``random``; ``largest_abs_sum`` (|Σ ∂L/∂θ|); ``largest_sensitivity`` / ``smallest_sensitivity``
  (Σ |∂L/∂θ| over the batches, a first-order importance); ``smallest_abs_sum``;
- ``abp_rule`` and ``random`` restricted to one component or one layer at a time.

Usage (after the grid has run ``feature_extraction`` for the task)::

    ABP_GLUE_DIR=../shared/data/glue python bench/paper_probe.py --task sst2 \\
        --grid bench/results/paper --output bench/results/paper/probe-sst2-all-MiniLM-L6-v2.json
"""
from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

import torch

import abp
from abp.experiments.analysis import component_of, layer_of
from abp.experiments.methods import model_label
from abp.train.config import ABPConfig
from abp.train.tasks import get_task
from abp.train.trainer import Trainer

HELD_OUT = 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=None, help="HF id or path (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--glue-dir", default=None, help="local GLUE folder (default: ABP_GLUE_DIR, else the hub)")
    p.add_argument("--grid", default="bench/results/paper", help="the grid's output folder (its runs/ are read)")
    p.add_argument("--batches", type=int, default=25)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.time()
    fe_run = Path(a.grid) / "runs" / f"{get_task(a.task).name}-{model_label(a.model)}" / "feature_extraction-seed0"
    fe = fe_run / "mask.safetensors"
    if not (fe_run / "result.json").is_file() or not fe.is_file():
        raise SystemExit(f"{fe_run} holds no finished run: run the grid's feature_extraction for {a.task} first")
    # The grid's budget and data order (the run's seed 0): the probe sees the batches its runs saw.
    budget = json.loads((fe_run / "result.json").read_text())["budget"]
    cfg = ABPConfig(model=a.model, task=a.task, glue_dir=a.glue_dir, train_subsample=budget["train_subsample"],
                    batch_size=budget["batch_size"], max_length=budget["max_length"], max_steps=budget["max_steps"],
                    seed=0, device="cpu")
    t = Trainer(cfg, Path(a.output).parent / f".probe-{a.task}", progress=False)  # writes nothing there
    abp.load_mask(t.model.backbone, fe, head=t.model.head)
    t.model.eval()
    mods = list(abp.masked_modules(t.model.backbone))
    init = cfg.score_init
    for _, m in mods:
        m.scores.data.fill_(init)

    def loss_of(batch: dict) -> torch.Tensor:
        batch = dict(batch)
        labels = batch.pop("labels")
        return t._loss(t.model(**batch), labels)  # the Trainer's own loss (cross-entropy, or MSE for regression)

    batches = t._batches()  # the Trainer's own order from step 0, epoch after epoch
    total = [torch.zeros_like(m.scores) for _, m in mods]
    sens = [torch.zeros_like(m.scores) for _, m in mods]
    for _ in range(a.batches):
        t.model.zero_grad(set_to_none=True)
        loss_of(next(batches)).backward()
        for tot, s, (_, m) in zip(total, sens, mods):
            tot += m.scores.grad
            s += m.scores.grad.abs()
    held = [next(batches) for _ in range(HELD_OUT)]

    def held_loss() -> float:
        with torch.no_grad():
            return sum(float(loss_of(b)) for b in held) / len(held)

    def prune_by(rule, where=lambda name: True) -> float:
        for (name, m), tot, s in zip(mods, total, sens):
            if not where(name):
                continue
            k = max(1, int(a.fraction * tot.numel()))
            picked = torch.topk(rule(tot, s).reshape(-1), k).indices
            flat = torch.full((tot.numel(),), init)
            flat[picked] = -init
            m.scores.data.copy_(flat.view_as(tot))
        loss = held_loss()
        for _, m in mods:
            m.scores.data.fill_(init)
        return loss

    g = torch.Generator().manual_seed(0)
    rand = lambda tot, s: torch.rand(tot.shape, generator=g)  # noqa: E731
    abp_rule = lambda tot, s: tot  # noqa: E731
    losses = {"dense": held_loss(), "abp_rule": prune_by(abp_rule), "random": prune_by(rand),
              "largest_abs_sum": prune_by(lambda tot, s: tot.abs()),
              "largest_sensitivity": prune_by(lambda tot, s: s),
              "smallest_sensitivity": prune_by(lambda tot, s: -s),
              "smallest_abs_sum": prune_by(lambda tot, s: -tot.abs())}
    names = [f"{n}.weight" for n, _ in mods]  # the analysis keys tensors as "<module>.weight"
    parts = {"component": sorted({component_of(n) for n in names}), "layer": sorted({layer_of(n) for n in names})}
    by_part = {kind: {p: {"abp_rule": prune_by(abp_rule, lambda n, p=p, f=f: f(f"{n}.weight") == p),
                          "random": prune_by(rand, lambda n, p=p, f=f: f(f"{n}.weight") == p)} for p in ps}
               for kind, ps, f in (("component", parts["component"], component_of),
                                   ("layer", parts["layer"], layer_of))}
    overlap = []
    for tot, s in zip(total, sens):
        k = max(1, int(a.fraction * tot.numel()))
        picked = set(torch.topk(tot.reshape(-1), k).indices.tolist())
        sensitive = set(torch.topk(s.reshape(-1), k).indices.tolist())
        overlap.append(len(picked & sensitive) / k)
    doc = {"task": a.task, "model": model_label(a.model), "budget": budget, "date": date.today().isoformat(), "device": "cpu",
           "torch": torch.__version__, "head": str(fe), "batches": a.batches, "fraction": a.fraction,
           "held_out_batches": HELD_OUT, "metric": "mean training loss on the held-out batches",
           "loss": losses, "loss_by_part": by_part,
           "abp_picks_among_most_sensitive": {"median_over_tensors": sorted(overlap)[len(overlap) // 2],
                                              "chance": a.fraction},
           "seconds": round(time.time() - t_start, 1)}
    Path(a.output).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["loss"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
