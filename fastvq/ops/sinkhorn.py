"""Balanced assignment by log-domain Sinkhorn iterations, without the ``N x K`` transport plan.

The public :func:`sinkhorn_assign`, then its three operators, each one fused pass over every
(row, code) pair that recomputes the distances tile by tile and keeps nothing of size ``N x K``:

- ``torch.ops.fastvq.sinkhorn_cost_stats``: the count, minimum, maximum, mean and sum of squared
  deviations of the finite costs (for the cost normalisations);
- ``torch.ops.fastvq.sinkhorn_row_pass``: each row's log-sum-exp over codes of ``L + g`` (an online
  log-sum-exp, as flash attention's softmax) and, on the last pass, its argmax;
- ``torch.ops.fastvq.sinkhorn_column_pass``: each code's running ``(max, sum of exp)`` of ``L + f`` over
  rows; the kernels keep one partial pair per row tile and code and combine them, with no atomics.

The iteration itself (a few passes, elementwise updates of the potentials in between, and under
``torch.distributed`` the exact combination of the column sums across ranks) runs here in Python on
device tensors, with no host synchronisation. None of the operators is differentiable: OptVQ and the
LC-Rec-style tokenizers run Sinkhorn under ``no_grad``, and the assignment is discrete.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from .. import backends
from .._checks import check_float, check_real, check_same_device, check_tensor
from .._distributed import all_gather_rows, all_reduce_sum_, is_distributed
from ..backends.sinkhorn_stats import STATS_SIZE, combine_stats

SINKHORN_METRICS = ("l2", "euclidean", "cosine", "dot")
SINKHORN_NORMALIZATIONS = (None, "minmax", "standardize")
SINKHORN_ORDERS = ("rows_first", "columns_first")


def sinkhorn_assign(
    z: Tensor,
    codebook: Tensor,
    *,
    epsilon: float,
    iters: int,
    metric: str = "l2",
    normalize: Optional[str] = None,
    order: str = "rows_first",
    sum_eps: float = 0.0,
    sync: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Balanced codes for the rows of ``z``: the argmax of each row of an entropic optimal-transport plan.

    The plan between the rows (mass ``1/N`` each) and the codes (mass ``1/K`` each) for the cost ``C``
    (the metric's distance, optionally normalised) is ``P_ik = exp(f_i - C_ik / epsilon + g_k)``. Its dual
    potentials come from ``iters`` log-domain Sinkhorn iterations started at zero, each a row update
    ``f_i = -log N - logsumexp_k(-C_ik / epsilon + g_k)`` and a column update
    ``g_k = -log K - logsumexp_i(-C_ik / epsilon + f_i)``. Row ``i`` gets ``argmax_k P_ik``, which is
    ``argmax_k (g_k - C_ik / epsilon)``: the nearest code after each code's price ``g_k``, so over-used codes
    lose rows to unused ones. ``iters = 0`` is the plain nearest code (for every metric but ``euclidean``'s
    ties, the same as :func:`nearest_code`). :func:`fastvq.reference.sinkhorn_assign_ref` is the
    specification.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides; ``N`` may be 0.
        codebook: ``[K, D]`` floating point on ``z``'s device; a different float dtype is promoted.
        epsilon: the entropic regularisation, ``> 0`` (LC-Rec's ``sk_epsilon``; OptVQ's ``epsilon`` is its
            inverse). Small values need no care: everything is in log space.
        iters: Sinkhorn iterations, ``>= 0`` (OptVQ uses 5, LC-Rec up to 100).
        metric: ``"l2"`` (squared Euclidean, LC-Rec), ``"euclidean"`` (its square root, ``torch.cdist``: OptVQ),
            ``"cosine"`` (``1 - cos``) or ``"dot"`` (``-z.e``).
        normalize: the cost normalisation, over the whole ``N x K`` cost (NaN entries left out):
            ``None``; ``"minmax"`` (LC-Rec's ``center_distance_for_constraint``:
            ``(C - m) / (max C - m + 1e-5)``, ``m = (max C + min C) / 2``); ``"standardize"`` (OptVQ's
            ``normalize(mode="all")``: ``A = (C - mean C) / (std C + 1e-6)``, unbiased std, then ``A - min A``).
            Each costs one more pass.
        order: ``"rows_first"`` (the textbook order and LC-Rec's ``sinkhorn_algorithm``) or ``"columns_first"``
            (OptVQ's ``sinkhorn``: the column update first in every iteration).
        sum_eps: ``>= 0``; when ``> 0``, OptVQ's exp-domain iteration exactly: the plan starts as
            ``exp(L) / (sum exp(L) + sum_eps)`` and every row or column sum it divides by has ``sum_eps`` added
            (OptVQ's ``1e-8``), so an update depends on the previous potential too
            (``g <- g - log(exp(g) * sum_i exp(L_ik + f_i) + sum_eps) - log K``). The default 0 is the exact
            iteration. It matters where a code is far from every row: there OptVQ's ``1e-8`` dominates
            its sum. Costs one more row pass.
        sync: under ``torch.distributed``, treat all ranks' rows as one batch (``N`` the total): the statistics
            and each column log-sum-exp combine exactly across ranks (a max, then a sum of rescaled
            exponentials), so every rank gets the column potentials, and its rows the codes, that one process
            computes on the concatenated batch. ``None`` syncs when a group of several ranks is initialised.

    Returns:
        ``(indices int64 [N], row_potential [N], column_potential [K])``, the potentials float32 (float64 for
        float64 inputs). ``f`` is the last row update's, ``g`` the last column update's. The potentials carry
        no gradient (the inputs are detached): the assignment is discrete and OptVQ and LC-Rec run Sinkhorn
        under ``no_grad``.

    Costs ``2 * iters + 1`` passes over ``N x K`` products (``2 * iters`` with ``order="columns_first"``,
    whose last row pass also takes the argmax), plus one with a normalisation; memory ``O(N + K)`` beyond
    the inputs (per row tile partials of ``K`` on the column pass). Scores accumulate in fp32 (fp64 for
    fp64 inputs). Ties go to the lowest index. A NaN cost carries no mass and never wins; a row (code)
    with no finite cost gets potential ``-inf`` (a row of NaN gets index 0). Deterministic: no atomics.

    Raises:
        TypeError: a non-tensor or an integer/bool tensor.
        ValueError: ``z`` or ``codebook`` not 2-D, different ``D``, ``K == 0``, different devices,
            ``epsilon <= 0`` or not finite, ``iters < 0`` or not an int, ``sum_eps < 0``, an unknown metric,
            normalisation or order.
    """
    check_sinkhorn_inputs(z, codebook, metric)
    check_real("epsilon", epsilon, above=0.0)
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 0:
        raise ValueError(f"iters must be an int >= 0, got {iters!r}")
    if normalize not in SINKHORN_NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {SINKHORN_NORMALIZATIONS}, got {normalize!r}")
    if order not in SINKHORN_ORDERS:
        raise ValueError(f"order must be one of {SINKHORN_ORDERS}, got {order!r}")
    check_real("sum_eps", sum_eps, minimum=0.0)
    synced = (is_distributed() if sync is None else sync) and is_distributed()
    z, codebook = z.detach(), codebook.detach()
    work = potential_dtype(z, codebook)
    num_codes = codebook.shape[0]
    num_rows = torch.tensor(float(z.shape[0]), dtype=torch.float64, device=z.device)
    if synced:
        all_reduce_sum_(num_rows)
    # N counts the rows of every rank: a tensor, so that no rank reads it on the host.
    log_row_mass = -torch.log(num_rows.clamp_min(1.0)).to(work)
    log_code_mass = -math.log(num_codes)
    affine = _affine(z, codebook, metric, normalize, float(epsilon), synced, work)

    log_sum_eps = math.log(sum_eps) if sum_eps > 0 else None

    def update_rows(row_potential: Tensor, column_potential: Tensor, argmax: bool) -> tuple[Tensor, Tensor]:
        lse, indices = _row_pass_op(z, codebook, column_potential, metric, affine, argmax)
        if log_sum_eps is None:
            return _potential(log_row_mass, lse), indices
        return _guarded_potential(row_potential, lse, log_row_mass, log_sum_eps), indices

    def update_columns(row_potential: Tensor, column_potential: Tensor) -> Tensor:
        high, total = _column_pass_op(z, codebook, row_potential, metric, affine)
        if synced:
            high, total = _combine_over_ranks(high, total)
        lse = _log_sum(high, total)
        if log_sum_eps is None:
            return _potential(log_code_mass, lse)
        return _guarded_potential(column_potential, lse, log_code_mass, log_sum_eps)

    row_potential = torch.zeros(z.shape[0], dtype=work, device=z.device)
    column_potential = torch.zeros(num_codes, dtype=work, device=z.device)
    if log_sum_eps is not None:
        # OptVQ first divides the whole plan by its sum (+ sum_eps): a constant row potential.
        lse, _ = _row_pass_op(z, codebook, column_potential, metric, affine, False)
        whole = torch.cat([lse, lse.new_full((1,), -math.inf)])
        high = whole.max().reshape(1)
        total = torch.exp(whole - torch.where(high == -math.inf, 0.0, high)).sum().reshape(1)
        if synced:
            high, total = _combine_over_ranks(high, total)
        row_potential = row_potential - torch.logaddexp(_log_sum(high, total), torch.full_like(high, log_sum_eps))
    for step in range(iters):
        if order == "rows_first":
            row_potential, _ = update_rows(row_potential, column_potential, argmax=False)
            column_potential = update_columns(row_potential, column_potential)
        else:
            column_potential = update_columns(row_potential, column_potential)
            last = step == iters - 1
            row_potential, indices = update_rows(row_potential, column_potential, argmax=last)
            if last:  # the last row pass took the argmax with the same column potentials
                return indices, row_potential, column_potential
    _, indices = _row_pass_op(z, codebook, column_potential, metric, affine, True)
    return indices, row_potential, column_potential


