"""vector-quantize-pytorch's ``vector_quantize_pytorch.residual_fsq``, on fastvq's layers."""

from ..fsq import GroupedResidualFSQ, ResidualFSQ
from ..residual_vq import round_up_multiple

__all__ = ["ResidualFSQ", "GroupedResidualFSQ", "round_up_multiple"]
