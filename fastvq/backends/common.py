"""What more than one backend uses: the compute dtype, the search's prepared codebook, the memory
bound of the chunked loops, and the PixelCNN convolution masks as tap counts.

Nothing here imports a backend, so every backend, ``fastvq._checks`` and ``fastvq._ops`` may import it.

Masks
-----

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

import os
from typing import Optional, Sequence

import torch

# The chunked loops (the PyTorch path, the op layer's loss sums) keep each temporary slab under this.
CHUNK_BYTES = 32 * 1024 * 1024
NORM_EPS = 1e-12  # F.normalize's eps: a zero vector has cosine 0 to every code
MASK_TYPES = ("A", "B", "V")


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in fp32 for every input dtype, and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class SearchCodebook:
    """The codebook prepared once per call for scoring (the PyTorch path and the Triton launcher).

    ``l2`` scores are ``|e - c|^2 - 2 (z - c).(e - c)`` with ``c`` the codebook mean: the shift
    leaves every distance unchanged but removes the cancellation that ``z^2 + e^2 - 2 z.e``
    suffers for data far from the origin. ``cosine`` scores are ``-z.e/|e|`` (the positive
    ``1/|z|`` does not change a row's argmin); ``dot`` scores are ``-z.e``.
    """

    def __init__(self, codebook: torch.Tensor, metric: str, dtype: torch.dtype):
        self.metric = metric
        work = codebook.to(compute_dtype(dtype))
        self.center: Optional[torch.Tensor] = None
        self.code_bias: Optional[torch.Tensor] = None
        if metric == "l2":
            # The centre is the mean of the finite codes only: a single NaN or Inf code must not
            # poison the shift of every other code, which would turn every score into NaN.
            finite = work.isfinite().all(dim=1, keepdim=True)
            self.center = torch.where(finite, work, 0).sum(dim=0) / finite.sum().clamp_min(1)
            work = work - self.center
            self.code_bias = (work * work).sum(dim=1)
        elif metric == "cosine":
            work = work / work.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        self.codes = work

    def scores(self, z_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        codes = self.codes[start:stop]
        if self.metric == "l2":
            scores = torch.addmm(self.code_bias[start:stop], z_rows, codes.T, alpha=-2.0)
        else:
            scores = z_rows @ codes.T
            scores.neg_()
        # nan -> +inf so a NaN distance never wins; +/-inf stay what they are.
        return scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


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


def output_size(
    height: int, width: int, kernel_height: int, kernel_width: int, padding: Sequence[int]
) -> tuple[int, int]:
    return height + 2 * padding[0] - kernel_height + 1, width + 2 * padding[1] - kernel_width + 1


def promoted_dtype(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """Outputs follow a channels-last input (as ``conv2d`` does); anything else gets NCHW."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
