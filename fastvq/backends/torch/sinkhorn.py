"""The PyTorch path's Sinkhorn passes: row chunks of the cost, one matmul each, never the ``N x K`` matrix.

Each pass walks ``z`` in chunks of rows sized so that one chunk's slab of costs against the whole
codebook, temporaries included, stays under ``CHUNK_BYTES``. The row pass reduces each slab row-wise
(log-sum-exp, argmax); the column pass folds each slab's per-code ``(max, sum of exp)`` into running
ones, the same online combination the kernels make across row tiles.
"""

from __future__ import annotations

import math

import torch

from .. import common
from ..common import NORM_EPS
from ..sinkhorn_stats import STATS_SIZE, combine_stats

# Bytes one slab entry costs: the cost, the logits and the exponentials of its row.
_SLAB_BYTES_PER_ENTRY = 16


class _Costs:
    """The codebook prepared once per pass, and the cost slab of a chunk of rows against it."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, metric: str):
        self.work = torch.float64 if torch.promote_types(z.dtype, codebook.dtype) == torch.float64 else torch.float32
        self.z = z
        self.metric = metric
        codes = codebook.to(self.work)
        if metric == "cosine":
            codes = codes / codes.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        self.codes_t = codes.T
        self.codes_sq = (codes * codes).sum(dim=1)
        num_codes = codebook.shape[0]
        self.rows_per_chunk = max(1, common.CHUNK_BYTES // (_SLAB_BYTES_PER_ENTRY * num_codes))

    def chunks(self):
        for start in range(0, self.z.shape[0], self.rows_per_chunk):
            yield start, min(start + self.rows_per_chunk, self.z.shape[0])

    def slab(self, start: int, stop: int) -> torch.Tensor:
        rows = self.z[start:stop].to(self.work)
        if self.metric == "cosine":
            rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
            # Rounding can put a parallel pair's 1 - cos a few ulps below 0; clamp_min keeps NaN.
            return (1.0 - rows @ self.codes_t).clamp_min_(0.0)
        products = rows @ self.codes_t
        if self.metric == "dot":
            return products.neg_()
        cost = products.mul_(-2.0).add_((rows * rows).sum(dim=1, keepdim=True)).add_(self.codes_sq).clamp_min_(0.0)
        return cost.sqrt_() if self.metric == "euclidean" else cost

    def logits(self, start: int, stop: int, affine: torch.Tensor) -> torch.Tensor:
        """``(shift - C) * scale`` for the chunk's rows."""
        return self.slab(start, stop).neg_().add_(affine[0]).mul_(affine[1])


def _no_nan_(values: torch.Tensor) -> torch.Tensor:
    """NaN entries as ``-inf``, in place: no mass in a log-sum-exp, never an argmax."""
    return values.masked_fill_(values.isnan(), -math.inf)


def _max_and_sum(values: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max, sum of exp(values - max))`` along ``dim``; ``(-inf, 0)`` where every entry is ``-inf``."""
    high = values.amax(dim=dim)
    safe = torch.where(high == -math.inf, 0.0, high)
    return high, torch.exp(values - safe.unsqueeze(dim)).sum(dim=dim)


def sinkhorn_cost_stats(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    costs = _Costs(z, codebook, metric)
    partials = [torch.zeros(STATS_SIZE, dtype=torch.float64, device=z.device)]
    for start, stop in costs.chunks():
        slab = costs.slab(start, stop).to(torch.float64)
        valid = ~slab.isnan()
        count = valid.sum()
        mean = torch.where(valid, slab, 0.0).sum() / count.clamp_min(1)
        squares = torch.where(valid, (slab - mean) ** 2, 0.0).sum()
        low = torch.where(valid, slab, math.inf).amin()
        high = torch.where(valid, slab, -math.inf).amax()
        partials.append(torch.stack([count.to(torch.float64), low, high, mean, squares]))
    return combine_stats(torch.stack(partials))


def sinkhorn_row_pass(
    z: torch.Tensor, codebook: torch.Tensor, column_potential: torch.Tensor, metric: str, affine: torch.Tensor,
    argmax: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    costs = _Costs(z, codebook, metric)
    lse = torch.empty(z.shape[0], dtype=costs.work, device=z.device)
    indices = torch.empty(z.shape[0] if argmax else 0, dtype=torch.int64, device=z.device)
    for start, stop in costs.chunks():
        scores = _no_nan_(costs.logits(start, stop, affine).add_(column_potential))
        high, total = _max_and_sum(scores, dim=1)
        lse[start:stop] = torch.where(total > 0, high + torch.log(total), -math.inf)
        if argmax:
            indices[start:stop] = scores.argmax(dim=1)  # the first maximum: ties to the lowest index
    return lse, indices


def sinkhorn_column_pass(
    z: torch.Tensor, codebook: torch.Tensor, row_potential: torch.Tensor, metric: str, affine: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    costs = _Costs(z, codebook, metric)
    num_codes = codebook.shape[0]
    high = torch.full((num_codes,), -math.inf, dtype=costs.work, device=z.device)
    total = torch.zeros(num_codes, dtype=costs.work, device=z.device)
    for start, stop in costs.chunks():
        scores = _no_nan_(costs.logits(start, stop, affine).add_(row_potential[start:stop, None]))
        chunk_high, chunk_total = _max_and_sum(scores, dim=0)
        new_high = torch.maximum(high, chunk_high)
        safe = torch.where(new_high == -math.inf, 0.0, new_high)
        total = total * torch.exp(high - safe) + chunk_total * torch.exp(chunk_high - safe)
        high = new_high
    return high, total
