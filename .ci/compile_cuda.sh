#!/usr/bin/env bash
# Compile-only check of abp's CUDA sources (csrc/*.cu) against a CUDA build of torch, on a machine
# with nvcc but no GPU. A compile error exits non-zero. Nothing is written into the checkout: the
# sources are copied to a scratch dir and built there.
#
#   bash .ci/compile_cuda.sh
#
# Environment:
#   ABP_CUDA_VENV   venv holding the CUDA torch (default /tmp/abp-cuda-venv; created if missing,
#                   reused when it already has a CUDA torch: creating it costs ~1 min and 5.5 GB
#                   when the wheels lie on local disk)
#   ABP_CUDA_TORCH  the torch requirement to install there (default torch==2.14.1, a CUDA 13 build)
#   ABP_CUDA_ARCHS  targets (default "80;90": sm_80, sm_90 and sm_90a)
#   ABP_CUDA_BUILD_DIR  build here and keep it (incremental rebuilds); default: a temp dir, removed
#   CUDA_HOME       toolkit root (default: the one holding `nvcc` on PATH, else /usr/local/cuda)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ABP_CUDA_VENV:-/tmp/abp-cuda-venv}
TORCH_REQ=${ABP_CUDA_TORCH:-torch==2.14.1}
export ABP_CUDA_ARCHS=${ABP_CUDA_ARCHS:-80;90}

now() { date +%s; }
t0=$(now)

if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null 2>&1; then  # may be a wrapper script: then set CUDA_HOME yourself
    CUDA_HOME=$(cd "$(dirname "$(readlink -f "$(command -v nvcc)")")/.." && pwd)
  else
    CUDA_HOME=/usr/local/cuda
  fi
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "compile_cuda: no nvcc under CUDA_HOME=$CUDA_HOME; cannot compile the CUDA sources" >&2
  exit 2
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
echo "compile_cuda: nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDA_HOME"

if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "compile_cuda: creating $VENV with $TORCH_REQ"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "$TORCH_REQ" ninja setuptools wheel
fi
"$VENV/bin/pip" install -q ninja setuptools wheel  # no-op when present
t1=$(now)
echo "compile_cuda: venv ready in $((t1 - t0)) s: $("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)')"

if [ -n "${ABP_CUDA_BUILD_DIR:-}" ]; then  # kept between runs: ninja then recompiles only what changed
  BUILD=$ABP_CUDA_BUILD_DIR
  mkdir -p "$BUILD"
else
  BUILD=$(mktemp -d /tmp/abp-cuda-build.XXXXXX)
  trap 'rm -rf "$BUILD"' EXIT
fi
mkdir -p "$BUILD/abp" "$BUILD/kernels" "$BUILD/csrc"
cp -p "$ROOT/setup.py" "$BUILD/"
cp -p "$ROOT"/csrc/* "$BUILD/csrc/"
touch "$BUILD/abp/__init__.py"

cd "$BUILD"
ABP_FORCE_CUDA_BUILD=1 ABP_REQUIRE_EXT=1 "$VENV/bin/python" setup.py build_ext --inplace
t2=$(now)
SO=$(ls "$BUILD"/abp/_C*.so)
echo "compile_cuda: built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in $((t2 - t1)) s"

# The expected GPU code must be inside, and the library must load and register CUDA kernels.
# Each embedded cubin carries its ptxas options ("-arch sm_90a -m 64"): read the targets from those
# (works where the toolkit has no cuobjdump, as on these machines).
CUBINS=$("$VENV/bin/python" -c '
import re, sys
print(" ".join(sorted({m.decode() for m in re.findall(rb"-arch (sm_[0-9]+a?) ", open(sys.argv[1], "rb").read())})))
' "$SO")
echo "compile_cuda: cubins: $CUBINS"
for want in $("$VENV/bin/python" - <<'EOF'
import os
for a in os.environ["ABP_CUDA_ARCHS"].replace(",", ";").split(";"):
    a = a.strip().split("+")[0].replace(".", "")
    if a:
        print(f"sm_{a}")
        if a == "90":
            print("sm_90a")
EOF
); do
  case " $CUBINS " in *" $want "*) ;; *) echo "compile_cuda: $want missing from $SO" >&2; exit 1 ;; esac
done
"$VENV/bin/python" - "$SO" "$ROOT/abp/_ext.py" <<'EOF'
import ast, importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("abp._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.WITH_CUDA == 1, "built without CUDA"
# every op abp/_ext.py lists (read without importing abp, which this venv does not have installed)
tree = ast.parse(open(sys.argv[2]).read())
ops = next(ast.literal_eval(n.value) for n in tree.body
           if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "OPS" for t in n.targets))
missing = [f"{op}/{key}" for op in ops for key in ("CPU", "CUDA")
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"abp_C::{op}", key)]
assert not missing, f"kernels not registered: {missing}"
print(f"compile_cuda: abp._C loads; {len(ops)} ops with CPU and CUDA kernels; archs {mod.CUDA_ARCHS}, "
      f"torch {mod.TORCH_VERSION}, CUDA {mod.CUDA_VERSION}")
EOF
echo "compile_cuda: OK in $(( $(now) - t0 )) s (venv $((t1 - t0)) s, compile $((t2 - t1)) s)"
