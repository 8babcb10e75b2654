"""abp.kernels' 1-bit-mask matmuls (``bitmask_matmul``, ``bitmask_matmul_dx``, ``multi_bitmask_matmul``)
against float64 references built with abp.reference, on random data. The forward and dX run in both
forms, the masked weight as the MMA's right operand (``operand="b"``, the default) and as its left
(``"a"``, the ``_t`` kernels).

Where the kernels run (the Triton interpreter without CUDA), the accuracy rule and the poisoned outputs:
tests/kernel_cases.py.

The masks are packed with :func:`abp.reference.pack_mask`; sizes 1, 7, 33, 97, 130 put every
dimension against the interpreter's 32-tiles, and K = 1, 7, 33, 130 are not multiples of 8, so a
weight row's bits start mid-byte.
"""
from __future__ import annotations

import pytest
import torch

from abp import reference as R
from kernel_cases import (CUDA, DEVICE, DTYPES, K, _gen, assert_accurate, f64, needs_fresh_process, needs_kernels,
                          randn, rerun_in_fresh_process, scores_with_density, shape_id)

pytestmark = pytest.mark.usefixtures("poisoned_empty", "one_config_for_small_shapes")

# (M, N, K): then 0 in every role (no tokens, no outputs, no inputs: y is the bias alone).
SHAPES = [(1, 7, 33), (7, 33, 1), (33, 1, 7), (97, 130, 33), (130, 97, 130), (0, 7, 33), (7, 0, 33), (7, 33, 0)]
OPERANDS = ("b", "a")
# another device than the kernels', for the device checks
OTHER_DEVICE = torch.device("cpu" if CUDA else "meta")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def mask_with_density(shape, density: float, gen) -> torch.Tensor:
    return torch.rand(shape, generator=gen).to(DEVICE) < density


def masked_dx_f64(dy, w, packed):
    """float64 ``dY·(W⊙unpack(packed))``."""
    m = R.unpack_mask(packed, w.numel()).view_as(w)
    return dy.double() @ (w.double() * m.double())


def masked_dx_torch(dy, w, packed):
    """The same in the inputs' dtype: torch's own error, the yardstick of the accuracy rule."""
    m = R.unpack_mask(packed, w.numel()).view_as(w)
    return dy @ (w * m.to(w.dtype))


# ----------------------------------------------------------------------------------------------
# forward and dX
# ----------------------------------------------------------------------------------------------
FWD_CASES = [(0.5, True), (0.0, True), (1.0, False)]  # (mask density, bias)


@needs_kernels
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: f"d{c[0]}-{'bias' if c[1] else 'nobias'}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bitmask_matmul(shape, dtype, case, operand):
    density, with_bias = case
    M, N, Kd = shape
    gen = _gen("fwd", shape, str(dtype), case)
    x, w = randn((M, Kd), dtype, gen), randn((N, Kd), dtype, gen)
    b = randn((N,), dtype, gen) if with_bias else None
    packed = R.pack_mask(mask_with_density((N, Kd), density, gen))
    y = K.bitmask_matmul(x, w, packed, b, operand=operand)
    assert y.dtype == dtype
    ref = R.bitmask_linear(*f64(x, w), packed, None if b is None else b.double())
    assert_accurate(y, ref, R.bitmask_linear(x, w, packed, b), "y")


@needs_kernels
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_bitmask_matmul_dx(shape, dtype, density, operand):
    M, N, Kd = shape
    gen = _gen("dx", shape, str(dtype), density)
    dy, w = randn((M, N), dtype, gen), randn((N, Kd), dtype, gen)
    packed = R.pack_mask(mask_with_density((N, Kd), density, gen))
    dx = K.bitmask_matmul_dx(dy, w, packed, operand=operand)
    assert dx.dtype == dtype
    assert_accurate(dx, masked_dx_f64(dy, w, packed), masked_dx_torch(dy, w, packed), "dx")


@needs_kernels
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(97, 130, 33), (33, 7, 130)], ids=shape_id)
def test_agrees_with_v1_hard_mask(shape, dtype, operand):
    """The packed bits of ``θ > 0`` give what v1 gives from ``θ`` itself with ``t_l=None`` (forward and
    dX): each within the accuracy rule, with v1's error as the yardstick."""
    M, N, Kd = shape
    gen = _gen("v1", shape, str(dtype))
    x, w = randn((M, Kd), dtype, gen), randn((N, Kd), dtype, gen)
    dy, b = randn((M, N), dtype, gen), randn((N,), dtype, gen)
    s = scores_with_density((N, Kd), 0.5, gen)
    packed = R.pack_mask(s > 0)
    ref = R.masked_linear_fwd(*f64(x, w, s, b))
    assert_accurate(K.bitmask_matmul(x, w, packed, b, operand=operand), ref, K.masked_matmul(x, w, s, b, t_l=None),
                    "y vs v1")
    assert_accurate(K.bitmask_matmul_dx(dy, w, packed, operand=operand), R.masked_linear_dx(*f64(dy, w, s)),
                    K.masked_matmul_dx(dy, w, s, t_l=None), "dx vs v1")


