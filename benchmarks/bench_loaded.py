"""The C++ CPU ops beside a competing process: does a second thread still help when the machine is loaded?

    python benchmarks/bench_loaded.py [--small] [--threads N] [--loads L ...] [--pin] [--repeats R] [--out DIR]

Issue 27's goal: no call on a 2-core machine under load takes more than 2x its one-thread time. Each point
starts ``L`` competing processes (``--loads``, default 1: a Python busy loop each, pinned to the last CPU
with ``--pin``, else placed by the OS), waits for them to run, and then times the op at one thread and at
``N`` threads (``--threads``, default all the CPUs this process may use) call for call, alternating, ``R``
rounds (``--repeats``, default: as many as fit in about two seconds, 20 to 400), so that the load falls on
both alike. Every call is timed on its own (``time.perf_counter``), and each row reports the distribution of
its calls: median, 95th and 99th percentiles and maximum in ms, and against the one-thread median of the same
point (``vs_1t_median``: this row's median over it; ``vs_1t_p99``: its 99th percentile over it;
``vs_1t_worst``: its maximum over it; the goal holds where ``vs_1t_worst <= 2`` for the many-thread row; the
one-thread row's own ``vs_1t_worst`` says how far the load alone stretches a call). Each call also counts the
calling thread's context switches (``getrusage(RUSAGE_THREAD)``): ``preempted`` is the fraction of calls during
which the OS took the calling thread off its core (involuntary switches: no loop can prevent those, and they hit
one thread as much as two), ``slept`` the fraction in which it slept (voluntary: waiting on a helper's chunk),
and ``max_unpreempted_ms`` / ``vs_1t_worst_unpreempted`` the worst call that was never preempted, the part of
the worst case the op and its loop answer for. ``loop`` names the parallel loop of the fastvq._C imported
(``fastvq::parallel_for (timed back-off)``; ``fastvq::parallel_for (grain back-off)`` for a build whose back-off
counted grains; ``at::parallel_for`` for a build before both: run the script with ``PYTHONPATH`` on an older
checkout to measure the one against the other). Rows are ``bench = beside_load_per_call`` (``beside_load`` rows
are from the script before the percentiles and switch counts). The ops, fp32, standard-normal data:

- ``nearest_code``: ``fastvq.nearest_code(z [N, D], codebook [K, D])`` (the search);
- ``nearest_codes``: ``fastvq.nearest_codes(z, codebook, k=8)`` (the top-k search);
- ``segment_reduce``: ``fastvq.segment_reduce(z, indices, K)`` (per-code counts and sums);
- ``soft_quantize``: ``fastvq.soft_quantize(z, codebook)`` (soft codes and hard choice, forward only).

Sizes: tiny searches (N = 64, 256, 1024) where one call takes well under a millisecond, issue 27's
N = 16 384 (K = 1 024, D = 64) and a large one (N = 65 536). Every row names the machine and its load
(``peak_load1``, ``load1``: the 1-minute load average before and after the point, which includes the
competing processes and whatever else shared the machine). Results are merged into
``<out>/loaded/<machine>.csv`` and ``.md`` (``_harness.main``).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from typing import Callable, NamedTuple

import _harness
import torch

import fastvq

FAMILY = "loaded"
# Rows with the per-call percentiles and context switches; "beside_load" rows (median, p95, worst only) are from
# the version of this script before them.
BENCH = "beside_load_per_call"
KEY_COLUMNS = ("loop", "N", "K", "D", "loads", "pinned", "threads")
TABLE_COLUMNS = ("impl", "loop", "N", "K", "D", "loads", "threads", "calls", "median_ms", "p99_ms", "max_ms",
                 "vs_1t_median", "vs_1t_p99", "vs_1t_worst", "preempted", "slept", "vs_1t_worst_unpreempted", "load1")
OPS = ("nearest_code", "nearest_codes", "segment_reduce", "soft_quantize")
# N at K = 1024, D = 64: tiny searches, issue 27's batch and a large one.
SIZES = (64, 256, 1_024, 16_384, 65_536)
SMALL_SIZES = (64, 1_024)
NUM_CODES, DIM, TOP_K = 1_024, 64, 8
SECONDS_PER_POINT = 2.0
MIN_ROUNDS, MAX_ROUNDS = 20, 400


def _busy_loop(stop) -> None:  # a competing process: pure Python, one core's worth of load
    spins = 0
    while not stop.is_set():
        for _ in range(10_000):
            spins += 1


class CompetingLoad:
    """``count`` busy processes for the duration of a ``with`` block, pinned to the last CPU when ``pin``."""

    def __init__(self, count: int, pin: bool) -> None:
        self.count, self.pin = count, pin
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._processes: list = []

    def __enter__(self) -> "CompetingLoad":
        for _ in range(self.count):
            process = self._context.Process(target=_busy_loop, args=(self._stop,), daemon=True)
            process.start()
            if self.pin:
                os.sched_setaffinity(process.pid, {max(os.sched_getaffinity(0))})
            self._processes.append(process)
        time.sleep(0.5 if self.count else 0.0)  # the processes start spinning
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


def op_call(op: str, num_rows: int) -> Callable[[], object]:
    generator = torch.Generator().manual_seed(num_rows)
    z = torch.randn(num_rows, DIM, generator=generator)
    codebook = torch.randn(NUM_CODES, DIM, generator=generator)
    if op == "nearest_code":
        return lambda: fastvq.nearest_code(z, codebook)
    if op == "nearest_codes":
        return lambda: fastvq.nearest_codes(z, codebook, k=TOP_K)
    if op == "soft_quantize":
        return lambda: fastvq.soft_quantize(z, codebook)
    indices = torch.randint(0, NUM_CODES, (num_rows,), generator=generator)
    return lambda: fastvq.segment_reduce(z, indices, NUM_CODES)


class Call(NamedTuple):
    """One timed call: its wall time and the calling thread's context switches during it (getrusage)."""

    ms: float
    preempted: bool  # involuntary switches: the OS took the calling thread off its core
    slept: bool  # voluntary switches: the calling thread slept (waiting on a helper's chunk, a lock, I/O)


