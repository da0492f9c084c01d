"""The harness every fastvq benchmark script shares: timing, peak memory, throughput, the machine's
description and the result files under ``benchmarks/results/``.

A bench script measures one op family on a grid of its own parameters (the search's ``N, K, D,
dtype, metric``; the masked convolution's batch, channels, map size, kernel and mask; ...), builds
one row (a dict) per ``(bench, impl, *its key columns)`` and hands the rows and the names of its
key columns to ``write_results``, and the rows to ``format_table``. Only what is measured is
written: a row that could not be measured carries a ``note`` instead.

Every row names the machine it ran on and how close it came to that machine's limit. ``environment``
gives the machine columns (``MACHINE_COLUMNS``: the CPU's model name, family/model, the vector
instruction sets it runs, and its fp32 FMA peak per core and over all cores, measured by a short
probe in ``fastvq._C``; on CUDA also the card's name, memory and multiprocessor count as PyTorch
reports them, its measured fp32, tf32 and bf16 matmul peaks and its data-sheet peaks,
``GPU_DATASHEET_TFLOPS``), and ``write_results`` adds to every row what it lacks: those columns,
``threads`` (the intra-op thread count, CPU rows), ``vector_isa`` (the instruction set the row's
code ran on; a bench that knows better, e.g. the search's bf16 kernel or FAISS, sets it itself),
and ``fraction_of_peak``. For a row with a ``tflops`` figure that is the figure over
``peak_gflops``, the measured peak it is held against (the fp32 FMA peak of the threads used, the
vdpbf16ps peak for rows on AVX512-BF16, the GPU matmul peak of the row's dtype), and on a GPU also
``fraction_of_datasheet_peak``; a row without one (a bench that counts no flops: a training run, a
sampler, a memory-bound update) gets the text ``NO_FLOP_COUNT`` there, or the ``"n/a: ..."`` its
bench wrote, so that every row of every results file says how close it came to the limit or why
it cannot say. ``complete_results`` gives rows stored before a column existed what their own
columns determine, without measuring anything.

``main`` is every bench script's command line: a script ``bench_<family>.py`` hands it its points
(a function of the parsed arguments: the full or the ``--small`` grid) and a measure function (one
point at one thread count, returning rows), and ``main`` owns the rest: the options every bench
takes (``--device``, ``--out``, ``--small``, ``--threads``), the environment header, the contention
warning, the loop over points and thread counts, saving after every point (an interrupted run keeps
what it measured) into ``<out>/<family>/<machine>.csv`` and ``.md`` (``results_dir``,
``device_slug``), the final table and the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import functools
import gc
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

MIB = 1024**2
GIB = 1024**3
# What names the machine and its limit, in every row (see the module docstring).
CPU_COLUMNS = ("cpu_model", "cpu_family_model", "cpu_cores", "cpu_isa")
GPU_COLUMNS = ("gpu_name", "gpu_memory_gib", "gpu_multiprocessors", "gpu_peak_fp32_tflops", "gpu_peak_tf32_tflops",
               "gpu_peak_bf16_tflops", "gpu_datasheet_fp32_tflops", "gpu_datasheet_tf32_tflops",
               "gpu_datasheet_bf16_tflops")
MACHINE_COLUMNS = (*CPU_COLUMNS, "peak_fp32_gflops_core", "peak_fp32_gflops_total", "peak_bf16_gflops_core",
                   "peak_bf16_gflops_total", "peak_load1", *GPU_COLUMNS)
# What ``fraction_of_peak`` says in a row whose bench counts no flops (a bench may write its own "n/a: ...").
NO_FLOP_COUNT = "n/a: the bench counts no flops for this row"
# NVIDIA's data-sheet peaks in TFLOP/s, dense (the sheets print tf32 and bf16 with 2:4 sparsity; these are
# half of that): fp32 on the CUDA cores, tf32 and bf16 on the tensor cores, keyed by the name
# torch.cuda.get_device_name gives. H100: "H100 Tensor Core GPU" data sheet (SXM5: fp32 67, tf32 989, bf16
# 1 979 with sparsity; PCIe: 51, 756, 1 513; NVL: 60, 835, 1 671). H200: "H200 Tensor Core GPU" data sheet
# (SXM: 67, 989, 1 979; NVL: 60, 835, 1 671). PyTorch calls the H100 SXM5 "NVIDIA H100 80GB HBM3" and
# the H200 SXM "NVIDIA H200" (the names the lent machines report).
GPU_DATASHEET_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
    "NVIDIA H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5},
    "NVIDIA H100 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
    "NVIDIA H200": {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5},
    "NVIDIA H200 NVL": {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5},
}
# Where a row was measured; the markdown report says each once, above the tables, when every row agrees.
HEADER_COLUMNS = ("device", "torch", "triton", "fastvq", *MACHINE_COLUMNS)
# The names the results use for the instruction sets fastvq._C reports.
ISA_NAMES = {"avx2": "AVX2", "avx512f": "AVX-512F", "avx512bf16": "AVX512-BF16"}
# Wall time of one run of the FMA probe; the peak is the best of PROBE_REPEATS runs.
PROBE_SECONDS = 0.25
PROBE_REPEATS = 3
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median and the 20% / 80% quantiles of the repeats."""

    median_ms: float
    q20_ms: float
    q80_ms: float


