"""Masked drop-in modules: frozen pre-trained weights, fp32 mask scores, hard mask ``1[θ>0]``.

Thin wrappers over :mod:`abp.functional`; ``from_*`` builds one from a pre-trained module (sharing its
weight, no copy except GPT-2's transposed ``Conv1D``) and ``to_plain()`` bakes the mask back in.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn

from abp import backends
from abp.functional import ScoreSGD, bitmask_linear, masked_embedding, masked_linear, masked_param, pack_mask, pack_positive

Tensor = torch.Tensor


def _frozen(t: Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) and not t.requires_grad else nn.Parameter(t.detach(), requires_grad=False)


def _scores_like(t: Tensor, init: float, spread: float) -> nn.Parameter:
    """fp32 scores ``init·(1 + spread·U(−1, 1))``: small, positive (for spread ≤ 1), mean ``init``."""
    s = torch.full(t.shape, float(init), dtype=torch.float32, device=t.device)
    if spread > 0:
        s.mul_(1 + spread * (2 * torch.rand_like(s) - 1))
        if init > 0:
            s.clamp_(min=init * 1e-3)
    return nn.Parameter(s)


# How Algorithm 1's scores start. The score update prunes (θ ≤ 0) in the order γ's uniform push meets the
# initial scores, refined by the gradient; so θ0's order is the first pruning order.
#   uniform:   mean·(1 + spread·U(−1, 1)): positive, random order (the order is the seed's, not the task's)
#   normal:    N(mean, std²), the paper's N(0.01, variance 0.001) (std 0.0316: 38 % of scores start ≤ 0)
#   magnitude: mean·|w| / mean(|w|) per tensor: the first pruning order is each tensor's magnitude order,
#              which keeps STS-B alive where a random order collapses it (bench/results/paper/notes.md)
SCORE_INIT_MODES = ("uniform", "normal", "magnitude")


def initial_scores(frozen: Tensor, mode: str, mean: float = 0.01, *, spread: float = 1.0,
                   std: float = 0.001 ** 0.5) -> Tensor:
    """fp32 initial scores for the frozen tensor ``frozen`` (same shape), drawn from torch's global RNG."""
    if mode == "uniform":
        return _scores_like(frozen, mean, spread).data
    if mode == "normal":
        return torch.empty(frozen.shape, dtype=torch.float32, device=frozen.device).normal_(mean, std)
    if mode == "magnitude":
        a = frozen.detach().float().abs()
        scale = float(a.mean())
        if not scale > 0:  # an all-zero tensor: nothing to order, every weight equally kept
            return torch.full_like(a, float(mean))
        return a.mul_(float(mean) / scale)
    raise ValueError(f"score init mode must be one of {', '.join(SCORE_INIT_MODES)}, got {mode!r}")



