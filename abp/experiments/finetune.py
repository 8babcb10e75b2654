"""The one small fine-tuning loop the weight-changing baselines share (finetune, mp, imp; wanda's calibration).

Backbone and head train together with AdamW (backbone ``lr ≈ 2e-5``, the head at the ABP run's ``head_lr``),
linear warm-up then linear decay, gradient-norm clipping at 1. Optional *keep masks* over the same tensors
ABP masks are re-applied (``w ← w⊙m``) after every optimiser step, so pruned weights stay exactly zero.
It reuses the data :class:`~abp.train.data.Batcher`, :class:`~abp.train.heads.Classifier` and
:func:`~abp.train.evaluate.evaluate_model`; it never touches the pre-trained files (each
:class:`FineTuner` loads its own copy of the backbone).

Not resumable mid-loop: an interrupted fine-tuning phase restarts (the runner keeps each finished
phase's masks on disk, so only the phase in flight is lost).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from abp.models import load_backbone, native_pooling
from abp.patch import MaskConfig, mask_model, masked_modules
from abp.train.data import Batcher, load_split
from abp.train.config import ABPConfig
from abp.train.evaluate import autocast_context, dev_batchers, evaluate_model
from abp.train.heads import Classifier, make_head
from abp.train.tasks import get_task
from abp.train.devices import pick_device


@dataclass
class FinetuneOptions:
    """The fine-tuning loop's own settings (everything else comes from the :class:`ABPConfig`)."""

    backbone_lr: float = 2e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # linear warm-up share of the steps, then linear decay to 0
    max_grad_norm: float = 1.0


def trainer_mask_config(cfg: ABPConfig) -> MaskConfig:
    """The :class:`MaskConfig` :class:`abp.train.trainer.Trainer` masks the backbone with."""
    return cfg.mask_config()


def maskable_weights(backbone: nn.Module, cfg: ABPConfig) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": weight [out, in]}`` of the plain backbone for every tensor the Trainer masks.

    The module set is read off a masked deep copy (so it can never drift from :func:`abp.mask_model`);
    returned tensors are views of the backbone's own weights (GPT-2 ``Conv1D`` transposed).
    """
    if cfg.mask_layernorm or cfg.mask_bias:
        raise ValueError("weight-mask baselines (mp, imp, wanda) support weight masks only: "
                         "set mask_layernorm=False and mask_bias=False")
    probe = mask_model(copy.deepcopy(backbone), trainer_mask_config(cfg))
    modules = dict(backbone.named_modules())
    out = {}
    for name, _ in masked_modules(probe):
        m = modules[name]
        out[f"{name}.weight"] = m.weight.t() if type(m).__name__ == "Conv1D" else m.weight
    return out


def task_loss(logits: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """The Trainer's loss: MSE for regression (``num_labels == 1``), cross-entropy otherwise."""
    if num_labels == 1:
        return nn.functional.mse_loss(logits.float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels.long())


def sort_dev_by_length(examples: list) -> list:
    """Dev examples ordered by text length (characters), so each evaluation batch pads to similar lengths.

    Dev metrics (accuracy, correlations, F1 ...) do not depend on the order; every example is still
    evaluated once. Measured on all-MiniLM-L6-v2, batch 64, max_length 64, 1 thread of a shared 2-core CPU:
    SST-2 dev 22.5 s vs 31.0 s in file order, STS-B dev 36.0 s vs 39.1 s, same metrics (padding is
    masked out, so outputs change only at float rounding level).
    """
    return sorted(examples, key=lambda e: len(e.text_a) + len(e.text_b or ""))


def load_task_data(cfg: ABPConfig):
    """``(task spec, train examples, {dev split: examples})`` as the Trainer loads them (dev never
    subsampled; ordered by :func:`sort_dev_by_length`)."""
    if cfg.train_file is not None:
        raise ValueError("experiments run GLUE tasks; custom train_file/dev_file runs are not supported here")
    spec = get_task(cfg.task)
    train = load_split(spec.name, "train", cfg.glue_dir, max_examples=cfg.train_subsample, seed=cfg.seed)
    devs = {split: sort_dev_by_length(load_split(spec.name, split, cfg.glue_dir)) for split in spec.dev_splits}
    return spec, train, devs


