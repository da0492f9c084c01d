"""What the residual quantization's backends share: each level's codebook as the search scores it, and the
per-level EMA statistics rebuilt from the chosen indices in a fixed order (the Triton launcher's deterministic
path). Nothing here imports a backend."""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import common


class PreparedLevels(NamedTuple):
    """Every level's codebook as the l2 search scores it (``search_codebook.SearchCodebook``'s form), fp32:
    ``codes [L, K, D]`` centred on ``center [L, D]`` (each level's ``search_center``), ``bias [L, K]`` their
    squared norms. A level's scores are ``bias - 2 (r - center) . codes``."""

    codes: torch.Tensor
    bias: torch.Tensor
    center: torch.Tensor


def prepare_levels(codebooks: torch.Tensor) -> PreparedLevels:
    """A fixed number of PyTorch ops whatever ``L``: with the one kernel launch of the level walk, the whole
    forward stays a handful of launches on a GPU."""
    work = codebooks.to(torch.float32)
    center = level_centers(work)
    codes = (work - center[:, None, :]).contiguous()
    return PreparedLevels(codes, (codes * codes).sum(dim=2).contiguous(), center.contiguous())


def level_centers(codes: torch.Tensor) -> torch.Tensor:
    """``search_codebook.search_center`` of every level of ``codes [L, K, D]`` at once, ``[L, D]``: per level and
    dimension the mean of that level's finite codes, rounded to a multiple of the largest power of two at or
    below their mean absolute deviation (kept where that is 0 or infinite)."""
    finite = codes.isfinite().all(dim=2, keepdim=True)
    count = finite.sum(dim=1).clamp_min(1)
    mean = torch.where(finite, codes, 0).sum(dim=1) / count
    deviation = torch.where(finite, (codes - mean[:, None, :]).abs(), 0).sum(dim=1) / count
    step = torch.exp2(torch.floor(torch.log2(deviation)))
    return torch.where((deviation > 0) & deviation.isfinite(), torch.round(mean / step) * step, mean)


def level_statistics(
    z: torch.Tensor, codebooks: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counts fp32 [L, K], sums fp32 [L, K, D])`` of the residual each level saw, rebuilt in row chunks from
    ``z`` and the chosen ``indices [N, L]`` (-1: the row skips the level) and summed in a fixed order (PyTorch's
    deterministic ``index_add_``)."""
    num_rows, dim = z.shape
    num_levels, num_codes, _ = codebooks.shape
    codes = codebooks.to(torch.float32)
    counts = torch.zeros((num_levels, num_codes + 1), dtype=torch.float32, device=z.device)
    sums = torch.zeros((num_levels, num_codes + 1, dim), dtype=torch.float32, device=z.device)
    rows_per_chunk = max(1, common.CHUNK_BYTES // max(1, 3 * 4 * dim))
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for start in range(0, num_rows, rows_per_chunk):
            chosen = indices[start : start + rows_per_chunk]
            residual = z[start : start + rows_per_chunk].to(torch.float32)
            for level in range(num_levels):
                active = chosen[:, level] >= 0
                target = torch.where(active, chosen[:, level], num_codes)
                counts[level].index_add_(0, target, active.to(torch.float32))
                sums[level].index_add_(0, target, residual)
                residual = residual - torch.where(active[:, None], codes[level][chosen[:, level].clamp_min(0)], 0)
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
    return counts[:, :num_codes].contiguous(), sums[:, :num_codes].contiguous()
