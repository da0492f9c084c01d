"""Nearest-code search: ``fastvq.nearest_code`` against the ways PyTorch users write it today.

    python benchmarks/bench_search.py [--small] [--memory-check] [--device cpu|cuda]
                                      [--dtypes fp32 bf16 ...] [--metrics l2 dot] [--threads 1 2]
                                      [--out DIR]     (the options are _harness.main's and its own)

Implementations compared at every grid point (random normal data; fp32 unless said):

- ``fastvq``: ``fastvq.nearest_code`` with ``FASTVQ_BACKEND=auto`` (Triton on CUDA; on CPU the C++
  kernel of ``fastvq._C`` when it is built, else the chunked PyTorch path);
- ``fastvq-cpp`` / ``fastvq-cuda``: the same with ``FASTVQ_BACKEND=cpp`` on CPU / ``cuda`` on CUDA,
  where ``fastvq._C`` has that backend;
- ``fastvq-torch``: the same with ``FASTVQ_BACKEND=torch`` (left out on CPU without ``fastvq._C``,
  where it is ``fastvq``);
- ``cdist``: ``torch.cdist(z, codebook).argmin(1)``;
- ``z2+e2-2ze``: ``fastvq.reference.distance_matrix_ref(..., upcast=False).argmin(1)``, the
  expanded form of the VQ-VAE code bases;
- ``matmul``: the bare ``z @ codebook.T`` in the input dtype, the floor every search pays;
- ``faiss`` (CPU, with faiss-cpu installed: the ``bench`` extra): exact search with k = 1 in
  ``faiss.IndexFlatL2`` (l2) or ``faiss.IndexFlatIP`` (dot) on the same arrays and the same thread
  count, the index built once outside the timing (its memory figure includes it), timed
  interleaved with ``fastvq``, call for call, so that both see the same machine.

``cdist`` and ``z2+e2-2ze`` run for l2 only, the baselines for fp32 only (other dtypes time
fastvq alone, with ``vs_fp32``: the fp32 search's time at the same point over this one's). On CPU
every point runs at each ``--threads`` count (default 1 and all cores).

Each row reports the median and 20%/80% quantiles in ms, TFLOP/s counting the search's
``2 N K D`` flops, ``fraction_of_peak`` (of the measured FMA peak of the threads used, see
``_harness``), peak memory growth in MiB (measured at the first thread count), the time relative
to ``matmul``, ``vs_faiss`` (FAISS's time over this one's, fastvq rows) and ``agreement`` (the
share of rows where FAISS chose fastvq's code), ``kernel`` and ``vector_isa`` (what ran). The
three matrix baselines build the ``N x K`` matrix; one whose matrix would not fit (over 4 GiB on
CPU, over a quarter of the free memory on CUDA) is skipped with a note.

Modes: the default grid for the device (on CPU followed by the memory check); ``--small``, a
tiny grid that finishes in well under a minute; ``--memory-check``, which measures
``nearest_code`` at N = K = 65 536, D = 32, where the fp32 distance matrix would take 16 GiB, and
exits non-zero if it needs 256 MiB or more. Results are merged into
``<out>/search/<machine>.csv`` and ``.md``. The exit status is non-zero if any implementation failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import _harness
import torch

import fastvq
from fastvq.backends import cpp as compiled_backend
from fastvq.reference import distance_matrix_ref

BENCH = "nearest_code"
METRICS = ("l2", "dot")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs of the memory measurement's warm-up call: big enough to run every code path, too small
# to register in the peak.
WARMUP_ROWS = WARMUP_CODES = 16
MEMORY_CHECK_SIZE = 65_536
MEMORY_CHECK_DIM = 32
MEMORY_CHECK_LIMIT_MIB = 256
CPU_MATRIX_LIMIT_BYTES = 4 * _harness.GIB
# None in a row's measured column means it was not measured; the row's note says why.
MEASURED_COLUMNS = ("median_ms", "q20_ms", "q80_ms", "tflops", "peak_mib", "vs_matmul", "vs_faiss", "vs_fp32",
                    "agreement")
# load1, the host's 1-minute load average as the row's measurement starts, tells timings taken
# while other processes shared the CPU from clean ones.
# A row is one implementation searching N vectors of dimension D among K codes on some threads.
KEY_COLUMNS = ("N", "K", "D", "dtype", "metric", "threads")
TABLE_COLUMNS = ("impl", "N", "K", "D", "dtype", "metric", "threads", "median_ms", "tflops", "fraction_of_peak",
                 "peak_mib", "vs_matmul", "vs_faiss", "vs_fp32", "agreement", "kernel", "load1", "note")


@dataclass(frozen=True)
class Grid:
    rows: tuple[int, ...]
    codes: tuple[int, ...]
    dims: tuple[int, ...]

    def points(self) -> list[tuple[int, int, int]]:
        return [(n, k, d) for n in self.rows for k in self.codes for d in self.dims]


FULL_GRIDS = {
    "cuda": Grid(rows=(65_536,), codes=(1_024, 8_192, 65_536), dims=(64, 256)),
    # Sized for a 2-core machine to finish in about a quarter of an hour; EXTRA_CPU_POINTS adds the
    # few-rows, many-codes case, where the codebook is split across threads.
    "cpu": Grid(rows=(16_384,), codes=(1_024, 8_192), dims=(64, 256)),
}
EXTRA_CPU_POINTS = ((4_096, 65_536, 64),)
DEFAULT_DTYPES = {"cuda": ("fp32", "bf16"), "cpu": ("fp32", "bf16")}
SMALL_GRID = Grid(rows=(4_096,), codes=(256, 1_024), dims=(64,))
SMALL_DTYPES = ("fp32",)


def search_inputs(num_rows: int, num_codes: int, dim: int, dtype: torch.dtype, device: str,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [N, D]`` and ``codebook [K, D]``, standard normal, generated on ``device``."""
    generator = torch.Generator(device).manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator, dtype=dtype, device=device)
    codebook = torch.randn(num_codes, dim, generator=generator, dtype=dtype, device=device)
    return z, codebook


