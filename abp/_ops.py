"""The ``abp::`` operators: one torch.library definition per op, a fake kernel for each (so
``torch.compile`` traces through them), and the masked-matmul autograd formula.

Each op's body only validates nothing and dispatches: :mod:`abp.backends` picks reference, Triton or
the compiled extension per call. Inputs are checked once, in :mod:`abp.functional`.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from abp import backends, reference
from abp._triton_bridge import kernels as _k

Tensor = torch.Tensor


def _c():
    return torch.ops.abp_C


#: The body of each hot op (the masked matmuls and the score gradient), callable without the dispatcher. The eager
#: autograd Functions below run these with the same backward formulas as the custom ops: a ``torch.library`` call costs
#: more host time than the small kernels it launches at BERT-base shapes (measured on CPU, tiny shapes, one thread:
#: abp's forward 192 µs against ``F.linear``'s 5 µs, most of it the custom-op machinery), and an eager step makes
#: about 75 such calls per BERT-base forward. ``torch.compile`` traces the custom ops (:mod:`abp.functional` picks).
EAGER: dict[str, Callable] = {}


def run(name: str, *args):
    """Call op ``name``: its body directly in eager mode, the custom op while ``torch.compile`` traces."""
    return (globals()[name] if torch.compiler.is_compiling() else EAGER[name])(*args)


def _op(name: str):
    """Register the decorated function as the custom op ``abp::<name>`` and keep it in :data:`EAGER`."""
    def wrap(fn):
        EAGER[name] = fn
        return torch.library.custom_op(f"abp::{name}", mutates_args=())(fn)
    return wrap


def _contig(*ts):
    return [t.contiguous() if t is not None else None for t in ts]


# --------------------------------------------------------------------------- masked matmul (training)

_MATMUL = {
    "reference": reference.masked_linear_fwd,
    "triton": lambda *a: _k().masked_matmul(*_contig(*a[:5]), t_l=a[5]),
}


@_op("masked_matmul")
def masked_matmul(
    x: Tensor, weight: Tensor, scores: Tensor, bias: Optional[Tensor], bias_scores: Optional[Tensor],
    t_l: Optional[float], t_s: float, backend: str,
) -> Tensor:
    """``y = x·(W⊙M)ᵀ + b⊙m_b`` for 2-D ``x``; ``t_s`` is used by the backward only."""
    return backends.dispatch("masked_matmul", _MATMUL, x.device, backend, x, weight, scores, bias, bias_scores, t_l)


@masked_matmul.register_fake
def _(x, weight, scores, bias, bias_scores, t_l, t_s, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


_DX = {
    "reference": reference.masked_linear_dx,
    "triton": lambda dy, w, s, t_l: _k().masked_matmul_dx(*_contig(dy, w, s), t_l=t_l),
}


@_op("masked_matmul_dx")
def masked_matmul_dx(dy: Tensor, weight: Tensor, scores: Tensor, t_l: Optional[float], backend: str) -> Tensor:
    """``dX = dY·(W⊙M)``."""
    return backends.dispatch("masked_matmul_dx", _DX, dy.device, backend, dy, weight, scores, t_l)


@masked_matmul_dx.register_fake
def _(dy, weight, scores, t_l, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


def _score_grad_reference(dy, x, weight, scores, bias, bias_scores, t_s):
    return reference.score_grad(dy, x, weight, scores, bias, bias_scores, t_s)


_SCORE_GRAD = {
    "reference": _score_grad_reference,
    "triton": lambda dy, x, w, s, b, bs, t_s: _k().score_grad(*_contig(dy, x, w, s, b, bs), t_s=t_s),
}


@_op("score_grad")
def score_grad(
    dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, bias: Optional[Tensor], bias_scores: Optional[Tensor],
    t_s: float, backend: str,
) -> tuple[Tensor, Tensor]:
    """Surrogate score gradient ``(dYᵀX)⊙W⊙σ'`` and the bias-score grad (empty when there are no bias scores)."""
    ds, dbs = backends.dispatch("score_grad", _SCORE_GRAD, dy.device, backend, dy, x, weight, scores, bias, bias_scores, t_s)
    return ds, dbs if dbs is not None else scores.new_empty(0)


