"""``abp_step``: one full training step of a classifier (forward, backward, score update, head update).

Models: a BERT-base-sized ``BertModel(BertConfig())`` with random weights (timing does not need trained
ones) and the embedded all-MiniLM-L6-v2 (:func:`abp.models.load_backbone`), each under the paper's
layer-weighted [CLS] head (:func:`abp.train.heads.make_head` ``"paper"``, in a
:class:`~abp.train.heads.Classifier`), cross-entropy on 2 labels, random token ids, no padding.

Impls:

- ``abp``: :func:`abp.mask_model` (linear + embeddings, ~50 % random mask), scores stepped by
  :class:`~abp.train.score_optim.ScoreOptimizer` (fused into the backward on GPU, as the trainer does),
  head by AdamW; default backend and kernels (the row says which ran: on GPU the v2 kernels, forward and dX
  reading the packed hard mask, repacked after each step).
- ``abp_v1``: ``abp`` with every masked linear on the v1 kernels (forward and dX read the fp32 scores;
  ``MaskedLinear.train_bits = False``, as ``ABP_KERNELS=v1`` would set).
- ``abp_adam``: ``abp`` with Adam on the scores (:class:`ScoreOptimizer` ``optimizer="adam"``): never fused (its
  moments live outside the backward epilogue), so the score gradient is materialised and the step keeps two fp32
  moments per score (8 B per masked weight) on top; moments and score step in one multi-tensor op.
- ``abp_mix``: ``abp`` with abp's default score optimiser, ``adam_mix`` (Adam with each score's second moment
  ``v̂^(1−s)·mean(v̂)^s``): two multi-tensor ops, the moments with each tensor's sum of ``v̂`` (each score's step
  needs its tensor's mean), then the step.
- ``eager``: the same masked model with every ``MaskedLinear.forward`` replaced by the eager masked linear
  (``W⊙M`` materialised, dense ``dW``; fixture ``eager_masked_linear_fn`` of ``conftest.py``), scores stepped unfused by the
  same ScoreOptimizer.
- ``reference``: the same masked model on ``backend="reference"``, unfused.
- ``finetune``: plain fine-tuning, no mask: every weight trained by AdamW.
- ``frozen``: feature extraction: the backbone frozen, only the head trained (AdamW).

Precision as the trainer runs it: on GPU the frozen backbones (abp, eager, reference, frozen) are bf16 and
the step runs under bf16 autocast; ``finetune`` keeps fp32 master weights under the same autocast (AdamW on
bf16 weights would not be a fair fine-tuning baseline). On CPU everything is fp32.

Memory: ``peak_mem_mb`` is the transient peak of one step (activations, gradients, temporaries);
``state_mb`` what the step keeps between steps (weights, scores, buffers, optimizer state); ``total_mb``
their sum. ``x_dense`` in this bench is relative to ``finetune``.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import abp
from abp.train.heads import Classifier, make_head
from abp.train.score_optim import ScoreOptimizer

GRIDS = {  # models, (batch, seq) pairs
    "gpu": (("bert-base", "minilm"), ((8, 128), (32, 128), (8, 512))),
    "cpu": (("minilm",), ((2, 32), (8, 64))),
    "quick": (("tiny-bert",), ((2, 8),)),
}
IMPLS = ("abp", "abp_v1", "abp_adam", "abp_mix", "eager", "reference", "finetune", "frozen")
MASKED = ("abp", "abp_v1", "abp_adam", "abp_mix", "eager", "reference")
SCORE_OPTIMIZER = {"abp_adam": "adam", "abp_mix": "adam_mix"}  # every other masked impl: plain SGD
UNFUSED_OPS = ("masked_matmul", "masked_matmul_dx", "score_grad", "multi_score_update_")
FUSED_OPS = ("masked_matmul", "masked_matmul_dx", "score_grad_update_", "multi_score_update_")  # (embeddings: unfused)
BITS_OPS = ("pack_mask", "masked_matmul_bits", "masked_matmul_bits_dx")  # replace the first two where v2 ran
N_INPUTS = 4  # rotated input batches


def cases(grid: str) -> list[dict]:
    models, sizes = GRIDS[grid]
    dtype = "bf16" if grid == "gpu" else "fp32"
    return [{"bench": "abp_step", "impl": impl, "dtype": dtype, "model": model, "batch": b, "seq": t,
             "shape": f"model={model},batch={b},seq={t}", "id": f"abp_step-{model}-b{b}-s{t}-{impl}"}
            for model in models for b, t in sizes for impl in IMPLS]


def _backbone(name: str, dtype: torch.dtype):
    """``(model, pool)``: the backbone and the token pooling its head should use."""
    if name == "minilm":
        from abp.models import load_backbone, native_pooling

        model, _ = load_backbone(None, dtype=dtype)
        return model, native_pooling(None)
    from transformers import BertConfig, BertModel

    cfg = BertConfig() if name == "bert-base" else BertConfig(
        vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64)
    return BertModel(cfg).to(dtype), "cls"


def _eager_forward(eager):
    def forward(self, x):
        if self.t_l is not None or self.bias_scores is not None:
            raise ValueError("the eager baseline covers the hard mask without bias scores only")
        return eager(x, self.weight, self.scores, self.bias, self.t_s)
    return forward


def _state_mb(model: torch.nn.Module, *opts) -> float:
    """Bytes held between steps: parameters, buffers, any gradients left, optimizer state (unique storages)."""
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    for opt in opts:
        if opt is None:
            continue
        for st in (opt.state.values() if hasattr(opt, "state") and isinstance(opt.state, dict) else ()):
            tensors += [v for v in st.values() if isinstance(v, torch.Tensor)]
        for name in ("gamma", "active", "counts"):  # ScoreOptimizer's on-device bookkeeping
            v = getattr(opt, name, None)
            if isinstance(v, torch.Tensor):
                tensors.append(v)
        for pair in getattr(opt, "moments", ()):  # ScoreOptimizer's Adam moments
            tensors += list(pair)
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total / 2**20


def build(case: dict, device: torch.device, eager):
    """``(model, step, score_opt, head_opt)`` for the case."""
    impl, cuda = case["impl"], device.type == "cuda"
    wdtype = torch.bfloat16 if (cuda and impl != "finetune") else torch.float32
    torch.manual_seed(0)
    backbone, pool = _backbone(case["model"], wdtype)
    backbone.requires_grad_(impl == "finetune")
    if impl in MASKED:
        abp.mask_model(backbone)
        gen = torch.Generator().manual_seed(1)
        for _, m in abp.masked_modules(backbone):
            m.set_mask(torch.rand(m.scores.shape, generator=gen) < 0.5)  # ~50 % sparse: masks do real work
            if impl == "reference" and isinstance(m, abp.MaskedLinear):
                m.backend = "reference"
            if impl == "abp_v1" and isinstance(m, abp.MaskedLinear):
                m.train_bits = False
            if impl == "eager" and isinstance(m, abp.MaskedLinear):
                m.forward = types.MethodType(_eager_forward(eager), m)
    cfg = backbone.config
    head = make_head("paper", cfg.hidden_size, cfg.num_hidden_layers + 1, 2, pool=pool)
    model = Classifier(backbone, head, 2).to(device)
    model.train()
    score_opt = None
    if impl in MASKED:
        # fixed tiny γ and a far target: the step does its full work every time and never stops pruning
        score_opt = ScoreOptimizer(model, lr=1e-4, target_sparsity=0.99, prune_steps=10**6, gamma=1e-7,
                                   fused=(impl in ("abp", "abp_v1") and cuda),
                                   backend="reference" if impl == "reference" else None,
                                   optimizer=SCORE_OPTIMIZER.get(impl, "sgd"))
    trained = model.parameters() if impl == "finetune" else model.head.parameters()
    head_opt = torch.optim.AdamW([p for p in trained if p.requires_grad], lr=1e-4)

    gen = torch.Generator().manual_seed(2)
    b, t, vocab = case["batch"], case["seq"], cfg.vocab_size
    batches = [(torch.randint(0, vocab, (b, t), generator=gen).to(device),
                torch.randint(0, 2, (b,), generator=gen).to(device)) for _ in range(N_INPUTS)]
    attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step(rot):
        ids, labels = rot()
        with autocast:
            logits = model(input_ids=ids, attention_mask=attention_mask)
        F.cross_entropy(logits.float(), labels).backward()
        if score_opt is not None:
            score_opt.step()
        head_opt.step()
        head_opt.zero_grad(set_to_none=True)

    return model, step, batches, score_opt, head_opt


def test_step(case, harness, bench_fixture, eager_masked_linear_fn):
    try:
        import transformers  # noqa: F401  (the models come from it; missing on some GPU machines)

        if case["model"] == "minilm":
            from abp.models import resolve_model

            resolve_model(None)  # ABP_MODEL_DIR or the embedded model's folder; raises when neither exists
    except (ImportError, RuntimeError) as e:
        harness.skip(case, f"{type(e).__name__}: {e}")
    model, step, batches, score_opt, head_opt = build(case, harness.device, eager_masked_linear_fn)
    rot = harness.rotation(batches)

    def fn():
        step(rot)

    impl = case["impl"]
    if impl in ("abp", "abp_v1", "abp_adam", "abp_mix", "reference"):
        ops = FUSED_OPS if score_opt.fused else UNFUSED_OPS  # the abp ops one step of this impl runs
        if score_opt.optimizer == "adam":  # Adam's moments and the score step in one op
            ops = tuple("multi_score_adam_update_" if op == "multi_score_update_" else op for op in ops)
        if any(m._trains_from_bits(torch.empty(0, device=harness.device))
               for _, m in abp.masked_modules(model) if isinstance(m, abp.MaskedLinear)):
            ops = BITS_OPS + ops[2:]

        def backend():
            return ",".join(sorted({abp.last_backend(op) or "?" for op in ops}))
    else:
        backend = "torch"
    row = harness.run(case, bench_fixture, fn, backend=backend,
                      extra={"fused": bool(score_opt is not None and score_opt.fused),
                             "weights_dtype": str(next(model.backbone.parameters()).dtype).replace("torch.", ""),
                             "params_m": sum(p.numel() for p in model.parameters()) / 1e6})
    row["state_mb"] = _state_mb(model, score_opt, head_opt)
    row["total_mb"] = row["state_mb"] + (row["peak_mem_mb"] or 0.0)