def time_call(
    fn: Callable[[], object],
    device: str,
    *,
    cpu_budget_s: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 100,
) -> Timing:
    """Times ``fn()`` after a warm-up call.

    On CUDA the timing is ``triton.testing.do_bench``, which times with CUDA events (a host clock
    around an asynchronous launch would measure the launch, not the kernel) and flushes the L2
    cache between calls. On CPU every op finishes before it returns, so ``time.perf_counter``
    around each call is exact; the warm-up call's duration sets how many repeats fit in
    ``cpu_budget_s``, clamped to ``[min_repeats, max_repeats]`` so slow calls still get a median.
    """
    if device.startswith("cuda"):
        import triton.testing

        fn()  # Triton autotunes on the first call; keep that out of do_bench's estimate.
        torch.cuda.synchronize()
        median, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, q20, q80)
    start = time.perf_counter()
    fn()
    warmup_s = time.perf_counter() - start
    repeats = min(max_repeats, max(min_repeats, int(cpu_budget_s / max(warmup_s, 1e-9))))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    median, q20, q80 = torch.tensor(seconds, dtype=torch.float64).mul(1e3).quantile(
        torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    ).tolist()
    return Timing(median, q20, q80)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: str,
    *,
    cpu_budget_s: float = 1.0,
    min_repeats: int = 5,
    max_repeats: int = 100,
) -> dict[str, Timing]:
    """Times several calls against each other: on CPU one warm-up call each, then rounds in which
    each is called once in turn, so that a change in the machine's load (other processes on a
    shared CPU) falls on all of them alike and their ratios stay meaningful. The warm-ups set the
    rounds, ``cpu_budget_s`` per call, clamped to ``[min_repeats, max_repeats]``. On CUDA each is
    timed by ``time_call`` (CUDA events do not see the host's load)."""
    if device.startswith("cuda"):
        return {name: time_call(fn, device) for name, fn in fns.items()}
    warmup_s = 0.0
    for fn in fns.values():
        start = time.perf_counter()
        fn()
        warmup_s += time.perf_counter() - start
    repeats = min(max_repeats, max(min_repeats, int(cpu_budget_s * len(fns) / max(warmup_s, 1e-9))))
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - start)
    quantiles = torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)
    return {name: Timing(*torch.tensor(values, dtype=torch.float64).mul(1e3).quantile(quantiles).tolist())
            for name, values in seconds.items()}


