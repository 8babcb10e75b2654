"""Mask surgery shared by baselines and ablations: random masks, shuffling within a tensor, magnitude masks."""
from __future__ import annotations

import torch
from torch import nn

from abp.patch import masked_modules


@torch.no_grad()
def random_mask_(model: nn.Module, sparsity: float, seed: int = 0) -> None:
    """Set every masked tensor to a uniformly random mask pruning exactly ``round(sparsity·n)`` entries."""
    g = torch.Generator().manual_seed(seed)
    for _, m in masked_modules(model):
        for _, _, s in m.score_pairs():
            n = s.numel()
            keep = torch.ones(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[: round(sparsity * n)]] = False
            s.copy_(torch.where(keep.view_as(s).to(s.device), 0.01, -0.01))


@torch.no_grad()
def shuffle_masks_(model: nn.Module, seed: int = 0) -> None:
    """Ablation: permute each tensor's mask at random (same per-tensor sparsity, structure destroyed)."""
    g = torch.Generator().manual_seed(seed)
    for _, m in masked_modules(model):
        for _, _, s in m.score_pairs():
            flat = s.reshape(-1)
            flat.copy_(flat[torch.randperm(flat.numel(), generator=g).to(flat.device)])
