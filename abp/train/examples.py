"""What every data loader returns: :class:`Example`, the data-format error, and deterministic subsets."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


class DataFormatError(ValueError):
    """A data file does not have the expected layout (names the file and line)."""


@dataclass
class Example:
    """One example: one or two texts and an int class id (classification) or float score (regression)."""

    text_a: str
    text_b: Optional[str]
    label: Union[float, int]


def subsample(examples: list[Example], max_examples: Optional[int], seed: int = 0) -> list[Example]:
    """A deterministic random subset of ``max_examples`` examples (all when None or larger), drawn with
    ``torch.randperm`` under ``Generator().manual_seed(seed)`` and returned in the original order."""
    if max_examples is None or max_examples >= len(examples):
        return examples
    g = torch.Generator().manual_seed(seed)
    keep = torch.randperm(len(examples), generator=g)[:max_examples].sort().values.tolist()
    return [examples[i] for i in keep]