def peak_memory_growth_mib(
    fn: Callable[..., object],
    make_inputs: Callable[[], tuple],
    make_warmup_inputs: Callable[[], tuple],
    device: str,
) -> float:
    """Peak memory, in MiB, that ``fn(*make_inputs())`` needs on top of its inputs.

    The growth includes everything alive at the peak: temporaries and ``fn``'s outputs.
    ``fn(*make_warmup_inputs())`` runs first, on inputs small enough to cost nothing, so that
    one-time costs (loading BLAS code pages, thread pools, Triton's autotuning) are not counted.

    CUDA: the caching allocator's own counters, ``torch.cuda.max_memory_allocated()`` after
    ``torch.cuda.reset_peak_memory_stats()``, minus ``torch.cuda.memory_allocated()`` with the
    inputs allocated. Memory the allocator holds in reserve but has not handed out is not counted.

    CPU: there is no allocator counter, so the call runs in a fresh interpreter (multiprocessing
    "spawn"; ``fn`` and the input factories must therefore be picklable, i.e. module-level
    functions or ``functools.partial`` of them). The child allocates the inputs, runs the warm-up,
    resets its resident-set high-water mark ``VmHWM`` to the current resident set size
    (``echo 5 > /proc/self/clear_refs``) and takes it as the baseline, runs ``fn`` once and
    reports how far ``VmHWM`` (``/proc/self/status``) rose above it. A fresh process matters: in one
    that has already run ``fn``, freed pages stay resident in malloc's arenas and a second call
    would reuse them unseen. ``getrusage().ru_maxrss`` is not used: a spawned child starts with
    its parent's peak (Linux carries it through fork and exec), which hides any growth below the
    parent's size. The figure has page granularity and counts every page first touched during the call.
    """
    return once_with_peak_memory(fn, make_inputs, make_warmup_inputs, device)[1]


def once_with_peak_memory(
    fn: Callable[..., object],
    make_inputs: Callable[[], tuple],
    make_warmup_inputs: Callable[[], tuple],
    device: str,
) -> tuple[float, float]:
    """``(milliseconds, peak MiB)`` of one call ``fn(*make_inputs())``, both taken from that same
    call, measured as ``peak_memory_growth_mib`` describes (CPU: in a fresh process). For calls so
    long that timing them again on their own would not fit a benchmark's time: the figure is one
    call, with no quantiles and not interleaved with anything."""
    if device.startswith("cuda"):
        inputs = make_inputs()
        fn(*make_warmup_inputs())
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        fn(*inputs)
        torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        return seconds * 1e3, (torch.cuda.max_memory_allocated(device) - baseline) / MIB
    with multiprocessing.get_context("spawn").Pool(processes=1) as pool:
        growth_bytes, seconds = pool.apply(_peak_rss_growth_bytes, (fn, make_inputs, make_warmup_inputs))
    return seconds * 1e3, growth_bytes / MIB


def _peak_rss_growth_bytes(fn, make_inputs, make_warmup_inputs) -> tuple[int, float]:
    """Runs in the spawned child of ``once_with_peak_memory``: the growth and the call's seconds."""
    inputs = make_inputs()
    fn(*make_warmup_inputs())
    gc.collect()
    # Without the reset (kernels before 4.0), a transient peak of the set-up could mask the growth.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    baseline = _proc_status_bytes("VmHWM")
    start = time.perf_counter()
    fn(*inputs)
    seconds = time.perf_counter() - start
    return _proc_status_bytes("VmHWM") - baseline, seconds


def _proc_status_bytes(field: str) -> int:
    """A memory field of ``/proc/self/status``, which the kernel reports in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024


def tflops(flop_count: int, milliseconds: float) -> float:
    return flop_count / (milliseconds * 1e-3) / 1e12


@contextlib.contextmanager
def environment_variable(name: str, value: Optional[str]) -> Iterator[None]:
    """Sets ``name`` for the duration (``None`` leaves it as it is); spawned children inherit it."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous


def cpu_contention_warning() -> str:
    """A warning when more processes want the CPU than it has cores, else ``""``: CPU timings (and
    the host side of GPU ones) taken then are stretched by the other processes."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load <= cores:
        return ""
    return (f"warning: the 1-minute load average is {load:.1f} on {cores} cores; other processes share the "
            "CPU and stretch the timings")


def describe_device(device: str) -> str:
    """``"NVIDIA H200"`` for a GPU; for the CPU its model, family and model numbers (which tell
    apart CPUs sold under one name, e.g. AMD EPYC Zen 3 and Zen 4) and the CPUs this process may use."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    family_model = _cpu_family_model()
    numbers = f" (family {family_model.replace('/', ', model ')})" if family_model else ""
    return f"{_cpu_model()}{numbers}, {len(os.sched_getaffinity(0))} cores"


