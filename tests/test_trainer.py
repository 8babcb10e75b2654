"""Algorithm 1: resume equals uninterrupted, no-recovery never re-activates, the stop rule, fused == unfused,
and bad configurations refused."""
import json

import pytest
import torch
import transformers as T

import abp
from abp.train.config import ABPConfig
from abp.train.score_optim import FusedUpdateError, ScoreOptimizer, calibrate_score_lr
from abp.train.trainer import Trainer


def _cfg(model_dir, data, **kw):
    base = dict(model=model_dir, train_file=str(data / "train.csv"), dev_file=str(data / "dev.csv"),
                text_columns=("sentence",), label_column="label", num_labels=2, target_sparsity=0.3,
                max_steps=12, eval_every=4, log_every=2, batch_size=8, max_length=16, seed=3)
    base.update(kw)
    return ABPConfig(**base)


def _state(out):
    mf = abp.read_mask_file(out / "mask.safetensors")
    return mf, json.loads((out / "metrics.json").read_text())


def test_resume_equals_uninterrupted(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tiny_data)
    ref = Trainer(cfg, tmp_path / "a", progress=False)
    ref.run()
    ref_scores = {n: s.detach().clone() for n, s in abp.patch.score_tensors(ref.model)}

    calls = {"n": 0}
    real_step = ScoreOptimizer.step

    def dying_step(self):
        calls["n"] += 1
        if calls["n"] == 7:  # killed after the step-4 checkpoint, mid-way to the next one
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(ScoreOptimizer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "b", progress=False).run()
    monkeypatch.setattr(ScoreOptimizer, "step", real_step)
    resumed = Trainer(cfg, tmp_path / "b", progress=False)
    resumed.run(resume=True)
    for n, s in abp.patch.score_tensors(resumed.model):
        torch.testing.assert_close(s.detach(), ref_scores[n], rtol=0, atol=0, msg=n)
    for k, v in resumed.model.head.state_dict().items():
        torch.testing.assert_close(v, ref.model.head.state_dict()[k], rtol=0, atol=0)
    (mfa, ma), (mfb, mb) = _state(tmp_path / "a"), _state(tmp_path / "b")
    assert all(torch.equal(mfa.masks[k], mfb.masks[k]) for k in mfa.masks)
    assert ma["dev_metric"] == mb["dev_metric"] and ma["sparsity"] == mb["sparsity"]
    assert torch.equal(resumed.scores.counts, ref.scores.counts) and int(resumed.scores.pruned) == int(ref.scores.pruned)
    assert mfb.metadata["task"] == "custom", "a mask trained on custom files must not claim a GLUE task"


def test_nan_scores_stop_the_run_and_keep_the_last_checkpoint(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_model_dir, tiny_data, max_steps=8)
    calls = {"n": 0}
    real_step = ScoreOptimizer.step

    def poisoning_step(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == 5:  # score step 5 = training step 6 (1 warm-up step), after the step-4 checkpoint
            emb = dict(self.modules)["backbone.embeddings.word_embeddings"]
            with torch.no_grad():  # a vocabulary row the data never uses: the loss stays finite
                emb.scores[29000, 0] = float("nan")

    monkeypatch.setattr(ScoreOptimizer, "step", poisoning_step)
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="mask scores are NaN/inf at step 8"):
        Trainer(cfg, out, progress=False).run()
    from abp.train.checkpoint import load_checkpoint

    ck = load_checkpoint(out / "checkpoint.safetensors")
    assert ck["info"]["step"] == 4 and all(torch.isfinite(s).all() for s in ck["scores"].values())


def test_resume_refuses_other_settings(tiny_model_dir, tiny_data, tmp_path):
    Trainer(_cfg(tiny_model_dir, tiny_data, max_steps=4), tmp_path, progress=False).run()
    with pytest.raises(ValueError, match="target_sparsity"):
        Trainer(_cfg(tiny_model_dir, tiny_data, max_steps=4, target_sparsity=0.9), tmp_path, progress=False).run(resume=True)


