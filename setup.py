"""fastvq: fused vector quantization for PyTorch (search + argmin + gather, STE, EMA) on Triton,
compiled C++/CUDA kernels (fastvq._C) and a memory-bounded PyTorch path.

Building fastvq._C needs the PyTorch it will run with, so build without pip's build isolation,
after installing torch (an isolated build environment would have to resolve torch itself, which on
PyPI means the multi-GB CUDA wheels)::

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

The build never makes the installation fail unless asked to: when the CUDA kernels fail to compile,
fastvq._C is built with its C++ CPU kernels alone; without torch at build time, without a C++
compiler, or when that compile fails too, fastvq installs without fastvq._C and runs on the PyTorch
path. ``fastvq.backends.backend_info()`` says which and why (setup.py records it in
``fastvq/_build_status.json``). ``scripts/build_cuda_extension.sh`` builds the CUDA kernels against a
CUDA build of PyTorch. Environment variables:

- ``FASTVQ_CPU_ARCH_FLAGS``: the host vector-instruction flags for the C++ kernels, default
  ``-march=native`` (dropped if the compiler rejects it); set it to ``""`` or e.g.
  ``-march=x86-64-v3`` for a binary that must run on other machines.
- ``FASTVQ_SIMDE=1`` (tests only): the AVX-512 search kernels are built against SIMDe's portable
  intrinsics (Debian: libsimde-dev), so that they run, slowly and emulated, on CPUs without
  AVX-512F / AVX512-BF16 and the test suite checks the whole search path with them there.
- ``FASTVQ_BUILD_CUDA=auto|0|1``: ``auto`` (default) adds the CUDA C++ kernels when PyTorch is a
  CUDA build and the CUDA toolkit (nvcc) is found; ``0`` never; ``1`` always, and fails the
  installation if that is impossible or the build fails.
"""

import json
import os
import shlex
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
PACKAGE_DIR = here / "fastvq"
STATUS_FILE = PACKAGE_DIR / "_build_status.json"
CPU_SOURCES = ["csrc/module.cpp", "csrc/cpu/search.cpp", "csrc/cpu/topk.cpp", "csrc/cpu/search_avx2.cpp",
               "csrc/cpu/search_avx512.cpp", "csrc/cpu/segment_reduce.cpp", "csrc/cpu/cpu_peak.cpp"]
CPU_SOURCES += ["csrc/cpu/residual_quantize.cpp"]
CPU_SOURCES += ["csrc/cpu/sinkhorn.cpp"]
CPU_SOURCES += ["csrc/cpu/soft_quantize.cpp"]
CPU_SOURCES += ["csrc/cpu/parallel.cpp"]
CUDA_SOURCES = ["csrc/cuda/search_kernels.cu", "csrc/cuda/segment_reduce_kernels.cu", "csrc/cuda/binding.cpp"]
DEFAULT_CPU_ARCH_FLAGS = "-march=native"


def write_status(**status) -> None:
    STATUS_FILE.write_text(json.dumps(status, indent=2) + "\n")


def remove_stale_extension() -> None:
    """A failed build must not leave an older fastvq._C behind, built from other sources."""
    for stale in PACKAGE_DIR.glob("_C.*"):
        if stale.suffix in (".so", ".pyd", ".dylib"):
            stale.unlink()


def compiler_accepts(flags: list[str], source: str = "int main() { return 0; }\n") -> bool:
    """Whether the C++ compiler that will build the extension compiles and links with ``flags``."""
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "probe.cpp"
        path.write_text(source)
        try:
            result = subprocess.run(
                [*compiler, *flags, str(path), "-o", str(Path(scratch) / "probe")], capture_output=True, timeout=120
            )
        except (OSError, subprocess.SubprocessError):
            return False
        return result.returncode == 0


OPENMP_PROBE = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"


def cpu_flags() -> tuple[list[str], list[str], dict]:
    """Compile flags, link flags and what was chosen, probed against the compiler."""
    arch_flags = shlex.split(os.environ.get("FASTVQ_CPU_ARCH_FLAGS", DEFAULT_CPU_ARCH_FLAGS))
    if arch_flags and not compiler_accepts(arch_flags):
        print(f"fastvq: the C++ compiler rejects {arch_flags}; building for its default target", file=sys.stderr)
        arch_flags = []
    # PyTorch's CPU wheels run ATen's parallel loops on OpenMP; at::parallel_for in the kernels
    # only spreads over threads when they are compiled with it too. At run time the extension
    # shares the libgomp.so.1 that torch has already loaded.
    openmp = compiler_accepts(["-fopenmp"], OPENMP_PROBE)
    compile_flags = ["-O3", *arch_flags] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []
    return compile_flags, link_flags, {"arch_flags": arch_flags, "openmp": openmp}