def _cpuinfo_field(name: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    return ""


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpu_family_model() -> str:
    """``"25/1"``: /proc/cpuinfo's ``cpu family`` and ``model``, or ``""`` where it has none."""
    family, model = _cpuinfo_field("cpu family"), _cpuinfo_field("model")
    return f"{family}/{model}" if family and model else ""


def device_slug(device: str) -> str:
    """The result files' name, one per machine: the GPU's name on CUDA; on CPU the CPU's model name,
    its family and model numbers and the cores this process may use, in lower case, e.g.
    ``amd-epyc-family-25-model-1-2-cores`` (a Zen 3) and ``amd-epyc-family-25-model-17-2-cores``
    (a Zen 4), which /proc/cpuinfo both call "AMD EPYC"."""
    return re.sub(r"[^a-z0-9]+", "-", describe_device(device).lower()).strip("-")


def _extension():
    """``torch.ops.fastvq_C`` when fastvq._C loads, else ``None`` (no probe, no peak columns)."""
    from fastvq.backends import cpp

    return torch.ops.fastvq_C if cpp.available() else None


def cpu_isas() -> list[str]:
    """The vector instruction sets this CPU runs that fastvq has kernels for (``ISA_NAMES``' values)."""
    extension = _extension()
    if extension is None:
        return []
    return [ISA_NAMES[name] for name in json.loads(extension.build_info())["cpu_isa"]]


@functools.lru_cache(maxsize=None)
def cpu_peak_gflops(isa: str, threads: int) -> float:
    """The best of ``PROBE_REPEATS`` runs of fastvq._C's FMA probe (``isa``: ``avx2``, ``avx512f``
    or ``avx512bf16``) on ``threads`` threads at once, in fp32 GFLOP/s; measured once per process."""
    extension = _extension()
    start = time.perf_counter()
    calibration = 1_000_000
    extension.cpu_peak_gflops(isa, 1, calibration)
    iterations = max(calibration, int(calibration * PROBE_SECONDS / max(time.perf_counter() - start, 1e-6)))
    return max(extension.cpu_peak_gflops(isa, threads, iterations) for _ in range(PROBE_REPEATS))


def _fp32_probe_isa(isas: Sequence[str]) -> Optional[str]:
    return "avx512f" if "AVX-512F" in isas else "avx2" if "AVX2" in isas else None


@functools.lru_cache(maxsize=None)
def machine(device: str) -> dict[str, Any]:
    """The machine columns (``MACHINE_COLUMNS``) of ``device``'s host and, on CUDA, of the GPU.
    The peaks are measured on first use (about two seconds per figure); a figure that cannot be
    measured (no fastvq._C, no such instruction set) is ``None``."""
    isas = cpu_isas()
    cores = len(os.sched_getaffinity(0))
    columns: dict[str, Any] = dict.fromkeys(MACHINE_COLUMNS)
    columns.update({
        "cpu_model": _cpu_model(), "cpu_family_model": _cpu_family_model(), "cpu_cores": cores,
        "cpu_isa": "+".join(isas) if isas else "unknown (fastvq._C not loaded)",
    })
    if (fp32_isa := _fp32_probe_isa(isas)) is not None:
        columns["peak_fp32_gflops_core"] = cpu_peak_gflops(fp32_isa, 1)
        columns["peak_fp32_gflops_total"] = cpu_peak_gflops(fp32_isa, cores)
    if "AVX512-BF16" in isas:
        columns["peak_bf16_gflops_core"] = cpu_peak_gflops("avx512bf16", 1)
        columns["peak_bf16_gflops_total"] = cpu_peak_gflops("avx512bf16", cores)
    # Other processes on the cores lower the measured peak as they lower every timing.
    columns["peak_load1"] = os.getloadavg()[0]
    if device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(torch.device(device))
        columns.update(gpu_columns(torch.cuda.get_device_name(torch.device(device)), properties.total_memory,
                                   properties.multi_processor_count, _gpu_matmul_peaks(device)))
    return columns


def gpu_columns(name: str, memory_bytes: int, multiprocessors: int,
                measured_tflops: dict[str, float]) -> dict[str, Any]:
    """The GPU's machine columns: the name and memory PyTorch reports, its multiprocessor count (which
    tells apart cards sold under one name), the measured matmul peaks (``gpu_peak_<dtype>_tflops``, as
    ``_gpu_matmul_peaks`` gives them) and the data-sheet peaks of ``GPU_DATASHEET_TFLOPS`` (``None`` for
    a card that table does not list)."""
    datasheet = GPU_DATASHEET_TFLOPS.get(name, {})
    return {"gpu_name": name, "gpu_memory_gib": memory_bytes / GIB, "gpu_multiprocessors": multiprocessors,
            **measured_tflops,
            **{f"gpu_datasheet_{kind}_tflops": datasheet.get(kind) for kind in ("fp32", "tf32", "bf16")}}


def _gpu_matmul_peaks(device: str) -> dict[str, float]:
    """TFLOP/s of an 8192^3 ``torch.matmul`` on the GPU in fp32 (tf32 off), tf32 and bf16: the
    ceilings GPU rows are held against, measured rather than taken from a data sheet."""
    import triton.testing

    size = 8192
    peaks = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, allow_tf32 in (("fp32", torch.float32, False), ("tf32", torch.float32, True),
                                        ("bf16", torch.bfloat16, False)):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            a = torch.randn(size, size, device=device, dtype=dtype)
            b = torch.randn(size, size, device=device, dtype=dtype)
            milliseconds = triton.testing.do_bench(functools.partial(torch.matmul, a, b), quantiles=[0.5])[0]
            peaks[f"gpu_peak_{name}_tflops"] = tflops(2 * size**3, milliseconds)
            del a, b
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    torch.cuda.empty_cache()
    return peaks


def default_vector_isa(device: str) -> str:
    """What a CPU row ran on unless its bench says otherwise: the widest fp32 instruction set of
    this CPU that fastvq._C and ATen dispatch to (AVX-512F, else AVX2); ``""`` on CUDA."""
    if device.startswith("cuda"):
        return ""
    isas = cpu_isas()
    return "AVX-512F" if "AVX-512F" in isas else "AVX2" if "AVX2" in isas else torch.backends.cpu.get_cpu_capability()


def _gpu_peak_kind(row: dict[str, Any]) -> str:
    """Which of the GPU's peaks a row is held against: bf16 for bf16 and fp16 rows; for fp32 rows tf32
    where the row's ``precision`` (or, in the masked convolution's rows, its ``dtype``) says tf32, else fp32."""
    dtype, precision = str(row.get("dtype", "")), str(row.get("precision", ""))
    return "bf16" if dtype in ("bf16", "fp16") else "tf32" if "tf32" in (precision, dtype) else "fp32"


def peak_gflops(row: dict[str, Any], device: str) -> Optional[float]:
    """The measured peak, in GFLOP/s, that a row (with its machine columns) is held against: on CPU
    the FMA peak of the row's threads (per core times threads, the all-core figure from all cores
    on), from vdpbf16ps for rows that ran on AVX512-BF16; on CUDA the matmul peak of the row's dtype
    (``_gpu_peak_kind``)."""
    columns = row
    if device.startswith("cuda"):
        peak = columns.get(f"gpu_peak_{_gpu_peak_kind(row)}_tflops")
        return None if peak in (None, "") else float(peak) * 1e3
    kind = "bf16" if row.get("vector_isa") == "AVX512-BF16" else "fp32"
    per_core, total = columns.get(f"peak_{kind}_gflops_core"), columns.get(f"peak_{kind}_gflops_total")
    if per_core in (None, "") or total in (None, "") or columns.get("cpu_cores") in (None, ""):
        return None
    threads = int(row.get("threads") or columns["cpu_cores"])
    return float(total) if threads >= int(columns["cpu_cores"]) else float(per_core) * threads


def with_machine_columns(row: dict[str, Any], device: str) -> dict[str, Any]:
    """``row`` with what it lacks of the machine columns, ``threads``, ``vector_isa``,
    ``peak_gflops`` and ``fraction_of_peak`` (see the module docstring); what it has is kept."""
    full = dict(row)
    for name, value in machine(device).items():
        if full.get(name) in (None, ""):
            full[name] = value
    on_cuda = device.startswith("cuda")
    if "threads" not in row and not on_cuda:
        full["threads"] = torch.get_num_threads()
    if not full.get("vector_isa"):
        full["vector_isa"] = default_vector_isa(device)
    return with_fraction_of_peak(full, device)


def with_fraction_of_peak(row: dict[str, Any], device: str) -> dict[str, Any]:
    """``row`` (with its machine columns) with ``fraction_of_peak`` where it has none: its ``tflops`` over
    ``peak_gflops`` (both set here; on CUDA also ``fraction_of_datasheet_peak``), or a text that says
    why there is no fraction: ``NO_FLOP_COUNT``, "not measured" for a row whose ``tflops`` is empty, or
    no peak recorded for this machine."""
    full = dict(row)
    if full.get("fraction_of_peak") not in (None, ""):
        return full
    measured = full.get("tflops")
    if measured in (None, ""):
        # A bench that counts flops leaves them out of a row it could not time; one that counts none times it.
        unmeasured = "tflops" in full and full.get("median_ms") in (None, "") and full.get("note")
        full["fraction_of_peak"] = "n/a: not measured (see note)" if unmeasured else NO_FLOP_COUNT
        return full
    peak = peak_gflops(full, device)
    full["peak_gflops"] = peak
    full["fraction_of_peak"] = ("n/a: no measured peak recorded with this row" if peak is None
                                else float(measured) * 1e3 / peak)
    if device.startswith("cuda"):
        datasheet = full.get(f"gpu_datasheet_{_gpu_peak_kind(full)}_tflops")
        full["fraction_of_datasheet_peak"] = (float(measured) / float(datasheet) if datasheet not in (None, "")
                                              else "n/a: card not in GPU_DATASHEET_TFLOPS")
    return full


def row_device(row: dict[str, Any]) -> str:
    """``"cuda"`` for a stored row measured on a GPU (it names one), else ``"cpu"``."""
    return "cuda" if row.get("gpu_name") or row.get("gpu_peak_fp32_tflops") else "cpu"


def complete_results(csv_path: Path) -> None:
    """Gives every stored row of ``csv_path`` what its own columns determine and it lacks (the
    machine columns added since, empty; ``fraction_of_peak``, from its ``tflops`` and its own
    recorded peaks, or the text saying why there is none) and rewrites the file and its ``.md``.
    Measures nothing: a row keeps the numbers and the machine it was measured with."""
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        stored = list(reader)
    rows = [{name: _format_value(value) for name, value in with_fraction_of_peak(row, row_device(row)).items()}
            for row in stored]
    columns = list(dict.fromkeys(columns + list(MACHINE_COLUMNS) + [name for row in rows for name in row]))
    _write_files(csv_path, columns, rows)


def _write_files(csv_path: Path, columns: list[str], rows: list[dict[str, str]],
                 device_name: Optional[str] = None) -> None:
    """``csv_path`` with ``rows`` under ``columns``, and its ``.md`` report (titled with ``device_name``,
    by default the rows' ``device`` values)."""
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    if device_name is None:
        device_name = " / ".join(dict.fromkeys(row.get("device", "") for row in rows))
    csv_path.with_suffix(".md").write_text(_markdown_report(rows, columns, device_name))


def environment(device: str) -> dict[str, str]:
    """The columns that say where and when a row was measured: versions, date and the machine
    columns (``machine``; its peaks are measured the first time)."""
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    return {
        "device": describe_device(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "fastvq": _fastvq_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        **machine(device),
    }


def _fastvq_version() -> str:
    """``fastvq.__version__`` plus, from a git checkout, the commit and, when the package's tracked
    files differ from it, a hash of that diff: the version number alone does not change while the
    kernels do, and neither does the commit while someone edits them."""
    import fastvq

    package = Path(fastvq.__file__).resolve().parent
    try:
        commit = _git(package, "rev-parse", "--short", "HEAD").strip()
        diff = _git(package, "diff", "HEAD", "--", ".")
    except (OSError, subprocess.CalledProcessError):
        return fastvq.__version__
    local = f".dirty-{hashlib.sha1(diff.encode()).hexdigest()[:7]}" if diff else ""
    return f"{fastvq.__version__}+{commit}{local}"


def _git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True).stdout


def write_results(
    rows: Sequence[dict[str, Any]], device: str, key_columns: Sequence[str], out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Merges ``rows`` into ``<out_dir>/<device-slug>.csv`` and rewrites ``<device-slug>.md`` from it.

    ``key_columns`` are the parameters that identify a row of the benches in ``rows`` (besides
    ``bench`` and ``impl``). A new row replaces the stored row of the same bench and impl whose key
    columns agree; every other stored row is kept, those of other benches untouched, so one bench
    script (or one grid) can be re-run without losing the others. Every new row first gets what it
    lacks of the machine columns, ``threads``, ``vector_isa`` and ``fraction_of_peak``
    (``with_machine_columns``); a stored row that lacks ``fraction_of_peak`` gets it from its own columns
    (``with_fraction_of_peak``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"{device_slug(device)}.csv"
    md_path = csv_path.with_suffix(".md")
    stored: list[dict[str, str]] = []
    columns: list[str] = []
    if csv_path.exists():
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            columns = list(reader.fieldnames or [])
            stored = list(reader)
    new_rows = [{name: _format_value(value) for name, value in with_machine_columns(row, device).items()}
                for row in rows]
    benches = {row["bench"] for row in new_rows}
    keys = ("bench", "impl", *key_columns)

    def row_key(position: int, row: dict[str, str]) -> tuple[str, ...]:
        if row["bench"] not in benches:  # another bench's row: kept as it is, under its own place
            return ("kept", str(position))
        return tuple(str(row.get(name, "")) for name in keys)

    stored = [{name: _format_value(value) for name, value in with_fraction_of_peak(row, row_device(row)).items()}
              for row in stored]
    merged = {row_key(position, row): row for position, row in enumerate(stored)}
    merged.update({row_key(0, row): row for row in new_rows})
    columns = list(dict.fromkeys(columns + [name for row in [*stored, *new_rows] for name in row]))
    _write_files(csv_path, columns, list(merged.values()), describe_device(device))
    return csv_path, md_path


def _markdown_report(rows: list[dict[str, str]], columns: list[str], device_name: str) -> str:
    """One table per bench, of the columns its rows fill; a header column with one value in every row is said
    once, above them."""
    shared = [name for name in HEADER_COLUMNS if len({row.get(name, "") for row in rows}) == 1]
    table_columns = [name for name in columns if name not in shared and name != "bench"]
    lines = [f"# fastvq benchmarks on {device_name}", ""]
    lines += [f"- {name}: {rows[0][name]}" for name in shared if name != "device" and rows[0].get(name, "") != ""]
    for bench in dict.fromkeys(row["bench"] for row in rows):
        bench_rows = [row for row in rows if row["bench"] == bench]
        # Each bench shows its own columns: one that no row of it fills belongs to another bench.
        filled = [name for name in table_columns if any(row.get(name, "") != "" for row in bench_rows)]
        lines += ["", f"## {bench}", ""]
        lines.append(format_table(bench_rows, filled))
    return "\n".join(lines) + "\n"


def format_table(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """A markdown table (readable as plain text too) of ``columns`` of ``rows``."""
    cells = [[_format_value(row.get(name, "")) for name in columns] for row in rows]
    widths = [max([len(name)] + [len(line[i]) for line in cells]) for i, name in enumerate(columns)]

    def render(values: Sequence[str]) -> str:
        return "| " + " | ".join(value.ljust(width) for value, width in zip(values, widths)) + " |"

    separator = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    return "\n".join([render(columns), separator] + [render(line) for line in cells])


def _format_value(value: Any) -> str:
    """Four significant digits, without switching to exponent notation for large values; ``None``
    (not measured) is an empty cell."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def results_dir(family: str, out: Path = RESULTS_DIR) -> Path:
    """Where a bench family's result files go: ``<out>/<family>/``, one ``<machine>.csv`` and ``.md``
    per machine (``device_slug``)."""
    return out / family


@dataclass(frozen=True)
class Run:
    """What ``main`` tells a bench's measure function besides the point."""

    args: argparse.Namespace  # the parsed command line, the bench's own options included
    device: str  # "cpu" or "cuda"
    threads: Optional[int]  # the intra-op thread count set for this call; None on CUDA
    thread_counts: tuple[Optional[int], ...]  # every count the run measures each point at, in order

    @property
    def first_threads(self) -> bool:
        """Whether this is the point's first thread count: where once-per-point work (peak memory) goes."""
        return self.threads == self.thread_counts[0]

    @property
    def last_threads(self) -> bool:
        return self.threads == self.thread_counts[-1]


def main(
    family: str,
    points: Callable[[argparse.Namespace], Sequence[Any]],
    measure: Callable[[Any, Run], list[dict[str, Any]]],
    key_columns: Sequence[str],
    table_columns: Sequence[str],
    *,
    description: str,
    add_arguments: Optional[Callable[[argparse.ArgumentParser], None]] = None,
    default_threads: Optional[Callable[[argparse.Namespace], Sequence[int]]] = None,
    check_arguments: Optional[Callable[[argparse.ArgumentParser, argparse.Namespace], None]] = None,
    argv: Optional[Sequence[str]] = None,
) -> int:
    """The command line of ``benchmarks/bench_<family>.py``; returns its exit status.

    Options every bench takes: ``--device cpu|cuda`` (default: CUDA when available), ``--out DIR``
    (the results root, default ``benchmarks/results``; the files are ``DIR/<family>/<machine>.csv``
    and ``.md``), ``--small`` (the bench's tiny grid, for rehearsals and tests), ``--threads N
    [N ...]`` (CPU intra-op thread counts, each point measured at each; default
    ``default_threads(args)`` or PyTorch's current count) and ``--list`` (print the points the other
    options give and exit, measuring and writing nothing; it needs no GPU even with ``--device cuda``,
    so a GPU run's command lines can be checked on a CPU machine). ``add_arguments`` adds the bench's own
    options, ``check_arguments`` may reject a combination (``parser.error``).

    ``points(args)`` lists the points; ``measure(point, run)`` measures one point at one thread
    count (already set with ``torch.set_num_threads``) and returns its rows, each with ``bench`` and
    ``impl``; a row that could not be measured carries a ``note``, ``"failed: ..."`` when it failed,
    which makes the exit status 1. Rows get the environment columns (``environment``) and, on CPU,
    the thread count, and are merged into the results files after every point (``write_results``,
    keyed by ``key_columns`` and ``threads``). The environment is printed first, the table of ``table_columns`` at
    the end, and the contention warning at both ends.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"results root; files go to OUT/{family}/<machine>.csv and .md (default: %(default)s)")
    parser.add_argument("--small", action="store_true", help="the bench's tiny grid, for rehearsals and tests")
    parser.add_argument("--threads", type=int, nargs="+", metavar="N",
                        help="CPU intra-op thread counts; every point is measured at each")
    parser.add_argument("--list", action="store_true",
                        help="print the points these options give and exit (measures nothing; needs no GPU)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.list:
        if check_arguments is not None:
            check_arguments(parser, args)
        for point in points(args):
            print(f"{family}: {point}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU and a CUDA build of torch; torch.cuda.is_available() is False")
    if args.threads is not None and min(args.threads) < 1:
        parser.error(f"--threads must be positive, got {args.threads}")
    if check_arguments is not None:
        check_arguments(parser, args)
    if args.device == "cuda":
        thread_counts: tuple[Optional[int], ...] = (None,)
    else:
        thread_counts = tuple(args.threads or (default_threads(args) if default_threads else [torch.get_num_threads()]))
    out_dir = results_dir(family, args.out)
    # The thread count is a key of every row: the same point at another count is another row.
    keys = tuple(dict.fromkeys((*key_columns, "threads")))
    header = environment(args.device)
    print(", ".join(f"{name} {value}" for name, value in header.items() if value is not None), flush=True)
    if warning := cpu_contention_warning():
        print(warning, flush=True)
    written: list[dict[str, Any]] = []
    csv_path = md_path = None
    for point in points(args):
        for threads in thread_counts:
            if threads is not None:
                torch.set_num_threads(threads)
            print(f"{family}: {point}" + (f", {threads} threads" if threads is not None else ""), flush=True)
            rows = measure(point, Run(args, args.device, threads, thread_counts))
            for row in rows:
                if threads is not None:
                    row.setdefault("threads", threads)
                for name, value in header.items():
                    row[name] = value
            written += rows
            if rows:
                csv_path, md_path = write_results(written, args.device, keys, out_dir)
    print()
    print(format_table(written, table_columns))
    if csv_path is not None:
        print(f"\nwrote {csv_path} and {md_path}")
    if warning := cpu_contention_warning():
        print(warning)
    failed = [row for row in written if str(row.get("note", "")).lower().startswith("failed")]
    return 1 if failed else 0
