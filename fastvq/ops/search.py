"""The nearest-code search: each row's nearest code, or a code sampled by Gumbel-max.

The public :func:`nearest_code`, then the operator ``torch.ops.fastvq.nearest_code`` (its check, its
real implementation and its fake). The search's input check and the helpers that every search-based
family shares (the promoted dtype, the seed, the duplicate-code rule) live here too.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_metric, check_same_device, check_sampling, check_tensor, seed_tensor
from ..backends.duplicate_codes import find_duplicate_codes
from ..backends.openmp import serial_torch_ops


def nearest_code(
    z: Tensor,
    codebook: Tensor,
    *,
    metric: str = "l2",
    return_codes: bool = False,
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """Finds the nearest code of every row of ``z``.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides. ``N`` may be 0.
        codebook: ``[K, D]`` floating point, ``K >= 1``, on ``z``'s device. A dtype different
            from ``z``'s is promoted (``torch.promote_types``), not rejected.
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (``1 - cos``) or ``"dot"`` (``-z.e``).
        return_codes: also return the chosen codes, gathered in the same kernel.
        sample_temperature: when ``> 0``, sample each row's code from ``softmax(-d_k / T)``
            (Gumbel-max, the noise generated inside the search, never as an ``N x K`` tensor)
            instead of taking the argmin. ``d`` is the plain (not squared) distance for ``l2``
            and ``-cos`` for ``cosine``, as vector-quantize-pytorch's stochastic codes use.
        seed: int64 one-element tensor on ``z``'s device (or a Python int) seeding the noise; drawn
            from PyTorch's RNG when omitted (so ``torch.manual_seed`` makes sampling reproducible).

    Returns:
        ``(indices, distances)`` or ``(indices, distances, codes)``: ``indices`` int64 ``[N]``;
        ``distances`` float32 ``[N]``, each row's true distance to its code (for ``l2`` computed
        as ``sum((z - e)^2)``, so it is exact and never negative; ``1 - cos`` is clamped at 0 too);
        ``codes`` ``[N, D]`` in the promoted dtype.

    Scores accumulate in fp32 for every input dtype. Ties go to the lowest index. A NaN distance
    never wins; a row whose distances are all NaN gets index 0 and a NaN distance. The search is
    deterministic.

    Accuracy (fp32): the chosen code's true (float64) distance is within 1e-5 of the best,
    relative to the row's distances, for ``l2`` and ``dot`` at any offset from the origin. For
    ``cosine`` it is within that or ``sqrt(D) * 2**-23`` absolute, whichever is larger: cosines
    are compared in fp32, whose resolution near 1 is absolute, so for data far from the origin
    (all ``1 - cos`` tiny) the rule relative to the row's distances does not hold.

    Range (fp32 and bf16 inputs, whose squares are formed in fp32): the contract holds while
    squared norms and squared distances are normal fp32 numbers, about 1.2e-38 to 3.4e38
    (vector norms below about 1.8e19, differences that matter above about 1e-19); cosine treats
    a vector of norm below 1e-12 as zero (``F.normalize``'s eps). Outside it nothing crashes and
    every index is a valid one, but overflowing distances come back Inf (or NaN) with any index,
    and underflowing ones 0, ties, lowest index first. Inputs are not rescaled. fp16 inputs
    cannot leave the range; fp64 is computed in fp64.

    Raises:
        TypeError: a non-tensor or an integer/bool tensor.
        ValueError: ``z`` or ``codebook`` not 2-D, different ``D``, ``K == 0``, different
            devices, or an unknown metric.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and isinstance(metric, str)):
        check_search_inputs(z, codebook, metric)  # the dispatcher would reject these types with its own message
    if sample_temperature > 0 and seed is None:
        seed = draw_seed(z.device)
    seed = seed_tensor(seed, z.device)
    indices, distances, codes = _nearest_code_op(z, codebook, metric, return_codes, float(sample_temperature), seed)
    return (indices, distances, codes) if return_codes else (indices, distances)


