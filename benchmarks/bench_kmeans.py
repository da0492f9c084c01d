"""k-means: ``fastvq.kmeans`` against ``faiss.Kmeans`` and scikit-learn's ``KMeans``, and B problems at once.

    python benchmarks/bench_kmeans.py [--small] [--mode defaults same-init batched] [-n N] [-d D] [-k K]
                                      [--iters I] [-b B] [--threads 1 2] [--device cpu|cuda]
                                      [--dtype fp32|bf16] [--repeats R] [--no-memory] [--out DIR]

Three modes (``--mode``, all three by default), each its own rows (column ``mode``):

- ``defaults``: each library as a user runs it, with its own defaults, seeding included: ``fastvq.kmeans(x, K,
  seed=0)`` (k-means|| seeding and at most 24 iterations, ``tol=1e-4``, on a sample of 128 rows per centroid,
  then one iteration on all rows), ``faiss.Kmeans(D, K).train(x)`` (random seeds, 25 iterations on a sample of
  256 rows per centroid) and, where it is cheap (N K <= 2e8), scikit-learn's ``KMeans(K, random_state=0)``
  (greedy k-means++ over all rows, up to 300 iterations, ``tol=1e-4``). The libraries run in turn,
  ``--repeats`` times (default 2), so that a change in a shared machine's load falls on all alike; each row
  reports its library's fastest run (``runs`` says how many). Columns: ``sample_rows`` (the rows the
  iterations, all but fastvq's last, run on), ``init_s`` (fastvq: its sampling and seeding timed alone; FAISS:
  the run's time outside its iterations, read from its iteration statistics: sampling and seeding;
  scikit-learn: not separable), ``iters_run``, ``s_per_iter`` (the iterations' time over their number, fastvq's
  last one over all rows included; scikit-learn's includes its seeding), ``total_s``, ``full_iter_s`` (fastvq:
  one Lloyd iteration over all N rows, from its result), ``init_iters`` (the seeding's time in Lloyd
  iterations over all rows, ``init_s / full_iter_s``, for fastvq: the goal is <= 2; FAISS: in its own
  iterations on its sample), ``final_inertia``, ``vs_faiss`` and ``speedup_vs_faiss`` (FAISS's ``total_s`` over
  this row's).
- ``same-init``: all three cluster the same data from the same initial centroids (``K`` distinct rows drawn
  uniformly), for the same number of Lloyd iterations, on every row: FAISS with ``max_points_per_centroid``
  raised so it does not subsample, scikit-learn with ``n_init=1, tol=0``, fastvq with ``tol=None``. Columns:
  ``s_per_iter`` (the whole run's wall time over the iterations); ``last_inertia`` (the library's own
  objective of the last iteration: FAISS's ``obj[-1]``, fastvq's ``inertia[-1]``; scikit-learn reports only
  the next one); ``final_inertia``; ``speedup_vs_faiss``; fastvq's ``search_s`` (``nearest_code`` alone) and
  ``update_s`` (``segment_reduce`` alone), ``overhead_s`` (``s_per_iter`` less both: the bookkeeping between
  them) and ``peak_mib`` (the memory two iterations add on top of the data, in a fresh process).
- ``batched``: ``B`` problems of ``N`` rows (issue 26: B = 32, N = 65 536, K = 1 024, D = 128) clustered in
  one ``fastvq.kmeans(x [B, N, D], K)`` call (impl ``fastvq-batched``) against the equal-work baseline, one
  problem of ``B N`` rows and ``K`` clusters (impl ``fastvq-one-problem``): both are ``B N K D``
  multiply-adds an iteration, so the ratio of their times (``vs_one_problem``, the goal <= 1.1) is the
  batched call's cost over the single call's per-row-per-code throughput. (One call on ``B N`` rows with
  ``B K`` codes would do B times the work.) Both from given centroids, ``tol=None``, every iteration on all
  rows (``max_points_per_centroid=None``); ``search_s`` times
  ``nearest_code_batched`` and ``nearest_code`` alone.

Every ``final_inertia`` is the sum of squared distances from every row to its nearest *returned* centroid,
recomputed by one float64-summed ``fastvq.nearest_code`` pass; ``vs_faiss`` is it relative to FAISS's (the
goal: within 1 %). ``load1`` is the 1-minute load average as the row's measurement started.

On CUDA only fastvq runs (the FAISS wheel here is CPU-only), in ``--dtype`` (bf16 searches against bf16
centroids, accumulating in fp32), with CUDA-event timing of the whole run. ``--small`` is a grid that takes
seconds. Results are merged into ``<out>/kmeans/<machine>.csv`` and ``.md`` (``_harness.main``; default
``benchmarks/results/kmeans/``).
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
KEY_COLUMNS = ("mode", "B", "N", "D", "K", "iters", "dtype", "threads")
TABLE_COLUMNS = ("mode", "impl", "B", "N", "D", "K", "iters", "dtype", "threads", "init_s", "iters_run", "s_per_iter",
                 "total_s", "init_iters", "speedup_vs_faiss", "vs_one_problem", "search_s", "update_s", "overhead_s",
                 "last_inertia", "final_inertia", "vs_faiss", "peak_mib", "load1", "note", "sample_rows", "full_iter_s",
                 "runs")
MODES = ("defaults", "same-init", "batched")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The CPU point; --small's. The batched mode's (issue 26); --small's.
FULL = dict(rows=1_000_000, dim=64, clusters=1024, iters=10)
SMALL = dict(rows=20_000, dim=32, clusters=64, iters=5)
BATCHED = dict(problems=32, rows=65_536, dim=128, clusters=1024, iters=2)
BATCHED_SMALL = dict(problems=4, rows=4096, dim=32, clusters=64, iters=2)
# scikit-learn's defaults (greedy k-means++ over every row, up to 300 iterations) run only below this N K.
SKLEARN_DEFAULTS_MAX_WORK = 2e8


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
    """Lloyd's iterations on every row (no sample), as the same-init comparison runs every library."""
    result = fastvq.kmeans(x, init.shape[0], init=init, iters=iters, tol=None, max_points_per_centroid=None)
    return result.centroids, float(result.inertia[-1])


