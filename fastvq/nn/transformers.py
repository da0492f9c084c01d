"""Hugging Face transformers' audio-codec quantizers (EnCodec, Mimi, DAC) on fastvq's search.

Each class has the name, constructor (``config``, an object with the config's attributes), attribute names,
state_dict keys and ``encode``/``decode``/``forward`` signatures and returns of its namesake in
``transformers.models.{encodec,mimi,dac}``; its ``from_original(module)`` builds one that holds a live Hugging Face
module's very tensors (see ``fastvq.swap_quantizers``). Hugging Face computes every level's full ``N x K`` distance
matrix (a matmul or ``torch.cdist``) and takes its arg-max; here each level is one ``fastvq.nearest_code`` call,
which never builds it, and a residual quantizer walks its levels on the flattened frames once.

Hugging Face's ports are inference code: EnCodec's and Mimi's codebooks have no forward and no EMA update (their
buffers ``cluster_size``/``embed_avg`` and ``cluster_usage``/``embed_sum`` are only loaded), so neither has any
here; DAC's quantizer trains by gradient (commitment and codebook losses, straight-through, per-sample quantizer
dropout), and so does this one, drawing its dropout from PyTorch's RNG exactly as Hugging Face does.

Differences, stated rather than hidden:

- codes are the nearest ones by fastvq's search contract (fp32 accumulation, exact distances, ties to the lowest
  index); they equal Hugging Face's except where two codes are within float rounding of each other (Hugging Face
  ranks DAC's codes by ``2 e.c + |c|^2`` of l2-normalised vectors, whose ``|c|^2`` differs from 1 by rounding);
- Mimi's ``embed`` is ``embed_sum / cluster_usage`` of the current buffers on every call; Hugging Face caches it
  on first use, so a state loaded after that first call is ignored there;
- ``DacResidualVectorQuantizer.from_latents`` counts its codebooks without numpy.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.search import nearest_code
from ._adopt import shell

__all__ = [
    "EncodecEuclideanCodebook",
    "EncodecVectorQuantization",
    "EncodecResidualVectorQuantizer",
    "MimiEuclideanCodebook",
    "MimiVectorQuantization",
    "MimiResidualVectorQuantizer",
    "MimiSplitResidualVectorQuantizer",
    "DacVectorQuantize",
    "DacResidualVectorQuantizer",
]


def _check_frames(name: str, value: object, channels: int) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        found = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name} must be a floating-point tensor [batch, {channels}, time], got {found}")
    if value.dim() != 3 or value.shape[1] != channels:
        raise ValueError(f"{name} must be shaped [batch, {channels}, time], got {tuple(value.shape)}")
    return value


def _check_codes(name: str, value: object, rank: int = 3) -> Tensor:
    if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        found = value.dtype if isinstance(value, Tensor) else type(value).__name__
        raise TypeError(f"{name} must be an integer tensor, got {found}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(value.shape)}")
    return value


def _residual_encode(frames: Tensor, codebooks: list[Tensor]) -> Tensor:
    """Greedy residual codes of ``frames [B, D, T]`` over ``codebooks`` (each ``[K, D]``) -> ``[L, B, T]``.

    The frames are flattened once and each level's codes come back gathered from its search, so no level
    re-gathers them through ``decode``; the residual is updated as Hugging Face does, ``residual - code``.
    """
    batch, dim, time = frames.shape
    residual = frames.transpose(1, 2).reshape(batch * time, dim)
    levels = []
    for codebook in codebooks:
        indices, _, codes = nearest_code(residual, codebook, metric="l2", return_codes=True)
        residual = residual - codes
        levels.append(indices.view(batch, time))
    if not levels:
        return torch.empty(0, batch, time, dtype=torch.int64, device=frames.device)
    return torch.stack(levels)


# --------------------------------------------------------------------------- EnCodec


class EncodecEuclideanCodebook(nn.Module):
    """``transformers.models.encodec.modeling_encodec.EncodecEuclideanCodebook``: codes ``embed [K, D]``.

    Buffers (all in the state_dict, loaded, never updated): ``inited [1]``, ``cluster_size [K]``,
    ``embed [K, D]``, ``embed_avg [K, D]``.
    """

    def __init__(self, config: Any):
        super().__init__()
        embed = torch.zeros(config.codebook_size, config.codebook_dim)
        self.codebook_size = config.codebook_size
        self.register_buffer("inited", torch.tensor([1.0]))
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())

    @classmethod
    def from_original(cls, original: nn.Module) -> "EncodecEuclideanCodebook":
        return shell(cls, original, ("codebook_size",))

    def quantize(self, hidden_states: Tensor) -> Tensor:
        """``[N, D]`` -> int64 ``[N]``, each row's nearest code by squared Euclidean distance."""
        return nearest_code(hidden_states, self.embed, metric="l2")[0]

    def encode(self, hidden_states: Tensor) -> Tensor:
        """``[..., D]`` -> int64 ``[...]``."""
        shape = hidden_states.shape
        return self.quantize(hidden_states.reshape(-1, shape[-1])).view(*shape[:-1])

    def decode(self, embed_ind: Tensor) -> Tensor:
        """int ``[...]`` -> ``[..., D]`` codes."""
        return F.embedding(embed_ind, self.embed)


