"""PixelCNN's masked convolution, computing only the taps its mask keeps.

The public :func:`masked_conv2d`, then the operator ``torch.ops.fastvq.masked_conv2d`` (its check, its
real implementation, its fake), its backward operator ``torch.ops.fastvq.masked_conv2d_backward`` and the
autograd that joins them. The argument helpers that ``fastvq.nn.MaskedConv2d`` shares
(:func:`resolve_padding`, :func:`unbatched_as_batch`) live here too.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_same_device, check_tensor
from .._masks import check_kernel_size, check_mask_type
from ..backends.common import output_memory_format, output_size, promoted_dtype

PaddingArg = Union[None, int, str, Sequence[int]]


def masked_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    mask_type: str = "B",
    padding: PaddingArg = None,
) -> Tensor:
    """PixelCNN's masked convolution, computing only the taps the mask keeps.

    Equal to ``conv2d(x, weight * mask, bias, padding=padding)`` with stride 1 (the reference is
    ``fastvq.reference.masked_conv2d_ref``), but the masked taps are skipped rather than multiplied
    by zero: a 7 x 7 type-B layer does 25 taps' work instead of 49, and a NaN or Inf stored in a
    masked tap of ``weight`` has no effect. ``weight`` is never modified; its masked taps get an
    exactly zero gradient.

    Masks (``mask[i, j]`` over a ``kH x kW`` kernel with centre ``(kH // 2, kW // 2)``):

    - ``"A"``: the rows above the centre and the taps left of it, centre excluded. An output
      position depends only on input positions strictly before it in raster order (the first
      layer of a PixelCNN, which must not see the value it predicts).
    - ``"B"``: ``"A"`` plus the centre tap: positions at or before it (every later layer).
    - ``"V"``: every row up to and including the centre row: Gated PixelCNN's vertical stack
      (van den Oord et al. 2016). Its output at row ``i`` depends on input rows ``<= i``; shift it
      down one row before it feeds a horizontal stack. The horizontal stack is ``"A"``/``"B"`` on
      a ``1 x k`` kernel.

    Args:
        x: ``[B, C_in, H, W]`` float32, float16, bfloat16 or float64, any strides; ``B`` may be 0. An
            unbatched ``[C_in, H, W]`` gives an unbatched output, as with ``conv2d``.
        weight: ``[C_out, C_in, kH, kW]`` floating point with odd ``kH`` and ``kW``, on ``x``'s device.
        bias: optional ``[C_out]`` floating point.
        mask_type: ``"A"``, ``"B"`` or ``"V"``.
        padding: zero padding ``(pad_h, pad_w)``, an int for both, or ``None``/``"same"`` for
            ``(kH // 2, kW // 2)``, which keeps ``H x W``.

    Returns:
        ``[B, C_out, H + 2 pad_h - kH + 1, W + 2 pad_w - kW + 1]`` in the promoted dtype of ``x``,
        ``weight`` and ``bias``; channels-last when ``x`` is. Accumulation is fp32 for every input
        dtype (fp64 for fp64). CUDA tensors run fastvq's Triton kernels (forward, input gradient and
        weight gradient, all deterministic); CPU tensors and fp64 run two plain convolutions over the
        mask's row groups, one on more than one thread, a batch chunk at a time with less peak memory
        than ``conv2d(x, weight * mask)`` (``FASTVQ_BACKEND`` overrides, see ``fastvq.backends``).

    Raises:
        TypeError: a non-tensor, an integer or bool tensor, or a ``padding`` that is not ``None``,
            ``"same"``, an int or a pair of ints.
        ValueError: ``x`` or ``weight`` not 4-D, ``C_in`` mismatch, an even kernel size, a bias
            that is not ``[C_out]``, an unknown ``mask_type``, negative padding, an empty output,
            or tensors on different devices.
    """
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in, kH, kW], got shape {tuple(weight.shape)}")
    pads = resolve_padding(padding, weight.shape[2], weight.shape[3])
    x, unbatched = unbatched_as_batch(x)
    if not ((bias is None or isinstance(bias, Tensor)) and isinstance(mask_type, str)):
        check_masked_conv_inputs(x, weight, bias, mask_type, pads)  # the dispatcher would reject these types
    out = _masked_conv2d_op(x, weight, bias, mask_type, list(pads))
    return out.squeeze(0) if unbatched else out


def unbatched_as_batch(x: object) -> tuple[torch.Tensor, bool]:
    """``x [C_in, H, W]`` (unbatched, as ``nn.Conv2d`` takes it) as a batch of one, or ``x [B, C_in, H, W]``
    as it is; and whether it was unbatched (so the output loses its batch dimension again)."""
    x = check_tensor("x", x)
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"x must be 3-D [C_in, H, W] (unbatched) or 4-D [B, C_in, H, W], got shape {tuple(x.shape)}")
    return x, False


def resolve_padding(padding: PaddingArg, kernel_height: int, kernel_width: int) -> tuple[int, int]:
    """``None`` or ``"same"`` -> ``(kh // 2, kw // 2)``; an int or a pair of ints ``>= 0`` as given."""
    if padding is None or padding == "same":
        return kernel_height // 2, kernel_width // 2
    if isinstance(padding, bool):
        raise TypeError(f"padding must be None, 'same', an int or a pair of ints, got {padding!r}")
    if isinstance(padding, int):
        pair = (padding, padding)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
        isinstance(p, int) and not isinstance(p, bool) for p in padding
    ):
        pair = (int(padding[0]), int(padding[1]))
    else:
        raise TypeError(f"padding must be None, 'same', an int or a pair of ints, got {padding!r}")
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pair


# --------------------------------------------------------------------------- the operators


def check_masked_conv_inputs(x: object, weight: object, bias: object, mask_type: object, padding: object
) -> tuple[int, int]:
    """Checks the masked convolution's arguments and returns its ``(pad_h, pad_w)``.

    ``padding`` here is what the operator receives: a list of two ints ``>= 0``.
    """
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight)
    check_mask_type(mask_type)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C_in, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in, kH, kW], got shape {tuple(weight.shape)}")
    check_float("x", x)
    check_float("weight", weight)
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    if out_channels < 1 or in_channels < 1:
        raise ValueError(f"weight must have C_out >= 1 and C_in >= 1, got shape {tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects C_in = {in_channels}: x of shape "
            f"{tuple(x.shape)}, weight of shape {tuple(weight.shape)}"
        )
    check_kernel_size(kernel_height, kernel_width)
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_float("bias", bias)
        if tuple(bias.shape) != (out_channels,):
            raise ValueError(
                f"bias must have shape ({out_channels},) to match weight of shape {tuple(weight.shape)}, "
                f"got {tuple(bias.shape)}"
            )
        check_same_device(x=x, weight=weight, bias=bias)
    else:
        check_same_device(x=x, weight=weight)
    pads = resolve_padding(tuple(padding) if isinstance(padding, list) else padding, kernel_height, kernel_width)
    out_height, out_width = output_size(x.shape[2], x.shape[3], kernel_height, kernel_width, pads)
    if out_height < 1 or out_width < 1:
        raise ValueError(
            f"the output would be empty: x of shape {tuple(x.shape)} with kernel size "
            f"({kernel_height}, {kernel_width}) and padding {pads} gives {out_height} x {out_width}"
        )
    return pads


