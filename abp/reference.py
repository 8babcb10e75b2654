"""Pure-torch implementation of every abp op.

It runs on any device and is the oracle the fused backends are tested against, so it favours
clarity over speed: it *does* materialise W⊙M and the dense dW, which the kernels never do.

Conventions shared by every backend (the contract):
- ``weight`` is ``[N, K]`` (``nn.Linear`` layout), ``x2d`` is ``[M, K]``, ``dy2d`` is ``[M, N]``.
- ``scores`` are fp32 with the shape of what they mask.
- Forward mask: ``1[θ > 0]`` when ``t_l`` is None, else ``σ(t_l·θ)``.
- Surrogate backward factor: ``t_s·σ(t_s·θ)·(1 − σ(t_s·θ))``.
- Score update (plain SGD of the paper): ``θ ← θ − active·(lr·g + γ)``; without connection
  recovery a score that was ``≤ 0`` before the step is clamped to ``≤ 0`` after it. With Adam on the
  scores, ``g`` is Adam's bias-corrected direction (:func:`adam_direction_`).
- Packed masks: 1 bit per element of the row-major flattened tensor, little-endian within a byte
  (element ``i`` is bit ``i % 8`` of byte ``i // 8``, as ``numpy.packbits(bitorder="little")``),
  zero-padded to whole bytes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def mask_from_scores(scores: Tensor, t_l: Optional[float] = None) -> Tensor:
    """The forward mask as fp32: hard ``1[θ>0]`` or the paper's ``σ(t_l·θ)``."""
    if t_l is None:
        return (scores > 0).to(torch.float32)
    return torch.sigmoid(scores.float() * t_l)


def surrogate_factor(scores: Tensor, t_s: float = 1.0) -> Tensor:
    """``t_s·σ(t_s·θ)(1−σ(t_s·θ))``: the straight-through surrogate of dm/dθ (fp32).

    Computed as ``σ(z)·σ(−z)``: ``1−σ(z)`` in fp32 cancels for large ``z`` (at σ(4) = 0.982 it
    loses ~6 of fp32's 24 bits), ``σ(−z)`` is exact to an ulp at any ``z``."""
    z = scores.float() * t_s
    return t_s * torch.sigmoid(z) * torch.sigmoid(-z)


def masked_linear_fwd(
    x2d: Tensor,
    weight: Tensor,
    scores: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    t_l: Optional[float] = None,
) -> Tensor:
    """``y = x·(W⊙M)ᵀ + b⊙m_b``."""
    if bias_scores is not None and bias is None:
        raise ValueError("bias_scores given without bias")
    w_eff = weight * mask_from_scores(scores, t_l).to(weight.dtype)
    b_eff = None
    if bias is not None:
        b_eff = bias if bias_scores is None else bias * mask_from_scores(bias_scores, t_l).to(bias.dtype)
    return F.linear(x2d, w_eff, b_eff)


def masked_linear_dx(dy2d: Tensor, weight: Tensor, scores: Tensor, t_l: Optional[float] = None) -> Tensor:
    """``dX = dY·(W⊙M)``."""
    return dy2d @ (weight * mask_from_scores(scores, t_l).to(weight.dtype))


