"""The PyTorch path's soft assignments: ``softmax(logits) @ values`` and the hard argmax, and the
entropies of the soft assignment, computed online over code chunks (``FASTVQ_BACKEND=torch``).

It runs on any device PyTorch runs on. Like flash attention it walks ``z`` in row chunks and the
codebook in code chunks, each slab of logits (temporaries included) under ``CHUNK_BYTES``, and
carries per row a running maximum, a running sum of ``exp(logit - max)`` and a running weighted
sum of values, rescaling them when the maximum grows; nothing of size ``N x K`` is ever held. The
backward recomputes the probabilities chunk by chunk from the saved log-sum-exp. The logits and
their exclusion rules are :class:`~fastvq.backends.soft_codebook.SoftCodebook`'s.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from ..._philox import gumbel_noise
from .. import common
from ..soft_codebook import (
    EUCLIDEAN_EPS,
    SoftCodebook,
    composed_soft_quantize_entropy,
    composed_soft_quantize_entropy_backward,
    split_value_grad,
)

# Bytes one slab entry costs: the logit and the few same-sized temporaries alive with it (the
# backward's probability and weight). The Gumbel noise adds Philox's int64 counters and products.
_SLAB_BYTES_PER_LOGIT = 24
_NOISE_BYTES_PER_LOGIT = 64
# Codes per chunk: the codebook chunk stays cache-resident while the rows stream past it.
_CODES_PER_CHUNK = 2048


def _chunk_sizes(num_rows: int, num_codes: int, noisy: bool = False) -> tuple[int, int]:
    per_logit = _SLAB_BYTES_PER_LOGIT + (_NOISE_BYTES_PER_LOGIT if noisy else 0)
    max_logits = max(1, common.CHUNK_BYTES // per_logit)
    codes_per_chunk = min(num_codes, _CODES_PER_CHUNK, max_logits)
    rows_per_chunk = max(1, min(max(num_rows, 1), max_logits // codes_per_chunk))
    return rows_per_chunk, codes_per_chunk


def _with_ones(x: torch.Tensor) -> torch.Tensor:
    """``[x, 1]``: a matmul against it also sums the other operand's rows."""
    return torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)


class _Operands:
    """The per-call operands of the slab matmuls, laid out so that BLAS does the elementwise work.

    Every metric's logits come out of one ``addmm(bias, lhs, rhs^T)``: ``lhs`` is the prepared rows
    already scaled by ``1 / T`` (``2 / T`` for l2), ``bias = -c / T`` (``-inf`` for an excluded code);
    l2 appends ``-|zq|^2 / T`` to the rows and a ones column to the keys, so the row term is in the
    product too. Euclidean's square root cannot be: its matmul gives the squared distance. A ones
    column on the values makes ``p @ values`` also sum ``p``; on the keys and rows (l2, euclidean)
    it makes the backward's products also give the weight's row and code sums. The ones columns
    are appended to one code chunk at a time: a whole codebook with one would be another copy of it.
    """

    def __init__(self, prep: SoftCodebook, temperature: float):
        self.prep = prep
        self.metric = prep.metric
        self.inverse_temperature = 1.0 / temperature
        self.distance_based = prep.metric in ("l2", "euclidean")
        if prep.metric == "euclidean":
            self.bias = prep.code_term
        else:
            self.bias = prep.code_term * -self.inverse_temperature

    def keys_with_ones(self, start: int, stop: int) -> torch.Tensor:
        """The keys of codes ``[start, stop)``, with a ones column for l2 and euclidean."""
        keys = self.prep.keys[start:stop]
        return _with_ones(keys) if self.distance_based else keys

    def logit_keys(self, start: int, stop: int) -> torch.Tensor:
        """The keys the logits' matmul takes: with the ones column for l2 (its row term), else plain."""
        keys = self.prep.keys[start:stop]
        return _with_ones(keys) if self.metric == "l2" else keys

    def values_with_ones(self, start: int, stop: int) -> torch.Tensor:
        return _with_ones(self.prep.values[start:stop])

    def rows(self, z_rows: torch.Tensor, row_start: int, codes_per_chunk: int) -> "_Rows":
        zq, row_term = self.prep.rows(z_rows)
        if self.metric == "l2":
            lhs = torch.cat([zq * (2.0 * self.inverse_temperature), (row_term * -self.inverse_temperature)[:, None]], 1)
        elif self.metric == "euclidean":
            lhs = zq * -2.0
        else:
            lhs = zq * self.inverse_temperature
        return _Rows(self, zq, row_term, lhs, row_start, codes_per_chunk)


