"""abp.kernels (Triton) against float64 references built with abp.reference, on random data.

Where the kernels run (the Triton interpreter without CUDA), the accuracy rule and the poisoned outputs:
tests/kernel_cases.py.
"""
from __future__ import annotations

import pytest
import torch

from abp import reference as R
from kernel_cases import (CUDA, DEVICE, DTYPES, EPS, K, _gen, assert_accurate, f64, needs_fresh_process, needs_kernels,
                          randn, rerun_in_fresh_process, scores_with_density, shape_id)

pytestmark = pytest.mark.usefixtures("poisoned_empty", "one_config_for_small_shapes")

# (M, N, K): sizes 1, 7, 33, 97, 130 in every role; tails against the interpreter's 32-tiles
# and several tile groups for the swizzle. Then 0 in every role: no tokens (the forward and dX are
# empty, dθ is an empty sum over M, i.e. zeros, and the fused step still applies γ), no outputs,
# no inputs (the forward is the bias alone, dX is empty, the bias-score grad still sums over M).
# Each of them is an empty reduction for one of the kernels.
SHAPES = [(1, 7, 33), (7, 33, 1), (33, 1, 7), (97, 130, 33), (130, 97, 130), (0, 7, 33), (7, 0, 33), (33, 7, 0)]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def score_grad_f64(dy, x, w, s, b=None, bs=None, t_s=1.0):
    """float64 oracle of :func:`abp.reference.score_grad`.

    The reference computes in fp32 on purpose (its contract returns fp32), so on float64 copies
    it would still round like fp32; this restates its formula, ``(dYᵀX) ⊙ W ⊙ t·σ(tθ)(1−σ(tθ))``
    and ``Σ_m dY ⊙ b ⊙ σ'``, with every operand in float64.
    """
    def surrogate(theta):
        sig = torch.sigmoid(theta.double() * t_s)
        return t_s * sig * (1.0 - sig)

    dy, x, w = dy.double(), x.double(), w.double()
    ds = (dy.t() @ x) * w * surrogate(s)
    dbs = None if bs is None else dy.sum(0) * b.double() * surrogate(bs)
    return ds, dbs


def make_problem(shape, dtype, density, bias_mode, seed_key):
    M, N, Kd = shape
    gen = _gen(*seed_key)
    x, w, dy = randn((M, Kd), dtype, gen), randn((N, Kd), dtype, gen), randn((M, N), dtype, gen)
    s = scores_with_density((N, Kd), density, gen)
    b = randn((N,), dtype, gen) if bias_mode in ("bias", "bias+scores") else None
    bs = scores_with_density((N,), density, gen) if bias_mode == "bias+scores" else None
    return x, w, dy, s, b, bs


# ----------------------------------------------------------------------------------------------
# forward and dX
# ----------------------------------------------------------------------------------------------
FWD_CASES = [  # (mask density, t_l, bias)
    (0.5, None, "bias+scores"),
    (0.5, 2.5, "bias+scores"),
    (0.0, None, "bias"),
    (0.0, 3.0, "none"),
    (1.0, None, "none"),
    (1.0, 0.7, "bias"),
]


@needs_kernels
@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: f"d{c[0]}-t{c[1]}-{c[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_masked_matmul(shape, dtype, case):
    density, t_l, bias_mode = case
    x, w, _, s, b, bs = make_problem(shape, dtype, density, bias_mode, ("fwd", shape, str(dtype), case))
    out = K.masked_matmul(x, w, s, b, bs, t_l)
    assert out.dtype == dtype
    ref = R.masked_linear_fwd(*f64(x, w, s, b, bs), t_l)
    assert_accurate(out, ref, R.masked_linear_fwd(x, w, s, b, bs, t_l), "y")


DX_CASES = [(0.0, None), (0.5, None), (0.5, 2.5), (1.0, 2.5)]  # (mask density, t_l)


