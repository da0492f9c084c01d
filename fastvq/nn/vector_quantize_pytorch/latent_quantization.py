"""vector-quantize-pytorch's ``vector_quantize_pytorch.latent_quantization``, on fastvq's layers."""

from ..latent_quantize import LatentQuantize

__all__ = ["LatentQuantize"]
