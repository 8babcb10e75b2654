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