def score_grad(
    dy2d: Tensor,
    x2d: Tensor,
    weight: Tensor,
    scores: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    t_s: float = 1.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """``dθ = (dYᵀX) ⊙ W ⊙ σ'``, fp32; the bias-score grad ``Σ_m dY ⊙ b ⊙ σ'`` when asked for."""
    dw_eff = dy2d.float().t() @ x2d.float()
    dscores = dw_eff * weight.float() * surrogate_factor(scores, t_s)
    dbias_scores = None
    if bias_scores is not None:
        if bias is None:
            raise ValueError("bias_scores given without bias")
        dbias_scores = dy2d.float().sum(0) * bias.float() * surrogate_factor(bias_scores, t_s)
    return dscores, dbias_scores


def score_update_(
    scores: Tensor, grad: Tensor, lr: float, gamma: Tensor | float, active: Tensor | float = 1.0,
    recovery: bool = True,
) -> Tensor:
    """In-place SGD step on one score tensor; returns the count of ``θ ≤ 0`` after it (int64, on device)."""
    step = lr * grad.float() + gamma
    new = scores - active * step
    if not recovery:
        new = torch.where(scores <= 0, new.clamp(max=0.0), new)
    scores.copy_(new)
    return (scores <= 0).sum()


def multi_score_update_(
    scores: Sequence[Tensor], grads: Sequence[Tensor], lr: float, gamma: Tensor | float,
    active: Tensor | float, recovery: bool, counts: Tensor,
) -> None:
    """:func:`score_update_` over many tensors; ``counts[i]`` ← count of ``θ ≤ 0`` in ``scores[i]``."""
    for i, (s, g) in enumerate(zip(scores, grads)):
        counts[i] = score_update_(s, g, lr, gamma, active, recovery)


def sqrt_rn(x: Tensor, out: Optional[Tensor] = None, block: int = 1 << 15) -> Tensor:
    """fp32 ``√x`` correctly rounded (IEEE's, CUDA's ``__fsqrt_rn``, C++'s ``std::sqrt``), through float64: the exact
    root of a float stays more than 2⁻⁵⁰ (relative) away from every midpoint between two floats, a float64 root
    within 1 ulp (2⁻⁵²) of it lies on the same side, so rounding that to fp32 gives the correctly rounded root.
    ``torch.sqrt`` itself is not correctly rounded on every CPU build: torch 2.13's CPU kernels (MKL, AVX-512) are
    1 ulp off on about 0.7 % of fp32 inputs (``pow(x, 0.5)`` and ``_foreach_sqrt`` likewise) and of float64 ones.
    On CPU it goes ``block`` elements at a time through one float64 buffer that stays in cache: about 1.5× the time
    of ``torch.sqrt`` where the whole tensor in float64 takes 3.5×. ``out`` (contiguous; may be ``x``) receives it."""
    if x.device.type != "cpu":
        root = x.double().sqrt_()
        return root.to(x.dtype) if out is None else out.copy_(root)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    src, dst = x.reshape(-1), out.view(-1)
    buf = torch.empty(min(block, src.numel()), dtype=torch.float64)
    for i in range(0, src.numel(), block):
        b = buf[: min(block, src.numel() - i)]
        dst[i:i + block].copy_(b.copy_(src[i:i + block]).sqrt_())
    return out


def adam_direction_(
    exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float, inv_bias1: float, inv_bias2: float,
    eps: float,
) -> Tensor:
    """Adam's bias-corrected direction ``m̂ / (√v̂ + ε)`` for one tensor in fp32, its moments updated in place;
    ``inv_bias_k = 1/(1 − β_k^t)``. One rounding per product, sum, quotient and root, in this order (the order the
    compiled op follows; no ``alpha=`` or ``addcmul``, which torch's CPU kernels may fuse into one FMA, and the
    root through :func:`sqrt_rn`):
    ``m ← m·β1 + g·(1−β1)``, ``v ← v·β2 + (g·g)·(1−β2)``, ``d = (m·inv_bias1) / (√(v·inv_bias2) + ε)``."""
    g = grad.float()
    exp_avg.mul_(beta1).add_(g * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_((g * g) * (1 - beta2))
    denom = sqrt_rn(exp_avg_sq * inv_bias2).add_(eps)
    return (exp_avg * inv_bias1).div_(denom)


def multi_score_adam_update_(
    scores: Sequence[Tensor], grads: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor],
    inv_bias1: Sequence[float], inv_bias2: Sequence[float], lr: float, beta1: float, beta2: float, eps: float,
    gamma: Tensor | float, active: Tensor | float, recovery: bool, counts: Tensor,
) -> None:
    """Adam on the scores: :func:`adam_direction_` then :func:`score_update_` on each tensor (the moments update even
    when ``active`` is 0); ``counts[i]`` ← count of ``θ ≤ 0`` in ``scores[i]``."""
    for i, (s, g, m, v) in enumerate(zip(scores, grads, exp_avg, exp_avg_sq)):
        d = adam_direction_(m, v, g, beta1, beta2, inv_bias1[i], inv_bias2[i], eps)
        counts[i] = score_update_(s, d, lr, gamma, active, recovery)


def adam_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float,
                  inv_bias2: float) -> Tensor:
    """Adam's moments of one tensor updated in place as in :func:`adam_direction_`; returns the sum of the
    bias-corrected second moment ``Σ v·inv_bias2`` (each product in fp32, summed in float64): what ``adam_mix`` takes
    the tensor's mean of."""
    g = grad.float()
    exp_avg.mul_(beta1).add_(g * (1 - beta1))
    exp_avg_sq.mul_(beta2).add_((g * g) * (1 - beta2))
    return (exp_avg_sq * inv_bias2).sum(dtype=torch.float64)


