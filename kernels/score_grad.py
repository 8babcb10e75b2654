"""Score gradient ``dθ = (dYᵀX) ⊙ W ⊙ σ'`` with the dense ``dW`` never formed, and its fused SGD step.

One kernel, tiled over the ``[N, K]`` score matrix: each program accumulates its ``dYᵀX`` tile
over ``M`` in fp32 (``tl.dot``), then in the epilogue loads the matching ``W`` and ``θ`` tiles,
multiplies by ``W`` and the surrogate ``t_s·σ(t_s θ)(1−σ(t_s θ))`` and either stores ``dθ``
(:func:`score_grad`) or applies ``θ ← θ − active·(lr·dθ + γ)`` to ``θ`` in place
(:func:`score_grad_update_`), so that neither ``dW`` nor ``dθ`` is ever written to memory.

The in-place update is race-free: every score element belongs to exactly one output tile, and
every output tile to exactly one program, which reads ``θ`` and writes it back. Only the
count of ``θ ≤ 0`` is shared, and it is added with one ``tl.atomic_add`` per program.

Bias scores (``Σ_m dY ⊙ b ⊙ σ'``) are fused into the same launch as extra programs placed
*before* the tile programs: one per ``BLOCK_N`` column strip of ``dY``, summing it over ``M``
and ending in the same epilogue. Why fused rather than a separate kernel: there are only
``N/BLOCK_N`` such programs (e.g. 6 for N=768), far too few to fill a GPU on their own, so a
separate launch would be a serial latency of its own; as the first programs of the main
grid they run in its first wave beside the tile programs. Why not inside the tile loop: a
branch and a reduction in the ``tl.dot`` loop of the ``pid_k == 0`` tiles would sit in the
loop the software pipeliner has to overlap; kept apart, that loop stays a pure dot loop.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .masked_matmul import (
    ACTIVATION_DTYPES,
    check_bias,
    check_device,
    check_temperature,
    check_tensor,
    check_weight_and_scores,
    tile_coords,
)

Tensor = torch.Tensor


@triton.jit
def _score_epilogue(acc, w, theta_ptrs, out_ptrs, valid, gamma_ptr, active_ptr, count_ptr, lr, t_s,
                    UPDATE: tl.constexpr, RECOVERY: tl.constexpr):
    """``dθ = acc ⊙ w ⊙ σ'(θ)``; store it, or step ``θ`` in place and count ``θ ≤ 0``.

    Works on any tile shape (the 2-D weight tiles and the 1-D bias strips). The arithmetic
    order is that of :func:`abp.reference.score_grad` and :func:`abp.reference.score_update_`.
    """
    theta = tl.load(theta_ptrs, mask=valid, other=0.0)
    z = theta * t_s
    grad = acc * w.to(tl.float32) * (t_s * tl.sigmoid(z) * tl.sigmoid(-z))  # σ(−z), not 1−σ(z): no cancellation
    if UPDATE:
        gamma = tl.load(gamma_ptr)
        active = tl.load(active_ptr)
        new = theta - active * (lr * grad + gamma)
        if not RECOVERY:
            # No connection recovery: a score that was ≤ 0 stays ≤ 0.
            new = tl.where(theta <= 0.0, tl.minimum(new, 0.0), new)
        tl.store(theta_ptrs, new, mask=valid)
        n_off = tl.sum(((new <= 0.0) & valid).to(tl.int32))
        tl.atomic_add(count_ptr, n_off.to(tl.int64))
    else:
        tl.store(out_ptrs, grad, mask=valid)


@triton.jit
def _weight_score_program(
    pid, dy_ptr, x_ptr, w_ptr, s_ptr, out_ptr, gamma_ptr, active_ptr, counts_ptr,
    M, N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
    stride_on, stride_ok,
    lr, t_s,
    UPDATE: tl.constexpr, RECOVERY: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_SIZE_N: tl.constexpr,
):
    """One ``[BLOCK_N, BLOCK_K]`` tile of ``dθ``: ``dYᵀX`` over all of ``M``, then the epilogue."""
    pid_n, pid_k = tile_coords(pid, N, K, BLOCK_N, BLOCK_K, GROUP_SIZE_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    # Wrapped indices: only the M tail needs a load mask; the epilogue masks rows/cols.
    offs_n = rows % N
    offs_k = cols % K
    offs_m = tl.arange(0, BLOCK_M)
    dyt_ptrs = dy_ptr + offs_n[:, None] * stride_dyn + offs_m[None, :] * stride_dym   # dYᵀ tile [BN, BM]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk         # X tile [BM, BK]

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for mt in range(0, tl.cdiv(M, BLOCK_M)):
        m_left = M - mt * BLOCK_M
        dyt = tl.load(dyt_ptrs, mask=offs_m[None, :] < m_left, other=0.0)
        x = tl.load(x_ptrs, mask=offs_m[:, None] < m_left, other=0.0)
        acc = tl.dot(dyt, x, acc, input_precision=INPUT_PRECISION)
        dyt_ptrs += BLOCK_M * stride_dym
        x_ptrs += BLOCK_M * stride_xm

    valid = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk, mask=valid, other=0.0)
    _score_epilogue(acc, w,
                    s_ptr + rows[:, None] * stride_sn + cols[None, :] * stride_sk,
                    out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_ok,
                    valid, gamma_ptr, active_ptr, counts_ptr, lr, t_s, UPDATE, RECOVERY)


@triton.jit
def _bias_score_program(
    pid, dy_ptr, b_ptr, bs_ptr, bout_ptr, gamma_ptr, active_ptr, counts_ptr,
    M, N, stride_dym, stride_dyn, lr, t_s,
    UPDATE: tl.constexpr, RECOVERY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One ``BLOCK_N`` strip of the bias-score grad: ``Σ_m dY[m, n]``, then the epilogue."""
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = offs_n < N
    offs_m = tl.arange(0, BLOCK_M)
    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for mt in range(0, tl.cdiv(M, BLOCK_M)):
        m_left = M - mt * BLOCK_M
        dy = tl.load(dy_ptrs, mask=(offs_m[:, None] < m_left) & valid[None, :], other=0.0)
        acc += tl.sum(dy.to(tl.float32), axis=0)
        dy_ptrs += BLOCK_M * stride_dym
    b = tl.load(b_ptr + offs_n, mask=valid, other=0.0)
    _score_epilogue(acc, b, bs_ptr + offs_n, bout_ptr + offs_n, valid,
                    gamma_ptr, active_ptr, counts_ptr, lr, t_s, UPDATE, RECOVERY)


