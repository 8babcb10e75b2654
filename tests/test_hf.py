"""ABP in a ``transformers.Trainer`` script (abp.hf): a real Trainer run on the embedded MiniLM and SST-2 to the target
sparsity, exact resume, gradient accumulation, the score gradients kept out of the Trainer's clip, fused == unfused,
fp16's loss scale, and the settings Algorithm 1 cannot honour refused by name."""
import copy
import json

import pytest
import torch

import abp
import abp.hf
from abp.patch import score_tensors

transformers = pytest.importorskip("transformers")
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,  # noqa: E402
                          Trainer, TrainerCallback, TrainingArguments)
from transformers.trainer_callback import TrainerState  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _args(out, **kw):
    base = dict(per_device_train_batch_size=8, max_steps=12, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return TrainingArguments(str(out), **{**base, **kw})


def _trainer(model, args, rows, tok, callbacks=None, **abp_options):
    opt, sched = abp.hf.optimizers(model, args, **abp_options)
    cbs = [abp.hf.ABPCallback(task="test")] if callbacks is None else callbacks
    return Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                   optimizers=(opt, sched), callbacks=cbs), opt


def _scores(model):
    return {n: s.detach().clone() for n, s in score_tensors(model)}


# ------------------------------------------------------------------ a tiny BERT classifier (fast mechanics tests)
@pytest.fixture(scope="module")
def tiny_cls(tmp_path_factory, minilm_path):
    """A 2-layer, hidden-32 BertForSequenceClassification without dropout, the embedded model's tokenizer."""
    d = tmp_path_factory.mktemp("tiny-cls")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=48, max_position_embeddings=64, num_labels=2,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(minilm_path).save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    words = ["good", "bad", "fine", "awful", "great", "poor", "movie", "plot", "the", "a"]
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(96):
        ws = [words[i] for i in torch.randint(0, len(words), (6,), generator=g).tolist()]
        label = int(sum(w in ("good", "fine", "great") for w in ws) > sum(w in ("bad", "awful", "poor") for w in ws))
        rows.append({**tok(" ".join(ws)), "labels": label})
    return str(d), tok, rows


def _tiny(tiny_cls):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_cls[0])
    return abp.hf.mask_model(model)


# ------------------------------------------------------------------ the real run: MiniLM, SST-2
SST2 = dict(examples=240, max_length=48, batch=8, steps=30, save=10, target=0.3)


