"""k-means: ``fastvq.kmeans`` against ``faiss.Kmeans`` and scikit-learn's ``KMeans(algorithm="lloyd")``.

    python benchmarks/bench_kmeans.py [--small] [-n N] [-d D] [-k K] [--iters I] [--threads 1 2]
                                      [--device cpu|cuda] [--dtype fp32|bf16] [--no-memory] [--out DIR]

All three cluster the same data (a Gaussian mixture, float32) from the same initial centroids
(``K`` distinct rows drawn uniformly), for the same number of Lloyd iterations, on every row:
FAISS with ``max_points_per_centroid`` raised so it does not subsample (by default it keeps 256
rows per centroid), scikit-learn with ``n_init=1, tol=0``. fastvq runs with ``tol=None``.

Rows (``bench = kmeans``), one per implementation and thread count:

- ``s_per_iter``: the whole run's wall time divided by the iterations (FAISS's and scikit-learn's
  set-up is in it too; it is small next to an iteration at these sizes);
- ``last_inertia``: the library's own objective of the last iteration (FAISS's ``obj[-1]``,
  fastvq's ``inertia[-1]``: the rows' distances to the centroids they were assigned to before the
  last update; scikit-learn reports only the next one, so it has none);
- ``final_inertia``: the sum of squared distances from every row to its nearest *returned*
  centroid, recomputed by one float64-summed ``fastvq.nearest_code`` pass for all three, and
  ``vs_faiss``, that inertia relative to FAISS's (the goal: within 1 %);
- ``speedup_vs_faiss``: FAISS's ``s_per_iter`` at the same thread count over this row's;
- fastvq's rows also split one iteration into ``search_s`` (``nearest_code`` alone) and
  ``update_s`` (``segment_reduce`` alone), and carry ``peak_mib``: the peak memory two iterations
  add on top of the data and the initial centroids, measured in a fresh process by the harness;
- ``load1``: the 1-minute load average as the row's measurement started.

On CUDA only fastvq runs (the FAISS wheel here is CPU-only), in ``--dtype`` (bf16 searches
against bf16 centroids, accumulating in fp32), with CUDA-event timing of the whole run.
``--small`` is a grid that takes seconds. Results are merged into ``<out>/kmeans/<machine>.csv`` and
``.md`` (``_harness.main``; default ``benchmarks/results/kmeans/``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import _harness
import numpy as np
import torch

import fastvq

BENCH = "kmeans"
KEY_COLUMNS = ("N", "D", "K", "iters", "dtype", "threads")
TABLE_COLUMNS = ("impl", "N", "D", "K", "iters", "dtype", "threads", "s_per_iter", "speedup_vs_faiss", "search_s",
                 "update_s", "last_inertia", "final_inertia", "vs_faiss", "peak_mib", "load1", "note")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The CPU point; --small's.
FULL = dict(rows=1_000_000, dim=64, clusters=1024, iters=10)
SMALL = dict(rows=20_000, dim=32, clusters=64, iters=5)


def make_data(rows: int, dim: int, clusters: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [N, D]``: rows around ``2 K`` random means (unit noise, means of spread 2), generated in
    pieces so the peak stays near the data; and the initial centroids, ``K`` distinct rows of it."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(2 * clusters, dim, generator=generator) * 2
    x = torch.empty(rows, dim, dtype=dtype, device=device)
    piece = 1 << 16
    for start in range(0, rows, piece):
        count = min(piece, rows - start)
        picks = torch.randint(2 * clusters, (count,), generator=generator)
        x[start : start + count] = (means[picks] + torch.randn(count, dim, generator=generator)).to(device, dtype)
    init = x[torch.randperm(rows, generator=generator)[:clusters]].float()
    return x, init


def fastvq_run(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    result = fastvq.kmeans(x, init.shape[0], init=init, iters=iters, tol=None)
    return result.centroids, float(result.inertia[-1])


def fastvq_two_iterations(x: torch.Tensor, init: torch.Tensor) -> None:
    fastvq.kmeans(x, init.shape[0], init=init, iters=2, tol=None)


def faiss_run(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    import faiss

    data = x.numpy()
    kmeans = faiss.Kmeans(x.shape[1], init.shape[0], niter=iters, seed=0, verbose=False,
                          max_points_per_centroid=x.shape[0], min_points_per_centroid=1)
    kmeans.train(data, init_centroids=init.numpy())
    return torch.from_numpy(kmeans.centroids.copy()), float(kmeans.obj[-1])


def sklearn_run(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, None]:
    from sklearn.cluster import KMeans

    kmeans = KMeans(init.shape[0], init=init.numpy(), n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
    kmeans.fit(x.numpy())
    return torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)), None


def final_inertia(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Every row's squared distance to its nearest centroid, summed in float64."""
    _, distances = fastvq.nearest_code(x, centroids.to(x.device))
    return float(distances.sum(dtype=torch.float64))


def _timed(fn, device: str) -> tuple[object, float]:
    if device.startswith("cuda"):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        out = fn()
        stop.record()
        torch.cuda.synchronize()
        return out, start.elapsed_time(stop) / 1e3
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def _thread_limits(threads: int):
    """Threads for torch, FAISS (its own OpenMP setting) and scikit-learn (threadpoolctl)."""
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_limits

        return threadpool_limits(threads)
    except ImportError:
        return None


