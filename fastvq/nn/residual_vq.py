"""Residual vector quantization (vector-quantize-pytorch's ``ResidualVQ``/``GroupedResidualVQ``).

Each layer quantizes what the previous layers left over; the output is the sum of the layers'
codes. Every layer is a fastvq ``VectorQuantize``, so every search, gradient and EMA update runs in
the fused ops; beam search runs on the fused top-k search (``nearest_codes``). Arguments, their
order and defaults, return structures and state_dict keys follow vector-quantize-pytorch 1.32.
"""

from __future__ import annotations

import functools
import math
import random
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_real
from .._distributed import all_reduce_sum_, is_distributed
from ..functional import directional_reparam
from ._adopt import build_like
from .errors import raises_config_error
from .vector_quantize import VectorQuantize, vqp_vector_quantize_config

# vector-quantize-pytorch draws the quantize-dropout seed as randint(0, 10 000), summed over ranks.
DROPOUT_SEEDS = 10_000


def frac_gradient(tensor: Tensor, fraction: float) -> Tensor:
    """``tensor`` whose gradient is scaled by ``fraction`` (0: detached)."""
    detached = tensor.detach()
    if fraction <= 0:
        return detached
    return fraction * tensor + (1.0 - fraction) * detached


def round_up_multiple(num: int, multiple: int) -> int:
    return math.ceil(num / multiple) * multiple


def dropout_index_for_seed(seed: int, cutoff: int, num_quantizers: int, multiple: int) -> int:
    """vector-quantize-pytorch's last kept layer for a quantize-dropout seed."""
    index = random.Random(seed).randrange(cutoff, num_quantizers)
    return round_up_multiple(index + 1, multiple) - 1 if multiple != 1 else index


@functools.lru_cache(maxsize=None)
def _dropout_lookup(cutoff: int, num_quantizers: int, multiple: int, num_seeds: int) -> tuple[int, ...]:
    return tuple(dropout_index_for_seed(seed, cutoff, num_quantizers, multiple) for seed in range(num_seeds))


class MLP(nn.Module):
    """QINCo's code-conditioning network (Huijben et al. 2024), vector-quantize-pytorch's ``MLP``
    (same arguments and parameter names): ``proj_in`` on ``[condition, code]``, then ``depth``
    residual ``Linear-SiLU-Linear`` blocks, l2-normalised output with ``l2norm_output``."""

    def __init__(self, dim: int, dim_hidden: Optional[int] = None, depth: int = 4, l2norm_output: bool = False):
        super().__init__()
        dim_hidden = dim if dim_hidden is None else dim_hidden
        self.proj_in = nn.Linear(2 * dim, dim)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim)) for _ in range(depth)
        )
        self.l2norm_output = l2norm_output

    def forward_rows(self, codes: Tensor, condition: Tensor) -> Tensor:
        """The network on aligned pairs: ``codes [..., d]`` and ``condition [..., d]`` (broadcast)."""
        condition, codes = torch.broadcast_tensors(condition, codes)
        x = self.proj_in(torch.cat((condition, codes), dim=-1))
        for layer in self.layers:
            x = layer(x) + x
        return F.normalize(x, dim=-1) if self.l2norm_output else x

    def forward(self, codes: Tensor, *, condition: Tensor) -> Tensor:
        """Every code ``[K, d]`` (or ``[H, K, d]``) under every condition ``[B, ..., d]`` ->
        ``[B, N, K, d]`` (or ``[H, B, N, K, d]``): ``B N K`` rows of the network."""
        one_headed = codes.dim() == 2
        condition = condition.reshape(condition.shape[0], -1, condition.shape[-1])
        if one_headed:
            codes = codes[None]
        out = self.forward_rows(codes[:, None, None], condition[None, :, :, None])
        return out[0] if one_headed else out


