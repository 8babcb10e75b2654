"""Training checkpoints as one safetensors file, written atomically (never pickle).

Holds everything a resumed run needs to end exactly where an uninterrupted one would: scores, head,
head-optimiser state, the score optimiser's γ/stop state, RNG states, step, history and best.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from abp._atomic import atomic_path


class CheckpointError(ValueError):
    """A checkpoint is unreadable or belongs to another run."""


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
    from safetensors.torch import save_file

    tensors = {f"scores/{k}": v.detach().cpu().contiguous() for k, v in scores.items()}
    tensors.update({f"head/{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()})
    opt_tensors, opt_meta = _flatten_optimizer(head_opt)
    tensors.update(opt_tensors)
    for k in ("gamma", "active", "pruned"):
        tensors[f"score_optim/{k}"] = score_state[k].reshape(1)
    for i, (m, v) in enumerate(score_state.get("moments", ())):  # Adam on the scores
        tensors[f"score_moments/{i}/m"] = m.contiguous()
        tensors[f"score_moments/{i}/v"] = v.contiguous()
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"format": "abp-checkpoint", "info": json.dumps(info), "opt": json.dumps(opt_meta),
            "score_steps": str(score_state["steps"]), "score_lr": repr(score_state["lr"])}
    if "moment_steps" in score_state:
        meta["score_moment_steps"] = json.dumps(score_state["moment_steps"])
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint into ``{scores, head, head_opt, score_state, rng, info}`` (CPU tensors)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {e})") from e
    if meta.get("format") != "abp-checkpoint":
        raise CheckpointError(f"{path} is not an abp training checkpoint")
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
    so = pick("score_optim/")
    score_state = {"gamma": so["gamma"][0], "active": so["active"][0], "pruned": so["pruned"][0],
                   "steps": int(meta["score_steps"]), "lr": float(meta["score_lr"])}
    if "score_moment_steps" in meta:
        steps = json.loads(meta["score_moment_steps"])
        try:
            score_state["moments"] = [(tensors[f"score_moments/{i}/m"], tensors[f"score_moments/{i}/v"])
                                      for i in range(len(steps))]
        except KeyError as e:
            raise CheckpointError(f"checkpoint {path} lacks the score optimiser's Adam moment {e}") from e
        score_state["moment_steps"] = steps
    return {
        "scores": pick("scores/"),
        "head": pick("head/"),
        "head_opt": _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("opt/")},
                                         json.loads(meta["opt"])),
        "score_state": score_state,
        "rng": {"cpu": tensors["rng/cpu"], "cuda": tensors.get("rng/cuda")},
        "info": json.loads(meta["info"]),
    }
