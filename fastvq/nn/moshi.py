"""Kyutai's Mimi quantizers (``moshi.quantization``, Moshi 0.2.13) on fastvq's ops.

``ResidualVectorQuantizer`` and ``SplitResidualVectorQuantizer`` keep Moshi's constructor arguments,
order and defaults, attribute names, return structure (:class:`QuantizedResult` with ``codes [B, K, T]``),
metrics (``rvq_expired``, ``rvq_entropy``, each also per level as ``rvq_<name>_<level + codebook_offset>``)
and state_dict keys (``vq.layers.{i}._codebook.{_initialized, cluster_usage, embedding_sum}``, plus
``input_proj.weight`` / ``output_proj.weight`` when projecting). Loading also accepts the legacy
audiocraft names ``inited``, ``cluster_size``, ``embed_avg`` and ``embed_sum``, as Moshi does. The
nearest-code search is ``fastvq.functional.nearest_code`` and the per-code EMA statistics are
``fastvq.functional.segment_reduce``, so no ``N x K`` distance matrix (Moshi's ``cdist``) and no
``N x K x D`` scatter index are built, in training, in k-means initialisation or in inference.

Codebook training is Moshi's: ``cluster_usage`` and ``embedding_sum`` are exponential moving averages
of the per-code counts and sums, the codes are ``embedding_sum / max(cluster_usage, epsilon)``; the first
training batch that reaches a level initialises it by 50 k-means iterations (a level is initialised
only once the level before it was initialised by an earlier batch); every ``check_unused_every`` steps
codes whose usage fell below ``threshold_usage_ratio`` of the uniform share are replaced by random rows
of the batch, with usage ``replaced_usage_ratio`` times the uniform share. That replacement writes both
moving averages, so the EMA step that follows in the same forward keeps the new code (mostly the sampled
row, weight ``decay`` against ``1 - decay``): Moshi does not have the EnCodec family's no-op expiry.

Differences from Moshi, stated rather than hidden:

- under ``torch.distributed`` each level's batch counts and sums are averaged over ranks once, as one
  packed all-reduce per level per step, with compile-safe collectives and no host sync. Moshi, after
  each training forward, all-reduces a list it grows inside its loop over levels: ``L (L + 1)`` tensors
  for ``L`` levels, about 16x the ``2 L`` its buffers need at 32 levels (the already averaged ones
  again and again). ``parity=True`` reproduces Moshi's reduction; the buffers agree to rounding;
- ``VectorQuantization(codebook_dim != dim)`` projects its input in ``forward`` as in ``encode``
  (Moshi's ``forward`` forgets ``project_in`` and fails in ``cdist``); Moshi's quantizers never set
  ``codebook_dim``, so they are unaffected;
- a dead code's replacement is drawn from the detached batch: Moshi writes rows that carry the
  batch's autograd history into the ``embedding_sum`` buffer, which keeps every expiring step's graph
  alive through the buffer's history;
- the codes are computed from the buffers at every use: Moshi caches them in a non-persistent
  ``_embedding`` buffer that ``load_state_dict`` does not refresh, so in ``eval()`` a model that has
  encoded once keeps using its old codes after a new state is loaded;
- the ``initialized`` flag is mirrored in Python and refreshed by ``load_state_dict``, so the forward
  never reads the ``_initialized`` buffer back from the device;
- bad arguments raise :class:`MoshiArgumentError`, a ``ValueError`` that is also an ``AssertionError``
  (what Moshi's ``assert`` statements raise), naming the argument; a non-float input or float codes a
  ``TypeError``.

Moshi 0.2.13 has no ``generator_seed`` argument: quantizer dropout draws from ``random.Random(1234)``,
held per module as ``rng_dropout``, and the no-quantization mask from PyTorch's RNG, as here.
"""

from __future__ import annotations

import math
import random
import typing as tp
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._distributed import is_distributed
from ..ops.residual_quantize import residual_quantize
from ..ops.search import nearest_code
from ..ops.segment_reduce import segment_reduce
from ._adopt import adopt_tensors
from .audiocraft import _broadcast_buffers_, _sample_vectors, _statistics_over_ranks

__all__ = [
    "MoshiArgumentError",
    "QuantizedResult",
    "EuclideanCodebook",
    "VectorQuantization",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
    "SplitResidualVectorQuantizer",
]

# Lloyd iterations of Moshi's k-means initialisation.
KMEANS_ITERATIONS = 50
# Moshi's mapping of audiocraft's buffer names onto its own, applied when a state is loaded.
LEGACY_BUFFER_NAMES = {
    "inited": "_initialized",
    "cluster_size": "cluster_usage",
    "embed_avg": "embedding_sum",
    "embed_sum": "embedding_sum",
}


class MoshiArgumentError(ValueError, AssertionError):
    """A bad argument. A ``ValueError`` (fastvq's rule) and an ``AssertionError`` (what Moshi's asserts raise)."""


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MoshiArgumentError(f"{name} must be a positive int, got {value!r}")
    return value


