"""The PyTorch path's residual quantization and its backward, in row chunks.

Each chunk of rows walks the levels with its residual, searching each level with this path's
nearest-code search (``search.nearest_code``: code chunks, a running argmin, never ``N x K``); the
backward walks the same levels again from the saved indices to rebuild each level's residual, so
neither direction holds more than one chunk's ``[rows, D]`` residual at a time (no ``N x L x D``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import common
from ..common import compute_dtype
from ._scatter import deterministic_scatter
from .search import nearest_code

# Tensors of a chunk's [rows, D] in flight at once: the residual, the running sum, the codes, a temporary.
_ROW_TENSORS = 4


def _rows_per_chunk(dim: int, elem_size: int) -> int:
    return max(1, common.CHUNK_BYTES // max(1, _ROW_TENSORS * dim * elem_size))


def _level_counts(num_rows: int, n_q: int, row_levels: Optional[torch.Tensor], device) -> torch.Tensor:
    """Each row's number of levels, ``min(n_q, max(row_levels, 0))``."""
    if row_levels is None:
        return torch.full((num_rows,), n_q, dtype=torch.int64, device=device)
    return row_levels.to(device=device, dtype=torch.int64).clamp(0, n_q)


def residual_quantize(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    n_q: int,
    row_levels: Optional[torch.Tensor],
    return_stats: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indices [N, L], quantized [N, D], commitment fp32 [L], counts fp32 [L, K], sums fp32 [L, K, D])``."""
    num_rows, dim = z.shape
    num_levels, num_codes, _ = codebooks.shape
    out_dtype = torch.promote_types(z.dtype, codebooks.dtype)
    work_dtype = compute_dtype(out_dtype)
    device = z.device
    indices = torch.full((num_rows, num_levels), -1, dtype=torch.int64, device=device)
    quantized = torch.empty((num_rows, dim), dtype=out_dtype, device=device)
    commitment = torch.zeros(num_levels, dtype=work_dtype, device=device)
    stat_levels = num_levels if return_stats else 0
    # One spare code row past K takes the rows a level skips, so the scatter needs no boolean indexing.
    counts = torch.zeros((stat_levels, num_codes + 1), dtype=work_dtype, device=device)
    sums = torch.zeros((stat_levels, num_codes + 1, dim), dtype=work_dtype, device=device)
    levels = _level_counts(num_rows, n_q, row_levels, device)
    rows_per_chunk = _rows_per_chunk(dim, torch.finfo(work_dtype).bits // 8)
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            residual = z[rows].to(work_dtype)
            total = torch.zeros_like(residual)
            for level in range(n_q):
                active = level < levels[rows]
                chosen, _, codes = nearest_code(residual, codebooks[level], "l2", True)
                chosen = torch.where(active, chosen, -1)
                codes = torch.where(active[:, None], codes.to(work_dtype), 0)
                indices[rows, level] = chosen
                if return_stats:
                    target = torch.where(active, chosen, num_codes)
                    counts[level].index_add_(0, target, active.to(work_dtype))
                    sums[level].index_add_(0, target, residual)
                residual = residual - codes
                total += codes
                squared = torch.where(active, (residual * residual).sum(dim=1), 0)
                commitment[level] += squared.sum()
            quantized[rows] = total
    return (indices, quantized, commitment.float(), counts[:, :num_codes].float().contiguous(),
            sums[:, :num_codes].float().contiguous())


def grad_multiplier(indices: torch.Tensor, straight_through: str, dtype: torch.dtype) -> torch.Tensor:
    """``[rows, 1]``: how many times ``grad_quantized`` reaches ``z`` in each row under ``straight_through``."""
    used = indices >= 0
    if straight_through == "final":
        return torch.ones((indices.shape[0], 1), dtype=dtype, device=indices.device)
    if straight_through == "per_level":
        return used[:, :1].to(dtype)
    return used.sum(dim=1, keepdim=True).to(dtype)


def residual_quantize_backward(
    grad_quantized: torch.Tensor,
    grad_commitment: torch.Tensor,
    grad_codebook_loss: torch.Tensor,
    z: torch.Tensor,
    codebooks: torch.Tensor,
    indices: torch.Tensor,
    straight_through: str,
    compute_codebook_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients ``fastvq.ops.residual_quantize``'s backward operator documents, level by level.

    Level ``l``'s residual after it, ``e_l = r_l - q_l``, is rebuilt from ``z`` and the chosen codes; it
    is the commitment's gradient direction (``2 c_l e_l`` to ``z``) and, negated, the codebook loss's
    (``-2 b_l e_l`` onto code ``indices[:, l]``). ``per_level`` needs level 0 only for ``z``.
    """
    num_rows, dim = z.shape
    num_levels, num_codes, _ = codebooks.shape
    work_dtype = compute_dtype(torch.promote_types(z.dtype, codebooks.dtype))
    device = z.device
    codes_work = codebooks.to(work_dtype)
    commit_scale = 2.0 * grad_commitment.to(work_dtype)
    codebook_scale = -2.0 * grad_codebook_loss.to(work_dtype)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=device)
    grad_codebooks = torch.zeros((num_levels if compute_codebook_grad else 0, num_codes + 1, dim),
                                 dtype=work_dtype, device=device)
    z_levels = 1 if straight_through == "per_level" else num_levels
    walk_levels = num_levels if compute_codebook_grad else z_levels
    rows_per_chunk = _rows_per_chunk(dim, torch.finfo(work_dtype).bits // 8)
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            chosen = indices[rows]
            residual = z[rows].to(work_dtype)
            grad = grad_quantized[rows].to(work_dtype) * grad_multiplier(chosen, straight_through, work_dtype)
            for level in range(walk_levels):
                active = chosen[:, level] >= 0
                codes = torch.where(active[:, None], codes_work[level][chosen[:, level].clamp_min(0)], 0)
                after = torch.where(active[:, None], residual - codes, 0)
                if level < z_levels:
                    grad += commit_scale[level] * after
                if compute_codebook_grad:
                    target = torch.where(active, chosen[:, level], num_codes)
                    grad_codebooks[level].index_add_(0, target, after * codebook_scale[level])
                residual = residual - codes
            grad_z[rows] = grad
    return grad_z, grad_codebooks[:, :num_codes].contiguous()
