"""Checkpoints of the fine-tuning loop (:meth:`abp.experiments.finetune.FineTuner.train`) as one safetensors file.

Everything a resumed phase needs to end bit-identical to an uninterrupted one (on CPU): the model's state
(backbone and head), the AdamW state, the LR scheduler's position, the keep masks (uint8) if any, the step, the
losses so far, the torch RNG states (dropout), the run's identity and the caller's JSON ``extra`` state (e.g. MP's
pruning events). Written atomically and signed with the SHA-256 digest of :mod:`abp.train.checkpoint` (whose
file helpers it shares), so a changed bit is refused; never pickle. About 3× the model's fp32 size
(weights + Adam's two moments; 296 MB for all-MiniLM-L6-v2 with masks), so callers delete it once the phase is saved.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from abp.train.checkpoint import (CheckpointError, _flatten_optimizer, _unflatten_optimizer, assemble_or_refuse,
                                  parsed_meta, read_tensor_file, rng_state_tensors, rng_states, verify_digest,
                                  with_prefix, write_signed)

FORMAT = "abp-finetune-checkpoint"
FORMAT_VERSION = "1"


def save_finetune_checkpoint(path: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             scheduler: torch.optim.lr_scheduler.LRScheduler,
                             masks: Optional[dict[str, torch.Tensor]], step: int, losses: list[float],
                             identity: dict[str, Any], extra: dict[str, Any]) -> None:
    """Write the fine-tuning loop's state after ``step`` optimiser steps (atomically, digest-signed)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # tied tensors: safetensors refuses shared storage
            t = t.clone()
        seen.add(t.data_ptr())
        tensors[f"model/{k}"] = t
    for k, m in (masks or {}).items():
        tensors[f"masks/{k}"] = m.detach().to("cpu", torch.uint8).contiguous()
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64).reshape(-1)  # a Python float is a float64: exact
    tensors.update(rng_state_tensors())
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}  # (the lambdas are code)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": str(int(step)),
            "masked": json.dumps(masks is not None), "identity": json.dumps(identity), "extra": json.dumps(extra),
            "opt": json.dumps(opt_meta), "scheduler": json.dumps(sched)}
    write_signed(path, tensors, meta)


def load_finetune_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """``{model, masks, optimizer, scheduler, step, losses, rng, identity, extra}`` of a fine-tuning checkpoint
    (CPU tensors; ``masks`` bool or None). Anything but an intact one raises :class:`CheckpointError` naming the
    file and the problem."""
    tensors, meta = read_tensor_file(path)
    if meta.get("format") != FORMAT:
        what = "an ABP training checkpoint" if meta.get("format") == "abp-checkpoint" else "not one"
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint ({what})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"fine-tuning checkpoint {path} has format version {meta.get('format_version')!r}; "
                              f"this abp reads {FORMAT_VERSION}")
    verify_digest(path, tensors, meta)
    return assemble_or_refuse(path, lambda: _assemble(tensors, meta))


def _assemble(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, Any]:
    parsed = lambda key, kind: parsed_meta(meta, key, kind)  # noqa: E731
    pick = lambda prefix: with_prefix(tensors, prefix)  # noqa: E731
    step = int(meta["step"])
    losses = tensors["losses"]
    if losses.dtype != torch.float64 or losses.dim() != 1 or losses.numel() != step or step < 0:
        raise ValueError(f"losses is {losses.dtype} {list(losses.shape)} for step {step}, not float64 [{step}]")
    masks = None
    if parsed("masked", bool):
        masks = pick("masks/")
        for k, m in masks.items():
            if m.dtype != torch.uint8 or bool((m > 1).any()):
                raise ValueError(f"mask {k} is not 0/1 uint8")
        masks = {k: m.bool() for k, m in masks.items()}
    opt = parsed("opt", dict)
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("plain"), dict):
        raise TypeError("opt lacks its param_groups list or plain dict")
    return {
        "model": pick("model/"),
        "masks": masks,
        "optimizer": _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("opt/")}, opt),
        "scheduler": parsed("scheduler", dict),
        "step": step,
        "losses": losses.tolist(),
        "rng": rng_states(tensors),
        "identity": parsed("identity", dict),
        "extra": parsed("extra", dict),
    }