@needs_kernels
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype, operand):
    """Transposed views of x, dY and W, and a strided view of the packed bytes, give what contiguous ones do."""
    M, N, Kd = 33, 40, 19
    gen = _gen("noncontig", str(dtype))
    x, w, dy = randn((Kd, M), dtype, gen).t(), randn((Kd, N), dtype, gen).t(), randn((N, M), dtype, gen).t()
    packed = R.pack_mask(mask_with_density((N, Kd), 0.5, gen))
    spread = torch.zeros(2 * packed.numel(), dtype=torch.uint8, device=DEVICE)
    spread[::2] = packed
    strided = spread[::2]
    assert not (x.is_contiguous() or w.is_contiguous() or dy.is_contiguous() or strided.is_contiguous())
    assert_accurate(K.bitmask_matmul(x, w, strided, operand=operand), R.bitmask_linear(*f64(x, w), packed),
                    R.bitmask_linear(x, w, packed), "y")
    assert_accurate(K.bitmask_matmul_dx(dy, w, strided, operand=operand), masked_dx_f64(dy, w, packed),
                    masked_dx_torch(dy, w, packed), "dx")


# ----------------------------------------------------------------------------------------------
# many tasks over one weight
# ----------------------------------------------------------------------------------------------
def task_ids_with_counts(counts, gen) -> torch.Tensor:
    """int64 task ids, ``counts[t]`` rows of task ``t``, in a random (unsorted) order."""
    ids = torch.cat([torch.full((c,), t, dtype=torch.int64) for t, c in enumerate(counts)])
    return ids[torch.randperm(ids.numel(), generator=gen)].to(DEVICE)


# (M, N, K) and rows per task: a task with no rows, a task spanning several 32-row tiles, one row alone
MULTI_CASES = [
    ((97, 130, 33), (50, 0, 40, 7)),
    ((40, 7, 130), (0, 1, 39)),
    ((7, 33, 1), (7,)),
    ((1, 7, 33), (0, 0, 1)),
]


