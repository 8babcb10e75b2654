"""Functional masked layers: argument checks, leading dims, autocast, and the fused-update path.

``masked_linear`` is the public entry point. Its gradient for ``scores`` is the paper's surrogate
``(dYᵀX)⊙W⊙t_s·σ(t_s·θ)(1−σ(t_s·θ))``, deliberately *not* the derivative of the forward mask.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from abp import _ops, reference

Tensor = torch.Tensor
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)  # fp64: reference backend only
_CHECK_FINITE = os.environ.get("ABP_CHECK_FINITE") == "1"


@dataclass
class ScoreSGD:
    """The paper's plain-SGD score step ``θ ← θ − active·(lr·g + γ)``, for the fused-update path.

    ``gamma`` and ``active`` are 0-d fp32 tensors on the scores' device so that a schedule can change
    them without a host sync; ``recovery=False`` keeps pruned scores pruned.
    """

    lr: float
    gamma: Tensor
    active: Tensor
    recovery: bool = True


def _check_weight_and_input(name: str, x: Tensor, weight: Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}: input's last dim {tuple(x.shape)[-1:]} does not match weight [out={weight.shape[0]}, in={weight.shape[1]}]")


def _check_one_device(name: str, *tensors: Optional[Tensor]) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{name}: tensors are on different devices: {sorted(map(str, devices))}")


def _check_linear(x: Tensor, weight: Tensor, scores: Tensor, bias, bias_scores, t_l, t_s) -> None:
    _check_weight_and_input("masked_linear", x, weight)
    if scores.shape != weight.shape:
        raise ValueError(f"masked_linear: scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    if scores.dtype != torch.float32:
        raise TypeError(f"masked_linear: scores must be float32 (updates of ~1e-7 vanish in lower precision), got {scores.dtype}")
    if x.dtype not in _FLOATS or weight.dtype not in _FLOATS:
        raise TypeError(f"masked_linear: input/weight must be a float dtype, got {x.dtype}/{weight.dtype}")
    if x.dtype != weight.dtype:
        raise TypeError(f"masked_linear: input dtype {x.dtype} != weight dtype {weight.dtype} (cast one, or use autocast)")
    _check_one_device("masked_linear", x, weight, scores, bias, bias_scores)
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("masked_linear: weight and bias are frozen pre-trained parameters; set requires_grad=False")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"masked_linear: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    if bias_scores is not None:
        if bias is None:
            raise ValueError("masked_linear: bias_scores given without bias")
        if bias_scores.dtype != torch.float32:
            raise TypeError(f"masked_linear: bias_scores must be float32, got {bias_scores.dtype}")
        if bias_scores.shape != bias.shape:
            raise ValueError(f"masked_linear: bias_scores shape {tuple(bias_scores.shape)} != bias shape {tuple(bias.shape)}")
    if t_l is not None and not (math.isfinite(t_l) and t_l > 0):
        raise ValueError(f"masked_linear: t_l must be None (hard mask) or a positive finite number, got {t_l}")
    if not (math.isfinite(t_s) and t_s > 0):
        raise ValueError(f"masked_linear: t_s must be positive and finite, got {t_s}")
    if _CHECK_FINITE:
        check_finite_scores(scores, "scores")


def check_finite_scores(scores: Tensor, name: str = "scores") -> None:
    """Raise if ``scores`` holds NaN or inf (a host sync: call it at checkpoints, not every step)."""
    bad = (~torch.isfinite(scores)).sum().item()
    if bad:
        raise FloatingPointError(f"{name}: {bad} of {scores.numel()} mask scores are NaN or inf (learning rate too high?)")


class _FusedUpdateLinear(torch.autograd.Function):
    """Masked linear whose backward applies the score SGD step in the dθ epilogue: no dθ, no dW."""

    @staticmethod
    def forward(ctx, x, weight, scores, bias, bias_scores, t_l, t_s, backend, sgd, counts, packed):
        ctx.save_for_backward(x, weight, scores, bias, bias_scores, packed)
        ctx.args = (t_l, t_s, backend, sgd, counts)
        if packed is not None:
            return _ops.run("masked_matmul_bits", x, weight, scores, packed, bias, bias_scores, t_s, backend)
        return _ops.run("masked_matmul", x, weight, scores, bias, bias_scores, t_l, t_s, backend)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scores, bias, bias_scores, packed = ctx.saved_tensors
        t_l, t_s, backend, sgd, counts = ctx.args
        dy = dy.contiguous()
        # dX first: it must see the mask from before the update (the bits are that mask, whatever the update does).
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (_ops.run("masked_matmul_bits_dx", dy, weight, packed, backend) if packed is not None
                  else _ops.run("masked_matmul_dx", dy, weight, scores, t_l, backend))
        _ops.score_grad_update_(dy, x, weight, scores, bias, bias_scores, counts, sgd.lr, sgd.gamma, sgd.active,
                                sgd.recovery, t_s, backend)
        return dx, None, None, None, None, None, None, None, None, None, None


def _autocast_operands(input: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """``(amp, input, weight, bias)``: the operands cast to the autocast dtype when autocast is on for the
    input's device, as ``F.linear`` would be; ``amp`` says whether autocast is on there (so the ops must run with it
    off: they take the cast operands as they are)."""
    amp = torch.amp.is_autocast_available(input.device.type) and torch.is_autocast_enabled(input.device.type)
    if amp and input.dtype in _FLOATS:
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight = input.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return amp, input, weight, bias


def masked_linear(
    input: Tensor,
    weight: Tensor,
    scores: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    *,
    t_s: float = 1.0,
    t_l: Optional[float] = None,
    backend: Optional[str] = None,
    fused_update: Optional[ScoreSGD] = None,
    counts: Optional[Tensor] = None,
    packed: Optional[Tensor] = None,
) -> Tensor:
    """``input @ (weight ⊙ m).T + bias ⊙ m_b`` with ``m = 1[scores > 0]`` (or ``σ(t_l·scores)``).

    Any leading dims; fp32/fp16/bf16 activations (autocast honoured); fp32 scores; ``weight`` and
    ``bias`` frozen. With ``fused_update`` the backward updates ``scores`` in place (and writes the
    count of pruned scores into ``counts``, int64 [2]) instead of returning a gradient for them.

    ``packed``: the hard mask as bits, ``pack_mask(scores > 0)`` (hard mask only). The forward and dX then read
    1 bit per weight instead of the fp32 scores (the v2 kernels); the score gradient still reads the scores.
    The caller keeps it equal to ``pack_mask(scores > 0)`` (``MaskedLinear.packed_mask`` does, through the scores'
    version counter); it is not checked here, which would cost the pass over the scores it saves.
    """
    amp, input, weight, bias = _autocast_operands(input, weight, bias)
    _check_linear(input, weight, scores, bias, bias_scores, t_l, t_s)
    if packed is not None:
        if t_l is not None:
            raise ValueError(f"masked_linear: packed bits are the hard mask; they cannot give σ(t_l·θ) with t_l={t_l}")
        _check_packed("masked_linear", packed, weight, 1)
    lead = input.shape[:-1]
    x2d = input.reshape(lead.numel(), input.shape[-1])  # not -1: ambiguous when in_features is 0
    backend = backend or ""  # "": the default choice (use_backend, ABP_BACKEND, auto)
    # Eager: autograd Functions over the op bodies (no dispatcher: a custom-op call costs more host time than the
    # kernel at BERT-base shapes); under torch.compile: the custom ops, which it traces.
    eager = not torch.compiler.is_compiling()
    with torch.autocast(input.device.type, enabled=False) if amp else contextlib.nullcontext():
        if fused_update is None and packed is not None:
            op = _ops.EagerMaskedMatmulBits.apply if eager else _ops.masked_matmul_bits
            y = op(x2d, weight, scores, packed, bias, bias_scores, t_s, backend)
        elif fused_update is None:
            op = _ops.EagerMaskedMatmul.apply if eager else _ops.masked_matmul
            y = op(x2d, weight, scores, bias, bias_scores, t_l, t_s, backend)
        else:
            if counts is None or counts.dtype != torch.int64:
                raise TypeError("masked_linear: fused_update needs counts, an int64 tensor of shape [2]")
            if counts.shape != (2,):
                raise ValueError(f"masked_linear: fused_update needs counts of shape [2], got {tuple(counts.shape)}")
            y = _FusedUpdateLinear.apply(x2d, weight, scores, bias, bias_scores, t_l, t_s, backend,
                                         fused_update, counts, packed)
    return y.reshape(*lead, weight.shape[0])


class _MaskedRows(torch.autograd.Function):
    """``W[ids] ⊙ m(θ[ids])`` for embeddings: gathers rows, never builds the dense W⊙M."""

    @staticmethod
    def forward(ctx, ids, weight, scores, t_l, t_s, padding_idx):
        ctx.save_for_backward(ids, weight, scores)
        ctx.t_s, ctx.padding_idx = t_s, padding_idx
        return weight[ids] * reference.mask_from_scores(scores[ids], t_l).to(weight.dtype)

    @staticmethod
    def backward(ctx, dout):
        ids, weight, scores = ctx.saved_tensors
        flat = ids.reshape(-1)
        g = dout.reshape(flat.numel(), -1).float() * weight[flat].float() * reference.surrogate_factor(scores[flat], ctx.t_s)
        if ctx.padding_idx is not None:
            g[flat == ctx.padding_idx] = 0
        dscores = torch.zeros_like(scores).index_add_(0, flat, g)
        return None, None, dscores, None, None, None


def masked_embedding(
    ids: Tensor, weight: Tensor, scores: Tensor, *, t_s: float = 1.0, t_l: Optional[float] = None,
    padding_idx: Optional[int] = None,
) -> Tensor:
    """Embedding lookup through a learnt mask, with the surrogate gradient for ``scores``."""
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"masked_embedding: ids must be int32/int64, got {ids.dtype}")
    if scores.dtype != torch.float32:
        raise TypeError(f"masked_embedding: scores must be float32, got {scores.dtype}")
    if scores.shape != weight.shape:
        raise ValueError(f"masked_embedding: scores shape {tuple(scores.shape)} != weight shape {tuple(weight.shape)}")
    if len({ids.device, weight.device, scores.device}) > 1:
        raise ValueError(f"masked_embedding: ids on {ids.device}, weight on {weight.device}, scores on {scores.device}: "
                         "move them to one device")
    return _MaskedRows.apply(ids, weight, scores, t_l, t_s, padding_idx)


class _MaskedParam(torch.autograd.Function):
    """``W ⊙ m(θ)`` for small parameters (LayerNorm), with the surrogate gradient."""

    @staticmethod
    def forward(ctx, weight, scores, t_l, t_s):
        ctx.save_for_backward(weight, scores)
        ctx.t_s = t_s
        return weight * reference.mask_from_scores(scores, t_l).to(weight.dtype)

    @staticmethod
    def backward(ctx, g):
        weight, scores = ctx.saved_tensors
        return None, g.float() * weight.float() * reference.surrogate_factor(scores, ctx.t_s), None, None


def masked_param(weight: Tensor, scores: Tensor, *, t_s: float = 1.0, t_l: Optional[float] = None) -> Tensor:
    """A small parameter seen through its mask (materialised: meant for norms and biases)."""
    return _MaskedParam.apply(weight, scores, t_l, t_s)


# --------------------------------------------------------------------------- serving from 1-bit masks

def pack_mask(mask: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Bool tensor (any shape) → uint8 bits, 1 bit per element: element ``i`` of the row-major
    flattened tensor is bit ``i % 8`` (LSB first) of byte ``i // 8``; the last byte is zero-padded."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask: expected a bool tensor, got {mask.dtype}")
    return _ops.pack_mask(mask, backend or "")


def pack_positive(scores: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """``pack_mask(scores > 0)`` in one pass over fp32 ``scores`` (4 + 1/8 bytes per element, no bool mask between):
    the bits of the hard mask that the v2 kernels read."""
    if scores.dtype != torch.float32:
        raise TypeError(f"pack_positive: expected float32 scores, got {scores.dtype}")
    return _ops.pack_positive(scores.detach(), backend or "")


def unpack_mask(packed: torch.Tensor, shape, *, backend: Optional[str] = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: uint8 bits → bool tensor of ``shape``."""
    shape = torch.Size(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_mask: expected a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != (shape.numel() + 7) // 8:
        raise ValueError(f"unpack_mask: {packed.numel()} bytes cannot hold a mask of shape {tuple(shape)} "
                         f"({(shape.numel() + 7) // 8} bytes expected)")
    return _ops.unpack_mask(packed, shape.numel(), backend or "").view(shape)


def _check_serving(name: str, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    _check_weight_and_input(name, x, weight)
    if x.dtype not in _FLOATS[:3] or x.dtype != weight.dtype:
        raise TypeError(f"{name}: input and weight must share one of float32/float16/bfloat16, got {x.dtype}/{weight.dtype}")
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{name}: bias must be {weight.dtype} like the weight, got {bias.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
    _check_one_device(name, x, weight, bias)


def _check_packed(name: str, packed: Tensor, weight: Tensor, ndim: int) -> None:
    nbytes = (weight.numel() + 7) // 8
    want = "[ceil(out·in/8)]" if ndim == 1 else "[tasks, ceil(out·in/8)]"
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name}: packed mask must be uint8 (abp.pack_mask), got {packed.dtype}")
    if packed.dim() != ndim or packed.shape[-1] != nbytes:
        raise ValueError(f"{name}: packed mask must be uint8 {want} = {nbytes} bytes per mask for weight "
                         f"{tuple(weight.shape)} (abp.pack_mask), got {packed.dtype} {tuple(packed.shape)}")
    if packed.device != weight.device:
        raise ValueError(f"{name}: packed mask is on {packed.device} but weight is on {weight.device}")


def bitmask_linear(input: Tensor, weight: Tensor, packed_mask: Tensor, bias: Optional[Tensor] = None, *,
                   backend: Optional[str] = None) -> Tensor:
    """Serving: ``input @ (weight ⊙ unpack(packed_mask)).T + bias``, reading one bit per weight.

    ``packed_mask`` is :func:`abp.pack_mask` of the ``[out, in]`` bool mask. Any leading dims; no autograd
    (inference). On CUDA a GEMV/skinny-GEMM kernel reads the bits directly: for few tokens the weight read
    dominates, and a materialised ``W⊙M`` would double it; past ``backends.SERVE_KERNEL_MAX_TOKENS`` tokens ``auto``
    takes the reference (unpack, W⊙M, cuBLAS). ``backend``: as for every abp op (:mod:`abp.backends`).
    """
    _, input, weight, bias = _autocast_operands(input, weight, bias)
    _check_serving("bitmask_linear", input, weight, bias)
    _check_packed("bitmask_linear", packed_mask, weight, 1)
    x2d = input.reshape(-1, input.shape[-1])
    y = _ops.bitmask_linear(x2d, weight, packed_mask, bias, backend or "")
    return y.reshape(*input.shape[:-1], weight.shape[0])


def check_task_id_range(task_ids: Tensor, num_tasks: int, what: str) -> None:
    """Every id in ``[0, num_tasks)``: one host sync (min and max read back together). A bad id would
    otherwise index past the packed masks on the device (a device assert that kills the CUDA context)."""
    if task_ids.numel():
        lo, hi = torch.stack(torch.aminmax(task_ids)).tolist()
        if lo < 0 or hi >= num_tasks:
            raise ValueError(f"{what}: task ids must be in [0, {num_tasks}), got [{lo}, {hi}]")


def multi_bitmask_linear(input: Tensor, weight: Tensor, packed_masks: Tensor, task_ids: Tensor,
                         bias: Optional[Tensor] = None, *, backend: Optional[str] = None,
                         check_ids: bool = True) -> Tensor:
    """Serving many tasks over one frozen weight: row ``i`` of ``input`` (2-D ``[M, in]``) uses mask
    ``packed_masks[task_ids[i]]`` (``packed_masks``: ``[tasks, ceil(out·in/8)]`` uint8).

    Checking the ids' range costs one host sync; ``check_ids=False`` is for callers that checked them
    already (:class:`abp.MultiTaskModel` checks a batch's ids once, not once per layer)."""
    _, input, weight, bias = _autocast_operands(input, weight, bias)
    _check_serving("multi_bitmask_linear", input, weight, bias)
    _check_packed("multi_bitmask_linear", packed_masks, weight, 2)
    if input.dim() != 2:
        raise ValueError(f"multi_bitmask_linear: input must be 2-D [tokens, in] (one task id per row), got {tuple(input.shape)}")
    if task_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"multi_bitmask_linear: task_ids must be int32/int64, got {task_ids.dtype}")
    if task_ids.shape != (input.shape[0],):
        raise ValueError(f"multi_bitmask_linear: task_ids must have shape ({input.shape[0]},) (one per row), "
                         f"got {tuple(task_ids.shape)}")
    if task_ids.device != weight.device:
        raise ValueError(f"multi_bitmask_linear: task_ids are on {task_ids.device} but weight is on {weight.device}")
    if check_ids:
        check_task_id_range(task_ids, packed_masks.shape[0], "multi_bitmask_linear")
    return _ops.multi_bitmask_linear(input, weight, packed_masks, task_ids.long(), bias, backend or "")
