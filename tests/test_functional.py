"""masked_linear forward and every gradient against a float64 reference, on the reference backend."""
import zlib

import pytest
import torch

import abp
from abp import reference as R

def assert_close(got, ref, dtype, reduction):
    """max error within 8·eps·sqrt(reduction) of the reference's RMS (a length-``reduction`` dot product
    in ``dtype``; fp64 inputs still meet fp32 masks, so they get fp32's eps). Shapes must match."""
    assert got.shape == ref.shape, f"shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not ref.numel():
        return
    eps = torch.finfo(torch.float32 if dtype == torch.float64 else dtype).eps
    scale = ref.double().pow(2).mean().sqrt().item() + 1e-30
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= 8 * eps * max(reduction, 1) ** 0.5 * scale, f"max error {err:.3g} vs RMS {scale:.3g} ({dtype})"


def _oracle(x, w, s, b, bs, dy, t_l, t_s):
    """float64 formulas, written out independently of abp.reference."""
    x, w, s, dy = x.double(), w.double(), s.double(), dy.double()
    m = (s > 0).double() if t_l is None else torch.sigmoid(t_l * s)
    y = x @ (w * m).T
    if b is not None:
        mb = 1.0 if bs is None else ((bs > 0).double() if t_l is None else torch.sigmoid(t_l * bs.double()))
        y = y + b.double() * mb
    sig = lambda z: torch.sigmoid(t_s * z.double())  # noqa: E731
    ds = (dy.T @ x) * w * t_s * sig(s) * (1 - sig(s))
    dbs = None if bs is None else dy.sum(0) * b.double() * t_s * sig(bs) * (1 - sig(bs))
    return y, dy @ (w * m), ds, dbs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (97, 33, 130)])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("bias", ["none", "bias", "masked_bias"])
@pytest.mark.parametrize("t_l", [None, 30.0])
def test_masked_linear_matches_float64(dtype, shape, density, bias, t_l):
    M, K, N = shape
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, density, bias, t_l)).encode()))  # not hash(): salted per process
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_(True)
    w = torch.randn(N, K, generator=g).to(dtype)
    s = (torch.rand(N, K, generator=g) - (1 - density)).float() if 0 < density < 1 else \
        torch.full((N, K), 0.01 if density == 1 else -0.01)
    s.add_(torch.randn(N, K, generator=g) * 1e-3)
    s.requires_grad_(True)
    b = torch.randn(N, generator=g).to(dtype) if bias != "none" else None
    bs = torch.randn(N, generator=g).float().requires_grad_(True) if bias == "masked_bias" else None
    y = abp.masked_linear(x, w, s, b, bs, t_l=t_l, t_s=1.5, backend="reference")
    dy = torch.randn_like(y)
    y.backward(dy)
    ry, rdx, rds, rdbs = _oracle(x.detach(), w, s.detach(), b, bs.detach() if bs is not None else None, dy, t_l, 1.5)
    assert_close(y, ry, dtype, K)
    assert_close(x.grad, rdx, dtype, N)
    assert_close(s.grad, rds, dtype, M)  # fp32, accumulated over the M tokens from dtype inputs
    assert s.grad.dtype == torch.float32
    if bs is not None:
        assert_close(bs.grad, rdbs, dtype, M)


def test_leading_dims_and_no_weight_grad():
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    lin = abp.MaskedLinear(6, 5)
    y = lin(x)
    assert y.shape == (2, 3, 4, 5)
    y.sum().backward()
    assert lin.weight.grad is None and lin.scores.grad is not None and x.grad.shape == x.shape


def test_surrogate_is_not_the_forward_derivative():
    """Hard forward has zero derivative; the surrogate must still give a gradient (the paper's trick)."""
    s = torch.full((3, 4), 0.5, requires_grad=True)
    y = abp.masked_linear(torch.ones(2, 4), torch.ones(3, 4), s)
    y.sum().backward()
    sig = torch.sigmoid(torch.tensor(0.5))
    torch.testing.assert_close(s.grad, torch.full((3, 4), 2 * float(sig * (1 - sig))))


