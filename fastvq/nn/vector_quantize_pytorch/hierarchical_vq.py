"""vector-quantize-pytorch's ``vector_quantize_pytorch.hierarchical_vq``, on fastvq's layers."""

from ..hierarchical_vq import HierarchicalVQ, to_level_shape

__all__ = ["HierarchicalVQ", "to_level_shape"]
