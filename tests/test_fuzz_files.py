"""Fuzzing the file readers a run depends on: task-mask files (:func:`abp.read_mask_file`, :func:`abp.load_mask`,
and :func:`abp.maskio.describe_mask_file`, which ``abp info`` prints) and training checkpoints
(:func:`abp.train.checkpoint.load_checkpoint`).

Property: whatever the bytes on disk (random bytes, every class of truncation, bit flips, well-formed
safetensors with missing, extra or renamed keys, wrong shapes or dtypes, garbage metadata, headers that claim
terabytes or point past the end of the file, an empty file, a directory), a reader either raises its own error
(:class:`abp.MaskFileError`, :class:`CheckpointError`) whose message names the file and the problem, or returns
exactly what the file holds. It never raises anything else and never hangs, and a refused :func:`abp.load_mask`
leaves the model (modules, parameters, scores, ``requires_grad``) and the head as they were.

The hypothesis settings are fixed (derandomized, a bounded number of examples, a deadline, no example
database), so every run tries the same cases; ``ABP_FUZZ_EXAMPLES`` raises the bound for a longer hunt.
The counts of cases run are printed at the end of the module.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import faulthandler
import json
import os
import re
import signal
import struct
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import transformers as T

import abp
from abp.maskio import MaskFileError, _tensor_digest, describe_mask_file
from abp.train import checkpoint as ckpt_mod
from abp.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from abp.train.score_optim import ScoreOptimizer

import hypothesis  # noqa: E402  (a test dependency: setup.py's test extras)
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("ABP_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=timedelta(seconds=10), database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)
HANG_S = 30  # one example past this is a hang (the deadline above reports slow ones)

COUNTS: collections.Counter = collections.Counter()  # (file kind, case kind) -> examples run
OUTCOMES: collections.Counter = collections.Counter()  # (file kind, "refused" | "loaded") -> reader calls
MESSAGES: dict[str, collections.Counter] = {"mask": collections.Counter(), "checkpoint": collections.Counter()}

# Each refusal must say what is wrong, in one of these words (besides naming the file).
PROBLEM = re.compile(r"corrupt|does not exist|directory|not a regular file|not an abp|not a safetensors|format version|"
                     r"inconsistent|missing|does not fit|other base weights|has shape|fingerprint|task head|"
                     r"incomplete|malformed|digest|lacks|cannot mask|without a weight|names modules")


class Hang(BaseException):
    """A reader ran past HANG_S (a BaseException: the readers' ``except Exception`` must not swallow it)."""


@contextlib.contextmanager
def no_hang():
    """Fail an example that runs past HANG_S: SIGALRM for Python-level loops, faulthandler (dump and exit)
    for a hang inside native code that never returns to the interpreter."""
    def alarm(*_):
        raise Hang(f"a reader ran past {HANG_S} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, HANG_S)
    faulthandler.dump_traceback_later(3 * HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------------------ the world
def _tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=20, max_position_embeddings=16, type_vocab_size=2))


def _snapshot(model: torch.nn.Module):
    """Everything a refused load must leave alone: module types, every tensor (scores too), requires_grad."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            {k: p.requires_grad for k, p in model.named_parameters()})


def _same_snapshot(a, b) -> bool:
    return a[0] == b[0] and a[2] == b[2] and a[1].keys() == b[1].keys() and \
        all(x.dtype == b[1][k].dtype and x.shape == b[1][k].shape and torch.equal(x, b[1][k]) for k, x in a[1].items())


def _read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _canonical(data: bytes) -> bytes:
    """The same safetensors file with its header's keys sorted. safetensors writes the metadata in hash order,
    which differs between processes; sorted, the byte-level cases (flips, truncations) are the same every run."""
    n = struct.unpack("<Q", data[:8])[0]
    text = json.dumps(json.loads(data[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


class World:
    """A valid mask file and a valid checkpoint (bytes and parsed), and the targets a mask file is loaded onto:
    a plain model, an already-masked one and a head (rebuilt after a load succeeds)."""

    def __init__(self, d: Path):
        self.dir, self.n = d, 0
        base = _tiny_bert()
        masked = abp.mask_model(copy.deepcopy(base), mask_bias=True, layernorm=True)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for _, s in abp.patch.score_tensors(masked):
                s.copy_(torch.randn(s.shape, generator=g))
        torch.manual_seed(2)
        head = torch.nn.Linear(16, 3)
        abp.save_mask(masked, d / "valid.safetensors", head=head, task="sst2", base_model="tiny-bert")
        self.mask_bytes = _canonical((d / "valid.safetensors").read_bytes())
        (d / "valid.safetensors").write_bytes(self.mask_bytes)
        self.mask_tensors, self.mask_meta = _read_raw(d / "valid.safetensors")

        head_opt = torch.optim.AdamW(head.parameters(), lr=0.1)
        head(torch.randn(4, 16)).sum().backward()
        head_opt.step()
        scores = ScoreOptimizer(masked, lr=0.1, target_sparsity=0.5, prune_steps=3, optimizer="adam")
        info = {"step": 4, "config": {"task": "custom", "seed": 3}, "history": [{"step": 4, "accuracy": 0.5}],
                "best": {"metric": 0.5, "step": 4, "sparsity": 0.5}}
        save_checkpoint(d / "valid.ckpt", scores=dict(abp.patch.score_tensors(masked)), head=head, head_opt=head_opt,
                        score_state=scores.state_dict(), info=info)
        self.ckpt_bytes = _canonical((d / "valid.ckpt").read_bytes())
        (d / "valid.ckpt").write_bytes(self.ckpt_bytes)
        self.ckpt_tensors, self.ckpt_meta = _read_raw(d / "valid.ckpt")
        self.ckpt = load_checkpoint(d / "valid.ckpt")

        self._pristine = {"plain": base, "masked": abp.mask_model(copy.deepcopy(base), mask_bias=True, layernorm=True),
                          "head": torch.nn.Linear(16, 3)}
        self.targets, self.snaps = {}, {}
        for k in self._pristine:
            self.reset(k)

    def reset(self, which: str) -> None:
        self.targets[which] = copy.deepcopy(self._pristine[which])
        self.snaps[which] = _snapshot(self.targets[which])

    def path(self, suffix: str) -> Path:
        self.n += 1
        return self.dir / f"case{self.n}{suffix}"

    def header_len(self, data: bytes) -> int:
        return 8 + struct.unpack("<Q", data[:8])[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, request):
    w = World(tmp_path_factory.mktemp("fuzz"))
    yield w
    lines = [f"fuzzed file readers: {sum(COUNTS.values())} cases"]
    lines += [f"  {kind:<10} {case:<14} {n:5d}" for (kind, case), n in sorted(COUNTS.items())]
    lines += [f"  reader calls {kind}: {n} {what}" for (kind, what), n in sorted(OUTCOMES.items())]
    for kind, msgs in MESSAGES.items():
        lines.append(f"  {kind} refusals, {len(msgs)} kinds of message:")
        lines += [f"    {n:5d}  {m}" for m, n in msgs.most_common()]
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        if reporter is not None:
            reporter.write_line("\n" + "\n".join(lines))
        else:  # pragma: no cover
            print("\n".join(lines), file=sys.stderr)


# ---------------------------------------------------------------------------------------------- the oracles
def _refused(kind: str, err: Exception, path: Path) -> None:
    msg = str(err)
    assert str(path) in msg, f"the message does not name the file {path}: {msg}"
    assert PROBLEM.search(msg.replace(str(path), "")), f"the message does not say what is wrong: {msg}"
    shape = re.sub(r"\(.*\)|\[.*\]|'[^']*'|[\w-]+(?:[./][\w-]*)+|\d+", "…", msg.replace(str(path), "FILE"))
    shape = re.sub(r"…(, …)+", "…", shape)
    MESSAGES[kind][shape[:110]] += 1
    OUTCOMES[(kind, "refused")] += 1


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
                                        torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))
                                        for k in a)


def check_mask(w: World, path: Path, holds: dict[str, torch.Tensor] | None, must_refuse: bool = False) -> dict:
    """Every mask-file reader on ``path``: refused with a MaskFileError naming the file (the targets untouched)
    or loaded with exactly ``holds`` (the tensors the file was written with; None: unknown, must refuse).
    Returns which readers loaded it."""
    loaded = {}
    with no_hang():
        try:
            mf = abp.read_mask_file(path)
        except MaskFileError as e:
            _refused("mask", e, path)
            mf = None
        else:
            OUTCOMES[("mask", "loaded")] += 1
            assert not must_refuse and holds is not None, f"{path} loaded but it is corrupt"
            got = {**{f"mask/{k}": v for k, v in mf.masks.items()}, **{f"probe/{k}": v for k, v in mf.probes.items()},
                   **{f"head/{k}": v for k, v in mf.head.items()}}
            assert _tensors_equal(got, {k: v for k, v in holds.items() if k.split("/")[0] in ("mask", "probe", "head")})
        loaded["read"] = mf is not None
        try:
            text = describe_mask_file(path)
        except MaskFileError as e:
            _refused("mask", e, path)
            assert mf is None, "abp info refused a file read_mask_file accepts"
        else:
            assert mf is not None and isinstance(text, str) and str(path) in text
        for target in ("plain", "masked"):
            model, head = w.targets[target], w.targets["head"]
            try:
                abp.load_mask(model, path, head=head)
            except MaskFileError as e:
                _refused("mask", e, path)
                kept = (_same_snapshot(_snapshot(model), w.snaps[target]),
                        _same_snapshot(_snapshot(head), w.snaps["head"]))
                if not all(kept):  # fresh targets for the next case, then fail this one
                    w.reset(target)
                    w.reset("head")
                assert kept[0], f"a refused load changed the {target} model"
                assert kept[1], "a refused load changed the head"
                loaded[target] = False
            else:
                assert mf is not None, "load_mask accepted a file read_mask_file refuses"
                for n, m in abp.masked_modules(model):
                    for which, _, scores in m.score_pairs():
                        key = f"{n}.{which}"
                        want = abp.unpack_mask(mf.masks[key], mf.shapes[key])
                        assert torch.equal(scores.detach() > 0, want), f"{key} was not loaded as the file holds it"
                for k, v in head.state_dict().items():
                    torch.testing.assert_close(v, mf.head[k].to(v.dtype), rtol=0, atol=0, equal_nan=True)
                w.reset(target)
                w.reset("head")
                loaded[target] = True
    return loaded


def _same_checkpoint(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and _tensors_equal({0: a.reshape(-1)},
                                                                                               {0: b.reshape(-1)})
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_checkpoint(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_checkpoint(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


def _well_formed_checkpoint(ck: dict) -> None:
    """What a resume reads from a checkpoint has the types it needs."""
    assert {"scores", "head", "head_opt", "score_state", "rng", "info"} <= ck.keys()
    assert all(isinstance(v, torch.Tensor) for v in ck["scores"].values())
    assert isinstance(ck["info"], dict) and isinstance(ck["head_opt"]["param_groups"], list)
    ss = ck["score_state"]
    assert isinstance(ss["steps"], int) and isinstance(ss["lr"], float)
    assert ck["rng"]["cpu"].dtype == torch.uint8


def check_checkpoint(w: World, path: Path, *, intact: bool, must_refuse: bool = False) -> None:
    """load_checkpoint on ``path``: a CheckpointError naming the file, or what was written (``intact``: the
    valid checkpoint's content exactly; otherwise well-formed)."""
    with no_hang():
        try:
            ck = load_checkpoint(path)
        except CheckpointError as e:
            _refused("checkpoint", e, path)
            return
    OUTCOMES[("checkpoint", "loaded")] += 1
    assert not must_refuse, f"{path} loaded but it is corrupt"
    if intact:
        assert _same_checkpoint(ck, w.ckpt), f"{path} loaded with content other than written"
    _well_formed_checkpoint(ck)


def _write(w: World, kind: str, data: bytes) -> Path:
    p = w.path(".safetensors" if kind == "mask" else ".ckpt")
    p.write_bytes(data)
    return p


def _check_bytes(w: World, kind: str, data: bytes, case: str) -> None:
    """Raw bytes: if they load at all, they must be the valid file's content."""
    COUNTS[(kind, case)] += 1
    p = _write(w, kind, data)
    if kind == "mask":
        check_mask(w, p, w.mask_tensors)
    else:
        check_checkpoint(w, p, intact=True)
    p.unlink()


KINDS = ["mask", "checkpoint"]


def _valid(w: World, kind: str) -> bytes:
    return w.mask_bytes if kind == "mask" else w.ckpt_bytes


# ---------------------------------------------------------------------------------------------- raw bytes
_safetensors_like = st.one_of(
    st.binary(max_size=600),  # anything
    st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=600)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.tuples(st.integers(0, 700), st.binary(max_size=600)).map(lambda t: struct.pack("<Q", t[0]) + t[1]),
    st.binary(max_size=600).map(lambda b: struct.pack("<Q", len(b)) + b),  # a header length that fits
    st.text(max_size=300).map(lambda s: (lambda b: struct.pack("<Q", len(b)) + b)(("{" + s).encode())),
)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=_safetensors_like)
def test_random_bytes_are_refused(world, kind, data):
    _check_bytes(world, kind, data, "random-bytes")


