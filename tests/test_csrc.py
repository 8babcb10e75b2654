"""The compiled ops of abp._C (torch.ops.abp_C.*) against abp.reference, on CPU and (marked gpu) CUDA.

Bit-exact ops (pack/unpack, the score update) must equal the reference exactly; the serving
matmuls are judged flash-attention style: their error against a float64 oracle must stay within
twice torch's own error in the same dtype (plus a small floor).
"""
import pytest
import torch

from abp import _ext, reference

# Every test here needs the extension; tests/test_extension.py checks that a missing one says so (and fails
# where the extension is required).
pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"abp._C is not built: {_ext.LOAD_ERROR}")

C = torch.ops.abp_C
DENSITIES = (0.0, 0.5, 1.0)
SERVING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Floor of the allowed error: fp32, relative to max Σ|x||w| (accumulation); halves, relative to the
# largest output (one rounding of the result).
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def random_mask(shape, density, gen, device="cpu"):
    return torch.rand(shape, generator=gen).lt(density).to(device)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- packed masks

@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (9,), (13, 37), (3, 5, 7), (2, 1025)])
@pytest.mark.parametrize("density", DENSITIES)
def test_pack_unpack_match_reference(shape, density):
    m = random_mask(shape, density, gen(len(shape) + int(10 * density)))
    packed = C.pack_mask(m)
    assert packed.dtype == torch.uint8 and packed.shape == ((m.numel() + 7) // 8,)
    assert torch.equal(packed, reference.pack_mask(m))
    flat = C.unpack_mask(packed, m.numel())
    assert flat.dtype == torch.bool and torch.equal(flat, reference.unpack_mask(packed, m.numel()))
    assert torch.equal(flat, m.reshape(-1))


def test_pack_noncontiguous_mask():
    m = random_mask((9, 14), 0.5, gen(3)).t()
    assert torch.equal(C.pack_mask(m), reference.pack_mask(m.contiguous()))


@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (9, 14), (3, 1025)])
def test_pack_positive_is_pack_mask_of_positive_scores(shape):
    s = torch.randn(shape, generator=gen(len(shape) + shape[-1]))
    if s.numel():
        s.view(-1)[::4] = 0.0  # θ = 0 is pruned
        s.view(-1)[1::9] = float("nan")  # NaN compares false, as in torch
    assert torch.equal(C.pack_positive(s), reference.pack_mask(s > 0))
    assert torch.equal(C.pack_positive(s.t() if s.dim() == 2 else s), reference.pack_mask((s.t() if s.dim() == 2 else s) > 0))


