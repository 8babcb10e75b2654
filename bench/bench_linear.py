"""``linear_fwd`` and ``linear_fwd_bwd``: one masked linear layer, every implementation side by side.

Impls (same inputs, same shapes; bias present and frozen everywhere; scores fp32 at ~50 % sparsity):

- ``dense``: ``F.linear`` on the unmasked weight — cuBLAS, the floor. Its weight *requires grad*, so
  ``fwd_bwd`` computes dX **and** dW: that is the fair floor for a score gradient, because every masked
  impl computes dX and dθ, and dθ costs the same GEMM as dW (``dYᵀX``) plus an elementwise epilogue.
- ``eager``: what other tools do: ``W⊙M`` materialised, ``F.linear``, dense ``dW`` then the surrogate.
- ``compile``: ``torch.compile`` of ``eager`` (``max-autotune``, static shapes, on GPU; default mode on CPU).
  A compile failure is recorded as a skipped row with its reason. ``ABP_BENCH_COMPILE_MODE`` overrides the
  mode; ``ABP_BENCH_COMPILE_TOKENS`` (comma list or ``all``) picks the token counts that get a compile
  row (GPU default 4096 only, because every shape is autotuned anew).
- ``reference``: ``abp.masked_linear(..., backend="reference")`` (the oracle: materialises like eager).
- ``abp``: ``abp.masked_linear`` with the default backend choice (auto); the row says which one ran.
- ``abp_fused_update`` (``fwd_bwd`` only; its forward *is* ``abp``'s): the score SGD step runs inside the
  backward, so no dθ is returned at all.
- ``abp_v2`` / ``abp_v2_fused_update``: ``abp`` / ``abp_fused_update`` with the hard mask read as packed bits
  (``masked_linear(..., packed=...)``: the 1-bit kernels for the forward and dX), the bits packed from the
  scores inside every timed call, as a training step repacks them once after each score update. ``abp`` and
  ``abp_fused_update`` read the fp32 scores (the v1 kernels).
- ``abp_v2_a``: ``abp_v2`` with ``ABP_BITMASK_OPERAND=a``: the 1-bit kernels with the masked weight as the MMA's
  left operand, which Hopper's ``wgmma`` reads from registers (``kernels/bitmask_matmul.py``).

The forward is timed with autograd recording (a training forward); ``fwd_bwd`` uses
``torch.autograd.grad`` (no ``.grad`` accumulation). FLOPs: fwd ``2·M·N·K``, fwd_bwd ``3×`` that.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F

import abp

# (in, out) per model family; weight is [out, in] (nn.Linear layout).
GPU_SHAPES = {
    "bert-base": [(768, 768), (768, 3072), (3072, 768)],
    "bert-large": [(1024, 1024), (1024, 4096), (4096, 1024)],
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096)],
}
GPU_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_DTYPES = ("fp32", "bf16")
CPU_SHAPES = {"minilm": [(384, 384), (384, 1536), (1536, 384)]}
CPU_TOKENS = (64, 256)
QUICK_SHAPES = {"tiny": [(32, 48)]}
QUICK_TOKENS = (8,)

IMPLS = ("dense", "eager", "compile", "reference", "abp", "abp_v2", "abp_v2_a", "abp_fused_update",
         "abp_v2_fused_update")
OPERAND_A = {"abp_v2_a"}  # run with ABP_BITMASK_OPERAND=a
BENCHES = ("linear_fwd", "linear_fwd_bwd")
ABP_OPS = {"linear_fwd": ("masked_matmul",),
           "linear_fwd_bwd": ("masked_matmul", "masked_matmul_dx", "score_grad")}
FUSED_OPS = ("masked_matmul", "masked_matmul_dx", "score_grad_update_")
V2_OPS = {"linear_fwd": ("pack_mask", "masked_matmul_bits"),
          "linear_fwd_bwd": ("pack_mask", "masked_matmul_bits", "masked_matmul_bits_dx", "score_grad")}
V2_FUSED_OPS = ("pack_mask", "masked_matmul_bits", "masked_matmul_bits_dx", "score_grad_update_")


def _compile_tokens(grid: str, tokens: tuple[int, ...]) -> set[int]:
    env = os.environ.get("ABP_BENCH_COMPILE_TOKENS")
    if env:
        return set(tokens) if env.strip() == "all" else {int(t) for t in env.split(",") if t.strip()}
    return {4096} if grid == "gpu" else set(tokens)


def cases(grid: str) -> list[dict]:
    shapes, tokens, dtypes = {
        "gpu": (GPU_SHAPES, GPU_TOKENS, GPU_DTYPES),
        "cpu": (CPU_SHAPES, CPU_TOKENS, ("fp32",)),
        "quick": (QUICK_SHAPES, QUICK_TOKENS, ("fp32",)),
    }[grid]
    compiled = _compile_tokens(grid, tokens)
    out = []
    for bench in BENCHES:
        for dtype in dtypes:
            for family, pairs in shapes.items():
                for k, n in pairs:
                    for m in tokens:
                        for impl in IMPLS:
                            if impl.endswith("fused_update") and bench == "linear_fwd":
                                continue
                            if impl == "compile" and m not in compiled:
                                continue
                            out.append({"bench": bench, "impl": impl, "dtype": dtype, "family": family,
                                        "tokens": m, "in": k, "out": n,
                                        "shape": f"tokens={m},in={k},out={n}",
                                        "id": f"{bench}-{dtype}-t{m}-{k}x{n}-{impl}"})
    return out


# --------------------------------------------------------------------------- inputs

def _input_set(m: int, k: int, n: int, dtype: torch.dtype, device, dense: bool) -> SimpleNamespace:
    x = torch.randn(m, k, device=device, dtype=dtype).requires_grad_(True)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype).requires_grad_(dense)
    b = (0.1 * torch.randn(n, device=device)).to(dtype)
    scores = (0.01 * torch.randn(n, k, device=device)).requires_grad_(not dense)  # ~50 % pruned
    dy = torch.randn(m, n, device=device, dtype=dtype)
    return SimpleNamespace(x=x, w=w, b=b, scores=scores, dy=dy)


_COMPILED: dict[str, object] = {}


def compile_mode(device: torch.device) -> str:
    return os.environ.get("ABP_BENCH_COMPILE_MODE") or ("max-autotune" if device.type == "cuda" else "default")


def _compiled(eager, device):
    """One compiled wrapper per mode, static shapes (each shape is compiled/autotuned for itself)."""
    mode = compile_mode(device)
    if mode not in _COMPILED:
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):  # one graph per shape: never fall back to eager silently
                setattr(cfg, name, max(getattr(cfg, name), 4096))
        _COMPILED[mode] = torch.compile(eager, mode=mode, dynamic=False)
    return _COMPILED[mode]


def _forward(impl: str, eager, device):
    """``f(s)``: the layer's forward on input set ``s`` for ``impl``."""
    if impl == "dense":
        return lambda s: F.linear(s.x, s.w, s.b)
    if impl == "eager":
        return lambda s: eager(s.x, s.w, s.scores, s.b)
    if impl == "compile":
        c = _compiled(eager, device)
        return lambda s: c(s.x, s.w, s.scores, s.b)
    if impl == "reference":
        return lambda s: abp.masked_linear(s.x, s.w, s.scores, s.b, backend="reference")
    if impl == "abp":
        return lambda s: abp.masked_linear(s.x, s.w, s.scores, s.b)
    if impl == "abp_fused_update":
        return lambda s: abp.masked_linear(s.x, s.w, s.scores, s.b, fused_update=s.sgd, counts=s.counts)
    if impl in ("abp_v2", "abp_v2_a"):
        return lambda s: abp.masked_linear(s.x, s.w, s.scores, s.b, packed=abp.pack_mask(s.scores.detach() > 0))
    if impl == "abp_v2_fused_update":
        return lambda s: abp.masked_linear(s.x, s.w, s.scores, s.b, fused_update=s.sgd, counts=s.counts,
                                           packed=abp.pack_mask(s.scores.detach() > 0))
    raise ValueError(f"unknown impl {impl!r}")