def thread_switches() -> tuple[int, int]:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_nivcsw, usage.ru_nvcsw


def time_alternating(call: Callable[[], object], thread_counts: tuple[int, ...], rounds: int) -> dict[int, list[Call]]:
    """Every call at each thread count, the counts alternating call for call."""
    for threads in thread_counts:  # warm-up: first-call allocations, the pool's threads
        torch.set_num_threads(threads)
        call()
    calls: dict[int, list[Call]] = {threads: [] for threads in thread_counts}
    for _ in range(rounds):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            involuntary, voluntary = thread_switches()
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            involuntary_after, voluntary_after = thread_switches()
            calls[threads].append(Call(elapsed * 1e3, involuntary_after > involuntary, voluntary_after > voluntary))
    return calls


def rounds_for(call: Callable[[], object], thread_counts: tuple[int, ...], args: argparse.Namespace) -> int:
    """``--repeats``, else the rounds (one call at each count) that fit in about ``SECONDS_PER_POINT``."""
    if args.repeats:
        return args.repeats
    seconds = 0.0
    for threads in thread_counts:
        torch.set_num_threads(threads)
        start = time.perf_counter()
        call()
        seconds += time.perf_counter() - start
    return min(MAX_ROUNDS, max(MIN_ROUNDS, int(SECONDS_PER_POINT / max(seconds, 1e-6))))


