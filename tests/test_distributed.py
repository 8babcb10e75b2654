"""Data-parallel ABP on CPU (gloo): 2 processes equal 1 on the same global batches (dropout off), one mask
file, identical score-optimiser state on every rank, resume across world sizes (2 → 1, 1 → 2, 1 → FSDP 2),
FSDP2-sharded masked layers against unsharded ones, and the Accelerate recipe.

Multi-process cases start ``python -m torch.distributed.run --standalone`` (a free port) on this very
file: run as a script it is the worker, which calls ``abp.cli.main`` (the `torchrun -m abp prune` path)
with the task heads' dropout set to 0 so that 1 and N processes draw no different random masks.
"""
import gc
import json
import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from abp.train.distributed import shard_batch, shard_rows, step_seed
from abp.train.strategy import DDP, MultiProcess, Strategy
from abp.train.trainer import HEAD_REFIT_DIR

# every strategy starts a step in seed_step: the one-process body (Strategy) or the per-rank one (MultiProcess)
_REAL_SEED_STEP = {cls: cls.__dict__["seed_step"] for cls in (Strategy, MultiProcess)}
HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
STEPS, DIE_AT = 16, 6  # checkpoints every 4 steps: a run killed at the start of step 6 resumes from step 4


# ------------------------------------------------------------------------------------------ helpers


def _no_dropout_heads(setitem=lambda d, k, v: d.__setitem__(k, v)):
    """Make the trainer's heads dropout-free (their 0.1 is not a config field)."""
    from abp.train import heads

    for kind, cls in list(heads.HEADS.items()):
        setitem(heads.HEADS, kind, partial(cls, dropout=0.0))


def _args(cfg: dict) -> list[str]:
    out = []
    for k, v in cfg.items():
        out += [f"--{k.replace('_', '-')}", *([str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)])]
    return out


def _launch(nproc: int, *worker_args: str, timeout: int = 240, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "abp", *worker_args] if module else [str(HERE), *worker_args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def _masks(out: Path) -> dict:
    import abp

    mf = abp.read_mask_file(out / "mask.safetensors")
    return {k: abp.unpack_mask(v, mf.shapes[k]) for k, v in mf.masks.items()}


def _scores(out: Path) -> dict:
    from abp.train.checkpoint import load_checkpoint

    return load_checkpoint(out / "checkpoint.safetensors")["scores"]


def _same_run(ref: Path, other: Path) -> None:
    """Same mask, same loss curve and dev metric, scores equal up to float rounding.

    Sharding the batch changes the summation order (fp32 rounding, ~1e-7). With the hard forward
    mask 1[θ>0] that stays rounding. (The paper's soft forward mask σ(t_l·θ), t_l = 1e5, amplifies
    it near θ = 0 by up to t_l/4 per step: runs then drift apart by ~1e-4 of the scores' scale and
    a few scores sitting at 0 may land on the other side; measured on this tiny run.)
    """
    ma, mb = _masks(ref), _masks(other)
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"mask of {k} differs in {(ma[k] != mb[k]).sum()} places"
    sa, sb = _scores(ref), _scores(other)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-5 * float(sa[k].abs().max()), msg=k)
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (ref, other))
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for a, b in zip(ha, hb):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["sparsity"] == a["sparsity"] and b["accuracy"] == a["accuracy"], (a, b)
    ra, rb = (json.loads((d / "metrics.json").read_text()) for d in (ref, other))
    assert ra["dev_metric"] == rb["dev_metric"] and ra["sparsity"] == rb["sparsity"] and ra["best_step"] == rb["best_step"]


def _outputs_are_single(out: Path) -> None:
    """One mask file, one checkpoint, nothing half-written left behind; the same in the head refit's folder (the
    default's second phase, which every rank runs too)."""
    files = ["checkpoint.safetensors", "history.json", "mask.safetensors", "metrics.json"]
    names = sorted(p.name for p in out.iterdir())
    assert names in (files, sorted([*files, HEAD_REFIT_DIR])), names
    if HEAD_REFIT_DIR in names:
        assert sorted(p.name for p in (out / HEAD_REFIT_DIR).iterdir()) == files


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def run_cfg(tiny_model_dir_nodrop, tiny_data):
    # batch 7 over 96 rows: shards of 3 and 4 rows, an epoch boundary, a last batch of 5 (2 and 3 rows);
    # exclude nothing: the pooler is masked too, and the loss never reaches it (its scores get no gradient);
    # the hard forward mask (t_l = None): see _same_run
    # plain SGD from positive uniform scores: 1 and N processes stay equal up to rounding, mask included.
    # Adam's sign-like first steps, and magnitude-init scores of near-zero weights that start within rounding
    # of 0, can flip a score whose fate summation order decides (test_adam_*)
    return dict(model=tiny_model_dir_nodrop, train_file=str(tiny_data / "train.csv"), dev_file=str(tiny_data / "dev.csv"),
                text_columns=["sentence"], label_column="label", num_labels=2, exclude=[], t_l=None, target_sparsity=0.3,
                max_steps=STEPS, eval_every=4, log_every=2, batch_size=7, max_length=16, seed=3, score_optimizer="sgd",
                score_init_mode="uniform")


