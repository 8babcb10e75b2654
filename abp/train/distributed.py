"""Data-parallel ABP on ``torch.distributed``: what changes when ``torchrun`` starts N copies of the trainer.

Nothing in the algorithm changes. Every rank builds the same model from the same seed and walks the
same global batches (``cfg.batch_size`` is the *global* batch, in the single-process order); rank
``r`` takes a contiguous slice of each batch (:func:`shard_rows`) and scales its mean loss by
``world · rows_r / rows`` so that the averaged gradient is exactly the gradient of the global batch's
mean loss, uneven splits included. The engine is PyTorch's own:

- ``ddp`` (default): :class:`~torch.nn.parallel.DistributedDataParallel` all-reduces the score and head
  gradients; the scores then take the ScoreOptimizer's multi-tensor step (the fused in-backward update
  cannot run under an all-reduce). The DDP wrapper covers the parameters that train *now*, and is
  rebuilt when that set changes (head warm-up → pruning → pruning stopped), so the warm-up and
  post-stop phases all-reduce only the head, not a score-sized buffer of zeros.
- ``fsdp``: FSDP2 :func:`~torch.distributed.fsdp.fully_shard` (FULL_SHARD) over each transformer block
  and the whole model; frozen weights and scores are sharded, the scores' gradients reduce-scattered, and
  :class:`ShardedScoreOptimizer` updates each rank's shard and all-reduces the pruned counts. The small
  head stays replicated; its gradient is averaged with one ``all_reduce`` per tensor (what DDP does).

Outputs match the single-process run: rank 0 alone writes (mask file, checkpoints, history,
metrics; atomically), the others wait at a barrier. Checkpoints hold only global state (full scores,
head, optimiser, γ/active/pruned count, RNG), so a run resumes at any world size. Dev evaluation is gathered:
rank ``r`` predicts batches ``r, r+W, ...`` and every rank receives all predictions. Dropout: each
rank draws its masks from a generator reseeded every step from ``(seed, step, rank)``, so a run is
reproducible and resumable for a given world size; it cannot equal the single-process dropout masks,
so equality with a single-process run holds with dropout off (within float rounding).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import logging
import os
from typing import Any, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from abp import _ops
from abp.functional import ScoreSGD
from abp.patch import masked_modules, score_tensors, sparsity as local_sparsity
from abp.train.metrics import custom_metrics, evaluate_splits
from abp.train.evaluate import evaluate_model, hard_masks
from abp.train.score_optim import FusedUpdateError, ScoreOptimizer, calibrate_score_lr

log = logging.getLogger("abp")

STRATEGIES = ("auto", "ddp", "fsdp")


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


def _is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def _my_rows(full: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 chunk of ``full`` in FSDP2's ``Shard(0)`` layout (``torch.chunk``; may be empty)."""
    chunks = torch.chunk(full, world_size(), dim=0)
    rank = dist.get_rank()
    return chunks[rank] if rank < len(chunks) else full[:0]


