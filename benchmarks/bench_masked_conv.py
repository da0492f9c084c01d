"""Masked convolution and PixelCNN sampling: fastvq against what PixelCNN code bases run today.

    python benchmarks/bench_masked_conv.py [--small] [--conv-only | --sampler-only] [--headline-only]
                                           [--device cpu|cuda] [--dtypes fp32 bf16 ...] [--threads N ...]
                                           [--out DIR]

Convolutions (PixelCNN-sized layers: channels 64-256, 32 x 32 and 64 x 64 maps, kernels 3-7,
``C_in = C_out``, stride 1, "same" padding, with bias), each timed forward (``fwd``), backward
alone (``bwd``: ``torch.autograd.grad`` on a retained graph, input, weight and bias gradients) and
both (``fwd+bwd``):

- ``fastvq``: ``fastvq.masked_conv2d`` with ``FASTVQ_BACKEND=auto`` (the Triton kernels on CUDA,
  the row-group PyTorch path on CPU, one batch chunk at a time), which computes only the taps the
  mask keeps;
- ``conv2d(w*mask)``: ``F.conv2d(x, weight * mask, bias)``, the usual masked layer (cuDNN on
  CUDA, oneDNN on CPU), paying for every tap of the dense kernel plus the mask multiply.

On CUDA each point runs in bf16, in ``tf32`` (fp32 tensors, both sides allowed plain TF32 tensor
cores: PyTorch's default for cuDNN convolutions) and in ``fp32`` (fp32 accuracy on both sides:
fastvq's ``tf32x3`` against cuDNN without TF32). TFLOP/s count the kept taps only (``2 B H W C_in C_out
taps`` forward, twice that backward), so both implementations are credited with the same useful
work. ``vs_dense`` is the dense-weight baseline's median time over this row's (``> 1``: fastvq is
faster). Both implementations of a pass are called in turn (``_harness.time_interleaved``), so that
a change in a shared machine's load falls on both alike. ``peak_mib`` is the peak memory growth of
one forward + backward (on CPU in a fresh interpreter on the row's thread count,
``_harness.peak_memory_growth_mib``).

Sampling: ``GatedPixelCNN`` and ``PixelCNN`` with 12 layers (kernel 3, first kernel 7, 64
channels, 512 codes) drawing ``n`` maps of 32 x 32, ``method="naive"`` (the whole network per
position) against ``method="fast"`` (cached; recomputes only what each new code changes), with the
same generator seed; ``speedup`` is naive over fast, each naive sample over the fast samples timed
just before and after it (interleaved, so that a loaded machine's changing load falls on both). A
naive 32 x 32 map takes about a minute or more on a small CPU, so it is timed once (``repeats``)
and the fast sampler a few times.

Rows are keyed by their own parameters: a convolution by ``batch``, ``channels`` (in = out),
``size`` (the map's side), ``kernel``, ``mask``, ``dtype`` and ``threads``; a sampler row by
``model``, ``layers``, ``size``, ``n`` (maps drawn), ``channels``, ``codes`` and ``threads``.
``threads`` is the intra-op thread count on CPU (with other processes on the cores, OpenMP's
fork/join waits for descheduled threads and a two-thread run can be many times slower than a
one-thread one; ``--threads`` sets it) and empty on CUDA. ``load1`` is the host's 1-minute load
average when the row's measurement started: timings taken while other processes shared the CPU
are not clean.
Results are merged into ``<out>/masked_conv/<machine>.csv`` and ``.md`` (``_harness.main``). The
exit status is non-zero if anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import _harness
import torch
import torch.nn.functional as F

import fastvq
from fastvq.models import GatedPixelCNN, PixelCNN
from fastvq.reference import pixelcnn_mask_ref

# "fp32" keeps fp32 accuracy on both sides (fastvq's tl.dot in tf32x3, cuDNN without TF32);
# "tf32" lets both use plain TF32 tensor cores (PyTorch's default for cuDNN convolutions, and
# fastvq's opt-in ``torch.backends.cuda.matmul.allow_tf32``). On CPU the two are the same.
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PASSES = ("fwd", "bwd", "fwd+bwd")
CONV_KEYS = ("batch", "channels", "size", "kernel", "mask", "dtype", "threads")
SAMPLER_KEYS = ("model", "layers", "size", "n", "channels", "codes", "threads")
TABLE_COLUMNS = ("bench", "impl", *CONV_KEYS, "median_ms", "q20_ms", "q80_ms", "tflops", "vs_dense", "peak_mib",
                 "load1", "note")
SAMPLER_COLUMNS = ("impl", *SAMPLER_KEYS, "median_ms", "repeats", "speedup", "rechecks", "load1", "note")


def threads_used(device: str) -> Optional[int]:
    """CPU rows name their intra-op thread count: on a shared machine it changes timings a lot."""
    return None if device.startswith("cuda") else torch.get_num_threads()


@dataclass(frozen=True)
class ConvPoint:
    batch: int
    channels: int
    size: int
    kernel: int
    mask_type: str = "B"

    @property
    def label(self) -> str:
        return f"{self.mask_type} {self.kernel}x{self.kernel} @{self.size}x{self.size}"

    def taps(self) -> int:
        return int(pixelcnn_mask_ref(self.mask_type, self.kernel).sum().item())


def _grid(batch: int, channels, sizes, kernels) -> list[ConvPoint]:
    return [ConvPoint(batch, c, s, k) for c in channels for s in sizes for k in kernels]


# The headline: type A and B 7 x 7 at 128 channels, 32 x 32, batch 64, forward + backward.
HEADLINE = [ConvPoint(64, 128, 32, 7, "A"), ConvPoint(64, 128, 32, 7, "B")]
CONV_GRIDS = {
    "cuda": HEADLINE + [p for p in _grid(64, (64, 128, 256), (32, 64), (3, 5, 7)) if p not in HEADLINE],
    # Sized for a 2-core machine to finish in minutes.
    "cpu": [ConvPoint(8, 128, 32, 7, "A")] + _grid(8, (64, 128, 256), (32,), (3, 5, 7))
    + _grid(8, (64,), (64,), (3, 7)),
}
SMALL_CONV_GRID = [ConvPoint(2, 32, 16, 3), ConvPoint(2, 32, 16, 7)]
DEFAULT_DTYPES = {"cuda": ("bf16", "tf32", "fp32"), "cpu": ("fp32",)}


@dataclass(frozen=True)
class SamplerPoint:
    model: str
    num_layers: int
    size: int
    n: int
    channels: int = 64
    num_codes: int = 512

    @property
    def label(self) -> str:
        return f"{self.model} L{self.num_layers} {self.size}x{self.size}"


SAMPLER_GRIDS = {
    "cuda": [SamplerPoint("gated", 12, 32, 1), SamplerPoint("gated", 12, 32, 16), SamplerPoint("pixelcnn", 12, 32, 1)],
    "cpu": [SamplerPoint("gated", 12, 32, 1), SamplerPoint("pixelcnn", 12, 32, 1)],
}
SMALL_SAMPLER_GRID = [SamplerPoint("gated", 4, 8, 1, channels=32, num_codes=64)]


# --------------------------------------------------------------------------- convolutions


def conv_inputs(point: ConvPoint, dtype: torch.dtype, device: str, seed: int = 0):
    """``x [B, C, S, S]``, ``weight [C, C, k, k]``, ``bias [C]``, all requiring grad, and a fixed output gradient."""
    generator = torch.Generator(device).manual_seed(seed)
    shape = (point.batch, point.channels, point.size, point.size)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    scale = (point.channels * point.kernel * point.kernel) ** -0.5
    weight = torch.randn((point.channels, point.channels, point.kernel, point.kernel), generator=generator,
                         device=device, dtype=dtype) * scale
    bias = torch.zeros(point.channels, device=device, dtype=dtype)
    grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), grad


def fastvq_conv(x, weight, bias, mask_type):
    return fastvq.masked_conv2d(x, weight, bias, mask_type=mask_type)


def dense_masked_conv(x, weight, bias, mask_type):
    mask = pixelcnn_mask_ref(mask_type, weight.shape[-1]).to(device=weight.device, dtype=weight.dtype)
    return F.conv2d(x, weight * mask, bias, padding=weight.shape[-1] // 2)


CONV_IMPLEMENTATIONS: dict[str, tuple[Callable, Optional[str]]] = {
    "fastvq": (fastvq_conv, "auto"),
    "conv2d(w*mask)": (dense_masked_conv, None),
}


def forward_backward(fn, mask_type, x, weight, bias, grad):
    out = fn(x, weight, bias, mask_type)
    return torch.autograd.grad(out, (x, weight, bias), grad)


def on_threads(threads: int, fn: Callable, *args):
    """``fn(*args)`` on ``threads`` intra-op threads: the peak-memory child is a fresh interpreter, which
    would otherwise run on all cores whatever the row's thread count (and the CPU path's row groups and
    chunks depend on it)."""
    torch.set_num_threads(threads)
    return fn(*args)


def _pass_call(fn, mask_type, pass_name, x, weight, bias, grad) -> Callable[[], object]:
    if pass_name == "fwd":
        def forward():
            with torch.no_grad():
                return fn(x, weight, bias, mask_type)
        return forward
    if pass_name == "bwd":
        out = fn(x, weight, bias, mask_type)
        return lambda: torch.autograd.grad(out, (x, weight, bias), grad, retain_graph=True)
    return functools.partial(forward_backward, fn, mask_type, x, weight, bias, grad)


def _backend_call(call: Callable[[], object], backend: Optional[str]) -> Callable[[], object]:
    """``call`` with ``FASTVQ_BACKEND`` set to ``backend`` (as it is when ``None``) for each call."""
    def with_backend():
        with _harness.environment_variable("FASTVQ_BACKEND", backend):
            return call()
    return with_backend


@contextlib.contextmanager
def tf32_allowed(allowed: bool) -> Iterator[None]:
    """Sets PyTorch's two TF32 switches, cuDNN's and the matmul one fastvq's kernels read."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def measure_conv_point(point: ConvPoint, dtype_name: str, device: str) -> tuple[list[dict], bool]:
    with tf32_allowed(dtype_name == "tf32"):
        return _measure_conv_point(point, dtype_name, device)


