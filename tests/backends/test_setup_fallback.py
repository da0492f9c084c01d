"""setup.py: a CUDA compile that fails leaves fastvq._C with its C++ CPU kernels, not without fastvq._C.

setup.py runs here on a copy of itself in a scratch folder (so it records its status there), as
against a CUDA build of PyTorch with the CUDA toolkit present, with ``setuptools.setup`` captured and
the compile step (``BuildExtension.run``) replaced: it fails on CUDA sources, or on everything.
The real CUDA build is ``scripts/build_cuda_extension.sh``, which also checks this fallback with a
real failing nvcc.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import setuptools
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[2]


def _run_setup(tmp_path, monkeypatch, fail_on, cuda_mode="auto"):
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    (tmp_path / "fastvq").mkdir()
    captured, attempts = {}, []

    def fake_build(self):
        # As distutils' build_ext.run: it takes the compiler option (None here) and leaves its compiler.
        assert self.compiler is None, "a retried build must start from the compiler option, not a compiler"
        for extension in self.extensions:  # what setuptools' build_extension reads, set by finalize_options
            assert hasattr(extension, "_needs_stub") and hasattr(extension, "_file_name"), "extension not finalized"
            assert self.ext_map[extension._full_name] is extension
        self.compiler = object()
        sources = [source for extension in self.extensions for source in extension.sources]
        attempts.append(any(source.endswith(".cu") for source in sources))
        if fail_on == "all" or (fail_on == "cuda" and attempts[-1]):
            raise RuntimeError("nvcc exited with status 1" if attempts[-1] else "c++ exited with status 1")

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(cpp_extension.BuildExtension, "run", fake_build)
    monkeypatch.setenv("FASTVQ_BUILD_CUDA", cuda_mode)
    monkeypatch.setenv("FASTVQ_CPU_ARCH_FLAGS", "")
    runpy.run_path(str(tmp_path / "setup.py"), run_name="__main__")
    command = captured["cmdclass"]["build_ext"](setuptools.Distribution({"ext_modules": captured["ext_modules"]}))
    command.ensure_finalized()
    command.run()
    return attempts, json.loads((tmp_path / "fastvq" / "_build_status.json").read_text())


def test_a_failed_cuda_compile_still_builds_the_cpu_kernels(tmp_path, monkeypatch):
    attempts, status = _run_setup(tmp_path, monkeypatch, fail_on="cuda")
    assert attempts == [True, False]
    assert status["built"] is True and status["cuda"] is False
    assert "CUDA kernels failed" in status["cuda_failure"] and "nvcc" in status["cuda_failure"]


def test_a_cuda_build_that_works_records_it(tmp_path, monkeypatch):
    attempts, status = _run_setup(tmp_path, monkeypatch, fail_on="nothing")
    assert attempts == [True]
    assert status["built"] is True and status["cuda"] is True and "cuda_failure" not in status


def test_when_both_fail_fastvq_installs_without_the_extension(tmp_path, monkeypatch):
    attempts, status = _run_setup(tmp_path, monkeypatch, fail_on="all")
    assert attempts == [True, False]
    assert status["built"] is False
    assert "CUDA kernels failed" in status["reason"] and "CPU kernels failed" in status["reason"]


def test_required_cuda_build_fails_loudly(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="nvcc"):
        _run_setup(tmp_path, monkeypatch, fail_on="cuda", cuda_mode="1")
