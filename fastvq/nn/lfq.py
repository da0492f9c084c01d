"""Lookup-free quantization: vector-quantize-pytorch's ``LFQ``, ``ResidualLFQ`` and
``GroupedResidualLFQ`` (Yu et al. 2023, MAGVIT-v2), with the entropy loss on
:func:`fastvq.functional.code_entropy`.

Each of ``d`` values is quantized to its sign (times ``codebook_scale``), so the codebook is the
``2^d`` corners of a cube and the index is the bit pattern. Nothing is searched. The entropy
auxiliary loss is what costs: vector-quantize-pytorch computes every row's distances, softmax and
entropy over all ``2^d`` codes, ``N x 2^d`` several times over (2 GiB per copy at 2^16 codes and
8 192 rows; MAGVIT-v2 uses 2^18). fastvq computes the same two terms from the per-row products
over each half of the bits, ``N x 2^(d/2)``, exactly (the ``1e-5`` clamp inside their log
included). Names, arguments, defaults, return structures and state_dict keys are
vector-quantize-pytorch 1.32's; ``tests/nn/test_lfq.py`` compares with it.
"""

from __future__ import annotations

import math
from collections import namedtuple
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import is_distributed
from ..functional import ENTROPY_EPS, clamped_entropy, code_entropy
from ._residual import GroupedResidual, QuantizeDropout, check_dropout_arguments, codes_from_indices, drop_layer
from .errors import raises_config_error
from .fsq import channels_to_sequence, check_float_input, check_positive_int, sequence_to_channels

__all__ = ["LFQ", "ResidualLFQ", "GroupedResidualLFQ", "CosineSimLinear", "Return", "LossBreakdown"]

Return = namedtuple("Return", ["quantized", "indices", "entropy_aux_loss"])
LossBreakdown = namedtuple("LossBreakdown", ["per_sample_entropy", "batch_entropy", "commitment"])


def _distributed_mean(tensor: Tensor) -> Tensor:
    """The mean over ranks, differentiable (vector-quantize-pytorch's ``maybe_distributed_mean``)."""
    if not is_distributed():
        return tensor
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(tensor) / dist.get_world_size()