# ---------------------------------------------------------------------------------------------- truncation
def _prefix_classes(w: World, kind: str) -> dict[str, list[int]]:
    """Representative prefix lengths of each truncation class: nothing, part of the 8-byte header length, the
    length alone, part of the JSON header, the header without data, part of the data, all but the last byte."""
    data = _valid(w, kind)
    h = w.header_len(data)
    return {"empty": [0], "length-field": list(range(1, 8)), "length-only": [8],
            "header": [9, 10, 8 + (h - 8) // 2, h - 2, h - 1], "no-data": [h],
            "data": [h + 1, h + 7, (h + len(data)) // 2, len(data) - 8], "last-byte": [len(data) - 1]}


@pytest.mark.parametrize("kind", KINDS)
def test_every_class_of_truncation_is_refused(world, kind):
    classes = _prefix_classes(world, kind)
    data = _valid(world, kind)
    for cls, lengths in classes.items():
        for n in lengths:
            p = _write(world, kind, data[:n])
            COUNTS[(kind, "truncation")] += 1
            (check_mask(world, p, None, must_refuse=True) if kind == "mask" else
             check_checkpoint(world, p, intact=True, must_refuse=True))
            p.unlink()


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_random_truncations_are_refused(world, kind, data):
    valid = _valid(world, kind)
    n = data.draw(st.integers(0, len(valid) - 1), label="prefix length")
    COUNTS[(kind, "truncation")] += 1
    p = _write(world, kind, valid[:n])
    (check_mask(world, p, None, must_refuse=True) if kind == "mask" else
     check_checkpoint(world, p, intact=True, must_refuse=True))
    p.unlink()


# ---------------------------------------------------------------------------------------------- bit flips
@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_bit_flips_are_refused_or_harmless(world, kind, data):
    """Flips in the tensor data are caught by the digests; a flip in the header either breaks it or changes
    metadata only (the mask file's digests cover its tensors; the checkpoint's cover everything)."""
    valid = bytearray(_valid(world, kind))
    h = world.header_len(bytes(valid))
    region = data.draw(st.sampled_from(["anywhere", "length-field", "header", "data"]), label="region")
    lo, hi = {"anywhere": (0, len(valid)), "length-field": (0, 8), "header": (8, h), "data": (h, len(valid))}[region]
    bits = data.draw(st.lists(st.integers(8 * lo, 8 * hi - 1), min_size=1, max_size=8, unique=True), label="bits")
    for b in bits:
        valid[b // 8] ^= 1 << (b % 8)
    COUNTS[(kind, "bit-flips")] += 1
    p = _write(world, kind, bytes(valid))
    in_data = any(b // 8 >= h for b in bits)
    if kind == "mask":
        check_mask(world, p, world.mask_tensors, must_refuse=in_data)
    else:
        check_checkpoint(world, p, intact=True, must_refuse=True)  # the digest covers the metadata too
    p.unlink()


# ---------------------------------------------------------------------------------- well-formed, wrong content
DTYPES = [torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
          torch.float64, torch.bool]
GARBAGE = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", "{", "null", "[]", "{}", "1e309", "-1", "NaN", "Infinity", "-Infinity", "1" * 5000,
                     "[" * 50000, '"x"', "true", "[1, 2]", '{"a": [1e309]}', "0", "0.5", "2", "nan", "inf",
                     '{"": [-1]}', "[[[]]]", "1" * 400 + ".5"]),
    st.integers(-2**80, 2**80).map(str),
    st.floats().map(repr),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=8).map(json.dumps),
)
BAD_SHAPES = [[-1], [1.5], "3", [2**70], [0, 2**70], [True], None, {}, [], [[2]], [3, -3], [2**40, 2**40], [0]]


def _small_tensor(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), max_size=3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    return (torch.rand(shape, generator=g) * 300 - 50).to(dtype)


@st.composite
def mutations(draw, tensors: dict, meta: dict, kind: str):
    """Operations on (tensors, metadata) that keep a well-formed safetensors file: drop/add/rename a key,
    change a tensor's shape, dtype or values, set or drop metadata entries (garbage, wrong JSON types,
    huge numbers), a mask's shape entry made nonsense, and whether the digests are recomputed to match."""
    keys = sorted(tensors)
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "add", "rename", "reshape", "dtype", "values", "meta-set", "meta-drop",
                                   "meta-none"] + (["shape-entry", "digest-entry"] if kind == "mask" else [])))
        if op == "drop":
            ops.append((op, draw(st.sampled_from(keys))))
        elif op == "add":
            prefix = draw(st.sampled_from(["mask/", "probe/", "head/", "scores/", "opt/0/", "score_optim/",
                                           "score_moments/0/", "rng/", "", "mask/embeddings.", "opt/x/"]))
            ops.append((op, prefix + draw(st.text("abcdefghijklmnopqrstuvwxyz._/0123456789", max_size=12)),
                        _small_tensor(draw)))
        elif op == "rename":
            key = draw(st.sampled_from(keys))
            new = draw(st.sampled_from([key + "x", key.replace("weight", "bias"), key.replace("bias", "weight"),
                                        key.rsplit(".", 1)[0], key.split("/")[-1], "mask/" + key.split("/")[-1],
                                        key.replace("embeddings", "encoder"), "mask/.weight", "mask/encoder.weight"]))
            ops.append((op, key, new))
        elif op == "reshape":
            ops.append((op, draw(st.sampled_from(keys)),
                        draw(st.sampled_from(["flat", "unsqueeze", "trim", "extend", "empty", "scalar", "2d"]))))
        elif op == "dtype":
            ops.append((op, draw(st.sampled_from(keys)), draw(st.sampled_from(DTYPES))))
        elif op == "values":
            ops.append((op, draw(st.sampled_from(keys)), draw(st.sampled_from(["zeros", "ones", "nan", "inf", "neg",
                                                                                 "big", "flip-bit"]))))
        elif op == "meta-set":
            key = draw(st.sampled_from(sorted(meta) + ["zzz", ""]))
            ops.append((op, key, draw(GARBAGE)))
        elif op == "meta-drop":
            ops.append((op, draw(st.sampled_from(sorted(meta)))))
        elif op == "shape-entry":
            ops.append((op, draw(st.sampled_from([k[5:] for k in keys if k.startswith("mask/")])),
                        draw(st.sampled_from(BAD_SHAPES))))
        elif op == "digest-entry":
            ops.append((op, draw(st.sampled_from(keys)), draw(st.one_of(st.none(), st.integers(), st.text(max_size=16),
                                                                        st.just([1, 2])))))
        else:
            ops.append((op,))
    return ops, draw(st.booleans())


