"""vector-quantize-pytorch's ``vector_quantize_pytorch.evo_lookup_free_quantization``, on fastvq's layers."""

from ..evo_lfq import EvoLFQ
from ..evo_lfq import EvoResult as Result
from ..evo_lfq import EvoReturn as Return

__all__ = ["EvoLFQ", "Return", "Result"]
