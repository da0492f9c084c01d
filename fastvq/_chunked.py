"""The memory-bounded pure-PyTorch backend (``FASTVQ_BACKEND=torch``).

It runs on any device PyTorch runs on, with no compilation. The search walks ``z`` in row chunks
and the codebook in code chunks sized so that one chunk's slab of scores, temporaries included,
stays under ``CHUNK_BYTES``; a running (min, argmin) per row is carried across code chunks exactly
as the Triton kernel carries it across code tiles, so both backends make the same choices and
neither ever holds an ``N x K`` matrix.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

CHUNK_BYTES = 32 * 1024 * 1024
# Bytes one slab entry costs: the score itself plus the argmin/compare temporaries of its row.
_SLAB_BYTES_PER_SCORE = 8
# Codes per chunk: small enough that the codebook chunk stays cache-resident while rows stream
# past it, large enough that each matmul is worth its launch.
_CODES_PER_CHUNK = 2048
_NORM_EPS = 1e-12  # F.normalize's eps: a zero vector has cosine 0 to every code


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores accumulate in fp32 for every input dtype, and in fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_sizes(num_rows: int, num_codes: int) -> tuple[int, int]:
    max_scores = max(1, CHUNK_BYTES // _SLAB_BYTES_PER_SCORE)
    codes_per_chunk = min(num_codes, _CODES_PER_CHUNK, max_scores)
    rows_per_chunk = max(1, min(max(num_rows, 1), max_scores // codes_per_chunk))
    return rows_per_chunk, codes_per_chunk


class SearchCodebook:
    """The codebook prepared once per call for scoring.

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
            work = work / work.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
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


def true_distance(z_rows: torch.Tensor, codes: torch.Tensor, metric: str) -> torch.Tensor:
    """The contract's distance of each row to its chosen code, computed directly (no cancellation)."""
    if metric == "l2":
        diff = z_rows - codes
        return (diff * diff).sum(dim=1)
    dots = (z_rows * codes).sum(dim=1)
    if metric == "dot":
        return -dots
    norms = z_rows.norm(dim=1).clamp_min(_NORM_EPS) * codes.norm(dim=1).clamp_min(_NORM_EPS)
    return 1.0 - dots / norms


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
        scores.div_(z_sq.sqrt().clamp_min(_NORM_EPS)[:, None])
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
        chosen = codebook[best_index]
        indices[rows] = best_index
        distances[rows] = true_distance(z_rows, chosen.to(work_dtype), metric).float()
        if return_codes:
            codes_out[rows] = chosen
    return indices, distances, codes_out


@contextlib.contextmanager
def deterministic_scatter(enabled: bool):
    """Turns PyTorch's deterministic mode on around an ``index_add_`` when asked.

    ``index_add_`` is deterministic on CPU; on CUDA it uses float atomics unless the mode is on.
    """
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled and not previous:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if enabled and not previous:
            torch.use_deterministic_algorithms(False, warn_only=warn_only)


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
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, dim * 4))
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_rows)
            sums.index_add_(0, safe[start:stop], values[start:stop].to(work_dtype))
    return counts[:num_codes].float(), sums[:num_codes].float()


def rotation_trick_grad(grad: torch.Tensor, z: torch.Tensor, codes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick's gradient (Fifty et al. 2024) for rows of ``z`` quantized to ``codes``.

    With ``u = z/|z|``, ``q = e/|e|``, ``w = (u + q)/|u + q|`` and ``s = |e|/|z|`` held constant,
    the forward ``s (I - 2 w w^T + 2 q u^T) z`` equals ``e``; its transpose sends ``g`` to
    ``s (g - 2 w (w.g) + 2 u (q.g))``. ``eps`` floors the norms as vector-quantize-pytorch does.
    """
    z_norm = z.norm(dim=1, keepdim=True)
    e_norm = codes.norm(dim=1, keepdim=True)
    u = z / z_norm.clamp_min(eps)
    q = codes / e_norm.clamp_min(eps)
    w = u + q
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    scale = e_norm / z_norm.clamp_min(eps)
    return scale * (grad - 2.0 * w * (grad * w).sum(dim=1, keepdim=True) + 2.0 * u * (grad * q).sum(dim=1, keepdim=True))


def vector_quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    z: torch.Tensor,
    quantized: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    commitment_scale: float,
    codebook_scale: float,
    compute_codebook_grad: bool,
    rotation_trick: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient to ``z`` and the codebook-loss gradient to the chosen codes only.

    With ``e_i = quantized[i]`` the code row ``i`` chose:
    ``grad_z = T(grad_q) + grad_loss * commitment_scale * (z - e)``, ``T`` the identity
    (straight-through) or the rotation trick's transpose, and
    ``grad_codebook[k] = grad_loss * codebook_scale * sum_{i: idx_i = k} (e_i - z_i)`` (fp32), where
    the scales already hold ``2 * weight / (N * D)``. Indices outside ``[0, K)`` scatter nowhere.
    """
    num_rows, dim = z.shape
    work_dtype = compute_dtype(quantized.dtype)
    scale = grad_loss.to(work_dtype)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad_codebook = torch.zeros(num_codes + 1, dim, dtype=work_dtype, device=z.device)
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, dim * 8))
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            z_rows = z[rows].to(work_dtype)
            codes = quantized[rows].to(work_dtype)
            grad_rows = grad_quantized[rows].to(work_dtype)
            if rotation_trick:
                grad_rows = rotation_trick_grad(grad_rows, z_rows, codes)
            diff = z_rows - codes
            grad_z[rows] = grad_rows + (scale * commitment_scale) * diff
            if compute_codebook_grad:
                chosen = indices[rows]
                safe = torch.where((chosen >= 0) & (chosen < num_codes), chosen.long(), num_codes)
                grad_codebook.index_add_(0, safe, diff, alpha=-codebook_scale)
    grad_codebook = grad_codebook[:num_codes] * scale
    return grad_z, grad_codebook.float()