class _Rows:
    """One chunk of prepared rows and the logits of its code chunks."""

    def __init__(self, operands: _Operands, zq: torch.Tensor, row_term: torch.Tensor, lhs: torch.Tensor,
                 row_start: int, codes_per_chunk: int):
        self.operands = operands
        self.zq = zq
        self.zq_with_ones = _with_ones(zq) if operands.distance_based else zq
        self.row_term = row_term
        self.lhs = lhs
        self.row_ids = torch.arange(row_start, row_start + zq.shape[0], dtype=torch.int64, device=zq.device)
        self.codes_per_chunk = codes_per_chunk

    def logits(self, start: int, stop: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(logits [rows, codes], scale)``: ``scale`` is euclidean's ``1 / (2 |z - e|)`` (0 where the
        squared distance was clamped), ``None`` otherwise. A NaN row gives NaN logits."""
        ops = self.operands
        logits = torch.addmm(ops.bias[start:stop], self.lhs, ops.logit_keys(start, stop).T)
        if ops.metric != "euclidean":
            return logits, None
        squared = logits.add_(self.row_term[:, None])
        scale = torch.where(squared <= EUCLIDEAN_EPS, 0.0, 0.5 / squared.clamp(min=EUCLIDEAN_EPS).sqrt())
        return squared.clamp_(min=EUCLIDEAN_EPS).sqrt_().mul_(-ops.inverse_temperature), scale

    def chunks(self) -> Iterator[tuple[int, int, torch.Tensor, Optional[torch.Tensor]]]:
        """``(start, stop, logits, scale)`` of each code chunk. The last chunk's logits come from a
        full-width matmul over ``[stop - width, stop)``: BLAS rounds a narrower product differently,
        and two equal codes must get equal logits whichever chunk they fall in (ties)."""
        num_codes, width = self.operands.prep.keys.shape[0], self.codes_per_chunk
        for start in range(0, num_codes, width):
            stop = min(start + width, num_codes)
            low = max(0, stop - width)
            logits, scale = self.logits(low, stop)
            if low < start:
                logits, scale = logits[:, start - low :], None if scale is None else scale[:, start - low :]
            yield start, stop, logits, scale


def _row_chunks(
    prep: SoftCodebook, z: torch.Tensor, temperature: float, noisy: bool = False
) -> Iterator[tuple[slice, _Rows]]:
    num_rows, num_codes = z.shape[0], prep.keys.shape[0]
    rows_per_chunk, codes_per_chunk = _chunk_sizes(num_rows, num_codes, noisy)
    operands = _Operands(prep, temperature)
    for start in range(0, num_rows, rows_per_chunk):
        rows = slice(start, min(start + rows_per_chunk, num_rows))
        yield rows, operands.rows(z[rows], start, codes_per_chunk)


def _best(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``(max, argmax)``, the first index on ties, a NaN score never winning (a row of
    NaN scores gets ``(-inf, 0)``). ``max`` puts NaN first, so only rows whose maximum is NaN are redone."""
    best, index = scores.max(dim=1)
    nan_rows = best.isnan()
    if bool(nan_rows.any()):
        fixed_best, fixed_index = scores[nan_rows].nan_to_num(nan=float("-inf")).max(dim=1)
        best[nan_rows], index[nan_rows] = fixed_best, fixed_index
    return best, index