def cpu_sources() -> list[str]:
    if os.environ.get("FASTVQ_SIMDE", "0").strip() == "1":
        emulated = "csrc/cpu/search_avx512_simde.cpp"
        return [emulated if source == "csrc/cpu/search_avx512.cpp" else source for source in CPU_SOURCES]
    return CPU_SOURCES


def cuda_wanted(torch_module, cuda_home) -> bool:
    mode = os.environ.get("FASTVQ_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"FASTVQ_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    possible = torch_module.version.cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        missing = "a CUDA build of PyTorch" if torch_module.version.cuda is None else "the CUDA toolkit (nvcc)"
        raise SystemExit(f"FASTVQ_BUILD_CUDA=1 but {missing} was not found")
    return mode == "1" or (mode == "auto" and possible)


def extension_setup() -> dict:
    """``ext_modules`` and ``cmdclass`` for fastvq._C, or nothing (with the reason recorded)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as error:
        write_status(
            built=False,
            reason=(
                f"PyTorch was not importable while fastvq was built ({error}); pip's default build "
                "isolation builds in a fresh environment without it: install torch first, then "
                "pip install --no-build-isolation -e ."
            ),
        )
        remove_stale_extension()
        return {}

    compile_flags, link_flags, chosen = cpu_flags()
    with_cuda = cuda_wanted(torch, CUDA_HOME)
    status = {"built": True, "torch": torch.__version__, **chosen}
    # Tried in order: with the CUDA kernels (where wanted), then with the C++ CPU kernels alone, so a
    # CUDA compile that fails cannot take the CPU kernels down with it.
    plans = [
        (
            CppExtension(
                "fastvq._C", cpu_sources(), extra_compile_args={"cxx": compile_flags}, extra_link_args=link_flags
            ),
            {**status, "cuda": False},
        )
    ]
    if with_cuda:
        cuda_extension = CUDAExtension(
            "fastvq._C",
            cpu_sources() + CUDA_SOURCES,
            extra_compile_args={"cxx": compile_flags + ["-DFASTVQ_WITH_CUDA"], "nvcc": ["-O3", "-DFASTVQ_WITH_CUDA"]},
            extra_link_args=link_flags,
        )
        plans.insert(0, (cuda_extension, {**status, "cuda": True}))
    must_build = with_cuda and os.environ.get("FASTVQ_BUILD_CUDA", "auto").strip() == "1"

    class BuildOrFallBack(BuildExtension):
        """Builds fastvq._C, falling back from the CUDA build to the CPU one; if both fail, installs
        fastvq without it. What was built, and why not more, goes to _build_status.json."""

        def record(self, **build_status):
            write_status(**build_status)
            # A wheel build (not in place) copied the package before this ran: the status goes there too.
            if not self.inplace and self.build_lib:
                built = Path(self.build_lib) / "fastvq" / STATUS_FILE.name
                built.parent.mkdir(parents=True, exist_ok=True)
                built.write_text(STATUS_FILE.read_text())

        def run(self):
            failures = []
            # build_ext.run replaces the compiler option (a name, or None) by the compiler it made,
            # which a second run cannot take: each attempt starts from the option.
            compiler_option = self.compiler
            # finalize_options set its own attributes (_full_name, _file_name, _needs_stub, ...) on
            # the extension setup() was given only; a fallback of the same name takes them over.
            finalized = self.extensions[0]
            private = {name: value for name, value in vars(finalized).items() if name.startswith("_")}
            for extension, plan_status in plans:
                vars(extension).update(private)
                self.ext_map = {key: extension if value is finalized else value for key, value in self.ext_map.items()}
                finalized = extension
                self.extensions = [extension]
                self.compiler = compiler_option
                try:
                    super().run()
                except Exception as error:  # noqa: BLE001 - any failure means "try less", not "no fastvq"
                    if must_build:
                        raise
                    kind = "with its CUDA kernels" if plan_status["cuda"] else "with its C++ CPU kernels"
                    failures.append(f"building fastvq._C {kind} failed: {type(error).__name__}: {error}".strip())
                    print(traceback.format_exc(), file=sys.stderr)
                    print(f"fastvq: WARNING: {failures[-1]}", file=sys.stderr)
                    continue
                self.record(**plan_status, **({"cuda_failure": failures[0]} if failures else {}))
                return
            reason = "; ".join(failures)
            self.record(built=False, reason=reason, **chosen)
            remove_stale_extension()
            print("fastvq: installing without fastvq._C (the PyTorch path runs instead)", file=sys.stderr)

    return {"ext_modules": [plans[0][0]], "cmdclass": {"build_ext": BuildOrFallBack}}


# The package's metadata is in pyproject.toml; setup.py adds only the extension build.
setup(**extension_setup())
