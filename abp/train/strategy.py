"""What a :class:`~abp.train.trainer.Trainer` asks of the processes it runs on (:class:`Strategy`), and its
one-process and DDP answers; FSDP's is :class:`abp.train.fsdp.FSDP`, and :func:`abp.train.parallel.make_strategy`
picks one (its docstring says what changes under ``torchrun``).
"""
from __future__ import annotations

import contextlib
import gc
import inspect
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from abp.patch import sparsity as local_sparsity
from abp.train.distributed import (all_gather_objects, barrier, broadcast_object, rank, shard_batch, step_seed,
                                   world_size)
from abp.train.evaluate import Gather, evaluate_model
from abp.train.score_optim import ScoreOptimizer, calibrate_score_lr


class Strategy:
    """The calls through which the Trainer runs on one process or many: building the model and its score
    optimiser, each training step, and the global views (loss means, α, metrics, sparsity, the full model).

    Each method's body here is what one process does; :class:`MultiProcess`, :class:`DDP` and
    :class:`~abp.train.fsdp.FSDP` override what differs. Building one runs no collective.
    """

    kind: str  # what ``--distributed`` resolved to: none | ddp | fsdp

    def __init__(self, device: torch.device, *, grad_accum: int = 1):
        self.device, self.grad_accum = device, grad_accum
        self.rank, self.world = rank(), world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"strategy": self.kind, "world_size": self.world,
                "backend": dist.get_backend() if self.world > 1 else None}

    # -------------------------------------------------------------- building
    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device."""
        return model.to(self.device)

    def score_optimizer(self, model: nn.Module, **kw) -> ScoreOptimizer:
        return ScoreOptimizer(model, **kw)

    def prepare(self, model: nn.Module, scores: ScoreOptimizer) -> None:
        """Last step of building, once ``scores`` was built on the placed model (FSDP shards here)."""

    # -------------------------------------------------------------- one training step
    def module(self, model: nn.Module) -> nn.Module:
        """The module to run the training forward through."""
        return model

    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward; ``last``: the last micro-batch of a step, after which
        the gradients are complete (gradient accumulation)."""
        yield

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This process's rows of a global batch, and the weight of their mean loss."""
        return batch, 1.0

    def seed_step(self, seed: int, step: int) -> None:
        """Called at the start of each step: the dropout stream of ``step`` (one process: the run's own stream,
        untouched)."""

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a per-rank weighted loss: the global batch's."""
        return t

    def calibrate_score_lr(self, model: nn.Module, *, prune_steps: int, ratio: float) -> float:
        """Auto α (:func:`~abp.train.score_optim.calibrate_score_lr`) from the gradient just computed; rank 0's
        value on every rank."""
        return float(self.broadcast(calibrate_score_lr(model, prune_steps=prune_steps, ratio=ratio)))

    # -------------------------------------------------------------- global views
    def evaluate(self, model: nn.Module, batchers: dict, *, task: Optional[str], num_labels: int,
                 autocast: bool = True) -> dict[str, float]:
        """:func:`~abp.train.evaluate.evaluate_model`, the same metrics on every rank."""
        return evaluate_model(model, batchers, task=task, num_labels=num_labels, autocast=autocast,
                              gather=self.eval_gather())

    def eval_gather(self) -> Optional[Gather]:
        """How the ranks share an evaluation (None: this process evaluates every batch)."""
        return None

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> float:
        """:func:`abp.sparsity` over the whole model."""
        return local_sparsity(model)

    @torch.no_grad()
    def full_model(self, model: nn.Module) -> nn.Module:
        """A model whose scores are complete on rank 0, for writing mask files and checkpoints."""
        return model

    @torch.no_grad()
    def copy_scores_(self, scores: torch.Tensor, full: torch.Tensor) -> None:
        """Load a checkpoint's full score tensor into ``scores``."""
        scores.copy_(full)

    def barrier(self) -> None:
        barrier()

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def agree(self, what: str, value: Any) -> Any:
        """``value`` if every rank holds the same one, else RuntimeError on every rank (no rank hangs)."""
        every = all_gather_objects(value)
        if any(v != every[0] for v in every[1:]):
            raise RuntimeError(f"ranks disagree on {what}: {dict(enumerate(every))}")
        return value


class SingleProcess(Strategy):
    """One process: the training loop as written, every call above as it stands."""

    kind = "none"


class MultiProcess(Strategy):
    """What every strategy across ``torchrun``'s ranks does alike: each rank takes its rows of every global
    batch (:func:`~abp.train.distributed.shard_batch`), draws dropout from its own stream, reseeded every step
    from ``(seed, step, rank)``, averages losses over the ranks and shares the evaluation."""

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        return shard_batch(batch, self.rank, self.world)

    def seed_step(self, seed: int, step: int) -> None:
        torch.manual_seed(step_seed(seed, step, self.rank))

    def average(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    #: every forward is a collective (FSDP), so the ranks evaluate in lockstep (see :class:`Gather`)
    lockstep_forward = False

    def eval_gather(self) -> Optional[Gather]:
        return Gather(self.rank, self.world, all_gather_objects, lockstep=self.lockstep_forward)


def _no_buffer_sync() -> dict:
    """DDP must not broadcast buffers every forward (transformers have no running statistics); the
    keyword changed name in torch 2.13 (``forward_sync_buffers``; ``broadcast_buffers`` before)."""
    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _no_buffer_sync()


class DDP(MultiProcess):
    """``DistributedDataParallel`` over the parameters that train now: it all-reduces the score and head
    gradients, then the scores take the ScoreOptimizer's multi-tensor step (see :mod:`abp.train.parallel`)."""

    kind = "ddp"

    def __init__(self, device: torch.device, *, grad_accum: int = 1):
        super().__init__(device, grad_accum=grad_accum)
        self._ddp: Optional[nn.Module] = None
        self._trainable: Optional[tuple[bool, ...]] = None

    def module(self, model: nn.Module) -> nn.Module:
        """A wrapper over the parameters that train now, rebuilt when that set changes (its construction is
        collective: all ranks change phase at the same step, as their scores and stop rule are identical)."""
        trainable = tuple(p.requires_grad for p in model.parameters())
        if trainable != self._trainable:
            from torch.nn.parallel import DistributedDataParallel

            first = self._ddp is None
            if self._ddp is not None and hasattr(self._ddp, "_remove_autograd_hooks"):
                self._ddp._remove_autograd_hooks()  # the old reducer's hooks would stay on the parameters
            self._ddp = None
            gc.collect()
            # A masked module the loss does not reach (e.g. a masked pooler) gets no gradient: within a phase
            # the graph is static, so static_graph finds such parameters once (their .grad stays None, as in
            # one process) instead of find_unused_parameters' graph walk every step; but static_graph
            # cannot start under no_sync, so gradient accumulation takes the walk. init_sync broadcasts
            # rank 0's parameters once (later rebuilds: already equal). Gradients live in DDP's buckets.
            kw = dict(static_graph=True) if self.grad_accum == 1 else dict(find_unused_parameters=True)
            self._ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                                gradient_as_bucket_view=True, init_sync=first, **kw, **_NO_BUFFER_SYNC) \
                if any(trainable) else model
            self._trainable = trainable
        return self._ddp

    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, last: bool) -> Iterator[None]:
        """No gradient all-reduce but on the ``last`` micro-batch of a step."""
        if not last and hasattr(module, "no_sync"):
            with module.no_sync():
                yield
            return
        yield
