"""What every Triton launcher needs: the interpreter switch and the dot precision."""

from __future__ import annotations

import torch

from ..common import triton_interpreting as interpreting


def matmul_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 matmuls run in plain tf32, read through either of its APIs.

    PyTorch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (and the global
    ``torch.backends.fp32_precision`` it inherits from); once either is set, reading the legacy
    ``allow_tf32`` raises RuntimeError. The new getter resolves the inheritance and reflects the
    legacy setter, so it is read wherever it exists; older PyTorch has only ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return bool(matmul.allow_tf32)


def conv_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 convolutions run in plain tf32 (on by default, as ``conv2d`` runs).

    ``torch.backends.cudnn.conv.fp32_precision`` where it exists (PyTorch >= 2.9), else the legacy
    ``torch.backends.cudnn.allow_tf32``.
    """
    cudnn = torch.backends.cudnn
    precision = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype, op: str = "matmul") -> str:
    """``tl.dot`` precision for fp32 inputs.

    The contract forbids plain tf32 unless the caller opts in, the way PyTorch's own operator
    does: for a matmul-like op (``op="matmul"``: the search) PyTorch's matmul flag, off by default
    (:func:`matmul_allows_tf32`); for a convolution (``op="conv"``) cuDNN's convolution flag, on by
    default (:func:`conv_allows_tf32`). Otherwise ``tf32x3`` keeps fp32 accuracy on tensor cores.
    fp16/bf16 inputs always multiply natively with fp32 accumulation. The interpreter computes in
    numpy and only knows ``ieee``.
    """
    if op not in ("matmul", "conv"):
        raise ValueError(f"op must be 'matmul' or 'conv', got {op!r}")
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and (matmul_allows_tf32() if op == "matmul" else conv_allows_tf32()):
        return "tf32"
    return "tf32x3"

