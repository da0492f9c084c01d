"""Soft assignments: ``fastvq.soft_quantize`` and the IBQ layer against the formulations users run
today, which build the ``N x K`` logits, soft and hard one-hot matrices.

    python benchmarks/bench_soft_quantize.py [--small] [--only soft_quantize|ibq_step|ibq_parity]
                                             [--points N,K,D ...] [--dtype fp32|bf16] [--device cpu|cuda]
                                             [--out DIR]

Benches (``dot`` logits, IBQ's, standard-normal data scaled by 0.1; fp32):

- ``soft_quantize``, forward and backward of ``sum(soft * g)`` with respect to ``z`` and the
  codebook, at each ``(N, K, D)``:
  ``fastvq`` (``FASTVQ_BACKEND=auto``: Triton on CUDA, ``fastvq._C``'s C++ kernels on CPU), with the
  hard index; ``sdpa``,
  ``torch.nn.functional.scaled_dot_product_attention(z, C, C, scale=1)`` (the soft codes only:
  no hard index, no log-sum-exp); ``reference``, ``fastvq.reference.soft_quantize_ref`` in fp32 (the
  full matrices); and, forward only, the hard fused search ``nearest_code`` and the hard VQ op
  ``vector_quantize`` forward and backward, the goals' yardstick (``vs_search``).
- ``--dtype bf16``: the ``soft_quantize`` bench on bf16 ``z``, codebook and upstream, with two more
  ``fastvq`` rows timed in the same rounds: ``fastvq-widened`` (``FASTVQ_CPU_SEARCH=avx512``: the
  bf16 values widened to fp32 in the kernels, where ``fastvq`` takes the AVX512-BF16 logit products
  on a CPU that has them) and ``fastvq-fp32`` (the same values in fp32).
- ``ibq_step``: one IBQ training step, forward and backward of ``sum(z_q * g) + quant_loss +
  0.05 * entropy_loss`` (SEED-Voken's 2^18-code configuration weights the entropy loss 0.05), of
  ``fastvq.nn.IBQ(use_entropy_loss=True)`` and of ``reference.ibq_ref`` (SEED-Voken's formulation);
  the reference is skipped where its matrices would not fit. ``vs_reference_peak`` is the peak
  memory growth over the reference's.
- ``ibq_parity``: fastvq's IBQ in float64 and in float32 against ``ibq_ref`` in float64 at a size
  where the reference fits: the largest error of the output, the losses and both gradients,
  relative to each tensor's largest true entry.

Timings are the harness's: the implementations at one point are timed against each other on the
same inputs, call for call (``time_interleaved``; median and 20/80 % quantiles; CUDA events on a
GPU), so their ratios hold on a shared machine whose load changes. An IBQ step where the reference
cannot run takes minutes on a CPU: it is run once, in a fresh process, which gives both its time
and its peak memory (note "one call"). Peak memory is the growth of a fresh process's resident set
(CPU) or of the CUDA caching allocator over the inputs. Results are merged into
``<out>/soft_quantize/<machine>.csv`` and ``.md`` (``_harness.main``).
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
from fastvq import reference

ENTROPY_LOSS_WEIGHT = 0.05
# Per-implementation memory limit for the formulations that build N x K matrices (3 of them
# plus their gradients, about 6 alive at the peak).
CPU_MATRIX_LIMIT_BYTES = 4 * _harness.GIB
MATRICES_ALIVE = 6
KEY_COLUMNS = ("N", "K", "D", "dtype", "mode")
MEASURED_COLUMNS = ("median_ms", "q20_ms", "q80_ms", "peak_mib")
TABLE_COLUMNS = ("bench", "impl", "mode", "N", "K", "D", "dtype", *MEASURED_COLUMNS, "vs_search", "vs_reference_peak",
                 "max_rel_error", "load1", "note")

SOFT_GRIDS = {"cpu": [(4096, 1024, 256), (4096, 16384, 256)], "cuda": [(16384, 16384, 256), (16384, 262144, 256)]}
IBQ_GRIDS = {"cpu": [(4096, 16384, 256), (4096, 262144, 256)], "cuda": [(4096, 16384, 256), (4096, 262144, 256)]}
PARITY_POINT = (1024, 16384, 256)
SMALL_SOFT_GRID = [(512, 1024, 64)]
SMALL_IBQ_GRID = [(256, 2048, 32)]
SMALL_PARITY_POINT = (128, 512, 16)
WARMUP_ROWS = WARMUP_CODES = 16
# From N K D = 2^34 multiply-adds a soft step takes tens of seconds on a shared 2-core CPU: one
# timed round after the warm-up round, so the point fits a 10-minute hold of the bench lock.
LONG_POINT_MACS = 2**34


def soft_inputs(num_rows: int, num_codes: int, dim: int, device: str, seed: int = 0,
                dtype: torch.dtype = torch.float32):
    """``z [N, D]``, ``codebook [K, D]``, upstream ``g [N, D]``, in ``dtype``."""
    generator = torch.Generator(device).manual_seed(seed)
    z = 0.1 * torch.randn(num_rows, dim, generator=generator, device=device)
    codebook = 0.1 * torch.randn(num_codes, dim, generator=generator, device=device)
    upstream = torch.randn(num_rows, dim, generator=generator, device=device)
    return z.to(dtype), codebook.to(dtype), upstream.to(dtype)


def _leaves(z, codebook):
    return z.detach().requires_grad_(True), codebook.detach().requires_grad_(True)


def fastvq_soft_step(z, codebook, upstream):
    z, codebook = _leaves(z, codebook)
    soft, _, _ = fastvq.soft_quantize(z, codebook, metric="dot")
    (soft * upstream).sum().backward()


def fastvq_widened_soft_step(z, codebook, upstream):
    """fastvq_soft_step with the kernels' bf16 logit products off: bf16 inputs widened to fp32."""
    previous = os.environ.get("FASTVQ_CPU_SEARCH")
    os.environ["FASTVQ_CPU_SEARCH"] = "avx512"
    try:
        fastvq_soft_step(z, codebook, upstream)
    finally:
        if previous is None:
            del os.environ["FASTVQ_CPU_SEARCH"]
        else:
            os.environ["FASTVQ_CPU_SEARCH"] = previous