@pytest.mark.parametrize("t_s", [1.0, 1.5])
def test_surrogate_factor_keeps_relative_accuracy_far_from_zero(t_s):
    """σ'(θ) in fp32 to a few ulps *relative* at every θ, not just near 0: ``σ·(1−σ)`` cancels once
    σ → 1 (a random bias score of 3 already lost ~4 bits; past θ ≈ 17 it was exactly 0)."""
    theta = torch.linspace(-40, 40, 8001)
    z = (theta * t_s).double()  # the fp32 product is the input; e^−|z| amplifies its rounding by |z|
    ref = t_s * torch.sigmoid(z) * torch.sigmoid(-z)
    got = R.surrogate_factor(theta, t_s)
    assert got.dtype == torch.float32
    rel = ((got.double() - ref).abs() / ref).max().item()
    assert rel <= 4 * torch.finfo(torch.float32).eps, f"worst relative error {rel:.3g}"


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(3, 5)), "last dim"),
    (dict(s=torch.randn(4, 6, dtype=torch.float16)), "float32"),
    (dict(s=torch.randn(4, 5)), "scores shape"),
    (dict(x=torch.randn(3, 6, dtype=torch.float16)), "dtype"),
    (dict(w=torch.randn(4, 6, requires_grad=True)), "frozen"),
    (dict(b=torch.randn(5)), "bias shape"),
])
def test_bad_input_is_named(bad, match):
    args = dict(x=torch.randn(3, 6), w=torch.randn(4, 6), s=torch.randn(4, 6), b=None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        abp.masked_linear(args["x"], args["w"], args["s"], args["b"])


def test_meta_tensors_propagate_shapes():
    """Meta-device models (deferred init, FSDP) trace through the masked layers without data."""
    x, w, s = (torch.empty(shape, device="meta") for shape in ((2, 3, 6), (4, 6), (4, 6)))
    assert abp.masked_linear(x, w, s).shape == (2, 3, 4)


def test_embedding_devices_are_checked():
    emb = abp.MaskedEmbedding(torch.nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="one device"):
        emb(torch.tensor([1, 2], device="meta"))


def test_unknown_or_unavailable_backend_is_an_error():
    x, w, s = torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="unknown abp backend"):
        abp.masked_linear(x, w, s, backend="magic")
    with pytest.raises(abp.BackendUnavailableError, match="cuda"):
        abp.masked_linear(x, w, s, backend="cuda")


def test_backend_recorded_and_env(monkeypatch):
    args = lambda: (torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3))  # noqa: E731
    abp.masked_linear(*args())
    assert abp.last_backend("masked_matmul") == "reference"
    assert abp.last_backend("masked_matmul", why=True) == "reference"  # nothing passed over on CPU
    # ABP_BACKEND is a preference: cuda has no masked_matmul, so auto runs it and says why
    monkeypatch.setenv("ABP_BACKEND", "cuda")
    abp.masked_linear(*args())
    assert abp.last_backend("masked_matmul") == "reference"
    assert "cuda from ABP_BACKEND passed over" in abp.last_backend("masked_matmul", why=True)
    # ...while the call's own backend= is strict
    with pytest.raises(abp.BackendUnavailableError, match="cuda"):
        abp.masked_linear(*args(), backend="cuda")
    with abp.use_backend("cpp"):  # use_backend too: cpp implements pack_mask (where the extension is built)
        abp.pack_mask(torch.ones(9, dtype=torch.bool))
    from abp import _ext

    want = "cpp" if _ext.has_op("pack_mask", torch.device("cpu"))[0] else "reference"
    assert abp.last_backend("pack_mask") == want
    with abp.use_backend("triton"):  # triton has no pack_mask: auto, recorded
        abp.pack_mask(torch.ones(9, dtype=torch.bool))
        assert "triton from use_backend passed over: abp has no triton implementation" in abp.last_backend("pack_mask", why=True)


