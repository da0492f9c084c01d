"""fastvq's public functional API: the operators of :mod:`fastvq.ops` and the helpers of :mod:`fastvq.losses`.

Nothing is defined here; every name is re-exported from where it is written (one file per op family in
``fastvq/ops/``, the pure-PyTorch helpers in ``fastvq/losses.py``), so ``fastvq.functional.<name>`` keeps
working. Every function checks its arguments before any kernel runs and raises ``TypeError`` (wrong type
or dtype, or a sparse tensor) or ``ValueError`` (wrong shape or value: NaN and infinite floats included)
naming the argument and its shape. None of them builds an ``N x K`` matrix: the search keeps a running
minimum per row across tiles of codes.
"""

from __future__ import annotations

from .losses import (
    FSQ_BOUND_EPS,
    LOGIT_METRICS,
    check_fsq_levels,
    clamped_entropy,
    code_cross_entropy,
    code_logits,
    codebook_diversity_loss,
    directional_reparam,
    diversity_of_probabilities,
    finite_scalar_quantize,
    fsq_bound,
    orthogonal_loss,
    rotate_to,
)
from .ops.code_entropy import ENTROPY_EPS, code_entropy
from .ops.masked_conv import masked_conv2d
from .ops.search import draw_seed, nearest_code
from .ops.segment_reduce import ema_update_, segment_reduce
from .ops.soft_quantize import soft_entropy, soft_quantize
from .ops.topk import nearest_codes
from .ops.vector_quantize import vector_quantize

__all__ = [
    "nearest_code",
    "vector_quantize",
    "ema_update_",
    "segment_reduce",
    "masked_conv2d",
    "finite_scalar_quantize",
    "soft_quantize",
    "soft_entropy",
    "clamped_entropy",
    "code_entropy",
    "code_logits",
    "code_cross_entropy",
    "codebook_diversity_loss",
    "diversity_of_probabilities",
    "orthogonal_loss",
    "rotate_to",
    "directional_reparam",
    "nearest_codes",
]

# Constants and helpers the layers share, importable from here as before.
__all__ += ["ENTROPY_EPS", "FSQ_BOUND_EPS", "LOGIT_METRICS", "check_fsq_levels", "draw_seed", "fsq_bound"]

# Names this module imported before the operators moved to fastvq/ops/, still importable from here for code
# that took them from it; not part of the functional API (not in __all__).
from ._checks import check_real, check_tensor  # noqa: E402, F401
from ._distributed import all_reduce_sum_, is_distributed  # noqa: E402, F401
from .ops.code_entropy import check_code_entropy_inputs  # noqa: E402, F401
from .ops.masked_conv import PaddingArg, check_masked_conv_inputs, resolve_padding, unbatched_as_batch  # noqa: E402, F401
from .ops.search import check_search_inputs  # noqa: E402, F401
from .ops.segment_reduce import check_ema_inputs, check_segment_inputs  # noqa: E402, F401
from .ops.soft_quantize import check_soft_inputs  # noqa: E402, F401
from .ops.topk import check_topk_inputs  # noqa: E402, F401

# B independent searches in one call (batched k-means, per-head codebooks).
__all__ += ["nearest_code_batched"]
from .ops.search import nearest_code_batched  # noqa: E402

# isort: split
from .ops.residual_quantize import ResidualQuantizeResult, residual_quantize  # noqa: E402

__all__ += ["residual_quantize", "ResidualQuantizeResult"]
__all__ += ["sinkhorn_assign", "sinkhorn_cost_stats"]
from .ops.sinkhorn import sinkhorn_assign, sinkhorn_cost_stats  # noqa: E402

__all__ += ["soft_quantize_entropy"]
from .ops.soft_quantize import soft_quantize_entropy  # noqa: E402
