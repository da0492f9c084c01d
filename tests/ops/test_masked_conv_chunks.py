"""The PyTorch path's masked convolution works one batch chunk at a time, and so needs less memory than
``conv2d(x, weight * mask)``.

``fastvq.backends.torch.masked_conv`` copies each row group's zero-padded window of the input, and runs
oneDNN on it in channels-last, one chunk of ``CHUNK_ELEMENTS`` at a time. These tests shrink the chunk to a
couple of images so that small inputs span several chunks, a ragged last one included: the answers must not
change, no convolution may see more than a chunk, and the peak memory of a forward + backward (measured the
way the benchmark measures it, in a fresh interpreter) must stay below the dense masked ``conv2d``'s.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq import reference
from fastvq.backends.torch import masked_conv as torch_masked_conv

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _harness  # noqa: E402
import bench_masked_conv  # noqa: E402

CHUNK_IMAGES = 2


def _chunk_elements(images: int, channels: int, height: int, width: int, kernel: int) -> int:
    """``CHUNK_ELEMENTS`` that holds ``images`` images of the largest window of a "same"-padded kernel (the rows
    down to the centre's, on more than one thread; a row less on one, which still fits ``images`` images)."""
    largest_window = (height + kernel // 2) * (width + kernel - 1)
    return images * channels * largest_window


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    """On more than one thread the partial kernel row joins the full rows (one convolution per chunk)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


@pytest.fixture
def two_image_chunks(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")

    def set_for(channels, height, width, kernel):
        monkeypatch.setattr(torch_masked_conv, "CHUNK_ELEMENTS",
                            _chunk_elements(CHUNK_IMAGES, channels, height, width, kernel))
    return set_for


@pytest.mark.parametrize(
    "dtype, channels_last, mask_type, kernel, padding",
    [
        (torch.float32, False, "A", 7, None),
        (torch.float32, True, "B", 5, None),
        (torch.float32, False, "V", 3, None),
        (torch.float32, False, "A", 3, 0),
        (torch.float32, False, "B", 5, (1, 2)),
        (torch.float32, False, "A", 3, (3, 0)),
        (torch.bfloat16, False, "B", 3, None),
        (torch.bfloat16, True, "A", 5, None),
        (torch.float64, False, "B", 7, None),
    ],
)
def test_chunked_forward_and_gradients_match_reference(threads, two_image_chunks, dtype, channels_last, mask_type,
                                                       kernel, padding):
    batch, channels, height, width = 5, 6, 7, 9  # three chunks of 2, 2 and 1 images
    two_image_chunks(channels, height, width, kernel)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, height, width, generator=generator)
    weight = torch.randn(4, channels, kernel, kernel, generator=generator) / kernel
    bias = torch.randn(4, generator=generator)
    grad = torch.randn(reference.masked_conv2d_ref(x, weight, bias, mask_type, padding).shape, generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    leaves = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    out = fastvq.masked_conv2d(*leaves, mask_type=mask_type, padding=padding)
    out.backward(grad.to(dtype))
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    expected = reference.masked_conv2d_ref(*leaves64, mask_type, padding)
    expected.backward(grad.double())
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert leaves[0].grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}[dtype]
    for name, mine, exact in zip(("output", "grad_x", "grad_weight", "grad_bias"),
                                 (out, *(leaf.grad for leaf in leaves)), (expected, *(t.grad for t in leaves64))):
        scale = max(exact.abs().max().item(), 1.0)
        torch.testing.assert_close(mine.double(), exact, rtol=tolerance, atol=tolerance * scale,
                                   msg=lambda message, name=name: f"{name}: {message}")


class _ConvolutionBatches(TorchDispatchMode):
    """Records the batch size of every convolution (forward, input and weight gradient) run under it."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default):
            self.batches.append(args[1].shape[0] if func is torch.ops.aten.convolution_backward.default
                                else args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_no_convolution_sees_more_than_a_chunk(threads, two_image_chunks):
    batch, channels, height, width, kernel = 5, 6, 7, 9, 5
    two_image_chunks(channels, height, width, kernel)
    x = torch.randn(batch, channels, height, width)
    weight = torch.randn(4, channels, kernel, kernel)
    with _ConvolutionBatches() as recorded:
        out = torch_masked_conv.masked_conv2d(x, weight, None, "B", [2, 2])
        torch_masked_conv.masked_conv2d_backward(torch.ones_like(out), x, weight, "B", [2, 2], True, True)
    # Chunks of 2, 2 and 1 images, in the forward and in the backward; on one thread two row groups per chunk,
    # on two the partial row joins the full rows.
    per_chunk = 2 if threads == 1 else 1
    assert recorded.batches == [images for images in (2, 2, 1) for _ in range(per_chunk)] * 2


def fastvq_in_two_image_chunks(x, weight, bias, mask_type):
    """Module level, so that the benchmark harness's fresh interpreter can unpickle it (and sets the chunk
    there: a monkeypatch in this process does not reach it)."""
    torch_masked_conv.CHUNK_ELEMENTS = _chunk_elements(CHUNK_IMAGES, x.shape[1], x.shape[2], x.shape[3],
                                                       weight.shape[-1])
    return fastvq.masked_conv2d(x, weight, bias, mask_type=mask_type)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="VmHWM can only be reset through /proc/self/clear_refs (Linux)")
def test_peak_memory_of_forward_and_backward_is_below_dense_conv2d(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")  # the spawned interpreters inherit it
    point = bench_masked_conv.ConvPoint(64, 32, 32, 7, "A")
    make_inputs = functools.partial(bench_masked_conv.conv_inputs, point, torch.float32, "cpu")
    make_warmup_inputs = functools.partial(bench_masked_conv.conv_inputs, bench_masked_conv.ConvPoint(1, 32, 8, 7),
                                           torch.float32, "cpu")
    growth = {
        name: _harness.peak_memory_growth_mib(functools.partial(bench_masked_conv.forward_backward, fn, "A"),
                                              make_inputs, make_warmup_inputs, "cpu")
        for name, fn in (("fastvq", fastvq_in_two_image_chunks), ("dense", bench_masked_conv.dense_masked_conv))
    }
    x_mib = 64 * 32 * 32 * 32 * 4 / 2**20
    print(f"peak growth: fastvq {growth['fastvq']:.1f} MiB, conv2d(w*mask) {growth['dense']:.1f} MiB; x {x_mib} MiB")
    # Both hold the output and grad_x (2 x); conv2d adds oneDNN's reordered copies of the whole x and output
    # gradient, fastvq a chunk's windows and oneDNN's code for the chunk shapes (26.7 against 39.5 MiB here).
    assert growth["fastvq"] < growth["dense"], growth
