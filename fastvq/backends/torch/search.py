"""The PyTorch path's nearest-code search (``FASTVQ_BACKEND=torch``), with Gumbel-max sampling.

It runs on any device PyTorch runs on, with no compilation. The search walks ``z`` in row chunks
and the codebook in code chunks sized so that one chunk's slab of scores, temporaries included,
stays under ``CHUNK_BYTES``; a running (min, argmin) per row is carried across code chunks exactly
as the Triton kernel carries it across code tiles, so both backends make the same choices and
neither ever holds an ``N x K`` matrix.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import common
from ..common import NORM_EPS, compute_dtype
from ..search_codebook import SearchCodebook, nonfinite_cosine_rows

# Bytes one slab entry costs: the score itself plus the argmin/compare temporaries of its row.
_SLAB_BYTES_PER_SCORE = 8
# Codes per chunk: small enough that the codebook chunk stays cache-resident while rows stream
# past it, large enough that each matmul is worth its launch.
_CODES_PER_CHUNK = 2048


def _chunk_sizes(num_rows: int, num_codes: int) -> tuple[int, int]:
    max_scores = max(1, common.CHUNK_BYTES // _SLAB_BYTES_PER_SCORE)
    codes_per_chunk = min(num_codes, _CODES_PER_CHUNK, max_scores)
    rows_per_chunk = max(1, min(max(num_rows, 1), max_scores // codes_per_chunk))
    return rows_per_chunk, codes_per_chunk


def true_distance(z_rows: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """The contract's distance of each row to its chosen code, computed directly (no cancellation);
    ``z_rows`` and ``codes`` ``[..., D]``."""
    if metric == "l2":
        diff = z_rows - codes
        return (diff * diff).sum(dim=-1)
    dots = (z_rows * codes).sum(dim=-1)
    if metric == "dot":
        return -dots
    norms = z_rows.norm(dim=-1).clamp_min(NORM_EPS) * codes.norm(dim=-1).clamp_min(NORM_EPS)
    # Rounding can put a parallel pair's 1 - cos a few ulps below 0; clamp_min keeps NaN.
    return (1.0 - dots / norms).clamp_min(0.0)


def gumbel_scores(
    scores: torch.Tensor, z_sq: torch.Tensor, metric: str, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """Turns a slab of search scores into Gumbel-max sampling scores, in place.

    The argmin of ``distance / T - gumbel`` is a sample from ``softmax(-distance / T)``: l2 uses
    the plain distance (vector-quantize-pytorch's ``-cdist`` logits), cosine the true cosine, dot
    ``-z.e``. ``z_sq`` holds each row's ``|z - c|^2`` (l2) or ``|z|^2`` (cosine).
    """
    if metric == "l2":
        scores.add_(z_sq[:, None]).clamp_(min=0).sqrt_()
    elif metric == "cosine":
        scores.div_(z_sq.sqrt().clamp_min(NORM_EPS)[:, None])
    uniform = torch.rand(scores.shape, generator=generator, dtype=scores.dtype, device=scores.device)
    gumbel = uniform.clamp_(min=1e-20).log_().neg_().clamp_(min=1e-20).log_().neg_()
    return scores.mul_(1.0 / temperature).sub_(gumbel)


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    return_codes: bool,
    sample_temperature: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    num_rows, dim = z.shape
    num_codes = codebook.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    work_dtype = compute_dtype(out_dtype)
    indices = torch.empty(num_rows, dtype=torch.int64, device=z.device)
    distances = torch.empty(num_rows, dtype=torch.float32, device=z.device)
    codes_out = torch.empty((num_rows if return_codes else 0, dim), dtype=out_dtype, device=z.device)
    if num_rows == 0:
        return indices, distances, codes_out
    search = SearchCodebook(codebook, metric, out_dtype)
    rows_per_chunk, codes_per_chunk = _chunk_sizes(num_rows, num_codes)
    sampling = sample_temperature > 0.0
    if sampling:
        # One generator stream per slab, seeded from (seed, slab position): reproducible for a
        # seed and independent of everything else. Reading the seed syncs with its device, which
        # only matters for this path on a GPU, the last-resort case.
        base_seed = int(seed.reshape(()).item())
        generator = torch.Generator(device=z.device)
    for row_start in range(0, num_rows, rows_per_chunk):
        rows = slice(row_start, min(row_start + rows_per_chunk, num_rows))
        z_rows = z[rows].to(work_dtype)
        z_search = z_rows - search.center if search.center is not None else z_rows
        best = torch.full((z_rows.shape[0],), float("inf"), dtype=work_dtype, device=z.device)
        best_index = torch.zeros(z_rows.shape[0], dtype=torch.int64, device=z.device)
        if sampling:
            z_sq = (z_search * z_search).sum(dim=1) if metric != "dot" else None
        for code_start in range(0, num_codes, codes_per_chunk):
            code_stop = min(code_start + codes_per_chunk, num_codes)
            scores = search.scores(z_search, code_start, code_stop)
            if sampling:
                generator.manual_seed((base_seed * 1000003 + row_start * num_codes + code_start) % (2**63))
                scores = gumbel_scores(scores, z_sq, metric, sample_temperature, generator)
            chunk_best, chunk_index = scores.min(dim=1)
            # Strict '<' keeps the earlier chunk on ties: the lowest index wins across chunks too.
            better = chunk_best < best
            best = torch.where(better, chunk_best, best)
            best_index = torch.where(better, chunk_index + code_start, best_index)
            del scores, chunk_best, chunk_index, better
        nonfinite = nonfinite_cosine_rows(z_rows, metric)
        if nonfinite is not None:
            best_index.masked_fill_(nonfinite, 0)
        chosen = codebook[best_index]
        indices[rows] = best_index
        distances[rows] = true_distance(z_rows, chosen.to(work_dtype), metric).float()
        if return_codes:
            codes_out[rows] = chosen
    return indices, distances, codes_out


def nearest_code_batched(
    z: torch.Tensor, codebook: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """B searches at once, ``z [B, N, D]`` against ``codebook [B, K, D]``: the same chunks as
    :func:`nearest_code` with a batch dimension in front (``baddbmm`` over the B problems), one slab of
    ``B x rows x codes`` scores bounded by ``CHUNK_BYTES`` like the single search's."""
    num_problems, num_rows, dim = z.shape
    num_codes = codebook.shape[1]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    work_dtype = compute_dtype(out_dtype)
    indices = torch.empty(num_problems, num_rows, dtype=torch.int64, device=z.device)
    distances = torch.empty(num_problems, num_rows, dtype=torch.float32, device=z.device)
    if indices.numel() == 0:
        return indices, distances
    search = SearchCodebook(codebook, metric, out_dtype)
    max_scores = max(1, common.CHUNK_BYTES // _SLAB_BYTES_PER_SCORE)
    codes_per_chunk = max(1, min(num_codes, _CODES_PER_CHUNK, max_scores // num_problems))
    rows_per_chunk = max(1, min(num_rows, max_scores // (num_problems * codes_per_chunk)))
    for row_start in range(0, num_rows, rows_per_chunk):
        rows = slice(row_start, min(row_start + rows_per_chunk, num_rows))
        z_rows = z[:, rows].to(work_dtype)
        z_search = z_rows - search.center[:, None] if search.center is not None else z_rows
        best = torch.full(z_rows.shape[:2], float("inf"), dtype=work_dtype, device=z.device)
        best_index = torch.zeros(z_rows.shape[:2], dtype=torch.int64, device=z.device)
        for code_start in range(0, num_codes, codes_per_chunk):
            scores = search.batched_scores(z_search, code_start, min(code_start + codes_per_chunk, num_codes))
            chunk_best, chunk_index = scores.min(dim=2)
            # Strict '<' keeps the earlier chunk on ties: the lowest index wins across chunks too.
            better = chunk_best < best
            best = torch.where(better, chunk_best, best)
            best_index = torch.where(better, chunk_index + code_start, best_index)
            del scores, chunk_best, chunk_index, better
        if metric == "cosine":
            best_index.masked_fill_(~z_rows.isfinite().all(dim=-1), 0)
        chosen = codebook.gather(1, best_index[..., None].expand(-1, -1, dim))
        indices[:, rows] = best_index
        distances[:, rows] = true_distance(z_rows, chosen.to(work_dtype), metric).float()
    return indices, distances