@score_grad.register_fake
def _(dy, x, weight, scores, bias, bias_scores, t_s, backend):
    return torch.empty_like(scores), (torch.empty_like(bias_scores) if bias_scores is not None else scores.new_empty(0))


def _score_grad_update_reference(dy, x, weight, scores, bias, bias_scores, counts, lr, gamma, active, recovery, t_s):
    ds, dbs = reference.score_grad(dy, x, weight, scores, bias, bias_scores, t_s)
    counts[0] += reference.score_update_(scores, ds, lr, gamma, active, recovery)
    if bias_scores is not None:
        counts[1] += reference.score_update_(bias_scores, dbs, lr, gamma, active, recovery)


def _score_grad_update_triton(dy, x, weight, scores, bias, bias_scores, counts, lr, gamma, active, recovery, t_s):
    dy, x, weight, bias = _contig(dy, x, weight, bias)
    _k().score_grad_update_(dy, x, weight, scores, lr=lr, gamma=gamma, active=active, recovery=recovery,
                            counts=counts, bias=bias, bias_scores=bias_scores, t_s=t_s)


_SCORE_GRAD_UPDATE = {"reference": _score_grad_update_reference, "triton": _score_grad_update_triton}


@torch.library.custom_op("abp::score_grad_update_", mutates_args=("scores", "bias_scores", "counts"))
def score_grad_update_(
    dy: Tensor, x: Tensor, weight: Tensor, scores: Tensor, bias: Optional[Tensor], bias_scores: Optional[Tensor],
    counts: Tensor, lr: float, gamma: Tensor, active: Tensor, recovery: bool, t_s: float, backend: str,
) -> None:
    """Fused score gradient + SGD step in place; ``counts`` ← [#θ≤0 in scores, #θ≤0 in bias_scores]."""
    counts.zero_()
    backends.dispatch("score_grad_update_", _SCORE_GRAD_UPDATE, dy.device, backend,
                      dy, x, weight, scores, bias, bias_scores, counts, lr, gamma, active, recovery, t_s)


@score_grad_update_.register_fake
def _(dy, x, weight, scores, bias, bias_scores, counts, lr, gamma, active, recovery, t_s, backend):
    return None


def _setup_context(ctx, inputs, output):
    x, weight, scores, bias, bias_scores, t_l, t_s, backend = inputs
    ctx.save_for_backward(x, weight, scores, bias, bias_scores)
    ctx.t_l, ctx.t_s, ctx.backend = t_l, t_s, backend


def _matmul_backward(dx_op, grad_op):
    """The backward of ``masked_matmul`` through ``dx_op`` and ``grad_op`` (the custom ops, or their eager bodies)."""
    def backward(ctx, dy):
        x, weight, scores, bias, bias_scores = ctx.saved_tensors
        dy = dy.contiguous()
        dx = ds = dbs = None
        if ctx.needs_input_grad[0]:
            dx = dx_op(dy, weight, scores, ctx.t_l, ctx.backend)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            ds, dbs = grad_op(dy, x, weight, scores, bias, bias_scores, ctx.t_s, ctx.backend)
            if bias_scores is None or not ctx.needs_input_grad[4]:
                dbs = None
            if not ctx.needs_input_grad[2]:
                ds = None
        return dx, None, ds, None, dbs, None, None, None
    return backward


masked_matmul.register_autograd(_matmul_backward(masked_matmul_dx, score_grad), setup_context=_setup_context)


# --------------------------------------------------------------------------- masked matmul from packed bits (v2)

def _masked_bias(bias: Optional[Tensor], bias_scores: Optional[Tensor]) -> Optional[Tensor]:
    """``b⊙1[θ_b>0]`` (N elements: made here, so the bit kernels take an already-masked bias)."""
    if bias is None or bias_scores is None:
        return bias
    return bias * (bias_scores > 0).to(bias.dtype)


def _bits_dx_reference(dy, weight, packed):
    return dy @ (weight * reference.unpack_mask(packed, weight.numel()).view_as(weight).to(weight.dtype))


