"""The top-k search: each row's ``k`` nearest codes, or ``k`` codes sampled by Gumbel-top-k.

The public :func:`nearest_codes`, then the operator ``torch.ops.fastvq.nearest_codes`` (its check, its
real implementation and its fake). Which backend runs a given ``k`` is the backend table's business
(:func:`fastvq.backends.select`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_sampling, seed_tensor
from ..backends.duplicate_codes import find_duplicate_codes
from ..backends.openmp import serial_torch_ops
from .search import check_search_inputs, draw_seed, search_dtype


def nearest_codes(
    z: Tensor,
    codebook: Tensor,
    k: int,
    *,
    metric: str = "l2",
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest codes of every row of ``z``, in one fused search.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides; ``N`` may be 0.
        codebook: ``[K, D]`` floating point on ``z``'s device; a different float dtype is promoted.
        k: how many codes per row, ``1 <= k <= K`` (any size: the kernels keep up to 64 per row in
            registers and the C++ path any number).
        metric: ``"l2"`` (squared Euclidean), ``"cosine"`` (``1 - cos``) or ``"dot"`` (``-z.e``).
        sample_temperature: when ``> 0``, ``k`` codes drawn without replacement from
            ``softmax(-d / T)`` by Gumbel-top-k (``d`` as in :func:`nearest_code`'s sampling), the
            noise generated inside the search. seed: int64 one-element tensor on ``z``'s device (or a Python int);
            drawn from PyTorch's RNG when omitted.

    Returns:
        ``(indices int64 [N, k], distances float32 [N, k])``: each row's codes by ascending search
        key (the score :func:`nearest_code` ranks by), equal keys by ascending index with a NaN
        true distance last; the distances are the true ones recomputed from ``z - e``, so they
        ascend except between codes whose order the key's rounding decided. The first column is
        always :func:`nearest_code`'s answer (except on the C++ bf16 kernel, which scores in bf16
        where top-k widens to fp32). With sampling, the drawn codes are listed by true distance.

    The search never builds an ``N x K`` matrix: each row's best ``k`` are carried across tiles of
    codes (in registers on GPUs). Scores accumulate in fp32. Ties (equal keys) go to the lowest
    index; a NaN distance never beats a finite one and a row whose distances are all NaN (under
    cosine, also a row holding an Inf) gets indices ``0..k-1`` with NaN distances. The search is
    deterministic. docs/ops-and-contracts.md states the tie contract in full.

    Raises:
        TypeError: a non-tensor or an integer/bool tensor.
        ValueError: ``z`` or ``codebook`` not 2-D, different ``D``, ``K == 0``, ``k`` outside
            ``[1, K]``, different devices, or an unknown metric.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and isinstance(metric, str)
            and isinstance(k, int) and not isinstance(k, bool)):
        check_topk_inputs(z, codebook, k, metric)  # the dispatcher would reject these types with its own message
    if sample_temperature > 0 and seed is None:
        seed = draw_seed(z.device)
    seed = seed_tensor(seed, z.device)
    return _nearest_codes_op(z, codebook, k, metric, float(sample_temperature), seed)


# --------------------------------------------------------------------------- the operator


def check_topk_inputs(z: object, codebook: object, k: object, metric: object = "l2") -> None:
    """Checks the top-k search's arguments: those of the search, and ``1 <= k <= K``."""
    check_search_inputs(z, codebook, metric)
    num_codes = codebook.shape[0]  # type: ignore[union-attr]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_codes:
        raise ValueError(f"k must be an int in [1, K] = [1, {num_codes}] for a codebook of shape "
                         f"{tuple(codebook.shape)}, got {k!r}")  # type: ignore[union-attr]


def _check_nearest_codes(z, codebook, k, metric, sample_temperature, seed) -> None:
    check_topk_inputs(z, codebook, k, metric)
    check_sampling(sample_temperature, seed, z)


@torch.library.custom_op("fastvq::nearest_codes", mutates_args=())
def _nearest_codes_op(
    z: Tensor,
    codebook: Tensor,
    k: int,
    metric: str = "l2",
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``z [N, D]``, ``codebook [K, D]``, ``1 <= k <= K`` -> ``(indices int64 [N, k], distances fp32 [N, k])``,
    each row's ``k`` nearest codes by ascending distance (ties to the lower index). With
    ``sample_temperature > 0``, ``k`` codes drawn without replacement from ``softmax(-distance / T)``
    (Gumbel-top-k, noise from the int64 ``seed`` tensor), still listed by ascending distance."""
    _check_nearest_codes(z, codebook, k, metric, sample_temperature, seed)
    op = "gumbel_topk" if sample_temperature > 0.0 else "nearest_codes"
    backend = backends.select(op, z, search_dtype(z, codebook), k=k)
    indices, distances = backend.nearest_codes(z, codebook, k, metric, sample_temperature, seed)
    if sample_temperature > 0.0 or indices.numel() == 0:
        return indices, distances
    with serial_torch_ops():  # a probe of K x D elements: not worth waking (and then spinning) OpenMP's threads
        groups = find_duplicate_codes(codebook)
        # Exact duplicates: a row lists the lowest members of each group, whatever the rounding chose.
        return (indices, distances) if groups is None else (groups.lowest_members(indices), distances)


@_nearest_codes_op.register_fake
def _nearest_codes_fake(z, codebook, k, metric="l2", sample_temperature=0.0, seed=None):
    _check_nearest_codes(z, codebook, k, metric, sample_temperature, seed)
    num_rows = z.shape[0]
    return z.new_empty((num_rows, k), dtype=torch.int64), z.new_empty((num_rows, k), dtype=torch.float32)
