"""Method options beyond the paper: score initialisation modes, Adam on the scores, ``--preset paper``, and the
grid's named ABP variants (each pins its settings in the run's budget)."""
import copy
import json
import math

import pytest
import torch
import transformers as T

import abp
from abp.nn import SCORE_INIT_MODES, initial_scores
from abp.train.checkpoint import load_checkpoint
from abp.train.config import PAPER_EPOCHS, ABPConfig, paper_preset
from abp.train.score_optim import FusedUpdateError, ScoreOptimizer, adam_score_lr
from abp.train.trainer import Trainer


def _tiny_bert(**mask_kw):
    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    return abp.mask_model(m, **mask_kw)


def _cfg(model_dir, data, **kw):
    base = dict(model=model_dir, train_file=str(data / "train.csv"), dev_file=str(data / "dev.csv"),
                text_columns=("sentence",), label_column="label", num_labels=2, target_sparsity=0.3,
                max_steps=12, eval_every=4, log_every=2, batch_size=8, max_length=16, seed=3)
    base.update(kw)
    return ABPConfig(**base)


# ------------------------------------------------------------------------------------ score initialisation


def test_magnitude_init_orders_scores_like_the_weights_per_tensor():
    m = _tiny_bert(score_init_mode="magnitude", score_init=0.02)
    for name, mod in abp.masked_modules(m):
        w, s = mod.weight.detach().float().abs(), mod.scores.detach()
        assert math.isclose(float(s.mean()), 0.02, rel_tol=1e-4), name  # mean = score_init in every tensor
        torch.testing.assert_close(s, w * (0.02 / float(w.mean())), msg=name)
        by_weight = s.flatten()[torch.argsort(w.flatten())]
        assert bool((by_weight[1:] >= by_weight[:-1]).all()), name  # the scores' order is the magnitudes' order


def test_normal_init_is_the_papers_distribution_and_uniform_stays_positive():
    w = torch.zeros(400, 500)
    torch.manual_seed(1)
    s = initial_scores(w, "normal", 0.01, std=0.001 ** 0.5)
    assert abs(float(s.mean()) - 0.01) < 3 * 0.0316 / 450 and abs(float(s.var()) - 0.001) < 2e-5
    assert 0.36 < float((s <= 0).float().mean()) < 0.39  # Φ(−0.01/0.0316) = 0.376: the paper starts 38 % pruned
    u = initial_scores(w, "uniform", 0.01, spread=1.0)
    assert float(u.min()) > 0 and float(u.max()) <= 0.02 and abs(float(u.mean()) - 0.01) < 1e-4
    assert torch.equal(initial_scores(w, "magnitude", 0.01), torch.full_like(w, 0.01))  # all-zero: no order


def test_unknown_init_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="score_init_mode must be one of uniform, normal, magnitude"):
        abp.mask_model(T.BertModel(T.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=8)), score_init_mode="mag")
    assert SCORE_INIT_MODES == ("uniform", "normal", "magnitude")
    with pytest.raises(ValueError, match="score_init_mode"):
        ABPConfig(score_init_mode="wide").validate()
    with pytest.raises(ValueError, match="score_optimizer"):
        ABPConfig(score_optimizer="lion").validate()
    with pytest.raises(ValueError, match="schedule must be one of linear, quadratic, cubic, got 'step'"):
        ABPConfig(schedule="step").validate()


@pytest.mark.parametrize("schedule, p", [("linear", 1), ("quadratic", 2), ("cubic", 3)])
def test_controller_target_follows_the_named_ramp(schedule, p):
    """s·(1 − (1 − t)^p) over the pruning window, then the target: checked at the window's quarter points."""
    opt = ScoreOptimizer(_tiny_bert(), lr=0.0, target_sparsity=0.8, prune_steps=8, schedule=schedule)
    got = [opt.target_at(k) for k in (0, 2, 4, 6, 8, 20)]
    want = [0.8 * (1 - (1 - t) ** p) for t in (0.0, 0.25, 0.5, 0.75, 1.0, 1.0)]
    assert got == pytest.approx(want, abs=1e-12)
    assert all(b >= a for a, b in zip(got, got[1:]))


# ------------------------------------------------------------------------------------ Adam on the scores


