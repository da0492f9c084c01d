"""``FSP``: vector-quantize-pytorch's finite scalar perturbation (arXiv 2602.17133).

Each value is mapped to ``[0, 1]`` by a CDF activation and quantized to the midpoint of one of
``L_i`` equal bins; in training a fraction of the values is instead perturbed uniformly within
half a bin. A ``VectorNorm`` loss pulls the batch's mean, variance, skewness and kurtosis towards
targets. Elementwise work on ``N x d`` values (plain PyTorch; nothing of ``N x K``). Names,
arguments, defaults and return structure are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from .._checks import check_real
from .errors import ConfigError, raises_config_error
from .fsq import check_float_input

__all__ = ["FSP", "VectorNorm", "CDF_ACTIVATIONS", "build_cdf_act", "batch_stats"]

# 1 / sqrt(12): the standard deviation of U(0, 1), so (q - 0.5) / it has unit variance.
_UNIFORM_STD = 0.28867513459481287


def _laplace_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.sign(z) * (1.0 - torch.exp(-torch.abs(z))))


def _laplace_quantile(p: Tensor) -> Tensor:
    return -torch.sign(p - 0.5) * torch.log(1.0 - 2.0 * torch.abs(p - 0.5))


# name -> (CDF activation R -> [0, 1], its inverse (0, 1) -> R), as vector-quantize-pytorch's registry.
CDF_ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (lambda z: (torch.tanh(z) + 1.0) / 2.0, lambda p: torch.arctanh(p * 2.0 - 1.0)),
    "sigmoid": (torch.sigmoid, torch.logit),
    "normal": (lambda z: (1.0 + torch.erf(z / math.sqrt(2.0))) / 2.0,
               lambda p: torch.erfinv(2.0 * p - 1.0) * math.sqrt(2.0)),
    "laplace": (_laplace_cdf, _laplace_quantile),
    "cauchy": (lambda z: torch.arctan(z) / torch.pi + 0.5, lambda p: torch.tan((p - 0.5) * torch.pi)),
}


def build_cdf_act(act_name: str) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The CDF activation named ``act_name`` and its inverse, as vector-quantize-pytorch's ``build_cdf_act``.

    Returns ``(act, inv_act)``: ``act`` maps any real tensor elementwise into ``(0, 1)`` (``[0, 1]`` where
    float rounding saturates), ``inv_act`` maps ``(0, 1)`` back; same shape and dtype as the input.

    Raises:
        ConfigError: ``act_name`` is not one of ``CDF_ACTIVATIONS`` (an ``AssertionError`` there).
    """
    if act_name not in CDF_ACTIVATIONS:
        raise ConfigError(f"act_name: CDF activation {act_name!r} not available: {list(CDF_ACTIVATIONS)}")
    return CDF_ACTIVATIONS[act_name]


