"""The original EnCodec package's residual vector quantizer (``encodec.quantization``) on fastvq's ops.

:class:`ResidualVectorQuantizer` and what it is made of, with EnCodec 0.1.1's class names, constructor
arguments and defaults, return structures (:class:`QuantizedResult`, codes ``[K, B, T]``), methods
(``forward(x, sample_rate, bandwidth=None)``, ``encode``, ``decode``, ``get_bandwidth_per_quantizer``,
``get_num_quantizers_for_bandwidth``) and state_dict keys (``vq.layers.{i}._codebook.{inited,
cluster_size, embed, embed_avg}``). The levels are :mod:`fastvq.nn.audiocraft`'s (audiocraft's
``core_vq`` is EnCodec's plus the orthogonal regulariser and ``channels_last``), with EnCodec's defaults
and EnCodec's residual straight-through variant: each level's output keeps its straight-through
gradient and the residual is ``r - q`` undetached, so the gradient of every level past the first cancels
in the chain and only level 0 (its output and its commitment loss) reaches the input, as in EnCodec.

The fixes of :mod:`fastvq.nn.audiocraft` (dead codes that stay replaced, k-means statistics with the
right scale, EMA statistics summed over ranks) are on by default; ``parity=True`` reproduces EnCodec.
The PyPI release (0.1.1) names the rate ``sample_rate`` and counts bandwidth in kb/s, as here; later
EnCodec sources call it ``frame_rate`` (the same value: frames per second) and count in b/s.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import audiocraft
from ._adopt import adopt_tensors
from .audiocraft import _LEVEL_OPTIONS, _init_residual_quantizer, _rebuilt

__all__ = [
    "QuantizedResult",
    "EuclideanCodebook",
    "VectorQuantization",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
]


@dataclass
class QuantizedResult:
    """EnCodec's result: ``quantized [B, D, T]``, ``codes [K, B, T]``, ``bandwidth`` (kb/s, a scalar in
    the input's dtype), ``penalty`` (the mean of the levels' losses) and ``metrics`` (a dict)."""

    quantized: Tensor
    codes: Tensor
    bandwidth: Tensor
    penalty: tp.Optional[Tensor] = None
    metrics: dict = field(default_factory=dict)


class EuclideanCodebook(audiocraft.EuclideanCodebook):
    """EnCodec's ``EuclideanCodebook``: :class:`fastvq.nn.audiocraft.EuclideanCodebook` with EnCodec's
    default ``decay=0.99``."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        kmeans_init: int = False,
        kmeans_iters: int = 10,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_ema_dead_code: int = 2,
        *,
        parity: bool = False,
    ):
        super().__init__(dim, codebook_size, kmeans_init, kmeans_iters, decay, epsilon, threshold_ema_dead_code,
                         parity=parity)


class VectorQuantization(audiocraft.VectorQuantization):
    """EnCodec's ``VectorQuantization``: one level on ``[B, D, T]`` input, arguments ``dim,
    codebook_size, codebook_dim=None, decay=0.99, epsilon=1e-5, kmeans_init=True, kmeans_iters=50,
    threshold_ema_dead_code=2, commitment_weight=1.0`` and keyword-only ``parity``; no orthogonal
    regulariser. ``forward(x)`` returns ``(quantize [B, D, T], embed_ind [B, T], loss [1])``."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: tp.Optional[int] = None,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        threshold_ema_dead_code: int = 2,
        commitment_weight: float = 1.0,
        *,
        parity: bool = False,
    ):
        super().__init__(dim, codebook_size, codebook_dim, decay, epsilon, kmeans_init, kmeans_iters,
                         threshold_ema_dead_code, channels_last=False, commitment_weight=commitment_weight,
                         parity=parity)


class ResidualVectorQuantization(audiocraft.ResidualVectorQuantization):
    """EnCodec's ``ResidualVectorQuantization``: ``num_quantizers`` EnCodec levels; ``forward(x [B, D, T],
    n_q=None)`` returns ``(quantized [B, D, T], indices [n_q, B, T], losses [n_q, 1])`` with EnCodec's
    undetached residual (see the module docstring); ``encode``/``decode`` as audiocraft's."""

    detach_levels = False
    level_class = VectorQuantization


