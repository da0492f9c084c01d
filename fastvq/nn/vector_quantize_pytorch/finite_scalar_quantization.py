"""vector-quantize-pytorch's ``vector_quantize_pytorch.finite_scalar_quantization``, on fastvq's layers."""

from ..fsq import FSQ

__all__ = ["FSQ"]
