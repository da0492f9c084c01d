"""EMA codebook update: ``fastvq.ema_update_`` (the fused segment reduce) against the ways VQ code bases write it.

    python benchmarks/bench_segment_reduce.py [--small] [--device cpu|cuda] [--threads N ...] [--out DIR]

One EMA step of a ``K x D`` codebook from ``N`` rows and their code indices (VQ-VAE's appendix: the
per-code counts and sums, then the moving averages, Laplace smoothing and the division), fp32,
standard-normal rows, uniform random indices, decay 0.99, eps 1e-5:

- ``fastvq``: ``fastvq.ema_update_`` with ``FASTVQ_BACKEND=auto`` (on CPU the C++ segment reduce of
  ``fastvq._C`` when it is built; on CUDA the Triton kernels);
- ``fastvq-torch``: the same with ``FASTVQ_BACKEND=torch`` (left out on CPU without ``fastvq._C``);
- ``one-hot``: the counts and sums through ``F.one_hot(indices, K).float()`` (``one_hot.sum(0)``,
  ``one_hot.T @ z``), as vector-quantize-pytorch and the VQ-VAE code bases write it: an ``N x K``
  matrix, skipped with a note where it would not fit (over 4 GiB on CPU, a quarter of the free
  memory on CUDA);
- ``index_add``: ``torch.bincount`` and ``index_add_``, the matrix-free way to write it in PyTorch.

All of them are timed against each other at each point, call for call (``_harness.time_interleaved``),
so that their ratios hold on a shared machine. Each row reports the median and 20/80 % quantiles in
ms, ``gb_per_s`` (the ``N x D`` rows read once, in GB/s: the update is memory-bound), ``vs_one_hot``
(the one-hot update's time over this row's), peak memory growth (``peak_mib``, measured at the first
thread count, see ``_harness.peak_memory_growth_mib``) and ``max_abs_error``: the largest difference
of the updated codebook from ``fastvq.reference.ema_update_ref_`` (float64 sums) after one step from
the same state. Results are merged into ``<out>/segment_reduce/<machine>.csv`` and ``.md``
(``_harness.main``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Optional

import _harness
import torch
import torch.nn.functional as F

import fastvq
from fastvq.backends import cpp as compiled_backend
from fastvq.reference import ema_update_ref_

BENCH = "ema_update"
DECAY = 0.99
EPS = 1e-5
KEY_COLUMNS = ("N", "K", "D", "dtype", "threads")
TABLE_COLUMNS = ("impl", "N", "K", "D", "threads", "median_ms", "q20_ms", "q80_ms", "gb_per_s", "vs_one_hot",
                 "peak_mib", "max_abs_error", "load1", "note")
GRIDS = {
    # N, K, D: a batch of image tokens against the usual codebook sizes; sized for a 2-core machine.
    "cpu": [(16_384, 1_024, 64), (16_384, 8_192, 64), (16_384, 1_024, 256)],
    "cuda": [(262_144, 1_024, 64), (262_144, 16_384, 256), (1_048_576, 8_192, 64)],
}
SMALL_GRID = [(4_096, 256, 64), (16_384, 1_024, 32)]
WARMUP_ROWS = WARMUP_CODES = 16
CPU_MATRIX_LIMIT_BYTES = 4 * _harness.GIB


def ema_inputs(num_rows: int, num_codes: int, dim: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(codebook [K, D], cluster_size [K], embed_avg [K, D], z [N, D], indices int64 [N])``, fp32,
    the state of a codebook some steps into training (every count positive)."""
    generator = torch.Generator().manual_seed(seed)
    codebook = torch.randn(num_codes, dim, generator=generator)
    cluster_size = torch.rand(num_codes, generator=generator) + 0.5
    embed_avg = codebook * cluster_size[:, None]
    z = torch.randn(num_rows, dim, generator=generator)
    indices = torch.randint(0, num_codes, (num_rows,), generator=generator)
    return tuple(tensor.to(device) for tensor in (codebook, cluster_size, embed_avg, z, indices))


def fastvq_update(codebook, cluster_size, embed_avg, z, indices) -> None:
    fastvq.ema_update_(codebook, cluster_size, embed_avg, z, indices, decay=DECAY, eps=EPS)