def draw_seed(device: torch.device) -> Tensor:
    """A fresh int64 seed tensor from PyTorch's RNG, made on ``device`` with no host sync."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


# --------------------------------------------------------------------------- the operator


def check_search_inputs(z: object, codebook: object, metric: object = "l2") -> None:
    """Checks ``z [N, D]`` and ``codebook [K, D]`` for the search and quantize ops."""
    z = check_tensor("z", z)
    codebook = check_tensor("codebook", codebook)
    check_metric(metric)
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, D], got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    check_float("z", z)
    check_float("codebook", codebook)
    if codebook.shape[0] < 1:
        raise ValueError(f"codebook must hold at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] < 1:
        raise ValueError(f"codebook must have D >= 1, got shape {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z and codebook must have the same last dimension D, got z of shape {tuple(z.shape)} "
            f"and codebook of shape {tuple(codebook.shape)}"
        )
    check_same_device(z=z, codebook=codebook)


def search_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    """The dtype a search of ``z`` against ``codebook`` computes and returns codes in."""
    return torch.promote_types(z.dtype, codebook.dtype)


def search_op(sample_temperature: float) -> str:
    """The backend table's row for a search: sampling has routes of its own."""
    return "gumbel_sample" if sample_temperature > 0.0 else "nearest_code"


def lowest_duplicate(indices: Tensor, codebook: Tensor, sampled: bool) -> Tensor:
    """An argmin's indices with every exact duplicate code replaced by the lowest index of its
    group, so "ties go to the lowest index" holds whatever a backend's rounding chose (see
    ``backends.duplicate_codes.DuplicateCodes``). A sampled index is left alone: it names a code, not a tie."""
    if sampled or indices.numel() == 0:
        return indices
    with serial_torch_ops():  # a probe of K x D elements: not worth waking (and then spinning) OpenMP's threads
        groups = find_duplicate_codes(codebook)
        return indices if groups is None else groups.lowest(indices)


def _check_nearest_code(z, codebook, metric, sample_temperature, seed) -> None:
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(
    z: Tensor,
    codebook: Tensor,
    metric: str = "l2",
    return_codes: bool = False,
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``z [N, D]``, ``codebook [K, D]`` -> ``(indices int64 [N], distances fp32 [N], codes)``.

    ``codes`` is ``[N, D]`` in the promoted dtype when ``return_codes`` else ``[0, D]``. With
    ``sample_temperature > 0`` the index is sampled from ``softmax(-distance / T)`` by Gumbel-max
    with noise drawn from the int64 ``seed`` tensor, instead of the argmin.
    """
    _check_nearest_code(z, codebook, metric, sample_temperature, seed)
    backend = backends.select(search_op(sample_temperature), z, search_dtype(z, codebook))
    indices, distances, codes = backend.nearest_code(z, codebook, metric, return_codes, sample_temperature, seed)
    return lowest_duplicate(indices, codebook, sample_temperature > 0.0), distances, codes


@_nearest_code_op.register_fake
def _nearest_code_fake(z, codebook, metric="l2", return_codes=False, sample_temperature=0.0, seed=None):
    _check_nearest_code(z, codebook, metric, sample_temperature, seed)
    num_rows, dim = z.shape
    return (
        z.new_empty(num_rows, dtype=torch.int64),
        z.new_empty(num_rows, dtype=torch.float32),
        z.new_empty((num_rows if return_codes else 0, dim), dtype=search_dtype(z, codebook)),
    )


# --------------------------------------------------------------------------- the batched search


def nearest_code_batched(z: Tensor, codebook: Tensor, *, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """B independent nearest-code searches in one call: the rows ``z[b]`` against the codes ``codebook[b]``.

    Many small problems at once (per-head codebooks, product quantizers, batched k-means) keep every
    thread or SM busy where one :func:`nearest_code` call per problem would not; the backends walk
    the batch inside the kernel (the C++ search's parallel loop runs over (problem, row block), the
    Triton grid has an axis over B).

    Args:
        z: ``[B, N, D]`` float32, float16, bfloat16 or float64, any strides. ``B`` and ``N`` may be 0.
        codebook: ``[B, K, D]`` floating point, ``K >= 1``, on ``z``'s device; a dtype different from
            ``z``'s is promoted.
        metric: ``"l2"``, ``"cosine"`` or ``"dot"``, as for :func:`nearest_code`.

    Returns:
        ``(indices, distances)``: ``indices`` int64 ``[B, N]``, each row's code in its own problem's
        codebook (``0 <= index < K``); ``distances`` float32 ``[B, N]``, the true distances. For every
        ``b`` they equal ``nearest_code(z[b], codebook[b], metric=metric)``'s, with every contract of
        that function (fp32 accumulation, ties to the lowest index, NaN rules, accuracy).

    Raises:
        TypeError: a non-tensor or an integer/bool tensor.
        ValueError: ``z`` or ``codebook`` not 3-D, different ``B`` or ``D``, ``K == 0``, different
            devices, or an unknown metric.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and isinstance(metric, str)):
        check_batched_search_inputs(z, codebook, metric)
    return _nearest_code_batched_op(z, codebook, metric)