def _gather_rows(local: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Every rank's dim-0 chunk (``_my_rows`` layout) of a tensor of ``shape``, concatenated on CPU."""
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
        if kw.get("optimizer") in ("adam_tensor", "adam_floor"):
            raise ValueError(f"the {kw['optimizer']} score optimizer needs each tensor's mean square gradient, which FSDP "
                             f"shards across ranks: use adam or sgd under FSDP (DDP runs {kw['optimizer']})")
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
            state["moments"] = [tuple(_gather_rows(t, s.shape) for t in mv) for mv, s in zip(self.moments, self.scores)]
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a global state (full moments): this rank keeps its dim-0 chunk of each moment, as FSDP2 shards."""
        if self.moments and "moments" in state:
            state = dict(state, moments=[tuple(_my_rows(t) for t in mv) for mv in state["moments"]])
        super().load_state_dict(state)

    @torch.no_grad()
    def recount(self) -> None:
        """Global counts of θ ≤ 0: each rank counts its shards, then they are summed over ranks."""
        if not any(_is_sharded(s) for s in self.scores):  # still on the full tensors (before attach)
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
            grads = [local_shard(s.grad) for s in scores]
            if self.optimizer != "sgd":
                grads = self._adam_directions(live, grads)
            _ops.multi_score_update_([local_shard(s) for s in scores], grads, self.lr,
                                     self.gamma, self.active, self.recovery, counts, self.backend)
            dist.all_reduce(counts)  # per-tensor θ ≤ 0 over all shards: the same global counts on every rank
            self.counts[torch.tensor(live, device=counts.device)] = counts
            for s in scores:
                s.grad = None
        super().step()  # no .grad left: only the γ schedule and the stop rule run, on the global counts


def sharded_calibrate_score_lr(model: nn.Module, *, prune_steps: int, ratio: float) -> float:
    """:func:`~abp.train.score_optim.calibrate_score_lr` for FSDP-sharded scores.

    The same statistics (per tensor: mean |θ|, RMS of the non-zero gradient entries; α from their
    mean and median) summed over the shards with one all-reduce. ``tests/test_distributed.py``
    checks it against ``calibrate_score_lr`` on the unsharded model, so the two cannot drift apart.
    """
    pairs = [s for _, m in masked_modules(model) for _, _, s in m.score_pairs()]
    stats = torch.zeros(len(pairs), 4, dtype=torch.float64, device=local_shard(pairs[0]).device)
    for i, s in enumerate(pairs):
        loc = local_shard(s.detach())
        stats[i, 0] = loc.double().abs().sum()
        if s.grad is not None:
            g = local_shard(s.grad.detach()).double()
            stats[i, 1], stats[i, 2], stats[i, 3] = g.pow(2).sum(), (g != 0).sum(), 1.0
    dist.all_reduce(stats)
    init = [float(stats[i, 0]) / s.numel() for i, s in enumerate(pairs)]
    rms = [float((stats[i, 1] / stats[i, 2]).sqrt()) for i in range(len(pairs)) if stats[i, 3] > 0 and stats[i, 2] > 0]
    if not rms:
        raise RuntimeError("calibrate_score_lr: no score has a gradient; run a backward through the masked model first")
    typical = sorted(rms)[len(rms) // 2]
    if not np.isfinite(typical) or typical == 0:
        raise FloatingPointError(f"calibrate_score_lr: typical score-gradient size is {typical}; cannot set α")
    return ratio * max(sum(init) / len(init), 1e-4) / (prune_steps * typical)


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


# ------------------------------------------------------------------------------------- gathered eval


@torch.no_grad()
def gather_predictions(model: nn.Module, batchers: dict, *, autocast: bool = True,
                       lockstep: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dev predictions with hard masks, ``{split: (preds, labels)}`` in dev order, on every rank.

    Rank ``r`` predicts batches ``r, r+W, r+2W, ...`` (the same batches, padded the same way, as the
    single-process evaluation), then all ranks exchange them. ``lockstep`` (FSDP: every forward is a
    collective) makes ranks with fewer batches run a discarded extra forward so all run as many.
    """
    r, world = rank(), world_size()
    device = local_shard(next(model.parameters())).device
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and autocast) else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    outputs = {}
    try:
        with hard_masks(model):
            for split, batcher in batchers.items():
                mine, spare = [], None
                for b, batch in enumerate(batcher.iter_batches(0)):
                    spare = spare if spare is not None else batch
                    if b % world != r:
                        continue
                    labels = batch.pop("labels")
                    with amp:
                        preds = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
                    mine.append((b, preds, labels))
                rounds = -(-len(batcher) // world)
                for _ in range(rounds - len(mine) if lockstep else 0):
                    spare.pop("labels", None)
                    with amp:
                        model(**{k: v.to(device) for k, v in spare.items()})
                everyone: list[Any] = [None] * world
                dist.all_gather_object(everyone, mine)
                parts = sorted((x for part in everyone for x in part), key=lambda x: x[0])
                outputs[split] = (torch.cat([p for _, p, _ in parts]), torch.cat([y for _, _, y in parts]))
    finally:
        model.train(was_training)
    return outputs


# ------------------------------------------------------------------------------------- the trainer's handle


def _no_buffer_sync() -> dict:
    """DDP must not broadcast buffers every forward (transformers have no running statistics); the
    keyword changed name in torch 2.13 (``forward_sync_buffers``; ``broadcast_buffers`` before)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


_NO_BUFFER_SYNC = _no_buffer_sync()


class Parallel:
    """How a :class:`~abp.train.trainer.Trainer` runs across ranks; ``kind`` is none | ddp | fsdp.

    With one process (``kind == "none"``) every method is the single-process behaviour, unchanged.
    """

    def __init__(self, kind: str, device: torch.device, *, grad_accum: int = 1):
        self.kind, self.device, self.grad_accum = kind, device, grad_accum
        self.rank, self.world = rank(), world_size()
        self._ddp: Optional[nn.Module] = None
        self._trainable: Optional[tuple[bool, ...]] = None
        self._fsdp_root: Optional[nn.Module] = None
        self._mirror: Optional[nn.Module] = None
        self._replicated: list[nn.Parameter] = []

    @classmethod
    def setup(cls, strategy: str, device: torch.device, *, grad_accum: int = 1) -> "Parallel":
        """Join torchrun's process group if launched with WORLD_SIZE > 1 (or use the caller's group)."""
        global _CREATED
        if strategy not in STRATEGIES:
            raise ValueError(f"distributed must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        device = local_device(device)
        if device.type == "cuda" and env_world_size() > 1:
            torch.cuda.set_device(device)  # NCCL and its object collectives use the current device
        _CREATED = init_from_env(device) or _CREATED
        if world_size() == 1:
            return cls("none", device)
        p = cls("fsdp" if strategy == "fsdp" else "ddp", device, grad_accum=grad_accum)
        log.info("abp: rank %d of %d on %s, %s over %s; batch_size is the global batch", p.rank, p.world, device,
                 p.kind, dist.get_backend())
        return p

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"strategy": self.kind, "world_size": self.world,
                "backend": dist.get_backend() if self.world > 1 else None}

    # -------------------------------------------------------------- building
    def place(self, model: nn.Module) -> nn.Module:
        """Move the model to this rank's device (FSDP: the head only; ``fully_shard`` moves the shards)."""
        if self.kind == "fsdp":
            model.head.to(self.device)
            return model
        return model.to(self.device)

    def score_optimizer(self, model: nn.Module, **kw) -> ScoreOptimizer:
        return (ShardedScoreOptimizer if self.kind == "fsdp" else ScoreOptimizer)(model, **kw)

    def prepare(self, model: nn.Module, scores: ScoreOptimizer) -> None:
        """FSDP: shard the backbone (after ``scores`` was built on the full tensors) and keep, on rank 0,
        a CPU mirror of the masked model to write mask files and checkpoints in the single-process format."""
        if self.kind != "fsdp":
            return
        from torch.distributed.device_mesh import init_device_mesh

        for _, m in masked_modules(model):  # unsharding rewrites scores behind the packed-mask cache's back
            if hasattr(m, "serve_bits"):
                m.serve_bits = False

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
        self._fsdp_root = fully_shard_model(model, mesh, replicated=tuple(self._replicated))
        for p in self._replicated:  # the replicated head starts identical everywhere, as under DDP
            dist.broadcast(p.data, 0)
        if isinstance(scores, ShardedScoreOptimizer):
            scores.attach()

    # -------------------------------------------------------------- one training step
    def module(self, model: nn.Module) -> nn.Module:
        """The module to run the training forward through. DDP: a wrapper over the parameters that
        train now, rebuilt when that set changes (its construction is collective: all ranks change
        phase at the same step, as their scores and stop rule are identical)."""
        if self.kind != "ddp":
            return model
        trainable = tuple(p.requires_grad for p in model.parameters())
        if trainable != self._trainable:
            from torch.nn.parallel import DistributedDataParallel as DDP

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
            self._ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                            gradient_as_bucket_view=True, init_sync=first, **kw, **_NO_BUFFER_SYNC) \
                if any(trainable) else model
            self._trainable = trainable
        return self._ddp

    @contextlib.contextmanager
    def grad_sync(self, module: nn.Module, last: bool) -> Iterator[None]:
        """Around a micro-batch's forward and backward: gradient communication only on the ``last``
        micro-batch of a step (gradient accumulation); FSDP: then also average the replicated head."""
        if self.kind == "ddp" and not last and hasattr(module, "no_sync"):
            with module.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self._fsdp_root.set_requires_gradient_sync(last)
        yield
        if self.kind == "fsdp" and last:
            for p in self._replicated:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world)

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        if self.kind == "none":
            return batch, 1.0
        return shard_batch(batch, self.rank, self.world)

    def seed_step(self, seed: int, step: int) -> None:
        """Per-rank dropout stream for ``step`` (single process: the run's own stream, untouched)."""
        if self.kind != "none":
            torch.manual_seed(step_seed(seed, step, self.rank))

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks / world: the global mean of per-rank weighted losses."""
        if self.kind == "none":
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def calibrate_score_lr(self, model: nn.Module, *, prune_steps: int, ratio: float) -> float:
        """Auto α from the all-reduced (DDP) or reduce-scattered (FSDP) gradient; rank 0's value for all."""
        if self.kind == "fsdp":
            lr = sharded_calibrate_score_lr(model, prune_steps=prune_steps, ratio=ratio)
        else:
            lr = calibrate_score_lr(model, prune_steps=prune_steps, ratio=ratio)
        return float(broadcast_object(lr))

    # -------------------------------------------------------------- global views
    def evaluate(self, model: nn.Module, batchers: dict, *, task: Optional[str], num_labels: int,
                 autocast: bool = True) -> dict[str, float]:
        """:func:`~abp.train.evaluate.evaluate_model`, gathered across ranks (same metrics on every rank)."""
        if self.kind == "none":
            return evaluate_model(model, batchers, task=task, num_labels=num_labels, autocast=autocast)
        outputs = gather_predictions(model, batchers, autocast=autocast, lockstep=self.kind == "fsdp")
        if self.kind == "fsdp":
            self.reshard(model)
        if task:
            return evaluate_splits(task, outputs)
        (p, y), = outputs.values()
        return custom_metrics(p, y, num_labels)

    @staticmethod
    def reshard(model: nn.Module) -> None:
        """FSDP: back to the sharded parameters. The root unit stays gathered after a no-grad forward
        (it reshards after backward, and an eval has none); its modules would then hold full tensors."""
        from torch.distributed.fsdp import FSDPModule

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()

    @torch.no_grad()
    def sparsity(self, model: nn.Module) -> float:
        """:func:`abp.sparsity` over the whole model (FSDP: counted on the shards, summed over ranks)."""
        if self.kind != "fsdp":
            return local_sparsity(model)
        counts = torch.zeros(2, dtype=torch.float64, device=self.device)
        for name, s in score_tensors(model):
            if not _is_sharded(s):
                raise RuntimeError(f"FSDP: {name} is not sharded now (call Parallel.reshard after a no-grad forward)")
            counts[0] += (local_shard(s) <= 0).sum()
            counts[1] += local_shard(s).numel()
        dist.all_reduce(counts)
        return float(counts[0] / counts[1])

    @torch.no_grad()
    def full_model(self, model: nn.Module) -> nn.Module:
        """A model whose scores are complete on rank 0, for writing mask files and checkpoints.

        FSDP: gathers each score tensor in turn (collective: every rank calls it) into rank 0's CPU
        mirror, so at most one unsharded score tensor is on a device at a time. Otherwise: ``model``.
        """
        if self.kind != "fsdp":
            return model
        mirror = score_tensors(self._mirror) if self.is_main else None
        for name, s in score_tensors(model):
            full = s.full_tensor() if _is_sharded(s) else s
            if mirror is not None:
                mname, ms = next(mirror)
                if mname != name:
                    raise RuntimeError(f"FSDP mirror out of step: {mname} != {name}")
                ms.copy_(full)
        return self._mirror if self.is_main else model

    @torch.no_grad()
    def copy_scores_(self, scores: torch.Tensor, full: torch.Tensor) -> None:
        """Load a checkpoint's full score tensor into ``scores`` (FSDP: this rank's dim-0 shard of it)."""
        if not _is_sharded(scores):
            if self.kind == "fsdp":
                raise RuntimeError("FSDP: loading into gathered (unsharded) scores would be lost at the next reshard")
            scores.copy_(full)
            return
        local = scores.to_local()
        chunks = torch.chunk(full, self.world, dim=0)  # FSDP2's Shard(0) layout
        mine = chunks[self.rank] if self.rank < len(chunks) else full[:0]
        if mine.shape != local.shape:
            raise RuntimeError(f"FSDP shard of shape {tuple(local.shape)} does not match rows of the checkpoint's "
                               f"{tuple(full.shape)} tensor for rank {self.rank} of {self.world}")
        local.copy_(mine)

    def barrier(self) -> None:
        barrier()

    def broadcast(self, obj: Any) -> Any:
        return broadcast_object(obj)

    def agree(self, what: str, value: Any) -> Any:
        """``value`` if every rank holds the same one, else RuntimeError on every rank (no rank hangs)."""
        if world_size() == 1:
            return value
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, value)
        if any(v != every[0] for v in every):
            raise RuntimeError(f"ranks disagree on {what}: {dict(enumerate(every))}")
        return value