def test_a_preferred_backend_that_cannot_run_warns(monkeypatch):
    """A preference for a backend that implements the op but cannot run here (a broken fast path) is not silent."""
    from abp import backends

    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "available", lambda b, op, dev: (b == "reference", f"{b} is broken here"))
    with pytest.warns(UserWarning, match="cannot run on the triton backend asked for by use_backend"):
        with abp.use_backend("triton"):
            abp.masked_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(4, 3))
    assert abp.last_backend("masked_matmul", why=True) == "reference (triton from use_backend passed over: triton is broken here)"


def test_a_layers_backend_is_a_preference():
    """A layer's (a config's) backend names its training kernels; ops it lacks take auto instead of failing."""
    from abp import backends

    lin = abp.MaskedLinear.from_linear(torch.nn.Linear(3, 4))
    lin.backend = "cuda"  # cuda implements serving and the score update, not masked_matmul
    lin(torch.randn(2, 3))
    assert backends.last_backend("masked_matmul") == "reference"
    with pytest.raises(ValueError, match="unknown abp backend"):
        backends.prefer("magic")


def test_fused_update_equals_separate_step():
    """Fused backward update == reference grad then SGD step; dX uses the pre-update mask."""
    torch.manual_seed(0)
    x = torch.randn(9, 7, requires_grad=True)
    w, s0 = torch.randn(5, 7), torch.randn(5, 7) * 0.05
    dy = torch.randn(9, 5)
    gamma, active = torch.tensor(0.003), torch.tensor(1.0)
    for recovery in (True, False):
        s = s0.clone().requires_grad_(True)
        counts = torch.zeros(2, dtype=torch.int64)
        sgd = abp.ScoreSGD(lr=0.7, gamma=gamma, active=active, recovery=recovery)
        x.grad = None
        abp.masked_linear(x, w, s, fused_update=sgd, counts=counts).backward(dy)
        assert s.grad is None
        ref_dx = R.masked_linear_dx(dy, w, s0)
        ds, _ = R.score_grad(dy, x.detach(), w, s0)
        ref_s = s0.clone()
        R.score_update_(ref_s, ds, 0.7, gamma, active, recovery)
        torch.testing.assert_close(x.grad, ref_dx)
        torch.testing.assert_close(s.detach(), ref_s)
        assert int(counts[0]) == int((ref_s <= 0).sum())
        if not recovery:
            assert not bool(((s0 <= 0) & (s.detach() > 0)).any())