class MaskedModule(nn.Module):
    """Base of every masked module: a frozen ``weight`` (and optional ``bias``), fp32 ``scores``.

    Attributes ``t_l`` (the forward temperature: m = σ(t_l·θ); None = its t_l → ∞ limit, the hard mask 1[θ>0]) and
    ``t_s`` (the surrogate temperature of the backward) are the paper's names.
    """

    t_l: Optional[float] = None
    t_s: float = 1.0

    def score_pairs(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(name, frozen tensor, its scores)`` for every masked tensor of this module."""
        yield "weight", self.weight, self.scores
        if getattr(self, "bias_scores", None) is not None:
            yield "bias", self.bias, self.bias_scores

    def mask(self) -> Tensor:
        """The hard weight mask ``scores > 0`` (bool)."""
        return self.scores.detach() > 0

    def bias_mask(self) -> Optional[Tensor]:
        bs = getattr(self, "bias_scores", None)
        return None if bs is None else bs.detach() > 0

    @torch.no_grad()
    def set_mask(self, mask: Tensor, bias_mask: Optional[Tensor] = None, magnitude: float = 0.01) -> None:
        """Set scores to ``±magnitude`` so that the hard mask equals ``mask``."""
        for (name, _, scores), m in zip(self.score_pairs(), (mask, bias_mask)):
            if m is None:
                continue
            if m.shape != scores.shape:
                raise ValueError(f"{type(self).__name__}.set_mask: {name} mask shape {tuple(m.shape)} != {tuple(scores.shape)}")
            scores.copy_(torch.where(m.to(scores.device, torch.bool), magnitude, -magnitude))

    @torch.no_grad()
    def init_scores_(self, mode: str, mean: float = 0.01, *, spread: float = 1.0, std: float = 0.001 ** 0.5) -> None:
        """Re-initialise every score tensor of this module in place (see :data:`SCORE_INIT_MODES`)."""
        for _, frozen, scores in self.score_pairs():
            scores.copy_(initial_scores(frozen, mode, mean, spread=spread, std=std).to(scores.device))

    def _init_scores(self, init: float, spread: float, mask_bias: bool) -> None:
        self.scores = _scores_like(self.weight, init, spread)
        self.bias_scores = _scores_like(self.bias, init, spread) if (mask_bias and self.bias is not None) else None


class MaskedLinear(MaskedModule):
    """Drop-in ``nn.Linear`` whose frozen weight is seen through a learnt binary mask."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 score_init: float = 0.01, score_init_spread: float = 0.0, mask_bias: bool = False,
                 t_l: Optional[float] = None, t_s: float = 1.0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        w = torch.empty(out_features, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        self.weight = _frozen(w)
        self.bias = _frozen(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._configure(score_init=score_init, score_init_spread=score_init_spread, mask_bias=mask_bias,
                        t_l=t_l, t_s=t_s)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "MaskedLinear":
        """Wrap a pre-trained ``nn.Linear`` (its weight and bias are shared, frozen)."""
        m = cls.__new__(cls)
        MaskedModule.__init__(m)
        m.in_features, m.out_features = linear.in_features, linear.out_features
        m.weight = _frozen(linear.weight)
        m.bias = _frozen(linear.bias) if linear.bias is not None else None
        m._configure(**kw)
        return m

    @classmethod
    def from_conv1d(cls, conv, **kw) -> "MaskedLinear":
        """Wrap GPT-2's ``Conv1D`` (weight ``[in, out]``): the weight is stored transposed, once."""
        m = cls.__new__(cls)
        MaskedModule.__init__(m)
        m.in_features, m.out_features = conv.weight.shape
        m.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=False)
        m.bias = _frozen(conv.bias)
        m._configure(source_type="conv1d", **kw)
        return m

    def _configure(self, *, score_init: float = 0.01, score_init_spread: float = 0.0, mask_bias: bool = False,
                   t_l: Optional[float] = None, t_s: float = 1.0, source_type: str = "linear") -> None:
        self.t_l, self.t_s = t_l, t_s
        self.backend: Optional[str] = None  # a preference (abp.backends.prefer); None: use_backend / ABP_BACKEND / auto
        self.fused_update: Optional[ScoreSGD] = None  # set by the trainer for the fused-update path
        self.fused_uses = 0  # forwards since the last score step (must stay <= 1 when fused)
        self.serve_bits: Optional[bool] = None  # inference from the packed mask: None = auto (see _serves_from_bits)
        self.train_bits: Optional[bool] = None  # hard-mask forward/dX from the packed mask: None = auto (_trains_from_bits)
        self._packed: Optional[tuple] = None
        self.register_buffer("fused_counts", torch.zeros(2, dtype=torch.int64, device=self.weight.device), persistent=False)
        self._init_scores(score_init, score_init_spread, mask_bias)
        self.source_type = source_type

    def forward(self, x: Tensor) -> Tensor:
        if self._serves_from_bits(x):
            return bitmask_linear(x, self.weight, self.packed_mask(), self._served_bias(),
                                  backend=backends.prefer(self.backend))
        fused = self.fused_update if (self.training and torch.is_grad_enabled()) else None
        if fused is not None:
            # The fused backward updates θ in place: a second use before the step would see a moved mask.
            self.fused_uses += 1
            if self.fused_uses > 1:
                raise RuntimeError("MaskedLinear with a fused score update was called twice in one step "
                                   "(shared or re-used layer); the update would not be exact: disable fused_update")
        return masked_linear(x, self.weight, self.scores, self.bias, self.bias_scores, t_s=self.t_s,
                             t_l=self.t_l, backend=backends.prefer(self.backend), fused_update=fused,
                             counts=self.fused_counts if fused is not None else None,
                             packed=self.packed_mask() if self._trains_from_bits(x) else None)

    def _trains_from_bits(self, x: Tensor) -> bool:
        """Forward and dX from the packed hard mask (the v2 kernels) instead of the fp32 scores?

        ``train_bits``: True always (any backend: the reference unpacks the bits), False never, None (auto) where the
        hard mask runs on the Triton kernels (CUDA, or the ``triton`` backend asked for) and ``ABP_KERNELS`` is v2
        (:func:`abp.backends.kernels_version`). Never for a soft mask (finite ``t_l``), nor inside ``torch.compile``
        (the bits cache is host logic). The bits are repacked when the scores changed since the last pack.
        """
        if self.t_l is not None or self.train_bits is False or torch.compiler.is_compiling():
            return False
        if self.train_bits:
            return True
        if backends.kernels_version() != "v2":
            return False
        name = backends.requested(backends.prefer(self.backend))
        return name == "triton" or (name == "auto" and x.device.type == "cuda")

    # ---------------------------------------------------------------- serving from the 1-bit mask
    def _serves_from_bits(self, x: Tensor) -> bool:
        """Inference (eval mode, no grad) with the hard mask, through :func:`abp.bitmask_linear`?

        ``serve_bits``: True always, False never, None (auto) on CUDA for at most ``backends.SERVE_KERNEL_MAX_TOKENS``
        tokens, the regime where reading one bit per weight instead of ``W⊙M`` pays (bench ``bitmask_linear``).
        """
        if (self.training or torch.is_grad_enabled() or self.t_l is not None or self.serve_bits is False
                or torch.compiler.is_compiling()):  # (the cache check below is host logic: keep it out of graphs)
            return False
        tokens = x.numel() // self.in_features
        return bool(self.serve_bits) or (x.device.type == "cuda" and tokens <= backends.SERVE_KERNEL_MAX_TOKENS)

    def packed_mask(self) -> Tensor:
        """``abp.pack_mask(self.mask())`` (made in one pass over the scores), cached until the scores change.

        The cache is keyed on the scores' storage and version counter, which every in-place write bumps
        (optimiser steps, the fused in-backward update and the multi-tensor update, which are custom ops that
        declare the scores mutated, ``set_mask``, ``load_state_dict``, checkpoint restores): so the bits that the
        v2 training kernels and serving read are 1[θ>0] of the scores as they are at the forward, whatever path
        moved them. Writes that bypass the counter (``.data`` assignments; FSDP's unsharding, so the trainer turns
        serving and v2 training off under FSDP) need ``invalidate_packed_mask()``.
        """
        key = (self.scores.data_ptr(), self.scores._version, self.scores.device)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_positive(self.scores, backend=backends.prefer(self.backend)))
        return self._packed[1]

    def invalidate_packed_mask(self) -> None:
        self._packed = None

    def _served_bias(self) -> Optional[Tensor]:
        if self.bias is None or self.bias_scores is None:
            return self.bias
        return self.bias * self.bias_mask().to(self.bias.dtype)

    @torch.no_grad()
    def to_plain(self) -> nn.Module:
        """An ``nn.Linear`` (or GPT-2 ``Conv1D``) with the hard mask baked into its weight."""
        w = self.weight * self.mask().to(self.weight.dtype)
        b = None if self.bias is None else self.bias * (self.bias_mask() if self.bias_scores is not None else 1)
        if self.source_type == "conv1d":
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features).to(w.device, w.dtype)
            out.weight.copy_(w.t())
            out.bias.copy_(b if b is not None else 0)
            return out
        out = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"mask_bias={self.bias_scores is not None}, t_l={self.t_l}, t_s={self.t_s}")


