"""The compiled CPU backend, ``fastvq._C``: what the shared parity suite does not already cover.

Every contract and parity test runs on ``cpp`` through the ``backend`` fixture (tests/_backends.py
adds it wherever fastvq._C loads), including ``opcheck`` of the public operators. This file adds
the extension's own concerns: that it was built (CI sets ``FASTVQ_REQUIRE_C=1`` so a failed build
fails the run instead of quietly testing less), ``backend_info`` and the fallback when it is
missing, ``opcheck`` of the ``torch.ops.fastvq_C`` operators themselves, every CPU search kernel
the CPU runs (AVX512-BF16, AVX-512 and AVX2 direct kernels, the BLAS tiles), ties across their
tiles, lanes and codebook segments, the bf16 kernel against the fp32 search of the same values,
results that do not depend on the number of threads, float64, and memory: beyond one row tile and one score tile per
thread, the search adds only an fp32 copy of the codebook, whatever N and K.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _backends import CPP_MISSING_REASON, HAS_CPP
from _parity import METRICS, assert_search_parity

import fastvq
from fastvq import backends, reference
from fastvq.backends import cpp
from fastvq.backends.torch import segment_reduce as torch_segment_reduce

ROOT = Path(__file__).resolve().parents[2]
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"fastvq._C is not available: {CPP_MISSING_REASON}")


def test_the_extension_is_built():
    if HAS_CPP:
        return
    message = f"fastvq._C is not available, so the cpp backend is not tested: {CPP_MISSING_REASON}"
    if os.environ.get("FASTVQ_REQUIRE_C") == "1":
        pytest.fail(message)
    pytest.skip(message)


# --------------------------------------------------------------------------- dispatch and backend_info


@needs_cpp
def test_auto_sends_cpu_tensors_to_cpp(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "auto")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert backends.select_backend(torch.empty(0), dtype) == "cpp"
    info = backends.backend_info()
    assert info["selected"]["cpu"] == "cpp"
    assert info["compiled"]["available"] and info["compiled"]["reason"] is None
    assert info["compiled"]["build"]["openmp"] in (True, False)
    json.dumps(info)  # the CLI prints it as JSON


def test_missing_extension_falls_back_and_says_why(monkeypatch):
    reason = "building fastvq._C failed: no compiler"
    monkeypatch.setattr(cpp, "load", lambda: (False, reason))
    monkeypatch.setenv("FASTVQ_BACKEND", "auto")
    assert backends.select_backend(torch.empty(0), torch.float32) == "torch"
    info = backends.backend_info()
    assert info["selected"]["cpu"] == "torch"
    assert info["compiled"] == {"available": False, "reason": reason, "cuda_kernels": False,
                                "build": cpp.build_status()}
    indices, _ = fastvq.nearest_code(torch.randn(5, 3), torch.randn(4, 3))
    assert indices.shape == (5,)
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match=r"FASTVQ_BACKEND=cpp needs the compiled extension fastvq._C: building"):
        fastvq.nearest_code(torch.randn(5, 3), torch.randn(4, 3))
    assert "error: FASTVQ_BACKEND=cpp needs" in backends.backend_info()["selected"]["cpu"]


@needs_cpp
def test_cpp_backend_refuses_other_devices(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match=r"FASTVQ_BACKEND=cpp runs on cpu tensors, got cuda tensors"):
        backends.backend_for("cuda", torch.float32)


@needs_cpp
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's message")
def test_cuda_backend_without_cuda_kernels_says_what_is_missing(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"needs fastvq._C built with its CUDA kernels"):
        backends.backend_for("cuda", torch.float32)


# --------------------------------------------------------------------------- the fastvq_C operators


@needs_cpp
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("return_codes", [False, True])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                    (torch.float64, torch.float32)], ids=["fp32", "bf16-fp16", "fp64-fp32"])
def test_nearest_code_kernel_opcheck(metric, return_codes, dtypes):
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(19, 18, generator=generator).to(dtypes[0])
    codebook = torch.randn(21, 18, generator=generator).to(dtypes[1])
    torch.library.opcheck(torch.ops.fastvq_C.nearest_code.default, (z, codebook, metric, return_codes))


@needs_cpp
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_segment_reduce_kernel_opcheck(dtype, index_dtype):
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(19, 18, generator=generator).to(dtype)
    indices = torch.randint(-1, 8, (19,), generator=generator).to(index_dtype)
    torch.library.opcheck(torch.ops.fastvq_C.segment_reduce.default, (values, indices, 7, False))


# --------------------------------------------------------------------------- kernels, tiles, lanes and threads


CPU_KERNELS = ("auto", "avx512-bf16", "avx512", "avx2", "blas")


def _kernels_taken(choice: str) -> dict:
    """The kernel each dtype takes under ``FASTVQ_CPU_SEARCH=choice``, or {} where it cannot run."""
    previous = os.environ.get("FASTVQ_CPU_SEARCH")
    os.environ["FASTVQ_CPU_SEARCH"] = choice
    try:
        return json.loads(torch.ops.fastvq_C.cpu_search_kernels())
    except ValueError:
        return {}
    finally:
        if previous is None:
            del os.environ["FASTVQ_CPU_SEARCH"]
        else:
            os.environ["FASTVQ_CPU_SEARCH"] = previous


@pytest.fixture(params=CPU_KERNELS)
def cpu_search(request, monkeypatch):
    """Runs a test on the kernels this CPU gets (``auto``) and again on every other kernel it runs
    (``FASTVQ_CPU_SEARCH``): the bf16 and fp32 AVX-512 kernels, the AVX2 one, the BLAS tiles. A
    choice that takes the same kernels as ``auto`` for every dtype is skipped as a repeat."""
    if not HAS_CPP:
        pytest.skip(f"fastvq._C is not available: {CPP_MISSING_REASON}")
    taken = _kernels_taken(request.param)
    if not taken:
        pytest.skip(f"this CPU does not run FASTVQ_CPU_SEARCH={request.param}")
    if request.param != "auto" and taken == _kernels_taken("auto"):
        pytest.skip(f"FASTVQ_CPU_SEARCH={request.param} takes the same kernels as auto here")
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    monkeypatch.setenv("FASTVQ_CPU_SEARCH", request.param)
    return request.param


@needs_cpp
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 31, 5), (300, 129, 70), (1000, 2100, 33)],
                         ids=lambda shape: "N{}-K{}-D{}".format(*shape))
def test_both_cpu_kernels_match_the_reference(cpu_search, shape, dtype, metric):
    """Ragged row tiles (14 rows), panels (32 codes) and BLAS tiles (2048 codes), a NaN code, an
    all-NaN row and, for l2, data far from the origin (the centring's case)."""
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(12)
    shift = 300.0 if metric == "l2" else 0.0
    z = torch.randn(num_rows, dim, generator=generator) + shift
    codebook = torch.randn(num_codes, dim, generator=generator) + shift
    if num_codes > 3:
        codebook[num_codes // 2] = float("nan")
    if num_rows > 3:
        z[num_rows // 3] = float("nan")
    z, codebook = z.to(dtype), codebook.to(dtype)
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert_search_parity(z, codebook, metric, indices, distances, codes)


@needs_cpp
@pytest.mark.parametrize("metric", METRICS)
def test_ties_across_code_tiles_and_lanes_go_to_the_lowest_index(cpu_search, metric):
    """Duplicates in different BLAS tiles and panels, in the two halves of a panel that share a
    lane, in the same lane of consecutive panels, in neighbouring lanes and in the ragged last tile:
    every row must get the first copy of its code."""
    generator = torch.Generator().manual_seed(7)
    num_codes, dim = 2500, 24
    codebook = 0.1 * torch.randn(num_codes, dim, generator=generator)
    groups = [(5, 700, 2400), (17, 18, 2499), (511, 512, 2048), (600, 2100), (40, 56), (3, 35)]
    targets = 3.0 * torch.nn.functional.normalize(torch.randn(len(groups), dim, generator=generator), dim=1)
    for group, positions in enumerate(groups):
        codebook[list(positions)] = targets[group]
    group_of_row = torch.arange(300) % len(groups)
    z = targets[group_of_row] + 0.01 * torch.randn(300, dim, generator=generator)
    indices, _ = fastvq.nearest_code(z, codebook, metric=metric)
    expected = torch.tensor([groups[group][0] for group in group_of_row.tolist()])
    assert torch.equal(indices, expected), (indices != expected).nonzero().flatten().tolist()


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_results_do_not_depend_on_the_number_of_threads(cpu_search, dtype, metric):
    generator = torch.Generator().manual_seed(8)
    z = torch.randn(3000, 40, generator=generator).to(dtype)
    codebook = torch.randn(700, 40, generator=generator).to(dtype)
    indices = torch.randint(-2, 700, (3000,), generator=generator)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append((fastvq.nearest_code(z, codebook, metric=metric, return_codes=True),
                            fastvq.segment_reduce(z, indices, 700)))
    finally:
        torch.set_num_threads(threads)
    (search_one, segment_one), (search_many, segment_many) = results
    for got, want in zip(search_many + segment_many, search_one + segment_one):
        assert torch.equal(got, want)


@needs_cpp
@pytest.mark.parametrize("metric", METRICS)
def test_few_rows_split_the_codebook_and_keep_the_first_copy(cpu_search, metric):
    """Five rows cannot keep two threads busy, so the 20 000 codes are split into segments (their
    number depends on the thread count) whose partial minima are merged: copies of a code in
    different segments still resolve to the first, and the result does not depend on the threads."""
    generator = torch.Generator().manual_seed(10)
    num_codes, dim = 20_000, 9
    codebook = torch.randn(num_codes, dim, generator=generator)
    copies = [(3, 9_000, 19_999), (1_100, 15_000)]
    for positions in copies:
        codebook[list(positions)] = 20.0 * torch.nn.functional.normalize(codebook[positions[0]], dim=0)
    z = torch.stack([codebook[3], codebook[1_100], *torch.randn(3, dim, generator=generator)])
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, max(2, threads)):
            torch.set_num_threads(count)
            results.append(fastvq.nearest_code(z, codebook, metric=metric, return_codes=True))
    finally:
        torch.set_num_threads(threads)
    for got, want in zip(results[1], results[0]):
        assert torch.equal(got, want)
    indices, distances, codes = results[0]
    assert indices[:2].tolist() == [3, 1_100]
    assert_search_parity(z, codebook, metric, indices, distances, codes)


BF16_KERNEL = HAS_CPP and _kernels_taken("auto").get("bf16") == "avx512bf16-direct"


@pytest.mark.skipif(not BF16_KERNEL, reason="this CPU has no AVX512-BF16, so the bf16 search kernel does not run "
                    "here (tests/backends/test_simd_kernels.py checks it under SIMDe emulation)")
@pytest.mark.parametrize("metric, shift", [*((metric, 0.0) for metric in METRICS), ("l2", 300.0)],
                         ids=[*METRICS, "l2-far"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (13, 31, 5), (300, 129, 70), (1000, 2100, 33)],
                         ids=lambda shape: "N{}-K{}-D{}".format(*shape))
def test_bf16_kernel_chooses_the_codes_of_the_fp32_search(monkeypatch, shape, shift, metric):
    """bf16 z and codebook on the vdpbf16ps kernel, held to the fp32 contract against the same values
    widened to fp32: products of bf16 values are exact and accumulate in fp32. Far from the origin
    l2 must still hold it (there the search widens to fp32: the uncentred form would cancel; the
    contract's far-from-the-origin case is l2's, whose distances do not change with the shift)."""
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    num_rows, num_codes, dim = shape
    generator = torch.Generator().manual_seed(13)
    z = (torch.randn(num_rows, dim, generator=generator) + shift).bfloat16()
    codebook = (torch.randn(num_codes, dim, generator=generator) + shift).bfloat16()
    if num_codes > 3:
        codebook[num_codes // 2] = float("nan")
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert codes.dtype == torch.bfloat16
    assert_search_parity(z.float(), codebook.float(), metric, indices, distances, codes.float())


@needs_cpp
def test_segment_reduce_adds_in_row_order_like_index_add(monkeypatch):
    """Each code's rows are summed in row order: bit for bit what the PyTorch path's index_add_ gives."""
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    generator = torch.Generator().manual_seed(9)
    values = torch.randn(5000, 33, generator=generator) * torch.logspace(-3, 3, 33)
    indices = torch.randint(0, 50, (5000,), generator=generator)
    counts, sums = fastvq.segment_reduce(values, indices, 50)
    expected_counts, expected_sums = torch_segment_reduce.segment_reduce(values, indices, 50, True)
    assert torch.equal(counts, expected_counts) and torch.equal(sums, expected_sums)


@needs_cpp
@pytest.mark.parametrize("metric", METRICS)
def test_float64_is_searched_in_float64(monkeypatch, metric):
    monkeypatch.setenv("FASTVQ_BACKEND", "cpp")
    generator = torch.Generator().manual_seed(10)
    z = torch.randn(300, 70, generator=generator, dtype=torch.float64) + 1e4
    codebook = torch.randn(129, 70, generator=generator, dtype=torch.float64) + 1e4
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert codes.dtype == torch.float64
    assert_search_parity(z, codebook, metric, indices, distances, codes)
    expected, _, _ = reference.nearest_code_ref(z, codebook, metric)
    assert torch.equal(indices, expected)


@needs_cpp
def test_sampling_runs_the_pytorch_path(monkeypatch):
    generator = torch.Generator().manual_seed(11)
    z, codebook = torch.randn(200, 16, generator=generator), torch.randn(64, 16, generator=generator)
    seed = torch.tensor(1234)
    results = []
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("FASTVQ_BACKEND", backend)
        results.append(fastvq.nearest_code(z, codebook, sample_temperature=0.5, seed=seed, return_codes=True))
    for got, want in zip(*results):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- memory

_MEMORY_PROBE = textwrap.dedent(
    """
    import contextlib, json, os, re, sys
    os.environ["FASTVQ_BACKEND"] = "cpp"
    import torch, fastvq
    num_rows, num_codes, dim = (int(v) for v in sys.argv[1:4])

    def high_water_mark():
        status = open("/proc/self/status").read()
        return int(re.search(r"^VmHWM:\\s+(\\d+) kB", status, re.MULTILINE).group(1)) * 1024

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(num_rows, dim, generator=generator)
    codebook = torch.randn(num_codes, dim, generator=generator)
    fastvq.nearest_code(z[:1024], codebook[:2048])  # thread pool and BLAS buffers, outside the window
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = high_water_mark()
    indices, distances = fastvq.nearest_code(z, codebook)
    growth = high_water_mark() - before
    rows = torch.arange(0, num_rows, max(1, num_rows // 64))
    exact = torch.cdist(z[rows].double(), codebook.double()).square().min(dim=1).values
    chosen = (z[rows].double() - codebook[indices[rows]].double()).square().sum(dim=1)
    print(json.dumps({"growth": growth, "threads": torch.get_num_threads(),
                      "max_excess": float((chosen - exact).abs().max())}))
    """
)

# One row tile plus one score tile per thread (csrc/cpu/search_common.h keeps them near 1 MiB), with
# room for the BLAS's packing buffers and page granularity.
PER_THREAD_ALLOWANCE = 4 * 1024**2
SLACK = 8 * 1024**2


@needs_cpp
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak resident set from /proc")
def test_search_memory_does_not_grow_with_n_or_k():
    """Peak growth at (N, K) = (8192, 4096), (65536, 4096) and (8192, 65536), D = 32: the outputs
    (12 bytes a row), the fp32 centred codebook (4 K D bytes) and a bounded amount per thread, never
    anything N x K (2 GiB at the largest of these)."""
    dim = 32
    for num_rows, num_codes in [(8192, 4096), (65536, 4096), (8192, 65536)]:
        result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(num_rows), str(num_codes), str(dim)],
                                capture_output=True, text=True, timeout=600, check=True)
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        allowed = 12 * num_rows + 4 * num_codes * dim + figures["threads"] * PER_THREAD_ALLOWANCE + SLACK
        print(f"N={num_rows} K={num_codes} D={dim}: peak growth {figures['growth'] / 2**20:.1f} MiB, "
              f"allowed {allowed / 2**20:.1f} MiB")
        assert figures["growth"] <= allowed, figures
        assert figures["max_excess"] < 1e-3, figures


# --------------------------------------------------------------------------- the build's fallbacks


def _copy_for_build(tmp_path: Path) -> Path:
    tree = tmp_path / "src"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(ROOT / "fastvq", tree / "fastvq",
                    ignore=shutil.ignore_patterns("_C.*", "_build_status.json", "__pycache__"))
    shutil.copy(ROOT / "setup.py", tree / "setup.py")
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


# The copy's fastvq, and nothing else: an editable install's import hook would otherwise resolve
# fastvq._C, missing from the copy, to the installed checkout's extension.
_BACKEND_INFO_PROBE = textwrap.dedent(
    """
    import json, sys
    sys.meta_path[:] = [finder for finder in sys.meta_path
                        if not getattr(finder, "__module__", "").startswith("__editable__")]
    import fastvq
    assert fastvq.__file__.startswith(sys.argv[1]), fastvq.__file__
    print(json.dumps(fastvq.backends.backend_info()))
    """
)


def _backend_info_of(tree: Path) -> dict:
    environment = {**os.environ, "PYTHONPATH": str(tree), "FASTVQ_BACKEND": "auto"}
    result = subprocess.run([sys.executable, "-c", _BACKEND_INFO_PROBE, str(tree)], cwd=tree, env=environment,
                            capture_output=True, text=True, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_failed_build_installs_without_the_extension_and_says_why(tmp_path):
    tree = _copy_for_build(tmp_path)
    for source in (tree / "csrc").rglob("*.cpp"):  # a missing header stops each compile at once
        source.write_text('#include "missing_on_purpose.h"\n' + source.read_text())
    result = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "installing without fastvq._C" in result.stderr
    status = json.loads((tree / "fastvq" / "_build_status.json").read_text())
    assert status["built"] is False and "building fastvq._C with its C++ CPU kernels failed" in status["reason"]
    assert not list((tree / "fastvq").glob("_C.*"))
    info = _backend_info_of(tree)
    assert info["selected"]["cpu"] == "torch"
    assert info["compiled"]["reason"].startswith(
        "setup.py did not build fastvq._C: building fastvq._C with its C++ CPU kernels failed"
    )


def test_build_without_torch_installs_without_the_extension_and_says_why(tmp_path):
    """What pip's build isolation does: setup.py runs where torch cannot be imported."""
    tree = _copy_for_build(tmp_path)
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', 'build_ext', '--inplace']; "
              "runpy.run_path('setup.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], cwd=tree, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = _backend_info_of(tree)
    assert info["selected"]["cpu"] == "torch"
    assert "PyTorch was not importable while fastvq was built" in info["compiled"]["reason"]
    assert "--no-build-isolation" in info["compiled"]["reason"]

