"""One interface over the code priors (``PixelCNN``, ``GatedPixelCNN``, ``GPTPrior``, ``MaskGITPrior``),
flat over one code map or hierarchical over VQ-VAE-2's two (the bottom prior conditioned on the top codes)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gpt_prior import GPTPrior
from .maskgit import MaskGITPrior

__all__ = ["prior_loss", "prior_sample", "HierarchicalPrior"]


def prior_loss(prior: nn.Module, codes: Tensor, cond: Optional[Tensor] = None, *,
               generator: Optional[torch.Generator] = None) -> Tensor:
    """Mean cross-entropy (nats per code) of ``codes`` under ``prior``, float32.

    ``prior`` is a ``GPTPrior``, a ``MaskGITPrior`` (the cross-entropy of the codes it masks, the
    masks drawn from ``generator``; the other priors draw nothing) or a PixelCNN-style model whose
    ``forward(codes [B, H, W], cond)`` returns logits ``[B, K, H, W]``.
    """
    if isinstance(prior, MaskGITPrior):
        return prior.loss(codes, cond, generator=generator)
    if isinstance(prior, GPTPrior):
        return prior.loss(codes, cond)
    return F.cross_entropy(prior(codes, cond).float(), codes.long())


def prior_sample(
    prior: nn.Module,
    n: int,
    shape: Sequence[int],
    cond: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    steps: Optional[int] = None,
) -> Tensor:
    """``n`` code maps of size ``shape = (H, W)`` from ``prior`` (``top_p`` needs a ``GPTPrior`` or a
    ``MaskGITPrior``; ``steps``, the decoding steps, a ``MaskGITPrior``: its own default when None)."""
    if isinstance(prior, MaskGITPrior):
        extra = {} if steps is None else {"steps": steps}
        return prior.sample(n, shape, cond, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                            **extra)
    if steps is not None:
        raise ValueError(f"steps (parallel decoding steps) needs the maskgit prior; {type(prior).__name__} draws "
                         "one position at a time")
    if isinstance(prior, GPTPrior):
        return prior.sample(n, shape, cond, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    if top_p is not None:
        raise ValueError(f"top_p (nucleus sampling) needs the gpt prior; "
                         f"{type(prior).__name__} takes temperature and top_k")
    return prior.sample(n, tuple(shape), cond, temperature=temperature, top_k=top_k, generator=generator)


class HierarchicalPrior(nn.Module):
    """VQ-VAE-2's prior: ``top`` models the top code map, ``bottom`` the bottom map given the top.

    ``bottom`` must be conditioned on the top codes: a ``PixelCNN``/``GatedPixelCNN`` built with
    ``cond_num_codes`` = the top codebook size (the top map is embedded and resized to the bottom
    map's size), or a ``GPTPrior`` / ``MaskGITPrior`` with ``cond_num_codes`` and ``cond_len`` = the
    top map's size (the top codes are a prefix of the bottom sequence).

    ``loss((top, bottom))`` returns ``(top_loss, bottom_loss)`` in nats per code;
    ``sample(n, top_shape, bottom_shape, ...)`` returns ``(top, bottom)`` code maps.
    """

    def __init__(self, top: nn.Module, bottom: nn.Module):
        super().__init__()
        self.top = top
        self.bottom = bottom

    def loss(
        self, codes: tuple[Tensor, Tensor], *, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, Tensor]:
        top, bottom = codes
        return (prior_loss(self.top, top, generator=generator),
                prior_loss(self.bottom, bottom, top, generator=generator))

    @torch.no_grad()
    def sample(
        self,
        n: int,
        top_shape: Sequence[int],
        bottom_shape: Sequence[int],
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        steps: Optional[int] = None,
    ) -> tuple[Tensor, Tensor]:
        options = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, steps=steps)
        top = prior_sample(self.top, n, top_shape, **options)
        return top, prior_sample(self.bottom, n, bottom_shape, top, **options)
