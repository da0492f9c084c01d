"""``ResidualSimVQ``: vector-quantize-pytorch's residual quantizer on :class:`~fastvq.nn.SimVQ`
layers (each layer's search and losses are one fused ``fastvq.functional.vector_quantize`` call,
so no layer builds an ``N x K`` matrix). Names, arguments, defaults, return structure and
state_dict keys are vector-quantize-pytorch 1.32's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._residual import QuantizeDropout, check_dropout_arguments, codes_from_indices, drop_layer
from .errors import raises_config_error
from .fsq import check_float_input
from .simvq import SimVQ

__all__ = ["ResidualSimVQ"]


class ResidualSimVQ(QuantizeDropout, nn.Module):
    """Residual SimVQ, a drop-in for vector-quantize-pytorch's ``ResidualSimVQ``.

    Args (keyword-only): ``dim, num_quantizers, codebook_size, heads=1 (must be 1),
    quantize_dropout=False, quantize_dropout_cutoff_index=0, quantize_dropout_multiple_of=1,
    channel_first=False, rotation_trick=True, **sim_vq_kwargs`` (``codebook_transform``,
    ``init_fn``, ``input_to_quantize_commit_loss_weight``, ``commitment_weight``,
    ``frozen_codebook_dim``, passed to every layer). Quantize dropout (in training) is drawn on the
    device, see ``fastvq.nn._residual``.

    ``forward(x, return_all_codes=False, rand_quantize_dropout_fixed_seed=None)`` takes
    ``[B, ..., dim]`` (``[B, dim, ...]`` channel first) and returns ``(quantized, all_indices
    [B, ..., Q], all_losses [Q])`` (plus ``all_codes [Q, B, ..., dim]``, ``[Q, B, dim, ...]``
    channel first); a dropped layer gives index -1 and loss 0.
    """

    dropout_needs_grad = False  # vector-quantize-pytorch's ResidualSimVQ drops out under no_grad too

    @raises_config_error
    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: int,
        codebook_size: int,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        channel_first: bool = False,
        rotation_trick: bool = True,
        **sim_vq_kwargs,
    ):
        super().__init__()
        if heads != 1:
            raise ValueError(f"ResidualSimVQ is not compatible with multi-headed codes (heads must be 1), got {heads}")
        check_dropout_arguments("ResidualSimVQ", num_quantizers, quantize_dropout_cutoff_index,
                                quantize_dropout_multiple_of)
        self.channel_first = channel_first
        self.num_quantizers = num_quantizers
        self.layers = nn.ModuleList(
            SimVQ(dim=dim, codebook_size=codebook_size, rotation_trick=rotation_trick, channel_first=channel_first,
                  **sim_vq_kwargs)
            for _ in range(num_quantizers)
        )
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebook_dim(self) -> int:
        return self.layers[0].dim

    @property
    def codebooks(self) -> Tensor:
        """``[Q, K, dim]``: every layer's implicit codebook."""
        return torch.stack([layer.codebook for layer in self.layers])

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices [B, ..., q]`` -> codes ``[Q, B, ..., dim]`` (``[Q, B, dim, ...]`` channel first)."""
        codes = codes_from_indices(self.codebooks, indices, quantize_dropout=self.quantize_dropout)
        return codes.movedim(-1, 2) if self.channel_first else codes

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        return self.get_codes_from_indices(indices).sum(dim=0)

    def forward(
        self, x: Tensor, return_all_codes: bool = False, rand_quantize_dropout_fixed_seed: Optional[int] = None
    ):
        x = check_float_input(x)
        dropout_index = self.dropout_index(x, rand_quantize_dropout_fixed_seed)
        quantized_out = torch.zeros_like(x)
        residual = x
        all_indices, all_losses = [], []
        for depth, layer in enumerate(self.layers):
            quantized, indices, loss = drop_layer(depth, dropout_index, *layer(residual))
            residual = residual - quantized.detach()
            quantized_out = quantized_out + quantized
            all_indices.append(indices)
            all_losses.append(loss)
        all_indices, all_losses = torch.stack(all_indices, dim=-1), torch.stack(all_losses, dim=-1)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)
