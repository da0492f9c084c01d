"""Nearest-code search: ``fastvq.nearest_code`` against the ways PyTorch users write it today.

    python benchmarks/bench_search.py [--small] [--memory-check] [--device cpu|cuda]
                                      [--dtypes fp32 bf16 ...] [--metrics l2 dot] [--threads 1 2]
                                      [--out DIR]

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
``<out>/<device-slug>.csv`` and ``.md``. The exit status is non-zero if any implementation failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

import _harness
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
    peers = [Implementation("faiss", faiss_search, None, builds_matrix=False)] if not on_cuda and faiss_available() else []
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
                  threads: Optional[int] = None, with_memory: bool = True) -> tuple[list[dict], bool]:
    """One row per implementation at one grid point, and whether every implementation ran."""
    dtype = DTYPES[dtype_name]
    flop_count = 2 * num_rows * num_codes * dim
    matrix_bytes = num_rows * num_codes * dtype.itemsize
    limit_bytes = matrix_limit_bytes(device)
    make_inputs = functools.partial(search_inputs, num_rows, num_codes, dim, dtype, device)
    make_warmup_inputs = functools.partial(search_inputs, WARMUP_ROWS, WARMUP_CODES, dim, dtype, device)
    z, codebook = make_inputs()
    impls = [impl for impl in implementations(device)
             if metric in impl.metrics and (dtype_name == "fp32" or impl.all_dtypes)]
    rows, all_ran, calls = [], True, {}
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
            all_ran = False
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
    return rows, all_ran


def run_grid(grid: Grid, dtype_names: tuple[str, ...], metrics: tuple[str, ...], device: str,
             thread_counts: tuple[Optional[int], ...], extra_points: tuple = (),
             save: Callable[[list[dict]], object] = lambda rows: None) -> tuple[list[dict], bool]:
    """Every point at every thread count; ``save`` gets each point's rows as soon as they are measured."""
    rows, all_ran = [], True
    points = grid.points() + list(extra_points)
    for metric in metrics:
        for num_rows, num_codes, dim in points:
            fp32_ms = {}
            for dtype_name in sorted(dtype_names, key=lambda name: name != "fp32"):
                for position, threads in enumerate(thread_counts):
                    if threads is not None:
                        torch.set_num_threads(threads)
                        _faiss_threads(threads)
                    print(f"N={num_rows} K={num_codes} D={dim} {dtype_name} {metric} threads={threads}", flush=True)
                    point_rows, point_ran = measure_point(num_rows, num_codes, dim, dtype_name, metric, device,
                                                          threads, with_memory=position == 0)
                    for row in point_rows:
                        if dtype_name == "fp32" and row["median_ms"] is not None:
                            fp32_ms[row["impl"], threads] = row["median_ms"]
                        elif (reference_ms := fp32_ms.get((row["impl"], threads))) and row["median_ms"]:
                            row["vs_fp32"] = reference_ms / row["median_ms"]
                    rows += point_rows
                    all_ran &= point_ran
                    save(point_rows)
    return rows, all_ran


def _faiss_threads(threads: int) -> None:
    if faiss_available():
        import faiss

        faiss.omp_set_num_threads(threads)


def run_memory_check(device: str) -> tuple[list[dict], bool]:
    """Measures N = K = 65 536, D = 32 in fp32; passes if ``fastvq`` grows memory by < 256 MiB."""
    size, dim = MEMORY_CHECK_SIZE, MEMORY_CHECK_DIM
    print(f"memory check: N={size} K={size} D={dim} fp32", flush=True)
    rows, all_ran = measure_point(size, size, dim, "fp32", "l2", device,
                                  None if device.startswith("cuda") else torch.get_num_threads())
    fastvq_row = next(row for row in rows if row["impl"] == "fastvq")
    if fastvq_row["peak_mib"] is None:
        print(f"memory check FAILED: fastvq did not run ({fastvq_row['note']})")
        return rows, False
    passed = fastvq_row["peak_mib"] < MEMORY_CHECK_LIMIT_MIB
    full_matrix_gib = size * size * 4 / _harness.GIB
    print(f"memory check {'passed' if passed else 'FAILED'}: nearest_code at N=K={size}, D={dim} grew peak "
          f"memory by {fastvq_row['peak_mib']:.1f} MiB (limit {MEMORY_CHECK_LIMIT_MIB} MiB; the full fp32 "
          f"distance matrix would take {full_matrix_gib:.0f} GiB)")
    return rows, passed and all_ran


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny grid that finishes in well under a minute")
    parser.add_argument("--memory-check", action="store_true",
                        help=f"only the N=K={MEMORY_CHECK_SIZE}, D={MEMORY_CHECK_DIM} memory measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                        help="default: fp32 and bf16 on CUDA, fp32 on CPU (the memory check is always fp32)")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, help="default: l2 and dot (--small: l2)")
    parser.add_argument("--threads", nargs="+", type=int,
                        help="CPU thread counts to run every point at (default: 1 and all cores; --small: PyTorch's)")
    parser.add_argument("--out", type=Path, default=_harness.RESULTS_DIR, help="directory of the result files")
    args = parser.parse_args(argv)
    if args.small and args.memory_check:
        parser.error("--small and --memory-check are separate modes; pass one")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU and a CUDA build of torch; torch.cuda.is_available() is False")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    environment = _harness.environment(args.device)
    print(", ".join(f"{name} {value}" for name, value in environment.items()))
    if warning := _harness.cpu_contention_warning():
        print(warning)
    on_cpu = args.device == "cpu"
    cores = len(os.sched_getaffinity(0))
    written: list[dict] = []

    def save(point_rows: list[dict]) -> tuple[Path, Path]:
        """Merges rows into the results files at once, so that an interrupted run keeps what it measured."""
        written.extend(_harness.with_machine_columns({**row, **environment}, args.device) for row in point_rows)
        return _harness.write_results(written, args.device, KEY_COLUMNS, args.out)

    if args.memory_check:
        check_rows, ok = run_memory_check(args.device)
        save(check_rows)
    elif args.small:
        threads = tuple(args.threads or ((torch.get_num_threads(),) if on_cpu else (None,)))
        rows, ok = run_grid(SMALL_GRID, tuple(args.dtypes or SMALL_DTYPES), tuple(args.metrics or ("l2",)),
                            args.device, threads, save=save)
    else:
        threads = tuple(args.threads or (tuple(dict.fromkeys((1, cores))) if on_cpu else (None,)))
        rows, ok = run_grid(FULL_GRIDS[args.device], tuple(args.dtypes or DEFAULT_DTYPES[args.device]),
                            tuple(args.metrics or METRICS), args.device, threads,
                            EXTRA_CPU_POINTS if on_cpu else (), save=save)
        if on_cpu:
            torch.set_num_threads(cores)
            check_rows, check_ok = run_memory_check(args.device)
            save(check_rows)
            ok = ok and check_ok
    csv_path, md_path = _harness.write_results(written, args.device, KEY_COLUMNS, args.out)
    rows = written
    print()
    print(_harness.format_table(rows, TABLE_COLUMNS))
    print(f"\nwrote {csv_path} and {md_path}")
    if warning := _harness.cpu_contention_warning():
        print(warning)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
