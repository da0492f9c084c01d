"""The k-means bench under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

It times the implementations of ``bench_kmeans.py`` at its ``--small`` size (a whole run of
``SMALL["iters"]`` Lloyd iterations); the script is where the full size, the inertia comparison,
the peak memory and the result files live. ``pytest tests`` never collects this file.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("pytest_benchmark")

from bench_kmeans import SMALL, faiss_run, fastvq_run, make_data, sklearn_run  # noqa: E402

IMPLEMENTATIONS = {"fastvq": (fastvq_run, None), "faiss": (faiss_run, "faiss"),
                   "sklearn-lloyd": (sklearn_run, "sklearn")}


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_kmeans(benchmark, impl):
    run, module = IMPLEMENTATIONS[impl]
    if module is not None:
        pytest.importorskip(module)
    x, init = make_data(SMALL["rows"], SMALL["dim"], SMALL["clusters"])
    benchmark.group = f"kmeans N={SMALL['rows']} D={SMALL['dim']} K={SMALL['clusters']} iters={SMALL['iters']}"
    benchmark(functools.partial(run, x, init, SMALL["iters"]))
