"""Finite scalar quantization: vector-quantize-pytorch's ``FSQ``, ``ResidualFSQ`` and
``GroupedResidualFSQ`` (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made Simple").

FSQ has no codebook to search: each of ``d`` values is bounded and rounded to one of ``L_i``
levels, and the implicit codebook is the grid of ``prod(L_i)`` points. It is elementwise work on
``N x d`` values, which PyTorch's own kernels already do at memory speed, so these layers are plain
PyTorch around :func:`fastvq.functional.finite_scalar_quantize` (no fused kernel: there is no
``N x K`` matrix to avoid). Names, arguments, defaults, return structures and state_dict keys are
vector-quantize-pytorch 1.32's; ``tests/nn/test_fsq.py`` compares outputs, indices and gradients with it.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_real
from ..functional import FSQ_BOUND_EPS, check_fsq_levels, fsq_bound
from ._residual import GroupedResidual, QuantizeDropout, check_dropout_arguments, codes_from_indices, drop_layer
from .errors import raises_config_error

__all__ = ["FSQ", "ResidualFSQ", "GroupedResidualFSQ"]

INT32_MAX = 2**31 - 1


def check_positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_float_input(x: object, name: str = "x") -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype} with shape {tuple(x.shape)}")
    return x


def channels_to_sequence(x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``[B, D, ...]`` -> ``([B, prod(...), D], spatial shape)``."""
    moved = x.movedim(1, -1)
    # The positions counted, not inferred (-1): an empty batch has no size to infer them from.
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:-1]), moved.shape[-1]), tuple(moved.shape[1:-1])


def sequence_to_channels(x: Tensor, spatial: tuple[int, ...]) -> Tensor:
    """Undoes :func:`channels_to_sequence` for ``[B, n, D]``."""
    return x.reshape(x.shape[0], *spatial, x.shape[-1]).movedim(-1, 1)