def test_mask_op_errors():
    with pytest.raises(RuntimeError, match="`scores` must be float32"):
        C.pack_positive(torch.ones(8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="`mask` must be a bool"):
        C.pack_mask(torch.ones(8))
    with pytest.raises(RuntimeError, match=r"`packed` must hold ceil\(9/8\) = 2 bytes"):
        C.unpack_mask(torch.zeros(1, dtype=torch.uint8), 9)
    with pytest.raises(RuntimeError, match="`packed` must be uint8"):
        C.unpack_mask(torch.zeros(2), 9)


# --------------------------------------------------------------------------- score update

SCORE_SHAPES = [(13, 37), (0,), (5,), (1, 1), (3, 1025), (33, 7)]


def make_update_args(grad_dtype, seed, device="cpu", shapes=SCORE_SHAPES):
    g = gen(seed)
    scores, grads = [], []
    for shape in shapes:
        s = torch.randn(shape, generator=g) * 0.01
        if s.numel():
            s.view(-1)[::5] = 0.0
        scores.append(s.to(device))
        grads.append((torch.randn(shape, generator=g) * 0.02).to(grad_dtype).to(device))
    return scores, grads


@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("active", [0.0, 1.0])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_multi_score_update_matches_reference(recovery, active, grad_dtype):
    scores, grads = make_update_args(grad_dtype, seed=int(recovery) + 2 * int(active))
    expect = [s.clone() for s in scores]
    gamma, act = torch.tensor(3e-4), torch.tensor(active)
    counts = torch.full((len(scores),), 12345, dtype=torch.int64)  # poisoned: must be overwritten
    want_counts = torch.zeros_like(counts)
    reference.multi_score_update_(expect, grads, 0.5, gamma, act, recovery, want_counts)
    C.multi_score_update_(scores, grads, 0.5, gamma, act, recovery, counts)
    for got, want in zip(scores, expect):
        assert torch.equal(got, want)
    assert torch.equal(counts, want_counts)
    if active == 0.0:
        assert torch.equal(counts, torch.tensor([int((s <= 0).sum()) for s in scores]))


def test_multi_score_update_no_recovery_keeps_pruned():
    s = torch.tensor([-0.1, 0.0, 0.2, -0.3])
    g = torch.tensor([-10.0, -10.0, -10.0, 0.0])  # pushes every score up
    counts = torch.zeros(1, dtype=torch.int64)
    C.multi_score_update_([s], [g], 0.1, torch.tensor(0.0), torch.tensor(1.0), False, counts)
    assert s.tolist() == pytest.approx([0.0, 0.0, 1.2, -0.3]) and s[0] <= 0 and s[1] <= 0
    assert counts.tolist() == [3]


def test_multi_score_update_errors():
    s, g = [torch.zeros(4)], [torch.zeros(4)]
    gamma, act, counts = torch.tensor(0.0), torch.tensor(1.0), torch.zeros(1, dtype=torch.int64)
    with pytest.raises(RuntimeError, match=r"`scores\[0\]` must be float32"):
        C.multi_score_update_([torch.zeros(4, dtype=torch.float16)], g, 0.1, gamma, act, True, counts)
    with pytest.raises(RuntimeError, match=r"`grads\[0\]` has shape \[5\]"):
        C.multi_score_update_(s, [torch.zeros(5)], 0.1, gamma, act, True, counts)
    with pytest.raises(RuntimeError, match="`gamma` must be a 0-d float32"):
        C.multi_score_update_(s, g, 0.1, torch.tensor([0.0]), act, True, counts)
    with pytest.raises(RuntimeError, match="`counts` must be a contiguous int64 tensor of shape"):
        C.multi_score_update_(s, g, 0.1, gamma, act, True, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="got 1 `scores` but 2 `grads`"):
        C.multi_score_update_(s, g * 2, 0.1, gamma, act, True, counts)


# --------------------------------------------------------------------------- Adam score update

ADAM_SHAPES = [(0,), (1,), (7,), (16385,), (13, 37), (3, 1025)]
ADAM_STEPS = [1, 2, 7, 1000, 3, 40]  # each tensor its own step count


def make_adam_args(grad_dtype, seed, device="cpu", shapes=ADAM_SHAPES, steps=ADAM_STEPS, betas=(0.9, 0.999)):
    """scores, grads, moments (as after earlier steps: v ≥ 0) and the per-tensor bias corrections."""
    scores, grads = make_update_args(grad_dtype, seed, device, shapes)
    g = gen(seed + 100)
    # gradients over many decades (MiniLM's span 1e-10 … 1e-5), moments of the same sizes
    scale = [10.0 ** torch.randint(-10, -2, shape, generator=g) for shape in shapes]
    grads = [(gr.float().cpu() * sc).to(grad_dtype).to(device) for gr, sc in zip(grads, scale)]
    exp_avg = [(torch.randn(shape, generator=g) * sc).to(device) for shape, sc in zip(shapes, scale)]
    exp_avg_sq = [(torch.rand(shape, generator=g) * sc * sc).to(device) for shape, sc in zip(shapes, scale)]
    inv1 = [1 / (1 - betas[0] ** t) for t in steps[: len(shapes)]]
    inv2 = [1 / (1 - betas[1] ** t) for t in steps[: len(shapes)]]
    return scores, grads, exp_avg, exp_avg_sq, inv1, inv2


def clone_all(*lists):
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("active", [0.0, 1.0])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_multi_score_adam_update_matches_reference(recovery, active, grad_dtype):
    """Bit for bit: moments, scores and counts; the moments move even when active = 0."""
    scores, grads, m, v, inv1, inv2 = make_adam_args(grad_dtype, seed=int(recovery) + 2 * int(active))
    want_s, want_m, want_v = clone_all(scores, m, v)
    m0 = [t.clone() for t in m]
    gamma, act = torch.tensor(3e-4), torch.tensor(active)
    counts = torch.full((len(scores),), 12345, dtype=torch.int64)  # poisoned: must be overwritten
    want_counts = torch.zeros_like(counts)
    reference.multi_score_adam_update_(want_s, grads, want_m, want_v, inv1, inv2, 1e-3, 0.9, 0.999, 1e-12, gamma, act,
                                       recovery, want_counts)
    C.multi_score_adam_update_(scores, grads, m, v, inv1, inv2, 1e-3, 0.9, 0.999, 1e-12, gamma, act, recovery, counts)
    for got, want in zip(scores + m + v, want_s + want_m + want_v):
        assert torch.equal(got, want)
    assert torch.equal(counts, want_counts)
    assert all(not torch.equal(a, b) for a, b in zip(m, m0) if a.numel())  # moments moved
    if active == 0.0:
        assert torch.equal(counts, torch.tensor([int((s <= 0).sum()) for s in scores]))


def test_multi_score_adam_update_steps_like_adam_repeatedly():
    """Several steps from zero moments with eps = 0 and other betas: still the reference's bits."""
    shapes = [(5, 9), (16385,)]
    scores, _ = make_update_args(torch.float32, seed=7, shapes=shapes)
    ref_s = [s.clone() for s in scores]
    m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    ref_m, ref_v = clone_all(m, v)
    g = gen(8)
    for t in range(1, 6):
        grads = [torch.randn(s, generator=g) * 1e-4 for s in shapes]
        inv1, inv2 = [1 / (1 - 0.8 ** t)] * 2, [1 / (1 - 0.99 ** t)] * 2
        args = (inv1, inv2, 1e-2, 0.8, 0.99, 0.0, torch.tensor(1e-4), torch.tensor(1.0), True)
        counts, want = torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
        C.multi_score_adam_update_(scores, grads, m, v, *args, counts)
        reference.multi_score_adam_update_(ref_s, grads, ref_m, ref_v, *args, want)
        assert torch.equal(counts, want)
    for got, want in zip(scores + m + v, ref_s + ref_m + ref_v):
        assert torch.equal(got, want)


def test_multi_score_adam_update_errors():
    def args(**kw):
        a = dict(scores=[torch.zeros(4)], grads=[torch.zeros(4)], exp_avg=[torch.zeros(4)], exp_avg_sq=[torch.zeros(4)],
                 inv_bias1=[10.0], inv_bias2=[1000.0], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-12,
                 gamma=torch.tensor(0.0), active=torch.tensor(1.0), recovery=True,
                 counts=torch.zeros(1, dtype=torch.int64))
        a.update(kw)
        return tuple(a.values())

    op = C.multi_score_adam_update_
    with pytest.raises(RuntimeError, match=r"got 1 `scores` but 2 `exp_avg`, 1 `exp_avg_sq`, 1 `inv_bias1` and 1"):
        op(*args(exp_avg=[torch.zeros(4)] * 2))
    with pytest.raises(RuntimeError, match=r"but 1 `exp_avg`, 1 `exp_avg_sq`, 0 `inv_bias1` and 1 `inv_bias2`"):
        op(*args(inv_bias1=[]))
    with pytest.raises(RuntimeError, match="multi_score_adam_update_: got 1 `scores` but 2 `grads`"):
        op(*args(grads=[torch.zeros(4)] * 2))
    with pytest.raises(RuntimeError, match=r"`exp_avg_sq\[0\]` must be float32, got Half"):
        op(*args(exp_avg_sq=[torch.zeros(4, dtype=torch.float16)]))
    with pytest.raises(RuntimeError, match=r"`exp_avg\[0\]` has shape \[2, 2\] but `scores\[0\]` has shape \[4\]"):
        op(*args(exp_avg=[torch.zeros(2, 2)]))
    with pytest.raises(RuntimeError, match=r"`exp_avg\[0\]` must be contiguous"):
        op(*args(scores=[torch.zeros(2, 3)], grads=[torch.zeros(2, 3)], exp_avg=[torch.zeros(3, 2).t()],
                 exp_avg_sq=[torch.zeros(2, 3)]))
    with pytest.raises(RuntimeError, match=r"multi_score_adam_update_: `scores\[0\]` must be contiguous"):
        op(*args(scores=[torch.zeros(3, 2).t()], grads=[torch.zeros(2, 3)], exp_avg=[torch.zeros(2, 3)],
                 exp_avg_sq=[torch.zeros(2, 3)]))
    with pytest.raises(RuntimeError, match=r"`scores\[0\]` must be float32"):
        op(*args(scores=[torch.zeros(4, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match=r"`grads\[0\]` must be float32, float16 or bfloat16, got Double"):
        op(*args(grads=[torch.zeros(4, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match="`gamma` must be a 0-d float32"):
        op(*args(gamma=torch.tensor([0.0])))
    with pytest.raises(RuntimeError, match="`counts` must be a contiguous int64 tensor of shape"):
        op(*args(counts=torch.zeros(1, dtype=torch.int32)))
    with pytest.raises(RuntimeError, match=r"`inv_bias1\[0\]` and `inv_bias2\[0\]` must be finite and >= 1"):
        op(*args(inv_bias2=[0.5]))
    with pytest.raises(RuntimeError, match=r"`beta1` and `beta2` must be in \[0, 1\)"):
        op(*args(beta2=1.0))
    with pytest.raises(RuntimeError, match="`eps` must be >= 0"):
        op(*args(eps=-1.0))
    # a grad that is not contiguous is read as it is (it is not written)
    g = torch.randn(3, 2).t()
    s, m, v, c = [torch.ones(2, 3)], [torch.zeros(2, 3)], [torch.zeros(2, 3)], torch.zeros(1, dtype=torch.int64)
    ref = clone_all(s, m, v)
    op(*args(scores=s, grads=[g], exp_avg=m, exp_avg_sq=v, counts=c))
    reference.multi_score_adam_update_(ref[0], [g.contiguous()], ref[1], ref[2], *args()[4:13],
                                       torch.zeros(1, dtype=torch.int64))
    assert all(torch.equal(a, b) for a, b in zip(s + m + v, ref[0] + ref[1] + ref[2]))


# --------------------------------------------------------------------------- adam_mix score update (two passes)

MIX_SHAPES = ADAM_SHAPES + [(70001,)]  # more than one 16384-element block, with a tail


def mix_oracle(scores, exp_avg, exp_avg_sq, inv1, inv2, mix, lr, eps, gamma, active):
    """float64: each tensor's mean v̂ and the score step θ − active·(lr·m̂/(v̂^((1−mix)/2)·mean^(mix/2) + ε) + γ),
    from the moments after the first pass."""
    out, means = [], []
    for s, m, v, i1, i2 in zip(scores, exp_avg, exp_avg_sq, inv1, inv2):
        vhat = v.double() * i2
        mean = vhat.mean() if vhat.numel() else torch.zeros((), dtype=torch.float64)
        d = m.double() * i1 / (vhat ** ((1 - mix) / 2) * mean ** (mix / 2) + eps)
        out.append(s.double() - active * (lr * d + gamma))
        means.append(mean)
    return out, means


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_multi_adam_moments_matches_reference(grad_dtype):
    """The moments bit for bit (Adam's arithmetic); each tensor's Σ v̂ within float64 rounding of the reference's
    and of a float64 oracle, and the same bits whatever the thread count."""
    scores, grads, m, v, inv1, inv2 = make_adam_args(grad_dtype, seed=11, shapes=MIX_SHAPES, steps=ADAM_STEPS + [5])
    want_m, want_v = clone_all(m, v)
    sums = torch.full((len(m),), 123.0, dtype=torch.float64)  # poisoned: must be overwritten
    want = torch.zeros_like(sums)
    reference.multi_adam_moments_(grads, want_m, want_v, inv2, 0.9, 0.999, want)
    m1, v1 = clone_all(m, v)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        C.multi_adam_moments_(grads, m1, v1, inv2, 0.9, 0.999, sums)
        torch.set_num_threads(max(2, threads))
        again = torch.zeros_like(sums)
        C.multi_adam_moments_(grads, m, v, inv2, 0.9, 0.999, again)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(sums, again)
    for got, exp in zip(m + v + m1 + v1, want_m + want_v + want_m + want_v):
        assert torch.equal(got, exp)
    torch.testing.assert_close(sums, want, rtol=1e-13, atol=0)
    oracle = torch.stack([(t.double() * i2).sum() for t, i2 in zip(want_v, inv2)])
    torch.testing.assert_close(sums, oracle, rtol=1e-6, atol=0)  # the fp32 products v·inv2 round; the sums do not


@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("active", [0.0, 1.0])
@pytest.mark.parametrize("mix", [0.0, 0.2, 0.99])
def test_multi_score_adam_mix_update_matches_reference_and_float64(recovery, active, mix):
    """Scores and counts bit for bit as the reference's (on CPU both take torch's log and exp), and lr·d within 4e-6
    (relative) of the float64 one: exp(log(v̂)·e + log pm) rounds its argument (|arg| up to about 25 here: 1.5e-6 from
    that rounding alone), not the power."""
    scores, grads, m, v, inv1, inv2 = make_adam_args(torch.float32, seed=12, shapes=MIX_SHAPES,
                                                     steps=ADAM_STEPS + [5])
    sums = torch.zeros(len(m), dtype=torch.float64)
    reference.multi_adam_moments_(grads, m, v, inv2, 0.9, 0.999, sums)
    numel = torch.tensor([max(1, t.numel()) for t in m], dtype=torch.float64)
    mean_sq = (sums / numel).float()
    want_s = [t.clone() for t in scores]
    gamma, act = torch.tensor(3e-4), torch.tensor(active)
    counts = torch.full((len(scores),), 999, dtype=torch.int64)
    want = torch.zeros_like(counts)
    reference.multi_score_adam_mix_update_(want_s, m, v, mean_sq, inv1, inv2, mix, 1e-3, 1e-12, gamma, act, recovery,
                                           want)
    oracle, _ = mix_oracle(scores, m, v, inv1, inv2, mix, 1e-3, 1e-12, 3e-4, active)
    s0 = [t.clone() for t in scores]
    m0, v0 = clone_all(m, v)
    C.multi_score_adam_mix_update_(scores, m, v, mean_sq, inv1, inv2, mix, 1e-3, 1e-12, gamma, act, recovery, counts)
    for got, exp in zip(scores, want_s):
        assert torch.equal(got, exp)
    assert torch.equal(counts, want)
    assert all(torch.equal(a, b) for a, b in zip(m + v, m0 + v0))  # the moments are only read
    for got, before, exp in zip(scores, s0, oracle):
        if not recovery:
            exp = torch.where(before <= 0, exp.clamp(max=0.0), exp)
        lr_d = (exp - before.double()).abs() + 3e-4  # ≥ |lr·d|
        ulp = 2.0 ** -23 * torch.maximum(before.double().abs(), exp.abs())  # the fp32 roundings of the step itself
        assert bool(((got.double() - exp).abs() <= 4e-6 * lr_d + ulp).all())
    assert torch.equal(counts, torch.tensor([int((s <= 0).sum()) for s in scores]))


def test_adam_mix_two_passes_equal_the_float64_oracle_over_steps():
    """Several steps from zero moments through both ops, against float64 moments, means and steps."""
    shapes = [(5, 9), (16385,), (3, 1025)]
    scores, _ = make_update_args(torch.float32, seed=13, shapes=shapes)
    ref = [s.double() for s in scores]
    m, v = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    rm, rv = [torch.zeros(s, dtype=torch.float64) for s in shapes], [torch.zeros(s, dtype=torch.float64) for s in shapes]
    numel = torch.tensor([float(torch.Size(s).numel()) for s in shapes], dtype=torch.float64)
    g = gen(14)
    for t in range(1, 6):
        grads = [torch.randn(s, generator=g) * 10.0 ** torch.randint(-9, -3, s, generator=g) for s in shapes]
        inv1, inv2 = [1 / (1 - 0.9 ** t)] * 3, [1 / (1 - 0.999 ** t)] * 3
        sums, counts = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)
        C.multi_adam_moments_(grads, m, v, inv2, 0.9, 0.999, sums)
        C.multi_score_adam_mix_update_(scores, m, v, (sums / numel).float(), inv1, inv2, 0.5, 1e-3, 1e-12,
                                       torch.tensor(1e-5), torch.tensor(1.0), True, counts)
        for i, gr in enumerate(grads):
            rm[i] = 0.9 * rm[i] + 0.1 * gr.double()
            rv[i] = 0.999 * rv[i] + 0.001 * gr.double() ** 2
        ref, _ = mix_oracle(ref, rm, rv, inv1, inv2, 0.5, 1e-3, 1e-12, 1e-5, 1.0)
    for got, exp in zip(scores, ref):  # 5 steps of lr·|d| ≤ 1e-3, each within 4e-6 (relative)
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=2e-8)


def test_adam_mix_ops_errors():
    def moments(**kw):
        a = dict(grads=[torch.zeros(4)], exp_avg=[torch.zeros(4)], exp_avg_sq=[torch.zeros(4)], inv_bias2=[1000.0],
                 beta1=0.9, beta2=0.999, sums=torch.zeros(1, dtype=torch.float64))
        a.update(kw)
        return tuple(a.values())

    def update(**kw):
        a = dict(scores=[torch.zeros(4)], exp_avg=[torch.zeros(4)], exp_avg_sq=[torch.zeros(4)], mean_sq=torch.zeros(1),
                 inv_bias1=[10.0], inv_bias2=[1000.0], mix=0.5, lr=0.1, eps=1e-12, gamma=torch.tensor(0.0),
                 active=torch.tensor(1.0), recovery=True, counts=torch.zeros(1, dtype=torch.int64))
        a.update(kw)
        return tuple(a.values())

    op = C.multi_adam_moments_
    with pytest.raises(RuntimeError, match=r"multi_adam_moments_: got 1 `grads` but 2 `exp_avg`, 1 `exp_avg_sq` and 1"):
        op(*moments(exp_avg=[torch.zeros(4)] * 2))
    with pytest.raises(RuntimeError, match=r"`sums` must be a contiguous Double tensor of shape \[1\] \(one per "
                                           r"tensor\), got Float"):
        op(*moments(sums=torch.zeros(1)))
    with pytest.raises(RuntimeError, match=r"`exp_avg_sq\[0\]` has shape \[2, 2\] but `grads\[0\]` has shape \[4\]"):
        op(*moments(exp_avg_sq=[torch.zeros(2, 2)]))
    with pytest.raises(RuntimeError, match=r"`grads\[0\]` must be float32, float16 or bfloat16, got Double"):
        op(*moments(grads=[torch.zeros(4, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match=r"`inv_bias2\[0\]` must be finite and >= 1"):
        op(*moments(inv_bias2=[0.5]))
    with pytest.raises(RuntimeError, match=r"`beta1` and `beta2` must be in \[0, 1\)"):
        op(*moments(beta1=1.0))
    op = C.multi_score_adam_mix_update_
    with pytest.raises(RuntimeError, match=r"multi_score_adam_mix_update_: `mix` must be in \[0, 1\), got 1"):
        op(*update(mix=1.0))
    with pytest.raises(RuntimeError, match=r"`mean_sq` must be a contiguous Float tensor of shape \[1\]"):
        op(*update(mean_sq=torch.zeros(2)))
    with pytest.raises(RuntimeError, match=r"`exp_avg\[0\]` must be contiguous"):
        op(*update(scores=[torch.zeros(2, 3)], exp_avg=[torch.zeros(3, 2).t()], exp_avg_sq=[torch.zeros(2, 3)]))
    with pytest.raises(RuntimeError, match=r"multi_score_adam_mix_update_: `scores\[0\]` must be float32"):
        op(*update(scores=[torch.zeros(4, dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match=r"got 1 `scores` but 1 `exp_avg`, 1 `exp_avg_sq`, 2 `inv_bias1` and 1"):
        op(*update(inv_bias1=[10.0, 10.0]))
    with pytest.raises(RuntimeError, match="`eps` must be >= 0"):
        op(*update(eps=-1.0))


# --------------------------------------------------------------------------- 1-bit-mask serving

def check_close(got, want64, torch_out, x, w, name):
    """got vs the fp64 oracle: within 2× torch's own error in the same dtype, plus a dtype floor."""
    assert got.dtype == torch_out.dtype and got.shape == want64.shape, name
    if got.dtype == torch.float32:
        scale = (x.double().abs() @ w.double().abs().t()).amax().clamp_min(1.0).item()
    else:
        scale = want64.abs().amax().clamp_min(1.0).item() if want64.numel() else 1.0
    err = (got.double() - want64).abs().max().item() if got.numel() else 0.0
    torch_err = (torch_out.double() - want64).abs().max().item() if got.numel() else 0.0
    bound = 2 * torch_err + FLOOR[got.dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (torch's own error {torch_err:.3g})"


def serving_case(M, N, K, dtype, density, seed, device="cpu", bias=True):
    g = gen(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = torch.randn(N, K, generator=g).to(dtype).to(device)
    mask = random_mask((N, K), density, g, device)
    b = torch.randn(N, generator=g).to(dtype).to(device) if bias else None
    return x, w, mask, b


SERVING_SHAPES = [(1, 1, 1), (3, 11, 7), (17, 33, 37), (5, 9, 64), (2, 4, 0)]


@pytest.mark.parametrize("M,N,K", SERVING_SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("dtype", SERVING_DTYPES)
def test_bitmask_linear(M, N, K, density, dtype):
    x, w, mask, b = serving_case(M, N, K, dtype, density, seed=M + N + K)
    packed = reference.pack_mask(mask)
    for bias in (b, None):
        got = C.bitmask_linear(x, w, packed, bias)
        want64 = reference.bitmask_linear(x.double(), w.double(), packed, None if bias is None else bias.double())
        check_close(got, want64, reference.bitmask_linear(x, w, packed, bias), x, w, f"{dtype} bias={bias is not None}")


@pytest.mark.parametrize("M,N,K", [(1, 5, 7), (9, 13, 37), (6, 4, 64)])
@pytest.mark.parametrize("dtype", SERVING_DTYPES)
def test_multi_bitmask_linear(M, N, K, dtype):
    x, w, _, b = serving_case(M, N, K, dtype, 0.5, seed=7 * M + K)
    g = gen(M)
    packed = torch.stack([reference.pack_mask(random_mask((N, K), d, g)) for d in (0.0, 0.5, 1.0, 0.3)])
    task_ids = torch.randint(0, 3, (M,), generator=g)  # task 3 unused
    got = C.multi_bitmask_linear(x, w, packed, task_ids, b)
    want64 = reference.multi_bitmask_linear(x.double(), w.double(), packed, task_ids, b.double())
    check_close(got, want64, reference.multi_bitmask_linear(x, w, packed, task_ids, b), x, w, str(dtype))
    one = C.bitmask_linear(x, w, packed[int(task_ids[0])], b)[0]
    assert torch.equal(got[0], one)  # the same kernel arithmetic whichever way the mask is given


def test_bitmask_linear_noncontiguous_inputs():
    x, w, mask, b = serving_case(6, 10, 12, torch.float32, 0.5, seed=11)
    packed = reference.pack_mask(mask)
    want = C.bitmask_linear(x, w, packed, b)
    xt, wt = x.t().contiguous().t(), w.t().contiguous().t()
    assert not xt.is_contiguous() and torch.equal(C.bitmask_linear(xt, wt, packed, b), want)


def test_bitmask_linear_errors():
    x, w, mask, b = serving_case(2, 3, 9, torch.float32, 0.5, seed=1)
    packed = reference.pack_mask(mask)
    with pytest.raises(RuntimeError, match="`x` is Double but `weight` is Float"):
        C.bitmask_linear(x.double(), w, packed, b)
    with pytest.raises(RuntimeError, match="`weight` must be float32, float16 or bfloat16"):
        C.bitmask_linear(x.double(), w.double(), packed, None)
    with pytest.raises(RuntimeError, match="K differs"):
        C.bitmask_linear(x[:, :8], w, packed, b)
    with pytest.raises(RuntimeError, match=r"`packed` must be 1-D with ceil\(N\*K/8\) = 4 bytes"):
        C.bitmask_linear(x, w, packed[:3], b)
    with pytest.raises(RuntimeError, match=r"`bias` must be \[N = 3\]"):
        C.bitmask_linear(x, w, packed, b[:2])
    multi = packed.unsqueeze(0)
    with pytest.raises(RuntimeError, match=r"`task_ids\[1\]` = 1 is out of range \[0, 1\)"):
        C.multi_bitmask_linear(x, w, multi, torch.tensor([0, 1]), b)
    with pytest.raises(RuntimeError, match="`task_ids` must be int64"):
        C.multi_bitmask_linear(x, w, multi, torch.tensor([0, 0], dtype=torch.int32), b)
    with pytest.raises(RuntimeError, match=r"`packed` must be \[T, ceil\(N\*K/8\) = 4\]"):
        C.multi_bitmask_linear(x, w, packed, torch.tensor([0, 0]), b)


# --------------------------------------------------------------------------- opcheck (schemas, fakes, dispatch)

def opcheck_cases(device) -> dict:
    """One or more cases per abp_C op, by name."""
    x, w, mask, b = serving_case(3, 5, 16, torch.float32, 0.5, seed=2, device=device)
    packed = reference.pack_mask(mask)
    scores, grads = make_update_args(torch.float32, seed=3, device=device, shapes=[(4, 6), (9,)])
    f32 = dict(device=device, dtype=torch.float32)
    return {
        "pack_mask": (C.pack_mask.default, (mask,)),
        "pack_positive": (C.pack_positive.default, (scores[0],)),
        "unpack_mask": (C.unpack_mask.default, (packed, mask.numel())),
        "multi_score_update_": (C.multi_score_update_.default,
                                (scores, grads, 0.1, torch.tensor(1e-3, **f32), torch.tensor(1.0, **f32), False,
                                 torch.zeros(2, dtype=torch.int64, device=device))),
        "multi_score_adam_update_": (C.multi_score_adam_update_.default,
                                     (*make_adam_args(torch.float32, seed=4, device=device, shapes=[(4, 6), (9,)],
                                                      steps=[1, 5]),
                                      0.1, 0.9, 0.999, 1e-12, torch.tensor(1e-3, **f32), torch.tensor(1.0, **f32),
                                      False, torch.zeros(2, dtype=torch.int64, device=device))),
        "multi_adam_moments_": (C.multi_adam_moments_.default,
                                (*make_adam_args(torch.float32, seed=5, device=device, shapes=[(4, 6), (9,)],
                                                 steps=[1, 5])[1:4],
                                 [1000.0, 1.0 / (1 - 0.999 ** 5)], 0.9, 0.999,
                                 torch.zeros(2, dtype=torch.float64, device=device))),
        "multi_score_adam_mix_update_": (C.multi_score_adam_mix_update_.default,
                                         (scores, *make_adam_args(torch.float32, seed=6, device=device,
                                                                  shapes=[(4, 6), (9,)], steps=[1, 5])[2:4],
                                          torch.tensor([1e-10, 3e-9], **f32), [10.0, 2.0], [1000.0, 200.0], 0.5, 0.1,
                                          1e-12, torch.tensor(1e-3, **f32), torch.tensor(1.0, **f32), False,
                                          torch.zeros(2, dtype=torch.int64, device=device))),
        "bitmask_linear": (C.bitmask_linear.default, (x, w, packed, b)),
        "bitmask_linear/no bias": (C.bitmask_linear.default, (x, w, packed, None)),
        "multi_bitmask_linear": (C.multi_bitmask_linear.default,
                                 (x, w, torch.stack([packed, packed.flip(0)]), torch.tensor([1, 0, 1], device=device), b)),
    }


OPCHECK_CASES = ("pack_mask", "pack_positive", "unpack_mask", "multi_score_update_", "multi_score_adam_update_",
                 "multi_adam_moments_", "multi_score_adam_mix_update_", "bitmask_linear", "bitmask_linear/no bias",
                 "multi_bitmask_linear")


def test_opcheck_covers_every_op():
    cases = opcheck_cases("cpu")
    assert tuple(cases) == OPCHECK_CASES
    assert {name.split("/")[0] for name in cases} == set(_ext.OPS)


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_cpu(case):
    op, args = opcheck_cases("cpu")[case]
    torch.library.opcheck(op, args)


def test_ext_reports_what_it_has():
    assert _ext.has_op("bitmask_linear", torch.device("cpu")) == (True, "")
    assert _ext.has_op("no_such_op", torch.device("cpu"))[0] is False
    ok, why = _ext.has_op("pack_mask", torch.device("cuda"))
    assert ok == _ext.has_cuda() and (ok or "CUDA" in why)
    assert _ext.describe().startswith("abp._C: CPU ops")


# --------------------------------------------------------------------------- CUDA (full sizes)

LAYER_SHAPES = [(3072, 768), (768, 3072), (11008, 4096), (4096, 11008)]  # [N, K]: BERT-base and LLaMA MLPs


def needs_cuda_ops():
    if not _ext.has_cuda():
        pytest.skip("abp._C was built without its CUDA ops")


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", LAYER_SHAPES)
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_cuda_bitmask_linear_full_size(N, K, M):
    needs_cuda_ops()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, w, mask, b = serving_case(M, N, K, dtype, 0.5, seed=M, device="cuda")
        packed = C.pack_mask(mask)
        got = C.bitmask_linear(x, w, packed, b)
        want64 = reference.bitmask_linear(x.double(), w.double(), packed, b.double())
        check_close(got, want64, reference.bitmask_linear(x, w, packed, b), x, w, f"{dtype} M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(768, 3072), (4096, 11008)])
@pytest.mark.parametrize("M", [1, 4, 16, 64])
def test_cuda_multi_bitmask_linear_full_size(N, K, M):
    needs_cuda_ops()
    x, w, _, b = serving_case(M, N, K, torch.bfloat16, 0.5, seed=M, device="cuda")
    g = gen(M)
    packed = torch.stack([C.pack_mask(random_mask((N, K), d, g, "cuda")) for d in (0.3, 0.5, 0.9)])
    task_ids = torch.randint(0, 3, (M,), generator=g).cuda()
    got = C.multi_bitmask_linear(x, w, packed, task_ids, b)
    want64 = reference.multi_bitmask_linear(x.double(), w.double(), packed, task_ids, b.double())
    check_close(got, want64, reference.multi_bitmask_linear(x, w, packed, task_ids, b), x, w, f"M={M}")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 33, 37), (5, 17, 1001), (20, 9, 7), (70, 31, 64)])
@pytest.mark.parametrize("dtype", SERVING_DTYPES)
def test_cuda_bitmask_linear_odd_shapes(M, N, K, dtype):
    """K not a multiple of the vector width, and a misaligned weight: the scalar path."""
    needs_cuda_ops()
    x, w, mask, b = serving_case(M, N, K, dtype, 0.5, seed=K, device="cuda")
    packed = C.pack_mask(mask)
    w_off = torch.empty(N * K + 1, dtype=dtype, device="cuda")[1:].view(N, K).copy_(w)  # data_ptr not 16-B aligned
    for weight in (w, w_off):
        got = C.bitmask_linear(x, weight, packed, b)
        want64 = reference.bitmask_linear(x.double(), w.double(), packed, b.double())
        check_close(got, want64, reference.bitmask_linear(x, w, packed, b), x, w, f"{dtype} {tuple(x.shape)}")
    ids = torch.arange(M, device="cuda") % 2
    two = torch.stack([packed, C.pack_mask(~mask)])
    got = C.multi_bitmask_linear(x, w, two, ids, b)
    want64 = reference.multi_bitmask_linear(x.double(), w.double(), two, ids, b.double())
    check_close(got, want64, reference.multi_bitmask_linear(x, w, two, ids, b), x, w, f"multi {dtype}")


@pytest.mark.gpu
@pytest.mark.parametrize("density", DENSITIES)
def test_cuda_mask_ops(density):
    needs_cuda_ops()
    for shape in [(1,), (9,), (13, 37), (4096, 11008)]:
        m = random_mask(shape, density, gen(1), "cuda")
        packed = C.pack_mask(m)
        assert torch.equal(packed, reference.pack_mask(m))
        assert torch.equal(C.unpack_mask(packed, m.numel()), m.reshape(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_multi_score_update(recovery, grad_dtype):
    needs_cuda_ops()
    shapes = SCORE_SHAPES + [(768, 3072), (4096, 11008), (3, 16385)]  # many chunks, odd tails
    scores, grads = make_update_args(grad_dtype, seed=4, device="cuda", shapes=shapes)
    for active in (1.0, 0.0):
        expect = [s.clone() for s in scores]
        gamma, act = torch.tensor(3e-4, device="cuda"), torch.tensor(active, device="cuda")
        counts = torch.full((len(scores),), 777, dtype=torch.int64, device="cuda")
        want = torch.zeros_like(counts)
        reference.multi_score_update_(expect, grads, 0.5, gamma, act, recovery, want)
        C.multi_score_update_(scores, grads, 0.5, gamma, act, recovery, counts)
        for got, exp in zip(scores, expect):
            assert torch.equal(got, exp)
        assert torch.equal(counts, want)
    # a misaligned score tensor (offset view): the scalar path of the kernel
    buf = torch.randn(1001, device="cuda") * 0.01
    s, s_ref = buf[1:], buf[1:].clone()
    g = torch.randn(1000, device="cuda", dtype=grad_dtype)
    counts, want = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    one, gam = torch.tensor(1.0, device="cuda"), torch.tensor(1e-3, device="cuda")
    reference.multi_score_update_([s_ref], [g], 0.1, gam, one, recovery, want)
    C.multi_score_update_([s], [g], 0.1, gam, one, recovery, counts)
    assert torch.equal(s, s_ref) and torch.equal(counts, want)


@pytest.mark.gpu
@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_multi_score_adam_update(recovery, grad_dtype):
    """The CUDA kernel against the reference on CUDA (torch's CUDA sqrt is correctly rounded, as __fsqrt_rn)."""
    needs_cuda_ops()
    shapes = ADAM_SHAPES + [(768, 3072), (4096, 11008), (3, 16385)]  # many chunks, odd tails
    steps = ADAM_STEPS + [2, 9, 1]
    for active in (1.0, 0.0):
        scores, grads, m, v, inv1, inv2 = make_adam_args(grad_dtype, seed=5, device="cuda", shapes=shapes, steps=steps)
        want_s, want_m, want_v = clone_all(scores, m, v)
        gamma, act = torch.tensor(3e-4, device="cuda"), torch.tensor(active, device="cuda")
        counts = torch.full((len(scores),), 777, dtype=torch.int64, device="cuda")
        want = torch.zeros_like(counts)
        reference.multi_score_adam_update_(want_s, grads, want_m, want_v, inv1, inv2, 1e-3, 0.9, 0.999, 1e-12, gamma,
                                           act, recovery, want)
        C.multi_score_adam_update_(scores, grads, m, v, inv1, inv2, 1e-3, 0.9, 0.999, 1e-12, gamma, act, recovery,
                                   counts)
        for got, exp in zip(scores + m + v, want_s + want_m + want_v):
            assert torch.equal(got, exp)
        assert torch.equal(counts, want)
    # misaligned score / moment tensors (offset views): the scalar path of the kernel
    bufs = [torch.rand(1001, device="cuda") * 1e-6 for _ in range(3)]
    s, m, v = [[b[1:]] for b in bufs]
    ref = clone_all(s, m, v)
    g = [torch.randn(1000, device="cuda").to(grad_dtype) * 1e-5]
    counts, want = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.zeros(1, dtype=torch.int64, device="cuda")
    one, gam = torch.tensor(1.0, device="cuda"), torch.tensor(1e-3, device="cuda")
    reference.multi_score_adam_update_(ref[0], g, ref[1], ref[2], [2.0], [30.0], 0.1, 0.9, 0.999, 1e-12, gam, one,
                                       recovery, want)
    C.multi_score_adam_update_(s, g, m, v, [2.0], [30.0], 0.1, 0.9, 0.999, 1e-12, gam, one, recovery, counts)
    assert all(torch.equal(a, b) for a, b in zip(s + m + v, ref[0] + ref[1] + ref[2])) and torch.equal(counts, want)


@pytest.mark.gpu
@pytest.mark.parametrize("recovery", [True, False])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_cuda_adam_mix_two_passes(recovery, grad_dtype):
    """The CUDA passes against the reference on CUDA: the moments bit for bit, the sums to float64 rounding, lr·d
    within 4e-6 (CUDA's logf and expf against torch's) and counts consistent with the scores."""
    needs_cuda_ops()
    shapes = MIX_SHAPES + [(768, 3072), (3, 16385)]
    steps = ADAM_STEPS + [5, 2, 9]
    scores, grads, m, v, inv1, inv2 = make_adam_args(grad_dtype, seed=15, device="cuda", shapes=shapes, steps=steps)
    want_s, want_m, want_v = clone_all(scores, m, v)
    sums, want = (torch.zeros(len(m), dtype=torch.float64, device="cuda") for _ in range(2))
    C.multi_adam_moments_(grads, m, v, inv2, 0.9, 0.999, sums)
    reference.multi_adam_moments_(grads, want_m, want_v, inv2, 0.9, 0.999, want)
    assert all(torch.equal(a, b) for a, b in zip(m + v, want_m + want_v))
    torch.testing.assert_close(sums, want, rtol=1e-13, atol=0)
    mean_sq = (want / torch.tensor([max(1, t.numel()) for t in m], dtype=torch.float64, device="cuda")).float()
    gamma, one = torch.tensor(3e-4, device="cuda"), torch.tensor(1.0, device="cuda")
    counts, want_counts = (torch.zeros(len(m), dtype=torch.int64, device="cuda") for _ in range(2))
    s0 = [t.clone() for t in scores]
    C.multi_score_adam_mix_update_(scores, m, v, mean_sq, inv1, inv2, 0.5, 1e-3, 1e-12, gamma, one, recovery, counts)
    reference.multi_score_adam_mix_update_(want_s, want_m, want_v, mean_sq, inv1, inv2, 0.5, 1e-3, 1e-12, gamma, one,
                                           recovery, want_counts)
    for got, exp, before in zip(scores, want_s, s0):
        lr_d = (exp.double() - before.double()).abs() + 3e-4  # ≥ |lr·d|
        ulp = 2.0 ** -23 * torch.maximum(before.double().abs(), exp.double().abs())
        assert bool(((got.double() - exp.double()).abs() <= 4e-6 * lr_d + ulp).all())
    assert torch.equal(counts, torch.stack([(s <= 0).sum() for s in scores]))


@pytest.mark.gpu
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_cuda(case):
    needs_cuda_ops()
    op, args = opcheck_cases("cuda")[case]
    torch.library.opcheck(op, args)
