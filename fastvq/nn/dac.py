"""Descript Audio Codec's quantizers (``dac.nn.quantize``, descript-audio-codec 1.0.0) on fastvq's ops.

``VectorQuantize`` and ``ResidualVectorQuantize`` keep DAC's constructor arguments, order and defaults,
attribute names (``quantizers``, ``in_proj``, ``out_proj``, ``codebook``), return tuples and state_dict
keys (``quantizers.{i}.in_proj.{bias, weight_g, weight_v}``, ``quantizers.{i}.out_proj.{...}``,
``quantizers.{i}.codebook.weight``), so a DAC checkpoint loads and a DAC training loop runs unchanged.
Each level projects its input by a weight-normalised 1x1 convolution to ``codebook_dim`` (ViT-VQGAN's
factorised codes), finds the nearest code after l2-normalising both the latents and the codes (so the
search is by cosine), and projects the chosen (unnormalised) code back. The search is
``fastvq.functional.nearest_code``, which never builds DAC's ``N x K`` distance matrix.

Gradients are DAC's: within a level the output passes its gradient straight to the projected latents
(``z_e + sg[z_q - z_e]``) and through ``out_proj``; the residual handed to the next level is not
detached, so later levels' gradients also reach earlier levels' projections; the commitment loss
``mean((z_e - sg[z_q])^2)`` trains ``in_proj`` and the input, the codebook loss ``mean((z_q - sg[z_e])^2)``
the chosen codes (its gradient reaches only those rows, through the embedding gather's scatter-add).

Differences from DAC, stated rather than hidden:

- in training, ``ResidualVectorQuantize.forward(z, n_quantizers)`` uses ``n_quantizers`` levels for the
  batch items that quantizer dropout leaves alone (and at most that many for the others), as DAC's
  docstring promises; DAC's code ignores the argument whenever the module is training, even with
  ``quantizer_dropout=0``. ``parity=True`` (keyword-only, on the constructor) ignores it as DAC does.
  Without the argument the two agree;
- bad arguments raise ``ValueError``/``TypeError`` naming the argument (DAC fails inside the
  convolution or the matrix product);
- the projections are fastvq's own weight-normalised 1x1 convolution with the parameters
  ``weight_g`` and ``weight_v`` of ``torch.nn.utils.weight_norm`` (which DAC uses and PyTorch deprecates);
  ``weight`` is a read-only property computed from them.

SNAC's variant of these classes (a ``stride`` per level, different state_dict keys and return values)
is :mod:`fastvq.nn.snac`.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.search import nearest_code
from ._adopt import adopt_tensors

__all__ = ["VectorQuantize", "ResidualVectorQuantize"]


def positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_latents(name: str, value: object, channels: int) -> Tensor:
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() != 3 or value.shape[1] != channels:
        raise ValueError(f"{name} must be [B, {channels}, T], got shape {tuple(value.shape)}")
    return value


def check_codes(name: str, value: object, rank: int) -> Tensor:
    if not isinstance(value, Tensor) or value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    if value.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(value.shape)}")
    return value


class _WeightNormConv1x1(nn.Module):
    """``weight_norm(nn.Conv1d(in_channels, out_channels, 1))`` in the parameters of
    ``torch.nn.utils.weight_norm``: ``weight = weight_g * weight_v / |weight_v|`` (norm per output
    channel), ``bias``. Initialised as that wrapper initialises a fresh ``nn.Conv1d`` (same RNG draws)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size=1)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.bias = nn.Parameter(conv.bias.detach())
        self.weight_g = nn.Parameter(conv.weight.detach().norm(dim=(1, 2), keepdim=True))
        self.weight_v = nn.Parameter(conv.weight.detach())

    @property
    def weight(self) -> Tensor:
        # The op torch.nn.utils.weight_norm runs, so the weights and their gradients are DAC's to the bit.
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size=(1,)"