def test_adam_step_equals_torch_adam_plus_the_gamma_push():
    """Independent oracle: torch.optim.Adam on a copy of the scores, then Algorithm 1's −γ, gives the same θ."""
    m = _tiny_bert(score_init_mode="magnitude")
    opt = ScoreOptimizer(m, lr=1e-3, target_sparsity=0.9, prune_steps=50, gamma=3e-4, optimizer="adam", eps=1e-12)
    ref = [s.detach().clone().requires_grad_(True) for s in opt.scores]
    torch_adam = torch.optim.Adam(ref, lr=1e-3, betas=(0.9, 0.999), eps=1e-12)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        grads = [torch.randn(s.shape, generator=g) * 10 ** float(torch.randint(-8, -2, (1,), generator=g)) for s in ref]
        for s, r, gr in zip(opt.scores, ref, grads):
            s.grad, r.grad = gr.clone(), gr.clone()
        opt.step()
        torch_adam.step()
        with torch.no_grad():
            for r in ref:
                r.sub_(3e-4)
    for s, r in zip(opt.scores, ref):
        torch.testing.assert_close(s.detach(), r.detach(), rtol=1e-5, atol=1e-8)
    assert opt.counts.tolist() == [int((s <= 0).sum()) for s in opt.scores]


@pytest.mark.parametrize("path", ["auto", "reference", "eager"])
def test_adam_steps_equal_the_eager_op_sequence_bit_for_bit(path):
    """The default score optimiser steps through abp::multi_score_adam_update_ (Adam's moments and the score step in
    one pass). After several steps in which some tensors take no part (each keeps its own step count), its scores,
    moments and counts are, bit for bit, those of Adam's eager op sequence written out here followed by the SGD
    score step; so are those of the eager path (``_adam_directions``, which the per-tensor variants take)."""
    from abp import _ext, _ops, reference

    m = _tiny_bert(score_init_mode="magnitude")
    b1, b2, lr, gamma, eps = 0.9, 0.999, 1e-3, 3e-4, 1e-12
    opt = ScoreOptimizer(m, lr=lr, target_sparsity=0.95, prune_steps=50, gamma=gamma, optimizer="adam", eps=eps,
                         recovery=False, backend=None if path == "auto" else "reference")
    ref = [s.detach().clone() for s in opt.scores]
    mom = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref]
    steps = [0] * len(ref)
    gam, one = torch.tensor(gamma), torch.tensor(1.0)
    g = torch.Generator().manual_seed(3)
    for k in range(5):
        live = [i for i in range(len(ref)) if (i + k) % 3]
        grads = {i: torch.randn(ref[i].shape, generator=g) * 10.0 ** torch.randint(-9, -2, ref[i].shape, generator=g)
                 for i in live}
        for i, s in enumerate(opt.scores):
            s.grad = grads[i].clone() if i in grads else None
        if path == "eager":
            with torch.no_grad():
                dirs = opt._adam_directions(live, [grads[i] for i in live])
                counts = torch.zeros(len(live), dtype=torch.int64)
                _ops.multi_score_update_([opt.scores[i] for i in live], dirs, lr, opt.gamma, opt.active, False, counts,
                                         "")
            for s in opt.scores:
                s.grad = None
        else:
            opt.step()
        for i in live:
            mi, vi = mom[i]
            steps[i] += 1
            gi = grads[i]
            mi.mul_(b1).add_(gi * (1 - b1))
            vi.mul_(b2).add_((gi * gi) * (1 - b2))
            denom = reference.sqrt_rn(vi * (1 / (1 - b2 ** steps[i]))).add_(eps)
            reference.score_update_(ref[i], (mi * (1 / (1 - b1 ** steps[i]))).div_(denom), lr, gam, one, False)
    assert opt.moment_steps == steps and min(steps) < max(steps)
    for s, r, (mo, vo), (mr, vr) in zip(opt.scores, ref, opt.moments, mom):
        assert torch.equal(s.detach(), r) and torch.equal(mo, mr) and torch.equal(vo, vr)
    if path != "eager":
        assert opt.counts.tolist() == [int((r <= 0).sum()) for r in ref]
        assert abp.last_backend("multi_score_adam_update_") == ("reference" if path == "reference" else
                                                                "cpp" if _ext.available() else "reference")


def test_adam_tensor_step_equals_a_hand_written_oracle():
    """adam_tensor: Adam's first moment per score, one second moment per tensor (its mean square gradient)."""
    m = _tiny_bert(score_init_mode="magnitude")
    b1, b2, lr, gamma, eps = 0.9, 0.999, 1e-3, 3e-4, 1e-12
    opt = ScoreOptimizer(m, lr=lr, target_sparsity=0.9, prune_steps=50, gamma=gamma, optimizer="adam_tensor", eps=eps)
    ref = [s.detach().clone().double() for s in opt.scores]
    mom = [(torch.zeros_like(r), torch.zeros((), dtype=torch.float64)) for r in ref]
    g = torch.Generator().manual_seed(1)
    for t in range(1, 5):
        grads = [torch.randn(s.shape, generator=g) * 10 ** float(torch.randint(-8, -2, (1,), generator=g)) for s in ref]
        for s, gr in zip(opt.scores, grads):
            s.grad = gr.clone()
        opt.step()
        for i, (r, gr) in enumerate(zip(ref, grads)):
            mi, vi = mom[i]
            mi = b1 * mi + (1 - b1) * gr.double()
            vi = b2 * vi + (1 - b2) * gr.double().square().mean()
            mom[i] = (mi, vi)
            r -= lr * (mi / (1 - b1 ** t)) / ((vi / (1 - b2 ** t)).sqrt() + eps) + gamma
    for s, r in zip(opt.scores, ref):
        torch.testing.assert_close(s.detach().double(), r, rtol=1e-5, atol=1e-8)
    assert all(v.dim() == 0 for _, v in opt.moments)  # one second moment per tensor