@needs_kernels
@pytest.mark.parametrize("case", DX_CASES, ids=lambda c: f"d{c[0]}-t{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_masked_matmul_dx(shape, dtype, case):
    density, t_l = case
    _, w, dy, s, _, _ = make_problem(shape, dtype, density, "none", ("dx", shape, str(dtype), case))
    dx = K.masked_matmul_dx(dy, w, s, t_l)
    assert dx.dtype == dtype
    ref = R.masked_linear_dx(*f64(dy, w, s), t_l)
    assert_accurate(dx, ref, R.masked_linear_dx(dy, w, s, t_l), "dx")


def _soft_mask_probe_scores(n: int, t_l: float) -> torch.Tensor:
    """fp32 scores ``[n, n+1]`` (the last column for the bias) with ``t_l·θ`` from −1e7 to 1e7, densest
    over ±110: both sides of the kernels' clamp of ``t_l·θ`` to ±88, and far past it."""
    far = torch.logspace(2, 7, 40, dtype=torch.float64)
    near = torch.linspace(-110, 110, n * (n + 1) - 2 * far.numel() - 3, dtype=torch.float64)
    z = torch.cat([near, far, -far, torch.tensor([-88.0, 88.0, 0.0], dtype=torch.float64)])
    perm = torch.randperm(z.numel(), generator=_gen("soft mask probe", n))
    return (z[perm] / t_l).float().view(n, n + 1)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=needs_kernels)])
@pytest.mark.parametrize("t_l", [1e5, 30.0])
def test_soft_mask_past_the_exponent_clamp(t_l, impl):
    """σ(t_l·θ) for ``|t_l·θ|`` beyond the kernels' clamp (±88, where σ leaves fp32's normal range),
    mask element by mask element against float64: the forward (weight and bias masks) and dX.

    ``t_l = 1e5`` is the training default, where nearly every score is far past the clamp. The masks
    are read out exactly: with ``W = 1`` the forward of ``x = I`` is ``Mᵀ`` and, with ``b = 1``, that of
    ``x = 0`` is ``m_b``; with ``dY = I``, dX is ``M``. Each value must be within a few ulps of
    ``σ(z)`` in float64 at the fp32 product ``z = fl(θ·t_l)`` that both sides compute (plus ``|z|``
    ulps: a GPU's ``exp`` rounds ``z·log₂e`` first), or within fp32's smallest normal of it: below
    that, fp32 keeps no relative precision and GPUs flush to zero.
    """
    n = 48
    s_all = _soft_mask_probe_scores(n, t_l).to(DEVICE)
    s, bs = s_all[:, :n].contiguous(), s_all[:, n].contiguous()
    z = s_all * torch.tensor(t_l, dtype=torch.float32)
    assert (z < -88).any() and (z > 88).any() and ((z.abs() < 88) & (z != 0)).any(), "test precondition"
    ref = torch.sigmoid(z.double())
    eye, ones, zero = torch.eye(n, device=DEVICE), torch.ones(n, n, device=DEVICE), torch.zeros(1, n, device=DEVICE)
    if impl == "triton":
        fwd, dx_of = K.masked_matmul, K.masked_matmul_dx
    else:
        fwd, dx_of = R.masked_linear_fwd, R.masked_linear_dx
    y = fwd(eye, ones, s, None, None, t_l)
    y_bias = fwd(zero, ones, s, ones[0], bs, t_l)
    dx = dx_of(eye, ones, s, t_l)
    tiny = torch.finfo(torch.float32).tiny
    for what, got, want, zz in (("weight mask (forward)", y.t(), ref[:, :n], z[:, :n]),
                                ("bias mask (forward)", y_bias[0], ref[:, n], z[:, n]),
                                ("weight mask (dX)", dx, ref[:, :n], z[:, :n])):
        err = (got.double() - want).abs()
        tol = (4 + zz.double().abs()) * EPS[torch.float32] * want + tiny
        i = (err - tol).argmax()
        assert (err <= tol).all(), (f"{what}: σ({zz.flatten()[i].item():.6g}) = {got.flatten()[i].item():.6g}, "
                                    f"float64 {want.flatten()[i].item():.6g}")


# ----------------------------------------------------------------------------------------------
# score gradient
# ----------------------------------------------------------------------------------------------
GRAD_CASES = [("none", 1.0), ("bias", 0.5), ("bias+scores", 1.0), ("bias+scores", 3.0)]  # (bias, t_s)


