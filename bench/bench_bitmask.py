"""Serving with 1-bit masks: ``bitmask_linear`` (one task) and ``multi_bitmask_linear`` (many tasks per batch).

``bitmask_linear`` impls, for 1 / 4 / 16 tokens (decode-sized batches, where reading the weight dominates) and,
on GPU, 64 / 256 tokens, where the GEMV kernel and the bit-mask GEMM cross over:

- ``abp``: ``torch.ops.abp.bitmask_linear`` with the default backend (auto; the row says which ran — the
  compiled ``cuda``/``cpp`` op reads one bit per weight up to ``abp.backends.SERVE_KERNEL_MAX_TOKENS`` tokens,
  the Triton bit-mask GEMM past it, the ``reference`` fallback materialises).
- ``abp_gemv`` / ``abp_gemm`` (GPU): the same op on one backend at every token count, ``cuda`` (the GEMV /
  skinny-GEMM kernel of ``csrc/bitmask_linear.cu``) and ``triton`` (``abp.kernels.bitmask_matmul``, the kernel
  training's forward runs): the crossover that ``SERVE_KERNEL_MAX_TOKENS`` should sit at.
- ``abp_gemm_a`` (GPU): ``abp_gemm`` with ``ABP_BITMASK_OPERAND=a``, the masked weight as the MMA's left operand
  (on Hopper a 16-token tile still issues ``wgmma``; ``kernels/bitmask_matmul.py``).
- ``materialise``: unpack the bits, ``W⊙M``, ``F.linear`` (:func:`abp.reference.bitmask_linear`).
- ``dense``: ``F.linear`` on a pre-masked dense copy: the floor, at the price of one weight copy per task.

``multi_bitmask_linear``: one decode token for each of 2 / 8 / 32 tasks in one batch (task ids shuffled).
Impls ``abp`` (``torch.ops.abp.multi_bitmask_linear``), on GPU ``abp_gemm`` / ``abp_gemm_a`` (the same op pinned to
the Triton multi-task kernel, the masked weight as the MMA's right / left operand), ``materialise``
(:func:`abp.reference.multi_bitmask_linear`: one masked copy per task present) and ``dense_per_task``
(one pre-masked dense copy per task, rows grouped by task, one batched GEMM). ``stored_mb`` is what each
impl keeps resident: the base weight plus the packed masks, or one dense weight per task.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

import abp
from abp import reference

GPU_SHAPES = {"bert-base": [(768, 768), (768, 3072), (3072, 768)],
              "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)]}
CPU_SHAPES = {"minilm": [(384, 384), (384, 1536), (1536, 384)]}
QUICK_SHAPES = {"tiny": [(32, 48)]}
GRIDS = {  # shapes, dtypes, token counts, task counts, shapes for the multi-task variant
    "gpu": (GPU_SHAPES, ("bf16",), (1, 4, 16, 64, 256), (2, 8, 32), [(768, 3072), (4096, 11008)]),
    "cpu": (CPU_SHAPES, ("fp32",), (1, 4, 16), (2, 8), [(384, 1536)]),
    "quick": (QUICK_SHAPES, ("fp32",), (1, 4, 16), (2,), [(32, 48)]),
}
SINGLE_IMPLS = ("abp", "abp_gemv", "abp_gemm", "abp_gemm_a", "materialise", "dense")
GPU_ONLY = {"abp_gemv": "cuda", "abp_gemm": "triton", "abp_gemm_a": "triton"}  # impl -> the backend it pins
OPERAND_A = {"abp_gemm_a"}  # run with ABP_BITMASK_OPERAND=a
MULTI_IMPLS = ("abp", "abp_gemm", "abp_gemm_a", "materialise", "dense_per_task")


def cases(grid: str) -> list[dict]:
    shapes, dtypes, tokens, task_counts, multi_shapes = GRIDS[grid]
    out = []
    for dtype in dtypes:
        for pairs in shapes.values():
            for k, n in pairs:
                for m in tokens:
                    for impl in SINGLE_IMPLS:
                        if impl in GPU_ONLY and grid != "gpu":
                            continue
                        out.append({"bench": "bitmask_linear", "impl": impl, "dtype": dtype, "tokens": m, "tasks": 1,
                                    "in": k, "out": n, "shape": f"tokens={m},in={k},out={n}",
                                    "id": f"bitmask_linear-{dtype}-t{m}-{k}x{n}-{impl}"})
        for k, n in multi_shapes:
            for t in task_counts:
                for impl in MULTI_IMPLS:
                    if impl in GPU_ONLY and grid != "gpu":
                        continue
                    out.append({"bench": "multi_bitmask_linear", "impl": impl, "dtype": dtype, "tokens": t, "tasks": t,
                                "in": k, "out": n, "shape": f"tasks={t},tokens={t},in={k},out={n}",
                                "id": f"multi_bitmask_linear-{dtype}-tasks{t}-{k}x{n}-{impl}"})
    return out


def _input_set(case: dict, dtype: torch.dtype, device) -> SimpleNamespace:
    m, k, n, tasks = case["tokens"], case["in"], case["out"], case["tasks"]
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
    b = (0.1 * torch.randn(n, device=device)).to(dtype)
    masks = [torch.rand(n, k, device=device) < 0.5 for _ in range(tasks)]  # ~50 % kept
    s = SimpleNamespace(x=torch.randn(m, k, device=device, dtype=dtype), w=w, b=b)
    if case["impl"] in ("dense", "dense_per_task"):
        s.dense = torch.stack([w * mk.to(dtype) for mk in masks])  # [tasks, N, K]: one masked copy per task
    else:
        s.packed = torch.stack([abp.pack_mask(mk) for mk in masks])  # [tasks, ⌈N·K/8⌉] uint8
    if case["bench"] == "multi_bitmask_linear":
        s.task_ids = torch.randperm(m, device=device) % tasks  # one row per task, shuffled
        s.order = torch.argsort(s.task_ids, stable=True)      # rows grouped by task (dense_per_task)
    return s


def _call(case: dict):
    """``f(s)`` for the case's bench and impl."""
    impl, multi = case["impl"], case["bench"] == "multi_bitmask_linear"
    if not multi:
        return {
            "abp": lambda s: torch.ops.abp.bitmask_linear(s.x, s.w, s.packed[0], s.b, ""),
            "abp_gemv": lambda s: torch.ops.abp.bitmask_linear(s.x, s.w, s.packed[0], s.b, "cuda"),
            "abp_gemm": lambda s: torch.ops.abp.bitmask_linear(s.x, s.w, s.packed[0], s.b, "triton"),
            "abp_gemm_a": lambda s: torch.ops.abp.bitmask_linear(s.x, s.w, s.packed[0], s.b, "triton"),
            "materialise": lambda s: reference.bitmask_linear(s.x, s.w, s.packed[0], s.b),
            "dense": lambda s: F.linear(s.x, s.dense[0], s.b),
        }[impl]
    if impl == "dense_per_task":
        tasks = case["tasks"]

        def dense_per_task(s):
            xs = s.x[s.order].view(tasks, -1, s.x.shape[1])            # [T, rows per task, K]
            y = torch.baddbmm(s.b, xs, s.dense.transpose(1, 2))        # [T, rows per task, N]
            out = torch.empty_like(y.view(-1, y.shape[-1]))
            out[s.order] = y.view(-1, y.shape[-1])
            return out
        return dense_per_task
    return {
        "abp": lambda s: torch.ops.abp.multi_bitmask_linear(s.x, s.w, s.packed, s.task_ids, s.b, ""),
        "abp_gemm": lambda s: torch.ops.abp.multi_bitmask_linear(s.x, s.w, s.packed, s.task_ids, s.b, "triton"),
        "abp_gemm_a": lambda s: torch.ops.abp.multi_bitmask_linear(s.x, s.w, s.packed, s.task_ids, s.b, "triton"),
        "materialise": lambda s: reference.multi_bitmask_linear(s.x, s.w, s.packed, s.task_ids, s.b),
    }[impl]


