"""vector-quantize-pytorch's ``vector_quantize_pytorch.finite_scalar_perturbation``, on fastvq's layers.

The CDF activations keep the original's names (``tanh_act``, ``tanh_inv_act``, ...): they are the pairs of
fastvq's ``CDF_ACTIVATIONS`` table, which ``build_cdf_act`` looks up.
"""

from ..fsp import CDF_ACTIVATIONS, FSP, VectorNorm, batch_stats, build_cdf_act

tanh_act, tanh_inv_act = CDF_ACTIVATIONS["tanh"]
sigmoid_act, sigmoid_inv_act = CDF_ACTIVATIONS["sigmoid"]
normal_act, normal_inv_act = CDF_ACTIVATIONS["normal"]
laplace_act, laplace_inv_act = CDF_ACTIVATIONS["laplace"]
cauchy_act, cauchy_inv_act = CDF_ACTIVATIONS["cauchy"]

__all__ = [
    "FSP", "VectorNorm", "batch_stats", "build_cdf_act",
    "tanh_act", "tanh_inv_act", "sigmoid_act", "sigmoid_inv_act", "normal_act", "normal_inv_act",
    "laplace_act", "laplace_inv_act", "cauchy_act", "cauchy_inv_act",
]
