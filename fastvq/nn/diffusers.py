"""diffusers' ``VectorQuantizer`` (``diffusers.models.autoencoders.vae``) on fastvq's ops.

diffusers' ``VQModel`` (aMUSEd, Kandinsky's MoVQ, the VQ-diffusion VQ-VAE) quantizes its latents with
taming-transformers' ``VectorQuantizer2`` renamed: the code dimension is ``vq_embed_dim``, the search is
``argmin(cdist(z, codebook))``, which builds the ``N x K`` distance matrix. :class:`VectorQuantizer` keeps
its constructor, attributes, ``forward`` and ``get_codebook_entry`` signatures, return structures and
state_dict keys (``embedding.weight``, and ``used`` with ``remap``), and runs the search, gather,
straight-through estimator and both losses in ``fastvq.functional.vector_quantize``, which never builds
that matrix. It is :class:`fastvq.nn.VectorQuantizer2` under diffusers' names; the differences from the
original are those listed in ``fastvq/nn/taming.py`` (float32 losses, ``ValueError``/``TypeError`` on bad
arguments instead of asserts, the random replacement of unknown remapped indices, no log message).

``cdist`` and fastvq's search agree on the chosen code except where two codes are equally near within
float32 rounding; in float64 they agree exactly.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from ._adopt import adopt_tensors
from .taming import RemapSource, VectorQuantizer2, _check_fmap, _positive_int

__all__ = ["VectorQuantizer"]


class VectorQuantizer(VectorQuantizer2):
    """diffusers' ``VectorQuantizer``: taming's ``VectorQuantizer2`` with the code dimension ``vq_embed_dim``.

    Args:
        n_e: number of codes ``K``.
        vq_embed_dim: code dimension ``D``, the channel count of the latents.
        beta: weight of one of the two VQ losses: with ``legacy=True`` (diffusers' default, taming's
            bug kept for old checkpoints) ``loss = mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)``,
            with ``legacy=False`` ``loss = beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)``.
        remap: optional path to a ``.npy`` file (or a 1-D integer tensor) of the code indices in use;
            returned indices are positions in that list. Adds the buffer ``used``.
        unknown_index: with ``remap``, what a code outside ``used`` becomes: ``"random"``, ``"extra"``
            or an int.
        sane_index_shape: return indices shaped ``[B, H, W]`` instead of flat ``[B*H*W]``.
        legacy: see ``beta``.

    ``forward(z)`` takes latents ``z [B, vq_embed_dim, H, W]`` (float32, float16, bfloat16 or
    float64) and returns ``(z_q, loss, (None, None, indices))``: ``z_q [B, vq_embed_dim, H, W]``
    (the chosen codes, gradient straight through to ``z``), ``loss`` a float32 scalar, ``indices``
    int64 ``[B*H*W]`` (``[B*H*W, 1]`` with ``remap``, ``[B, H, W]`` with ``sane_index_shape``).
    ``get_codebook_entry(indices, shape)`` returns the codes ``[N, vq_embed_dim]`` (``shape=None``) or
    the map ``[b, vq_embed_dim, h, w]`` for ``shape = (b, h, w, vq_embed_dim)``.

    Raises:
        ValueError: non-positive ``n_e``/``vq_embed_dim``, a negative or non-finite ``beta``, a bad
            ``remap``/``unknown_index``; in ``forward``, ``z`` not shaped ``[B, vq_embed_dim, H, W]``.
        TypeError: a non-tensor or non-float ``z``.
    """

    def __init__(
        self,
        n_e: int,
        vq_embed_dim: int,
        beta: float,
        remap: Optional[RemapSource] = None,
        unknown_index: Union[str, int] = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ):
        # Checked here first so that a bad size is reported under diffusers' argument name.
        dim = _positive_int("vq_embed_dim", vq_embed_dim)
        super().__init__(n_e, dim, beta, remap, unknown_index, sane_index_shape, legacy)
        self.vq_embed_dim = dim

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, tuple[None, None, Tensor]]:
        return super().forward(_check_fmap(z, self.vq_embed_dim, "vq_embed_dim"))

    @classmethod
    def from_original(cls, module: nn.Module) -> "VectorQuantizer":
        """The fastvq equivalent of a diffusers ``VectorQuantizer``: same configuration, same state
        (strictly loaded), on the same device and in the same dtype and training mode."""
        remap, unknown_index = None, "random"
        if getattr(module, "remap", None) is not None:
            remap = module.used.detach().clone()
            # diffusers turns "extra" into the index after the used codes and grows re_embed by one.
            has_extra = module.re_embed > module.used.shape[0]
            unknown_index = "extra" if has_extra else module.unknown_index
        weight = module.embedding.weight
        layer = cls(module.n_e, module.vq_embed_dim, module.beta, remap=remap, unknown_index=unknown_index,
                    sane_index_shape=module.sane_index_shape, legacy=module.legacy)
        layer.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.load_state_dict(module.state_dict(), strict=True)
        return adopt_tensors(layer.train(module.training), module)
