"""Where a mask prunes (layers, components) and how much two masks agree.

Components follow the paper's Fig. 3 for BERT-style names: ``embeddings``, ``query``, ``key``, ``value``,
``attention_output`` (``attention.output.dense``), ``intermediate`` (``intermediate.dense``) and
``output`` (the layer's ``output.dense``); anything else is ``other``. Layers are the encoder block index
(``layer.<i>``), with ``embeddings`` as its own layer.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from abp.functional import unpack_mask
from abp.maskio import MaskFile, read_mask_file
from abp.patch import masked_modules

COMPONENTS = ("embeddings", "query", "key", "value", "attention_output", "intermediate", "output", "other")
_COMPONENT_PATTERNS = (
    ("embeddings", re.compile(r"(^|\.)embeddings\.")),
    ("query", re.compile(r"attention\.self\.query\.")),
    ("key", re.compile(r"attention\.self\.key\.")),
    ("value", re.compile(r"attention\.self\.value\.")),
    ("attention_output", re.compile(r"attention\.output\.dense\.")),
    ("intermediate", re.compile(r"intermediate\.dense\.")),
    ("output", re.compile(r"(^|\.)output\.dense\.")),  # after attention_output: the block's own output
)
_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block)\.(\d+)\.")

MaskSource = Union[str, os.PathLike, MaskFile, nn.Module, Mapping[str, torch.Tensor]]


def component_of(name: str) -> str:
    """The component a masked tensor (``"<module>.weight"``) belongs to."""
    for comp, pat in _COMPONENT_PATTERNS:
        if pat.search(name):
            return comp
    return "other"


def layer_of(name: str) -> str:
    """``"embeddings"``, the block index as a string (``"0"``, ``"1"`` …) or ``"other"``."""
    if component_of(name) == "embeddings":
        return "embeddings"
    m = _LAYER.search(name)
    return m.group(1) if m else "other"


def load_keep_masks(source: MaskSource) -> dict[str, torch.Tensor]:
    """Keep masks (bool, ``True`` = kept) keyed ``"<module>.<weight|bias>"`` from a mask file (path or
    :class:`MaskFile`), a masked model, or an existing dict (returned as is)."""
    if isinstance(source, Mapping):
        return {k: v.bool() for k, v in source.items()}
    if isinstance(source, nn.Module):
        out = {f"{name}.{which}": s.detach().cpu() > 0 for name, m in masked_modules(source)
               for which, _, s in m.score_pairs()}
        if not out:
            raise ValueError("load_keep_masks: the model has no masked modules")
        return out
    mf = source if isinstance(source, MaskFile) else read_mask_file(source)
    return {k: unpack_mask(v, mf.shapes[k]) for k, v in mf.masks.items()}


def _summary(pruned: int, total: int) -> dict:
    return {"pruned": pruned, "total": total, "sparsity": pruned / total if total else float("nan")}


def sparsity_breakdown(source: MaskSource) -> dict:
    """``{"overall", "components": {c: ...}, "layers": {l: ...}, "layer_components": {l: {c: ...}}}``,
    each entry ``{"pruned", "total", "sparsity"}``; components and layers in a stable order."""
    masks = load_keep_masks(source)
    comp: dict[str, list[int]] = {}
    layer: dict[str, list[int]] = {}
    both: dict[str, dict[str, list[int]]] = {}
    for name, keep in masks.items():
        pruned, total = int((~keep).sum()), keep.numel()
        c, l = component_of(name), layer_of(name)
        for acc in (comp.setdefault(c, [0, 0]), layer.setdefault(l, [0, 0]), both.setdefault(l, {}).setdefault(c, [0, 0])):
            acc[0] += pruned
            acc[1] += total
    order_c = [c for c in COMPONENTS if c in comp]
    order_l = sorted(layer, key=lambda l: (-1, 0) if l == "embeddings" else ((0, int(l)) if l.isdigit() else (1, 0)))
    pruned_all = sum(v[0] for v in comp.values())
    total_all = sum(v[1] for v in comp.values())
    return {
        "overall": _summary(pruned_all, total_all),
        "components": {c: _summary(*comp[c]) for c in order_c},
        "layers": {l: _summary(*layer[l]) for l in order_l},
        "layer_components": {l: {c: _summary(*both[l][c]) for c in COMPONENTS if c in both[l]} for l in order_l},
    }


def expected_random_jaccard(p: float, q: float) -> float:
    """E[Jaccard of the pruned sets] of two independent random masks of sparsities ``p`` and ``q``
    (the chance level an overlap should be compared with): ``pq / (p + q − pq)``."""
    u = p + q - p * q
    return p * q / u if u > 0 else float("nan")


def mask_overlap(a: MaskSource, b: MaskSource) -> dict:
    """Agreement of two masks over the same tensors: Jaccard of the pruned sets (with its chance level),
    share of entries on which they agree, and each one's sparsity."""
    ma, mb = load_keep_masks(a), load_keep_masks(b)
    if set(ma) != set(mb):
        raise ValueError(f"mask_overlap: the masks cover different tensors (e.g. {sorted(set(ma) ^ set(mb))[:3]})")
    inter = union = pa = pb = agree = total = 0
    for k in ma:
        x, y = ~ma[k], ~mb[k]
        if x.shape != y.shape:
            raise ValueError(f"mask_overlap: {k} has shape {tuple(x.shape)} in one mask, {tuple(y.shape)} in the other")
        inter += int((x & y).sum())
        union += int((x | y).sum())
        pa += int(x.sum())
        pb += int(y.sum())
        agree += int((x == y).sum())
        total += x.numel()
    sa, sb = pa / total, pb / total
    return {"jaccard_pruned": inter / union if union else float("nan"),
            "jaccard_random": expected_random_jaccard(sa, sb), "agreement": agree / total,
            "sparsity_a": sa, "sparsity_b": sb, "intersection": inter, "union": union}


def find_mask_file(run_dir: Union[str, Path]) -> Optional[Path]:
    p = Path(run_dir) / "mask.safetensors"
    return p if p.is_file() else None
