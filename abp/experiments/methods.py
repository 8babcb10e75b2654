"""Every method of the reproduction as one call: ``run_method(method, exp, task, sparsity, seed, out)``.

Learnt masks (Algorithm 1 through :class:`~abp.train.trainer.Trainer`):
  ``abp``; ablations ``abp_norecovery`` (``recovery=False``), ``abp_reinit`` (every masked weight
  multiplied elementwise by ``N(1, σ)`` before ABP, σ = ``reinit_sigma``, default 0.5; its weights are
  *meant* to differ from the pre-trained ones) and ``abp_shuffled`` (an ABP mask permuted within each tensor,
  head retrained with the mask fixed). All three record connection-recovery statistics. ``abp_mask``: the ``abp``
  run's mask as it is, judged as every fixed mask below is (a fresh head trained for the whole budget on it, where
  ``abp``'s own head was trained while the mask was still changing).
Fixed masks on the *original* pre-trained weights, head trained by the Trainer with ``learn_mask=False``:
  ``random`` (exact per-tensor count), ``mp`` (Zhu & Gupta gradual magnitude pruning during fine-tuning,
  cubic schedule, per tensor; the mask moves to the original weights), ``imp`` (iterative magnitude pruning
  with rewinding to the pre-trained weights, per tensor: one lottery-ticket trajectory per task and seed that
  stops at every milestone sparsity on its way, pruning at most ``imp_rate`` of the remaining weights per
  round, so every grid sparsity on it shares the rounds below it), ``wanda`` (training-free ``|W|·‖X‖₂``
  per output row, X from ``wanda_batches`` train batches; embeddings by magnitude), ``feature_extraction`` (all weights kept: frozen backbone + head).
Weights trained: ``finetune`` (no mask), through the shared loop of :mod:`abp.experiments.finetune`.

Each run writes ``OUT/result.json`` last (its presence means "done"); a run folder without it resumes:
the Trainer from its checkpoint, finished phases (``phase1_masks.safetensors``, IMP rounds) are reused, and a
fine-tuning phase in flight (``finetune``, MP's phase 1, an IMP round) from its own checkpoint
(``OUT/finetune_checkpoint.safetensors``; IMP: ``checkpoint-roundNN-s….safetensors`` beside the rounds).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import abp
from abp._atomic import write_text
from abp.experiments.masks import (apply_masks_, load_masks, magnitude_masks, random_mask_, save_masks, shuffle_masks_,
                                   wanda_masks)
from abp.experiments.finetune import FineTuner, FinetuneOptions, load_task_data
from abp.experiments.trainers import ExperimentTrainer, TrackedTrainer
from abp.models import DEFAULT_MODEL, load_backbone, native_pooling
from abp.patch import masked_modules
from abp.provenance import code_version
from abp.train.config import ABPConfig, paper_preset
from abp.train.heads import resolve_pool
from abp.train.tasks import get_task
from abp.train.trainer import HEAD_REFIT_DIR, refit_head

# Named settings of Algorithm 1 on the grid. ``abp`` is abp's default (ABPConfig's own values); every other
# variant pins the fields it is about, so its rows keep their meaning when the defaults change. The grid's
# budget (steps, batch, head lr) applies to all of them except where a variant names its own (abp_paper).
# head_refit_steps None is the grid's max_steps (ABPConfig.refit_steps); budgets record the number.
ABP_SETTINGS = ("score_init_mode", "score_optimizer", "score_lr_ratio", "score_lr", "gamma", "head_lr",
                "warmup_fraction", "prune_fraction", "score_init", "score_init_spread", "score_init_std")
# Settings recorded only where a run moves them from their neutral value (so earlier budgets stay valid). The neutral
# values are what every run recorded before the hard mask and the cubic ramp became the default ran: σ(1e5·θ) in the
# forward and a linear ramp of the controller's target; a budget without t_l or schedule ran them.
ABP_OPTIONAL_SETTINGS = {"unused_token_scale": 1.0, "t_l": 1e5, "schedule": "linear", "allocation": "global",
                         "head_refit_steps": 0}
JOINT_HEAD = {"head_refit_steps": 0}  # the run's head as it ends: every variant recorded before the refit was the default
BEFORE = {"t_l": 1e5, "schedule": "linear", **JOINT_HEAD}  # the σ(1e5·θ) forward and the linear ramp, pinned (see above)
# θ0 ∝ |w|, adam_mix, the hard mask, the cubic ramp: the loop of the previous and today's default
MIX = {"score_init_mode": "magnitude", "score_optimizer": "adam_mix", "t_l": None, "schedule": "cubic"}
ABP_VARIANTS: dict[str, dict] = {
    "abp": {},
    # the paper's settings at the grid's budget: α = β = 2e-5, γ = 2e-7 fixed, θ0 ~ N(0.01, var 0.001), no warm-up
    # (the grid's batch, steps and head for every method, so only the mask's settings differ)
    "abp_paper": {k: v for k, v in paper_preset("sst2").items()
                  if k not in ("batch_size", "epochs", "t_s", "recovery", "head", "head_pool")},
    # one choice changed at a time; these rows, like every row recorded before the hard mask and the cubic ramp
    # became the default, run the forward σ(1e5·θ) and the linear ramp (BEFORE), so their budgets stay one grid
    "abp_uniform": {"score_init_mode": "uniform", "score_optimizer": "sgd", **BEFORE},  # θ0 ~ 0.01·U(0, 2), plain SGD
    "abp_magnitude": {"score_init_mode": "magnitude", "score_optimizer": "sgd", **BEFORE},  # θ0 ∝ |w|, plain SGD
    # θ0 ∝ |w|, Adam: the default before the hard mask and the cubic ramp (its rows hold the grid's former `abp` rows)
    "abp_adam": {"score_init_mode": "magnitude", "score_optimizer": "adam", **BEFORE},
    "abp_uniform_adam": {"score_init_mode": "uniform", "score_optimizer": "adam", **BEFORE},  # θ0 ~ 0.01·U(0, 2), Adam
    # θ0 ∝ |w|, Adam with one second moment per tensor (steps ∝ the gradient inside a tensor)
    "abp_adam_tensor": {"score_init_mode": "magnitude", "score_optimizer": "adam_tensor", **BEFORE},
    # θ0 ∝ |w|, Adam with each score's second moment floored at its tensor's mean (weak gradients move ∝ their size)
    "abp_adam_floor": {"score_init_mode": "magnitude", "score_optimizer": "adam_floor", **BEFORE},
    # θ0 ∝ |w|, Adam with each score's second moment capped at its tensor's mean (strong gradients move ∝ their size)
    "abp_adam_ceiling": {"score_init_mode": "magnitude", "score_optimizer": "adam_ceiling", **BEFORE},
    # θ0 ∝ |w|, Adam, and the embedding rows of tokens absent from the training set first in line (θ0 × 0.01)
    "abp_usage": {"score_init_mode": "magnitude", "score_optimizer": "adam", "unused_token_scale": 0.01, **BEFORE},
    # the hard mask 1[θ>0] in the forward (t_l → ∞), linear ramp: measured against abp_adam's σ(1e5·θ)
    "abp_hard": {"t_l": None, "schedule": "linear", **JOINT_HEAD},
    # the hard mask and the controller's target ramped on Zhu & Gupta's cubic (fast early, slow near the target), with
    # per-score Adam: the previous default (it holds the rows recorded as `abp` while it was)
    "abp_cubic": {"score_init_mode": "magnitude", "score_optimizer": "adam", "t_l": None, "schedule": "cubic",
                  **JOINT_HEAD},
    # abp_cubic with the ramp between the linear and the cubic one, s·(1 − (1 − t)²)
    "abp_quadratic": {"score_init_mode": "magnitude", "score_optimizer": "adam", "t_l": None, "schedule": "quadratic",
                      **JOINT_HEAD},
    # abp_cubic with one second moment per tensor (adam_tensor): steps ∝ the gradient inside a tensor
    "abp_cubic_tensor": {"score_init_mode": "magnitude", "score_optimizer": "adam_tensor", "t_l": None,
                         "schedule": "cubic", **JOINT_HEAD},
    # abp_cubic with the second moment v̂^(1−s)·mean(v̂)^s (adam_mix), Adam's step at low s and adam_tensor's at high,
    # the run's head as it ends: the previous default (it holds the rows recorded as `abp` while it was)
    "abp_cubic_mix": {**MIX, **JOINT_HEAD},
    # abp_cubic_mix, then its head trained on on the final mask for the grid's max_steps more steps (the budget of
    # head steps every fixed-mask row's head gets on its final mask): today's default, pinned, so its rows keep their
    # meaning when the default moves again (`abp` adopts them)
    "abp_refit": {**MIX, "head_refit_steps": None},
    # abp_cubic_mix with every score tensor pruned to the target on its own (allocation="tensor": one γ controller
    # and stop rule per tensor), so each keeps 1 − s of its weights as MP and Wanda do, instead of one global count
    "abp_per_tensor": {**MIX, "allocation": "tensor", **JOINT_HEAD},
}
METHODS = (*ABP_VARIANTS, "random", "mp", "imp", "wanda", "feature_extraction", "finetune",
           "abp_mask", "abp_shuffled", "abp_reinit", "abp_norecovery")
# Methods that retrain a head on the mask of the grid's own ``abp`` run of the same task, sparsity and seed.
FROM_ABP_MASK = ("abp_mask", "abp_shuffled")
DENSE_METHODS = ("feature_extraction", "finetune")  # no sparsity level: reported with sparsity null
LEARNT_METHODS = (*ABP_VARIANTS, "abp_reinit", "abp_norecovery")  # run Algorithm 1 (recovery statistics)
# Methods whose final model must hold the pre-trained weights exactly (checked on every run).
KEEPS_WEIGHTS = tuple(m for m in METHODS if m not in ("finetune", "abp_reinit"))
RESULT = "result.json"
FINETUNE_CHECKPOINT = "finetune_checkpoint.safetensors"  # the fine-tuning loop's (finetune, mp), deleted when done


def method_order(method: str) -> int:
    """Position of ``method`` in tables and run order (unknown methods last)."""
    return METHODS.index(method) if method in METHODS else len(METHODS)


@dataclass
class ExperimentConfig:
    """The budget and settings shared by every run of a grid (recorded in each result)."""

    model: Optional[str] = None  # None = the embedded all-MiniLM-L6-v2
    glue_dir: Optional[str] = None
    max_steps: int = 200
    batch_size: int = 16
    max_length: int = 64
    train_subsample: Optional[int] = None
    head_lr: float = 3e-3
    eval_every: Optional[int] = None  # None: one dev evaluation, at the end (no selection on dev)
    head_pool: str = "auto"  # the head's pooling for every method (ABPConfig.head_pool); see budget()
    device: str = "auto"
    # the fine-tuning loop (finetune, mp, imp)
    backbone_lr: float = 2e-5
    weight_decay: float = 0.01
    finetune_warmup: float = 0.1
    # mp: Zhu & Gupta, s_t = s·(1 − (1 − (t − t0)/(t1 − t0))³), pruning every mp_every steps in [t0, t1]
    mp_begin: float = 0.1  # t0 as a share of max_steps
    mp_end: float = 0.7  # t1: the last 30 % fine-tune the sparse network
    mp_every: Optional[int] = None  # None: 12 pruning events over [t0, t1]
    # imp
    imp_rate: float = 0.2  # at most this share of the remaining weights pruned per round
    imp_round_steps: Optional[int] = None  # fine-tuning steps per round (None: max_steps)
    # Every IMP trajectory stops at these sparsities on its way to its target (the paper's grid), so one
    # trajectory per task and seed serves every grid cell: 24 rounds reach 0.2 … 0.99, where separate runs
    # at a constant rate per target need 57 (1 + 4 + 6 + 11 + 14 + 21).
    imp_milestones: tuple[float, ...] = (0.2, 0.5, 0.7, 0.9, 0.95, 0.99)
    # wanda
    wanda_batches: int = 8
    # ablations
    reinit_sigma: float = 0.5
    recovery_every: int = 1  # sample the masks every k score steps for the recovery statistics

    _COMMON = ("model", "max_steps", "batch_size", "max_length", "train_subsample", "head_lr", "eval_every")
    _FINETUNE = ("backbone_lr", "weight_decay", "finetune_warmup")
    _PER_METHOD = {"finetune": _FINETUNE, "mp": _FINETUNE + ("mp_begin", "mp_end", "mp_every"),
                   "imp": _FINETUNE + ("imp_rate", "imp_round_steps", "imp_milestones"), "wanda": ("wanda_batches",),
                   "abp_reinit": ("reinit_sigma", "recovery_every"), "abp": ("recovery_every",),
                   "abp_norecovery": ("recovery_every",)}

    def budget(self, method: str, task: str) -> dict:
        """The settings a run of ``method`` on ``task`` depends on (a finished run is reused only if they match);
        for Algorithm 1's methods that includes the ABP settings it ran with. The head's pooling is recorded
        where it is not the model's own per-sentence pooling, which every budget recorded without it ran."""
        out = {k: getattr(self, k) for k in self._COMMON + self._PER_METHOD.get(method, ("recovery_every",)
                                                                                  if method in ABP_VARIANTS else ())}
        pool = resolve_pool(self.head_pool, self.model, get_task(task).text_b is not None)
        if pool != native_pooling(self.model):
            out["head_pool"] = pool
        if method in LEARNT_METHODS or method in FROM_ABP_MASK:
            cfg = ABPConfig(**{"head_lr": self.head_lr, "max_steps": self.max_steps, **self.variant(method)})
            d = {**dataclasses.asdict(cfg), "head_refit_steps": cfg.refit_steps}
            if method in FROM_ABP_MASK:  # they train their own head on the run's mask: the run's refit is not theirs
                d["head_refit_steps"] = ABP_OPTIONAL_SETTINGS["head_refit_steps"]
            out["abp"] = {k: d[k] for k in ABP_SETTINGS}
            out["abp"].update({k: d[k] for k, neutral in ABP_OPTIONAL_SETTINGS.items() if d[k] != neutral})
        return out

    def variant(self, method: str) -> dict:
        """The ABP settings of ``method`` (:data:`ABP_VARIANTS`)."""
        return dict(ABP_VARIANTS.get(method, {}))

    def abp_config(self, task: str, sparsity: Optional[float], seed: int, **over) -> ABPConfig:
        n = self.max_steps
        fields = {"model": self.model, "task": task, "glue_dir": self.glue_dir, "train_subsample": self.train_subsample,
                  "target_sparsity": sparsity or 0.0, "head_lr": self.head_lr, "batch_size": self.batch_size,
                  "max_length": self.max_length, "max_steps": n, "eval_every": self.eval_every or n,
                  "log_every": min(10, n), "checkpoint_every": max(1, math.ceil(n / 4)), "seed": seed,
                  "device": self.device, "head_pool": self.head_pool}
        cfg = ABPConfig(**{**fields, **over})
        cfg.validate()
        return cfg

    def finetune_options(self) -> FinetuneOptions:
        return FinetuneOptions(backbone_lr=self.backbone_lr, weight_decay=self.weight_decay,
                               warmup_fraction=self.finetune_warmup)

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "wanda_batches", "recovery_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.imp_rate < 1:
            raise ValueError(f"imp_rate must be in (0, 1), got {self.imp_rate}")
        bad = [m for m in self.imp_milestones if not 0 < m < 1]
        if bad:
            raise ValueError(f"imp_milestones must be in (0, 1), got {bad}")
        if not 0 <= self.mp_begin <= self.mp_end <= 1:
            raise ValueError(f"need 0 <= mp_begin <= mp_end <= 1, got {self.mp_begin}, {self.mp_end}")
        if self.reinit_sigma < 0:
            raise ValueError(f"reinit_sigma must be >= 0, got {self.reinit_sigma}")