def _step_times(x: torch.Tensor, init: torch.Tensor, device: str) -> tuple[float, float]:
    """One ``nearest_code`` and one ``segment_reduce`` as k-means calls them (median of 3)."""
    indices, _ = fastvq.nearest_code(x, init)
    search = _harness.time_call(functools.partial(fastvq.nearest_code, x, init), device, cpu_budget_s=0,
                                min_repeats=3, max_repeats=3)
    update = _harness.time_call(functools.partial(fastvq.segment_reduce, x, indices, init.shape[0],
                                                  deterministic=True), device, cpu_budget_s=0, min_repeats=3,
                                max_repeats=3)
    return search.median_ms / 1e3, update.median_ms / 1e3


def _missing(module: str) -> Optional[str]:
    try:
        __import__(module)
    except ImportError:
        return f"not installed: pip install -e '.[bench]' ({module})"
    return None


@dataclass(frozen=True)
class Point:
    """``N`` rows of dimension ``D`` in ``dtype``, clustered into ``K`` for ``iters`` Lloyd iterations."""

    N: int
    D: int
    K: int
    iters: int
    dtype: str

    def __str__(self) -> str:
        return f"N={self.N} D={self.D} K={self.K} iters={self.iters} {self.dtype}"


@functools.lru_cache(maxsize=1)
def _point_data(point: Point, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The point's data and initial centroids, made once for all its thread counts, and a warm-up run."""
    x, init = make_data(point.N, point.D, point.K, device, DTYPES[point.dtype])
    warm_x, warm_init = make_data(256, point.D, 8, device, DTYPES[point.dtype])
    fastvq_run(warm_x, warm_init.to(device), 1)
    return x, init.to(device)


def measure(point: Point, run: _harness.Run) -> list[dict]:
    """Every implementation at one thread count; fastvq's peak memory at the first one."""
    device = run.device
    x, init = _point_data(point, device)
    impls = [("fastvq", fastvq_run, None)]
    if device == "cpu" and point.dtype == "fp32":
        impls += [("faiss", faiss_run, _missing("faiss")), ("sklearn-lloyd", sklearn_run, _missing("sklearn"))]
    limits = _thread_limits(run.threads) if run.threads is not None else None
    rows = []
    for name, implementation, missing in impls:
        row = {"bench": BENCH, "impl": name, "N": point.N, "D": point.D, "K": point.K, "iters": point.iters,
               "dtype": point.dtype, "threads": run.threads if run.threads is not None else torch.get_num_threads(),
               "load1": os.getloadavg()[0], "note": missing or ""}
        print(f"  {name}", flush=True)
        if missing is None:
            (centroids, last), seconds = _timed(functools.partial(implementation, x, init, point.iters), device)
            row.update(s_per_iter=seconds / point.iters, last_inertia=last, final_inertia=final_inertia(x, centroids))
            if name == "fastvq":
                row["search_s"], row["update_s"] = _step_times(x, init, device)
        rows.append(row)
    if limits is not None:
        limits.unregister()
    faiss_row = next((row for row in rows if row["impl"] == "faiss" and "s_per_iter" in row), None)
    for row in rows:
        if faiss_row is not None and "s_per_iter" in row:
            row["speedup_vs_faiss"] = faiss_row["s_per_iter"] / row["s_per_iter"]
            row["vs_faiss"] = row["final_inertia"] / faiss_row["final_inertia"]
    if run.first_threads and not run.args.no_memory:
        make_inputs = functools.partial(_memory_inputs, point.N, point.D, point.K, device, point.dtype)
        make_warmup = functools.partial(_memory_inputs, 256, point.D, 8, device, point.dtype)
        peak = _harness.peak_memory_growth_mib(fastvq_two_iterations, make_inputs, make_warmup, device)
        rows[0]["peak_mib"] = peak
        print(f"fastvq.kmeans peak memory growth over the data: {peak:.1f} MiB", flush=True)
    return rows


def _memory_inputs(rows: int, dim: int, clusters: int, device: str, dtype_name: str) -> tuple[torch.Tensor, ...]:
    x, init = make_data(rows, dim, clusters, device, DTYPES[dtype_name])
    return x, init.to(device)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--rows", type=int, default=None,
                        help=f"rows N ({FULL['rows']}; --small {SMALL['rows']})")
    parser.add_argument("-d", "--dim", type=int, default=None, help=f"dimension D ({FULL['dim']})")
    parser.add_argument("-k", "--clusters", type=int, default=None, help=f"clusters K ({FULL['clusters']})")
    parser.add_argument("--iters", type=int, default=None, help=f"Lloyd iterations ({FULL['iters']})")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")


def points(args: argparse.Namespace) -> list[Point]:
    """The one point: the issue's size, or ``--small``'s, each size overridable by its option."""
    defaults = SMALL if args.small else FULL
    size = {name: defaults[name] if getattr(args, name) is None else getattr(args, name)
            for name in ("rows", "dim", "clusters", "iters")}
    return [Point(size["rows"], size["dim"], size["clusters"], size["iters"], args.dtype)]


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("kmeans", points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.split("\n\n")[0],
                         add_arguments=add_arguments, default_threads=lambda args: [1, 2], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