def _opcheck_cases() -> dict:
    """One reference-backend case per abp:: op (schema, fake kernel, autograd registration), by op name."""
    g = torch.Generator().manual_seed(5)
    x, w, dy = torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    s, b, bs = torch.randn(3, 7, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.5
    packed = abp.pack_mask(mask)
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    ops = torch.ops.abp
    return {
        "masked_matmul": (ops.masked_matmul.default, (x, w, s.clone().requires_grad_(True), b, bs, None, 1.0, "reference")),
        "masked_matmul_dx": (ops.masked_matmul_dx.default, (dy, w, s, 30.0, "reference")),
        "masked_matmul_bits": (ops.masked_matmul_bits.default,
                               (x, w, s.clone().requires_grad_(True), abp.pack_mask(s > 0), b,
                                bs.clone().requires_grad_(True), 1.0, "reference")),
        "masked_matmul_bits_dx": (ops.masked_matmul_bits_dx.default, (dy, w, packed, "reference")),
        "score_grad": (ops.score_grad.default, (dy, x, w, s, b, bs, 1.0, "reference")),
        "score_grad_update_": (ops.score_grad_update_.default,
                               (dy, x, w, s.clone(), b, bs.clone(), torch.zeros(2, dtype=torch.int64), 0.1, f32(1e-3),
                                f32(1.0), True, 1.0, "reference")),
        "multi_score_update_": (ops.multi_score_update_.default,
                                ([s.clone(), bs.clone()], [s, bs], 0.1, f32(1e-3), f32(1.0), False,
                                 torch.zeros(2, dtype=torch.int64), "reference")),
        "multi_score_adam_update_": (ops.multi_score_adam_update_.default,
                                     ([s.clone(), bs.clone()], [s, bs], [s * 0.1, bs * 0.1], [s * s, bs * bs],
                                      [10.0, 1.0 / (1 - 0.9 ** 2)], [1000.0, 1.0 / (1 - 0.999 ** 2)], 0.1, 0.9, 0.999,
                                      1e-12, f32(1e-3), f32(1.0), False, torch.zeros(2, dtype=torch.int64),
                                      "reference")),
        "multi_adam_moments_": (ops.multi_adam_moments_.default,
                                ([s, bs], [s * 0.1, bs * 0.1], [s * s, bs * bs], [1000.0, 1.0 / (1 - 0.999 ** 2)], 0.9,
                                 0.999, torch.zeros(2, dtype=torch.float64), "reference")),
        "multi_score_adam_mix_update_": (ops.multi_score_adam_mix_update_.default,
                                         ([s.clone(), bs.clone()], [s * 0.1, bs * 0.1], [s * s, bs * bs],
                                          torch.tensor([0.5, 2.0]), [10.0, 1.0 / (1 - 0.9 ** 2)],
                                          [1000.0, 1.0 / (1 - 0.999 ** 2)], 0.5, 0.1, 1e-12, f32(1e-3), f32(1.0), True,
                                          torch.zeros(2, dtype=torch.int64), "reference")),
        "pack_mask": (ops.pack_mask.default, (mask, "reference")),
        "pack_positive": (ops.pack_positive.default, (s, "reference")),
        "unpack_mask": (ops.unpack_mask.default, (packed, mask.numel(), "reference")),
        "bitmask_linear": (ops.bitmask_linear.default, (x, w, packed, b, "reference")),
        "multi_bitmask_linear": (ops.multi_bitmask_linear.default,
                                 (x, w, torch.stack([packed, abp.pack_mask(~mask)]), torch.tensor([0, 1, 1, 0, 1]), b,
                                  "reference")),
    }


@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 40000)])
def test_sqrt_rn_is_the_correctly_rounded_root(shape):
    """The reference's fp32 root (Adam's denominator) is IEEE's, which numpy's is: torch.sqrt on CPU may be an ulp
    off (see reference.sqrt_rn), the compiled ops are not."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(len(shape))
    x = torch.rand(shape, generator=g) * 10.0 ** torch.randint(-30, 30, shape, generator=g)
    want = np.sqrt(x.numpy())
    assert np.array_equal(R.sqrt_rn(x).numpy(), want)
    if x.dim() == 2:
        assert np.array_equal(R.sqrt_rn(x.t()).numpy(), want.T)  # a strided input
    y = x.clone()
    assert R.sqrt_rn(y, out=y) is y and np.array_equal(y.numpy(), want)  # in place


def test_opcheck_covers_every_op():
    from abp import backends

    assert set(_opcheck_cases()) == set(backends.OPS)


@pytest.mark.parametrize("op", sorted(_opcheck_cases()))
def test_opcheck(op):
    fn, args = _opcheck_cases()[op]
    torch.library.opcheck(fn, args)


def test_torch_compile_traces_the_op():
    lin = abp.MaskedLinear(8, 4)
    x = torch.randn(3, 8)
    compiled = torch.compile(lin, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), lin(x))


def test_a_wrong_dtype_is_a_type_error_and_a_wrong_shape_a_value_error():
    """One exception type per kind of mistake, across the functional API."""
    w, s = torch.randn(4, 3), torch.randn(4, 3)
    lin = abp.MaskedLinear.from_linear(torch.nn.Linear(3, 4))
    packed = abp.pack_mask(lin.mask())
    wrong_dtype = [
        lambda: abp.masked_linear(torch.randn(2, 3), w, s.double()),
        lambda: abp.masked_linear(torch.randn(2, 3), w, s, torch.zeros(4), torch.zeros(4, dtype=torch.float16)),
        lambda: abp.masked_embedding(torch.tensor([1.0]), w, s),
        lambda: abp.masked_embedding(torch.tensor([1]), w, s.half()),
        lambda: abp.bitmask_linear(torch.randn(2, 3), w, packed, torch.zeros(4, dtype=torch.float16)),
        lambda: abp.bitmask_linear(torch.randn(2, 3), w, packed.to(torch.int32)),
        lambda: abp.multi_bitmask_linear(torch.randn(2, 3), w, packed[None], torch.zeros(2)),
        lambda: abp.pack_mask(torch.ones(3)),
    ]
    wrong_shape = [
        lambda: abp.masked_linear(torch.randn(2, 3), w, s[:2]),
        lambda: abp.masked_linear(torch.randn(2, 3), w, s, torch.zeros(4), torch.zeros(3)),
        lambda: abp.masked_embedding(torch.tensor([1]), w, s[:2]),
        lambda: abp.bitmask_linear(torch.randn(2, 3), w, packed, torch.zeros(3)),
        lambda: abp.bitmask_linear(torch.randn(2, 3), w, packed[:1]),
        lambda: abp.multi_bitmask_linear(torch.randn(2, 3), w, packed[None], torch.zeros(3, dtype=torch.long)),
        lambda: abp.unpack_mask(packed, (5, 5)),
    ]
    for i, call in enumerate(wrong_dtype):
        with pytest.raises(TypeError):
            call()
    for i, call in enumerate(wrong_shape):
        with pytest.raises(ValueError):
            call()


def _triton_on_cpu():
    from abp import _triton_bridge

    return _triton_bridge.available(torch.device("cpu"))


_TRITON_CPU = _triton_on_cpu()
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(not _TRITON_CPU[0], reason=_TRITON_CPU[1]))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead,K,N", [((0,), 6, 5), ((2, 0), 6, 5), ((4,), 0, 5), ((4,), 6, 0)],
                         ids=["no-tokens", "no-tokens-3d", "no-inputs", "no-outputs"])
def test_zero_size_dims(backend, lead, K, N):
    """A dimension of size 0 (no tokens, in_features 0 or out_features 0): the forward has shape
    ``(*lead, N)``, every gradient has its tensor's shape and the float64 value (an empty sum is 0:
    with no tokens the score grads are exactly zero; with no inputs ``y`` is the masked bias and the
    bias scores still get their gradient)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((lead, K, N)).encode()))
    x = torch.randn(*lead, K, generator=g).requires_grad_(True)
    w, b = torch.randn(N, K, generator=g), torch.randn(N, generator=g)
    s = torch.randn(N, K, generator=g).requires_grad_(True)
    bs = torch.randn(N, generator=g).requires_grad_(True)
    y = abp.masked_linear(x, w, s, b, bs, t_s=1.5, backend=backend)
    assert y.shape == (*lead, N)
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    assert x.grad.shape == x.shape and s.grad.shape == s.shape and bs.grad.shape == bs.shape
    M = x.shape[:-1].numel()
    ry, rdx, rds, rdbs = _oracle(x.detach().reshape(M, K), w, s.detach(), b, bs.detach(), dy.reshape(M, N), None, 1.5)
    assert_close(y.reshape(M, N), ry, torch.float32, K)
    assert_close(x.grad.reshape(M, K), rdx, torch.float32, N)
    assert_close(s.grad, rds, torch.float32, M)
    assert_close(bs.grad, rdbs, torch.float32, M)
    if M == 0:
        assert not s.grad.any() and not bs.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recovery", [True, False])