def model_label(model: Optional[str]) -> str:
    """Short model name for file names and tables (``all-MiniLM-L6-v2`` for the embedded default)."""
    from abp.models import DEFAULT_MODEL_ALIASES

    if model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL.split(" ")[0]
    name = str(model).rstrip("/")
    if os.path.isdir(name):  # a local folder: its name
        name = os.path.basename(name)
    return name.replace("/", "_").replace(" ", "_")


# ------------------------------------------------------------------------------------------ weights check


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every pre-trained parameter (names and bytes; mask scores excluded)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        if name.rsplit(".", 1)[-1] in ("scores", "bias_scores"):
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=4)
def pretrained_digest(model: Optional[str], dtype: torch.dtype) -> str:
    """Digest of the pre-trained backbone as loaded from disk in ``dtype`` (what runs must end with)."""
    backbone, _ = load_backbone(model, dtype=dtype)
    return weights_digest(backbone)


def _weights_check(method: str, model: Optional[str], backbone: nn.Module) -> dict:
    dtype = next(backbone.parameters()).dtype
    ref, final = pretrained_digest(model, dtype), weights_digest(backbone)
    return {"weights_untouched": ref == final, "weights_must_be_untouched": method in KEEPS_WEIGHTS,
            "pretrained_digest": ref[:16], "final_digest": final[:16]}