def fastvq_two_iterations(x: torch.Tensor, init: torch.Tensor) -> None:
    fastvq.kmeans(x, init.shape[0], init=init, iters=2, tol=None, max_points_per_centroid=None)


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


def fastvq_defaults(x: torch.Tensor, clusters: int) -> dict:
    """``fastvq.kmeans`` with its defaults (seed 0)."""
    started = time.perf_counter()
    result = fastvq.kmeans(x, clusters, seed=0)
    total = time.perf_counter() - started
    return dict(centroids=result.centroids, iters_run=len(result.inertia), total_s=total)


def fastvq_default_parts(x: torch.Tensor, clusters: int, centroids: torch.Tensor) -> dict:
    """What ``fastvq.kmeans(x, K, seed=0)`` spends outside its iterations, timed alone as it runs there (the
    sample drawn, then the k-means|| seeding on it), and one Lloyd iteration over all rows."""
    clustering = fastvq.clustering
    sample_rows = clustering._lloyd_sample_size(lambda: x.shape[0], clusters, 25, clustering.MAX_POINTS_PER_CENTROID)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    fitted = x
    if sample_rows is not None:
        fitted = x[clustering._distinct_rows(x.shape[0], sample_rows, generator).sort().values]
    clustering._seed(clustering._Shards(fitted, x.device, False), clusters, "k-means||", "l2", generator)
    init = time.perf_counter() - started
    started = time.perf_counter()
    fastvq.kmeans(x, clusters, init=centroids, iters=1, tol=None, max_points_per_centroid=None)
    return dict(init_s=init, full_iter_s=time.perf_counter() - started, sample_rows=fitted.shape[0])


def faiss_defaults(x: torch.Tensor, clusters: int) -> dict:
    """``faiss.Kmeans(D, K).train(x)`` with FAISS's defaults; its iteration statistics hold each iteration's
    cumulative time, so the time outside the iterations (sampling, seeding) is the run's less theirs."""
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], clusters)
    started = time.perf_counter()
    kmeans.train(x.numpy())
    total = time.perf_counter() - started
    stats = kmeans.iteration_stats
    iters = len(stats)
    per_iter = (stats[-1]["time"] - stats[0]["time"]) / max(iters - 1, 1)
    sample_rows = min(x.shape[0], kmeans.cp.max_points_per_centroid * clusters)
    return dict(centroids=torch.from_numpy(kmeans.centroids.copy()), init_s=max(total - iters * per_iter, 0.0),
                iters_run=iters, total_s=total, s_per_iter=per_iter, sample_rows=sample_rows)


