"""Examples from a user's own data file (CSV, TSV, JSON or JSON Lines): :func:`load_custom`."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from abp.train.examples import DataFormatError, Example, PathLike


def _custom_label(value: Any, num_labels: int, label_names: Optional[Sequence[str]], where: str) -> Union[int, float]:
    if num_labels == 1:
        if isinstance(value, bool) or value is None:
            raise DataFormatError(f"{where}: regression label {value!r} is not a number")
        try:
            score = float(value)
        except (TypeError, ValueError):
            raise DataFormatError(f"{where}: regression label {value!r} is not a number") from None
        if not math.isfinite(score):
            raise DataFormatError(f"{where}: regression label {value!r} is not finite")
        return score
    if label_names is not None and isinstance(value, str) and value in label_names:
        return list(label_names).index(value)
    cls: Optional[int] = None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        cls = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        cls = int(value.strip())
    if cls is None or not 0 <= cls < num_labels:
        names = f" or one of {list(label_names)}" if label_names is not None else ""
        raise DataFormatError(f"{where}: label {value!r} is not a class id in [0, {num_labels}){names}")
    return cls


def _custom_text(value: Any, column: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataFormatError(f"{where}: column {column!r} holds {type(value).__name__} {value!r}, expected text")
    return value


def _records_from_json(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs from a JSON array of objects or from JSON Lines."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # "Extra data" after the first value: the file is JSON Lines
                raise DataFormatError(f"{path} line {e.lineno}: invalid JSON ({e.msg})") from None
        else:
            if not isinstance(data, list):
                raise DataFormatError(f"{path}: expected a JSON array of objects (or JSON Lines), got {type(data).__name__}")
            for i, rec in enumerate(data):
                yield f"{path} record {i}", rec
            return
    # split on "\n" only: str.splitlines would also cut at U+2028 etc., legal inside JSON strings
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(f"{path} line {lineno}: invalid JSON ({e.msg})") from None
        yield f"{path} line {lineno}", rec


def _records_from_csv(path: Path, delimiter: Optional[str]) -> Iterator[tuple[str, Any]]:
    tsv = path.suffix.lower() == ".tsv"
    delim = delimiter if delimiter is not None else ("\t" if tsv else ",")
    quoting = csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=delim, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise DataFormatError(f"{path}: empty file, expected a header line")
        yield "header", header
        for row in reader:
            if len(row) != len(header):
                raise DataFormatError(
                    f"{path} line {reader.line_num}: malformed row, expected {len(header)} fields, found {len(row)}"
                )
            yield f"{path} line {reader.line_num}", dict(zip(header, row))


def load_custom(
    path: PathLike,
    *,
    text_columns: tuple[str, ...],
    label_column: str,
    num_labels: int,
    delimiter: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
) -> list[Example]:
    """Examples from a user file, format by extension:

    - ``.csv``: header row, standard CSV quoting, delimiter ``,`` (or ``delimiter``);
    - ``.tsv``: header row, tab (or ``delimiter``), no quoting (``QUOTE_NONE``, as GLUE files);
    - ``.json``: an array of objects, or JSON Lines; ``.jsonl`` / ``.ndjson``: JSON Lines.
    ``text_columns`` names one or two text columns. Labels: ``num_labels == 1`` means regression
    (float); otherwise class ids in ``[0, num_labels)``, or strings of ``label_names`` (index = class id).
    """
    path = Path(path)
    if not 1 <= len(text_columns) <= 2 or not all(isinstance(c, str) for c in text_columns):
        raise ValueError(f"text_columns must name one or two columns, got {text_columns!r}")
    if not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int (1 = regression), got {num_labels!r}")
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"label_names has {len(label_names)} names for num_labels={num_labels}")
    if not path.is_file():
        raise FileNotFoundError(f"custom data file {path} does not exist")
    ext = path.suffix.lower()
    wanted = list(text_columns) + [label_column]
    if ext in (".csv", ".tsv"):
        records = _records_from_csv(path, delimiter)
        _, header = next(records)
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataFormatError(f"{path}: no column(s) {', '.join(map(repr, missing))}; columns: {header}")
    elif ext in (".json", ".jsonl", ".ndjson"):
        if delimiter is not None:
            raise ValueError(f"delimiter is meaningless for JSON file {path}")
        records = _records_from_json(path)
    else:
        raise ValueError(f"{path}: unknown extension {ext!r}; use .csv, .tsv, .json, .jsonl or .ndjson")

    examples: list[Example] = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise DataFormatError(f"{where}: expected an object, got {type(rec).__name__}")
        missing = [c for c in wanted if c not in rec]
        if missing:
            raise DataFormatError(f"{where}: no column(s) {', '.join(map(repr, missing))}; keys: {sorted(rec)}")
        a = _custom_text(rec[text_columns[0]], text_columns[0], where)
        b = _custom_text(rec[text_columns[1]], text_columns[1], where) if len(text_columns) == 2 else None
        examples.append(Example(a, b, _custom_label(rec[label_column], num_labels, label_names, where)))
    if not examples:
        raise DataFormatError(f"{path}: no examples")
    return examples