def parallel_loop() -> str:
    """The loop the kernels of the imported fastvq._C run on: ``fastvq::parallel_for`` (csrc/cpu/parallel.h)
    with its back-off by time where the build has ``parallel_for_backoff_state``, the one whose back-off counted
    grains where it has only ``parallel_for_coverage``, else PyTorch's ``at::parallel_for`` (before issue 27)."""
    if hasattr(torch.ops.fastvq_C, "parallel_for_backoff_state"):
        return "fastvq::parallel_for (timed back-off)"
    if hasattr(torch.ops.fastvq_C, "parallel_for_coverage"):
        return "fastvq::parallel_for (grain back-off)"
    return "at::parallel_for"


def quantile(values: list[float], q: float) -> float:
    return torch.tensor(values, dtype=torch.float64).quantile(q).item()


def measure(point: tuple[str, int, int], run: _harness.Run) -> list[dict]:
    op, num_rows, loads = point
    many = run.threads or torch.get_num_threads()
    thread_counts = (1, many) if many > 1 else (1,)
    call = op_call(op, num_rows)
    load_before = os.getloadavg()[0]
    with CompetingLoad(loads, run.args.pin):
        calls = time_alternating(call, thread_counts, rounds_for(call, thread_counts, run.args))
    one_thread_median = quantile([one.ms for one in calls[1]], 0.5)
    rows = []
    for threads, timed in calls.items():
        values = [one.ms for one in timed]
        # The calls the OS never took off the calling thread's core: their time is the op's and the loop's own.
        kept = [one.ms for one in timed if not one.preempted] or [float("nan")]
        rows.append({
            "bench": BENCH, "impl": op, "loop": parallel_loop(), "N": num_rows, "K": NUM_CODES, "D": DIM,
            "loads": loads,
            "pinned": run.args.pin, "threads": threads, "calls": len(values),
            "median_ms": quantile(values, 0.5), "q20_ms": quantile(values, 0.2), "q80_ms": quantile(values, 0.8),
            "p95_ms": quantile(values, 0.95), "p99_ms": quantile(values, 0.99), "max_ms": max(values),
            "vs_1t_median": quantile(values, 0.5) / one_thread_median,
            "vs_1t_p99": quantile(values, 0.99) / one_thread_median, "vs_1t_worst": max(values) / one_thread_median,
            "preempted": sum(one.preempted for one in timed) / len(timed),
            "slept": sum(one.slept for one in timed) / len(timed),
            "max_unpreempted_ms": max(kept), "vs_1t_worst_unpreempted": max(kept) / one_thread_median,
            "peak_load1": max(load_before, os.getloadavg()[0]), "load1": os.getloadavg()[0],
        })
    torch.set_num_threads(many)
    return rows


def points(args: argparse.Namespace) -> list[tuple[str, int, int]]:
    sizes = SMALL_SIZES if args.small else SIZES
    ops = args.ops or OPS
    return [(op, num_rows, loads) for loads in args.loads for op in ops for num_rows in sizes]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loads", type=int, nargs="+", default=[1], metavar="L",
                        help="competing busy processes per point (default: 1)")
    parser.add_argument("--pin", action="store_true", help="pin the competing processes to the last CPU")
    parser.add_argument("--repeats", type=int, default=0, metavar="R",
                        help=f"rounds per point (default: about {SECONDS_PER_POINT:g} s, {MIN_ROUNDS}-{MAX_ROUNDS})")
    parser.add_argument("--ops", nargs="+", choices=OPS, help="the ops to time (default: all)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.device != "cpu":
        parser.error("bench_loaded.py times CPU threads; run it with --device cpu")
    if min(args.loads) < 0 or args.repeats < 0:
        parser.error("--loads and --repeats must be >= 0")
    if args.threads is not None and len(args.threads) != 1:
        parser.error("--threads takes one count: every point is timed at 1 thread and at that count, alternating")


if __name__ == "__main__":
    sys.exit(_harness.main(
        FAMILY, points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.splitlines()[0],
        add_arguments=add_arguments, check_arguments=check_arguments,
        default_threads=lambda args: [len(os.sched_getaffinity(0))],
        argv=["--device", "cpu", *sys.argv[1:]] if "--device" not in sys.argv else None,
    ))