def sklearn_defaults(x: torch.Tensor, clusters: int) -> dict:
    from sklearn.cluster import KMeans

    kmeans = KMeans(clusters, random_state=0)
    started = time.perf_counter()
    kmeans.fit(x.numpy())
    total = time.perf_counter() - started
    return dict(centroids=torch.from_numpy(kmeans.cluster_centers_.astype(np.float32)), iters_run=kmeans.n_iter_,
                total_s=total, s_per_iter=total / kmeans.n_iter_)


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
    """``mode``; ``B`` problems (1 outside the batched mode) of ``N`` rows of dimension ``D`` in ``dtype``,
    clustered into ``K`` for ``iters`` Lloyd iterations (the defaults mode: each library's own number)."""

    mode: str
    B: int
    N: int
    D: int
    K: int
    iters: int
    dtype: str

    def __str__(self) -> str:
        problems = f"B={self.B} " if self.mode == "batched" else ""
        return f"{self.mode}: {problems}N={self.N} D={self.D} K={self.K} iters={self.iters} {self.dtype}"


@functools.lru_cache(maxsize=1)
def _point_data(point: Point, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The point's data and initial centroids, made once for all its thread counts, and a warm-up run."""
    x, init = make_data(point.B * point.N, point.D, point.K, device, DTYPES[point.dtype])
    warm_x, warm_init = make_data(256, point.D, 8, device, DTYPES[point.dtype])
    fastvq_run(warm_x, warm_init.to(device), 1)
    return x, init.to(device)


def _row(point: Point, impl: str, run: _harness.Run, note: Optional[str]) -> dict:
    return {"bench": BENCH, "mode": point.mode, "impl": impl, "B": point.B, "N": point.N, "D": point.D,
            "K": point.K, "iters": point.iters, "dtype": point.dtype,
            "threads": run.threads if run.threads is not None else torch.get_num_threads(),
            "load1": os.getloadavg()[0], "note": note or ""}


def measure(point: Point, run: _harness.Run) -> list[dict]:
    if point.mode == "defaults":
        return measure_defaults(point, run)
    if point.mode == "batched":
        return measure_batched(point, run)
    return measure_same_init(point, run)


def measure_defaults(point: Point, run: _harness.Run) -> list[dict]:
    """Each library with its own defaults, seeding included."""
    x, _ = _point_data(point, run.device)
    impls = [("fastvq", fastvq_defaults, None)]
    if run.device == "cpu" and point.dtype == "fp32":
        cheap = point.N * point.K <= SKLEARN_DEFAULTS_MAX_WORK
        sklearn_note = _missing("sklearn") or (None if cheap else (
            f"skipped: scikit-learn's defaults (greedy k-means++ over all rows, up to 300 iterations) at N K > "
            f"{SKLEARN_DEFAULTS_MAX_WORK:g}"))
        impls += [("faiss", faiss_defaults, _missing("faiss")), ("sklearn", sklearn_defaults, sklearn_note)]
    limits = _thread_limits(run.threads) if run.threads is not None else None
    rows = {name: _row(point, name, run, note) for name, _, note in impls}
    # The libraries in turn, each run's measurements kept where its total is the fastest so far.
    for repeat in range(run.args.repeats):
        for name, implementation, note in impls:
            if note is not None:
                continue
            print(f"  {name} (run {repeat + 1} of {run.args.repeats})", flush=True)
            measured = implementation(x, point.K)
            row = rows[name]
            if "total_s" not in row or measured["total_s"] < row["total_s"]:
                row.update({key: value for key, value in measured.items() if key != "centroids"})
                row["final_inertia"] = final_inertia(x, measured["centroids"])
                if name == "fastvq":
                    row.update(fastvq_default_parts(x, point.K, measured["centroids"]))
            row["runs"] = repeat + 1
    for row in rows.values():
        if "full_iter_s" in row:
            row["s_per_iter"] = (row["total_s"] - row["init_s"]) / row["iters_run"]
            row["init_iters"] = row["init_s"] / row["full_iter_s"]
        elif "init_s" in row:
            row["init_iters"] = row["init_s"] / row["s_per_iter"]
    rows = list(rows.values())
    if limits is not None:
        limits.unregister()
    _compare_with_faiss(rows, "total_s")
    return rows


def _compare_with_faiss(rows: list[dict], time_column: str) -> None:
    faiss_row = next((row for row in rows if row["impl"] == "faiss" and time_column in row), None)
    for row in rows:
        if faiss_row is not None and time_column in row:
            row["speedup_vs_faiss"] = faiss_row[time_column] / row[time_column]
            row["vs_faiss"] = row["final_inertia"] / faiss_row["final_inertia"]


def measure_batched(point: Point, run: _harness.Run) -> list[dict]:
    """``B`` problems in one call against one problem of ``B N`` rows: the same work an iteration."""
    device = run.device
    rows_all, init_all = _point_data(point, device)
    x = rows_all.view(point.B, point.N, point.D)
    # Problem b starts from K of its own rows.
    picks = torch.stack([torch.randperm(point.N, generator=torch.Generator().manual_seed(b))[: point.K]
                         for b in range(point.B)]).to(device)
    init = x.gather(1, picks[:, :, None].expand(-1, -1, point.D)).float()
    rows = []
    for name in ("fastvq-batched", "fastvq-one-problem"):
        row = _row(point, name, run, None)
        print(f"  {name}", flush=True)
        if name == "fastvq-batched":
            call = functools.partial(fastvq.kmeans, x, point.K, init=init, iters=point.iters, tol=None,
                                     max_points_per_centroid=None)
            search = functools.partial(fastvq.nearest_code_batched, x, init.to(x.dtype))
        else:
            call = functools.partial(fastvq.kmeans, rows_all, point.K, init=init_all, iters=point.iters, tol=None,
                                     max_points_per_centroid=None)
            search = functools.partial(fastvq.nearest_code, rows_all, init_all.to(rows_all.dtype))
        _, seconds = _timed(call, device)
        row["s_per_iter"] = seconds / point.iters
        timing = _harness.time_call(search, device, cpu_budget_s=0, min_repeats=1, max_repeats=1)
        row["search_s"] = timing.median_ms / 1e3
        rows.append(row)
    rows[0]["vs_one_problem"] = rows[0]["s_per_iter"] / rows[1]["s_per_iter"]
    return rows


def measure_same_init(point: Point, run: _harness.Run) -> list[dict]:
    """Every implementation at one thread count from the same centroids; fastvq's peak memory at the first one."""
    device = run.device
    x, init = _point_data(point, device)
    impls = [("fastvq", fastvq_run, None)]
    if device == "cpu" and point.dtype == "fp32":
        impls += [("faiss", faiss_run, _missing("faiss")), ("sklearn-lloyd", sklearn_run, _missing("sklearn"))]
    limits = _thread_limits(run.threads) if run.threads is not None else None
    rows = []
    for name, implementation, missing in impls:
        row = _row(point, name, run, missing)
        print(f"  {name}", flush=True)
        if missing is None:
            (centroids, last), seconds = _timed(functools.partial(implementation, x, init, point.iters), device)
            row.update(s_per_iter=seconds / point.iters, last_inertia=last, final_inertia=final_inertia(x, centroids))
            if name == "fastvq":
                row["search_s"], row["update_s"] = _step_times(x, init, device)
                row["overhead_s"] = row["s_per_iter"] - row["search_s"] - row["update_s"]
        rows.append(row)
    if limits is not None:
        limits.unregister()
    _compare_with_faiss(rows, "s_per_iter")
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
    parser.add_argument("--repeats", type=int, default=2,
                        help="the defaults mode's runs of each library, in turn; each row keeps the fastest (2)")
    parser.add_argument("-b", "--problems", type=int, default=None,
                        help=f"the batched mode's problems B ({BATCHED['problems']}; "
                             f"--small {BATCHED_SMALL['problems']})")
    parser.add_argument("--mode", choices=MODES, nargs="+", default=list(MODES), help="which comparisons (all)")


def points(args: argparse.Namespace) -> list[Point]:
    """One point per mode: the issues' sizes, or ``--small``'s, each size overridable by its option."""
    out = []
    for mode in args.mode:
        if mode == "batched":
            defaults = BATCHED_SMALL if args.small else BATCHED
        else:
            defaults = {**(SMALL if args.small else FULL), "problems": 1}
        size = {name: defaults[name] if getattr(args, name) is None else getattr(args, name)
                for name in ("rows", "dim", "clusters", "iters")}
        problems = defaults["problems"] if mode != "batched" or args.problems is None else args.problems
        out.append(Point(mode, problems, size["rows"], size["dim"], size["clusters"], size["iters"], args.dtype))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("kmeans", points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.split("\n\n")[0],
                         add_arguments=add_arguments, default_threads=lambda args: [1, 2], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
