"""fastvq's layers. Modules hold parameters, buffers and configuration; the math is in the ops."""

from .sonnet import VectorQuantizerEMA
from .taming import GumbelQuantize, VectorQuantizer2
from .vector_quantize import Codebook, VectorQuantize

__all__ = [
    "Codebook",
    "VectorQuantize",
    "VectorQuantizer2",
    "GumbelQuantize",
    "VectorQuantizerEMA",
]