# ------------------------------------------------------------------------------------------ schedules


def cubic_sparsity(step: int, final: float, begin: int, end: int) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f·(1 − (1 − (t − t0)/(t1 − t0))³)`` clamped to ``[t0, t1]``."""
    if end <= begin:
        return final if step >= end else 0.0
    frac = min(1.0, max(0.0, (step - begin) / (end - begin)))
    return final * (1.0 - (1.0 - frac) ** 3)


def mp_schedule(max_steps: int, exp: ExperimentConfig) -> tuple[int, int, int]:
    """``(t0, t1, Δt)`` in steps for gradual magnitude pruning."""
    t1 = min(max_steps, max(1, round(exp.mp_end * max_steps)))
    t0 = min(round(exp.mp_begin * max_steps), t1)
    every = exp.mp_every or max(1, (t1 - t0) // 12)
    return t0, t1, every


def imp_schedule(sparsity: float, max_rate: float, milestones=()) -> list[float]:
    """Sparsity after each IMP round on the way to ``sparsity``.

    The trajectory stops exactly at every milestone below ``sparsity`` and at ``sparsity`` itself; between
    two stops it takes the fewest rounds pruning at most ``max_rate`` of the remaining weights, at one
    constant rate. Targets share the rounds up to their highest common milestone.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"IMP needs a sparsity in (0, 1), got {sparsity}")
    out, start = [], 0.0
    for stop in sorted({m for m in milestones if m < sparsity} | {sparsity}):
        keep = (1 - stop) / (1 - start)  # share of the remaining weights this stretch keeps
        n = max(1, math.ceil(math.log(keep) / math.log(1 - max_rate) - 1e-9))
        out += [1 - (1 - start) * keep ** (r / n) for r in range(1, n)] + [stop]
        start = stop
    return out