class _FactorisedLevel(nn.Module):
    """What DAC's and SNAC's ``VectorQuantize`` share: ``in_proj`` (``D -> d``) and ``out_proj`` built by
    ``projection(in_channels, out_channels)``, then the ``nn.Embedding(K, d)`` codebook (the libraries' order
    of RNG draws), and the code look-ups. ``extra_checks``: ``(name, value)`` pairs, checked as positive ints
    where the subclass's original checks them."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int,
                 projection: Callable[[int, int], nn.Module], extra_checks: tuple = ()):
        super().__init__()
        self.codebook_size = positive_int("codebook_size", codebook_size)
        self.codebook_dim = positive_int("codebook_dim", codebook_dim)
        for name, value in extra_checks:
            positive_int(name, value)
        self.input_dim = positive_int("input_dim", input_dim)
        self.in_proj = projection(input_dim, codebook_dim)
        self.out_proj = projection(codebook_dim, input_dim)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def embed_code(self, embed_id: Tensor) -> Tensor:
        """Integer ``embed_id [...]`` -> codes ``[..., d]``."""
        return F.embedding(embed_id, self.codebook.weight)

    def decode_code(self, embed_id: Tensor) -> Tensor:
        """Integer ``embed_id [B, T]`` -> codes ``[B, d, T]``."""
        return self.embed_code(check_codes("embed_id", embed_id, 2)).transpose(1, 2)

    def decode_latents(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """Projected ``latents [B, d, T]`` -> ``(nearest codes [B, d, T], indices int64 [B, T])``: the search
        compares l2-normalised latents with l2-normalised codes (``F.normalize``'s eps), ties to the lowest
        index; the codes returned are the unnormalised rows of the codebook, gathered with their gradient."""
        batch, dim, frames = check_latents("latents", latents, self.codebook_dim).shape
        encodings = F.normalize(latents.detach().transpose(1, 2).reshape(batch * frames, dim))
        indices, _ = nearest_code(z=encodings, codebook=F.normalize(self.codebook.weight.detach()), metric="l2")
        indices = indices.view(batch, frames)
        return F.embedding(indices, self.codebook.weight).transpose(1, 2), indices


class VectorQuantize(_FactorisedLevel):
    """DAC's ``VectorQuantize``: one level of factorised, l2-normalised codes.

    Args:
        input_dim: channels ``D`` of the input.
        codebook_size: number of codes ``K``.
        codebook_dim: dimension ``d`` of the codes; ``in_proj`` maps ``D -> d``, ``out_proj`` ``d -> D``.

    ``codebook`` is an ``nn.Embedding(K, d)`` trained by the codebook loss.

    ``forward(z [B, D, T])`` returns ``(z_q [B, D, T], commitment_loss [B], codebook_loss [B],
    indices int64 [B, T], z_e [B, d, T])``; the losses are per batch item, ``z_e`` the projected latents.
    """

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__(input_dim, codebook_size, codebook_dim, _WeightNormConv1x1)

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        check_latents("z", z, self.input_dim)
        z_e = self.in_proj(z)
        z_q, indices = self.decode_latents(z_e)
        commitment_loss = F.mse_loss(z_e, z_q.detach(), reduction="none").mean([1, 2])
        codebook_loss = F.mse_loss(z_q, z_e.detach(), reduction="none").mean([1, 2])
        z_q = z_e + (z_q - z_e).detach()
        return self.out_proj(z_q), commitment_loss, codebook_loss, indices, z_e


class ResidualVectorQuantize(nn.Module):
    """DAC's ``ResidualVectorQuantize`` (SoundStream's residual VQ with DAC's factorised codes).

    Args (DAC's order and defaults):
        input_dim: channels ``D`` of the input (512).
        n_codebooks: number of levels (9).
        codebook_size: codes per level (1024).
        codebook_dim: ``d`` of every level, or a list of one per level (8).
        quantizer_dropout: fraction of the batch (its first ``int(B * quantizer_dropout)`` items, as in
            DAC) that, in training, uses a random number of levels drawn uniformly from
            ``[1, n_codebooks]``.
        parity: keyword only; in training ignore ``forward``'s ``n_quantizers``, as DAC does.

    ``forward(z [B, D, T], n_quantizers=None)`` returns ``(z_q [B, D, T], codes int64 [B, L, T],
    latents [B, L*d, T], commitment_loss, codebook_loss)``: in eval the first ``n_quantizers`` levels
    (all by default) run, ``L = n_quantizers``; in training all levels run (``L = n_codebooks``), each
    batch item's output sums its first levels (``n_quantizers`` or, for the dropped-out items, the
    drawn number, at most ``n_quantizers``) and the losses are the batch means of the levels' per-item
    losses, masked alike, summed over levels. Training draws the dropout with ``torch.randint`` on the CPU even when
    ``quantizer_dropout == 0``, as DAC does, so the RNG stream stays DAC's.

    ``from_codes(codes [B, L, T])`` -> ``(z_q, latents of the codes [B, L*d, T], codes)``;
    ``from_latents(latents [B, M, T])`` -> ``(z_q, codes' latents, codes [B, L, T])`` for the ``L``
    levels whose latents fit in ``M`` channels.
    """

    def __init__(
        self,
        input_dim: int = 512,
        n_codebooks: int = 9,
        codebook_size: int = 1024,
        codebook_dim: Union[int, list] = 8,
        quantizer_dropout: float = 0.0,
        *,
        parity: bool = False,
    ):
        super().__init__()
        positive_int("n_codebooks", n_codebooks)
        if isinstance(codebook_dim, int):
            codebook_dim = [codebook_dim for _ in range(n_codebooks)]
        if not isinstance(codebook_dim, (list, tuple)) or len(codebook_dim) != n_codebooks:
            raise ValueError(f"codebook_dim must be an int or a list of {n_codebooks} ints, got {codebook_dim!r}")
        # DAC's own example passes True, which its arithmetic reads as 1.0.
        if not isinstance(quantizer_dropout, (int, float)) or not 0.0 <= quantizer_dropout <= 1.0:
            raise ValueError(f"quantizer_dropout must be a fraction in [0, 1], got {quantizer_dropout!r}")
        self.n_codebooks = n_codebooks
        self.codebook_dim = codebook_dim
        self.codebook_size = codebook_size
        self.input_dim = positive_int("input_dim", input_dim)
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim[level]) for level in range(n_codebooks)
        )
        self.quantizer_dropout = quantizer_dropout
        self.parity = bool(parity)

    def _levels_per_item(self, z: Tensor, n_quantizers: Optional[int]) -> Union[int, Tensor]:
        """How many levels each batch item uses: an int in eval, a float tensor ``[B]`` in training."""
        if not self.training:
            return self.n_codebooks if n_quantizers is None else n_quantizers
        batch = z.shape[0]
        # All levels plus one, so that `level < levels` holds for every level of a kept item.
        kept = self.n_codebooks + 1 if n_quantizers is None or self.parity else n_quantizers
        levels = torch.ones((batch,)) * kept
        dropout = torch.randint(1, self.n_codebooks + 1, (batch,))
        dropped = int(batch * self.quantizer_dropout)
        # A dropped-out item uses fewer levels than the kept ones, never more.
        levels[:dropped] = torch.minimum(dropout[:dropped].to(levels.dtype), levels[:dropped])
        return levels.to(z.device)

    def _quantize_levels(
        self, z: Tensor, levels: Union[int, Tensor]
    ) -> tuple[Tensor, List[Tensor], List[Tensor], Tensor, Tensor]:
        """The residual loop: ``(z_q, codes per level, latents per level, commitment, codebook loss)``.
        Every level runs in training (the dropout is a mask); eval stops after ``levels`` levels."""
        z_q: Union[int, Tensor] = 0
        residual = z
        commitment_loss: Union[int, Tensor] = 0
        codebook_loss: Union[int, Tensor] = 0
        codes, latents = [], []
        for level, quantizer in enumerate(self.quantizers):
            if not self.training and level >= levels:
                break
            z_q_level, commitment_level, codebook_level, indices, z_e = quantizer(residual)
            keep = torch.full((z.shape[0],), fill_value=level, device=z.device) < levels
            z_q = z_q + z_q_level * keep[:, None, None]
            residual = residual - z_q_level
            commitment_loss = commitment_loss + (commitment_level * keep).mean()
            codebook_loss = codebook_loss + (codebook_level * keep).mean()
            codes.append(indices)
            latents.append(z_e)
        return z_q, codes, latents, commitment_loss, codebook_loss

    def forward(self, z: Tensor, n_quantizers: Optional[int] = None):
        check_latents("z", z, self.input_dim)
        if n_quantizers is not None and (not isinstance(n_quantizers, int) or n_quantizers < 1):
            raise ValueError(f"n_quantizers must be a positive int or None, got {n_quantizers!r}")
        levels = self._levels_per_item(z, n_quantizers)
        z_q, codes, latents, commitment_loss, codebook_loss = self._quantize_levels(z, levels)
        return z_q, torch.stack(codes, dim=1), torch.cat(latents, dim=1), commitment_loss, codebook_loss

    def from_codes(self, codes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``codes [B, L, T]`` (``L <= n_codebooks``) -> ``(z_q [B, D, T], code latents [B, L*d, T], codes)``."""
        check_codes("codes", codes, 3)
        if codes.shape[1] > self.n_codebooks:
            raise ValueError(f"codes must have at most {self.n_codebooks} levels, got shape {tuple(codes.shape)}")
        z_q: Union[float, Tensor] = 0.0
        code_latents = []
        for level in range(codes.shape[1]):
            latent = self.quantizers[level].decode_code(codes[:, level, :])
            code_latents.append(latent)
            z_q = z_q + self.quantizers[level].out_proj(latent)
        return z_q, torch.cat(code_latents, dim=1), codes

    def from_latents(self, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projected ``latents [B, M, T]`` -> ``(z_q [B, D, T], code latents, codes [B, L, T])``, ``L`` the
        number of levels whose ``codebook_dim`` fit in ``M`` channels (their running sum)."""
        if not isinstance(latents, Tensor) or not latents.is_floating_point() or latents.dim() != 3:
            raise TypeError(f"latents must be a floating-point [B, M, T] tensor, got {type(latents).__name__} "
                            f"of shape {tuple(getattr(latents, 'shape', ()))}")
        bounds = [0]
        for quantizer in self.quantizers:
            bounds.append(bounds[-1] + quantizer.codebook_dim)
        levels = max(level for level, bound in enumerate(bounds) if bound <= latents.shape[1])
        if levels == 0:
            raise ValueError(f"latents must hold at least {bounds[1]} channels, got shape {tuple(latents.shape)}")
        z_q: Union[int, Tensor] = 0
        code_latents, codes = [], []
        for level in range(levels):
            latent, indices = self.quantizers[level].decode_latents(latents[:, bounds[level]: bounds[level + 1], :])
            code_latents.append(latent)
            codes.append(indices)
            z_q = z_q + self.quantizers[level].out_proj(latent)
        return z_q, torch.cat(code_latents, dim=1), torch.stack(codes, dim=1)

    @classmethod
    def from_original(cls, module: nn.Module, *, parity: bool = False) -> "ResidualVectorQuantize":
        """The fastvq equivalent of DAC's ``ResidualVectorQuantize`` instance ``module``: the same
        configuration, parameters, mode, device and dtype."""
        ours = cls(
            input_dim=module.quantizers[0].in_proj.in_channels, n_codebooks=module.n_codebooks,
            codebook_size=module.codebook_size, codebook_dim=list(module.codebook_dim),
            quantizer_dropout=module.quantizer_dropout, parity=parity,
        )
        weight = module.quantizers[0].codebook.weight
        ours.to(device=weight.device, dtype=weight.dtype)
        ours.load_state_dict(module.state_dict(), strict=True)
        # DAC's convolutions carry torch.nn.utils.weight_norm's pre-hook; ours compute that weight themselves.
        return adopt_tensors(ours.train(module.training), module, weight_norm_replicated=True)
