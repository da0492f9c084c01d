"""LFQ's entropy terms: ``fastvq.code_entropy`` against vector-quantize-pytorch's formulation over all 2^d codes.

    python benchmarks/bench_code_entropy.py [--small] [--device cpu|cuda] [--threads N ...] [--out DIR]

Lookup-free quantization's entropy loss needs, for each of ``N`` rows, a distribution over the
``2^d`` implicit codes of ``d`` bits. At each point ``(N, G, d)`` (``G`` groups, fp32 bit logits,
standard normal) this times, forward (``fwd``) and forward + backward (``fwd+bwd``) of LFQ's loss
``sample_entropy.mean() - clamped_entropy(avg_probs).mean()``:

- ``fastvq``: ``fastvq.code_entropy`` (``FASTVQ_BACKEND=auto``: the PyTorch path of batched GEMMs
  and sorts over half the bits on CPU, the Triton kernels on CUDA), which never builds ``N x 2^d``;
- ``full-matrix``: ``fastvq.reference.code_entropy_ref(upcast=False)``, the logits of every code,
  their softmax and clamped log in fp32, as vector-quantize-pytorch's ``LFQ`` computes them:
  skipped with a note where its matrices (about four ``N x G x 2^d`` fp32 copies alive) would not
  fit (4 GiB on CPU, half the free memory on CUDA).

Both at a point are timed against each other, call for call (``_harness.time_interleaved``). Rows
report the median and 20/80 % quantiles in ms, ``vs_full_matrix`` (the full matrix's time over this
row's), the peak memory growth (``peak_mib``, at the first thread count) and, on fastvq's
``fwd+bwd`` row, ``max_rel_error``: the largest error of both outputs and the gradient against the
float64 full-matrix reference, relative to each tensor's largest entry (where that reference fits).
Results are merged into ``<out>/code_entropy/<machine>.csv`` and ``.md`` (``_harness.main``).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Optional

import _harness
import torch

import fastvq.functional as vqf
from fastvq.reference import clamped_entropy_ref, code_entropy_ref

BENCH = "code_entropy"
KEY_COLUMNS = ("N", "G", "d", "dtype", "mode", "threads")
TABLE_COLUMNS = ("impl", "mode", "N", "G", "d", "threads", "median_ms", "q20_ms", "q80_ms", "vs_full_matrix",
                 "peak_mib", "max_rel_error", "load1", "note")
GRIDS = {
    "cpu": [(8_192, 1, 10), (8_192, 1, 14), (8_192, 1, 16)],
    "cuda": [(65_536, 1, 14), (65_536, 1, 18), (16_384, 4, 16)],
}
SMALL_GRID = [(1_024, 1, 8), (1_024, 2, 12)]
MODES = ("fwd", "fwd+bwd")
WARMUP_ROWS = 8
CPU_MATRIX_LIMIT_BYTES = 4 * _harness.GIB
MATRICES_ALIVE = 4


def entropy_inputs(num_rows: int, groups: int, bits: int, device: str, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[torch.Tensor]:
    """``(bit_logits [N, G, d],)``, standard normal, a leaf that requires its gradient."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, groups, bits, generator=generator, dtype=torch.float64)
    return (logits.to(device, dtype).requires_grad_(),)


def _loss(sample_entropy: torch.Tensor, avg_probs: torch.Tensor) -> torch.Tensor:
    return sample_entropy.mean() - clamped_entropy_ref(avg_probs).mean()


def fastvq_forward(bit_logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _loss(*vqf.code_entropy(bit_logits))


def fastvq_step(bit_logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(_loss(*vqf.code_entropy(bit_logits)), bit_logits)
    return grad


def full_matrix_forward(bit_logits: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _loss(*code_entropy_ref(bit_logits, upcast=False))


def full_matrix_step(bit_logits: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(_loss(*code_entropy_ref(bit_logits, upcast=False)), bit_logits)
    return grad


IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "fastvq": {"fwd": fastvq_forward, "fwd+bwd": fastvq_step},
    "full-matrix": {"fwd": full_matrix_forward, "fwd+bwd": full_matrix_step},
}


def matrix_limit_bytes(device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(torch.device(device))[0] // 2
    return CPU_MATRIX_LIMIT_BYTES


def max_relative_error(num_rows: int, groups: int, bits: int, device: str) -> float:
    """fastvq's outputs and gradient in fp32 against the float64 full-matrix reference."""
    (logits,) = entropy_inputs(num_rows, groups, bits, device)
    (truth_logits,) = entropy_inputs(num_rows, groups, bits, device, torch.float64)
    got = vqf.code_entropy(logits)
    truth = code_entropy_ref(truth_logits)
    pairs = [*zip(got, truth), (fastvq_step(logits), full_matrix_step(truth_logits))]
    return max(float((a.double() - e).abs().max()) / max(float(e.abs().max()), 1e-300) for a, e in pairs)


def points(args: argparse.Namespace) -> list[tuple[tuple[int, int, int], str]]:
    """``((N, G, d), mode)`` of the grid (``--small``: the tiny one), forward first."""
    return [(shape, mode) for shape in (SMALL_GRID if args.small else GRIDS[args.device]) for mode in MODES]


def measure(point: tuple[tuple[int, int, int], str], run: _harness.Run) -> list[dict]:
    (num_rows, groups, bits), mode = point
    device = run.device
    make_inputs = functools.partial(entropy_inputs, num_rows, groups, bits, device)
    make_warmup = functools.partial(entropy_inputs, WARMUP_ROWS, groups, bits, device)
    matrix_bytes = MATRICES_ALIVE * num_rows * groups * 2**bits * 4
    rows, calls = {}, {}
    for name, modes in IMPLEMENTATIONS.items():
        rows[name] = {"bench": BENCH, "impl": name, "mode": mode, "N": num_rows, "G": groups, "d": bits,
                      "dtype": "fp32", "threads": run.threads, "load1": os.getloadavg()[0], "note": ""}
        if name == "full-matrix" and matrix_bytes > matrix_limit_bytes(device):
            rows[name]["note"] = f"skipped: its N x G x 2^d matrices need about {matrix_bytes / _harness.GIB:.1f} GiB"
            continue
        calls[name] = modes[mode]
    inputs = make_inputs()
    try:
        timings = _harness.time_interleaved({name: functools.partial(fn, *inputs) for name, fn in calls.items()},
                                            device)
    except Exception as error:  # keep measuring the other points, and say what failed
        for name in calls:
            rows[name]["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return list(rows.values())
    for name, timing in timings.items():
        rows[name].update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
        if run.first_threads:
            rows[name]["peak_mib"] = _harness.peak_memory_growth_mib(calls[name], make_inputs, make_warmup, device)
    if (full_ms := rows["full-matrix"].get("median_ms")) is not None:
        for row in rows.values():
            row["vs_full_matrix"] = full_ms / row["median_ms"]
    # The float64 reference holds twice the fp32 matrices.
    if mode == "fwd+bwd" and run.first_threads and 2 * matrix_bytes <= matrix_limit_bytes(device):
        rows["fastvq"]["max_rel_error"] = max_relative_error(num_rows, groups, bits, device)
    return list(rows.values())


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("code_entropy", points, measure, KEY_COLUMNS, TABLE_COLUMNS,
                         description=__doc__.split("\n\n")[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