class FineTuner:
    """A fresh copy of the pre-trained backbone + a task head, fine-tuned end to end (or only inspected).

    ``masks`` (keep masks keyed like :func:`maskable_weights`) are applied at once and after every step.
    """

    def __init__(self, cfg: ABPConfig, opts: Optional[FinetuneOptions] = None, *,
                 masks: Optional[dict[str, torch.Tensor]] = None, data=None):
        cfg.validate()
        self.cfg, self.opts = cfg, opts or FinetuneOptions()
        self.device = pick_device(cfg.device)
        torch.manual_seed(cfg.seed)  # the head's initialisation, as in the Trainer
        self.task, train, devs = data or load_task_data(cfg)
        self.num_labels = self.task.num_labels
        backbone, self.tokenizer = load_backbone(cfg.model)
        c = backbone.config
        pool = native_pooling(cfg.model) if cfg.head_pool == "auto" else cfg.head_pool
        head = make_head(cfg.head, c.hidden_size, c.num_hidden_layers + 1, self.num_labels, pool=pool)
        self.model = Classifier(backbone, head, self.num_labels).to(self.device)
        self.weights = maskable_weights(self.model.backbone, cfg)
        self.masks: Optional[dict[str, torch.Tensor]] = None
        if masks is not None:
            self.set_masks(masks)
        self.train_batches = Batcher(train, self.tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                       shuffle=True, seed=cfg.seed)
        self.dev_batchers = dev_batchers(devs, self.tokenizer, batch_size=max(64, cfg.batch_size),
                                         max_length=cfg.max_length)

    # ------------------------------------------------------------------ masks
    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Keep masks from now on (zeroing the pruned weights now)."""
        if set(masks) != set(self.weights):
            raise ValueError(f"FineTuner.set_masks: keys differ from the maskable weights "
                             f"(extra {sorted(set(masks) - set(self.weights))[:3]}, missing {sorted(set(self.weights) - set(masks))[:3]})")
        self.masks = {k: v.to(self.device, torch.bool) for k, v in masks.items()}
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        if self.masks is not None:
            for k, w in self.weights.items():
                w.mul_(self.masks[k].to(w.dtype))

    # ------------------------------------------------------------------ training
    def _optimizer(self, steps: int):
        decay, no_decay = [], []
        for name, p in self.model.backbone.named_parameters():
            p.requires_grad_(True)
            (no_decay if p.dim() < 2 else decay).append(p)  # biases and LayerNorm: no weight decay
        groups = [{"params": decay, "lr": self.opts.backbone_lr, "weight_decay": self.opts.weight_decay},
                  {"params": no_decay, "lr": self.opts.backbone_lr, "weight_decay": 0.0},
                  {"params": list(self.model.head.parameters()), "lr": self.cfg.head_lr, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups)
        warm = int(self.opts.warmup_fraction * steps)

        def factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at `steps`
            if step < warm:
                return (step + 1) / (warm + 1)
            return max(0.0, (steps - step) / max(1, steps - warm))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def _batches(self) -> Iterator[dict]:
        epoch = 0
        while True:
            yield from self.train_batches.iter_batches(epoch)
            epoch += 1

    def _autocast(self):
        return autocast_context(self.device, self.cfg.autocast)

    def train(self, steps: int, *, on_step: Optional[Callable[[int], None]] = None, progress: bool = False,
              desc: str = "finetune") -> list[float]:
        """``steps`` optimiser steps; ``on_step(step)`` runs after each (1-based; e.g. gradual pruning).
        Returns the per-step training losses."""
        from tqdm.auto import tqdm

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        opt, sched = self._optimizer(steps)
        self.model.train()
        losses = []
        batches = self._batches()
        for step in tqdm(range(1, steps + 1), desc=desc, disable=not progress, dynamic_ncols=True):
            batch = {k: v.to(self.device) for k, v in next(batches).items()}
            labels = batch.pop("labels")
            with self._autocast():
                loss = task_loss(self.model(**batch), labels, self.num_labels)
            loss.backward()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"fine-tuning loss is {value} at step {step}: lower --backbone-lr")
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            self.apply_masks()
            losses.append(value)
            if on_step is not None:
                on_step(step)
        return losses

    def evaluate(self) -> dict[str, float]:
        """Dev metrics of the current (fine-tuned, masked) model."""
        return evaluate_model(self.model, self.dev_batchers, task=self.task.name, num_labels=self.num_labels,
                              autocast=self.cfg.autocast)

    # ------------------------------------------------------------------ calibration (Wanda)
    @torch.no_grad()
    def input_norms(self, n_batches: int) -> dict[str, torch.Tensor]:
        """``‖X_j‖₂`` per input feature of every maskable linear, over the real (non-padding) tokens of the
        first ``n_batches`` training batches (epoch 0 order), in eval mode (no dropout)."""
        if n_batches < 1:
            raise ValueError(f"n_batches must be >= 1, got {n_batches}")
        modules = dict(self.model.backbone.named_modules())
        sums: dict[str, torch.Tensor] = {}
        token_mask: dict[str, torch.Tensor] = {}
        hooks = []

        def hook_for(key: str):
            def hook(_mod, inputs, _out):
                x = inputs[0]
                keep = token_mask["m"]
                rows = x[keep] if x.dim() == 3 and keep.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])
                sq = rows.float().pow(2).sum(0)
                sums[key] = sums[key] + sq if key in sums else sq
            return hook

        for key in self.weights:
            mod = modules[key.rsplit(".", 1)[0]]
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                hooks.append(mod.register_forward_hook(hook_for(key)))
        was_training = self.model.training
        self.model.eval()
        try:
            for i, batch in enumerate(self.train_batches.iter_batches(0)):
                if i == n_batches:
                    break
                batch = {k: v.to(self.device) for k, v in batch.items()}
                batch.pop("labels")
                token_mask["m"] = batch["attention_mask"].bool()
                self.model(**batch)
        finally:
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        return {k: v.sqrt() for k, v in sums.items()}
