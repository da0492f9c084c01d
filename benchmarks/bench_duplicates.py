"""What the op layer's exact-duplicate remap costs the nearest-code search.

    python benchmarks/bench_duplicates.py [--small] [--device cpu|cuda] [--threads N ...] [--out DIR]

Every argmin search (``nearest_code``, ``vector_quantize``) maps each chosen index to the lowest
index of its code's exact-duplicate group (``fastvq.backends.duplicate_codes.find_duplicate_codes``: an
exact integer hash of every code, a sort of the hashes, a comparison of neighbours), so that ties
go to the lowest index on every backend. Per point ``(N, K, D)`` in fp32 this times:

- ``find``: ``find_duplicate_codes(codebook)`` alone;
- ``search``: ``fastvq.nearest_code(z, codebook)`` as it runs (with the remap);
- ``search-no-remap``: the same call with the remap switched off (the op layer's
  ``_lowest_duplicate`` replaced by the identity), measured interleaved with ``search``.

Each twice: ``codebook=distinct`` (random codes: on CPU the remap is skipped once the hashes show
no two equal codes) and ``codebook=duplicates`` (every tenth code a copy of another, so the groups
are built and the indices gathered). ``overhead`` is ``search`` over ``search-no-remap`` minus 1.
``load1`` is the host's one-minute load average when the point started. Results are merged into
``<out>/duplicates/<machine>.csv`` and ``.md`` (``_harness.main``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import _harness
import torch

import fastvq
from fastvq.backends.duplicate_codes import find_duplicate_codes
from fastvq.ops import search as search_ops

GRID = [(256, 16384, 256), (1024, 16384, 256), (4096, 4096, 256), (4096, 1024, 64), (65536, 512, 64)]
SMALL_GRID = [(256, 1024, 64), (2048, 512, 32)]
KEY_COLUMNS = ("N", "K", "D", "codebook", "threads")


def inputs(num_rows: int, num_codes: int, dim: int, duplicates: bool, device: str):
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(num_codes, dim, generator=generator)
    if duplicates:
        copies = torch.arange(0, num_codes, 10)
        codebook[copies] = codebook[torch.randint(0, num_codes, (copies.numel(),), generator=generator)].clone()
    z = torch.randn(num_rows, dim, generator=generator)
    return z.to(device), codebook.to(device)


def time_remap(shape: tuple[int, int, int], duplicates: bool, device: str, threads: Optional[int]) -> list[dict]:
    num_rows, num_codes, dim = shape
    z, codebook = inputs(num_rows, num_codes, dim, duplicates, device)
    load1 = os.getloadavg()[0]
    original = search_ops.lowest_duplicate

    def without_remap(indices, codebook, sampled):
        return indices

    def search_without_remap():
        search_ops.lowest_duplicate = without_remap
        try:
            return fastvq.nearest_code(z, codebook)
        finally:
            search_ops.lowest_duplicate = original

    timings = {"find": _harness.time_call(lambda: find_duplicate_codes(codebook), device)}
    # Interleaved, three rounds each, so a change in the machine's load shows in both.
    rounds = {"search": [], "search-no-remap": []}
    for _ in range(3):
        rounds["search"].append(_harness.time_call(lambda: fastvq.nearest_code(z, codebook), device))
        rounds["search-no-remap"].append(_harness.time_call(search_without_remap, device))
    for name, timing in rounds.items():
        timings[name] = min(timing, key=lambda t: t.median_ms)
    base = dict(N=num_rows, K=num_codes, D=dim, codebook="duplicates" if duplicates else "distinct",
                threads=threads if device == "cpu" else "", load1=round(load1, 2))
    overhead = timings["search"].median_ms / timings["search-no-remap"].median_ms - 1.0
    return [
        {"bench": "duplicate_remap", "impl": name, **base, "median_ms": t.median_ms, "q20_ms": t.q20_ms,
         "q80_ms": t.q80_ms, "overhead": overhead if name == "search" else None}
        for name, t in timings.items()
    ]


def points(args: argparse.Namespace) -> list[tuple[tuple[int, int, int], bool]]:
    """Each ``((N, K, D), duplicates)`` of the grid (``--small``: the tiny one), distinct codes first."""
    return [(shape, duplicates) for shape in (SMALL_GRID if args.small else GRID) for duplicates in (False, True)]


def measure(point: tuple[tuple[int, int, int], bool], run: _harness.Run) -> list[dict]:
    shape, duplicates = point
    return time_remap(shape, duplicates, run.device, run.threads)


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("duplicates", points, measure, KEY_COLUMNS,
                         ("impl", *KEY_COLUMNS, "median_ms", "overhead", "load1"),
                         description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
