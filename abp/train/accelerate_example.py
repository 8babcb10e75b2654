"""Recipe: abp's masked layers inside your own Hugging Face Accelerate training loop.

Run it on N processes (GPUs, or ``--cpu``) with Accelerate's own launcher::

    accelerate launch --num_processes 2 -m abp.train.accelerate_example \\
        --train-file train.csv --steps 200 --batch-size 32 --sparsity 0.5 --output out/

(or plain ``python -m abp.train.accelerate_example ...`` for one process). What matters for ABP:

1. Mask the backbone *before* ``accelerator.prepare`` (Accelerate's DDP then all-reduces the scores'
   gradients like any parameter's), and build :class:`~abp.train.score_optim.ScoreOptimizer` *after*
   it, on the unwrapped model (DDP keeps the same parameter objects; their device is now final).
2. Keep ``fused=False`` (the default): the fused update would change the scores inside the backward,
   before the all-reduce. ``ScoreOptimizer.step()`` after ``accelerator.backward`` is the exact path.
3. ``split_batches=True`` makes ``--batch-size`` the global batch, cut into equal per-process slices,
   so N processes follow the single-process trajectory (``drop_last`` keeps every batch full; the batch
   size must divide by N). ``find_unused_parameters=True`` because the scores stop needing gradients
   when the stop rule fires (``ScoreOptimizer.freeze``) while the head keeps training.
4. Counts, γ and the stop rule are computed from the all-reduced (hence identical) scores: every
   process takes the same decisions. Write the mask from the main process only.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn


class PooledClassifier(nn.Module):
    """Your model: a masked backbone, mean pooling, a linear head."""

    def __init__(self, backbone: nn.Module, num_labels: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(backbone.config.hidden_size, num_labels))

    def forward(self, input_ids, attention_mask, **kw):
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    import abp
    from abp.models import load_backbone
    from abp.train.data import load_custom
    from abp.train.score_optim import ScoreOptimizer, calibrate_score_lr

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF id or path (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--train-file", required=True, help="CSV with columns sentence,label")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="global batch (all processes together)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--head-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)

    accelerator = Accelerator(dataloader_config=DataLoaderConfiguration(split_batches=True),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    # per-process dropout streams; initial scores and head come from rank 0 (DDP broadcasts them in prepare)
    set_seed(a.seed, device_specific=True)
    backbone, tok = load_backbone(a.model)
    abp.mask_model(backbone, score_init_spread=1.0, exclude=["pooler"])
    model = PooledClassifier(backbone, num_labels=2, dropout=a.head_dropout)
    head_opt = torch.optim.AdamW(model.head.parameters(), lr=a.head_lr)

    examples = load_custom(a.train_file, text_columns=("sentence",), label_column="label", num_labels=2)

    def collate(rows):
        enc = tok([e.text_a for e in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {**enc, "labels": torch.tensor([e.label for e in rows])}

    loader = torch.utils.data.DataLoader(examples, batch_size=a.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(a.seed))
    model, head_opt, loader = accelerator.prepare(model, head_opt, loader)

    net = accelerator.unwrap_model(model)
    scores = ScoreOptimizer(net, lr=0.0, target_sparsity=a.sparsity, prune_steps=max(1, a.steps // 2))
    losses, step, batches = [], 0, iter(loader)

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = iter(loader)
            return next(batches)

    while step < a.steps:
        batch = next_batch()
        labels = batch.pop("labels")
        loss = nn.functional.cross_entropy(model(**batch).float(), labels)
        accelerator.backward(loss)  # DDP all-reduces head and score gradients here
        if step == 0:  # auto α from the first (all-reduced) gradient: the same on every process
            scores.set_lr(calibrate_score_lr(net, prune_steps=scores.prune_steps, ratio=1.5))
        if not scores.frozen:
            scores.step()  # θ ← θ − α·∇θ − γ on every process: identical scores stay identical
            if scores.done():
                scores.freeze()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)
        losses.append(float(accelerator.reduce(loss.detach(), reduction="mean")))
        step += 1

    result = {"processes": accelerator.num_processes, "steps": step, "losses": losses, "sparsity": scores.sparsity()}
    if accelerator.is_main_process:
        out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        abp.save_mask(net.backbone, out / "mask.safetensors", head=net.head, metadata={"recipe": "accelerate"})
        (out / "result.json").write_text(json.dumps(result, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