@needs_kernels
@pytest.mark.parametrize("operand", OPERANDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", MULTI_CASES, ids=lambda c: f"{shape_id(c[0])}-tasks{len(c[1])}")
def test_multi_bitmask_matmul(case, dtype, with_bias, operand):
    (M, N, Kd), counts = case
    assert sum(counts) == M
    T = len(counts)
    gen = _gen("multi", case, str(dtype), with_bias)
    x, w = randn((M, Kd), dtype, gen), randn((N, Kd), dtype, gen)
    b = randn((N,), dtype, gen) if with_bias else None
    densities = [(0.5, 0.0, 1.0, 0.3)[t % 4] for t in range(T)]
    packed2d = torch.stack([R.pack_mask(mask_with_density((N, Kd), d, gen)) for d in densities])
    task_ids = task_ids_with_counts(counts, gen)
    if T > 1 and M > 1:
        assert not bool((task_ids[1:] >= task_ids[:-1]).all()), "test precondition: unsorted task ids"
    y = K.multi_bitmask_matmul(x, w, packed2d, task_ids, b, operand=operand)
    assert y.dtype == dtype
    ref = R.multi_bitmask_linear(*f64(x, w), packed2d, task_ids, None if b is None else b.double())
    assert_accurate(y, ref, R.multi_bitmask_linear(x, w, packed2d, task_ids, b), "y")


@needs_kernels
def test_multi_matches_single_task_rows():
    """Each row of the multi-task output is, to the rule, that row through its own task's ``bitmask_matmul``,
    and int32 task ids give the same output as int64 ones."""
    M, N, Kd, T = 45, 20, 24, 3
    gen = _gen("multi vs single")
    x, w, b = randn((M, Kd), torch.float32, gen), randn((N, Kd), torch.float32, gen), randn((N,), torch.float32, gen)
    packed2d = torch.stack([R.pack_mask(mask_with_density((N, Kd), 0.5, gen)) for _ in range(T)])
    task_ids = task_ids_with_counts((20, 0, 25), gen)
    y = K.multi_bitmask_matmul(x, w, packed2d, task_ids, b)
    for t in range(T):
        rows = (task_ids == t).nonzero().squeeze(1)
        single = K.bitmask_matmul(x[rows], w, packed2d[t], b)
        ref = R.bitmask_linear(*f64(x[rows], w), packed2d[t], b.double())
        assert_accurate(y[rows], ref, single, f"task {t}")
    assert torch.equal(K.multi_bitmask_matmul(x, w, packed2d, task_ids.int(), b), y)


@needs_kernels
def test_multi_empty():
    """No rows (with or without tasks), no output columns, no inputs (y is the bias alone)."""
    w = torch.ones(5, 9, device=DEVICE)
    for T in (0, 3):
        y = K.multi_bitmask_matmul(torch.ones(0, 9, device=DEVICE), w,
                                   torch.zeros(T, 6, dtype=torch.uint8, device=DEVICE),
                                   torch.zeros(0, dtype=torch.int64, device=DEVICE))
        assert y.shape == (0, 5)
    ids = torch.tensor([1, 0, 1], device=DEVICE)
    y = K.multi_bitmask_matmul(torch.ones(3, 9, device=DEVICE), torch.ones(0, 9, device=DEVICE),
                               torch.zeros(2, 0, dtype=torch.uint8, device=DEVICE), ids)
    assert y.shape == (3, 0)
    b = torch.arange(5.0, device=DEVICE)
    y = K.multi_bitmask_matmul(torch.ones(3, 0, device=DEVICE), torch.ones(5, 0, device=DEVICE),
                               torch.zeros(2, 0, dtype=torch.uint8, device=DEVICE), ids, b)
    assert torch.equal(y, b.expand(3, 5))


# ----------------------------------------------------------------------------------------------
# errors, availability
# ----------------------------------------------------------------------------------------------
def _bad_calls():
    f16 = torch.float16

    def ones(*shape, dtype=torch.float32):
        return torch.ones(*shape, dtype=dtype, device=DEVICE)

    x, w, dy, b = ones(4, 9), ones(5, 9), ones(4, 5), ones(5)
    p = ones(6, dtype=torch.uint8)  # ceil(5·9/8) = 6 bytes
    p2 = ones(3, 6, dtype=torch.uint8)
    ids = torch.tensor([0, 2, 1, 2], device=DEVICE)
    return [
        ("packed short", ValueError, lambda: K.bitmask_matmul(x, w, p[:5]),
         r"packed must hold ceil\(N\*K/8\) = 6 bytes"),
        ("packed long", ValueError, lambda: K.bitmask_matmul_dx(dy, w, ones(7, dtype=torch.uint8)), "= 6 bytes"),
        ("packed int8", TypeError, lambda: K.bitmask_matmul(x, w, p.to(torch.int8)), "packed must have dtype uint8"),
        ("packed bool", TypeError, lambda: K.bitmask_matmul(x, w, torch.ones(6, dtype=torch.bool, device=DEVICE)),
         "packed must have dtype uint8"),
        ("packed 2-D", ValueError, lambda: K.bitmask_matmul(x, w, p[None]), "packed must be 1-D"),
        ("packed list", TypeError, lambda: K.bitmask_matmul(x, w, [1, 2]), "packed must be a torch.Tensor"),
        ("weight dtype", TypeError, lambda: K.bitmask_matmul(x, w.to(f16), p), "weight must have dtype float32"),
        ("K mismatch", ValueError, lambda: K.bitmask_matmul(ones(4, 8), w, p), r"expected \[N, 8\]"),
        ("bias shape", ValueError, lambda: K.bitmask_matmul(x, w, p, ones(4)), "bias must have shape"),
        ("bias dtype", TypeError, lambda: K.bitmask_matmul(x, w, p, b.to(f16)), "bias must have dtype float32"),
        ("dx N mismatch", ValueError, lambda: K.bitmask_matmul_dx(ones(4, 6), w, p), r"expected \[6, K\]"),
        ("packed2d 1-D", ValueError, lambda: K.multi_bitmask_matmul(x, w, p, ids), "packed2d must be 2-D"),
        ("packed2d bytes", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2[:, :5], ids),
         r"packed2d must hold ceil\(N\*K/8\) = 6 bytes per task"),
        ("task id too big", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2, ids + 1),
         r"task_ids must be in \[0, 3\).*from 1 to 3"),
        ("task id negative", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2, ids - 1),
         r"task_ids must be in \[0, 3\)"),
        ("no tasks", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2[:0], ids), r"task_ids must be in \[0, 0\)"),
        ("task ids float", TypeError, lambda: K.multi_bitmask_matmul(x, w, p2, ids.float()),
         "task_ids must have dtype"),
        ("task ids length", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2, ids[:3]), "task_ids must have shape"),
        ("packed device", ValueError, lambda: K.bitmask_matmul(x, w, p.to(OTHER_DEVICE)),
         "all tensors must be on one device"),
        ("dx packed device", ValueError, lambda: K.bitmask_matmul_dx(dy, w, p.to(OTHER_DEVICE)), "one device"),
        ("task ids device", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2, ids.to(OTHER_DEVICE)), "one device"),
        ("packed2d device", ValueError, lambda: K.multi_bitmask_matmul(x, w, p2.to(OTHER_DEVICE), ids), "one device"),
        ("operand", ValueError, lambda: K.bitmask_matmul(x, w, p, operand="c"), "must be one of b, a, got 'c'"),
        ("dx operand", ValueError, lambda: K.bitmask_matmul_dx(dy, w, p, operand="A "), "must be one of b, a"),
    ]


