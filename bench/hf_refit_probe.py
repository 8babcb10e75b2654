"""What the head refit gains in a ``transformers.Trainer`` script: the README's two-phase example, measured.

Per (sparsity, seed) cell: a masked ``AutoModelForSequenceClassification`` (the embedded MiniLM by default) runs
phase 1 (``abp.hf.optimizers``: Algorithm 1 to ``--sparsity``, the head trained alongside) for ``--steps``, and its
dev metrics are taken with the hard mask; then phase 2 (``abp.hf.head_refit_optimizers``: the mask fixed, a fresh
AdamW on the Hugging Face head) for as many steps, and the dev metrics again. Each finished cell is written to
``--output`` (JSON, atomically) as it ends, so a stopped run resumes at the first cell it lacks.

    ABP_GLUE_DIR=../shared/data/glue python -P bench/hf_refit_probe.py --task sst2 --sparsities 0.5 0.9 \\
        --seeds 0 1 2 --output bench/results/hf-refit/sst2-all-MiniLM-L6-v2.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments)

import abp
import abp.hf
from abp._atomic import write_text
from abp.models import resolve_model
from abp.provenance import code_version
from abp.train.evaluate import dev_batchers, predict
from abp.train.glue import load_split
from abp.train.metrics import evaluate_splits, primary_metric
from abp.train.tasks import get_task


def encode(tok, examples, max_length: int) -> list[dict]:
    """Trainer rows: the tokenizer's fields and ``labels``."""
    rows = []
    for e in examples:
        enc = tok(e.text_a, e.text_b, truncation=True, max_length=max_length) if e.text_b is not None \
            else tok(e.text_a, truncation=True, max_length=max_length)
        rows.append({**enc, "labels": e.label})
    return rows


class Logits(torch.nn.Module):
    """A ``…ForSequenceClassification`` as :func:`abp.train.evaluate.predict` reads a model: logits, a regression
    head's squeezed to one value per row."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **batch):
        logits = self.model(**batch).logits
        return logits.squeeze(-1) if logits.shape[-1] == 1 else logits


def dev_metrics(model, spec, batchers: dict) -> dict:
    """The task's dev metrics with the hard mask ``1[θ>0]`` (what the mask file holds)."""
    outputs = predict(Logits(model), batchers)
    return evaluate_splits(spec, {k: (p.numpy(), y.numpy()) for k, (p, y) in outputs.items()})


def run_cell(a, spec, tok, train, batchers, sparsity: float, seed: int, workdir: str) -> dict:
    def args(sub):
        return TrainingArguments(os.path.join(workdir, sub), max_steps=a.steps, per_device_train_batch_size=a.batch_size,
                                 learning_rate=a.head_lr, logging_steps=50, save_strategy="no", report_to=[],
                                 use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(),
                                 seed=seed, disable_tqdm=True, dataloader_num_workers=0)

    torch.manual_seed(seed)  # the new classifier's initialisation
    model = AutoModelForSequenceClassification.from_pretrained(a.model_path, num_labels=spec.num_labels)
    abp.hf.mask_model(model)  # θ0 draws from the seeded global generator too
    cell = {"sparsity_target": sparsity, "seed": seed}
    for phase, make in (("prune", lambda ar: abp.hf.optimizers(model, ar, target_sparsity=sparsity)),
                        ("refit", lambda ar: abp.hf.head_refit_optimizers(model, ar))):
        ar = args(phase)
        opt, sched = make(ar)
        t0 = time.perf_counter()
        Trainer(model=model, args=ar, train_dataset=train, data_collator=DataCollatorWithPadding(tok),
                optimizers=(opt, sched), callbacks=[abp.hf.ABPCallback(task=spec.name)]).train()
        cell[phase] = {"seconds": round(time.perf_counter() - t0, 1), "sparsity": abp.sparsity(model),
                       "metrics": dev_metrics(model, spec, batchers)}
    key = primary_metric(spec)
    cell["refit_gain_points"] = 100 * (cell["refit"]["metrics"][key] - cell["prune"]["metrics"][key])
    return cell


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=None, help="HF id or path (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=400, help="each phase's Trainer steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--train-subsample", type=int, default=8000)
    p.add_argument("--head-lr", type=float, default=1e-3, help="the Trainer's learning_rate (the head's AdamW)")
    p.add_argument("--glue-dir", default=None, help="local GLUE folder (default: $ABP_GLUE_DIR, else the hub)")
    p.add_argument("--output", required=True, help="JSON file; its finished cells are kept and skipped")
    a = p.parse_args(argv)
    a.model_path = resolve_model(a.model)
    spec = get_task(a.task)
    settings = {k: getattr(a, k) for k in ("task", "model", "steps", "batch_size", "max_length", "train_subsample",
                                           "head_lr")}
    record = {"settings": settings, "cells": []}
    if os.path.exists(a.output):
        with open(a.output) as f:
            record = json.load(f)
        if record.get("settings") != settings:
            raise ValueError(f"{a.output} was recorded with other settings ({record.get('settings')}); "
                             f"pass another --output or the same settings ({settings})")
    done = {(c["sparsity_target"], c["seed"]) for c in record["cells"]}
    tok = AutoTokenizer.from_pretrained(a.model_path)
    train = encode(tok, load_split(spec.name, "train", a.glue_dir, max_examples=a.train_subsample, seed=0),
                   a.max_length)
    batchers = dev_batchers({s: load_split(spec.name, s, a.glue_dir) for s in spec.dev_splits}, tok,
                            max_length=a.max_length)
    todo = [(s, seed) for s in a.sparsities for seed in a.seeds if (s, seed) not in done]
    for s, seed in tqdm(todo, desc="cells"):
        with tempfile.TemporaryDirectory() as work:
            cell = run_cell(a, spec, tok, train, batchers, s, seed, work)
        record["cells"].append(cell)
        record["code"] = code_version()
        record["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else \
            f"CPU, {torch.get_num_threads()} thread(s)"
        os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
        write_text(a.output, json.dumps(record, indent=1))
        tqdm.write(f"s={s} seed={seed}: prune {cell['prune']['metrics']} refit {cell['refit']['metrics']} "
                   f"({cell['refit_gain_points']:+.2f} points)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