def _measure_conv_point(point: ConvPoint, dtype_name: str, device: str) -> tuple[list[dict], bool]:
    dtype = DTYPES[dtype_name]
    inputs = conv_inputs(point, dtype, device)
    pixels = point.batch * point.size * point.size
    forward_flops = 2 * pixels * point.channels * point.channels * point.taps()
    flops = {"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops}
    make_inputs = functools.partial(conv_inputs, point, dtype, device)
    make_warmup_inputs = functools.partial(conv_inputs, ConvPoint(1, point.channels, 8, point.kernel), dtype, device)
    rows, all_ran = [], True
    for pass_name in PASSES:
        pass_rows, calls = {}, {}
        for impl, (fn, backend) in CONV_IMPLEMENTATIONS.items():
            pass_rows[impl] = {
                "bench": f"masked_conv2d {pass_name}", "impl": impl, "batch": point.batch, "channels": point.channels,
                "size": point.size, "kernel": point.kernel, "mask": point.mask_type, "dtype": dtype_name,
                "threads": threads_used(device), "median_ms": None, "q20_ms": None, "q80_ms": None, "tflops": None,
                "peak_mib": None, "note": "", "load1": os.getloadavg()[0]}
            try:
                with _harness.environment_variable("FASTVQ_BACKEND", backend):
                    calls[impl] = _backend_call(_pass_call(fn, point.mask_type, pass_name, *inputs), backend)
                    if pass_name == "fwd+bwd":
                        pass_rows[impl]["peak_mib"] = _harness.peak_memory_growth_mib(
                            functools.partial(on_threads, torch.get_num_threads(), forward_backward, fn,
                                              point.mask_type), make_inputs, make_warmup_inputs, device)
            except Exception as error:  # keep measuring the rest of the grid, and say what failed
                all_ran = False
                first_line = str(error).splitlines()[0] if str(error) else ""
                pass_rows[impl]["note"] = f"failed: {type(error).__name__}: {first_line}"
                calls.pop(impl, None)
                print(f"  {impl} {pass_name}: {pass_rows[impl]['note']}")
        # Called in turn, so that a change in a shared machine's load falls on both alike.
        try:
            timings = _harness.time_interleaved(calls, device)
        except Exception as error:
            all_ran, timings = False, {}
            for impl in calls:
                pass_rows[impl]["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0]}"
            print(f"  {pass_name}: failed: {error}")
        for impl, timing in timings.items():
            pass_rows[impl].update(median_ms=timing.median_ms, q20_ms=timing.q20_ms, q80_ms=timing.q80_ms,
                                   tflops=_harness.tflops(flops[pass_name], timing.median_ms))
        rows += pass_rows.values()
    for pass_name in PASSES:
        dense = next(r for r in rows if r["impl"] == "conv2d(w*mask)" and r["bench"].endswith(f" {pass_name}"))
        for row in rows:
            if row["bench"] == dense["bench"] and row["median_ms"] and dense["median_ms"]:
                row["vs_dense"] = dense["median_ms"] / row["median_ms"]
    return rows, all_ran


# --------------------------------------------------------------------------- sampling


def build_prior(point: SamplerPoint, device: str):
    torch.manual_seed(0)
    model_class = GatedPixelCNN if point.model == "gated" else PixelCNN
    return model_class(point.num_codes, channels=point.channels, num_layers=point.num_layers, kernel_size=3,
                       first_kernel_size=7).to(device).eval()


def _timed_sample(model, point: SamplerPoint, method: str, device: str) -> tuple[float, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(1234)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    codes = model.sample(point.n, (point.size, point.size), generator=generator, method=method)
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)  # the sampler syncs every position anyway; this closes the last one
    return (time.perf_counter() - start) * 1e3, codes


def measure_sampler_point(point: SamplerPoint, device: str, fast_repeats: int,
                          naive_repeats: int) -> tuple[list[dict], bool]:
    """Times both samplers with the same seed (host clock around the whole, synchronised, loop),
    interleaved, and checks that they drew the same maps.

    Each naive sample runs between two fast ones (``fast, naive, fast, naive, ..., fast``, then any
    further fast samples), so a change in the machine's load falls on both: ``speedup`` is the
    median, over the naive samples, of its time over the mean of its two neighbouring fast
    samples' times, not the ratio of medians taken minutes apart."""
    model = build_prior(point, device)
    model.sample(point.n, (4, 4), method="fast")  # warm-up: thread pools, kernels, autotuning
    model.sample(point.n, (4, 4), method="naive")
    schedule = ["fast"]
    for _ in range(naive_repeats):
        schedule += ["naive", "fast"]
    schedule += ["fast"] * max(0, fast_repeats - (naive_repeats + 1))
    times: dict[str, list[float]] = {"naive": [], "fast": []}
    loads: dict[str, float] = {}
    rechecks, maps = [], {}
    for method in schedule:
        loads.setdefault(method, os.getloadavg()[0])
        elapsed, maps[method] = _timed_sample(model, point, method, device)
        times[method].append(elapsed)
        if method == "fast":
            rechecks.append(model.last_sample_rechecks)
        print(f"  {method:>5}: {elapsed / 1e3:8.2f} s", flush=True)
    rows = {}
    for method in ("naive", "fast"):
        rows[method] = {"bench": "pixelcnn_sample", "impl": method, "model": point.model, "layers": point.num_layers,
                        "size": point.size, "n": point.n, "channels": point.channels, "codes": point.num_codes,
                        "threads": threads_used(device),
                        "median_ms": statistics.median(times[method]), "q20_ms": min(times[method]),
                        "q80_ms": max(times[method]), "repeats": len(times[method]),
                        "rechecks": max(rechecks) if method == "fast" else None, "load1": loads[method], "note": ""}
    same = torch.equal(maps["naive"], maps["fast"])
    # The k-th naive sample ran between fast samples k and k + 1.
    ratios = [naive / ((times["fast"][k] + times["fast"][k + 1]) / 2) for k, naive in enumerate(times["naive"])]
    rows["fast"]["speedup"] = statistics.median(ratios)
    if not same:
        rows["fast"]["note"] = "FAILED: the fast sampler drew different maps"
    print(f"  speedup {rows['fast']['speedup']:.1f}x (interleaved), same maps: {same}", flush=True)
    return list(rows.values()), same


# --------------------------------------------------------------------------- main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--conv-only", action="store_true", help="only the convolution grid")
    which.add_argument("--sampler-only", action="store_true", help="only the sampler comparison")
    parser.add_argument("--headline-only", action="store_true",
                        help="of the convolution grid only the 7x7 type A and B points at 128 channels, 32x32, "
                             "batch 64")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES),
                        help="default: bf16, tf32 and fp32 on CUDA, fp32 on CPU")
    parser.add_argument("--naive-repeats", type=int, default=1, help="timed naive samples per point (default 1)")
    parser.add_argument("--fast-repeats", type=int, default=3, help="timed fast samples per point (default 3)")


