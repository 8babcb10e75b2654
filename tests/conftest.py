"""Shared fixtures: real GLUE data (../shared/data/glue or ABP_GLUE_DIR), the embedded model, markers."""
import os
from pathlib import Path

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which Triton picks when a kernel is
# decorated (at import): set it before anything imports triton. ``auto`` never picks the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Subprocesses (torchrun, the bench suite) start in the repository root: keep it off their sys.path, as the
# README's `python -P` does for this process, or kernels/ shadows Hugging Face's `kernels` package that
# transformers >= 5.25 imports.
os.environ["PYTHONSAFEPATH"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: a real training run on CPU (minutes)")
    config.addinivalue_line("markers", "bench: a benchmark (pytest-benchmark)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def glue_dir_or_none():
    d = os.environ.get("ABP_GLUE_DIR") or str(REPO.parent / "shared" / "data" / "glue")
    return d if Path(d, "SST-2", "dev.tsv").is_file() else None


@pytest.fixture(scope="session")
def glue_dir():
    d = glue_dir_or_none()
    if d is None:
        pytest.skip("GLUE data not found (set ABP_GLUE_DIR or put ../shared/data/glue beside the repo)")
    return d


@pytest.fixture(scope="session")
def minilm_path():
    from abp.models import default_model_path

    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


def _save_tiny_bert(d, tokenizer_from: str, **overrides) -> str:
    """A tiny random BERT (2 layers, hidden 32) with the embedded model's real tokenizer: fast on CPU."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, max_position_embeddings=64, **overrides)
    T.BertModel(cfg).save_pretrained(d)
    T.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path):
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), minilm_path)


@pytest.fixture(scope="session")
def tiny_model_dir_nodrop(tmp_path_factory, minilm_path):
    """The tiny BERT without dropout: runs that must agree exactly (1 vs 2 processes)."""
    return _save_tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), minilm_path,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``train.csv`` (96 rows) and ``dev.csv`` (40 rows): six-word sentences labelled by their sentiment words."""
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
