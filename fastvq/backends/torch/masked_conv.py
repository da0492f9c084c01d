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

Memory: each group's window is its own zero-padded copy of the input (its paddings are one-sided,
which ``conv2d``'s symmetric padding cannot express), and oneDNN runs fastest, without reordering
its operands, on channels-last tensors. Both copies are made one batch chunk at a time
(:data:`CHUNK_ELEMENTS`), and outputs and gradients are written into their final tensors chunk by
chunk, so the extra memory is a few chunks' worth whatever the batch, where ``conv2d`` on NCHW
tensors takes oneDNN's reordered copies of the whole input and output gradient. At 7 x 7, batch 64,
128 channels, 32 x 32, fp32 the forward + backward's peak growth is 100 MiB against
``conv2d(x, weight * mask)``'s 131 (``benchmarks/bench_masked_conv.py``). Low-precision inputs are
computed in fp32, fp64 in fp64.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..._masks import num_taps
from ..common import compute_dtype, output_memory_format, output_size, promoted_dtype

# The batch chunk's size, in elements of its largest per-group window (1 Mi: 4 MiB in fp32). Large
# enough that oneDNN's convolutions run at full speed on it (a 128-channel 32 x 32 map chunks 6 images at
# a time), small enough that the chunk's temporaries stay well below the whole batch's. Each chunk costs the
# thread pool a few fork/joins: on two threads of a loaded machine 11 chunks made the 7 x 7 benchmark 0.85-0.95x
# conv2d's time where one chunk of the whole batch ran 1.4-1.6x faster, its temporaries then the whole batch's.
CHUNK_ELEMENTS = 1 << 20

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


def _batch_chunk(x: torch.Tensor, windows: list[_Window]) -> int:
    largest = max((len(w.rows) * len(w.cols) for w in windows), default=1) * max(x.shape[1], 1)
    return max(1, CHUNK_ELEMENTS // largest)


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
    chunk = _batch_chunk(x, windows)
    window_inputs = _WindowInputs(x, windows, chunk, work)
    for start in range(0, x.shape[0], chunk):
        total = None
        for window_input, window_weight in zip(window_inputs.fill(x[start : start + chunk]), weights):
            part = F.conv2d(window_input, window_weight, bias if total is None else None)
            total = part if total is None else total.add_(part)
        out[start : start + chunk] = total
    return out


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
    empty tensor. Masked taps of ``grad_weight`` are exactly zero."""
    work = compute_dtype(promoted_dtype(x, weight, None))
    height, width = x.shape[2], x.shape[3]
    out_height, out_width = grad_out.shape[2], grad_out.shape[3]
    windows = [w for w in _windows(mask_type, weight.shape, padding, out_height, out_width)
               if w.reads_input(height, width)]
    weights = _window_weights(weight, windows, work)
    grad_x = (_zeros(x.shape, x.dtype, x.device, output_memory_format(x))
              if compute_input_grad else None)
    grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if compute_weight_grad else None
    accumulate_in_place = x.dtype == work
    chunk = _batch_chunk(x, windows)
    window_inputs = _WindowInputs(x, windows, chunk, work)
    for start in range(0, x.shape[0] if windows else 0, chunk):
        grad_chunk = grad_out[start : start + chunk].to(work).contiguous(memory_format=_WORK_FORMAT)
        # In place into grad_x where it already has the working dtype; else in a working-dtype chunk.
        grad_x_chunk = None
        if compute_input_grad:
            grad_x_chunk = grad_x[start : start + chunk]
            if not accumulate_in_place:
                grad_x_chunk = _zeros(grad_x_chunk.shape, work, x.device, _WORK_FORMAT)
        window_inputs_chunk = window_inputs.fill(x[start : start + chunk])
        for window, window_input, window_weight in zip(windows, window_inputs_chunk, weights):
            part_x, part_weight, _ = torch.ops.aten.convolution_backward(
                grad_chunk, window_input, window_weight, None,
                [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [compute_input_grad, compute_weight_grad, False],
            )
            if compute_input_grad:
                source_rows, source_cols = window.source(height, width)
                rows, cols = window.destination(height, width)
                grad_x_chunk[:, :, source_rows, source_cols] += part_x[:, :, rows, cols]
            if compute_weight_grad:
                grad_weight[:, :, window.weight_rows, window.weight_cols] += part_weight
        if compute_input_grad and not accumulate_in_place:
            grad_x[start : start + chunk] = grad_x_chunk
    for window in windows if compute_weight_grad else ():
        window.zero_masked_taps(grad_weight[:, :, window.weight_rows, window.weight_cols])
    grad_x = grad_x if compute_input_grad else x.new_empty(0)
    grad_weight = grad_weight.to(weight.dtype) if compute_weight_grad else weight.new_empty(0)
    return grad_x, grad_weight