def _near_run(ref: Path, other: Path, max_flips: float = 1e-4) -> None:
    """Adam's run on N processes against 1: scores within rounding, masks equal but for at most a
    ``max_flips`` share of entries (scores whose gradient is near zero, where summation order decides the
    sign of Adam's first step), the same loss curve to 1e-4."""
    ma, mb = _masks(ref), _masks(other)
    flips = sum(int((ma[k] != mb[k]).sum()) for k in ma)
    total = sum(m.numel() for m in ma.values())
    assert flips <= max_flips * total, f"{flips} of {total} mask entries differ"
    ha, hb = (json.loads((d / "history.json").read_text()) for d in (ref, other))
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for a, b in zip(ha, hb):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["sparsity"] == pytest.approx(a["sparsity"], abs=max_flips), (a, b)


def _single(cfg: dict, out: Path, monkeypatch, *, die_at=None, resume=False) -> None:
    """A 1-process run in this process (no torchrun)."""
    from abp.train.config import ABPConfig
    from abp.train.trainer import Trainer

    _no_dropout_heads(monkeypatch.setitem)
    conf = ABPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    if die_at is not None:
        _die_at(die_at, monkeypatch.setattr)
    Trainer(conf, out, progress=False).run(resume=resume)


def _die_at(step: int, setattr_=setattr):
    """Simulate a crash at the start of ``step`` (on every rank at once: no rank is left waiting)."""

    for cls, real in _REAL_SEED_STEP.items():
        def dying(self, seed, s, real=real):
            if s == step:
                raise KeyboardInterrupt
            real(self, seed, s)

        setattr_(cls, "seed_step", dying)


@pytest.fixture(scope="module")
def reference(run_cfg, tmp_path_factory):
    """The uninterrupted single-process run everything is compared with."""
    out = tmp_path_factory.mktemp("ref")
    mp = pytest.MonkeyPatch()
    try:
        _single(run_cfg, out, mp)
    finally:
        mp.undo()
    return out


# ------------------------------------------------------------------------------------------ tests