def _apply(tensors: dict, meta: dict, ops) -> tuple[dict, dict | None, set]:
    t = {k: v.clone() for k, v in tensors.items()}
    m: dict | None = dict(meta)
    touched: set = set()
    for op in ops:
        name = op[0]
        if name == "drop":
            t.pop(op[1], None)
        elif name == "add":
            t[op[1]] = op[2]
        elif name == "rename" and op[1] in t:
            t[op[2]] = t.pop(op[1])
        elif name == "reshape" and op[1] in t:
            v = t[op[1]]
            t[op[1]] = {"flat": lambda: v.reshape(-1), "unsqueeze": lambda: v.unsqueeze(0),
                        "trim": lambda: v.reshape(-1)[: max(0, v.numel() - 1)],
                        "extend": lambda: torch.cat([v.reshape(-1), v.reshape(-1)[:1], v.reshape(-1)[:1]]),
                        "empty": lambda: v.reshape(-1)[:0], "scalar": lambda: v.reshape(-1)[:1].reshape(()),
                        "2d": lambda: v.reshape(1, -1)}[op[2]]().contiguous()
        elif name == "dtype" and op[1] in t:
            t[op[1]] = t[op[1]].to(op[2])
        elif name == "values" and op[1] in t:
            v = t[op[1]].clone()
            if op[2] == "flip-bit" and v.numel():
                b = v.reshape(-1).view(torch.uint8)
                b[0] ^= 1
            elif v.numel():
                fill = {"zeros": 0, "ones": 1, "nan": float("nan"), "inf": float("inf"), "neg": -1, "big": 1e30}[op[2]]
                if v.is_floating_point():
                    v.fill_(fill)
                elif op[2] in ("zeros", "ones", "neg") and v.dtype != torch.bool:
                    v.fill_(int(fill) if v.dtype != torch.uint8 else abs(int(fill)))
            t[op[1]] = v
        elif name in ("meta-set", "meta-drop", "meta-none", "shape-entry", "digest-entry") and m is None:
            continue
        elif name == "meta-set":
            m[op[1]] = op[2]
            touched.add(op[1])
        elif name == "meta-drop":
            m.pop(op[1], None)
            touched.add(op[1])
        elif name == "meta-none":
            m = None
        elif name == "shape-entry":
            with contextlib.suppress(ValueError, TypeError, AttributeError, RecursionError):
                shapes = json.loads(m["shapes"])
                shapes[op[1]] = op[2]
                m["shapes"] = json.dumps(shapes)
        elif name == "digest-entry":
            with contextlib.suppress(ValueError, TypeError, AttributeError, RecursionError):
                d = json.loads(m["tensor_digests"])
                d[op[1]] = op[2]
                m["tensor_digests"] = json.dumps(d)
                touched.add("tensor_digests")
    return t, m, touched