@triton.jit
def _score_grad_kernel(
    # pointers (out_ptr/bout_ptr unused when UPDATE; gamma/active/counts unused otherwise)
    dy_ptr, x_ptr, w_ptr, s_ptr, out_ptr,
    b_ptr, bs_ptr, bout_ptr,
    gamma_ptr, active_ptr, counts_ptr,
    # sizes: dθ[N, K] = dY[M, N]ᵀ @ X[M, K]; M_BUCKET is the tuning key only
    M, N, K, M_BUCKET,
    # strides (bias tensors are contiguous)
    stride_dym, stride_dyn, stride_xm, stride_xk,
    stride_wn, stride_wk, stride_sn, stride_sk, stride_on, stride_ok,
    lr, t_s,
    # meta-parameters
    HAS_BIAS_GRAD: tl.constexpr, UPDATE: tl.constexpr, RECOVERY: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_SIZE_N: tl.constexpr,
):
    pid = tl.program_id(0)
    if HAS_BIAS_GRAD:
        n_bias = tl.cdiv(N, BLOCK_N)
        if pid < n_bias:
            _bias_score_program(pid, dy_ptr, b_ptr, bs_ptr, bout_ptr, gamma_ptr, active_ptr, counts_ptr + 1,
                                M, N, stride_dym, stride_dyn, lr, t_s,
                                UPDATE, RECOVERY, BLOCK_N, BLOCK_M)
        else:
            _weight_score_program(pid - n_bias, dy_ptr, x_ptr, w_ptr, s_ptr, out_ptr,
                                  gamma_ptr, active_ptr, counts_ptr, M, N, K,
                                  stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                                  stride_sn, stride_sk, stride_on, stride_ok, lr, t_s,
                                  UPDATE, RECOVERY, INPUT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_M, GROUP_SIZE_N)
    else:
        _weight_score_program(pid, dy_ptr, x_ptr, w_ptr, s_ptr, out_ptr,
                              gamma_ptr, active_ptr, counts_ptr, M, N, K,
                              stride_dym, stride_dyn, stride_xm, stride_xk, stride_wn, stride_wk,
                              stride_sn, stride_sk, stride_on, stride_ok, lr, t_s,
                              UPDATE, RECOVERY, INPUT_PRECISION, BLOCK_N, BLOCK_K, BLOCK_M, GROUP_SIZE_N)


