"""Serving many tasks from one base model: requests per second and memory, against one dense copy per task.

Bench ``multitask_serve``: a batch of ``requests`` sequences of ``seq`` tokens (no padding), spread evenly over
``tasks`` tasks (1 / 4 / 16; the task of each request shuffled), each answered through its task's mask and head
(half the heads SST-2-like with 2 logits, half STS-B-like with 1 value). Masks are random (about half of each
tensor kept) over every linear layer and embedding table, as ``abp prune`` masks by default.

- ``abp``: :class:`abp.multitask.MultiTaskModel`: the base weights once and N packed masks; one backbone pass over
  the whole batch with :func:`abp.multi_bitmask_linear` in every linear (the row names the backend that ran),
  then each task's head on its rows.
- ``dense_per_task``: one fine-tuned dense copy per task (the mask baked into the weights, as
  :func:`abp.unmask_model` leaves it): the rows grouped by task, one forward of that task's copy per task present.

Besides the harness's fields a row holds ``requests_per_s`` (requests / median time), ``stored_mb`` (what the
impl keeps resident: base + packed masks + heads, or every dense copy + heads) and ``peak_mem_mb`` (the extra
memory one batch allocates, activations included). The GPU grid adds batches of 16 one-token requests: 16 tokens
per layer call, the regime where ``auto`` gives :func:`abp.multi_bitmask_linear` its CUDA kernel
(``abp.backends.SERVE_KERNEL_MAX_TOKENS``); longer batches take the Triton bit-mask GEMM (one launch over every
task present, ``abp.kernels.multi_bitmask_matmul``).

Measured on the 2-core CPU grid (MiniLM fp32, 16 requests × 32 tokens, 1 thread, load average 7–8 from other
jobs), for 1 / 4 / 16 tasks: ``abp`` 47.9 / 17.9 / 7.7 requests/s holding 90 / 100 / 139 MB, ``dense_per_task``
67.9 / 54.2 / 31.3 requests/s holding 87 / 349 / 1,395 MB. On CPU the reference materialises ``W⊙M`` for every task
present in every layer of every batch (about 3 ms for a 384×1536 weight, against about 1 ms for its 32-token GEMM),
so the dense copies win on speed and the packed masks on memory (10× less at 16 tasks).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

import abp
from abp.multitask import MultiTaskModel
from abp.train.heads import make_head

GRIDS = {  # models, dtypes, task counts, (requests per batch, tokens per request)
    "gpu": (("minilm", "bert-base"), ("bf16",), (1, 4, 16), ((64, 128), (16, 1))),
    "cpu": (("minilm",), ("fp32",), (1, 4, 16), ((16, 32),)),
    "quick": (("tiny",), ("fp32",), (1, 2), ((4, 8),)),
}
IMPLS = ("abp", "dense_per_task")


def cases(grid: str) -> list[dict]:
    models, dtypes, task_counts, batches = GRIDS[grid]
    out = []
    for dtype in dtypes:
        for model in models:
            for n in task_counts:
                for impl in IMPLS:
                    for requests, seq in batches:  # innermost: these cases share one build (_built)
                        shape = f"model={model},tasks={n},requests={requests},seq={seq}"
                        out.append({"bench": "multitask_serve", "impl": impl, "dtype": dtype, "shape": shape,
                                    "model": model, "tasks": n, "requests": requests, "seq": seq,
                                    "id": f"multitask_serve-{dtype}-{model}-r{requests}x{seq}-tasks{n}-{impl}"})
    return out


def _base(name: str) -> torch.nn.Module:
    """The base model in fp32 on CPU (random weights but for the embedded MiniLM: speed does not depend on them)."""
    import transformers as T

    if name == "minilm":
        from abp.models import load_backbone

        return load_backbone(None)[0].eval()
    torch.manual_seed(0)
    if name == "bert-base":
        return T.BertModel(T.BertConfig()).eval()
    cfg = T.BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=48, max_position_embeddings=64)
    return T.BertModel(cfg).eval()


def _tasks(base: torch.nn.Module, n: int):
    """Yield ``(masked model, head, num_labels)`` for each of ``n`` tasks (random masks, seeded per task)."""
    masked = abp.mask_model(copy.deepcopy(base))
    c = base.config
    for t in range(n):
        g = torch.Generator().manual_seed(1000 + t)
        with torch.no_grad():
            for _, m in abp.masked_modules(masked):
                m.scores.copy_(torch.randn(m.scores.shape, generator=g))
        labels = 2 if t % 2 == 0 else 1
        torch.manual_seed(t)
        head = make_head("paper", c.hidden_size, c.num_hidden_layers + 1, labels, pool="mean").eval()
        yield masked, head, labels


def _bytes(*modules: torch.nn.Module) -> int:
    seen, total = set(), 0
    for mod in modules:
        for t in list(mod.parameters()) + list(mod.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _build(case: dict, device, dtype, tmp_path):
    """``(call(s), stored bytes)`` for the case's impl."""
    base, n = _base(case["model"]), case["tasks"]
    if case["impl"] == "abp":
        files = {}
        for t, (masked, head, labels) in enumerate(_tasks(base, n)):
            files[f"task{t}"] = tmp_path / f"task{t}.safetensors"
            abp.save_mask(masked, files[f"task{t}"], head=head, task=f"task{t}",
                          metadata={"head": "paper", "head_pool": "mean", "num_labels": labels})
        mt = MultiTaskModel(base, files).to(device=device, dtype=dtype)

        def call(s):
            return mt(s.input_ids, s.attention_mask, tasks=s.tasks)
        return call, mt.memory_bytes()["total"]
    copies, heads = [], []
    for masked, head, _ in _tasks(base, n):
        copies.append(abp.unmask_model(copy.deepcopy(masked)).to(device=device, dtype=dtype).eval())
        heads.append(head.to(device=device, dtype=dtype))
    del base

    def call(s):
        out = {}
        for t in torch.unique(s.tasks).tolist():
            rows = (s.tasks == t).nonzero().squeeze(1)
            am = s.attention_mask.index_select(0, rows)
            hidden = copies[t](input_ids=s.input_ids.index_select(0, rows), attention_mask=am,
                               output_hidden_states=True).hidden_states
            out[t] = heads[t](hidden, am)
        return out
    return call, _bytes(*copies, *heads)


