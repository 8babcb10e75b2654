"""GLUE examples for :func:`load_split`, from the first source that applies:

1. ``glue_dir=`` argument, 2. the ``ABP_GLUE_DIR`` environment variable: a local folder laid out like
   the official ``glue_data/`` (``SST-2/train.tsv`` ...), read with the ``csv`` module only;
3. the Hugging Face hub (``datasets.load_dataset("nyu-mll/glue", config)``). ``datasets`` is imported
   lazily, only here: the GPU machines have no ``datasets`` and use a local folder.
An explicit folder never falls back to the hub: a missing file there is an error.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Optional, Union

import numpy as np

from abp.train.examples import DataFormatError, Example, PathLike, subsample
from abp.train.tasks import TaskSpec, get_task

GLUE_DIR_ENV = "ABP_GLUE_DIR"

TaskLike = Union[str, TaskSpec]


class DataUnavailableError(RuntimeError):
    """No local GLUE folder was given and the hub could not provide the data."""


def resolve_glue_dir(glue_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The local GLUE folder to read: ``glue_dir`` if given, else ``$ABP_GLUE_DIR`` if set and
    non-empty, else None (meaning: use the hub)."""
    if glue_dir is not None:
        return Path(glue_dir)
    env = os.environ.get(GLUE_DIR_ENV, "").strip()
    return Path(env) if env else None


def load_split(
    task: TaskLike,
    split: str,
    glue_dir: Optional[PathLike] = None,
    *,
    max_examples: Optional[int] = None,
    seed: int = 0,
) -> list[Example]:
    """Examples of ``split`` (``train``, ``dev``; MNLI also ``dev_matched`` / ``dev_mismatched``,
    ``dev`` being matched) of a GLUE task, in file order.

    ``max_examples`` keeps a deterministic random subset of that size (chosen with ``seed``, kept in
    file order). It is meant for train; it works on dev too, but dev scores on a subset are not the
    official numbers, so the trainer never subsamples dev.
    """
    spec = get_task(task)
    canon = spec.canonical_split(split)
    if max_examples is not None and (not isinstance(max_examples, int) or max_examples <= 0):
        raise ValueError(f"max_examples must be a positive int or None, got {max_examples!r}")
    folder = resolve_glue_dir(glue_dir)
    if folder is not None:
        examples = _load_local(spec, canon, folder)
    else:
        examples = _load_hub(spec, canon)
    return subsample(examples, max_examples, seed)


def _load_local(spec: TaskSpec, split: str, folder: Path) -> list[Example]:
    path = folder / spec.glue_dir / spec.tsv_name(split)
    if not path.is_file():
        if not folder.is_dir():
            raise FileNotFoundError(
                f"GLUE folder {folder} does not exist (from the glue_dir argument or ${GLUE_DIR_ENV}); "
                f"it should hold the official layout, e.g. {folder / spec.glue_dir / spec.tsv_name(split)}"
            )
        present = sorted(p.name for p in folder.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"GLUE folder {folder} has no {spec.glue_dir}/{spec.tsv_name(split)}; "
            f"task folders present: {', '.join(present) or 'none'}. Point glue_dir / ${GLUE_DIR_ENV} at a folder "
            f"with the official GLUE files, or unset both to use the Hugging Face hub."
        )
    return read_glue_tsv(spec, path)


def _label_from_text(spec: TaskSpec, value: str, where: str) -> Union[int, float]:
    if spec.is_regression:
        try:
            score = float(value)
        except ValueError:
            raise DataFormatError(f"{where}: score {value!r} is not a number") from None
        if not math.isfinite(score):
            raise DataFormatError(f"{where}: score {value!r} is not finite")
        return score
    try:
        return spec.tsv_labels.index(value)
    except ValueError:
        raise DataFormatError(
            f"{where}: unknown {spec.name} label {value!r}; expected one of {', '.join(spec.tsv_labels)}"
        ) from None


def read_glue_tsv(task: TaskLike, path: PathLike) -> list[Example]:
    """Read one official GLUE TSV (``csv.reader``, tab, ``QUOTE_NONE``; a UTF-8 BOM is dropped).

    Columns are found by header name; a headerless file (CoLA) uses ``spec.headerless_columns``.
    Every row must have as many fields as the header; errors name the file and line.
    """
    spec = get_task(task)
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.headerless_columns is not None:
            names = list(spec.headerless_columns)
        else:
            header = next(reader, None)
            if header is None:
                raise DataFormatError(f"{path}: empty file, expected a header line")
            names = header
        wanted = [spec.text_a, spec.label_column] + ([spec.text_b] if spec.text_b is not None else [])
        missing = [c for c in wanted if c not in names]
        if missing:
            raise DataFormatError(
                f"{path} line 1: header lacks column(s) {', '.join(map(repr, missing))} for task {spec.name}; "
                f"header is {names}"
            )
        ia = names.index(spec.text_a)
        ib = names.index(spec.text_b) if spec.text_b is not None else None
        il = names.index(spec.label_column)
        width = len(names)
        examples: list[Example] = []
        for row in reader:
            if len(row) != width:
                raise DataFormatError(
                    f"{path} line {reader.line_num}: malformed row, expected {width} tab-separated fields, "
                    f"found {len(row)}"
                )
            label = _label_from_text(spec, row[il], f"{path} line {reader.line_num}")
            examples.append(Example(row[ia], row[ib] if ib is not None else None, label))
    if not examples:
        raise DataFormatError(f"{path}: no data rows")
    return examples


def _load_hub(spec: TaskSpec, split: str) -> list[Example]:
    where = f"GLUE task {spec.name!r} (split {split!r})"
    tail = f"and no local GLUE folder was given — set {GLUE_DIR_ENV} or pass --glue-dir."
    try:
        import datasets  # lazy: absent on the GPU machines
    except ImportError as e:
        raise DataUnavailableError(
            f"{where} could not be loaded from the Hugging Face hub (the `datasets` package is not installed: {e}) "
            f"{tail}"
        ) from e
    try:
        ds = datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split(split))
    except Exception as e:  # offline, no cache, network, hub errors: all mean "the hub cannot be used"
        reason = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
        raise DataUnavailableError(f"{where} could not be loaded from the Hugging Face hub ({reason}) {tail}") from e
    src = f"{spec.hub_name}/{spec.hub_config}[{spec.hub_split(split)}]"
    missing = [c for c in (spec.hub_text_a, spec.hub_text_b, "label") if c is not None and c not in ds.column_names]
    if missing:
        raise DataFormatError(f"hub dataset {src} lacks column(s) {missing}; columns: {ds.column_names}")
    texts_a = ds[spec.hub_text_a]
    texts_b = ds[spec.hub_text_b] if spec.hub_text_b is not None else [None] * len(texts_a)
    examples = []
    for i, (a, b, y) in enumerate(zip(texts_a, texts_b, ds["label"])):
        if spec.is_regression:
            label: Union[int, float] = float(y)
            if not math.isfinite(label):
                raise DataFormatError(f"hub dataset {src} row {i}: score {y!r} is not finite")
        else:
            if not isinstance(y, (int, np.integer)) or not 0 <= int(y) < spec.num_labels:
                raise DataFormatError(f"hub dataset {src} row {i}: label {y!r} is not a class id in [0, {spec.num_labels})")
            label = int(y)
        examples.append(Example(a, b, label))
    if not examples:
        raise DataFormatError(f"hub dataset {src} is empty")
    return examples
