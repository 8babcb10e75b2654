"""The hard-mask path that reads packed bits (the v2 kernels' contract), on CPU through the reference backend.

- ``masked_linear(..., packed=pack_mask(θ > 0))`` equals the θ path in value and in every gradient;
- ``MaskedLinear`` keeps its bits equal to ``1[θ>0]`` after every way the scores move (Adam / SGD steps through the
  multi-tensor op, the fused in-backward update, no recovery, ``set_mask``, ``load_state_dict``, a mask file): a
  property test over random sequences of them;
- when a layer trains from bits (``train_bits``, ``ABP_KERNELS``, the backend asked for);
- a short ABP run ends with the same mask whether its layers read bits or scores.

The Triton kernels behind the bits ops are checked against float64 in ``test_bitmask_kernels.py``.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import abp
from abp import backends
from abp.train.score_optim import ScoreOptimizer


def _operands(n=7, k=33, m=5, bias=True, bias_scores=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g, dtype=dtype)
    w = torch.randn(n, k, generator=g, dtype=dtype)
    s = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g, dtype=dtype) if bias else None
    bs = torch.randn(n, generator=g) if (bias and bias_scores) else None
    return x, w, s, b, bs


@pytest.mark.parametrize("bias,bias_scores", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("fill", ["random", "none", "all"])
def test_bits_equal_the_scores_path_forward_and_backward(bias, bias_scores, fill):
    x, w, s, b, bs = _operands(bias=bias, bias_scores=bias_scores)
    if fill != "random":
        s = s.abs() * (1 if fill == "all" else -1)
    outs, grads = [], []
    for packed in (None, abp.pack_mask(s > 0)):
        xi, si = x.clone().requires_grad_(), s.clone().requires_grad_()
        bsi = bs.clone().requires_grad_() if bs is not None else None
        y = abp.masked_linear(xi, w, si, b, bsi, backend="reference", packed=packed)
        y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
        outs.append(y.detach())
        grads.append((xi.grad, si.grad, bsi.grad if bsi is not None else None))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert backends.last_backend("masked_matmul_bits_dx") == "reference"
    for g1, g0 in zip(grads[1], grads[0]):
        if g0 is None:
            assert g1 is None
        else:
            torch.testing.assert_close(g1, g0, rtol=1e-12, atol=1e-12)


def test_bits_refuse_a_soft_mask_and_a_wrong_size():
    x, w, s, b, bs = _operands()
    packed = abp.pack_mask(s > 0)
    with pytest.raises(ValueError, match="hard mask"):
        abp.masked_linear(x, w, s, b, bs, t_l=1e5, packed=packed)
    with pytest.raises(ValueError, match="bytes per mask"):
        abp.masked_linear(x, w, s, b, bs, packed=packed[:-1])
    with pytest.raises(TypeError, match="uint8"):
        abp.masked_linear(x, w, s, b, bs, packed=packed.to(torch.int32))


def _layer(seed=0, mask_bias=True):
    torch.manual_seed(seed)
    lin = abp.MaskedLinear(33, 7, mask_bias=mask_bias, score_init_spread=1.0)
    with torch.no_grad():
        lin.scores.normal_(0.0, 0.01)
        lin.bias_scores.normal_(0.0, 0.01)
    return lin


def test_when_a_layer_trains_from_bits(monkeypatch):
    lin = _layer()
    x = torch.randn(3, 33)
    monkeypatch.delenv("ABP_KERNELS", raising=False)
    monkeypatch.delenv("ABP_BACKEND", raising=False)
    assert not lin._trains_from_bits(x)  # CPU, auto: the reference reads the scores
    lin.backend = "triton"
    assert lin._trains_from_bits(x)  # the Triton kernels asked for: v2 by default
    monkeypatch.setenv("ABP_KERNELS", "v1")
    assert not lin._trains_from_bits(x)
    monkeypatch.setenv("ABP_KERNELS", "v3")
    with pytest.raises(ValueError, match="ABP_KERNELS must be one of v2, v1"):
        lin._trains_from_bits(x)
    monkeypatch.setenv("ABP_KERNELS", "v2")
    lin.train_bits = False
    assert not lin._trains_from_bits(x)
    lin.train_bits, lin.backend = True, None
    assert lin._trains_from_bits(x)
    lin.t_l = 1e5  # a soft mask has no bits
    assert not lin._trains_from_bits(x)
    lin.t_l = None
    lin(x).sum().backward()
    assert backends.last_backend("masked_matmul_bits") == "reference"


def _expect_bits_match(lin: abp.MaskedLinear, x: torch.Tensor) -> None:
    want = abp.pack_mask(lin.scores.detach() > 0)
    assert torch.equal(lin.packed_mask(), want)
    with torch.no_grad():
        lin.train_bits = False
        ref = lin(x)
        lin.train_bits = True
        torch.testing.assert_close(lin(x), ref, rtol=0, atol=0)


OPS = ("sgd", "adam", "fused", "norecovery", "set_mask", "load_state_dict", "mask_file")


@settings(max_examples=20, deadline=None)
@given(ops=st.lists(st.sampled_from(OPS), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_bits_follow_every_way_the_scores_move(ops, seed, tmp_path_factory):
    lin = _layer(seed)
    lin.train_bits = True
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 33, generator=g)
    lin(x)  # bits packed once before anything moves
    for op in ops:
        if op in ("sgd", "adam", "fused", "norecovery"):
            opt = ScoreOptimizer(lin, lr=0.02, target_sparsity=0.9, prune_steps=3, gamma=0.004,
                                 optimizer="adam" if op == "adam" else "sgd", fused=op == "fused",
                                 recovery=op != "norecovery", backend="reference" if op == "fused" else "cpp")
            with abp.use_backend("reference"):
                lin(torch.randn(4, 33, generator=g)).pow(2).sum().backward()
            opt.step()
            lin.fused_update = None
        elif op == "set_mask":
            lin.set_mask(torch.rand(7, 33, generator=g) < 0.5, torch.rand(7, generator=g) < 0.5)
        elif op == "load_state_dict":
            state = {k: (torch.randn(v.shape, generator=g) if "scores" in k else v) for k, v in lin.state_dict().items()}
            lin.load_state_dict(state)
        else:  # a mask file written by another run over the same base weights, loaded into this layer
            other = _layer(seed + 1)
            with torch.no_grad():
                other.weight.copy_(lin.weight)
                other.bias.copy_(lin.bias)
            model, target = torch.nn.Sequential(other), torch.nn.Sequential(lin)
            path = tmp_path_factory.mktemp("mask") / "m.safetensors"
            abp.save_mask(model, path)
            abp.load_mask(target, path)
            assert torch.equal(lin.mask(), other.mask())
        _expect_bits_match(lin, x)


def test_a_short_run_gives_the_same_mask_from_bits_and_from_scores():
    masks = []
    for bits in (False, True):
        torch.manual_seed(0)
        net = torch.nn.Sequential(abp.MaskedLinear(24, 40, score_init_spread=1.0), torch.nn.ReLU(),
                                  abp.MaskedLinear(40, 3, score_init_spread=1.0))
        for m in (net[0], net[2]):
            m.train_bits = bits
        opt = ScoreOptimizer(net, lr=0.05, target_sparsity=0.5, prune_steps=20, optimizer="adam")
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            x = torch.randn(16, 24, generator=g)
            y = torch.randint(0, 3, (16,), generator=g)
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        masks.append([m.mask() for m in (net[0], net[2])])
        if bits:
            assert backends.last_backend("masked_matmul_bits") == "reference"
    assert 0.3 < abp.sparsity(net) < 0.7  # the run pruned: the masks compared are not the initial ones
    for a, b in zip(*masks):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_the_v2_and_v1_kernels_learn_the_same_mask(monkeypatch):
    """The same short run on the Triton kernels, v2 (bits; the masked weight as the MMA's right operand, then as
    its left) against v1 (scores): the same mask. fp32 with exact products; the kernels may order their sums
    differently, so a score that ends within rounding of 0 may differ: at most 0.1 % of the mask."""
    torch.backends.cuda.matmul.allow_tf32 = False
    masks, ran = [], []
    for version, operand in (("v1", "b"), ("v2", "b"), ("v2", "a")):
        monkeypatch.setenv("ABP_KERNELS", version)
        monkeypatch.setenv("ABP_BITMASK_OPERAND", operand)
        torch.manual_seed(0)
        net = torch.nn.Sequential(abp.MaskedLinear(96, 160, score_init_spread=1.0), torch.nn.ReLU(),
                                  abp.MaskedLinear(160, 3, score_init_spread=1.0)).cuda()
        opt = ScoreOptimizer(net, lr=0.05, target_sparsity=0.5, prune_steps=20, optimizer="adam")
        g = torch.Generator().manual_seed(1)
        for _ in range(30):
            x = torch.randn(64, 96, generator=g).cuda()
            y = torch.randint(0, 3, (64,), generator=g).cuda()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        masks.append(torch.cat([m.mask().flatten() for m in (net[0], net[2])]))
        ran.append(backends.last_backend("masked_matmul_bits" if version == "v2" else "masked_matmul"))
    assert ran == ["triton"] * 3
    for other in masks[1:]:
        assert (masks[0] != other).float().mean().item() <= 1e-3
