"""Masked matmuls with the mask made on chip: ``y = x·(W⊙M)ᵀ + b⊙m_b`` and ``dX = dY·(W⊙M)``.

One Triton kernel serves both: it computes ``out[M, N] = A[M, K] @ B[K, N]`` where ``B`` is a
strided view of the weight (``Wᵀ`` for the forward, ``W`` for dX). Each K-step loads the weight
tile and the fp32 score tile, turns the scores into the mask in registers (``1[θ>0]`` through a
constexpr branch, or ``σ(t_l·θ)``) and multiplies before ``tl.dot``: ``W⊙M`` never exists in
memory. Accumulation is fp32; output in the activation dtype. Tiling follows Triton tutorial 03
(``BLOCK_M/N/K`` with ``GROUP_SIZE_M`` swizzle for L2 reuse, row/column indices wrapped modulo
the size so only the K tail needs a load mask, stores masked).

This module also holds the input checks and the two ``@triton.jit`` helpers that
:mod:`abp.kernels.score_grad` shares (tile swizzle, validation).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs

Tensor = torch.Tensor

ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Pointer offsets are int32 in the kernels: refuse tensors they cannot address.
_MAX_NUMEL = 2**31 - 1


# ----------------------------------------------------------------------------------------------
# input checks (shared with score_grad.py)
# ----------------------------------------------------------------------------------------------
def check_tensor(name: str, t, *, ndim: int, dtypes=None, shape=None) -> None:
    """Raise ValueError unless ``t`` is a tensor with ``ndim`` dims, an allowed dtype and shape."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.numel() > _MAX_NUMEL:
        raise ValueError(f"{name} has {t.numel()} elements; the kernels use int32 offsets (max {_MAX_NUMEL})")


def check_weight_and_scores(weight: Tensor, scores: Tensor, act_dtype: torch.dtype) -> None:
    """``weight`` [N, K] in the activation dtype, ``scores`` fp32 of the same shape."""
    check_tensor("weight", weight, ndim=2, dtypes=(act_dtype,))
    check_tensor("scores", scores, ndim=2, dtypes=(torch.float32,), shape=weight.shape)


def check_bias(bias: Optional[Tensor], bias_scores: Optional[Tensor], n: int, dtype: torch.dtype) -> None:
    """``bias`` [N] in the weight dtype; ``bias_scores`` fp32 [N], only together with ``bias``."""
    if bias_scores is not None and bias is None:
        raise ValueError("bias_scores given without bias")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(dtype,), shape=(n,))
    if bias_scores is not None:
        check_tensor("bias_scores", bias_scores, ndim=1, dtypes=(torch.float32,), shape=(n,))


def check_temperature(name: str, t, allow_none: bool) -> None:
    if t is None and allow_none:
        return
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        what = "None (hard mask) or a finite float" if allow_none else "a finite float"
        raise ValueError(f"{name} must be {what}, got {t!r}")