def _smoothed_update(codebook, cluster_size, embed_avg, counts, sums) -> None:
    """The moving averages, Laplace smoothing and division, as the VQ-VAE code bases write them."""
    cluster_size.lerp_(counts, 1.0 - DECAY)
    embed_avg.lerp_(sums, 1.0 - DECAY)
    total = cluster_size.sum()
    smoothed = (cluster_size + EPS) / (total + codebook.shape[0] * EPS) * total
    codebook.copy_(embed_avg / smoothed[:, None])


def one_hot_update(codebook, cluster_size, embed_avg, z, indices) -> None:
    one_hot = F.one_hot(indices, codebook.shape[0]).to(z.dtype)
    _smoothed_update(codebook, cluster_size, embed_avg, one_hot.sum(dim=0), one_hot.T @ z)


def index_add_update(codebook, cluster_size, embed_avg, z, indices) -> None:
    counts = torch.bincount(indices, minlength=codebook.shape[0]).to(z.dtype)
    sums = torch.zeros_like(embed_avg).index_add_(0, indices, z)
    _smoothed_update(codebook, cluster_size, embed_avg, counts, sums)


def implementations(device: str) -> list[tuple[str, Callable, Optional[str], bool]]:
    """``(name, update, FASTVQ_BACKEND, builds the N x K matrix)``."""
    impls = [("fastvq", fastvq_update, "auto", False)]
    if device.startswith("cuda") or compiled_backend.available():
        impls.append(("fastvq-torch", fastvq_update, "torch", False))
    return impls + [("one-hot", one_hot_update, None, True), ("index_add", index_add_update, None, False)]


def matrix_limit_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(torch.device(device))[0] // 4
    return CPU_MATRIX_LIMIT_BYTES


def points(args: argparse.Namespace) -> list[tuple[int, int, int]]:
    return SMALL_GRID if args.small else GRIDS[args.device]


def measure(point: tuple[int, int, int], run: _harness.Run) -> list[dict]:
    num_rows, num_codes, dim = point
    device = run.device
    make_inputs = functools.partial(ema_inputs, num_rows, num_codes, dim, device)
    make_warmup = functools.partial(ema_inputs, WARMUP_ROWS, WARMUP_CODES, dim, device)
    expected = make_inputs()
    ema_update_ref_(*expected, decay=DECAY, eps=EPS)
    rows, calls = {}, {}
    for name, update, backend, builds_matrix in implementations(device):
        row = {"bench": BENCH, "impl": name, "N": num_rows, "K": num_codes, "D": dim, "dtype": "fp32",
               "threads": run.threads, "load1": os.getloadavg()[0], "note": ""}
        rows[name] = row
        if builds_matrix and num_rows * num_codes * 4 > matrix_limit_bytes(device):
            row["note"] = f"skipped: the N x K one-hot matrix needs {num_rows * num_codes * 4 / _harness.GIB:.1f} GiB"
            continue
        try:
            with _harness.environment_variable("FASTVQ_BACKEND", backend):
                state = make_inputs()
                update(*state)
            row["max_abs_error"] = (state[0] - expected[0]).abs().max().item()
        except Exception as error:  # keep measuring the others, and say what failed
            row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"  {name}: {row['note']}", flush=True)
            continue
        calls[name] = (update, backend, state)

    def call(name: str) -> None:
        update, backend, state = calls[name]
        with _harness.environment_variable("FASTVQ_BACKEND", backend):
            update(*state)

    timings = _harness.time_interleaved({name: functools.partial(call, name) for name in calls}, device)
    for name, timing in timings.items():
        row = rows[name]
        row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms,
                   gb_per_s=num_rows * dim * 4 / (timing.median_ms * 1e-3) / 1e9)
        if run.first_threads:
            update, backend, _ = calls[name]
            with _harness.environment_variable("FASTVQ_BACKEND", backend):
                row["peak_mib"] = _harness.peak_memory_growth_mib(update, make_inputs, make_warmup, device)
    if (one_hot_ms := rows["one-hot"].get("median_ms")) is not None:
        for row in rows.values():
            if row.get("median_ms"):
                row["vs_one_hot"] = one_hot_ms / row["median_ms"]
    return list(rows.values())


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("segment_reduce", points, measure, KEY_COLUMNS, TABLE_COLUMNS,
                         description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
