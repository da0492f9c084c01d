"""The PyTorch path's masked convolution (``FASTVQ_BACKEND=torch``, and the fallback of ``cpp``).

A mask keeps a raster-order prefix of the kernel's taps (see ``fastvq._masks``): some full
rows, then the first few taps of the next row. So the masked convolution is the sum of two plain
convolutions, one per row group, each over the window of the zero-padded input that it reads:

    out = conv2d(x_pad[rows 0 .. H_out + R - 2], weight[:, :, :R, :])
        + conv2d(x_pad[rows R .. R + H_out - 1, cols 0 .. W_out + P - 2], weight[:, :, R:R+1, :P])

with ``R`` full rows and ``P`` taps of row ``R``. No masked tap is multiplied (a 7 x 7 type-B
kernel costs 25 taps, not 49), and the weight is only sliced, never masked or modified. On more than
one thread the row ``R`` joins the full rows instead (one convolution over ``R + 1`` rows whose weight
copy has the ``K - P`` masked taps zeroed, 28 taps at 7 x 7): fewer fork/joins of the thread pool per
chunk for a few more taps (see ``_windows``).

The input gradient is the same sum run backwards: each group's share is a plain forward convolution of
the output gradient's zero-padded window with the group's flipped, transposed taps (``_gradient_windows``),
exactly ``x``'s size; the weight gradient is that convolution's weight gradient, with ``x``'s chunk as its
output gradient.

Memory: each group's window is its own zero-padded copy of the input (its paddings are one-sided,
which ``conv2d``'s symmetric padding cannot express), and oneDNN runs fastest, without reordering
its operands, on channels-last tensors. The copies are made one batch chunk at a time into buffers that
every chunk reuses, and outputs and gradients are written into their final tensors chunk by chunk, so the
extra memory is a chunk's worth, where ``conv2d`` on NCHW tensors takes oneDNN's reordered copies of the
whole input, output and gradients. The chunk is bounded by speed (:data:`CHUNK_ELEMENTS` on one thread,
:data:`PARALLEL_CHUNK_ELEMENTS` on more) and by memory (:data:`CHUNK_MEMORY_SHARE`), so that the peak
stays below ``conv2d(x, weight * mask)``'s at every channel count. At 7 x 7, batch 64, 128 channels,
32 x 32, fp32 the forward + backward's peak growth is 103-115 MiB on two threads (13-image chunks)
against conv2d's 128-134 (``benchmarks/bench_masked_conv.py``). Low-precision inputs are computed in fp32,
fp64 in fp64.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..._masks import num_taps
from ..common import compute_dtype, output_memory_format, output_size, promoted_dtype

# The batch chunk's size on one thread, in elements of its largest per-group window (1 Mi: 4 MiB in fp32).
# Large enough that oneDNN's convolutions run at full speed on it (a 128-channel 32 x 32 map chunks 6 images
# at a time), small enough that the chunk's temporaries stay well below the whole batch's; on one thread the
# size barely matters (1 to 12 images at 7 x 7, batch 64: 1.5-1.8x conv2d's speed).
CHUNK_ELEMENTS = 1 << 20
# The same on more than one thread, where each chunk costs the thread pool about ten fork/joins and each
# waits for a descheduled thread on a loaded machine: at 7 x 7, 128 channels, batch 64 on two threads (load
# 7-10 on 2 cores), chunks of 6 images ran 1.09x conv2d's speed, 11 images 1.21x, 16 images 1.30x, 32 images
# 1.42x. So there the chunk is as large as the memory bound below allows (13 images at that size).
PARALLEL_CHUNK_ELEMENTS = 1 << 24

# The memory bound, whatever the thread count. Beyond its output and grad_x, which this path holds too,
# conv2d(x, weight * mask) on NCHW tensors holds oneDNN's reordered copies of x, the output, its gradient
# and grad_x (its peak growth is about 4 |x| at C_in = C_out: 128-134 MiB at 128 channels, 31-39 MiB at 32,
# with |x| 32 and 8 MiB). A chunk's temporaries, per image, are about CHUNK_WINDOW_COPIES of its row groups'
# windows (the windows of x or of the output gradient, x's chunk, a convolution's output, and what the
# allocator keeps of the forward's), and they may take at most CHUNK_MEMORY_SHARE of (|x| + |out|) / 2 over
# the whole batch. Measured at 7 x 7, batch 64 (peak growth of a forward + backward, fresh interpreters):
# on two threads 13-image chunks 103-115 MiB at 128 channels, 16-image ones 111-130 MiB (conv2d: 128-134),
# 32-image ones 150 MiB; at 32 channels 16-image chunks 26-30 MiB, 32-image ones 34 (conv2d: 31-40); at
# 64 channels, 5 x 5, 16-image chunks 56-64 MiB, 13-image ones 57 (conv2d: 64), hence 1.1 (13 images in
# both cases) rather than 1.25 (16 at 5 x 5). One
# thread runs two row groups, and oneDNN's one-thread kernels take about |x| more from the first call at 32
# channels (24 MiB with 1-image chunks, against 17 on two threads): there the share is
# ONE_THREAD_CHUNK_MEMORY_SHARE (5-image chunks, 28.5 MiB; 10 images took 32 MiB).
CHUNK_WINDOW_COPIES = 4
CHUNK_MEMORY_SHARE = 1.1
ONE_THREAD_CHUNK_MEMORY_SHARE = 0.75
# On more than one thread a chunk holds at least this many images (or the whole batch): in small batches the
# per-chunk costs rule, in time and in memory alike. At batch 8, 7 x 7, 128 channels, two threads (load 9-10):
# 1-image chunks ran 0.56x conv2d's speed and peaked at 24.7 MiB, 4-image ones 1.06x and 19.0 MiB (conv2d:
# 16.8 MiB, which neither reaches), the whole batch 1.27x.
PARALLEL_MIN_CHUNK_IMAGES = 4

# The layout of every temporary: oneDNN's native one on CPU, where NCHW operands are reordered first.
_WORK_FORMAT = torch.channels_last


class _Window(NamedTuple):
    """One row group: its weight taps, and the window of ``x`` (in ``x``'s own coordinates, reaching into
    the zero padding where they are negative or past the edge) that the group's plain convolution reads."""

    weight_rows: slice
    weight_cols: slice
    rows: range
    cols: range
    masked_from: Optional[int] = None  # the first masked tap of the last weight row, if the row joined the others

    def zero_masked_taps(self, weight: torch.Tensor) -> None:
        """Zeroes, in place, the masked taps of a tensor shaped like the group's weight."""
        if self.masked_from is not None:
            weight[:, :, -1, self.masked_from :] = 0

    def source(self, height: int, width: int) -> tuple[slice, slice]:
        """The part of the window inside ``x``, in ``x``'s coordinates."""
        return (slice(max(self.rows.start, 0), min(self.rows.stop, height)),
                slice(max(self.cols.start, 0), min(self.cols.stop, width)))

    def destination(self, height: int, width: int) -> tuple[slice, slice]:
        """The same part in the window's coordinates."""
        rows, cols = self.source(height, width)
        return (slice(rows.start - self.rows.start, rows.stop - self.rows.start),
                slice(cols.start - self.cols.start, cols.stop - self.cols.start))

    def reads_input(self, height: int, width: int) -> bool:
        rows, cols = self.source(height, width)
        return rows.stop > rows.start and cols.stop > cols.start


