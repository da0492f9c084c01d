"""The masked convolution bench under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

It times forward + backward of the same implementations as ``bench_masked_conv.py`` on its
``--small`` convolution grid, and both samplers on its small sampler point; the script is where the
full grids, the peak memory and the result files live. ``pytest tests`` never collects this file.
On CUDA every call ends with a ``torch.cuda.synchronize()``, so the host clock covers the work.
"""

from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from _harness import tflops  # noqa: E402
from bench_masked_conv import (  # noqa: E402
    CONV_IMPLEMENTATIONS,
    SMALL_CONV_GRID,
    SMALL_SAMPLER_GRID,
    build_prior,
    conv_inputs,
    forward_backward,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _synchronized(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("point", SMALL_CONV_GRID, ids=[f"B{p.batch}-C{p.channels}-{p.mask_type}{p.kernel}-S{p.size}"
                                                         for p in SMALL_CONV_GRID])
@pytest.mark.parametrize("impl", list(CONV_IMPLEMENTATIONS))
def test_masked_conv2d_forward_backward(benchmark, monkeypatch, impl, point):
    fn, backend = CONV_IMPLEMENTATIONS[impl]
    if backend is not None:
        monkeypatch.setenv("FASTVQ_BACKEND", backend)
    call = functools.partial(forward_backward, fn, point.mask_type, *conv_inputs(point, torch.float32, DEVICE))
    call()  # Triton autotunes on the first call; keep it out of the timed rounds
    benchmark.group = f"masked_conv2d fwd+bwd {point.label} C={point.channels} B={point.batch}"
    benchmark(_synchronized(call) if DEVICE == "cuda" else call)
    if benchmark.stats is not None:  # None under --benchmark-disable, which runs the call once untimed
        forward_flops = 2 * point.batch * point.size**2 * point.channels**2 * point.taps()
        benchmark.extra_info["tflops"] = tflops(3 * forward_flops, benchmark.stats.stats.median * 1e3)


@pytest.mark.parametrize("method", ["naive", "fast"])
def test_pixelcnn_sample(benchmark, method):
    point = SMALL_SAMPLER_GRID[0]
    model = build_prior(point, DEVICE)
    model.sample(point.n, (4, 4), method=method)
    benchmark.group = f"pixelcnn sample {point.label} n={point.n}"
    benchmark.pedantic(model.sample, args=(point.n, (point.size, point.size)), kwargs={"method": method},
                       rounds=1 if method == "naive" else 3, iterations=1)
