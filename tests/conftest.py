"""Shared fixtures: real GLUE data (../shared/data/glue or ABP_GLUE_DIR), tiny made-up data, the embedded model,
the kernel tests' poisoned ``torch.empty``, one intra-op thread, markers."""
import os
from pathlib import Path

import torch

# Without CUDA the Triton kernels run in Triton's interpreter, which Triton picks when a kernel is
# decorated (at import): set it before anything imports triton. ``auto`` never picks the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# The kernel tests' shared helpers (tests/ is on pytest's pythonpath): their asserts report like a test's own.
pytest.register_assert_rewrite("kernel_cases")

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


WORDS = ["good", "bad", "fine", "awful", "great", "poor", "movie", "plot", "the", "a"]
POSITIVE, NEGATIVE = ("good", "fine", "great"), ("bad", "awful", "poor")


class FewWords:
    """Six-word sentences drawn from :data:`WORDS` by a generator seeded with ``seed``: each call to
    :meth:`sentences` continues the same random stream."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def sentences(self, n: int) -> list[str]:
        return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (6,), generator=self.g).tolist())
                for _ in range(n)]


def positives(sentence: str) -> int:
    return sum(w in POSITIVE for w in sentence.split())


def polarity(sentence: str) -> int:
    """Positive words minus negative words."""
    return positives(sentence) - sum(w in NEGATIVE for w in sentence.split())


def write_table(path: Path, header: tuple[str, ...], rows, sep: str = "\t") -> None:
    """A header line, then one line per row, fields joined by ``sep``."""
    path.write_text("\n".join(sep.join(map(str, r)) for r in [header, *rows]) + "\n")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """``train.csv`` (96 rows) and ``dev.csv`` (40 rows): six-word sentences labelled by their sentiment words."""
    d = tmp_path_factory.mktemp("data")
    text = FewWords(seed=0)
    for split, n in (("train", 96), ("dev", 40)):
        write_table(d / f"{split}.csv", ("sentence", "label"),
                    [(s, int(polarity(s) > 0)) for s in text.sentences(n)], sep=",")
    return d


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory):
    """SST-2 and STS-B in the official GLUE layout (headers by name), made of a few words: 96 train and 40 dev
    rows each."""
    d = tmp_path_factory.mktemp("glue")
    text = FewWords(seed=0)
    (d / "SST-2").mkdir()
    (d / "STS-B").mkdir()
    for split, n in (("train", 96), ("dev", 40)):
        write_table(d / "SST-2" / f"{split}.tsv", ("sentence", "label"),
                    [(s, int(polarity(s) > 0)) for s in text.sentences(n)])
        pairs = [text.sentences(2) for _ in range(n)]
        write_table(d / "STS-B" / f"{split}.tsv", ("sentence1", "sentence2", "score"),
                    [(a, b, f"{2.5 + 0.4 * (polarity(a) - polarity(b)):.2f}") for a, b in pairs])
    return str(d)


@pytest.fixture(scope="session")
def tiny_sst2(tmp_path_factory):
    """SST-2 in the GLUE layout: 40 train and 16 dev sentences of a few words (the fine-tuning resume tests count
    on 5 batches of 8 an epoch)."""
    d = tmp_path_factory.mktemp("glue")
    text = FewWords(seed=1)
    (d / "SST-2").mkdir()
    for split, n in (("train", 40), ("dev", 16)):
        write_table(d / "SST-2" / f"{split}.tsv", ("sentence", "label"),
                    [(s, int(positives(s) > 1)) for s in text.sentences(n)])
    return str(d)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~8x faster than two fighting for it.
    For a whole module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every floating ``torch.empty`` is filled with NaN, so an element a kernel leaves unwritten shows; returns
    the list of the shapes ``torch.empty`` made during the test."""
    made: list[tuple[int, ...]] = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        made.append(tuple(t.shape))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    return made


@pytest.fixture
def one_config_for_small_shapes(request, monkeypatch):
    """On a GPU, the many small-shape kernel tests use one fixed tile (no autotuning per shape); tests marked
    ``gpu`` autotune."""
    if torch.cuda.is_available() and request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("ABP_TRITON_AUTOTUNE", "0")
