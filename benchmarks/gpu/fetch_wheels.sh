#!/usr/bin/env bash
# Downloads the wheels the device run needs and the device image lacks into .whl/ (ignored by git):
# vector-quantize-pytorch 1.32.0, the baseline of bench_layers, and what it needs beyond the image's
# packages (einops, numpy, sympy and torch are there). All pure Python, for the device's Python 3.12.
#
# FAISS with cuVS does not travel: the device run may carry 64 MiB in all, and faiss-gpu-cu12 1.14.1
# (cp312, manylinux2014) alone is a 48.4 MB wheel (downloaded 2026-12-01 to check) that loads the CUDA
# 12 runtime and cuBLAS 12 from nvidia-cuda-runtime-cu12 and nvidia-cublas-cu12, which the image (CUDA
# 13) lacks; cuBLAS's wheel alone is far beyond the 15 MB that would be left. So the device run has
# no FAISS/cuVS rows: they stay owed.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d .whl \
  vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3 torch-einops-utils==0.2.0
ls -l .whl
du -sh .whl
