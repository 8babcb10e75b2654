"""How much of a classification task a frozen backbone's features hold: a linear probe fitted to convergence.

Every layer's mean over the tokens (embeddings output included) is computed once for ``--train-subsample`` training
examples and the whole dev set; an L2-regularised logistic regression (softmax for more classes) is fitted with
L-BFGS on the last layer's features and on all layers' concatenated, raw and standardised (training mean and std),
for each ``--weight-decay``; each fit's dev metrics go to ``--output`` (JSON). Feature extraction in the grid trains
the paper's head with AdamW for the grid's steps; this probe says what a linear read-out of the same frozen
features reaches when it is fitted as well as it can be, i.e. whether a task fails for the head or for the features.

    ABP_GLUE_DIR=../shared/data/glue python -P bench/linear_probe.py --task cola \\
        --output bench/results/paper/linear-probe-cola-all-MiniLM-L6-v2.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from abp._atomic import write_text
from abp.experiments.methods import model_label
from abp.models import load_backbone
from abp.train.glue import load_split
from abp.train.metrics import compute_metrics
from abp.train.tasks import get_task


@torch.no_grad()
def layer_means(model, tokenizer, examples, max_length: int, batch: int = 64) -> torch.Tensor:
    """``[n, layers + 1, hidden]``: each layer's mean over the non-padding tokens of each example."""
    out = []
    for i in tqdm(range(0, len(examples), batch), desc="features", leave=False):
        chunk = examples[i:i + batch]
        a = [e.text_a for e in chunk]
        b = [e.text_b for e in chunk] if chunk[0].text_b is not None else None
        enc = tokenizer(a, b, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        hidden = model(**enc, output_hidden_states=True).hidden_states
        m = enc["attention_mask"].unsqueeze(-1).float()
        out.append(torch.stack([(h * m).sum(1) / m.sum(1) for h in hidden], dim=1))
    return torch.cat(out)


def fit(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float, max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, mean cross-entropy + weight_decay·‖W‖², L-BFGS (strong Wolfe)."""
    w = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, help="a GLUE classification task (cola, sst2, mrpc, ...)")
    p.add_argument("--model", default=None, help="HF id or path (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--glue-dir", default=None)
    p.add_argument("--train-subsample", type=int, default=8000, help="training examples (the grid's subsample)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--weight-decay", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", required=True, help="JSON file for the results")
    args = p.parse_args(argv)

    spec = get_task(args.task)
    if spec.num_labels < 2:
        raise SystemExit(f"linear_probe: {spec.name} is a regression task; the probe fits classifiers only")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    model, tokenizer = load_backbone(args.model)
    model.eval()
    splits = {"train": load_split(spec, "train", args.glue_dir, max_examples=args.train_subsample),
              "dev": load_split(spec, "dev", args.glue_dir)}
    feats = {k: layer_means(model, tokenizer, ex, args.max_length).double() for k, ex in splits.items()}
    labels = {k: torch.tensor([int(e.label) for e in ex]) for k, ex in splits.items()}
    views = {"last layer": lambda f: f[:, -1], "all layers": lambda f: f.flatten(1)}
    fits = []
    for view, take in views.items():
        xtr, xdv = take(feats["train"]), take(feats["dev"])
        mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
        for standardised in (False, True):
            a, ad = ((xtr - mu) / sd, (xdv - mu) / sd) if standardised else (xtr, xdv)
            for wd in args.weight_decay:
                w, b = fit(a, labels["train"], spec.num_labels, wd, args.max_iter)
                metrics = compute_metrics(spec, (ad @ w + b).float(), labels["dev"])
                fits.append({"features": view, "standardised": standardised, "weight_decay": wd, "dev": metrics})
                print(f"{view:10s} standardised={standardised!s:5s} weight_decay={wd:g}: {metrics}", flush=True)
    majority = compute_metrics(spec, F.one_hot(torch.full_like(labels["dev"], int(labels["train"].mode().values)),
                                               spec.num_labels).float(), labels["dev"])
    doc = {"task": spec.name, "model": model_label(args.model), "train_examples": len(splits["train"]),
           "dev_examples": len(splits["dev"]), "max_length": args.max_length, "majority_class": majority,
           "fits": fits, "seconds": round(time.time() - t0, 1), "torch": torch.__version__}
    write_text(args.output, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
