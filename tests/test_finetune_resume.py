"""The fine-tuning loop (finetune, mp, imp) checkpoints and resumes exactly (tiny random BERT, tiny SST-2, CPU).

A loop killed mid-step and resumed from its last checkpoint by a fresh process-like :class:`FineTuner` ends with the
same weights, masks, losses, AdamW state, LR schedule and RNG state, bit for bit, as an uninterrupted one (and
the same as a run that never checkpoints); sabotaging the data order or the RNG restore makes it differ, so the
comparison can fail. MP's phase 1 resumes with its pruning events (the caller's ``extra`` state). A checkpoint
of another run or with one flipped byte is refused with a message naming the file and the problem; the file is
deleted once the phase is done.
"""
import dataclasses
import json

import pytest
import torch

from abp.experiments import finetune as F
from abp.experiments import methods as M
from abp.experiments.finetune import FineTuner
from abp.experiments.finetune_checkpoint import load_finetune_checkpoint
from abp.train.checkpoint import CheckpointError, read_tensor_file

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, EVERY = 12, 4  # 5 batches an epoch: the step-8 checkpoint resumes mid-epoch (epoch 1, batch 3)


@pytest.fixture(scope="module")
def exp(tiny_model_dir, tiny_sst2):
    return M.ExperimentConfig(model=tiny_model_dir, glue_dir=tiny_sst2, max_steps=STEPS, batch_size=8, max_length=16,
                              device="cpu")


@pytest.fixture(scope="module")
def data(exp):
    return F.load_task_data(exp.abp_config("sst2", 0.5, 0))


def _tuner(exp, data, masks=None, seed=0, **over):
    return FineTuner(exp.abp_config("sst2", 0.5, seed, **over), exp.finetune_options(), masks=masks, data=data)


def _kill_at_step(monkeypatch, step):
    """The next loop dies (KeyboardInterrupt) inside the forward of its ``step``-th step from now."""
    real, calls = F.task_loss, {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            monkeypatch.setattr(F, "task_loss", real)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(F, "task_loss", dying)


def _same_file(a, b):
    """Every tensor (model, masks, AdamW, losses, RNG) and metadata entry (schedule, step, extra, identity) equal."""
    (ta, ma), (tb, mb) = read_tensor_file(a), read_tensor_file(b)
    assert ta.keys() == tb.keys()
    differ = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not differ, f"tensors differ: {differ[:5]}"
    assert ma == mb


def _same_model(a, b):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not differ, f"weights differ: {differ[:5]}"


@pytest.fixture(scope="module")
def reference(exp, data, tmp_path_factory):
    """The uninterrupted run, keeping the checkpoint of its finished loop."""
    ck = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    ft = _tuner(exp, data)
    losses = ft.train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0}, keep_checkpoint=True)
    return {"ft": ft, "losses": losses, "ck": ck}


def _interrupted(exp, data, ck, monkeypatch, kill=11):
    _kill_at_step(monkeypatch, kill)
    with pytest.raises(KeyboardInterrupt):
        _tuner(exp, data).train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0},
                                keep_checkpoint=True)
    assert load_finetune_checkpoint(ck)["step"] == (kill - 1) // EVERY * EVERY


# ------------------------------------------------------------------------------------------ (a) exact resume


def test_checkpointing_changes_nothing(exp, data, reference):
    """A run that never checkpoints (the code path of every run before) takes the same steps."""
    ft = _tuner(exp, data)
    assert ft.train(STEPS) == reference["losses"]
    _same_model(ft, reference["ft"])


def test_killed_loop_resumes_bit_identical(exp, data, reference, tmp_path, monkeypatch):
    ck = tmp_path / "ck.safetensors"
    _interrupted(exp, data, ck, monkeypatch)  # dies in step 11: resumes from step 8, mid-epoch
    ft = _tuner(exp, data)
    losses = ft.train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0}, keep_checkpoint=True)
    assert losses == reference["losses"]
    _same_model(ft, reference["ft"])
    _same_file(ck, reference["ck"])  # AdamW moments and steps, LR schedule, RNG state, losses: bit for bit
    # a rerun after the finished loop returns at once, restored
    again = _tuner(exp, data)
    assert again.train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0},
                       keep_checkpoint=True) == reference["losses"]
    _same_model(again, reference["ft"])


@pytest.mark.parametrize("sabotage", ["data_order", "rng"])
def test_the_comparison_sees_a_resume_that_is_not_exact(exp, data, reference, tmp_path, monkeypatch, sabotage):
    """Resumed without skipping the batches seen, or without the RNG state (dropout), the run differs."""
    ck = tmp_path / "ck.safetensors"
    _interrupted(exp, data, ck, monkeypatch)
    if sabotage == "data_order":
        real = FineTuner._batches
        monkeypatch.setattr(FineTuner, "_batches", lambda self, step=0: real(self, 0))
    else:
        monkeypatch.setattr(F, "restore_rng_states", lambda rng: None)
    ft = _tuner(exp, data)
    losses = ft.train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0}, keep_checkpoint=True)
    assert losses[:8] == reference["losses"][:8] and losses[8:] != reference["losses"][8:]
    with pytest.raises(AssertionError, match="weights differ"):
        _same_model(ft, reference["ft"])