def test_bitmask(case, harness, bench_fixture, monkeypatch):
    if case["impl"] in OPERAND_A:
        monkeypatch.setenv("ABP_BITMASK_OPERAND", "a")
    dtype, device = harness.dtype(case["dtype"]), harness.device
    m, k, n, tasks = case["tokens"], case["in"], case["out"], case["tasks"]
    torch.manual_seed(0)
    dense = case["impl"] in ("dense", "dense_per_task")
    stored = (n * k * dtype.itemsize * tasks) if dense else (n * k * dtype.itemsize + tasks * ((n * k + 7) // 8))
    per_set = stored + (m * k + n) * dtype.itemsize
    sets = [_input_set(case, dtype, device) for _ in range(harness.copies(per_set))]
    rot, call = harness.rotation(sets), _call(case)
    op = "multi_bitmask_linear" if case["bench"] == "multi_bitmask_linear" else "bitmask_linear"
    if case["impl"] in GPU_ONLY:
        ok, why = abp.backends.available(GPU_ONLY[case["impl"]], op, device)
        if not ok:
            harness.skip(case, why)
    backend = (lambda: abp.last_backend(op)) if case["impl"].startswith("abp") else (
        "reference" if case["impl"] == "materialise" else "torch")

    def fn():
        call(rot())

    harness.run(case, bench_fixture, fn, flops=2.0 * m * n * k, backend=backend,
                extra={"copies": len(sets), "stored_mb": stored / 2**20,
                       **({"masked_operand": "a"} if case["impl"] in OPERAND_A else {})})
