"""audiocraft's residual vector quantizer (MusicGen's and AudioGen's EnCodec) on fastvq's ops.

``audiocraft.quantization``'s :class:`ResidualVectorQuantizer` and what it is made of
(:class:`ResidualVectorQuantization`, :class:`VectorQuantization`, :class:`EuclideanCodebook`) with
audiocraft's class names, constructor arguments, return structures (:class:`QuantizedResult`), methods
and state_dict keys (``vq.layers.{i}._codebook.{inited, cluster_size, embed, embed_avg}``), so that a
checkpoint moves between the two in either direction. audiocraft computes every level's ``N x K``
distance matrix and, to train, an ``N x K`` one-hot matrix; here each level is one fused search
(``fastvq.functional.vector_quantize`` / ``nearest_code``) and one segment sum (``segment_reduce``).

Where audiocraft is wrong, this module is right by default, and ``parity=True`` (keyword-only, on every
class) reproduces audiocraft, random draw for random draw, for comparisons against the original:

- dead codes: audiocraft replaces an expired code's ``embed`` row and then, in the same forward, the
  EMA step recomputes every row as ``embed_avg / cluster_size``, so the replacement never survives.
  Here the EMA step runs first and the replaced codes also get ``embed_avg = sample * threshold`` and
  ``cluster_size = threshold`` (as vector-quantize-pytorch and espnet's later copies do), so they stay.
- k-means initialisation: audiocraft sets ``embed_avg`` to the centroids while ``cluster_size`` holds
  the cluster counts, so the first EMA step divides every code by its count (codes shrink by ``N / K``
  and recover over hundreds of steps). Here ``embed_avg = centroids * counts``, as vector-quantize-pytorch.
- ``torch.distributed``: audiocraft never sums the EMA statistics over ranks (each replica's codebook
  drifts its own way between broadcasts). Here each level's counts and sums are summed over ranks in
  one collective per step (no host synchronisation; functional collectives under ``torch.compile``),
  and the k-means seeds and dead-code replacements are drawn from all ranks' rows.

The residual straight-through estimator is audiocraft's: each level's output is detached, and the
sum's gradient reaches the input through ``x + (quantized - x).detach()`` (training only); each
level's commitment loss ``mse(sg[q_i], r_i)`` reaches the input through the (undetached) residual.
"""

from __future__ import annotations

import math
import typing as tp
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._distributed import all_reduce_sum_, broadcast_from_first, is_distributed, sample_rows
from ..clustering import kmeans
from ..losses import orthogonal_loss
from ..ops.residual_quantize import residual_quantize
from ..ops.search import nearest_code
from ..ops.segment_reduce import apply_ema_, segment_reduce
from ..ops.vector_quantize import vector_quantize
from ._adopt import adopt_tensors

__all__ = [
    "QuantizedResult",
    "EuclideanCodebook",
    "VectorQuantization",
    "ResidualVectorQuantization",
    "ResidualVectorQuantizer",
]


@dataclass
class QuantizedResult:
    """audiocraft's result: ``x`` the quantized ``[B, D, T]``, ``codes [B, K, T]``, ``bandwidth`` (kb/s,
    a scalar in ``x``'s dtype), ``penalty`` (the mean of the levels' losses) and ``metrics`` (a dict)."""

    x: Tensor
    codes: Tensor
    bandwidth: Tensor
    penalty: tp.Optional[Tensor] = None
    metrics: dict = field(default_factory=dict)


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_float(name: str, value: object, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
        raise ValueError(f"{name} must be a float in [{low}, {high}], got {value!r}")


def _check_codes(codes: object, name: str, num_codes: int) -> Tensor:
    if not isinstance(codes, Tensor) or codes.dtype not in (torch.int64, torch.int32):
        found = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"{name} must be an int64 or int32 tensor, got {found}")
    if not torch.compiler.is_compiling() and codes.numel() and bool(((codes < 0) | (codes >= num_codes)).any()):
        raise ValueError(f"{name} must lie in [0, {num_codes}), got values in [{int(codes.min())}, {int(codes.max())}]")
    return codes


def _sample_vectors(samples: Tensor, num: int) -> Tensor:
    """``num`` rows of ``samples [M, D]`` (distinct when there are enough), drawn as audiocraft and Moshi draw
    them (the same random calls)."""
    num_samples = samples.shape[0]
    if num_samples >= num:
        picks = torch.randperm(num_samples, device=samples.device)[:num]
    else:
        picks = torch.randint(0, num_samples, (num,), device=samples.device)
    return samples[picks]