def test_fused_update_without_tokens_still_applies_gamma(backend, recovery):
    """An empty batch through the fused-update path: the backward still runs the step, which with a zero
    gradient is ``θ ← θ − active·γ`` (the reference's, bit for bit), and counts the θ ≤ 0 it leaves."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(0, 7, generator=g).requires_grad_(True)
    w, b = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    s0, bs0 = torch.randn(5, 7, generator=g) * 0.05, torch.randn(5, generator=g) * 0.05
    s0[0, :3] = bs0[0] = 0.0  # with γ < 0 and recovery=False the clamp keeps these at 0
    gamma, active = torch.tensor(0.01 if recovery else -0.02), torch.tensor(1.0)
    s, bs = s0.clone(), bs0.clone()
    counts = torch.full((2,), 99, dtype=torch.int64)
    sgd = abp.ScoreSGD(lr=0.5, gamma=gamma, active=active, recovery=recovery)
    y = abp.masked_linear(x, w, s, b, bs, fused_update=sgd, counts=counts, backend=backend)
    assert y.shape == (0, 5)
    y.backward(torch.zeros(0, 5))
    ref_s, ref_bs = s0.clone(), bs0.clone()
    want = [int(R.score_update_(ref_s, torch.zeros_like(s0), 0.5, gamma, active, recovery)),
            int(R.score_update_(ref_bs, torch.zeros_like(bs0), 0.5, gamma, active, recovery))]
    assert not torch.equal(ref_s, s0), "test precondition: the γ step moves the scores"
    assert torch.equal(s, ref_s) and torch.equal(bs, ref_bs)
    assert counts.tolist() == want
    assert x.grad.shape == (0, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_update_under_torch_compile(backend):
    """``torch.compile(backend="aot_eager")`` of a masked layer with the fused update, forward and backward,
    three steps (γ changed in place between them, as a schedule does): the outputs, input grads, updated
    scores and counts equal eager's at every step. Graph breaks would be allowed; different results not."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(11)
    x0, w, b = torch.randn(9, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    s0, bs0 = torch.randn(5, 7, generator=g) * 0.05, torch.randn(5, generator=g) * 0.05
    dys = [torch.randn(9, 5, generator=g) for _ in range(3)]

    def run(compiled: bool):
        s, bs = s0.clone(), bs0.clone()
        counts = torch.zeros(2, dtype=torch.int64)
        sgd = abp.ScoreSGD(lr=0.7, gamma=torch.tensor(0.003), active=torch.tensor(1.0), recovery=False)

        def layer(x):
            return abp.masked_linear(x, w, s, b, bs, t_l=None, t_s=1.5, backend=backend, fused_update=sgd,
                                     counts=counts)

        f = torch.compile(layer, backend="aot_eager") if compiled else layer
        steps = []
        for i, dy in enumerate(dys):
            x = x0.clone().requires_grad_(True)
            y = f(x)
            y.backward(dy)
            steps.append((y.detach(), x.grad, s.clone(), bs.clone(), counts.clone()))
            sgd.gamma.fill_(0.003 * (i + 2))
        return steps

    eager = run(False)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(True)
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile captured no graph: this compared eager with eager"
    assert not torch.equal(eager[0][2], s0) and not torch.equal(eager[2][2], eager[1][2]), "test precondition"
    for i, (e, c) in enumerate(zip(eager, compiled)):
        for name, a, bb in zip(("y", "x.grad", "scores", "bias_scores", "counts"), e, c):
            breaks = dict(counters["graph_break"])
            assert torch.equal(a, bb), f"step {i}: {name} differs under torch.compile (graph breaks: {breaks})"


@pytest.mark.parametrize("bits", [False, True])
def test_eager_functions_equal_the_custom_ops(bits):
    """Eager mode runs the op bodies through autograd Functions (no dispatcher); torch.compile traces the custom ops.
    Both give the same output and the same gradients for x, the scores and the bias scores."""
    from abp import _ops

    g = torch.Generator().manual_seed(9)
    x, w, b = torch.randn(6, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    s, bs = torch.randn(5, 7, generator=g), torch.randn(5, generator=g)
    dy = torch.randn(6, 5, generator=g)
    outs = []
    for op in ((_ops.EagerMaskedMatmulBits.apply, _ops.masked_matmul_bits) if bits
               else (_ops.EagerMaskedMatmul.apply, _ops.masked_matmul)):
        xi, si, bsi = x.clone().requires_grad_(), s.clone().requires_grad_(), bs.clone().requires_grad_()
        args = (xi, w, si, abp.pack_mask(s > 0), b, bsi, 1.0, "reference") if bits else \
            (xi, w, si, b, bsi, None, 1.0, "reference")
        y = op(*args)
        y.backward(dy)
        outs.append((y.detach(), xi.grad, si.grad, bsi.grad))
    for a, c in zip(*outs):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
