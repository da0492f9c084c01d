"""The PixelCNN convolution masks as tap counts, and the masked convolution's argument checks.

Shared by the op layer's checks, the layers in ``fastvq.nn`` and both backends' masked convolutions, so
it lives above ``fastvq.backends``: the layers and checks need not reach into a backend package for it.
(``fastvq.reference`` builds its masks its own way, as the PixelCNN code bases do.)

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

from typing import Optional

import torch

MASK_TYPES = ("A", "B", "V")


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

