"""vector-quantize-pytorch's ``vector_quantize_pytorch.random_projection_quantizer``, on fastvq's layers."""

from ..random_projection import RandomProjectionQuantizer

__all__ = ["RandomProjectionQuantizer"]
