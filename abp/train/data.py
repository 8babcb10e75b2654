"""The data a run trains and evaluates on, in one namespace: GLUE splits (:mod:`abp.train.glue`), a user's own
files (:mod:`abp.train.custom_data`), and deterministic resumable batches (:mod:`abp.train.batching`), all of
:class:`~abp.train.examples.Example` (:mod:`abp.train.examples`)."""
from __future__ import annotations

from abp.train.batching import Batcher, batches_per_epoch, epoch_order
from abp.train.custom_data import load_custom
from abp.train.examples import DataFormatError, Example, PathLike, subsample
from abp.train.glue import GLUE_DIR_ENV, DataUnavailableError, TaskLike, load_split, read_glue_tsv, resolve_glue_dir

__all__ = [
    "Batcher", "batches_per_epoch", "epoch_order",
    "load_custom",
    "DataFormatError", "Example", "PathLike", "subsample",
    "GLUE_DIR_ENV", "DataUnavailableError", "TaskLike", "load_split", "read_glue_tsv", "resolve_glue_dir",
]