# ------------------------------------------------------------------------------------------ the phases


def _resume(out: Path) -> bool:
    return (out / "checkpoint.safetensors").is_file()


def _head_only(cfg: ABPConfig, out: Path, mask_init: Optional[Callable[[nn.Module], None]], progress: bool):
    """Phase 2 of fixed-mask methods: the Trainer with the mask set by ``mask_init`` and only the head learnt."""
    t = ExperimentTrainer(cfg, out, progress=progress, mask_init=mask_init, learn_mask=False)
    return t.run(resume=_resume(out)), t.model.backbone


def _learnt(exp: ExperimentConfig, cfg: ABPConfig, out: Path, progress: bool,
            mask_init: Optional[Callable[[nn.Module], None]] = None):
    t = TrackedTrainer(cfg, out, progress=progress, mask_init=mask_init, recovery_every=exp.recovery_every)
    res = t.run(resume=_resume(out))
    if cfg.refit_steps:  # as `abp prune` does: the head trained on on the final mask (same bits)
        res = refit_head(cfg, out, res, resume=_resume(out / HEAD_REFIT_DIR), progress=progress, trainer=ExperimentTrainer,
                         weights_init=mask_init)
    return res, t.model.backbone, t.recovery_stats(res["mask_file"])


def _phase1(path: Path, make: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict]:
    """Masks of a finished phase 1 from ``path``, else ``make()`` them and save them there."""
    if path.is_file():
        return load_masks(path)
    masks, meta = make()
    save_masks(path, masks, meta)
    return masks, meta


