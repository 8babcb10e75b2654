"""Swap the pre-trained modules of any model for masked ones, in place (torchao ``quantize_`` style).

``mask_model(model)`` handles ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding`` and (optionally)
``nn.LayerNorm``: BERT, RoBERTa, DistilBERT, GPT-2 and LLaMA-style models alike. Task heads are left
alone by default, so they can be trained as usual.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from abp.nn import SCORE_INIT_MODES, MaskedEmbedding, MaskedLayerNorm, MaskedLinear, MaskedModule

# Module names of task heads in Hugging Face models: excluded unless asked for.
HEAD_PATTERNS = (r"(^|\.)(classifier|score|lm_head|qa_outputs|pre_classifier|cls|head|heads)(\.|$)",)


@dataclass
class MaskConfig:
    """What :func:`mask_model` masks and how the scores start.

    ``include`` / ``exclude`` are regular expressions searched in module names. Task heads
    (:data:`HEAD_PATTERNS`) are excluded on top of ``exclude`` unless ``mask_heads=True``.
    ``t_l=None`` is the hard mask (the limit t_l → ∞); the paper trains with t_l = 1e5.
    """

    linear: bool = True
    embeddings: bool = True
    layernorm: bool = False
    mask_bias: bool = False
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    mask_heads: bool = False
    score_init: float = 0.01
    score_init_spread: float = 0.0
    score_init_mode: str = "uniform"  # uniform | normal | magnitude (abp.nn.SCORE_INIT_MODES)
    score_init_std: float = 0.001 ** 0.5  # normal only: the paper's variance 0.001
    freeze: bool = True  # freeze every pre-trained parameter outside the task heads (the paper trains only θ and p)
    t_l: Optional[float] = None
    t_s: float = 1.0

    def score_kwargs(self) -> dict:
        return dict(score_init=self.score_init, score_init_spread=self.score_init_spread, t_l=self.t_l, t_s=self.t_s)


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except Exception:  # transformers is optional for plain torch models
        return None


def _swap(module: nn.Module, cfg: MaskConfig) -> Optional[nn.Module]:
    conv1d = _conv1d_type()
    kw = cfg.score_kwargs()
    if cfg.linear and isinstance(module, nn.Linear):
        return MaskedLinear.from_linear(module, mask_bias=cfg.mask_bias, **kw)
    if cfg.linear and conv1d is not None and isinstance(module, conv1d):
        return MaskedLinear.from_conv1d(module, mask_bias=cfg.mask_bias, **kw)
    if cfg.embeddings and isinstance(module, nn.Embedding):
        return MaskedEmbedding.from_embedding(module, **kw)
    if cfg.layernorm and isinstance(module, nn.LayerNorm) and module.weight is not None:
        return MaskedLayerNorm(module, **kw)
    return None


def mask_model(
    model: nn.Module,
    config: Optional[MaskConfig] = None,
    *,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    **overrides,
) -> nn.Module:
    """Replace the model's maskable modules by masked ones, in place; returns the model.

    ``filter_fn(module, name)`` may veto a module (torchao style); keyword ``overrides`` set
    :class:`MaskConfig` fields. Pre-trained parameters outside the task heads are frozen (unless
    ``freeze=False``); the mask scores are the new trainable parameters.
    """
    unknown = sorted(k for k in overrides if k not in {f.name for f in dataclasses.fields(MaskConfig)})
    if unknown:
        raise TypeError(f"mask_model: unknown option(s) {unknown}")
    cfg = dataclasses.replace(config or MaskConfig(), **overrides)  # the caller's config stays as it was
    if cfg.score_init_mode not in SCORE_INIT_MODES:
        raise ValueError(f"mask_model: score_init_mode must be one of {', '.join(SCORE_INIT_MODES)}, "
                         f"got {cfg.score_init_mode!r}")
    if any(isinstance(m, MaskedModule) for m in model.modules()):
        raise ValueError("mask_model: this model is already masked (call unmask_model first)")
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in (*cfg.exclude, *(() if cfg.mask_heads else HEAD_PATTERNS))]
    if cfg.freeze:
        heads = [re.compile(p) for p in HEAD_PATTERNS]
        for pname, p in model.named_parameters():
            if not any(h.search(pname) for h in heads):
                p.requires_grad_(False)
    swaps = []
    for name, module in model.named_modules():
        if not name or any(p.search(name) for p in exclude):
            continue
        if include and not any(p.search(name) for p in include):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        new = _swap(module, cfg)
        if new is not None:
            swaps.append((name, new))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        if cfg.score_init_mode != "uniform":  # uniform is how the modules were built
            new.init_scores_(cfg.score_init_mode, cfg.score_init, spread=cfg.score_init_spread, std=cfg.score_init_std)
    if not swaps:
        raise ValueError("mask_model: no module matched (check include/exclude patterns and the model type)")
    return model


def masked_modules(model: nn.Module) -> Iterator[tuple[str, MaskedModule]]:
    """``(name, module)`` for every masked module of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, MaskedModule):
            yield name, m


def score_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``(qualified name, scores)`` for every mask-score tensor, in a stable order."""
    for name, m in masked_modules(model):
        for which, _, s in m.score_pairs():
            yield f"{name}.{which}", s


@torch.no_grad()
def sparsity(model: nn.Module) -> float:
    """Fraction of masked weights (and masked biases) that the hard mask zeroes."""
    zeros = total = 0
    for _, s in score_tensors(model):
        zeros += int((s <= 0).sum())
        total += s.numel()
    if total == 0:
        raise ValueError("sparsity: the model has no masked modules (call abp.mask_model first)")
    return zeros / total


def unmask_model(model: nn.Module) -> nn.Module:
    """Bake every hard mask into a plain module (``nn.Linear``/``Conv1D``/``nn.Embedding``/``nn.LayerNorm``)."""
    for name, m in list(masked_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.to_plain())
    return model


def shared_weights(model: nn.Module) -> list[tuple[str, str]]:
    """Pairs of masked modules that read the same frozen storage (the fused update is not exact then)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, m in masked_modules(model):
        ptr = m.weight.data_ptr()
        if ptr in seen:
            pairs.append((seen[ptr], name))
        seen.setdefault(ptr, name)
    return pairs
