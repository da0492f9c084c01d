"""The search's codebook, prepared once per call for scoring (the PyTorch path and the Triton
launchers of the nearest-code and top-k searches), and the top-k search's candidate order."""

from __future__ import annotations

from typing import Optional

import torch

from .common import NORM_EPS, compute_dtype


class SearchCodebook:
    """The codebook prepared once per call for scoring (the PyTorch path and the Triton launcher).

    ``l2`` scores are ``|e - c|^2 - 2 (z - c).(e - c)`` with ``c`` the codebook mean: the shift
    leaves every distance unchanged but removes the cancellation that ``z^2 + e^2 - 2 z.e``
    suffers for data far from the origin. ``cosine`` scores are ``-z.e/|e|`` (the positive
    ``1/|z|`` does not change a row's argmin); ``dot`` scores are ``-z.e``.
    """

    def __init__(self, codebook: torch.Tensor, metric: str, dtype: torch.dtype):
        self.metric = metric
        work = codebook.to(compute_dtype(dtype))
        self.center: Optional[torch.Tensor] = None
        self.code_bias: Optional[torch.Tensor] = None
        if metric == "l2":
            # The centre is the mean of the finite codes only: a single NaN or Inf code must not
            # poison the shift of every other code, which would turn every score into NaN.
            finite = work.isfinite().all(dim=1, keepdim=True)
            self.center = torch.where(finite, work, 0).sum(dim=0) / finite.sum().clamp_min(1)
            work = work - self.center
            self.code_bias = (work * work).sum(dim=1)
        elif metric == "cosine":
            work = work / work.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
        self.codes = work

    def scores(self, z_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        codes = self.codes[start:stop]
        if self.metric == "l2":
            scores = torch.addmm(self.code_bias[start:stop], z_rows, codes.T, alpha=-2.0)
        else:
            scores = z_rows @ codes.T
            scores.neg_()
        # nan -> +inf so a NaN distance never wins; +/-inf stay what they are.
        return scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def order_candidates(indices: torch.Tensor, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` candidates ``[N, k]`` in the top-k search's order: ascending true distance,
    equal distances by ascending index, a NaN distance last. O(N k log k), after a search that
    chose the set on its (cancellation-free but rounded) scores."""
    by_index = indices.argsort(dim=1)
    indices, distances = indices.gather(1, by_index), distances.gather(1, by_index)
    by_distance = distances.nan_to_num(nan=float("inf")).argsort(dim=1, stable=True)
    return indices.gather(1, by_distance), distances.gather(1, by_distance)