_BITS_MATMUL = {
    "reference": lambda x, w, p, b: reference.bitmask_linear(x, w, p, b),
    "triton": lambda x, w, p, b: _k().bitmask_matmul(*_contig(x, w, p, b)),
}
_BITS_DX = {
    "reference": _bits_dx_reference,
    "triton": lambda dy, w, p: _k().bitmask_matmul_dx(*_contig(dy, w, p)),
}


@_op("masked_matmul_bits")
def masked_matmul_bits(
    x: Tensor, weight: Tensor, scores: Tensor, packed: Tensor, bias: Optional[Tensor], bias_scores: Optional[Tensor],
    t_s: float, backend: str,
) -> Tensor:
    """The hard-mask forward ``y = x·(W⊙M)ᵀ + b⊙m_b`` reading ``M`` from ``packed`` (= ``pack_mask(scores > 0)``,
    1 bit per weight) instead of the fp32 scores; ``scores`` and ``t_s`` are there for the backward (σ'(θ))."""
    return backends.dispatch("masked_matmul_bits", _BITS_MATMUL, x.device, backend,
                             x, weight, packed, _masked_bias(bias, bias_scores))


@masked_matmul_bits.register_fake
def _(x, weight, scores, packed, bias, bias_scores, t_s, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@_op("masked_matmul_bits_dx")
def masked_matmul_bits_dx(dy: Tensor, weight: Tensor, packed: Tensor, backend: str) -> Tensor:
    """``dX = dY·(W⊙M)`` with ``M`` read from the packed bits."""
    return backends.dispatch("masked_matmul_bits_dx", _BITS_DX, dy.device, backend, dy, weight, packed)


@masked_matmul_bits_dx.register_fake
def _(dy, weight, packed, backend):
    return dy.new_empty(dy.shape[0], weight.shape[1])


def _bits_setup_context(ctx, inputs, output):
    x, weight, scores, packed, bias, bias_scores, t_s, backend = inputs
    ctx.save_for_backward(x, weight, scores, packed, bias, bias_scores)
    ctx.t_s, ctx.backend = t_s, backend


def _bits_backward(dx_op, grad_op):
    """The backward of ``masked_matmul_bits`` through ``dx_op`` and ``grad_op``."""
    def backward(ctx, dy):
        x, weight, scores, packed, bias, bias_scores = ctx.saved_tensors
        dy = dy.contiguous()
        dx = ds = dbs = None
        if ctx.needs_input_grad[0]:
            dx = dx_op(dy, weight, packed, ctx.backend)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[5]:
            ds, dbs = grad_op(dy, x, weight, scores, bias, bias_scores, ctx.t_s, ctx.backend)
            if bias_scores is None or not ctx.needs_input_grad[5]:
                dbs = None
            if not ctx.needs_input_grad[2]:
                ds = None
        return dx, None, ds, None, None, dbs, None, None
    return backward


masked_matmul_bits.register_autograd(_bits_backward(masked_matmul_bits_dx, score_grad),
                                     setup_context=_bits_setup_context)


# --------------------------------------------------------------------------- the same ops without the dispatcher

class EagerMaskedMatmul(torch.autograd.Function):
    """``abp::masked_matmul`` with its backward, calling the op bodies directly (see :data:`EAGER`)."""

    @staticmethod
    def forward(ctx, x, weight, scores, bias, bias_scores, t_l, t_s, backend):
        _setup_context(ctx, (x, weight, scores, bias, bias_scores, t_l, t_s, backend), None)
        return EAGER["masked_matmul"](x, weight, scores, bias, bias_scores, t_l, t_s, backend)

    backward = staticmethod(_matmul_backward(EAGER["masked_matmul_dx"], EAGER["score_grad"]))


class EagerMaskedMatmulBits(torch.autograd.Function):
    """``abp::masked_matmul_bits`` with its backward, calling the op bodies directly (see :data:`EAGER`)."""

    @staticmethod
    def forward(ctx, x, weight, scores, packed, bias, bias_scores, t_s, backend):
        _bits_setup_context(ctx, (x, weight, scores, packed, bias, bias_scores, t_s, backend), None)
        return EAGER["masked_matmul_bits"](x, weight, scores, packed, bias, bias_scores, t_s, backend)

    backward = staticmethod(_bits_backward(EAGER["masked_matmul_bits_dx"], EAGER["score_grad"]))


# --------------------------------------------------------------------------- score update over many tensors

def _multi_update_reference(scores, grads, lr, gamma, active, recovery, counts):
    reference.multi_score_update_(scores, grads, lr, gamma, active, recovery, counts)


def _multi_update_ext(scores, grads, lr, gamma, active, recovery, counts):
    _c().multi_score_update_(scores, grads, lr, gamma, active, recovery, counts)


_MULTI_UPDATE = {"reference": _multi_update_reference, "cuda": _multi_update_ext, "cpp": _multi_update_ext}


@torch.library.custom_op("abp::multi_score_update_", mutates_args=("scores", "counts"))
def multi_score_update_(
    scores: list[Tensor], grads: list[Tensor], lr: float, gamma: Tensor, active: Tensor, recovery: bool,
    counts: Tensor, backend: str,
) -> None:
    """``θ ← θ − active·(lr·g + γ)`` over all tensors at once; ``counts[i]`` ← #θ≤0 in ``scores[i]``."""
    backends.dispatch("multi_score_update_", _MULTI_UPDATE, counts.device, backend,
                      scores, grads, lr, gamma, active, recovery, counts)


@multi_score_update_.register_fake
def _(scores, grads, lr, gamma, active, recovery, counts, backend):
    return None


def _multi_adam_update_ext(*args):
    _c().multi_score_adam_update_(*args)


_MULTI_ADAM_UPDATE = {"reference": reference.multi_score_adam_update_, "cuda": _multi_adam_update_ext,
                      "cpp": _multi_adam_update_ext}


@torch.library.custom_op("abp::multi_score_adam_update_", mutates_args=("scores", "exp_avg", "exp_avg_sq", "counts"))
def multi_score_adam_update_(
    scores: list[Tensor], grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor],
    inv_bias1: list[float], inv_bias2: list[float], lr: float, beta1: float, beta2: float, eps: float,
    gamma: Tensor, active: Tensor, recovery: bool, counts: Tensor, backend: str,
) -> None:
    """Adam on the scores and the score step in one pass over memory, over all tensors at once:
    ``m ← β1·m + (1−β1)·g``, ``v ← β2·v + (1−β2)·g²``, ``θ ← θ − active·(lr·m̂/(√v̂ + ε) + γ)`` with
    ``m̂ = m·inv_bias1[i]``, ``v̂ = v·inv_bias2[i]`` (``inv_bias_k[i] = 1/(1−β_k^t_i)``, each tensor its own step
    count ``t_i``); ``counts[i]`` ← #θ≤0 in ``scores[i]``. Same arithmetic, rounding for rounding, as
    :func:`abp.reference.adam_direction_` followed by :func:`abp.reference.score_update_`.

    Why: the eager sequence makes about ten passes over every score-sized tensor (moments, bias corrections, root,
    quotient, then ``multi_score_update_``), with temporaries; the compiled op reads ``g, m, v, θ`` once and writes
    ``m, v, θ`` once (28 bytes per fp32 score). One Adam score step over MiniLM-sized scores (6 × 1536×384 +
    30522×384 fp32 tensors, 15.3 M scores) on CPU, one thread (``torch.set_num_threads(1)``, median of 11 steps, a
    shared 2-core machine under load, AVX-512 torch 2.13 build): 20.5 ms for this op (``cpp``) against 122 ms for the
    eager Adam directions followed by ``multi_score_update_`` (``cpp``), 6.0× (7 steps under heavier load: 29 ms
    against 183 ms). The CUDA kernel (one multi-tensor launch, as ``multi_score_update_``'s) is not timed on a GPU.
    """
    backends.dispatch("multi_score_adam_update_", _MULTI_ADAM_UPDATE, counts.device, backend,
                      scores, grads, exp_avg, exp_avg_sq, inv_bias1, inv_bias2, lr, beta1, beta2, eps, gamma, active,
                      recovery, counts)


