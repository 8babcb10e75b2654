"""The Trainer as the experiments use it, built on its extension points only (see :class:`Trainer`).

:class:`ExperimentTrainer` orders dev sets by length (cheaper evaluation, same metrics);
:class:`TrackedTrainer` adds connection-recovery tracking (:mod:`abp.experiments.recovery`) after each score
step and saves the tracker beside each checkpoint, so a resumed run keeps its statistics.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from abp.experiments.finetune import sort_dev_by_length
from abp.experiments.recovery import RecoveryTracker
from abp.train.trainer import Trainer


class ExperimentTrainer(Trainer):
    """:class:`Trainer` whose dev sets are ordered by length (see :func:`sort_dev_by_length`): same metrics,
    less padding at evaluation, which is a large share of a short CPU run."""

    def prepare_data(self, train, dev_sets):
        return train, {split: sort_dev_by_length(ex) for split, ex in dev_sets.items()}


class TrackedTrainer(ExperimentTrainer):
    """:class:`ExperimentTrainer` plus a :class:`RecoveryTracker` (its state saved as ``recovery.safetensors``)."""

    def __init__(self, cfg, output_dir, *, recovery_every: int = 1, **kw):
        super().__init__(cfg, output_dir, **kw)
        self.tracker = RecoveryTracker(self.model.backbone, every=recovery_every)  # mask-file names

    def after_score_step(self) -> None:
        self.tracker.observe(self.step)

    @property
    def tracker_path(self) -> Path:
        return self.out / "recovery.safetensors"

    def save_extra_state(self, checkpoint: Path) -> None:
        self.tracker.save(self.tracker_path, self.step)

    def load_extra_state(self, checkpoint: Path) -> None:
        self.tracker.load(self.tracker_path, self.step)

    def recovery_stats(self, mask_file: Optional[str | os.PathLike] = None) -> dict:
        """Stats against the saved mask file (what the run ships), default ``output_dir/mask.safetensors``."""
        from abp.experiments.analysis import load_keep_masks

        return self.tracker.stats(load_keep_masks(mask_file or self.out / "mask.safetensors"))
