"""Matmuls through a 1-bit mask: ``y = x·(W⊙M)ᵀ + b``, ``dX = dY·(W⊙M)``, and many masks over one ``W``.

The mask comes as packed bits, in the layout of :func:`abp.reference.pack_mask` (also that of
abp's mask files and of the CUDA serving kernel): the bool mask of the ``[N, K]`` weight,
flattened row-major, element ``i = n·K + k`` stored as bit ``i & 7`` of byte ``i >> 3`` of a flat
uint8 tensor of ``ceil(N·K/8)`` bytes, little-endian within a byte. One layout serves training,
serving and files; nothing is unpacked in memory.

Design. One ``@triton.jit`` kernel, :func:`_bitmask_mm_kernel`, modelled on
:func:`abp.kernels.masked_matmul._masked_mm_kernel`: it computes ``out[M, N'] = A[M, K'] @ B[K', N']``
where ``B`` is the weight seen through its strides (``Wᵀ`` for the forward, ``W`` itself for dX).
The mask bit of ``B[kk, nn]`` is found through "bit strides" the same way: its flat bit index is
``kk·bit_stride_k + nn·bit_stride_n``, ``(1, K_w)`` for the forward and ``(K_w, 1)`` for dX
(``K_w`` = the weight's column count). Per K step the program loads the ``A`` tile, the weight
tile and, per weight element, the byte holding its bit (``byte = idx >> 3``,
``bit = (byte >> (idx & 7)) & 1``), forms ``where(bit, w, 0)`` in registers and calls ``tl.dot``
with an fp32 accumulator. Bias (already masked by the caller) is added in the epilogue. Tiling
and tails are v1's: ``GROUP_SIZE_M`` swizzle, row/column indices wrapped modulo the size, the K
tail load-masked, masked store. The bit index is formed from the K coordinate clamped to the
last valid one, so it never exceeds ``N·K − 1`` (int32 is enough for any accepted weight, and
the byte gather needs no load mask).

Bytes per weight read: ``2 + 1/8`` for a 16-bit weight (the weight and its bit), against
``2 + 4`` in v1, which reads the fp32 score of every weight. At few tokens the forward is
bound by those bytes, so v2 reads ~2.8× less there; at many tokens it is compute-bound either way.

Why a per-element byte gather and not a ``[rows, BLOCK_K/8]`` byte tile expanded with shifts and
``tl.reshape`` (possible when ``K % 8 == 0``, so that every weight row starts on a byte): the
gather is correct for every shape (odd ``K`` included) with one code path; it moves the same
DRAM/L2 bytes (the eight lanes that read one byte are served by one transaction); and the byte
tile is not copied asynchronously either (a compiled prototype also converts its register layout
in the loop before the ``[.., 8, ..] → [..]`` expansion). Two constexpr paths would double what
has to be tested and compiled (the compile gate builds one launch per kernel, at ``K = 768``, so
the odd-``K`` path would go unchecked) for a gain no GPU has measured. What the gather costs: one
load instruction per weight element (32 per thread per K step at 128×128×64 with 8 warps, against
4 for a byte tile), and 1-byte loads cannot become ``cp.async`` copies (those move 4, 8 or 16
bytes), so the bit loads are plain loads in the loop while ``A`` and ``W`` are pipelined. NOTES.md
has the compiled figures; measuring the two on a GPU comes first.

The masked weight as the MMA's left operand (``operand="a"``, ``ABP_BITMASK_OPERAND=a``): with the
constexpr ``MASKED_LEFT`` the same kernel computes the same ``out`` through ``outᵀ[N', M] = Bᵀ[N',
K'] @ Aᵀ[K', M]`` (:func:`_bitmask_dot_t`): it loads the weight tile as ``[BLOCK_N, BLOCK_K]``,
masks it in registers and passes it as ``tl.dot``'s first operand, with ``Aᵀ`` as the second, and
transposes the ``[BLOCK_N, BLOCK_M]`` accumulator back before the epilogue. Why: Hopper's ``wgmma``
reads its right operand only from shared memory, so with the masked tile on the right (the default
form) Triton writes the tile it just masked in registers back to shared memory at every K step
before the MMA can read it; its left operand may come from registers. Compiled for sm_90a (bf16,
128×128×64, 4 stages, 8 warps, Triton 3.9): the default form's ``wgmma`` takes both operands as
shared-memory descriptors and its PTX has 40 ``st.shared``; this one's takes the masked tile as four
registers per thread and has 4, at the same 128 KiB of shared memory (165 against 175 registers). A
second gain at few tokens: the MMA's row dimension becomes the weight's ``BLOCK_N`` (≥ 64 in every
Hopper tile), so a 16-token tile still issues ``wgmma`` (``m64n16k16``) where the default form falls
back to ``mma.sync`` below 64 rows. The cost: ``A`` is read transposed and the accumulator
transposed back once per tile (a layout conversion through shared memory). Not timed on a GPU yet;
``bench/bench_linear.py`` (``abp_v2_a``) and ``bench/bench_bitmask.py`` (``abp_gemm_a``) measure it.
The multi-task kernel below takes the same constexpr.

Many tasks over one base weight (:func:`multi_bitmask_matmul`): a second kernel,
:func:`_multi_bitmask_mm_kernel`, sharing the K loop (:func:`_bitmask_dot`) and the masked B
tile (:func:`_masked_b_tile`). Rows are sorted by task on the device (stable), and per-task row
counts and their exclusive prefix sum are computed there too. The grid has
``cdiv(M, BLOCK_M) + T`` row-tile slots (an upper bound of ``Σ_t cdiv(count_t, BLOCK_M)``) times
the column tiles; each program finds its task by scanning the ``T`` tasks' tile counts, exits if
its slot is past the last tile, gathers its ``A`` rows through the sort permutation, reads the mask
``packed2d[task]`` and scatters its output rows back through the permutation. One launch for any
number of tasks, which share ``W``'s tiles through L2.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import configs
from .masked_matmul import ACTIVATION_DTYPES, check_device, check_tensor, tile_coords

Tensor = torch.Tensor
INDEX_DTYPES = (torch.int64, torch.int32)


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------
def packed_bytes(n: int, k: int) -> int:
    """Bytes of the packed mask of an ``[n, k]`` weight: ``ceil(n·k/8)``."""
    return (n * k + 7) // 8


def _check_weight(weight: Tensor, act_dtype: torch.dtype) -> None:
    check_tensor("weight", weight, ndim=2, dtypes=(act_dtype,))


def _check_packed(name: str, packed, weight: Tensor, ndim: int) -> None:
    """``packed`` uint8, ``ndim``-D, its last dimension exactly ``ceil(N·K/8)`` bytes for ``weight``."""
    check_tensor(name, packed, ndim=ndim, dtypes=(torch.uint8,))
    n, k = weight.shape
    want = packed_bytes(n, k)
    if packed.shape[-1] != want:
        what = "" if ndim == 1 else f" per task (shape {tuple(packed.shape)})"
        raise ValueError(f"{name} must hold ceil(N*K/8) = {want} bytes{what} for a weight of shape "
                         f"{tuple(weight.shape)}, got {packed.shape[-1]}")


def _check_bias(bias: Optional[Tensor], n: int, dtype: torch.dtype) -> None:
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(dtype,), shape=(n,))


def check_task_ids(task_ids: Tensor, num_tasks: int) -> None:
    """Every task id in ``[0, num_tasks)``.

    Reads the ids' min and max back to the host: one device sync per call. Without the check an
    out-of-range id would index past ``packed2d`` on the GPU (the counting kernel's bounds assert
    or, inside the Triton kernel, a silent read of another tensor's memory).
    """
    if task_ids.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(task_ids)).tolist()
    if lo < 0 or hi >= num_tasks:
        raise ValueError(f"task_ids must be in [0, {num_tasks}) (packed2d holds {num_tasks} masks); "
                         f"got values from {lo} to {hi}")


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _masked_b_tile(w_ptrs, k_in, bits_ptr, bit_idx):
    """``where(bit, w, 0)`` for one ``[BLOCK_K, BLOCK_N]`` tile of ``B``, in the weight dtype.

    ``bit_idx`` holds each element's flat bit index (always a valid one: the caller clamps the
    K tail, whose weights ``k_in`` masks to 0).
    """
    w = tl.load(w_ptrs, mask=k_in, other=0.0)
    byte = tl.load(bits_ptr + (bit_idx >> 3)).to(tl.int32)
    bit = (byte >> (bit_idx & 7)) & 1
    return tl.where(bit != 0, w, tl.zeros_like(w))


@triton.jit
def _bitmask_dot(a_ptrs, w_ptrs, bits_ptr, bit_cols, K, stride_ak, stride_wk, bit_stride_k,
                 INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``Σ_k A[:, k] · (W⊙M)[k, :]`` over the whole reduction, fp32 ``[BLOCK_M, BLOCK_N]``.

    ``a_ptrs`` [BLOCK_M, BLOCK_K] and ``w_ptrs`` [BLOCK_K, BLOCK_N] point at the first K step;
    ``bit_cols`` [BLOCK_N] is ``nn·bit_stride_n`` of the tile's columns.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        # K tail: the bit index of the last valid K row (never past N·K − 1, so int32 holds it)
        kk = tl.minimum(kt * BLOCK_K + offs_k, K - 1)
        bit_idx = kk[:, None] * bit_stride_k + bit_cols[None, :]
        wm = _masked_b_tile(w_ptrs, offs_k[:, None] < k_left, bits_ptr, bit_idx)
        acc = tl.dot(a, wm.to(a.dtype), acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def _bitmask_dot_t(at_ptrs, wt_ptrs, bits_ptr, bit_rows, K, stride_ak, stride_wk, bit_stride_k,
                   INPUT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`_bitmask_dot` transposed, with the masked weight as the MMA's left operand:
    ``Σ_k (W⊙M)ᵀ[:, k] · Aᵀ[k, :]``, fp32 ``[BLOCK_N, BLOCK_M]``.

    ``at_ptrs`` [BLOCK_K, BLOCK_M] (``A`` read transposed) and ``wt_ptrs`` [BLOCK_N, BLOCK_K] (``B``
    read transposed) point at the first K step; ``bit_rows`` [BLOCK_N] is ``nn·bit_stride_n``.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for kt in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - kt * BLOCK_K
        at = tl.load(at_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        kk = tl.minimum(kt * BLOCK_K + offs_k, K - 1)  # K tail clamped, as in _bitmask_dot
        bit_idx = bit_rows[:, None] + kk[None, :] * bit_stride_k
        wm = _masked_b_tile(wt_ptrs, offs_k[None, :] < k_left, bits_ptr, bit_idx)
        acc = tl.dot(wm.to(at.dtype), at, acc, input_precision=INPUT_PRECISION)
        at_ptrs += BLOCK_K * stride_ak
        wt_ptrs += BLOCK_K * stride_wk
    return acc


# ----------------------------------------------------------------------------------------------
# the kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bitmask_mm_kernel(
    # pointers
    a_ptr, w_ptr, bits_ptr, b_ptr, out_ptr,
    # sizes: out[M, N] = A[M, K] @ (W⊙M viewed as [K, N]); M_BUCKET is the tuning key only
    M, N, K, M_BUCKET,
    # strides (element strides of A, W viewed as B, out; bit strides of B in the packed mask)
    stride_am, stride_ak,
    stride_wk, stride_wn,
    bit_stride_k, bit_stride_n,
    stride_om, stride_on,
    # meta-parameters (MASKED_LEFT: the masked weight as the MMA's left operand, see "operand a" above)
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASKED_LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    pid_m, pid_n = tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Wrapped indices: tail rows/cols re-read valid memory and are dropped at the store.
    offs_m = rows % M
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    if MASKED_LEFT:  # outᵀ = Bᵀ·Aᵀ: both tiles read transposed, the accumulator transposed back
        at_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_m[None, :] * stride_am
        wt_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.trans(_bitmask_dot_t(at_ptrs, wt_ptrs, bits_ptr, offs_n * bit_stride_n, K, stride_ak, stride_wk,
                                      bit_stride_k, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K))
    else:
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = _bitmask_dot(a_ptrs, w_ptrs, bits_ptr, offs_n * bit_stride_n, K, stride_ak, stride_wk, bit_stride_k,
                           INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _multi_bitmask_mm_kernel(
    # pointers: A rows in task order through order_ptr; counts/starts per task (int32)
    a_ptr, w_ptr, bits_ptr, b_ptr, out_ptr, order_ptr, counts_ptr, starts_ptr,
    # sizes: out[M, N] = A[M, K] @ (W⊙M_task(row))ᵀ; T tasks; M_BUCKET is the tuning key only
    M, N, K, T, M_BUCKET,
    stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_bt,  # bytes between two tasks' masks in packed2d
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASKED_LEFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
):
    n_slots = tl.cdiv(M, BLOCK_M) + T
    slot, pid_n = tile_coords(tl.program_id(0), n_slots * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_SIZE_M)
    # Which task's row tiles this slot falls in: task t owns slots [Σ_{s<t} tiles_s, Σ_{s≤t} tiles_s).
    task = tl.full((), -1, tl.int32)
    local = tl.full((), 0, tl.int32)
    first = tl.full((), 0, tl.int32)
    for t in range(0, T):
        tiles = tl.cdiv(tl.load(counts_ptr + t), BLOCK_M)
        hit = (slot >= first) & (slot < first + tiles)
        task = tl.where(hit, t, task)
        local = tl.where(hit, slot - first, local)
        first += tiles
    if task < 0:  # past the last tile (the grid is an upper bound)
        return

    count = tl.load(counts_ptr + task)
    start = tl.load(starts_ptr + task)
    r = local * BLOCK_M + tl.arange(0, BLOCK_M)  # row within the task
    row_ok = r < count
    src = tl.load(order_ptr + start + r % count)  # original row; tail rows wrap to the task's own
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    # B[k, n] = W[n, k]; its bit is n·K + k: bit strides (1, K)
    if MASKED_LEFT:
        at_ptrs = a_ptr + offs_k[:, None] * stride_ak + src[None, :] * stride_am
        wt_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        acc = tl.trans(_bitmask_dot_t(at_ptrs, wt_ptrs, bits_ptr + task * stride_bt, offs_n * K, K, stride_ak,
                                      stride_wk, 1, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K))
    else:
        a_ptrs = a_ptr + src[:, None] * stride_am + offs_k[None, :] * stride_ak
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        acc = _bitmask_dot(a_ptrs, w_ptrs, bits_ptr + task * stride_bt, offs_n * K, K, stride_ak, stride_wk, 1,
                           INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n).to(tl.float32)[None, :]
    out_ptrs = out_ptr + src[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


# Separate tuners over the kernels: forward, dX and multi-task see different shapes and operand
# layouts, so each keeps its own (M, N, K) → config cache and candidate set (configs.SPILLS).
_TILE_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_SIZE_M")
_KEY = ["M_BUCKET", "N", "K"]
_fwd_kernel = configs.autotune("bitmask_matmul", *_TILE_NAMES, key=_KEY)(_bitmask_mm_kernel)
_dx_kernel = configs.autotune("bitmask_matmul_dx", *_TILE_NAMES, key=_KEY)(_bitmask_mm_kernel)
_multi_kernel = configs.autotune("multi_bitmask_matmul", *_TILE_NAMES, key=_KEY)(_multi_bitmask_mm_kernel)
_fwd_t_kernel = configs.autotune("bitmask_matmul_t", *_TILE_NAMES, key=_KEY)(_bitmask_mm_kernel)
_dx_t_kernel = configs.autotune("bitmask_matmul_dx_t", *_TILE_NAMES, key=_KEY)(_bitmask_mm_kernel)
_multi_t_kernel = configs.autotune("multi_bitmask_matmul_t", *_TILE_NAMES, key=_KEY)(_multi_bitmask_mm_kernel)

#: Where the masked weight goes in the MMA (``ABP_BITMASK_OPERAND``, read at each call): ``b``, the default,
#: ``out = A·(W⊙M)ᵀ`` with the masked tile as the right operand; ``a``, ``outᵀ = (W⊙M)·Aᵀ`` with it as the
#: left operand (``MASKED_LEFT``), which Hopper's ``wgmma`` can read from registers. Each form has its own tuners
#: (``*_t``: their tiles spill differently). The default stays ``b`` until a GPU has timed the two side by side.
OPERANDS = ("b", "a")


def masked_operand(operand: Optional[str] = None) -> str:
    """``operand`` if given, else ``ABP_BITMASK_OPERAND`` (unset: ``b``); see :data:`OPERANDS`."""
    v = operand if operand is not None else (os.environ.get("ABP_BITMASK_OPERAND", "b").lower() or "b")
    if v not in OPERANDS:
        raise ValueError(f"the masked operand (ABP_BITMASK_OPERAND or operand=) must be one of "
                         f"{', '.join(OPERANDS)}, got {v!r}")
    return v


def _launch(tuners: tuple, left: bool, a: Tensor, weight: Tensor, w_kn_strides, packed: Tensor, bit_kn_strides,
            out: Tensor, K: int, bias: Optional[Tensor] = None) -> Tensor:
    """Launch ``_bitmask_mm_kernel`` through ``tuners[left]``: (the default form's tuner, ``MASKED_LEFT``'s)."""
    M, N = out.shape
    if out.numel() == 0:
        return out

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    tuners[left][grid](
        a, weight, packed,
        bias if bias is not None else weight,  # never read when HAS_BIAS is False
        out,
        M, N, K, configs.m_bucket(M),
        a.stride(0), a.stride(1),
        *w_kn_strides, *bit_kn_strides,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=configs.input_precision(a.dtype),
        MASKED_LEFT=left,
    )
    return out


# ----------------------------------------------------------------------------------------------
# public functions
# ----------------------------------------------------------------------------------------------
def _check_input_and_weight(x2d: Tensor, weight: Tensor) -> tuple[int, int, int]:
    """``x2d`` [M, K] and ``weight`` [N, K] in one activation dtype → ``(M, N, K)``."""
    check_tensor("x2d", x2d, ndim=2, dtypes=ACTIVATION_DTYPES)
    _check_weight(weight, x2d.dtype)
    M, K = x2d.shape
    N = weight.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"x2d is [M, K]=[{M}, {K}] but weight is {tuple(weight.shape)}, expected [N, {K}]")
    return M, N, K


def bitmask_matmul(x2d: Tensor, weight: Tensor, packed: Tensor, bias: Optional[Tensor] = None, *,
                   operand: Optional[str] = None) -> Tensor:
    """``y = x2d·(W⊙unpack(packed))ᵀ + bias`` → ``[M, N]`` in ``x2d.dtype`` (:func:`abp.reference.bitmask_linear`).

    ``x2d`` [M, K] and ``weight`` [N, K] in one of fp32/fp16/bf16; ``packed`` uint8 1-D of
    ``ceil(N·K/8)`` bytes (:func:`abp.reference.pack_mask` of the ``[N, K]`` bool mask);
    ``bias`` [N] in the weight dtype, added as given (mask it first if it has a mask).
    Training forward and serving at any token count. ``operand``: where the masked weight goes in the
    MMA, ``"b"`` or ``"a"`` (:func:`masked_operand`; None: ``ABP_BITMASK_OPERAND``).
    """
    left = masked_operand(operand) == "a"
    M, N, K = _check_input_and_weight(x2d, weight)
    _check_packed("packed", packed, weight, ndim=1)
    _check_bias(bias, N, weight.dtype)
    check_device(x2d=x2d, weight=weight, packed=packed, bias=bias)

    x2d, weight, packed = x2d.contiguous(), weight.contiguous(), packed.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    # B[k, n] = W[n, k]: the weight read transposed through its strides; its bit is n·K + k.
    return _launch((_fwd_kernel, _fwd_t_kernel), left, x2d, weight, (weight.stride(1), weight.stride(0)), packed,
                   (1, K), out, K, bias)


def bitmask_matmul_dx(dy2d: Tensor, weight: Tensor, packed: Tensor, *, operand: Optional[str] = None) -> Tensor:
    """``dX = dy2d·(W⊙unpack(packed))`` → ``[M, K]`` in ``dy2d.dtype``.

    ``dy2d`` [M, N] and ``weight`` [N, K] in one dtype; ``packed`` and ``operand`` as in :func:`bitmask_matmul`.
    """
    left = masked_operand(operand) == "a"
    check_tensor("dy2d", dy2d, ndim=2, dtypes=ACTIVATION_DTYPES)
    _check_weight(weight, dy2d.dtype)
    M, N = dy2d.shape
    if weight.shape[0] != N:
        raise ValueError(f"dy2d is [M, N]=[{M}, {N}] but weight is {tuple(weight.shape)}, expected [{N}, K]")
    K = weight.shape[1]
    _check_packed("packed", packed, weight, ndim=1)
    check_device(dy2d=dy2d, weight=weight, packed=packed)

    dy2d, weight, packed = dy2d.contiguous(), weight.contiguous(), packed.contiguous()
    out = torch.empty((M, K), dtype=dy2d.dtype, device=dy2d.device)
    # Generic kernel sizes: out [M, K], reduction over N; B[n, k] = W[n, k] as stored, bit n·K + k.
    return _launch((_dx_kernel, _dx_t_kernel), left, dy2d, weight, (weight.stride(0), weight.stride(1)), packed, (K, 1),
                   out, N)


def multi_bitmask_matmul(x2d: Tensor, weight: Tensor, packed2d: Tensor, task_ids: Tensor,
                         bias: Optional[Tensor] = None, *, check_ids: bool = True,
                         operand: Optional[str] = None) -> Tensor:
    """Row ``i``: ``y[i] = x2d[i]·(W⊙unpack(packed2d[task_ids[i]]))ᵀ + bias`` → ``[M, N]``, one launch.

    Serving several task masks over one base weight (:func:`abp.reference.multi_bitmask_linear`).
    ``x2d``, ``weight``, ``bias`` as in :func:`bitmask_matmul`; ``packed2d`` uint8 ``[T, ceil(N·K/8)]``
    (one packed mask per task); ``task_ids`` int64 (or int32) ``[M]`` with values in ``[0, T)``,
    in any order. Checking that range reads two numbers back to the host (one sync per call);
    ``check_ids=False`` skips it for callers that checked the ids already (``abp.multi_bitmask_linear``
    checks once; a :class:`abp.MultiTaskModel` once per batch, not once per layer). ``operand`` as in
    :func:`bitmask_matmul`.
    """
    left = masked_operand(operand) == "a"
    M, N, K = _check_input_and_weight(x2d, weight)
    _check_packed("packed2d", packed2d, weight, ndim=2)
    check_tensor("task_ids", task_ids, ndim=1, dtypes=INDEX_DTYPES, shape=(M,))
    _check_bias(bias, N, weight.dtype)
    check_device(x2d=x2d, weight=weight, packed2d=packed2d, task_ids=task_ids, bias=bias)
    T = packed2d.shape[0]
    if check_ids:
        check_task_ids(task_ids, T)

    out = torch.empty((M, N), dtype=x2d.dtype, device=x2d.device)
    if out.numel() == 0:
        return out
    x2d, weight, packed2d = x2d.contiguous(), weight.contiguous(), packed2d.contiguous()
    bias = bias.contiguous() if bias is not None else None
    # Rows grouped by task (stable: rows of one task keep their order), rows per task and where
    # each task's rows start in that order: all on the device, no sync.
    order = torch.argsort(task_ids, stable=True).to(torch.int32)
    counts = torch.zeros(T, dtype=torch.int32, device=x2d.device)
    counts.index_add_(0, task_ids, torch.ones(M, dtype=torch.int32, device=x2d.device))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts

    def grid(meta):
        # Σ_t cdiv(count_t, BLOCK_M) ≤ cdiv(M, BLOCK_M) + T row-tile slots; the extra ones exit at once.
        return ((triton.cdiv(M, meta["BLOCK_M"]) + T) * triton.cdiv(N, meta["BLOCK_N"]),)

    (_multi_t_kernel if left else _multi_kernel)[grid](
        x2d, weight, packed2d,
        bias if bias is not None else weight,  # never read when HAS_BIAS is False
        out, order, counts, starts,
        M, N, K, T, configs.m_bucket(M),
        x2d.stride(0), x2d.stride(1),
        weight.stride(0), weight.stride(1),
        packed2d.stride(0),
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, INPUT_PRECISION=configs.input_precision(x2d.dtype), MASKED_LEFT=left,
    )
    return out
