"""vector-quantize-pytorch's ``vector_quantize_pytorch.binary_mapper``, on fastvq's layers."""

from ..binary_mapper import BinaryMapper, binary_entropy

__all__ = ["BinaryMapper", "binary_entropy"]