_BUILT: dict[tuple, tuple] = {}  # the last build, reused by the next case of the same model, tasks and impl


def _built(case: dict, device, dtype, tmp_path):
    key = (case["model"], case["tasks"], case["impl"], dtype, str(device))
    if key not in _BUILT:
        _BUILT.clear()  # one build resident at a time (16 dense bert-base copies are 3.5 GB in bf16)
        _BUILT[key] = _build(case, device, dtype, tmp_path)
    return _BUILT[key]


def _input_set(case: dict, vocab: int, device, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    r, seq = case["requests"], case["seq"]
    return SimpleNamespace(input_ids=torch.randint(0, vocab, (r, seq), generator=g).to(device),
                           attention_mask=torch.ones(r, seq, dtype=torch.long, device=device),
                           tasks=(torch.randperm(r, generator=g) % case["tasks"]).to(device))


def test_multitask(case, harness, bench_fixture, tmp_path):
    dtype, device = harness.dtype(case["dtype"]), harness.device
    call, stored = _built(case, device, dtype, tmp_path)
    vocab = {"tiny": 1000}.get(case["model"], 30522)
    per_set = case["requests"] * case["seq"] * 8 * 2
    sets = [_input_set(case, vocab, device, i) for i in range(harness.copies(per_set, lo=2, hi=4))]
    rot = harness.rotation(sets)
    backend = (lambda: abp.last_backend("multi_bitmask_linear")) if case["impl"] == "abp" else "torch"

    def fn():
        with torch.no_grad():
            call(rot())

    row = harness.run(case, bench_fixture, fn, backend=backend,
                      extra={"copies": len(sets), "stored_mb": stored / 2**20, "tasks": case["tasks"],
                             "requests": case["requests"], "seq": case["seq"]})
    row["requests_per_s"] = case["requests"] / (row["median_ms"] * 1e-3)