# the second moment each per-score-statistics optimizer divides by, from the score's own v̂ and the target sparsity s
EFFECTIVE_V = {
    "adam_floor": lambda v, s: torch.maximum(v, v.mean()),
    "adam_ceiling": lambda v, s: torch.minimum(v, v.mean()),
    "adam_mix": lambda v, s: v ** (1 - s) * v.mean() ** s,
}


@pytest.mark.parametrize("optimizer,target", [("adam_floor", 0.9), ("adam_ceiling", 0.9), ("adam_mix", 0.2),
                                              ("adam_mix", 0.9)])
def test_per_score_adam_variants_step_as_a_hand_written_oracle(optimizer, target):
    """Adam whose per-score v̂ is floored (adam_floor) or capped (adam_ceiling) at its tensor's mean v̂, or mixed
    with it as v̂^(1−s)·mean(v̂)^s (adam_mix), on gradients 1e-8 … 1e-3 apart."""
    m = _tiny_bert(score_init_mode="magnitude")
    b1, b2, lr, gamma, eps = 0.9, 0.999, 1e-3, 3e-4, 1e-12
    opt = ScoreOptimizer(m, lr=lr, target_sparsity=target, prune_steps=50, gamma=gamma, optimizer=optimizer, eps=eps)
    ref = [s.detach().clone().double() for s in opt.scores]
    mom = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref]
    g = torch.Generator().manual_seed(2)
    for t in range(1, 5):
        grads = [torch.randn(s.shape, generator=g) * 10.0 ** torch.randint(-8, -2, s.shape, generator=g) for s in ref]
        for s, gr in zip(opt.scores, grads):
            s.grad = gr.clone()
        opt.step()
        for i, (r, gr) in enumerate(zip(ref, grads)):
            mi, vi = mom[i]
            mi = b1 * mi + (1 - b1) * gr.double()
            vi = b2 * vi + (1 - b2) * gr.double().square()
            mom[i] = (mi, vi)
            vhat = EFFECTIVE_V[optimizer](vi / (1 - b2 ** t), target)
            r -= lr * (mi / (1 - b1 ** t)) / (vhat.sqrt() + eps) + gamma
    for s, r in zip(opt.scores, ref):
        torch.testing.assert_close(s.detach().double(), r, rtol=1e-5, atol=1e-8)
    assert all(v.shape == s.shape for (_, v), s in zip(opt.moments, opt.scores))  # one second moment per score


@pytest.mark.parametrize("target", [0.2, 0.9])
def test_adam_mix_steps_grow_as_the_gradient_to_the_power_s(target):
    """adam_mix's first step inside a tensor is ∝ |g|^s: Adam's ±α at s → 0, adam_tensor's ∝ g at s → 1."""
    opt = ScoreOptimizer(_tiny_bert(score_init_mode="magnitude"), lr=1e-3, target_sparsity=target, prune_steps=50,
                         gamma=0.0, optimizer="adam_mix")
    before = opt.scores[0].detach().clone()
    grad = torch.linspace(0.1, 1, before.numel()).reshape(before.shape) * 1e-6
    for s in opt.scores:
        s.grad = torch.zeros_like(s)
    opt.scores[0].grad = grad.clone()
    opt.step()
    step = (before - opt.scores[0].detach()).double().flatten()
    assert math.isclose(float(step[-1] / step[0]), 10 ** target, rel_tol=1e-3)  # gradients 10:1