@needs_kernels
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: f"{c[0]}-ts{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_score_grad(shape, dtype, case):
    bias_mode, t_s = case
    x, w, dy, s, b, bs = make_problem(shape, dtype, 0.5, bias_mode, ("grad", shape, str(dtype), case))
    ds, dbs = K.score_grad(dy, x, w, s, b, bs, t_s)
    assert ds.dtype == torch.float32
    ref, ref_b = score_grad_f64(dy, x, w, s, b, bs, t_s)
    own, own_b = R.score_grad(dy, x, w, s, b, bs, t_s)
    assert_accurate(ds, ref, own, "dscores")
    if bs is None:
        assert dbs is None
    else:
        assert dbs.dtype == torch.float32
        assert_accurate(dbs, ref_b, own_b, "dbias_scores")


# ----------------------------------------------------------------------------------------------
# fused score update
# ----------------------------------------------------------------------------------------------
def _max_abs(t: torch.Tensor) -> float:
    """``max|t|``, 0 for an empty tensor (a zero-size score tensor)."""
    return t.abs().max().item() if t.numel() else 0.0


def _reference_update(dy, x, w, s, b, bs, lr, gamma, active, recovery, t_s):
    """fp64 reference of the step, fp32-computed grads (torch's own), and the grad tolerances."""
    g64, gb64 = score_grad_f64(dy, x, w, s, b, bs, t_s)
    g32, gb32 = R.score_grad(dy, x, w, s, b, bs, t_s)
    out = []
    for theta, g, g_own in ((s, g64, g32), (bs, gb64, gb32)):
        if theta is None:
            out.append(None)
            continue
        new = theta.double().clone()
        R.score_update_(new, g, lr, gamma.double(), active.double(), recovery)
        grad_tol = 2 * _max_abs(g_own.double() - g) + 2 * EPS[torch.float32] * _max_abs(g)
        scale = _max_abs(theta) + lr * _max_abs(g) + abs(gamma.item())
        tol = lr * grad_tol + 4 * EPS[torch.float32] * scale
        unclamped = theta.double() - active.double() * (lr * g + gamma.double())
        out.append((new, tol, unclamped))
    return out


def _check_step(name, theta_old, theta_new, ref, count, count_before, recovery):
    new_ref, tol, unclamped = ref
    assert torch.isfinite(theta_new).all(), f"{name}: non-finite scores after the step"
    err = _max_abs(theta_new.double() - new_ref)
    assert err <= tol, f"{name}: max error {err:.3g} > tol {tol:.3g}"
    # counts: exactly the θ ≤ 0 of what the kernel wrote, added to what was there.
    assert count - count_before == int((theta_new <= 0).sum()), f"{name}: count of θ ≤ 0"
    ambiguous = int((new_ref.abs() <= tol).sum())
    assert abs((count - count_before) - int((new_ref <= 0).sum())) <= ambiguous
    if not recovery:
        was_off = theta_old <= 0
        assert (theta_new[was_off] <= 0).all(), f"{name}: a pruned score recovered with recovery=False"
        if theta_old.numel() >= 200:  # the clamp must actually have had work to do
            assert (was_off & (unclamped > 0)).any(), "test precondition: the clamp never binds"


UPDATE_CASES = [(True, "none"), (True, "bias+scores"), (False, "bias+scores"), (False, "bias")]


@needs_kernels
@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"recovery{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_score_grad_update(shape, dtype, case, poisoned_empty):
    recovery, bias_mode = case
    x, w, dy, s, b, bs = make_problem(shape, dtype, 0.5, bias_mode, ("upd", shape, str(dtype), case))
    lr, t_s = 0.1, 1.5
    # With recovery=False, γ < 0 pushes scores up, so that the no-recovery clamp has to act.
    gamma = torch.tensor(0.01 if recovery else -0.05, device=DEVICE)
    active = torch.tensor(1.0, device=DEVICE)
    ref = _reference_update(dy, x, w, s, b, bs, lr, gamma, active, recovery, t_s)
    s_new, bs_new = s.clone(), (bs.clone() if bs is not None else None)
    counts = torch.tensor([3, 4], dtype=torch.int64, device=DEVICE)  # the kernel adds to these

    # One call on copies first: on a GPU the first call of a tuning key runs Triton's autotuner, whose
    # benchmark allocates its own 256 MiB cache-flush buffer and clones of the in-place outputs (seen on an
    # H200); the claim under test is about the kernel's steady state.
    K.score_grad_update_(dy, x, w, s.clone(), lr=lr, gamma=gamma, active=active, recovery=recovery,
                         counts=counts.clone(), bias=b, bias_scores=bs.clone() if bs is not None else None, t_s=t_s)
    poisoned_empty.clear()  # the shapes torch.empty made
    K.score_grad_update_(dy, x, w, s_new, lr=lr, gamma=gamma, active=active, recovery=recovery,
                         counts=counts, bias=b, bias_scores=bs_new, t_s=t_s)
    assert poisoned_empty == [], f"the fused update allocated {poisoned_empty} (no dW/dθ expected)"

    c = counts.tolist()
    _check_step("scores", s, s_new, ref[0], c[0], 3, recovery)
    if bs is None:
        assert c[1] == 4, "counts[1] changed without bias scores"
    else:
        _check_step("bias_scores", bs, bs_new, ref[1], c[1], 4, recovery)