def _windows(mask_type: str, weight_shape, padding, out_height: int, out_width: int) -> list[_Window]:
    """The non-empty row groups: the full rows above, then the kept taps of the next row."""
    kernel_height, kernel_width = weight_shape[2], weight_shape[3]
    pad_h, pad_w = padding
    full_rows, partial = divmod(num_taps(mask_type, kernel_height, kernel_width), kernel_width)
    groups = []
    if full_rows and partial and torch.get_num_threads() > 1:
        # One group of the rows down to the partial one, its masked taps zeroed: K - P more taps (4 of 28 at
        # 7 x 7 type A), but one copy, convolution and accumulation per chunk instead of two, each a fork/join
        # of the thread pool that waits for a descheduled thread on a loaded machine. On two threads at 7 x 7,
        # batch 64 that made the path 1.07-1.10x conv2d's speed where two groups ran 0.88-0.89x; on one thread
        # the extra taps cost more than the fork/joins save (1.57x against 1.71x at type A).
        groups.append((0, full_rows + 1, kernel_width, partial))
    else:
        if full_rows:
            groups.append((0, full_rows, kernel_width, None))
        if partial:
            groups.append((full_rows, 1, partial, None))
    # Output (i, j) of a group whose taps start at kernel row r0 reads padded rows i + r0 .. i + r0 + rows - 1.
    return [
        _Window(slice(first_row, first_row + rows), slice(0, cols),
                range(first_row - pad_h, first_row + rows - 1 + out_height - pad_h),
                range(-pad_w, cols - 1 + out_width - pad_w), masked_from)
        for first_row, rows, cols, masked_from in groups
    ]