def test_adam_mix_steps_through_its_two_ops_as_the_reference_does():
    """The default score optimiser runs abp::multi_adam_moments_ then abp::multi_score_adam_mix_update_ (compiled
    where abp._C is built); after steps in which some tensors take no part, its scores, moments and counts equal the
    reference backend's bit for bit (on CPU both take torch's log and exp)."""
    from abp import _ext

    runs = []
    for backend in (None, "reference"):
        opt = ScoreOptimizer(_tiny_bert(score_init_mode="magnitude"), lr=1e-3, target_sparsity=0.7, prune_steps=50,
                             gamma=3e-4, optimizer="adam_mix", backend=backend)
        g = torch.Generator().manual_seed(4)
        for k in range(4):
            for i, s in enumerate(opt.scores):
                s.grad = (torch.randn(s.shape, generator=g) * 10.0 ** torch.randint(-9, -3, s.shape, generator=g)
                          if (i + k) % 3 else None)
            opt.step()
            assert abp.last_backend("multi_adam_moments_") == abp.last_backend("multi_score_adam_mix_update_") == (
                backend or ("cpp" if _ext.available() else "reference"))
        runs.append(opt)
    fast, ref = runs
    assert fast.moment_steps == ref.moment_steps and min(fast.moment_steps) < max(fast.moment_steps)
    for a, b in zip(fast.scores, ref.scores):
        assert torch.equal(a.detach(), b.detach())
    for (ma, va), (mb, vb) in zip(fast.moments, ref.moments):
        assert torch.equal(ma, mb) and torch.equal(va, vb)
    assert torch.equal(fast.counts, ref.counts)
    assert fast.counts.tolist() == [int((s <= 0).sum()) for s in fast.scores]


@pytest.mark.parametrize("optimizer", ["adam_floor", "adam_ceiling"])
def test_adam_floor_and_ceiling_split_the_tensor_at_its_gradient_rms(optimizer):
    """First step. adam_floor: |Δθ| = α where |g| ≥ rms(g) of its tensor (Adam), α·|g|/rms(g) below it
    (adam_tensor); adam_ceiling the other way round."""
    m = _tiny_bert(score_init_mode="magnitude")
    opt = ScoreOptimizer(m, lr=1e-3, target_sparsity=0.9, prune_steps=50, gamma=0.0, optimizer=optimizer)
    before = opt.scores[0].detach().clone()
    grad = torch.linspace(-1, 1, before.numel()).reshape(before.shape) * 1e-6
    for s in opt.scores:
        s.grad = torch.zeros_like(s)
    opt.scores[0].grad = grad.clone()
    opt.step()
    step = before - opt.scores[0].detach()
    rms = float(grad.square().mean().sqrt())
    bound = torch.maximum if optimizer == "adam_floor" else torch.minimum
    want = 1e-3 * grad / (bound(grad.abs(), torch.tensor(rms)) + opt.eps)
    torch.testing.assert_close(step, want, rtol=1e-4, atol=1e-9)
    if optimizer == "adam_floor":  # never more than α; the weak gradients less
        assert float(step.abs().max()) <= 1e-3 * (1 + 1e-5) and bool((step.abs() < 1e-3 * 0.5).any())
    else:  # never less than α where there is a gradient; the strong ones more
        assert float(step.abs()[grad.abs() > 1e-7].min()) >= 1e-3 * (1 - 1e-4) and bool((step.abs() > 1e-3 * 1.5).any())


def test_adam_tensor_keeps_the_gradients_ranking_inside_a_tensor():
    """Its first step is α·g/rms(g) per tensor: scores move in proportion to their gradient (Adam's would not)."""
    m = _tiny_bert(score_init_mode="magnitude")
    steps = {}
    for name in ("adam", "adam_tensor"):
        opt = ScoreOptimizer(copy.deepcopy(m), lr=1e-3, target_sparsity=0.9, prune_steps=50, gamma=0.0, optimizer=name)
        before = opt.scores[0].detach().clone()
        grad = torch.linspace(-1, 1, before.numel()).reshape(before.shape) * 1e-6
        for s in opt.scores:
            s.grad = torch.zeros_like(s)
        opt.scores[0].grad = grad.clone()
        opt.step()
        steps[name] = before - opt.scores[0].detach()
    rms = float(grad.square().mean().sqrt())
    torch.testing.assert_close(steps["adam_tensor"], 1e-3 * grad / rms, rtol=1e-4, atol=1e-9)
    assert float(steps["adam"].abs().max() / steps["adam"].abs()[grad.abs() > 1e-7].min()) < 1.01  # Adam: ±α


def test_one_second_moment_per_tensor_is_refused_under_fsdp():
    """adam_tensor's single moment per tensor cannot be sharded; the per-score variants all-reduce their tensor means
    (tests/test_distributed.py runs adam_mix under FSDP)."""
    from abp.train.distributed import ShardedScoreOptimizer

    with pytest.raises(ValueError, match="adam_tensor score optimizer keeps one second moment per whole tensor"):
        ShardedScoreOptimizer(_tiny_bert(), lr=1e-3, target_sparsity=0.5, prune_steps=3, optimizer="adam_tensor")


