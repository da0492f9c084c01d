"""The direct CPU search kernels, checked by a stand-alone harness, natively and under SIMDe.

``tests/csrc/simd_harness.cpp`` (no PyTorch) runs each direct kernel (AVX2, AVX-512 fp32, AVX512-BF16)
against a float64 brute force: odd dimensions, one and several panels, padded codes, duplicates
that must resolve to their first copy, NaN codes that must never win and an all-NaN row.

- natively (the kernels' own target attributes, the harness checking those the CPU runs);
- against SIMDe (``-DFASTVQ_SIMDE``, csrc/cpu/simd.h): the AVX-512 and AVX512-BF16 kernels as portable
  C++, so their layout, indexing and folding are checked on CPUs without those instruction sets
  too. SIMDe's ``vdpbf16ps`` rounds slightly differently from the hardware (see csrc/cpu/simd.h), so the
  emulation cannot prove the hardware's last bits; the search tests in test_cpp_backend.py run the
  real instructions where the CPU has them. Skipped (with the reason) where g++ or SIMDe's headers
  (Debian: ``apt-get install libsimde-dev``) are missing: then nothing here is proven.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU_SOURCES = ROOT / "csrc" / "cpu"
SOURCES = [ROOT / "tests" / "csrc" / "simd_harness.cpp", CPU_SOURCES / "search_avx2.cpp",
           CPU_SOURCES / "search_avx512.cpp"]
COMPILER = shutil.which("g++")
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
BUILDS = {
    "native": [],
    # -O1: SIMDe's AVX-512 emulation compiles several times faster than at -O3 and runs the tiny
    # cases in well under a second; -Wno-psabi: GCC's note on passing 64-byte vectors by value.
    "simde": ["-DFASTVQ_SIMDE", "-Wno-psabi"],
}

pytestmark = pytest.mark.skipif(COMPILER is None, reason="g++ is not installed, so the kernel harness cannot be built")


@pytest.mark.parametrize("build", list(BUILDS))
def test_direct_kernels_match_a_float64_brute_force(build, tmp_path):
    if build == "simde" and not SIMDE_HEADER.is_file():
        pytest.skip("SIMDe is not installed (apt-get install libsimde-dev): the AVX-512 kernels are not checked "
                    "on this CPU unless it runs them natively")
    executable = tmp_path / f"harness-{build}"
    result = subprocess.run([COMPILER, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", *BUILDS[build],
                             f"-I{CPU_SOURCES}", *map(str, SOURCES), "-o", str(executable)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"g++ failed to build the {build} harness:\n{result.stderr}"
    run = subprocess.run([str(executable)], capture_output=True, text=True, timeout=300)
    print(run.stdout)
    if run.returncode == 77:
        pytest.skip(f"built, not run: {run.stdout.strip()}")
    assert run.returncode == 0, run.stdout + run.stderr
    if build == "simde":
        assert {"avx2: checked", "avx512: checked", "avx512-bf16: checked"} <= set(run.stdout.splitlines())
