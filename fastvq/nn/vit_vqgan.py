"""ViT-VQGAN's factorised, l2-normalised quantizer (Yu et al. 2022, section 3.2) on fastvq's ops.

ViT-VQGAN looks codes up in a low-dimensional space (``codebook_dim``, 32 in the paper) and
l2-normalises both the projected encoder output and the codes, so the search is by cosine
similarity and every code lies on the unit sphere; both changes raise codebook usage. The
search, gather and both VQ losses run in ``torch.ops.fastvq.vector_quantize``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ops  # noqa: F401  (registers torch.ops.fastvq.*)
from ..functional import ema_update_

__all__ = ["FactorizedL2Quantizer"]


class FactorizedL2Quantizer(nn.Module):
    """ViT-VQGAN's quantizer: project to ``codebook_dim``, l2-normalise, search by cosine, project back.

    Args:
        dim: feature dimension of the input and output.
        codebook_size: number of codes ``K``.
        codebook_dim: dimension ``d`` of the lookup space and the codes (32 in the paper).
        beta: weight of the commitment loss (0.25).
        ema_update: train the codebook by exponential moving averages of the normalised inputs
            assigned to each code, renormalised after every update, instead of by the loss's
            codebook term (the paper trains it by gradient, the default).
        decay: EMA decay, in ``[0, 1)``; only used with ``ema_update``.
        eps: Laplace smoothing of the EMA cluster sizes, ``>= 0``; only used with ``ema_update``.

    State: ``project_in`` (``nn.Linear(dim, codebook_dim)``), ``project_out``
    (``nn.Linear(codebook_dim, dim)``) and ``codebook [K, d]``, drawn from a standard normal as
    in the paper: a parameter when trained by gradient; with ``ema_update`` a buffer kept at unit
    norm, beside the buffers ``cluster_size [K]`` (ones) and ``embed_avg [K, d]`` (the codebook)
    of the moving averages (vector-quantize-pytorch's convention, no zero-debiasing).

    ``forward(x)`` takes ``x [..., dim]`` channels last (ViT tokens ``[B, N, dim]``), any float
    dtype, and returns ``(quantized, loss, indices)`` in that order, as the ViT-VQGAN code this
    follows (enhancing-transformers' ``VectorQuantizer``) does:

    - ``quantized [..., dim]``: ``project_out`` of the chosen normalised code. The gradient
      reaches the projected input straight through, before its normalisation (as in
      enhancing-transformers), and ``project_in`` from there;
    - ``loss``: float32 scalar ``beta * mean((sg[q] - z)^2) + mean((q - sg[z])^2)`` with ``z``
      the normalised projected input and ``q`` its normalised code (without the second term
      under ``ema_update``), computed in training and eval mode alike;
    - ``indices``: int64 ``[...]``.

    Raises:
        ValueError: non-positive sizes, a negative or non-finite ``beta``, ``decay`` outside
            ``[0, 1)``, negative ``eps``; in ``forward``, an input whose last dimension is not ``dim``.
        TypeError: a non-tensor or non-float input, non-integer indices.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: int = 32,
        beta: float = 0.25,
        *,
        ema_update: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("beta", beta), ("decay", decay), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.beta = float(beta)
        self.ema_update = bool(ema_update)
        self.decay = float(decay)
        self.eps = float(eps)
        self.project_in = nn.Linear(dim, codebook_dim)
        self.project_out = nn.Linear(codebook_dim, dim)
        codebook = torch.randn(codebook_size, codebook_dim)
        if self.ema_update:
            codebook = F.normalize(codebook, dim=-1)
            self.register_buffer("codebook", codebook)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_avg", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)

    def normalized_codebook(self) -> Tensor:
        """The codes on the unit sphere, ``[K, codebook_dim]``."""
        return F.normalize(self.codebook, dim=-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be channels-last [..., dim={self.dim}], got shape {tuple(x.shape)}")
        projected = self.project_in(x.reshape(-1, self.dim))
        z = F.normalize(projected, dim=-1)
        quantized, indices, loss = torch.ops.fastvq.vector_quantize(
            z, self.normalized_codebook(), "cosine", self.beta, 0.0 if self.ema_update else 1.0
        )
        if self.training and self.ema_update:
            # Under torch.distributed the statistics are summed over ranks first (see ema_update_).
            ema_update_(
                self.codebook,
                self.cluster_size,
                self.embed_avg,
                z.detach(),
                indices,
                decay=self.decay,
                eps=self.eps,
                check_indices_range=False,
            )
            self.codebook.copy_(F.normalize(self.codebook, dim=-1))
        # Straight through to the projection before its normalisation; the value stays the code.
        quantized = quantized.detach().to(projected.dtype) + (projected - projected.detach())
        out = self.project_out(quantized)
        return out.reshape(*x.shape[:-1], self.dim), loss, indices.reshape(x.shape[:-1])

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``indices`` int ``[...]`` -> the layer's output for them, ``[..., dim]``."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            found = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int64 or int32 tensor, got {found}")
        return self.project_out(F.embedding(indices.long(), self.normalized_codebook()))