def _real_in(name: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        bounds = f"in [{low}, {high}]" if math.isfinite(high) else f">= {low}"
        raise MoshiArgumentError(f"{name} must be a real number {bounds}, got {value!r}")
    return float(value)


def _zero_scalar(device: torch.device) -> Tensor:
    """A float32 0 on ``device``, made without a host sync (Moshi's ``zero_scalar``)."""
    return torch.zeros([1], device=device)[0]


def _kmeans(samples: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Moshi's k-means: ``(means [K, D], rows per cluster clamped at 1 [K])`` after 50 Lloyd steps.

    Each step is one nearest-code search and one segment sum; an empty cluster takes a fresh random
    row, drawn every step as Moshi draws it (so the same seed gives the same centroids)."""
    means = _sample_vectors(samples, num_clusters)
    bins = None
    for _ in range(KMEANS_ITERATIONS):
        buckets, _ = nearest_code(z=samples, codebook=means, metric="l2")
        counts, sums = segment_reduce(values=samples, indices=buckets, num_codes=num_clusters)
        empty = counts == 0
        bins = counts.clamp(min=1)
        new_means = sums.to(samples.dtype) / bins.to(samples.dtype)[:, None]
        resampled = _sample_vectors(samples, num_clusters)
        means = torch.where(empty[:, None], resampled, new_means)
    return means, bins


def _entropy(usage: Tensor) -> Tensor:
    """Entropy (nats) of the distribution proportional to ``usage [K]``; empty codes count 0."""
    proba = usage / usage.sum()
    return -torch.where(proba == 0, torch.zeros_like(proba), proba * torch.log(proba)).sum()


def _moshi_average_tensors(tensors: tp.Sequence[Tensor]) -> None:
    """Moshi's ``_average_tensors``: one asynchronous eager all-reduce per tensor, then a division."""
    if not is_distributed():
        return
    world = dist.get_world_size()
    handles = [dist.all_reduce(tensor.data, op=dist.ReduceOp.SUM, async_op=True) for tensor in tensors]
    for tensor, handle in zip(tensors, handles):
        handle.wait()
        tensor.data /= world


@dataclass
class QuantizedResult:
    """What the quantizers' ``forward`` returns, as Moshi's ``moshi.quantization.base.QuantizedResult``.

    ``x [B, C, T]`` the quantized tensor; ``codes`` int64 ``[B, K, T]``; ``bandwidth`` the kbit/s of
    the codes (a scalar in ``x``'s dtype); ``penalty`` the commitment loss; ``metrics`` a dict of scalars.
    """

    x: Tensor
    codes: Tensor
    bandwidth: Tensor
    penalty: tp.Optional[Tensor] = None
    metrics: dict = field(default_factory=dict)


class _CodebookForwardResult(tp.NamedTuple):
    quantized: Tensor
    codes: Tensor
    metrics: tp.Dict[str, Tensor]


class _VQForwardResult(tp.NamedTuple):
    quantized: Tensor
    codes: Tensor
    loss: Tensor
    metrics: tp.Dict[str, Tensor]


class EuclideanCodebook(nn.Module):
    """Moshi's ``EuclideanCodebook``: ``codebook_size`` codes in ``dim`` dimensions trained by EMA.

    Args (Moshi's order and defaults):
        dim, codebook_size: positive ints.
        decay: EMA decay in ``[0, 1]``.
        epsilon: floor of ``cluster_usage`` when the codes are computed.
        threshold_usage_ratio: a code whose ``cluster_usage`` falls below this fraction of the
            uniform share ``sum(cluster_usage) / codebook_size`` is replaced.
        replaced_usage_ratio: the usage a replaced code starts with, as a fraction of that share.
        check_unused_every: look for unused codes every this many training steps.
        parity: keyword only; leave the statistics unsynchronised across ranks here, because the
            owning :class:`ResidualVectorQuantization` averages its buffers Moshi's way.

    Buffers: ``_initialized`` (float ``[1]``), ``cluster_usage [K]`` (ones), ``embedding_sum [K, D]``
    (zeros). The codes, :attr:`embedding`, are ``embedding_sum / max(cluster_usage, epsilon)``.

    ``forward(x [..., D], initialize=True)`` returns ``(quantized [..., D], codes int64 [...], metrics)``;
    in training it first initialises the codebook by k-means on ``x`` (when ``initialize``), then after
    the search replaces expired codes and folds the batch into the moving averages.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_usage_ratio: float = 0.1,
        replaced_usage_ratio: float = 1.0,
        check_unused_every: int = 5,
        *,
        parity: bool = False,
    ):
        super().__init__()
        self.dim = _positive_int("dim", dim)
        self.codebook_size = _positive_int("codebook_size", codebook_size)
        self.decay = _real_in("decay", decay, 0.0, 1.0)
        self.epsilon = _real_in("epsilon", epsilon, 0.0)
        self.threshold_usage_ratio = _real_in("threshold_usage_ratio", threshold_usage_ratio, 0.0)
        self.replaced_usage_ratio = _real_in("replaced_usage_ratio", replaced_usage_ratio, 0.0)
        self.check_unused_every = _positive_int("check_unused_every", check_unused_every)
        self.parity = bool(parity)
        self._next_unused_check = check_unused_every
        # The buffer `_initialized` mirrored in Python, so no forward reads it back from the device.
        self._initialized_on_host = False
        self._initialized: Tensor
        self.cluster_usage: Tensor
        self.embedding_sum: Tensor
        self.register_buffer("_initialized", torch.tensor([False], dtype=torch.float))
        self.register_buffer("cluster_usage", torch.ones(codebook_size))
        self.register_buffer("embedding_sum", torch.zeros(codebook_size, dim))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for old_name, new_name in LEGACY_BUFFER_NAMES.items():
            if prefix + old_name in state_dict:
                state_dict[prefix + new_name] = state_dict.pop(prefix + old_name)
        if prefix + "_initialized" in state_dict:
            self._initialized_on_host = bool(state_dict[prefix + "_initialized"].reshape(-1)[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def embedding(self) -> Tensor:
        """The codes ``[K, D]``: ``embedding_sum / max(cluster_usage, epsilon)``."""
        return self.embedding_sum / self.cluster_usage.clamp(min=self.epsilon)[:, None]

    @property
    def initialized(self) -> bool:
        return self._initialized_on_host

    @torch.no_grad()
    def _init_embedding(self, data: Tensor) -> None:
        """k-means on the batch (every rank's rows, on rank 0, under torch.distributed), once."""
        if self.initialized:
            return
        rank = 0
        if is_distributed():
            # Once per level per run: gathering rows of uneven counts costs one host round trip here.
            rank = dist.get_rank()
            counts = [None] * dist.get_world_size() if rank == 0 else None
            dist.gather_object(data.shape[0], counts)
            gathered = [data.new_empty(count, data.shape[1]) for count in counts] if rank == 0 else None
            dist.gather(data.contiguous(), gathered)
            if rank == 0:
                data = torch.cat(gathered)
        if rank == 0:
            means, bins = _kmeans(data, self.codebook_size)
            self.embedding_sum.copy_(means * bins[:, None])
            self.cluster_usage.copy_(bins)
            self._initialized.fill_(1)
        _broadcast_buffers_(self)
        self._initialized_on_host = True

    @torch.no_grad()
    def _replace_expired_codes(self, samples: Tensor, mask: Tensor) -> None:
        new_vectors = _sample_vectors(samples, self.codebook_size)
        replaced_usage = self.replaced_usage_ratio * self.cluster_usage.sum() / self.codebook_size
        self.embedding_sum.copy_(torch.where(mask[:, None], replaced_usage * new_vectors, self.embedding_sum))
        self.cluster_usage.copy_(torch.where(mask, replaced_usage, self.cluster_usage))

    def _check_expired_codes(self, samples: Tensor) -> Tensor:
        """Replaces the codes under the usage threshold, every ``check_unused_every`` calls; returns the
        fraction replaced (0 on the calls in between)."""
        if not self.initialized:
            return _zero_scalar(samples.device)
        self._next_unused_check -= 1
        if self._next_unused_check > 0:
            return _zero_scalar(samples.device)
        self._next_unused_check = self.check_unused_every
        threshold = self.threshold_usage_ratio * self.cluster_usage.sum() / self.codebook_size
        expired = self.cluster_usage < threshold
        self._replace_expired_codes(samples, mask=expired)
        _broadcast_buffers_(self)
        return expired.float().mean()

    @torch.no_grad()
    def _fold_into_averages(self, samples: Tensor, codes: Tensor, metrics: tp.Dict[str, Tensor]) -> None:
        """The EMA step on the batch ``samples [N, D]`` with its ``codes [N]``; records the entropy."""
        counts, sums = segment_reduce(values=samples, indices=codes, num_codes=self.codebook_size)
        if not self.parity and is_distributed():
            counts, sums = _statistics_over_ranks(counts, sums, mean=True)
        self._fold_statistics(counts, sums, metrics)

    @torch.no_grad()
    def _fold_statistics(self, counts: Tensor, sums: Tensor, metrics: tp.Dict[str, Tensor]) -> None:
        """The EMA step from this step's per-code ``counts [K]`` and ``sums [K, D]`` (float32, already
        averaged over ranks outside ``parity``); records the entropy."""
        self.cluster_usage.mul_(self.decay).add_(counts.to(self.cluster_usage.dtype), alpha=1 - self.decay)
        if self.initialized:
            # Normalised by the uniform distribution's entropy: 1 when every code is used alike.
            metrics["rvq_entropy"] = _entropy(self.cluster_usage) / math.log(self.codebook_size)
        self.embedding_sum.mul_(self.decay).add_(sums.to(self.embedding_sum.dtype), alpha=1 - self.decay)

    def _search(self, flat: Tensor, embedding: Tensor) -> tuple[Tensor, Tensor]:
        codes, _, quantized = nearest_code(z=flat.detach(), codebook=embedding, metric="l2", return_codes=True)
        return codes, quantized.to(embedding.dtype)

    def encode(self, x: Tensor) -> Tensor:
        """``x [..., D]`` float -> the index of each row's nearest code, int64 ``[...]``."""
        _check_rows(x, self.dim)
        codes, _ = self._search(x.reshape(-1, self.dim), self.embedding)
        return codes.view(x.shape[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        """Integer ``codes [...]`` -> the codes' vectors ``[..., D]``."""
        _check_codes(codes)
        return F.embedding(codes, self.embedding)

    def forward(self, x: Tensor, initialize: bool = True) -> _CodebookForwardResult:
        _check_rows(x, self.dim)
        flat = x.reshape(-1, self.dim)
        if self.training and initialize:
            # Without `initialize` the level runs on its all-zero codes: the levels before it used
            # this batch for their own k-means, so its residuals would be mostly zeros.
            self._init_embedding(flat.detach())
        flat_codes, flat_quantized = self._search(flat, self.embedding)
        metrics: tp.Dict[str, Tensor] = {}
        if self.training:
            # Expire before the EMA step, while the buffers agree on every rank.
            metrics["rvq_expired"] = self._check_expired_codes(flat.detach())
            self._fold_into_averages(flat.detach(), flat_codes, metrics)
        return _CodebookForwardResult(
            flat_quantized.view(*x.shape[:-1], self.dim), flat_codes.view(x.shape[:-1]), metrics
        )


def _check_rows(x: object, dim: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"x must be [..., {dim}], got shape {tuple(x.shape)}")


def _check_channels(x: object, channels: int) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"x must be [B, {channels}, T], got shape {tuple(x.shape)}")


def _check_codes(codes: object, levels: tp.Optional[int] = None, level_axis: int = 1) -> None:
    if not isinstance(codes, Tensor) or codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"codes must be an integer tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if levels is not None and (codes.dim() != 3 or codes.shape[level_axis] > levels):
        raise ValueError(f"codes must be [B, K <= {levels}, T], got shape {tuple(codes.shape)}")


class VectorQuantization(nn.Module):
    """Moshi's ``VectorQuantization``: one :class:`EuclideanCodebook` on ``[B, D, T]`` inputs.

    Args: ``dim``, ``codebook_size``, ``codebook_dim`` (``None``: ``dim``; otherwise ``nn.Linear``
    projections ``project_in``/``project_out``), ``decay``, ``epsilon``, ``threshold_usage_ratio`` and
    further keyword arguments of :class:`EuclideanCodebook` (``replaced_usage_ratio``,
    ``check_unused_every``, ``parity``).

    ``forward(x [B, D, T], initialize=True)`` returns ``(quantized [B, D, T], codes [B, T], loss,
    metrics)``; in training ``quantized`` passes its gradient straight to ``x`` and ``loss`` is the
    commitment ``mean((x - sg[q])^2)``, in eval ``loss`` is 0.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: tp.Optional[int] = None,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        threshold_usage_ratio: float = 0.1,
        **kwargs,
    ):
        super().__init__()
        if codebook_dim is None:
            codebook_dim = dim
        projects = _positive_int("codebook_dim", codebook_dim) != _positive_int("dim", dim)
        self.project_in = nn.Linear(dim, codebook_dim) if projects else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if projects else nn.Identity()
        self.epsilon = epsilon
        self._codebook = EuclideanCodebook(
            dim=codebook_dim, codebook_size=codebook_size, decay=decay, epsilon=epsilon,
            threshold_usage_ratio=threshold_usage_ratio, **kwargs,
        )
        self.codebook_size = codebook_size

    @property
    def embedding(self) -> Tensor:
        return self._codebook.embedding

    @property
    def initialized(self) -> bool:
        return self._codebook.initialized

    def encode(self, x: Tensor) -> Tensor:
        """``x [B, D, T]`` -> codes int64 ``[B, T]``."""
        return self._codebook.encode(self.project_in(x.transpose(1, 2)))

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, T]`` -> ``[B, D, T]``."""
        return self.project_out(self._codebook.decode(codes)).transpose(1, 2)

    def forward(self, x: Tensor, initialize: bool = True) -> _VQForwardResult:
        x = self.project_in(x.transpose(1, 2))
        quantized, codes, metrics = self._codebook(x, initialize=initialize)
        if self.training:
            quantized = x + (quantized - x).detach()
            loss = F.mse_loss(x, quantized.detach())
        else:
            loss = _zero_scalar(x.device)
        return _VQForwardResult(self.project_out(quantized).transpose(1, 2), codes, loss, metrics)


def _can_fuse(x: Tensor, levels: tp.Sequence[VectorQuantization], training: bool) -> bool:
    """Whether one ``residual_quantize`` call gives the per-level loop's numbers for ``levels`` on
    ``x [B, D, T]``: no level projects, the codes are in ``x``'s dtype, float32 or float64 (the op carries
    a half-precision residual in float32 from level to level, where the loop and Moshi round it at every
    level) and (training) every level is initialised."""
    if x.dim() != 3 or x.dtype not in (torch.float32, torch.float64):
        return False
    for layer in levels:
        codebook = layer._codebook
        if not isinstance(layer.project_in, nn.Identity) or codebook.embedding_sum.dtype != x.dtype:
            return False
        if codebook.dim != x.shape[1] or (training and not codebook.initialized):
            return False
    return True


class ResidualVectorQuantization(nn.Module):
    """Moshi's ``ResidualVectorQuantization``: ``num_quantizers`` :class:`VectorQuantization` levels,
    each quantizing what the levels before it left (SoundStream's Algorithm 1).

    Keyword-only ``num_quantizers``, ``codebook_offset`` (added to the level number in the per-level
    metric names), ``parity`` (Moshi's all-reduce of the buffers, see the module docstring); the other
    keyword arguments go to every level.

    ``forward(x [B, D, T], n_q=None)`` returns ``(quantized [B, D, T], codes [n_q, B, T], losses [n_q],
    metrics)``. In training the output's gradient reaches ``x`` straight through (``x + sg[q - x]``),
    each level's commitment loss trains the residual it saw, and a level may initialise by k-means only
    if the level before it was initialised before this call.
    """

    def __init__(self, *, num_quantizers: int, codebook_offset: int, parity: bool = False, **kwargs):
        super().__init__()
        _positive_int("num_quantizers", num_quantizers)
        if not isinstance(codebook_offset, int) or isinstance(codebook_offset, bool) or codebook_offset < 0:
            raise MoshiArgumentError(f"codebook_offset must be an int >= 0, got {codebook_offset!r}")
        self.layers = nn.ModuleList(VectorQuantization(parity=parity, **kwargs) for _ in range(num_quantizers))
        self.codebook_offset = codebook_offset
        self.parity = bool(parity)

    def _quantize_levels(
        self, x: Tensor, n_q: int
    ) -> tuple[Tensor, tp.List[Tensor], tp.List[Tensor], tp.Dict[str, Tensor]]:
        """The residual loop over the first ``n_q`` levels: ``(sum of the detached level outputs,
        codes per level, loss per level, metrics)``. Every level's search, loss and codebook update.

        All levels run in one ``fastvq.residual_quantize`` call (:meth:`_fused_levels`) in eval, and in
        training once every level is initialised. The loop stays for levels with ``codebook_dim``
        projections (the op has none per level) and for a training step where a level still needs its
        k-means initialisation: that draws random rows from the residual the levels before it leave,
        after their dead-code replacements drew theirs, so it cannot run ahead of them."""
        levels = self.layers[:n_q]
        if _can_fuse(x, levels, self.training):
            return self._fused_levels(x, levels, n_q)
        quantized_out = _zero_scalar(x.device)
        residual = x
        all_codes, all_losses = [], []
        all_metrics: tp.Dict[str, Tensor] = {}
        previous_initialized = True
        for level, layer in enumerate(levels):
            initialized_before = layer.initialized
            quantized, codes, loss, metrics = layer(residual, initialize=previous_initialized)
            if self.training:
                previous_initialized = initialized_before
            quantized = quantized.detach()
            residual = residual - quantized
            quantized_out = quantized_out + quantized
            all_codes.append(codes)
            all_losses.append(loss)
            self._collect_metrics(all_metrics, metrics, level, n_q)
        return quantized_out, all_codes, all_losses, all_metrics

    def _collect_metrics(self, all_metrics: tp.Dict[str, Tensor], metrics: tp.Dict[str, Tensor], level: int,
                         n_q: int) -> None:
        for key, value in metrics.items():
            all_metrics[key] = all_metrics[key] + value / n_q if key in all_metrics else value / n_q
            all_metrics[f"{key}_{level + self.codebook_offset}"] = value

    def _fused_levels(
        self, x: Tensor, levels: tp.Sequence["VectorQuantization"], n_q: int
    ) -> tuple[Tensor, tp.List[Tensor], tp.List[Tensor], tp.Dict[str, Tensor]]:
        """:meth:`_quantize_levels` with every level's search in one ``residual_quantize`` call; in training
        each level's dead-code check and EMA step then run level by level, in the loop's order (so the random
        draws are the same), from the op's per-level statistics."""
        batch, dim, frames = x.shape
        rows = x.transpose(1, 2).reshape(-1, dim)
        codebooks = torch.stack([layer.embedding for layer in levels])
        result = residual_quantize(rows, codebooks, straight_through="final", return_stats=self.training)
        level_codes = result.indices.T.reshape(len(levels), batch, frames)
        quantized_out = result.quantized.detach().view(batch, frames, dim).transpose(1, 2)
        all_metrics: tp.Dict[str, Tensor] = {}
        if not self.training:
            return quantized_out, list(level_codes), [_zero_scalar(x.device)] * len(levels), all_metrics
        synced = not self.parity and is_distributed()
        losses = (result.commitment / rows.numel()).to(x.dtype)
        residual = rows.detach()
        for level, layer in enumerate(levels):
            codebook = layer._codebook
            # Expire before the EMA step, as the loop does, on the rows this level saw (rebuilt as the loop
            # subtracts them, from the codes chosen before any update: `codebooks` is a copy).
            metrics = {"rvq_expired": codebook._check_expired_codes(residual)}
            counts, sums = result.counts[level], result.sums[level]
            if synced:
                # One [K, D + 1] collective per level, as the loop's (tests/nn/test_moshi.py counts them).
                counts, sums = _statistics_over_ranks(counts, sums, mean=True)
            codebook._fold_statistics(counts, sums, metrics)
            if level + 1 < len(levels):
                residual = residual - F.embedding(result.indices[:, level], codebooks[level])
            self._collect_metrics(all_metrics, metrics, level, n_q)  # n_q as the loop, even past len(levels)
        return quantized_out, list(level_codes), list(losses), all_metrics

    def forward(self, x: Tensor, n_q: tp.Optional[int] = None) -> _VQForwardResult:
        n_q = n_q or len(self.layers)
        quantized_out, all_codes, all_losses, all_metrics = self._quantize_levels(x, n_q)
        if self.training:
            # The straight-through estimator over the whole sum (encodec issue 25).
            quantized_out = x + (quantized_out - x).detach()
            if self.parity:
                growing: tp.List[Tensor] = []
                for layer in self.layers:
                    growing += [layer._codebook.cluster_usage, layer._codebook.embedding_sum]
                    _moshi_average_tensors(growing)
        return _VQForwardResult(quantized_out, torch.stack(all_codes), torch.stack(all_losses), all_metrics)

    def encode(self, x: Tensor, n_q: tp.Optional[int] = None) -> Tensor:
        """``x [B, D, T]`` -> codes ``[n_q, B, T]`` of the first ``n_q`` levels (all when ``None``)."""
        levels = self.layers[: n_q or len(self.layers)]
        if _can_fuse(x, levels, training=False):
            batch, dim, frames = x.shape
            codebooks = torch.stack([layer.embedding for layer in levels])
            indices = residual_quantize(x.detach().transpose(1, 2).reshape(-1, dim), codebooks).indices
            return indices.T.reshape(len(levels), batch, frames)
        residual = x
        all_codes = []
        for layer in levels:
            codes = layer.encode(residual)
            residual = residual - layer.decode(codes)
            all_codes.append(codes)
        return torch.stack(all_codes)

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[q, B, T]`` (``q`` at most the number of levels) -> the sum of their vectors ``[B, D, T]``."""
        quantized = _zero_scalar(codes.device)
        for level, level_codes in enumerate(codes):
            quantized = quantized + self.layers[level].decode(level_codes)
        return quantized


class _BaseQuantizer(nn.Module):
    """What Moshi's ``BaseQuantizer`` adds to a module: the ``ema_frozen`` flag (stored, as in
    Moshi 0.2.13, without effect on the quantizers) and the semantic/acoustic accessors."""

    def __init__(self):
        super().__init__()
        self._ema_frozen = False

    @property
    def semantic_quantizer(self) -> "_BaseQuantizer":
        return self

    @property
    def acoustic_quantizer(self) -> "_BaseQuantizer":
        return self

    @property
    def ema_frozen(self) -> bool:
        return self._ema_frozen

    def ema_frozen_(self, ema_frozen: bool) -> None:
        self._ema_frozen = ema_frozen


class ResidualVectorQuantizer(_BaseQuantizer):
    """Moshi's ``ResidualVectorQuantizer`` (Mimi's RVQ), with its arguments, order and defaults.

    Args:
        dimension: dimension of the codebooks.
        input_dimension, output_dimension: channels of the input and the output (``None``:
            ``dimension``); a bias-free ``Conv1d(kernel_size=1)`` ``input_proj``/``output_proj`` maps
            between them and ``dimension`` where they differ, or always with ``force_projection``.
        n_q: number of levels.
        q_dropout: in training, use a random number of levels in ``[1, n_q]`` per call, drawn from
            ``rng_dropout = random.Random(1234)``.
        no_quantization_rate: in training, the probability per batch item of passing the projected
            input through unquantized (the codebooks still learn from it).
        bins: codes per level.
        decay: EMA decay of the codebooks.
        threshold_usage_ratio, replaced_usage_ratio: dead-code replacement, see :class:`EuclideanCodebook`.
        codebook_offset: added to the level number in the per-level metric names.
        force_projection: build the projections even where the dimensions agree.
        parity: keyword only; average the buffers over ranks Moshi's way (a growing list of
            all-reduces per step) instead of once per level (see the module docstring).

    ``forward(x [B, input_dimension, T], frame_rate)`` returns :class:`QuantizedResult`: ``x [B,
    output_dimension, T]``, ``codes`` int64 ``[B, n_q, T]``, ``bandwidth`` ``n_q * log2(bins) *
    frame_rate / 1000`` kbit/s, ``penalty`` the mean of the levels' commitment losses (0 in eval),
    ``metrics`` (training) ``rvq_expired`` and ``rvq_entropy`` averaged over levels and per level.
    ``encode(x)`` -> codes ``[B, n_q, T]``; ``decode(codes [B, K, T])`` -> ``[B, output_dimension, T]``.

    Raises:
        MoshiArgumentError (a ``ValueError``): a bad argument. TypeError: a non-float input, float codes.
    """

    def __init__(
        self,
        dimension: int = 128,
        input_dimension: tp.Optional[int] = None,
        output_dimension: tp.Optional[int] = None,
        n_q: int = 8,
        q_dropout: bool = False,
        no_quantization_rate: float = 0.0,
        bins: int = 1024,
        decay: float = 0.99,
        threshold_usage_ratio: float = 0.1,
        replaced_usage_ratio: float = 1.0,
        codebook_offset: int = 0,
        force_projection: bool = False,
        *,
        parity: bool = False,
    ):
        super().__init__()
        for name, value in (("input_dimension", input_dimension), ("output_dimension", output_dimension)):
            if value is not None:
                _positive_int(name, value)
        self.max_n_q = _positive_int("n_q", n_q)
        self.n_q = n_q
        self.q_dropout = q_dropout
        self.no_quantization_rate = _real_in("no_quantization_rate", no_quantization_rate, 0.0, 1.0)
        self.dimension = _positive_int("dimension", dimension)
        self.input_dimension = input_dimension or dimension
        self.output_dimension = output_dimension or dimension
        self.bins = _positive_int("bins", bins)
        self.decay = decay
        self.parity = bool(parity)
        self.rng_dropout = random.Random(1234)
        self.input_proj: nn.Module
        self.output_proj: nn.Module
        if self.input_dimension == self.dimension and not force_projection:
            self.input_proj = nn.Identity()
        else:
            self.input_proj = nn.Conv1d(self.input_dimension, self.dimension, 1, bias=False)
        if self.output_dimension == self.dimension and not force_projection:
            self.output_proj = nn.Identity()
        else:
            self.output_proj = nn.Conv1d(self.dimension, self.output_dimension, 1, bias=False)
        self.vq = ResidualVectorQuantization(
            dim=self.dimension, codebook_size=self.bins, num_quantizers=self.n_q, decay=self.decay,
            threshold_usage_ratio=threshold_usage_ratio, replaced_usage_ratio=replaced_usage_ratio,
            codebook_offset=codebook_offset, parity=parity,
        )

    def forward(self, x: Tensor, frame_rate: int) -> QuantizedResult:
        _check_channels(x, self.input_dimension)
        n_q = self.n_q
        x = self.input_proj(x)
        if self.training and self.q_dropout:
            n_q = self.rng_dropout.randint(1, self.n_q)
        bandwidth_per_level = math.log2(self.bins) * frame_rate / 1000
        quantized, codes, commit_loss, metrics = self.vq(x, n_q=n_q)
        if self.training and self.no_quantization_rate > 0:
            keep_input = (torch.rand(x.shape[0], 1, 1, device=x.device) <= self.no_quantization_rate).float()
            quantized = x * keep_input + (1 - keep_input) * quantized
        quantized = self.output_proj(quantized)
        bandwidth = torch.tensor(n_q * bandwidth_per_level).to(x)
        return QuantizedResult(quantized, codes.transpose(0, 1), bandwidth, penalty=torch.mean(commit_loss),
                               metrics=metrics)

    def encode(self, x: Tensor) -> Tensor:
        """``x [B, input_dimension, T]`` -> codes int64 ``[B, n_q, T]``."""
        _check_channels(x, self.input_dimension)
        if x.shape[-1] == 0:
            return torch.empty((x.shape[0], self.n_q, 0), device=x.device, dtype=torch.int64)
        return self.vq.encode(self.input_proj(x), n_q=self.n_q).transpose(0, 1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, T]`` (``K <= total_codebooks``, each in ``[0, bins)``, unchecked to avoid a host
        sync, as in Moshi) -> ``[B, output_dimension, T]``."""
        _check_codes(codes, self.max_n_q)
        return self.output_proj(self.vq.decode(codes.transpose(0, 1)))

    @property
    def total_codebooks(self) -> int:
        return self.max_n_q

    @property
    def num_codebooks(self) -> int:
        return self.n_q

    def set_num_codebooks(self, n: int) -> None:
        if not isinstance(n, int) or not 0 <= n <= self.max_n_q:
            raise MoshiArgumentError(f"n must be an int in [0, {self.max_n_q}], got {n!r}")
        self.n_q = n

    @property
    def cardinality(self) -> int:
        return self.bins

    @classmethod
    def from_original(cls, module: nn.Module, *, parity: bool = False) -> "ResidualVectorQuantizer":
        """The fastvq equivalent of Moshi's ``ResidualVectorQuantizer`` instance ``module``: the same
        configuration, parameters, buffers, mode, device and dtype, and the same quantizer-dropout RNG
        state and dead-code check counters, so both continue alike."""
        codebook = module.vq.layers[0]._codebook
        force_projection = isinstance(module.input_proj, nn.Conv1d) and module.input_dimension == module.dimension
        force_projection |= isinstance(module.output_proj, nn.Conv1d) and module.output_dimension == module.dimension
        ours = cls(
            dimension=module.dimension, input_dimension=module.input_dimension,
            output_dimension=module.output_dimension, n_q=module.max_n_q, q_dropout=module.q_dropout,
            no_quantization_rate=module.no_quantization_rate, bins=module.bins, decay=module.decay,
            threshold_usage_ratio=codebook.threshold_usage_ratio, replaced_usage_ratio=codebook.replaced_usage_ratio,
            codebook_offset=module.vq.codebook_offset, force_projection=force_projection, parity=parity,
        )
        ours._copy_state_of(module)
        return adopt_tensors(ours, module)

    def _copy_state_of(self, module: nn.Module) -> None:
        self.to(device=module.vq.layers[0]._codebook.embedding_sum.device,
                dtype=module.vq.layers[0]._codebook.embedding_sum.dtype)
        self.load_state_dict(module.state_dict(), strict=True)
        self.n_q = module.n_q
        self.rng_dropout.setstate(module.rng_dropout.getstate())
        self._ema_frozen = getattr(module, "_ema_frozen", False)
        for ours, theirs in zip(self.vq.layers, module.vq.layers):
            ours._codebook.epsilon = ours.epsilon = theirs._codebook.epsilon
            ours._codebook.check_unused_every = theirs._codebook.check_unused_every
            ours._codebook._next_unused_check = theirs._codebook._next_unused_check
        self.train(module.training)


class SplitResidualVectorQuantizer(_BaseQuantizer):
    """Moshi's ``SplitResidualVectorQuantizer`` (Mimi's): a semantic RVQ ``rvq_first`` of ``n_q_semantic``
    levels and an acoustic RVQ ``rvq_rest`` of ``n_q - n_q_semantic`` levels, both on the same input,
    each with its own projections (``force_projection=True``); their outputs and codes are added and
    concatenated.

    Keyword-only ``n_q=8``, ``n_q_semantic=1`` (``n_q > n_q_semantic``), ``parity`` and the other
    :class:`ResidualVectorQuantizer` arguments, shared by both (``q_dropout`` only for ``rvq_rest``).
    The penalty and the averaged metrics are the two quantizers' weighted by their numbers of
    levels used. ``encode``/``decode`` work on ``[B, K, T]`` codes, semantic levels first.
    """

    def __init__(self, *, n_q: int = 8, n_q_semantic: int = 1, **kwargs):
        super().__init__()
        _positive_int("n_q", n_q)
        _positive_int("n_q_semantic", n_q_semantic)
        if n_q <= n_q_semantic:
            raise MoshiArgumentError(
                f"Number of quantizers {n_q} must be larger than the number of semantic quantizers {n_q_semantic}."
            )
        self.max_n_q = n_q
        self.n_q_semantic = n_q_semantic
        self.n_q_acoustic = n_q - n_q_semantic
        q_dropout = kwargs.pop("q_dropout", False)
        self.rvq_first = ResidualVectorQuantizer(n_q=n_q_semantic, force_projection=True, q_dropout=False, **kwargs)
        self.rvq_rest = ResidualVectorQuantizer(
            n_q=n_q - n_q_semantic, codebook_offset=1, force_projection=True, q_dropout=q_dropout, **kwargs
        )

    @staticmethod
    def _renorm_and_add(first_val: Tensor, rest_val: Tensor, n_q_semantic: int, n_q_acoustic: int) -> Tensor:
        n_q = n_q_semantic + n_q_acoustic
        return first_val * n_q_semantic / n_q + rest_val * n_q_acoustic / n_q

    def forward(self, x: Tensor, frame_rate: int) -> QuantizedResult:
        semantic = self.rvq_first(x, frame_rate)
        if self.n_q == self.n_q_semantic:
            return semantic
        acoustic = self.rvq_rest(x, frame_rate)
        # The levels actually used, after quantizer dropout.
        n_q_semantic, n_q_acoustic = semantic.codes.shape[1], acoustic.codes.shape[1]
        metrics = semantic.metrics
        for key, value in acoustic.metrics.items():
            metrics[key] = self._renorm_and_add(metrics[key], value, n_q_semantic, n_q_acoustic) \
                if key in metrics else value
        return QuantizedResult(
            semantic.x + acoustic.x,
            torch.cat([semantic.codes, acoustic.codes], dim=1),
            semantic.bandwidth + acoustic.bandwidth,
            penalty=self._renorm_and_add(semantic.penalty, acoustic.penalty, n_q_semantic, n_q_acoustic),
            metrics=metrics,
        )

    def encode(self, x: Tensor) -> Tensor:
        """``x [B, input_dimension, T]`` -> codes int64 ``[B, n_q, T]``, semantic levels first."""
        codes = self.rvq_first.encode(x)
        if self.n_q > self.n_q_semantic:
            codes = torch.cat([codes, self.rvq_rest.encode(x)], dim=1)
        return codes

    def decode(self, codes: Tensor) -> Tensor:
        """codes ``[B, K, T]`` with ``n_q_semantic <= K <= total_codebooks`` -> ``[B, output_dimension, T]``."""
        _check_codes(codes, self.total_codebooks)
        quantized = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.shape[1] > self.n_q_semantic:
            quantized = quantized + self.rvq_rest.decode(codes[:, self.n_q_semantic :])
        return quantized

    @property
    def total_codebooks(self) -> int:
        return self.rvq_first.max_n_q + self.rvq_rest.max_n_q

    @property
    def num_codebooks(self) -> int:
        return self.rvq_first.num_codebooks + self.rvq_rest.num_codebooks

    @property
    def n_q(self) -> int:
        return self.rvq_first.n_q + self.rvq_rest.n_q

    @property
    def dimension(self) -> int:
        return self.rvq_first.dimension

    @property
    def semantic_quantizer(self) -> ResidualVectorQuantizer:
        return self.rvq_first

    @property
    def acoustic_quantizer(self) -> ResidualVectorQuantizer:
        return self.rvq_rest

    def set_num_codebooks(self, n: int) -> None:
        if not isinstance(n, int) or not self.n_q_semantic <= n <= self.total_codebooks:
            raise MoshiArgumentError(f"n must be an int in [{self.n_q_semantic}, {self.total_codebooks}], got {n!r}")
        self.rvq_rest.set_num_codebooks(n - self.n_q_semantic)

    @property
    def cardinality(self) -> int:
        return self.rvq_first.cardinality

    @classmethod
    def from_original(cls, module: nn.Module, *, parity: bool = False) -> "SplitResidualVectorQuantizer":
        """The fastvq equivalent of Moshi's ``SplitResidualVectorQuantizer`` instance ``module``, with its
        configuration and state (see :meth:`ResidualVectorQuantizer.from_original`)."""
        first, rest = module.rvq_first, module.rvq_rest
        codebook = first.vq.layers[0]._codebook
        ours = cls(
            n_q=module.max_n_q, n_q_semantic=module.n_q_semantic, dimension=first.dimension,
            input_dimension=first.input_dimension, output_dimension=first.output_dimension,
            q_dropout=rest.q_dropout, no_quantization_rate=first.no_quantization_rate, bins=first.bins,
            decay=first.decay, threshold_usage_ratio=codebook.threshold_usage_ratio,
            replaced_usage_ratio=codebook.replaced_usage_ratio, parity=parity,
        )
        ours.rvq_first._copy_state_of(first)
        ours.rvq_rest._copy_state_of(rest)
        ours._ema_frozen = getattr(module, "_ema_frozen", False)
        return adopt_tensors(ours.train(module.training), module)
