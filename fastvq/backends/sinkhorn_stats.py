"""The Sinkhorn cost statistics' layout and how partial statistics combine (every backend and the
distributed path of ``fastvq.ops.sinkhorn`` use it).

A statistics row is ``float64 [5]``: the count of non-NaN costs, their minimum, maximum, mean and sum of
squared deviations from the mean (so that the variance of costs far from zero does not cancel).
"""

from __future__ import annotations

import math

import torch

STATS_SIZE = 5


def combine_stats(stats: torch.Tensor) -> torch.Tensor:
    """One statistics row from the rows of ``stats [P, 5]`` (partials over disjoint sets of costs), by
    Chan's pairwise formula, in float64."""
    stats = stats.to(torch.float64)
    count = stats[:, 0]
    total = count.sum()
    mean = (stats[:, 3] * count).sum() / total.clamp_min(1.0)
    # A partial with no costs holds mean 0 and squares 0: its zero count keeps it out of every term.
    squares = (stats[:, 4] + count * (stats[:, 3] - mean) ** 2).sum()
    low = torch.where(count > 0, stats[:, 1], math.inf).min()
    high = torch.where(count > 0, stats[:, 2], -math.inf).max()
    return torch.stack([total, low, high, mean, squares])
