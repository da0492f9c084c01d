"""The PyTorch path of the code entropy (LFQ's entropy loss) without the ``N x 2^d`` matrix.

LFQ's code probability is a softmax over ``2^d`` codes of a logit that is a sum over bits, so it is
a product of per-bit two-way probabilities ``p_b(n, s) = sigmoid((2s - 1) l_b(n))``. Split the
bits into a high half (``h`` bits, the most significant) and a low half (``d - h``): with
``P_hi [N, 2^h]`` each row's product over the high bits for every high pattern and ``P_lo
[N, 2^(d-h)]`` likewise, code ``(hi, lo)`` has probability ``P_hi[n, hi] * P_lo[n, lo]``, and

- the batch-mean distribution is one GEMM, ``avg = P_hi^T @ P_lo / N`` (``[2^h, 2^(d-h)]``, code
  ``hi * 2^(d-h) + lo``), summed over row chunks;
- each row's clamped entropy ``-sum_c p_c log max(p_c, eps)`` (vector-quantize-pytorch's, whose
  clamp does not factorise) is exact from prefix sums: for each ``hi``, the codes with
  ``p_hi p_lo >= eps`` are the ``lo`` whose ``p_lo >= eps / p_hi``, a suffix of the row's sorted
  ``P_lo``; with ``S1``/``S2`` the sums of ``p_lo`` and ``p_lo log p_lo`` over that suffix and
  ``s1`` the sum of the rest, the row's entropy is
  ``sum_hi [-p_hi log p_hi S1 - p_hi S2 - log(eps) p_hi s1]``: ``N 2^(d/2) log 2^(d/2)`` work.

The backward uses the same pieces. With ``W_c = g_avg[c] / N + g_n f'(p_c)`` (``f(p) = -p log
max(p, eps)``), ``dl_b = sigmoid(-l_b) sum_{c: bit_b = 1} W_c p_c - sigmoid(l_b) sum_{c: bit_b = 0}
W_c p_c``; the sums over ``c`` factor into ``P_hi * (P_lo @ g_avg^T)`` (and its mirror) for the
mean and into ``P_hi * A`` with ``A_hi = sum_lo f'(p_hi p_lo) p_lo = -(log p_hi + 1) S1 - S2 -
log(eps) s1`` for the entropy. Memory is a few ``rows x 2^(d/2)`` slabs per chunk, bounded by
``CHUNK_BYTES``; nothing of size ``N x 2^d`` exists.
"""

from __future__ import annotations

import math

import torch

from .. import common
from ..common import code_entropy_split


def half_probs(logits: torch.Tensor) -> torch.Tensor:
    """``logits [G, n, k]`` -> ``[G, n, 2^k]``: the product of each pattern's per-bit probabilities,
    the first bit the most significant."""
    probs = torch.ones((*logits.shape[:-1], 1), dtype=logits.dtype, device=logits.device)
    for bit in range(logits.shape[-1]):
        column = logits[..., bit]
        pair = torch.stack((torch.sigmoid(-column), torch.sigmoid(column)), dim=-1)
        probs = (probs[..., :, None] * pair[..., None, :]).flatten(-2)
    return probs