@needs_kernels
@pytest.mark.parametrize("error,call,match", [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise(error, call, match):
    """A wrong dtype or Python type is a TypeError, a wrong shape, value or device a ValueError."""
    with pytest.raises(error, match=match):
        call()


@needs_kernels
def test_operand_picks_the_kernel(monkeypatch):
    """``operand=`` and ``ABP_BITMASK_OPERAND`` route forward, dX and the multi-task forward to the ``_t`` tuners ("a") or the
    default ones ("b", also when unset); a bad environment value is refused by name."""
    import importlib

    mod = importlib.import_module("abp.kernels.bitmask_matmul")
    launched = []

    class Tuner:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(self.name)

    for name in ("_fwd_kernel", "_dx_kernel", "_fwd_t_kernel", "_dx_t_kernel", "_multi_kernel", "_multi_t_kernel"):
        monkeypatch.setattr(mod, name, Tuner(name))
    x, w, dy = randn((4, 9), torch.float32, _gen("op")), randn((5, 9), torch.float32, _gen("op")), \
        randn((4, 5), torch.float32, _gen("op"))
    p = R.pack_mask(torch.ones(5, 9, dtype=torch.bool, device=DEVICE))

    def calls():
        launched.clear()
        K.bitmask_matmul(x, w, p)
        K.bitmask_matmul_dx(dy, w, p)
        K.multi_bitmask_matmul(x, w, p[None], torch.zeros(4, dtype=torch.int64, device=DEVICE))
        return list(launched)

    monkeypatch.delenv("ABP_BITMASK_OPERAND", raising=False)
    assert calls() == ["_fwd_kernel", "_dx_kernel", "_multi_kernel"]
    monkeypatch.setenv("ABP_BITMASK_OPERAND", "A")
    assert calls() == ["_fwd_t_kernel", "_dx_t_kernel", "_multi_t_kernel"]
    K.bitmask_matmul(x, w, p, operand="b")
    assert launched[-1] == "_fwd_kernel"  # the argument wins over the environment
    monkeypatch.setenv("ABP_BITMASK_OPERAND", "wgmma")
    with pytest.raises(ValueError, match="ABP_BITMASK_OPERAND.*got 'wgmma'"):
        calls()


@needs_kernels
def test_interpreter_refuses_bf16():
    if not K.INTERPRET:
        pytest.skip("compiled kernels run bf16")
    x, w = torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(5, 8, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16 is not supported under the Triton interpreter"):
        K.bitmask_matmul(x, w, torch.ones(5, dtype=torch.uint8))


@needs_fresh_process
def test_interpreter_in_fresh_process():
    """triton was imported before TRITON_INTERPRET=1 here: run this file where it is set first."""
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# full size, GPU only (autotuned)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mnk", [(4096, 3072, 768), (16, 3072, 768)], ids=["4096x3072x768", "16x3072x768"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_full_size_gpu(dtype, mnk):
    M, N, Kd = mnk
    gen = _gen("full", mnk, str(dtype))
    x, w = randn((M, Kd), dtype, gen), randn((N, Kd), dtype, gen)
    dy, b = randn((M, N), dtype, gen), randn((N,), dtype, gen)
    packed = R.pack_mask(mask_with_density((N, Kd), 0.5, gen))
    assert_accurate(K.bitmask_matmul(x, w, packed, b), R.bitmask_linear(*f64(x, w), packed, b.double()),
                    R.bitmask_linear(x, w, packed, b), "y")
    assert_accurate(K.bitmask_matmul_dx(dy, w, packed), masked_dx_f64(dy, w, packed),
                    masked_dx_torch(dy, w, packed), "dx")
    T = 8
    packed2d = torch.stack([R.pack_mask(mask_with_density((N, Kd), 0.5, gen)) for _ in range(T)])
    task_ids = torch.randint(0, T, (M,), generator=gen).to(DEVICE)
    assert_accurate(K.multi_bitmask_matmul(x, w, packed2d, task_ids, b),
                    R.multi_bitmask_linear(*f64(x, w), packed2d, task_ids, b.double()),
                    R.multi_bitmask_linear(x, w, packed2d, task_ids, b), "multi y")
