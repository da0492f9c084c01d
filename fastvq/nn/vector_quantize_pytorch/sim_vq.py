"""vector-quantize-pytorch's ``vector_quantize_pytorch.sim_vq``, on fastvq's layers."""

from ..simvq import SimVQ

__all__ = ["SimVQ"]
