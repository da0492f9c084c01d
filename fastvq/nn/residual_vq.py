"""Residual vector quantization (vector-quantize-pytorch's ``ResidualVQ``/``GroupedResidualVQ``).

Each layer quantizes what the previous layers left over; the output is the sum of the layers'
codes. Every layer is a fastvq ``VectorQuantize``, so every search, gradient and EMA update runs in
the fused ops. Argument names, defaults and state_dict keys follow vector-quantize-pytorch.
"""

from __future__ import annotations

import random
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import broadcast_from_first
from .vector_quantize import VectorQuantize

# Arguments of vector-quantize-pytorch's ResidualVQ fastvq does not implement, with inert values.
UNSUPPORTED_RESIDUAL_ARGUMENTS = {
    "implicit_neural_codebook": False,
    "mlp_kwargs": {},
    "diveq": False,
    "beam_size": None,
    "eval_beam_size": None,
    "beam_score_quantizer_weights": None,
}


def frac_gradient(tensor: Tensor, fraction: float) -> Tensor:
    """``tensor`` whose gradient is scaled by ``fraction`` (0: detached)."""
    detached = tensor.detach()
    if fraction <= 0:
        return detached
    return fraction * tensor + (1.0 - fraction) * detached


class ResidualVQ(nn.Module):
    """Residual VQ: ``num_quantizers`` VectorQuantize layers applied to successive residuals.

    Args (keyword-only, vector-quantize-pytorch's names):
        dim: input feature dimension.
        num_quantizers: number of layers ``Q`` (or give ``codebook_size`` as a tuple, one size per
            layer).
        codebook_size: codes per layer (int or tuple of ``Q`` ints).
        codebook_dim: code dimension; ``project_in``/``project_out`` map ``dim`` to it and back.
        shared_codebook: one codebook for every layer (statistics from every layer, one EMA
            renormalisation per step).
        heads: must be 1 (as in vector-quantize-pytorch).
        quantize_dropout: in training, drop every layer after a random one (uniform in
            ``[quantize_dropout_cutoff_index, Q)``, rounded up to a multiple of
            ``quantize_dropout_multiple_of`` as in EnCodec); dropped layers give index -1 and
            loss 0. The choice is a device tensor (broadcast from rank 0 under a process group),
            so no host sync: every layer runs and the dropped ones are masked out on the device.
        accept_image_fmap: inputs are ``[B, dim, H, W]``.
        quant_grad_frac: fraction of a layer's output gradient passed back into the next
            residual (0: the residual is detached, vector-quantize-pytorch's default).
        return_zeros_for_masked_padding: masked positions output zeros.
        **vq_kwargs: passed to every ``VectorQuantize`` (decay, commitment_weight, kmeans_init,
            threshold_ema_dead_code, use_cosine_sim, rotation_trick, ...).

    ``forward(x, mask=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized, all_indices [..., Q], all_losses [Q])`` (and ``all_codes [Q, ..., codebook_dim]``
    with ``return_all_codes``).

    Raises:
        ValueError: inconsistent sizes or options; NotImplementedError: an unsupported argument.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: Optional[int] = None,
        codebook_size: Union[int, Sequence[int]],
        codebook_dim: Optional[int] = None,
        shared_codebook: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
        for name, inert in UNSUPPORTED_RESIDUAL_ARGUMENTS.items():
            if name in vq_kwargs:
                value = vq_kwargs.pop(name)
                if value != inert and not (inert is None and value is None):
                    raise NotImplementedError(f"ResidualVQ({name}={value!r}) is not supported by fastvq")
        if heads != 1:
            raise ValueError(f"ResidualVQ needs heads == 1 (as vector-quantize-pytorch), got {heads}")
        sizes = tuple(codebook_size) if isinstance(codebook_size, (tuple, list)) else None
        if num_quantizers is None:
            if sizes is None:
                raise ValueError("give num_quantizers, or codebook_size as a tuple with one size per layer")
            num_quantizers = len(sizes)
        if not isinstance(num_quantizers, int) or num_quantizers < 1:
            raise ValueError(f"num_quantizers must be a positive int, got {num_quantizers!r}")
        sizes = sizes if sizes is not None else (codebook_size,) * num_quantizers
        if len(sizes) != num_quantizers:
            raise ValueError(f"codebook_size has {len(sizes)} entries for {num_quantizers} quantizers")
        if not 0 <= quantize_dropout_cutoff_index < max(num_quantizers, 1):
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}), got {quantize_dropout_cutoff_index}"
            )
        if quantize_dropout_multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {quantize_dropout_multiple_of}")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError("shared_codebook needs one codebook size for every layer")

        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.num_quantizers = num_quantizers
        self.codebook_sizes = sizes
        self.accept_image_fmap = accept_image_fmap
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.quant_grad_frac = check_real("quant_grad_frac", quant_grad_frac, minimum=0.0, maximum=1.0)
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        self.shared_codebook = shared_codebook
        self.layers = nn.ModuleList(
            VectorQuantize(
                dim=codebook_dim,
                codebook_size=size,
                codebook_dim=codebook_dim,
                accept_image_fmap=accept_image_fmap,
                return_zeros_for_masked_padding=return_zeros_for_masked_padding,
                **vq_kwargs,
            )
            for size in sizes
        )
        if shared_codebook:
            shared = self.layers[0]._codebook
            shared.manual_ema_update = True
            for layer in self.layers[1:]:
                layer._codebook = shared

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> Union[Tensor, tuple[Tensor, ...]]:
        """``[Q, K, codebook_dim]`` (a tuple of ``[K_q, codebook_dim]`` when sizes differ)."""
        books = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(books) if len(set(self.codebook_sizes)) == 1 else books

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices [..., q]`` (``q <= Q``; -1 for dropped layers) -> codes ``[Q, ..., codebook_dim]``."""
        depth = indices.shape[-1]
        if depth > self.num_quantizers:
            raise ValueError(f"indices has {depth} layers, the quantizer {self.num_quantizers}")
        if depth < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices for fewer layers need quantize_dropout=True, as in vector-quantize-pytorch")
            pad = indices.new_full((*indices.shape[:-1], self.num_quantizers - depth), -1)
            indices = torch.cat((indices, pad), dim=-1)
        codes = []
        for layer, layer_indices in zip(self.layers, indices.unbind(dim=-1)):
            layer_codes = layer._codebook.embed[0][layer_indices.clamp_min(0)]
            codes.append(layer_codes.masked_fill((layer_indices < 0)[..., None], 0.0))
        return torch.stack(codes)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The output for ``indices``: the sum of the layers' codes, projected out."""
        output = self.project_out(self.get_codes_from_indices(indices).sum(dim=0))
        return output.movedim(-1, 1) if self.accept_image_fmap else output

    def draw_dropout_index(self, device: torch.device) -> Tensor:
        """The last layer kept by quantize dropout, as a device tensor, the same on every rank."""
        index = broadcast_from_first(
            torch.randint(self.quantize_dropout_cutoff_index, self.num_quantizers, (), device=device)
        )
        multiple = self.quantize_dropout_multiple_of
        if multiple != 1:
            index = (index + multiple) // multiple * multiple - 1
        return index

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        indices: Optional[Tensor] = None,
        return_all_codes: bool = False,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: bool = False,
        rand_quantize_dropout_fixed_seed: Optional[int] = None,
    ):
        if indices is not None:
            raise NotImplementedError("ResidualVQ(indices=...) (the cross-entropy loss) is not supported by fastvq")
        dropout_index = None
        if self.training and self.quantize_dropout:
            if rand_quantize_dropout_fixed_seed is not None:
                chosen = random.Random(rand_quantize_dropout_fixed_seed).randrange(
                    self.quantize_dropout_cutoff_index, self.num_quantizers
                )
                multiple = self.quantize_dropout_multiple_of
                chosen = (chosen + multiple) // multiple * multiple - 1 if multiple != 1 else chosen
                dropout_index = torch.tensor(chosen, device=x.device)
            else:
                dropout_index = self.draw_dropout_index(x.device)
        return self.quantize(
            x, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
            freeze_codebook=freeze_codebook, dropout_index=dropout_index,
        )

    def quantize(
        self,
        x: Tensor,
        *,
        mask: Optional[Tensor],
        return_all_codes: bool,
        sample_codebook_temp: Optional[float],
        freeze_codebook: bool,
        dropout_index: Optional[Tensor],
    ):
        """The residual loop; ``dropout_index`` (a device tensor) is the last layer kept."""
        if self.accept_image_fmap:
            x = x.movedim(1, -1)
        residual = self.project_in(x)
        if self.accept_image_fmap:
            residual = residual.movedim(-1, 1)
        quantized_out = torch.zeros_like(residual)
        all_indices, all_losses, layer_inputs = [], [], []
        for depth, layer in enumerate(self.layers):
            active = None if dropout_index is None else depth <= dropout_index
            layer_inputs.append(residual)
            quantized, layer_indices, loss = layer._forward(
                residual,
                mask=mask,
                freeze_codebook=freeze_codebook,
                sample_codebook_temp=sample_codebook_temp,
                active=active,
            )
            residual = residual - frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized_out + quantized
            all_indices.append(layer_indices)
            all_losses.append(loss)
        if self.training and self.shared_codebook and not freeze_codebook:
            self._finish_shared_codebook_step(layer_inputs, mask)
        if self.accept_image_fmap:
            quantized_out = quantized_out.movedim(1, -1)
        quantized_out = self.project_out(quantized_out)
        if self.accept_image_fmap:
            quantized_out = quantized_out.movedim(-1, 1)
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
        all_indices = torch.stack(all_indices, dim=-1)
        all_losses = torch.stack(all_losses)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    @torch.no_grad()
    def _finish_shared_codebook_step(self, layer_inputs: list[Tensor], mask: Optional[Tensor]) -> None:
        """One EMA renormalisation of the shared codebook, then dead-code expiry, as
        vector-quantize-pytorch does after the residual loop (its ``expire_codes_`` reads the
        leading axis of ``[B, N * Q, d]`` as the codebooks', so the rows of the first batch entry
        are the candidates)."""
        shared = self.layers[0]
        if shared._codebook.ema_update:
            shared._codebook.update_ema()
            shared.update_in_place_optimizer()
        rows = torch.stack([_channels_last(t, self.accept_image_fmap) for t in layer_inputs], dim=-2)
        shared.expire_codes_(rows.reshape(rows.shape[0], -1, rows.shape[-1]))