def check_device(**tensors: Optional[Tensor]) -> torch.device:
    """All given tensors on one device where the Triton kernels can run; returns that device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) != 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device; got {where}")
    device = devices.pop()
    ok, why = configs.triton_available(device)
    if not ok:
        raise ValueError(why)
    if configs.INTERPRET and any(v.dtype == torch.bfloat16 for v in present.values()):
        raise TypeError("bfloat16 is not supported under the Triton interpreter (it has no bf16 "
                         "arithmetic); run bf16 on a GPU")
    return device


# ----------------------------------------------------------------------------------------------
# jit helpers (shared with score_grad.py)
# ----------------------------------------------------------------------------------------------
@triton.jit
def tile_coords(pid, ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, GROUP: tl.constexpr):
    """Program id → (row tile, column tile), ``GROUP`` row tiles at a time (tutorial 03 swizzle).

    Consecutive programs share column tiles of one group of rows, so the operand strips they
    read stay in L2.
    """
    num_pid_r = tl.cdiv(ROWS, BLOCK_R)
    num_pid_c = tl.cdiv(COLS, BLOCK_C)
    num_pid_in_group = GROUP * num_pid_c
    group_id = pid // num_pid_in_group
    first_pid_r = group_id * GROUP
    group_size_r = min(num_pid_r - first_pid_r, GROUP)
    pid_r = first_pid_r + ((pid % num_pid_in_group) % group_size_r)
    pid_c = (pid % num_pid_in_group) // group_size_r
    return pid_r, pid_c


@triton.jit
def apply_mask(w, s, t_l, HARD: tl.constexpr):
    """``w ⊙ mask(s)`` in fp32 registers: ``1[s>0]`` if ``HARD`` else ``σ(t_l·s)``."""
    w = w.to(tl.float32)
    if HARD:
        return tl.where(s > 0.0, w, 0.0)
    else:
        # clamped: σ(±88) is 0/1 to fp32 precision, and exp never overflows (t_l = 1e5 makes |s·t_l| huge)
        return w * tl.sigmoid(tl.minimum(tl.maximum(s * t_l, -88.0), 88.0))


# ----------------------------------------------------------------------------------------------
# the kernel
# ----------------------------------------------------------------------------------------------
@triton.jit
def _masked_mm_kernel(
    # pointers
    a_ptr, w_ptr, s_ptr, b_ptr, bs_ptr, out_ptr,
    # sizes: out[M, N] = A[M, K] @ (W⊙M viewed as [K, N]); M_BUCKET is the tuning key only
    M, N, K, M_BUCKET,
    # strides
    stride_am, stride_ak,
    stride_wk, stride_wn,
    stride_sk, stride_sn,
    stride_om, stride_on,
    t_l,
    # meta-parameters
    HARD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_BIAS_SCORES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices: tail rows/cols re-read valid memory and are dropped at the store.
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    s_ptrs = s_ptr + offs_k[:, None] * stride_sk + offs_n[None, :] * stride_sn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        k_in = offs_k[:, None] < k_left
        w = tl.load(w_ptrs, mask=k_in, other=0.0)
        s = tl.load(s_ptrs, mask=k_in, other=0.0)
        wm = apply_mask(w, s, t_l, HARD).to(a.dtype)
        acc = tl.dot(a, wm, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
        s_ptrs += BLOCK_K * stride_sk

    if HAS_BIAS:
        b = tl.load(b_ptr + offs_n)
        if HAS_BIAS_SCORES:
            b = apply_mask(b, tl.load(bs_ptr + offs_n), t_l, HARD)
        acc += b.to(tl.float32)[None, :]

    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


# Two tuners over the one kernel: forward and dX have different shapes and operand layouts,
# so each keeps its own (M, N, K) → config cache.
_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_SIZE_M")
_fwd_kernel = configs.autotune("masked_matmul", *_TILE_NAMES, key=["M_BUCKET", "N", "K"])(_masked_mm_kernel)
_dx_kernel = configs.autotune("masked_matmul_dx", *_TILE_NAMES, key=["M_BUCKET", "N", "K"])(_masked_mm_kernel)


def _launch(tuner, a: Tensor, w_kn_strides, weight: Tensor, scores: Tensor, s_kn_strides,
            out: Tensor, K: int, t_l, bias=None, bias_scores=None) -> Tensor:
    M, N = out.shape
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    tuner[grid](
        a, weight, scores,
        bias if bias is not None else scores,            # never read when HAS_BIAS is False
        bias_scores if bias_scores is not None else scores,
        out,
        M, N, K, configs.m_bucket(M),
        a.stride(0), a.stride(1),
        *w_kn_strides, *s_kn_strides,
        out.stride(0), out.stride(1),
        float(t_l) if t_l is not None else 0.0,
        HARD=t_l is None, HAS_BIAS=bias is not None, HAS_BIAS_SCORES=bias_scores is not None,
        INPUT_PRECISION=configs.input_precision(a.dtype),
    )
    return out


def masked_matmul(
    x2d: Tensor,
    weight: Tensor,
    scores: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    t_l: Optional[float] = None,
) -> Tensor:
    """``y = x2d·(W⊙M)ᵀ + b⊙m_b`` → ``[M, N]`` in ``x2d.dtype`` (see :func:`abp.reference.masked_linear_fwd`).

    ``x2d`` [M, K] and ``weight`` [N, K] in one of fp32/fp16/bf16, ``scores`` fp32 [N, K];
    ``bias`` [N] (weight dtype) and ``bias_scores`` fp32 [N] optional (the latter needs the former).
    ``t_l=None`` → mask ``1[θ>0]``; a finite float → ``σ(t_l·θ)``.
    """
    check_tensor("x2d", x2d, ndim=2, dtypes=ACTIVATION_DTYPES)
    check_weight_and_scores(weight, scores, x2d.dtype)
    M, K = x2d.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"x2d is [M, K]=[{M}, {K}] but weight is {tuple(weight.shape)}, expected [N, {K}]")
    check_bias(bias, bias_scores, N, weight.dtype)
    check_temperature("t_l", t_l, allow_none=True)
    check_device(x2d=x2d, weight=weight, scores=scores, bias=bias, bias_scores=bias_scores)

    x2d, weight, scores = x2d.contiguous(), weight.contiguous(), scores.contiguous()
    bias = bias.contiguous() if bias is not None else None
    bias_scores = bias_scores.contiguous() if bias_scores is not None else None
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    # B[k, n] = W[n, k]: the weight read transposed through its strides.
    return _launch(_fwd_kernel, x2d, (weight.stride(1), weight.stride(0)), weight, scores,
                   (scores.stride(1), scores.stride(0)), out, K, t_l, bias, bias_scores)


def masked_matmul_dx(dy2d: Tensor, weight: Tensor, scores: Tensor, t_l: Optional[float] = None) -> Tensor:
    """``dX = dy2d·(W⊙M)`` → ``[M, K]`` in ``dy2d.dtype`` (see :func:`abp.reference.masked_linear_dx`).

    ``dy2d`` [M, N] and ``weight`` [N, K] in one dtype, ``scores`` fp32 [N, K]; ``t_l`` as in
    :func:`masked_matmul` (the forward's mask, not the backward surrogate).
    """
    check_tensor("dy2d", dy2d, ndim=2, dtypes=ACTIVATION_DTYPES)
    check_weight_and_scores(weight, scores, dy2d.dtype)
    M, N = dy2d.shape
    if weight.shape[0] != N:
        raise ValueError(f"dy2d is [M, N]=[{M}, {N}] but weight is {tuple(weight.shape)}, expected [{N}, K]")
    K = weight.shape[1]
    check_temperature("t_l", t_l, allow_none=True)
    check_device(dy2d=dy2d, weight=weight, scores=scores)

    dy2d, weight, scores = dy2d.contiguous(), weight.contiguous(), scores.contiguous()
    out = torch.empty((M, K), dtype=dy2d.dtype, device=dy2d.device)
    # Generic kernel sizes: out [M, K], reduction over N; B[n, k] = W[n, k] read as stored.
    return _launch(_dx_kernel, dy2d, (weight.stride(0), weight.stride(1)), weight, scores,
                   (scores.stride(0), scores.stride(1)), out, N, t_l)