def test_trainer_prunes_minilm_on_sst2_and_resumes_exactly(glue_dir, minilm_path, tmp_path, caplog):
    """30 Trainer steps on 240 SST-2 sentences: the target is reached and kept, the frozen weights do not move, the mask
    files (checkpoints and output_dir) load onto a fresh model, the log carries the sparsity, and a resume from the
    middle checkpoint ends with the same scores, bit for bit."""
    from abp.train.data import load_split

    tok = AutoTokenizer.from_pretrained(minilm_path)
    rows = [{**tok(e.text_a, truncation=True, max_length=SST2["max_length"]), "labels": e.label}
            for e in load_split("sst2", "train", glue_dir, max_examples=SST2["examples"], seed=0)]

    def fresh():
        torch.manual_seed(0)  # the new classifier's initialisation
        return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2)

    model = abp.hf.mask_model(fresh())
    head = {n for n, _ in abp.hf.task_head(model).named_parameters()}
    assert head == {"classifier.weight", "classifier.bias"}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith("scores")
              and not n.startswith("classifier.")}
    args = _args(tmp_path / "run", per_device_train_batch_size=SST2["batch"], max_steps=SST2["steps"],
                 save_strategy="steps", save_steps=SST2["save"])
    trainer, opt = _trainer(model, args, rows, tok, target_sparsity=SST2["target"])
    with caplog.at_level("INFO", logger="abp"):
        trainer.train()
    assert "score update: multi-tensor" in caplog.text  # CPU: the fused update is off, and the log says why

    # the frozen pre-trained weights: bit-identical, still frozen
    for n, p in model.named_parameters():
        if n in frozen:
            assert not p.requires_grad, n
            assert torch.equal(p.detach(), frozen[n]), n

    # the stop rule: pruning stops the first step the sparsity reaches the target, and the mask never moves again
    hist = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in hist] == list(range(1, SST2["steps"] + 1))
    sp = [h["abp/sparsity"] for h in hist]
    stop = next(i for i, s in enumerate(sp) if s >= SST2["target"])
    assert [h["abp/pruning_stopped"] for h in hist] == [0.0] * stop + [1.0] * (len(hist) - stop)
    assert len(set(sp[stop:])) == 1, "the mask changed after the stop rule fired"
    # overshoot: less than the one step that crossed the target, which prunes about what the ramp adds per step
    # (at most: its largest step, the first of the cubic ramp, 0.056 here; 1.5 × that leaves room for the γ controller)
    ramp_step = max(opt.scores.target_at(k + 1) - opt.scores.target_at(k) for k in range(opt.plan["prune_steps"]))
    print("sparsity around the stop:", sp[stop - 3:stop + 1], "ramp step", ramp_step)
    assert SST2["target"] <= sp[stop] <= SST2["target"] + 1.5 * ramp_step, sp[stop - 3:stop + 1]
    assert sp[stop] - SST2["target"] < sp[stop] - sp[stop - 1]
    assert any(h["abp/gamma"] > 0 for h in hist) and hist[0]["abp/pruning_active"] == 0  # warm-up first

    # the mask files: one per checkpoint and the final one, which loads onto a fresh copy of the model
    out = tmp_path / "run"
    for ck in (f"checkpoint-{SST2['save']}", f"checkpoint-{SST2['steps']}"):
        assert (out / ck / "mask.safetensors").is_file()
    other = fresh()
    mf = abp.load_mask(other, out / "mask.safetensors", head=abp.hf.task_head(other))
    assert mf.sparsity == pytest.approx(sp[-1], abs=1e-6) and abp.sparsity(other) == pytest.approx(sp[-1], abs=1e-12)
    assert mf.metadata["task"] == "test" and json.loads(mf.metadata["extra"])["plan"]["warmup_steps"] == 6
    trained = dict(abp.masked_modules(model))
    for name, m in abp.masked_modules(other):
        assert torch.equal(m.mask(), trained[name].mask()), name
    assert torch.equal(other.classifier.weight, model.classifier.weight)

    # resume from the middle checkpoint (before the stop rule fired): the same end, bit for bit
    assert stop + 1 > SST2["save"], "the checkpoint should be taken while pruning is still running"
    final = _scores(model)
    model2 = abp.hf.mask_model(fresh())
    trainer2, opt2 = _trainer(model2, _args(tmp_path / "resumed", per_device_train_batch_size=SST2["batch"],
                                            max_steps=SST2["steps"]), rows, tok, target_sparsity=SST2["target"])
    trainer2.train(resume_from_checkpoint=str(out / f"checkpoint-{SST2['save']}"))
    assert opt2.scores.steps == opt.scores.steps and float(opt2.scores.gamma) == float(opt.scores.gamma)
    for n, s in _scores(model2).items():
        assert torch.equal(s, final[n]), n
    assert torch.equal(model2.classifier.weight, model.classifier.weight)


# ------------------------------------------------------------------ gradient accumulation and clipping
class _SeeScoreGrads(TrainerCallback):
    """Records, after the Trainer's clip, whether any score had a gradient there and whether abp held them aside."""

    def __init__(self, opt):
        self.opt, self.visible, self.held = opt, [], []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        self.visible.append(any(s.grad is not None for _, s in score_tensors(self.opt.model)))
        self.held.append(sum(g is not None for g in self.opt._held))


def test_gradient_accumulation_and_clip_keep_algorithm_1s_update(tiny_cls, tmp_path):
    """gradient_accumulation_steps=2: one score step per accumulated batch, on the sum of both micro-batches'
    gradients, exactly as autograd's own accumulation gives it; the Trainer's clip never sees the score gradients."""
    _, tok, rows = tiny_cls
    runs = {}
    for clip in (1e9, 0.0):  # 1e9: hooks hold the score gradients aside (the clip factor is 1); 0: no clip, no hooks
        model = _tiny(tiny_cls)
        args = _args(tmp_path / f"ga-{clip}", per_device_train_batch_size=4, gradient_accumulation_steps=2,
                     max_steps=16, max_grad_norm=clip)
        opt, sched = abp.hf.optimizers(model, args, target_sparsity=0.3)
        see = _SeeScoreGrads(opt)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                          optimizers=(opt, sched), callbacks=[abp.hf.ABPCallback(), see])
        trainer.train()
        runs[clip] = (_scores(model), opt, see)
    (held_scores, opt, see), (plain_scores, plain_opt, plain_see) = runs[1e9], runs[0.0]
    warm = opt.plan["warmup_steps"]
    assert opt.steps == 16 and opt.scores.sparsity() >= 0.3  # 16 optimizer steps for 32 micro-batches; target reached
    assert not any(see.visible) and all(h > 0 for h in see.held[warm:warm + 3])  # hidden from the clip while pruning
    assert any(plain_see.visible)
    for n, s in held_scores.items():
        assert torch.equal(s, plain_scores[n]), n


