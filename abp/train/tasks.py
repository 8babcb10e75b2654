"""The GLUE tasks abp trains on: where their data lives and how they are scored.

One frozen :class:`TaskSpec` per task describes both sources the data layer reads
(:mod:`abp.train.data`): the official ``glue_data/<TASK>/<split>.tsv`` files and the Hugging Face hub
dataset ``nyu-mll/glue``. Class ids are the hub's, so both sources give the same integer labels
(e.g. MNLI 0 = entailment, 1 = neutral, 2 = contradiction).

Metrics (computed by :mod:`abp.train.metrics`) are named per dev split; a task with several dev splits
(MNLI: matched and mismatched) reports each metric once per split with the split's suffix, e.g.
``accuracy_matched`` (see :meth:`TaskSpec.metric_key`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

Column = str


@dataclass(frozen=True)
class TaskSpec:
    """Everything that differs between GLUE tasks.

    Local TSV fields (read with ``csv.reader(delimiter='\\t', quoting=csv.QUOTE_NONE)``):
      ``text_a`` / ``text_b`` / ``label_column`` are header names. A file without a header (CoLA)
      gets the names in ``headerless_columns``, one per expected field.
      ``tsv_labels[i]`` is the string the TSV uses for class id ``i`` (empty for regression).
    Hub fields: ``hub_config`` of ``hub_name``; ``hub_text_a`` / ``hub_text_b`` columns; labels are
      in the ``label`` column as class ids (float scores for STS-B).
    Metrics: ``metrics`` are computed on each dev split; ``primary_metric`` is the key (as produced by
      :meth:`metric_key`) a trainer selects checkpoints on.
    """

    name: str
    glue_dir: str
    text_a: Column
    text_b: Optional[Column]
    label_column: Column
    num_labels: int
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    dev_splits: tuple[str, ...]
    metrics: tuple[str, ...]
    primary_metric: str
    hub_config: str
    hub_text_a: str
    hub_text_b: Optional[str]
    headerless_columns: Optional[tuple[str, ...]] = None
    hub_name: str = "nyu-mll/glue"

    def __post_init__(self) -> None:
        regression = self.num_labels == 1
        if regression != (len(self.tsv_labels) == 0) or (not regression and len(self.tsv_labels) != self.num_labels):
            raise ValueError(f"task {self.name}: tsv_labels {self.tsv_labels} do not fit num_labels={self.num_labels}")
        if not regression and len(self.label_names) != self.num_labels:
            raise ValueError(f"task {self.name}: label_names {self.label_names} do not fit num_labels={self.num_labels}")
        keys = self.metric_keys()
        if self.primary_metric not in keys:
            raise ValueError(f"task {self.name}: primary metric {self.primary_metric!r} is not one of {keys}")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split name :func:`abp.train.data.load_split` accepts (``dev`` is an alias)."""
        return ("train", "dev") + tuple(s for s in self.dev_splits if s != "dev")

    def canonical_split(self, split: str) -> str:
        """``train`` or one of ``dev_splits``; ``dev`` means the first (primary) dev split."""
        if split == "dev":
            return self.dev_splits[0]
        if split == "train" or split in self.dev_splits:
            return split
        raise ValueError(f"task {self.name} has no split {split!r}; known splits: {', '.join(self.splits)}")

    def tsv_name(self, split: str) -> str:
        """File name of ``split`` inside ``<glue_dir>/<self.glue_dir>/``, e.g. ``dev_matched.tsv``."""
        return f"{self.canonical_split(split)}.tsv"

    def hub_split(self, split: str) -> str:
        """The hub's name for ``split``: ``dev`` → ``validation``, ``dev_matched`` → ``validation_matched``."""
        s = self.canonical_split(split)
        return "validation" + s[len("dev"):] if s.startswith("dev") else s

    def metric_key(self, metric: str, split: str) -> str:
        """Result key of ``metric`` on dev split ``split``: the bare name when the task has one dev
        split, else suffixed with the split's tail (``accuracy`` on ``dev_matched`` → ``accuracy_matched``)."""
        s = self.canonical_split(split)
        if len(self.dev_splits) == 1:
            return metric
        return f"{metric}_{s[len('dev_'):] if s.startswith('dev_') else s}"

    def metric_keys(self) -> tuple[str, ...]:
        """Every key an evaluation of all dev splits produces, split by split."""
        return tuple(self.metric_key(m, s) for s in self.dev_splits for m in self.metrics)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            name="sst2", glue_dir="SST-2", text_a="sentence", text_b=None, label_column="label",
            num_labels=2, label_names=("negative", "positive"), tsv_labels=_BINARY,
            dev_splits=("dev",), metrics=("accuracy",), primary_metric="accuracy",
            hub_config="sst2", hub_text_a="sentence", hub_text_b=None,
        ),
        TaskSpec(
            name="stsb", glue_dir="STS-B", text_a="sentence1", text_b="sentence2", label_column="score",
            num_labels=1, label_names=(), tsv_labels=(),
            dev_splits=("dev",), metrics=("pearson", "spearman"), primary_metric="pearson",
            hub_config="stsb", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
        TaskSpec(
            name="mnli", glue_dir="MNLI", text_a="sentence1", text_b="sentence2", label_column="gold_label",
            num_labels=3, label_names=("entailment", "neutral", "contradiction"),
            tsv_labels=("entailment", "neutral", "contradiction"),
            dev_splits=("dev_matched", "dev_mismatched"), metrics=("accuracy",),
            primary_metric="accuracy_matched",
            hub_config="mnli", hub_text_a="premise", hub_text_b="hypothesis",
        ),
        TaskSpec(
            name="cola", glue_dir="CoLA", text_a="sentence", text_b=None, label_column="label",
            num_labels=2, label_names=("unacceptable", "acceptable"), tsv_labels=_BINARY,
            dev_splits=("dev",), metrics=("matthews",), primary_metric="matthews",
            hub_config="cola", hub_text_a="sentence", hub_text_b=None,
            headerless_columns=("source", "label", "original_mark", "sentence"),
        ),
        TaskSpec(
            name="mrpc", glue_dir="MRPC", text_a="#1 String", text_b="#2 String", label_column="Quality",
            num_labels=2, label_names=("not_equivalent", "equivalent"), tsv_labels=_BINARY,
            dev_splits=("dev",), metrics=("f1", "accuracy"), primary_metric="f1",
            hub_config="mrpc", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
        TaskSpec(
            name="qqp", glue_dir="QQP", text_a="question1", text_b="question2", label_column="is_duplicate",
            num_labels=2, label_names=("not_duplicate", "duplicate"), tsv_labels=_BINARY,
            dev_splits=("dev",), metrics=("f1", "accuracy"), primary_metric="f1",
            hub_config="qqp", hub_text_a="question1", hub_text_b="question2",
        ),
        TaskSpec(
            name="qnli", glue_dir="QNLI", text_a="question", text_b="sentence", label_column="label",
            num_labels=2, label_names=_NLI2, tsv_labels=_NLI2,
            dev_splits=("dev",), metrics=("accuracy",), primary_metric="accuracy",
            hub_config="qnli", hub_text_a="question", hub_text_b="sentence",
        ),
        TaskSpec(
            name="rte", glue_dir="RTE", text_a="sentence1", text_b="sentence2", label_column="label",
            num_labels=2, label_names=_NLI2, tsv_labels=_NLI2,
            dev_splits=("dev",), metrics=("accuracy",), primary_metric="accuracy",
            hub_config="rte", hub_text_a="sentence1", hub_text_b="sentence2",
        ),
    )
}


def _normalise(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def task_names() -> tuple[str, ...]:
    """The canonical names of the known tasks."""
    return tuple(TASKS)


def get_task(name: Union[str, TaskSpec]) -> TaskSpec:
    """The :class:`TaskSpec` for ``name``; case, ``-``, ``_`` and spaces are ignored
    (``"SST-2"``, ``"sst-2"``, ``"STS_B"`` all work). A TaskSpec is returned unchanged."""
    if isinstance(name, TaskSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"task must be a name (str) or a TaskSpec, got {type(name).__name__}")
    spec = TASKS.get(_normalise(name))
    if spec is None:
        known = ", ".join(f"{t.name} ({t.glue_dir})" for t in TASKS.values())
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {known}")
    return spec
