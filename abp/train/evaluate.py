"""Dev-set evaluation with the hard mask, for the trainer and for shipped task-mask files."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from abp.patch import masked_modules
from abp.train.batching import Batcher
from abp.train.distributed import local_shard
from abp.train.glue import load_split
from abp.train.metrics import custom_metrics, evaluate_splits


def autocast_context(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """The precision of a forward on ``device``, in training and evaluation alike: bf16 autocast on CUDA when
    ``enabled`` (the ``autocast`` option), else the model's own dtypes."""
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def hard_masks(model: torch.nn.Module) -> Iterator[None]:
    """Forward with ``1[θ>0]`` (what a mask file holds) instead of σ(t_l·θ) inside the block."""
    saved = [(m, m.t_l) for _, m in masked_modules(model)]
    for m, _ in saved:
        m.t_l = None
    try:
        yield
    finally:
        for m, t in saved:
            m.t_l = t


def dev_batchers(dev_sets: dict[str, list], tokenizer, *, batch_size: int = 64, max_length: int = 128) -> dict:
    """One :class:`~abp.train.batching.Batcher` per dev split (tokenised once, reused at every eval)."""
    return {split: Batcher(ex, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=False)
            for split, ex in dev_sets.items()}


@dataclass(frozen=True)
class Gather:
    """How the processes of a run share one evaluation, so that each ends with every prediction.

    Process ``rank`` of ``world`` predicts batches ``rank, rank + world, ...`` (the same batches, padded the
    same way, as one process does), and ``all_gather(mine)`` returns every process's list of
    ``(batch index, predictions, labels)``. ``lockstep`` (FSDP: every forward is a collective) makes a process
    with fewer batches run discarded forwards until all have run as many.
    """

    rank: int
    world: int
    all_gather: Callable[[Any], list[Any]]
    lockstep: bool = False


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batchers: dict, *, task: Optional[str], num_labels: int,
                   autocast: bool = True, gather: Optional[Gather] = None) -> dict[str, float]:
    """Metrics of ``model`` (a :class:`~abp.train.heads.Classifier`) on each dev split, hard masks on.

    Keys follow :meth:`TaskSpec.metric_key` (MNLI: ``accuracy_matched``, ``accuracy_mismatched``). With
    ``gather`` the processes of a run share the batches and all get the same metrics.
    """
    outputs = predict(model, batchers, autocast=autocast, gather=gather)
    if task:
        return evaluate_splits(task, outputs)
    (p, y), = outputs.values()
    return custom_metrics(p, y, num_labels)


@torch.no_grad()
def predict(model: torch.nn.Module, batchers: dict, *, autocast: bool = True,
            gather: Optional[Gather] = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (predictions, labels)}`` in dev order, hard masks on (see :class:`Gather` for ``gather``)."""
    rank, world = (gather.rank, gather.world) if gather is not None else (0, 1)
    device = local_shard(next(model.parameters())).device
    amp = autocast_context(device, autocast)
    was_training = model.training
    model.eval()
    outputs = {}
    try:
        with hard_masks(model):
            for split, batcher in batchers.items():
                mine, spare = [], None
                for b, batch in enumerate(batcher.iter_batches(0)):
                    spare = spare if spare is not None else batch
                    if b % world != rank:
                        continue
                    labels = batch.pop("labels")
                    with amp:
                        preds = model(**{k: v.to(device) for k, v in batch.items()}).float().cpu()
                    mine.append((b, preds, labels))
                if gather is not None:
                    for _ in range(-(-len(batcher) // world) - len(mine) if gather.lockstep else 0):
                        spare.pop("labels", None)
                        with amp:
                            model(**{k: v.to(device) for k, v in spare.items()})
                    mine = sorted((x for part in gather.all_gather(mine) for x in part), key=lambda x: x[0])
                outputs[split] = (torch.cat([p for _, p, _ in mine]), torch.cat([y for _, _, y in mine]))
    finally:
        model.train(was_training)
    return outputs


def evaluate_mask_file(mask_path: str, *, model: Optional[str] = None, task: Optional[str] = None,
                       glue_dir: Optional[str] = None, batch_size: int = 64, max_length: Optional[int] = None,
                       device: str = "auto") -> dict:
    """Load a base model, apply a shipped task mask and its head, and evaluate on the task's dev set.

    ``model`` and ``max_length`` default to what the mask was trained with (recorded in the file).
    """
    import abp
    from abp.models import load_backbone
    from abp.train.heads import Classifier, make_head
    from abp.train.tasks import get_task
    from abp.train.devices import pick_device

    mf = abp.read_mask_file(mask_path)
    extra = mf.extra
    task = task or mf.metadata.get("task") or None
    if not task:
        raise ValueError(f"{mask_path} records no task: pass --task")
    if task == "custom":
        raise ValueError(f"{mask_path} was trained on custom data files (see its config: abp info {mask_path}); "
                         "pass --task to evaluate it on a GLUE task")
    spec = get_task(task)
    trained = extra.get("config", {})
    if model is None:
        model = trained.get("model")  # None = the embedded default
    max_length = max_length or trained.get("max_length", 128)
    backbone, tok = load_backbone(model)
    abp.load_mask(backbone, mask_path)
    c = backbone.config
    head = make_head(extra.get("head", "paper"), c.hidden_size, c.num_hidden_layers + 1, spec.num_labels,
                     pool=extra.get("head_pool", "cls"))
    head.load_state_dict(mf.head)
    clf = Classifier(backbone, head, spec.num_labels).to(pick_device(device))
    devs = {split: load_split(spec.name, split, glue_dir) for split in spec.dev_splits}
    batchers = dev_batchers(devs, tok, batch_size=batch_size, max_length=max_length)
    metrics = evaluate_model(clf, batchers, task=spec.name, num_labels=spec.num_labels)
    return {"task": spec.name, "sparsity": abp.sparsity(backbone), "metrics": metrics, "mask_file": str(mask_path)}