def _suffix_sums(
    probs: torch.Tensor, other: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every entry ``p`` of ``probs [G, n, A]`` and its row of ``other [G, n, B]``: the sums of
    ``q`` and of ``q log q`` over the ``q`` of ``other`` with ``p q >= eps``, and of ``q`` over the rest."""
    ordered = other.sort(dim=-1).values
    zero = ordered.new_zeros((*ordered.shape[:-1], 1))
    cumulative = torch.cat((zero, ordered.cumsum(dim=-1)), dim=-1)
    cumulative_log = torch.cat((zero, torch.special.xlogy(ordered, ordered).cumsum(dim=-1)), dim=-1)
    # How many q lie below eps / p (all of them where p = 0: eps / 0 = inf).
    below = torch.searchsorted(ordered, (eps / probs).contiguous())
    small = cumulative.gather(-1, below)
    big = cumulative[..., -1:] - small
    big_log = cumulative_log[..., -1:] - cumulative_log.gather(-1, below)
    return big, big_log, small


def clamped_entropy_of_products(p_hi: torch.Tensor, p_lo: torch.Tensor, eps: float) -> torch.Tensor:
    """``-sum_{hi, lo} p log max(p, eps)`` with ``p = p_hi p_lo``, per row: ``[G, n]``."""
    big, big_log, small = _suffix_sums(p_hi, p_lo, eps)
    terms = -torch.special.xlogy(p_hi, p_hi) * big - p_hi * big_log - math.log(eps) * p_hi * small
    return terms.sum(dim=-1)


def _entropy_partials(p_hi: torch.Tensor, p_lo: torch.Tensor, eps: float) -> torch.Tensor:
    """``A_hi = sum_lo f'(p_hi p_lo) p_lo`` for every ``hi``, ``[G, n, 2^h]``."""
    big, big_log, small = _suffix_sums(p_hi, p_lo, eps)
    # Where p_hi < eps every product is clamped and big == 0 exactly: any finite log serves.
    log_p = torch.log(p_hi.clamp_min(torch.finfo(p_hi.dtype).tiny))
    return -(log_p + 1.0) * big - big_log - math.log(eps) * small


def pattern_bits(num_bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[2^k, k]``: the bits of each pattern, the first bit the most significant."""
    patterns = torch.arange(2**num_bits, device=device)
    shifts = torch.arange(num_bits - 1, -1, -1, device=device)
    return ((patterns[:, None] >> shifts) & 1).to(dtype)


def _rows_per_chunk(groups: int, num_bits: int, element_size: int) -> int:
    hi_bits, lo_bits = code_entropy_split(num_bits)
    # About a dozen slabs of [G, rows, 2^max(h, d-h)] are alive at once in the backward.
    row_bytes = 12 * groups * 2 ** max(hi_bits, lo_bits) * element_size
    return max(1, common.CHUNK_BYTES // row_bytes)


def code_entropy(bit_logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``bit_logits [N, G, d]`` -> ``(sample_entropy [N, G], avg_probs [G, 2^d])`` (see the module)."""
    num_rows, groups, num_bits = bit_logits.shape
    work = common.compute_dtype(bit_logits.dtype)
    hi_bits, _ = code_entropy_split(num_bits)
    device = bit_logits.device
    sample = torch.empty((num_rows, groups), dtype=work, device=device)
    avg = torch.zeros((groups, 2**hi_bits, 2 ** (num_bits - hi_bits)), dtype=work, device=device)
    step = _rows_per_chunk(groups, num_bits, torch.finfo(work).bits // 8)
    for start in range(0, num_rows, step):
        logits = bit_logits[start : start + step].to(work).transpose(0, 1)
        p_hi, p_lo = half_probs(logits[..., :hi_bits]), half_probs(logits[..., hi_bits:])
        avg.baddbmm_(p_hi.transpose(1, 2), p_lo)
        sample[start : start + step] = clamped_entropy_of_products(p_hi, p_lo, eps).T
    # The mean over no rows is NaN, as torch.mean's (and vector-quantize-pytorch's) is.
    avg = avg.flatten(1) / num_rows if num_rows else torch.full_like(avg.flatten(1), float("nan"))
    return sample, avg


def code_entropy_backward(
    grad_sample: torch.Tensor, grad_avg: torch.Tensor, bit_logits: torch.Tensor, eps: float
) -> torch.Tensor:
    """The gradient of ``code_entropy``'s outputs with respect to ``bit_logits``, in its dtype."""
    num_rows, groups, num_bits = bit_logits.shape
    work = common.compute_dtype(bit_logits.dtype)
    hi_bits, lo_bits = code_entropy_split(num_bits)
    device = bit_logits.device
    grad = torch.empty_like(bit_logits, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return grad
    mean_grad = (grad_avg.to(work) / num_rows).reshape(groups, 2**hi_bits, 2**lo_bits)
    bits_hi = pattern_bits(hi_bits, work, device)
    bits_lo = pattern_bits(lo_bits, work, device)
    step = _rows_per_chunk(groups, num_bits, torch.finfo(work).bits // 8)
    for start in range(0, num_rows, step):
        logits = bit_logits[start : start + step].to(work).transpose(0, 1)
        p_hi, p_lo = half_probs(logits[..., :hi_bits]), half_probs(logits[..., hi_bits:])
        row_grad = grad_sample[start : start + step].to(work).T[..., None]
        weight_hi = p_hi * (torch.bmm(p_lo, mean_grad.transpose(1, 2)) + row_grad * _entropy_partials(p_hi, p_lo, eps))
        weight_lo = p_lo * (torch.bmm(p_hi, mean_grad) + row_grad * _entropy_partials(p_lo, p_hi, eps))
        ones = weight_hi @ bits_hi, weight_lo @ bits_lo
        zeros = weight_hi @ (1 - bits_hi), weight_lo @ (1 - bits_lo)
        ones, zeros = torch.cat(ones, dim=-1), torch.cat(zeros, dim=-1)
        chunk = torch.sigmoid(-logits) * ones - torch.sigmoid(logits) * zeros
        grad[start : start + step] = chunk.transpose(0, 1).to(grad.dtype)
    return grad
