"""vector-quantize-pytorch 1.32.0's package, module for module, on fastvq's layers.

Each submodule has the name of one of that package's modules and re-exports fastvq's equivalent classes and
the public helpers users and its tests import from it (``from ...finite_scalar_perturbation import
build_cdf_act``); this ``__init__`` exports what the original's does. The classes are fastvq's own
(``fastvq.nn.vector_quantize_pytorch.VectorQuantize is fastvq.nn.VectorQuantize``).

:func:`install_as_vector_quantize_pytorch` (also ``fastvq.nn.install_as_vector_quantize_pytorch``) registers
this package in ``sys.modules`` as ``vector_quantize_pytorch``, so an unchanged code base that imports
vector-quantize-pytorch anywhere runs on fastvq (the pattern of ``pymysql.install_as_MySQLdb()``).
"""

from __future__ import annotations

import sys

from . import (
    binary_mapper,
    evo_lookup_free_quantization,
    finite_scalar_perturbation,
    finite_scalar_quantization,
    hierarchical_vq,
    latent_quantization,
    lookup_free_quantization,
    random_projection_quantizer,
    residual_fsq,
    residual_lfq,
    residual_sim_vq,
    residual_vq,
    sim_vq,
    utils,
    vector_quantize_pytorch,
)
from .binary_mapper import BinaryMapper
from .evo_lookup_free_quantization import EvoLFQ
from .finite_scalar_perturbation import FSP
from .finite_scalar_quantization import FSQ
from .hierarchical_vq import HierarchicalVQ
from .latent_quantization import LatentQuantize
from .lookup_free_quantization import LFQ
from .random_projection_quantizer import RandomProjectionQuantizer
from .residual_fsq import GroupedResidualFSQ, ResidualFSQ
from .residual_lfq import GroupedResidualLFQ, ResidualLFQ
from .residual_sim_vq import ResidualSimVQ
from .residual_vq import GroupedResidualVQ, ResidualVQ
from .sim_vq import SimVQ
from .utils import Sequential
from .vector_quantize_pytorch import VectorQuantize

__all__ = [
    "VectorQuantize", "ResidualVQ", "GroupedResidualVQ", "RandomProjectionQuantizer", "FSQ", "FSP", "LFQ", "EvoLFQ",
    "ResidualLFQ", "GroupedResidualLFQ", "ResidualFSQ", "GroupedResidualFSQ", "LatentQuantize", "SimVQ",
    "ResidualSimVQ", "BinaryMapper", "HierarchicalVQ", "Sequential", "install_as_vector_quantize_pytorch",
]

ALIAS = "vector_quantize_pytorch"

# The original's modules, by their names there (utils included: it holds Sequential and QUANTIZE_KLASSES).
SUBMODULES = {
    module.__name__.rsplit(".", 1)[1]: module
    for module in (
        binary_mapper, evo_lookup_free_quantization, finite_scalar_perturbation, finite_scalar_quantization,
        hierarchical_vq, latent_quantization, lookup_free_quantization, random_projection_quantizer, residual_fsq,
        residual_lfq, residual_sim_vq, residual_vq, sim_vq, utils, vector_quantize_pytorch,
    )
}


def install_as_vector_quantize_pytorch() -> None:
    """Make ``import vector_quantize_pytorch`` (and ``import vector_quantize_pytorch.<module>``) import fastvq.

    Registers this package as ``sys.modules["vector_quantize_pytorch"]`` and each submodule as
    ``sys.modules["vector_quantize_pytorch.<module>"]``. Call it once, before anything imports
    vector-quantize-pytorch; calling it again is a no-op.

    Raises:
        RuntimeError: the real vector-quantize-pytorch (or any of its modules) is already imported. Replacing it
            then would leave a mixed program: modules that already ran ``from vector_quantize_pytorch import
            VectorQuantize`` keep the original classes while later imports get fastvq's, and checks between the
            two (``isinstance`` against the original's ``QUANTIZE_KLASSES``, state_dicts built by one and loaded
            by the other) would fail or differ silently. An error at the call says what to change (call this
            first); a warning would be easy to miss. Nothing is registered when it raises.
    """
    current = sys.modules.get(ALIAS)
    this_package = sys.modules[__name__]
    if current is this_package:
        return
    imported = sorted(name for name in sys.modules if name == ALIAS or name.startswith(ALIAS + "."))
    if imported:
        raise RuntimeError(
            f"install_as_vector_quantize_pytorch() must run before vector-quantize-pytorch is imported; already "
            f"imported: {', '.join(imported)}. Call it first (e.g. at the top of your entry point).")
    sys.modules[ALIAS] = this_package
    for name, module in SUBMODULES.items():
        sys.modules[f"{ALIAS}.{name}"] = module
