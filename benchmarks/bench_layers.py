"""Layer benchmark: fastvq's layers against vector-quantize-pytorch's.

Both libraries get the same configuration (VectorQuantize/ResidualVQ: EMA codebook, their default
rotation-trick gradient; FSQ, LFQ, HierarchicalVQ: their defaults) and the same input; one step is
a training forward plus backward. Reported per size: median time with 20/80 % quantiles, the two
libraries' steps called in turn (``_harness.time_interleaved``, so their ratio holds on a shared
machine), and the peak memory the step needs on top of its inputs and the layer (see
``_harness.peak_memory_growth_mib`` for how memory is measured on CPU and CUDA). VectorQuantize and
ResidualVQ rows also carry ``tflops``: the nearest-code search's ``2 N K D`` flops per quantizer
(``flops_counted``), the one flop-bound part of a step, over the step's time, so ``fraction_of_peak``
says how close the whole step comes to the time its search alone would take at the machine's peak.
``--dtypes bf16`` runs the layer and its input in bf16 (``module.to(torch.bfloat16)``: codebook, EMA
buffers and activations), both libraries alike; fastvq's rows name the search kernel's instruction set.

    python benchmarks/bench_layers.py                 # VectorQuantize and ResidualVQ, default grid
    python benchmarks/bench_layers.py --target-only   # only N = 65 536, K = 16 384, D = 256
    python benchmarks/bench_layers.py --dtypes fp32 bf16 --codes 512 2048 8192   # bf16 rows too
    python benchmarks/bench_layers.py --layers LFQ FSQ HierarchicalVQ   # the scalar/LFQ/multi-scale grids
    python benchmarks/bench_layers.py --layers LFQ --codes 65536 262144 --once   # LFQ's goal points

LFQ's rows carry the codebook size K = 2^D (D bits); its entropy loss is where vector-quantize-pytorch
builds N x 2^D matrices. FSQ's K is the product of its levels (``FSQ_LEVELS``). HierarchicalVQ
quantizes [B, D, 16, 16] maps at VAR's scales; its N is B * 16 * 16.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import re
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402

BENCH = "layers"
LAYERS = ("VectorQuantize", "ResidualVQ")
# The grids of the other layers, (N, K, D) per device.
QUANTIZER_GRIDS = {
    "LFQ": {
        "cpu": [(8192, 2**bits, bits) for bits in (12, 14, 16, 18)],
        "cuda": [(8192, 2**bits, bits) for bits in (12, 14, 16, 18)] + [(65536, 2**18, 18)],
    },
    "FSQ": {"cpu": [(65536, 1000, 4), (65536, 64000, 6)], "cuda": [(262144, 1000, 4), (262144, 64000, 6)]},
    "HierarchicalVQ": {"cpu": [(8192, 4096, 32)], "cuda": [(65536, 4096, 32)]},
}
FSQ_LEVELS = {1000: [8, 5, 5, 5], 64000: [8, 8, 8, 5, 5, 5]}  # the FSQ paper's 1k and Cosmos' 64k grids
HVQ_SCALES = (1, 2, 3, 4, 6, 8, 10, 13, 16)  # VAR's scales on a 16 x 16 map
HVQ_MAP = 16
LIBRARIES = ("fastvq", "vector-quantize-pytorch")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RESIDUAL_DEPTH = 4
TARGET = (65536, 16384, 256)  # the memory figure: 65 536 vectors, K = 16 384, D = 256
SMALL = (1024, 256, 32)
GRIDS = {
    "cuda": [(65536, size, 256) for size in (512, 2048, 8192, 16384, 65536)],
    "cpu": [(8192, size, 64) for size in (512, 2048, 8192, 65536)],
}
# A row is one layer at one size: N vectors of dimension D, K codes.
KEY_COLUMNS = ("N", "K", "D", "dtype")
TABLE_COLUMNS = ("impl", "N", "K", "D", "median_ms", "q20_ms", "q80_ms", "peak_mib", "vs_theirs", "note")


def build_layer(library: str, layer: str, num_codes: int, dim: int, device: str,
                dtype: str = "fp32") -> torch.nn.Module:
    torch.manual_seed(0)
    if library == "fastvq":
        import fastvq.nn as module
    else:
        import vector_quantize_pytorch as module
    if layer == "VectorQuantize":
        made = module.VectorQuantize(dim=dim, codebook_size=num_codes, decay=0.8)
    elif layer == "ResidualVQ":
        made = module.ResidualVQ(dim=dim, num_quantizers=RESIDUAL_DEPTH, codebook_size=num_codes, decay=0.8)
    elif layer == "LFQ":
        made = module.LFQ(dim=dim, codebook_size=num_codes)
    elif layer == "FSQ":
        made = module.FSQ(levels=FSQ_LEVELS[num_codes])
    else:
        # k-means initialisation is a one-time cost; the step measured is the steady one.
        made = module.HierarchicalVQ(dim=dim, codebook_size=num_codes, scales=HVQ_SCALES, accept_image_fmap=True,
                                     kmeans_init=False)
    return made.to(device=device, dtype=DTYPES[dtype]).train()


def step_inputs(library: str, layer: str, num_rows: int, num_codes: int, dim: int, device: str,
                dtype: str = "fp32"):
    """The layer and an input that requires grad, both in ``dtype``: ``[1, N, D]`` (batch 1: N is the
    vector count), or for HierarchicalVQ ``[N / 256, D, 16, 16]`` maps."""
    generator = torch.Generator().manual_seed(1)
    if layer == "HierarchicalVQ":
        shape = (max(1, num_rows // HVQ_MAP**2), dim, HVQ_MAP, HVQ_MAP)
    else:
        shape = (1, num_rows, dim)
    x = torch.randn(shape, generator=generator).to(device=device, dtype=DTYPES[dtype]).requires_grad_()
    return build_layer(library, layer, num_codes, dim, device, dtype), x


def warmup_inputs(library: str, layer: str, num_codes: int, dim: int, device: str, dtype: str = "fp32"):
    if layer == "FSQ":  # FSQ's size is its levels
        return step_inputs(library, layer, 64, num_codes, dim, device, dtype)
    if layer == "LFQ":
        return step_inputs(library, layer, 64, 2**4, 4, device, dtype)
    return step_inputs(library, layer, 64 if layer != "HierarchicalVQ" else HVQ_MAP**2, min(num_codes, 64), dim,
                       device, dtype)


def search_flops(layer: str, num_rows: int, num_codes: int, dim: int) -> Optional[int]:
    """The nearest-code search's flops in one step (``2 N K D`` per quantizer), or ``None`` for the layers
    whose step is not a search over K codes (LFQ, FSQ) or searches several scales (HierarchicalVQ)."""
    levels = {"VectorQuantize": 1, "ResidualVQ": RESIDUAL_DEPTH}.get(layer)
    return None if levels is None else 2 * num_rows * num_codes * dim * levels


def search_isa(library: str, dtype: str, device: str) -> str:
    """The instruction set of the search a layer runs in ``dtype`` on the CPU: fastvq's C++ kernel's; for
    the other library's bf16 distance matmul AVX512-BF16 where the CPU has it (ATen hands bf16 matmuls to
    oneDNN, whose ``avx512_core_bf16`` kernel runs them: ``ONEDNN_VERBOSE=1`` shows it); else ``""``, the
    harness's default (also on CUDA and without fastvq._C)."""
    from fastvq.backends import cpp

    if device.startswith("cuda") or not cpp.available():
        return ""
    if library != "fastvq":
        return "AVX512-BF16" if dtype == "bf16" and "AVX512-BF16" in _harness.cpu_isas() else ""
    kernel = json.loads(torch.ops.fastvq_C.cpu_search_kernels())[dtype]
    prefixes = (("avx512bf16", "AVX512-BF16"), ("avx512", "AVX-512F"), ("avx2", "AVX2"))
    return next((isa for prefix, isa in prefixes if kernel.startswith(prefix)), "")