def _mp_masks(exp: ExperimentConfig, cfg: ABPConfig, sparsity: float, progress: bool, checkpoint: Path):
    """MP's phase 1; the fine-tuning checkpoint is kept (the caller deletes it once the masks are saved)."""
    t_start = time.time()
    ft = FineTuner(cfg, exp.finetune_options())
    t0, t1, every = mp_schedule(cfg.max_steps, exp)
    ft.set_masks({k: torch.ones(w.shape, dtype=torch.bool) for k, w in ft.weights.items()})
    state = {"events": []}  # the pruning so far: in every checkpoint, restored on resume

    def prune(step: int) -> None:
        if t0 <= step <= t1 and ((step - t0) % every == 0 or step == t1):
            s = cubic_sparsity(step, sparsity, t0, t1)
            ft.set_masks(magnitude_masks(ft.weights, s, previous=ft.masks))
            state["events"].append([step, round(s, 6)])

    identity = {"method": "mp", "task": cfg.task, "seed": cfg.seed, "sparsity": sparsity, "schedule": [t0, t1, every]}
    losses = ft.train(cfg.max_steps, on_step=prune, progress=progress, desc="mp fine-tune", checkpoint=checkpoint,
                      identity=identity, extra=state, keep_checkpoint=True)
    metrics = ft.evaluate()  # the fine-tuned sparse network itself (its weights are then thrown away)
    schedule = {"t0": t0, "t1": t1, "every": every, "events": state["events"]}
    return ft.masks, {"finetuned_metrics": metrics, "schedule": schedule, "final_loss": losses[-1],
                      "seconds": round(time.time() - t_start, 1)}