class CosineSimLinear(nn.Module):
    """``normalize(x) @ normalize(weight, dim=0) * scale`` with ``weight [dim_in, dim_out]``
    (vector-quantize-pytorch's LFQ input projection for ``cosine_sim_project_in``)."""

    def __init__(self, dim_in: int, dim_out: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.randn(dim_in, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return (F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=0)) * self.scale


class LFQ(nn.Module):
    """Lookup-free quantization, a drop-in for vector-quantize-pytorch's ``LFQ`` (keyword-only
    arguments, their names and defaults).

    Args:
        dim: input feature dimension (default ``log2(codebook_size) * num_codebooks``).
        codebook_size: ``2^d`` codes per codebook (a power of two; default ``2 ** dim``).
        entropy_loss_weight: weight of the entropy auxiliary loss.
        commitment_loss_weight: weight of ``mean((x - sg[q])^2)``.
        diversity_gamma: weight of the batch (codebook) entropy inside the entropy loss.
        straight_through_activation: applied to the input before the straight-through estimator.
        num_codebooks, keep_num_codebooks_dim: independent ``d``-bit codes per vector, and whether
            the indices keep their codebook axis (default ``num_codebooks > 1``).
        codebook_scale: the codes are ``+-codebook_scale``.
        frac_per_sample_entropy: in ``(0, 1]``: the entropy terms use this fraction of the rows,
            drawn as vector-quantize-pytorch draws them (``torch.randn(rows).argsort()``).
        has_projections, projection_has_bias: ``project_in`` / ``project_out`` (default: when
            ``dim != d * num_codebooks``).
        soft_clamp_input_value: ``x = tanh(x / v) * v`` after the projection.
        cosine_sim_project_in, cosine_sim_project_in_scale: project in by :class:`CosineSimLinear`.
        channel_first: the input is ``[B, dim, ...]``; ``None`` decides by rank (4-D and up).
        experimental_softplus_entropy_loss, entropy_loss_offset: ``softplus(loss + offset)``.
        spherical: binary spherical quantization (Zhao et al. 2024): inputs and codes l2-normalised
            (times ``codebook_scale``).
        force_quantization_f32: quantize in float32 with CUDA autocast off.
        orthogonal_rotation: rotate by a random orthogonal matrix (buffer ``orthogonal_rot``).
        correct_masked_batch_entropy: keyword-only, fastvq's. With a ``[B, n]`` ``forward(mask=...)``,
            vector-quantize-pytorch 1.32 folds the codebook axis into the rows before averaging, so
            its "batch" entropy is the mean of the rows' own entropies, equal to the per-sample
            term (with ``diversity_gamma = 1`` the entropy loss is then 0). The default keeps that;
            ``True`` takes the entropy of the masked rows' mean distribution. A ``[B]`` mask has no
            such quirk (there or here): the batch entropy is that of the kept samples' mean distribution.

    ``forward(x, inv_temperature=100.0, return_loss_breakdown=False, mask=None)`` takes
    ``[B, n, dim]`` (``[B, dim, ...]`` channel first), ``mask`` bool ``[B, n]`` marking the rows that
    count in the losses, or ``[B]`` marking whole samples (all their rows count). Returns
    ``Return(quantized, indices, entropy_aux_loss)`` (and
    ``LossBreakdown(per_sample_entropy, batch_entropy, commitment)`` with
    ``return_loss_breakdown``): ``quantized`` like ``x`` (straight-through gradient in training),
    ``indices`` int64 ``[B, n]`` (``[B, n, num_codebooks]``), the first value the most significant
    bit; the loss ``entropy_loss_weight * (per_sample - diversity_gamma * batch) +
    commitment_loss_weight * commitment``, 0 in eval mode.

    The entropies are vector-quantize-pytorch's, ``-sum p log max(p, 1e-5)`` with ``p`` the
    softmax over codes of ``2 inv_temperature x . c``, computed by
    :func:`fastvq.functional.code_entropy` (the per-bit logits are ``4 inv_temperature a x`` for
    codes ``+-a``); under a process group of several ranks the batch distribution is averaged
    over ranks before its entropy, as theirs.

    Buffers: ``mask`` (persistent, int64 ``2^(d-1) ... 1``, as theirs), ``orthogonal_rot``;
    ``codebook`` (``[2^d, d]``) is computed when read, not stored.

    Raises:
        ValueError: a codebook size that is not a power of two, neither ``dim`` nor
            ``codebook_size``, bad fractions or scales, or an input or mask that does not fit.
    """

    @raises_config_error
    def __init__(
        self,
        *,
        dim: Optional[int] = None,
        codebook_size: Optional[int] = None,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        straight_through_activation: nn.Module = nn.Identity(),
        num_codebooks: int = 1,
        keep_num_codebooks_dim: Optional[bool] = None,
        codebook_scale: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        has_projections: Optional[bool] = None,
        projection_has_bias: bool = True,
        soft_clamp_input_value: Optional[float] = None,
        cosine_sim_project_in: bool = False,
        cosine_sim_project_in_scale: Optional[float] = None,
        channel_first: Optional[bool] = None,
        experimental_softplus_entropy_loss: bool = False,
        entropy_loss_offset: float = 5.0,
        spherical: bool = False,
        force_quantization_f32: bool = True,
        orthogonal_rotation: bool = False,
        correct_masked_batch_entropy: bool = False,
    ):
        super().__init__()
        if dim is None and codebook_size is None:
            raise ValueError("either dim or codebook_size must be given to LFQ")
        if codebook_size is not None:
            check_positive_int("codebook_size", codebook_size)
            if codebook_size & (codebook_size - 1):
                raise ValueError(
                    f"codebook_size must be a power of 2 for lookup-free quantization, got {codebook_size} "
                    f"(suggested {2 ** math.ceil(math.log2(codebook_size))})"
                )
        check_positive_int("num_codebooks", num_codebooks)
        codebook_size = 2**dim if codebook_size is None else codebook_size
        codebook_dim = codebook_size.bit_length() - 1
        if codebook_dim < 1:
            raise ValueError(f"codebook_size must be at least 2, got {codebook_size}")
        codebook_dims = codebook_dim * num_codebooks
        dim = codebook_dims if dim is None else check_positive_int("dim", dim)
        for name, value in (("entropy_loss_weight", entropy_loss_weight),
                            ("commitment_loss_weight", commitment_loss_weight),
                            ("diversity_gamma", diversity_gamma), ("entropy_loss_offset", entropy_loss_offset)):
            check_real(name, value)
        check_real("codebook_scale", codebook_scale, above=0.0)
        check_real("frac_per_sample_entropy", frac_per_sample_entropy, above=0.0, maximum=1.0)
        for name, value in (("soft_clamp_input_value", soft_clamp_input_value),
                            ("cosine_sim_project_in_scale", cosine_sim_project_in_scale)):
            if value is not None:
                check_real(name, value, above=0.0)
        if soft_clamp_input_value is not None and soft_clamp_input_value < codebook_scale:
            raise ValueError(f"soft_clamp_input_value must be >= codebook_scale = {codebook_scale}, "
                             f"got {soft_clamp_input_value}")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")

        self.codebook_size = codebook_size
        has_projections = dim != codebook_dims if has_projections is None else has_projections
        if has_projections:
            if cosine_sim_project_in:
                scale = codebook_scale if cosine_sim_project_in_scale is None else cosine_sim_project_in_scale
                self.project_in = CosineSimLinear(dim, codebook_dims, scale=scale)
            else:
                self.project_in = nn.Linear(dim, codebook_dims, bias=projection_has_bias)
            self.project_out = nn.Linear(codebook_dims, dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.has_projections = has_projections
        self.dim = dim
        self.codebook_dim = codebook_dim
        self.num_codebooks = num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.channel_first = channel_first
        self.activation = straight_through_activation
        self.spherical = spherical
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rotation = torch.empty(codebook_dim, codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)
        self.frac_per_sample_entropy = frac_per_sample_entropy
        self.diversity_gamma = diversity_gamma
        self.entropy_loss_weight = entropy_loss_weight
        self.codebook_scale = codebook_scale
        self.commitment_loss_weight = commitment_loss_weight
        self.soft_clamp_input_value = soft_clamp_input_value
        self.entropy_loss_offset = entropy_loss_offset
        self.experimental_softplus_entropy_loss = experimental_softplus_entropy_loss
        self.force_quantization_f32 = force_quantization_f32
        self.correct_masked_batch_entropy = correct_masked_batch_entropy
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    # ------------------------------------------------------------------ codes

    @property
    def dtype(self) -> torch.dtype:
        return self.zero.dtype

    def bits_to_codes(self, bits: Tensor) -> Tensor:
        return bits * self.codebook_scale * 2 - self.codebook_scale

    def maybe_l2norm(self, t: Tensor) -> Tensor:
        return F.normalize(t, dim=-1) * self.codebook_scale if self.spherical else t

    @property
    def codebook(self) -> Tensor:
        """Every code ``[2^d, d]`` (``+-codebook_scale``, index order; computed when read)."""
        codes = torch.arange(self.codebook_size, device=self.mask.device)
        return self.bits_to_codes(((codes[:, None] & self.mask) != 0).to(self.dtype))

    @property
    def code_magnitude(self) -> float:
        """``a`` of the codes ``+-a`` the entropy compares with: ``codebook_scale`` (over
        ``sqrt(d)`` when spherical, after the l2 normalisation)."""
        return self.codebook_scale / math.sqrt(self.codebook_dim) if self.spherical else self.codebook_scale

    def indices_to_codes(self, indices: Tensor, project_out: bool = True) -> Tensor:
        """Indices as ``forward`` returns them -> codes (projected out unless ``project_out=False``)."""
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        should_transpose = is_img_or_video if self.channel_first is None else self.channel_first
        if not self.keep_num_codebooks_dim:
            indices = indices[..., None]
        bits = ((indices[..., None].int() & self.mask) != 0).to(self.dtype)
        codes = self.maybe_l2norm(self.bits_to_codes(bits))
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        codes = codes.flatten(-2)
        if project_out:
            codes = self.project_out(codes)
        if should_transpose:
            codes = codes.movedim(-1, 1)
        return codes

    # ------------------------------------------------------------------ losses

    def _entropy_rows(self, rows: Tensor, mask: Optional[Tensor]) -> Tensor:
        """The rows ``[M, G, d]`` the entropy terms see (masked, then the random fraction)."""
        if mask is not None and mask.dim() == 2:
            rows = rows[mask]
            if not self.correct_masked_batch_entropy:
                # vector-quantize-pytorch's 'b n ... -> (b n) ...' on [M, c, d] makes every (row,
                # codebook) pair a row of its own: one group, M * c rows.
                rows = rows.reshape(-1, 1, rows.shape[-1])
        else:
            if mask is not None:
                # One flag per sample: the kept samples' rows, all of them, as without a mask.
                rows = rows[mask]
            rows = rows.flatten(0, 1)
        if self.frac_per_sample_entropy < 1.0:
            num_tokens = rows.shape[0]
            num_sampled = int(num_tokens * self.frac_per_sample_entropy)
            keep = torch.randn(num_tokens).argsort(dim=-1) < num_sampled
            rows = rows[keep.to(rows.device)]
        return rows

    def _entropy_terms(self, original_input: Tensor, inv_temperature: float, mask: Optional[Tensor]):
        rows = self._entropy_rows(original_input, mask)
        bit_logits = rows * (4.0 * inv_temperature * self.code_magnitude)
        sample_entropy, avg_probs = code_entropy(bit_logits, eps=ENTROPY_EPS)
        per_sample_entropy = sample_entropy.mean()
        if mask is not None and mask.dim() == 2 and not self.correct_masked_batch_entropy:
            # Their avg_prob is then each row's own distribution: its entropy is the row's entropy.
            codebook_entropy = per_sample_entropy
        else:
            codebook_entropy = clamped_entropy(_distributed_mean(avg_probs), ENTROPY_EPS).mean()
        return per_sample_entropy, codebook_entropy

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        inv_temperature: float = 100.0,
        return_loss_breakdown: bool = False,
        mask: Optional[Tensor] = None,
    ):
        x = check_float_input(x)
        inv_temperature = check_real("inv_temperature", inv_temperature, above=0.0)
        should_transpose = x.dim() >= 4 if self.channel_first is None else self.channel_first
        spatial = None
        if should_transpose:
            x, spatial = channels_to_sequence(x)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be [B, n, {self.dim}] ([B, {self.dim}, ...] channel first), "
                             f"got shape {tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) not in (tuple(x.shape[:1]),
                                                                                    tuple(x.shape[:2]))):
            raise ValueError(f"mask must be a bool [B] = {tuple(x.shape[:1])} or [B, n] = {tuple(x.shape[:2])} "
                             f"tensor, got {mask.dtype} {tuple(mask.shape)}")
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            clamp_value = self.soft_clamp_input_value
            x = (x / clamp_value).tanh() * clamp_value
        x = x.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot
        x = self.maybe_l2norm(x)
        force_f32 = self.force_quantization_f32
        with torch.autocast("cuda", enabled=False) if force_f32 else nullcontext():
            orig_dtype = x.dtype
            if force_f32:
                x = x.float()
            original_input = x
            codebook_value = torch.ones_like(x) * self.codebook_scale
            quantized = torch.where(x > 0, codebook_value, -codebook_value)
            indices = ((quantized > 0).int() * self.mask.int()).sum(dim=-1)
            quantized = self.maybe_l2norm(quantized)
            if self.training:
                x = self.activation(x)
                x = x + (quantized - x).detach()
            else:
                x = quantized
            if self.training:
                per_sample_entropy, codebook_entropy = self._entropy_terms(original_input, inv_temperature, mask)
                entropy_aux_loss = per_sample_entropy - self.diversity_gamma * codebook_entropy
            else:
                entropy_aux_loss = per_sample_entropy = codebook_entropy = self.zero
            if self.training and self.experimental_softplus_entropy_loss:
                entropy_aux_loss = F.softplus(entropy_aux_loss + self.entropy_loss_offset)
            if self.training and self.commitment_loss_weight > 0.0:
                commit_loss = F.mse_loss(original_input, quantized.detach(), reduction="none")
                if mask is not None:
                    commit_loss = commit_loss[mask]
                commit_loss = commit_loss.mean()
            else:
                commit_loss = self.zero
            if force_f32:
                x = x.type(orig_dtype)
        if self.orthogonal_rotation:
            x = x @ self.orthogonal_rot.t()
        x = self.project_out(x.flatten(-2))
        if should_transpose:
            x = sequence_to_channels(x, spatial)
            indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if not self.keep_num_codebooks_dim:
            indices = indices[..., 0]
        aux_loss = entropy_aux_loss * self.entropy_loss_weight + commit_loss * self.commitment_loss_weight
        ret = Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, LossBreakdown(per_sample_entropy, codebook_entropy, commit_loss)