@multi_score_adam_update_.register_fake
def _(scores, grads, exp_avg, exp_avg_sq, inv_bias1, inv_bias2, lr, beta1, beta2, eps, gamma, active, recovery,
      counts, backend):
    return None


def _multi_adam_moments_ext(*args):
    _c().multi_adam_moments_(*args)


_MULTI_ADAM_MOMENTS = {"reference": reference.multi_adam_moments_, "cuda": _multi_adam_moments_ext,
                       "cpp": _multi_adam_moments_ext}


@torch.library.custom_op("abp::multi_adam_moments_", mutates_args=("exp_avg", "exp_avg_sq", "sums"))
def multi_adam_moments_(
    grads: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor], inv_bias2: list[float], beta1: float,
    beta2: float, sums: Tensor, backend: str,
) -> None:
    """``adam_mix``'s first pass, over all tensors at once: Adam's moments ``m ← β1·m + (1−β1)·g``,
    ``v ← β2·v + (1−β2)·g²`` (bit for bit as :func:`multi_score_adam_update_`'s) and ``sums[i]`` (float64) ← the
    sum of tensor ``i``'s bias-corrected ``v̂ = v·inv_bias2[i]``, for :func:`multi_score_adam_mix_update_`'s
    per-tensor mean (a sharded optimiser all-reduces the sums between the two passes). The sums go over fixed
    blocks in a fixed order, so they are the same bits on every run of a backend; backends differ in the last bits
    of a float64 sum (:func:`abp.reference.multi_adam_moments_` is the oracle).
    """
    backends.dispatch("multi_adam_moments_", _MULTI_ADAM_MOMENTS, sums.device, backend,
                      grads, exp_avg, exp_avg_sq, inv_bias2, beta1, beta2, sums)


