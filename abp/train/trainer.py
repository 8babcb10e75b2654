"""Algorithm 1 end to end: mask a pre-trained backbone, learn the scores and the head, stop pruning at
the target sparsity, keep training the head, keep the best mask by dev metric, resume after a crash.

Writes into ``output_dir``: ``mask.safetensors`` (packed mask + head), ``metrics.json``,
``history.json`` (every eval) and ``checkpoint.safetensors`` (for ``resume=True``).

Under ``torchrun`` the same loop runs data-parallel; everything that differs lives in the run's
:class:`~abp.train.strategy.Strategy` (:mod:`abp.train.parallel`), reached through ``self.dist``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import abp
from abp import backends
from abp._atomic import atomic_path, write_text
from abp.models import load_backbone, resolve_model
from abp.patch import mask_model, masked_modules, score_tensors
from abp.train.data import Batcher, load_custom, load_split, subsample
from abp.train.checkpoint import CheckpointError, load_checkpoint, restore_rng_states, save_checkpoint
from abp.train.config import RESUMABLE_CHANGES, ABPConfig
from abp.train.devices import pick_device
from abp.train.distributed import local_shard
from abp.train.heads import Classifier, make_head, resolve_pool
from abp.train.evaluate import autocast_context, dev_batchers
from abp.train.parallel import make_strategy
from abp.train.score_optim import FusedUpdateError, adam_score_lr
from abp.train.tasks import get_task

log = logging.getLogger("abp")



def masked_linears_called_twice(backbone: torch.nn.Module, device: torch.device, autocast) -> str:
    """Why the fused update is not known to be exact for ``backbone``, or ``""``: masked linear layers that one
    forward of it calls twice (one tiny dry run; the in-backward update of such a layer would move its mask between
    its two uses), or a dry run that could not run at all (then nothing is known either way). ``autocast``: a
    context-manager factory giving the precision of a training forward."""
    calls: dict[str, int] = {}
    linears = [(name, m) for name, m in masked_modules(backbone) if isinstance(m, abp.MaskedLinear)]
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
             for name, m in linears]
    serving = [(m, m.serve_bits) for _, m in linears]
    for m, _ in serving:  # the training path, as in a step (and no packed masks cached by a probe)
        m.serve_bits = False
    was_training = backbone.training
    devices = [device] if device.type == "cuda" else []
    try:  # eval mode and a forked RNG: the dry run leaves dropout streams and the run's results untouched
        vocab = int(getattr(backbone.config, "vocab_size", None) or 2)
        ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.random.fork_rng(devices=devices), autocast():
            backbone.eval()
            backbone(input_ids=ids, attention_mask=torch.ones_like(ids))
    except Exception as e:  # a backbone this probe cannot drive (e.g. it needs other inputs): nothing is known
        return (f"the check for masked layers used twice per forward could not run ({type(e).__name__}: {e}; "
                "its dry run feeds input_ids and attention_mask only)")
    finally:
        backbone.train(was_training)
        for h in hooks:
            h.remove()
        for m, was in serving:
            m.serve_bits = was
    twice = sorted(n for n, c in calls.items() if c > 1)
    return f"masked layers called more than once per forward (shared layers, as in ALBERT): {twice[:3]}" if twice else ""


class Trainer:
    """One ABP run. ``Trainer(cfg, output_dir).run(resume=...)`` returns the final metrics dict.

    ``mask_init(backbone)`` may set the scores after masking (baselines and ablations); with
    ``learn_mask=False`` the mask stays as set and only the head trains (e.g. the random-mask baseline).
    """

    def __init__(self, cfg: ABPConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                 mask_init: Optional[Callable[[nn.Module], None]] = None, learn_mask: bool = True):
        cfg.validate()
        self.cfg, self.out, self.progress = cfg, Path(output_dir), progress
        # torchrun: join the process group; this rank's device (cuda:LOCAL_RANK)
        self.dist = make_strategy(cfg.distributed, pick_device(cfg.device), grad_accum=cfg.grad_accum)
        self.device = self.dist.device
        torch.manual_seed(cfg.seed)
        self.task = get_task(cfg.task) if cfg.train_file is None else None
        self.num_labels = self.task.num_labels if self.task else cfg.num_labels
        train_set, dev_sets = self.prepare_data(*self._load_data())  # before the model: bad data fails fast
        if cfg.epochs is not None:  # the budget in epochs (the paper's): resolved once, recorded in checkpoints
            cfg = self.cfg = dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * len(train_set) / cfg.batch_size)))
            log.info("abp: %g epochs of %d examples = %d steps of batch %d", cfg.epochs, len(train_set), cfg.max_steps,
                     cfg.batch_size)
        dtype = self._backbone_dtype()
        backbone, self.tokenizer = load_backbone(cfg.model, dtype=dtype)
        backbone.requires_grad_(False)
        mask_model(backbone, cfg.mask_config())
        for _, m in masked_modules(backbone):
            if hasattr(m, "backend"):
                m.backend = cfg.backend
        if cfg.unused_token_scale != 1.0:
            self.unused_token_rows = self._scale_unused_token_rows(backbone, train_set)
        if mask_init is not None:
            with torch.no_grad():
                mask_init(backbone)
        self.learn_mask = learn_mask
        c = backbone.config
        pairs = self.task.text_b is not None if self.task else len(cfg.text_columns) > 1
        self.head_pool = resolve_pool(cfg.head_pool, cfg.model, pairs)
        head = make_head(cfg.head, c.hidden_size, c.num_hidden_layers + 1, self.num_labels, pool=self.head_pool)
        log.info("abp: head: %s, pooling %s%s", cfg.head, self.head_pool, " (auto)" if cfg.head_pool == "auto" else "")
        self.model = self.dist.place(Classifier(backbone, head, self.num_labels))
        self.fused = self._want_fused() and learn_mask
        log.info("abp: score update: %s", self.score_update_path)
        self.total_steps = cfg.max_steps
        self.scores = self.dist.score_optimizer(self.model, lr=cfg.score_lr or 0.0, target_sparsity=cfg.target_sparsity,
                                                prune_steps=max(1, int(cfg.prune_fraction * cfg.max_steps)), gamma=cfg.gamma,
                                                recovery=cfg.recovery, fused=self.fused, schedule=cfg.schedule,
                                                backend=abp.backends.prefer(cfg.backend), optimizer=cfg.score_optimizer,
                                                allocation=cfg.allocation)
        if not learn_mask:
            self.scores.freeze()
        self.dist.prepare(self.model, self.scores)  # FSDP: shard now that the scores' state is built
        opt = torch.optim.AdamW if cfg.head_optimizer == "adamw" else torch.optim.SGD
        self.head_opt = opt(self.model.head.parameters(), lr=cfg.head_lr)
        self.train_batches = Batcher(train_set, self.tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                       shuffle=True, seed=cfg.seed)
        self.dev_batchers = dev_batchers(dev_sets, self.tokenizer, batch_size=max(64, cfg.batch_size),
                                         max_length=cfg.max_length)
        self.step, self.history, self.best = 0, [], {"metric": -math.inf, "step": None, "sparsity": None}
        # {op: "backend (why)"} of every process of this run so far (checkpointed): metrics.json reports the whole
        # run's kernels, also when the process that writes it resumed late and ran few or none of them
        self.backends_run: dict[str, str] = {}

    # ------------------------------------------------------------------ extension points
    # What a method built on the Trainer overrides (abp.experiments.trainers); the loop calls these and
    # subclasses need nothing private.
    def prepare_data(self, train: list, dev_sets: dict[str, list]) -> tuple[list, dict[str, list]]:
        """The loaded examples (train, dev split → examples), before tokenisation; returns what the run uses."""
        return train, dev_sets

    def after_score_step(self) -> None:
        """Called after each score update of the pruning phase (``self.step`` counts it; not once pruning stopped)."""

    def save_extra_state(self, checkpoint: Path) -> None:
        """Write state of the subclass's own beside ``checkpoint`` (every rank calls it, after the checkpoint)."""

    def load_extra_state(self, checkpoint: Path) -> None:
        """Restore what :meth:`save_extra_state` wrote, at resume (after the Trainer's own state)."""

    # ------------------------------------------------------------------ setup helpers
    @torch.no_grad()
    def _scale_unused_token_rows(self, backbone: nn.Module, train_set) -> int:
        """Scale the initial scores of the input-embedding rows that no training example's tokens use by
        ``unused_token_scale``; returns how many rows. Those rows get no gradient, so their θ0 alone decides
        when γ prunes them: scaled down, they go before any weight the task uses."""
        emb = backbone.get_input_embeddings()
        if not isinstance(emb, abp.MaskedEmbedding):
            raise ValueError("unused_token_scale needs the input embeddings masked (mask_embeddings=True)")
        used = torch.zeros(emb.scores.shape[0], dtype=torch.bool)
        for ex in train_set:
            ids = self.tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=self.cfg.max_length)["input_ids"]
            used[torch.tensor(ids, dtype=torch.long)] = True
        rows = (~used).to(emb.scores.device)
        emb.scores[rows] *= self.cfg.unused_token_scale
        log.info("abp: %d of %d input-embedding rows unused by the training set: their scores start × %g",
                 int((~used).sum()), used.numel(), self.cfg.unused_token_scale)
        return int((~used).sum())

    def _backbone_dtype(self) -> Optional[torch.dtype]:
        want = self.cfg.backbone_dtype
        if want == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else None
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[want]

    @property
    def score_update_path(self) -> str:
        """Which score update runs (recorded in metrics.json)."""
        return "fused (in the backward epilogue)" if self.fused else "multi-tensor (after the backward" + \
            (f", {self.dist.kind.upper()} gradient reduction)" if self.dist.kind != "none" else ")")

    def _want_fused(self) -> bool:
        """The fused update is exact only without accumulation, all-reduce, clipping or shared weights."""
        why = []
        if self.cfg.grad_accum > 1:
            why.append("gradient accumulation (grad_accum > 1)")
        if self.cfg.score_optimizer != "sgd":
            why.append(f"the {self.cfg.score_optimizer} score optimizer (its moments live outside the backward epilogue)")
        if self.cfg.allocation != "global":
            why.append(f"allocation={self.cfg.allocation!r} (one γ per tensor; the backward epilogue applies one γ)")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            why.append("a DDP gradient all-reduce")
        if self.cfg.fused_update == "on" or (self.cfg.fused_update == "auto" and self.device.type == "cuda" and not why):
            reused = masked_linears_called_twice(self.model.backbone, self.device, self._autocast)
            if reused:
                why.append(reused)
        if self.cfg.fused_update == "on" and why:
            raise FusedUpdateError("fused score update refused: it would not be exact with " + " and ".join(why))
        if self.cfg.fused_update == "auto":
            if why and self.device.type == "cuda":
                log.warning("abp: fused score update off: %s", "; ".join(why))
            return not why and self.device.type == "cuda"
        return self.cfg.fused_update == "on"

    @torch.no_grad()

    def _load_data(self):
        cfg = self.cfg
        if self.task is None:
            cols = tuple(cfg.text_columns)
            train = load_custom(cfg.train_file, text_columns=cols, label_column=cfg.label_column, num_labels=cfg.num_labels)
            train = subsample(train, cfg.train_subsample, cfg.seed)
            dev = load_custom(cfg.dev_file, text_columns=cols, label_column=cfg.label_column, num_labels=cfg.num_labels)
            return train, {"dev": dev}
        train = load_split(self.task.name, "train", cfg.glue_dir, max_examples=cfg.train_subsample, seed=cfg.seed)
        devs = {split: load_split(self.task.name, split, cfg.glue_dir) for split in self.task.dev_splits}
        return train, devs

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Dev metrics with the *hard* mask 1[θ>0]: exactly what the saved mask file gives."""
        return self.dist.evaluate(self.model, self.dev_batchers, task=self.task.name if self.task else None,
                                  num_labels=self.num_labels, autocast=self.cfg.autocast)

    @property
    def metric_name(self) -> str:
        if self.task is None:
            return "accuracy" if self.num_labels > 1 else "pearson"
        return self.task.primary_metric

    # ------------------------------------------------------------------ the loop
    def _autocast(self):
        return autocast_context(self.device, self.cfg.autocast)

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return nn.functional.mse_loss(logits.float(), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels.long())

    def _backward(self, batch: dict, divisor: int = 1, last: bool = True) -> torch.Tensor:
        """Forward and backward of one global micro-batch; returns the (weighted) loss.

        Distributed: this rank's rows, weighted so that the averaged gradient is the global batch's."""
        batch, share = self.dist.shard(batch)
        batch = self._to_device(batch)
        labels = batch.pop("labels")
        net = self.dist.module(self.model)
        with self.dist.grad_sync(net, last):
            with self._autocast():
                loss = self._loss(net(**batch), labels) * share / divisor
            loss.backward()
        return loss.detach()

    def _batches(self):
        """Micro-batches from the current step on: a pure function of (seed, epoch, index) for exact resume."""
        epoch, start = divmod(self.step * self.cfg.grad_accum, len(self.train_batches))
        while True:
            yield from self.train_batches.iter_batches(epoch, start)
            epoch, start = epoch + 1, 0

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Train until ``max_steps``; with ``resume`` continue from ``output_dir/checkpoint.safetensors``."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        ckpt = self.out / "checkpoint.safetensors"
        backends.clear_record()  # metrics.json's backends: the ops of this run (a resumed run adds the checkpoint's)
        found = self.dist.agree(f"whether {ckpt} exists (on several machines --output must be a shared filesystem)",
                                resume and ckpt.exists())
        if found:
            self._restore(ckpt)
        elif resume:
            log.warning("abp: --resume given but %s does not exist: starting from scratch", ckpt)
        self.model.train()
        if self.scores.done() and self.step > 0:
            self.scores.freeze()
        batches = self._batches()
        warm = self.warmup_steps
        if self.learn_mask and not self.scores.done():
            self.scores.enable(self.step >= warm)
        run_loss = torch.zeros((), device=self.device)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (self.progress and self.dist.is_main),
                   desc=f"abp {self.metric_label()}", dynamic_ncols=True)
        t0 = time.time()
        ckpt_every = cfg.checkpoint_every or cfg.eval_every
        while self.step < cfg.max_steps:
            self.dist.seed_step(cfg.seed, self.step)  # distributed: per-rank dropout stream of this step
            if self.learn_mask and self.step == warm and not self.scores.frozen:  # head warmed up: pruning starts
                self.scores.enable(True)
                if cfg.score_lr is None:
                    self._calibrate()
            for i in range(cfg.grad_accum):
                run_loss += self._backward(next(batches), cfg.grad_accum, last=i == cfg.grad_accum - 1)
            pruning = self.learn_mask and self.step >= warm and not self.scores.frozen
            if self.learn_mask and self.step >= warm:
                self.scores.step()
            self.head_opt.step()
            self.head_opt.zero_grad(set_to_none=True)
            self.step += 1
            if pruning:
                self.after_score_step()
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log_point(run_loss, bar)
                run_loss.zero_()
            evaluate = self.step % cfg.eval_every == 0 or self.step == cfg.max_steps
            checkpoint = self.step % ckpt_every == 0 or self.step == cfg.max_steps
            if evaluate or checkpoint:  # before either writes anything (one sync)
                self._check_finite_scores()
            if evaluate:
                self._eval_point(bar)
            if checkpoint:
                self._save_checkpoint(ckpt)
        bar.close()
        return self._finish(time.time() - t0)

    @property
    def warmup_steps(self) -> int:
        """Steps that train the head alone before the scores start moving."""
        return int(self.cfg.warmup_fraction * self.cfg.max_steps)

    def _calibrate(self) -> None:
        """Auto α from the gradient scale of the next batch (no update is applied); Adam needs no gradient."""
        if self.cfg.score_optimizer != "sgd":
            lr = adam_score_lr(self.model, prune_steps=self.scores.prune_steps, ratio=self.cfg.score_lr_ratio)
            self.scores.set_lr(lr)
            log.info("abp: score learning rate α (%s) set to %.4g", self.cfg.score_optimizer, lr)
            return
        fused = [(m, m.fused_update) for m in self.scores.fused_modules]
        for m, _ in fused:
            m.fused_update = None
        self._backward(next(self._batches()))
        lr = self.dist.calibrate_score_lr(self.model, prune_steps=self.scores.prune_steps, ratio=self.cfg.score_lr_ratio)
        self.model.zero_grad(set_to_none=True)
        for m, sgd in fused:
            m.fused_update = sgd
        self.scores.set_lr(lr)
        log.info("abp: score learning rate α calibrated to %.4g", lr)

    def metric_label(self) -> str:
        return f"{self.cfg.task if self.task else 'custom'} s={self.cfg.target_sparsity:g}"

    def _log_point(self, run_loss: torch.Tensor, bar) -> None:
        n = (self.step - 1) % self.cfg.log_every + 1
        loss = float(self.dist.average(run_loss)) / n  # distributed: the global batch's mean loss
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step}: lower --score-lr/--head-lr")
        sp = self.scores.sparsity()
        bar.set_postfix(loss=f"{loss:.4f}", sparsity=f"{sp:.3f}", gamma=f"{self.scores.gamma_now():.2e}")
        self._last_log = {"step": self.step, "loss": loss, "sparsity": sp}
        if self.learn_mask and not self.scores.frozen and self.scores.done():
            self.scores.freeze()

    def _eval_point(self, bar) -> None:
        metrics = self.evaluate()
        sp = self.dist.sparsity(self.model)
        pruned = sp >= self.cfg.target_sparsity or not self.learn_mask
        entry = {"step": self.step, "sparsity": sp, "reached_target": pruned, **metrics,
                 "loss": getattr(self, "_last_log", {}).get("loss")}
        self.history.append(entry)
        value = metrics[self.metric_name]
        if self.dist.is_main:
            bar.write(f"step {self.step}: sparsity {sp:.4f} dev {self.metric_name} {value:.4f}")
        better = self.best["step"] is None or value > self.best["metric"]
        if pruned and (better or not self.cfg.keep_best):
            self.best = {"metric": value, "step": self.step, "sparsity": sp, "metrics": metrics}
            self._save_mask(self.out / "mask.safetensors")
        if self.dist.is_main:
            write_text(self.out / "history.json", json.dumps(self.history, indent=1))

    def _save_mask(self, path: Path) -> None:
        full = self.dist.full_model(self.model)  # FSDP: gathers the scores (all ranks take part)
        if self.dist.is_main:  # distributed: one writer (atomic), the others wait at the barrier
            abp.save_mask(full.backbone, path, head=self.model.head, base_model=resolve_model(self.cfg.model)
                          if self.cfg.model else "all-MiniLM-L6-v2 (embedded)", task=self.cfg.task if self.task else "custom",
                          metadata={"head": self.cfg.head, "head_pool": self.head_pool, "num_labels": self.num_labels,
                                    "step": self.step, "config": self.cfg.to_dict()})
        self.dist.barrier()

    def _finish(self, seconds: float) -> dict[str, Any]:
        mask_path = self.out / "mask.safetensors"
        reached = self.best["step"] is not None
        if not reached:
            sp = self.dist.sparsity(self.model)
            log.warning("abp: the target sparsity %.3f was not reached in %d steps (at %.3f); saving the final mask",
                        self.cfg.target_sparsity, self.cfg.max_steps, sp)
            self._save_mask(mask_path)
            self.best = {"metric": self.history[-1][self.metric_name], "step": self.step,
                         "sparsity": sp, "metrics": {k: v for k, v in self.history[-1].items()}}
        if not self.dist.is_main:  # distributed: rank 0 read the mask file and wrote metrics.json
            return self.dist.broadcast(None)
        final_mask = abp.read_mask_file(mask_path)
        result = {
            "task": self.cfg.task if self.task else "custom",
            "model": self.cfg.model or "all-MiniLM-L6-v2 (embedded)",
            "metric_name": self.metric_name,
            "dev_metric": self.best["metric"],
            "dev_metrics": self.best.get("metrics", {}),
            "sparsity": final_mask.sparsity,
            "target_sparsity": self.cfg.target_sparsity,
            "reached_target": reached,
            "best_step": self.best["step"],
            "steps": self.step,
            "train_seconds_this_process": round(seconds, 1),
            "device": str(self.device),
            "backends": {op: s.split(" (", 1)[0] for op, s in self._backends_so_far().items()},
            "backend_notes": {op: s for op, s in self._backends_so_far().items() if " (" in s},
            "fused_update": self.fused,
            "score_update": self.score_update_path,
            "distributed": self.dist.describe(),
            "score_lr": self.scores.lr,
            "mask_file": str(mask_path),
            "config": self.cfg.to_dict(),
        }
        write_text(self.out / "metrics.json", json.dumps(result, indent=1))
        return self.dist.broadcast(result)

    # ------------------------------------------------------------------ checkpoints
    def _check_finite_scores(self) -> None:
        """Refuse to go on (and to overwrite the last good checkpoint) once a score is NaN/inf."""
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for _, s in score_tensors(self.model):
            bad += (~torch.isfinite(local_shard(s).detach())).sum()
        anywhere = float(self.dist.average((bad > 0).double())) > 0  # one sync, at evals and checkpoints only
        if anywhere:
            where = f"{int(bad)} here" if self.dist.world > 1 else f"{int(bad)}"
            raise FloatingPointError(f"mask scores are NaN/inf at step {self.step} ({where}; learning rate too high?); "
                                     f"the last checkpoint in {self.out} is intact")

    def _backends_so_far(self) -> dict[str, str]:
        """Each op's backend (with ``auto``'s reasons) in this run: this process's choices over earlier ones'."""
        return {**self.backends_run, **abp.last_backend(why=True)}

    def _save_checkpoint(self, path: Path) -> None:
        info = {"step": self.step, "config": self.cfg.to_dict(), "history": self.history, "best": self.best,
                "backends": self._backends_so_far()}
        full = self.dist.full_model(self.model)  # FSDP: gathers the scores (all ranks take part)
        score_state = self.scores.full_state_dict()  # FSDP: gathers Adam's moments (all ranks take part)
        if self.dist.is_main:  # global state only: any world size can resume from it
            save_checkpoint(path, scores=dict(score_tensors(full)), head=self.model.head, head_opt=self.head_opt,
                            score_state=score_state, info=info)
        self.dist.barrier()
        self.save_extra_state(path)

    def _restore(self, path: Path) -> None:
        ck = load_checkpoint(path)
        saved = ABPConfig.from_dict(ck["info"]["config"]).to_dict()
        now = self.cfg.to_dict()
        diff = {k for k in now if now[k] != saved[k] and k not in RESUMABLE_CHANGES}
        if diff:
            raise CheckpointError(f"cannot resume from {path}: the run's settings differ in {sorted(diff)} "
                                  f"(checkpoint: {[saved[k] for k in sorted(diff)]}, now: {[now[k] for k in sorted(diff)]})")
        with torch.no_grad():
            for name, s in score_tensors(self.model):
                if name not in ck["scores"]:
                    raise CheckpointError(f"checkpoint {path} lacks scores for {name}")
                self.dist.copy_scores_(s, ck["scores"][name])  # FSDP: this rank's shard
        self.model.head.load_state_dict(ck["head"])
        self.head_opt.load_state_dict(ck["head_opt"])
        self.scores.load_state_dict(ck["score_state"])
        self.scores.recount()  # per-tensor counts from the restored scores (FSDP: this rank's shards)
        restore_rng_states(ck["rng"])
        info = ck["info"]
        self.step, self.history, self.best = info["step"], info["history"], info["best"]
        self.backends_run = dict(info.get("backends", {}))
        if self.best["metric"] is None:
            self.best["metric"] = -math.inf
        self.load_extra_state(path)
        log.info("abp: resumed from %s at step %d", path, self.step)


HEAD_REFIT_DIR = "head_refit"


def run_abp(cfg: ABPConfig, output_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True) -> dict:
    """Build a :class:`Trainer` and run it; then, unless ``cfg.head_refit_steps`` is 0, :func:`refit_head` on its
    mask."""
    t = Trainer(cfg, output_dir, progress=progress)
    result = t.run(resume=resume)
    if t.cfg.refit_steps:  # t.cfg: max_steps resolved from epochs
        result = refit_head(t.cfg, output_dir, result, resume=resume, progress=progress)
    return result


def refit_head(cfg: ABPConfig, output_dir: str | os.PathLike, joint: dict, *, resume: bool = False,
               progress: bool = True, trainer: type = Trainer,
               weights_init: Optional[Callable[[nn.Module], None]] = None) -> dict:
    """Phase 2: the run's head trained ``cfg.refit_steps`` more steps on the run's final mask, the mask fixed
    (a fresh optimiser state; Algorithm 1's "keep training p", for a set number of steps on the mask it ships).

    Runs in ``output_dir/head_refit/`` (its own checkpoint: it resumes); then its mask file (the same bits, the
    refitted head) replaces ``output_dir/mask.safetensors`` and ``metrics.json`` reports its dev metric, with the
    jointly trained head's under ``head_refit``. ``joint``: the run's result (:meth:`Trainer.run`); ``weights_init``:
    what the run's ``mask_init`` did to the frozen weights before its mask was learnt (the mask file's fingerprint
    checks that the refit masks those very weights)."""
    out = Path(output_dir)
    mask_file = out / "mask.safetensors"
    steps = cfg.refit_steps
    rcfg = dataclasses.replace(cfg, max_steps=steps, epochs=None, head_refit_steps=0, eval_every=min(cfg.eval_every, steps),
                               checkpoint_every=min(cfg.checkpoint_every or cfg.eval_every, steps))
    shipped = abp.read_mask_file(mask_file)
    bits = shipped.masks
    def mask_init(backbone: nn.Module) -> None:
        if weights_init is not None:
            weights_init(backbone)
        abp.load_mask(backbone, mask_file)

    t = trainer(rcfg, out / HEAD_REFIT_DIR, progress=progress, mask_init=mask_init, learn_mask=False)
    t.model.head.load_state_dict(shipped.head)  # the run's head (a checkpoint of the refit, if any, replaces it)
    refit = t.run(resume=resume)
    if t.dist.is_main:
        new = abp.read_mask_file(refit["mask_file"])
        if new.masks.keys() != bits.keys() or any(not torch.equal(new.masks[k], bits[k]) for k in bits):
            raise RuntimeError(f"head refit: the mask in {refit['mask_file']} differs from the run's {mask_file}")
        with atomic_path(mask_file) as tmp:
            shutil.copyfile(refit["mask_file"], tmp)
        result = {**joint, "dev_metric": refit["dev_metric"], "dev_metrics": refit["dev_metrics"],
                  "steps": joint["steps"] + refit["steps"],
                  "head_refit": {"steps": steps, "dev_metric": refit["dev_metric"], "best_step": refit["best_step"],
                                 "joint_head_dev_metric": joint["dev_metric"], "joint_head_dev_metrics": joint["dev_metrics"],
                                 "folder": HEAD_REFIT_DIR}}
        write_text(out / "metrics.json", json.dumps(result, indent=1))
        log.info("abp: head refit on the final mask: dev %s %.4f (the jointly trained head: %.4f)",
                 joint["metric_name"], refit["dev_metric"], joint["dev_metric"])
    else:
        result = None
    t.dist.barrier()
    return t.dist.broadcast(result)