# VectorNorm's presets: (l1..l4 targets, l1..l4 weights) for mean, variance, skewness, kurtosis.
_NORM_PRESETS = {
    "none": ((0.0, 1.0, 0.0, 0.0), (0.0, 0.0, 0.0, 0.0)),
    "var": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "kurt": ((0.0, 1.0, 0.0, 0.0), (0.1, 0.07, 0.06, 0.05)),
    "var_tanh": ((0.0, 0.8225, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_sigmoid": ((0.0, 3.29, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
    "var_laplace": ((0.0, 2.0, 0.0, 0.0), (0.1, 0.07, 0.0, 0.0)),
}


def batch_stats(batch: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-column mean, unbiased variance, skewness and excess kurtosis of ``batch [N, d]``."""
    variance, mean = torch.var_mean(batch, dim=0, unbiased=True)
    z_scores = (batch - mean) / variance.sqrt().clamp_min(eps)
    return mean, variance, z_scores.pow(3).mean(dim=0), z_scores.pow(4).mean(dim=0) - 3.0


class VectorNorm(nn.Module):
    """``sum_k w_k mean((moment_k - target_k)^2)`` over the batch's first four standardised moments."""

    def __init__(self, l1_target: float = 0.0, l1_weight: float = 0.1, l2_target: float = 1.0, l2_weight: float = 0.07,
                 l3_target: float = 0.0, l3_weight: float = 0.06, l4_target: float = 0.0, l4_weight: float = 0.05,
                 eps: float = 1e-8):
        super().__init__()
        self.l1_target, self.l1_weight = l1_target, l1_weight
        self.l2_target, self.l2_weight = l2_target, l2_weight
        self.l3_target, self.l3_weight = l3_target, l3_weight
        self.l4_target, self.l4_weight = l4_target, l4_weight
        self.eps = eps

    def forward(self, z: Tensor) -> tuple[Tensor, dict]:
        moments = batch_stats(z, self.eps)
        targets = (self.l1_target, self.l2_target, self.l3_target, self.l4_target)
        weights = (self.l1_weight, self.l2_weight, self.l3_weight, self.l4_weight)
        loss = sum(((moment - target) ** 2).mean() * weight
                   for moment, target, weight in zip(moments, targets, weights))
        return loss, dict(zip(("mean", "variance", "skewness", "kurtosis"), moments))

    @classmethod
    def build(cls, name: str) -> "VectorNorm":
        if name not in _NORM_PRESETS:
            raise ValueError(f"unknown vector_norm preset {name!r}, available: {list(_NORM_PRESETS)}")
        targets, weights = _NORM_PRESETS[name]
        return cls(*[value for pair in zip(targets, weights) for value in pair])


class FSP(nn.Module):
    """Finite scalar perturbation, a drop-in for vector-quantize-pytorch's ``FSP``.

    Args (their names and defaults): ``levels`` (bins per code dimension, each ``>= 1``), ``dim``
    (default ``len(levels)``; else projections in and out), ``channel_first``,
    ``projection_has_bias``, ``act_name`` (``"tanh"``, ``"sigmoid"``, ``"normal"``, ``"laplace"``
    or ``"cauchy"``), ``quantize_rate`` (in ``[0, 1]``: the fraction of values quantized in
    training, the rest perturbed; 0 by default, as theirs, so training perturbs everything),
    ``need_inv_act`` (map bin midpoints back through the inverse CDF, else to ``(q - 0.5) /
    sqrt(1/12)``) and ``vector_norm`` (the moment loss preset).

    ``forward(z, eps=None)`` takes ``[..., dim]`` (``[B, dim, ...]`` channel first) and returns
    ``(q_z, indices int32 [...], norm_loss, info)`` with ``info`` holding ``level_indices``,
    ``norm_info`` and, when values were perturbed, ``p_accept_prob``. The random draws are made in
    vector-quantize-pytorch's order.

    Raises:
        ValueError: bad levels, ``quantize_rate`` outside ``[0, 1]``, an unknown activation or
            preset, or an input whose features are not ``dim``.
    """

    @raises_config_error
    def __init__(
        self,
        levels: Sequence[int],
        dim: Optional[int] = None,
        channel_first: bool = False,
        projection_has_bias: bool = True,
        act_name: str = "tanh",
        quantize_rate: float = 0.0,
        need_inv_act: bool = False,
        vector_norm: str = "var_tanh",
    ):
        super().__init__()
        check_real("quantize_rate", quantize_rate, minimum=0.0, maximum=1.0)
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 1:
            raise ValueError(f"levels must be a non-empty list of ints >= 1, got {levels}")
        self.codebook_dim = len(levels)
        self.dim = self.codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.codebook_size = math.prod(levels)
        self.has_projections = self.dim != self.codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.act_name = act_name
        self.act_func, self.inv_act_func = build_cdf_act(act_name)
        self.need_inv_act = need_inv_act
        self.quantize_rate = quantize_rate
        self.vector_norm = VectorNorm.build(vector_norm)

    def __repr__(self) -> str:
        return (f"FSP(\n  levels={self._levels.tolist()},\n  codebook_size={self.codebook_size},\n"
                f"  codebook_dim={self.codebook_dim},\n  dim={self.dim},\n  act_name='{self.act_name}',\n"
                f"  need_inv_act={self.need_inv_act},\n  quantize_rate={self.quantize_rate}\n)")

    def quantize_act_value(self, act_z: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """``[0, 1]`` values -> their bins' midpoints (straight-through) and the bin indices."""
        level_indices = (act_z.clamp_max(1.0 - eps) * self._levels).floor()
        q_act_z = (level_indices + 0.5) / self._levels
        return act_z + (q_act_z - act_z).detach(), level_indices.detach()

    def level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return (level_indices.long() * self._basis).sum(dim=-1).to(torch.int32)

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        return (indices.long()[..., None] // self._basis) % self._levels

    def indices_to_act_value(self, indices: Tensor) -> Tensor:
        return (self.indices_to_level_indices(indices).float() + 0.5) / self._levels

    def indices_to_codes(self, indices: Tensor, eps: float = 1e-6) -> Tensor:
        q_act_z = self.indices_to_act_value(indices)
        if self.need_inv_act:
            q_z = self.inv_act_func(q_act_z.clamp(eps, 1.0 - eps))
        else:
            q_z = (q_act_z - 0.5) / _UNIFORM_STD
        codes = self.project_out(q_z)
        return codes.movedim(-1, 1) if self.channel_first else codes

    def forward(self, z: Tensor, eps: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, dict]:
        z = check_float_input(z, "z")
        if eps is not None:
            check_real("eps", eps, minimum=0.0)
        eps = eps or torch.finfo(z.dtype).eps
        if self.channel_first:
            z = z.movedim(1, -1)
        z_shape = z.shape
        if z.dim() < 1 or z_shape[-1] != self.dim:
            raise ValueError(f"z must have {self.dim} features ({'axis 1' if self.channel_first else 'last axis'}), "
                             f"got shape {tuple(z_shape)}")
        z = self.project_in(z.reshape(-1, self.dim))
        norm_loss, norm_info = self.vector_norm(z)
        act_z = self.act_func(z)
        q_act_z, level_indices = self.quantize_act_value(act_z, eps=eps)
        other_info = {}
        quantize_rate = self.quantize_rate if self.training else 1.0
        if quantize_rate < 1.0:
            p_max_norm = 1.0 / (self._levels * 2)
            proposal = act_z + p_max_norm * (torch.rand_like(act_z) * 2.0 - 1.0)
            accept_mask = (proposal > 0.0) & (proposal < 1.0)
            other_info["p_accept_prob"] = accept_mask.float().mean()
            p_act_z = torch.where(accept_mask, proposal, act_z)
            q_act_z = torch.where(torch.rand_like(q_act_z) > quantize_rate, p_act_z, q_act_z)
        if self.need_inv_act:
            q_z = self.inv_act_func(q_act_z.clamp(eps, 1.0 - eps))
            q_z = z + (q_z - z).detach()
        else:
            q_z = (q_act_z - 0.5) / _UNIFORM_STD
        indices = self.level_indices_to_indices(level_indices)
        q_z = self.project_out(q_z).reshape(z_shape)
        if self.channel_first:
            q_z = q_z.movedim(-1, 1)
        info = {"level_indices": level_indices.reshape(z_shape[:-1] + level_indices.shape[-1:]),
                "norm_info": norm_info, **other_info}
        return q_z, indices.reshape(z_shape[:-1]), norm_loss, info