@multi_adam_moments_.register_fake
def _(grads, exp_avg, exp_avg_sq, inv_bias2, beta1, beta2, sums, backend):
    return None


def _multi_adam_mix_update_ext(*args):
    _c().multi_score_adam_mix_update_(*args)


_MULTI_ADAM_MIX_UPDATE = {"reference": reference.multi_score_adam_mix_update_, "cuda": _multi_adam_mix_update_ext,
                          "cpp": _multi_adam_mix_update_ext}


@torch.library.custom_op("abp::multi_score_adam_mix_update_", mutates_args=("scores", "counts"))
def multi_score_adam_mix_update_(
    scores: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor], mean_sq: Tensor, inv_bias1: list[float],
    inv_bias2: list[float], mix: float, lr: float, eps: float, gamma: Tensor, active: Tensor, recovery: bool,
    counts: Tensor, backend: str,
) -> None:
    """``adam_mix``'s second pass, over all tensors at once: ``θ ← θ − active·(lr·d + γ)`` with
    ``d = m̂ / ((v̂)^((1−mix)/2) · mean_sq[i]^(mix/2) + ε)``, ``m̂ = m·inv_bias1[i]``, ``v̂ = v·inv_bias2[i]``
    (the moments of :func:`multi_adam_moments_`, ``mean_sq[i]`` tensor ``i``'s mean ``v̂``, fp32);
    ``counts[i]`` ← #θ≤0 in ``scores[i]``. As :func:`abp.reference.multi_score_adam_mix_update_` to a few ulps of
    ``d`` (``pow`` is not correctly rounded in any backend).

    Why two passes and not one: the step of every score needs its tensor's mean ``v̂``, which needs every moment of
    the tensor first. Pass 1 reads ``g, m, v`` and writes ``m, v`` (20 bytes per fp32 score), pass 2 reads
    ``m, v, θ`` and writes ``θ`` (16 bytes), where the eager sequence (moments, bias correction, mean, powers,
    root, quotient, then :func:`multi_score_update_`) makes about fifteen passes with temporaries.
    """
    backends.dispatch("multi_score_adam_mix_update_", _MULTI_ADAM_MIX_UPDATE, counts.device, backend,
                      scores, exp_avg, exp_avg_sq, mean_sq, inv_bias1, inv_bias2, mix, lr, eps, gamma, active,
                      recovery, counts)