def test_adam_keeps_no_recovery_and_refuses_the_fused_update():
    m = _tiny_bert(score_init_mode="magnitude")
    with pytest.raises(FusedUpdateError, match="adam score optimizer keeps per-score moments"):
        ScoreOptimizer(m, lr=1e-3, target_sparsity=0.5, prune_steps=3, fused=True, optimizer="adam")
    opt = ScoreOptimizer(m, lr=1e-2, target_sparsity=0.99, prune_steps=10, gamma=0.0, recovery=False, optimizer="adam")
    with torch.no_grad():
        for s in opt.scores:
            s.copy_(torch.randn(s.shape) * 0.01)
    opt.recount()
    pruned = [s.detach() <= 0 for s in opt.scores]
    for _ in range(3):  # gradients that push every score up: pruned ones must stay pruned
        for s in opt.scores:
            s.grad = -torch.ones_like(s)
        opt.step()
    assert all(bool((s.detach()[p] <= 0).all()) for s, p in zip(opt.scores, pruned))
    assert any(bool((s.detach()[~p] > 0.02).any()) for s, p in zip(opt.scores, pruned))  # the others moved


def test_adam_auto_lr_moves_a_score_ratio_times_init_over_the_window():
    m = _tiny_bert(score_init_mode="magnitude", score_init=0.01)
    assert math.isclose(adam_score_lr(m, prune_steps=200, ratio=1.5), 1.5 * 0.01 / 200, rel_tol=1e-5)


@pytest.mark.parametrize("optimizer,allocation", [("adam", "global"), ("adam_tensor", "global"), ("adam_floor", "global"),
                                                  ("adam_mix", "tensor")])
def test_adam_run_resumes_exactly_and_its_moments_are_checkpointed(tiny_model_dir, tiny_data, tmp_path, monkeypatch,
                                                                   optimizer, allocation):
    """Killed at step 7, resumed from the step-4 checkpoint (Adam's moments; under allocation "tensor" every
    tensor's γ and stop flag): the scores end bit for bit as the uninterrupted run's."""
    cfg = _cfg(tiny_model_dir, tiny_data, score_optimizer=optimizer, score_init_mode="magnitude", allocation=allocation)
    ref = Trainer(cfg, tmp_path / "a", progress=False)
    metrics = ref.run()
    assert ref.scores.optimizer == optimizer and not metrics["fused_update"]
    ref_scores = {n: s.detach().clone() for n, s in abp.patch.score_tensors(ref.model)}

    calls, real_step = {"n": 0}, ScoreOptimizer.step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(ScoreOptimizer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", progress=False).run()
    ck = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")
    assert len(ck["score_state"]["moments"]) == len(ref.scores.moments)
    assert any(float(v.abs().sum()) > 0 for _, v in ck["score_state"]["moments"])
    assert ck["score_state"]["gamma"].shape == ref.scores.gamma.shape
    monkeypatch.setattr(ScoreOptimizer, "step", real_step)
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    resumed.run(resume=True)
    for n, s in abp.patch.score_tensors(resumed.model):
        torch.testing.assert_close(s.detach(), ref_scores[n], rtol=0, atol=0, msg=n)
    with pytest.raises(ValueError, match="lacks Adam moments"):  # an SGD checkpoint cannot feed an Adam run
        sgd = ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3).state_dict()
        ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3, optimizer="adam").load_state_dict(sgd)


