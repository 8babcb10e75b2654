"""Task heads trained beside the mask: the paper's layer-weighted [CLS] MLP, and a plain pooled head."""
from __future__ import annotations

import torch
from torch import nn


def pool_tokens(h: torch.Tensor, attention_mask, pool: str) -> torch.Tensor:
    """``[B, T, H]`` → ``[B, H]``: the first ([CLS]) token, or the mean over real tokens."""
    if pool == "cls":
        return h[:, 0]
    m = attention_mask.unsqueeze(-1).to(h.dtype) if attention_mask is not None else torch.ones_like(h[..., :1])
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


class PaperHead(nn.Module):
    """Learned softmax-weighted average of every layer's [CLS] vector → MLP (ReLU, hidden = hidden size).

    This is the head of Gao et al. (2021); it reads ``hidden_states`` (embeddings output included).
    ``pool="mean"`` averages each layer over tokens instead of taking [CLS]: right for models trained
    with mean pooling (sentence-transformers such as the embedded all-MiniLM-L6-v2), whose [CLS] is untrained.
    """

    needs_hidden_states = True

    def __init__(self, hidden_size: int, num_layers: int, num_labels: int, dropout: float = 0.1, pool: str = "cls"):
        super().__init__()
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, hidden_size), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, hidden_states, attention_mask=None) -> torch.Tensor:
        cls = torch.stack([pool_tokens(h, attention_mask, self.pool) for h in hidden_states], dim=0)  # [L, B, H]
        w = torch.softmax(self.layer_logits.float(), 0).to(cls.dtype)
        return self.mlp(torch.einsum("l,lbh->bh", w, cls).to(self.mlp[1].weight.dtype))


class PooledHead(nn.Module):
    """Mean of the last layer over real tokens → linear: a small baseline head."""

    needs_hidden_states = False

    def __init__(self, hidden_size: int, num_layers: int, num_labels: int, dropout: float = 0.1, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, hidden_states, attention_mask=None) -> torch.Tensor:
        pooled = pool_tokens(hidden_states[-1], attention_mask, self.pool)
        return self.out(pooled.to(self.out[1].weight.dtype))


HEADS = {"paper": PaperHead, "pooled": PooledHead}


def make_head(kind: str, hidden_size: int, num_layers: int, num_labels: int, pool: str = "cls") -> nn.Module:
    """``kind`` paper | pooled; ``pool`` cls | mean (see :func:`abp.models.native_pooling`)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](hidden_size, num_layers, num_labels, pool=pool)


class Classifier(nn.Module):
    """A (masked) backbone and a task head; forward returns logits (``[B]`` for regression)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_labels: int):
        super().__init__()
        self.backbone, self.head, self.num_labels = backbone, head, num_labels

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, **_) -> torch.Tensor:
        kw = {"attention_mask": attention_mask, "output_hidden_states": True}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        out = self.backbone(input_ids=input_ids, **kw)
        logits = self.head(out.hidden_states, attention_mask)
        return logits.squeeze(-1) if self.num_labels == 1 else logits