_TILE_NAMES = ("BLOCK_N", "BLOCK_K", "BLOCK_M", "GROUP_SIZE_N")
_grad_kernel = configs.autotune("score_grad", *_TILE_NAMES, key=["M_BUCKET", "N", "K"])(_score_grad_kernel)
# The update writes θ and the counts in place: restore them after each config the tuner tries.
_update_kernel = configs.autotune("score_grad_update", *_TILE_NAMES, key=["M_BUCKET", "N", "K"],
                                  restore_value=["s_ptr", "bs_ptr", "counts_ptr"])(_score_grad_kernel)


def _check_inputs(dy2d, x2d, weight, scores, bias, bias_scores, t_s) -> tuple[int, int, int]:
    check_tensor("x2d", x2d, ndim=2, dtypes=ACTIVATION_DTYPES)
    M, K = x2d.shape
    check_tensor("dy2d", dy2d, ndim=2, dtypes=(x2d.dtype,))
    if dy2d.shape[0] != M:
        raise ValueError(f"dy2d has {dy2d.shape[0]} rows but x2d has {M}")
    N = dy2d.shape[1]
    check_weight_and_scores(weight, scores, x2d.dtype)
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"weight must be [N, K]=[{N}, {K}] for dy2d [M, N] and x2d [M, K]; "
                         f"got {tuple(weight.shape)}")
    check_bias(bias, bias_scores, N, weight.dtype)
    check_temperature("t_s", t_s, allow_none=False)
    return M, N, K


def _launch(tuner, dy2d, x2d, weight, scores, out, bias, bias_scores, bias_out,
            gamma, active, counts, lr, t_s, update: bool, recovery: bool) -> None:
    M, K = x2d.shape
    N = dy2d.shape[1]
    has_bias_grad = bias_scores is not None

    def grid(meta):
        bias_programs = triton.cdiv(N, meta["BLOCK_N"]) if has_bias_grad else 0
        return (bias_programs + triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    if N == 0 or (K == 0 and not has_bias_grad):
        return  # nothing to compute (an empty grid is not launched)
    dummy = scores  # stands in for pointers the constexpr flags leave unread
    tuner[grid](
        dy2d, x2d, weight, scores, out if out is not None else dummy,
        bias if bias is not None else dummy,
        bias_scores if bias_scores is not None else dummy,
        bias_out if bias_out is not None else dummy,
        gamma if gamma is not None else dummy,
        active if active is not None else dummy,
        counts if counts is not None else dummy,
        M, N, K, configs.m_bucket(M),
        dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1), scores.stride(0), scores.stride(1),
        out.stride(0) if out is not None else 0, out.stride(1) if out is not None else 0,
        float(lr), float(t_s),
        HAS_BIAS_GRAD=has_bias_grad, UPDATE=update, RECOVERY=recovery,
        INPUT_PRECISION=configs.input_precision(x2d.dtype),
    )