class FSQ(nn.Module):
    """Finite scalar quantization, a drop-in for vector-quantize-pytorch's ``FSQ``.

    Args (vector-quantize-pytorch's names and defaults):
        levels: the number of levels of each code dimension (``d = len(levels)``); each ``>= 3``,
            or ``>= 2`` with ``preserve_symmetry``.
        dim: input feature dimension (default ``d * num_codebooks``); otherwise ``project_in`` /
            ``project_out`` map it to ``d * num_codebooks`` and back.
        num_codebooks: independent FSQ codes per vector; needs ``keep_num_codebooks_dim``.
        keep_num_codebooks_dim: keep a trailing codebook axis on the indices (default
            ``num_codebooks > 1``).
        scale: stored, unused (as in vector-quantize-pytorch).
        allowed_dtypes: input dtypes quantized as they are; others are cast to float32 when
            ``force_quantization_f32``.
        channel_first: the input is ``[B, dim, ...]``; 4-D and 5-D inputs are always taken as
            channel first.
        projection_has_bias: bias of the projections.
        return_indices: compute the indices (else ``None``).
        force_quantization_f32: quantize in float32 (CUDA autocast off) for dtypes outside
            ``allowed_dtypes``.
        preserve_symmetry: the symmetric quantizer of arXiv 2411.19842 (levels symmetric around
            0, also for even ``L``); the default is the paper's asymmetric grid for even ``L``.
        noise_dropout: in training, replace each quantized value with probability
            ``noise_dropout`` by itself plus uniform noise in ``[-0.5, 0.5)``, clamped to
            ``[-1, 1]`` (needs ``preserve_symmetry``); indices are taken before the noise.
        bound_hard_clamp: bound by ``clamp(-1, 1)`` instead of tanh.
        orthogonal_rotation: rotate each code vector by a random orthogonal matrix (buffer
            ``orthogonal_rot``) before quantizing and back after.
        paper_bound: keyword-only, fastvq's: bound with the FSQ paper's ``half_l = (L - 1)(1 -
            1e-3)/2`` instead of vector-quantize-pytorch's ``(1 + 1e-3)``, whose rounding leaves
            the grid for ``L > 1001`` (see :func:`fastvq.functional.finite_scalar_quantize`).

    ``forward(z)`` takes ``[B, n, dim]`` (``[B, dim, ...]`` when channel first) and returns
    ``(out, indices)``: ``out`` shaped like ``z``, with gradient straight through the rounding;
    ``indices`` ``[B, n]`` (``[B, ..., num_codebooks]`` with ``keep_num_codebooks_dim``), int32
    as in vector-quantize-pytorch (int64 when the codebook has ``>= 2**31`` codes), or ``None``.

    Indices are summed in integers, so they stay exact past ``2**24`` codes, where
    vector-quantize-pytorch's float32 sum rounds them; below that they are identical.

    Buffers: ``orthogonal_rot`` (persistent, with ``orthogonal_rotation``); the level tables are
    not persistent, as in vector-quantize-pytorch. ``implicit_codebook`` (``[K, d]``) is computed
    when read rather than stored, so a large grid costs no memory until asked for.

    Raises:
        ValueError: bad levels or sizes, ``noise_dropout`` without ``preserve_symmetry``, or an
            input whose feature size is not ``dim``. TypeError: a non-float input.
    """

    @raises_config_error
    def __init__(
        self,
        levels: Sequence[int],
        dim: Optional[int] = None,
        num_codebooks: int = 1,
        keep_num_codebooks_dim: Optional[bool] = None,
        scale: Optional[float] = None,
        allowed_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64),
        channel_first: bool = False,
        projection_has_bias: bool = True,
        return_indices: bool = True,
        force_quantization_f32: bool = True,
        preserve_symmetry: bool = False,
        noise_dropout: float = 0.0,
        bound_hard_clamp: bool = False,
        orthogonal_rotation: bool = False,
        *,
        paper_bound: bool = False,
    ):
        super().__init__()
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        if not isinstance(levels, list):
            raise ValueError(f"levels must be a list or tuple of ints, got {levels!r}")
        check_fsq_levels(levels, preserve_symmetry)
        levels = [int(level) for level in levels]
        check_positive_int("num_codebooks", num_codebooks)
        if dim is not None:
            check_positive_int("dim", dim)
        check_real("noise_dropout", noise_dropout, minimum=0.0, maximum=1.0)
        if scale is not None:
            check_real("scale", scale)
        if noise_dropout > 0 and not preserve_symmetry:
            raise ValueError("noise_dropout > 0 needs preserve_symmetry=True (as in vector-quantize-pytorch)")
        keep_num_codebooks_dim = num_codebooks > 1 if keep_num_codebooks_dim is None else keep_num_codebooks_dim
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("num_codebooks > 1 needs keep_num_codebooks_dim=True")

        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        basis = [math.prod(levels[:i]) for i in range(len(levels))]
        self.register_buffer("_basis", torch.tensor(basis, dtype=torch.int64), persistent=False)
        self.scale = scale
        self.preserve_symmetry = preserve_symmetry
        self.noise_dropout = float(noise_dropout)
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = self.effective_codebook_dim if dim is None else dim
        self.channel_first = channel_first
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim, bias=projection_has_bias)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim, bias=projection_has_bias)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.return_indices = return_indices
        self.codebook_size = math.prod(levels)
        self.allowed_dtypes = tuple(allowed_dtypes)
        self.force_quantization_f32 = force_quantization_f32
        self.bound_hard_clamp = bound_hard_clamp
        self.paper_bound = paper_bound
        self.orthogonal_rotation = orthogonal_rotation
        if orthogonal_rotation:
            rotation = torch.empty(self.codebook_dim, self.codebook_dim)
            nn.init.orthogonal_(rotation)
            self.register_buffer("orthogonal_rot", rotation)

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int32 if self.codebook_size <= INT32_MAX else torch.int64

    @property
    def implicit_codebook(self) -> Tensor:
        """Every code of the grid in index order, ``[codebook_size, d]`` float32 (computed when read)."""
        return self._indices_to_codes(torch.arange(self.codebook_size, device=self._levels.device))

    # ------------------------------------------------------------------ vector-quantize-pytorch's methods

    def bound(self, z: Tensor, eps: float = FSQ_BOUND_EPS, hard_clamp: bool = False) -> Tensor:
        """The plain bound, rounded and renormalised to ``[-1, 1]`` (straight-through gradient)."""
        codes, _ = fsq_bound(z, self._levels, preserve_symmetry=False, hard_clamp=hard_clamp, eps=eps)
        return codes

    def symmetry_preserving_bound(self, z: Tensor, hard_clamp: bool = False) -> Tensor:
        """arXiv 2411.19842's symmetric quantizer ``2/(L-1) floor((L-1)(tanh z + 1)/2 + 1/2) - 1``."""
        codes, _ = fsq_bound(z, self._levels, preserve_symmetry=True, hard_clamp=hard_clamp, eps=FSQ_BOUND_EPS)
        return codes

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        eps = -FSQ_BOUND_EPS if self.paper_bound else FSQ_BOUND_EPS
        return fsq_bound(z, self._levels, preserve_symmetry=self.preserve_symmetry,
                         hard_clamp=self.bound_hard_clamp, eps=eps)

    def quantize(self, z: Tensor) -> Tensor:
        """``z [..., d]`` -> its quantized values in ``[-1, 1]``, same shape."""
        return self._quantize(z)[0]

    def maybe_apply_noise(self, bounded_z: Tensor) -> Tensor:
        """noise dropout (training only), drawn as vector-quantize-pytorch draws it."""
        if not self.training or self.noise_dropout == 0.0:
            return bounded_z
        offset_mask = torch.full_like(bounded_z, self.noise_dropout).bernoulli_().bool()
        offset = torch.rand_like(bounded_z) - 0.5
        return torch.where(offset_mask, bounded_z + offset, bounded_z).clamp(-1.0, 1.0)

    def _scale_and_shift(self, zhat_normalized: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return (zhat_normalized + 1.0) / (2.0 / (self._levels - 1))
        half_width = self._levels // 2
        return zhat_normalized * half_width + half_width

    def _scale_and_shift_inverse(self, zhat: Tensor) -> Tensor:
        if self.preserve_symmetry:
            return zhat * (2.0 / (self._levels - 1)) - 1.0
        half_width = self._levels // 2
        return (zhat - half_width) / half_width

    def _level_indices_to_indices(self, level_indices: Tensor) -> Tensor:
        return (level_indices.long() * self._basis).sum(dim=-1).to(self.index_dtype)

    def _indices_to_codes(self, indices: Tensor) -> Tensor:
        return self._scale_and_shift_inverse(self.indices_to_level_indices(indices))

    def indices_to_level_indices(self, indices: Tensor) -> Tensor:
        """``indices [...]`` -> each dimension's level ``[..., d]``."""
        return (indices.long()[..., None] // self._basis) % self._levels

    def codes_to_indices(self, zhat: Tensor) -> Tensor:
        """Codes ``[..., d]`` in ``[-1, 1]`` -> indices ``[...]`` (each value rounded to its level)."""
        if zhat.shape[-1] != self.codebook_dim:
            raise ValueError(f"zhat must end in the code dimension {self.codebook_dim}, got shape {tuple(zhat.shape)}")
        levels = self._scale_and_shift(zhat).round().nan_to_num(nan=0.0)
        levels = levels.clamp(min=0).minimum(self._levels - 1)
        return self._level_indices_to_indices(levels)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Indices as ``forward`` returns them -> the layer's output for them."""
        is_img_or_video = indices.dim() >= 3 + int(self.keep_num_codebooks_dim)
        codes = self._indices_to_codes(indices)
        if self.orthogonal_rotation:
            codes = codes @ self.orthogonal_rot.t()
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        if self.has_projections:
            codes = self.project_out(codes.to(self.project_out.weight.dtype))
        if is_img_or_video or self.channel_first:
            codes = codes.movedim(-1, 1)
        return codes

    def forward(self, z: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        z = check_float_input(z, "z")
        move_channels = z.dim() >= 4 or self.channel_first
        spatial = None
        if move_channels:
            if z.dim() < 3 or z.shape[1] != self.dim:
                raise ValueError(f"z must be [B, {self.dim}, ...] (channel first), got shape {tuple(z.shape)}")
            z, spatial = channels_to_sequence(z)
        if z.dim() != 3 or z.shape[-1] != self.dim:
            raise ValueError(f"z must be [B, n, {self.dim}], got shape {tuple(z.shape)}")
        z = self.project_in(z).unflatten(-1, (self.num_codebooks, self.codebook_dim))
        if self.orthogonal_rotation:
            z = z @ self.orthogonal_rot
        force_f32 = self.force_quantization_f32
        with torch.autocast("cuda", enabled=False) if force_f32 else nullcontext():
            orig_dtype = z.dtype
            if force_f32 and orig_dtype not in self.allowed_dtypes:
                z = z.float()
            codes, level_indices = self._quantize(z)
            indices = self._level_indices_to_indices(level_indices) if self.return_indices else None
            codes = self.maybe_apply_noise(codes)
            if self.orthogonal_rotation:
                codes = codes @ self.orthogonal_rot.t()
            codes = codes.flatten(-2).to(orig_dtype)
        out = self.project_out(codes)
        if move_channels:
            out = sequence_to_channels(out, spatial)
            if indices is not None:
                indices = indices.reshape(indices.shape[0], *spatial, indices.shape[-1])
        if indices is not None and not self.keep_num_codebooks_dim:
            indices = indices[..., 0]
        return out, indices


class ResidualFSQ(QuantizeDropout, nn.Module):
    """Residual FSQ (Algorithm 1 of SoundStream on FSQ layers), a drop-in for
    vector-quantize-pytorch's ``ResidualFSQ``.

    Args (keyword-only, vector-quantize-pytorch's names and defaults):
        levels, num_quantizers: every layer is an ``FSQ(levels, preserve_symmetry=True, ...)``;
            layer ``q`` quantizes the residual divided by ``scales[q] = levels ** -q``.
        dim: input feature dimension (default ``len(levels)``; else linear projections in and out).
        is_channel_first: the input is ``[B, dim, ...]``.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: in
            training (with grad enabled), keep the layers up to one drawn uniformly from
            ``[cutoff, Q)``, rounded up to a multiple of ``multiple_of`` layers; dropped layers
            give index -1. The draw is a device tensor (no host sync); see ``fastvq.nn._residual``.
        soft_clamp_input_value: ``x = tanh(x / c) * c`` before the layers; with
            ``bound_hard_clamp`` (the default) it is ``1 + 1 / (levels - 1)`` and may not be given.
        bound_hard_clamp: the layers bound by ``clamp`` instead of tanh.
        **kwargs: passed to every ``FSQ`` (``paper_bound``, ``noise_dropout``, ...).

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` takes
    ``[B, n, dim]`` (``[B, dim, ...]`` when channel first) and returns ``(quantized,
    all_indices [B, n, Q])`` (``[B, Q, ...]`` when channel first), plus ``all_codes [Q, B, n, d]``
    (``[Q, B, ..., d]``) with ``return_all_codes``; vector-quantize-pytorch looks channel-first
    indices up as if they were channel last there, fastvq returns each position's codes. Buffers
    ``scales`` and ``soft_clamp_input_value`` are not persistent.
    """

    @raises_config_error
    def __init__(
        self,
        *,
        levels: Sequence[int],
        num_quantizers: int,
        dim: Optional[int] = None,
        is_channel_first: bool = False,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        soft_clamp_input_value: Union[float, Sequence[float], Tensor, None] = None,
        bound_hard_clamp: bool = True,
        **kwargs,
    ):
        super().__init__()
        check_dropout_arguments("ResidualFSQ", num_quantizers, quantize_dropout_cutoff_index,
                                quantize_dropout_multiple_of)
        levels = list(levels) if isinstance(levels, (list, tuple)) else levels
        if not isinstance(levels, list):
            raise ValueError(f"levels must be a list or tuple of ints, got {levels!r}")
        check_fsq_levels(levels, preserve_symmetry=True)
        levels = [int(level) for level in levels]
        codebook_dim = len(levels)
        dim = codebook_dim if dim is None else check_positive_int("dim", dim)
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.is_channel_first = is_channel_first
        self.num_quantizers = num_quantizers
        self.levels = levels
        self.codebook_dim = codebook_dim
        levels_tensor = torch.tensor(levels)
        self.layers = nn.ModuleList(
            FSQ(levels=levels, dim=codebook_dim, preserve_symmetry=True, bound_hard_clamp=bound_hard_clamp, **kwargs)
            for _ in range(num_quantizers)
        )
        if any(layer.has_projections for layer in self.layers):
            raise ValueError("ResidualFSQ's layers must not project (pass no dim or num_codebooks to them)")
        self.codebook_size = self.layers[0].codebook_size
        scales = torch.stack([levels_tensor.float() ** -float(q) for q in range(num_quantizers)])
        self.register_buffer("scales", scales, persistent=False)
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        if bound_hard_clamp:
            if soft_clamp_input_value is not None:
                raise ValueError("soft_clamp_input_value is set by bound_hard_clamp=True; pass one or the other")
            soft_clamp_input_value = 1 + 1 / (levels_tensor - 1)
        if isinstance(soft_clamp_input_value, (list, tuple, float, int)):
            soft_clamp_input_value = torch.tensor(soft_clamp_input_value, dtype=torch.float32)
        self.register_buffer("soft_clamp_input_value", soft_clamp_input_value, persistent=False)

    @property
    def codebooks(self) -> Tensor:
        """``[Q, codebook_size, d]``: every layer's implicit codebook (computed when read)."""
        return torch.stack([layer.implicit_codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices [B, ..., q]`` -> scaled codes ``[Q, B, ..., d]`` (-1 gives zeros)."""
        return codes_from_indices(self.codebooks, indices, quantize_dropout=self.quantize_dropout, scales=self.scales)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: Optional[int] = None
    ):
        return self.quantize(x, return_all_codes, self.dropout_index(x, rand_quantize_dropout_fixed_seed))

    def quantize(self, x: Tensor, return_all_codes: bool, dropout_index: Optional[Tensor]):
        """The residual loop; ``dropout_index`` (a device tensor or None) is the last layer kept."""
        x = check_float_input(x)
        spatial = None
        if self.is_channel_first:
            x, spatial = channels_to_sequence(x)
        x = self.project_in(x)
        if self.soft_clamp_input_value is not None:
            clamp_value = self.soft_clamp_input_value
            x = (x / clamp_value).tanh() * clamp_value
        quantized_out = torch.zeros_like(x)
        residual = x
        all_indices = []
        with torch.autocast("cuda", enabled=False):
            for depth, (layer, scale) in enumerate(zip(self.layers, self.scales)):
                quantized, indices = layer(residual / scale)
                quantized, indices, _ = drop_layer(depth, dropout_index, quantized * scale, indices)
                residual = residual - quantized.detach()
                quantized_out = quantized_out + quantized
                all_indices.append(indices)
        quantized_out = self.project_out(quantized_out)
        all_indices = torch.stack(all_indices, dim=-1)
        all_codes = self.get_codes_from_indices(all_indices) if return_all_codes else None
        if self.is_channel_first:
            quantized_out = sequence_to_channels(quantized_out, spatial)
            all_indices = sequence_to_channels(all_indices, spatial)
            if all_codes is not None:
                all_codes = all_codes.reshape(*all_codes.shape[:2], *spatial, all_codes.shape[-1])
        if all_codes is None:
            return quantized_out, all_indices
        return quantized_out, all_indices, all_codes


class GroupedResidualFSQ(GroupedResidual):
    """``groups`` independent ResidualFSQs on equal slices of the features (vector-quantize-pytorch's
    ``GroupedResidualFSQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``).

    ``forward(x, return_all_codes=False)`` returns ``(quantized, all_indices [groups, ...])`` and,
    with ``return_all_codes``, a third element: the tuple of each group's ``all_codes`` (as
    vector-quantize-pytorch returns it). The groups share one quantize-dropout draw per step.
    """

    residual_class = ResidualFSQ

    @raises_config_error
    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__(dim=dim, groups=groups, accept_image_fmap=accept_image_fmap, **kwargs)
        self.codebook_size = self.rvqs[0].codebook_size

    def forward(self, x: Tensor, return_all_codes: bool = False):
        chunks, dropout_index = self.split(x)
        outputs = [rvq.quantize(chunk, return_all_codes, dropout_index) for rvq, chunk in zip(self.rvqs, chunks)]
        quantized, all_indices, *all_codes = zip(*outputs)
        return (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), *all_codes)
