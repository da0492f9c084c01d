"""The nearest-code search bench under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

It times the same implementations as ``bench_search.py`` on its ``--small`` grid; the script is
where the full grids, the peak memory and the result files live. ``pytest tests`` never collects
this file. pytest-benchmark times with a host clock, so on CUDA every call ends with a
``torch.cuda.synchronize()`` and the time covers the finished work, launch overhead included.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from _harness import tflops  # noqa: E402
from bench_search import DTYPES, SMALL_DTYPES, SMALL_GRID, implementations, search_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLEMENTATIONS = implementations(DEVICE)
CASES = [(n, k, d, dtype_name) for dtype_name in SMALL_DTYPES for n, k, d in SMALL_GRID.points()]


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("case", CASES, ids=[f"N{n}-K{k}-D{d}-{dt}" for n, k, d, dt in CASES])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS, ids=[impl.name for impl in IMPLEMENTATIONS])
def test_nearest_code(benchmark, monkeypatch, impl, case):
    num_rows, num_codes, dim, dtype_name = case
    if impl.backend is not None:
        monkeypatch.setenv("FASTVQ_BACKEND", impl.backend)
    z, codebook = search_inputs(num_rows, num_codes, dim, DTYPES[dtype_name], DEVICE)
    call = functools.partial(impl.fn, z, codebook)
    call()  # Triton autotunes on the first call; keep it out of the timed rounds
    benchmark.group = f"nearest_code N={num_rows} K={num_codes} D={dim} {dtype_name}"
    benchmark(_synchronized(call) if DEVICE == "cuda" else call)
    if benchmark.stats is not None:  # None under --benchmark-disable, which runs the call once untimed
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["tflops"] = tflops(2 * num_rows * num_codes * dim, median_ms)