def test_stop_rule_and_outputs(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    result = Trainer(_cfg(tiny_model_dir, tiny_data, max_steps=16, prune_fraction=0.5), out, progress=False).run()
    assert result["reached_target"] and result["sparsity"] >= 0.3
    assert result["metric_name"] == "accuracy" and 0 <= result["dev_metric"] <= 1
    assert result["backends"]["masked_matmul"] == "reference"
    hist = json.loads((out / "history.json").read_text())
    # once pruning stopped, the mask no longer changes: the sparsity of later evals is constant
    stopped = [h["sparsity"] for h in hist if h["reached_target"]]
    assert stopped and len(set(stopped)) == 1


def _score_run(model, recovery, steps=40, fused=False):
    """Score SGD on a loss whose direction changes every step (noisy gradients, as in real training)."""
    torch.manual_seed(0)
    opt = ScoreOptimizer(model, lr=0.0, target_sparsity=0.9, prune_steps=steps, recovery=recovery, fused=fused)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 200, (4, 10), generator=g)
    targets = [torch.randn(4, 10, 16, generator=g) for _ in range(steps + 1)]
    model.encoder.layer[0].attention.self.query.fused_update = None  # calibration pass: plain gradients
    opt.enable(False)
    for _, s in abp.patch.score_tensors(model):
        s.requires_grad_(True)
    (model(input_ids=ids).last_hidden_state * targets[-1]).mean().backward()
    opt.set_lr(calibrate_score_lr(model, prune_steps=steps, ratio=20.0))
    model.zero_grad(set_to_none=True)
    opt.enable(True)
    ever_off, came_back = None, 0
    for t in range(steps):
        out = model(input_ids=ids).last_hidden_state
        (out * targets[t]).mean().backward()
        opt.step()
        on = torch.cat([s.detach().reshape(-1) > 0 for _, s in abp.patch.score_tensors(model)])
        if ever_off is not None:
            came_back += int((ever_off & on).sum())
        ever_off = ~on if ever_off is None else (ever_off | ~on)
    return came_back, opt


def _tiny_bert():
    torch.manual_seed(0)
    m = T.BertModel(T.BertConfig(vocab_size=200, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=24, hidden_dropout_prob=0, attention_probs_dropout_prob=0))
    return abp.mask_model(m, score_init_spread=1.0)


def test_no_recovery_never_reactivates_and_recovery_does():
    back_on, _ = _score_run(_tiny_bert(), recovery=True)
    back_off, _ = _score_run(_tiny_bert(), recovery=False)
    assert back_on > 0, "with recovery some pruned connections should come back (else this test proves nothing)"
    assert back_off == 0


def test_fused_update_equals_unfused_step():
    a, b = _tiny_bert(), _tiny_bert()
    _score_run(a, recovery=True, steps=5, fused=False)
    _, opt = _score_run(b, recovery=True, steps=5, fused=True)
    assert opt.fused
    for (n, sa), (_, sb) in zip(abp.patch.score_tensors(a), abp.patch.score_tensors(b)):
        torch.testing.assert_close(sa.detach(), sb.detach(), rtol=1e-5, atol=1e-9, msg=n)


def test_fused_update_refuses_inexact_cases(tiny_model_dir, tiny_data, tmp_path):
    with pytest.raises(FusedUpdateError, match="accumulation"):
        Trainer(_cfg(tiny_model_dir, tiny_data, fused_update="on", grad_accum=2), tmp_path, progress=False)
    m = _tiny_bert()
    ScoreOptimizer(m, lr=1.0, target_sparsity=0.5, prune_steps=3, fused=True)
    layer = m.encoder.layer[0].attention.self.query
    x = torch.randn(2, 16)
    layer(x)
    with pytest.raises(RuntimeError, match="twice"):
        layer(x)


def test_recount_follows_scores_loaded_from_elsewhere():
    m = _tiny_bert()
    opt = ScoreOptimizer(m, lr=1.0, target_sparsity=0.5, prune_steps=3)
    with torch.no_grad():
        for s in opt.scores:
            s.copy_(torch.randn(s.shape))
    opt.recount()
    assert opt.counts.tolist() == [int((s <= 0).sum()) for s in opt.scores]
    assert int(opt.pruned) == sum(int((s <= 0).sum()) for s in opt.scores)


