"""fastvq's layers. Modules hold parameters, buffers and configuration; the math is in the ops."""

from .residual_vq import GroupedResidualVQ, ResidualVQ
from .simvq import SimVQ
from .sonnet import VectorQuantizerEMA
from .taming import GumbelQuantize, VectorQuantizer2
from .vector_quantize import Codebook, VectorQuantize
from .vit_vqgan import FactorizedL2Quantizer

__all__ = [
    "Codebook",
    "VectorQuantize",
    "ResidualVQ",
    "GroupedResidualVQ",
    "VectorQuantizer2",
    "GumbelQuantize",
    "VectorQuantizerEMA",
    "SimVQ",
    "FactorizedL2Quantizer",
]

from .masked_conv import GatedMaskedConv2d, MaskedConv2d  # noqa: E402

__all__ += ["MaskedConv2d", "GatedMaskedConv2d"]

from .fsq import FSQ, GroupedResidualFSQ, ResidualFSQ  # noqa: E402

__all__ += ["FSQ", "ResidualFSQ", "GroupedResidualFSQ"]

from .ibq import IBQ  # noqa: E402

__all__ += ["IBQ"]

from .lfq import LFQ, GroupedResidualLFQ, ResidualLFQ  # noqa: E402

__all__ += ["LFQ", "ResidualLFQ", "GroupedResidualLFQ"]

from .evo_lfq import EvoLFQ  # noqa: E402

__all__ += ["EvoLFQ"]

from .binary_mapper import BinaryMapper  # noqa: E402
from .fsp import FSP  # noqa: E402
from .latent_quantize import LatentQuantize  # noqa: E402

__all__ += ["LatentQuantize", "FSP", "BinaryMapper"]

from .residual_simvq import ResidualSimVQ  # noqa: E402

__all__ += ["ResidualSimVQ"]

from .random_projection import RandomProjectionQuantizer  # noqa: E402

__all__ += ["RandomProjectionQuantizer"]

from .hierarchical_vq import HierarchicalVQ  # noqa: E402

__all__ += ["HierarchicalVQ"]

from .sequential import Sequential  # noqa: E402

__all__ += ["Sequential"]

# Drop-ins for other libraries, reached as submodules (fastvq.nn.diffusers.VectorQuantizer, fastvq.nn.dac.
# VectorQuantize, fastvq.nn.seed_voken.LFQ, ...): their class names repeat fastvq's own or each other's.
from . import audiocraft, dac, diffusers, encodec, llamagen, moshi, seed_voken, snac  # noqa: E402, F401
from .errors import ConfigError, ConfigRuntimeError  # noqa: E402

__all__ += ["ConfigError", "ConfigRuntimeError"]

from .vector_quantize_pytorch import install_as_vector_quantize_pytorch  # noqa: E402

__all__ += ["install_as_vector_quantize_pytorch"]
