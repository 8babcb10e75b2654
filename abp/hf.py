"""ABP inside a ``transformers.Trainer`` script: mask the model, hand the Trainer an optimizer that runs
Algorithm 1 on the scores, and let a callback log the sparsity, apply the stop rule and write the mask file.

::

    abp.hf.mask_model(model)                                   # frozen weights, mask scores θ, head trainable
    opt, sched = abp.hf.optimizers(model, args, target_sparsity=0.5)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate,
                      optimizers=(opt, sched), callbacks=[abp.hf.ABPCallback(task="sst2")])
    trainer.train()                                            # output_dir/mask.safetensors

    # phase 2, abp prune's default: the head trained on the final mask, the mask fixed (a second Trainer run)
    opt, sched = abp.hf.head_refit_optimizers(model, refit_args)
    Trainer(model=model, args=refit_args, ..., optimizers=(opt, sched), callbacks=[abp.hf.ABPCallback()]).train()

What runs where:

- :class:`ABPOptimizer` is one ``torch.optim.Optimizer`` for the Trainer. Its ``step()`` applies
  :class:`~abp.train.score_optim.ScoreOptimizer`'s update to the scores (``θ ← θ − α·dir − γ``, the auto-γ
  controller and the stop rule: the same object ``abp prune`` uses) and AdamW to the task head (every trainable
  parameter that is not a score), with the head's own learning rate. The schedule is ``abp prune``'s: the first
  ``warmup_fraction`` of the steps train the head alone (the scores need no gradient then, so the backward skips
  dθ), then γ ramps the sparsity to the target over ``prune_fraction`` of the steps, and pruning stops for good
  the first step the share of ``θ ≤ 0`` reaches the target. The step counts come from the Trainer's ``max_steps``,
  which it knows only when training starts, so the score optimiser is built by the callback's ``on_train_begin``.
  α is ``abp prune``'s too: Adam's needs no gradient; plain SGD's (``score_optimizer="sgd"``, ``score_lr=None``) is
  calibrated on the score gradient of the last warm-up step (``abp prune`` runs one extra backward on the first
  pruning batch instead; the Trainer owns the batches here), or of the first step when there is no warm-up.
- :func:`head_refit_optimizers` is ``abp prune``'s phase 2 (``head_refit_steps``, on by default there): a fresh
  AdamW on the head, the scores frozen from the first step (no score gradient is computed), the same
  :class:`ABPOptimizer` and callback, so the log, the mask file and a resume work as in phase 1. On the CPU
  grid (MiniLM, 400 steps, 3 seeds) a refit of as many steps as the pruning run changed the dev metric by
  −0.3 … +1.4 points on SST-2 and −0.0 … +2.0 on STS-B (mean per sparsity, 20 … 99 %; the most at 99 %), for
  about half the pruning run's time.
- :class:`ABPCallback` builds it, adds ``abp/sparsity``, ``abp/gamma``, ``abp/pruning_active`` and
  ``abp/pruning_stopped`` to every log the Trainer writes, stops computing score gradients once the stop rule has
  fired (checked at log and save points: before that the device flag already keeps the scores still), and writes
  the mask file (:func:`abp.save_mask`, atomic) into each checkpoint folder and, at the end, into ``output_dir``.

The Trainer's settings, and what Algorithm 1 makes of them:

- ``gradient_accumulation_steps``: the Trainer calls ``optimizer.step()`` once per accumulated batch, so the scores
  step once on the summed gradient of its micro-batches, as ``abp prune --grad-accum`` does. The fused
  in-backward update would step on every micro-batch instead: it is refused (``fused_update="on"``) or left off.
- ``max_grad_norm`` (1.0 by default): the Trainer clips the norm of *all* gradients it finds on the model. The
  score gradients are kept out of its sight (a post-accumulate hook moves each one aside; ``step()`` puts it
  back), so the clip and the logged ``grad_norm`` are the head's alone. Clipping them would not be harmless
  although they are tiny: the clip factor is set by the head's norm and rescales every score gradient with it,
  so plain SGD's step would change with the head's gradient size and Adam's moments would mix steps of different
  scales; neither is Algorithm 1's update, and the calibrated α would no longer mean what it says.
- ``bf16``: autocast, as in ``abp prune`` on CUDA; the scores stay fp32.
- ``fp16``: its GradScaler unscales and overflow-checks the gradients of this optimizer's parameter groups, the
  scores' included, and skips the whole step (γ controller included) on an overflow: that is exact, but only when
  the score gradients are where the scaler looks, so fp16 needs ``max_grad_norm=0`` (with clipping on they are
  kept aside, still scaled) and runs the multi-tensor update (the fused one would apply scaled gradients).
- Several processes or GPUs (DDP, DataParallel, FSDP, DeepSpeed) are refused: the score gradients would have to be
  reduced before the update, which the hook above and the warm-up's switching of ``requires_grad`` do not allow
  for. ``abp prune`` under ``torchrun`` and ``abp/train/accelerate_example.py`` cover several GPUs.
- Frozen weights stay frozen: :func:`mask_model` turns ``requires_grad`` off for every pre-trained parameter
  outside the task head, and the optimizer holds only the head and the scores.
- Resuming (``trainer.train(resume_from_checkpoint=...)``): the scores are parameters, so the checkpoint's model
  file holds them; :meth:`ABPOptimizer.state_dict` holds the head's AdamW state and the score optimiser's (γ,
  the stop flag, the pruned count, its step, α and Adam's moments), which the Trainer saves in ``optimizer.pt``
  and loads back. A resume whose checkpoint lacks that state, was made with another schedule (target,
  ``max_steps``, fractions, optimiser), or whose model scores do not match it, is refused with the reason.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback

import abp
from abp.patch import HEAD_PATTERNS, masked_modules, score_tensors, shared_weights
from abp.train.config import ABPConfig
from abp.train.score_optim import ScoreOptimizer, adam_score_lr, calibrate_score_lr
from abp.train.trainer import masked_linears_called_twice

log = logging.getLogger("abp")

MASK_FILE = "mask.safetensors"

# ABPConfig fields that shape the mask (mask_model) and the score update (optimizers). The others (data, head
# architecture, batch, steps, device, evaluation) are the Trainer's or the script's own.
MASK_FIELDS = ("mask_embeddings", "mask_layernorm", "mask_bias", "score_init", "score_init_mode", "score_init_spread",
               "score_init_std", "t_l", "t_s", "backend")
SCORE_FIELDS = ("target_sparsity", "score_lr", "score_lr_ratio", "gamma", "warmup_fraction", "prune_fraction",
                "schedule", "recovery", "score_optimizer", "fused_update", "backend")


def _config(config: Optional[ABPConfig], options: dict, allowed: tuple[str, ...], where: str) -> ABPConfig:
    bad = sorted(k for k in options if k not in allowed)
    if bad:
        raise TypeError(f"abp.hf.{where}: unknown or not applicable option(s) {bad}; it takes {', '.join(allowed)} "
                        "(batch, steps, learning rate and precision are the TrainingArguments')")
    cfg = dataclasses.replace(config or ABPConfig(), **options)
    cfg.validate()
    return cfg


def mask_model(model: nn.Module, *, include=(), exclude=(), config: Optional[ABPConfig] = None, **options) -> nn.Module:
    """Swap the model's linear layers and embeddings for masked ones, in place, as ``abp prune`` masks its backbone.

    :func:`abp.mask_model` with ``abp prune``'s score initialisation and temperatures (θ0 in each tensor's
    magnitude order, the hard mask ``1[θ>0]``; ``options`` are those :class:`~abp.train.config.ABPConfig` fields, see
    :data:`MASK_FIELDS`) and :func:`abp.mask_model`'s ``include`` / ``exclude`` defaults: every matching module
    but the task heads (``classifier``, ``score``, ``lm_head``, …), which stay trainable, while every other
    pre-trained parameter is frozen. ``abp prune`` also excludes the pooler because its own head does not read it;
    a Hugging Face ``…ForSequenceClassification`` head does, so here it is masked unless ``exclude`` says otherwise
    (``config.exclude`` is not read: ``include`` / ``exclude`` are this function's arguments).
    """
    cfg = _config(config, options, MASK_FIELDS, "mask_model")
    mc = dataclasses.replace(cfg.mask_config(), include=list(include), exclude=list(exclude))
    abp.mask_model(model, mc)
    if cfg.backend:
        for _, m in masked_modules(model):
            if hasattr(m, "backend"):
                m.backend = cfg.backend
    return model


def task_head(model: nn.Module) -> nn.Module:
    """The model's task head as one module, for :func:`abp.save_mask` / :func:`abp.load_mask` (``head=``).

    Its children are the outermost modules named like a head (:data:`abp.patch.HEAD_PATTERNS`) that hold
    parameters, registered under their own names (a nested name's dots become ``/``), and shared with the model:
    loading a mask file's head into it loads the model's head.
    """
    heads = [re.compile(p) for p in HEAD_PATTERNS]
    picked: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in picked) or not any(h.search(name) for h in heads):
            continue
        if any(True for _ in m.parameters()):
            picked.append(name)
    container = nn.Module()
    for name in picked:
        container.add_module(name.replace(".", "/"), model.get_submodule(name))
    return container


def optimizers(model: nn.Module, args, *, head_lr: Optional[float] = None, config: Optional[ABPConfig] = None,
               **options) -> tuple["ABPOptimizer", torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``: Algorithm 1 on the scores, AdamW on the head.

    ``options`` are :class:`~abp.train.config.ABPConfig`'s score-side fields (:data:`SCORE_FIELDS`; the defaults
    are ``abp prune``'s: Adam on the scores, α calibrated, auto γ, 20 % head warm-up, the ramp over 50 % of the
    steps). The head's AdamW takes ``head_lr`` (default ``args.learning_rate``), ``args``' betas, epsilon and
    weight decay, the latter on the parameters the Trainer itself would decay. The scheduler keeps the head's
    learning rate constant, as ``abp prune`` does; pass ``(optimizer, None)`` to have the Trainer build its
    ``lr_scheduler_type`` schedule for the head instead (the scores' α is never scheduled).
    """
    cfg = _config(config, options, SCORE_FIELDS, "optimizers")
    opt = ABPOptimizer(model, args, config=cfg, head_lr=head_lr)
    from transformers import get_constant_schedule

    return opt, get_constant_schedule(opt)


def head_refit_optimizers(model: nn.Module, args, *, head_lr: Optional[float] = None
                          ) -> tuple["ABPOptimizer", torch.optim.lr_scheduler.LambdaLR]:
    """``(optimizer, scheduler)`` for the head refit, ``abp prune``'s phase 2: a second Trainer run on the pruned
    model that trains the task head on the final mask, with a fresh AdamW (``head_lr``, default
    ``args.learning_rate``) and the mask fixed: the scores are frozen from the first step, so no score gradient is
    computed and the mask file written at the end has the same bits and the refitted head. ``abp prune`` runs as
    many refit steps as the pruning run took (``args.max_steps``, the same head learning rate). Use it with
    :class:`ABPCallback`, as in phase 1; it logs the sparsity it refits at (a model not pruned yet, or whose mask
    file was not loaded, shows there).
    """
    opt = ABPOptimizer(model, args, config=ABPConfig(), head_lr=head_lr, refit=True)
    from transformers import get_constant_schedule

    return opt, get_constant_schedule(opt)


def check_training_args(args, cfg: ABPConfig, *, refit: bool = False) -> None:
    """Refuse, with the setting named, what Algorithm 1 cannot honour in this process (see the module docstring).
    ``refit``: the head refit (the scores frozen; fp16 with clipping is then fine: there are no score gradients)."""
    max_norm = float(args.max_grad_norm or 0.0)
    if args.fp16 and max_norm > 0 and not refit:
        raise ValueError(f"fp16=True with max_grad_norm={args.max_grad_norm}: with clipping on, abp holds the score "
                         "gradients aside from the Trainer's clip, out of reach of fp16's GradScaler, which would then "
                         "neither unscale nor overflow-check them; set max_grad_norm=0 (fp16 then works: the scaler "
                         "sees the scores) or use bf16=True")
    if args.world_size > 1:
        raise ValueError(f"world_size={args.world_size}: abp.hf runs Algorithm 1 in one process (the score gradients "
                         "would need their reduction before the update); use `torchrun -m abp prune` or "
                         "abp/train/accelerate_example.py for several GPUs")
    if args.n_gpu > 1:
        raise ValueError(f"n_gpu={args.n_gpu}: the Trainer would wrap the model in torch.nn.DataParallel, which "
                         "abp.hf does not support; make one GPU visible (CUDA_VISIBLE_DEVICES)")
    if cfg.fused_update == "on":
        why = _fused_blockers(args, cfg)
        if why:
            raise ValueError("fused_update='on' refused: the in-backward score update would not be exact with "
                             + "; ".join(why))


def _fused_blockers(args, cfg: ABPConfig, warmup_steps: Optional[int] = None) -> list[str]:
    """Why the fused in-backward update would not be exact with these settings (empty: it would)."""
    why = []
    if cfg.score_optimizer != "sgd":
        why.append(f"score_optimizer={cfg.score_optimizer!r} (its moments live outside the backward epilogue)")
    if cfg.allocation != "global":
        why.append(f"allocation={cfg.allocation!r} (one γ per tensor; the backward epilogue applies one γ)")
    if args.gradient_accumulation_steps > 1:
        why.append(f"gradient_accumulation_steps={args.gradient_accumulation_steps} (the Trainer steps once per "
                   "accumulated batch; the fused update would step on every micro-batch)")
    if args.fp16:
        why.append("fp16=True (the backward sees the loss-scaled gradient)")
    if getattr(args, "gradient_checkpointing", False):
        why.append("gradient_checkpointing=True (the recomputed forward uses every masked layer twice per step)")
    if cfg.score_lr is None and cfg.score_optimizer == "sgd" and warmup_steps == 0:
        why.append("score_lr=None with no warm-up step (α is calibrated on the last warm-up step's score gradient)")
    return why


class ABPOptimizer(torch.optim.Optimizer):
    """The Trainer's optimizer: ``step()`` runs Algorithm 1 on the scores and AdamW on the head.

    ``param_groups`` are the head's AdamW groups (first: the Trainer logs the first group's learning rate) and one
    group holding the scores, marked ``"abp": "scores"``, whose ``lr`` is never read: α belongs to the score
    optimiser. The group is there so that fp16's GradScaler unscales the score gradients. Build it with
    :func:`optimizers` (Algorithm 1) or :func:`head_refit_optimizers` (``refit=True``: the scores frozen, the head
    alone trained); :class:`ABPCallback` sets it up when training starts.
    """

    def __init__(self, model: nn.Module, args, *, config: ABPConfig, head_lr: Optional[float] = None,
                 refit: bool = False):
        check_training_args(args, config, refit=refit)
        scores = [s for _, s in score_tensors(model)]
        where = "head_refit_optimizers" if refit else "optimizers"
        if not scores:
            raise ValueError(f"abp.hf.{where}: the model has no masked modules (call abp.hf.mask_model first)")
        self.model, self.cfg, self.refit = model, config, refit
        ids = {id(s) for s in scores}
        head = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
        stray = sorted({n for n, _ in head} - set(self._head_param_names(model)))
        if stray:
            log.warning("abp: trainable parameters outside the task head are trained but not written to the mask "
                        "file: %s", stray[:5])
        from transformers import Trainer

        decay = set(Trainer.get_decay_parameter_names(None, model))  # the Trainer's own rule (no bias / norms)
        groups = [{"params": [p for n, p in head if n in decay], "weight_decay": args.weight_decay},
                  {"params": [p for n, p in head if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        lr = args.learning_rate if head_lr is None else head_lr
        self.head = torch.optim.AdamW(groups, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon) if groups else None
        if self.head is None:
            log.warning("abp: the model has no trainable head parameters: only the mask is learnt")
        super().__init__([{"params": scores, "lr": 0.0, "abp": "scores"}], {"lr": 0.0})
        self._score_group = self.param_groups[0]
        self._relink()
        self.scores: Optional[ScoreOptimizer] = None  # built by setup(), when the Trainer knows max_steps
        self.plan: dict[str, Any] = {}
        self.steps = 0  # optimizer steps taken (the Trainer's global_step)
        self.fused = False
        self.update_path = ""
        self._pending: Optional[dict] = None  # score-optimiser state loaded before setup (a resume)
        self._needs_calibration = False
        self._armed: Optional[str] = None
        self._held: list[Optional[torch.Tensor]] = []  # score gradients kept out of the Trainer's clip
        self._hold_order: list[torch.Tensor] = []
        self._hooks: list = []

    @staticmethod
    def _head_param_names(model: nn.Module) -> list[str]:
        head = task_head(model)
        owner = {id(m): name for name, m in model.named_modules()}
        return [f"{owner[id(m)]}.{pn}" for _, m in head.named_children() for pn, _ in m.named_parameters()]

    def _relink(self) -> None:
        self.param_groups = [*(self.head.param_groups if self.head is not None else []), self._score_group]

    # ------------------------------------------------------------------ set-up (ABPCallback.on_train_begin)
    def setup(self, args, state) -> None:
        """Build the score optimiser for ``state.max_steps`` steps, restore a resumed run's state, arm step one."""
        cfg = self.cfg
        check_training_args(args, cfg, refit=self.refit)
        self.teardown()
        total = int(state.max_steps)
        if total < 1:
            raise ValueError(f"abp.hf: the Trainer plans {total} steps; Algorithm 1 needs at least one")
        if self.refit:
            self._setup_refit(total, state)
            return
        warm = int(cfg.warmup_fraction * total)
        prune_steps = max(1, int(cfg.prune_fraction * total))
        device = next(s for _, s in score_tensors(self.model)).device
        why = _fused_blockers(args, cfg, warm)
        if cfg.fused_update == "on" or (cfg.fused_update == "auto" and device.type == "cuda" and not why):
            why += [f"shared weights {shared_weights(self.model)[:3]}"] if shared_weights(self.model) else []
            twice = "" if why else masked_linears_called_twice(self.model, device, contextlib.nullcontext)
            why += [twice] if twice else []
        if cfg.fused_update == "on" and why:
            raise ValueError("fused_update='on' refused: the in-backward score update would not be exact with "
                             + "; ".join(why))
        self.fused = cfg.fused_update == "on" or (cfg.fused_update == "auto" and device.type == "cuda" and not why)
        if self.fused:
            self.update_path = "fused (in the backward epilogue)"
        else:
            off = why or (["fused_update='off'"] if cfg.fused_update == "off" else
                          [f"the model is on {device.type} (auto fuses on CUDA only)"])
            self.update_path = "multi-tensor (after the backward; fused off: " + "; ".join(off) + ")"
        (log.warning if device.type == "cuda" and not self.fused and cfg.fused_update == "auto" else log.info)(
            "abp: score update: %s", self.update_path)
        self.scores = ScoreOptimizer(self.model, lr=cfg.score_lr or 0.0, target_sparsity=cfg.target_sparsity,
                                     prune_steps=prune_steps, gamma=cfg.gamma, recovery=cfg.recovery, fused=self.fused,
                                     schedule=cfg.schedule, backend=abp.backends.prefer(cfg.backend),
                                     optimizer=cfg.score_optimizer, allocation=cfg.allocation)
        self.plan = {"max_steps": total, "warmup_steps": warm, "prune_steps": prune_steps,
                     "target_sparsity": cfg.target_sparsity, "score_optimizer": cfg.score_optimizer,
                     "score_lr": cfg.score_lr, "score_lr_ratio": cfg.score_lr_ratio, "gamma": cfg.gamma,
                     "schedule": cfg.schedule, "allocation": cfg.allocation, "recovery": cfg.recovery}
        if not self._resumed(state):
            self._needs_calibration = cfg.score_lr is None and cfg.score_optimizer == "sgd"
            if cfg.score_lr is None and cfg.score_optimizer != "sgd":
                self.scores.set_lr(adam_score_lr(self.model, prune_steps=prune_steps, ratio=cfg.score_lr_ratio))
                log.info("abp: score learning rate α (%s) set to %.4g", cfg.score_optimizer, self.scores.lr)
        if float(args.max_grad_norm or 0.0) > 0:  # keep the score gradients out of the Trainer's clip
            self._hold_order = [s for _, m in masked_modules(self.model) for _, _, s in m.score_pairs()]
            self._held = [None] * len(self._hold_order)
            for i, s in enumerate(self._hold_order):
                needs = s.requires_grad  # torch registers hooks only on tensors that need a gradient (now)
                s.requires_grad_(True)
                self._hooks.append(s.register_post_accumulate_grad_hook(self._hold(i)))
                s.requires_grad_(needs)
        if self.steps > 0 and self.scores.done():
            self.scores.freeze()
        self._arm()

    def _resumed(self, state) -> bool:
        """Restore the state a resume loaded (True), or start at step 0 (False); refuse a resume without that state."""
        self.steps = int(state.global_step)
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
            return True
        if self.steps > 0:
            made_by = "abp.hf.head_refit_optimizers" if self.refit else "abp.hf.optimizers"
            raise ValueError(f"abp.hf: training resumes at step {self.steps} but the checkpoint's optimizer.pt holds "
                             f"no abp score-optimiser state (save_only_model=True, or a checkpoint not written through "
                             f"{made_by}): it cannot continue exactly; start again from step 0")
        return False

    def _setup_refit(self, total: int, state) -> None:
        """The head refit: a score optimiser that never steps (frozen: backward skips dθ), kept for the log entries,
        the mask file's sparsity and a resume's check that the checkpoint's scores are this run's."""
        self.fused, self.update_path = False, "none (head refit: the mask is fixed)"
        self.scores = ScoreOptimizer(self.model, lr=0.0, target_sparsity=0.0, prune_steps=1)
        self.scores.freeze()
        self._armed = "frozen"
        self.plan = {"phase": "head_refit", "max_steps": total, "warmup_steps": 0}
        self._resumed(state)
        log.info("abp: head refit on the mask as it is (sparsity %.4f): the scores are frozen", self.scores.sparsity())

    def teardown(self) -> None:
        """Remove the gradient hooks and the fused update from the modules (training has ended)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._held, self._hold_order = [], [], []
        if self.scores is not None:
            for m in self.scores.fused_modules:
                m.fused_update = None
        self._armed = None

    def _hold(self, i: int):
        def hook(p: torch.Tensor) -> None:
            g, p.grad = p.grad, None
            if self._held[i] is None:
                self._held[i] = g
            else:
                self._held[i].add_(g)
        return hook

    def _restore_held(self) -> None:
        for i, s in enumerate(self._hold_order):
            if self._held[i] is not None:
                s.grad, self._held[i] = self._held[i], None

    def _arm(self) -> None:
        """Set whether the next backward computes score gradients (and which path applies them)."""
        sc, warm = self.scores, self.plan["warmup_steps"]
        if sc.frozen:
            self._armed = "frozen"
            return
        if self.steps >= warm:
            want = "pruning"
        elif self.steps == warm - 1 and self._needs_calibration:
            want = "calibration"
        else:
            want = "warm-up"
        if want == self._armed:
            return
        sc.enable(want != "warm-up")
        if want == "calibration":  # plain gradients for α, in every module
            for m in sc.fused_modules:
                m.fused_update = None
        self._armed = want

    # ------------------------------------------------------------------ the step
    def step(self, closure=None):
        """One Trainer step: Algorithm 1's score update (after the warm-up), then AdamW on the head."""
        if closure is not None:
            raise ValueError("ABPOptimizer.step takes no closure")
        if self.scores is None:
            raise RuntimeError("ABPOptimizer.step() before set-up: add abp.hf.ABPCallback() to the Trainer's callbacks "
                               "(it builds the score optimiser once the Trainer knows max_steps)")
        self._restore_held()
        sc, warm = self.scores, self.plan["warmup_steps"]
        if not sc.frozen:
            if self.steps >= warm:
                if self._needs_calibration:  # no warm-up: α from this step's own gradient
                    self._calibrate()
                sc.step()
            elif self._needs_calibration and self.steps == warm - 1:
                self._calibrate()
        for _, s in score_tensors(self.model):
            s.grad = None
        if self.head is not None:
            self.head.step()
        self.steps += 1
        self._arm()

    def _calibrate(self) -> None:
        lr = calibrate_score_lr(self.model, prune_steps=self.scores.prune_steps, ratio=self.cfg.score_lr_ratio)
        self.scores.set_lr(lr)
        self._needs_calibration = False
        log.info("abp: score learning rate α calibrated to %.4g", lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._held = [None] * len(self._held)

    # ------------------------------------------------------------------ what the callback reads
    def metrics(self) -> dict[str, float]:
        """The log entries: sparsity, γ, whether pruning is running and whether the stop rule has fired (one sync)."""
        if self.scores is None:
            return {}
        stopped = self.scores.done()
        return {"abp/sparsity": self.scores.sparsity(), "abp/gamma": self.scores.gamma_now(),
                "abp/pruning_active": float(self.steps >= self.plan["warmup_steps"] and not stopped),
                "abp/pruning_stopped": float(stopped)}

    def freeze_if_done(self) -> None:
        """Once the stop rule has fired, stop computing score gradients (one sync)."""
        if self.scores is not None and not self.scores.frozen and self.steps > 0 and self.scores.done():
            self.scores.freeze()
            self._armed = "frozen"

    # ------------------------------------------------------------------ checkpoints (the Trainer's optimizer.pt)
    def state_dict(self) -> dict:
        abp_state = None
        if self.scores is not None:
            abp_state = {"score_optimizer": self.scores.state_dict(), "steps": self.steps, "plan": dict(self.plan),
                         "needs_calibration": self._needs_calibration}
        return {"head": self.head.state_dict() if self.head is not None else None, "abp": abp_state}

    def load_state_dict(self, state_dict: dict) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"head", "abp"}:
            raise ValueError("ABPOptimizer.load_state_dict: not an abp.hf optimizer state (the checkpoint's "
                             "optimizer.pt was written by another optimizer)")
        if (state_dict["head"] is None) != (self.head is None):
            raise ValueError("ABPOptimizer.load_state_dict: the checkpoint's head optimizer state does not fit this "
                             "model's trainable head")
        if self.head is not None:
            self.head.load_state_dict(state_dict["head"])
            self._relink()
        if state_dict["abp"] is not None:
            if self.scores is None:
                self._pending = state_dict["abp"]
            else:
                self._restore(state_dict["abp"])
                self._arm()

    def _restore(self, state: dict) -> None:
        saved, now = dict(state["plan"]), self.plan
        if "phase" not in saved:
            saved.setdefault("allocation", "global")  # pruning plans saved before allocation existed ran global
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if diff:
            raise ValueError(f"abp.hf: cannot resume: the checkpoint's pruning schedule differs in {diff} (checkpoint "
                             f"{[saved.get(k) for k in diff]}, now {[now.get(k) for k in diff]})")
        if int(state["steps"]) != self.steps:
            raise ValueError(f"abp.hf: cannot resume: the optimizer state is from step {state['steps']}, the Trainer's "
                             f"state from step {self.steps}")
        sc = self.scores
        sc.load_state_dict(state["score_optimizer"])
        saved_pruned = int(sc.pruned)
        sc.recount()
        if int(sc.pruned) != saved_pruned:
            raise ValueError(f"abp.hf: cannot resume: the model's scores prune {int(sc.pruned)} weights, the optimizer "
                             f"state says {saved_pruned}: the checkpoint's model weights (with the scores) were not "
                             "loaded, or belong to another run")
        self._needs_calibration = bool(state["needs_calibration"])
        log.info("abp: resumed the score optimiser at step %d (sparsity %.4f)", self.steps, sc.sparsity())


def _optimizer_of(optimizer) -> Optional[ABPOptimizer]:
    """The :class:`ABPOptimizer` inside the Trainer's (Accelerate wraps it)."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, ABPOptimizer) and seen < 4:
        optimizer, seen = getattr(optimizer, "optimizer", None), seen + 1
    return optimizer if isinstance(optimizer, ABPOptimizer) else None


class ABPCallback(TrainerCallback):
    """Sets up the :class:`ABPOptimizer`, logs the pruning, applies the stop rule and writes the mask file.

    ``task`` and ``base_model`` go into the mask file's metadata (``base_model`` defaults to the model's
    ``config._name_or_path``). The log entries are added in ``on_log``: ``state.log_history``, the progress
    bar and callbacks after this one see them; reporting integrations (``report_to``) run before user callbacks,
    so to send them there too, put this callback first: ``trainer.callback_handler.callbacks.insert(0, cb)``.
    """

    def __init__(self, *, task: Optional[str] = None, base_model: Optional[str] = None, mask_name: str = MASK_FILE):
        self.task, self.base_model, self.mask_name = task, base_model, mask_name
        self.opt: Optional[ABPOptimizer] = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _optimizer_of(optimizer)
        if opt is None:
            raise ValueError("ABPCallback: the Trainer's optimizer is not abp's; pass "
                             "optimizers=abp.hf.optimizers(model, args, ...) to the Trainer")
        opt.setup(args, state)
        self.opt = opt

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.opt is None or logs is None:
            return
        self.opt.freeze_if_done()
        extra = self.opt.metrics()
        logs.update(extra)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and all(last.get(k) == v for k, v in logs.items()
                                                                              if k not in extra):
            last.update(extra)  # the Trainer appended a copy of ``logs`` before calling on_log

    def on_save(self, args, state, control, **kwargs):
        if self.opt is None:
            return
        self.opt.freeze_if_done()
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            log.warning("abp: checkpoint folder %s not found: its mask file is not written", folder)
            return
        self._write(os.path.join(folder, self.mask_name), state)

    def on_train_end(self, args, state, control, **kwargs):
        if self.opt is None:
            return
        opt = self.opt
        opt.freeze_if_done()
        sp = opt.scores.sparsity()
        if not opt.refit and sp < opt.cfg.target_sparsity:
            log.warning("abp: the target sparsity %.3f was not reached in %d steps (at %.4f); writing the final mask",
                        opt.cfg.target_sparsity, state.global_step, sp)
        self._write(os.path.join(args.output_dir, self.mask_name), state)
        opt.teardown()

    def _write(self, path: str, state) -> None:
        if not state.is_world_process_zero:
            return
        opt = self.opt
        head = task_head(opt.model)
        abp.save_mask(opt.model, path, head=head if any(True for _ in head.parameters()) else None,
                      base_model=self.base_model, task=self.task,
                      metadata={"trainer": "transformers.Trainer (abp.hf)", "step": state.global_step,
                                "plan": opt.plan, "score_update": opt.update_path, "score_lr": opt.scores.lr})
        log.info("abp: mask written to %s (sparsity %.4f)", path, opt.scores.sparsity())