def test_fused_update_equals_unfused_in_the_trainer(tiny_cls, tmp_path, caplog):
    """Plain SGD with calibrated α: the in-backward update (forced on CPU, reference backend) and the multi-tensor one
    give the same scores."""
    _, tok, rows = tiny_cls
    got = {}
    for fused in ("on", "off"):
        model = _tiny(tiny_cls)
        trainer, opt = _trainer(model, _args(tmp_path / fused, max_steps=10, max_grad_norm=1e9), rows, tok,
                                target_sparsity=0.3, score_optimizer="sgd", fused_update=fused)
        with caplog.at_level("INFO", logger="abp"):
            trainer.train()
        assert opt.fused == (fused == "on")
        got[fused] = (_scores(model), opt.scores.lr)
    assert "score update: fused (in the backward epilogue)" in caplog.text
    assert got["on"][1] == got["off"][1]  # the same α, calibrated on the last warm-up step
    for n, s in got["on"][0].items():
        torch.testing.assert_close(s, got["off"][0][n], rtol=1e-5, atol=1e-9, msg=n)


def test_fp16_loss_scale_is_undone_for_the_scores(tiny_cls, tmp_path):
    """fp16 with max_grad_norm=0: the GradScaler unscales the score gradients (they are in the optimizer's groups) and
    the step equals the unscaled one."""
    _, tok, rows = tiny_cls
    batch = DataCollatorWithPadding(tok)(rows[:8])
    got = []
    for scale in (None, 2.0 ** 12, "none, no gradient step"):
        model = _tiny(tiny_cls)
        args = _args(tmp_path / "fp16", fp16=True, max_grad_norm=0.0)
        # plain SGD with a fixed α: its step scales with the gradient (Adam's and the calibration would not show it)
        opt, _ = abp.hf.optimizers(model, args, target_sparsity=0.3, warmup_fraction=0.0, score_optimizer="sgd",
                                   score_lr=30.0)
        opt.setup(args, TrainerState(max_steps=4, global_step=0))
        if isinstance(scale, str):  # the control: γ alone, α = 0
            opt.scores.set_lr(0.0)
            scale = None
        scaler = torch.amp.GradScaler("cpu", init_scale=scale) if scale else None
        for _ in range(3):
            loss = model(**batch).loss
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            model.zero_grad()
        got.append(_scores(model))
    moved = 0
    for n, s in got[0].items():
        assert torch.equal(s, got[1][n]), n
        moved += int((s != got[2][n]).sum())
    assert moved > 0, "the scores' step should depend on the gradient here (else this test proves nothing)"


def test_bf16_trains_with_fp32_scores(tiny_cls, tmp_path):
    _, tok, rows = tiny_cls
    model = _tiny(tiny_cls)
    trainer, opt = _trainer(model, _args(tmp_path / "bf16", bf16=True, max_steps=8), rows, tok, target_sparsity=0.3)
    trainer.train()
    assert all(s.dtype == torch.float32 for _, s in score_tensors(model)) and opt.scores.sparsity() > 0.01