def sinkhorn_cost_stats(z: Tensor, codebook: Tensor, *, metric: str = "l2", sync: Optional[bool] = None) -> Tensor:
    """The statistics the cost normalisations use, in one fused pass over every (row, code) pair.

    Args:
        z, codebook, metric, sync: as in :func:`sinkhorn_assign` (with ``sync`` the statistics of all ranks'
            rows together).

    Returns:
        float64 ``[5]``: the count, minimum, maximum, mean and sum of squared deviations from the mean of the
        non-NaN costs (``(0, inf, -inf, 0, 0)`` when there is none). The unbiased standard deviation is
        ``sqrt(squares / (count - 1))``.

    Raises:
        as :func:`sinkhorn_assign` for the same arguments.
    """
    check_sinkhorn_inputs(z, codebook, metric)
    stats = _cost_stats_op(z.detach(), codebook.detach(), metric)
    if (is_distributed() if sync is None else sync) and is_distributed():
        stats = combine_stats(all_gather_rows(stats))
    return stats


def potential_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    """The dtype scores accumulate and potentials are kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if torch.promote_types(z.dtype, codebook.dtype) == torch.float64 else torch.float32


def _potential(log_mass, lse: Tensor) -> Tensor:
    """``log_mass - lse``, ``-inf`` where the log-sum-exp is ``-inf`` (nothing reachable: no mass to scale)."""
    return torch.where(lse == -math.inf, -math.inf, log_mass - lse)


def _guarded_potential(previous: Tensor, lse: Tensor, log_mass, log_sum_eps: float) -> Tensor:
    """OptVQ's update of a potential: the plan's sums ``exp(previous + lse)`` divided by ``sum + sum_eps``
    and scaled to the marginal."""
    return previous - torch.logaddexp(previous + lse, torch.full_like(lse, log_sum_eps)) + log_mass


def _log_sum(high: Tensor, total: Tensor) -> Tensor:
    """``log(sum exp)`` from a ``(max, sum of exp(x - max))`` pair; ``-inf`` for an empty sum."""
    return torch.where(total > 0, high + torch.log(total), -math.inf)


def _affine(z, codebook, metric, normalize, epsilon, synced, work) -> Tensor:
    """``(shift, scale)`` on the device: the passes use the logits ``L = (shift - C) * scale``, i.e.
    ``-normalised(C) / epsilon``. Only the normalisations need the statistics pass (and no host sync)."""
    if normalize is None:
        return torch.tensor([0.0, 1.0 / epsilon], dtype=work, device=z.device)
    count, low, high, mean, squares = sinkhorn_cost_stats(z, codebook, metric=metric, sync=synced).unbind()
    if normalize == "minmax":
        middle = (high + low) / 2
        shift, spread = middle, high - middle + 1e-5
    else:
        # OptVQ subtracts the minimum of the standardised cost: the shift is the minimum cost.
        shift, spread = low, torch.sqrt(squares / (count - 1)) + 1e-6
    # No finite cost at all: nothing to normalise, and the passes see only NaN.
    shift = torch.where(count > 0, shift, 0.0)
    return torch.stack([shift, 1.0 / (spread * epsilon)]).to(work)


def _all_reduce_max(tensor: Tensor) -> Tensor:
    if torch.compiler.is_compiling():
        return funcol.all_reduce(tensor, "max", dist.group.WORLD)
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def _combine_over_ranks(high: Tensor, total: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's ``(max, sum of exp(x - max))`` per code combined exactly: the maximum over ranks, then
    the sum of each rank's sum rescaled to it."""
    global_high = _all_reduce_max(high)
    rescaled = torch.where(total > 0, total * torch.exp(high - global_high), 0.0)
    return global_high, all_reduce_sum_(rescaled)