class ResidualVQ(nn.Module):
    """Residual VQ (Zeghidour et al. 2021, algorithm 1): ``num_quantizers`` VectorQuantize layers on
    successive residuals; a drop-in for vector-quantize-pytorch's ``ResidualVQ``.

    Args (keyword-only, vector-quantize-pytorch's names, order and defaults):
        dim, num_quantizers (or ``codebook_size`` as a tuple, one size per layer), codebook_size,
        codebook_dim (``project_in``/``project_out`` map ``dim`` to it and back).
        shared_codebook: one codebook for every layer (statistics from every layer, one EMA
            renormalisation per step, then dead-code expiry).
        diveq: DiVeQ (codebooks trained by gradient through a directional reparameterisation of the
            summed output; no EMA, no commitment loss, ``quant_grad_frac`` 1).
        heads: must be 1.
        quantize_dropout, quantize_dropout_cutoff_index, quantize_dropout_multiple_of: in training,
            drop every layer after a random one, drawn as vector-quantize-pytorch draws it (the same
            random numbers), on the device: no host synchronisation.
        accept_image_fmap: inputs are ``[B, dim, H, W]``.
        implicit_neural_codebook, mlp_kwargs: QINCo, each layer after the first searching codes
            transformed by an :class:`MLP` conditioned on the sum of the codes so far.
        beam_size, eval_beam_size, beam_score_quantizer_weights: beam search over the layers: each
            beam's ``beam_size`` nearest codes by the fused top-k search, scored by their summed
            weighted losses; the best ``beam_size`` continue. In training the codebooks are updated
            along the chosen path.
        quant_grad_frac: fraction of a layer's output gradient passed back into the next residual.
        return_zeros_for_masked_padding: masked positions output zeros (else the input).
        **vq_kwargs: passed to every ``VectorQuantize``.

    ``forward(x, mask=None, indices=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, beam_size=None, rand_quantize_dropout_fixed_seed=None)`` returns
    ``(quantized, all_indices [..., Q], all_losses [Q])`` (and ``all_codes [Q, ..., codebook_dim]``
    with ``return_all_codes``); with ``indices`` (a tensor ``[..., Q]`` or a list of ``Q`` tensors)
    ``(quantized, cross_entropy)``: the sum over layers of each layer's cross-entropy of its codes'
    softmax against the given indices (vector-quantize-pytorch 1.32 fails there with a
    ``ValueError``; this is what its layers compute).

    Memory: beam search never builds the ``N x beam x K`` one-hot matrix or the ``N x K`` distances
    vector-quantize-pytorch builds at every layer; its temporaries are ``N x beam^2 x codebook_dim``.
    QINCo's network runs on every (position, code) pair, ``N x K`` rows by construction.

    Raises:
        ValueError: inconsistent sizes or options.
    """

    @raises_config_error
    def __init__(
        self,
        *,
        dim: int,
        num_quantizers: Optional[int] = None,
        codebook_size: Union[int, Sequence[int]],
        codebook_dim: Optional[int] = None,
        shared_codebook: bool = False,
        diveq: bool = False,
        heads: int = 1,
        quantize_dropout: bool = False,
        quantize_dropout_cutoff_index: int = 0,
        quantize_dropout_multiple_of: int = 1,
        accept_image_fmap: bool = False,
        implicit_neural_codebook: bool = False,
        mlp_kwargs: Optional[dict] = None,
        beam_size: Optional[int] = None,
        eval_beam_size: Optional[int] = None,
        beam_score_quantizer_weights: Optional[Sequence[float]] = None,
        quant_grad_frac: float = 0.0,
        return_zeros_for_masked_padding: bool = True,
        **vq_kwargs,
    ):
        super().__init__()
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
        if not 0 <= quantize_dropout_cutoff_index < num_quantizers:
            raise ValueError(
                f"quantize_dropout_cutoff_index must be in [0, {num_quantizers}), got {quantize_dropout_cutoff_index}"
            )
        if quantize_dropout_multiple_of < 1:
            raise ValueError(f"quantize_dropout_multiple_of must be >= 1, got {quantize_dropout_multiple_of}")
        if shared_codebook and len(set(sizes)) != 1:
            raise ValueError("shared_codebook needs one codebook size for every layer")
        if eval_beam_size is not None and beam_size is None:
            raise ValueError("eval_beam_size needs beam_size")
        for name, value in (("beam_size", beam_size), ("eval_beam_size", eval_beam_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        weights = [1.0] * num_quantizers if beam_score_quantizer_weights is None else beam_score_quantizer_weights
        if not isinstance(weights, Sequence) or len(weights) != num_quantizers:
            raise ValueError(f"beam_score_quantizer_weights must be a sequence of {num_quantizers} floats (one per "
                             f"quantizer), got {beam_score_quantizer_weights!r}")
        weights = [check_real("beam_score_quantizer_weights", weight) for weight in weights]

        codebook_dim = dim if codebook_dim is None else codebook_dim
        self.codebook_dim = codebook_dim
        self.has_projections = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if self.has_projections else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if self.has_projections else nn.Identity()
        self.accept_image_fmap = accept_image_fmap
        self.return_zeros_for_masked_padding = return_zeros_for_masked_padding
        vq_kwargs.update(return_zeros_for_masked_padding=return_zeros_for_masked_padding)
        self.implicit_neural_codebook = implicit_neural_codebook
        if implicit_neural_codebook:
            vq_kwargs.update(learnable_codebook=True, ema_update=False)
        if shared_codebook:
            vq_kwargs.update(manual_ema_update=True, manual_in_place_optimizer_update=True)
        self.diveq = diveq
        if diveq:
            vq_kwargs.update(ema_update=False, learnable_codebook=True, route_gradients_to_input=False,
                             commitment_weight=0.0)
        self.num_quantizers = num_quantizers
        self.codebook_sizes = sizes
        self.uniform_codebook_size = len(set(sizes)) == 1
        self.layers = nn.ModuleList(
            VectorQuantize(dim=codebook_dim, codebook_size=size, codebook_dim=codebook_dim,
                           accept_image_fmap=accept_image_fmap, **vq_kwargs)
            for size in sizes
        )
        self.quantize_dropout = quantize_dropout and num_quantizers > 1
        self.quantize_dropout_cutoff_index = quantize_dropout_cutoff_index
        self.quantize_dropout_multiple_of = quantize_dropout_multiple_of
        self.vq_is_ema_updating = self.layers[0].ema_update
        if self.vq_is_ema_updating and diveq:
            raise ValueError("diveq trains the codebooks by gradient: it is not compatible with ema_update=True")
        self.quant_grad_frac = 1.0 if diveq else check_real("quant_grad_frac", quant_grad_frac, minimum=0.0,
                                                                  maximum=1.0)
        self.beam_size = beam_size
        self.eval_beam_size = beam_size if eval_beam_size is None else eval_beam_size
        self.register_buffer("beam_score_weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        if implicit_neural_codebook:
            self.mlps = nn.ModuleList(
                MLP(dim=codebook_dim, l2norm_output=self.layers[0].use_cosine_sim, **(mlp_kwargs or {}))
                for _ in range(num_quantizers - 1)
            )
        else:
            self.mlps = (None,) * (num_quantizers - 1)
        # vector-quantize-pytorch's choice of the last kept layer for every dropout seed: looked up on
        # the device, so the draw needs no host synchronisation.
        # Sized for the process group the layer is built in (the seed is a sum over ranks); a
        # compiled forward cannot rebuild it (20 000 Python draws would be traced), eager can.
        world = torch.distributed.get_world_size() if is_distributed() else 1
        self.register_buffer("dropout_lookup", self._lookup_table(world) if self.quantize_dropout else torch.zeros(0),
                             persistent=False)
        self.shared_codebook = shared_codebook
        if shared_codebook:
            for layer in self.layers[1:]:
                layer._codebook = self.layers[0]._codebook

    @classmethod
    def from_original(cls, original: nn.Module) -> "ResidualVQ":
        """A layer holding the tensors of a live vector-quantize-pytorch ``ResidualVQ`` (the same objects), its
        configuration and training flags, for ``fastvq.swap_quantizers``.

        Raises:
            ValueError: an ``implicit_neural_codebook`` (its MLPs' arguments cannot be read back from them) or
                in-place codebook optimizers (one per level there), or another option this layer would not
                reproduce.
        """
        first = original.layers[0]
        if original.implicit_neural_codebook or first.in_place_codebook_optimizer is not None:
            raise ValueError(
                "ResidualVQ.from_original cannot carry implicit_neural_codebook or in_place_codebook_optimizer: "
                "build fastvq.nn.ResidualVQ with the same arguments and load the original's state_dict instead"
            )
        level_config = vqp_vector_quantize_config(first)
        for name in ("codebook_dim", "accept_image_fmap", "heads", "return_zeros_for_masked_padding"):
            del level_config[name]  # ResidualVQ's own arguments set these for every level
        config = dict(
            num_quantizers=original.num_quantizers,
            codebook_size=tuple(original.codebook_sizes),
            codebook_dim=original.codebook_dim,
            shared_codebook=original.shared_codebook,
            diveq=original.diveq,
            quantize_dropout=original.quantize_dropout,
            quantize_dropout_cutoff_index=original.quantize_dropout_cutoff_index,
            quantize_dropout_multiple_of=original.quantize_dropout_multiple_of,
            accept_image_fmap=original.accept_image_fmap,
            beam_size=original.beam_size,
            eval_beam_size=original.eval_beam_size,
            beam_score_quantizer_weights=original.beam_score_weights.tolist(),
            quant_grad_frac=original.quant_grad_frac,
            return_zeros_for_masked_padding=original.return_zeros_for_masked_padding,
            **level_config,
        )
        dim = original.project_in.in_features if original.has_projections else original.codebook_dim
        return build_like(original, lambda: cls(dim=dim, **config))

    @property
    def codebook_size(self) -> int:
        return self.layers[0].codebook_size

    @property
    def codebooks(self) -> Union[Tensor, tuple[Tensor, ...]]:
        """``[Q, K, codebook_dim]`` (a tuple of ``[K_q, codebook_dim]`` when sizes differ)."""
        books = tuple(layer._codebook.embed[0] for layer in self.layers)
        return torch.stack(books) if self.uniform_codebook_size else books

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices [B, ..., q]`` (``q <= Q`` with quantize dropout; ``-1`` for dropped layers) ->
        codes ``[Q, B, ..., codebook_dim]`` (zeros for dropped layers). QINCo's codes come from
        its networks on the chosen codes only: ``N x Q`` rows, not ``N x K``."""
        depth = indices.shape[-1]
        if depth > self.num_quantizers:
            raise ValueError(f"indices has {depth} layers, the quantizer {self.num_quantizers}")
        if depth < self.num_quantizers:
            if not self.quantize_dropout:
                raise ValueError("indices for fewer layers need quantize_dropout=True, as in vector-quantize-pytorch")
            indices = F.pad(indices, (0, self.num_quantizers - depth), value=-1)
        dropped = indices == -1
        indices = indices.masked_fill(dropped, 0).long()
        books = tuple(layer._codebook.embed[0] for layer in self.layers)
        codes, quantized_out = [], 0.0
        for depth, (book, layer_indices) in enumerate(zip(books, indices.unbind(dim=-1))):
            layer_codes = book[layer_indices]
            if depth and self.implicit_neural_codebook:
                layer_codes = self.mlps[depth - 1].forward_rows(layer_codes, quantized_out)
            codes.append(layer_codes)
            quantized_out = quantized_out + layer_codes
        codes = torch.stack(codes)
        return codes.masked_fill(dropped.movedim(-1, 0)[..., None], 0.0)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The output for ``indices``: the sum of the layers' codes, projected out (channels last,
        as vector-quantize-pytorch returns it, also for image feature maps)."""
        return self.project_out(self.get_codes_from_indices(indices).sum(dim=0))

    # ------------------------------------------------------------------ quantize dropout

    def _lookup_table(self, world: int) -> Tensor:
        table = _dropout_lookup(self.quantize_dropout_cutoff_index, self.num_quantizers,
                                self.quantize_dropout_multiple_of, DROPOUT_SEEDS * world)
        return torch.tensor(table, dtype=torch.int64)

    def draw_dropout_seed(self, device: torch.device) -> Tensor:
        """vector-quantize-pytorch's quantize-dropout seed, ``randint(0, 10 000)`` summed over ranks,
        as a device tensor (theirs reads it back to the host)."""
        return all_reduce_sum_(torch.randint(0, DROPOUT_SEEDS, (), device=device))

    def dropout_index(self, seed: Union[int, Tensor], device: torch.device) -> Union[int, Tensor]:
        """The last layer kept for a seed: a Python int for an int seed, a device tensor for a
        tensor one (looked up in a table of vector-quantize-pytorch's choice for every seed)."""
        if isinstance(seed, Tensor):
            world = torch.distributed.get_world_size() if is_distributed() else 1
            if self.dropout_lookup.shape[0] != DROPOUT_SEEDS * world:
                if torch.compiler.is_compiling():
                    raise RuntimeError(
                        f"ResidualVQ was built for {self.dropout_lookup.shape[0] // DROPOUT_SEEDS} process(es) but "
                        f"runs in a group of {world}: under torch.compile, build the layer after "
                        "init_process_group (or run one eager forward first) so its quantize-dropout table fits")
                self.dropout_lookup = self._lookup_table(world).to(device)
            return self.dropout_lookup.gather(0, seed.reshape(1)).reshape(())
        return dropout_index_for_seed(seed, self.quantize_dropout_cutoff_index, self.num_quantizers,
                                      self.quantize_dropout_multiple_of)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        mask: Optional[Tensor] = None,
        indices: Union[Tensor, list[Tensor], None] = None,
        return_all_codes: bool = False,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: bool = False,
        beam_size: Optional[int] = None,
        rand_quantize_dropout_fixed_seed: Optional[int] = None,
    ):
        seed = rand_quantize_dropout_fixed_seed
        if self.training and self.quantize_dropout and indices is None and seed is None:
            seed = self.draw_dropout_seed(x.device)
        return self._forward(x, mask=mask, indices=indices, return_all_codes=return_all_codes,
                             sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                             beam_size=beam_size, dropout_seed=seed)

    def _forward(self, x: Tensor, *, mask, indices, return_all_codes, sample_codebook_temp, freeze_codebook,
                 beam_size, dropout_seed):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        beam_size = (self.beam_size if self.training else self.eval_beam_size) if beam_size is None else beam_size
        if beam_size is not None and (isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1):
            raise ValueError(f"beam_size must be a positive int or None, got {beam_size!r}")
        if isinstance(indices, (list, tuple)):
            indices = torch.stack(list(indices), dim=-1)
        if indices is not None:
            return self._cross_entropy(x, mask, indices, sample_codebook_temp, freeze_codebook)
        dropout_index = None
        if self.training and self.quantize_dropout and dropout_seed is not None:
            dropout_index = self.dropout_index(dropout_seed, x.device)
        if beam_size is not None and beam_size > 1:
            if isinstance(dropout_index, Tensor):
                dropout_index = int(dropout_index)  # the beam's bookkeeping is host-side anyway
            quantized_out, all_indices, all_losses = self._beam_search(
                x, mask, beam_size, sample_codebook_temp, freeze_codebook, dropout_index)
        else:
            quantized_out, all_indices, all_losses = self._residual_loop(
                x, mask, sample_codebook_temp, freeze_codebook, dropout_index)
        if not return_all_codes:
            return quantized_out, all_indices, all_losses
        return quantized_out, all_indices, all_losses, self.get_codes_from_indices(all_indices)

    def _channels_last(self, tensor: Tensor) -> Tensor:
        return tensor.movedim(1, -1) if self.accept_image_fmap else tensor

    def _channels_first(self, tensor: Tensor) -> Tensor:
        return tensor.movedim(-1, 1) if self.accept_image_fmap else tensor

    def _qinco(self, depth: int, quantized_out: Tensor):
        """The codebook transform of layer ``depth`` (QINCo): ``[1, K, d] -> [1, B, N, K, d]``."""
        if depth == 0 or not self.implicit_neural_codebook:
            return None
        return functools.partial(self.mlps[depth - 1], condition=self._channels_last(quantized_out))

    def _finish(self, x: Tensor, projected: Tensor, quantized_out: Tensor, mask: Optional[Tensor]) -> Tensor:
        """DiVeQ's reparameterisation, ``project_out`` and the masked positions, in the input's layout."""
        quantized_out = self._channels_last(quantized_out)
        if self.diveq:
            quantized_out = directional_reparam(projected, quantized_out)
        quantized_out = self._channels_first(self.project_out(quantized_out))
        if mask is not None:
            fill = torch.zeros_like(quantized_out) if self.return_zeros_for_masked_padding else x
            quantized_out = torch.where(mask[..., None], quantized_out, fill)
        return quantized_out

    def _residual_loop(self, x, mask, sample_codebook_temp, freeze_codebook, dropout_index):
        projected = self.project_in(self._channels_last(x))
        residual = self._channels_first(projected)
        quantized_out = torch.zeros_like(residual)
        all_indices, all_losses, layer_inputs = [], [], []
        for depth, layer in enumerate(self.layers):
            if isinstance(dropout_index, int) and depth > dropout_index:
                all_indices.append(all_indices[-1].new_full(all_indices[-1].shape, -1))
                all_losses.append(torch.zeros_like(all_losses[-1]))
                continue
            active = depth <= dropout_index if isinstance(dropout_index, Tensor) else None
            layer_inputs.append((residual, active))
            quantized, layer_indices, loss = layer(
                residual, mask=mask, sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                codebook_transform_fn=self._qinco(depth, quantized_out), active=active,
            )
            residual = residual - frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized_out + quantized
            all_indices.append(layer_indices)
            all_losses.append(loss)
        if self.training and self.shared_codebook and not freeze_codebook:
            self._finish_shared_codebook_step(layer_inputs)
        return (self._finish(x, projected, quantized_out, mask), torch.stack(all_indices, dim=-1),
                torch.stack(all_losses))

    def _cross_entropy(self, x, mask, indices, sample_codebook_temp, freeze_codebook):
        """``forward(indices=...)``: each layer's cross-entropy against its given codes, the residual
        following the layer's own quantized output, as the layers of vector-quantize-pytorch compute it."""
        if self.accept_image_fmap:
            raise ValueError("indices (the cross-entropy loss) are not accepted with accept_image_fmap=True")
        if indices.shape[-1] != self.num_quantizers:
            raise ValueError(f"indices must end in {self.num_quantizers} layers, got shape {tuple(indices.shape)}")
        if bool((indices == -1).any()):
            raise ValueError("some of the residual vq indices were dropped out (-1); derive the indices in eval mode")
        projected = self.project_in(x)
        residual, quantized_out, losses = projected, torch.zeros_like(projected), []
        for depth, layer in enumerate(self.layers):
            quantized, loss = layer(residual, mask=mask, indices=indices[..., depth],
                                    sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                                    codebook_transform_fn=self._qinco(depth, quantized_out))
            quantized = quantized.reshape(residual.shape)
            residual = residual - frac_gradient(quantized, self.quant_grad_frac)
            quantized_out = quantized_out + quantized
            losses.append(loss)
        return self._finish(x, projected, quantized_out, mask), sum(losses)

    def _beam_search(self, x, mask, beam_size, sample_codebook_temp, freeze_codebook, dropout_index):
        """Beam search over the layers on the fused top-k search: every position keeps its best
        ``beam_size`` partial paths, scored by ``-sum_q w_q loss_q``; each extends by its
        ``beam_size`` nearest codes at the next layer, and the best ``beam_size`` of the
        ``beam_size^2`` continue (one at the last layer)."""
        projected = self.project_in(self._channels_last(x))
        spatial = projected.shape[:-1]
        rows = projected.reshape(-1, projected.shape[-1])
        positions = rows.shape[0]
        position_mask = None if mask is None else mask.reshape(-1)
        residual = rows[:, None]  # [P, beams, d]
        quantized_out = torch.zeros_like(residual)
        scores = rows.new_zeros(positions, 1)
        path_indices = rows.new_zeros((positions, 1, 0), dtype=torch.int64)
        path_losses = rows.new_zeros((positions, 1, 0))
        path_inputs = rows.new_zeros((positions, 1, 0, rows.shape[-1]))
        kept = 0
        for depth, layer in enumerate(self.layers):
            if dropout_index is not None and depth > dropout_index:
                path_indices = F.pad(path_indices, (0, 1), value=-1)
                path_losses = F.pad(path_losses, (0, 1), value=0.0)
                continue
            kept += 1
            last = depth == (self.num_quantizers - 1 if dropout_index is None else dropout_index)
            beams = residual.shape[1]
            path_inputs = torch.cat((path_inputs, residual[:, :, None]), dim=2)
            beam_mask = None if position_mask is None else position_mask[:, None].expand(-1, beams)
            transform = None
            if depth and self.implicit_neural_codebook:
                transform = functools.partial(self.mlps[depth - 1], condition=quantized_out)
            quantized, layer_indices, loss, _ = layer._topk_sequence(
                residual, beam_mask, beam_size, input_requires_grad=residual.requires_grad,
                sample_codebook_temp=sample_codebook_temp, freeze_codebook=freeze_codebook,
                codebook_transform_fn=transform,
            )
            width = quantized.shape[2]
            loss = loss.expand(positions, beams, width) if loss.dim() == 0 else loss
            scores = (scores[:, :, None] - loss * self.beam_score_weights[depth]).reshape(positions, -1)
            residual = (residual[:, :, None] - frac_gradient(quantized, self.quant_grad_frac)).reshape(positions, -1,
                                                                                                       rows.shape[-1])
            quantized_out = (quantized_out[:, :, None] + quantized).reshape(residual.shape)
            path_inputs = path_inputs.repeat_interleave(width, dim=1)
            path_indices = torch.cat((path_indices.repeat_interleave(width, dim=1),
                                      layer_indices.reshape(positions, -1, 1)), dim=-1)
            path_losses = torch.cat((path_losses.repeat_interleave(width, dim=1), loss.reshape(positions, -1, 1)),
                                    dim=-1)
            keep = 1 if last else beam_size
            if scores.shape[1] > keep:
                scores, chosen = scores.topk(keep, dim=-1)
                residual, quantized_out = _select(residual, chosen), _select(quantized_out, chosen)
                path_indices, path_losses = _select(path_indices, chosen), _select(path_losses, chosen)
                path_inputs = _select(path_inputs, chosen)
        quantized_out, path_indices, path_losses = quantized_out[:, 0], path_indices[:, 0], path_losses[:, 0]
        path_inputs = path_inputs[:, 0]
        if position_mask is not None:
            losses = (torch.where(position_mask[:, None], path_losses, 0.0).sum(dim=0)
                      / position_mask.sum().clamp_min(1e-4))
        else:
            losses = path_losses.mean(dim=0)
        if self.training:
            for depth in range(kept):
                layer_input = self._channels_first(path_inputs[:, depth].reshape(*spatial, -1))
                self.layers[depth].update_indices(layer_input, path_indices[:, depth].reshape(spatial), mask=mask)
            if self.shared_codebook and not freeze_codebook:
                inputs = [(self._channels_first(path_inputs[:, depth].reshape(*spatial, -1)), None)
                          for depth in range(kept)]
                self._finish_shared_codebook_step(inputs)
        quantized_out = self._channels_first(quantized_out.reshape(*spatial, -1))
        return self._finish(x, projected, quantized_out, mask), path_indices.reshape(*spatial, -1), losses

    @torch.no_grad()
    def _finish_shared_codebook_step(self, layer_inputs: list[tuple[Tensor, Optional[Tensor]]]) -> None:
        """One EMA renormalisation of the shared codebook and one in-place optimizer step, then
        dead-code expiry, as vector-quantize-pytorch does after the residual loop. Its
        ``expire_codes_`` reads the leading axis of ``[B, N * Q, d]`` as the codebooks', so the rows of
        the first batch entry (positions by layers) are the candidates; layers dropped out on the
        device are masked out of them."""
        shared = self.layers[0]
        if self.vq_is_ema_updating:
            shared._codebook.update_ema()
            shared.update_in_place_optimizer()
        rows = torch.stack([self._channels_last(t)[0].reshape(-1, t.shape[1 if self.accept_image_fmap else -1])
                            for t, _ in layer_inputs], dim=1)
        actives = [active for _, active in layer_inputs]
        valid = None
        if any(active is not None for active in actives):
            valid = torch.stack([torch.ones((), dtype=torch.bool, device=rows.device) if a is None else a
                                 for a in actives]).expand(rows.shape[0], -1).reshape(1, -1)
        shared._codebook.expire_codes_(shared._codebook.transform_input(rows.reshape(1, -1, rows.shape[-1])),
                                       seq_mask=valid)


def _select(tensor: Tensor, chosen: Tensor) -> Tensor:
    """``tensor [P, beams, ...]`` at the beams ``chosen [P, keep]``."""
    index = chosen.reshape(*chosen.shape, *([1] * (tensor.dim() - 2))).expand(*chosen.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


class GroupedResidualVQ(nn.Module):
    """``groups`` independent ResidualVQs on equal slices of the feature dimension
    (vector-quantize-pytorch's ``GroupedResidualVQ``).

    ``GroupedResidualVQ(*, dim, groups=1, accept_image_fmap=False, **kwargs)``, kwargs as
    ``ResidualVQ``. ``forward(x, indices=None, return_all_codes=False, sample_codebook_temp=None,
    freeze_codebook=False, mask=None)`` returns ``(quantized, all_indices [groups, ..., Q],
    all_losses [groups, Q])`` (plus the codes); with ``indices`` (one per group) ``(quantized,
    summed cross-entropy)``. In training one quantize-dropout seed is drawn per step for every group.
    """

    @raises_config_error
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
        indices: Optional[Sequence[Tensor]] = None,
        return_all_codes: bool = False,
        sample_codebook_temp: Optional[float] = None,
        freeze_codebook: bool = False,
        mask: Optional[Tensor] = None,
    ):
        if x.shape[self.split_dim] != self.dim:
            raise ValueError(f"x must have {self.dim} features on axis {self.split_dim}, got shape {tuple(x.shape)}")
        indices = () if indices is None else tuple(indices)
        if indices and len(indices) != self.groups:
            raise ValueError(f"indices must hold one tensor per group ({self.groups}), got {len(indices)}")
        # vector-quantize-pytorch draws the seed in every training step, whether or not it drops layers.
        seed = self.rvqs[0].draw_dropout_seed(x.device) if self.training else None
        outputs = [
            rvq._forward(chunk, mask=mask, indices=indices[group] if indices else None,
                         return_all_codes=return_all_codes, sample_codebook_temp=sample_codebook_temp,
                         freeze_codebook=freeze_codebook, beam_size=None, dropout_seed=seed)
            for group, (rvq, chunk) in enumerate(zip(self.rvqs, x.chunk(self.groups, dim=self.split_dim)))
        ]
        if indices:
            quantized, losses = zip(*outputs)
            return torch.cat(quantized, dim=self.split_dim), sum(losses)
        quantized, all_indices, all_losses, *codes = zip(*outputs)
        result = (torch.cat(quantized, dim=self.split_dim), torch.stack(all_indices), torch.stack(all_losses))
        return result + (torch.stack(codes[0]),) if codes else result