@needs_kernels
@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inactive_step_moves_nothing(dtype, recovery):
    x, w, dy, s, b, bs = make_problem((97, 130, 33), dtype, 0.5, "bias+scores", ("inactive", str(dtype)))
    s_new, bs_new = s.clone(), bs.clone()
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    K.score_grad_update_(dy, x, w, s_new, lr=0.5, gamma=torch.tensor(0.3, device=DEVICE),
                         active=torch.tensor(0.0, device=DEVICE), recovery=recovery, counts=counts,
                         bias=b, bias_scores=bs_new)
    assert torch.equal(s_new, s) and torch.equal(bs_new, bs)
    assert counts.tolist() == [int((s <= 0).sum()), int((bs <= 0).sum())]


@needs_kernels
@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_tokens(dtype, recovery):
    """M = 0 (an empty batch): y [0, N] and dX [0, K] are empty; dθ and the bias-score grad are sums
    over no tokens, so exactly 0 everywhere, written rather than left as allocated; the fused step
    still applies ``θ ← θ − active·γ`` (the reference's step with a zero gradient, bit for bit, the
    no-recovery clamp included) and counts the θ ≤ 0 it leaves."""
    x, w, dy, s, b, bs = make_problem((0, 7, 33), dtype, 0.5, "bias+scores", ("no tokens", str(dtype)))
    assert K.masked_matmul(x, w, s, b, bs).shape == (0, 7)
    assert K.masked_matmul_dx(dy, w, s, 2.0).shape == (0, 33)
    ds, dbs = K.score_grad(dy, x, w, s, b, bs)
    assert torch.equal(ds, torch.zeros_like(s)) and torch.equal(dbs, torch.zeros_like(bs))

    gamma = torch.tensor(0.01 if recovery else -0.05, device=DEVICE)  # < 0: the clamp has to act
    active = torch.tensor(1.0, device=DEVICE)
    s_new, bs_new = s.clone(), bs.clone()
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    K.score_grad_update_(dy, x, w, s_new, lr=0.1, gamma=gamma, active=active, recovery=recovery, counts=counts,
                         bias=b, bias_scores=bs_new)
    s_ref, bs_ref = s.clone(), bs.clone()
    want = [int(R.score_update_(s_ref, torch.zeros_like(s), 0.1, gamma, active, recovery)),
            int(R.score_update_(bs_ref, torch.zeros_like(bs), 0.1, gamma, active, recovery))]
    assert not torch.equal(s_ref, s), "test precondition: the γ step moves the scores"
    assert torch.equal(s_new, s_ref) and torch.equal(bs_new, bs_ref)
    assert counts.tolist() == want


# ----------------------------------------------------------------------------------------------
# layouts, errors, availability
# ----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs(dtype):
    """Transposed views of every operand give what contiguous ones do, in each activation dtype."""
    M, N, Kd = 33, 97, 130
    gen = _gen("noncontig", str(dtype))
    x = randn((Kd, M), dtype, gen).t()
    w = randn((Kd, N), dtype, gen).t()
    dy = randn((N, M), dtype, gen).t()
    s = scores_with_density((Kd, N), 0.5, gen).t()
    assert not (x.is_contiguous() or w.is_contiguous() or dy.is_contiguous() or s.is_contiguous())
    assert_accurate(K.masked_matmul(x, w, s), R.masked_linear_fwd(*f64(x, w, s)),
                    R.masked_linear_fwd(x, w, s), "y")
    assert_accurate(K.masked_matmul_dx(dy, w, s), R.masked_linear_dx(*f64(dy, w, s)),
                    R.masked_linear_dx(dy, w, s), "dx")
    assert_accurate(K.score_grad(dy, x, w, s)[0], score_grad_f64(dy, x, w, s)[0],
                    R.score_grad(dy, x, w, s)[0], "dscores")


