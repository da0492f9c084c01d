"""vector-quantize-pytorch's ``vector_quantize_pytorch.residual_vq``, on fastvq's layers."""

from ..residual_vq import MLP, GroupedResidualVQ, ResidualVQ, frac_gradient, round_up_multiple

__all__ = ["ResidualVQ", "GroupedResidualVQ", "MLP", "frac_gradient", "round_up_multiple"]
