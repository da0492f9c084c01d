"""``LatentQuantize``: vector-quantize-pytorch's latent quantization (Hsu et al. 2023,
"Disentanglement via Latent Quantization").

Each code dimension ``i`` has its own small set of ``L_i`` values (``values_per_latent``, learnable
parameters); a value is quantized to the nearest of its dimension's values. That is a search over
``L_i`` scalars per dimension, ``N x sum(L_i)`` work done as ``d`` small argmins (no ``N x K`` over
the ``prod(L_i)`` implicit codes). Names, arguments, defaults, return structure and state_dict keys
are vector-quantize-pytorch 1.32's; ``tests/nn/test_scalar_quantizers.py`` compares with it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from .errors import ConfigRuntimeError, raises_config_error
from .fsq import channels_to_sequence, check_float_input, check_positive_int, sequence_to_channels

__all__ = ["LatentQuantize"]


class LatentQuantize(nn.Module):
    """Latent quantization, a drop-in for vector-quantize-pytorch's ``LatentQuantize``.

    Args (their names and defaults):
        levels: values per code dimension (an int: the same for ``codebook_dim`` dimensions).
        dim: input feature dimension; ``project_in``/``project_out`` when it is not
            ``codebook_dim * num_codebooks``.
        commitment_loss_weight, quantization_loss_weight: weights of ``mean((sg[x] - q)^2)`` and
            ``mean((x - sg[q])^2)``, taken between the input and the (projected-out) output.
        num_codebooks, keep_num_codebooks_dim: independent codes per vector; the indices keep a
            codebook axis when ``keep_num_codebooks_dim`` (default and any false value:
            ``num_codebooks > 1``, as theirs).
        codebook_dim: code dimensions when ``levels`` is an int (default: ``len(levels)``).
        optimize_values: the values are Parameters (``values_per_latent.0``, ...); else fixed.
        in_place_codebook_optimizer: an optimizer class, instantiated over ``values_per_latent``
            (stored as ``self.in_place_codebook_optimizer``) as theirs does; vector-quantize-pytorch's
            forward never steps it (its in-place branch needs ``optimize_values=False``, where no
            optimizer exists), so neither does fastvq's.

    Values start at ``linspace(-0.5, 0.5, L)`` for odd ``L`` and ``arange(L) / L - 0.5`` for even.
    As in vector-quantize-pytorch, the output's gradient passes straight through to the input and
    none reaches ``values_per_latent``.

    ``forward(z)`` takes ``z [B, dim, ...]`` (channels first, always) and returns
    ``(out [B, dim, ...], indices, loss)``: ``indices`` int32 ``[B, ...]`` (``[B, ..., num_codebooks]``),
    ``loss`` the weighted sum of both terms in training, 0 in eval. The index is the mixed-radix
    number of each dimension's nearest value; vector-quantize-pytorch instead maps the chosen
    values back to levels and truncates, which for levels such as 6 turns ``4.9999998`` into 4 (two
    codes, one index). Where that does not happen the indices are identical.

    Raises:
        ValueError: bad levels or sizes, an int ``levels`` without ``codebook_dim``, an in-place
            optimizer with ``optimize_values=False``, or an input whose channels are not ``dim``.
    """

    @raises_config_error
    def __init__(
        self,
        levels: Union[Sequence[int], int],
        dim: int,
        commitment_loss_weight: Optional[float] = 0.1,
        quantization_loss_weight: Optional[float] = 0.1,
        num_codebooks: int = 1,
        codebook_dim: int = -1,
        keep_num_codebooks_dim: Optional[bool] = None,
        optimize_values: Optional[bool] = True,
        in_place_codebook_optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_codebooks", num_codebooks)
        check_real("commitment_loss_weight", commitment_loss_weight)
        check_real("quantization_loss_weight", quantization_loss_weight)
        if isinstance(levels, int):
            if codebook_dim < 1:
                # A RuntimeError too: vector-quantize-pytorch fails here inside torch's repeat(codebook_dim).
                raise ConfigRuntimeError(f"an int levels needs codebook_dim >= 1, got codebook_dim = {codebook_dim}")
            levels = [levels] * codebook_dim
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"levels must be ints >= 2, got {levels}")
        if in_place_codebook_optimizer is not None and not optimize_values:
            raise ValueError("in_place_codebook_optimizer needs optimize_values=True (the values it optimises)")
        self.dim = dim
        # Python copies decide whether a term is computed, without reading a device tensor.
        self._weights = (float(commitment_loss_weight), float(quantization_loss_weight))
        self.register_buffer("commitment_loss_weight", torch.tensor(commitment_loss_weight, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("quantization_loss_weight", torch.tensor(quantization_loss_weight, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.codebook_dim = codebook_dim if codebook_dim > 0 else len(levels)
        if self.codebook_dim != len(levels):
            raise ValueError(f"codebook_dim = {codebook_dim} does not match {len(levels)} levels")
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = bool(keep_num_codebooks_dim) or num_codebooks > 1
        self.has_projections = dim != self.effective_codebook_dim
        self.project_in = nn.Linear(dim, self.effective_codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(self.effective_codebook_dim, dim) if self.has_projections else nn.Identity()
        self.codebook_size = math.prod(levels)
        self.register_buffer("implicit_codebook", self._indices_to_level_values(torch.arange(self.codebook_size)),
                             persistent=False)
        values = [torch.linspace(-0.5, 0.5, level) if level % 2 == 1 else torch.arange(level) / level - 0.5
                  for level in levels]
        self.optimize_values = bool(optimize_values)
        self.in_place_codebook_optimizer = None
        if optimize_values:
            self.values_per_latent = nn.ParameterList([nn.Parameter(v) for v in values])
            if in_place_codebook_optimizer is not None:
                self.in_place_codebook_optimizer = in_place_codebook_optimizer(self.values_per_latent)
        else:
            self.values_per_latent = values

    # ------------------------------------------------------------------ losses (theirs)

    def quantization_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        return F.mse_loss(zhat.detach(), z, reduction=reduce)

    def commitment_loss(self, z: Tensor, zhat: Tensor, reduce: str = "mean") -> Tensor:
        return F.mse_loss(z.detach(), zhat, reduction=reduce)

    # ------------------------------------------------------------------ quantization

    def _nearest_levels(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Each value's nearest level ``[..., d]`` (ties to the lower level) and that level's value."""
        levels, values = [], []
        for i, dimension_values in enumerate(self.values_per_latent):
            dimension_values = dimension_values.to(z.device)
            level = (z[..., i, None] - dimension_values).abs().argmin(dim=-1)
            levels.append(level)
            values.append(dimension_values[level])
        return torch.stack(levels, dim=-1), torch.stack(values, dim=-1)

    def quantize(self, z: Tensor) -> Tensor:
        """``z [..., d]`` -> the nearest values, gradient straight through to ``z``."""
        _, quantized = self._nearest_levels(z)
        return z + (quantized - z).detach()

    def _scale_and_shift(self, zhat_normalized: Tensor) -> Tensor:
        half_width = self._levels // 2
        return zhat_normalized * 2 * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: Tensor) -> Tensor:
        half_width = self._levels // 2
        return (zhat - half_width) / half_width / 2

    def _indices_to_level_values(self, indices: Tensor) -> Tensor:
        levels = (indices.long()[..., None] // self._basis) % self._levels
        return self._scale_and_shift_inverse(levels)

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes at the initial values ``[..., d]`` -> indices (each rounded to its level)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must end in the code dimension {self.codebook_dim}, got shape {tuple(zhat.shape)}")
        levels = self._scale_and_shift(zhat).round().clamp(min=0).minimum(self._levels - 1)
        return (levels.long() * self._basis).sum(dim=-1).to(torch.int32)

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Indices -> codes at the initial values, ``[B, dim, ...]`` (projected out unless asked not to)."""
        codes = self._indices_to_level_values(indices)
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if project_out and self.has_projections:
            codes = self.project_out(codes.to(self.project_out.weight.dtype))
        return codes.movedim(-1, 1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        original_input = check_float_input(z, "z")
        if z.dim() < 3 or z.shape[1] != self.dim:
            raise ValueError(f"z must be [B, {self.dim}, ...] (channels first), got shape {tuple(z.shape)}")
        z, spatial = channels_to_sequence(z)
        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        levels, quantized = self._nearest_levels(z)
        codes = (z + (quantized - z).detach()).flatten(-2)
        indices = (levels * self._basis).sum(dim=-1).to(torch.int32)
        out = sequence_to_channels(self.project_out(codes), spatial)
        indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if not self.keep_num_codebooks_dim:
            indices = indices[..., 0]
        zero = out.new_zeros((), dtype=torch.float32)
        commitment_weight, quantization_weight = self._weights
        commitment = self.commitment_loss(original_input, out) if self.training and commitment_weight != 0 else zero
        quantization = (self.quantization_loss(original_input, out) if self.training and quantization_weight != 0
                        else zero)
        loss = self.commitment_loss_weight * commitment + self.quantization_loss_weight * quantization
        return out, indices, loss
