"""The PyTorch path's masked convolution (``FASTVQ_BACKEND=torch``, and the fallback of ``cpp``).

A mask keeps a raster-order prefix of the kernel's taps (see ``fastvq._masks``): some full
rows, then the first few taps of the next row. So the masked convolution is the sum of two plain
convolutions over those two row groups, each on the slice of the zero-padded input it reads:

    out = conv2d(x_pad[rows 0 .. H_out + R - 2], weight[:, :, :R, :])
        + conv2d(x_pad[rows R .. R + H_out - 1, cols 0 .. W_out + P - 2], weight[:, :, R:R+1, :P])

with ``R`` full rows and ``P`` taps of row ``R``. No masked tap is multiplied (a 7 x 7 type-B
kernel costs 25 taps, not 49), the weight is only sliced, never masked or modified, and the extra
memory is one zero-padded copy of the input (and of its gradient in the backward). Low-precision
inputs are computed in fp32, fp64 in fp64.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..._masks import num_taps
from ..common import compute_dtype, output_memory_format, output_size, promoted_dtype


def _row_groups(mask_type: str, weight_shape, out_height: int, out_width: int):
    """``(weight rows, weight cols, padded-input rows, padded-input cols)`` slices of each non-empty group."""
    kernel_height, kernel_width = weight_shape[2], weight_shape[3]
    full_rows, partial = divmod(num_taps(mask_type, kernel_height, kernel_width), kernel_width)
    groups = []
    if full_rows:
        groups.append((slice(0, full_rows), slice(0, kernel_width),
                       slice(0, out_height + full_rows - 1), slice(0, out_width + kernel_width - 1)))
    if partial:
        groups.append((slice(full_rows, full_rows + 1), slice(0, partial),
                       slice(full_rows, full_rows + out_height), slice(0, out_width + partial - 1)))
    return groups


def masked_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask_type: str, padding: list[int]
) -> torch.Tensor:
    out_dtype = promoted_dtype(x, weight, bias)
    work = compute_dtype(out_dtype)
    pad_h, pad_w = padding
    out_height, out_width = output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], padding)
    x_pad = x.to(work)
    if pad_h or pad_w:
        x_pad = F.pad(x_pad, (pad_w, pad_w, pad_h, pad_h))
    weight = weight.to(work)
    bias = None if bias is None else bias.to(work)
    out = None
    for weight_rows, weight_cols, rows, cols in _row_groups(mask_type, weight.shape, out_height, out_width):
        if out is None:
            out = F.conv2d(x_pad[:, :, rows, cols], weight[:, :, weight_rows, weight_cols], bias)
        else:
            out.add_(F.conv2d(x_pad[:, :, rows, cols], weight[:, :, weight_rows, weight_cols]))
    if out is None:  # type A on a 1 x 1 kernel keeps no tap at all
        out = x_pad.new_zeros((x.shape[0], weight.shape[0], out_height, out_width))
        if bias is not None:
            out.add_(bias[:, None, None])
    return out.to(out_dtype).contiguous(memory_format=output_memory_format(x))


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
    pad_h, pad_w = padding
    height, width = x.shape[2], x.shape[3]
    out_height, out_width = grad_out.shape[2], grad_out.shape[3]
    grad = grad_out.to(work)
    x_pad = F.pad(x.to(work), (pad_w, pad_w, pad_h, pad_h))
    weight_work = weight.to(work)
    grad_x_pad = torch.zeros_like(x_pad) if compute_input_grad else None
    grad_weight = torch.zeros(weight.shape, dtype=work, device=weight.device) if compute_weight_grad else None
    for weight_rows, weight_cols, rows, cols in _row_groups(mask_type, weight.shape, out_height, out_width):
        part_x, part_weight, _ = torch.ops.aten.convolution_backward(
            grad, x_pad[:, :, rows, cols], weight_work[:, :, weight_rows, weight_cols], None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [compute_input_grad, compute_weight_grad, False],
        )
        if compute_input_grad:
            grad_x_pad[:, :, rows, cols] += part_x
        if compute_weight_grad:
            grad_weight[:, :, weight_rows, weight_cols] = part_weight
    if compute_input_grad:
        grad_x = grad_x_pad[:, :, pad_h : pad_h + height, pad_w : pad_w + width]
        grad_x = grad_x.to(x.dtype).contiguous(memory_format=output_memory_format(x))
    else:
        grad_x = x.new_empty(0)
    grad_weight = grad_weight.to(weight.dtype) if compute_weight_grad else weight.new_empty(0)
    return grad_x, grad_weight
