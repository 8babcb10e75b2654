"""Training checkpoints as one safetensors file, written atomically (never pickle).

Holds everything a resumed run needs to end exactly where an uninterrupted one would: scores, head,
head-optimiser state, the score optimiser's γ/stop state, RNG states, step, history and best.
A SHA-256 digest over every tensor and metadata entry (format version 2) refuses a checkpoint changed on
disk since it was written, so a flipped bit cannot silently steer a resumed run.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable, Optional

import torch

from abp._atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another run."""


FORMAT_VERSION = "2"  # 2 adds the digest; version-1 checkpoints (no digest) still load


def _digest(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of every tensor's name, dtype, shape and bytes and of every metadata entry but the digest."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    for k in sorted(meta):
        if k != "digest":
            h.update(f"{k}\0{meta[k]}\0".encode())
    return h.hexdigest()


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, plain = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                plain[f"{idx}/{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "plain": plain}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, idx, k = key.split("/", 2)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["plain"].items():
        idx, k = key.split("/", 1)
        state.setdefault(int(idx), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, *, scores: dict[str, torch.Tensor], head: torch.nn.Module,
                    head_opt: torch.optim.Optimizer, score_state: dict, info: dict[str, Any]) -> None:
    """Write a checkpoint atomically: a crash mid-write keeps the previous one."""
    tensors = {f"scores/{k}": v.detach().cpu().contiguous() for k, v in scores.items()}
    tensors.update({f"head/{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    opt_tensors, opt_meta = _flatten_optimizer(head_opt)
    tensors.update(opt_tensors)
    for k in ("gamma", "active", "pruned"):  # one value each; γ and active one per score tensor under allocation "tensor"
        tensors[f"score_optim/{k}"] = score_state[k].reshape(-1 if score_state[k].dim() else 1)
    for i, (m, v) in enumerate(score_state.get("moments", ())):  # Adam on the scores
        tensors[f"score_moments/{i}/m"] = m.contiguous()
        tensors[f"score_moments/{i}/v"] = v.contiguous()
    tensors.update(rng_state_tensors())
    meta = {"format": "abp-checkpoint", "format_version": FORMAT_VERSION, "info": json.dumps(info),
            "opt": json.dumps(opt_meta), "score_steps": str(score_state["steps"]), "score_lr": repr(score_state["lr"])}
    if score_state["gamma"].dim():
        meta["score_allocation"] = "tensor"
    if "moment_steps" in score_state:
        meta["score_moment_steps"] = json.dumps(score_state["moment_steps"])
    write_signed(path, tensors, meta)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint into ``{scores, head, head_opt, score_state, rng, info}`` (CPU tensors).

    Anything but an intact checkpoint (missing, a directory, truncated, a changed bit, missing or malformed
    entries) raises :class:`CheckpointError` naming the file and the problem.
    """
    tensors, meta = read_tensor_file(path)
    if meta.get("format") != "abp-checkpoint":
        raise CheckpointError(f"{path} is not an abp training checkpoint")
    version = meta.get("format_version", "1")
    if version not in ("1", FORMAT_VERSION):
        raise CheckpointError(f"checkpoint {path} has format version {version!r}; this abp reads 1 and "
                              f"{FORMAT_VERSION}")
    if version != "1" or "digest" in meta:
        verify_digest(path, tensors, meta)
    return assemble_or_refuse(path, lambda: _assemble(tensors, meta, path))


# ------------------------------------------------------------------ shared by every checkpoint format
# (this one and the fine-tuning loop's, :mod:`abp.experiments.finetune_checkpoint`)


def write_signed(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Add the SHA-256 ``digest`` of ``tensors`` and ``meta`` to ``meta`` and write one safetensors file
    atomically (a crash mid-write keeps the previous file)."""
    from safetensors.torch import save_file

    meta["digest"] = _digest(tensors, meta)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def read_tensor_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors checkpoint file (CPU tensors); a missing file, a directory,
    anything but a regular file, or an unreadable one raises :class:`CheckpointError` naming the file."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):  # (also keeps a FIFO from blocking the open)
        raise CheckpointError(f"checkpoint {path} does not exist" if not os.path.exists(path) else
                              f"checkpoint {path} is not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    return tensors, meta


def verify_digest(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Refuse a file whose tensors or metadata changed since :func:`write_signed` wrote it."""
    if meta.get("digest") != _digest(tensors, meta):
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents changed since it was written "
                              "(digest mismatch)")


def assemble_or_refuse(path: str | os.PathLike, assemble: Callable[[], Any]) -> Any:
    """``assemble()``, with a missing or malformed entry turned into a :class:`CheckpointError` naming the file."""
    try:
        return assemble()
    except CheckpointError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, RecursionError) as e:
        what = f"lacks {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint {path} is incomplete or malformed ({what})") from e


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """The global torch RNG states (CPU, and the current CUDA device's where there is one) as checkpoint tensors."""
    out = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng/cuda"] = torch.cuda.get_rng_state()
    return out


def rng_states(tensors: dict[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
    """``{"cpu", "cuda"}`` RNG states read back from :func:`rng_state_tensors`' entries (a wrong one raises)."""
    rng = tensors["rng/cpu"]
    if rng.dtype != torch.uint8 or rng.dim() != 1:
        raise TypeError(f"rng/cpu is {rng.dtype} {list(rng.shape)}, not a 1-d uint8 tensor")
    return {"cpu": rng, "cuda": tensors.get("rng/cuda")}


def restore_rng_states(rng: dict[str, Optional[torch.Tensor]]) -> None:
    """Set the global torch RNG states :func:`rng_states` read (CUDA's only where there is a CUDA device)."""
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def parsed_meta(meta: dict[str, str], key: str, kind: type) -> Any:
    """The JSON metadata entry ``key``, which must parse to a ``kind`` (a wrong type raises ``TypeError``)."""
    value = json.loads(meta[key])
    if not isinstance(value, kind):
        raise TypeError(f"{key} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, keyed by the rest of the name."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _assemble(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's parts, each checked for the type a resume needs (a wrong one raises)."""
    parsed = lambda key, kind: parsed_meta(meta, key, kind)  # noqa: E731
    pick = lambda prefix: with_prefix(tensors, prefix)  # noqa: E731
    so = pick("score_optim/")
    per_tensor = meta.get("score_allocation", "global") == "tensor"  # γ and active: one per score tensor
    for k in ("gamma", "active", "pruned"):
        if so[k].dim() != 1 or (so[k].numel() != 1 and not (per_tensor and k != "pruned")):
            raise ValueError(f"score_optim/{k} holds {so[k].numel()} values, not 1")
    if per_tensor and so["gamma"].numel() != so["active"].numel():
        raise ValueError(f"score_optim holds {so['gamma'].numel()} γ and {so['active'].numel()} active flags")
    score_state = {"gamma": so["gamma"] if per_tensor else so["gamma"][0],
                   "active": so["active"] if per_tensor else so["active"][0], "pruned": so["pruned"][0],
                   "steps": int(meta["score_steps"]), "lr": float(meta["score_lr"])}
    if not math.isfinite(score_state["lr"]):
        raise ValueError(f"score_lr is {meta['score_lr']}")
    if "score_moment_steps" in meta:
        steps = parsed("score_moment_steps", list)
        try:
            score_state["moments"] = [(tensors[f"score_moments/{i}/m"], tensors[f"score_moments/{i}/v"])
                                      for i in range(len(steps))]
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path} lacks the score optimiser's Adam moment {e}") from e
        score_state["moment_steps"] = steps
    opt = parsed("opt", dict)
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("plain"), dict):
        raise TypeError("opt lacks its param_groups list or plain dict")
    return {
        "scores": pick("scores/"),
        "head": pick("head/"),
        "head_opt": _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("opt/")}, opt),
        "score_state": score_state,
        "rng": rng_states(tensors),
        "info": parsed("info", dict),
    }