# --------------------------------------------------------------------------- the operators


def check_sinkhorn_inputs(z: object, codebook: object, metric: object = "l2") -> None:
    """Checks ``z [N, D]``, ``codebook [K, D]`` and the metric of a Sinkhorn pass."""
    z = check_tensor("z", z)
    codebook = check_tensor("codebook", codebook)
    if metric not in SINKHORN_METRICS:
        raise ValueError(f"metric must be one of {SINKHORN_METRICS}, got {metric!r}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, D], got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    check_float("z", z)
    check_float("codebook", codebook)
    if codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook must have K >= 1 codes of D >= 1, got shape {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z and codebook must have the same last dimension D, got z of shape {tuple(z.shape)} "
            f"and codebook of shape {tuple(codebook.shape)}"
        )
    check_same_device(z=z, codebook=codebook)


def _check_potential(name: str, potential: object, size: int, work: torch.dtype) -> None:
    potential = check_tensor(name, potential)
    if tuple(potential.shape) != (size,) or potential.dtype != work:
        raise ValueError(f"{name} must be a {work} tensor of shape ({size},), got {potential.dtype} "
                         f"of shape {tuple(potential.shape)}")


def _check_pass(z, codebook, potential, potential_name, size_of, metric, affine) -> None:
    check_sinkhorn_inputs(z, codebook, metric)
    work = potential_dtype(z, codebook)
    _check_potential(potential_name, potential, size_of.shape[0], work)
    _check_potential("affine", affine, 2, work)
    check_same_device(z=z, **{potential_name: potential}, affine=affine)


@torch.library.custom_op("fastvq::sinkhorn_cost_stats", mutates_args=())
def _cost_stats_op(z: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """``float64 [5]``: the count, min, max, mean and sum of squared deviations of the non-NaN costs."""
    check_sinkhorn_inputs(z, codebook, metric)
    backend = backends.select("sinkhorn_cost_stats", z, torch.promote_types(z.dtype, codebook.dtype))
    return backend.sinkhorn_cost_stats(z, codebook, metric)


@_cost_stats_op.register_fake
def _cost_stats_fake(z, codebook, metric):
    check_sinkhorn_inputs(z, codebook, metric)
    return z.new_empty(STATS_SIZE, dtype=torch.float64)


@torch.library.custom_op("fastvq::sinkhorn_row_pass", mutates_args=())
def _row_pass_op(
    z: Tensor, codebook: Tensor, column_potential: Tensor, metric: str, affine: Tensor, argmax: bool
) -> tuple[Tensor, Tensor]:
    """``(lse [N], indices int64 [N] or [0])``: each row's ``logsumexp_k(L_ik + g_k)`` with
    ``L = (affine[0] - C) * affine[1]``, and with ``argmax`` the first ``k`` maximising ``L_ik + g_k``."""
    _check_pass(z, codebook, column_potential, "column_potential", codebook, metric, affine)
    backend = backends.select("sinkhorn_row_pass", z, torch.promote_types(z.dtype, codebook.dtype))
    return backend.sinkhorn_row_pass(z, codebook, column_potential, metric, affine, argmax)


@_row_pass_op.register_fake
def _row_pass_fake(z, codebook, column_potential, metric, affine, argmax):
    _check_pass(z, codebook, column_potential, "column_potential", codebook, metric, affine)
    num_rows = z.shape[0]
    return (z.new_empty(num_rows, dtype=column_potential.dtype),
            z.new_empty(num_rows if argmax else 0, dtype=torch.int64))


@torch.library.custom_op("fastvq::sinkhorn_column_pass", mutates_args=())
def _column_pass_op(
    z: Tensor, codebook: Tensor, row_potential: Tensor, metric: str, affine: Tensor
) -> tuple[Tensor, Tensor]:
    """``(max [K], sum [K])``: for each code, the max over rows of ``L_ik + f_i`` and the sum of
    ``exp(L_ik + f_i - max)`` (``(-inf, 0)`` for a code no row reaches)."""
    _check_pass(z, codebook, row_potential, "row_potential", z, metric, affine)
    backend = backends.select("sinkhorn_column_pass", z, torch.promote_types(z.dtype, codebook.dtype))
    return backend.sinkhorn_column_pass(z, codebook, row_potential, metric, affine)


@_column_pass_op.register_fake
def _column_pass_fake(z, codebook, row_potential, metric, affine):
    _check_pass(z, codebook, row_potential, "row_potential", z, metric, affine)
    num_codes = codebook.shape[0]
    return z.new_empty(num_codes, dtype=row_potential.dtype), z.new_empty(num_codes, dtype=row_potential.dtype)
