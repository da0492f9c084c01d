"""ViT-VQGAN's factorised, l2-normalised quantizer (Yu et al. 2022, section 3.2) on fastvq's ops.

ViT-VQGAN looks codes up in a low-dimensional space (``codebook_dim``, 32 in the paper) and
l2-normalises both the projected encoder output and the codes, so the search is by cosine
similarity and every code lies on the unit sphere; both changes raise codebook usage. The
search, gather and both VQ losses run in ``fastvq.functional.vector_quantize``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._distributed import all_reduce_sum_, is_distributed, sample_rows
from ..ops.search import nearest_code
from ..ops.segment_reduce import ema_update_, segment_reduce
from ..ops.vector_quantize import vector_quantize

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
        dead_code_threshold: in training, codes whose moving-average use per batch (decay
            ``decay``) falls below it are replaced by normalised projected inputs of the batch,
            drawn at random, and their use reset to the threshold; ``0`` (the default) never
            replaces. A code trained by gradient gets a gradient only while it is chosen, so a
            code no input is near never moves: without replacement ViT-VQGAN on the digits kept
            29 of 128 codes (see the README's "ViT-VQGAN on the digits").
        kmeans_init: initialise the codes by spherical k-means (``kmeans_iters`` Lloyd steps,
            seeded with rows of the batch) on the normalised projected inputs of the first
            training batch, instead of the standard normal draw.
        kmeans_iters: Lloyd steps of ``kmeans_init``, ``>= 1``.

    Under ``torch.distributed`` the use counts, the replacement rows and the k-means statistics
    are shared by all ranks, so every rank keeps the same codebook.

    State: ``project_in`` (``nn.Linear(dim, codebook_dim)``), ``project_out``
    (``nn.Linear(codebook_dim, dim)``) and ``codebook [K, d]``, drawn from a standard normal as
    in the paper: a parameter when trained by gradient; with ``ema_update`` a buffer kept at unit
    norm, beside the buffers ``cluster_size [K]`` (ones) and ``embed_avg [K, d]`` (the codebook)
    of the moving averages (vector-quantize-pytorch's convention, no zero-debiasing). With
    ``dead_code_threshold > 0`` and a gradient codebook, a buffer ``code_usage [K]`` (ones) holds
    the moving-average use (an EMA codebook uses its ``cluster_size``); with ``kmeans_init`` a
    bool buffer ``initted`` says whether the codes were initialised.

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
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(kmeans_iters, int) or isinstance(kmeans_iters, bool) or kmeans_iters < 1:
            raise ValueError(f"kmeans_iters must be a positive int, got {kmeans_iters!r}")
        for name, value in (("beta", beta), ("decay", decay), ("eps", eps),
                            ("dead_code_threshold", dead_code_threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite float, got {value!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold must be >= 0, got {dead_code_threshold!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.beta = float(beta)
        self.ema_update = bool(ema_update)
        self.decay = float(decay)
        self.eps = float(eps)
        self.dead_code_threshold = float(dead_code_threshold)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = kmeans_iters
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
            if self.dead_code_threshold > 0:
                self.register_buffer("code_usage", torch.ones(codebook_size))
        if self.kmeans_init:
            self.register_buffer("initted", torch.tensor(False))
            # A host-side copy, so the forward does not read the buffer (no sync, no graph break).
            self._initted = False
            self._register_load_state_dict_pre_hook(self._read_initted)

    def _read_initted(self, state_dict, prefix, *args, **kwargs):
        if prefix + "initted" in state_dict:
            self._initted = bool(state_dict[prefix + "initted"])

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
        if self.training and self.kmeans_init and not self._initted:
            self._kmeans_init_(z.detach())
        if self.training and self.dead_code_threshold > 0:
            # Before the search: the codebook is not yet saved for the backward.
            self._replace_dead_codes_(z.detach())
        quantized, indices, loss = vector_quantize(
            z, self.normalized_codebook(), metric="cosine", beta=self.beta,
            codebook_weight=0.0 if self.ema_update else 1.0,
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
        if self.training and self.dead_code_threshold > 0 and not self.ema_update:
            with torch.no_grad():
                counts = torch.bincount(indices, minlength=self.codebook_size).to(self.code_usage.dtype)
                self.code_usage.lerp_(all_reduce_sum_(counts), 1.0 - self.decay)
        # Straight through to the projection before its normalisation; the value stays the code.
        quantized = quantized.detach().to(projected.dtype) + (projected - projected.detach())
        out = self.project_out(quantized)
        return out.reshape(*x.shape[:-1], self.dim), loss, indices.reshape(x.shape[:-1])

    @torch.no_grad()
    def _replace_dead_codes_(self, z: Tensor) -> None:
        """Codes whose moving-average use (up to the previous batch) fell below the threshold take
        random rows of ``z``. Every code gets a candidate and ``torch.where`` keeps the live ones:
        no host sync."""
        usage = self.cluster_size if self.ema_update else self.code_usage
        candidates, found = sample_rows(z, self.codebook_size, synced=is_distributed())
        dead = (usage < self.dead_code_threshold) & found
        candidates = candidates.to(self.codebook.dtype)
        self.codebook.copy_(torch.where(dead[:, None], candidates, self.codebook))
        usage.copy_(torch.where(dead, torch.full_like(usage, self.dead_code_threshold), usage))
        if self.ema_update:
            self.embed_avg.copy_(torch.where(dead[:, None], candidates * self.dead_code_threshold, self.embed_avg))

    @torch.no_grad()
    def _kmeans_init_(self, z: Tensor) -> None:
        """Spherical k-means on the rows of ``z`` (unit vectors); the codes and, for an EMA
        codebook, its statistics start from the result."""
        means, _ = sample_rows(z.float(), self.codebook_size, synced=is_distributed())
        counts = torch.zeros(self.codebook_size, device=z.device)
        for _ in range(self.kmeans_iters):
            assignment, _ = nearest_code(z, means, metric="cosine")
            counts, sums = segment_reduce(z, assignment, self.codebook_size)
            all_reduce_sum_(counts)
            all_reduce_sum_(sums)
            # An empty cluster keeps its seed.
            means = torch.where((counts == 0)[:, None], means, F.normalize(sums, dim=-1))
        self.codebook.copy_(means.to(self.codebook.dtype))
        if self.ema_update:
            self.cluster_size.copy_(counts)
            self.embed_avg.copy_(means * counts[:, None])
        self.initted.fill_(True)
        self._initted = True

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``indices`` int ``[...]`` -> the layer's output for them, ``[..., dim]``."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            found = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int64 or int32 tensor, got {found}")
        return self.project_out(F.embedding(indices.long(), self.normalized_codebook()))