def training_step(module: torch.nn.Module, x: torch.Tensor) -> None:
    outputs = module(x)
    loss = outputs[0].square().mean()
    if len(outputs) > 2:  # FSQ has no loss
        loss = loss + outputs[2].sum()
    loss.backward()


def time_steps(factories: dict, device: str, repeats: int) -> dict:
    """Each library's training step, timed against the others call for call
    (``_harness.time_interleaved``), so a change in the machine's load falls on all alike."""
    steps = {}
    for library, make_inputs in factories.items():
        module, x = make_inputs()
        steps[library] = functools.partial(training_step, module, x)
    return _harness.time_interleaved(steps, device, min_repeats=repeats, max_repeats=max(repeats, 20))


def their_matrix_bytes(layer: str, num_rows: int, num_codes: int) -> int:
    """What vector-quantize-pytorch's step holds at once, at least. VectorQuantize and ResidualVQ:
    the N x K distances (fp32), the one-hot codes as int64 and again as fp32
    (F.one_hot(...).type(dtype)). LFQ: the N x K distances, logits, softmax, clamped and logged
    probabilities and their product kept for the backward (seven fp32 copies measured at 2^12 codes).
    FSQ: nothing of N x K."""
    if layer == "FSQ":
        return 0
    if layer == "LFQ":
        return num_rows * num_codes * 4 * 7
    return num_rows * num_codes * (4 + 8 + 4)


