#!/usr/bin/env bash
# Builds fastvq._C with its CUDA kernels against a CUDA build of PyTorch, on a machine with the CUDA
# toolkit (nvcc) and no GPU, and checks what was built:
#
#   1. with nvcc made to fail (NVCC_APPEND_FLAGS): the build still gives fastvq._C with the C++ CPU
#      kernels, records why it has no CUDA kernels, and the CPU search is right;
#   2. the real build: fastvq._C holds the CUDA kernels (the CUDA dispatch key of each
#      torch.ops.fastvq_C op has a kernel) and sm_80 and sm_90 machine code (cuobjdump).
#
# Usage: scripts/build_cuda_extension.sh [VENV]   (default: $FASTVQ_CUDA_VENV or /work/venvs/cuda)
# The virtual environment is created if missing; PyTorch's CUDA wheels are about 5.5 GB. CI does not
# run this (its machine has no CUDA PyTorch); tests/backends/test_setup_fallback.py checks the fallback logic.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-${FASTVQ_CUDA_VENV:-/work/venvs/cuda}}"
TORCH_VERSION="${FASTVQ_CUDA_TORCH:-2.14.1}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"  # no GPU here to ask: name the targets
export MAX_JOBS="${MAX_JOBS:-2}"
BUILD_DIR="$(mktemp -d -t fastvq-cuda-build-XXXXXX)"
trap 'rm -rf "$BUILD_DIR"' EXIT

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q "torch==$TORCH_VERSION" numpy "setuptools>=70.1" ninja einops pillow tqdm
"$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else "torch in '"$VENV"' is not a CUDA build")'
# The toolkit's own folder (a wrapper script on PATH would make PyTorch look for headers beside it).
export CUDA_HOME="${CUDA_HOME:-$(ls -d /usr/local/cuda /usr/local/cuda-* 2>/dev/null | head -1)}"
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "no CUDA toolkit found (set CUDA_HOME)" >&2; exit 1; }
export PATH="$CUDA_HOME/bin:$PATH"

# A copy of the tracked files: an editable build here would put a second _C*.so into the checkout.
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$BUILD_DIR")
rm -f "$BUILD_DIR"/fastvq/_C.*.so "$BUILD_DIR"/fastvq/_build_status.json

build() {  # build [env assignments...]: installs the copy into the venv
  rm -rf "$BUILD_DIR/build"
  (cd "$BUILD_DIR" && env "$@" "$PY" -m pip install -q --no-build-isolation --no-deps --force-reinstall .)
}

check() {  # check cuda|cpu: what the installed fastvq._C holds
  (cd /tmp && "$PY" - "$1" <<'EOF'
import json, sys
import torch
import fastvq
from fastvq.backends import cpp
from fastvq.reference import nearest_code_ref

expect_cuda = sys.argv[1] == "cuda"
loaded, why = cpp.load()
assert loaded, f"fastvq._C did not load: {why}"
status = cpp.build_status()
print("build status:", json.dumps(status))
assert status["built"] and status["cuda"] is expect_cuda, status
for op in ("nearest_code", "segment_reduce"):
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvq_C::{op}", "CUDA")
    has_cpu = torch._C._dispatch_has_kernel_for_dispatch_key(f"fastvq_C::{op}", "CPU")
    print(f"fastvq_C::{op}: CPU kernel {has_cpu}, CUDA kernel {has_cuda}")
    assert has_cpu and has_cuda is expect_cuda
if not expect_cuda:
    assert "CUDA kernels failed" in status["cuda_failure"], status
z, codebook = torch.randn(300, 70), torch.randn(129, 70)
indices, distances = torch.ops.fastvq_C.nearest_code(z, codebook, "l2", False)[:2]
ref_indices, ref_distances, _ = nearest_code_ref(z, codebook)
assert torch.equal(indices, ref_indices), "the C++ CPU search disagrees with the reference"
print("CPU search matches the reference;", fastvq.__file__)
EOF
  )
}

echo "== 1. CUDA compile made to fail: fastvq._C must keep its C++ CPU kernels"
build NVCC_APPEND_FLAGS=--fastvq-no-such-flag
check cpu

echo "== 2. the CUDA build"
build FASTVQ_BUILD_CUDA=1
check cuda
SO="$(cd /tmp && "$PY" -c 'import fastvq._C as m; print(m.__file__)')"  # not the checkout's fastvq
# The toolkit's cuobjdump, else the one in a Triton wheel (this venv's, or the default python's).
CUOBJDUMP="$(command -v cuobjdump || true)"
for python in "$PY" python3; do
  [[ -n "$CUOBJDUMP" ]] && break
  CUOBJDUMP="$("$python" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null || true)"
done
[[ -x "$CUOBJDUMP" ]] || { echo "no cuobjdump (CUDA toolkit or Triton wheel) to read the machine code" >&2; exit 1; }
ARCHES="$("$CUOBJDUMP" --list-elf "$SO" | grep -o 'sm_[0-9]*' | sort -u | tr '\n' ' ')"
echo "machine code in $(basename "$SO"): $ARCHES"
[[ "$ARCHES" == *sm_80* && "$ARCHES" == *sm_90* ]] || { echo "missing sm_80 or sm_90 machine code" >&2; exit 1; }
echo "fastvq._C built with CUDA kernels for $TORCH_CUDA_ARCH_LIST against torch $TORCH_VERSION in $VENV"