def _save(path: Path, tensors: dict, meta: dict | None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def _resign(kind: str, tensors: dict, meta: dict | None, touched: set) -> None:
    """Recompute the digests so that the reader's structural checks, not the digests, have to refuse."""
    if meta is None:
        return
    if kind == "mask" and "tensor_digests" not in touched:
        meta["tensor_digests"] = json.dumps({k: _tensor_digest(v) for k, v in sorted(tensors.items())})
    if kind == "checkpoint" and "digest" not in touched:
        meta["digest"] = ckpt_mod._digest(tensors, meta)


def _changed(a: dict, b: dict) -> bool:
    return not _tensors_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_well_formed_files_with_wrong_content_are_refused(world, kind, data):
    tensors, meta = (world.mask_tensors, world.mask_meta) if kind == "mask" else (world.ckpt_tensors, world.ckpt_meta)
    ops, resign = data.draw(mutations(tensors, meta, kind), label="mutations")
    t, m, touched = _apply(tensors, meta, ops)
    if resign:
        _resign(kind, t, m, touched)
    COUNTS[(kind, "wrong-content")] += 1
    p = world.path(".safetensors" if kind == "mask" else ".ckpt")
    _save(p, t, m)
    tensors_changed = _changed(t, tensors)
    if kind == "mask":
        check_mask(world, p, t, must_refuse=tensors_changed and not resign)
    else:
        unchanged = not tensors_changed and m == meta
        check_checkpoint(world, p, intact=unchanged, must_refuse=not resign and not unchanged and m is not None
                         and m.get("format_version") == ckpt_mod.FORMAT_VERSION)
    p.unlink()


# ---------------------------------------------------------------------------------------------- crafted headers
HEADER_NAMES = ["mask/embeddings.word_embeddings.weight", "probe/embeddings.word_embeddings", "head/weight",
                "scores/embeddings.word_embeddings", "score_optim/gamma", "rng/cpu", "opt/0/step"]
ST_DTYPES = ["U8", "I8", "F32", "F16", "BF16", "I64", "BOOL", "F64", "U16", "U32", "U64", "F8_E4M3", "F8_E5M2",
             "C64", "F4", "E8M0", "XX", "", 7, None]


@st.composite
def crafted_files(draw, metas: list[dict]):
    """A safetensors header written by hand: entries with odd dtypes, shapes that claim terabytes or are not
    shapes, data offsets past the end of the file, reversed, overlapping or not numbers, metadata of the wrong
    type, and a header-length field that is exact, short, past the end of the file or terabytes."""
    entries: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(HEADER_NAMES) | st.text(max_size=8))
        shape = draw(st.one_of(
            st.lists(st.integers(0, 8), max_size=3),
            st.lists(st.one_of(st.integers(-5, 2**64), st.just(2**40)), max_size=3),
            st.sampled_from([None, "3", [1.5], [2**20, 2**20, 2**20], {"a": 1}])))
        offsets = draw(st.one_of(
            st.tuples(st.integers(0, 64), st.integers(0, 64)).map(list),
            st.lists(st.integers(-2**63, 2**64), max_size=3),
            st.sampled_from([[0, 2**40], [2**62, 2**63], [0, 4 * 2**60], "0,4", None])))
        entries[name] = {"dtype": draw(st.sampled_from(ST_DTYPES)), "shape": shape, "data_offsets": offsets}
    md = draw(st.one_of(st.none(), st.sampled_from(metas),
                        st.dictionaries(st.text(max_size=6), st.one_of(st.text(max_size=6), st.integers(), st.none(),
                                                                      st.lists(st.integers(), max_size=2)), max_size=3),
                        st.sampled_from([[], "x", 3])))
    if md is not None:
        entries["__metadata__"] = md
    header = json.dumps(entries).encode() + b" " * draw(st.integers(0, 8))
    mode = draw(st.sampled_from(["exact", "terabytes", "past-eof", "short", "max"]))
    n = {"exact": len(header), "terabytes": 2**40 + len(header), "past-eof": len(header) + draw(st.integers(1, 10**6)),
         "short": max(0, len(header) - draw(st.integers(1, 10))), "max": 2**64 - 1}[mode]
    return struct.pack("<Q", n) + header + draw(st.binary(max_size=128))


