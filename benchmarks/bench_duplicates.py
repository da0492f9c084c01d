"""What the op layer's exact-duplicate remap costs the nearest-code search.

    python benchmarks/bench_duplicates.py [--small] [--device cpu|cuda] [--threads N] [--out DIR]

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
``<out>/<device-slug>.csv`` and ``.md`` (default ``benchmarks/results/duplicates/``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import torch

import _harness
import fastvq
from fastvq import _ops
from fastvq.backends.duplicate_codes import find_duplicate_codes

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


def measure(point, duplicates: bool, device: str, threads: Optional[int]) -> list[dict]:
    num_rows, num_codes, dim = point
    z, codebook = inputs(num_rows, num_codes, dim, duplicates, device)
    load1 = os.getloadavg()[0]
    original = _ops._lowest_duplicate

    def without_remap(indices, codebook, sampled):
        return indices

    def search_without_remap():
        _ops._lowest_duplicate = without_remap
        try:
            return fastvq.nearest_code(z, codebook)
        finally:
            _ops._lowest_duplicate = original

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


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="a tiny grid that finishes in seconds")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (PyTorch's default)")
    parser.add_argument("--out", type=Path, default=_harness.RESULTS_DIR / "duplicates", help="directory of the result files")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    environment = _harness.environment(args.device)
    warning = _harness.cpu_contention_warning() if args.device == "cpu" else ""
    if warning:
        print(warning, file=sys.stderr)
    rows = []
    for point in SMALL_GRID if args.small else GRID:
        for duplicates in (False, True):
            rows += measure(point, duplicates, args.device, threads)
            print(_harness.format_table(rows[-3:], ("impl", *KEY_COLUMNS, "median_ms", "overhead", "load1")), flush=True)
    csv_path, md_path = _harness.write_results([{**row, **environment} for row in rows], args.device, KEY_COLUMNS, args.out)
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
