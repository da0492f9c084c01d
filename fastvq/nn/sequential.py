"""``Sequential``: vector-quantize-pytorch 1.32's ``Sequential`` (``vector_quantize_pytorch.utils``).

A chain of modules holding exactly one quantizer: the modules before it map the input, the
quantizer returns ``(x, *rest)``, the modules after it map ``x``; the result is ``(x, *rest)``.
Keyword arguments of ``forward`` go to the quantizer only. The same quantizer classes count as
theirs does (fastvq's counterparts of them), and the submodules are ``fns.0``, ``fns.1``, ... as
in theirs, so state_dicts load either way.
"""

from __future__ import annotations

from torch import nn

from .errors import raises_config_error
from .fsp import FSP
from .fsq import FSQ, GroupedResidualFSQ, ResidualFSQ
from .hierarchical_vq import HierarchicalVQ
from .latent_quantize import LatentQuantize
from .lfq import LFQ, GroupedResidualLFQ, ResidualLFQ
from .random_projection import RandomProjectionQuantizer
from .residual_simvq import ResidualSimVQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .simvq import SimVQ
from .vector_quantize import VectorQuantize

__all__ = ["Sequential", "QUANTIZE_KLASSES"]

# vector-quantize-pytorch's QUANTIZE_KLASSES, in its order (EvoLFQ and BinaryMapper are not among them).
QUANTIZE_KLASSES = (
    VectorQuantize,
    ResidualVQ,
    GroupedResidualVQ,
    RandomProjectionQuantizer,
    FSQ,
    LFQ,
    SimVQ,
    ResidualSimVQ,
    ResidualLFQ,
    GroupedResidualLFQ,
    ResidualFSQ,
    GroupedResidualFSQ,
    FSP,
    LatentQuantize,
    HierarchicalVQ,
)


class Sequential(nn.Module):
    """``Sequential(*fns)``: ``fns`` are modules, exactly one of them a quantizer (an instance of a
    class in ``QUANTIZE_KLASSES``).

    ``forward(x, **kwargs)`` calls each module in turn on ``x``; the quantizer is called as
    ``quantizer(x, **kwargs)`` and its first output continues the chain. Returns the quantizer's
    output tuple with its first element replaced by the chain's last ``x``.

    Raises ``TypeError`` if an element of ``fns`` is not an ``nn.Module`` and ``ValueError`` unless
    exactly one is a quantizer (vector-quantize-pytorch asserts the latter).
    """

    @raises_config_error
    def __init__(self, *fns: nn.Module):
        super().__init__()
        for position, fn in enumerate(fns):
            if not isinstance(fn, nn.Module):
                raise TypeError(f"Sequential: fns[{position}] must be an nn.Module, got {type(fn).__name__}")
        quantizers = sum(isinstance(fn, QUANTIZE_KLASSES) for fn in fns)
        if quantizers != 1:
            raise ValueError(f"Sequential must contain exactly one quantizer (one of fastvq.nn's "
                             f"{', '.join(k.__name__ for k in QUANTIZE_KLASSES)}), got {quantizers}")
        self.fns = nn.ModuleList(fns)

    def forward(self, x, **kwargs):
        for fn in self.fns:
            if not isinstance(fn, QUANTIZE_KLASSES):
                x = fn(x)
                continue
            x, *rest = fn(x, **kwargs)
        return (x, *rest)