def check_batched_search_inputs(z: object, codebook: object, metric: object = "l2") -> None:
    """Checks ``z [B, N, D]`` and ``codebook [B, K, D]`` for the batched search."""
    z = check_tensor("z", z)
    codebook = check_tensor("codebook", codebook)
    check_metric(metric)
    if z.dim() != 3:
        raise ValueError(f"z must be 3-D [B, N, D], got shape {tuple(z.shape)}")
    if codebook.dim() != 3:
        raise ValueError(f"codebook must be 3-D [B, K, D], got shape {tuple(codebook.shape)}")
    check_float("z", z)
    check_float("codebook", codebook)
    if codebook.shape[1] < 1:
        raise ValueError(
            f"codebook must hold at least one code per problem (K >= 1), got shape {tuple(codebook.shape)}"
        )
    if codebook.shape[2] < 1:
        raise ValueError(f"codebook must have D >= 1, got shape {tuple(codebook.shape)}")
    if z.shape[0] != codebook.shape[0] or z.shape[2] != codebook.shape[2]:
        raise ValueError(
            f"z and codebook must have the same batch size B and last dimension D, got z of shape "
            f"{tuple(z.shape)} and codebook of shape {tuple(codebook.shape)}"
        )
    check_same_device(z=z, codebook=codebook)


@serial_torch_ops()
def lowest_duplicate_batched(indices: Tensor, codebook: Tensor) -> Tensor:
    """:func:`lowest_duplicate` for every problem at once: the B codebooks are searched for duplicates as one
    ``[B K, D + 1]`` codebook whose extra column is the problem number (exact in the float32 or float64 the
    copy is made in), so that equal codes of different problems never form a group."""
    num_problems, num_codes, dim = codebook.shape
    if indices.numel() == 0 or num_codes < 2:
        return indices
    # On CPU the search for duplicates first probes a few entries of every code: where no two codes of all the
    # problems together are equal (the usual case), that settles it without copying the codebooks.
    if codebook.device.type == "cpu" and find_duplicate_codes(codebook.reshape(num_problems * num_codes, dim)) is None:
        return indices
    wide = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    problem = torch.arange(num_problems, device=codebook.device, dtype=wide)
    tagged = torch.cat([codebook.to(wide), problem[:, None, None].expand(-1, num_codes, 1)], dim=2)
    groups = find_duplicate_codes(tagged.reshape(num_problems * num_codes, dim + 1))
    if groups is None:
        return indices
    offsets = torch.arange(num_problems, device=indices.device)[:, None] * num_codes
    return groups.lowest(indices + offsets) - offsets


@torch.library.custom_op("fastvq::nearest_code_batched", mutates_args=())
def _nearest_code_batched_op(z: Tensor, codebook: Tensor, metric: str = "l2") -> tuple[Tensor, Tensor]:
    """``z [B, N, D]``, ``codebook [B, K, D]`` -> ``(indices int64 [B, N], distances fp32 [B, N])``."""
    check_batched_search_inputs(z, codebook, metric)
    backend = backends.select("nearest_code_batched", z, search_dtype(z, codebook))
    indices, distances = backend.nearest_code_batched(z, codebook, metric)
    return lowest_duplicate_batched(indices, codebook), distances


@_nearest_code_batched_op.register_fake
def _nearest_code_batched_fake(z, codebook, metric="l2"):
    check_batched_search_inputs(z, codebook, metric)
    return (
        z.new_empty(z.shape[:2], dtype=torch.int64),
        z.new_empty(z.shape[:2], dtype=torch.float32),
    )
