"""vector-quantize-pytorch's ``vector_quantize_pytorch.lookup_free_quantization``, on fastvq's layers."""

from ..lfq import LFQ, CosineSimLinear, LossBreakdown, Return

__all__ = ["LFQ", "CosineSimLinear", "Return", "LossBreakdown"]
