"""The strategy a run uses (:func:`make_strategy`): one process, or data-parallel ABP on ``torch.distributed``
when ``torchrun`` starts N copies of the trainer.

Nothing in the algorithm changes then. Every rank builds the same model from the same seed and walks the
same global batches (``cfg.batch_size`` is the *global* batch, in the single-process order); rank ``r``
takes a contiguous slice of each batch (:func:`~abp.train.distributed.shard_rows`) and scales its mean
loss by ``world · rows_r / rows`` so that the averaged gradient is exactly the gradient of the global
batch's mean loss, uneven splits included. The engine is PyTorch's own:

- ``ddp`` (default; :class:`~abp.train.strategy.DDP`): ``DistributedDataParallel`` all-reduces the score
  and head gradients; the scores then take the ScoreOptimizer's multi-tensor step (the fused in-backward
  update cannot run under an all-reduce). The DDP wrapper covers the parameters that train *now*, and is
  rebuilt when that set changes (head warm-up → pruning → pruning stopped), so the warm-up and
  post-stop phases all-reduce only the head, not a score-sized buffer of zeros.
- ``fsdp`` (:class:`~abp.train.fsdp.FSDP`): FSDP2 ``fully_shard`` (FULL_SHARD) over each transformer
  block and the whole model; frozen weights and scores are sharded, the scores' gradients reduce-scattered,
  and :class:`~abp.train.distributed.ShardedScoreOptimizer` updates each rank's shard and all-reduces the
  pruned counts. The small head stays replicated; its gradient is averaged with one ``all_reduce`` per
  tensor (what DDP does).

Outputs match the single-process run: rank 0 alone writes (mask file, checkpoints, history,
metrics; atomically), the others wait at a barrier. Checkpoints hold only global state (full scores,
head, optimiser, γ/active/pruned count, RNG), so a run resumes at any world size. Dev evaluation is gathered:
rank ``r`` predicts batches ``r, r+W, ...`` and every rank receives all predictions. Dropout: each
rank draws its masks from a generator reseeded every step from ``(seed, step, rank)``, so a run is
reproducible and resumable for a given world size; it cannot equal the single-process dropout masks,
so equality with a single-process run holds with dropout off (within float rounding).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from abp.train.distributed import join, world_size
from abp.train.fsdp import FSDP
from abp.train.strategy import DDP, SingleProcess, Strategy

log = logging.getLogger("abp")

STRATEGIES = ("auto", "ddp", "fsdp")


def make_strategy(kind: str, device: torch.device, *, grad_accum: int = 1) -> Strategy:
    """This process's strategy: join torchrun's process group if launched with WORLD_SIZE > 1 (or use the
    caller's group); one process runs :class:`~abp.train.strategy.SingleProcess`, several run ``kind``
    (auto = ddp) on this rank's device."""
    if kind not in STRATEGIES:
        raise ValueError(f"distributed must be one of {', '.join(STRATEGIES)}, got {kind!r}")
    device = join(device)
    if world_size() == 1:
        return SingleProcess(device)
    strategy = (FSDP if kind == "fsdp" else DDP)(device, grad_accum=grad_accum)
    log.info("abp: rank %d of %d on %s, %s over %s; batch_size is the global batch", strategy.rank, strategy.world,
             device, strategy.kind, dist.get_backend())
    return strategy