def imp_round_checkpoint(rounds_dir: Path, r: int, target: float) -> Path:
    """The fine-tuning checkpoint of IMP round ``r`` (to ``target``) while it runs (deleted once the round is saved)."""
    return rounds_dir / f"checkpoint-round{r:02d}-s{target:.6f}.safetensors"


def _imp_masks(exp: ExperimentConfig, cfg: ABPConfig, sparsity: float, rounds_dir: Path, progress: bool):
    """Masks of IMP at ``sparsity``; each round's masks are kept in ``rounds_dir`` (named by round and
    sparsity) and reused by any later target whose trajectory passes through them."""
    t_start = time.time()
    path = imp_schedule(sparsity, exp.imp_rate, exp.imp_milestones)
    steps = exp.imp_round_steps or cfg.max_steps
    rounds_dir.mkdir(parents=True, exist_ok=True)
    data, masks, computed = None, None, 0
    for r, target in enumerate(path, 1):
        f = rounds_dir / f"round{r:02d}-s{target:.6f}.safetensors"
        if f.is_file():
            masks, meta = load_masks(f)
            seen = meta.get("path", [])
            if len(seen) != r or not all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(seen, path)):
                raise RuntimeError(f"{f} was reached through sparsities {seen}, this trajectory is {path[:r]}")
            imp_round_checkpoint(rounds_dir, r, target).unlink(missing_ok=True)  # killed after the round was saved
            continue
        data = data or load_task_data(cfg)
        ft = FineTuner(cfg, exp.finetune_options(), masks=masks, data=data)  # rewound to the pre-trained weights
        # the round in flight resumes from its checkpoint, whichever run of this trajectory wrote it
        ckpt = imp_round_checkpoint(rounds_dir, r, target)
        identity = {"method": "imp", "task": cfg.task, "seed": cfg.seed, "round": r,
                    "path": [round(x, 9) for x in path[:r]]}  # (round files match their path to 1e-9 too)
        ft.train(steps, progress=progress, desc=f"imp round {r}/{len(path)}", checkpoint=ckpt, identity=identity,
                 keep_checkpoint=True)
        masks = {k: v.cpu() for k, v in magnitude_masks(ft.weights, target, previous=ft.masks).items()}
        save_masks(f, masks, {"round": r, "sparsity": target, "path": path[:r]})
        ckpt.unlink(missing_ok=True)
        computed += 1
        del ft
    return masks, {"rounds": len(path), "trajectory": [round(x, 6) for x in path], "rounds_computed_here": computed,
                   "round_steps": steps, "seconds": round(time.time() - t_start, 1)}


