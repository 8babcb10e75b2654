"""The processes ``torchrun`` starts, as abp uses them: joining and leaving the process group, small
collectives, each rank's rows of a global batch and its dropout stream, and scores sharded in FSDP2's
``Shard(0)`` layout with the score optimiser that updates them (:class:`ShardedScoreOptimizer`).

The strategies built on these (one process, DDP, FSDP) are in :mod:`abp.train.strategy`,
:mod:`abp.train.fsdp` and :mod:`abp.train.parallel`.
"""
from __future__ import annotations

import gc
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from abp.functional import ScoreSGD
from abp.train.score_optim import FusedUpdateError, ScoreOptimizer


# ------------------------------------------------------------------------------------- torchrun env


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun (or ``accelerate launch``) sets it; 1 when not launched that way."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for an un-indexed CUDA device under torchrun (``cuda:0``
    when the launcher gives each process one visible GPU); an explicit ``cuda:N`` is kept."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        n, local = torch.cuda.device_count(), env_local_rank()
        if local < n:
            return torch.device("cuda", local)
        if n == 1:
            return torch.device("cuda", 0)
        raise RuntimeError(f"LOCAL_RANK={local} but this process sees {n} CUDA devices: start at most {n} "
                           "processes per node (torchrun --nproc_per_node)")
    return device


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (env ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``...):
    NCCL on CUDA, gloo on CPU. Returns True when this call created the group (so :func:`shutdown` may
    destroy it); False when not launched with WORLD_SIZE > 1 or when the caller already initialised it."""
    if env_world_size() <= 1 or is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={env_world_size()} but {missing} are not set: start with torchrun "
                           "(python -m torch.distributed.run) or accelerate launch")
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


_CREATED = False


def join(device: torch.device) -> torch.device:
    """This rank's device (:func:`local_device`), after joining torchrun's process group when launched with
    WORLD_SIZE > 1; a group the caller already initialised is used as it is. :func:`shutdown` leaves a group
    joined here."""
    global _CREATED
    device = local_device(device)
    if device.type == "cuda" and env_world_size() > 1:
        torch.cuda.set_device(device)  # NCCL and its object collectives use the current device
    _CREATED = init_from_env(device) or _CREATED
    return device


def shutdown() -> None:
    """Destroy the process group if abp created it (a user's own group is left alone).

    First the run's objects are collected (FSDP state and gloo work objects hold tensors; freed only at
    interpreter exit, after the group is gone, they abort the process: "terminate called without an active
    exception"), then every rank meets at a barrier, so no rank tears down while another still talks."""
    global _CREATED
    if _CREATED and is_initialized():
        gc.collect()
        barrier()
        dist.destroy_process_group()
    _CREATED = False


def barrier() -> None:
    if world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled; for small things: results, α)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (pickled; for small things)."""
    if world_size() == 1:
        return [obj]
    every: list[Any] = [None] * world_size()
    dist.all_gather_object(every, obj)
    return every


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (an all-reduce); returns ``t``."""
    dist.all_reduce(t)
    return t


# ------------------------------------------------------------------------------------- batch sharding


