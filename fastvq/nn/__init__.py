"""fastvq's layers. Modules hold parameters, buffers and configuration; the math is in the ops."""

from .taming import GumbelQuantize, VectorQuantizer2
from .vector_quantize import Codebook, VectorQuantize

__all__ = [
    "Codebook",
    "VectorQuantize",
    "VectorQuantizer2",
    "GumbelQuantize",
]