def _batch_chunk(batch: int, x_image_elements: int, out_image_elements: int, window_elements: list[int]) -> int:
    """Images per batch chunk: the thread count's speed bound (``CHUNK_ELEMENTS`` on one thread,
    ``PARALLEL_CHUNK_ELEMENTS`` on more, in elements of the largest window), under the memory bound
    (``CHUNK_MEMORY_SHARE``, ``ONE_THREAD_CHUNK_MEMORY_SHARE``; on more than one thread no less than
    ``PARALLEL_MIN_CHUNK_IMAGES``), then evened out so that the last chunk is not a sliver of the others.
    ``window_elements``: each window's elements per image (its channels times its rows times its columns)."""
    batch, window_elements = max(batch, 1), [max(elements, 1) for elements in window_elements] or [1]
    one_thread = torch.get_num_threads() == 1
    speed_bound = CHUNK_ELEMENTS if one_thread else PARALLEL_CHUNK_ELEMENTS
    share = ONE_THREAD_CHUNK_MEMORY_SHARE if one_thread else CHUNK_MEMORY_SHARE
    memory_bound = int(share * batch * (x_image_elements + out_image_elements) / 2
                       // (CHUNK_WINDOW_COPIES * sum(window_elements)))
    chunk = max(1, min(speed_bound // max(window_elements), memory_bound, batch))
    if not one_thread:
        chunk = max(chunk, min(PARALLEL_MIN_CHUNK_IMAGES, batch))
    chunks = -(-batch // chunk)
    return -(-batch // chunks)


def _zeros(shape, dtype: torch.dtype, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format).zero_()


class _WindowInputs:
    """Each window's zero-padded input for one batch chunk, in the working dtype and layout.

    One buffer per window, zeroed once and reused by every chunk: the chunks fill the same part inside
    ``x`` and the padding around it stays zero, so a chunk costs one copy and no new allocation."""

    def __init__(self, x: torch.Tensor, windows: list[_Window], chunk: int, dtype: torch.dtype):
        self.height, self.width = x.shape[2], x.shape[3]
        self.windows = windows
        self.buffers = [_zeros((min(chunk, x.shape[0]), x.shape[1], len(w.rows), len(w.cols)), dtype, x.device,
                               _WORK_FORMAT) for w in windows]

    def fill(self, x_chunk: torch.Tensor) -> list[torch.Tensor]:
        inputs = []
        for window, buffer in zip(self.windows, self.buffers):
            source_rows, source_cols = window.source(self.height, self.width)
            rows, cols = window.destination(self.height, self.width)
            windowed = buffer[: x_chunk.shape[0]]
            windowed[:, :, rows, cols] = x_chunk[:, :, source_rows, source_cols]
            inputs.append(windowed)
        return inputs


def _window_weights(weight: torch.Tensor, windows: list[_Window], dtype: torch.dtype) -> list[torch.Tensor]:
    weights = []
    for window in windows:
        kept = weight[:, :, window.weight_rows, window.weight_cols]
        weights.append(kept.to(dtype, copy=True).contiguous(memory_format=_WORK_FORMAT))
        window.zero_masked_taps(weights[-1])
    return weights


def masked_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str, padding: list[int]
) -> torch.Tensor:
    out_dtype = promoted_dtype(x, weight, bias)
    work = compute_dtype(out_dtype)
    height, width = x.shape[2], x.shape[3]
    out_height, out_width = output_size(height, width, weight.shape[2], weight.shape[3], padding)
    out = torch.empty((x.shape[0], weight.shape[0], out_height, out_width), dtype=out_dtype, device=x.device,
                      memory_format=output_memory_format(x))
    windows = [w for w in _windows(mask_type, weight.shape, padding, out_height, out_width)
               if w.reads_input(height, width)]
    if not windows:  # type A on a 1 x 1 kernel keeps no tap; or every tap reads only zero padding
        out.zero_()
        if bias is not None:
            out.add_(bias.to(out_dtype)[:, None, None])
        return out
    weights = _window_weights(weight, windows, work)
    bias = None if bias is None else bias.to(work)
    chunk = _batch_chunk(x.shape[0], x.shape[1] * height * width, weight.shape[0] * out_height * out_width,
                         [x.shape[1] * len(w.rows) * len(w.cols) for w in windows])
    window_inputs = _WindowInputs(x, windows, chunk, work)
    for start in range(0, x.shape[0], chunk):
        total = None
        for window_input, window_weight in zip(window_inputs.fill(x[start : start + chunk]), weights):
            part = F.conv2d(window_input, window_weight, bias if total is None else None)
            total = part if total is None else total.add_(part)
        out[start : start + chunk] = total
    return out


def _gradient_windows(windows: list[_Window], padding, height: int, width: int) -> list[_Window]:
    """For each group, the window of the output gradient whose plain convolution with the group's flipped,
    transposed taps is the group's share of the input gradient, exactly ``height x width`` (``x``'s size).

    ``out[i, j] += w[r0 + r, c] x[i + r0 + r - pad_h, j + c - pad_w]`` for the group's ``R x P`` taps gives
    ``grad_x[a, b] += w[r0 + r, c] g[a - r0 - r + pad_h, b - c + pad_w]``: with ``r' = R - 1 - r`` and
    ``c' = P - 1 - c`` a correlation over gradient rows ``a + pad_h - r0 - R + 1 ..`` and columns
    ``b + pad_w - P + 1 ..``, zero outside ``g``."""
    pad_h, pad_w = padding
    gradient_windows = []
    for window in windows:
        rows, cols = window.weight_rows.stop - window.weight_rows.start, window.weight_cols.stop
        first_row, first_col = pad_h - window.weight_rows.start - rows + 1, pad_w - cols + 1
        gradient_windows.append(window._replace(rows=range(first_row, first_row + height + rows - 1),
                                                cols=range(first_col, first_col + width + cols - 1)))
    return gradient_windows


def _flipped(weight: torch.Tensor) -> torch.Tensor:
    """``weight [C_out, C_in, R, P]`` as the taps of its adjoint convolution: ``[C_in, C_out, R, P]``, both
    spatial axes reversed. Its own inverse (up to the layout)."""
    return weight.flip(2, 3).transpose(0, 1)


def masked_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_type: str,
    padding: list[int],
    compute_input_grad: bool,
    compute_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)`` in ``x``'s and ``weight``'s dtypes; a gradient not asked for is an
    empty tensor. Masked taps of ``grad_weight`` are exactly zero.

    Each group's input gradient is a plain forward convolution of the output gradient's zero-padded window
    with the group's flipped, transposed taps (``_gradient_windows``): its result is exactly the chunk's
    ``x``-sized gradient, where oneDNN's backward-data pass would return the whole padded window (and, on
    channels-last operands, a reordered copy of it too). The weight gradient is that same convolution's
    weight gradient with ``x``'s chunk as its output gradient, so the backward copies the output gradient's
    window and ``x``'s chunk, not ``x``'s window."""
    work = compute_dtype(promoted_dtype(x, weight, None))
    height, width = x.shape[2], x.shape[3]
    out_height, out_width = grad_out.shape[2], grad_out.shape[3]
    windows = [w for w in _windows(mask_type, weight.shape, padding, out_height, out_width)
               if w.reads_input(height, width)]
    gradient_windows = _gradient_windows(windows, padding, height, width)
    flipped_weights = [_flipped(w).contiguous(memory_format=_WORK_FORMAT)
                       for w in _window_weights(weight, windows, work)]
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x)) \
        if compute_input_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if compute_weight_grad else None
    if not windows:  # no kept tap reads x
        grad_x = grad_x.zero_() if compute_input_grad else None
    chunk = _batch_chunk(x.shape[0], x.shape[1] * height * width, grad_out.shape[1] * out_height * out_width,
                         [grad_out.shape[1] * len(w.rows) * len(w.cols) for w in gradient_windows])
    gradient_inputs = _WindowInputs(grad_out, gradient_windows, chunk, work)
    # x's chunks in the working dtype and layout, the weight gradient's operand: one buffer for every chunk
    # (a fresh copy per chunk left the allocator holding several), none where x's own chunks already are.
    x_in_work_layout = x.dtype == work and x.is_contiguous(memory_format=_WORK_FORMAT)
    x_buffer = (torch.empty((min(chunk, x.shape[0]), *x.shape[1:]), dtype=work, device=x.device,
                            memory_format=_WORK_FORMAT) if compute_weight_grad and not x_in_work_layout else None)
    for start in range(0, x.shape[0] if windows else 0, chunk):
        x_chunk = x[start : start + chunk]
        if x_buffer is not None:
            x_chunk = x_buffer[: x_chunk.shape[0]].copy_(x_chunk)
        grad_x_chunk = None
        for window, gradient_input, flipped_weight in zip(
            windows, gradient_inputs.fill(grad_out[start : start + chunk]), flipped_weights
        ):
            if compute_input_grad:
                part_x = F.conv2d(gradient_input, flipped_weight)
                grad_x_chunk = part_x if grad_x_chunk is None else grad_x_chunk.add_(part_x)
            if compute_weight_grad:
                _, part_flipped, _ = torch.ops.aten.convolution_backward(
                    x_chunk, gradient_input, flipped_weight, None,
                    [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False],
                )
                grad_weight[:, :, window.weight_rows, window.weight_cols] += _flipped(part_flipped)
        if compute_input_grad:
            grad_x[start : start + chunk] = grad_x_chunk
        del x_chunk, grad_x_chunk  # before the next chunk's are made: one chunk's temporaries at a time
    for window in windows if compute_weight_grad else ():
        window.zero_masked_taps(grad_weight[:, :, window.weight_rows, window.weight_cols])
    grad_x = grad_x if compute_input_grad else x.new_empty(0)
    grad_weight = grad_weight.to(weight.dtype) if compute_weight_grad else weight.new_empty(0)
    return grad_x, grad_weight
