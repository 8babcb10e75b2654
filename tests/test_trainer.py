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


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, minilm_path):
    """A tiny random BERT with the embedded model's real tokenizer (fast to train on CPU)."""
    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, max_position_embeddings=64)
    T.BertModel(cfg).save_pretrained(d)
    T.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    words = ["good", "bad", "fine", "awful", "great", "poor", "movie", "plot", "the", "a"]
    for split, n in (("train", 96), ("dev", 40)):
        rows = ["sentence,label"]
        for _ in range(n):
            ws = [words[i] for i in torch.randint(0, len(words), (6,), generator=g).tolist()]
            label = int(sum(w in ("good", "fine", "great") for w in ws) > sum(w in ("bad", "awful", "poor") for w in ws))
            rows.append(" ".join(ws) + f",{label}")
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return d


def _cfg(model_dir, data, **kw):
    base = dict(model=model_dir, train_file=str(data / "train.csv"), dev_file=str(data / "dev.csv"),
                text_columns=("sentence",), label_column="label", num_labels=2, target_sparsity=0.3,
                max_steps=12, eval_every=4, log_every=2, batch_size=8, max_length=16, seed=3)
    base.update(kw)
    return ABPConfig(**base)


def _state(out):
    mf = abp.read_mask_file(out / "mask.safetensors")
    ck = torch.load if False else None  # noqa: F841  (checkpoints are safetensors, never pickle)
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


@pytest.mark.parametrize("bad,match", [
    (dict(target_sparsity=1.2), "target sparsity"),
    (dict(max_steps=0), "max_steps"),
    (dict(fused_update="maybe"), "fused_update"),
])
def test_bad_config(tiny_model_dir, tiny_data, tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        Trainer(_cfg(tiny_model_dir, tiny_data, **bad), tmp_path, progress=False)


@pytest.mark.parametrize("fused", ["off", "on"])
def test_triton_backend_run_equals_reference(tiny_model_dir, tiny_data, tmp_path, fused):
    """A short ABP run with the masked layers on the Triton kernels (the interpreter on CPU) follows the
    reference run: same loss curve within tolerance, same mask."""
    from abp import _triton_bridge

    ok, why = _triton_bridge.available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if not ok:
        pytest.skip(why)
    runs = {}
    for backend in ("reference", "triton"):
        cfg = _cfg(tiny_model_dir, tiny_data, max_steps=8, eval_every=2, log_every=1, batch_size=4, max_length=12,
                   backend=backend, fused_update=fused, autocast=False, backbone_dtype="float32", device="auto")
        t = Trainer(cfg, tmp_path / backend, progress=False)
        result = t.run()
        assert result["backends"]["masked_matmul"] == backend
        assert result["backends"]["score_grad_update_" if fused == "on" else "score_grad"] == backend
        runs[backend] = (t, result, json.loads((tmp_path / backend / "history.json").read_text()))
    (rt, rr, rh), (tt, tr, th) = runs["reference"], runs["triton"]
    assert tr["fused_update"] == (fused == "on")
    torch.testing.assert_close([h["loss"] for h in th], [h["loss"] for h in rh], rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(abp.patch.score_tensors(rt.model), abp.patch.score_tensors(tt.model)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-4, atol=1e-6, msg=n)
    ma, mb = abp.read_mask_file(tmp_path / "reference" / "mask.safetensors"), abp.read_mask_file(tmp_path / "triton" / "mask.safetensors")
    assert 0.1 < rr["sparsity"] and all(torch.equal(ma.masks[k], mb.masks[k]) for k in ma.masks)
