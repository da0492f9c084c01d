"""vector-quantize-pytorch's ``vector_quantize_pytorch.vector_quantize_pytorch``, on fastvq's layers."""

from ..codebook import Codebook
from ..vector_quantize import LossBreakdown, VectorQuantize, lens_to_mask

__all__ = ["VectorQuantize", "Codebook", "LossBreakdown", "lens_to_mask"]
