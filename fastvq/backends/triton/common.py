"""What every Triton launcher needs: the interpreter switch and the dot precision."""

from __future__ import annotations

import torch

from ..common import triton_interpreting as interpreting


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 inputs.

    The contract forbids plain tf32 unless the caller opts in, which in PyTorch is
    ``torch.backends.cuda.matmul.allow_tf32 = True``; otherwise ``tf32x3`` keeps fp32 accuracy on
    tensor cores. fp16/bf16 inputs always multiply natively with fp32 accumulation. The
    interpreter computes in numpy and only knows ``ieee``.
    """
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "tf32x3"
