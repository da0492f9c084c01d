"""vector-quantize-pytorch's ``vector_quantize_pytorch.residual_sim_vq``, on fastvq's layers."""

from ..residual_simvq import ResidualSimVQ
from ..residual_vq import round_up_multiple

__all__ = ["ResidualSimVQ", "round_up_multiple"]
