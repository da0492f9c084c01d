"""The PyTorch path's top-k search (``FASTVQ_BACKEND=torch``): the ``k`` nearest codes of each row.

Like the nearest-code search it walks ``z`` in row chunks and the codebook in code chunks whose
score slab stays under ``CHUNK_BYTES``, carrying each row's best ``k`` (score, index) pairs across
code chunks: the carried pairs and the chunk's scores are merged by a stable sort, so equal scores
keep the lower index, whatever the chunking. Nothing of size ``N x K`` is ever held. With
``sample_temperature > 0`` the scores carry Gumbel noise first (Gumbel-top-k: ``k`` codes drawn
without replacement from ``softmax(-distance / T)``).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import common
from ..common import compute_dtype
from ..search_codebook import SearchCodebook, nonfinite_cosine_rows, order_candidates
from .search import gumbel_scores, true_distance

# The slab of one chunk: its scores, the sort's copies of them and their indices.
_SLAB_BYTES_PER_SCORE = 24
_CODES_PER_CHUNK = 2048


def _chunk_sizes(num_rows: int, num_codes: int, k: int) -> tuple[int, int]:
    max_scores = max(1, common.CHUNK_BYTES // _SLAB_BYTES_PER_SCORE)
    codes_per_chunk = min(num_codes, max(k, min(_CODES_PER_CHUNK, max_scores)))
    rows_per_chunk = max(1, min(max(num_rows, 1), max_scores // (codes_per_chunk + k)))
    return rows_per_chunk, codes_per_chunk


def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    k: int,
    metric: str,
    sample_temperature: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_rows, dim = z.shape
    num_codes = codebook.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    work_dtype = compute_dtype(out_dtype)
    indices = torch.empty((num_rows, k), dtype=torch.int64, device=z.device)
    distances = torch.empty((num_rows, k), dtype=torch.float32, device=z.device)
    if num_rows == 0:
        return indices, distances
    search = SearchCodebook(codebook, metric, out_dtype)
    codebook_work = codebook.to(work_dtype)
    rows_per_chunk, codes_per_chunk = _chunk_sizes(num_rows, num_codes, k)
    sampling = sample_temperature > 0.0
    if sampling:
        base_seed = int(seed.reshape(()).item())
        generator = torch.Generator(device=z.device)
    for row_start in range(0, num_rows, rows_per_chunk):
        rows = slice(row_start, min(row_start + rows_per_chunk, num_rows))
        z_rows = z[rows].to(work_dtype)
        z_search = z_rows - search.center if search.center is not None else z_rows
        if sampling and metric != "dot":
            z_sq = (z_search * z_search).sum(dim=1)
        best = best_index = None
        for code_start in range(0, num_codes, codes_per_chunk):
            code_stop = min(code_start + codes_per_chunk, num_codes)
            scores = search.scores(z_search, code_start, code_stop)
            if sampling:
                generator.manual_seed((base_seed * 1000003 + row_start * num_codes + code_start) % (2**63))
                scores = gumbel_scores(scores, z_sq if metric != "dot" else None, metric, sample_temperature,
                                       generator)
            chunk_index = torch.arange(code_start, code_stop, device=z.device).expand(scores.shape[0], -1)
            if best is not None:
                # The carried pairs come first and hold lower indices: a stable sort keeps them ahead on ties.
                scores = torch.cat((best, scores), dim=1)
                chunk_index = torch.cat((best_index, chunk_index), dim=1)
            order = scores.argsort(dim=1, stable=True)[:, :k]
            best, best_index = scores.gather(1, order), chunk_index.gather(1, order)
            del scores, chunk_index, order
        nonfinite = nonfinite_cosine_rows(z_rows, metric)
        if nonfinite is not None:
            first_codes = torch.arange(k, device=z.device).expand_as(best_index)
            best_index = torch.where(nonfinite[:, None], first_codes, best_index)
            best = torch.where(nonfinite[:, None], float("inf"), best)
        chosen = codebook_work[best_index]
        row_distances = true_distance(z_rows[:, None, :].expand_as(chosen).reshape(-1, dim),
                                      chosen.reshape(-1, dim), metric).reshape(-1, k).float()
        indices[rows], distances[rows] = order_candidates(best_index, row_distances if sampling else best,
                                                          row_distances)
    return indices, distances
