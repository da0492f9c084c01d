"""``SimVQ`` (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized Models
with One Linear Layer") on fastvq's ops.

The codes are a frozen random codebook ``C [K, F]`` passed through a learned map ``W``
(``nn.Linear(F, D, bias=False)`` by default): ``codebook = W(C)``, ``[K, D]``. Training ``W``
moves every code at once, which keeps the whole codebook in use. The layer builds that
``[K, D]`` codebook each call (``K x F x D`` work, no ``N x K`` matrix) and hands it to
``fastvq.functional.vector_quantize``, whose codebook gradient flows back into ``W``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.vector_quantize import vector_quantize
from .errors import raises_config_error

__all__ = ["SimVQ"]

def _identity(t: Tensor) -> Tensor:
    return t


class SimVQ(nn.Module):
    """SimVQ, a drop-in for vector-quantize-pytorch's ``SimVQ`` (same arguments, buffer
    ``frozen_codebook`` and module ``code_transform``, so its state_dicts load here).

    Args:
        dim: feature dimension ``D`` of the input.
        codebook_size: number of codes ``K``.
        codebook_transform: the learned map from frozen codes ``[K, F]`` to codes ``[K, D]``,
            applied row-wise; default ``nn.Linear(F, D, bias=False)``. Any module works (an MLP,
            say) as long as it maps ``[K, F]`` to ``[K, D]``.
        init_fn: applied once to the frozen codebook, drawn ``randn(K, F) / sqrt(F)``.
        channel_first: the input is ``[B, D, ...]`` (a ``[B, D, H, W]`` feature map, say)
            instead of ``[B, ..., D]``.
        rotation_trick: pass the gradient to the input by the rotation trick (Fifty et al.
            2024) instead of straight through; the default, as in vector-quantize-pytorch.
        input_to_quantize_commit_loss_weight: weight of the commitment term ``mean((x -
            sg[q])^2)`` relative to the codebook term ``mean((sg[x] - q)^2)``.
        commitment_weight: weight of the whole loss.
        frozen_codebook_dim: ``F``, the frozen codes' dimension (default ``dim``).
        accept_image_fmap: keyword-only; older vector-quantize-pytorch releases' name for a
            ``[B, D, H, W]`` input, the same as ``channel_first=True`` with a 4-D input.

    ``forward(x)`` takes ``x`` ``[B, ..., D]`` (``[B, D, ...]`` when ``channel_first``), any
    float dtype, and returns ``(quantized, indices, loss)``: ``quantized`` shaped and typed like
    ``x``, ``indices`` int64 ``[B, ...]``, and ``loss`` the float32 scalar::

        commitment_weight * (mean((sg[x] - q)^2) + input_to_quantize_commit_loss_weight * mean((x - sg[q])^2))

    computed in training and eval mode alike, as in vector-quantize-pytorch. The codebook term
    trains ``code_transform``; the frozen codebook never changes.

    The rotation trick is the vector-quantize op's own backward option; its values and gradients
    match vector-quantize-pytorch's ``rotate_to``.

    Raises:
        ValueError: non-positive sizes, negative or non-finite weights, ``init_fn`` or
            ``codebook_transform`` that change the codebook's shape, or an input whose shape
            does not fit (the message shows it).
        TypeError: a non-callable ``init_fn``, a ``codebook_transform`` that is not a module, a
            non-tensor or non-float input.
    """

    @raises_config_error
    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_transform: Optional[nn.Module] = None,
        init_fn: Callable[[Tensor], Tensor] = _identity,
        channel_first: bool = False,
        rotation_trick: bool = True,
        input_to_quantize_commit_loss_weight: float = 0.25,
        commitment_weight: float = 1.0,
        frozen_codebook_dim: Optional[int] = None,
        *,
        accept_image_fmap: bool = False,
    ):
        super().__init__()
        frozen_codebook_dim = dim if frozen_codebook_dim is None else frozen_codebook_dim
        sizes = (("dim", dim), ("codebook_size", codebook_size), ("frozen_codebook_dim", frozen_codebook_dim))
        for name, value in sizes:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (
            ("input_to_quantize_commit_loss_weight", input_to_quantize_commit_loss_weight),
            ("commitment_weight", commitment_weight),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
        if not callable(init_fn):
            raise TypeError(f"init_fn must be callable, got {type(init_fn).__name__}")
        if codebook_transform is not None and not isinstance(codebook_transform, nn.Module):
            raise TypeError(f"codebook_transform must be an nn.Module, got {type(codebook_transform).__name__}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.frozen_codebook_dim = frozen_codebook_dim
        self.channel_first = bool(channel_first or accept_image_fmap)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.rotation_trick = bool(rotation_trick)
        self.input_to_quantize_commit_loss_weight = float(input_to_quantize_commit_loss_weight)
        self.commitment_weight = float(commitment_weight)

        codebook = init_fn(torch.randn(codebook_size, frozen_codebook_dim) * frozen_codebook_dim**-0.5)
        if not isinstance(codebook, Tensor) or tuple(codebook.shape) != (codebook_size, frozen_codebook_dim):
            raise ValueError(
                f"init_fn must return a tensor of shape ({codebook_size}, {frozen_codebook_dim}), "
                f"got {tuple(codebook.shape) if isinstance(codebook, Tensor) else type(codebook).__name__}"
            )
        if codebook_transform is None:
            codebook_transform = nn.Linear(frozen_codebook_dim, dim, bias=False)
        self.code_transform = codebook_transform
        self.register_buffer("frozen_codebook", codebook)

    @property
    def codebook(self) -> Tensor:
        """The implicit codebook ``code_transform(frozen_codebook)``, ``[K, D]``."""
        codebook = self.code_transform(self.frozen_codebook)
        if codebook.shape != (self.codebook_size, self.dim):
            raise ValueError(
                f"codebook_transform must map the frozen codebook [{self.codebook_size}, {self.frozen_codebook_dim}] "
                f"to [{self.codebook_size}, {self.dim}], got shape {tuple(codebook.shape)}"
            )
        return codebook

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """``indices`` int ``[B, ...]`` -> codes ``[B, ..., D]`` (``[B, D, ...]`` when ``channel_first``)."""
        if not isinstance(indices, Tensor) or indices.dtype not in (torch.int64, torch.int32):
            found = indices.dtype if isinstance(indices, Tensor) else type(indices).__name__
            raise TypeError(f"indices must be an int64 or int32 tensor, got {found}")
        codes = self.code_transform(F.embedding(indices.long(), self.frozen_codebook))
        return codes.movedim(-1, 1) if self.channel_first and codes.dim() > 2 else codes

    def _check_input(self, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype} with shape {tuple(x.shape)}")
        if self.accept_image_fmap and (x.dim() != 4 or x.shape[1] != self.dim):
            raise ValueError(
                f"x must be an image feature map [B, {self.dim}, H, W] (accept_image_fmap=True), "
                f"got shape {tuple(x.shape)}"
            )
        axis = 1 if self.channel_first else -1
        if x.dim() < 2 or x.shape[axis] != self.dim:
            layout = "[B, D, ...]" if self.channel_first else "[B, ..., D]"
            raise ValueError(f"x must be {layout} with D = {self.dim}, got shape {tuple(x.shape)}")
        return x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self._check_input(x)
        channels_last = x.movedim(1, -1) if self.channel_first else x
        flat = channels_last.reshape(-1, self.dim)
        weight = self.commitment_weight
        quantized, indices, loss = vector_quantize(
            flat, self.codebook, metric="l2", beta=weight * self.input_to_quantize_commit_loss_weight,
            codebook_weight=weight, rotation_trick=self.rotation_trick,
        )
        quantized = quantized.to(x.dtype).reshape(channels_last.shape)
        if self.channel_first:
            quantized = quantized.movedim(-1, 1)
        return quantized, indices.reshape(channels_last.shape[:-1]), loss