@pytest.mark.parametrize("kind", KINDS)
@FUZZ
@given(data=st.data())
def test_crafted_headers_are_refused(world, kind, data):
    blob = data.draw(crafted_files([world.mask_meta, world.ckpt_meta]), label="file")
    _check_bytes(world, kind, blob, "crafted-header")


# ---------------------------------------------------------------------------------------------- special files
def _special(w: World, case: str) -> Path:
    p = w.path("")
    if case == "zero-length":
        p.write_bytes(b"")
    elif case == "directory":
        p.mkdir()
    elif case == "missing":
        pass
    elif case == "fifo":
        os.mkfifo(p)
    elif case == "symlink-to-directory":
        (w.dir / f"{p.name}-target").mkdir()
        p.symlink_to(w.dir / f"{p.name}-target")
    elif case == "dangling-symlink":
        p.symlink_to(w.dir / "nowhere")
    elif case == "eight-zero-bytes":
        p.write_bytes(b"\0" * 8)
    elif case == "empty-header":
        p.write_bytes(struct.pack("<Q", 2) + b"{}")
    elif case == "terabyte-header-length":
        p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    elif case == "terabyte-tensor":  # a header that claims a 4 TiB tensor in an 8-byte body
        h = json.dumps({"scores/x": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}}).encode()
        p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 8)
    return p