def test_shard_rows_and_weights_cover_the_global_batch():
    for n in (1, 2, 5, 7, 32, 33):
        for world in (1, 2, 3, 8):
            spans = [shard_rows(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(h - lo for lo, h in spans) - min(h - lo for lo, h in spans) <= 1
            # per-rank mean losses weighted by world·rows_r/n, averaged over ranks = the global mean
            x = torch.randn(n, dtype=torch.float64)
            parts = [shard_batch({"x": x}, r, world) for r in range(world)]
            avg = sum(p["x"].mean() * w for p, w in parts) / world
            torch.testing.assert_close(avg, x.mean())
            assert all(len(p["x"]) >= 1 for p, _ in parts)  # a rank without rows still runs one (weight 0)
    with pytest.raises(ValueError, match="rank"):
        shard_rows(4, 2, 2)


def test_step_seed_decorrelates_ranks_and_is_pure():
    assert step_seed(3, 5, 0) == step_seed(3, 5, 0)
    assert len({step_seed(3, s, r) for s in range(50) for r in range(8)}) == 400


def test_ddp_two_processes_equal_one(run_cfg, reference, tmp_path):
    out = tmp_path / "ddp2"
    proc = _launch(2, "prune", json.dumps(run_cfg), str(out), "--dump")
    _ok(proc)
    _same_run(reference, out)
    _outputs_are_single(out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["distributed"] == {"strategy": "ddp", "world_size": 2, "backend": "gloo"}
    assert m["fused_update"] is False and m["score_update"].startswith("multi-tensor") and "DDP" in m["score_update"]
    assert proc.stdout.count('"mask_file"') == 1  # one summary, from rank 0
    states = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    assert states[0] == states[1]  # counts, pruned, γ, active, α: identical on every rank, bit for bit
    assert states[0]["phases"] == 3  # DDP rebuilt for warm-up (head), pruning (head + scores), stopped (head)


def test_ddp_gradient_accumulation_equals_one_process(run_cfg, tmp_path, monkeypatch):
    """grad_accum=2: two global micro-batches a step, DDP's no_sync on the first."""
    cfg = dict(run_cfg, grad_accum=2, max_steps=8)
    _single(cfg, tmp_path / "one", monkeypatch)
    _ok(_launch(2, "prune", json.dumps(cfg), str(tmp_path / "two")))
    _same_run(tmp_path / "one", tmp_path / "two")


def test_resume_two_to_one(run_cfg, reference, tmp_path, monkeypatch):
    out = tmp_path / "2to1"
    proc = _launch(2, "prune", json.dumps(run_cfg), str(out), "--die-at", str(DIE_AT))
    assert proc.returncode != 0 and not (out / "metrics.json").exists()
    from abp.train.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoint.safetensors")["info"]["step"] == 4
    _single(run_cfg, out, monkeypatch, resume=True)
    _same_run(reference, out)
    _outputs_are_single(out)


@pytest.fixture(scope="module")
def died_single(run_cfg, tmp_path_factory):
    """A single-process run killed at step 6 (its last checkpoint: step 4)."""
    out = tmp_path_factory.mktemp("died1")
    mp = pytest.MonkeyPatch()
    try:
        with pytest.raises(KeyboardInterrupt):
            _single(run_cfg, out, mp, die_at=DIE_AT)
    finally:
        mp.undo()
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_one_to_two(run_cfg, reference, died_single, tmp_path, strategy):
    out = tmp_path / f"1to2-{strategy}"
    shutil.copytree(died_single, out)
    cfg = dict(run_cfg, distributed=strategy)
    proc = _launch(2, "prune", json.dumps(cfg), str(out), "--resume", "--dump")
    _ok(proc)
    _same_run(reference, out)
    _outputs_are_single(out)
    states = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(2)]
    assert states[0] == states[1]
    assert json.loads((out / "metrics.json").read_text())["distributed"]["strategy"] == strategy


@pytest.mark.parametrize("strategy,optimizer,allocation", [("ddp", "adam_mix", "global"), ("fsdp", "adam_mix", "global"),
                                                         ("fsdp", "adam", "global"), ("fsdp", "adam_mix", "tensor")])
def test_adam_on_two_processes_follows_one_and_resumes_across_world_sizes(run_cfg, tmp_path, monkeypatch, strategy,
                                                                          optimizer, allocation):
    """Adam on the scores under DDP / FSDP (its moments sharded there; adam_mix's tensor means all-reduced; with
    allocation="tensor" each tensor's γ from its all-reduced count): a run killed at step 6 on one process resumes on
    two from the step-4 checkpoint (moments and γ included) and follows the uninterrupted single-process run."""
    cfg = dict(run_cfg, score_optimizer=optimizer, score_init_mode="magnitude", allocation=allocation)
    _single(cfg, tmp_path / "one", monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        _single(cfg, tmp_path / "two", monkeypatch, die_at=DIE_AT)
    for cls, real in _REAL_SEED_STEP.items():
        monkeypatch.setattr(cls, "seed_step", real)
    _ok(_launch(2, "prune", json.dumps(dict(cfg, distributed=strategy)), str(tmp_path / "two"), "--resume"))
    _near_run(tmp_path / "one", tmp_path / "two")
    _outputs_are_single(tmp_path / "two")
    from abp.train.checkpoint import load_checkpoint

    a, b = (load_checkpoint(tmp_path / d / "checkpoint.safetensors")["score_state"] for d in ("one", "two"))
    assert len(a["moments"]) == len(b["moments"]) and a["moment_steps"] == b["moment_steps"]
    for (ma, va), (mb, vb) in zip(a["moments"], b["moments"]):  # gathered to full tensors, in order
        assert ma.shape == mb.shape and va.shape == vb.shape
        torch.testing.assert_close(vb, va, rtol=1e-3, atol=1e-3 * float(va.abs().max()) + 1e-30)


def test_fsdp_masked_layers_match_unsharded():
    """FSDP2 FULL_SHARD over a masked BERT with bf16 frozen weights and fp32 scores in the same units:
    forward, the scores' gradients, the sharded score step and the sharded α calibration all equal
    the unsharded model's, and the shard-local counts sum to the global ones on every rank."""
    _ok(_launch(2, "fsdp-unit"))


def test_torchrun_module_entry_point(run_cfg, tmp_path):
    """`torchrun -m abp prune` itself (dropout on: only the outputs are checked)."""
    out = tmp_path / "cli"
    cfg = dict(run_cfg, max_steps=4, eval_every=2, distributed="fsdp")
    proc = _launch(2, "prune", *_args(cfg), "--output", str(out), "--quiet", module=True)
    _ok(proc)
    _outputs_are_single(out)
    assert proc.stdout.count("step 4:") == 2  # eval lines (the loop's, the head refit's) and the summary from rank 0 only
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["mask_file"].endswith("mask.safetensors")
    m = json.loads((out / "metrics.json").read_text())
    assert m["distributed"]["world_size"] == 2 and m["steps"] == 4 + 4 and m["head_refit"]["steps"] == 4


def test_accelerate_recipe_two_processes_equal_one(tiny_model_dir_nodrop, tiny_data, tmp_path):
    """The Accelerate recipe (abp layers in a user's own loop): `accelerate launch` with 2 CPU processes
    learns the same mask as 1 process on the same global batches."""
    args = ["--model", tiny_model_dir_nodrop, "--train-file", str(tiny_data / "train.csv"), "--steps", "10",
            "--batch-size", "8", "--sparsity", "0.3", "--head-dropout", "0"]
    one = subprocess.run([sys.executable, "-m", "abp.train.accelerate_example", *args, "--output", str(tmp_path / "one")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    _ok(one)
    # `--cpu` alone would want mpirun for several processes; the torchrun-based launcher with
    # ACCELERATE_USE_CPU=1 gives Accelerate's MULTI_CPU mode (gloo) without a config file or network
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                          "-m", "abp.train.accelerate_example", *args, "--output", str(tmp_path / "two")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    _ok(two)
    a, b = _masks(tmp_path / "one"), _masks(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert rb["processes"] == 2 and ra["processes"] == 1
    assert rb["losses"] == pytest.approx(ra["losses"], rel=1e-4)
    assert rb["sparsity"] == ra["sparsity"] >= 0.3


# ------------------------------------------------------------------------------------------ the worker


def _worker_prune(cfg_json: str, out: str, *flags: str) -> int:
    """`abp prune` (the CLI code path) on this rank; --die-at N, --resume, --dump (per-rank optimiser state)."""
    import abp.cli
    from abp.train import trainer as trainer_mod

    _no_dropout_heads()
    cfg = json.loads(cfg_json)
    flags = list(flags)
    if "--die-at" in flags:
        _die_at(int(flags[flags.index("--die-at") + 1]))
    if "--dump" in flags:
        real_finish, real_module, phases = trainer_mod.Trainer._finish, DDP.module, []

        def module(self, model):  # the modules DDP's training forwards ran through, one per phase
            net = real_module(self, model)
            if not phases or phases[-1] is not net:
                phases.append(net)
            return net

        def finish(self, seconds):
            if self.learn_mask:  # the loop's state, not the head refit's that follows it (the mask fixed)
                s = self.scores
                state = {"counts": s.counts.tolist(), "pruned": int(s.pruned), "gamma": float(s.gamma).hex(),
                         "active": float(s.active), "lr": float(s.lr).hex(), "steps": s.steps, "phases": len(phases)}
                Path(f"{out}.rank{self.dist.rank}.json").write_text(json.dumps(state))
            return real_finish(self, seconds)

        DDP.module = module
        trainer_mod.Trainer._finish = finish
    argv = ["prune", *_args(cfg), "--output", out, "--quiet"] + (["--resume"] if "--resume" in flags else [])
    return abp.cli.main(argv)


class _Wrapper(torch.nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, **kw):
        return self.backbone(**kw)


def _tiny_masked_bert(dtype):
    import transformers as T

    import abp

    torch.manual_seed(0)
    # odd sizes: 18 rows split 9/9 but 27 rows 14/13, a 3-row token-type table (2/1 rows per rank)
    m = T.BertModel(T.BertConfig(vocab_size=101, hidden_size=18, num_hidden_layers=2, num_attention_heads=3,
                                 intermediate_size=27, type_vocab_size=3, max_position_embeddings=32,
                                 hidden_dropout_prob=0, attention_probs_dropout_prob=0)).to(dtype)
    abp.mask_model(m, score_init_spread=1.0, exclude=["pooler"])  # fp32 scores beside the frozen weights
    return _Wrapper(m)  # FSDP's root is a wrapper, as the trainer's Classifier


def _worker_fsdp_unit() -> int:
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import abp
    from abp.train.distributed import ShardedScoreOptimizer, is_sharded
    from abp.train.fsdp import FSDP, fully_shard_model
    from abp.train.score_optim import ScoreOptimizer, calibrate_score_lr

    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(1)
    ids, types = torch.randint(0, 101, (5, 7), generator=g), torch.randint(0, 3, (5, 7), generator=g)
    target = torch.randn(3, 5, 7, 18, generator=g)

    def loss_of(model):
        hidden = model(input_ids=ids, token_type_ids=types, output_hidden_states=True).hidden_states
        return (torch.stack(hidden).float() * target).mean()  # every layer's output, as the paper's head reads

    def pairs(a, b):
        return zip(abp.patch.score_tensors(a), abp.patch.score_tensors(b))

    # bf16 frozen weights and fp32 scores in the same FSDP units: the scores' gradients agree to bf16
    # rounding (the order in which bf16 gradient contributions are summed differs under FSDP's hooks)
    m = _tiny_masked_bert(torch.bfloat16)
    ref = copy.deepcopy(m)
    fully_shard_model(m, mesh)
    loss_of(ref).backward()
    loss_of(m).backward()
    for (n, sa), (_, sb) in pairs(ref, m):
        tol = 2 ** -7 * float(sa.grad.abs().max())
        torch.testing.assert_close(sb.grad.full_tensor(), sa.grad, rtol=0, atol=tol, msg=n)

    # fp32: forward, gradients, the sharded score step, α calibration, counts, γ and the stop rule
    m = _tiny_masked_bert(torch.float32)
    ref = copy.deepcopy(m)
    kw = dict(lr=0.0, target_sparsity=0.4, prune_steps=3, recovery=True)
    ref_opt = ScoreOptimizer(ref, **kw)
    opt = ShardedScoreOptimizer(m, **kw)
    fully_shard_model(m, mesh)
    opt.attach()
    assert all(is_sharded(s) for _, s in abp.patch.score_tensors(m))
    strategy = FSDP(torch.device("cpu"))  # the trainer's calls on sharded scores
    for step in range(4):
        la, lb = loss_of(ref), loss_of(m)
        torch.testing.assert_close(lb, la, rtol=1e-6, atol=1e-8)
        la.backward()
        lb.backward()
        for (n, sa), (_, sb) in pairs(ref, m):
            tol = 1e-5 * float(sa.grad.abs().max())  # fp32 rounding (summation order), relative to the tensor
            torch.testing.assert_close(sb.grad.full_tensor(), sa.grad, rtol=0, atol=tol, msg=n)
        if step == 0:
            lr_ref = calibrate_score_lr(ref, prune_steps=3, ratio=1.5)
            lr = strategy.calibrate_score_lr(m, prune_steps=3, ratio=1.5)  # shard statistics summed over ranks
            assert abs(lr - lr_ref) <= 1e-5 * lr_ref, (lr, lr_ref)
            ref_opt.set_lr(lr_ref)
            opt.set_lr(lr_ref)
        before = [sa.detach().clone() for _, sa in abp.patch.score_tensors(ref)]
        ref_opt.step()
        opt.step()
        for ((n, sa), (_, sb)), b in zip(pairs(ref, m), before):
            # the update carries the gradients' rounding: tolerance relative to the step and to θ
            tol = 1e-5 * float((sa.detach() - b).abs().max()) + 1e-6 * float(b.abs().max())
            torch.testing.assert_close(sb.full_tensor(), sa.detach(), rtol=0, atol=tol, msg=n)
        assert ref_opt.counts.tolist() == opt.counts.tolist() and int(ref_opt.pruned) == int(opt.pruned)
        torch.testing.assert_close(opt.gamma, ref_opt.gamma, rtol=1e-6, atol=0)
        assert float(ref_opt.active) == float(opt.active)
    assert int(opt.pruned) > 0 and float(opt.active) == 0, "the stop rule should have fired: the test proves little"
    every = [None] * world
    dist.all_gather_object(every, (opt.counts.tolist(), int(opt.pruned), float(opt.gamma).hex()))
    assert all(e == every[0] for e in every), every  # the same global state on every rank, bit for bit
    assert strategy.sparsity(m) == abp.sparsity(ref)
    print(f"rank {rank}: fsdp unit ok", flush=True)
    # as abp.train.distributed.shutdown does: free the FSDP state and gloo work objects before the group goes
    # (freed at interpreter exit instead, they abort the process: "terminate called without an active exception")
    del m, opt, ref, ref_opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    sys.exit(_worker_prune(*rest) if mode == "prune" else _worker_fsdp_unit())
