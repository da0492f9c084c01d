"""The CUDA C++ kernels in csrc/cuda compile with the installed nvcc alone.

The kernel files include no PyTorch header, so they compile on CI machines that have the CUDA
toolkit but neither a GPU nor a CUDA build of PyTorch: here for Hopper (sm_90) and for nvcc's
default architecture, with warnings as errors. The stand-alone harness (tests/csrc/cuda_harness.cu, a
float64 brute-force check of the search and both segment reductions, and of the search's issue-23
contracts: exact ties on an integer grid go to the lowest index, a cosine row with an Inf gets index 0)
is built too, and run where a GPU is present. Skipped only where nvcc is not installed. binding.cpp,
which includes PyTorch's CUDA headers, compiles only where a CUDA build of PyTorch is installed
(setup.py, FASTVQ_BUILD_CUDA).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
HARNESS = Path(__file__).resolve().parents[1] / "csrc" / "cuda_harness.cu"
KERNEL_SOURCES = sorted(CUDA_DIR.glob("*_kernels.cu"))
ARCHITECTURES = {"sm_90": ["-arch=sm_90"], "nvcc-default": []}


def _find_nvcc():
    candidates = [shutil.which("nvcc")]
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append(str(Path(os.environ[variable]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((path for path in candidates if path and Path(path).is_file()), None)


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed, so csrc/cuda cannot be compiled here")


def _nvcc(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([NVCC, "-std=c++17", "-O3", "--Werror", "all-warnings", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=CUDA_DIR)


def test_there_are_kernel_sources():
    assert {path.name for path in KERNEL_SOURCES} >= {"search_kernels.cu", "segment_reduce_kernels.cu"}


@pytest.mark.parametrize("source", [*KERNEL_SOURCES, CUDA_DIR / "kernels.h", CUDA_DIR / "common.cuh", HARNESS],
                         ids=lambda path: path.name)
def test_kernel_sources_include_no_pytorch_header(source):
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', source.read_text(), re.MULTILINE)
    torch_headers = [name for name in includes if name.split("/")[0] in ("torch", "ATen", "c10")]
    assert not torch_headers, f"{source.name} includes {torch_headers}"


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda path: path.name)
def test_kernel_source_compiles(source, architecture, tmp_path):
    result = _nvcc("-c", *ARCHITECTURES[architecture], source.name, "-o", str(tmp_path / f"{source.stem}.o"))
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    executable = tmp_path_factory.mktemp("cuda-harness") / "harness"
    sources = [str(HARNESS), *(path.name for path in KERNEL_SOURCES)]
    result = _nvcc(f"-I{CUDA_DIR}", *sources, "-o", str(executable))
    assert result.returncode == 0, f"nvcc failed to build the harness:\n{result.stderr}"
    return executable


def test_harness_builds(harness):
    assert harness.is_file() and os.access(harness, os.X_OK)


def test_harness_passes_on_a_gpu(harness):
    result = subprocess.run([str(harness)], capture_output=True, text=True, timeout=300)
    if result.returncode == 77:
        pytest.skip(f"built, not run: {result.stdout.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
