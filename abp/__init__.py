"""abp: adapt pre-trained transformers by learning a binary mask over their frozen weights
(Gao, Colombo & Wang 2021, "Adapting by Pruning"), with fused kernels that never build W⊙M or dW.

Typical use::

    model = AutoModel.from_pretrained(...)
    abp.mask_model(model)                  # swap in masked layers (scores start at +0.01)
    ...train the scores (abp.train.Trainer or your own loop)...
    abp.save_mask(model, "task.safetensors", head=head)
"""
from abp import _ops  # noqa: F401  (registers the abp:: operators)
from abp.backends import BackendUnavailableError, last_backend, use_backend
from abp.functional import (ScoreSGD, bitmask_linear, check_finite_scores, masked_embedding, masked_linear,
                            multi_bitmask_linear, pack_mask, unpack_mask)
from abp.maskio import MaskFile, MaskFileError, load_mask, read_mask_file, save_mask
from abp.multitask import MultiTaskModel
from abp.nn import MaskedEmbedding, MaskedLayerNorm, MaskedLinear, MaskedModule
from abp.patch import MaskConfig, mask_model, masked_modules, sparsity, unmask_model

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "MaskConfig", "MaskFile", "MaskFileError", "MaskedEmbedding", "MaskedLayerNorm",
    "MaskedLinear", "MaskedModule", "MultiTaskModel", "ScoreSGD", "bitmask_linear", "check_finite_scores", "last_backend", "load_mask",
    "mask_model", "masked_embedding", "masked_linear", "masked_modules", "multi_bitmask_linear", "pack_mask",
    "read_mask_file", "save_mask", "sparsity", "unmask_model", "unpack_mask", "use_backend",
]