# ------------------------------------------------------------------------------------------ (b) MP, extra state


def test_mp_phase1_resumes_with_its_pruning_events(exp, tmp_path, monkeypatch):
    cfg = exp.abp_config("sst2", 0.5, 0, score_init_mode="uniform")
    ref_masks, ref_meta = M._mp_masks(exp, cfg, 0.5, False, tmp_path / "a" / M.FINETUNE_CHECKPOINT)
    events = ref_meta["schedule"]["events"]
    assert [e[0] for e in events] == list(range(1, 9))  # t0 = 1, t1 = 8, every step
    ck = tmp_path / "b" / M.FINETUNE_CHECKPOINT
    _kill_at_step(monkeypatch, 8)  # dies in step 8, mid-pruning: the step-6 checkpoint holds 6 of the 8 events
    with pytest.raises(KeyboardInterrupt):
        M._mp_masks(exp, cfg, 0.5, False, ck)
    saved = load_finetune_checkpoint(ck)
    assert saved["step"] == 6 and saved["extra"] == {"events": events[:6]}
    assert saved["masks"] is not None and not all(bool(m.all()) for m in saved["masks"].values())
    _kill_at_step(monkeypatch, 5)  # killed again, in step 11: the step-9 checkpoint is past the pruning (t1 = 8)
    with pytest.raises(KeyboardInterrupt):
        M._mp_masks(exp, cfg, 0.5, False, ck)
    saved = load_finetune_checkpoint(ck)
    assert saved["step"] == 9 and saved["extra"] == {"events": events}
    masks, meta = M._mp_masks(exp, cfg, 0.5, False, ck)
    assert meta["schedule"] == ref_meta["schedule"]
    assert meta["final_loss"] == ref_meta["final_loss"] and meta["finetuned_metrics"] == ref_meta["finetuned_metrics"]
    assert masks.keys() == ref_masks.keys() and all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    _same_file(ck, tmp_path / "a" / M.FINETUNE_CHECKPOINT)  # kept for the caller, which deletes it


# ------------------------------------------------------------------------------------------ (c) another run's file


@pytest.mark.parametrize("other, field", [
    (dict(steps=STEPS + 4), "steps"),
    (dict(identity={"seed": 1}), "run.seed"),
    (dict(over={"batch_size": 4}), "settings.batch_size"),
    (dict(masked=True), "masked"),
])
def test_a_checkpoint_of_another_run_is_refused(exp, data, reference, tmp_path, other, field):
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(reference["ck"].read_bytes())
    masks = ({k: torch.ones(w.shape, dtype=torch.bool) for k, w in reference["ft"].weights.items()}
             if other.get("masked") else None)
    ft = _tuner(exp, data, masks=masks, **other.get("over", {}))
    with pytest.raises(CheckpointError, match=rf"{ck}.*another run.*{field.replace('.', '[.]')}: checkpoint"):
        ft.train(other.get("steps", STEPS), checkpoint=ck, identity=other.get("identity", {"seed": 0}))
    assert ck.read_bytes() == reference["ck"].read_bytes()  # refused: never restarted over


def test_another_models_checkpoint_is_refused(exp, data, reference, tmp_path, tiny_model_dir_nodrop):
    ck = tmp_path / "ck.safetensors"
    ck.write_bytes(reference["ck"].read_bytes())
    other_model = FineTuner(exp.abp_config("sst2", 0.5, 0, model=tiny_model_dir_nodrop), exp.finetune_options(),
                            data=data)
    with pytest.raises(CheckpointError, match=rf"{ck}.*another run.*settings[.]model: checkpoint"):
        other_model.train(STEPS, checkpoint=ck, identity={"seed": 0})
    other_head = _tuner(exp, data, head="pooled")  # other parameter names and shapes
    with pytest.raises(CheckpointError, match=rf"{ck}: its parameters are not this model's.*head"):
        other_head.train(STEPS, checkpoint=ck, identity={"seed": 0})
    other_start = _tuner(exp, data)  # same settings, other starting weights (e.g. the model's files changed)
    with torch.no_grad():
        next(iter(other_start.weights.values()))[0, 0] += 1
    with pytest.raises(CheckpointError, match=rf"{ck}.*another run.*start_digest: checkpoint"):
        other_start.train(STEPS, checkpoint=ck, identity={"seed": 0})
    assert ck.read_bytes() == reference["ck"].read_bytes()