def _wanda_masks(exp: ExperimentConfig, cfg: ABPConfig, sparsity: float):
    t_start = time.time()
    ft = FineTuner(cfg, exp.finetune_options())
    norms = ft.input_norms(exp.wanda_batches)
    masks = wanda_masks(ft.weights, norms, sparsity)
    return masks, {"calibration_batches": exp.wanda_batches, "activation_weighted": sorted(norms),
                   "seconds": round(time.time() - t_start, 1)}


def reinit_weights_(sigma: float, seed: int) -> Callable[[nn.Module], None]:
    """``mask_init`` for ``abp_reinit``: every masked weight ``w ← w·N(1, σ)`` elementwise (deterministic in
    ``seed``, so a resumed run perturbs identically)."""
    def init(backbone: nn.Module) -> None:
        g = torch.Generator().manual_seed(10_007 + seed)
        with torch.no_grad():
            for _, m in masked_modules(backbone):
                noise = torch.randn(m.weight.shape, generator=g, dtype=torch.float32)
                m.weight.mul_((1 + sigma * noise).to(m.weight.device, m.weight.dtype))
    return init


# ------------------------------------------------------------------------------------------ entry point


def run_method(method: str, exp: ExperimentConfig, task: str, sparsity: Optional[float], seed: int,
               out: str | os.PathLike, *, abp_source: Optional[str | os.PathLike] = None,
               imp_rounds_dir: Optional[str | os.PathLike] = None, progress: bool = False) -> dict:
    """Run one method once and write ``out/result.json``; returns the result.

    ``sparsity`` is ignored (None in the result) for :data:`DENSE_METHODS`. ``abp_source`` (:data:`FROM_ABP_MASK`
    only): a finished ``abp`` run folder of the same task, sparsity and seed whose mask is retrained (and shuffled);
    without it the ABP mask is learnt inside ``out/abp_source``. ``imp_rounds_dir`` (``imp`` only): where the
    trajectory's rounds are kept, shared by the runs of one task and seed (default ``out/imp_rounds``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    exp.validate()
    dense = method in DENSE_METHODS
    if not dense and (sparsity is None or not 0 < sparsity < 1):
        raise ValueError(f"method {method} needs a sparsity in (0, 1), got {sparsity}")
    s = None if dense else float(sparsity)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    if method in LEARNT_METHODS:
        over = {"recovery": False} if method == "abp_norecovery" else exp.variant(method)
    else:  # the mask is set, not learnt: uniform scores keep every weight (magnitude would prune exact zeros) and
        over = {"score_init_mode": "uniform"}  # draw the RNG stream every baseline row was recorded with
    cfg = exp.abp_config(task, s, seed, **over)
    recovery, phase1, res = None, {}, None
    if method in ABP_VARIANTS or method == "abp_norecovery":
        res, backbone, recovery = _learnt(exp, cfg, out, progress)
    elif method == "abp_reinit":
        res, backbone, recovery = _learnt(exp, cfg, out, progress, mask_init=reinit_weights_(exp.reinit_sigma, seed))
        phase1 = {"reinit_sigma": exp.reinit_sigma}
    elif method == "random":
        res, backbone = _head_only(cfg, out, lambda bb: random_mask_(bb, s, seed=seed), progress)
    elif method == "feature_extraction":
        res, backbone = _head_only(cfg, out, None, progress)
        if res["sparsity"] != 0:
            raise RuntimeError(f"feature_extraction should keep every weight, its mask has sparsity {res['sparsity']}")
    elif method in ("mp", "imp", "wanda"):
        rounds_dir = Path(imp_rounds_dir or out / "imp_rounds")
        make = {"mp": lambda: _mp_masks(exp, cfg, s, progress, out / FINETUNE_CHECKPOINT),
                "imp": lambda: _imp_masks(exp, cfg, s, rounds_dir, progress),
                "wanda": lambda: _wanda_masks(exp, cfg, s)}[method]
        masks, phase1 = _phase1(out / "phase1_masks.safetensors", make)
        (out / FINETUNE_CHECKPOINT).unlink(missing_ok=True)  # MP's phase 1 is saved: its checkpoint is not needed
        res, backbone = _head_only(cfg, out, lambda bb: apply_masks_(bb, masks), progress)
    elif method in FROM_ABP_MASK:
        src = Path(abp_source) if abp_source is not None else None
        if src is None or not (src / RESULT).is_file():
            src = out / "abp_source"  # no grid run to reuse: learn the `abp` method's mask here, with its settings
            if not (src / "metrics.json").is_file():
                ExperimentTrainer(exp.abp_config(task, s, seed, **ABP_VARIANTS["abp"]), src,
                                  progress=progress).run(resume=_resume(src))
        src_mask = src / "mask.safetensors"
        phase1 = {"source_mask": os.path.relpath(src_mask, out)}

        def set_mask(bb: nn.Module) -> None:
            abp.load_mask(bb, src_mask)
            if method == "abp_shuffled":
                shuffle_masks_(bb, seed=seed)
        res, backbone = _head_only(cfg, out, set_mask, progress)
    else:  # finetune
        ft = FineTuner(cfg, exp.finetune_options())
        ft.train(cfg.max_steps, progress=progress, desc="finetune", checkpoint=out / FINETUNE_CHECKPOINT,
                 identity={"method": "finetune", "task": task, "seed": seed}, keep_checkpoint=True)
        metrics = ft.evaluate()  # (killed here, a rerun restores the finished loop: the checkpoint goes last)
        res = {"metric_name": ft.task.primary_metric, "dev_metrics": metrics, "sparsity": None, "mask_file": None}
        backbone = ft.model.backbone
    result = {
        "task": task, "model": model_label(exp.model), "method": method, "sparsity": s, "seed": seed,
        "metric_name": res["metric_name"], "metrics": {k: float(res["dev_metrics"][k]) for k in get_task(task).metric_keys()},
        "sparsity_reached": res["sparsity"], "steps": exp.max_steps, "budget": exp.budget(method, task),
        "seconds": round(time.time() - t_start, 1), "device": str(cfg.device if cfg.device != "auto" else
                                                                   ("cuda" if torch.cuda.is_available() else "cpu")),
        **_weights_check(method, exp.model, backbone),
        "recovery": recovery, "phase1": phase1, **({"head_refit": res["head_refit"]} if res.get("head_refit") else {}),
        "mask_file": os.path.relpath(res["mask_file"], out) if res.get("mask_file") else None,
        "code": code_version(),
    }
    if result["weights_must_be_untouched"] and not result["weights_untouched"]:
        raise RuntimeError(f"{method}: the final model's pre-trained weights differ from the pre-trained ones")
    write_text(out / RESULT, json.dumps(result, indent=1))
    # 91 MB each for MiniLM (the fine-tuning checkpoint ~300 MB): not kept
    for leftover in ("checkpoint.safetensors", "recovery.safetensors", FINETUNE_CHECKPOINT,
                     f"{HEAD_REFIT_DIR}/checkpoint.safetensors"):
        (out / leftover).unlink(missing_ok=True)
    return result


def read_result(out: str | os.PathLike) -> Optional[dict]:
    p = Path(out) / RESULT
    return json.loads(p.read_text()) if p.is_file() else None