def fastvq_search(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"):
    return fastvq.nearest_code(z, codebook, metric=metric)


def cdist_argmin(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(dim=1)


def expanded_l2_argmin(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    return distance_matrix_ref(z, codebook, metric, upcast=False).argmin(dim=1)


def bare_matmul(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    return z @ codebook.T


def faiss_index(codebook: torch.Tensor, metric: str):
    """The exact FAISS index of ``codebook``: ``IndexFlatL2`` for l2, ``IndexFlatIP`` for dot."""
    import faiss

    index = (faiss.IndexFlatL2 if metric == "l2" else faiss.IndexFlatIP)(codebook.shape[1])
    index.add(codebook.numpy())
    return index


def faiss_search(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", index=None):
    """FAISS's nearest code (k = 1) of every row: ``(distances [N, 1], labels [N, 1])``."""
    return (index if index is not None else faiss_index(codebook, metric)).search(z.numpy(), 1)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable[..., object]
    backend: Optional[str]  # FASTVQ_BACKEND while it runs; None for the baselines
    builds_matrix: bool
    metrics: tuple[str, ...] = METRICS
    # Whether it runs for fp16/bf16 (the baselines are timed in fp32 only).
    all_dtypes: bool = False


def implementations(device: str) -> list[Implementation]:
    fastvq_impls = [Implementation("fastvq", fastvq_search, "auto", builds_matrix=False, all_dtypes=True)]
    on_cuda = device.startswith("cuda")
    if compiled_backend.cuda_available() if on_cuda else compiled_backend.available():
        compiled = "cuda" if on_cuda else "cpp"
        fastvq_impls.append(Implementation(f"fastvq-{compiled}", fastvq_search, compiled, builds_matrix=False,
                                           all_dtypes=on_cuda))
    if on_cuda or compiled_backend.available():
        fastvq_impls.append(Implementation("fastvq-torch", fastvq_search, "torch", builds_matrix=False))
    with_faiss = not on_cuda and faiss_available()
    peers = [Implementation("faiss", faiss_search, None, builds_matrix=False)] if with_faiss else []
    return fastvq_impls + peers + [
        Implementation("cdist", cdist_argmin, None, builds_matrix=True, metrics=("l2",)),
        Implementation("z2+e2-2ze", expanded_l2_argmin, None, builds_matrix=True, metrics=("l2",)),
        Implementation("matmul", bare_matmul, None, builds_matrix=True),
    ]


def isa_of(impl_name: str, dtype_name: str, device: str) -> tuple[str, str]:
    """``(kernel, vector_isa)`` of what an implementation ran on the CPU; ``("", "")`` on CUDA."""
    if device.startswith("cuda"):
        return "", ""
    aten_isa = {"AVX512": "AVX-512F", "AVX2": "AVX2"}.get(torch.backends.cpu.get_cpu_capability(),
                                                          torch.backends.cpu.get_cpu_capability())
    if impl_name == "faiss":
        import faiss

        options = faiss.get_compile_options()
        return "faiss IndexFlat", "AVX-512F" if "AVX512" in options else "AVX2" if "AVX2" in options else options
    if impl_name in ("fastvq", "fastvq-cpp") and compiled_backend.available():
        kernel = json.loads(torch.ops.fastvq_C.cpu_search_kernels())[dtype_name]
        for prefix, isa in (("avx512bf16", "AVX512-BF16"), ("avx512", "AVX-512F"), ("avx2", "AVX2")):
            if kernel.startswith(prefix):
                return kernel, isa
        return kernel, aten_isa
    return "aten", aten_isa


def matrix_limit_bytes(device: str) -> int:
    """The largest ``N x K`` matrix a baseline may build. On CUDA a quarter of the free memory,
    because ``z2+e2-2ze`` holds about three such matrices at once."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the previous point's cached blocks are free memory too
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        return free_bytes // 4
    return CPU_MATRIX_LIMIT_BYTES


def measure_point(num_rows: int, num_codes: int, dim: int, dtype_name: str, metric: str, device: str,
                  threads: Optional[int] = None, with_memory: bool = True) -> list[dict]:
    """One row per implementation at one grid point; one that failed says so in its note."""
    dtype = DTYPES[dtype_name]
    flop_count = 2 * num_rows * num_codes * dim
    matrix_bytes = num_rows * num_codes * dtype.itemsize
    limit_bytes = matrix_limit_bytes(device)
    make_inputs = functools.partial(search_inputs, num_rows, num_codes, dim, dtype, device)
    make_warmup_inputs = functools.partial(search_inputs, WARMUP_ROWS, WARMUP_CODES, dim, dtype, device)
    z, codebook = make_inputs()
    impls = [impl for impl in implementations(device)
             if metric in impl.metrics and (dtype_name == "fp32" or impl.all_dtypes)]
    rows, calls = [], {}
    for impl in impls:
        kernel, vector_isa = isa_of(impl.name, dtype_name, device)
        row = {"bench": BENCH, "impl": impl.name, "N": num_rows, "K": num_codes, "D": dim, "dtype": dtype_name,
               "metric": metric, "threads": threads, **dict.fromkeys(MEASURED_COLUMNS), "note": "",
               "kernel": kernel, "vector_isa": vector_isa, "load1": os.getloadavg()[0]}
        rows.append(row)
        if impl.builds_matrix and matrix_bytes > limit_bytes:
            row["note"] = (f"skipped: the N x K matrix needs {matrix_bytes / _harness.GIB:.1f} GiB, "
                           f"limit {limit_bytes / _harness.GIB:.1f} GiB")
            print(f"  {impl.name}: {row['note']}")
            continue
        index = faiss_index(codebook, metric) if impl.name == "faiss" else None
        extra = {"index": index} if index is not None else {}
        calls[impl.name] = (impl, functools.partial(impl.fn, z, codebook, metric, **extra))
    # fastvq and FAISS call for call, so that a change in the machine's load hits both alike.
    paired = [name for name in ("fastvq", "faiss") if name in calls]
    groups = ([paired] if paired else []) + [[name] for name in calls if name not in paired]
    timings, outputs = {}, {}

    def run(impl_name: str) -> None:
        impl, call = calls[impl_name]
        with _harness.environment_variable("FASTVQ_BACKEND", impl.backend):
            outputs[impl_name] = call()

    for group in groups:
        try:
            timings.update(_harness.time_interleaved({name: functools.partial(run, name) for name in group}, device))
        except Exception as error:  # keep measuring the rest of the grid, and say what failed
            first_line = str(error).splitlines()[0] if str(error) else ""
            for row in rows:
                if row["impl"] in group:
                    row["note"] = f"failed: {type(error).__name__}: {first_line}"
                    print(f"  {row['impl']}: {row['note']}")
    for row in rows:
        timing = timings.get(row["impl"])
        if timing is None:
            continue
        row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms,
                   tflops=_harness.tflops(flop_count, timing.median_ms))
        if with_memory:
            impl = calls[row["impl"]][0]
            fn = functools.partial(impl.fn, metric=metric)
            with _harness.environment_variable("FASTVQ_BACKEND", impl.backend):
                row["peak_mib"] = _harness.peak_memory_growth_mib(fn, make_inputs, make_warmup_inputs, device)
    by_impl = {row["impl"]: row for row in rows}
    if (matmul_ms := by_impl.get("matmul", {}).get("median_ms")) is not None:
        for row in rows:
            if row["median_ms"] is not None:
                row["vs_matmul"] = row["median_ms"] / matmul_ms
    if "faiss" in outputs and by_impl["faiss"]["median_ms"] is not None:
        faiss_labels = torch.from_numpy(outputs["faiss"][1][:, 0])
        for name in ("fastvq", "fastvq-cpp"):
            if name in outputs and by_impl[name]["median_ms"] is not None:
                by_impl[name]["vs_faiss"] = by_impl["faiss"]["median_ms"] / by_impl[name]["median_ms"]
                agreement = (outputs[name][0] == faiss_labels).double().mean().item()
                by_impl[name]["agreement"] = by_impl["faiss"]["agreement"] = agreement
    return rows


@dataclass(frozen=True)
class Point:
    """One search: ``N`` rows of dimension ``D`` among ``K`` codes; ``memory_check`` marks the
    N = K = 65 536 measurement, which runs once, at the run's last (largest) thread count."""

    N: int
    K: int
    D: int
    dtype: str
    metric: str
    memory_check: bool = False

    def __str__(self) -> str:
        kind = "memory check: " if self.memory_check else ""
        return f"{kind}N={self.N} K={self.K} D={self.D} {self.dtype} {self.metric}"


MEMORY_CHECK_POINT = Point(MEMORY_CHECK_SIZE, MEMORY_CHECK_SIZE, MEMORY_CHECK_DIM, "fp32", "l2", memory_check=True)


def points(args: argparse.Namespace) -> list[Point]:
    """The grid for the device (on CPU with the few-rows point and the memory check), ``--small``'s
    tiny grid, or the memory check alone; fp32 first at each shape, so that ``vs_fp32`` has its
    reference."""
    if args.memory_check:
        return [MEMORY_CHECK_POINT]
    on_cpu = args.device == "cpu"
    if args.small:
        shapes, dtypes, metrics = SMALL_GRID.points(), args.dtypes or SMALL_DTYPES, args.metrics or ("l2",)
    else:
        shapes = FULL_GRIDS[args.device].points() + list(EXTRA_CPU_POINTS if on_cpu else ())
        dtypes, metrics = args.dtypes or DEFAULT_DTYPES[args.device], args.metrics or METRICS
    grid = [Point(n, k, d, dtype, metric) for metric in metrics for n, k, d in shapes
            for dtype in sorted(dtypes, key=lambda name: name != "fp32")]
    return grid + ([MEMORY_CHECK_POINT] if on_cpu and not args.small else [])


# fastvq's fp32 time per (shape, metric, impl, threads), for the other dtypes' vs_fp32.
_FP32_MS: dict[tuple, float] = {}


def measure(point: Point, run: _harness.Run) -> list[dict]:
    if point.memory_check:
        return measure_memory_check(run) if run.last_threads else []
    if run.threads is not None:
        _faiss_threads(run.threads)
    rows = measure_point(point.N, point.K, point.D, point.dtype, point.metric, run.device, run.threads,
                            with_memory=run.first_threads)
    for row in rows:
        key = (point.N, point.K, point.D, point.metric, row["impl"], run.threads)
        if point.dtype == "fp32" and row["median_ms"] is not None:
            _FP32_MS[key] = row["median_ms"]
        elif (reference_ms := _FP32_MS.get(key)) and row["median_ms"]:
            row["vs_fp32"] = reference_ms / row["median_ms"]
    return rows


def _faiss_threads(threads: int) -> None:
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def measure_memory_check(run: _harness.Run) -> list[dict]:
    """N = K = 65 536, D = 32 in fp32; fastvq's row says "failed" if it grows memory by 256 MiB or more."""
    size, dim = MEMORY_CHECK_SIZE, MEMORY_CHECK_DIM
    rows = measure_point(size, size, dim, "fp32", "l2", run.device, run.threads)
    fastvq_row = next(row for row in rows if row["impl"] == "fastvq")
    if fastvq_row["peak_mib"] is None:
        print(f"memory check FAILED: fastvq did not run ({fastvq_row['note']})")
        return rows
    passed = fastvq_row["peak_mib"] < MEMORY_CHECK_LIMIT_MIB
    full_matrix_gib = size * size * 4 / _harness.GIB
    verdict = (f"nearest_code at N=K={size}, D={dim} grew peak memory by {fastvq_row['peak_mib']:.1f} MiB (limit "
               f"{MEMORY_CHECK_LIMIT_MIB} MiB; the full fp32 distance matrix would take {full_matrix_gib:.0f} GiB)")
    print(f"memory check {'passed' if passed else 'FAILED'}: {verdict}")
    if not passed:
        fastvq_row["note"] = f"failed: memory check: {verdict}"
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--memory-check", action="store_true",
                        help=f"only the N=K={MEMORY_CHECK_SIZE}, D={MEMORY_CHECK_DIM} memory measurement")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                        help="default: fp32 and bf16 (--small: fp32; the memory check is always fp32)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, help="default: l2 and dot (--small: l2)")


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.small and args.memory_check:
        parser.error("--small and --memory-check are separate modes; pass one")


def default_threads(args: argparse.Namespace) -> list[int]:
    """1 and all cores for the grids; PyTorch's count for --small; all cores for the memory check."""
    cores = len(os.sched_getaffinity(0))
    if args.memory_check:
        return [cores]
    return [torch.get_num_threads()] if args.small else list(dict.fromkeys((1, cores)))


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("search", points, measure, KEY_COLUMNS, TABLE_COLUMNS, description=__doc__.split("\n\n")[0],
                         add_arguments=add_arguments, check_arguments=check_arguments,
                         default_threads=default_threads, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
