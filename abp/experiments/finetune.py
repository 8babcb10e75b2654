"""The one small fine-tuning loop the weight-changing baselines share (finetune, mp, imp; wanda's calibration).

Backbone and head train together with AdamW (backbone ``lr ≈ 2e-5``, the head at the ABP run's ``head_lr``),
linear warm-up then linear decay, gradient-norm clipping at 1. Optional *keep masks* over the same tensors
ABP masks are re-applied (``w ← w⊙m``) after every optimiser step, so pruned weights stay exactly zero.
It reuses the data :class:`~abp.train.data.Batcher`, :class:`~abp.train.heads.Classifier` and
:func:`~abp.train.evaluate.evaluate_model`; it never touches the pre-trained files (each
:class:`FineTuner` loads its own copy of the backbone).

Resumable: :meth:`FineTuner.train` with ``checkpoint=PATH`` writes the loop's whole state there every
``checkpoint_every`` steps (:mod:`abp.experiments.finetune_checkpoint`: weights, AdamW, LR schedule, keep masks,
losses, RNG, the caller's ``extra`` state) and, when the file exists at the start, resumes from it; the resumed
run ends bit-identical (on CPU) to an uninterrupted one. A checkpoint of another run is refused, never silently
restarted over.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from abp.models import load_backbone
from abp.patch import MaskConfig, mask_model, masked_modules
from abp.train.checkpoint import CheckpointError, _digest, restore_rng_states
from abp.train.data import Batcher, load_split
from abp.train.config import RESUMABLE_CHANGES, ABPConfig
from abp.train.evaluate import autocast_context, dev_batchers, evaluate_model
from abp.train.heads import Classifier, make_head, resolve_pool
from abp.train.tasks import get_task
from abp.train.devices import pick_device

log = logging.getLogger("abp")

# ABPConfig settings the fine-tuning loop never reads (Algorithm 1's own; max_steps, as ``train`` is handed its
# steps) or that may change across a resume (RESUMABLE_CHANGES). They are left out of a fine-tuning checkpoint's
# identity, so runs that share a phase (the IMP rounds of one trajectory, whatever its target) share its
# checkpoint; every other setting, any added later included, must match for a resume.
NOT_READ_BY_FINETUNING = frozenset({
    "target_sparsity", "score_lr", "score_lr_ratio", "gamma", "warmup_fraction", "prune_fraction", "schedule", "t_l",
    "t_s", "score_init", "score_init_mode", "score_init_spread", "score_init_std", "unused_token_scale",
    "score_optimizer", "recovery", "head_optimizer", "max_steps", "epochs", "grad_accum", "eval_every",
    "checkpoint_every", "keep_best", "backbone_dtype", "fused_update", "allocation"}) | RESUMABLE_CHANGES


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
        pool = resolve_pool(cfg.head_pool, cfg.model, self.task.text_b is not None)
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

    def _batches(self, step: int = 0) -> Iterator[dict]:
        """Training batches epoch after epoch, from the one step ``step + 1`` takes on (a pure function of
        (seed, epoch, index): a resumed run skips the batches it has seen without tokenising them again)."""
        epoch, start = divmod(step, len(self.train_batches))
        while True:
            yield from self.train_batches.iter_batches(epoch, start)
            epoch, start = epoch + 1, 0

    def _autocast(self):
        return autocast_context(self.device, self.cfg.autocast)

    def train(self, steps: int, *, on_step: Optional[Callable[[int], None]] = None, progress: bool = False,
              desc: str = "finetune", checkpoint: Optional[str | os.PathLike] = None,
              checkpoint_every: Optional[int] = None, identity: Optional[dict[str, Any]] = None,
              extra: Optional[dict[str, Any]] = None, keep_checkpoint: bool = False) -> list[float]:
        """``steps`` optimiser steps; ``on_step(step)`` runs after each (1-based; e.g. gradual pruning).
        Returns the per-step training losses (of the whole loop, also when it resumed).

        With ``checkpoint`` (a file path) the loop's state is written there atomically every ``checkpoint_every``
        steps (default ``steps // 4``, at least 1), after that step's ``on_step``. When the file exists as
        ``train`` starts, the loop resumes from it, data order and dropout included, and ends bit-identical (on
        CPU) to an uninterrupted run. The file must belong to this run: the same ``steps``, parameters (names and
        shapes), fine-tuning settings, starting weights and masks, and ``identity`` (the caller's JSON dict, e.g.
        ``{"method": "mp", "task": "sst2", "seed": 0, "sparsity": 0.5}``); otherwise
        :class:`~abp.train.checkpoint.CheckpointError` names the file and the fields that differ (never a silent
        restart). ``extra`` is the caller's JSON-serialisable state that ``on_step`` keeps (e.g. MP's pruning
        events): each checkpoint holds it, and a resume replaces its contents, in place, by the saved ones before
        the first step. The file is deleted after the last step; with ``keep_checkpoint`` a checkpoint of the
        finished loop is written instead (a rerun then returns at once, restored), for the caller to delete once
        it has saved what it makes of the result.
        """
        from tqdm.auto import tqdm

        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        every = max(1, steps // 4) if checkpoint_every is None else checkpoint_every
        if every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        extra = {} if extra is None else extra
        opt, sched = self._optimizer(steps)
        self.model.train()
        losses: list[float] = []
        start, ident = 0, None
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            ident = self._checkpoint_identity(steps, identity or {}, extra)
            if checkpoint.exists():
                start, losses = self._restore(checkpoint, ident, steps, opt, sched, extra)
        batches = self._batches(start)
        for step in tqdm(range(start + 1, steps + 1), initial=start, total=steps, desc=desc, disable=not progress,
                         dynamic_ncols=True):
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
            if checkpoint is not None and (step % every == 0 if step < steps else keep_checkpoint):
                self._save_checkpoint(checkpoint, opt, sched, step, losses, ident, extra)
        if checkpoint is not None and not keep_checkpoint:
            checkpoint.unlink(missing_ok=True)
        return losses

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_identity(self, steps: int, identity: dict, extra: dict) -> dict:
        """What a checkpoint of this loop must match to be resumed (as the file holds it: JSON)."""
        try:
            json.dumps(extra)
            json.dumps(identity)
        except (TypeError, ValueError) as e:
            raise TypeError(f"FineTuner.train: identity and extra must be JSON-serialisable ({e})") from e
        start = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        start.update({f"masks/{k}": m.to(torch.uint8) for k, m in (self.masks or {}).items()})
        ident = {"steps": steps, "run": identity, "masked": self.masks is not None,
                 "settings": {k: v for k, v in self.cfg.to_dict().items() if k not in NOT_READ_BY_FINETUNING},
                 "options": dataclasses.asdict(self.opts), "start_digest": _digest(start, {})}
        return json.loads(json.dumps(ident))

    def _save_checkpoint(self, path: Path, opt, sched, step: int, losses: list[float], ident: dict,
                         extra: dict) -> None:
        from abp.experiments.finetune_checkpoint import save_finetune_checkpoint

        save_finetune_checkpoint(path, model=self.model, optimizer=opt, scheduler=sched, masks=self.masks, step=step,
                                 losses=losses, identity=ident, extra=extra)

    def _restore(self, path: Path, ident: dict, steps: int, opt, sched, extra: dict) -> tuple[int, list[float]]:
        """Load the checkpoint at ``path`` into the model, masks, optimiser, scheduler, RNG and ``extra``, after
        checking it is this run's; returns ``(step, losses)``."""
        from abp.experiments.finetune_checkpoint import load_finetune_checkpoint

        ck = load_finetune_checkpoint(path)
        def refuse(why: str) -> CheckpointError:
            return CheckpointError(f"cannot resume fine-tuning from {path}: {why}; delete the file to start this "
                                   "phase over")

        own, saved = self.model.state_dict(), ck["model"]
        missing, unknown = sorted(set(own) - set(saved)), sorted(set(saved) - set(own))
        shapes = [f"{k} {list(saved[k].shape)} vs {list(own[k].shape)}" for k in own
                  if k in saved and saved[k].shape != own[k].shape]
        if missing or unknown or shapes:
            raise refuse(f"its parameters are not this model's (missing {missing[:3]}, unknown {unknown[:3]}, "
                         f"other shapes {shapes[:3]})")
        was, now = _flat(ck["identity"]), _flat(ident)
        diff = sorted(k for k in was.keys() | now.keys() if was.get(k, "<absent>") != now.get(k, "<absent>"))
        if diff:
            shown = "; ".join(f"{k}: checkpoint {was.get(k, '<absent>')!r}, this run {now.get(k, '<absent>')!r}"
                              for k in diff[:6])
            raise refuse(f"it belongs to another run ({len(diff)} field(s) differ: {shown})")
        masks = ck["masks"]
        if (masks is None) != (self.masks is None):
            raise refuse("it has masks and this run none" if masks is not None else "it has no masks, this run has")
        if masks is not None:
            bad = sorted(k for k in set(masks) | set(self.weights)
                         if k not in masks or k not in self.weights or masks[k].shape != self.weights[k].shape)
            if bad:
                raise refuse(f"its masks do not fit the maskable weights ({bad[:3]})")
        step = ck["step"]
        if not 0 <= step <= steps:
            raise refuse(f"it is at step {step} of {steps}")
        try:
            with torch.no_grad():
                self.model.load_state_dict(saved)
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict({"lr_lambdas": [None] * len(opt.param_groups), **ck["scheduler"]})
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise refuse(f"its optimiser or schedule state does not fit ({type(e).__name__}: {e})") from e
        if masks is not None:
            self.masks = {k: masks[k].to(self.device) for k in self.weights}
        extra.clear()
        extra.update(ck["extra"])
        restore_rng_states(ck["rng"])
        log.info("abp: resumed fine-tuning from %s at step %d of %d", path, step, steps)
        return step, ck["losses"]

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


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as ``{"a.b": value}`` (so a mismatch names its field)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
