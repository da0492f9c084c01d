"""``HierarchicalVQ``: vector-quantize-pytorch's VAR-style multi-scale residual quantizer (Tian et
al. 2024, "Visual Autoregressive Modeling").

At each scale the residual feature map is average-pooled to that scale, quantized, upsampled back
to full resolution, refined by a residual convolution (``phi``) and subtracted. Each scale's
quantization is one call of fastvq's :class:`~fastvq.nn.VectorQuantize` on the pooled map's
``B x h_s x w_s`` vectors: one fused search (and, in training, one segment reduce for the EMA), so
no scale ever holds its ``N_s x K`` distance or one-hot matrices. Names, arguments, defaults,
return structures and state_dict keys are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import all_reduce_sum_
from .errors import raises_config_error
from .fsq import check_float_input, check_positive_int
from .vector_quantize import VectorQuantize

__all__ = ["HierarchicalVQ"]

Scale = Union[int, Sequence[int]]


def to_level_shape(scale: Scale, spatial_dims: int) -> tuple[int, ...]:
    if isinstance(scale, int):
        return (scale,) * spatial_dims
    if len(scale) != spatial_dims:
        raise ValueError(f"a scale must have {spatial_dims} sizes, got {tuple(scale)}")
    return tuple(int(size) for size in scale)


class _Phi(nn.Module):
    """The residual convolution after upsampling: ``lerp(x, conv(x), resi_ratio)``."""

    def __init__(self, dim: int, spatial_dims: int, resi_ratio: float):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]
        self.conv = conv(dim, dim, 3, padding=1)
        self.resi_ratio = float(abs(resi_ratio))

    def forward(self, x: Tensor) -> Tensor:
        if self.resi_ratio <= 1e-8:
            return x
        return x.lerp(self.conv(x), self.resi_ratio)


class HierarchicalVQ(nn.Module):
    """Multi-scale residual VQ, a drop-in for vector-quantize-pytorch's ``HierarchicalVQ``.

    Args (keyword-only, their names and defaults): ``dim``; ``codebook_size`` (int, or one per
    scale); ``scales`` (a size per spatial axis, or one int for all, non-decreasing);
    ``shared_codebook=True`` (one ``vq`` for every scale, else ``vqs``); ``channel_first=True``
    (the input and output are ``[B, dim, ...]``, else ``[B, ..., dim]``); the ``VectorQuantize``
    arguments ``sync_codebook, decay=0.99, commitment_weight=1.0, rotation_trick=False,
    kmeans_init=True, kmeans_iters=10, threshold_ema_dead_code=2, stochastic_sample_codes=False,
    sample_codebook_temp=0.1, orthogonal_reg_weight=0.0, orthogonal_reg_max_codes=128,
    orthogonal_reg_active_codes_only=False`` (the orthogonal ones only reach the layers when the
    weight is not 0); ``quant_resi=0.5`` (the ``phi`` blend) and ``share_quant_resi=1`` (1: one
    ``phi_shared``; ``n > 1``: ``n`` ``phi_levels`` spread over the scales; ``<= 0``: one per
    scale); ``nested_dropout=0.0`` and ``nested_dropout_min_levels=1`` (in training, with that
    probability the output keeps only the scales up to a random one, drawn as theirs from a seed
    that one host synchronisation reads); ``accept_image_fmap`` / ``accept_3d_fmap`` (2-D or 3-D
    maps; 1-D sequences otherwise).

    ``forward(x, indices=None, mask=None, lens=None, sample_codebook_temp=None,
    return_cutoff=False)`` returns ``(reconstruction, indices, commit_loss)`` (and the nested
    dropout cutoff or ``None``): ``indices`` a tuple of int64 ``[B, *scale]`` maps, one per scale
    (-1 where masked), ``commit_loss`` the mean of the kept scales' losses. ``mask [B, ...]``
    (bool, full resolution) or ``lens [B]`` (1-D only) mark valid positions: they are pooled with
    the residual, masked scale positions are excluded from losses and statistics, and the
    reconstruction is zero there. ``get_output_from_indices(indices, full_shape=None)`` decodes.

    Raises:
        ValueError: bad scales or sizes, an input or mask whose shape does not fit.
        NotImplementedError: ``forward(indices=...)`` (not implemented by theirs either).
    """

    @raises_config_error
    def __init__(
        self,
        *,
        dim: int,
        codebook_size: Union[int, Sequence[int]],
        scales: Sequence[Scale],
        shared_codebook: bool = True,
        channel_first: bool = True,
        sync_codebook: Optional[bool] = None,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        rotation_trick: bool = False,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2,
        stochastic_sample_codes: bool = False,
        sample_codebook_temp: float = 0.1,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_max_codes: Optional[int] = 128,
        orthogonal_reg_active_codes_only: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 1,
        nested_dropout: float = 0.0,
        nested_dropout_min_levels: int = 1,
        accept_image_fmap: bool = False,
        accept_3d_fmap: bool = False,
    ):
        super().__init__()
        check_positive_int("dim", dim)
        if accept_image_fmap and accept_3d_fmap:
            raise ValueError("choose at most one of accept_image_fmap / accept_3d_fmap")
        check_real("nested_dropout", nested_dropout, minimum=0.0, maximum=1.0)
        check_real("quant_resi", quant_resi)
        if nested_dropout_min_levels < 1:
            raise ValueError(f"nested_dropout_min_levels must be >= 1, got {nested_dropout_min_levels}")
        spatial_dims = 2 if accept_image_fmap else 3 if accept_3d_fmap else 1
        level_shapes = tuple(to_level_shape(scale, spatial_dims) for scale in scales)
        if not level_shapes or any(size < 1 for shape in level_shapes for size in shape):
            raise ValueError(f"scales must be a non-empty list of positive sizes, got {scales!r}")
        for previous, current in zip(level_shapes, level_shapes[1:]):
            if any(a > b for a, b in zip(previous, current)):
                raise ValueError(f"scales must be non-decreasing, got {level_shapes}")
        sizes = (codebook_size,) * len(level_shapes) if isinstance(codebook_size, int) else tuple(codebook_size)
        if len(sizes) != len(level_shapes):
            raise ValueError(f"codebook_size needs one size per scale ({len(level_shapes)}), got {sizes}")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError(f"shared_codebook=True: a shared codebook needs one codebook size per scale, got {sizes}")
        self.dim = dim
        self.spatial_dims = spatial_dims
        self.channel_first = channel_first
        self.scales = tuple(scales)
        self.level_shapes = level_shapes
        self.num_levels = len(level_shapes)
        self.codebook_sizes = sizes
        self.nested_dropout = nested_dropout
        self.nested_dropout_min_levels = nested_dropout_min_levels
        vq_kwargs = dict(
            dim=dim, decay=decay, commitment_weight=commitment_weight, rotation_trick=rotation_trick,
            kmeans_init=kmeans_init, kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            stochastic_sample_codes=stochastic_sample_codes, sample_codebook_temp=sample_codebook_temp,
            sync_codebook=sync_codebook, channel_last=True,
        )
        if orthogonal_reg_weight:
            vq_kwargs.update(orthogonal_reg_weight=orthogonal_reg_weight,
                             orthogonal_reg_max_codes=orthogonal_reg_max_codes,
                             orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only)
        self.vq = VectorQuantize(codebook_size=sizes[0], **vq_kwargs) if shared_codebook else None
        self.vqs = (None if shared_codebook
                    else nn.ModuleList(VectorQuantize(codebook_size=s, **vq_kwargs) for s in sizes))
        self.phi_shared = None
        self.phi_levels = None
        if share_quant_resi == 1:
            self.phi_shared = _Phi(dim, spatial_dims, quant_resi)
        else:
            count = self.num_levels if share_quant_resi <= 0 else min(self.num_levels, int(share_quant_resi))
            self.phi_levels = nn.ModuleList(_Phi(dim, spatial_dims, quant_resi) for _ in range(count))

    def get_vq(self, level_index: int) -> VectorQuantize:
        return self.vq if self.vq is not None else self.vqs[level_index]

    def _pool(self, t: Tensor, size: tuple[int, ...]) -> Tensor:
        return getattr(F, f"adaptive_avg_pool{self.spatial_dims}d")(t, output_size=size)

    def pool_residual(self, t: Tensor, level_shape: tuple[int, ...], mask: Optional[Tensor] = None):
        """The residual ``[B, dim, ...]`` averaged down to ``level_shape`` (over valid positions
        only, with ``mask``), and which pooled positions saw any valid one."""
        if mask is None:
            return self._pool(t, level_shape), None
        weights = mask[:, None].float()
        pooled_mask = self._pool(weights, level_shape)
        if all(size == 1 for size in level_shape):
            spatial = tuple(range(2, t.dim()))
            pooled = ((t * weights).sum(dim=spatial, keepdim=True)
                      / weights.sum(dim=spatial, keepdim=True).clamp(min=1e-5))
        else:
            pooled = self._pool(t * weights, level_shape) / pooled_mask.clamp(min=1e-6)
        return pooled, pooled_mask[:, 0] > 0

    def choose_phi(self, level_index: int) -> _Phi:
        if self.phi_shared is not None:
            return self.phi_shared
        count = len(self.phi_levels)
        if count == 1:
            return self.phi_levels[0]
        position = level_index / max(self.num_levels - 1, 1)
        return self.phi_levels[round(position * (count - 1))]

    def upsample_to_full(self, q: Tensor, full_shape: tuple[int, ...], level_index: int) -> Tensor:
        if tuple(q.shape[2:]) != tuple(full_shape):
            mode = ("linear", "bilinear", "trilinear")[self.spatial_dims - 1]
            q = F.interpolate(q, size=full_shape, mode=mode, align_corners=False)
        return self.choose_phi(level_index)(q)

    def sample_nested_cutoff(self, device: torch.device) -> Optional[int]:
        """The last scale kept by nested dropout this step, or ``None`` (vector-quantize-pytorch's
        draw: a seed from PyTorch's RNG, summed over ranks, seeds a ``random.Random``)."""
        if not self.training or self.nested_dropout <= 0.0 or self.num_levels <= 1:
            return None
        if self.nested_dropout_min_levels >= self.num_levels:
            return None
        seed = all_reduce_sum_(torch.randint(0, 10_000, (), device=device))
        rand = random.Random(int(seed))
        if rand.random() >= self.nested_dropout:
            return None
        return rand.randrange(self.nested_dropout_min_levels - 1, self.num_levels - 1)

    def _check_input(self, x: Tensor) -> tuple[int, ...]:
        x = check_float_input(x)
        channels = x.shape[1] if self.channel_first and x.dim() > 1 else x.shape[-1]
        if x.dim() != 2 + self.spatial_dims or channels != self.dim:
            layout = "[B, dim, ...]" if self.channel_first else "[B, ..., dim]"
            raise ValueError(f"x must be {layout} with dim = {self.dim} and {self.spatial_dims} spatial axes, "
                             f"got shape {tuple(x.shape)}")
        return tuple(x.shape[2:]) if self.channel_first else tuple(x.shape[1:-1])

    def forward(
        self,
        x: Tensor,
        indices: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
        lens: Optional[Tensor] = None,
        sample_codebook_temp: Optional[float] = None,
        return_cutoff: bool = False,
    ):
        if indices is not None:
            raise NotImplementedError("HierarchicalVQ(indices=...) (reconstruction from indices in forward) is not "
                                      "implemented, as in vector-quantize-pytorch; use get_output_from_indices")
        if mask is not None and lens is not None:
            raise ValueError("pass either mask or lens, not both")
        full_shape = self._check_input(x)
        if lens is not None:
            if self.spatial_dims != 1:
                raise ValueError("lens is only supported for 1-D sequences")
            mask = torch.arange(full_shape[0], device=x.device) < lens.to(x.device)[:, None]
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (x.shape[0], *full_shape):
                raise ValueError(f"mask must be a bool [B, ...] tensor of shape {(x.shape[0], *full_shape)}, "
                                 f"got {mask.dtype} {tuple(mask.shape)}")
            mask = mask.to(x.device)
        if not self.channel_first:
            x = x.movedim(-1, 1)
        vq_kwargs = {} if sample_codebook_temp is None else dict(sample_codebook_temp=sample_codebook_temp)
        residual = x
        reconstruction = torch.zeros_like(x)
        cumulative, all_indices, commit_losses = [], [], []
        for level_index, level_shape in enumerate(self.level_shapes):
            residual_down, level_mask = self.pool_residual(residual, level_shape, mask)
            batch = residual_down.shape[0]
            rows = residual_down.flatten(2).transpose(1, 2)
            quantized, level_indices, commit_loss = self.get_vq(level_index)(
                rows, mask=None if level_mask is None else level_mask.reshape(batch, -1), **vq_kwargs
            )
            quantized = quantized.transpose(1, 2).reshape(batch, self.dim, *level_shape)
            quantized = self.upsample_to_full(quantized, full_shape, level_index)
            reconstruction = reconstruction + quantized
            residual = residual - quantized
            cumulative.append(reconstruction)
            all_indices.append(level_indices.reshape(batch, *level_shape))
            commit_losses.append(commit_loss)
        cutoff = self.sample_nested_cutoff(x.device)
        losses = torch.stack(commit_losses)
        if cutoff is not None:
            reconstruction = cumulative[cutoff]
            commit_loss = losses[: cutoff + 1].mean()
        else:
            commit_loss = losses.mean()
        if mask is not None:
            reconstruction = torch.where(mask[:, None], reconstruction, 0.0)
        if not self.channel_first:
            reconstruction = reconstruction.movedim(1, -1)
        if return_cutoff:
            return reconstruction, tuple(all_indices), commit_loss, cutoff
        return reconstruction, tuple(all_indices), commit_loss

    def get_output_from_indices(self, indices: Sequence[Tensor], full_shape: Optional[Scale] = None) -> Tensor:
        """One index map per scale (-1 gives zeros) -> the reconstruction at ``full_shape``
        (default: the finest scale)."""
        if not isinstance(indices, (tuple, list)) or len(indices) != self.num_levels:
            raise ValueError(f"indices must be a tuple of {self.num_levels} index maps, one per scale")
        full_shape = self.level_shapes[-1] if full_shape is None else to_level_shape(full_shape, self.spatial_dims)
        reconstructed = None
        for level_index, level_indices in enumerate(indices):
            if level_indices.dim() != 1 + self.spatial_dims:
                raise ValueError(f"each index map must be [B, ...] with {self.spatial_dims} spatial axes, "
                                 f"got shape {tuple(level_indices.shape)}")
            batch, level_shape = level_indices.shape[0], tuple(level_indices.shape[1:])
            flat = level_indices.reshape(batch, -1)
            q = self.get_vq(level_index).get_output_from_indices(flat)
            q = torch.where((flat != -1)[..., None], q, 0.0)
            q = q.transpose(1, 2).reshape(batch, self.dim, *level_shape)
            q = self.upsample_to_full(q, full_shape, level_index)
            reconstructed = q if reconstructed is None else reconstructed + q
        return reconstructed if self.channel_first else reconstructed.movedim(1, -1)
