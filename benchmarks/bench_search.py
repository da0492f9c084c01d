"""Nearest-code search: ``fastvq.nearest_code`` against the ways PyTorch users write it today.

    python benchmarks/bench_search.py [--small] [--memory-check] [--device cpu|cuda]
                                      [--dtypes fp32 bf16 ...] [--out DIR]

Implementations compared at every grid point (squared L2, random normal data):

- ``fastvq``: ``fastvq.nearest_code`` with ``FASTVQ_BACKEND=auto`` (Triton on CUDA; on CPU the C++
  kernel of ``fastvq._C`` when it is built, else the chunked PyTorch path);
- ``fastvq-cpp`` / ``fastvq-cuda``: the same with ``FASTVQ_BACKEND=cpp`` on CPU / ``cuda`` on CUDA,
  where ``fastvq._C`` has that backend;
- ``fastvq-torch``: the same with ``FASTVQ_BACKEND=torch`` (left out on CPU without ``fastvq._C``,
  where it is ``fastvq``);
- ``cdist``: ``torch.cdist(z, codebook).argmin(1)``;
- ``z2+e2-2ze``: ``fastvq.reference.distance_matrix_ref(..., upcast=False).argmin(1)``, the
  expanded form of the VQ-VAE code bases;
- ``matmul``: the bare ``z @ codebook.T`` in the input dtype, the floor every search pays.

Each row reports the median and 20%/80% quantiles in ms, TFLOP/s counting the search's
``2 N K D`` flops, peak memory growth in MiB and the time relative to ``matmul``. The three
baselines build the ``N x K`` matrix; a baseline whose matrix would not fit (over 4 GiB on CPU,
over a quarter of the free memory on CUDA) is skipped with a note.

Modes: the default grid for the device (on CPU followed by the memory check); ``--small``, a
tiny grid that finishes in well under a minute; ``--memory-check``, which measures
``nearest_code`` at N = K = 65 536, D = 32, where the fp32 distance matrix would take 16 GiB, and
exits non-zero if it needs 256 MiB or more. Results are merged into
``<out>/<device-slug>.csv`` and ``.md``. The exit status is non-zero if any implementation failed.
"""

from __future__ import annotations

import argparse
import functools
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
METRIC = "l2"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Inputs of the memory measurement's warm-up call: big enough to run every code path, too small
# to register in the peak.
WARMUP_ROWS = WARMUP_CODES = 16
MEMORY_CHECK_SIZE = 65_536
MEMORY_CHECK_DIM = 32
MEMORY_CHECK_LIMIT_MIB = 256
CPU_MATRIX_LIMIT_BYTES = 4 * _harness.GIB
# None in a row's measured column means it was not measured; the row's note says why.
MEASURED_COLUMNS = ("median_ms", "q20_ms", "q80_ms", "tflops", "peak_mib", "vs_matmul")
# load1, the host's 1-minute load average as the row's measurement starts, tells timings taken
# while other processes shared the CPU from clean ones.
# A row is one implementation searching N vectors of dimension D among K codes.
KEY_COLUMNS = ("N", "K", "D", "dtype", "metric")
TABLE_COLUMNS = ("impl", "N", "K", "D", "dtype", *MEASURED_COLUMNS, "load1", "note")


@dataclass(frozen=True)
class Grid:
    rows: tuple[int, ...]
    codes: tuple[int, ...]
    dims: tuple[int, ...]

    def points(self) -> list[tuple[int, int, int]]:
        return [(n, k, d) for n in self.rows for k in self.codes for d in self.dims]


FULL_GRIDS = {
    "cuda": Grid(rows=(65_536,), codes=(1_024, 8_192, 65_536), dims=(64, 256)),
    # Sized for a 2-core machine to finish in a few minutes.
    "cpu": Grid(rows=(16_384,), codes=(1_024, 8_192), dims=(64, 256)),
}
DEFAULT_DTYPES = {"cuda": ("fp32", "bf16"), "cpu": ("fp32",)}
SMALL_GRID = Grid(rows=(4_096,), codes=(256, 1_024), dims=(64,))
SMALL_DTYPES = ("fp32",)


