"""Dev-set evaluation with the hard mask, for the trainer and for shipped task-mask files."""
from __future__ import annotations

import contextlib
from contextlib import nullcontext
from typing import Iterator, Optional

import torch

from abp.patch import masked_modules
from abp.train.data import Batcher, load_split
from abp.train.metrics import custom_metrics, evaluate_splits


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
    """One :class:`~abp.train.data.Batcher` per dev split (tokenised once, reused at every eval)."""
    return {split: Batcher(ex, tokenizer, batch_size=batch_size, max_length=max_length, shuffle=False)
            for split, ex in dev_sets.items()}


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, batchers: dict, *, task: Optional[str], num_labels: int,
                   autocast: bool = True) -> dict[str, float]:
    """Metrics of ``model`` (a :class:`~abp.train.heads.Classifier`) on each dev split, hard masks on.

    Keys follow :meth:`TaskSpec.metric_key` (MNLI: ``accuracy_matched``, ``accuracy_mismatched``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and autocast) else nullcontext()
    outputs = {}
    try:
        with hard_masks(model):
            for split, batcher in batchers.items():
                preds, labels = [], []
                for batch in batcher.iter_batches(0):
                    labels.append(batch.pop("labels"))
                    with amp:
                        preds.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
                outputs[split] = (torch.cat(preds), torch.cat(labels))
    finally:
        model.train(was_training)
    if task:
        return evaluate_splits(task, outputs)
    (p, y), = outputs.values()
    return custom_metrics(p, y, num_labels)


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