class _OnlineSoftmax:
    """A running ``(max, sum of exp(logit - max))`` per row, rescaled as the maximum grows; the safe
    shift keeps a row whose logits are all ``-inf`` so far at a zero sum instead of ``exp(nan)``."""

    def __init__(self, num_rows: int, dtype: torch.dtype, device: torch.device):
        self.maximum = torch.full((num_rows,), float("-inf"), dtype=dtype, device=device)

    def shift(self, chunk_maximum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Folds in a chunk's row maxima; returns ``(shift, rescale)``: the new safe shift and the
        factor ``exp(old max - shift)`` the running sums are multiplied by."""
        new_maximum = torch.maximum(self.maximum, chunk_maximum)
        shift = torch.where(new_maximum == float("-inf"), 0.0, new_maximum)
        rescale = (self.maximum - shift).exp_()
        self.maximum = new_maximum
        return shift, rescale

    def log_sum_exp(self, total: torch.Tensor) -> torch.Tensor:
        """NaN where the sum is not positive (every logit ``-inf``, or a NaN row)."""
        shift = torch.where(self.maximum == float("-inf"), 0.0, self.maximum)
        return torch.where(total > 0, shift + total.log(), float("nan"))


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
    value_dim = prep.values.shape[1]
    soft = torch.empty((num_rows, value_dim), dtype=out_dtype, device=z.device)
    indices = torch.empty(num_rows if return_hard else 0, dtype=torch.int64, device=z.device)
    lse = torch.empty(num_rows, dtype=prep.work_dtype, device=z.device)
    if num_rows == 0:
        return soft, indices, lse
    # Reading the seed syncs with its device, which only matters for this path on a GPU.
    seed_value = int(seed.reshape(()).item()) if seed is not None else None
    for rows, chunk in _row_chunks(prep, z, temperature, noisy=seed is not None):
        count = rows.stop - rows.start
        softmax = _OnlineSoftmax(count, prep.work_dtype, z.device)
        # The weighted sum of the values and, in its last column, the sum of exp(logit - max).
        weighted = torch.zeros((count, value_dim + 1), dtype=prep.work_dtype, device=z.device)
        best = torch.full((count,), float("-inf"), dtype=prep.work_dtype, device=z.device)
        best_index = torch.zeros(count, dtype=torch.int64, device=z.device)
        for start, stop, logits, _ in chunk.chunks():
            chunk_maximum = None
            if return_hard:
                if seed_value is None:
                    chunk_best, chunk_index = _best(logits)
                    chunk_maximum = chunk_best
                else:
                    chunk_best, chunk_index = _best(logits + gumbel_noise(seed_value, chunk.row_ids, start, stop))
                # Strict '>' keeps the earlier chunk on ties: the lowest index wins across chunks too.
                better = chunk_best > best
                best = torch.where(better, chunk_best, best)
                best_index = torch.where(better, chunk_index + start, best_index)
            if chunk_maximum is None:
                chunk_maximum = logits.max(dim=1).values
            shift, rescale = softmax.shift(chunk_maximum)
            weights = logits.sub_(shift[:, None]).exp_()
            weighted.mul_(rescale[:, None]).addmm_(weights, chunk.operands.values_with_ones(start, stop))
            del logits, weights
        total = weighted[:, value_dim]
        soft[rows] = weighted[:, :value_dim] / total[:, None]
        lse[rows] = softmax.log_sum_exp(total)
        if return_hard:
            indices[rows] = best_index
    return soft, indices, lse


def _promoted(z: torch.Tensor, codebook: torch.Tensor, values: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    return dtype if values is None else torch.promote_types(dtype, values.dtype)


class _GradSums:
    """The backward's sums of the per-logit weight ``w``: ``w @ keys`` and ``w`` per row for the
    gradient to ``z``, ``w^T @ zq`` and ``w`` per code for the codebook's (see
    ``SoftCodebook.prepared_row_grad``); a gradient not asked for is neither summed nor returned.
    For l2 and euclidean each sum is the last column of its product (the operands' ones columns)."""

    def __init__(self, prep: SoftCodebook, num_rows: int, dim: int, device: torch.device, rows_grad: bool,
                 codes_grad: bool):
        self.prep = prep
        dtype = prep.work_dtype
        width = dim + (1 if prep.metric in ("l2", "euclidean") else 0)
        self.dim = dim
        self.rows_grad, self.codes_grad = rows_grad, codes_grad
        self.row_products = torch.zeros((num_rows if rows_grad else 0, width), dtype=dtype, device=device)
        self.code_products = torch.zeros((prep.keys.shape[0] if codes_grad else 0, width), dtype=dtype, device=device)

    def add(self, rows: slice, chunk: _Rows, start: int, stop: int, grad_logits: torch.Tensor,
            scale: Optional[torch.Tensor]) -> None:
        """Adds a slab of ``dL/dlogits``; ``w = dL/dlogits / T`` (times euclidean's ``scale``), the
        ``1 / T`` folded into the products."""
        weight = grad_logits if scale is None else grad_logits.mul_(scale)
        alpha = chunk.operands.inverse_temperature
        if self.rows_grad:
            self.row_products[rows].addmm_(weight, chunk.operands.keys_with_ones(start, stop), alpha=alpha)
        if self.codes_grad:
            self.code_products[start:stop].addmm_(weight.T, chunk.zq_with_ones, alpha=alpha)

    def grads(self, z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dim, prep = self.dim, self.prep
        zq = prep.rows(z)[0] if self.rows_grad else None
        row_sums = self.row_products[:, dim] if self.row_products.shape[1] > dim else None
        code_sums = self.code_products[:, dim] if self.code_products.shape[1] > dim else None
        return prep.chained_grads(z, codebook, zq, self.row_products[:, :dim], row_sums, self.code_products[:, :dim],
                                  code_sums, self.rows_grad, self.codes_grad)


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
    log-sum-exp's own gradient folded into ``delta``), and ``dL/dV = p^T g``. ``g V^T - delta`` is
    one matmul of ``[g, -delta]`` against the values with their ones column.
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
    grad_with_delta = torch.cat([grad_soft, -delta[:, None]], dim=1)
    lse = lse.to(work)
    for rows, chunk in _row_chunks(prep, z, temperature):
        grad_rows = grad_with_delta[rows]
        for start, stop, logits, scale in chunk.chunks():
            probs = logits.sub_(lse[rows, None]).exp_()
            if value_grad:
                grad_values[start:stop].addmm_(probs.T, grad_soft[rows])
            grad_logits = (grad_rows @ chunk.operands.values_with_ones(start, stop).T).mul_(probs)
            del probs
            sums.add(rows, chunk, start, stop, grad_logits, scale)
    grad_z, grad_codebook = sums.grads(z, codebook)
    return (grad_z, *split_value_grad(values, grad_codebook, grad_values))


def soft_entropy(
    z: torch.Tensor, codebook: torch.Tensor, metric: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_entropy [N], mean_probs [K], lse [N])`` of ``p = softmax(logits)``, in the work dtype.

    Per row chunk, a first pass over the codes carries the online softmax and the running
    ``A = sum exp(logit - max) * (logit - max)``, which give ``lse`` and ``H = log(total) - A / total``
    (no difference of two large numbers, so ``0 <= H <= log K`` at any temperature); a second pass
    adds the chunk's probabilities ``exp(logit - max - log(total))`` to the per-code sums (not
    ``exp(logit - lse)``: ``lse`` rounds at the logits' magnitude, and the rows would not sum to 1).
    """
    num_rows = z.shape[0]
    prep = SoftCodebook(codebook, None, metric, torch.promote_types(z.dtype, codebook.dtype))
    work = prep.work_dtype
    row_entropy = torch.empty(num_rows, dtype=work, device=z.device)
    lse = torch.empty(num_rows, dtype=work, device=z.device)
    mean_probs = torch.zeros(codebook.shape[0], dtype=work, device=z.device)
    # An excluded code has weight 0 and logit -inf: floored, its term is 0, not nan.
    floor = torch.finfo(work).min
    for rows, chunk in _row_chunks(prep, z, temperature):
        count = rows.stop - rows.start
        softmax = _OnlineSoftmax(count, work, z.device)
        total = torch.zeros(count, dtype=work, device=z.device)
        centred_sum = torch.zeros(count, dtype=work, device=z.device)
        shift = torch.zeros(count, dtype=work, device=z.device)
        for _, _, logits, _ in chunk.chunks():
            old_shift = shift
            shift, rescale = softmax.shift(logits.max(dim=1).values)
            centred = logits.sub_(shift[:, None]).clamp_(min=floor)
            weights = centred.exp()
            # Moving the shift from s0 to s1 adds (s0 - s1) * total to the carried sum before the rescale.
            centred_sum.add_((old_shift - shift) * total).mul_(rescale)
            centred_sum.add_(torch.linalg.vecdot(weights, centred, dim=1))
            total.mul_(rescale).add_(weights.sum(dim=1))
        lse[rows] = softmax.log_sum_exp(total)
        log_total = total.log()
        row_entropy[rows] = log_total - centred_sum / total
        for start, stop, logits, _ in chunk.chunks():
            mean_probs[start:stop] += logits.sub_(shift[:, None]).sub_(log_total[:, None]).exp_().sum(dim=0)
    if num_rows:
        mean_probs /= num_rows
    # Rounding may still put a uniform row's entropy an ulp past log K, or a one-hot row's below 0.
    return row_entropy.clamp_(0.0, math.log(codebook.shape[0])), mean_probs, lse


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
        floor = torch.finfo(work).min
        for start, stop, logits, scale in chunk.chunks():
            probs = (logits - lse[rows, None]).exp_()
            # Floored, an excluded code's -inf logit is finite; its bracket may still overflow (the floor
            # times a gradient above 1), so a zero probability gives a zero weight, not 0 * inf = nan.
            bracket = logits.clamp_(min=floor).mul_(-grad_entropy[rows, None])
            bracket.add_(code_weights[start:stop]).add_(constant[:, None])
            sums.add(rows, chunk, start, stop, bracket.mul_(probs).masked_fill_(probs == 0, 0.0), scale)
            del logits, probs
    return sums.grads(z, codebook)


def soft_quantize_entropy(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    entropy_temperature: float,
) -> tuple[torch.Tensor, ...]:
    """The fused soft codes + entropies as this path's ``soft_quantize`` then ``soft_entropy`` (each streams the
    codebook: the two softmaxes are not fused here)."""
    return composed_soft_quantize_entropy(soft_quantize, soft_entropy, z, codebook, values, metric, temperature,
                                          entropy_temperature)


def soft_quantize_entropy_backward(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op's backward as this path's two backwards, their gradients added (arguments as the C++
    binding's ``soft_quantize_entropy_backward``)."""
    return composed_soft_quantize_entropy_backward(soft_quantize_backward, soft_entropy_backward, *args)