SPECIAL = ["zero-length", "directory", "missing", "fifo", "symlink-to-directory", "dangling-symlink",
           "eight-zero-bytes", "empty-header", "terabyte-header-length", "terabyte-tensor"]


@pytest.mark.parametrize("case", SPECIAL)
@pytest.mark.parametrize("kind", KINDS)
def test_special_files_are_refused(world, kind, case):
    p = _special(world, case)
    COUNTS[(kind, "special-file")] += 1
    (check_mask(world, p, None, must_refuse=True) if kind == "mask" else
     check_checkpoint(world, p, intact=True, must_refuse=True))


def test_a_mask_file_is_not_a_checkpoint_and_a_checkpoint_is_not_a_mask_file(world):
    m, c = _write(world, "mask", world.mask_bytes), _write(world, "checkpoint", world.ckpt_bytes)
    COUNTS[("mask", "special-file")] += 1
    COUNTS[("checkpoint", "special-file")] += 1
    check_checkpoint(world, m, intact=True, must_refuse=True)
    check_mask(world, c, None, must_refuse=True)


def test_the_valid_files_load(world):
    """The oracle's baseline: the unmodified files load, onto both targets, with exactly what was written."""
    check_mask(world, _write(world, "mask", world.mask_bytes), world.mask_tensors)
    assert OUTCOMES[("mask", "loaded")] >= 3
    check_checkpoint(world, _write(world, "checkpoint", world.ckpt_bytes), intact=True)