def test_an_abp_trainer_checkpoint_is_not_a_finetuning_one(tmp_path):
    from abp.train.checkpoint import save_checkpoint

    head = torch.nn.Linear(2, 2)
    state = {"gamma": torch.zeros(()), "active": torch.ones(()), "pruned": torch.zeros(()), "steps": 0, "lr": 0.1}
    save_checkpoint(tmp_path / "c.safetensors", scores={"w": torch.ones(2)}, head=head,
                    head_opt=torch.optim.AdamW(head.parameters()), score_state=state, info={})
    with pytest.raises(CheckpointError, match="not a fine-tuning checkpoint"):
        load_finetune_checkpoint(tmp_path / "c.safetensors")


# ------------------------------------------------------------------------------------------ (d) a flipped byte


@pytest.mark.parametrize("where", ["tensor data", "metadata"])
def test_a_flipped_byte_is_refused(exp, data, reference, tmp_path, where):
    ck = tmp_path / "ck.safetensors"
    raw = bytearray(reference["ck"].read_bytes())
    if where == "tensor data":
        pos = len(raw) - 1000
        raw[pos] ^= 0x01
    else:  # the step in the header, 12 → 13: valid JSON, valid file, another state
        pos = raw.index(b'"step":"12"') + len('"step":"1')
        raw[pos] ^= 0x01
    ck.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{ck} is corrupt.*digest mismatch"):
        _tuner(exp, data).train(STEPS, checkpoint=ck, identity={"seed": 0})
    assert ck.read_bytes() == bytes(raw)


# ------------------------------------------------------------------------------------------ (e) deleted when done


def test_checkpoints_are_written_during_the_loop_and_deleted_after_it(exp, data, reference, tmp_path, monkeypatch):
    ck = tmp_path / "ck.safetensors"
    seen = []  # the step of the checkpoint on disk as each step ends (before its own write)
    look = lambda step: seen.append(ck.is_file() and load_finetune_checkpoint(ck)["step"])  # noqa: E731
    losses = _tuner(exp, data).train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0}, on_step=look)
    assert seen == [False] * 4 + [4] * 4 + [8] * 4 and not ck.exists() and losses == reference["losses"]
    _interrupted(exp, data, ck, monkeypatch)  # a resumed loop deletes it too
    assert _tuner(exp, data).train(STEPS, checkpoint=ck, checkpoint_every=EVERY, identity={"seed": 0}) == \
        reference["losses"]
    assert not ck.exists()


def test_killed_finetune_run_resumes_and_cleans_up(exp, tmp_path, monkeypatch):
    ref = M.run_method("finetune", exp, "sst2", None, 0, tmp_path / "a")
    _kill_at_step(monkeypatch, 5)  # dies in step 5: resumes from the step-3 checkpoint (12 // 4)
    with pytest.raises(KeyboardInterrupt):
        M.run_method("finetune", exp, "sst2", None, 0, tmp_path / "b")
    assert load_finetune_checkpoint(tmp_path / "b" / M.FINETUNE_CHECKPOINT)["step"] == 3
    res = M.run_method("finetune", exp, "sst2", None, 0, tmp_path / "b")
    assert res["metrics"] == ref["metrics"] and res["final_digest"] == ref["final_digest"]
    assert not any((tmp_path / d / M.FINETUNE_CHECKPOINT).exists() for d in ("a", "b"))
    assert json.loads((tmp_path / "b" / M.RESULT).read_text())["metrics"] == ref["metrics"]


def test_killed_imp_round_resumes_from_its_checkpoint(exp, tmp_path, monkeypatch):
    """Two rounds of 8 steps (0.3 at most per round to 0.5); killed in round 2, step 5: resumes at its step 4."""
    ex = dataclasses.replace(exp, imp_rate=0.3, imp_milestones=(), imp_round_steps=8)
    cfg = ex.abp_config("sst2", 0.5, 0, score_init_mode="uniform")
    ref, _ = M._imp_masks(ex, cfg, 0.5, tmp_path / "a", False)
    _kill_at_step(monkeypatch, 8 + 5)
    with pytest.raises(KeyboardInterrupt):
        M._imp_masks(ex, cfg, 0.5, tmp_path / "b", False)
    (ck,) = (tmp_path / "b").glob("checkpoint-round02-*.safetensors")
    assert load_finetune_checkpoint(ck)["step"] == 4 and len(list((tmp_path / "b").glob("round*.safetensors"))) == 1
    masks, meta = M._imp_masks(ex, cfg, 0.5, tmp_path / "b", False)
    assert meta["rounds"] == 2 and meta["rounds_computed_here"] == 1
    assert masks.keys() == ref.keys() and all(torch.equal(masks[k], ref[k]) for k in ref)
    assert not list((tmp_path / "a").glob("checkpoint-*")) and not list((tmp_path / "b").glob("checkpoint-*"))