class ResidualVectorQuantizer(nn.Module):
    """EnCodec's ``ResidualVectorQuantizer`` (``encodec.quantization.vq``).

    Args (EnCodec's order and defaults): ``dimension=256, n_q=8, bins=1024, decay=0.99,
    kmeans_init=True, kmeans_iters=50, threshold_ema_dead_code=2``, and keyword-only ``parity``
    (EnCodec's dead-code, k-means and distributed behaviour instead of fastvq's fixes).

    ``forward(x [B, D, T], sample_rate, bandwidth=None)`` uses ``get_num_quantizers_for_bandwidth``
    levels and returns a :class:`QuantizedResult` with ``codes [K, B, T]``, the bandwidth ``K *
    get_bandwidth_per_quantizer(sample_rate)`` kb/s and the penalty (0 in eval). ``sample_rate`` is the
    frame rate of ``x`` (frames per second). A bandwidth asking for more levels than ``n_q`` uses all of
    them and reports the bandwidth asked for, as EnCodec.
    """

    def __init__(
        self,
        dimension: int = 256,
        n_q: int = 8,
        bins: int = 1024,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 50,
        threshold_ema_dead_code: int = 2,
        *,
        parity: bool = False,
    ):
        super().__init__()
        _init_residual_quantizer(
            self, ResidualVectorQuantization, dimension, n_q, bins, parity, decay=decay, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
        )

    @classmethod
    def from_original(cls, module: nn.Module, *, parity: bool = False) -> "ResidualVectorQuantizer":
        """The fastvq equivalent of an EnCodec ``ResidualVectorQuantizer`` instance: the same
        configuration, a copy of its buffers (device and dtype kept) and its train/eval mode."""
        return adopt_tensors(_rebuilt(cls, module, ("dimension", "n_q", "bins", *_LEVEL_OPTIONS), parity=parity),
                             module)

    def forward(self, x: Tensor, sample_rate: int, bandwidth: tp.Optional[float] = None) -> QuantizedResult:
        bw_per_q = self.get_bandwidth_per_quantizer(sample_rate)
        n_q = self.get_num_quantizers_for_bandwidth(sample_rate, bandwidth)
        quantized, codes, commit_loss = self.vq(x, n_q=n_q)
        bw = torch.tensor(n_q * bw_per_q).to(x)
        return QuantizedResult(quantized, codes, bw, penalty=torch.mean(commit_loss))

    def get_num_quantizers_for_bandwidth(self, sample_rate: int, bandwidth: tp.Optional[float] = None) -> int:
        """The number of levels for ``bandwidth`` kb/s: ``max(1, floor(bandwidth / per-level bandwidth))``,
        or ``n_q`` when ``bandwidth`` is ``None`` or not positive."""
        bw_per_q = self.get_bandwidth_per_quantizer(sample_rate)
        n_q = self.n_q
        if bandwidth and bandwidth > 0.0:
            n_q = int(max(1, math.floor(bandwidth / bw_per_q)))
        return n_q

    def get_bandwidth_per_quantizer(self, sample_rate: int) -> float:
        """``log2(bins) * sample_rate / 1000`` kb/s per level (``sample_rate``: frames per second)."""
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)) or not sample_rate > 0:
            raise ValueError(f"sample_rate must be a positive number (frames per second), got {sample_rate!r}")
        return math.log2(self.bins) * sample_rate / 1000

    def encode(self, x: Tensor, sample_rate: int, bandwidth: tp.Optional[float] = None) -> Tensor:
        """The codes ``[K, B, T]`` of ``x [B, D, T]`` with the levels ``bandwidth`` allows."""
        return self.vq.encode(x, n_q=self.get_num_quantizers_for_bandwidth(sample_rate, bandwidth))

    def decode(self, codes: Tensor) -> Tensor:
        """The quantized ``[B, D, T]`` of ``codes [K, B, T]``."""
        return self.vq.decode(codes)
