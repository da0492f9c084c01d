"""``VectorQuantize``: vector-quantize-pytorch's layer on fastvq's fused ops.

The argument names, defaults, buffer names and shapes follow vector-quantize-pytorch's
``VectorQuantize`` (``_codebook.embed``, ``_codebook.embed_avg``, ``_codebook.cluster_size``,
``_codebook.initted``, with a leading codebook axis of size 1), so its state_dicts load here.
The layer holds state and reshapes; the search, gather, straight-through estimator, loss and
EMA update all run in ``torch.ops.fastvq.*``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .. import _ops  # noqa: F401  (registers torch.ops.fastvq.*)


class Codebook(nn.Module):
    """The codebook state: ``embed [C, K, D]`` and, for EMA training, ``cluster_size [C, K]`` and
    ``embed_avg [C, K, D]``, with ``C`` codebooks (1 until multi-head codebooks arrive)."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        num_codebooks: int = 1,
        decay: float = 0.8,
        eps: float = 1e-5,
        use_cosine_sim: bool = False,
        ema_update: bool = True,
    ):
        super().__init__()
        embed = torch.empty(num_codebooks, codebook_size, dim)
        nn.init.kaiming_uniform_(embed)
        if use_cosine_sim:
            embed = F.normalize(embed, dim=-1)
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.decay = decay
        self.eps = eps
        self.use_cosine_sim = use_cosine_sim
        self.ema_update = ema_update
        self.register_buffer("initted", torch.tensor(True))
        self.register_buffer("cluster_size", torch.ones(num_codebooks, codebook_size))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("embed", embed)

    @property
    def metric(self) -> str:
        return "cosine" if self.use_cosine_sim else "l2"

    def quantize(self, flat: Tensor, commitment_weight: float, train_codebook: bool) -> tuple[Tensor, Tensor, Tensor]:
        """``flat [M, D]`` -> ``(quantized [M, D], indices [M], loss)``; updates the EMA when asked."""
        codebook = self.embed[0]
        if not train_codebook:
            indices, _, quantized = torch.ops.fastvq.nearest_code(flat, codebook, self.metric, True)
            return quantized, indices, flat.new_zeros((), dtype=torch.float32)
        # The EMA step below rewrites the codebook in place after the search; the op's backward
        # reads the chosen codes it returned, never the codebook, so that is safe.
        quantized, indices, loss = torch.ops.fastvq.vector_quantize(
            flat, codebook, self.metric, float(commitment_weight), 0.0
        )
        if self.ema_update:
            torch.ops.fastvq.ema_update_(
                self.embed[0],
                self.cluster_size[0],
                self.embed_avg[0],
                flat.detach(),
                indices,
                float(self.decay),
                float(self.eps),
                None,
                torch.are_deterministic_algorithms_enabled(),
            )
            if self.use_cosine_sim:
                self.embed.copy_(F.normalize(self.embed, dim=-1))
        return quantized, indices, loss


