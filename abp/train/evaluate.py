"""Dev-set evaluation with the hard mask, for the trainer and for shipped task-mask files."""
from __future__ import annotations

import contextlib
from contextlib import nullcontext
from typing import Iterator, Optional

import torch

from abp.patch import masked_modules
from abp.train import data as D
from abp.train import metrics as M


@contextlib.contextmanager
def hard_masks(model: torch.nn.Module) -> Iterator[None]:
    """Forward with ``1[θ>0]`` (what a mask file holds) instead of σ(t_l·θ) inside the block."""
    saved = [(m, m.t_hard) for _, m in masked_modules(model)]
    for m, _ in saved:
        m.t_hard = None
    try:
        yield
    finally:
        for m, t in saved:
            m.t_hard = t


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, tokenizer, dev_sets: dict[str, list], *, task: Optional[str],
                   num_labels: int, batch_size: int = 64, max_length: int = 128, autocast: bool = True) -> dict[str, float]:
    """Metrics of ``model`` (a :class:`~abp.train.heads.Classifier`) on each dev split.

    Splits other than the first-named get a suffix (MNLI: ``accuracy_matched``, ``accuracy_mismatched``).
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if (device.type == "cuda" and autocast) else nullcontext()
    results: dict[str, float] = {}
    try:
        with hard_masks(model):
            for split, examples in dev_sets.items():
                preds, labels = [], []
                for batch in D.iter_batches(examples, tokenizer, batch_size=batch_size, max_length=max_length,
                                            shuffle=False, seed=0, epoch=0):
                    labels.append(batch.pop("labels"))
                    with amp:
                        preds.append(model(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
                p, y = torch.cat(preds), torch.cat(labels)
                metrics = M.compute_metrics(task, p, y) if task else _custom_metrics(p, y, num_labels)
                suffix = "" if len(dev_sets) == 1 else "_" + split.replace("dev_", "")
                results.update({k + suffix: v for k, v in metrics.items()})
    finally:
        model.train(was_training)
    return results


def _custom_metrics(preds: torch.Tensor, labels: torch.Tensor, num_labels: int) -> dict[str, float]:
    if num_labels == 1:
        return {"pearson": M.pearson(preds.reshape(-1), labels.float()),
                "spearman": M.spearman(preds.reshape(-1), labels.float())}
    return {"accuracy": M.accuracy(preds.argmax(-1), labels)}


def evaluate_mask_file(mask_path: str, *, model: Optional[str] = None, task: Optional[str] = None,
                       glue_dir: Optional[str] = None, batch_size: int = 64, max_length: int = 128,
                       device: str = "auto") -> dict:
    """Load a base model, apply a shipped task mask and its head, and evaluate on the task's dev set."""
    import abp
    from abp.models import load_backbone
    from abp.train.heads import Classifier, make_head
    from abp.train.tasks import get_task
    from abp.train.trainer import pick_device

    mf = abp.read_mask_file(mask_path)
    extra = mf.extra
    task = task or mf.metadata.get("task") or None
    if not task:
        raise ValueError(f"{mask_path} records no task: pass --task")
    spec = get_task(task)
    if model is None:
        cfg_model = extra.get("config", {}).get("model")
        model = cfg_model  # None = the embedded default
    backbone, tok = load_backbone(model)
    abp.load_mask(backbone, mask_path)
    c = backbone.config
    head = make_head(extra.get("head", "paper"), c.hidden_size, c.num_hidden_layers + 1, spec.num_labels)
    head.load_state_dict(mf.head)
    clf = Classifier(backbone, head, spec.num_labels).to(pick_device(device))
    devs = {split: D.load_split(spec.name, split, glue_dir) for split in spec.dev_splits}
    metrics = evaluate_model(clf, tok, devs, task=spec.name, num_labels=spec.num_labels, batch_size=batch_size,
                             max_length=max_length)
    return {"task": spec.name, "sparsity": abp.sparsity(backbone), "metrics": metrics, "mask_file": str(mask_path)}
