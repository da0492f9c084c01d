"""vector-quantize-pytorch's ``vector_quantize_pytorch.utils``, on fastvq's layers."""

from ..sequential import QUANTIZE_KLASSES, Sequential

__all__ = ["Sequential", "QUANTIZE_KLASSES"]