# ---------------------------------------------------------------------------------------------- regressions
# Cases that raised another exception (or half-loaded a model) before the readers were hardened.
def _mask_variant(w: World, *, tensors=None, meta=None, resign=True) -> Path:
    t = dict(w.mask_tensors if tensors is None else tensors)
    m = dict(w.mask_meta, **(meta or {}))
    if resign:
        _resign("mask", t, m, set())
    p = w.path(".safetensors")
    _save(p, t, m)
    return p


def _ckpt_variant(w: World, *, drop=(), tensors=None, meta=None, resign=True) -> Path:
    t = {k: v for k, v in {**w.ckpt_tensors, **(tensors or {})}.items() if k not in drop}
    m = dict(w.ckpt_meta, **(meta or {}))
    if resign:
        _resign("checkpoint", t, m, set())
    p = w.path(".ckpt")
    _save(p, t, m)
    return p


def _mask_shapes(w: World, **changes) -> str:
    shapes = json.loads(w.mask_meta["shapes"])
    shapes.update(changes)
    return json.dumps(shapes)


MASK_REGRESSIONS = {
    # json.loads past the recursion limit raised RecursionError
    "deeply nested shapes": lambda w: _mask_variant(w, meta={"shapes": "[" * 50000}),
    # a list of shapes: shapes[key] raised TypeError
    "shapes a list": lambda w: _mask_variant(w, meta={"shapes": json.dumps(sorted(json.loads(w.mask_meta["shapes"])))}),
    # torch.Size("abc") / torch.Size([1.5]) raised TypeError
    "a shape not a list of ints": lambda w: _mask_variant(w, meta={"shapes": _mask_shapes(
        w, **{"pooler.dense.bias": [1.5]})}),
    # a zero-element shape with an impossible dimension overflowed in unpack_mask
    "a shape past int64": lambda w: _mask_variant(w, meta={"shapes": _mask_shapes(
        w, **{"pooler.dense.bias": [0, 2**70]})}),
    # abp info: float(sparsity) raised ValueError
    "sparsity not a number": lambda w: _mask_variant(w, meta={"sparsity": "lots"}),
    # abp eval: MaskFile.extra raised JSONDecodeError
    "extra not JSON": lambda w: _mask_variant(w, meta={"extra": "{"}),
    # getattr(torch, "nn") as a dtype; a bf16 comparison of 64 probes with 3 raised RuntimeError
    "weight_dtype not a dtype": lambda w: _mask_variant(w, meta={"weight_dtype": "nn"}),
    "short fingerprint, bf16": lambda w: _mask_variant(w, meta={"weight_dtype": "bfloat16"}, tensors={
        **w.mask_tensors, "probe/pooler.dense": w.mask_tensors["probe/pooler.dense"][:3].contiguous()}),
}


def _mask_of_module_without_weight(w: World) -> Path:
    """A file that masks BertEncoder (no weight): base_weight raised AttributeError."""
    t = dict(w.mask_tensors)
    t["mask/encoder.weight"] = t.pop("mask/pooler.dense.weight")
    shapes = json.loads(w.mask_meta["shapes"])
    shapes["encoder.weight"] = shapes.pop("pooler.dense.weight")
    return _mask_variant(w, tensors=t, meta={"shapes": json.dumps(shapes)})


