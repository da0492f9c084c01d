"""``RandomProjectionQuantizer``: vector-quantize-pytorch's BEST-RQ target quantizer (Chiu et al.
2022): a frozen random projection of layer-normalised inputs, quantized against a frozen random
codebook by cosine similarity, one codebook per head.

The search is fastvq's :class:`~fastvq.nn.VectorQuantize` (the fused op, in eval mode, as theirs
runs it). With target ``indices`` the layer returns the cross-entropy of the codes' cosine
similarities instead, ``logsumexp_k(s_k) - s_target``, whose log-sum-exp comes from
:func:`fastvq.functional.soft_quantize` (streamed over code tiles, differentiable), so neither path
builds the ``N x K`` logits vector-quantize-pytorch's ``F.cross_entropy`` takes. Names, arguments,
defaults, buffers and state_dict keys are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..functional import soft_quantize
from .errors import raises_config_error
from .fsq import check_float_input, check_positive_int
from .vector_quantize import VectorQuantize, l2norm

__all__ = ["RandomProjectionQuantizer"]


class RandomProjectionQuantizer(nn.Module):
    """Random-projection quantizer, a drop-in for vector-quantize-pytorch's.

    Args (keyword-only): ``dim``, ``codebook_size``, ``codebook_dim`` (each head's projected
    dimension), ``num_codebooks=1`` (heads), ``norm=True`` (a LayerNorm without affine parameters
    first, "to prevent collapse"), ``**kwargs`` for the ``VectorQuantize`` (cosine similarity,
    separate codebook per head). Buffer ``rand_projs [num_codebooks, dim, codebook_dim]``
    (Xavier-normal, frozen); the codes live in ``vq._codebook.embed``.

    ``forward(x [B, n, dim], indices=None)``: without ``indices`` returns the codes' indices int64
    ``[B, n, num_codebooks]`` (``[B, n]`` for one codebook); with ``indices`` of that shape (-1 is
    ignored) returns the mean cross-entropy of each position's cosine similarities to the codes
    against them, differentiable with respect to ``x``.

    Raises:
        ValueError: bad sizes, an input that is not ``[B, n, dim]``, or indices of another shape.
    """

    @raises_config_error
    def __init__(self, *, dim: int, codebook_size: int, codebook_dim: int, num_codebooks: int = 1,
                 norm: bool = True, **kwargs):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size), ("codebook_dim", codebook_dim),
                            ("num_codebooks", num_codebooks)):
            check_positive_int(name, value)
        self.num_codebooks = num_codebooks
        rand_projs = torch.empty(num_codebooks, dim, codebook_dim)
        nn.init.xavier_normal_(rand_projs)
        self.register_buffer("rand_projs", rand_projs)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False) if norm else nn.Identity()
        self.vq = VectorQuantize(dim=codebook_dim * num_codebooks, heads=num_codebooks, codebook_size=codebook_size,
                                 use_cosine_sim=True, separate_codebook_per_head=True, **kwargs)

    def _project(self, x: Tensor) -> Tensor:
        x = check_float_input(x)
        if x.dim() != 3 or x.shape[-1] != self.rand_projs.shape[1]:
            raise ValueError(f"x must be [B, n, {self.rand_projs.shape[1]}], got shape {tuple(x.shape)}")
        projected = torch.einsum("bnd,hde->bnhe", self.norm(x), self.rand_projs)
        return projected.flatten(2)

    def _cross_entropy(self, x: Tensor, indices: Tensor) -> Tensor:
        heads = self.num_codebooks
        expected = tuple(x.shape[:2]) + ((heads,) if heads > 1 else ())
        if not isinstance(indices, Tensor) or tuple(indices.shape) != expected or indices.is_floating_point():
            raise ValueError(f"indices must be an integer tensor of shape {expected}, got "
                             f"{getattr(indices, 'shape', type(indices).__name__)}")
        targets = indices.reshape(-1, heads).long()
        rows = l2norm(self.vq.project_in(x).float().unflatten(-1, (heads, -1))).reshape(targets.shape[0], heads, -1)
        total = rows.new_zeros(())
        for head in range(heads):
            codes = self.vq._codebook.embed[head].detach().float()
            _, lse = soft_quantize(rows[:, head], codes, metric="dot", return_hard=False)
            valid = targets[:, head] >= 0
            target_logits = (rows[:, head] * codes[targets[:, head].clamp(min=0, max=codes.shape[0] - 1)]).sum(-1)
            total = total + torch.where(valid, lse - target_logits, 0.0).sum()
        # F.cross_entropy's mean over the targets that are not ignored (NaN when all are).
        return total / (targets >= 0).sum()

    def forward(self, x: Tensor, indices: Optional[Tensor] = None) -> Tensor:
        x = self._project(x)
        self.vq.eval()
        if indices is not None:
            return self._cross_entropy(x, indices)
        _, codes, _ = self.vq(x)
        return codes