def test_fused_update_refuses_a_layer_called_twice_per_forward(minilm_path, tiny_data, tmp_path):
    """ALBERT runs one shared layer for every depth: on asks loudly, auto (on CUDA) would fall back."""
    d = tmp_path / "tiny-albert"
    T.AlbertModel(T.AlbertConfig(vocab_size=30522, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                 num_attention_heads=2, intermediate_size=48, max_position_embeddings=64)).save_pretrained(d)
    T.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    with pytest.raises(FusedUpdateError, match="called more than once per forward"):
        Trainer(_cfg(str(d), tiny_data, fused_update="on"), tmp_path / "run", progress=False)


def test_fused_update_says_when_its_dry_run_cannot_run(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """A backbone the layer-reuse check cannot drive is reported as that, not as a layer used twice."""
    def refuse(self, *a, **kw):
        raise RuntimeError("this backbone needs pixel_values")

    monkeypatch.setattr(T.BertModel, "forward", refuse)
    with pytest.raises(FusedUpdateError, match=r"could not run \(RuntimeError: this backbone needs pixel_values") as e:
        Trainer(_cfg(tiny_model_dir, tiny_data, fused_update="on"), tmp_path / "run", progress=False)
    assert "called more than once" not in str(e.value)


@pytest.mark.parametrize("bad,match", [
    (dict(target_sparsity=1.2), "target sparsity"),
    (dict(max_steps=0), "max_steps"),
    (dict(fused_update="maybe"), "fused_update"),
    (dict(dev_file=None), "needs both --train-file and --dev-file"),
])
def test_bad_config(tiny_model_dir, tiny_data, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_cfg(tiny_model_dir, tiny_data, **bad), tmp_path, progress=False)


@pytest.mark.parametrize("kernels", ["v2", "v1"])
@pytest.mark.parametrize("fused", ["off", "on"])
def test_triton_backend_run_equals_reference(tiny_model_dir, tiny_data, tmp_path, fused, kernels, monkeypatch):
    """A short ABP run with the masked layers on the Triton kernels (the interpreter on CPU) follows the
    reference run: same loss curve within tolerance, same mask. v2: forward and dX read the packed hard mask
    (the default); v1: they read the scores."""
    from abp import _triton_bridge

    ok, why = _triton_bridge.available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not ok:
        pytest.skip(why)
    monkeypatch.setenv("ABP_KERNELS", kernels)
    forward = "masked_matmul_bits" if kernels == "v2" else "masked_matmul"
    runs = {}
    for backend in ("reference", "triton"):
        cfg = _cfg(tiny_model_dir, tiny_data, max_steps=8, eval_every=2, log_every=1, batch_size=4, max_length=12,
                   backend=backend, fused_update=fused, autocast=False, backbone_dtype="float32", device="auto",
                   score_optimizer="sgd" if fused == "on" else "adam")  # the fused update is plain SGD's
        t = Trainer(cfg, tmp_path / backend, progress=False)
        result = t.run()
        ran = result["backends"]
        if backend == "triton":
            assert ran[forward] == ran[forward + "_dx"] == "triton"
        assert ran["score_grad_update_" if fused == "on" else "score_grad"] == backend
        runs[backend] = (t, result, json.loads((tmp_path / backend / "history.json").read_text()))
    (rt, rr, rh), (tt, tr, th) = runs["reference"], runs["triton"]
    assert tr["fused_update"] == (fused == "on")
    torch.testing.assert_close([h["loss"] for h in th], [h["loss"] for h in rh], rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(abp.patch.score_tensors(rt.model), abp.patch.score_tensors(tt.model)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-6, msg=n)
    ma, mb = abp.read_mask_file(tmp_path / "reference" / "mask.safetensors"), abp.read_mask_file(tmp_path / "triton" / "mask.safetensors")
    assert 0.1 < rr["sparsity"] and all(torch.equal(ma.masks[k], mb.masks[k]) for k in ma.masks)