def _layernorm_without_its_bias(w: World) -> Path:
    """A file that masks a LayerNorm's weight but not its bias: load_mask masked the plain model, then refused
    it half-way (modules swapped, requires_grad cleared)."""
    t = {k: v for k, v in w.mask_tensors.items() if k != "mask/embeddings.LayerNorm.bias"}
    shapes = json.loads(w.mask_meta["shapes"])
    del shapes["embeddings.LayerNorm.bias"]
    return _mask_variant(w, tensors=t, meta={"shapes": json.dumps(shapes)})


MASK_REGRESSIONS["a module without a weight"] = _mask_of_module_without_weight
MASK_REGRESSIONS["a LayerNorm mask without its bias"] = _layernorm_without_its_bias


@pytest.mark.parametrize("case", sorted(MASK_REGRESSIONS))
def test_mask_file_regressions(world, case):
    p = MASK_REGRESSIONS[case](world)
    COUNTS[("mask", "regression")] += 1
    loaded = check_mask(world, p, _read_raw(p)[0])
    assert not loaded["plain"] and not loaded["masked"], loaded


CKPT_REGRESSIONS = {
    # KeyError escaped for a missing tensor or metadata entry
    "no rng state": lambda w: _ckpt_variant(w, drop=["rng/cpu"]),
    "no score optimiser state": lambda w: _ckpt_variant(w, drop=["score_optim/gamma"]),
    "opt without param_groups": lambda w: _ckpt_variant(w, meta={"opt": "{}"}),
    # IndexError on an empty gamma
    "empty gamma": lambda w: _ckpt_variant(w, tensors={"score_optim/gamma": torch.zeros(0)}),
    # JSONDecodeError / ValueError / RecursionError on malformed metadata
    "info not JSON": lambda w: _ckpt_variant(w, meta={"info": "{"}),
    "deeply nested info": lambda w: _ckpt_variant(w, meta={"info": "[" * 50000}),
    "score_steps not an int": lambda w: _ckpt_variant(w, meta={"score_steps": "many"}),
    "score_steps past the int limit": lambda w: _ckpt_variant(w, meta={"score_steps": "9" * 5000}),
    "optimizer key without an index": lambda w: _ckpt_variant(w, tensors={"opt/exp_avg": torch.zeros(1)}),
    # loaded, to fail later in the resume (info["config"], torch.set_rng_state) or to resume with α = inf
    "info a list": lambda w: _ckpt_variant(w, meta={"info": "[]"}),
    "rng state of floats": lambda w: _ckpt_variant(w, tensors={"rng/cpu": torch.zeros(3)}),
    "score_lr infinite": lambda w: _ckpt_variant(w, meta={"score_lr": "1e309"}),
    # a changed score loaded silently before checkpoints carried a digest
    "a changed score, not re-signed": lambda w: _ckpt_variant(w, tensors={
        k: (v + 1 if k.startswith("scores/") else v) for k, v in w.ckpt_tensors.items()}, resign=False),
}


def _ckpt_without_info(w: World) -> Path:
    m = {k: v for k, v in w.ckpt_meta.items() if k != "info"}
    t = dict(w.ckpt_tensors)
    _resign("checkpoint", t, m, set())
    p = w.path(".ckpt")
    _save(p, t, m)
    return p


CKPT_REGRESSIONS["no info"] = _ckpt_without_info


@pytest.mark.parametrize("case", sorted(CKPT_REGRESSIONS))
def test_checkpoint_regressions(world, case):
    p = CKPT_REGRESSIONS[case](world)
    COUNTS[("checkpoint", "regression")] += 1
    check_checkpoint(world, p, intact=True, must_refuse=True)


def test_a_version_1_checkpoint_without_a_digest_still_loads(world):
    """Checkpoints written before the digest (format version 1) resume as before."""
    m = {k: v for k, v in world.ckpt_meta.items() if k not in ("digest", "format_version")}
    p = world.path(".ckpt")
    _save(p, world.ckpt_tensors, m)
    assert _same_checkpoint(load_checkpoint(p), world.ckpt)


def test_enough_cases_ran(world):
    """Runs last: every property that ran tried its examples (a strategy that filters everything out would not)."""
    ran = {k: n for k, n in COUNTS.items() if k[1] in ("random-bytes", "truncation", "bit-flips", "wrong-content",
                                                         "crafted-header")}
    if not ran:
        pytest.skip("no property ran in this session")
    assert all(n >= min(EXAMPLES, 100) for n in ran.values()), ran
