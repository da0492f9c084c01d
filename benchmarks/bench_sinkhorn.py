"""Sinkhorn assignment: ``fastvq.sinkhorn_assign`` against one ``nearest_code`` call and against OptVQ's own
Sinkhorn (which builds the ``N x K`` plan), on the same input.

    python benchmarks/bench_sinkhorn.py [--small] [--iters 3] [--device cpu|cuda] [--threads N ...] [--out DIR]

The point: N = 16 384 rows, K = 16 384 codes, D = 256, fp32, standard-normal rows and codes scaled by 0.1;
``--iters`` Sinkhorn iterations (3). Implementations, timed interleaved call for call
(``_harness.time_interleaved``), so that the load of a shared machine falls on all alike:

- ``fastvq-optvq``: ``sinkhorn_assign`` in OptVQ's configuration (Euclidean cost standardised as its
  ``normalize_mode="all"``, the column update first, its ``1e-8`` guard, ``epsilon = 1 / 10``): a statistics
  pass, then ``2 * iters`` passes, the last row pass taking the argmax;
- ``fastvq-plain``: ``sinkhorn_assign`` with the squared l2 cost as it is and the row update first:
  ``2 * iters + 1`` passes, the last an argmax pass;
- ``nearest_code``: one ``fastvq.nearest_code`` call (l2), the yardstick: each pass recomputes the same
  products and adds an exponential, so the goal is at most ``1.5 * (2 * iters + 1)`` times it
  (``vs_nearest_code``, the goal in ``goal_x``);
- ``optvq``: OptVQ's ``VectorQuantizerSinkhorn.quantize_input`` path on the same rows and codes
  (``torch.cdist``, ``normalize(mode="all")``, ``sinkhorn``, argmax), from its file vendored in
  ``tests/originals/optvq/`` (``use_prob=False``).

``peak_mib``: the growth of peak memory over the inputs of one call (``_harness.peak_memory_growth_mib``: a
fresh process on CPU), for ``fastvq-optvq`` and ``optvq``; the goal for fastvq is 64 MiB (the plan alone is
1 GiB). ``agreement``: the share of rows whose code equals OptVQ's. Results are merged into
``<out>/sinkhorn/<machine>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import _harness
import torch

import fastvq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _optvq import load_optvq_quantizer  # noqa: E402

KEY_COLUMNS = ("N", "K", "D", "dtype", "iters")
TABLE_COLUMNS = ("bench", "impl", "N", "K", "D", "dtype", "iters", "median_ms", "q20_ms", "q80_ms", "peak_mib",
                 "vs_nearest_code", "goal_x", "agreement", "load1", "note")
POINT = (16384, 16384, 256)
SMALL_POINT = (512, 1024, 64)
OPTVQ_EPSILON = 10.0
PEAK_GOAL_MIB = 64


def make_inputs(num_rows: int, num_codes: int, dim: int, device: str = "cpu"):
    generator = torch.Generator().manual_seed(0)
    z = 0.1 * torch.randn(num_rows, dim, generator=generator)
    codebook = 0.1 * torch.randn(num_codes, dim, generator=generator)
    return z.to(device), codebook.to(device)


def fastvq_optvq(z, codebook, iters):
    return fastvq.sinkhorn_assign(z, codebook, epsilon=1 / OPTVQ_EPSILON, iters=iters, metric="euclidean",
                                  normalize="standardize", order="columns_first", sum_eps=1e-8)[0]


def fastvq_plain(z, codebook, iters):
    return fastvq.sinkhorn_assign(z, codebook, epsilon=0.5, iters=iters)[0]


def nearest(z, codebook, iters):
    return fastvq.nearest_code(z, codebook)[0]


def optvq(z, codebook, iters):
    module = load_optvq_quantizer()
    layer = module.VectorQuantizerSinkhorn(epsilon=OPTVQ_EPSILON, n_iters=iters, normalize_mode="all",
                                           use_prob=False, n_e=codebook.shape[0], e_dim=codebook.shape[1])
    with torch.no_grad():
        return layer.quantize_input(z, codebook)[0]


IMPLEMENTATIONS = {"fastvq-optvq": fastvq_optvq, "fastvq-plain": fastvq_plain, "nearest_code": nearest,
                   "optvq": optvq}


def measure(point, run: _harness.Run) -> list[dict]:
    num_rows, num_codes, dim, iters = point
    z, codebook = make_inputs(num_rows, num_codes, dim, run.device)
    calls = {name: functools.partial(fn, z, codebook, iters) for name, fn in IMPLEMENTATIONS.items()}
    timings = _harness.time_interleaved(calls, run.device, cpu_budget_s=0.5, min_repeats=3, max_repeats=20)
    ours, theirs = fastvq_optvq(z, codebook, iters), optvq(z, codebook, iters)
    agreement = (ours.cpu() == theirs.cpu()).double().mean().item()
    rows = []
    for name, timing in timings.items():
        row = {"bench": "sinkhorn", "impl": name, "N": num_rows, "K": num_codes, "D": dim, "dtype": "fp32",
               "iters": iters, "median_ms": timing.median_ms, "q20_ms": timing.q20_ms, "q80_ms": timing.q80_ms,
               "peak_mib": None, "vs_nearest_code": timing.median_ms / timings["nearest_code"].median_ms,
               "goal_x": 1.5 * (2 * iters + 1) if name.startswith("fastvq") else None,
               "agreement": agreement if name == "fastvq-optvq" else None, "load1": os.getloadavg()[0], "note": ""}
        if name in ("fastvq-optvq", "optvq") and run.first_threads:
            row["peak_mib"] = _harness.peak_memory_growth_mib(
                functools.partial(IMPLEMENTATIONS[name], iters=iters),
                functools.partial(make_inputs, num_rows, num_codes, dim, run.device),
                functools.partial(make_inputs, 64, 64, dim, run.device), run.device)
            if name == "fastvq-optvq":
                verdict = "met" if row["peak_mib"] <= PEAK_GOAL_MIB else "missed"
                row["note"] = f"peak goal {PEAK_GOAL_MIB} MiB: {verdict}"
        if name.startswith("fastvq"):
            met = row["vs_nearest_code"] <= row["goal_x"]
            row["note"] = "; ".join(filter(None, [row["note"], f"time goal {'met' if met else 'missed'}"]))
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iters", type=int, default=3, help="Sinkhorn iterations (default: %(default)s)")


def points(args: argparse.Namespace):
    return [(*(SMALL_POINT if args.small else POINT), args.iters)]


if __name__ == "__main__":
    sys.exit(_harness.main("sinkhorn", points, measure, KEY_COLUMNS, TABLE_COLUMNS,
                           description=__doc__.splitlines()[0], add_arguments=add_arguments))
