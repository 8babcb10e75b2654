"""FSDP2 for ABP: :func:`~torch.distributed.fsdp.fully_shard` (FULL_SHARD) over each transformer block and
the whole model. Frozen weights and scores are sharded, the scores' gradients reduce-scattered, and
:class:`~abp.train.distributed.ShardedScoreOptimizer` updates each rank's shard and all-reduces the pruned
counts. The small head stays replicated; its gradient is averaged with one ``all_reduce`` per tensor (what
DDP does). Rank 0 keeps a CPU mirror of the masked model, to write mask files and checkpoints in the
single-process format.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from abp.patch import masked_modules, score_tensors
from abp.train.distributed import ShardedScoreOptimizer, is_sharded, local_rows, local_shard, sum_over_ranks
from abp.train.score_optim import ScoreOptimizer, calibrate_score_lr
from abp.train.strategy import MultiProcess

log = logging.getLogger("abp")


def fsdp_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the Hugging Face ``_no_split_modules`` classes (transformer
    blocks, BERT's embeddings), found anywhere in ``model``."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def fully_shard_model(model: nn.Module, mesh, *, replicated: tuple[nn.Parameter, ...] = ()) -> nn.Module:
    """FSDP2 FULL_SHARD: each block is its own unit (all-gathered just for its forward and backward),
    the rest (e.g. a final norm, a pooler) the root unit, ``model`` itself. Mixed ``requires_grad`` in a
    unit (frozen weights, trainable scores) is fine for FSDP2; only the scores get reduce-scattered.
    ``replicated`` parameters (the head) stay whole and are left to the caller.

    The root is the wrapper, never a Hugging Face ``PreTrainedModel``: ``fully_shard`` swaps the class
    of what it shards, and transformers 5 finds a model's ``output_hidden_states`` recorder by its class
    (``hidden_states`` would come back None). Blocks are matched by ``isinstance`` and keep working."""
    from torch.distributed.fsdp import fully_shard

    blocks = fsdp_blocks(model)
    if not blocks:
        log.warning("abp: %s names no _no_split_modules: FSDP shards it as one unit (whole model gathered "
                    "at every forward)", type(model).__name__)
    for b in blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(replicated) or None)
    return model


class FSDP(MultiProcess):
    """FSDP2 FULL_SHARD across the ranks (see the module's docstring)."""

    kind = "fsdp"
    lockstep_forward = True

    def __init__(self, device: torch.device, *, grad_accum: int = 1):
        super().__init__(device, grad_accum=grad_accum)
        self._root: Optional[nn.Module] = None
        self._mirror: Optional[nn.Module] = None
        self._replicated: list[nn.Parameter] = []

    # -------------------------------------------------------------- building
    def place(self, model: nn.Module) -> nn.Module:
        """Move the head to this rank's device; ``fully_shard`` moves the shards (:meth:`prepare`)."""
        model.head.to(self.device)
        return model

    def score_optimizer(self, model: nn.Module, **kw) -> ScoreOptimizer:
        return ShardedScoreOptimizer(model, **kw)

    def prepare(self, model: nn.Module, scores: ScoreOptimizer) -> None:
        """Shard the backbone (after ``scores`` was built on the full tensors) and keep, on rank 0, a CPU
        mirror of the masked model to write mask files and checkpoints in the single-process format."""
        from torch.distributed.device_mesh import init_device_mesh

        for _, m in masked_modules(model):  # unsharding rewrites scores behind the packed-mask cache's back
            if hasattr(m, "serve_bits"):
                m.serve_bits = False
                m.train_bits = False

        total = sum(float(s.detach().double().sum()) for _, s in score_tensors(model))
        fingerprint = torch.tensor([total], dtype=torch.float64, device=self.device)
        every = [torch.zeros_like(fingerprint) for _ in range(self.world)]
        dist.all_gather(every, fingerprint)
        if len({float(f) for f in every}) != 1:
            raise RuntimeError("FSDP: the ranks built different initial scores (each rank must build the model "
                               f"from the same seed and weights); score sums per rank: {[float(f) for f in every]}")
        if self.is_main:  # the frozen weights' CPU storage is shared with the model, the head too; scores are copied
            scores_ids = {id(s) for _, s in score_tensors(model)}
            # New Parameter objects over the same storage: fully_shard moves the model's own parameters to
            # the GPU in place (``p.data = p.to(device)``), which would otherwise drag the mirror's full
            # weights onto rank 0's GPU too.
            memo = {id(p): nn.Parameter(p.data, requires_grad=p.requires_grad)
                    for p in model.parameters() if id(p) not in scores_ids}
            memo[id(model.head)] = model.head
            self._mirror = copy.deepcopy(model, memo)
        mesh = init_device_mesh(self.device.type, (self.world,))
        self._replicated = list(model.head.parameters())
        self._root = fully_shard_model(model, mesh, replicated=tuple(self._replicated))
        for p in self._replicated:  # the replicated head starts identical everywhere, as under DDP
            dist.broadcast(p.data, 0)
        if isinstance(scores, ShardedScoreOptimizer):
            scores.attach()

    # -------------------------------------------------------------- one training step
    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, last: bool) -> Iterator[None]:
        """Reduce-scatter the scores' gradients on the ``last`` micro-batch of a step only, then average the
        replicated head's."""
        self._root.set_requires_gradient_sync(last)
        yield
        if last:
            for p in self._replicated:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)

    def calibrate_score_lr(self, model: nn.Module, *, prune_steps: int, ratio: float) -> float:
        """Auto α from the reduce-scattered gradient: each rank's shard statistics, summed over the ranks."""
        lr = calibrate_score_lr(model, prune_steps=prune_steps, ratio=ratio, reduce=sum_over_ranks)
        return float(self.broadcast(lr))

    # -------------------------------------------------------------- global views
    def evaluate(self, model: nn.Module, batchers: dict, *, task: Optional[str], num_labels: int,
                 autocast: bool = True) -> dict[str, float]:
        metrics = super().evaluate(model, batchers, task=task, num_labels=num_labels, autocast=autocast)
        self.reshard(model)
        return metrics

    @staticmethod
    def reshard(model: nn.Module) -> None:
        """Back to the sharded parameters. The root unit stays gathered after a no-grad forward (it reshards
        after backward, and an eval has none); its modules would then hold full tensors."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> float:
        """Counted on the shards, summed over the ranks."""
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for name, s in score_tensors(model):
            if not is_sharded(s):
                raise RuntimeError(f"FSDP: {name} is not sharded now (call FSDP.reshard after a no-grad forward)")
            counts[0] += (local_shard(s) <= 0).sum()
            counts[1] += local_shard(s).numel()
        dist.all_reduce(counts)
        return float(counts[0] / counts[1])

    @torch.no_grad()
    def full_model(self, model: nn.Module) -> nn.Module:
        """Gathers each score tensor in turn (collective: every rank calls it) into rank 0's CPU mirror, so at
        most one unsharded score tensor is on a device at a time; rank 0 gets the mirror, the others ``model``."""
        mirror = score_tensors(self._mirror) if self.is_main else None
        for name, s in score_tensors(model):
            full = s.full_tensor() if is_sharded(s) else s
            if mirror is not None:
                mname, ms = next(mirror)
                if mname != name:
                    raise RuntimeError(f"FSDP mirror out of step: {mname} != {name}")
                ms.copy_(full)
        return self._mirror if self.is_main else model

    @torch.no_grad()
    def copy_scores_(self, scores: torch.Tensor, full: torch.Tensor) -> None:
        """This rank's dim-0 shard of a checkpoint's full score tensor (FSDP2's ``Shard(0)`` layout)."""
        if not is_sharded(scores):
            raise RuntimeError("FSDP: loading into gathered (unsharded) scores would be lost at the next reshard")
        local, mine = scores.to_local(), local_rows(full)
        if mine.shape != local.shape:
            raise RuntimeError(f"FSDP shard of shape {tuple(local.shape)} does not match rows of the checkpoint's "
                               f"{tuple(full.shape)} tensor for rank {self.rank} of {self.world}")
        local.copy_(mine)