def shard_rows(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-row global batch for ``rank``: contiguous, sizes differ by ≤ 1."""
    if n < 0 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard_rows: need n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    return rank * n // world, (rank + 1) * n // world


def shard_batch(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """This rank's rows of a global batch and its loss weight ``world · rows_r / rows``.

    DDP/FSDP average gradients over ranks, so weighting each rank's *mean* loss this way makes the
    averaged gradient the gradient of the global batch's mean loss, for uneven splits too. A rank that
    gets no row (a final batch smaller than the world) runs row 0 with weight 0: every rank must take
    part in the gradient collectives.
    """
    n = len(next(iter(batch.values())))
    lo, hi = shard_rows(n, rank, world)
    weight = world * (hi - lo) / n
    if hi == lo:
        lo, hi = 0, 1
    return {k: v[lo:hi] for k, v in batch.items()}, weight


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout seed of ``rank`` at ``step``: decorrelated across ranks, a pure function for exact resume."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


# ------------------------------------------------------------------------------------- sharded scores


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view: in-place updates land in the sharded parameter)."""
    return t.to_local() if hasattr(t, "to_local") else t


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is an FSDP2 DTensor (a local shard and a placement over the ranks)."""
    return hasattr(t, "to_local") and hasattr(t, "placements")


def local_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 chunk of ``full`` in FSDP2's ``Shard(0)`` layout (``torch.chunk``; may be empty)."""
    chunks = torch.chunk(full, world_size(), dim=0)
    rank = dist.get_rank()
    return chunks[rank] if rank < len(chunks) else full[:0]


def gather_rows(local: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Every rank's dim-0 chunk (:func:`local_rows` layout) of a tensor of ``shape``, concatenated on CPU."""
    sizes = [c.shape[0] for c in torch.chunk(torch.empty(shape[0], 0), world_size(), dim=0)]
    sizes += [0] * (world_size() - len(sizes))
    pad = torch.zeros((max(sizes), *shape[1:]), dtype=local.dtype, device=local.device)
    pad[: local.shape[0]] = local
    parts = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(parts, pad)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()


class ShardedScoreOptimizer(ScoreOptimizer):
    """:class:`ScoreOptimizer` over FSDP2-sharded scores.

    Build it on the *unsharded* model (its initial counts and γ then come from full tensors, identical
    on every rank), shard, then call :meth:`attach`. Each step updates the local shards with the same
    multi-tensor op, all-reduces the per-tensor counts of ``θ ≤ 0``, and hands over to
    ``ScoreOptimizer.step`` for the γ schedule and stop rule, which thus see global counts on every rank.
    """

    def __init__(self, model: nn.Module, **kw):
        if kw.get("fused"):
            raise FusedUpdateError("fused score update refused under FSDP: the score gradient is reduce-scattered "
                                   "across ranks before any update (use fused_update=off/auto)")
        if kw.get("optimizer") == "adam_tensor":
            raise ValueError("the adam_tensor score optimizer keeps one second moment per whole tensor, which FSDP "
                             "shards across ranks: use adam_mix, adam or sgd under FSDP (DDP runs adam_tensor)")
        super().__init__(model, **kw)

    def attach(self) -> None:
        """Re-point at the modules' scores after ``fully_shard`` replaced them; move state to their device."""
        self.scores = [s for _, m in self.modules for _, _, s in m.score_pairs()]
        device = local_shard(self.scores[0]).device
        self.gamma, self.active = self.gamma.to(device), self.active.to(device)
        self.counts, self.pruned = self.counts.to(device), self.pruned.to(device)
        self._sgd = ScoreSGD(self.lr, self.gamma, self.active, self.recovery)
        if self.moments:  # Adam: moments of this rank's shard (elementwise, so the update equals the unsharded one)
            self.moments = [(torch.zeros_like(local_shard(s).detach()), torch.zeros_like(local_shard(s).detach())) for s in self.scores]

    def full_state_dict(self) -> dict:
        """The state with Adam's moments gathered to full tensors (collective: every rank calls it)."""
        state = self.state_dict()
        if self.moments:
            state["moments"] = [tuple(gather_rows(t, s.shape) for t in mv) for mv, s in zip(self.moments, self.scores)]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a global state (full moments): this rank keeps its dim-0 chunk of each moment, as FSDP2 shards."""
        if self.moments and "moments" in state:
            state = dict(state, moments=[tuple(local_rows(t) for t in mv) for mv in state["moments"]])
        super().load_state_dict(state)

    def _tensor_mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over the whole tensor of a statistic of this rank's shard: sum and count all-reduced (float64)."""
        local = torch.stack([t.sum(dtype=torch.float64), torch.tensor(float(t.numel()), dtype=torch.float64,
                                                                      device=t.device)])
        dist.all_reduce(local)
        return (local[0] / local[1]).to(t.dtype)

    def _means_of_sums(self, sums: torch.Tensor, numels: torch.Tensor) -> torch.Tensor:
        """Per-tensor means over the whole tensors from this rank's shard sums: one all-reduce for every tensor."""
        both = torch.stack([sums, numels])
        dist.all_reduce(both)
        return (both[0] / both[1]).float()

    @torch.no_grad()
    def recount(self) -> None:
        """Global counts of θ ≤ 0: each rank counts its shards, then they are summed over ranks."""
        if not any(is_sharded(s) for s in self.scores):  # still on the full tensors (before attach)
            return super().recount()
        local = torch.stack([(local_shard(s) <= 0).sum() for s in self.scores])
        dist.all_reduce(local)
        self.counts, self.pruned = local, local.sum()

    @torch.no_grad()
    def step(self) -> None:
        if self.frozen:
            return
        live = [i for i, s in enumerate(self.scores) if s.grad is not None]
        if live:
            scores = [self.scores[i] for i in live]
            counts = torch.empty(len(live), dtype=torch.int64, device=self.counts.device)
            self._update(live, [local_shard(s) for s in scores], [local_shard(s.grad) for s in scores], counts)
            dist.all_reduce(counts)  # per-tensor θ ≤ 0 over all shards: the same global counts on every rank
            self.counts[torch.tensor(live, device=counts.device)] = counts
            for s in scores:
                s.grad = None
        super().step()  # no .grad left: only the γ schedule and the stop rule run, on the global counts