def test_adam_with_fused_on_is_refused_by_the_trainer(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(FusedUpdateError, match="adam score optimizer"):
        Trainer(_cfg(tiny_model_dir, tiny_data, score_optimizer="adam", fused_update="on"), tmp_path, progress=False)


# ------------------------------------------------------------------------------------ allocation


def _random_grads(opt, g, k):
    for i, s in enumerate(opt.scores):
        s.grad = torch.randn(s.shape, generator=g) * 1e-6 if (i + k) % 4 else None  # some tensors sit a step out


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adam_mix", "adam_tensor"])
def test_tensor_allocation_steps_as_global_while_every_tensor_prunes(optimizer):
    """With a fixed γ and no tensor at the target, allocation="tensor" (the step op once per tensor, each with its own
    γ and ``active``) moves every score, moment and count exactly as "global" (one op over all tensors) does."""
    runs = []
    for allocation in ("global", "tensor"):
        opt = ScoreOptimizer(_tiny_bert(score_init_mode="magnitude"), lr=1e3 if optimizer == "sgd" else 1e-3,
                             target_sparsity=0.95, prune_steps=50, gamma=2e-4, optimizer=optimizer, allocation=allocation)
        g = torch.Generator().manual_seed(5)
        for k in range(5):
            _random_grads(opt, g, k)
            opt.step()
        runs.append(opt)
    a, b = runs
    assert b.gamma.shape == (len(b.scores),) and bool((b.active == 1).all())
    assert 0 < a.sparsity() < 0.95
    for x, y in zip(a.scores, b.scores):
        assert torch.equal(x.detach(), y.detach())
    for (ma, va), (mb, vb) in zip(a.moments, b.moments):
        assert torch.equal(ma, mb) and torch.equal(va, vb)
    assert torch.equal(a.counts, b.counts) and int(a.pruned) == int(b.pruned)


def test_tensor_allocation_prunes_every_tensor_to_the_target_and_stops_each_on_its_own():
    """Auto γ per tensor: with the tensors' scores scaled ½×, 1×, 2× (and gradients 10⁴× apart), "tensor" ends with
    every tensor at the target, within a step's overshoot, where the one global count of "global" prunes the low
    tensors far more; a tensor that reaches the target stops moving while the others go on."""
    def run(allocation):
        m = _tiny_bert(score_init_mode="magnitude")
        with torch.no_grad():
            for k, (_, mod) in enumerate(abp.masked_modules(m)):
                mod.scores.mul_(2.0 ** (k % 3 - 1))
        opt = ScoreOptimizer(m, lr=1e-4, target_sparsity=0.6, prune_steps=100, optimizer="adam_mix",
                             schedule="cubic", allocation=allocation)
        g, frozen = torch.Generator().manual_seed(1), {}
        for k in range(300):
            before = [s.detach().clone() for s in opt.scores]
            for i, s in enumerate(opt.scores):
                s.grad = torch.randn(s.shape, generator=g) * 10.0 ** (-4 - 4 * (i % 2))
            opt.step()
            for i, (s, b) in enumerate(zip(opt.scores, before)):
                if i in frozen:  # stopped: never moves again
                    assert torch.equal(s.detach(), b), (allocation, i, k)
            act = opt.active.expand(len(opt.scores))
            frozen.update({i: k for i in range(len(opt.scores)) if float(act[i]) == 0 and i not in frozen})
            if opt.done():
                break
        return opt, [float((s <= 0).float().mean()) for s in opt.scores], frozen

    opt, fracs, frozen = run("tensor")
    assert opt.done()
    assert all(0.6 <= f <= 0.64 for f in fracs), fracs
    assert len(set(frozen.values())) > 1  # the tensors stopped at different steps, each at its own target
    assert opt.gamma.shape == (len(opt.scores),) and len(set(opt.gamma.tolist())) > 1 and opt.gamma_now() > 0
    _, glob, _ = run("global")
    assert max(glob) - min(glob) > 0.3, glob  # one count: the tensors scaled down are pruned far more


def test_tensor_allocation_is_refused_where_it_cannot_be_exact_and_checkpoints_keep_their_allocation(
        tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(ValueError, match="allocation must be one of global, tensor, got 'layer'"):
        ABPConfig(allocation="layer").validate()
    with pytest.raises(ValueError, match="allocation must be one of global, tensor, got 'layer'"):
        ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3, allocation="layer")
    with pytest.raises(FusedUpdateError, match="allocation='tensor' keeps one γ per tensor"):
        ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3, fused=True, allocation="tensor")
    with pytest.raises(FusedUpdateError, match="allocation='tensor'"):
        Trainer(_cfg(tiny_model_dir, tiny_data, score_optimizer="sgd", allocation="tensor", fused_update="on"), tmp_path,
                progress=False)
    glob = ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3).state_dict()
    per = ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3, allocation="tensor")
    with pytest.raises(ValueError, match="resume with the allocation the run was started with"):
        per.load_state_dict(glob)
    with pytest.raises(ValueError, match="resume with the allocation the run was started with"):
        ScoreOptimizer(_tiny_bert(), lr=1.0, target_sparsity=0.5, prune_steps=3).load_state_dict(per.state_dict())


def test_tensor_allocation_run_reaches_the_target_in_every_tensor(tiny_model_dir, tiny_data, tmp_path):
    """A whole run (the trainer, the default score optimiser): every masked tensor ends within a few weights of s,
    and the run's budget names the allocation."""
    cfg = _cfg(tiny_model_dir, tiny_data, allocation="tensor", target_sparsity=0.5, max_steps=30, eval_every=30,
               warmup_fraction=0.1, prune_fraction=0.6)
    tr = Trainer(cfg, tmp_path, progress=False)
    metrics = tr.run()
    assert tr.scores.allocation == "tensor" and not metrics["fused_update"]
    for name, s in abp.patch.score_tensors(tr.model):
        n = s.numel()
        assert 0.5 * n <= int((s <= 0).sum()) <= 0.5 * n + max(3, 0.1 * n), name
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["allocation"] == "tensor"


# ------------------------------------------------------------------------------------ head refit


