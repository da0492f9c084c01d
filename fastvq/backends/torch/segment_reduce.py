"""The PyTorch path's segment reduce: per-code counts and sums by ``index_add_``, in row chunks."""

from __future__ import annotations

import torch

from .. import common
from ..common import compute_dtype
from ._scatter import deterministic_scatter


def segment_reduce(
    values: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[K]`` and sums ``[K, D]`` in fp32; indices outside ``[0, K)`` are ignored."""
    num_rows, dim = values.shape
    work_dtype = compute_dtype(values.dtype)
    counts = torch.zeros(num_codes + 1, dtype=torch.int64, device=values.device)
    sums = torch.zeros(num_codes + 1, dim, dtype=work_dtype, device=values.device)
    # Out-of-range indices land in a spill row that is dropped, so nothing is written out of bounds.
    safe = torch.where((indices >= 0) & (indices < num_codes), indices.long(), num_codes)
    counts.index_add_(0, safe, torch.ones_like(safe))
    rows_per_chunk = max(1, common.CHUNK_BYTES // max(1, dim * 4))
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            sums.index_add_(0, safe[start:stop], values[start:stop].to(work_dtype))
    return counts[:num_codes].float(), sums[:num_codes].float()