def _channels_last(tensor: Tensor, channels_first: bool) -> Tensor:
    if channels_first:
        tensor = tensor.movedim(1, -1)
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


class GroupedResidualVQ(nn.Module):
    """``groups`` independent ResidualVQs on equal slices of the feature dimension.

    ``GroupedResidualVQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``, kwargs as
    ``ResidualVQ``. ``forward`` returns ``(quantized, all_indices [groups, ..., Q],
    all_losses [groups, Q])``; the groups share one quantize-dropout draw per step.
    """

    def __init__(self, *, dim: int, groups: int = 1, accept_image_fmap: bool = False, **kwargs):
        super().__init__()
        if not isinstance(groups, int) or groups < 1 or dim % groups:
            raise ValueError(f"groups must be a positive int dividing dim = {dim}, got {groups!r}")
        self.dim = dim
        self.groups = groups
        self.accept_image_fmap = accept_image_fmap
        self.rvqs = nn.ModuleList(
            ResidualVQ(dim=dim // groups, accept_image_fmap=accept_image_fmap, **kwargs) for _ in range(groups)
        )

    @property
    def split_dim(self) -> int:
        return 1 if self.accept_image_fmap else -1

    @property
    def codebooks(self) -> Tensor:
        return torch.stack(tuple(rvq.codebooks for rvq in self.rvqs))

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        return torch.stack(tuple(rvq.get_codes_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices)))

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        outputs = tuple(rvq.get_output_from_indices(chunk) for rvq, chunk in zip(self.rvqs, indices))
        return torch.cat(outputs, dim=self.split_dim)

    def forward(
        self,
        x: Tensor,
        indices: Optional[Tensor] = None,
        return_all_codes: bool = False,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: bool = False,
        mask: Optional[Tensor] = None,
    ):
        if indices is not None:
            raise NotImplementedError("GroupedResidualVQ(indices=...) is not supported by fastvq")
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} features on axis {self.split_dim}, got shape {tuple(x.shape)}")
        first = self.rvqs[0]
        dropout_index = first.draw_dropout_index(x.device) if self.training and first.quantize_dropout else None
        outputs = [
            rvq.quantize(
                chunk, mask=mask, return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                freeze_codebook=freeze_codebook, dropout_index=dropout_index,
            )
            for rvq, chunk in zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim))
        ]
        quantized, all_indices, all_losses, *codes = zip(*outputs)
        result = (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(all_losses))
        return result + (torch.stack(codes[0]),) if codes else result
