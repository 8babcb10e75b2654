"""Where a masked linear's host time goes: the profile the GPU session writes beside its timings.

On an H200 (``bench/results/nvidia-h200``, ``kernels/NOTES.md``) abp's masked linear took 0.22–0.31 ms per
forward at BERT-base shapes whatever the token count, while cuBLAS did four times the work in 60 µs: the rows
measured the host path, not the kernels. This script says what that host time is, per implementation of one
training step of one layer (forward and backward, ``torch.autograd.grad``):

- ``wall``: host time per call without a sync, and ``synced``: with ``torch.cuda.synchronize()`` after each call
  (on CPU the two are the same); a host-bound call has ``wall`` ≈ ``synced``;
- ``syncs``: the host-device synchronisations one call makes, counted by ``torch.cuda.set_sync_debug_mode``
  (each stalls the host until the GPU drains: one per call would make every row host-bound);
- the Python functions with the most own time over the profiled calls (``cProfile``).

    python -P bench/host_profile.py [--out FILE] [--calls N] [--rehearse]

On CPU, or with ``--rehearse``, it runs a tiny shape in fp32 (the plumbing, for the test suite); on CUDA, 1,024
tokens through the BERT-base 768→3072 layer in bf16, the impls: the eager masked linear, abp v1 (fp32 scores),
abp v2 (packed bits) with the masked weight as the MMA's right operand and as its left (``ABP_BITMASK_OPERAND``).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
import warnings
from pathlib import Path

import torch

import abp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import eager_masked_linear  # noqa: E402  (the bench suite's eager masked linear)


def _inputs(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    t = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(device)  # noqa: E731
    return {"x": t(m, k).to(dtype).requires_grad_(), "w": t(n, k, scale=k ** -0.5).to(dtype),
            "scores": t(n, k, scale=0.01).requires_grad_(), "b": t(n, scale=0.1).to(dtype), "dy": t(m, n).to(dtype)}


def _impls(s: dict) -> dict:
    def step(forward):
        def call():
            torch.autograd.grad(forward(), (s["x"], s["scores"]), s["dy"])
        return call

    def v2():
        return abp.masked_linear(s["x"], s["w"], s["scores"], s["b"], packed=abp.pack_mask(s["scores"].detach() > 0))

    return {
        "eager": (step(lambda: eager_masked_linear(s["x"], s["w"], s["scores"], s["b"])), None),
        "abp_v1": (step(lambda: abp.masked_linear(s["x"], s["w"], s["scores"], s["b"])), None),
        "abp_v2": (step(v2), "b"),
        "abp_v2_a": (step(v2), "a"),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _per_call_us(fn, device: torch.device, calls: int, synced: bool) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
        if synced:
            _sync(device)
    _sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _count_syncs(fn, device: torch.device) -> int:
    """Synchronising CUDA calls in one call of ``fn`` (``torch.cuda.set_sync_debug_mode("warn")``); 0 on CPU."""
    if device.type != "cuda":
        return 0
    _sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def profile(device: torch.device, calls: int, rehearse: bool, top: int = 25) -> str:
    cuda = device.type == "cuda" and not rehearse
    m, k, n, dtype = (1024, 768, 3072, torch.bfloat16) if cuda else (8, 32, 48, torch.float32)
    s = _inputs(m, k, n, dtype, device)
    lines = [f"# host profile: masked linear fwd+bwd, tokens={m} in={k} out={n} {str(dtype).replace('torch.', '')} "
             f"on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}",
             "", "| impl | backends | wall µs/call | synced µs/call | syncs/call |", "|---|---|---|---|---|"]
    stats = []
    for name, (fn, operand) in _impls(s).items():
        if operand is not None:
            os.environ["ABP_BITMASK_OPERAND"] = operand
        try:
            for _ in range(5):  # compile, autotune, caches
                fn()
            wall = _per_call_us(fn, device, calls, synced=False)
            synced = _per_call_us(fn, device, calls, synced=True)
            syncs = _count_syncs(fn, device)
            ran = ",".join(sorted({v for k_, v in abp.last_backend().items()
                                   if k_.startswith(("masked_matmul", "score_grad", "pack"))})) if name != "eager" else "torch"
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(calls):
                fn()
            prof.disable()
            _sync(device)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
            stats.append(f"## {name}: top {top} functions by own time over {calls} calls\n\n```\n"
                         + out.getvalue().strip() + "\n```")
            lines.append(f"| {name} | {ran} | {wall:.1f} | {synced:.1f} | {syncs} |")
        except Exception as exc:  # one impl failing must not cost the others' figures
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | |")
        finally:
            os.environ.pop("ABP_BITMASK_OPERAND", None)
    return "\n".join(lines + [""] + stats) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the report here (default: stdout)")
    p.add_argument("--calls", type=int, default=200, help="timed and profiled calls per impl (default 200)")
    p.add_argument("--rehearse", action="store_true", help="tiny fp32 shape even on a GPU (the plumbing only)")
    ns = p.parse_args(argv)
    if ns.calls < 1:
        p.error("--calls must be at least 1")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = profile(device, ns.calls, ns.rehearse)
    if ns.out:
        ns.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