def score_grad(
    dy2d: Tensor,
    x2d: Tensor,
    weight: Tensor,
    scores: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    t_s: float = 1.0,
) -> tuple[Tensor, Optional[Tensor]]:
    """``(dθ fp32 [N, K], dθ_b fp32 [N] or None)`` as :func:`abp.reference.score_grad`, without ``dW``.

    ``dy2d`` [M, N], ``x2d`` [M, K], ``weight`` [N, K] in one of fp32/fp16/bf16; ``scores`` fp32
    [N, K]; the bias-score grad is computed when ``bias_scores`` (fp32 [N]) is given, which needs
    ``bias`` [N].
    """
    M, N, K = _check_inputs(dy2d, x2d, weight, scores, bias, bias_scores, t_s)
    check_device(dy2d=dy2d, x2d=x2d, weight=weight, scores=scores, bias=bias, bias_scores=bias_scores)
    dy2d, x2d, weight, scores = dy2d.contiguous(), x2d.contiguous(), weight.contiguous(), scores.contiguous()
    bias = bias.contiguous() if bias is not None else None
    bias_scores = bias_scores.contiguous() if bias_scores is not None else None

    dscores = torch.empty((N, K), dtype=torch.float32, device=scores.device)
    dbias = torch.empty((N,), dtype=torch.float32, device=scores.device) if bias_scores is not None else None
    _launch(_grad_kernel, dy2d, x2d, weight, scores, dscores, bias, bias_scores, dbias,
            None, None, None, 0.0, t_s, update=False, recovery=True)
    return dscores, dbias


def _check_device_scalar(name: str, t, device: torch.device) -> None:
    """A one-element fp32 tensor on ``device`` (read by pointer in the kernel, never synced)."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.numel() != 1:
        got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 0-d (one-element) fp32 tensor, got {got}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (read by pointer in the kernel), got {t.device}")


def score_grad_update_(
    dy2d: Tensor,
    x2d: Tensor,
    weight: Tensor,
    scores: Tensor,
    *,
    lr: float,
    gamma: Tensor,
    active: Tensor,
    recovery: bool,
    counts: Tensor,
    bias: Optional[Tensor] = None,
    bias_scores: Optional[Tensor] = None,
    t_s: float = 1.0,
) -> None:
    """:func:`score_grad` then :func:`abp.reference.score_update_` on ``scores`` (and ``bias_scores``), fused.

    ``θ ← θ − active·(lr·dθ + γ)`` in place, with ``θ_new ≤ 0`` kept wherever ``θ_old ≤ 0`` when
    ``recovery`` is False; ``counts`` (int64 [2] on the device, zeroed by the caller) gets the
    number of ``θ_new ≤ 0`` added: ``counts[0]`` weight scores, ``counts[1]`` bias scores.
    ``gamma`` and ``active`` are one-element fp32 tensors on the device, read by the kernel so the
    caller never synchronises with the host; ``lr`` is a Python float. Neither ``dW`` nor ``dθ``
    is allocated. The score tensors must be contiguous (they are written in place).
    """
    M, N, K = _check_inputs(dy2d, x2d, weight, scores, bias, bias_scores, t_s)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr must be a Python float, got {type(lr).__name__}")
    if not isinstance(recovery, bool):
        raise ValueError(f"recovery must be a bool, got {type(recovery).__name__}")
    device = check_device(dy2d=dy2d, x2d=x2d, weight=weight, scores=scores, bias=bias, bias_scores=bias_scores)
    _check_device_scalar("gamma", gamma, device)
    _check_device_scalar("active", active, device)
    check_tensor("counts", counts, ndim=1, dtypes=(torch.int64,), shape=(2,))
    if counts.device != device:
        raise ValueError(f"counts must be on {device}, got {counts.device}")
    for name, t in (("scores", scores), ("bias_scores", bias_scores), ("counts", counts)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")

    dy2d, x2d, weight = dy2d.contiguous(), x2d.contiguous(), weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _launch(_update_kernel, dy2d, x2d, weight, scores, None, bias, bias_scores, None,
            gamma, active, counts, lr, t_s, update=True, recovery=recovery)