def test_head_refit_trains_the_head_on_the_unchanged_mask_and_resumes(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """``head_refit_steps``: after the run, its head trained on on the final mask. The shipped file keeps the run's
    bits with the refitted head, metrics.json reports the refit's dev metric (the joint head's beside it), and a run
    killed inside the refit resumes to the same head bit for bit."""
    from abp.train.trainer import HEAD_REFIT_DIR, run_abp

    plain = run_abp(_cfg(tiny_model_dir, tiny_data, head_refit_steps=0), tmp_path / "plain", progress=False)
    assert "head_refit" not in plain and not (tmp_path / "plain" / HEAD_REFIT_DIR).exists()
    cfg = _cfg(tiny_model_dir, tiny_data, head_refit_steps=6)
    res = run_abp(cfg, tmp_path / "a", progress=False)
    a, p = abp.read_mask_file(tmp_path / "a" / "mask.safetensors"), abp.read_mask_file(tmp_path / "plain" / "mask.safetensors")
    assert a.masks.keys() == p.masks.keys() and all(torch.equal(a.masks[k], p.masks[k]) for k in a.masks)
    assert any(not torch.equal(a.head[k], p.head[k]) for k in a.head)  # trained on
    run_abp(_cfg(tiny_model_dir, tiny_data, head_refit_steps=1), tmp_path / "one", progress=False)
    one = abp.read_mask_file(tmp_path / "one" / "mask.safetensors").head  # one Adam step (lr 1e-3) from the run's head
    assert all(float((one[k].float() - p.head[k].float()).abs().max()) <= 1.1e-3 for k in one)
    refit = json.loads((tmp_path / "a" / HEAD_REFIT_DIR / "metrics.json").read_text())
    assert res["dev_metric"] == refit["dev_metric"] and res["steps"] == cfg.max_steps + 6
    assert res["head_refit"]["joint_head_dev_metric"] == plain["dev_metric"]
    assert json.loads((tmp_path / "a" / "metrics.json").read_text()) == json.loads(json.dumps(res))
    refit_head = abp.read_mask_file(refit["mask_file"]).head  # the shipped file is the refit's
    assert all(torch.equal(refit_head[k], a.head[k]) for k in a.head)

    calls, real = {"n": 0}, torch.optim.AdamW.step

    def dying(self, *args, **kw):  # the head's optimiser: the run's 12 steps, then the refit's; die at the refit's 5th
        calls["n"] += 1                # (after its step-4 checkpoint)
        if calls["n"] == cfg.max_steps + 5:
            raise KeyboardInterrupt
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", dying)
    with pytest.raises(KeyboardInterrupt):
        run_abp(cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(torch.optim.AdamW, "step", real)
    assert (tmp_path / "b" / HEAD_REFIT_DIR / "checkpoint.safetensors").is_file()
    resumed = run_abp(cfg, tmp_path / "b", resume=True, progress=False)
    b = abp.read_mask_file(tmp_path / "b" / "mask.safetensors")
    assert all(torch.equal(b.head[k], a.head[k]) for k in a.head) and resumed["dev_metric"] == res["dev_metric"]
    with pytest.raises(ValueError, match="head_refit_steps must be >= 0"):
        ABPConfig(head_refit_steps=-1).validate()


def test_head_refit_defaults_to_the_runs_own_steps(tiny_model_dir, tiny_data, tmp_path):
    """The default (None) refits the head for as many steps as the run took, counted after ``epochs`` resolved
    them; ``--preset paper`` keeps the run's head as it ends (Algorithm 1 as written)."""
    from abp.train.trainer import run_abp

    assert ABPConfig().head_refit_steps is None and ABPConfig(max_steps=37).refit_steps == 37
    assert ABPConfig(max_steps=37, head_refit_steps=5).refit_steps == 5
    assert paper_preset("sst2")["head_refit_steps"] == 0
    res = run_abp(_cfg(tiny_model_dir, tiny_data, epochs=0.5), tmp_path / "e", progress=False)
    assert res["head_refit"]["steps"] == math.ceil(0.5 * 96 / 8)  # tiny_data: 96 training rows, batch 8
    assert res["steps"] == 2 * res["head_refit"]["steps"]


# ------------------------------------------------------------------------------------ --preset paper


def test_preset_paper_sets_the_papers_algorithm_and_flags_override_it(monkeypatch):
    from abp import cli

    seen = {}
    monkeypatch.setattr("abp.train.trainer.run_abp", lambda cfg, out, **kw: seen.setdefault("cfg", cfg) and {
        "task": cfg.task, "metric_name": "m", "dev_metric": 0.0, "sparsity": 0.0, "mask_file": "x"})
    cli.main(["prune", "--preset", "paper", "--task", "stsb", "--output", "unused", "--beta", "1e-3"])
    cfg = seen["cfg"]
    assert (cfg.batch_size, cfg.score_lr, cfg.gamma, cfg.t_l, cfg.t_s) == (8, 2e-5, 2e-7, 1e5, 1.0)
    assert (cfg.score_init_mode, cfg.score_init, cfg.score_optimizer, cfg.epochs) == ("normal", 0.01, "sgd", 5)
    assert math.isclose(cfg.score_init_std ** 2, 0.001) and cfg.warmup_fraction == 0.0
    assert (cfg.head, cfg.head_pool) == ("paper", "cls")  # the layer-weighted [CLS] head
    assert cfg.head_lr == 1e-3  # the explicit --beta wins over the preset's 2e-5
    assert PAPER_EPOCHS == {"mnli": 2, "sst2": 3, "stsb": 5} and paper_preset("sst2")["epochs"] == 3


def test_epochs_set_the_step_budget_from_the_train_set(tiny_model_dir, tiny_data, tmp_path):
    t = Trainer(_cfg(tiny_model_dir, tiny_data, epochs=1.5, max_steps=1000, batch_size=8), tmp_path, progress=False)
    assert t.cfg.max_steps == math.ceil(1.5 * 96 / 8)  # 96 training rows
    with pytest.raises(ValueError, match="epochs must be > 0"):
        _cfg(tiny_model_dir, tiny_data, epochs=0).validate()


# ------------------------------------------------------------------------------------ the grid's variants


def test_grid_variants_pin_their_settings_in_the_budget():
    from abp.experiments.methods import ABP_VARIANTS, ExperimentConfig

    exp = ExperimentConfig(max_steps=40)
    budgets = {m: exp.budget(m, "sst2")["abp"] for m in ABP_VARIANTS}
    assert budgets["abp_magnitude"]["score_init_mode"] == "magnitude" and budgets["abp_adam"]["score_optimizer"] == "adam"
    assert budgets["abp_paper"]["gamma"] == 2e-7 and budgets["abp_paper"]["head_lr"] == 2e-5
    assert budgets["abp_uniform"]["score_init_mode"] == "uniform"
    assert len({json.dumps(b, sort_keys=True) for m, b in budgets.items() if m != "abp"}) == len(budgets) - 1
    # the default refits its head for the grid's steps (abp_refit pins it); a mask-only row's own head is its own
    assert budgets["abp"] == budgets["abp_refit"] and budgets["abp"]["head_refit_steps"] == 40
    assert "head_refit_steps" not in budgets["abp_cubic_mix"] and "head_refit_steps" not in budgets["abp_paper"]
    assert budgets["abp_cubic_mix"] == {k: v for k, v in budgets["abp"].items() if k != "head_refit_steps"}
    assert "abp" not in exp.budget("mp", "sst2")
    assert exp.budget("abp_shuffled", "sst2")["abp"] == exp.budget("abp_mask", "sst2")["abp"] == budgets["abp_cubic_mix"]
    cfg = exp.abp_config("sst2", 0.5, 0, **ABP_VARIANTS["abp_paper"])
    assert (cfg.head_lr, cfg.batch_size, cfg.max_steps) == (2e-5, 16, 40)  # the grid's batch and steps, the paper's β


def test_unused_token_rows_start_scaled_and_nothing_else_moves(tiny_model_dir, tiny_data, tmp_path):
    """The data prior: input-embedding rows of tokens absent from every training example start at θ0 × scale."""
    plain = Trainer(_cfg(tiny_model_dir, tiny_data), tmp_path / "a", progress=False)
    prior = Trainer(_cfg(tiny_model_dir, tiny_data, unused_token_scale=0.01), tmp_path / "b", progress=False)
    tok = prior.tokenizer
    used = {i for line in (tiny_data / "train.csv").read_text().splitlines()[1:]
            for i in tok(line.rsplit(",", 1)[0], truncation=True, max_length=16)["input_ids"]}
    a = plain.model.backbone.get_input_embeddings().scores.detach()
    b = prior.model.backbone.get_input_embeddings().scores.detach()
    unused = torch.ones(a.shape[0], dtype=torch.bool)
    unused[sorted(used)] = False
    assert prior.unused_token_rows == int(unused.sum()) == a.shape[0] - len(used)
    torch.testing.assert_close(b[unused], a[unused] * 0.01)
    assert torch.equal(b[~unused], a[~unused])
    for (n, sa), (_, sb) in zip(abp.patch.score_tensors(plain.model.backbone), abp.patch.score_tensors(prior.model.backbone)):
        if "word_embeddings" not in n:
            assert torch.equal(sa, sb), n
    with pytest.raises(ValueError, match="unused_token_scale"):
        _cfg(tiny_model_dir, tiny_data, unused_token_scale=2.0).validate()
