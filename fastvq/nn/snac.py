"""SNAC's quantizers (``snac.vq``, snac 1.2.1): DAC's factorised l2-normalised codes, one time stride per level.

SNAC (Multi-Scale Neural Audio Codec) reuses DAC's ``VectorQuantize`` with one addition: a level with
``stride > 1`` averages its input over ``stride`` frames (``avg_pool1d``), quantizes the coarser
sequence and repeats each output frame ``stride`` times, so its codes run at ``1 / stride`` the frame
rate. The classes live here rather than in :mod:`fastvq.nn.dac` because they are a different drop-in:
the same class names (``VectorQuantize``, ``ResidualVectorQuantize``) with different constructors
(``vq_strides`` instead of ``n_codebooks``/``quantizer_dropout``), different return values (no losses;
a list of codes of different lengths) and different state_dict keys, since SNAC's ``WNConv1d`` is
``torch.nn.utils.parametrizations.weight_norm`` (``in_proj.parametrizations.weight.original0/1``), not
DAC's ``weight_g``/``weight_v``. The search and the gather are :mod:`fastvq.nn.dac`'s, on
``fastvq.functional.nearest_code``; gradients are SNAC's (straight through within a level, the residual
not detached).

Differences from SNAC: bad arguments raise ``ValueError``/``TypeError`` naming the argument, including
an input whose length is not a multiple of every level's stride (SNAC returns a shorter output from
the level, and its residual loop then fails on the shapes); SNAC pads its input so this never happens.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from ._adopt import adopt_tensors
from .dac import _FactorisedLevel, check_latents

__all__ = ["VectorQuantize", "ResidualVectorQuantize"]


def _weight_normed_conv1x1(in_channels: int, out_channels: int) -> nn.Module:
    """SNAC's ``WNConv1d(in_channels, out_channels, kernel_size=1)``."""
    return weight_norm(nn.Conv1d(in_channels, out_channels, kernel_size=1))


class VectorQuantize(_FactorisedLevel):
    """SNAC's ``VectorQuantize``: DAC's level (:class:`fastvq.nn.dac.VectorQuantize`) with a time ``stride``.

    Args: ``input_dim`` (``D``), ``codebook_size`` (``K``), ``codebook_dim`` (``d``), ``stride`` (1).

    ``forward(z [B, D, T])`` (``T`` a multiple of ``stride``) returns ``(z_q [B, D, T], indices int64
    [B, T / stride])``.
    """

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, stride: int = 1):
        super().__init__(input_dim, codebook_size, codebook_dim, _weight_normed_conv1x1, (("stride", stride),))
        self.stride = stride

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        check_latents("z", z, self.input_dim)
        if z.shape[-1] % self.stride:
            raise ValueError(f"z must have a length that is a multiple of stride {self.stride}, "
                             f"got shape {tuple(z.shape)}")
        if self.stride > 1:
            z = F.avg_pool1d(z, self.stride, self.stride)
        z_e = self.in_proj(z)
        z_q, indices = self.decode_latents(z_e)
        z_q = self.out_proj(z_e + (z_q - z_e).detach())
        if self.stride > 1:
            z_q = z_q.repeat_interleave(self.stride, dim=-1)
        return z_q, indices


class ResidualVectorQuantize(nn.Module):
    """SNAC's ``ResidualVectorQuantize``: one level per entry of ``vq_strides``.

    Args (SNAC's order and defaults): ``input_dim`` (512), ``codebook_size`` (1024), ``codebook_dim``
    (8), ``vq_strides`` (``[1, 1, 1, 1]``).

    ``forward(z [B, D, T])`` returns ``(z_q [B, D, T], codes)``, ``codes`` a list of int64 ``[B, T /
    stride]`` per level; ``from_codes(codes)`` -> ``z_q [B, D, T]``.
    """

    def __init__(
        self,
        input_dim: int = 512,
        codebook_size: int = 1024,
        codebook_dim: int = 8,
        vq_strides: Sequence[int] = (1, 1, 1, 1),
    ):
        super().__init__()
        if not isinstance(vq_strides, (list, tuple)) or not vq_strides:
            raise ValueError(f"vq_strides must be a non-empty list of positive ints, got {vq_strides!r}")
        self.n_codebooks = len(vq_strides)
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim, stride) for stride in vq_strides
        )

    def _quantize_levels(self, z: Tensor) -> tuple[Tensor, List[Tensor]]:
        """The residual loop over every level: ``(z_q, codes per level)``."""
        z_q: Union[int, Tensor] = 0
        residual = z
        codes = []
        for quantizer in self.quantizers:
            z_q_level, indices = quantizer(residual)
            z_q = z_q + z_q_level
            residual = residual - z_q_level
            codes.append(indices)
        return z_q, codes

    def forward(self, z: Tensor) -> tuple[Tensor, List[Tensor]]:
        return self._quantize_levels(z)

    def from_codes(self, codes: List[Tensor]) -> Tensor:
        """One integer ``[B, T / stride]`` tensor per level -> ``z_q [B, D, T]``."""
        if not isinstance(codes, (list, tuple)) or len(codes) != self.n_codebooks:
            raise ValueError(f"codes must be a list of {self.n_codebooks} tensors, one per level, got "
                             f"{type(codes).__name__} of length {len(codes) if hasattr(codes, '__len__') else '?'}")
        z_q: Union[float, Tensor] = 0.0
        for quantizer, level_codes in zip(self.quantizers, codes):
            z_q_level = quantizer.out_proj(quantizer.decode_code(level_codes))
            z_q = z_q + z_q_level.repeat_interleave(quantizer.stride, dim=-1)
        return z_q

    @classmethod
    def from_original(cls, module: nn.Module) -> "ResidualVectorQuantize":
        """The fastvq equivalent of SNAC's ``ResidualVectorQuantize`` instance ``module``: the same
        configuration, parameters, mode, device and dtype."""
        ours = cls(
            input_dim=module.quantizers[0].in_proj.in_channels, codebook_size=module.codebook_size,
            codebook_dim=module.codebook_dim, vq_strides=[quantizer.stride for quantizer in module.quantizers],
        )
        weight = module.quantizers[0].codebook.weight
        ours.to(device=weight.device, dtype=weight.dtype)
        ours.load_state_dict(module.state_dict(), strict=True)
        return adopt_tensors(ours.train(module.training), module)