@multi_score_adam_mix_update_.register_fake
def _(scores, exp_avg, exp_avg_sq, mean_sq, inv_bias1, inv_bias2, mix, lr, eps, gamma, active, recovery, counts,
      backend):
    return None


# --------------------------------------------------------------------------- 1-bit masks

_PACK = {"reference": reference.pack_mask, "cuda": lambda m: _c().pack_mask(m), "cpp": lambda m: _c().pack_mask(m)}
_UNPACK = {"reference": reference.unpack_mask, "cuda": lambda p, n: _c().unpack_mask(p, n),
           "cpp": lambda p, n: _c().unpack_mask(p, n)}


@torch.library.custom_op("abp::pack_mask", mutates_args=())
def pack_mask(mask: Tensor, backend: str) -> Tensor:
    """Bool tensor → uint8 bits, little-endian within a byte."""
    return backends.dispatch("pack_mask", _PACK, mask.device, backend, mask.contiguous())


@pack_mask.register_fake
def _(mask, backend):
    return mask.new_empty((mask.numel() + 7) // 8, dtype=torch.uint8)


_PACK_POSITIVE = {"reference": lambda s: reference.pack_mask(s > 0), "cuda": lambda s: _c().pack_positive(s),
                  "cpp": lambda s: _c().pack_positive(s)}


@torch.library.custom_op("abp::pack_positive", mutates_args=())
def pack_positive(scores: Tensor, backend: str) -> Tensor:
    """fp32 scores → the uint8 bits of ``1[θ > 0]`` (``pack_mask(scores > 0)`` in one pass, no bool mask between)."""
    return backends.dispatch("pack_positive", _PACK_POSITIVE, scores.device, backend, scores.contiguous())


@pack_positive.register_fake
def _(scores, backend):
    return scores.new_empty((scores.numel() + 7) // 8, dtype=torch.uint8)


@torch.library.custom_op("abp::unpack_mask", mutates_args=())
def unpack_mask(packed: Tensor, numel: int, backend: str) -> Tensor:
    """uint8 bits → flat bool tensor of ``numel`` elements."""
    return backends.dispatch("unpack_mask", _UNPACK, packed.device, backend, packed.contiguous(), numel)


@unpack_mask.register_fake
def _(packed, numel, backend):
    return packed.new_empty(numel, dtype=torch.bool)


_BITMASK = {"reference": reference.bitmask_linear, "cuda": lambda *a: _c().bitmask_linear(*a),
            "cpp": lambda *a: _c().bitmask_linear(*a), "triton": lambda *a: _k().bitmask_matmul(*a)}
_MULTI_BITMASK = {"reference": reference.multi_bitmask_linear, "cuda": lambda *a: _c().multi_bitmask_linear(*a),
                  "cpp": lambda *a: _c().multi_bitmask_linear(*a),
                  "triton": lambda *a: _k().multi_bitmask_matmul(*a, check_ids=False)}  # checked in functional


@torch.library.custom_op("abp::bitmask_linear", mutates_args=())
def bitmask_linear(x: Tensor, weight: Tensor, packed: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """Serving: ``x·(W⊙unpack(bits))ᵀ + b``, reading one bit per weight."""
    return backends.dispatch("bitmask_linear", _BITMASK, x.device, backend, *_contig(x, weight, packed, bias),
                             tokens=x.shape[0])


@bitmask_linear.register_fake
def _(x, weight, packed, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("abp::multi_bitmask_linear", mutates_args=())
def multi_bitmask_linear(
    x: Tensor, weight: Tensor, packed: Tensor, task_ids: Tensor, bias: Optional[Tensor], backend: str
) -> Tensor:
    """Serving many task masks over one base weight: row ``i`` of ``x`` uses ``packed[task_ids[i]]``."""
    return backends.dispatch("multi_bitmask_linear", _MULTI_BITMASK, x.device, backend,
                             *_contig(x, weight, packed, task_ids, bias), tokens=x.shape[0])


@multi_bitmask_linear.register_fake
def _(x, weight, packed, task_ids, bias, backend):
    return x.new_empty(x.shape[0], weight.shape[0])
