"""fastvq: fused vector quantization for PyTorch.

``fastvq.nearest_code``, ``fastvq.vector_quantize``, ``fastvq.ema_update_`` and
``fastvq.segment_reduce`` are the functional API, ``fastvq.kmeans`` clusters on them; ``fastvq.nn``
holds the layers; the ops are also registered as ``torch.ops.fastvq.*``. Importing fastvq never
touches CUDA or imports Triton.
"""

from . import nn
from ._version import __version__
from .clustering import KMeansResult, kmeans
from .functional import ema_update_, nearest_code, nearest_codes, segment_reduce, vector_quantize
from .nn import GroupedResidualVQ, ResidualVQ, VectorQuantize

__all__ = [
    "nearest_code",
    "nearest_codes",
    "vector_quantize",
    "ema_update_",
    "segment_reduce",
    "nn",
    "VectorQuantize",
    "ResidualVQ",
    "GroupedResidualVQ",
    "__version__",
]

from . import models  # noqa: E402
from .functional import masked_conv2d  # noqa: E402

__all__ += ["masked_conv2d", "models"]

from .functional import soft_entropy, soft_quantize  # noqa: E402

__all__ += ["soft_quantize", "soft_entropy"]
__all__ += ["kmeans", "KMeansResult"]

from .swap import swap_quantizers  # noqa: E402

__all__ += ["swap_quantizers"]
from .functional import nearest_code_batched  # noqa: E402

__all__ += ["nearest_code_batched"]
from .functional import residual_quantize  # noqa: E402

__all__ += ["residual_quantize"]
__all__ += ["sinkhorn_assign"]
from .functional import sinkhorn_assign  # noqa: E402

__all__ += ["soft_quantize_entropy"]
from .functional import soft_quantize_entropy  # noqa: E402