def _statistics_over_ranks(counts: Tensor, sums: Tensor, *, mean: bool = False) -> tuple[Tensor, Tensor]:
    """Per-code ``counts [..., K]`` and ``sums [..., K, D]`` summed over the ranks (averaged with ``mean``, as
    Moshi) in one collective: the counts ride along as the sums' last column. Returns ``(counts, sums)``."""
    packed = all_reduce_sum_(torch.cat((sums, counts[..., None]), dim=-1))
    if mean and is_distributed():
        packed.div_(dist.get_world_size())
    return packed[..., -1], packed[..., :-1]


@torch.no_grad()
def _broadcast_buffers_(module: nn.Module) -> None:
    """Rank 0's buffers on every rank (what audiocraft's ``flashy.distrib.broadcast_tensors`` and Moshi's
    codebook do)."""
    if is_distributed():
        for buffer in module.buffers():
            buffer.copy_(broadcast_from_first(buffer))


class EuclideanCodebook(nn.Module):
    """audiocraft's ``EuclideanCodebook``: ``codebook_size`` codes of ``dim`` features trained by EMA.

    Args (audiocraft's order and defaults):
        dim: the code dimension ``D``.
        codebook_size: the number of codes ``K``.
        kmeans_init: start from zeros and run k-means (``kmeans_iters`` Lloyd steps from ``K`` rows
            drawn from the first training batch, empty clusters keep their seed) on that batch; else
            start from ``kaiming_uniform_`` codes.
        kmeans_iters: Lloyd iterations of the initialisation, ``>= 1`` with ``kmeans_init``.
        decay: the EMA decay in ``[0, 1]``. epsilon: the Laplace smoothing of the cluster sizes.
        threshold_ema_dead_code: codes whose EMA cluster size falls below it are replaced by rows of the
            batch (0 turns that off).
        parity: keyword-only; reproduce audiocraft's dead-code, k-means and distributed behaviour (see
            the module's docstring) instead of fastvq's.

    Buffers (audiocraft's names): ``inited [1]`` (float, 1 once initialised), ``cluster_size [K]``,
    ``embed [K, D]``, ``embed_avg [K, D]``.

    ``forward(x [..., D])`` returns ``(quantize [..., D], embed_ind [...])``, the codes chosen before this
    step's update (no gradient); in training it initialises, expires dead codes and applies the EMA.

    Raises:
        ValueError: a non-positive ``dim``/``codebook_size``, ``decay`` outside ``[0, 1]``, a negative
            ``epsilon``/``threshold_ema_dead_code``, ``kmeans_iters < 1`` with ``kmeans_init``; in the
            forward, input whose last dimension is not ``dim``.
        TypeError: non-float input.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        kmeans_init: int = False,
        kmeans_iters: int = 10,
        decay: float = 0.8,
        epsilon: float = 1e-5,
        threshold_ema_dead_code: int = 2,
        *,
        parity: bool = False,
    ):
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("codebook_size", codebook_size)
        if kmeans_init:
            _check_positive_int("kmeans_iters", kmeans_iters)
        _check_float("decay", decay, 0.0, 1.0)
        _check_float("epsilon", epsilon, 0.0)
        _check_float("threshold_ema_dead_code", threshold_ema_dead_code, 0.0)
        self.decay = decay
        if kmeans_init:
            embed = torch.zeros(codebook_size, dim)
        else:
            embed = torch.empty(codebook_size, dim)
            nn.init.kaiming_uniform_(embed)
        self.codebook_size = codebook_size
        self.kmeans_iters = kmeans_iters
        self.epsilon = epsilon
        self.threshold_ema_dead_code = threshold_ema_dead_code
        self.parity = bool(parity)
        self.register_buffer("inited", torch.Tensor([not kmeans_init]))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed", embed)
        self.register_buffer("embed_avg", embed.clone())
        # A Python mirror of `inited`: the k-means branch is decided without reading a device tensor.
        self._inited = not kmeans_init
        self._register_load_state_dict_pre_hook(self._mirror_inited)

    def _mirror_inited(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "inited" in state_dict:
            self._inited = bool(state_dict[prefix + "inited"].reshape(-1)[0])

    # ------------------------------------------------------------------ initialisation and dead codes

    @torch.no_grad()
    def init_embed_(self, data: Tensor) -> None:
        """k-means on the rows ``data [N, D]`` when the codebook is not initialised yet."""
        if self._inited:
            return
        rows = data.detach()
        synced = not self.parity and is_distributed()
        if synced:
            seeds, _ = sample_rows(rows.float(), self.codebook_size, synced=True)
        else:
            seeds = _sample_vectors(rows, self.codebook_size)
        # every iteration on all rows (no sample), as audiocraft's kmeans
        result = kmeans(rows, self.codebook_size, iters=self.kmeans_iters, init=seeds, tol=None,
                        empty_clusters="keep", sync=synced, max_points_per_centroid=None)
        counts = torch.bincount(result.assignments, minlength=self.codebook_size).to(self.cluster_size.dtype)
        if synced:
            all_reduce_sum_(counts)
        centroids = result.centroids.to(self.embed.dtype)
        self.embed.copy_(centroids)
        self.embed_avg.copy_(centroids if self.parity else centroids * counts[:, None])
        self.cluster_size.copy_(counts)
        self.inited.fill_(1.0)
        self._inited = True
        if self.parity:
            _broadcast_buffers_(self)

    @torch.no_grad()
    def replace_(self, samples: Tensor, mask: Tensor) -> None:
        """Replaces the codes where ``mask [K]`` by rows of ``samples [M, D]``, drawn as audiocraft
        draws them; outside ``parity`` their EMA statistics restart from ``threshold_ema_dead_code``
        members at the drawn row, so the next EMA step keeps them."""
        drawn = _sample_vectors(samples, self.codebook_size).to(self.embed.dtype)
        self._overwrite_(mask, drawn)

    def _overwrite_(self, mask: Tensor, drawn: Tensor) -> None:
        self.embed.copy_(torch.where(mask[:, None], drawn, self.embed))
        if self.parity:
            return
        reset = float(self.threshold_ema_dead_code)
        self.embed_avg.copy_(torch.where(mask[:, None], drawn.to(self.embed_avg.dtype) * reset, self.embed_avg))
        self.cluster_size.copy_(torch.where(mask, torch.full_like(self.cluster_size, reset), self.cluster_size))

    @torch.no_grad()
    def expire_codes_(self, batch_samples: Tensor) -> None:
        """Replaces the codes whose EMA cluster size is below ``threshold_ema_dead_code`` by rows of
        ``batch_samples [..., D]``. In eager mode the replacement is skipped when no code expired (one
        host synchronisation, as audiocraft); under ``torch.compile`` (outside ``parity``) rows are drawn
        every step and written only where codes expired, with no host synchronisation."""
        if self.threshold_ema_dead_code == 0:
            return
        expired = self.cluster_size < self.threshold_ema_dead_code
        samples = batch_samples.reshape(-1, batch_samples.shape[-1])
        if self.parity:
            if not torch.any(expired):
                return
            self.replace_(samples, mask=expired)
            _broadcast_buffers_(self)
            return
        if not torch.compiler.is_compiling() and not bool(expired.any()):
            return
        if not torch.compiler.is_compiling() and not is_distributed():
            self.replace_(samples, mask=expired)
            return
        drawn, found = sample_rows(samples, self.codebook_size, synced=True)
        self._overwrite_(expired & found, drawn.to(self.embed.dtype))

    # ------------------------------------------------------------------ EMA

    @torch.no_grad()
    def update_(self, rows: Tensor, indices: Tensor) -> None:
        """One training step of the codebook from the batch ``rows [N, D]`` and their codes
        ``indices [N]``: dead-code expiry and the EMA update, in audiocraft's order under ``parity``
        (expiry first), else EMA first (with the statistics summed over ranks), then expiry."""
        counts, sums = segment_reduce(rows, indices, self.codebook_size,
                                      deterministic=torch.are_deterministic_algorithms_enabled())
        if not self.parity and is_distributed():
            counts, sums = _statistics_over_ranks(counts, sums)  # one collective per level
        self.update_from_statistics_(rows, counts, sums)

    @torch.no_grad()
    def update_from_statistics_(self, rows: Tensor, counts: Tensor, sums: Tensor) -> None:
        """:meth:`update_` from this step's per-code ``counts [K]`` and ``sums [K, D]`` (float32, already
        summed over ranks outside ``parity``) of the batch ``rows [N, D]`` (read only to replace dead codes;
        may be None when ``threshold_ema_dead_code`` is 0)."""
        if self.parity:
            self.expire_codes_(rows)
            self._apply_ema_(counts, sums)
            return
        self._apply_ema_(counts, sums)
        self.expire_codes_(rows)

    def _apply_ema_(self, counts: Tensor, sums: Tensor) -> None:
        apply_ema_(codebook=self.embed, cluster_size=self.cluster_size, embed_avg=self.embed_avg, counts=counts,
                   sums=sums, decay=float(self.decay), eps=float(self.epsilon), step=None)

    # ------------------------------------------------------------------ audiocraft's methods

    def preprocess(self, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1])

    def quantize(self, x: Tensor) -> Tensor:
        """The nearest code of every row of ``x [N, D]``: int64 ``[N]``."""
        indices, _ = nearest_code(x, self.embed, metric="l2")
        return indices

    def postprocess_emb(self, embed_ind: Tensor, shape: torch.Size) -> Tensor:
        return embed_ind.view(*shape[:-1])

    def dequantize(self, embed_ind: Tensor) -> Tensor:
        return F.embedding(embed_ind, self.embed)

    def encode(self, x: Tensor) -> Tensor:
        """The codes of ``x [..., D]``: int64 ``[...]``."""
        self._check_input(x)
        return self.postprocess_emb(self.quantize(self.preprocess(x)), x.shape)

    def decode(self, embed_ind: Tensor) -> Tensor:
        """The codes at ``embed_ind [...]``: ``[..., D]``."""
        return self.dequantize(_check_codes(embed_ind, "embed_ind", self.codebook_size))

    def _check_input(self, x: object) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() < 1 or x.shape[-1] != self.embed.shape[1]:
            raise ValueError(f"x must be [..., {self.embed.shape[1]}], got shape {tuple(x.shape)}")

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_input(x)
        rows = self.preprocess(x)
        if self.training:
            self.init_embed_(rows)
        embed_ind, _, quantize = nearest_code(rows, self.embed, metric="l2", return_codes=True)
        if self.training:
            self.update_(rows.detach(), embed_ind)
        return quantize.view(x.shape), self.postprocess_emb(embed_ind, x.shape)


class VectorQuantization(nn.Module):
    """audiocraft's ``VectorQuantization``: one level, input ``[B, D, T]`` (``[B, T, D]`` with
    ``channels_last``), optional linear projections to a ``codebook_dim`` codebook.

    Args (audiocraft's order and defaults): ``dim, codebook_size, codebook_dim=None, decay=0.8,
    epsilon=1e-5, kmeans_init=False, kmeans_iters=10, threshold_ema_dead_code=2, channels_last=False,
    commitment_weight=1.0, orthogonal_reg_weight=0.0, orthogonal_reg_active_codes_only=False,
    orthogonal_reg_max_codes=None``, and keyword-only ``parity`` (see :class:`EuclideanCodebook`).

    ``forward(x)`` returns ``(quantize, embed_ind [B, T], loss [1])``. In training ``quantize`` carries
    the straight-through gradient and ``loss = commitment_weight * mse(sg[quantize], x) +
    orthogonal_reg_weight * orthogonal(embed)``; in eval ``loss`` is 0. The orthogonal term is measured
    on the codebook after this step's EMA update (on this batch's codes only with
    ``orthogonal_reg_active_codes_only``, on ``orthogonal_reg_max_codes`` random ones of them when set):
    the codes are buffers, so as in audiocraft it adds to the loss's value but not to any gradient.

    Raises:
        ValueError: negative weights, ``orthogonal_reg_max_codes`` not a positive int; as
            :class:`EuclideanCodebook`; in the forward, input of the wrong shape.
        TypeError: non-float input; non-integer codes to :meth:`decode`.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        codebook_dim: tp.Optional[int] = None,
        decay: float = 0.8,
        epsilon: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: int = 2,
        channels_last: bool = False,
        commitment_weight: float = 1.0,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: tp.Optional[int] = None,
        *,
        parity: bool = False,
    ):
        super().__init__()
        _check_positive_int("dim", dim)
        codebook_dim = dim if codebook_dim is None else codebook_dim
        _check_positive_int("codebook_dim", codebook_dim)
        _check_float("commitment_weight", commitment_weight, 0.0)
        _check_float("orthogonal_reg_weight", orthogonal_reg_weight, 0.0)
        if orthogonal_reg_max_codes is not None:
            _check_positive_int("orthogonal_reg_max_codes", orthogonal_reg_max_codes)
        requires_projection = codebook_dim != dim
        self.project_in = nn.Linear(dim, codebook_dim) if requires_projection else nn.Identity()
        self.project_out = nn.Linear(codebook_dim, dim) if requires_projection else nn.Identity()
        self.epsilon = epsilon
        self.commitment_weight = commitment_weight
        self.orthogonal_reg_weight = orthogonal_reg_weight
        self.orthogonal_reg_active_codes_only = orthogonal_reg_active_codes_only
        self.orthogonal_reg_max_codes = orthogonal_reg_max_codes
        self._codebook = EuclideanCodebook(dim=codebook_dim, codebook_size=codebook_size, kmeans_init=kmeans_init,
                                           kmeans_iters=kmeans_iters, decay=decay, epsilon=epsilon,
                                           threshold_ema_dead_code=threshold_ema_dead_code, parity=parity)
        self.codebook_size = codebook_size
        self.channels_last = channels_last
        self.dim = dim

    @property
    def codebook(self) -> Tensor:
        return self._codebook.embed

    @property
    def inited(self) -> Tensor:
        return self._codebook.inited

    def _preprocess(self, x: Tensor) -> Tensor:
        return x if self.channels_last else x.transpose(1, 2)

    def _postprocess(self, quantize: Tensor) -> Tensor:
        return quantize if self.channels_last else quantize.transpose(1, 2)

    def _check_input(self, x: object) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        axis = 2 if self.channels_last else 1
        if x.dim() != 3 or x.shape[axis] != self.dim:
            layout = "[B, T, D]" if self.channels_last else "[B, D, T]"
            raise ValueError(f"x must be {layout} with D = {self.dim}, got shape {tuple(x.shape)}")

    def encode(self, x: Tensor) -> Tensor:
        """The codes of ``x``: int64 ``[B, T]``."""
        self._check_input(x)
        return self._codebook.encode(self.project_in(self._preprocess(x)))

    def decode(self, embed_ind: Tensor) -> Tensor:
        """The quantized ``[B, D, T]`` (``[B, T, D]`` with ``channels_last``) of ``embed_ind [B, T]``."""
        return self._postprocess(self.project_out(self._codebook.decode(embed_ind)))

    def _level(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This level on the rows ``[N, dim]`` of its input: ``(quantized rows [N, dim], indices [N],
        loss [1])``, the quantized rows carrying the straight-through gradient in training. Training
        also initialises the codebook, applies its EMA step and adds the orthogonal term."""
        codebook = self._codebook
        projected = self.project_in(rows)
        if not self.training:
            indices, _, quantized = nearest_code(projected, codebook.embed, metric="l2", return_codes=True)
            return self.project_out(quantized), indices, rows.new_zeros(1, dtype=torch.float32)
        codebook.init_embed_(projected)
        quantized, indices, loss = vector_quantize(projected, codebook.embed, beta=float(self.commitment_weight),
                                                   codebook_weight=0.0, metric="l2")
        codebook.update_(projected.detach(), indices)
        if self.orthogonal_reg_weight > 0:
            loss = loss + self.orthogonal_reg_weight * self._orthogonal_penalty(indices)
        # audiocraft's loss is a float32 [1] tensor whatever the input's dtype.
        return self.project_out(quantized), indices, loss.reshape(1).to(torch.float32)

    def _orthogonal_penalty(self, indices: Tensor) -> Tensor:
        codes = self.codebook
        active = None
        if self.orthogonal_reg_active_codes_only:
            active = torch.zeros(codes.shape[0], dtype=torch.bool, device=codes.device).index_fill_(0, indices, True)
        if self.orthogonal_reg_max_codes is None:
            return orthogonal_loss(codes, active=active)
        # A random subset of the (active) codes, drawn as audiocraft draws it: one host synchronisation.
        if active is not None:
            codes = codes[active]
        if codes.shape[0] > self.orthogonal_reg_max_codes:
            codes = codes[torch.randperm(codes.shape[0], device=codes.device)[: self.orthogonal_reg_max_codes]]
        return orthogonal_loss(codes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self._check_input(x)
        layout = self._preprocess(x)
        quantized, indices, loss = self._level(layout.reshape(-1, self.dim))
        return self._postprocess(quantized.view(layout.shape)), indices.view(layout.shape[:-1]), loss


def _residual_levels(
    rows: Tensor, layers: tp.Sequence[VectorQuantization], *, detach_levels: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The residual levels on ``rows [N, D]``: ``(quantized sum [N, D], indices [L, N], losses [L, 1])``.

    Level ``i`` quantizes the residual ``r_i = rows - q_0 - ... - q_{i-1}``. Training adds each level's
    EMA step (and k-means initialisation) before the next level, in the libraries' order. The residual
    straight-through variant: with ``detach_levels`` (audiocraft) every level's output is detached, so
    the residual chain passes gradients unchanged and the sum gets its gradient from the caller's
    ``x + (q - x).detach()``; without it (EnCodec) ``r_{i+1} = r_i - q_i`` with ``q_i``'s straight-through
    gradient, so the chain's gradient cancels and only level 0 reaches the input.

    All levels run in one ``fastvq.residual_quantize`` call (:func:`_fused_residual_levels`) when it gives
    the loop's numbers: in eval always, in training when every level is initialised. The loop below stays
    for levels with ``codebook_dim`` projections (the op has no per-level projection) and for a training
    step where a level still needs its k-means initialisation: that draws random rows from the residual
    the levels before it leave, after their dead-code replacements drew theirs, so it cannot run ahead.
    """
    if _can_fuse(rows, layers):
        return _fused_residual_levels(rows, layers, detach_levels=detach_levels)
    residual, total = rows, None
    all_indices, all_losses = [], []
    for layer in layers:
        quantized, indices, loss = layer._level(residual)
        if detach_levels:
            quantized = quantized.detach()
        residual = residual - quantized
        total = quantized if total is None else total + quantized
        all_indices.append(indices)
        all_losses.append(loss)
    return total, torch.stack(all_indices), torch.stack(all_losses)


def _has_projection(layer: VectorQuantization) -> bool:
    return not isinstance(layer.project_in, nn.Identity)


def _fusable_levels(rows: Tensor, layers: tp.Sequence[VectorQuantization]) -> bool:
    """Whether one ``residual_quantize`` call computes these levels' codes as the loop does, in eval: no
    projection, codes in the rows' dtype, and float32/float64 (the op carries a half-precision residual
    in float32 from level to level, where the loop and the libraries round it at every level)."""
    if rows.dtype not in (torch.float32, torch.float64):
        return False
    return not any(_has_projection(layer) or layer._codebook.embed.dtype != rows.dtype for layer in layers)


def _can_fuse(rows: Tensor, layers: tp.Sequence[VectorQuantization]) -> bool:
    """Whether :func:`_fused_residual_levels` gives the per-level loop's numbers for these levels."""
    if not _fusable_levels(rows, layers):
        return False
    return not layers[0].training or all(layer._codebook._inited for layer in layers)


def _fused_residual_levels(
    rows: Tensor, layers: tp.Sequence[VectorQuantization], *, detach_levels: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_residual_levels` with every level's search in one ``residual_quantize`` call; in training
    each level's EMA step (and dead-code replacement, orthogonal term) then runs level by level, in the
    loop's order (so the random draws are the same), from the op's per-level statistics."""
    codebooks = torch.stack([layer._codebook.embed for layer in layers])
    training = layers[0].training
    result = residual_quantize(rows, codebooks, straight_through="final" if detach_levels else "per_level",
                               return_stats=training)
    indices = result.indices.T
    quantized = result.quantized.detach() if detach_levels else result.quantized
    if not training:
        return quantized, indices, rows.new_zeros(len(layers), 1, dtype=torch.float32)
    counts, sums = result.counts, result.sums
    if not layers[0]._codebook.parity and is_distributed():
        counts, sums = _statistics_over_ranks(counts, sums)  # every level's in one collective
    rebuild_residuals = any(layer._codebook.threshold_ema_dead_code > 0 for layer in layers)
    residual = rows.detach() if rebuild_residuals else None
    losses = []
    for level, layer in enumerate(layers):
        # The rows this level saw, for its dead-code replacement: rebuilt as the loop subtracts them, from
        # the codes chosen before any update (`codebooks` is a copy).
        layer._codebook.update_from_statistics_(residual, counts[level], sums[level])
        if rebuild_residuals and level + 1 < len(layers):
            residual = residual - F.embedding(indices[level], codebooks[level])
        loss = result.commitment[level] * (float(layer.commitment_weight) / rows.numel())
        if layer.orthogonal_reg_weight > 0:
            loss = loss + layer.orthogonal_reg_weight * layer._orthogonal_penalty(indices[level])
        losses.append(loss.reshape(1).to(torch.float32))
    return quantized, indices, torch.stack(losses)


class ResidualVectorQuantization(nn.Module):
    """audiocraft's ``ResidualVectorQuantization``: ``num_quantizers`` :class:`VectorQuantization`
    levels in ``layers`` (keyword arguments passed to each), Algorithm 1 of SoundStream.

    ``forward(x [B, D, T], n_q=None)`` returns ``(quantized [B, D, T], indices [n_q, B, T], losses
    [n_q, 1])`` using the first ``n_q`` levels (all when ``None``, 0 or more than there are);
    ``encode(x, n_q=None)`` the indices ``[n_q, B, T]``; ``decode(q_indices [n_q, B, T])`` the quantized sum.
    """

    # audiocraft's residual straight-through variant (see _residual_levels) and its level class.
    detach_levels = True
    level_class = VectorQuantization

    def __init__(self, *, num_quantizers: int, **kwargs):
        super().__init__()
        _check_positive_int("num_quantizers", num_quantizers)
        self.layers = nn.ModuleList([self.level_class(**kwargs) for _ in range(num_quantizers)])

    def _levels(self, n_q: tp.Optional[int]) -> tp.Sequence[VectorQuantization]:
        if n_q is not None and (isinstance(n_q, bool) or not isinstance(n_q, int) or n_q < 0):
            raise ValueError(f"n_q must be an int >= 0 or None, got {n_q!r}")
        # As the libraries slice: 0 or None is every level, more levels than there are is every level.
        return self.layers[: n_q or len(self.layers)]

    def forward(self, x: Tensor, n_q: tp.Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
        levels = self._levels(n_q)
        first = levels[0]
        first._check_input(x)
        layout = first._preprocess(x)
        rows = layout.reshape(-1, first.dim)
        quantized, indices, losses = _residual_levels(rows, levels, detach_levels=self.detach_levels)
        if self.training and self.detach_levels:
            # Solves the straight-through bug of residual VQ (facebookresearch/encodec#25), as audiocraft.
            quantized = rows + (quantized - rows).detach()
        quantized = first._postprocess(quantized.view(layout.shape))
        return quantized, indices.view(len(levels), *layout.shape[:-1]), losses

    def encode(self, x: Tensor, n_q: tp.Optional[int] = None) -> Tensor:
        levels = self._levels(n_q)
        first = levels[0]
        first._check_input(x)
        layout = first._preprocess(x)
        rows = layout.reshape(-1, first.dim)
        if _fusable_levels(rows, levels):
            codebooks = torch.stack([layer._codebook.embed for layer in levels])
            indices = residual_quantize(rows.detach(), codebooks).indices.T
            return indices.reshape(len(levels), *layout.shape[:-1])
        residual, all_indices = x, []
        for layer in levels:
            indices = layer.encode(residual)
            residual = residual - layer.decode(indices)
            all_indices.append(indices)
        return torch.stack(all_indices)

    def decode(self, q_indices: Tensor) -> Tensor:
        if not isinstance(q_indices, Tensor) or q_indices.dim() != 3 or not 0 < q_indices.shape[0] <= len(self.layers):
            raise ValueError(f"q_indices must be [K, B, T] with 1 <= K <= {len(self.layers)}, got "
                             f"{tuple(getattr(q_indices, 'shape', ()))}")
        quantized_out = None
        for layer, indices in zip(self.layers, q_indices):
            quantized = layer.decode(indices)
            quantized_out = quantized if quantized_out is None else quantized_out + quantized
        return quantized_out


class ResidualVectorQuantizer(nn.Module):
    """audiocraft's ``ResidualVectorQuantizer`` (``audiocraft.quantization.vq``).

    Args (audiocraft's order and defaults):
        dimension: the feature dimension ``D`` of the input ``[B, D, T]``. n_q: the number of levels.
        q_dropout: in training, use a random number of levels in ``[1, n_q]`` each forward (drawn with
            ``torch.randint`` on the host, as audiocraft; outside ``parity``, rank 0's draw on every rank).
        bins: codes per level. decay: EMA decay. kmeans_init, kmeans_iters: k-means initialisation on
            the first training batch. threshold_ema_dead_code: dead-code threshold (0 turns expiry off).
        orthogonal_reg_weight, orthogonal_reg_active_codes_only, orthogonal_reg_max_codes: the
            orthogonal regulariser of each level (see :class:`VectorQuantization`).
        parity: keyword-only; audiocraft's behaviour instead of fastvq's fixes (module docstring).

    ``forward(x [B, D, T], frame_rate)`` returns a :class:`QuantizedResult` with the quantized ``x``,
    ``codes [B, K, T]``, the ``bandwidth`` ``K * log2(bins) * frame_rate / 1000`` kb/s and the
    ``penalty`` (the mean of the levels' losses; 0 in eval). ``encode(x)`` gives ``[B, K, T]`` with the
    active number of levels, ``decode(codes [B, K, T])`` the quantized ``[B, D, T]``;
    ``set_num_codebooks(n)`` changes the active number (``AssertionError`` outside ``[1, n_q]``, as
    audiocraft); ``total_codebooks`` and ``num_codebooks`` are the two numbers.

    State: ``vq.layers.{i}._codebook.{inited, cluster_size, embed, embed_avg}``, audiocraft's keys.
    """

    def __init__(
        self,
        dimension: int = 256,
        n_q: int = 8,
        q_dropout: bool = False,
        bins: int = 1024,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: int = 2,
        orthogonal_reg_weight: float = 0.0,
        orthogonal_reg_active_codes_only: bool = False,
        orthogonal_reg_max_codes: tp.Optional[int] = None,
        *,
        parity: bool = False,
    ):
        super().__init__()
        self.max_n_q = n_q
        self.q_dropout = q_dropout
        _init_residual_quantizer(
            self, ResidualVectorQuantization, dimension, n_q, bins, parity, decay=decay, kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters, threshold_ema_dead_code=threshold_ema_dead_code,
            orthogonal_reg_weight=orthogonal_reg_weight,
            orthogonal_reg_active_codes_only=orthogonal_reg_active_codes_only,
            orthogonal_reg_max_codes=orthogonal_reg_max_codes,
        )

    @classmethod
    def from_original(cls, module: nn.Module, *, parity: bool = False) -> "ResidualVectorQuantizer":
        """The fastvq equivalent of an audiocraft ``ResidualVectorQuantizer`` instance: the same
        configuration (the active ``n_q`` included), its very buffers (``fastvq.swap_quantizers``' protocol) and its
        train/eval mode."""
        ours = _rebuilt(cls, module, ("dimension", "q_dropout", "bins", *_LEVEL_OPTIONS, *_ORTHOGONAL_OPTIONS),
                        parity=parity, n_q=module.max_n_q)
        ours.n_q = module.n_q
        return adopt_tensors(ours, module)

    def forward(self, x: Tensor, frame_rate: int) -> QuantizedResult:
        n_q = self.n_q
        if self.training and self.q_dropout:
            drawn = torch.randint(1, self.n_q + 1, (1,))
            if not self.parity:
                # Every rank must run the same levels: their statistics are summed level by level.
                drawn = broadcast_from_first(drawn.to(x.device))
            n_q = int(drawn.item())
        bw_per_q = math.log2(self.bins) * frame_rate / 1000
        quantized, codes, commit_loss = self.vq(x, n_q=n_q)
        bandwidth = torch.tensor(n_q * bw_per_q).to(x)
        return QuantizedResult(quantized, codes.transpose(0, 1), bandwidth, penalty=torch.mean(commit_loss))

    def encode(self, x: Tensor) -> Tensor:
        """The codes ``[B, K, T]`` of ``x [B, D, T]`` with the active number of levels ``K``."""
        return self.vq.encode(x, n_q=self.n_q).transpose(0, 1)

    def decode(self, codes: Tensor) -> Tensor:
        """The quantized ``[B, D, T]`` of ``codes [B, K, T]``."""
        if not isinstance(codes, Tensor) or codes.dim() != 3:
            raise ValueError(f"codes must be [B, K, T], got {tuple(getattr(codes, 'shape', ()))}")
        return self.vq.decode(codes.transpose(0, 1))

    @property
    def total_codebooks(self) -> int:
        return self.max_n_q

    @property
    def num_codebooks(self) -> int:
        return self.n_q

    def set_num_codebooks(self, n: int) -> None:
        if not 0 < n <= self.max_n_q:
            raise AssertionError(f"n must be in [1, {self.max_n_q}], got {n!r}")
        self.n_q = n


# The options of audiocraft's and EnCodec's ResidualVectorQuantizer that configure every level, stored as
# attributes of the same names; audiocraft adds the orthogonal regulariser's.
_LEVEL_OPTIONS = ("decay", "kmeans_init", "kmeans_iters", "threshold_ema_dead_code")
_ORTHOGONAL_OPTIONS = ("orthogonal_reg_weight", "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes")


def _init_residual_quantizer(module: nn.Module, vq_class: type, dimension: int, n_q: int, bins: int, parity: bool,
                             **level_options) -> None:
    """The constructor body audiocraft's and EnCodec's ``ResidualVectorQuantizer`` share: checks the sizes,
    stores the configuration under the constructor's argument names and builds ``module.vq``."""
    for name, value in (("dimension", dimension), ("n_q", n_q), ("bins", bins)):
        _check_positive_int(name, value)
    module.n_q, module.dimension, module.bins = n_q, dimension, bins
    for name, value in level_options.items():
        setattr(module, name, value)
    module.parity = bool(parity)
    module.vq = vq_class(dim=dimension, codebook_size=bins, num_quantizers=n_q, parity=parity, **level_options)


def _rebuilt(cls: type, original: nn.Module, names: tp.Sequence[str], **arguments) -> nn.Module:
    """``cls`` built from ``original``'s attributes ``names`` (as constructor arguments, with ``arguments``),
    moved to ``original``'s device and float dtype, its state loaded strictly and its mode copied."""
    ours = cls(**{name: getattr(original, name) for name in names}, **arguments)
    reference = next(iter(original.buffers()), None)
    if reference is not None:
        ours.to(device=reference.device, dtype=reference.dtype)
    ours.load_state_dict(original.state_dict(), strict=True)
    return ours.train(original.training)