def _bad_calls():
    f32, f16 = torch.float32, torch.float16
    # every tensor on the kernels' device, so that the check under test is the one that fires (on a GPU, CPU
    # tensors would all be refused by the device check first)
    def ones(*shape):
        return torch.ones(*shape, device=DEVICE)

    x, w, s, dy = ones(4, 8), ones(5, 8), ones(5, 8), ones(4, 5)
    b, bs = ones(5), ones(5)
    g, a = torch.tensor(0.1, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    c = torch.zeros(2, dtype=torch.int64, device=DEVICE)

    def upd(scores=s, **kw):
        args = dict(lr=0.1, gamma=g, active=a, recovery=True, counts=c)
        args.update(kw)
        return lambda: K.score_grad_update_(dy, x, w, scores, **args)

    return [
        ("scores fp16", TypeError, lambda: K.masked_matmul(x, w, s.to(f16)), "scores must have dtype float32"),
        ("weight dtype", TypeError, lambda: K.masked_matmul(x, w.to(f16), s), "weight must have dtype float32"),
        ("x int", TypeError, lambda: K.masked_matmul(x.long(), w, s), "x2d must have dtype"),
        ("K mismatch", ValueError, lambda: K.masked_matmul(ones(4, 7), w, s), "expected \\[N, 7\\]"),
        ("scores shape", ValueError, lambda: K.masked_matmul(x, w, s[:4]), "scores must have shape"),
        ("x 3-D", ValueError, lambda: K.masked_matmul(x[None], w, s), "x2d must be 2-D"),
        ("bias_scores alone", ValueError, lambda: K.masked_matmul(x, w, s, None, bs), "bias_scores given without bias"),
        ("bias shape", ValueError, lambda: K.masked_matmul(x, w, s, ones(4)), "bias must have shape"),
        ("t_l inf", ValueError, lambda: K.masked_matmul(x, w, s, t_l=float("inf")), "t_l must be"),
        ("dx N mismatch", ValueError, lambda: K.masked_matmul_dx(ones(4, 6), w, s), "expected \\[6, K\\]"),
        ("grad dy rows", ValueError, lambda: K.score_grad(ones(3, 5), x, w, s), "dy2d has 3 rows"),
        ("grad dy dtype", TypeError, lambda: K.score_grad(dy.to(f16), x, w, s), "dy2d must have dtype float32"),
        ("grad t_s", ValueError, lambda: K.score_grad(dy, x, w, s, t_s=None), "t_s must be a finite float"),
        ("gamma float", ValueError, upd(gamma=0.1), "gamma must be a 0-d"),
        ("active fp16", ValueError, upd(active=a.to(f16)), "active must be a 0-d"),
        ("counts int32", TypeError, upd(counts=c.int()), "counts must have dtype int64"),
        ("counts shape", ValueError, upd(counts=torch.zeros(3, dtype=torch.int64, device=DEVICE)), "counts must have shape"),
        ("lr tensor", TypeError, upd(lr=torch.tensor(0.1, device=DEVICE)), "lr must be a Python float"),
        ("scores strided", ValueError, upd(scores=ones(8, 5).t()), "scores must be contiguous"),
    ]


@needs_kernels
@pytest.mark.parametrize("error,call,match", [c[1:] for c in _bad_calls()], ids=[c[0] for c in _bad_calls()])
def test_bad_inputs_raise(error, call, match):
    """A wrong dtype or Python type is a TypeError, a wrong shape or value a ValueError."""
    with pytest.raises(error, match=match):
        call()


@needs_kernels
def test_devices_and_interpreter_limits():
    ok, why = K.triton_available(DEVICE)
    assert ok and why
    assert K.triton_available("meta")[0] is False
    if K.INTERPRET:
        x, w = torch.ones(4, 8, dtype=torch.bfloat16), torch.ones(5, 8, dtype=torch.bfloat16)
        with pytest.raises(TypeError, match="bfloat16 is not supported under the Triton interpreter"):
            K.masked_matmul(x, w, torch.ones(5, 8))


@needs_fresh_process
def test_interpreter_in_fresh_process():
    """triton was imported before TRITON_INTERPRET=1 here: run this file where it is set first."""
    rerun_in_fresh_process(__file__)


# ----------------------------------------------------------------------------------------------
# the abp:: operators on the Triton backend: schemas, fake kernels, autograd and mutation declarations
# ----------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_opcheck_triton_backend(dtype):
    """``torch.library.opcheck`` of every Triton-backed op through ``backend="triton"`` (odd sizes)."""
    x, w, dy, s, b, bs = make_problem((9, 13, 7), dtype, 0.5, "bias+scores", ("opcheck", str(dtype)))
    s, bs = s.requires_grad_(), bs.requires_grad_()
    ops = torch.ops.abp
    for t_l in (None, 3.0):
        torch.library.opcheck(ops.masked_matmul.default, (x, w, s, b, bs, t_l, 1.0, "triton"))
        torch.library.opcheck(ops.masked_matmul_dx.default, (dy, w, s.detach(), t_l, "triton"))
    torch.library.opcheck(ops.score_grad.default, (dy, x, w, s.detach(), b, bs.detach(), 1.0, "triton"))
    gamma, active = torch.tensor(1e-3, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    torch.library.opcheck(ops.score_grad_update_.default,
                          (dy, x, w, s.detach().clone(), b, bs.detach().clone(), counts, 0.1, gamma, active, True,
                           1.0, "triton"))
    from abp import backends

    assert backends.last_backend("score_grad_update_") == "triton"


# ----------------------------------------------------------------------------------------------
# full size, GPU only (autotuned)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mnk", [(4096, 768, 3072), (4096, 3072, 768)], ids=["768x3072", "3072x768"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_full_size_gpu(dtype, mnk):
    M, N, Kd = mnk
    x, w, dy, s, b, bs = make_problem(mnk, dtype, 0.5, "bias+scores", ("full", mnk, str(dtype)))
    for t_l in (None, 2.0):
        assert_accurate(K.masked_matmul(x, w, s, b, bs, t_l), R.masked_linear_fwd(*f64(x, w, s, b, bs), t_l),
                        R.masked_linear_fwd(x, w, s, b, bs, t_l), f"y t_l={t_l}")
        assert_accurate(K.masked_matmul_dx(dy, w, s, t_l), R.masked_linear_dx(*f64(dy, w, s), t_l),
                        R.masked_linear_dx(dy, w, s, t_l), f"dx t_l={t_l}")
    ds, dbs = K.score_grad(dy, x, w, s, b, bs, 1.0)
    ref, ref_b = score_grad_f64(dy, x, w, s, b, bs, 1.0)
    own, own_b = R.score_grad(dy, x, w, s, b, bs, 1.0)
    assert_accurate(ds, ref, own, "dscores")
    assert_accurate(dbs, ref_b, own_b, "dbias_scores")

    gamma, active = torch.tensor(-0.01, device=DEVICE), torch.tensor(1.0, device=DEVICE)
    refs = _reference_update(dy, x, w, s, b, bs, 1e-3, gamma, active, False, 1.0)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    warm_s, warm_bs = s.clone(), bs.clone()  # the first call autotunes (and clones θ to restore it)
    K.score_grad_update_(dy, x, w, warm_s, lr=1e-3, gamma=gamma, active=active, recovery=False,
                         counts=counts, bias=b, bias_scores=warm_bs)
    s_new, bs_new = s.clone(), bs.clone()
    counts.zero_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    K.score_grad_update_(dy, x, w, s_new, lr=1e-3, gamma=gamma, active=active, recovery=False,
                         counts=counts, bias=b, bias_scores=bs_new)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * Kd, f"the fused update allocated {extra} bytes (a dθ would be {4 * N * Kd})"
    assert torch.equal(warm_s, s_new) and torch.equal(warm_bs, bs_new), "update not deterministic"
    c = counts.tolist()
    _check_step("scores", s, s_new, refs[0], c[0], 0, False)
    _check_step("bias_scores", bs, bs_new, refs[1], c[1], 0, False)