def available_bytes(device: str) -> int:
    """Memory a step may take: free GPU memory, or the kernel's MemAvailable (free pages plus the
    page cache it can drop; the free pages alone undercount a machine that has read files)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info()[0]
    match = re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure_layer(layer: str, num_rows: int, num_codes: int, dim: int, device: str, *, repeats: int,
                  once: bool = False, dtype: str = "fp32") -> list[dict]:
    """Both libraries' rows for one layer at one size: time (interleaved), peak memory, ratios.
    ``once``: each library's step is called once, its time and peak memory taken from that call
    (``_harness.once_with_peak_memory``), for sizes where one of their steps takes minutes."""
    rows, factories = {}, {}
    for library in LIBRARIES:
        rows[library] = {"bench": BENCH, "impl": f"{library}:{layer}", "N": num_rows, "K": num_codes, "D": dim,
                         "dtype": dtype, "median_ms": None, "q20_ms": None, "q80_ms": None,
                         "peak_mib": None, "note": "", "load1": os.getloadavg()[0],
                         "vector_isa": search_isa(library, dtype, device)}
        if search_flops(layer, num_rows, num_codes, dim) is not None:
            rows[library].update(tflops=None, flops_counted="search: 2NKD per quantizer")
        factories[library] = functools.partial(step_inputs, library, layer, num_rows, num_codes, dim, device, dtype)
    # Running out of memory would kill the whole benchmark, so a step of theirs that cannot fit is
    # not started. On CPU the timing runs in a child process and each memory figure in another, so
    # one copy of their N x K matrices is alive at a time.
    needed, available = their_matrix_bytes(layer, num_rows, num_codes), available_bytes(device)
    if (1 if device == "cpu" else 2) * needed > available:
        theirs = rows.pop(LIBRARIES[1])
        theirs["note"] = (f"not run: its N x K matrices alone take {needed / _harness.GIB:.0f} GiB, "
                          f"{available / _harness.GIB:.0f} GiB available")
        print(f"  {theirs['impl']}: {theirs['note']}", flush=True)
        factories.pop(LIBRARIES[1])
        done = [theirs]
    else:
        done = []
    try:
        if once:
            for library, row in rows.items():
                make_warmup = functools.partial(warmup_inputs, library, layer, num_codes, dim, device, dtype)
                milliseconds, peak = _harness.once_with_peak_memory(training_step, factories[library], make_warmup,
                                                                    device)
                row.update(median_ms=milliseconds, peak_mib=peak, load1=os.getloadavg()[0],
                           note="one call: time and memory from it")
                print(f"  {row['impl']}: {milliseconds:.1f} ms, peak +{peak:.0f} MiB", flush=True)
        else:
            if device == "cpu":
                with multiprocessing.get_context("spawn").Pool(processes=1) as pool:
                    timings = pool.apply(time_steps, (factories, device, repeats))
            else:
                timings = time_steps(factories, device, repeats)
            for library, row in rows.items():
                make_warmup = functools.partial(warmup_inputs, library, layer, num_codes, dim, device, dtype)
                peak = _harness.peak_memory_growth_mib(training_step, factories[library], make_warmup, device)
                timing = timings[library]
                row.update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms, peak_mib=peak)
                print(f"  {row['impl']}: {timing.median_ms:.1f} ms, peak +{peak:.0f} MiB", flush=True)
    except Exception as error:  # keep measuring the rest, and say what failed
        first_line = str(error).splitlines()[0] if str(error) else ""
        for row in rows.values():
            row["note"] = f"failed: {type(error).__name__}: {first_line}"
        print(f"  {layer}: {rows[LIBRARIES[0]]['note']}", flush=True)
    flops = search_flops(layer, num_rows, num_codes, dim)
    for row in rows.values():
        if flops is not None and row["median_ms"]:
            row["tflops"] = _harness.tflops(flops, row["median_ms"])
    ours = rows[LIBRARIES[0]]
    theirs = rows.get(LIBRARIES[1])
    if theirs is not None and ours["median_ms"] and theirs["median_ms"]:
        ours["vs_theirs"] = ours["median_ms"] / theirs["median_ms"]
    if theirs is not None and ours["peak_mib"] is not None and theirs["peak_mib"]:
        ours["memory_vs_theirs"] = ours["peak_mib"] / theirs["peak_mib"]
    return [ours, theirs] if theirs is not None else [ours, *done]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-only", action="store_true", help="only the N=65536, K=16384, D=256 point")
    parser.add_argument("--layers", nargs="+", choices=LAYERS + tuple(QUANTIZER_GRIDS), default=list(LAYERS),
                        help="the layers to measure (VectorQuantize and ResidualVQ by default)")
    parser.add_argument("--repeats", type=int, default=3, help="minimum timed repeats per point")
    parser.add_argument("--codes", type=int, nargs="+", metavar="K",
                        help="only the grid points with these codebook sizes (e.g. LFQ's 65536 262144)")
    parser.add_argument("--once", action="store_true",
                        help="one call per library and point, time and memory from it (steps of minutes)")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32"],
                        help="the layers' and inputs' dtypes (default fp32); each point runs in each")


def points(args: argparse.Namespace) -> list[tuple[str, tuple[int, int, int], str]]:
    """``(layer, (N, K, D), dtype)``: VectorQuantize and ResidualVQ on the device's grid and the target point
    (``--small``: the tiny point ``SMALL``; ``--target-only``: the target), then each other layer's grid,
    each in every ``--dtypes``; ``--codes`` keeps the points of those codebook sizes."""
    vq_points = [SMALL] if args.small else [TARGET] if args.target_only else GRIDS[args.device] + [TARGET]
    chosen = [(layer, point) for point in vq_points for layer in args.layers if layer in LAYERS]
    chosen += [(layer, point) for layer in args.layers if layer in QUANTIZER_GRIDS
               for point in QUANTIZER_GRIDS[layer][args.device]]
    return [(layer, point, dtype) for layer, point in chosen if args.codes is None or point[1] in args.codes
            for dtype in args.dtypes]


def measure(point: tuple[str, tuple[int, int, int], str], run: _harness.Run) -> list[dict]:
    layer, (num_rows, num_codes, dim), dtype = point
    return measure_layer(layer, num_rows, num_codes, dim, run.device, repeats=run.args.repeats, once=run.args.once,
                         dtype=dtype)


def main(argv: Optional[list[str]] = None) -> int:
    return _harness.main("layers", points, measure, KEY_COLUMNS, TABLE_COLUMNS + ("memory_vs_theirs",),
                         description=__doc__.split("\n\n")[0], add_arguments=add_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