class EncodecVectorQuantization(nn.Module):
    """``EncodecVectorQuantization``: one level, channels first (``[B, D, T]`` <-> ``[B, T]``)."""

    codebook_class = EncodecEuclideanCodebook

    def __init__(self, config: Any):
        super().__init__()
        self.codebook = self.codebook_class(config)

    @classmethod
    def from_original(cls, original: nn.Module) -> "EncodecVectorQuantization":
        module = shell(cls, original)
        module.codebook = cls.codebook_class.from_original(original.codebook)
        return module

    def encode(self, hidden_states: Tensor) -> Tensor:
        return self.codebook.encode(hidden_states.permute(0, 2, 1))

    def decode(self, embed_ind: Tensor) -> Tensor:
        return self.codebook.decode(embed_ind).permute(0, 2, 1)


def _layers_from_original(layer_class: type, original: nn.ModuleList) -> nn.ModuleList:
    layers = shell(nn.ModuleList, original)
    for index, layer in enumerate(original):
        layers.add_module(str(index), layer_class.from_original(layer))
    return layers


class EncodecResidualVectorQuantizer(nn.Module):
    """``EncodecResidualVectorQuantizer``: ``config.num_quantizers`` levels, chosen by bandwidth.

    ``encode(embeddings [B, D, T], bandwidth=None)`` -> int64 codes ``[L, B, T]`` with ``L`` the number of
    levels that fit ``bandwidth`` kbps (all when None or <= 0); ``decode(codes [L, B, T])`` -> ``[B, D, T]``.

    Raises:
        TypeError, ValueError: ``embeddings`` not a float ``[B, D, T]``, codes not an integer ``[L, B, T]``.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.frame_rate = config.frame_rate
        self.num_quantizers = config.num_quantizers
        self.layers = nn.ModuleList([EncodecVectorQuantization(config) for _ in range(config.num_quantizers)])

    @classmethod
    def from_original(cls, original: nn.Module) -> "EncodecResidualVectorQuantizer":
        module = shell(cls, original, ("codebook_size", "frame_rate", "num_quantizers"))
        module.layers = _layers_from_original(EncodecVectorQuantization, original.layers)
        return module

    def get_num_quantizers_for_bandwidth(self, bandwidth: Optional[float] = None) -> int:
        """The levels that ``bandwidth`` kbps pays for, at least 1; all of them when None or <= 0."""
        bits_per_level = math.log2(self.codebook_size) * self.frame_rate
        if bandwidth is not None and bandwidth > 0.0:
            return int(max(1, math.floor(bandwidth * 1000 / bits_per_level)))
        return self.num_quantizers

    def encode(self, embeddings: Tensor, bandwidth: Optional[float] = None) -> Tensor:
        embeddings = _check_frames("embeddings", embeddings, self.layers[0].codebook.embed.shape[1])
        levels = self.layers[: self.get_num_quantizers_for_bandwidth(bandwidth)]
        return _residual_encode(embeddings, [layer.codebook.embed for layer in levels])

    def decode(self, codes: Tensor) -> Tensor:
        codes = _check_codes("codes", codes)
        quantized_out = torch.full((), 0.0, device=codes.device)
        for layer, indices in zip(self.layers, codes):
            quantized_out = quantized_out + layer.decode(indices)
        return quantized_out


# --------------------------------------------------------------------------- Mimi


class MimiEuclideanCodebook(nn.Module):
    """``transformers.models.mimi.modeling_mimi.MimiEuclideanCodebook``: codes ``embed_sum / cluster_usage``.

    Buffers (all in the state_dict): ``initialized [1]``, ``cluster_usage [K]``, ``embed_sum [K, D]``; the codes
    ``embed`` are derived from them on every access (``cluster_usage`` clamped at ``epsilon``).
    """

    def __init__(self, config: Any, epsilon: float = 1e-5):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.register_buffer("initialized", torch.tensor([True], dtype=torch.float32))
        self.register_buffer("cluster_usage", torch.ones(config.codebook_size))
        self.register_buffer("embed_sum", torch.zeros(config.codebook_size, config.codebook_dim))
        self.epsilon = epsilon

    @classmethod
    def from_original(cls, original: nn.Module) -> "MimiEuclideanCodebook":
        return shell(cls, original, ("codebook_size", "epsilon"))

    @property
    def embed(self) -> Tensor:
        return self.embed_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    def quantize(self, hidden_states: Tensor) -> Tensor:
        """``[N, D]`` -> int64 ``[N]``, the nearest code in float32 (as Hugging Face's ``cdist`` of ``.float()``)."""
        return nearest_code(hidden_states.float(), self.embed.float(), metric="l2")[0]

    def encode(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape
        return self.quantize(hidden_states.reshape(-1, shape[-1])).view(*shape[:-1])

    def decode(self, embed_ind: Tensor) -> Tensor:
        return F.embedding(embed_ind, self.embed)


class MimiVectorQuantization(EncodecVectorQuantization):
    """``MimiVectorQuantization``: one level, channels first."""

    codebook_class = MimiEuclideanCodebook


class MimiResidualVectorQuantizer(nn.Module):
    """``MimiResidualVectorQuantizer``: ``num_quantizers`` levels (default ``config.num_quantizers``) between
    optional 1x1 projections ``input_proj``/``output_proj`` (when ``vector_quantization_hidden_dimension`` differs
    from ``hidden_size``).

    ``encode(embeddings [B, hidden_size, T], num_quantizers=None)`` -> int64 ``[L, B, T]``;
    ``decode(codes [B, L, T])`` -> ``[B, hidden_size, T]`` (note the two layouts, as in Hugging Face).
    """

    def __init__(self, config: Any, num_quantizers: Optional[int] = None):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.frame_rate = config.frame_rate
        self.num_quantizers = num_quantizers if num_quantizers is not None else config.num_quantizers
        self.layers = nn.ModuleList([MimiVectorQuantization(config) for _ in range(self.num_quantizers)])
        self.input_proj = None
        self.output_proj = None
        if config.vector_quantization_hidden_dimension != config.hidden_size:
            self.input_proj = nn.Conv1d(config.hidden_size, config.vector_quantization_hidden_dimension, 1, bias=False)
            self.output_proj = nn.Conv1d(config.vector_quantization_hidden_dimension, config.hidden_size, 1, bias=False)

    @classmethod
    def from_original(cls, original: nn.Module) -> "MimiResidualVectorQuantizer":
        module = shell(cls, original, ("codebook_size", "frame_rate", "num_quantizers"))
        module.layers = _layers_from_original(MimiVectorQuantization, original.layers)
        module.input_proj = original.input_proj
        module.output_proj = original.output_proj
        return module

    def encode(self, embeddings: Tensor, num_quantizers: Optional[int] = None) -> Tensor:
        code_dim = self.layers[0].codebook.embed_sum.shape[1]
        channels = self.input_proj.in_channels if self.input_proj is not None else code_dim
        embeddings = _check_frames("embeddings", embeddings, channels)
        if self.input_proj is not None:
            embeddings = self.input_proj(embeddings)
        num_quantizers = num_quantizers if num_quantizers is not None else self.num_quantizers
        return _residual_encode(embeddings, [layer.codebook.embed for layer in self.layers[:num_quantizers]])

    def decode(self, codes: Tensor) -> Tensor:
        codes = _check_codes("codes", codes)
        quantized_out = torch.full((), 0.0, device=codes.device)
        for layer, indices in zip(self.layers, codes.transpose(0, 1)):
            quantized_out = quantized_out + layer.decode(indices)
        if self.output_proj is not None:
            quantized_out = self.output_proj(quantized_out)
        return quantized_out


class MimiSplitResidualVectorQuantizer(nn.Module):
    """``MimiSplitResidualVectorQuantizer``: ``num_semantic_quantizers`` semantic levels, then acoustic ones,
    each a :class:`MimiResidualVectorQuantizer` over the same input.

    ``encode(embeddings, num_quantizers=None)`` -> ``[L, B, T]``; ``decode(codes [B, L, T])``.

    Raises:
        ValueError: ``num_quantizers`` above the total or below the semantic levels (Hugging Face's messages).
    """

    def __init__(self, config: Any):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.frame_rate = config.frame_rate
        self.max_num_quantizers = config.num_quantizers
        self.num_semantic_quantizers = config.num_semantic_quantizers
        self.num_acoustic_quantizers = config.num_quantizers - config.num_semantic_quantizers
        self.semantic_residual_vector_quantizer = MimiResidualVectorQuantizer(config, self.num_semantic_quantizers)
        self.acoustic_residual_vector_quantizer = MimiResidualVectorQuantizer(config, self.num_acoustic_quantizers)

    @classmethod
    def from_original(cls, original: nn.Module) -> "MimiSplitResidualVectorQuantizer":
        attributes = (
            "codebook_size", "frame_rate", "max_num_quantizers", "num_semantic_quantizers", "num_acoustic_quantizers"
        )
        module = shell(cls, original, attributes)
        for name in ("semantic_residual_vector_quantizer", "acoustic_residual_vector_quantizer"):
            setattr(module, name, MimiResidualVectorQuantizer.from_original(getattr(original, name)))
        return module

    def encode(self, embeddings: Tensor, num_quantizers: Optional[float] = None) -> Tensor:
        num_quantizers = self.max_num_quantizers if num_quantizers is None else num_quantizers
        if num_quantizers > self.max_num_quantizers:
            raise ValueError(
                "The number of quantizers (i.e codebooks) asked should be lower than the total number of quantizers "
                f"{self.max_num_quantizers}, but is currently {num_quantizers}."
            )
        if num_quantizers < self.num_semantic_quantizers:
            raise ValueError(
                "The number of quantizers (i.e codebooks) asked should be higher than the number of semantic "
                f"quantizers {self.num_semantic_quantizers}, but is currently {num_quantizers}."
            )
        codes = self.semantic_residual_vector_quantizer.encode(embeddings)
        if num_quantizers > self.num_semantic_quantizers:
            acoustic = self.acoustic_residual_vector_quantizer.encode(
                embeddings, num_quantizers=num_quantizers - self.num_semantic_quantizers
            )
            codes = torch.cat([codes, acoustic], dim=0)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        codes = _check_codes("codes", codes)
        quantized_out = self.semantic_residual_vector_quantizer.decode(codes[:, : self.num_semantic_quantizers])
        if codes.shape[1] > self.num_semantic_quantizers:
            quantized_out = quantized_out + self.acoustic_residual_vector_quantizer.decode(
                codes[:, self.num_semantic_quantizers :]
            )
        return quantized_out


# --------------------------------------------------------------------------- DAC


class DacVectorQuantize(nn.Module):
    """``transformers.models.dac.modeling_dac.DacVectorQuantize``: factorised, l2-normalised codes.

    ``in_proj`` (1x1 conv, ``hidden_size -> codebook_dim``), the codebook ``nn.Embedding(codebook_size,
    codebook_dim)`` searched by cosine, ``out_proj`` back. ``forward(hidden_state [B, hidden_size, T])`` ->
    ``(quantized [B, hidden_size, T], commitment_loss, codebook_loss, codes int64 [B, T], projected_latents
    [B, codebook_dim, T])``; the losses are the mean squared error between the latents and their (unnormalised)
    codes, each with the other side detached; the quantized latents pass the gradient straight through.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.codebook_dim = config.codebook_dim
        self.in_proj = nn.Conv1d(config.hidden_size, config.codebook_dim, kernel_size=1)
        self.out_proj = nn.Conv1d(config.codebook_dim, config.hidden_size, kernel_size=1)
        self.codebook = nn.Embedding(config.codebook_size, config.codebook_dim)

    @classmethod
    def from_original(cls, original: nn.Module) -> "DacVectorQuantize":
        module = shell(cls, original, ("codebook_dim",))
        for name in ("in_proj", "out_proj", "codebook"):  # kept as they are, weight-norm parametrisations included
            setattr(module, name, getattr(original, name))
        return module

    def forward(self, hidden_state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        projected_latents = self.in_proj(hidden_state)
        quantized, codes = self.decode_latents(projected_latents)
        commitment_loss = F.mse_loss(projected_latents, quantized.detach(), reduction="mean")
        codebook_loss = F.mse_loss(quantized, projected_latents.detach(), reduction="mean")
        quantized = projected_latents + (quantized - projected_latents).detach()
        return self.out_proj(quantized), commitment_loss, codebook_loss, codes, projected_latents

    def decode_latents(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, codebook_dim, T]`` -> ``(codes [B, codebook_dim, T] unnormalised, indices int64 [B, T])``."""
        hidden_states = _check_frames("hidden_states", hidden_states, self.codebook_dim)
        batch, dim, time = hidden_states.shape
        encodings = hidden_states.permute(0, 2, 1).reshape(batch * time, dim)
        indices = nearest_code(encodings, self.codebook.weight, metric="cosine")[0].view(batch, time)
        return self.codebook(indices).transpose(1, 2), indices


class DacResidualVectorQuantizer(nn.Module):
    """``DacResidualVectorQuantizer``: ``config.n_codebooks`` :class:`DacVectorQuantize` levels with per-sample
    quantizer dropout in training.

    ``forward(hidden_state [B, hidden_size, T], n_quantizers=None)`` -> ``(quantized [B, hidden_size, T], codes
    int64 [B, L, T], projected_latents [B, L * codebook_dim, T], commitment_loss [B], codebook_loss [B])``. In
    eval the first ``n_quantizers`` levels run (all when None); in training every level runs and the first
    ``int(B * quantizer_dropout)`` samples keep a random number of levels in ``[1, L]``, drawn from PyTorch's
    global RNG in the same calls and order as Hugging Face draws them.
    """

    def __init__(self, config: Any):
        super().__init__()
        self.n_codebooks = config.n_codebooks
        self.quantizers = nn.ModuleList([DacVectorQuantize(config) for _ in range(config.n_codebooks)])
        self.quantizer_dropout = config.quantizer_dropout

    @classmethod
    def from_original(cls, original: nn.Module) -> "DacResidualVectorQuantizer":
        module = shell(cls, original, ("n_codebooks", "quantizer_dropout"))
        module.quantizers = _layers_from_original(DacVectorQuantize, original.quantizers)
        return module

    def forward(self, hidden_state: Tensor, n_quantizers: Optional[int] = None):
        batch = hidden_state.shape[0]
        quantized: Tensor | int = 0
        commitment_loss: Tensor | int = 0
        codebook_loss: Tensor | int = 0
        residual = hidden_state
        codes, latents = [], []
        n_quantizers = n_quantizers if n_quantizers is not None else self.n_codebooks
        if self.training:
            n_quantizers = torch.ones((batch,)) * self.n_codebooks + 1
            dropout = torch.randint(1, self.n_codebooks + 1, (batch,))
            n_dropout = int(batch * self.quantizer_dropout)
            n_quantizers[:n_dropout] = dropout[:n_dropout]
            n_quantizers = n_quantizers.to(hidden_state.device)
        for level, quantizer in enumerate(self.quantizers):
            if not self.training and level >= n_quantizers:
                break
            quantized_level, commitment_level, codebook_level, codes_level, latents_level = quantizer(residual)
            kept = torch.full((batch,), level, device=hidden_state.device, dtype=torch.long) < n_quantizers
            quantized = quantized + quantized_level * kept[:, None, None]
            residual = residual - quantized_level
            commitment_loss = commitment_loss + commitment_level * kept
            codebook_loss = codebook_loss + codebook_level * kept
            codes.append(codes_level)
            latents.append(latents_level)
        return quantized, torch.stack(codes, dim=1), torch.cat(latents, dim=1), commitment_loss, codebook_loss

    def from_codes(self, audio_codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``codes [B, L, T]`` -> ``(quantized [B, hidden_size, T], latents [B, L * codebook_dim, T], codes)``."""
        audio_codes = _check_codes("audio_codes", audio_codes)
        quantized: Tensor | float = 0.0
        latents = []
        for level in range(audio_codes.shape[1]):
            latents_level = self.quantizers[level].codebook(audio_codes[:, level, :]).transpose(1, 2)
            latents.append(latents_level)
            quantized = quantized + self.quantizers[level].out_proj(latents_level)
        return quantized, torch.cat(latents, dim=1), audio_codes

    def from_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """``latents [B, C, T]`` -> ``(quantized [B, hidden_size, T], quantized latents [B, C', T])`` for as
        many whole levels as fit in ``C`` channels."""
        quantized: Tensor | int = 0
        quantized_latents = []
        start = 0
        for quantizer in self.quantizers:
            stop = start + quantizer.codebook_dim
            if stop > latents.shape[1]:
                break
            chunk = latents[:, start:stop, :]
            quantized_chunk, _ = quantizer.decode_latents(chunk)
            quantized_latents.append(quantized_chunk)
            quantized = quantized + quantizer.out_proj(chunk + (quantized_chunk - chunk))
            start = stop
        return quantized, torch.cat(quantized_latents, dim=1)
