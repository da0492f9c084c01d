"""The search's codebook, prepared once per call for scoring (the PyTorch path and the Triton
launchers of the nearest-code and top-k searches), and the top-k search's candidate order."""

from __future__ import annotations

from typing import Optional

import torch

from .common import NORM_EPS, compute_dtype


class SearchCodebook:
    """The codebook prepared once per call for scoring (the PyTorch path and the Triton launcher).

    ``l2`` scores are ``|e - c|^2 - 2 (z - c).(e - c)`` with ``c`` the codebook mean rounded to a
    coarse power of two (:func:`search_center`): the shift leaves every distance unchanged but
    removes the cancellation that ``z^2 + e^2 - 2 z.e`` suffers for data far from the origin.
    ``cosine`` scores are ``-z.e/|e|`` (the positive ``1/|z|`` does not change a row's argmin);
    ``dot`` scores are ``-z.e``.

    The scores are the keys the search ranks codes by: equal keys go to the lowest index, and the
    top-k search lists its codes in the same key order, so its first column is the search's answer.

    A batch of codebooks ``[B, K, D]`` (the batched search) is prepared the same way, each on its own:
    ``center [B, D]``, ``code_bias [B, K]``, ``codes [B, K, D]``.
    """

    def __init__(self, codebook: torch.Tensor, metric: str, dtype: torch.dtype):
        self.metric = metric
        work = codebook.to(compute_dtype(dtype))
        self.center: Optional[torch.Tensor] = None
        self.code_bias: Optional[torch.Tensor] = None
        if metric == "l2":
            # The centre is the mean of the finite codes only: a single NaN or Inf code must not
            # poison the shift of every other code, which would turn every score into NaN.
            self.center = search_center(work)
            work = work - self.center.unsqueeze(-2)
            self.code_bias = (work * work).sum(dim=-1)
        elif metric == "cosine":
            work = work / work.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
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

    def batched_scores(self, z_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """``[B, rows, stop - start]`` scores of a batch of codebooks, ``z_rows [B, rows, D]``."""
        codes = self.codes[:, start:stop].transpose(1, 2)
        if self.metric == "l2":
            scores = torch.baddbmm(self.code_bias[:, None, start:stop], z_rows, codes, alpha=-2.0)
        else:
            scores = torch.bmm(z_rows, codes)
            scores.neg_()
        return scores.nan_to_num_(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def search_center(codes: torch.Tensor) -> torch.Tensor:
    """The l2 search's centre ``c [D]`` of ``codes [K, D]`` (float32 or float64): per dimension, the
    mean of the finite codes only (a single NaN or Inf code must not poison the shift of every other
    code, which would turn every score into NaN), rounded to a multiple of the largest power of two
    at or below the codes' mean absolute deviation there (kept as is where that is 0 or infinite).

    The rounding moves ``c`` by at most half the codes' spread, which keeps the cancellation away,
    and makes ``e - c`` and ``z - c`` exact for data on a grid (integers, say): equally distant codes
    then get exactly equal scores, so the tie goes to the lowest index as it should. The C++ search
    (``csrc/search_cpu.cpp``, ``search_center``) computes the same centre. A batch ``[B, K, D]`` gives
    each codebook's centre, ``[B, D]``."""
    finite = codes.isfinite().all(dim=-1, keepdim=True)
    count = finite.sum(dim=-2).clamp_min(1)
    mean = torch.where(finite, codes, 0).sum(dim=-2) / count
    deviation = torch.where(finite, (codes - mean.unsqueeze(-2)).abs(), 0).sum(dim=-2) / count
    step = torch.exp2(torch.floor(torch.log2(deviation)))
    # A deviation of 0 leaves nothing to round to; one that overflowed (codes near the float maximum) too.
    return torch.where((deviation > 0) & deviation.isfinite(), torch.round(mean / step) * step, mean)


def order_candidates(
    indices: torch.Tensor, keys: torch.Tensor, distances: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` candidates ``[N, k]`` in the top-k search's order: ascending ``keys`` (the
    scores the search ranked them by, NaN as +inf), among equal keys a NaN true distance last, then
    ascending index. With the search's scores as keys the first column is the search's answer;
    Gumbel sampling passes the true distances as keys. O(N k log k)."""
    order = indices.argsort(dim=1)
    for key in (distances.isnan().to(torch.uint8), keys.nan_to_num(nan=float("inf"))):  # stable: last key first
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    return indices.gather(1, order), distances.gather(1, order)


def nonfinite_cosine_rows(z: torch.Tensor, metric: str) -> Optional[torch.Tensor]:
    """``bool [N]``: the rows of ``z`` with a NaN or Inf entry when ``metric`` is cosine (else None).

    Such a row's ``1 - cos`` is NaN to every code (``Inf / Inf``), but its scores ``-z.e / |e|`` are
    +-Inf and would pick an arbitrary code: the contract gives a row whose every distance is NaN
    index 0 (top-k: ``0..k-1``), as it does a NaN row."""
    return ~z.isfinite().all(dim=1) if metric == "cosine" else None
