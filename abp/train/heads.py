"""Task heads trained beside the mask: the paper's layer-weighted [CLS] MLP, and a plain pooled head."""
from __future__ import annotations

import torch
from torch import nn

from abp.models import native_pooling


POOLS = ("cls", "mean", "pair")


def pooled_width(hidden_size: int, pool: str) -> int:
    """Width of :func:`pool_tokens`' output: ``4·hidden`` for ``pair`` (u, v, |u − v|, u ⊙ v), else ``hidden``;
    an unknown ``pool`` is refused here, where every head sizes its input."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return 4 * hidden_size if pool == "pair" else hidden_size


def _mean(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    m = keep.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)


def pool_tokens(h: torch.Tensor, attention_mask, pool: str, segment_ids=None) -> torch.Tensor:
    """``[B, T, H]`` → ``[B, H]``: the first ([CLS]) token, or the mean over real tokens; ``pair`` →
    ``[B, 4H]``: u and v, the means over the first and the second sentence's tokens (``segment_ids`` 0 / 1, see
    :func:`abp.train.batching.segment_ids`),
    with |u − v| and u ⊙ v (Sentence-BERT's pair features), so that a head reads how alike the two are
    directly instead of having the backbone's attention compute it into one pooled vector."""
    if pool == "cls":
        return h[:, 0]
    real = attention_mask.bool() if attention_mask is not None else torch.ones(h.shape[:2], dtype=torch.bool,
                                                                                 device=h.device)
    if pool == "mean":
        return _mean(h, real)
    if segment_ids is None:
        raise ValueError("head pool 'pair' needs segment_ids (which sentence each token belongs to: abp's batches "
                         "hold them for fast tokenizers and for tokenizers that give token_type_ids); use head_pool "
                         "'mean' or 'cls' for this tokenizer")
    u, v = _mean(h, real & (segment_ids == 0)), _mean(h, real & (segment_ids == 1))
    return torch.cat([u, v, (u - v).abs(), u * v], dim=-1)


class PaperHead(nn.Module):
    """Learned softmax-weighted average of every layer's [CLS] vector → MLP (ReLU, hidden = hidden size).

    This is the head of Gao et al. (2021); it reads ``hidden_states`` (embeddings output included).
    ``pool="mean"`` averages each layer over tokens instead of taking [CLS]: right for models trained
    with mean pooling (sentence-transformers such as the embedded all-MiniLM-L6-v2), whose [CLS] is untrained.
    ``pool="pair"`` (sentence pairs) averages each sentence apart and feeds (u, v, |u − v|, u ⊙ v), the way
    sentence-transformers compare two sentences: see :func:`pool_tokens`.
    """

    needs_hidden_states = True

    def __init__(self, hidden_size: int, num_layers: int, num_labels: int, dropout: float = 0.1, pool: str = "cls"):
        super().__init__()
        self.pool = pool
        self.layer_logits = nn.Parameter(torch.zeros(num_layers))
        self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(pooled_width(hidden_size, pool), hidden_size), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))

    def forward(self, hidden_states, attention_mask=None, segment_ids=None) -> torch.Tensor:
        cls = torch.stack([pool_tokens(h, attention_mask, self.pool, segment_ids)
                           for h in hidden_states], dim=0)  # [L, B, H] (4H for pair)
        w = torch.softmax(self.layer_logits.float(), 0).to(cls.dtype)
        return self.mlp(torch.einsum("l,lbh->bh", w, cls).to(self.mlp[1].weight.dtype))


class PooledHead(nn.Module):
    """Mean of the last layer over real tokens → linear: a small baseline head."""

    needs_hidden_states = False

    def __init__(self, hidden_size: int, num_layers: int, num_labels: int, dropout: float = 0.1, pool: str = "mean"):
        super().__init__()
        self.pool = pool
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(pooled_width(hidden_size, pool), num_labels))

    def forward(self, hidden_states, attention_mask=None, segment_ids=None) -> torch.Tensor:
        pooled = pool_tokens(hidden_states[-1], attention_mask, self.pool, segment_ids)
        return self.out(pooled.to(self.out[1].weight.dtype))


HEADS = {"paper": PaperHead, "pooled": PooledHead}


def resolve_pool(requested: str, model: str | None, pairs: bool) -> str:
    """The pooling a run's head uses. ``auto`` is the model's own way to read text: [CLS] for BERT-style models;
    for sentence-transformers (mean pooling, :func:`abp.models.native_pooling`) the mean of a sentence, and on
    sentence pairs ``pair``, the features their pair classifiers are trained on. Measured on STS-B (MiniLM, the
    grid's budget, 3 seeds): feature extraction 0.786 Pearson with ``pair`` against 0.688 with one mean over the
    concatenated pair, ABP at 90 % 0.752 against 0.083. ``pair`` is refused for single-sentence data, where the
    second sentence's mean would be empty."""
    if requested == "pair" and not pairs:
        raise ValueError("head_pool 'pair' compares two sentences, but this task has one; use cls, mean or auto")
    if requested != "auto":
        return requested
    native = native_pooling(model)
    return "pair" if native == "mean" and pairs else native


def make_head(kind: str, hidden_size: int, num_layers: int, num_labels: int, pool: str = "cls") -> nn.Module:
    """``kind`` paper | pooled; ``pool`` cls | mean | pair (see :func:`abp.models.native_pooling`)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {sorted(HEADS)}")
    return HEADS[kind](hidden_size, num_layers, num_labels, pool=pool)


class Classifier(nn.Module):
    """A (masked) backbone and a task head; forward returns logits (``[B]`` for regression)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, num_labels: int):
        super().__init__()
        self.backbone, self.head, self.num_labels = backbone, head, num_labels

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, segment_ids=None, **_) -> torch.Tensor:
        """``segment_ids`` (which sentence each token is in) default to ``token_type_ids`` (BERT's tokenizers give
        the same); abp's batches hold both."""
        kw = {"attention_mask": attention_mask, "output_hidden_states": True}
        if token_type_ids is not None:
            kw["token_type_ids"] = token_type_ids
        out = self.backbone(input_ids=input_ids, **kw)
        logits = self.head(out.hidden_states, attention_mask, segment_ids if segment_ids is not None else token_type_ids)
        return logits.squeeze(-1) if self.num_labels == 1 else logits
