"""Killing ``abp prune`` at any moment loses nothing and corrupts nothing.

``abp prune --resume`` runs as a subprocess on a tiny BERT and is SIGKILLed again and again, each time rerun
with the same command: at random times, mid-step (a random delay after a checkpoint lands), inside the atomic
write of a checkpoint or of the mask file (the moment its temporary file appears, plus a small random delay),
and between the last checkpoint and ``metrics.json``. File events come from inotify, so the test hits those
windows without any hook in the code under test.

At every kill point every file in the output folder that is not a temporary file must load cleanly (the mask
through :func:`abp.read_mask_file`, which checks its digests; the checkpoint through :func:`load_checkpoint`;
JSON through ``json.loads``). The resumed run must then end with the mask (bit for bit), history, checkpoint
and metrics of an uninterrupted run, wall time aside. The kill plan is drawn from a seeded RNG, so the same
windows are aimed at on every run (where exactly a kill lands within a window depends on the scheduler; what
each kill hit is printed). The default test kills a 24-step run 7 times; the ``slow`` variant kills a
96-step run 20 times, twice (two seeds). Those runs keep the head as the loop ends (``--head-refit-steps 0``), so
every kill lands in the loop the plan is timed on; ``test_killed_head_refits_resume_to_the_uninterrupted_result``
kills the default's head refit (``OUTPUT/head_refit/``) and the final replacement of the mask file.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import re
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import abp
from abp.train.checkpoint import load_checkpoint
from abp.train.trainer import HEAD_REFIT_DIR

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify and SIGKILL (Linux)")

CKPT_EVERY, EVAL_EVERY = 2, 4
REFIT_STEPS = 60  # the head refit's steps: forward-only, so enough of them to aim kills inside the refit
SEED = int(os.environ.get("ABP_KILL_SEED", "20"))
TEMP = re.compile(r"^\.(tmp\w+|.+\.[^.]+\.tmp)$")  # safetensors' own temp file; abp._atomic's .<name>.<random>.tmp
PROCESS_FIELDS = {"train_seconds_this_process"}  # wall time of the last process
# Which kernels the *last process* ran: a process that resumes at the final checkpoint runs none (see
# test_rerunning_a_finished_run_reproduces_its_metrics); compared below only where both runs recorded an op.


def _command(model_dir: str, data: Path, max_steps: int, refit_steps: int = 0) -> list[str]:
    return [sys.executable, "-P", "-m", "abp", "prune", "--model", model_dir, "--train-file", str(data / "train.csv"),
            "--dev-file", str(data / "dev.csv"), "--text-columns", "sentence", "--label-column", "label",
            "--num-labels", "2", "--sparsity", "0.2", "--max-steps", str(max_steps), "--eval-every", str(EVAL_EVERY),
            "--checkpoint-every", str(CKPT_EVERY), "--log-every", "2", "--batch-size", "8", "--max-length", "16",
            "--seed", "3", "--output", "out", "--resume", "--quiet", "--head-refit-steps", str(refit_steps),
            # the kill plan meets the mask's first write late in the run: the linear ramp reaches the target at the
            # end of its window, where the cubic default reaches it (and writes the mask) before half the run
            "--schedule", "linear"]


def _env() -> dict:
    return {**os.environ, "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class DirWatch:
    """Names created in, or renamed into, one directory (inotify)."""

    IN_MOVED_TO, IN_CREATE = 0x80, 0x100

    def __init__(self, d: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(d).encode(), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def events(self, timeout: float) -> list[tuple[str, str]]:
        """``(name, "created" | "renamed")`` events within ``timeout`` seconds (none if nothing happened)."""
        if not select.select([self.fd], [], [], max(0.0, timeout))[0]:
            return []
        buf, out, i = os.read(self.fd, 1 << 16), [], 0
        while i + 16 <= len(buf):
            _, mask, _, n = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16:i + 16 + n].rstrip(b"\0").decode()
            out.append((name, "renamed" if mask & self.IN_MOVED_TO else "created"))
            i += 16 + n
        return out

    def close(self) -> None:
        os.close(self.fd)


@dataclass
class Kill:
    """Where to kill: ``after`` seconds past launch (``on`` None), or ``after`` seconds past the ``nth`` event
    whose name matches ``on`` and whose kind is ``event`` ("created", "renamed" or "any")."""

    window: str
    after: float
    on: str | None = None
    nth: int = 1
    event: str = "created"


@dataclass
class Attempt:
    window: str
    killed: bool
    seconds: float
    hit: str = ""  # what the kill interrupted, read off the temporary files it left
    step_before: int = 0
    step_after: int = 0
    files: list = field(default_factory=list)


def _ckpt_step(out: Path) -> int:
    p = out / "checkpoint.safetensors"
    return int(load_checkpoint(p)["info"]["step"]) if p.exists() else 0


def _temps(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if TEMP.match(p.name)}


def check_every_file_loads(out: Path) -> list[str]:
    """Every file in ``out`` (and in its head refit's folder) but temporary ones loads cleanly; returns the names
    checked."""
    names = []
    for p in sorted(out.iterdir()):
        if TEMP.match(p.name):
            continue
        names.append(p.name)
        if p.name == HEAD_REFIT_DIR and p.is_dir():
            names += [f"{p.name}/{n}" for n in check_every_file_loads(p)]
        elif p.name == "mask.safetensors":
            abp.read_mask_file(p)  # every tensor's digest checked
        elif p.name == "checkpoint.safetensors":
            load_checkpoint(p)  # its digest checked
        elif p.suffix == ".json":
            json.loads(p.read_text())
        else:
            raise AssertionError(f"unexpected file {p.name} in the output folder")
    return names


def run_once(cwd: Path, cmd: list[str], kill: Kill | None, log, timeout: float = 300) -> tuple[bool, float, list]:
    """Run ``cmd`` in ``cwd``; SIGKILL it as ``kill`` says. Returns (killed, seconds, the file events seen)."""
    out = cwd / "out"
    out.mkdir(exist_ok=True)
    watch = DirWatch(out)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=log, stderr=log)
    seen, count, deadline = [], 0, None if kill is None or kill.on is not None else t0 + kill.after
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - t0 > timeout:
                proc.kill()
                raise AssertionError(f"abp prune ran past {timeout} s")
            if deadline is not None and now >= deadline:
                break
            wait = 0.05 if deadline is None else min(0.05, deadline - now)
            for name, kind in watch.events(wait):
                seen.append((round(time.monotonic() - t0, 3), kind, name))
                if kill is not None and kill.on is not None and kill.event in (kind, "any") and re.match(kill.on, name):
                    count += 1
                    if count == kill.nth and deadline is None:
                        deadline = time.monotonic() + kill.after
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        seconds = time.monotonic() - t0
    finally:
        watch.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not killed:
        assert rc == 0, f"abp prune failed (exit {rc}); see {log.name}"
    return killed, seconds, seen


def _timeline(seen: list) -> dict:
    """Seconds from launch to the first checkpoint and per training step, from an uninterrupted run's events."""
    ckpts = [t for t, kind, name in seen if kind == "renamed" and name == "checkpoint.safetensors"]
    per_step = (ckpts[-1] - ckpts[0]) / max(1, (len(ckpts) - 1) * CKPT_EVERY)
    return {"startup": ckpts[0] - CKPT_EVERY * per_step, "per_step": per_step, "checkpoints": len(ckpts)}


def plan(rng: random.Random, n: int) -> list[str]:
    """``n`` kill windows in the order a run meets them: while it trains (at random times, mid-step, inside a
    checkpoint write), then at the mask's first write, a checkpoint write, a random time and between the last
    checkpoint and metrics.json; past 7 kills, more of the first kind, and reruns of the finished run killed at
    random times or inside the metrics write."""
    early, late = ["time", "checkpoint-write", "step"], ["mask-write", "checkpoint-write", "time", "finish"]
    extra = max(0, n - len(early) - len(late))
    middle = [rng.choice(["time", "step", "checkpoint-write"]) for _ in range(extra - extra // 4)]
    tail = [rng.choice(["metrics-write", "time"]) for _ in range(extra // 4)]
    return (early + middle + late + tail)[:n]


def aim(window: str, rng: random.Random, step: int, max_steps: int, tl: dict) -> Kill:
    """The kill for ``window`` in an attempt that resumes at checkpoint ``step``."""
    left = (max_steps - step) // CKPT_EVERY  # checkpoints this attempt writes
    if window == "time":
        if left == 0 or rng.random() < 0.3:  # during the imports, model and data loading
            return Kill(window, rng.uniform(0.2, 1.0) * tl["startup"])
        # while it trains: a random time after its first write (startup times vary too much to aim from launch)
        return Kill(window, rng.uniform(0, 0.5 * (max_steps - step) * tl["per_step"]), "", 1, "any")
    if window == "step":  # mid-step or mid-evaluation: a random delay after a checkpoint landed
        return Kill(window, rng.uniform(0, 1.5 * CKPT_EVERY * tl["per_step"]), r"^checkpoint\.safetensors$",
                    rng.randint(1, 2), "renamed")
    if window == "checkpoint-write":  # its temporary file just appeared: inside the atomic write
        return Kill(window, rng.choice([0.0, rng.uniform(0, 0.03)]), r"^\.checkpoint\.safetensors\..*\.tmp$",
                    rng.randint(1, 2))
    if window == "mask-write":
        return Kill(window, rng.choice([0.0, rng.uniform(0, 0.005)]), r"^\.mask\.safetensors\..*\.tmp$")
    if window == "metrics-write":
        return Kill(window, 0.0, r"^\.metrics\.json\..*\.tmp$")
    if window == "finish":  # the last checkpoint landed; metrics.json not yet written
        return Kill(window, 0.0, r"^checkpoint\.safetensors$", max(1, left), "renamed")
    raise ValueError(window)


def _what_was_hit(new_temps: set[str]) -> str:
    hit = sorted({re.sub(r"^\.(.+?)\.[^.]+\.tmp$", r"\1", t) for t in new_temps if not t.startswith(".tmp")})
    inside = " (inside safetensors' write)" if any(t.startswith(".tmp") for t in new_temps) else ""
    return ("writing " + " and ".join(hit) + inside) if hit else ("between writes" + inside)


def _compare_runs(ref: Path, got: Path) -> None:
    """The resumed run's outputs equal the uninterrupted run's: mask bits, head, metadata, history, checkpoint,
    metrics (wall time aside; the kernels recorded are the whole run's, over every process)."""
    a, b = abp.read_mask_file(ref / "mask.safetensors"), abp.read_mask_file(got / "mask.safetensors")
    for part in ("masks", "probes", "head"):
        x, y = getattr(a, part), getattr(b, part)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"mask file {part} differ"
    assert a.metadata == b.metadata
    assert json.loads((ref / "history.json").read_text()) == json.loads((got / "history.json").read_text())
    ca, cb = load_checkpoint(ref / "checkpoint.safetensors"), load_checkpoint(got / "checkpoint.safetensors")
    assert ca["info"] == cb["info"]
    for part in ("scores", "head"):
        assert all(torch.equal(ca[part][k], cb[part][k]) for k in ca[part]), f"checkpoint {part} differ"
    ma, mb = json.loads((ref / "metrics.json").read_text()), json.loads((got / "metrics.json").read_text())
    assert {k: v for k, v in ma.items() if k not in PROCESS_FIELDS} == \
        {k: v for k, v in mb.items() if k not in PROCESS_FIELDS}
    assert (ref / HEAD_REFIT_DIR).is_dir() == (got / HEAD_REFIT_DIR).is_dir()
    if (ref / HEAD_REFIT_DIR).is_dir():
        _compare_runs(ref / HEAD_REFIT_DIR, got / HEAD_REFIT_DIR)


@pytest.fixture(scope="module")
def references(tiny_model_dir, tiny_data, tmp_path_factory):
    """``references(max_steps, refit_steps=0)``: an uninterrupted run of the command, and its timeline (one per
    budget)."""
    runs: dict[tuple[int, int], dict] = {}

    def get(max_steps: int, refit_steps: int = 0) -> dict:
        if (max_steps, refit_steps) not in runs:
            d = tmp_path_factory.mktemp(f"uninterrupted-{max_steps}-{refit_steps}")
            cmd = _command(tiny_model_dir, tiny_data, max_steps, refit_steps)
            with open(d / "log.txt", "w") as log:
                killed, seconds, seen = run_once(d, cmd, None, log)
            assert not killed
            runs[(max_steps, refit_steps)] = {"dir": d / "out", "cmd": cmd, "seconds": seconds, "seen": seen,
                                              "timeline": _timeline(seen), "max_steps": max_steps}
        return runs[(max_steps, refit_steps)]
    return get


def kill_and_resume(reference, tmp_path, n_kills: int, seed: int, report) -> list[Attempt]:
    rng = random.Random(seed)
    cmd, tl, max_steps = reference["cmd"], reference["timeline"], reference["max_steps"]
    attempts: list[Attempt] = []
    with open(tmp_path / "log.txt", "w") as log:
        for window in plan(rng, n_kills):
            out = tmp_path / "out"
            step = _ckpt_step(out) if out.exists() else 0
            before = _temps(out) if out.exists() else set()
            kill = aim(window, rng, step, max_steps, tl)
            killed, seconds, _ = run_once(tmp_path, cmd, kill, log)
            a = Attempt(window, killed, round(seconds, 2), step_before=step)
            a.files = check_every_file_loads(out)  # nothing half-written, whatever was interrupted
            a.hit = _what_was_hit(_temps(out) - before) if killed else "nothing: the run finished first"
            a.step_after = _ckpt_step(out)
            attempts.append(a)
        _, seconds, _ = run_once(tmp_path, cmd, None, log)  # the last rerun, left to finish
        check_every_file_loads(tmp_path / "out")
    left = sorted(_temps(tmp_path / "out"))
    lines = [f"kill/resume (seed {seed}, {max_steps} steps): {sum(a.killed for a in attempts)} kills in "
             f"{len(attempts)} attempts; "
             f"uninterrupted run {reference['seconds']:.1f} s; temporary files the kills left behind: {len(left)}"]
    lines += [f"  aimed at {a.window:<17} {'killed' if a.killed else 'missed'} after {a.seconds:5.2f} s, checkpoint "
              f"step {a.step_before:2d} -> {a.step_after:2d}: {a.hit}; files intact: {', '.join(a.files) or '-'}"
              for a in attempts]
    report("\n".join(lines))
    _compare_runs(reference["dir"], tmp_path / "out")
    return attempts


@pytest.fixture
def report(request):
    def write(text: str) -> None:
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        capture = request.config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled():
            reporter.write_line("\n" + text)
    return write


def test_killed_runs_resume_to_the_uninterrupted_result(references, tmp_path, report):
    attempts = kill_and_resume(references(24), tmp_path, n_kills=7, seed=SEED, report=report)
    assert sum(a.killed for a in attempts) >= 5, "most planned kills should land before the run finishes"
    assert any(a.hit.startswith("writing checkpoint") for a in attempts), "no kill landed inside a checkpoint write"


@pytest.mark.slow
@pytest.mark.parametrize("seed", [SEED + 1, SEED + 2])
def test_killed_runs_resume_to_the_uninterrupted_result_many_kills(references, tmp_path, report, seed):
    attempts = kill_and_resume(references(96), tmp_path, n_kills=20, seed=seed, report=report)
    assert sum(a.killed for a in attempts) >= 15
    assert any(a.hit.startswith("writing checkpoint") for a in attempts)


def test_killed_head_refits_resume_to_the_uninterrupted_result(references, tmp_path, report):
    """The default's second phase, the head refit: killed at random times inside it and inside a mask file write,
    each time rerun with the same command; it must end with the uninterrupted run's mask file, metrics and refit
    folder (mask, history, checkpoint, metrics)."""
    reference = references(12, REFIT_STEPS)
    # the refit starts once the loop's metrics.json lands (a rerun that resumes at the loop's final checkpoint
    # writes it again first): aim from that event, a random share of the refit's time later
    start = next(t for t, kind, name in reference["seen"] if kind == "renamed" and name == "metrics.json")
    span = reference["seconds"] - start  # the refit, then its mask file and metrics replacing the run's
    rng = random.Random(SEED)
    # each a small share of it, so that every rerun (which resumes at the refit's last checkpoint) has some left
    kills = [Kill("refit", rng.uniform(0.05, 0.3) * span, r"^metrics\.json$", 1, "renamed") for _ in range(3)]
    kills.append(Kill("mask-write", 0.0, r"^\.mask\.safetensors\..*\.tmp$"))  # a rerun's first mask write
    out, lines, n_killed, inside = tmp_path / "out", [], 0, 0
    with open(tmp_path / "log.txt", "w") as log:
        for kill in kills:
            killed, seconds, _ = run_once(tmp_path, reference["cmd"], kill, log)
            n_killed += killed
            mid = killed and (out / HEAD_REFIT_DIR).is_dir() and not (out / HEAD_REFIT_DIR / "metrics.json").exists()
            inside += mid
            lines.append(f"  aimed at {kill.window:<12} {'killed' if killed else 'missed'} after {seconds:5.2f} s"
                         f"{' (inside the refit)' if mid else ''}; files intact: {', '.join(check_every_file_loads(out))}")
        run_once(tmp_path, reference["cmd"], None, log)
    report(f"head refit kill/resume: uninterrupted run {reference['seconds']:.1f} s, refit {span:.1f} s\n" + "\n".join(lines))
    _compare_runs(reference["dir"], out)
    refit = json.loads((out / "metrics.json").read_text())["head_refit"]
    assert refit["steps"] == REFIT_STEPS and refit["folder"] == HEAD_REFIT_DIR
    assert n_killed >= 2 and inside >= 1, "the kills should land before the run finishes, one inside the refit"


def test_rerunning_a_finished_run_reproduces_its_metrics(references, tmp_path):
    """The same command once more, after the run finished: it resumes at the final checkpoint, trains nothing,
    and must leave the mask and metrics as they were (wall time aside)."""
    import shutil

    reference = references(24)
    shutil.copytree(reference["dir"], tmp_path / "out")
    with open(tmp_path / "log.txt", "w") as log:
        run_once(tmp_path, reference["cmd"], None, log)
    ma = json.loads((reference["dir"] / "metrics.json").read_text())
    mb = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {k: v for k, v in ma.items() if k not in PROCESS_FIELDS} == \
        {k: v for k, v in mb.items() if k not in PROCESS_FIELDS}


def test_files_a_run_writes_get_the_usual_permissions(references):
    """The atomic writes replace a 0600 temporary file: the result must still get the user's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    out = references(12, REFIT_STEPS)["dir"]
    for p in [*references(24)["dir"].iterdir(), *out.iterdir(), *(out / HEAD_REFIT_DIR).iterdir()]:
        if not TEMP.match(p.name):
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert p.stat().st_mode & 0o777 == want, (p.name, oct(p.stat().st_mode))
