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
        elements = _chunk_elements(CHUNK_IMAGES, channels, height, width, kernel)
        monkeypatch.setattr(torch_masked_conv, "CHUNK_ELEMENTS", elements)
        monkeypatch.setattr(torch_masked_conv, "PARALLEL_CHUNK_ELEMENTS", elements)
        for share in ("CHUNK_MEMORY_SHARE", "ONE_THREAD_CHUNK_MEMORY_SHARE"):  # the speed bound alone sets the chunk
            monkeypatch.setattr(torch_masked_conv, share, 1e9)
        monkeypatch.setattr(torch_masked_conv, "PARALLEL_MIN_CHUNK_IMAGES", 1)
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
    # Forward: three chunks of 2, 2 and 1 images; backward (windows of the 4-channel output gradient): 3 and 2.
    batch, channels, height, width = 5, 6, 7, 9
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
    weight = torch.randn(channels, channels, kernel, kernel)  # windows of x and of grad_out alike: 2 images
    with _ConvolutionBatches() as recorded:
        out = torch_masked_conv.masked_conv2d(x, weight, None, "B", [2, 2])
        torch_masked_conv.masked_conv2d_backward(torch.ones_like(out), x, weight, "B", [2, 2], True, True)
    # Chunks of 2, 2 and 1 images, in the forward and in the backward; on one thread two row groups per chunk,
    # on two the partial row joins the full rows. The backward runs two convolutions per group: the input
    # gradient's (a forward one) and the weight gradient's.
    groups = 2 if threads == 1 else 1
    forward = [images for images in (2, 2, 1) for _ in range(groups)]
    backward = [images for images in (2, 2, 1) for _ in range(groups) for _ in range(2)]
    assert recorded.batches == forward + backward


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="VmHWM can only be reset through /proc/self/clear_refs (Linux)")
@pytest.mark.parametrize("threads", [1, 2])
def test_peak_memory_of_forward_and_backward_is_below_dense_conv2d(monkeypatch, threads):
    """At 32 channels, batch 64, 7 x 7 the chunk's memory bound is what keeps fastvq's peak below conv2d's:
    on two threads the speed bound alone would take the whole batch in one chunk (33.5 MiB against 32.0)."""
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")  # the spawned interpreters inherit it
    point = bench_masked_conv.ConvPoint(64, 32, 32, 7, "A")
    make_inputs = functools.partial(bench_masked_conv.conv_inputs, point, torch.float32, "cpu")
    make_warmup_inputs = functools.partial(bench_masked_conv.conv_inputs, bench_masked_conv.ConvPoint(1, 32, 8, 7),
                                           torch.float32, "cpu")
    growth = {
        name: _harness.peak_memory_growth_mib(
            functools.partial(bench_masked_conv.on_threads, threads, bench_masked_conv.forward_backward, fn, "A"),
            make_inputs, make_warmup_inputs, "cpu")
        for name, fn in (("fastvq", bench_masked_conv.fastvq_conv), ("dense", bench_masked_conv.dense_masked_conv))
    }
    x_mib = 64 * 32 * 32 * 32 * 4 / 2**20
    print(f"peak growth: fastvq {growth['fastvq']:.1f} MiB, conv2d(w*mask) {growth['dense']:.1f} MiB; x {x_mib} MiB")
    # Both hold the output and grad_x (2 x); conv2d adds oneDNN's reordered copies of the whole x, output and
    # gradients, fastvq a chunk's windows and copies (measured 26-30 against 32-40 MiB here).
    assert growth["fastvq"] < growth["dense"], growth


def _chunk_at(threads: int, batch: int, channels: int, kernel: int, mask_type: str = "A", size: int = 32) -> int:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        windows = torch_masked_conv._windows(mask_type, (channels, channels, kernel, kernel),
                                             (kernel // 2, kernel // 2), size, size)
        image = channels * size * size
        return torch_masked_conv._batch_chunk(batch, image, image,
                                              [channels * len(w.rows) * len(w.cols) for w in windows])
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels, kernel", [(32, 7), (64, 7), (128, 7), (64, 3), (64, 5), (256, 3)])
def test_chunk_temporaries_stay_within_the_memory_share_of_the_batch(threads, channels, kernel):
    """The memory bound holds at every channel count and thread count: a chunk's estimated temporaries
    (CHUNK_WINDOW_COPIES of its windows per image) take at most CHUNK_MEMORY_SHARE of x's size, so with the
    output and grad_x (2 |x|) the peak stays below conv2d's (about 4 |x|). Without it, two threads at 32
    channels took the whole batch of 64 in one chunk."""
    batch, size = 64, 32
    chunk = _chunk_at(threads, batch, channels, kernel)
    windows = torch_masked_conv._windows("A", (channels, channels, kernel, kernel), (kernel // 2,) * 2, size, size)
    # The windows depend on the thread count too (one group on two threads, two on one).
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        windows = torch_masked_conv._windows("A", (channels, channels, kernel, kernel), (kernel // 2,) * 2, size, size)
    finally:
        torch.set_num_threads(previous)
    share = torch_masked_conv.ONE_THREAD_CHUNK_MEMORY_SHARE if threads == 1 else torch_masked_conv.CHUNK_MEMORY_SHARE
    temporaries = torch_masked_conv.CHUNK_WINDOW_COPIES * chunk * sum(len(w.rows) * len(w.cols) for w in windows)
    assert temporaries <= share * batch * size * size
    assert share <= 1.25  # with the output and grad_x (2 |x|), at most 3.25 |x| against conv2d's 4 |x|
    assert chunk < batch // 2  # at least three chunks at every size here


def test_chunks_are_as_large_as_memory_allows_on_two_threads_and_even():
    # Two threads: the memory bound sets the chunk (13 images at 7 x 7, batch 64, 5 chunks), not a speed
    # bound like one thread's (6 images at 128 channels, 11 chunks).
    assert _chunk_at(2, 64, 128, 7) == 13
    assert _chunk_at(1, 64, 128, 7) == 5  # one thread: the speed bound's 6, under the memory bound's 5
    assert _chunk_at(2, 64, 32, 7) == 13
    # Evened out: at batch 66 13 images fit, but 6 chunks of 11 hold the batch as well as 13 x 5 and 1 would.
    assert _chunk_at(2, 66, 32, 7) == 11
    # Small batches: on two threads no chunk of fewer than 4 images (per-chunk costs rule there, in time and
    # memory alike), on one the memory bound's single images; a batch smaller than that is one chunk.
    assert _chunk_at(2, 8, 128, 7) == 4
    assert _chunk_at(1, 8, 128, 7) == 1
    assert _chunk_at(2, 1, 128, 7) == 1