class MaskedEmbedding(MaskedModule):
    """Drop-in ``nn.Embedding`` with a learnt mask over its frozen table (rows gathered, never W⊙M)."""

    def __init__(self, embedding: nn.Embedding, *, score_init: float = 0.01, score_init_spread: float = 0.0,
                 t_l: Optional[float] = None, t_s: float = 1.0, **_):
        super().__init__()
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("MaskedEmbedding: embeddings with max_norm or sparse=True are not supported")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.padding_idx = embedding.padding_idx
        self.weight = _frozen(embedding.weight)
        self.bias = None
        self.t_l, self.t_s = t_l, t_s
        self._init_scores(score_init, score_init_spread, False)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, **kw) -> "MaskedEmbedding":
        return cls(embedding, **kw)

    def forward(self, ids: Tensor) -> Tensor:
        return masked_embedding(ids, self.weight, self.scores, t_s=self.t_s, t_l=self.t_l,
                                   padding_idx=self.padding_idx)

    @torch.no_grad()
    def to_plain(self) -> nn.Embedding:
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight * self.mask().to(self.weight.dtype))
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class MaskedLayerNorm(MaskedModule):
    """``nn.LayerNorm`` with masked affine weight and bias (optional in :func:`abp.mask_model`)."""

    def __init__(self, norm: nn.LayerNorm, *, score_init: float = 0.01, score_init_spread: float = 0.0,
                 t_l: Optional[float] = None, t_s: float = 1.0, **_):
        super().__init__()
        if norm.weight is None:
            raise ValueError("MaskedLayerNorm: the LayerNorm has no affine weight to mask")
        self.normalized_shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = _frozen(norm.weight)
        self.bias = _frozen(norm.bias) if norm.bias is not None else None
        self.t_l, self.t_s = t_l, t_s
        self._init_scores(score_init, score_init_spread, self.bias is not None)

    def forward(self, x: Tensor) -> Tensor:
        w = masked_param(self.weight, self.scores, t_s=self.t_s, t_l=self.t_l)
        b = None if self.bias is None else masked_param(self.bias, self.bias_scores, t_s=self.t_s, t_l=self.t_l)
        return nn.functional.layer_norm(x, self.normalized_shape, w.to(x.dtype), None if b is None else b.to(x.dtype), self.eps)

    @torch.no_grad()
    def to_plain(self) -> nn.LayerNorm:
        out = nn.LayerNorm(self.normalized_shape, eps=self.eps, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(self.weight * self.mask().to(self.weight.dtype))
        if self.bias is not None:
            out.bias.copy_(self.bias * self.bias_mask().to(self.bias.dtype))
        return out