def multi_adam_moments_(
    grads: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], inv_bias2: Sequence[float],
    beta1: float, beta2: float, sums: Tensor,
) -> None:
    """:func:`adam_moments_` over many tensors; ``sums[i]`` (float64) ← the sum of tensor ``i``'s ``v̂``."""
    for i, (g, m, v) in enumerate(zip(grads, exp_avg, exp_avg_sq)):
        sums[i] = adam_moments_(m, v, g, beta1, beta2, inv_bias2[i])


def adam_mix_direction(exp_avg: Tensor, exp_avg_sq: Tensor, mean_sq: Tensor, inv_bias1: float, inv_bias2: float,
                       mix: float, eps: float) -> Tensor:
    """``adam_mix``'s direction for one tensor in fp32 (moments already updated, :func:`adam_moments_`):
    ``d = (m·inv_bias1) / (v̂^((1−mix)/2) · mean_sq^(mix/2) + ε)`` with ``v̂ = v·inv_bias2``, i.e. Adam's with the
    second moment ``v̂^(1−mix)·mean_sq^mix`` (``mean_sq``: the tensor's mean ``v̂``, 0-d fp32). The power is
    ``exp(log(v̂)·(1−mix)/2 + log(mean_sq^(mix/2)))`` in fp32, the form the compiled ops vectorise (a general ``pow`` is
    ten times slower on CPU): its argument's rounding puts it within about 1e-6 (relative) of the exact power, which is
    how close the backends agree (tests/test_csrc.py checks them against float64)."""
    return adam_mix_direction_lpm(exp_avg, exp_avg_sq, mean_sq.pow(mix / 2).log_(), inv_bias1, inv_bias2, mix, eps)


def adam_mix_direction_lpm(exp_avg: Tensor, exp_avg_sq: Tensor, lpm: Tensor, inv_bias1: float, inv_bias2: float,
                           mix: float, eps: float) -> Tensor:
    """:func:`adam_mix_direction` with ``lpm = log(mean_sq^(mix/2))`` given (0-d fp32)."""
    denom = (exp_avg_sq * inv_bias2).log_().mul_((1 - mix) / 2).add_(lpm).exp_().add_(eps)
    return (exp_avg * inv_bias1).div_(denom)


def multi_score_adam_mix_update_(
    scores: Sequence[Tensor], exp_avg: Sequence[Tensor], exp_avg_sq: Sequence[Tensor], mean_sq: Tensor,
    inv_bias1: Sequence[float], inv_bias2: Sequence[float], mix: float, lr: float, eps: float,
    gamma: Tensor | float, active: Tensor | float, recovery: bool, counts: Tensor,
) -> None:
    """:func:`adam_mix_direction` then :func:`score_update_` on each tensor (``mean_sq[i]`` is tensor ``i``'s mean
    ``v̂``); ``counts[i]`` ← count of ``θ ≤ 0`` in ``scores[i]``."""
    lpm = mean_sq.pow(mix / 2).log_()
    for i, (s, m, v) in enumerate(zip(scores, exp_avg, exp_avg_sq)):
        d = adam_mix_direction_lpm(m, v, lpm[i], inv_bias1[i], inv_bias2[i], mix, eps)
        counts[i] = score_update_(s, d, lr, gamma, active, recovery)


def pack_mask(mask: Tensor) -> Tensor:
    """Bool tensor → uint8 bits (see the module docstring for the bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = (2 ** torch.arange(8, device=flat.device, dtype=torch.int32))
    return (flat.view(-1, 8).to(torch.int32) * weights).sum(1).to(torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """uint8 bits → flat bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def bitmask_linear(x2d: Tensor, weight: Tensor, packed: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """Serving: ``y = x·(W⊙unpack(bits))ᵀ + b``."""
    m = unpack_mask(packed, weight.numel()).view_as(weight)
    return F.linear(x2d, weight * m.to(weight.dtype), bias)


def multi_bitmask_linear(
    x2d: Tensor, weight: Tensor, packed: Tensor, task_ids: Tensor, bias: Optional[Tensor] = None
) -> Tensor:
    """Serving several task masks over one base weight: row ``i`` uses mask ``packed[task_ids[i]]``."""
    out = x2d.new_empty(x2d.shape[0], weight.shape[0])
    for t in torch.unique(task_ids).tolist():
        rows = (task_ids == t).nonzero().squeeze(1)
        out[rows] = bitmask_linear(x2d[rows], weight, packed[t], bias)
    return out