def test_linear(case, harness, bench_fixture, eager_masked_linear_fn, monkeypatch):
    impl, bench = case["impl"], case["bench"]
    if impl in OPERAND_A:
        monkeypatch.setenv("ABP_BITMASK_OPERAND", "a")
    m, k, n = case["tokens"], case["in"], case["out"]
    dtype, device = harness.dtype(case["dtype"]), harness.device
    torch.manual_seed(0)
    per_set = (m * k + m * n + n * k + n) * dtype.itemsize + n * k * 4  # x, dy, weight, bias; fp32 scores
    sets = [_input_set(m, k, n, dtype, device, impl == "dense") for _ in range(harness.copies(per_set))]
    fused = impl in ("abp_fused_update", "abp_v2_fused_update")
    if fused:
        for s in sets:  # a tiny step: the mask stays ~50 % while the update does its full work
            s.sgd = abp.ScoreSGD(lr=1e-9, gamma=torch.zeros((), device=device), active=torch.ones((), device=device))
            s.counts = torch.zeros(2, dtype=torch.int64, device=device)
    rot = harness.rotation(sets)
    fwd = _forward(impl, eager_masked_linear_fn, device)

    if bench == "linear_fwd":
        def fn():
            fwd(rot())
    else:
        def wrt(s):
            if impl == "dense":
                return (s.x, s.w)
            return (s.x,) if fused else (s.x, s.scores)

        def fn():
            s = rot()
            torch.autograd.grad(fwd(s), wrt(s), s.dy)

    flops = 2.0 * m * n * k * (3 if bench == "linear_fwd_bwd" else 1)
    ops = {"abp_fused_update": FUSED_OPS, "abp_v2": V2_OPS[bench], "abp_v2_a": V2_OPS[bench],
           "abp_v2_fused_update": V2_FUSED_OPS}.get(impl, ABP_OPS[bench])
    if impl in ("reference", "abp", "abp_fused_update", "abp_v2", "abp_v2_a", "abp_v2_fused_update"):
        def backend():  # read after the timed calls: the backends those ops ran on
            return ",".join(sorted({abp.last_backend(op) or "?" for op in ops}))
    else:
        backend = "inductor" if impl == "compile" else "torch"
    extra = {"copies": len(sets)}
    if impl == "compile":
        extra["compile_mode"] = compile_mode(device)
    if impl in OPERAND_A:
        extra["masked_operand"] = "a"
    harness.run(case, bench_fixture, fn, flops=flops, backend=backend, extra=extra, may_fail=impl == "compile")

