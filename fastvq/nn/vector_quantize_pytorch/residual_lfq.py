"""vector-quantize-pytorch's ``vector_quantize_pytorch.residual_lfq``, on fastvq's layers."""

from ..lfq import GroupedResidualLFQ, ResidualLFQ
from ..residual_vq import round_up_multiple

__all__ = ["ResidualLFQ", "GroupedResidualLFQ", "round_up_multiple"]
