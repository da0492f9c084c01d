"""The PyTorch path's soft assignments: ``softmax(logits) @ values`` and the hard argmax, and the
entropies of the soft assignment, computed online over code chunks (``FASTVQ_BACKEND=torch``).

It runs on any device PyTorch runs on. Like flash attention it walks ``z`` in row chunks and the
codebook in code chunks, each slab of logits (temporaries included) under ``CHUNK_BYTES``, and
carries per row a running maximum, a running sum of ``exp(logit - max)`` and a running weighted
sum of values, rescaling them when the maximum grows; nothing of size ``N x K`` is ever held. The
backward recomputes the probabilities chunk by chunk from the saved log-sum-exp. The logits and
their exclusion rules are :class:`~fastvq.backends.common.SoftCodebook`'s.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from .. import common
from ..common import EUCLIDEAN_EPS, SoftCodebook, gumbel_noise, split_value_grad

# Bytes one slab entry costs: the logit and the few same-sized temporaries alive with it (the
# backward's probability, output-gradient product and weight). The Gumbel noise adds Philox's
# int64 counters and products.
_SLAB_BYTES_PER_LOGIT = 32
_NOISE_BYTES_PER_LOGIT = 64
# Codes per chunk: the codebook chunk stays cache-resident while the rows stream past it.
_CODES_PER_CHUNK = 2048


def _chunk_sizes(num_rows: int, num_codes: int, noisy: bool = False) -> tuple[int, int]:
    per_logit = _SLAB_BYTES_PER_LOGIT + (_NOISE_BYTES_PER_LOGIT if noisy else 0)
    max_logits = max(1, common.CHUNK_BYTES // per_logit)
    codes_per_chunk = min(num_codes, _CODES_PER_CHUNK, max_logits)
    rows_per_chunk = max(1, min(max(num_rows, 1), max_logits // codes_per_chunk))
    return rows_per_chunk, codes_per_chunk


class _Rows:
    """One chunk of prepared rows and the logits of its code chunks."""

    def __init__(self, prep: SoftCodebook, zq: torch.Tensor, row_term: torch.Tensor, inverse_temperature: float,
                 codes_per_chunk: int):
        self.prep = prep
        self.zq = zq
        self.row_term = row_term
        self.inverse_temperature = inverse_temperature
        self.codes_per_chunk = codes_per_chunk

    def logits(self, start: int, stop: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(logits [rows, codes], scale)``: a NaN logit reads as ``-inf``. ``scale`` is euclidean's
        ``1 / (2 |z - e|)`` (0 where the squared distance was clamped), ``None`` otherwise."""
        prep = self.prep
        dots = self.zq @ prep.keys[start:stop].T
        code_term = prep.code_term[start:stop]
        scale = None
        if prep.metric in ("dot", "cosine"):
            logits = dots.sub_(code_term).mul_(self.inverse_temperature)
        else:
            squared = dots.mul_(-2.0).add_(self.row_term[:, None]).add_(code_term)
            if prep.metric == "l2":
                logits = squared.mul_(-self.inverse_temperature)
            else:
                clamped = squared <= EUCLIDEAN_EPS
                distance = squared.clamp_(min=EUCLIDEAN_EPS).sqrt_()
                scale = torch.where(clamped, 0.0, 0.5 / distance)
                logits = distance.mul_(-self.inverse_temperature)
        return logits.nan_to_num_(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf")), scale

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
        """``(start, stop, logits, scale)`` of each code chunk. The last chunk's logits come from a
        full-width matmul over ``[stop - width, stop)``: BLAS rounds a narrower product differently,
        and two equal codes must get equal logits whichever chunk they fall in (ties)."""
        num_codes, width = self.prep.keys.shape[0], self.codes_per_chunk
        for start in range(0, num_codes, width):
            stop = min(start + width, num_codes)
            low = max(0, stop - width)
            logits, scale = self.logits(low, stop)
            if low < start:
                logits, scale = logits[:, start - low :], None if scale is None else scale[:, start - low :]
            yield start, stop, logits, scale


def _row_chunks(prep: SoftCodebook, z: torch.Tensor, temperature: float, noisy: bool = False) -> Iterator[tuple[slice, _Rows]]:
    num_rows, num_codes = z.shape[0], prep.keys.shape[0]
    rows_per_chunk, codes_per_chunk = _chunk_sizes(num_rows, num_codes, noisy)
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        zq, row_term = prep.rows(z[rows])
        yield rows, _Rows(prep, zq, row_term, 1.0 / temperature, codes_per_chunk)


class _OnlineSoftmax:
    """A running ``(max, sum of exp(logit - max))`` per row, rescaled as the maximum grows; the safe
    shift keeps a row whose logits are all ``-inf`` so far at a zero sum instead of ``exp(nan)``."""

    def __init__(self, num_rows: int, dtype: torch.dtype, device: torch.device):
        self.maximum = torch.full((num_rows,), float("-inf"), dtype=dtype, device=device)
        self.total = torch.zeros(num_rows, dtype=dtype, device=device)

    def update(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Folds in a slab; returns ``(rescale [rows], exp(logits - shift) [rows, codes])``."""
        new_maximum = torch.maximum(self.maximum, logits.max(dim=1).values)
        shift = torch.where(new_maximum == float("-inf"), 0.0, new_maximum)
        rescale = (self.maximum - shift).exp_()
        weights = (logits - shift[:, None]).exp_()
        self.total.mul_(rescale).add_(weights.sum(dim=1))
        self.maximum = new_maximum
        return rescale, weights

    def log_sum_exp(self) -> torch.Tensor:
        """NaN where every logit was ``-inf`` (a NaN row, or every code excluded)."""
        shift = torch.where(self.maximum == float("-inf"), 0.0, self.maximum)
        return torch.where(self.total > 0, shift + self.total.log(), float("nan"))


def soft_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    seed: Optional[torch.Tensor],
    return_hard: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(soft [N, Dv], indices int64 [N] or [0], lse [N])``; inputs checked by the caller."""
    num_rows = z.shape[0]
    out_dtype = _promoted(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, out_dtype)
    soft = torch.empty((num_rows, prep.values.shape[1]), dtype=out_dtype, device=z.device)
    indices = torch.empty(num_rows if return_hard else 0, dtype=torch.int64, device=z.device)
    lse = torch.empty(num_rows, dtype=prep.work_dtype, device=z.device)
    if num_rows == 0:
        return soft, indices, lse
    # Reading the seed syncs with its device, which only matters for this path on a GPU.
    seed_value = int(seed.reshape(()).item()) if seed is not None else None
    for rows, chunk in _row_chunks(prep, z, temperature, noisy=seed is not None):
        count = rows.stop - rows.start
        softmax = _OnlineSoftmax(count, prep.work_dtype, z.device)
        weighted = torch.zeros((count, prep.values.shape[1]), dtype=prep.work_dtype, device=z.device)
        best = torch.full((count,), float("-inf"), dtype=prep.work_dtype, device=z.device)
        best_index = torch.zeros(count, dtype=torch.int64, device=z.device)
        row_ids = torch.arange(rows.start, rows.stop, dtype=torch.int64, device=z.device)
        for start, stop, logits, _ in chunk.chunks():
            if return_hard:
                scores = logits if seed_value is None else logits + gumbel_noise(seed_value, row_ids, start, stop)
                chunk_best, chunk_index = scores.max(dim=1)
                # Strict '>' keeps the earlier chunk on ties: the lowest index wins across chunks too.
                better = chunk_best > best
                best = torch.where(better, chunk_best, best)
                best_index = torch.where(better, chunk_index + start, best_index)
                del scores
            rescale, weights = softmax.update(logits)
            weighted.mul_(rescale[:, None]).addmm_(weights, prep.values[start:stop])
            del logits, weights
        soft[rows] = weighted / softmax.total[:, None]
        lse[rows] = softmax.log_sum_exp()
        if return_hard:
            indices[rows] = best_index
    return soft, indices, lse


def _promoted(z: torch.Tensor, codebook: torch.Tensor, values: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    return dtype if values is None else torch.promote_types(dtype, values.dtype)


class _GradSums:
    """The backward's sums of the per-logit weight ``w``: ``w @ keys`` and ``w`` per row for the
    gradient to ``z``, ``w^T @ zq`` and ``w`` per code for the codebook's (see
    ``SoftCodebook.prepared_row_grad``); a gradient not asked for is neither summed nor returned."""

    def __init__(self, prep: SoftCodebook, num_rows: int, dim: int, device: torch.device, rows_grad: bool,
                 codes_grad: bool):
        self.prep = prep
        dtype = prep.work_dtype
        num_codes = prep.keys.shape[0]
        self.rows_grad, self.codes_grad = rows_grad, codes_grad
        self.weighted_keys = torch.zeros((num_rows if rows_grad else 0, dim), dtype=dtype, device=device)
        self.row_sums = torch.zeros(num_rows if rows_grad else 0, dtype=dtype, device=device)
        self.weighted_rows = torch.zeros((num_codes if codes_grad else 0, dim), dtype=dtype, device=device)
        self.code_sums = torch.zeros(num_codes if codes_grad else 0, dtype=dtype, device=device)

    def add(self, rows: slice, chunk: _Rows, start: int, stop: int, grad_logits: torch.Tensor,
            scale: Optional[torch.Tensor]) -> None:
        weight = grad_logits.mul_(chunk.inverse_temperature)
        if scale is not None:
            weight.mul_(scale)
        if self.rows_grad:
            self.weighted_keys[rows].addmm_(weight, self.prep.keys[start:stop])
            self.row_sums[rows] += weight.sum(dim=1)
        if self.codes_grad:
            self.weighted_rows[start:stop].addmm_(weight.T, chunk.zq)
            self.code_sums[start:stop] += weight.sum(dim=0)

    def grads(self, z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grad_z, grad_codebook = self.weighted_keys, self.weighted_rows
        if self.rows_grad:
            zq, _ = self.prep.rows(z)
            grad_z = self.prep.row_grad(z, self.prep.prepared_row_grad(zq, self.weighted_keys, self.row_sums))
        if self.codes_grad:
            grad_codebook = self.prep.key_grad(codebook, self.prep.prepared_key_grad(self.weighted_rows, self.code_sums))
        return grad_z, grad_codebook


def soft_quantize_backward(
    grad_soft: torch.Tensor,
    grad_lse: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    soft: torch.Tensor,
    lse: torch.Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
    compute_values_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_codebook, grad_values)`` in the work dtype, each ``[0, *]`` when not asked for;
    ``grad_values`` is also empty when ``values`` is ``None`` (its gradient is then part of
    ``grad_codebook``).

    With ``p = exp(logits - lse)`` recomputed chunk by chunk, ``dL/dlogits = p * (g V^T - delta)``
    where ``delta = <g, soft> - grad_lse`` per row (flash attention's backward, with the
    log-sum-exp's own gradient folded into ``delta``), and ``dL/dV = p^T g``.
    """
    num_rows, dim = z.shape
    out_dtype = _promoted(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, out_dtype)
    work = prep.work_dtype
    value_grad = compute_values_grad if values is not None else compute_codebook_grad
    value_shape = prep.values.shape if value_grad else (0, prep.values.shape[1])
    grad_values = torch.zeros(value_shape, dtype=work, device=z.device)
    sums = _GradSums(prep, num_rows, dim, z.device, compute_z_grad, compute_codebook_grad)
    grad_soft = grad_soft.to(work)
    delta = (grad_soft * soft.to(work)).sum(dim=1) - grad_lse.to(work)
    lse = lse.to(work)
    for rows, chunk in _row_chunks(prep, z, temperature):
        grad_rows = grad_soft[rows]
        for start, stop, logits, scale in chunk.chunks():
            probs = logits.sub_(lse[rows, None]).exp_()
            if value_grad:
                grad_values[start:stop].addmm_(probs.T, grad_rows)
            grad_logits = (grad_rows @ prep.values[start:stop].T).sub_(delta[rows, None]).mul_(probs)
            del probs
            sums.add(rows, chunk, start, stop, grad_logits, scale)
    grad_z, grad_codebook = sums.grads(z, codebook)
    return (grad_z, *split_value_grad(values, grad_codebook, grad_values))


def soft_entropy(
    z: torch.Tensor, codebook: torch.Tensor, metric: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_entropy [N], mean_probs [K], lse [N])`` of ``p = softmax(logits)``, in the work dtype.

    Per row chunk, a first pass over the codes carries the online softmax and the running
    ``sum exp(logit - max) * logit``, which give ``lse`` and ``H = lse - <p, logits>``; a second pass
    adds the chunk's probabilities to the per-code sums.
    """
    num_rows = z.shape[0]
    prep = SoftCodebook(codebook, None, metric, torch.promote_types(z.dtype, codebook.dtype))
    work = prep.work_dtype
    row_entropy = torch.empty(num_rows, dtype=work, device=z.device)
    lse = torch.empty(num_rows, dtype=work, device=z.device)
    mean_probs = torch.zeros(codebook.shape[0], dtype=work, device=z.device)
    for rows, chunk in _row_chunks(prep, z, temperature):
        softmax = _OnlineSoftmax(rows.stop - rows.start, work, z.device)
        weighted_logits = torch.zeros(rows.stop - rows.start, dtype=work, device=z.device)
        for _, _, logits, _ in chunk.chunks():
            rescale, weights = softmax.update(logits)
            # An excluded code has weight 0 and logit -inf: its term is 0, not nan.
            terms = torch.where(weights > 0, weights * logits, 0.0)
            weighted_logits.mul_(rescale).add_(terms.sum(dim=1))
        lse[rows] = softmax.log_sum_exp()
        row_entropy[rows] = lse[rows] - weighted_logits / softmax.total
        for start, stop, logits, _ in chunk.chunks():
            mean_probs[start:stop] += logits.sub_(lse[rows, None]).exp_().sum(dim=0)
    if num_rows:
        mean_probs /= num_rows
    return row_entropy, mean_probs, lse


def soft_entropy_backward(
    grad_row_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor,
    grad_lse: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    row_entropy: torch.Tensor,
    lse: torch.Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_codebook)`` of ``soft_entropy`` in the work dtype (``[0, D]`` when not asked for).

    With ``a = grad_row_entropy``, ``c = grad_mean_probs / N`` and ``b = grad_lse``, and the mean
    logit ``m = lse - H`` per row, ``dL/dlogit[n, k] = p (-a_n (logit - m_n) + c_k - <p_n, c> + b_n)``.
    ``<p_n, c>`` takes one pass over the codes per row chunk, the gradient a second.
    """
    num_rows, dim = z.shape
    prep = SoftCodebook(codebook, None, metric, torch.promote_types(z.dtype, codebook.dtype))
    work = prep.work_dtype
    sums = _GradSums(prep, num_rows, dim, z.device, compute_z_grad, compute_codebook_grad)
    grad_entropy = grad_row_entropy.to(work)
    code_weights = grad_mean_probs.to(work) / max(num_rows, 1)
    lse = lse.to(work)
    mean_logit = lse - row_entropy.to(work)
    row_constant = grad_lse.to(work) + grad_entropy * mean_logit
    for rows, chunk in _row_chunks(prep, z, temperature):
        expected_code_weight = torch.zeros(rows.stop - rows.start, dtype=work, device=z.device)
        for start, stop, logits, _ in chunk.chunks():
            expected_code_weight.addmv_(logits.sub_(lse[rows, None]).exp_(), code_weights[start:stop])
        constant = row_constant[rows] - expected_code_weight
        for start, stop, logits, scale in chunk.chunks():
            probs = (logits - lse[rows, None]).exp_()
            bracket = torch.where(probs > 0, logits * -grad_entropy[rows, None], 0.0)
            bracket.add_(code_weights[start:stop]).add_(constant[:, None])
            del logits
            sums.add(rows, chunk, start, stop, bracket.mul_(probs), scale)
    return sums.grads(z, codebook)