def fastvq_fp32_soft_step(z, codebook, upstream):
    fastvq_soft_step(z.float(), codebook.float(), upstream.float())


def sdpa_step(z, codebook, upstream):
    z, codebook = _leaves(z, codebook)
    soft = F.scaled_dot_product_attention(z[None, None], codebook[None, None], codebook[None, None], scale=1.0)
    (soft[0, 0] * upstream).sum().backward()


def reference_soft_step(z, codebook, upstream):
    z, codebook = _leaves(z, codebook)
    soft, _, _ = reference.soft_quantize_ref(z, codebook, "dot", upcast=False)
    (soft * upstream).sum().backward()


def search_step(z, codebook, upstream):
    fastvq.nearest_code(z, codebook, metric="dot")


def vector_quantize_step(z, codebook, upstream):
    z, codebook = _leaves(z, codebook)
    quantized, _, loss = fastvq.vector_quantize(z, codebook, metric="dot")
    ((quantized * upstream).sum() + loss).backward()


def ibq_inputs(num_rows: int, num_codes: int, dim: int, device: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """``(layer, z [N/64, D, 8, 8], upstream)``: the layer holds the codebook, so that its
    construction is not counted in the step's memory growth."""
    z, codebook, upstream = soft_inputs(num_rows, num_codes, dim, device, seed)
    layer = fastvq.nn.IBQ(num_codes, dim, use_entropy_loss=True).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.embedding.weight.copy_(codebook)
    side = 8 if num_rows % 64 == 0 else 1
    images = z.to(dtype).reshape(num_rows // (side * side), side, side, dim).permute(0, 3, 1, 2)
    return layer, images, upstream.to(dtype).reshape(images.shape[0], side, side, dim).permute(0, 3, 1, 2)


def fastvq_ibq_step(layer, z, upstream):
    z = z.detach().requires_grad_(True)
    z_q, (quant_loss, _, _, entropy_loss), _ = layer(z)
    objective = (z_q * upstream).sum() + quant_loss + ENTROPY_LOSS_WEIGHT * entropy_loss
    objective.backward()
    return z_q, (quant_loss, entropy_loss), z.grad, layer.embedding.weight.grad


def reference_ibq_step(layer, z, upstream):
    z = z.detach().requires_grad_(True)
    codebook = layer.embedding.weight
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    quantized, _, quant_loss, (_, _, entropy_loss) = reference.ibq_ref(rows, codebook)
    z_q = quantized.reshape(z.shape[0], z.shape[2], z.shape[3], z.shape[1]).permute(0, 3, 1, 2)
    objective = (z_q * upstream).sum() + quant_loss + ENTROPY_LOSS_WEIGHT * entropy_loss
    objective.backward()
    return z_q, (quant_loss, entropy_loss), z.grad, codebook.grad


def _row(bench: str, impl: str, mode: str, num_rows: int, num_codes: int, dim: int, dtype: str = "fp32") -> dict:
    return {"bench": bench, "impl": impl, "mode": mode, "N": num_rows, "K": num_codes, "D": dim, "dtype": dtype,
            **dict.fromkeys(MEASURED_COLUMNS), "note": "", "load1": os.getloadavg()[0]}


def _fail(row: dict, error: Exception) -> None:
    first_line = str(error).splitlines()[0] if str(error) else ""
    row["note"] = f"failed: {type(error).__name__}: {first_line}"
    print(f"  {row['impl']}: {row['note']}", flush=True)


def _measure_interleaved(rows: list[dict], fns: list[Callable], make_inputs: Callable, make_warmup_inputs: Callable,
                         device: str, min_repeats: int) -> None:
    """Times the rows' calls against each other on the same inputs (``time_interleaved``: a change
    of the shared machine's load falls on all of them alike), then each one's peak memory in a
    fresh process; fills the rows (or their notes when they fail)."""
    try:
        inputs = make_inputs()
        timings = _harness.time_interleaved({row["impl"]: functools.partial(fn, *inputs) for row, fn in zip(rows, fns)},
                                            device, min_repeats=min_repeats)
        del inputs
    except Exception as error:  # keep measuring the rest, and say what failed
        for row in rows:
            _fail(row, error)
        return
    for row, fn in zip(rows, fns):
        timing = timings[row["impl"]]
        row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms)
        try:
            row["peak_mib"] = _harness.peak_memory_growth_mib(fn, make_inputs, make_warmup_inputs, device)
        except Exception as error:
            _fail(row, error)
            continue
        print(f"  {row['impl']} {row['mode']}: {timing.median_ms:.1f} ms, peak {row['peak_mib']:.1f} MiB", flush=True)


def _measure_once(row: dict, fn: Callable, make_inputs: Callable, make_warmup_inputs: Callable, device: str) -> None:
    """For a step that takes minutes on a CPU: one call in a fresh process gives both its time
    and its peak memory (after the harness's small warm-up), so the step runs once, not three
    times. On CUDA the harness's timing and allocator counters as usual."""
    if device.startswith("cuda"):
        _measure_interleaved([row], [fn], make_inputs, make_warmup_inputs, device, min_repeats=1)
        return
    try:
        milliseconds, peak_mib = _harness.once_with_peak_memory(fn, make_inputs, make_warmup_inputs, device)
    except Exception as error:
        _fail(row, error)
        return
    row.update(median_ms=milliseconds, q20_ms=milliseconds, q80_ms=milliseconds, peak_mib=peak_mib,
               note="one call, timed in its memory run")
    print(f"  {row['impl']} {row['mode']}: {milliseconds:.1f} ms (one call), peak {row['peak_mib']:.1f} MiB",
          flush=True)


def _too_big(row: dict, num_rows: int, num_codes: int, device: str) -> bool:
    needed = MATRICES_ALIVE * num_rows * num_codes * 4
    limit = CPU_MATRIX_LIMIT_BYTES
    if device.startswith("cuda"):
        limit = torch.cuda.mem_get_info(torch.device(device))[0] // 2
    if needed <= limit:
        return False
    row["note"] = (f"skipped: its N x K matrices need about {needed / _harness.GIB:.1f} GiB, "
                   f"limit {limit / _harness.GIB:.1f} GiB")
    print(f"  {row['impl']}: {row['note']}", flush=True)
    return True


SOFT_IMPLEMENTATIONS = [
    ("fastvq", "fwd+bwd", fastvq_soft_step, False),
    ("sdpa", "fwd+bwd", sdpa_step, False),
    ("reference", "fwd+bwd", reference_soft_step, True),
    ("nearest_code", "fwd", search_step, False),
    ("vector_quantize", "fwd+bwd", vector_quantize_step, False),
]


# --dtype bf16 adds these, timed in the same rounds as the others.
BF16_SOFT_IMPLEMENTATIONS = [
    ("fastvq-widened", "fwd+bwd", fastvq_widened_soft_step, False),
    ("fastvq-fp32", "fwd+bwd", fastvq_fp32_soft_step, False),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def measure_soft(num_rows: int, num_codes: int, dim: int, device: str, dtype_name: str = "fp32") -> list[dict]:
    dtype = DTYPES[dtype_name]
    make_inputs = functools.partial(soft_inputs, num_rows, num_codes, dim, device, dtype=dtype)
    make_warmup = functools.partial(soft_inputs, WARMUP_ROWS, WARMUP_CODES, dim, device, dtype=dtype)
    implementations = SOFT_IMPLEMENTATIONS + (BF16_SOFT_IMPLEMENTATIONS if dtype == torch.bfloat16 else [])
    point = [_row("soft_quantize", impl, mode, num_rows, num_codes, dim, dtype_name)
             for impl, mode, _, _ in implementations]
    runs = [(row, fn) for row, (_, _, fn, builds_matrices) in zip(point, implementations)
            if not (builds_matrices and _too_big(row, num_rows, num_codes, device))]
    _measure_interleaved([row for row, _ in runs], [fn for _, fn in runs], make_inputs, make_warmup, device,
                         min_repeats=1 if num_rows * num_codes * dim >= LONG_POINT_MACS else 2)
    search_ms = next(row["median_ms"] for row in point if row["impl"] == "nearest_code")
    for row in point:
        if row["median_ms"] is not None and search_ms:
            row["vs_search"] = row["median_ms"] / search_ms
    return point


def measure_ibq(num_rows: int, num_codes: int, dim: int, device: str) -> list[dict]:
    make_inputs = functools.partial(ibq_inputs, num_rows, num_codes, dim, device)
    make_warmup = functools.partial(ibq_inputs, 64, WARMUP_CODES, dim, device)
    point = [_row("ibq_step", impl, "fwd+bwd", num_rows, num_codes, dim) for impl in ("fastvq", "reference")]
    fastvq_row, reference_row = point
    if _too_big(reference_row, num_rows, num_codes, device):
        # Only fastvq runs here, a step of minutes on a CPU: timed once, in its memory run.
        _measure_once(fastvq_row, fastvq_ibq_step, make_inputs, make_warmup, device)
    else:
        _measure_interleaved(point, [fastvq_ibq_step, reference_ibq_step], make_inputs, make_warmup, device,
                             min_repeats=1 if num_rows * num_codes * dim >= LONG_POINT_MACS else 2)
    if fastvq_row["peak_mib"] is not None and reference_row["peak_mib"]:
        fastvq_row["vs_reference_peak"] = fastvq_row["peak_mib"] / reference_row["peak_mib"]
    return point


def _max_relative_error(actual, expected) -> float:
    pairs = [(actual[0], expected[0]), *zip(actual[1], expected[1]), (actual[2], expected[2]), (actual[3], expected[3])]
    return max(float((a.double() - e).abs().max()) / max(float(e.abs().max()), 1e-300) for a, e in pairs)


def measure_parity(num_rows: int, num_codes: int, dim: int, device: str) -> list[dict]:
    truth = reference_ibq_step(*ibq_inputs(num_rows, num_codes, dim, device, torch.float64))
    truth = (truth[0].detach(), [loss.detach() for loss in truth[1]], truth[2], truth[3])
    rows = []
    for dtype_name, dtype in (("fp64", torch.float64), ("fp32", torch.float32)):
        row = _row("ibq_parity", "fastvq", "fwd+bwd", num_rows, num_codes, dim, dtype_name)
        if dtype == torch.float64 and device.startswith("cuda"):
            row["note"] = "float64 runs the PyTorch path on CUDA"
        got = fastvq_ibq_step(*ibq_inputs(num_rows, num_codes, dim, device, dtype))
        detached = (got[0].detach(), [loss.detach() for loss in got[1]], got[2], got[3])
        row["max_rel_error"] = _max_relative_error(detached, truth)
        print(f"  {dtype_name}: max relative error {row['max_rel_error']:.3g}", flush=True)
        rows.append(row)
    return rows


def _point(text: str) -> tuple[int, int, int]:
    try:
        num_rows, num_codes, dim = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N,K,D (three integers), got {text!r}") from None
    return num_rows, num_codes, dim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", choices=BENCHES, help="run one bench")
    parser.add_argument("--points", type=_point, nargs="+", metavar="N,K,D",
                        help="the (N, K, D) points of the soft_quantize and ibq_step benches instead of their grids")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="the soft_quantize bench's dtype (bf16 adds the widened and fp32 fastvq rows)")


BENCHES = ("soft_quantize", "ibq_step", "ibq_parity")
MEASURES = {"soft_quantize": measure_soft, "ibq_step": measure_ibq, "ibq_parity": measure_parity}


def points(args: argparse.Namespace) -> list[tuple[str, tuple[int, int, int]]]:
    """``(bench, (N, K, D))`` of each bench (``--only``: one of them), in ``BENCHES``' order."""
    grids = {
        "soft_quantize": args.points or (SMALL_SOFT_GRID if args.small else SOFT_GRIDS[args.device]),
        "ibq_step": args.points or (SMALL_IBQ_GRID if args.small else IBQ_GRIDS[args.device]),
        "ibq_parity": [SMALL_PARITY_POINT if args.small else PARITY_POINT],
    }
    return [(bench, point) for bench in BENCHES if args.only in (None, bench) for point in grids[bench]]


def measure(point: tuple[str, tuple[int, int, int]], run: _harness.Run) -> list[dict]:
    bench, (num_rows, num_codes, dim) = point
    if bench == "soft_quantize":
        return measure_soft(num_rows, num_codes, dim, run.device, run.args.dtype)
    return MEASURES[bench](num_rows, num_codes, dim, run.device)


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("soft_quantize", points, measure, KEY_COLUMNS, TABLE_COLUMNS,
                         description=__doc__.split("\n\n")[0], add_arguments=add_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