class VectorQuantize(nn.Module):
    """Vector quantization layer, a drop-in for vector-quantize-pytorch's ``VectorQuantize``.

    Args:
        dim: feature dimension ``D`` of the input.
        codebook_size: number of codes ``K``.
        decay: EMA decay of the cluster sizes and sums (0.8, as vector-quantize-pytorch).
        eps: Laplace smoothing of the EMA cluster sizes.
        commitment_weight: weight of the commitment loss ``mean((x - sg[q])^2)``.
        use_cosine_sim: l2-normalise inputs and codes and search by cosine similarity.
        channel_last: a 3-D input is ``[B, N, D]`` (True) or ``[B, D, N]`` (False).
        accept_image_fmap: the input is an image feature map ``[B, D, H, W]``.
        ema_update: train the codebook by exponential moving averages during training; when
            False the codebook stays as it is (vector-quantize-pytorch's behaviour without a
            learnable codebook).

    ``forward(x)`` takes ``[B, D]``, ``[B, N, D]`` (``[B, D, N]`` when not ``channel_last``) or,
    with ``accept_image_fmap``, ``[B, D, H, W]``, and returns ``(quantized, indices, loss)``:
    ``quantized`` shaped and typed like ``x`` (gradients pass straight through to ``x``),
    ``indices`` int64 ``[B]``, ``[B, N]`` or ``[B, H, W]``, and ``loss`` a float32 scalar, the
    weighted commitment loss in training and 0 in eval, as in vector-quantize-pytorch.

    Differences from vector-quantize-pytorch, stated rather than hidden: gradients to ``x`` use
    the plain straight-through estimator (vector-quantize-pytorch defaults to the rotation trick
    for ``dim > 1``); ``loss`` is float32 whatever the input dtype.

    Raises:
        ValueError: non-positive sizes, ``decay`` outside ``[0, 1)``, negative ``eps``, or an
            input whose shape does not fit the configuration (the message shows the shape).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.8,
        eps: float = 1e-5,
        commitment_weight: float = 1.0,
        use_cosine_sim: bool = False,
        channel_last: bool = True,
        accept_image_fmap: bool = False,
        ema_update: bool = True,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("codebook_size", codebook_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        if float(eps) < 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if float(commitment_weight) < 0.0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.commitment_weight = float(commitment_weight)
        self.use_cosine_sim = use_cosine_sim
        self.channel_last = channel_last
        self.accept_image_fmap = accept_image_fmap
        self._codebook = Codebook(
            dim, codebook_size, decay=decay, eps=eps, use_cosine_sim=use_cosine_sim, ema_update=ema_update
        )

    @property
    def ema_update(self) -> bool:
        return self._codebook.ema_update

    @property
    def codebook(self) -> Tensor:
        """The codes ``[K, D]``."""
        return self._codebook.embed[0]

    def get_codes_from_indices(self, indices: Tensor) -> Tensor:
        """``indices`` of any shape (int64) -> codes ``[..., D]``."""
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be int64 or int32, got {indices.dtype}")
        return F.embedding(indices.long(), self.codebook)

    def get_output_from_indices(self, indices: Tensor) -> Tensor:
        """The layer's output for ``indices``: ``[B, H, W]`` -> ``[B, D, H, W]`` with
        ``accept_image_fmap``, ``[B, N]`` -> ``[B, D, N]`` when not ``channel_last``, else codes."""
        codes = self.get_codes_from_indices(indices)
        if self.accept_image_fmap:
            return rearrange(codes, "b h w d -> b d h w")
        if not self.channel_last and codes.dim() == 3:
            return rearrange(codes, "b n d -> b d n")
        return codes

    def _flatten(self, x: Tensor) -> tuple[Tensor, str, dict]:
        if self.accept_image_fmap:
            if x.dim() != 4 or x.shape[1] != self.dim:
                raise ValueError(
                    f"x must be an image feature map [B, {self.dim}, H, W] (accept_image_fmap=True), got shape {tuple(x.shape)}"
                )
            pattern, sizes = "b d h w", dict(h=x.shape[2], w=x.shape[3])
            return rearrange(x, "b d h w -> (b h w) d"), pattern, sizes
        if x.dim() == 2 and x.shape[1] == self.dim:
            return x, "b d", {}
        if x.dim() == 3 and self.channel_last and x.shape[2] == self.dim:
            return rearrange(x, "b n d -> (b n) d"), "b n d", dict(n=x.shape[1])
        if x.dim() == 3 and not self.channel_last and x.shape[1] == self.dim:
            return rearrange(x, "b d n -> (b n) d"), "b d n", dict(n=x.shape[2])
        layout = "[B, N, D]" if self.channel_last else "[B, D, N]"
        raise ValueError(f"x must be [B, D] or {layout} with D = {self.dim}, got shape {tuple(x.shape)}")

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if mask is not None:
            raise NotImplementedError("VectorQuantize(mask=...) is not supported yet by fastvq")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        flat, pattern, sizes = self._flatten(x)
        if self.use_cosine_sim:
            flat = F.normalize(flat, dim=-1)
        quantized, indices, loss = self._codebook.quantize(flat, self.commitment_weight, self.training)
        quantized = quantized.to(x.dtype)
        rows = _rows(pattern)
        quantized = rearrange(quantized, f"({rows}) d -> {pattern}", b=x.shape[0], **sizes)
        indices = rearrange(indices, f"({rows}) -> {rows}", b=x.shape[0], **sizes)
        return quantized, indices, loss


def _rows(pattern: str) -> str:
    """The row axes of a layout: ``"b d h w"`` -> ``"b h w"``."""
    return " ".join(axis for axis in pattern.split() if axis != "d")