def points(args: argparse.Namespace) -> list:
    """``(dtype, ConvPoint)`` of the convolution grid in each dtype, then the ``SamplerPoint``s
    (``--small``: the tiny grids; ``--headline-only``: the 7 x 7 headline convolutions)."""
    chosen: list = []
    if not args.sampler_only:
        grid = SMALL_CONV_GRID if args.small else HEADLINE if args.headline_only else CONV_GRIDS[args.device]
        chosen += [(dtype_name, point) for dtype_name in args.dtypes or DEFAULT_DTYPES[args.device] for point in grid]
    if not args.conv_only:
        chosen += SMALL_SAMPLER_GRID if args.small else SAMPLER_GRIDS[args.device]
    return chosen


def measure(point, run: _harness.Run) -> list[dict]:
    if isinstance(point, SamplerPoint):
        return measure_sampler_point(point, run.device, run.args.fast_repeats, run.args.naive_repeats)[0]
    dtype_name, conv_point = point
    rows, _ = measure_conv_point(conv_point, dtype_name, run.device)
    for row in rows:
        if row["bench"].endswith("fwd+bwd"):
            print(f"  {row['impl']:>15} fwd+bwd {row['median_ms'] or float('nan'):9.3f} ms"
                  f"  vs_dense {row.get('vs_dense') or float('nan'):.2f}", flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    # Convolution and sampler rows are keyed by their own columns; the other's are empty in each.
    keys = tuple(dict.fromkeys(CONV_KEYS + SAMPLER_KEYS))
    columns = tuple(dict.fromkeys(TABLE_COLUMNS + SAMPLER_COLUMNS))
    return _harness.main("masked_conv", points, measure, keys, columns,
                         description=__doc__.split("\n\n")[0], add_arguments=add_arguments, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