# ------------------------------------------------------------------ the head refit (abp prune's phase 2)
def test_head_refit_trains_the_head_on_the_fixed_mask_and_resumes_exactly(tiny_cls, tmp_path, caplog):
    """abp.hf.head_refit_optimizers after a pruning run: the scores and the frozen weights do not move (bit for bit),
    the head does; the log carries the sparsity with pruning off; the mask file holds the pruning run's bits and the
    refitted head; a resume from the middle checkpoint ends with the same head, bit for bit."""
    _, tok, rows = tiny_cls
    model = _tiny(tiny_cls)
    trainer, opt = _trainer(model, _args(tmp_path / "prune", max_steps=12), rows, tok, target_sparsity=0.3)
    trainer.train()
    pruned = copy.deepcopy(model)  # where the refit starts: the resumed run's model
    scores, head = _scores(model), model.classifier.weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()
              if not n.endswith("scores") and not n.startswith("classifier.")}

    def refit(m, out):
        args = _args(out, max_steps=12, save_strategy="steps", save_steps=6)
        r_opt, sched = abp.hf.head_refit_optimizers(m, args)
        return Trainer(model=m, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                       optimizers=(r_opt, sched), callbacks=[abp.hf.ABPCallback(task="test")]), r_opt

    abp.hf.head_refit_optimizers(model, _args(tmp_path / "fp16", fp16=True))  # no score gradients: clip + fp16 is fine
    t, r_opt = refit(model, tmp_path / "refit")
    with caplog.at_level("INFO", logger="abp"):
        t.train()
    assert "head refit on the mask as it is" in caplog.text
    for n, s in _scores(model).items():
        assert torch.equal(s, scores[n]), n
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert not torch.equal(model.classifier.weight, head), "the refit should train the head"
    hist = [h for h in t.state.log_history if "loss" in h]
    assert len(hist) == 12 and {h["abp/sparsity"] for h in hist} == {opt.scores.sparsity()}
    assert opt.scores.sparsity() >= 0.3
    assert all(h["abp/pruning_active"] == 0 and h["abp/pruning_stopped"] == 1 for h in hist)

    # the mask file: the pruning run's bits and the refitted head, loadable onto a fresh model
    first = abp.read_mask_file(tmp_path / "prune" / "mask.safetensors")
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_cls[0])
    mf = abp.load_mask(fresh, tmp_path / "refit" / "mask.safetensors", head=abp.hf.task_head(fresh))
    assert mf.masks.keys() == first.masks.keys() and all(torch.equal(mf.masks[k], first.masks[k]) for k in first.masks)
    assert torch.equal(fresh.classifier.weight, model.classifier.weight)
    assert json.loads(mf.metadata["extra"])["plan"]["phase"] == "head_refit"

    # a resume from the middle checkpoint: the same head, bit for bit; the pruning run's state does not resume a refit
    t2, opt2 = refit(pruned, tmp_path / "resumed")
    t2.train(resume_from_checkpoint=str(tmp_path / "refit" / "checkpoint-6"))
    assert torch.equal(pruned.classifier.weight, model.classifier.weight)
    for n, s in _scores(pruned).items():
        assert torch.equal(s, scores[n]), n
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint's pruning schedule differs"):
        opt2.load_state_dict(opt.state_dict())


# ------------------------------------------------------------------ refused settings and misuse
def test_settings_algorithm_1_cannot_honour_are_refused(tiny_cls, tmp_path, monkeypatch):
    model = _tiny(tiny_cls)
    with pytest.raises(ValueError, match=r"fp16=True with max_grad_norm=1.0"):
        abp.hf.optimizers(model, _args(tmp_path, fp16=True))
    with pytest.raises(ValueError, match=r"fused_update='on' refused.*gradient_accumulation_steps=2"):
        abp.hf.optimizers(model, _args(tmp_path, gradient_accumulation_steps=2), score_optimizer="sgd",
                          fused_update="on")
    with pytest.raises(ValueError, match=r"score_optimizer='adam_mix'"):  # the default keeps Adam's moments
        abp.hf.optimizers(model, _args(tmp_path), fused_update="on")
    with pytest.raises(TypeError, match=r"max_steps"):
        abp.hf.optimizers(model, _args(tmp_path), max_steps=10)
    with pytest.raises(ValueError, match=r"no masked modules"):
        abp.hf.optimizers(AutoModelForSequenceClassification.from_pretrained(tiny_cls[0]), _args(tmp_path))
    with pytest.raises(ValueError, match=r"target sparsity"):
        abp.hf.optimizers(model, _args(tmp_path), target_sparsity=1.0)
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"world_size=2"):
        abp.hf.optimizers(model, _args(tmp_path))
    monkeypatch.setattr(TrainingArguments, "world_size", property(lambda self: 1))
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(ValueError, match=r"n_gpu=2.*DataParallel"):
        abp.hf.optimizers(model, _args(tmp_path))


