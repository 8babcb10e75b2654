"""Connection-recovery statistics: which of the finally kept weights were pruned at some point in training,
and how much of the final mask is its score initialisation's order.

Sampling: after every ``every``-th score step (default every step, i.e. exact at step granularity) the
tracker ORs ``θ ≤ 0`` into an "ever pruned" bit per score. On CPU this costs one comparison and one OR
per score per sample (~20 ms for the 22.7M scores of all-MiniLM-L6-v2, against ~0.5 s per training step).
Samples stop once the stop rule has frozen the scores (the mask no longer changes). With ``every > 1`` a
score that dips below zero and recovers between two samples is missed: the share is then a lower bound.

:class:`abp.experiments.trainers.TrackedTrainer` attaches it around ``ScoreOptimizer.step`` and saves it
beside each checkpoint, so a resumed run keeps its statistics.

*Initialisation order*: the tracker keeps θ₀ (one fp32 copy of the scores, taken when it is built: a resumed
run rebuilds the same θ₀ from its seed before restoring) and compares the final pruned set with the set
that prunes the lowest θ₀ of each tensor, same count per tensor. Jaccard 1 means the mask is its
initialisation's order (the gradients changed nothing); chance means it owes that order nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from abp.patch import score_tensors


class RecoveryTracker:
    """ORs ``scores ≤ 0`` into a per-score "ever pruned" bit; see the module docstring for the sampling."""

    def __init__(self, model: nn.Module, every: int = 1):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = int(every)
        self.scores = dict(score_tensors(model))
        if not self.scores:
            raise ValueError("RecoveryTracker: the model has no masked tensors")
        with torch.no_grad():
            self.ever = {k: s.detach() <= 0 for k, s in self.scores.items()}
            self.initial = {k: s.detach().clone() for k, s in self.scores.items()}
        self.samples, self.last_step, self.complete = 1, 0, True

    @torch.no_grad()
    def observe(self, step: int) -> None:
        """Record the current masks if ``step`` is a sampling step."""
        if step % self.every:
            return
        for k, s in self.scores.items():
            self.ever[k] |= s.detach() <= 0
        self.samples += 1
        self.last_step = step

    def stats(self, final_keep: Mapping[str, torch.Tensor]) -> dict:
        """``share_recovered``: of the finally kept weights, the share that was pruned at some sample."""
        if set(final_keep) != set(self.ever):
            raise ValueError("RecoveryTracker.stats: final masks do not cover the tracked tensors")
        kept = recovered = ever = total = 0
        for k, keep in final_keep.items():
            e = self.ever[k].to(keep.device)
            kept += int(keep.sum())
            recovered += int((keep & e).sum())
            ever += int(e.sum())
            total += keep.numel()
        return {"kept": kept, "recovered": recovered, "share_recovered": recovered / kept if kept else 0.0,
                "ever_pruned_share": ever / total, "sampled_every": self.every, "samples": self.samples,
                "complete": self.complete, "init_order": init_order_overlap(final_keep, self.initial)}

    def save(self, path: str | os.PathLike, step: int) -> None:
        from abp.experiments.masks import save_masks

        save_masks(path, self.ever, {"step": step, "samples": self.samples, "every": self.every,
                                     "last_step": self.last_step, "complete": self.complete})

    def load(self, path: str | os.PathLike, step: int) -> None:
        """Restore the state saved at ``step``; a missing file or another step marks the stats incomplete."""
        from abp.experiments.masks import load_masks

        if not Path(path).is_file():
            self.complete = False
            return
        ever, meta = load_masks(path)
        if meta.get("step") != step or set(ever) != set(self.ever) or meta.get("every") != self.every:
            self.complete = False
            return
        self.ever = {k: v.to(self.ever[k].device) for k, v in ever.items()}
        self.samples, self.last_step, self.complete = int(meta["samples"]), int(meta["last_step"]), bool(meta["complete"])


@torch.no_grad()
def init_order_overlap(final_keep: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor]) -> dict:
    """Jaccard of the pruned set of ``final_keep`` with the set pruning the lowest ``initial`` scores of each
    tensor (same count per tensor), and its chance level for random sets of those counts."""
    from abp.experiments.masks import prune_lowest

    inter = union = chance_inter = chance_union = 0.0
    for k, keep in final_keep.items():
        pruned, n = ~keep.cpu(), keep.numel()
        c = int(pruned.sum())
        by_init = torch.ones_like(pruned) if c == n else ~prune_lowest(initial[k].cpu(), c / n)
        inter += int((pruned & by_init).sum())
        union += int((pruned | by_init).sum())
        chance_inter += c * c / n
        chance_union += 2 * c - c * c / n
    return {"jaccard_pruned": inter / union if union else float("nan"),
            "jaccard_chance": chance_inter / chance_union if chance_union else float("nan")}
