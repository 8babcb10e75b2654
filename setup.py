"""Build and install abp, with its compiled ops ``abp._C`` (C++ always, CUDA when present).

Install (recommended)::

    pip install torch            # first: the torch you will run abp with
    pip install --no-build-isolation -e .        # or: pip install --no-build-isolation .

Why ``--no-build-isolation``: ``abp._C`` links against torch's C++ ABI, so it must be compiled
against the very torch it will be loaded with. With build isolation pip would build it against a
fresh torch downloaded into a throwaway environment (several GB, and usually a different version:
the resulting ``_C`` would then fail to load). So ``pyproject.toml`` deliberately does *not* list
torch as a build requirement: an isolated build (plain ``pip install .``) finds no torch, prints
why, and installs abp without ``_C`` (the reference and Triton backends still work, and
``import abp`` says that ``_C`` is missing). Re-run with ``--no-build-isolation`` to get it.

The extension (one ``abp._C``, flash-attention style, from an explicit source list):
``csrc/abp_ops.cpp`` (op schemas + CPU implementations) always; ``csrc/*.cu`` (CUDA
implementations) when a CUDA build of torch, nvcc and a GPU are present. Environment switches:

- ``ABP_SKIP_CUDA_BUILD=1``   build the CPU ops only.
- ``ABP_FORCE_CUDA_BUILD=1``  build the CUDA ops even without a visible GPU (compile machines, CI);
  any build failure is then an error instead of a warning.
- ``ABP_CUDA_ARCHS``          ``;``-separated compute capabilities, default ``80;90``. ``90`` also
  emits ``sm_90a`` (Hopper-only instructions); an entry ``90a`` alone emits only that;
  a ``+PTX`` suffix (``90+PTX``) also embeds PTX for newer GPUs.
- ``ABP_REQUIRE_EXT=1``       fail the install when ``_C`` cannot be built (default: warn and
  install without it).
- ``MAX_JOBS``                parallel compile jobs; default: the CPU count, capped by available
  memory at one job per 6 GiB (nvcc with three targets is memory hungry).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CPP_SOURCES = [f"{CSRC}/abp_ops.cpp"]
CUDA_SOURCES = [f"{CSRC}/mask_ops.cu", f"{CSRC}/bitmask_linear.cu"]
GIB_PER_JOB = 6


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"abp setup: {msg}", file=sys.stderr, flush=True)


def _default_max_jobs() -> int:
    cpus = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return max(1, min(cpus, avail_kib // (GIB_PER_JOB * 1024 * 1024)))
    except (OSError, StopIteration, ValueError):
        return cpus


def _arch_flags(spec: str) -> tuple[list[str], str]:
    """nvcc -gencode flags for ``ABP_CUDA_ARCHS`` and a short tag naming the targets (e.g. sm80_sm90_sm90a)."""
    flags, tags = [], []
    for raw in (a.strip() for a in spec.replace(",", ";").split(";")):
        if not raw:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)(a?)(\+PTX)?", raw, flags=re.IGNORECASE)
        if not m:
            raise SystemExit(f"abp setup: bad entry {raw!r} in ABP_CUDA_ARCHS={spec!r} (use e.g. '80;90' or '90a')")
        cc, a, ptx = m.group(1) + m.group(2), m.group(3).lower(), bool(m.group(4))
        targets = [cc + a] if a else [cc] + (["90a"] if cc == "90" else [])
        for t in targets:
            flags.append(f"-gencode=arch=compute_{t},code=sm_{t}")
            tags.append(f"sm{t}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{targets[0]},code=compute_{targets[0]}")
            tags.append(f"ptx{targets[0]}")
    if not flags:
        raise SystemExit(f"abp setup: ABP_CUDA_ARCHS={spec!r} names no architecture")
    return flags, "_".join(tags)


def _nvcc_version(cuda_home: str) -> str | None:
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_skip_reason(torch, cuda_home) -> str | None:
    """Why the CUDA sources are not built here, or None when they are."""
    if _flag("ABP_SKIP_CUDA_BUILD"):
        return "ABP_SKIP_CUDA_BUILD=1"
    if getattr(torch.version, "hip", None):
        return f"torch {torch.__version__} is a ROCm build; abp's kernels are CUDA only"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    nvcc = _nvcc_version(cuda_home)
    if nvcc is None:
        return f"nvcc under CUDA_HOME={cuda_home} does not run"
    if nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"nvcc {nvcc} and torch's CUDA {torch.version.cuda} differ in major version"
    if not _flag("ABP_FORCE_CUDA_BUILD") and not torch.cuda.is_available():
        return "no GPU visible (set ABP_FORCE_CUDA_BUILD=1 to build the CUDA ops anyway)"
    return None


def _extensions():
    """(ext_modules, cmdclass) for abp._C, or ([], {}) with a one-line reason when it cannot be built."""
    required = _flag("ABP_REQUIRE_EXT") or _flag("ABP_FORCE_CUDA_BUILD")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        msg = ("abp._C not built: torch is not importable at build time (pip's build isolation?); "
               "install torch first, then `pip install --no-build-isolation .`")
        if required:
            raise SystemExit(msg)
        _say(msg)
        return [], {}
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and sys.platform != "win32":
        msg = f"abp._C not built: no C++ compiler ({cxx!r} not found); abp installs without it"
        if required:
            raise SystemExit(msg)
        _say(msg)
        return [], {}

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    # Stringified in C++ (abp._C.TORCH_VERSION): keep to characters that survive as preprocessor tokens.
    macros = [("ABP_TORCH_VERSION", re.sub(r"[^0-9A-Za-z.+_]", "_", torch.__version__))]
    # -ffp-contract=off: the score update must round like torch's separate kernels (no fused multiply-add).
    # -fno-math-errno: lets the Adam score update's loop use the vector square root (its results are the same:
    # IEEE sqrt either way; only errno on negative inputs differs, which nothing reads).
    cxx_flags = ["-O3"] if sys.platform == "win32" else ["-O3", "-ffp-contract=off", "-fno-math-errno"]
    skip = _cuda_skip_reason(torch, CUDA_HOME)
    if skip is None:
        gencode, tag = _arch_flags(os.environ.get("ABP_CUDA_ARCHS", "80;90"))
        macros += [("ABP_WITH_CUDA", "1"), ("ABP_CUDA_ARCHS", tag), ("ABP_CUDA_VERSION", torch.version.cuda)]
        ext = CUDAExtension(
            "abp._C", CPP_SOURCES + CUDA_SOURCES, define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", *gencode]},
        )
        _say(f"building abp._C with CUDA ops for {tag} (nvcc from {CUDA_HOME}, MAX_JOBS={os.environ['MAX_JOBS']})")
    else:
        ext = CppExtension("abp._C", CPP_SOURCES, define_macros=macros, extra_compile_args={"cxx": cxx_flags})
        _say(f"building abp._C with CPU ops only; CUDA ops skipped: {skip}")

    class Build(BuildExtension):
        """torch's BuildExtension (ninja); a failed build is a warning unless the extension is required."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001  (compiler errors surface as several exception types)
                if required:
                    raise
                _say(f"abp._C not built: the C++ build failed ({type(e).__name__}: {e}); abp installs without it "
                     "(set ABP_REQUIRE_EXT=1 to make this an error)")
                self.extensions = []  # so that the in-place copy and the wheel's file list do not look for it

    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="abp",
    version="0.1.0",
    description="Adapting pre-trained transformers by pruning: learnt binary masks with fused GPU kernels",
    packages=["abp", "abp.train", "abp.experiments", "abp.kernels"],
    package_dir={"abp": "abp", "abp.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        "transformers",
        "safetensors",
        "tqdm",
        "matplotlib",
        "numpy",
    ],
    extras_require={
        # scipy: the independent oracle for the GLUE metrics in tests/test_metrics.py; hypothesis: the fuzz tests
        # of the file readers (tests/test_fuzz_files.py)
        "dev": ["pytest", "pytest-benchmark", "datasets", "accelerate", "scipy", "hypothesis"],
        "test": ["pytest", "pytest-benchmark", "datasets", "accelerate", "scipy", "hypothesis"],
        "hub": ["datasets"],
    },
    entry_points={"console_scripts": ["abp = abp.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