def test_misuse_is_refused_with_the_fix(tiny_cls, tmp_path):
    _, tok, rows = tiny_cls
    model = _tiny(tiny_cls)
    args = _args(tmp_path / "a", max_steps=2)
    plain = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tok),
                    callbacks=[abp.hf.ABPCallback()])
    with pytest.raises(ValueError, match=r"optimizers=abp.hf.optimizers"):
        plain.train()
    no_callback, _ = _trainer(_tiny(tiny_cls), args, rows, tok, callbacks=[])
    with pytest.raises(RuntimeError, match=r"ABPCallback"):
        no_callback.train()


def test_resume_refuses_a_state_that_does_not_fit(tiny_cls, tmp_path):
    """A resume without the score-optimiser state, with another schedule, or with scores not the checkpoint's."""
    _, tok, rows = tiny_cls
    model = _tiny(tiny_cls)
    args = _args(tmp_path / "r", max_steps=10)
    trainer, opt = _trainer(model, args, rows, tok, target_sparsity=0.3)
    trainer.train()
    state = opt.state_dict()
    assert state["abp"]["steps"] == 10

    def setup(new_model, target=0.3, load=True, step=10):
        new_opt, _ = abp.hf.optimizers(new_model, args, target_sparsity=target)
        if load:
            new_opt.load_state_dict(state)
        new_opt.setup(args, TrainerState(max_steps=10, global_step=step))
        return new_opt

    with pytest.raises(ValueError, match=r"holds no abp score-optimiser state"):
        setup(_tiny(tiny_cls), load=False)
    with pytest.raises(ValueError, match=r"schedule differs in \['target_sparsity'\]"):
        setup(_tiny(tiny_cls), target=0.4)
    with pytest.raises(ValueError, match=r"optimizer state is from step 10"):
        setup(_tiny(tiny_cls), step=5)
    with pytest.raises(ValueError, match=r"model weights \(with the scores\) were not loaded"):
        setup(_tiny(tiny_cls))  # fresh scores, the state of a pruned run
    again = _tiny(tiny_cls)
    with torch.no_grad():
        for (_, s), (_, t) in zip(score_tensors(again), score_tensors(model)):
            s.copy_(t)
    resumed = setup(again)
    assert resumed.scores.sparsity() == opt.scores.sparsity() and float(resumed.scores.gamma) == float(opt.scores.gamma)
    with pytest.raises(ValueError, match=r"not an abp.hf optimizer state"):
        resumed.load_state_dict(torch.optim.AdamW(model.classifier.parameters()).state_dict())


# ------------------------------------------------------------------ bench/hf_refit_probe.py
def test_hf_refit_probe_measures_both_phases_and_resumes_by_cell(tiny_model_dir, tiny_glue, tmp_path):
    """The README's two-phase Trainer example as a probe, on a regression pair task (one output, two sentences): each
    cell records the dev metrics after pruning and after the refit at the same sparsity, a rerun adds only the cells
    it lacks, and a record made with other settings is refused by name."""
    import importlib.util
    import math
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "hf_refit_probe.py"
    spec = importlib.util.spec_from_file_location("hf_refit_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    out = tmp_path / "probe.json"
    common = ["--task", "stsb", "--model", tiny_model_dir, "--glue-dir", tiny_glue, "--steps", "8", "--batch-size", "8",
              "--max-length", "16", "--seeds", "0", "--output", str(out)]
    assert probe.main([*common, "--sparsities", "0.4"]) == 0
    first = json.loads(out.read_text())["cells"]
    assert [(c["sparsity_target"], c["seed"]) for c in first] == [(0.4, 0)]
    cell = first[0]
    assert cell["prune"]["sparsity"] >= 0.4 and cell["refit"]["sparsity"] == cell["prune"]["sparsity"]
    for phase in ("prune", "refit"):
        assert set(cell[phase]["metrics"]) == {"pearson", "spearman"}
        assert all(math.isfinite(v) for v in cell[phase]["metrics"].values())
    assert cell["refit_gain_points"] == pytest.approx(
        100 * (cell["refit"]["metrics"]["pearson"] - cell["prune"]["metrics"]["pearson"]))

    assert probe.main([*common, "--sparsities", "0.4", "0.6"]) == 0
    doc = json.loads(out.read_text())
    assert doc["cells"][0] == cell and [c["sparsity_target"] for c in doc["cells"]] == [0.4, 0.6]
    assert doc["cells"][1]["prune"]["sparsity"] >= 0.6 and doc["device"].startswith("CPU")
    with pytest.raises(ValueError, match="other settings"):
        probe.main([*common, "--sparsities", "0.4", "--head-lr", "0.01"])
