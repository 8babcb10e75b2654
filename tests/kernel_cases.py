"""What the abp.kernels test files (test_triton_kernels.py, test_bitmask_kernels.py) share: where the
kernels run, the dtypes they are checked in, seeded random operands, the accuracy rule, and the re-run
in a fresh process. Importable because pyproject.toml puts tests/ on pytest's ``pythonpath``.

Without CUDA the kernels run in the Triton interpreter. Triton picks interpreter or compiler when a
function is decorated, i.e. at import, so ``TRITON_INTERPRET=1`` is set below *before* abp.kernels
(and so triton) is imported; it stays set for the rest of the pytest session. The test files take
abp.kernels from here (``K``) so that this order holds whatever order their imports are sorted in.
If triton was already imported earlier in this process without it (by another test module or a
conftest), the interpreter cannot work in this process: the kernel tests then skip with that reason
(:data:`needs_kernels`) and each file's ``test_interpreter_in_fresh_process``
(:data:`needs_fresh_process`, :func:`rerun_in_fresh_process`) re-runs that file in a new Python
process with the variable set from the start, so the checks still run and can still fail.

Accuracy rule (flash-attention style, :func:`assert_accurate`): the kernel's max error against the
float64 reference may be at most twice torch's own error in the same dtype plus two ulps (of the
output dtype) of the output's scale. Outputs are poisoned: every ``torch.empty`` returns NaNs during
a test (the ``poisoned_empty`` fixture of conftest.py), so an element a kernel fails to write shows
up as non-finite.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

import abp.kernels as K  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
KERNELS_OK, WHY = K.triton_available(DEVICE)
needs_kernels = pytest.mark.skipif(not KERNELS_OK, reason=WHY)
needs_fresh_process = pytest.mark.skipif(KERNELS_OK or CUDA, reason="the kernels run in this process")

# bf16 only on GPU: the interpreter has no bf16 arithmetic.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _gen(*key) -> torch.Generator:
    """A generator seeded from the test's parameters: random data, reproducible failures."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def randn(shape, dtype, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)


def scores_with_density(shape, density: float, gen) -> torch.Tensor:
    """fp32 scores, a fraction ``density`` of them > 0, the rest ≤ 0 with about 1/8 exactly 0."""
    mag = torch.rand(shape, generator=gen) * 2.0 + 0.05
    pos = torch.rand(shape, generator=gen) < density
    zero = torch.rand(shape, generator=gen) < 0.125
    return torch.where(pos, mag, torch.where(zero, torch.zeros(()), -mag)).to(DEVICE)


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


def shape_id(s):
    return "x".join(map(str, s))


def assert_accurate(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, what: str) -> None:
    """``|out − ref| ≤ 2·|torch_out − ref| + 2 ulps(out.dtype)·max|ref|`` (max over elements)."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (an output element left unwritten?)"
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    tol = 2 * torch_err + 2 * EPS[out.dtype] * ref.abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > tol {tol:.3g} (torch's own error {torch_err:.3g})"


def rerun_in_fresh_process(test_file: str) -> None:
    """Run the test file ``test_file`` in a new pytest process with ``TRITON_INTERPRET=1`` set from the
    start; it must pass, and run something."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--import-mode=importlib", "-q", "-p", "no:cacheprovider",
         str(Path(test_file).resolve())],
        cwd=repo, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