# --------------------------------------------------------------------------- soft assignments


@torch.library.custom_op("fastvq::masked_conv2d", mutates_args=())
def _masked_conv2d_op(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, padding: list[int]
) -> Tensor:
    """``x [B, C_in, H, W]``, ``weight [C_out, C_in, kH, kW]`` -> ``[B, C_out, H_out, W_out]``, stride 1.

    Only the taps ``mask_type`` keeps are computed; ``padding`` is ``[pad_h, pad_w]``. The output
    has the promoted dtype and follows a channels-last ``x``.
    """
    check_masked_conv_inputs(x, weight, bias, mask_type, padding)
    backend = backends.select("masked_conv2d", x, promoted_dtype(x, weight, bias))
    return backend.masked_conv2d(x, weight, bias, mask_type, list(padding))


@_masked_conv2d_op.register_fake
def _masked_conv2d_fake(x, weight, bias, mask_type, padding):
    pads = check_masked_conv_inputs(x, weight, bias, mask_type, padding)
    out_height, out_width = output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], pads)
    return torch.empty(
        (x.shape[0], weight.shape[0], out_height, out_width),
        dtype=promoted_dtype(x, weight, bias),
        device=x.device,
        memory_format=output_memory_format(x),
    )


@torch.library.custom_op("fastvq::masked_conv2d_backward", mutates_args=())
def _masked_conv2d_backward_op(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    mask_type: str,
    padding: list[int],
    compute_input_grad: bool,
    compute_weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_weight)`` of ``masked_conv2d`` in ``x``'s and ``weight``'s dtypes; one not
    asked for is an empty tensor. The masked taps of ``grad_weight`` are exactly zero."""
    backend = backends.select("masked_conv2d_backward", x, promoted_dtype(x, weight, None))
    return backend.masked_conv2d_backward(
        grad_out, x, weight, mask_type, list(padding), compute_input_grad, compute_weight_grad
    )


@_masked_conv2d_backward_op.register_fake
def _masked_conv2d_backward_fake(grad_out, x, weight, mask_type, padding, compute_input_grad, compute_weight_grad):
    grad_x = (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
        if compute_input_grad
        else x.new_empty(0)
    )
    grad_weight = (
        torch.empty_like(weight, memory_format=torch.contiguous_format)
        if compute_weight_grad
        else weight.new_empty(0)
    )
    return grad_x, grad_weight


def _masked_conv2d_setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.mask_type = mask_type
    ctx.padding = list(padding)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _masked_conv2d_autograd(ctx, grad):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x = grad_weight = grad_bias = None
    if needs_x or needs_weight:
        grad_x, grad_weight = _masked_conv2d_backward_op(
            grad, x, weight, ctx.mask_type, ctx.padding, needs_x, needs_weight
        )
    if needs_bias:
        sum_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=sum_dtype).to(ctx.bias_dtype)
    return (grad_x if needs_x else None), (grad_weight if needs_weight else None), grad_bias, None, None


_masked_conv2d_op.register_autograd(_masked_conv2d_autograd, setup_context=_masked_conv2d_setup_context)
