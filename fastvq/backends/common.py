"""What more than one backend uses: the compute dtype, the memory bound of the chunked loops, the
cosine norm floor, the interpreter switch, the masked convolution's output geometry and the code
entropy's bit split.

Nothing here imports a backend, so every backend and ``fastvq.ops`` may import it.
Topics of their own: ``search_codebook`` (the search's prepared codebook), ``duplicate_codes`` (the
exact-duplicate remap), ``soft_codebook`` (the soft assignments' prepared codebook); the conv masks and
the Philox noise live in ``fastvq._masks`` and ``fastvq._philox`` (the reference uses them too).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

# The chunked loops (the PyTorch path, the op layer's loss sums) keep each temporary slab under this.
CHUNK_BYTES = 32 * 1024 * 1024
NORM_EPS = 1e-12  # F.normalize's eps: a zero vector has cosine 0 to every code


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its numpy interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in fp32 for every input dtype, and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def code_entropy_split(num_bits: int) -> tuple[int, int]:
    """How the code entropy splits ``d`` bits: ``(h, d - h)``, the high half the larger when ``d`` is odd."""
    high = (num_bits + 1) // 2
    return high, num_bits - high