def search_inputs(num_rows: int, num_codes: int, dim: int, dtype: torch.dtype, device: str,
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [N, D]`` and ``codebook [K, D]``, standard normal, generated on ``device``."""
    generator = torch.Generator(device).manual_seed(seed)
    z = torch.randn(num_rows, dim, generator=generator, dtype=dtype, device=device)
    codebook = torch.randn(num_codes, dim, generator=generator, dtype=dtype, device=device)
    return z, codebook


def fastvq_search(z: torch.Tensor, codebook: torch.Tensor):
    return fastvq.nearest_code(z, codebook, metric=METRIC)


def cdist_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return torch.cdist(z, codebook).argmin(dim=1)


def expanded_l2_argmin(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return distance_matrix_ref(z, codebook, METRIC, upcast=False).argmin(dim=1)


def bare_matmul(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return z @ codebook.T


@dataclass(frozen=True)
class Implementation:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], object]
    backend: Optional[str]  # FASTVQ_BACKEND while it runs; None for the plain PyTorch baselines
    builds_matrix: bool


def implementations(device: str) -> list[Implementation]:
    fastvq_impls = [Implementation("fastvq", fastvq_search, "auto", builds_matrix=False)]
    on_cuda = device.startswith("cuda")
    if compiled_backend.cuda_available() if on_cuda else compiled_backend.available():
        compiled = "cuda" if on_cuda else "cpp"
        fastvq_impls.append(Implementation(f"fastvq-{compiled}", fastvq_search, compiled, builds_matrix=False))
    if on_cuda or compiled_backend.available():
        fastvq_impls.append(Implementation("fastvq-torch", fastvq_search, "torch", builds_matrix=False))
    return fastvq_impls + [
        Implementation("cdist", cdist_argmin, None, builds_matrix=True),
        Implementation("z2+e2-2ze", expanded_l2_argmin, None, builds_matrix=True),
        Implementation("matmul", bare_matmul, None, builds_matrix=True),
    ]


def matrix_limit_bytes(device: str) -> int:
    """The largest ``N x K`` matrix a baseline may build. On CUDA a quarter of the free memory,
    because ``z2+e2-2ze`` holds about three such matrices at once."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the previous point's cached blocks are free memory too
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
        return free_bytes // 4
    return CPU_MATRIX_LIMIT_BYTES


def measure_point(num_rows: int, num_codes: int, dim: int, dtype_name: str, device: str) -> tuple[list[dict], bool]:
    """One row per implementation at one grid point, and whether every implementation ran."""
    dtype = DTYPES[dtype_name]
    flop_count = 2 * num_rows * num_codes * dim
    matrix_bytes = num_rows * num_codes * dtype.itemsize
    limit_bytes = matrix_limit_bytes(device)
    make_inputs = functools.partial(search_inputs, num_rows, num_codes, dim, dtype, device)
    make_warmup_inputs = functools.partial(search_inputs, WARMUP_ROWS, WARMUP_CODES, dim, dtype, device)
    z, codebook = make_inputs()
    rows, all_ran = [], True
    for impl in implementations(device):
        row = {"bench": BENCH, "impl": impl.name, "N": num_rows, "K": num_codes, "D": dim,
               "dtype": dtype_name, "metric": METRIC, **dict.fromkeys(MEASURED_COLUMNS), "note": "",
               "load1": os.getloadavg()[0]}
        if impl.builds_matrix and matrix_bytes > limit_bytes:
            row["note"] = (f"skipped: the N x K matrix needs {matrix_bytes / _harness.GIB:.1f} GiB, "
                           f"limit {limit_bytes / _harness.GIB:.1f} GiB")
            print(f"  {impl.name}: {row['note']}")
        else:
            try:
                with _harness.environment_variable("FASTVQ_BACKEND", impl.backend):
                    timing = _harness.time_call(functools.partial(impl.fn, z, codebook), device)
                    peak_mib = _harness.peak_memory_growth_mib(impl.fn, make_inputs, make_warmup_inputs, device)
            except Exception as error:  # keep measuring the rest of the grid, and say what failed
                all_ran = False
                first_line = str(error).splitlines()[0] if str(error) else ""
                row["note"] = f"failed: {type(error).__name__}: {first_line}"
                print(f"  {impl.name}: {row['note']}")
            else:
                row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms,
                           tflops=_harness.tflops(flop_count, timing.median_ms), peak_mib=peak_mib)
        rows.append(row)
    matmul_ms = next((row["median_ms"] for row in rows if row["impl"] == "matmul"), None)
    if matmul_ms is not None:
        for row in rows:
            if row["median_ms"] is not None:
                row["vs_matmul"] = row["median_ms"] / matmul_ms
    return rows, all_ran


def run_grid(grid: Grid, dtype_names: tuple[str, ...], device: str) -> tuple[list[dict], bool]:
    rows, all_ran = [], True
    for dtype_name in dtype_names:
        for num_rows, num_codes, dim in grid.points():
            print(f"N={num_rows} K={num_codes} D={dim} {dtype_name}", flush=True)
            point_rows, point_ran = measure_point(num_rows, num_codes, dim, dtype_name, device)
            rows += point_rows
            all_ran &= point_ran
    return rows, all_ran


def run_memory_check(device: str) -> tuple[list[dict], bool]:
    """Measures N = K = 65 536, D = 32 in fp32; passes if ``fastvq`` grows memory by < 256 MiB."""
    size, dim = MEMORY_CHECK_SIZE, MEMORY_CHECK_DIM
    print(f"memory check: N={size} K={size} D={dim} fp32", flush=True)
    rows, all_ran = measure_point(size, size, dim, "fp32", device)
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
    if args.memory_check:
        rows, ok = run_memory_check(args.device)
    elif args.small:
        rows, ok = run_grid(SMALL_GRID, tuple(args.dtypes or SMALL_DTYPES), args.device)
    else:
        rows, ok = run_grid(FULL_GRIDS[args.device], tuple(args.dtypes or DEFAULT_DTYPES[args.device]), args.device)
        if args.device == "cpu":
            check_rows, check_ok = run_memory_check(args.device)
            rows, ok = rows + check_rows, ok and check_ok
    csv_path, md_path = _harness.write_results([{**row, **environment} for row in rows], args.device, KEY_COLUMNS,
                                               args.out)
    print()
    print(_harness.format_table(rows, TABLE_COLUMNS))
    print(f"\nwrote {csv_path} and {md_path}")
    if warning := _harness.cpu_contention_warning():
        print(warning)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
