"""PixelCNN convolution masks as tap counts, and the argument checks of the masked convolution.

Every mask fastvq supports keeps a prefix of the kernel's taps in raster order (row by row, left to
right) and zeroes the rest, so a mask is fully described by how many taps it keeps:

- ``"A"`` (PixelCNN's first layer): the rows above the centre and the taps left of the centre;
  the centre itself is excluded, so an output never sees its own input position.
- ``"B"`` (every later layer): the same plus the centre tap.
- ``"V"`` (Gated PixelCNN's vertical stack, van den Oord et al. 2016): every row above the centre
  and the whole centre row. Its output at row ``i`` sees rows ``<= i``; the stack reaches the
  horizontal stack only through a one-row down shift, so there it contributes rows ``< i``.

The horizontal stack of Gated PixelCNN is ``"A"`` or ``"B"`` on a ``1 x k`` kernel. The kernels
loop over ``num_taps`` taps and never touch the rest, which is why the masks are prefixes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_float, check_same_device, check_tensor

MASK_TYPES = ("A", "B", "V")
PaddingArg = Union[None, int, str, Sequence[int]]


def check_mask_type(mask_type: object) -> str:
    if mask_type not in MASK_TYPES:
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
    return mask_type  # type: ignore[return-value]


def check_kernel_size(kernel_height: int, kernel_width: int, name: str = "weight") -> None:
    if kernel_height % 2 == 0 or kernel_width % 2 == 0:
        raise ValueError(
            f"{name} must have an odd kernel height and width (a PixelCNN mask is defined around the "
            f"centre tap), got kernel size ({kernel_height}, {kernel_width})"
        )


def num_taps(mask_type: str, kernel_height: int, kernel_width: int) -> int:
    """How many taps, counted in raster order from the top-left, the mask keeps."""
    centre_row, centre_col = kernel_height // 2, kernel_width // 2
    if mask_type == "V":
        return (centre_row + 1) * kernel_width
    return centre_row * kernel_width + centre_col + (1 if mask_type == "B" else 0)


def conv_mask(
    mask_type: str, kernel_height: int, kernel_width: int, *, device: Optional[torch.device] = None
) -> torch.Tensor:
    """The mask as a bool ``[kernel_height, kernel_width]`` tensor, ``True`` where a tap is kept."""
    check_mask_type(mask_type)
    check_kernel_size(kernel_height, kernel_width, "kernel_size")
    kept = torch.arange(kernel_height * kernel_width, device=device) < num_taps(mask_type, kernel_height, kernel_width)
    return kept.reshape(kernel_height, kernel_width)


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


def output_size(
    height: int, width: int, kernel_height: int, kernel_width: int, padding: Sequence[int]
) -> tuple[int, int]:
    return height + 2 * padding[0] - kernel_height + 1, width + 2 * padding[1] - kernel_width + 1


def check_masked_conv_inputs(
    x: object, weight: object, bias: object, mask_type: object, padding: object
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


def promoted_dtype(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow a channels-last input (as ``conv2d`` does); anything else gets NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
