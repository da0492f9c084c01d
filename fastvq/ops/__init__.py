"""fastvq's operators, one file per op family, named as the backends name them.

Each ``<family>.py`` holds, in this order: the public function(s) with the full docstring, then the
``torch.library`` custom op(s) (``torch.ops.fastvq.*``), their fake implementations and their
autograd. An operator checks its inputs once, in one function that its real implementation and its
fake share; the public function above it does only what the operator cannot (draw a seed, resolve
``deterministic=None``, cast Python scalars, and name an argument the dispatcher would reject for
its type before the operator sees it). Layers call these functions, never ``torch.ops.fastvq``.

- ``search``: ``nearest_code`` (argmin and Gumbel-max sampling), ``nearest_code_batched``
- ``topk``: ``nearest_codes``
- ``vector_quantize``: ``vector_quantize`` and its backward
- ``segment_reduce``: ``segment_reduce``, ``ema_update_``
- ``masked_conv``: ``masked_conv2d`` and its backward
- ``soft_quantize``: ``soft_quantize``, ``soft_entropy`` and their backwards
  (and ``soft_quantize_entropy``, the two of one logit matrix fused, and its backward)
- ``code_entropy``: ``code_entropy`` and its backward
- ``sinkhorn``: ``sinkhorn_assign`` (its three passes)

The submodules are not re-exported as functions here, because four families share their name with
their function; ``fastvq.functional`` re-exports every public function.
"""

from . import code_entropy, masked_conv, search, segment_reduce, sinkhorn, soft_quantize, topk, vector_quantize  # noqa: F401  (importing a family registers its torch.ops.fastvq.* operators)

# isort: split
from . import residual_quantize  # noqa: F401, E402  (residual_quantize: all the levels of a residual quantizer)
