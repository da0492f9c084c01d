"""The pure-PyTorch helpers of fastvq's functional API that are not operators: finite scalar
quantization, the entropy and code-logit losses, the orthogonal regulariser and the gradient
estimators (rotation trick, directional reparameterisation).

They run as written, under autograd and ``torch.compile``; none of them builds an ``N x K`` matrix
at once (the code-logit losses work on checkpointed row chunks). ``fastvq.functional`` re-exports them.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from ._checks import check_real, check_tensor
from .backends.common import CHUNK_BYTES
from .ops.code_entropy import ENTROPY_EPS
from .ops.search import check_search_inputs

__all__ = [
    "finite_scalar_quantize",
    "clamped_entropy",
    "code_logits",
    "code_cross_entropy",
    "codebook_diversity_loss",
    "diversity_of_probabilities",
    "orthogonal_loss",
    "rotate_to",
    "directional_reparam",
]


# --------------------------------------------------------------------------- scalar quantization (FSQ)

# FSQ's bound keeps tanh(z) * half_l away from the outermost rounding boundary by this margin.
FSQ_BOUND_EPS = 1e-3


def _round_ste(t: Tensor) -> Tensor:
    return t + (t.round() - t).detach()


def _floor_ste(t: Tensor) -> Tensor:
    return t + (t.floor() - t).detach()


def finite_scalar_quantize(
    z: Tensor,
    levels: Tensor,
    *,
    preserve_symmetry: bool = False,
    hard_clamp: bool = False,
    paper_bound: bool = False,
) -> tuple[Tensor, Tensor]:
    """Finite scalar quantization (Mentzer et al. 2023): each of the last axis' ``d`` values is
    bounded and rounded to one of ``levels[i]`` values in ``[-1, 1]``, with straight-through gradients.

    The default is vector-quantize-pytorch 1.32's ``FSQ.bound``, to the bit: with ``L`` the level,
    ``half_l = (L - 1) (1 + 1e-3) / 2``, an offset of 0.5 for even ``L`` (so the levels are
    ``{-L/2, ..., L/2 - 1} / (L/2)``, asymmetric, as in the paper) and
    ``round(tanh(z + atanh(offset / half_l)) * half_l - offset) / (L // 2)``. ``hard_clamp``
    replaces tanh by ``clamp(-1, 1)`` (and atanh by the identity). ``preserve_symmetry`` is the
    symmetric quantizer of Parker et al. 2024 (arXiv 2411.19842, section 3.2):
    ``2 / (L - 1) * floor((L - 1) (tanh(z) + 1) / 2 + 0.5) - 1``, levels symmetric around 0.

    ``paper_bound`` uses the FSQ paper's Appendix A.1 bound as its authors corrected it
    (vector-quantize-pytorch issue #94: ``arctanh`` for the printed ``tan``):
    ``half_l = (L - 1) (1 - 1e-3) / 2``. vector-quantize-pytorch's ``1 + 1e-3`` lets the
    bounded value pass the last rounding boundary once ``(L - 1) / 2 * 1e-3 > 0.5``, i.e. for
    ``L > 1001``, where it rounds to an ``(L+1)``-th level and its index aliases into the next
    dimension's digit; the paper's bound never leaves the ``L`` levels.

    Args:
        z: ``[..., d]`` floating point (computed in its own dtype).
        levels: int ``[d]`` tensor of levels, each ``>= 2`` (``>= 3`` unless ``preserve_symmetry``;
            the plain bound's even-level shift ``atanh(0.5 / half_l)`` is about 3.8 at ``L = 2``,
            vector-quantize-pytorch issue #237, and undefined with ``paper_bound``).
        preserve_symmetry, hard_clamp, paper_bound: as above (``paper_bound`` affects the plain
            bound only).

    Returns:
        ``(codes, level_indices)``: ``codes`` like ``z``, each value one of its level's values in
        ``[-1, 1]``, with gradient straight through the rounding (and through tanh); and
        ``level_indices`` int64 ``[..., d]``, the level of each value in ``[0, L - 1]`` (a NaN input
        gets level 0; vector-quantize-pytorch's out-of-range levels at ``L > 1001`` are clamped).

    Raises:
        TypeError: ``z`` not a float tensor, ``levels`` not an integer tensor.
        ValueError: ``levels`` not 1-D of ``z``'s last size, or a level below the minimum.
    """
    z = check_tensor("z", z)
    levels = check_tensor("levels", levels)
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor, got dtype {z.dtype} with shape {tuple(z.shape)}")
    if levels.is_floating_point() or levels.is_complex() or levels.dtype == torch.bool:
        raise TypeError(f"levels must be an integer tensor, got dtype {levels.dtype}")
    if levels.dim() != 1 or z.dim() < 1 or z.shape[-1] != levels.shape[0]:
        raise ValueError(
            f"levels must be 1-D with one level per value of z's last axis, got levels of shape "
            f"{tuple(levels.shape)} for z of shape {tuple(z.shape)}"
        )
    check_fsq_levels(levels.tolist(), preserve_symmetry)
    levels = levels.to(device=z.device, dtype=torch.int32)
    return fsq_bound(z, levels, preserve_symmetry=preserve_symmetry, hard_clamp=hard_clamp,
                     eps=-FSQ_BOUND_EPS if paper_bound else FSQ_BOUND_EPS)


def check_fsq_levels(levels: list, preserve_symmetry: bool) -> None:
    """Levels must be ints ``>= 2``, and ``>= 3`` for the plain bound (see ``finite_scalar_quantize``)."""
    smallest = 2 if preserve_symmetry else 3
    if not levels or any(not isinstance(level, numbers.Integral) or isinstance(level, bool) or level < smallest
                         for level in levels):
        hint = "" if preserve_symmetry else " (levels of 2 need preserve_symmetry=True)"
        raise ValueError(f"levels must be a non-empty list of ints >= {smallest}{hint}, got {levels!r}")


def fsq_bound(
    z: Tensor, levels: Tensor, *, preserve_symmetry: bool, hard_clamp: bool, eps: float
) -> tuple[Tensor, Tensor]:
    """``finite_scalar_quantize`` without the argument checks, for layers that checked their
    levels once; ``levels`` int32 on ``z``'s device, ``half_l = (L - 1) (1 + eps) / 2``."""
    if preserve_symmetry:
        # vector-quantize-pytorch's FSQ.symmetry_preserving_bound, operation for operation.
        levels_minus_1 = levels - 1
        scale = 2.0 / levels_minus_1
        bounded = z.clamp(-1.0, 1.0) if hard_clamp else torch.tanh(z)
        bracket = _floor_ste(levels_minus_1 * (bounded + 1) / 2.0 + 0.5)
        codes = scale * bracket - 1.0
        level_float = bracket.detach()
    else:
        # vector-quantize-pytorch's FSQ.bound, operation for operation.
        half_l = (levels - 1) * (1 + eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        if hard_clamp:
            bounded = (z + offset / half_l).clamp(-1.0, 1.0) * half_l - offset
        else:
            bounded = torch.tanh(z + torch.atanh(offset / half_l)) * half_l - offset
        half_width = levels // 2
        rounded = _round_ste(bounded)
        codes = rounded / half_width
        level_float = rounded.detach() + half_width
    level_indices = level_float.nan_to_num(nan=0.0).clamp(min=0).minimum(levels - 1).long()
    return codes, level_indices




# --------------------------------------------------------------------------- entropy



def clamped_entropy(probs: Tensor, eps: float = ENTROPY_EPS, dim: int = -1) -> Tensor:
    """``-sum(p * log(max(p, eps)))`` along ``dim``: vector-quantize-pytorch's entropy (``eps`` keeps
    the log finite and its gradient bounded at ``p = 0``). For small distributions, such as the
    ``avg_probs`` that :func:`code_entropy` returns; any float dtype, autograd as written. ``eps``
    must be a finite float > 0 (``ValueError`` otherwise)."""
    check_real("eps", eps, above=0.0)
    return -(probs * probs.clamp_min(eps).log()).sum(dim=dim)


# --------------------------------------------------------------------------- code-logit losses
#
# Losses on a softmax over every code (vector-quantize-pytorch's cross-entropy commitment and
# codebook-diversity losses) need all N x K logits, but never at once: they are computed on row
# chunks of at most ``CHUNK_BYTES`` of logits, each chunk checkpointed, so its logits are
# recomputed in the backward instead of being kept for it.

LOGIT_METRICS = ("l2", "cosine", "dot")


def code_logits(z: Tensor, codebook: Tensor, metric: str = "l2") -> Tensor:
    """The logits ``[N, K]`` of ``z [N, D]`` against ``codebook [K, D]`` that vector-quantize-pytorch
    softmaxes: ``-sqrt(max(|z|^2 + |e|^2 - 2 z.e, 1e-8))`` for ``"l2"`` (its ``cdist``), ``z.e`` for
    ``"dot"`` and the cosine similarity for ``"cosine"``. It builds the whole matrix: the losses
    below call it on row chunks."""
    if metric == "l2":
        z_sq = (z * z).sum(dim=-1)
        e_sq = (codebook * codebook).sum(dim=-1)
        return -((z_sq[:, None] + e_sq[None, :]) + (z @ codebook.T) * -2).clamp(min=1e-8).sqrt()
    if metric == "cosine":
        z = torch.nn.functional.normalize(z, dim=-1, eps=1e-6)
        codebook = torch.nn.functional.normalize(codebook, dim=-1, eps=1e-6)
    return z @ codebook.T


def _logit_rows_per_chunk(num_codes: int) -> int:
    # The logits and about three temporaries of their size (softmax, its log, the gradient).
    return max(1, CHUNK_BYTES // (16 * num_codes))


def _heads(z: object, codebook: object, metric: object) -> tuple[Tensor, Tensor]:
    """``z`` and ``codebook`` with a leading head axis: ``[H, N, D]`` and ``[H or 1, K, D]``."""
    if isinstance(z, Tensor) and isinstance(codebook, Tensor) and z.dim() == 3:
        if codebook.dim() == 2:
            codebook = codebook[None]
        if codebook.dim() != 3 or codebook.shape[0] not in (1, z.shape[0]):
            raise ValueError(f"codebook must be [K, D] or [{z.shape[0]}, K, D] for z of shape {tuple(z.shape)}, "
                             f"got {tuple(codebook.shape)}")
        check_search_inputs(z[0], codebook[0], "l2")
    else:
        check_search_inputs(z, codebook, "l2")
        z, codebook = z[None], codebook[None]
    if metric not in LOGIT_METRICS:
        raise ValueError(f"metric must be one of {LOGIT_METRICS}, got {metric!r}")
    return z, codebook


def _checkpointed(function, *args):
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
    return function(*args)


def _cross_entropy_sum(z: Tensor, codebook: Tensor, targets: Tensor, metric: str) -> Tensor:
    logits = code_logits(z.float(), codebook.float(), metric)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, reduction="sum")


def code_cross_entropy(z: Tensor, codebook: Tensor, targets: Tensor, *, metric: str = "l2") -> Tensor:
    """Mean cross-entropy of ``softmax(code_logits(z, codebook))`` against ``targets``.

    Args:
        z: ``[N, D]`` floating point, or ``[H, N, D]`` for ``H`` heads.
        codebook: ``[K, D]`` on ``z``'s device (shared by the heads), or ``[H, K, D]`` (one per head).
        targets: int64 ``[N]`` (``[H, N]``) code indices; ``-1`` entries are ignored.
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``, see :func:`code_logits`.

    Returns:
        The float32 mean over every non-ignored target of every head; ``NaN`` when all are ignored
        (as ``F.cross_entropy``). Its gradient reaches ``z`` and ``codebook``. The N x K logits are
        computed in checkpointed row chunks of at most 32 MiB, so neither the forward nor the
        backward holds all of them.

    Raises:
        TypeError, ValueError: as :func:`nearest_code`; ``targets`` not integers shaped like ``z``'s rows.
    """
    z, codebook = _heads(z, codebook, metric)
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be an int64 or int32 tensor, got {getattr(targets, 'dtype', type(targets))}")
    targets = targets.reshape(z.shape[:2]) if targets.numel() == z.shape[0] * z.shape[1] else targets
    if targets.shape != z.shape[:2]:
        raise ValueError(f"targets must hold one index per row of z of shape {tuple(z.shape)}, "
                         f"got {tuple(targets.shape)}")
    targets = targets.long()
    rows = _logit_rows_per_chunk(codebook.shape[1])
    total = z.new_zeros((), dtype=torch.float32)
    for head in range(z.shape[0]):
        book = codebook[head if codebook.shape[0] > 1 else 0]
        for start in range(0, z.shape[1], rows):
            chunk = slice(start, start + rows)
            total = total + _checkpointed(functools.partial(_cross_entropy_sum, metric=metric), z[head, chunk], book,
                                          targets[head, chunk])
    return total / (targets != -1).sum()


def _summed_probabilities(z: Tensor, codebook: Tensor, positions: Tensor, num_positions: int, temperature: float,
                          metric: str) -> Tensor:
    probabilities = (code_logits(z.float(), codebook.float(), metric) * temperature).softmax(dim=-1)
    return probabilities.new_zeros(num_positions, codebook.shape[0]).index_add_(0, positions, probabilities)


def diversity_of_probabilities(average: Tensor) -> Tensor:
    """``-mean_n entropy(average[n])`` of code distributions ``average [P, K]``, with
    vector-quantize-pytorch's ``log(max(p, 1e-5))``."""
    entropy = (-average * torch.log(average.clamp(min=1e-5))).sum(dim=-1)
    return -entropy.mean()


def codebook_diversity_loss(
    z: Tensor, codebook: Tensor, positions: Tensor, num_positions: int, *, temperature: float = 100.0,
    metric: str = "l2",
) -> Tensor:
    """vector-quantize-pytorch's codebook diversity loss: minus the mean entropy of the average
    code distribution at each position.

    Row ``i`` of ``z`` (of every head) belongs to position ``positions[i]``; ``p_i =
    softmax(temperature * code_logits(z_i))``; ``avg_n`` is the mean of ``p_i`` over the rows of
    position ``n`` (over every head), and the loss is :func:`diversity_of_probabilities` of ``avg``.

    Args:
        z: ``[N, D]`` or ``[H, N, D]``; codebook: ``[K, D]`` or ``[H, K, D]``; positions: int64
            ``[N]`` in ``[0, num_positions)``, every position holding rows; temperature: the
            logits' scale; metric: as :func:`code_logits`.

    Returns:
        A float32 scalar with gradients to ``z`` and ``codebook``. Memory: the
        ``[num_positions, K]`` averages the loss is made of, plus checkpointed row chunks of at
        most 32 MiB of logits.
    """
    z, codebook = _heads(z, codebook, metric)
    positions = positions.long()
    if positions.shape != (z.shape[1],):
        raise ValueError(f"positions must have shape ({z.shape[1]},), got {tuple(positions.shape)}")
    rows = _logit_rows_per_chunk(codebook.shape[1])
    counts = torch.zeros(num_positions, device=z.device).index_add_(
        0, positions, torch.ones_like(positions, dtype=torch.float32)
    ) * z.shape[0]
    summed = None
    summing = functools.partial(_summed_probabilities, num_positions=num_positions, temperature=float(temperature),
                                metric=metric)
    for head in range(z.shape[0]):
        book = codebook[head if codebook.shape[0] > 1 else 0]
        for start in range(0, z.shape[1], rows):
            chunk = slice(start, start + rows)
            part = _checkpointed(summing, z[head, chunk], book, positions[chunk])
            summed = part if summed is None else summed + part
    return diversity_of_probabilities(summed / counts[:, None])


def orthogonal_loss(codebook: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """The orthogonal regulariser of Shin et al. 2021 (eq. 2) as vector-quantize-pytorch computes it:
    ``sum_h sum_ij cos(e_hi, e_hj)^2 / (H n^2) - 1/n`` over ``codebook [H, n, D]``.

    ``sum_ij (u_i . u_j)^2`` of unit rows ``U`` is ``|U U^T|_F^2 = |U^T U|_F^2``, so the
    ``n x n`` cosine matrix is replaced by the ``D x D`` Gram matrix whenever ``D < n``: the
    memory is ``H min(n, D)^2``, never more than vector-quantize-pytorch's ``H n^2``.

    Args:
        codebook: ``[H, n, D]`` (or ``[n, D]``) floating point.
        active: optional bool ``[H, n]`` (or ``[n]``): only these codes count, and ``n`` is their
            number, as if the codebook held only them (vector-quantize-pytorch's
            ``orthogonal_reg_active_codes_only``), without building that smaller codebook.
    """
    if not isinstance(codebook, Tensor) or not codebook.is_floating_point() or codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be a floating-point [H, n, D] or [n, D] tensor, got "
                         f"{getattr(codebook, 'shape', type(codebook))}")
    if codebook.dim() == 2:
        codebook = codebook[None]
        active = None if active is None else active[None]
    heads, num_codes, dim = codebook.shape
    units = torch.nn.functional.normalize(codebook, dim=-1, eps=1e-6)
    count = torch.tensor(float(num_codes), device=codebook.device)
    if active is not None:
        units = units * active[..., None].to(units.dtype)
        count = active.sum().to(torch.float32)
    gram = units.transpose(1, 2) @ units if dim < num_codes else units @ units.transpose(1, 2)
    return (gram * gram).sum() / (heads * count * count) - 1.0 / count




# --------------------------------------------------------------------------- gradient estimators


def rotate_to(src: Tensor, tgt: Tensor, eps: float = 1e-6) -> Tensor:
    """The rotation trick (Fifty et al. 2024, section 4.2) on rows ``src [..., D]`` and their codes
    ``tgt [..., D]``, elementwise, as vector-quantize-pytorch's ``rotate_to``.

    The value is ``tgt``; the gradient reaches ``src`` only, rotated by ``I - 2 w w^T + 2 q u^T``
    (``u = src/|src|``, ``q = tgt/|tgt|``, ``w = (u + q)/|u + q|``) and scaled by ``|tgt|/|src|``.
    ``vector_quantize(rotation_trick=True)`` fuses the same gradient into its backward; this form
    serves rows whose candidates are not one nearest code (top-k, per-row codebooks).
    """
    norm_src = src.norm(dim=-1, keepdim=True)
    norm_tgt = tgt.norm(dim=-1, keepdim=True)
    u = src / norm_src.clamp(min=eps)
    q = tgt / norm_tgt.clamp(min=eps)
    w = torch.nn.functional.normalize(u + q, dim=-1, eps=eps).detach()
    u, q = u.detach(), q.detach()
    rotated = src - 2 * (src * w).sum(dim=-1, keepdim=True) * w + 2 * (src * u).sum(dim=-1, keepdim=True) * q
    return rotated * (norm_tgt / norm_src.clamp(min=eps)).detach()


def directional_reparam(src: Tensor, tgt: Tensor, noise_variance: float = 5e-3) -> Tensor:
    """DiVeQ's directional reparameterisation (vector-quantize-pytorch's ``directional_reparam``):
    ``src + n |tgt - src|`` with ``n`` the unit direction of ``tgt - src + sqrt(noise_variance) *
    randn`` (detached). Its gradient reaches ``src`` and, through the distance, ``tgt``."""
    error = tgt - src
    noised = error + math.sqrt(noise_variance) * torch.randn_like(error)
    direction = torch.nn.functional.normalize(noised, dim=-1, eps=1e-6).detach()
    return src + direction * error.norm(dim=-1, keepdim=True)
