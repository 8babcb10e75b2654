"""Serving from 1-bit masks: abp.bitmask_linear / abp.multi_bitmask_linear and MaskedLinear's inference path."""
import pytest
import torch

import abp
from abp import _ext, backends

BACKENDS = ["reference"] + (["cpp"] if _ext.has_op("bitmask_linear", torch.device("cpu"))[0] else [])


def _layer(n=13, k=21, seed=0):
    torch.manual_seed(seed)
    lin = abp.MaskedLinear.from_linear(torch.nn.Linear(k, n))
    with torch.no_grad():
        lin.scores.copy_(torch.randn(n, k))
    return lin


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitmask_linear_equals_masked_linear(backend):
    lin = _layer()
    x = torch.randn(2, 3, 21)
    packed = abp.pack_mask(lin.mask())
    y = abp.bitmask_linear(x, lin.weight, packed, lin.bias, backend=backend)
    assert y.shape == (2, 3, 13) and backends.last_backend("bitmask_linear") == backend
    torch.testing.assert_close(y, abp.masked_linear(x, lin.weight, lin.scores.detach(), lin.bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_bitmask_linear_rows_take_their_task(backend):
    lin = _layer()
    masks = [torch.rand(13, 21) < d for d in (0.0, 0.5, 1.0)]
    packed = torch.stack([abp.pack_mask(m) for m in masks])
    x, ids = torch.randn(7, 21), torch.tensor([2, 0, 1, 1, 2, 0, 1])
    y = abp.multi_bitmask_linear(x, lin.weight, packed, ids, lin.bias, backend=backend)
    for i, t in enumerate(ids.tolist()):
        torch.testing.assert_close(y[i], torch.nn.functional.linear(x[i], lin.weight * masks[t], lin.bias))


def test_serving_bad_input_is_named():
    lin = _layer()
    packed = abp.pack_mask(lin.mask())
    with pytest.raises(ValueError, match="packed mask must be uint8"):
        abp.bitmask_linear(torch.randn(2, 21), lin.weight, packed[:-1])
    with pytest.raises(ValueError, match="last dim"):
        abp.bitmask_linear(torch.randn(2, 20), lin.weight, packed)
    with pytest.raises(TypeError, match="share one of"):
        abp.bitmask_linear(torch.randn(2, 21, dtype=torch.float64), lin.weight, packed)
    with pytest.raises(ValueError, match=r"task ids must be in \[0, 2\)"):
        abp.multi_bitmask_linear(torch.randn(2, 21), lin.weight, torch.stack([packed, packed]), torch.tensor([0, 2]))
    with pytest.raises(TypeError, match="task_ids must be int32/int64"):
        abp.multi_bitmask_linear(torch.randn(2, 21), lin.weight, torch.stack([packed]), torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="task_ids must have shape"):
        abp.multi_bitmask_linear(torch.randn(2, 21), lin.weight, torch.stack([packed]), torch.tensor([0]))


def test_masked_linear_serves_from_bits_in_inference_and_tracks_the_scores():
    lin = _layer()
    lin.serve_bits = True
    x = torch.randn(4, 21)
    train_out = lin(x)  # training mode: the training path, whatever serve_bits says
    assert backends.last_backend("masked_matmul") is not None
    lin.eval()
    with torch.no_grad():
        backends._last.pop("bitmask_linear", None)
        torch.testing.assert_close(lin(x), train_out.detach())
        assert backends.last_backend("bitmask_linear") is not None, "inference did not read the packed mask"
        first = lin.packed_mask()
        assert lin.packed_mask() is first, "the packed mask is cached while the scores do not change"
        lin.set_mask(torch.rand(13, 21) < 0.3)  # scores change in place: the cache must follow
        assert lin.packed_mask() is not first
        torch.testing.assert_close(lin(x), abp.masked_linear(x, lin.weight, lin.scores, lin.bias))
    with torch.enable_grad():  # eval mode but autograd on (e.g. input attributions): the differentiable path
        xg = x.clone().requires_grad_()
        lin(xg).sum().backward()
        assert xg.grad is not None


def test_auto_serving_only_on_cuda_for_few_tokens():
    lin = _layer().eval()
    with torch.no_grad():
        assert not lin._serves_from_bits(torch.randn(2, 21)), "auto never serves from bits on CPU"
        lin.t_l = 1e5
        lin.serve_bits = True
        assert not lin._serves_from_bits(torch.randn(2, 21)), "a soft forward mask is not the packed hard mask"


def test_serving_under_autocast_matches_the_training_path():
    """Autocast feeds fp32 activations (after a LayerNorm, say) to bf16 weights: both paths cast alike."""
    lin = _layer().to(torch.bfloat16)
    lin.scores.data = lin.scores.data.float()
    lin.serve_bits = True
    x = torch.randn(3, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_out = lin(x)
        lin.eval()
        with torch.no_grad():
            served = lin(x)
    assert served.dtype == train_out.dtype == torch.bfloat16
    torch.testing.assert_close(served, train_out.detach())


def test_multi_bitmask_linear_takes_int32_task_ids():
    lin = _layer()
    packed = torch.stack([abp.pack_mask(lin.mask())] * 2)
    x = torch.randn(3, 21)
    y32 = abp.multi_bitmask_linear(x, lin.weight, packed, torch.tensor([0, 1, 1], dtype=torch.int32), lin.bias)
    y64 = abp.multi_bitmask_linear(x, lin.weight, packed, torch.tensor([0, 1, 1]), lin.bias)
    torch.testing.assert_close(y32, y64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inference_reads_bits_under_autocast():
    lin = _layer(n=3072, k=768).cuda().to(torch.bfloat16)
    lin.scores.data = lin.scores.data.float()
    x = torch.randn(2, 8, 768, device="cuda")  # 16 tokens: the serving regime
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = lin(x).detach()
        lin.eval()
        with torch.no_grad():
            backends._last.pop("bitmask_linear", None)
            served = lin(x)
    assert backends.last_backend("bitmask_linear") == "cuda"
    torch.testing.assert_close(served, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_serving_kernel_only_in_its_regime():
    from abp.backends import SERVE_KERNEL_MAX_TOKENS

    lin = _layer(n=256, k=128).cuda()
    packed = abp.pack_mask(lin.mask())
    for m, want in ((SERVE_KERNEL_MAX_TOKENS, "cuda"), (SERVE_KERNEL_MAX_TOKENS + 1, "triton")):
        x = torch.randn(m, 128, device="cuda")
        y = abp.bitmask_linear(x, lin.weight, packed, lin.bias)
        assert backends.last_backend("bitmask_linear") == want, m
        torch.testing.assert_close(y, abp.masked_linear(x, lin.weight, lin.scores.detach(), lin.bias),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["bitmask_linear", "multi_bitmask_linear"])
def test_auto_serving_rule_gemv_then_bit_gemm_then_reference(op, monkeypatch):
    """The rule itself, on a CUDA device as ``select`` sees it (availability faked, nothing runs): the CUDA GEMV
    kernel up to SERVE_KERNEL_MAX_TOKENS, the Triton bit-mask GEMM past it, the reference where Triton cannot run."""
    cuda = torch.device("cuda")
    can = {"cuda", "triton", "reference"}
    monkeypatch.setattr(backends, "available", lambda name, o, d: (name in can, "" if name in can else "faked away"))
    monkeypatch.delenv("ABP_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())  # the warning is once per process: start afresh
    n = backends.SERVE_KERNEL_MAX_TOKENS
    assert backends.select(op, cuda, tokens=n) == "cuda"
    assert backends.select(op, cuda, tokens=n + 1) == "triton"
    assert "SERVE_KERNEL_MAX_TOKENS" in backends.last_backend(op, why=True)
    can.discard("triton")
    with pytest.warns(UserWarning, match="faked away"):
        assert backends.select(op, cuda, tokens=n + 1) == "reference"
