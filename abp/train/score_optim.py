"""Algorithm 1's score update for every masked tensor of a model, without a host sync per step.

``θ ← θ − α·∇θ − γ`` (plain SGD, as in the paper), or ``θ ← θ − α·adam(∇θ) − γ`` (``optimizer="adam"``:
Adam's bias-corrected first/second-moment direction in place of the raw gradient, with Algorithm 1's γ push,
stop rule and recovery rule unchanged). Adam makes a score's step size independent of its gradient's scale,
which spans orders of magnitude between tensors (embedding rows a batch does not touch get none at all);
``optimizer="adam_tensor"`` keeps one second moment per tensor instead, so that inside a tensor the step stays
proportional to the gradient; ``optimizer="adam_floor"`` floors each score's second moment at its tensor's mean
``optimizer="adam_ceiling"`` caps it there instead; ``optimizer="adam_mix"`` takes the geometric mean of the two
weighted by the target sparsity (see :data:`OPTIMIZERS`).

``γ`` is either the constant the user gives or set by an on-device controller that tracks a sparsity ramp reaching the target after ``prune_steps``
(the paper hand-tunes γ; users should not have to). Pruning stops — ``active`` drops to 0 for good —
the first step the fraction of ``θ ≤ 0`` reaches the target, as the paper's stop rule says.

Two paths, same arithmetic: tensors whose module runs the *fused* update get their step inside the
backward (:class:`abp.ScoreSGD`), all others get one multi-tensor launch after the backward.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from abp import _ops, reference
from abp.functional import ScoreSGD
from abp.nn import MaskedLinear
from abp.patch import masked_modules, shared_weights

# Controller gain: γ is multiplied by exp(clamp(GAIN · error / target, ±MAX_LOG_STEP)) every step.
GAIN, MAX_LOG_STEP = 20.0, 0.1


OPTIMIZERS = ("sgd", "adam", "adam_tensor", "adam_floor", "adam_ceiling", "adam_mix")
# adam_tensor: Adam's first moment per score, its second moment per tensor (the tensor's mean square gradient), so
# the step keeps the gradient's relative sizes inside a tensor, as SGD does, and one pace across tensors, as Adam
# does. Adam's per-score normalisation moves every score about α whatever its gradient's size, which ranks weights
# by the sign consistency of their gradient rather than its size; at 95-99 % sparsity that loses to plain SGD.
# adam_floor: Adam with each score's second moment floored at its tensor's mean second moment, √max(v̂, mean v̂):
# a score whose gradient RMS is above its tensor's moves about α per step, as under Adam, and one below moves in
# proportion to its gradient, as under adam_tensor, so weights with weak gradients are no longer carried as fast
# as the ones the loss depends on. Per-score memory as Adam's.
# adam_ceiling: the other way round, √min(v̂, mean v̂): a score whose gradient RMS is below its tensor's moves about
# α per step (Adam's sign-consistency ranking, where most scores are), one above it moves α × its RMS over the
# tensor's (adam_tensor's size ranking, among the few weights a 95-99 % mask keeps).
# adam_mix: each score's second moment v̂^(1−s) · mean(v̂)^s, s the target sparsity: Adam's per-score step where most
# weights stay (s = 0.2 weighs the score's own v̂ 0.8), adam_tensor's per-tensor one where few do (s = 0.99: 0.01), so
# that inside a tensor the step grows as |g|^s, from the sign ranking Adam gives at 50 % to the size ranking that
# adam_tensor wins with at 95-99 %. Per-score memory as Adam's.


def adam_score_lr(model: nn.Module, *, prune_steps: int, ratio: float) -> float:
    """Auto α for Adam: its direction has unit size per score, so a steady gradient moves a score
    ``ratio × init`` over the pruning window when α = ratio·init / prune_steps (no gradient needed)."""
    init = [float(s.detach().abs().mean()) for _, m in masked_modules(model) for _, _, s in m.score_pairs()]
    if not init:
        raise ValueError("adam_score_lr: the model has no masked modules (call abp.mask_model first)")
    return ratio * max(sum(init) / len(init), 1e-4) / prune_steps


def calibrate_score_lr(model: nn.Module, *, prune_steps: int, ratio: float = 4.0,
                       reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> float:
    """α such that a score with a typical gradient moves ``ratio × init`` over the pruning window.

    "Typical" is the median over tensors of each tensor's RMS over its non-zero entries (embedding rows
    absent from the batch, and modules the loss does not reach, carry no signal). Call after one
    backward. Plain SGD keeps this α for the whole run: it only spares users the paper's hand-tuning.

    ``reduce`` is for sharded scores (FSDP2 DTensors): each process then reads only its own shards
    (``to_local()``), and ``reduce`` returns the per-tensor sums below added up over the processes (an
    all-reduce), so that every process computes the α of the whole tensors.
    """
    scores = [s for _, m in masked_modules(model) for _, _, s in m.score_pairs()]
    local = (lambda t: t.to_local()) if reduce is not None else (lambda t: t)
    # per tensor: Σ|θ|, Σg², how many gradient entries are non-zero, whether it has a gradient (float64 sums)
    stats = torch.zeros(len(scores), 4, dtype=torch.float64, device=local(scores[0]).device if scores else None)
    for i, s in enumerate(scores):
        stats[i, 0] = local(s.detach()).abs().sum(dtype=torch.float64)
        if s.grad is not None:
            g = local(s.grad.detach()).float()
            stats[i, 1], stats[i, 2], stats[i, 3] = g.square().sum(dtype=torch.float64), g.count_nonzero(), 1.0
    rows = (reduce(stats) if reduce is not None else stats).tolist()
    init = [r[0] / s.numel() for r, s in zip(rows, scores)]
    rms = [math.sqrt(r[1] / r[2]) for r in rows if r[3] > 0 and r[2] > 0]
    if not rms:
        raise RuntimeError("calibrate_score_lr: no score has a gradient; run a backward through the masked model first")
    typical = sorted(rms)[len(rms) // 2]
    if not math.isfinite(typical) or typical == 0:
        raise FloatingPointError(f"calibrate_score_lr: typical score-gradient size is {typical}; cannot set α")
    return ratio * max(sum(init) / len(init), 1e-4) / (prune_steps * typical)


class FusedUpdateError(RuntimeError):
    """The fused score update would not be exact here."""


# The controller's target ramp s·(1 − (1 − t)^p) over the pruning window, by name: p = 1 is a straight line, p = 3
# Zhu & Gupta's cubic (most of the pruning early, the last weights chosen slowly near the final sparsity).
SCHEDULES = {"linear": 1, "quadratic": 2, "cubic": 3}

# How the target sparsity is shared among the masked tensors. global: Algorithm 1's one count over all scores, one γ
# and one stop rule, so each tensor keeps what its scores earn against every other tensor's; tensor: every score
# tensor has its own γ controller on its own ramp and stops at the target on its own, so each keeps 1 − s of its
# weights, as magnitude pruning and Wanda do (one γ and one ``active`` per tensor; the multi-tensor ops then run once
# per tensor, and the fused in-backward update, which holds one γ, is refused).
ALLOCATIONS = ("global", "tensor")


class ScoreOptimizer:
    """Owns the scores' SGD step, the γ schedule and the stop rule of Algorithm 1."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        target_sparsity: float,
        prune_steps: int,
        gamma: Optional[float] = None,
        recovery: bool = True,
        fused: bool = False,
        schedule: str = "linear",
        backend: Optional[str] = None,
        optimizer: str = "sgd",
        allocation: str = "global",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-12,  # not torch's 1e-8: MiniLM's score gradients span 8e-10 … 4e-6 per entry (1st … 99th
        #   percentile, one SST-2 batch of 16), so 1e-8 would damp a tenth of them
    ):
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
        if prune_steps < 1:
            raise ValueError(f"prune_steps must be >= 1, got {prune_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"score optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
        if allocation != "global" and fused:
            raise FusedUpdateError(f"fused score update refused: allocation={allocation!r} keeps one γ per tensor, "
                                   "the backward epilogue applies one γ to every tensor")
        if optimizer != "sgd" and fused:
            raise FusedUpdateError(f"fused score update refused: the {optimizer} score optimizer keeps per-score moments "
                                   "that the backward epilogue does not hold (it applies plain SGD only)")
        self.allocation = allocation
        self.optimizer, self.betas, self.eps = optimizer, (float(betas[0]), float(betas[1])), float(eps)
        self.lr, self.target, self.prune_steps = float(lr), float(target_sparsity), int(prune_steps)
        self.auto_gamma, self.recovery, self.schedule, self.backend = gamma is None, recovery, schedule, backend or ""
        self.modules = list(masked_modules(model))
        if not self.modules:
            raise ValueError("ScoreOptimizer: the model has no masked modules (call abp.mask_model first)")
        self.fused_modules = [m for _, m in self.modules if fused and isinstance(m, MaskedLinear)]
        if self.fused_modules and shared_weights(model):
            raise FusedUpdateError(f"fused score update refused: masked modules share a weight {shared_weights(model)[:3]}; "
                                   "the in-place update would not be exact (use fused=False)")
        fused_ids = {id(m) for m in self.fused_modules}
        self.scores = [s for _, m in self.modules if id(m) not in fused_ids for _, _, s in m.score_pairs()]
        self.total = sum(s.numel() for _, m in self.modules for _, _, s in m.score_pairs())
        first = self.modules[0][1].scores
        device = first.device
        init = float(first.detach().float().mean())
        # auto γ starts where a pure-γ drift of U(0, 2·init) scores would meet the ramp; the controller adapts it
        # (allocation="tensor": one of each per score tensor, in self.scores' order)
        shape = (len(self.scores),) if allocation == "tensor" else ()
        self.gamma = torch.full(shape, gamma if gamma is not None else 2 * max(init, 1e-4) * max(self.target, 0.05) / self.prune_steps,
                                dtype=torch.float32, device=device)
        self.active = torch.ones(shape, dtype=torch.float32, device=device)
        self.recount()
        self.frozen = False
        self.steps = 0
        # Adam's moments and per-tensor step counts (a tensor steps only when its module took part)
        self.moments = [(torch.zeros_like(s), self._second_moment_like(s)) for s in self.scores] if optimizer != "sgd" else []
        self.moment_steps = [0] * len(self.moments)
        self._numel_cache: dict = {}
        self._sgd = ScoreSGD(self.lr, self.gamma, self.active, recovery)
        for m in self.fused_modules:
            m.fused_update = self._sgd

    @torch.no_grad()
    def recount(self) -> None:
        """Count θ ≤ 0 per tensor from the scores as they are (on device, no sync): at the start and after
        the scores were loaded from elsewhere (resume). Steps keep the counts current from then on."""
        device = self.modules[0][1].scores.device
        self.counts = torch.stack([(s <= 0).sum() for s in self.scores]) if self.scores else \
            torch.zeros(1, dtype=torch.int64, device=device)
        for m in self.fused_modules:
            m.fused_counts.copy_(torch.stack([(s <= 0).sum() for _, _, s in m.score_pairs()] +
                                             [torch.zeros((), dtype=torch.int64, device=device)])[:2])
        self.pruned = self.counts.sum() + sum((m.fused_counts.sum() for m in self.fused_modules),
                                             torch.zeros((), dtype=torch.int64, device=device))

    def set_lr(self, lr: float) -> None:
        """Set α (e.g. after :func:`calibrate_score_lr`), for both update paths."""
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"score learning rate must be finite and >= 0, got {lr}")
        self.lr = float(lr)
        self._sgd.lr = self.lr

    @property
    def fused(self) -> bool:
        return bool(self.fused_modules)

    def target_at(self, step: int) -> float:
        """The sparsity the auto-γ controller aims at after ``step`` steps."""
        frac = min(1.0, step / self.prune_steps)
        return self.target * (1.0 - (1.0 - frac) ** SCHEDULES[self.schedule])

    @torch.no_grad()
    def step(self) -> None:
        """Apply the update to the non-fused scores (their ``.grad``), then the schedule and stop rule.

        A tensor whose module took no part in this backward (no ``.grad``; a fused module whose backward
        did not run) is left as it is on both paths, so fused and unfused runs agree exactly.
        """
        if self.frozen:
            return
        live = [i for i, s in enumerate(self.scores) if s.grad is not None]
        if live:
            scores = [self.scores[i] for i in live]
            counts = self.counts if len(live) == len(self.scores) else torch.empty(len(live), dtype=torch.int64,
                                                                                      device=self.counts.device)
            self._update(live, scores, [s.grad for s in scores], counts)
            if counts is not self.counts:
                self.counts[torch.tensor(live, device=counts.device)] = counts
            for s in scores:
                s.grad = None
        pruned = self.counts.sum()
        for m in self.fused_modules:
            pruned = pruned + m.fused_counts.sum()
            m.fused_uses = 0
        self.pruned = pruned
        self.steps += 1
        # global: the pruned share of all scores; tensor: each tensor's own share (one controller each)
        frac = (self.counts.double() / self._numels([s.numel() for s in self.scores], self.counts.device)).float() \
            if self.allocation == "tensor" else pruned.float() / self.total
        self.active.mul_((frac < self.target).float())
        if self.auto_gamma:
            err = (self.target_at(self.steps) - frac) / max(self.target, 1e-6)
            self.gamma.mul_(torch.exp(torch.clamp(GAIN * err, -MAX_LOG_STEP, MAX_LOG_STEP)) * self.active
                            + (1 - self.active))

    def _second_moment_like(self, s: torch.Tensor) -> torch.Tensor:
        """Adam's second moment: one per score (``adam``, ``adam_floor``, ``adam_ceiling``); ``adam_tensor``'s: one per
        tensor (0-d)."""
        if self.optimizer == "adam_tensor":
            return torch.zeros((), dtype=torch.float32, device=s.device)
        return torch.zeros_like(s)

    def _update(self, live: list[int], scores: list[torch.Tensor], grads: list[torch.Tensor],
                counts: torch.Tensor) -> None:
        """One step of the live tensors ``scores`` (``counts`` ← their θ ≤ 0): SGD and Adam each in one multi-tensor
        op (Adam's moments and the score step in one pass), ``adam_mix`` in two (the moments and each tensor's sum of
        v̂, then the step: each score's step needs its whole tensor's mean); ``adam_tensor``, ``adam_floor`` and
        ``adam_ceiling`` compute their directions in eager torch first. The step op runs once over every live tensor
        with the one γ (``allocation="global"``), or once per tensor with its own γ and ``active`` (``"tensor"``)."""
        if self.optimizer == "adam":
            b1, b2 = self.betas
            inv1, inv2 = (list(t) for t in zip(*(self._inv_bias(i) for i in live)))
            m, v = [self.moments[i][0] for i in live], [self.moments[i][1] for i in live]

            def step(sl: slice, gamma: torch.Tensor, active: torch.Tensor, cnt: torch.Tensor) -> None:
                _ops.multi_score_adam_update_(scores[sl], grads[sl], m[sl], v[sl], inv1[sl], inv2[sl], self.lr, b1, b2,
                                              self.eps, gamma, active, self.recovery, cnt, self.backend)
        elif self.optimizer == "adam_mix":
            b1, b2 = self.betas
            inv1, inv2 = (list(t) for t in zip(*(self._inv_bias(i) for i in live)))
            m, v = [self.moments[i][0] for i in live], [self.moments[i][1] for i in live]
            sums = torch.empty(len(live), dtype=torch.float64, device=counts.device)
            _ops.multi_adam_moments_(grads, m, v, inv2, b1, b2, sums, self.backend)
            mean_sq = self._means_of_sums(sums, self._numels([s.numel() for s in scores], counts.device))

            def step(sl: slice, gamma: torch.Tensor, active: torch.Tensor, cnt: torch.Tensor) -> None:
                _ops.multi_score_adam_mix_update_(scores[sl], m[sl], v[sl], mean_sq[sl], inv1[sl], inv2[sl], self.target,
                                                  self.lr, self.eps, gamma, active, self.recovery, cnt, self.backend)
        else:
            if self.optimizer != "sgd":
                grads = self._adam_directions(live, grads)

            def step(sl: slice, gamma: torch.Tensor, active: torch.Tensor, cnt: torch.Tensor) -> None:
                _ops.multi_score_update_(scores[sl], grads[sl], self.lr, gamma, active, self.recovery, cnt, self.backend)
        if self.allocation == "global":
            step(slice(None), self.gamma, self.active, counts)
        else:
            for j, i in enumerate(live):
                step(slice(j, j + 1), self.gamma[i], self.active[i], counts[j:j + 1])

    def _inv_bias(self, i: int) -> tuple[float, float]:
        """Count one more Adam step of tensor ``i``; its bias corrections ``1/(1−β1^t)``, ``1/(1−β2^t)``."""
        self.moment_steps[i] += 1
        t = self.moment_steps[i]
        return 1 / (1 - self.betas[0] ** t), 1 / (1 - self.betas[1] ** t)

    def _adam_directions(self, live: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adam's bias-corrected ``m̂ / (√v̂ + ε)`` for the live tensors (their moments updated in place), in the op
        order of :func:`abp.reference.adam_direction_`; with ``adam_tensor``, ``v`` is the running mean square of the
        whole tensor's gradient; with ``adam_floor``, ``v̂`` is floored at its tensor's mean ``v̂``, with
        ``adam_ceiling`` capped there. (``adam_mix`` runs in two multi-tensor ops instead, see :meth:`_update`.)"""
        b1, b2 = self.betas
        out = []
        for i, g in zip(live, grads):
            m, v = self.moments[i]
            inv1, inv2 = self._inv_bias(i)
            g = g.float()
            tmp = g * (1 - b1)  # one scratch tensor per score tensor (fresh large tensors cost page faults on CPU)
            m.mul_(b1).add_(tmp)
            v.mul_(b2).add_(torch.mul(g, g, out=tmp).mul_(1 - b2) if v.dim() else g.square().mean() * (1 - b2))
            vhat = v * inv2
            if self.optimizer == "adam_floor":
                vhat = torch.maximum(vhat, self._tensor_mean(vhat), out=vhat)
            elif self.optimizer == "adam_ceiling":
                vhat = torch.minimum(vhat, self._tensor_mean(vhat), out=vhat)
            out.append(torch.mul(m, inv1, out=tmp).div_(reference.sqrt_rn(vhat, out=vhat).add_(self.eps)))
        return out

    def _tensor_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of a per-score statistic over its whole tensor (sharded optimisers: over every rank's shard)."""
        return t.mean()

    def _numels(self, numels: list[int], device: torch.device) -> torch.Tensor:
        """``numels`` as a float64 tensor on ``device``, made once per distinct list (no host-to-device copy a step)."""
        key = (tuple(numels), device)
        if key not in self._numel_cache:
            self._numel_cache[key] = torch.tensor(numels, dtype=torch.float64, device=device)
        return self._numel_cache[key]

    def _means_of_sums(self, sums: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
        """Per-tensor means (fp32) from per-tensor float64 sums over ``numels`` elements (sharded optimisers: sums
        and counts over every rank's shard)."""
        return (sums / numels).float()

    def gamma_now(self) -> float:
        """γ as a number for logs (allocation="tensor": the mean over the tensors still pruning, else over all);
        one host sync."""
        if self.gamma.dim() == 0:
            return float(self.gamma)
        live = self.gamma[self.active > 0]
        return float((live if live.numel() else self.gamma).mean())

    def sparsity(self) -> float:
        """Current fraction of pruned scores (one host sync)."""
        return float(self.pruned) / self.total

    def done(self) -> bool:
        """Whether the stop rule has fired (one host sync)."""
        return float(self.active.max()) == 0.0 or self.target == 0.0

    def enable(self, on: bool) -> None:
        """Pause (``on=False``: scores need no gradient, so backward skips dθ) or resume score learning."""
        if self.frozen:
            raise RuntimeError("ScoreOptimizer.enable: the scores were frozen by the stop rule")
        for _, m in self.modules:
            if any(m is f for f in self.fused_modules):
                m.fused_update = self._sgd if on else None
            for _, _, s in m.score_pairs():
                s.requires_grad_(on)
                s.grad = None

    def freeze(self) -> None:
        """After the stop rule: scores stop needing gradients, so backward skips dθ entirely."""
        for _, m in self.modules:
            m.fused_update = None
            for _, _, s in m.score_pairs():
                s.requires_grad_(False)
                s.grad = None
        self.frozen = True

    def state_dict(self) -> dict:
        state = {"gamma": self.gamma.detach().cpu(), "active": self.active.detach().cpu(),
                 "pruned": self.pruned.detach().cpu(), "steps": self.steps, "lr": self.lr}
        if self.moments:
            state["moments"] = [(m.detach().cpu(), v.detach().cpu()) for m, v in self.moments]
            state["moment_steps"] = list(self.moment_steps)
        return state

    def full_state_dict(self) -> dict:
        """The state as a checkpoint holds it (global; sharded optimisers gather, collectively)."""
        return self.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if bool(self.moments) != ("moments" in state):
            raise ValueError(f"checkpoint's score-optimiser state {'has' if 'moments' in state else 'lacks'} Adam moments, "
                             f"this run's score optimizer is {self.optimizer}")
        if self.moments:
            if len(state["moments"]) != len(self.moments):
                raise ValueError(f"checkpoint holds Adam moments for {len(state['moments'])} score tensors, "
                                 f"this model has {len(self.moments)}")
            for (m, v), (m0, v0) in zip(self.moments, state["moments"]):
                if m0.shape != m.shape or v0.shape != v.shape:
                    raise ValueError(f"checkpoint's Adam moments have shape {tuple(m0.shape)}, the scores {tuple(m.shape)}")
                m.copy_(m0)
                v.copy_(v0)
            self.moment_steps = [int(t) for t in state["moment_steps"]]
        if tuple(state["gamma"].shape) != tuple(self.gamma.shape):
            raise ValueError(f"checkpoint's score-optimiser state holds {state['gamma'].numel()} γ, this run's "
                             f"allocation={self.allocation!r} keeps {self.gamma.numel()} (one per tensor under 'tensor', "
                             "one in all under 'global'): resume with the allocation the run was started with")
        self.gamma.copy_(state["gamma"])
        self.active.copy_(state["active"])
        self.pruned = state["pruned"].to(self.pruned.device)
        self.steps = int(state["steps"])
        self.set_lr(float(state["lr"]))
        if not bool(torch.isfinite(self.gamma).all()):
            raise ValueError("checkpoint holds a non-finite gamma")
