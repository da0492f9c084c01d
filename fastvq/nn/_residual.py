"""What the residual quantizers of the vector-quantize-pytorch family share (ResidualFSQ,
ResidualLFQ, ResidualSimVQ and their grouped forms): the quantize-dropout draw and the lookup of
every layer's codes from stacked indices.

Quantize dropout keeps the layers up to a random one. vector-quantize-pytorch draws that layer on
the host (``torch.randint(...).item()`` seeds a ``random.Random``), one host synchronisation per
step; here it is a device tensor (rank 0's draw under a process group), every layer runs and the
dropped ones are masked out. ``rand_quantize_dropout_fixed_seed`` still reproduces
vector-quantize-pytorch's choice exactly, through the same ``random.Random``.
"""

from __future__ import annotations

import random
from typing import Optional

import torch
from torch import Tensor, nn

from .._distributed import broadcast_from_first
from .errors import raises_config_error


def _round_up_to_multiple(index, multiple: int):
    """The last kept layer rounded up so that a multiple of ``multiple`` layers is kept (EnCodec)."""
    return (index + multiple) // multiple * multiple - 1 if multiple != 1 else index


def quantize_dropout_index(
    *,
    cutoff_index: int,
    num_quantizers: int,
    multiple_of: int,
    device: torch.device,
    fixed_seed: Optional[int] = None,
) -> Tensor:
    """The last layer kept by quantize dropout, uniform in ``[cutoff_index, num_quantizers)`` and
    rounded up to keep a multiple of ``multiple_of`` layers: an int64 scalar on ``device``, the
    same on every rank. ``fixed_seed`` draws it as vector-quantize-pytorch does from that seed."""
    if fixed_seed is not None:
        chosen = random.Random(fixed_seed).randrange(cutoff_index, num_quantizers)
        return torch.tensor(_round_up_to_multiple(chosen, multiple_of), device=device)
    drawn = broadcast_from_first(torch.randint(cutoff_index, num_quantizers, (), device=device))
    return _round_up_to_multiple(drawn, multiple_of)


class QuantizeDropout:
    """Mixin for a residual quantizer with ``quantize_dropout``, ``quantize_dropout_cutoff_index``,
    ``quantize_dropout_multiple_of`` and ``num_quantizers``: ``dropout_index(x, fixed_seed)`` is the
    last layer kept this step, or ``None`` when nothing drops (eval mode, dropout off, or, where
    ``dropout_needs_grad`` as in vector-quantize-pytorch's FSQ and LFQ residuals, grad disabled)."""

    dropout_needs_grad = True

    def dropout_index(self, x: Tensor, fixed_seed: Optional[int] = None) -> Optional[Tensor]:
        if not (self.training and self.quantize_dropout) or (self.dropout_needs_grad and not torch.is_grad_enabled()):
            return None
        return quantize_dropout_index(
            cutoff_index=self.quantize_dropout_cutoff_index, num_quantizers=self.num_quantizers,
            multiple_of=self.quantize_dropout_multiple_of, device=x.device, fixed_seed=fixed_seed,
        )


def drop_layer(depth: int, dropout_index: Optional[Tensor], quantized: Tensor, indices: Tensor,
               loss: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Layer ``depth``'s output, indices and loss, zeroed (index -1) when quantize dropout drops it."""
    if dropout_index is None:
        return quantized, indices, loss
    kept = depth <= dropout_index
    quantized = torch.where(kept, quantized, 0.0)
    indices = torch.where(kept, indices.long(), -1)
    return quantized, indices, None if loss is None else torch.where(kept, loss, 0.0)


def check_dropout_arguments(owner: str, num_quantizers: int, cutoff_index: int, multiple_of: int) -> None:
    if not isinstance(num_quantizers, int) or isinstance(num_quantizers, bool) or num_quantizers < 1:
        raise ValueError(f"{owner}: num_quantizers must be a positive int, got {num_quantizers!r}")
    if not isinstance(cutoff_index, int) or not 0 <= cutoff_index < num_quantizers:
        raise ValueError(f"{owner}: quantize_dropout_cutoff_index must be in [0, {num_quantizers}), "
                         f"got {cutoff_index!r}")
    if not isinstance(multiple_of, int) or multiple_of < 1:
        raise ValueError(f"{owner}: quantize_dropout_multiple_of must be an int >= 1, got {multiple_of!r}")


def codes_from_indices(
    codebooks: Tensor, indices: Tensor, *, quantize_dropout: bool, scales: Optional[Tensor] = None
) -> Tensor:
    """Every layer's codes for ``indices [B, ..., q]``: ``[Q, B, ..., d]`` from ``codebooks [Q, K, d]``.

    ``q < Q`` (the coarse indices of a dropped-out step) is padded with -1, which needs
    ``quantize_dropout``, as in vector-quantize-pytorch; a -1 index gives a zero code, any other
    index outside ``[0, K)`` raises ``ValueError`` (one host synchronisation, skipped under
    ``torch.compile``, where indices are clamped into range). ``scales [Q, d]`` multiply each
    layer's codes (ResidualFSQ's per-layer scale).
    """
    if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
        found = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
        raise TypeError(f"indices must be an int64 or int32 tensor, got {found}")
    num_quantizers, num_codes = codebooks.shape[:2]
    depth = indices.shape[-1] if indices.dim() else 0
    if indices.dim() < 2 or depth > num_quantizers:
        raise ValueError(f"indices must be [B, ..., q] with q <= {num_quantizers}, got shape {tuple(indices.shape)}")
    if depth < num_quantizers:
        if not quantize_dropout:
            raise ValueError(
                f"indices for {depth} of {num_quantizers} layers need quantize_dropout=True, "
                "as in vector-quantize-pytorch"
            )
        pad = indices.new_full((*indices.shape[:-1], num_quantizers - depth), -1)
        indices = torch.cat((indices, pad), dim=-1)
    indices = indices.long()
    if not torch.compiler.is_compiling() and bool(((indices < -1) | (indices >= num_codes)).any()):
        raise ValueError(f"indices must be -1 (a dropped layer) or in [0, {num_codes}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    dropped = indices == -1
    safe = indices.clamp(0, num_codes - 1)
    codes = torch.stack([codebooks[layer][safe[..., layer]] for layer in range(num_quantizers)])
    codes = codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)
    if scales is not None:
        codes = codes * scales.reshape(num_quantizers, *([1] * (codes.dim() - 2)), -1)
    return codes


class GroupedResidual(nn.Module):
    """``groups`` independent residual quantizers of class ``residual_class`` on equal slices of the
    feature axis (axis 1 with ``accept_image_fmap``, else the last), as vector-quantize-pytorch's
    grouped residual classes: ``rvqs`` holds them; ``codebooks`` is ``[groups, Q, K, d]``."""

    residual_class: type

    @raises_config_error
    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        for name, value in (("dim", dim), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % groups:
            raise ValueError(f"groups must divide dim, got dim = {dim} and groups = {groups}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(self.residual_class(dim=dim // groups, **kwargs) for _ in range(groups))

    @property
    def codebooks(self) -> Tensor:
        return torch.stack([rvq.codebooks for rvq in self.rvqs])

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack([rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)])

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        outputs = [rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)]
        return torch.cat(outputs, dim=self.split_dim)

    def split(self, x: Tensor) -> tuple[tuple[Tensor, ...], Optional[Tensor]]:
        """The groups' slices of ``x`` and the quantize-dropout draw they share."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 2 or x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} features on axis {self.split_dim}, got shape {tuple(x.shape)}")
        return x.chunk(self.groups, dim=self.split_dim), self.rvqs[0].dropout_index(x, None)