class ResidualLFQ(QuantizeDropout, nn.Module):
    """Residual LFQ, a drop-in for vector-quantize-pytorch's ``ResidualLFQ``.

    Args (keyword-only): ``dim, num_quantizers, codebook_size, quantize_dropout=False,
    quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1, soft_clamp_input_value=None,
    **lfq_kwargs``. Layer ``q`` is an ``LFQ`` with ``codebook_scale = 2 ** -q`` (and the soft clamp
    halved per layer); ``project_in``/``project_out`` map ``dim`` to ``log2(codebook_size)``.
    Quantize dropout is drawn on the device (see ``fastvq.nn._residual``).

    ``forward(x, mask=None, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)``
    returns ``(quantized, all_indices [B, n, Q], all_losses [Q])`` (plus ``all_codes
    [Q, B, n, d]``); a dropped layer gives index -1 and loss 0.
    """

    @raises_config_error
    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: Optional[float] = None,
        **kwargs,
    ):
        super().__init__()
        check_dropout_arguments("ResidualLFQ", num_quantizers, quantize_dropout_cutoff_index,
                                quantize_dropout_multiple_of)
        check_positive_int("dim", dim)
        check_positive_int("codebook_size", codebook_size)
        if soft_clamp_input_value is not None:
            check_real("soft_clamp_input_value", soft_clamp_input_value, above=0.0)
        codebook_dim = codebook_size.bit_length() - 1
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.num_quantizers = num_quantizers
        layers = []
        for depth in range(num_quantizers):
            layers.append(LFQ(dim=codebook_dim, codebook_size=codebook_size, codebook_scale=2.0**-depth,
                              soft_clamp_input_value=soft_clamp_input_value, **kwargs))
            if soft_clamp_input_value is not None:
                soft_clamp_input_value *= 0.5
        self.layers = nn.ModuleList(layers)
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualLFQ's layers must not project (no num_codebooks or has_projections for them)")
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return codes_from_indices(self.codebooks, indices, quantize_dropout=self.quantize_dropout)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_all_codes: bool = False,
                rand_quantize_dropout_fixed_seed: Optional[int] = None):
        return self.quantize(x, mask, return_all_codes, self.dropout_index(x, rand_quantize_dropout_fixed_seed))

    def quantize(self, x: Tensor, mask: Optional[Tensor], return_all_codes: bool, dropout_index: Optional[Tensor]):
        """The residual loop; ``dropout_index`` (a device tensor or None) is the last layer kept."""
        x = self.project_in(check_float_input(x))
        quantized_out = torch.zeros_like(x)
        residual = x
        all_indices, all_losses = [], []
        with torch.autocast("cuda", enabled=False):
            for depth, layer in enumerate(self.layers):
                quantized, indices, loss = drop_layer(depth, dropout_index, *layer(residual, mask=mask))
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
                all_losses.append(loss)
        quantized_out = self.project_out(quantized_out)
        all_indices, all_losses = torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)


class GroupedResidualLFQ(GroupedResidual):
    """``groups`` independent ResidualLFQs on equal slices of the features (vector-quantize-pytorch's
    ``GroupedResidualLFQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``).

    ``forward(x, mask=None, return_all_codes=False)`` returns ``(quantized, all_indices [groups,
    B, n, Q], all_losses [groups, Q])`` and, with ``return_all_codes``, the tuple of each group's
    codes; the groups share one quantize-dropout draw.
    """

    residual_class = ResidualLFQ

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, return_all_codes: bool = False):
        chunks, dropout_index = self.split(x)
        outputs = [rvq.quantize(chunk, mask, return_all_codes, dropout_index) for rvq, chunk in zip(self.rvqs, chunks)]
        quantized, all_indices, all_losses, *all_codes = zip(*outputs)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(all_losses), *all_codes)
