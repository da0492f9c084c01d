"""Soft assignments as flash attention: ``softmax(logits) @ values``, the hard argmax and the
entropies of the soft assignment, with ``z`` as queries and the codebook as keys.

Three kernels, each walking one operand in tiles and the other in a loop, the logits of a
``BLOCK_N x BLOCK_K`` tile computed by ``_logit_tile`` (``tl.dot`` over ``D`` in ``BLOCK_D``
slices, fp32 accumulation, then the metric's transform of ``SoftCodebook``):

- ``_soft_quantize_fwd_kernel``: a program owns ``BLOCK_N`` rows (and one ``BLOCK_DV`` slice of
  the values) and walks the codes, carrying a running maximum, the running sum of
  ``exp(logit - max)``, the running ``p @ values`` (all rescaled when the maximum grows), the
  running ``sum p * (logit - max)`` for the entropy and the running argmax of ``logit + gumbel``.
- ``_soft_rows_bwd_kernel``: per row tile, over the codes, recomputes ``p = exp(logit - lse)``
  from the saved log-sum-exp and forms the weight ``w = dL/dlogit / T`` (euclidean: also over
  ``2 |z - e|``) with ``dL/dlogit = p (dp + gamma * logit - delta)``; ``dp`` is ``g @ values^T``
  (soft quantize) or a per-code vector (entropy). It sums ``w @ keys`` and ``w`` per row.
- ``_soft_codes_bwd_kernel``: per code tile, over the rows, the same ``w``, summing ``w^T @ zq``
  and ``w`` per code, and ``p^T @ g`` (the values' gradient) or ``p`` per code (the batch mean
  of the probabilities).

``SoftCodebook.prepared_grads`` turns the sums into gradients. Each output element is written by
exactly one program, so nothing uses atomics and every result is deterministic. Nothing of size
``N x K`` is ever allocated. Gumbel noise comes from Philox-4x32-10 at counter
``(k >> 2, n mod 2^32, n >> 32, 0)``, output ``k mod 4`` (``fastvq._philox.gumbel_noise``
draws the same bits on the PyTorch path).
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..soft_codebook import (
    EUCLIDEAN_EPS,
    SoftCodebook,
    composed_soft_quantize_entropy,
    composed_soft_quantize_entropy_backward,
    split_value_grad,
)
from .common import (
    METRIC_DOT,
    METRIC_EUCLIDEAN,
    METRIC_IDS,
    METRIC_L2,
    cases_from_launches,
    dot_precision,
    interpreting,
    recording_launches,
    slice_width,
)

# For tests/backends/test_aot_compile.py, which otherwise wants every pointer offset in int64: why these
# kernels' int32 offsets cannot overflow.
INT32_TILE_OFFSETS = (
    "the kernels move 64-bit tile pointers (row_start * D, code_start * D in int64, then whole-tile steps) "
    "and index inside a tile with int32 offsets of at most BLOCK_N or BLOCK_K rows of contiguous operands "
    "times D or DV: below 2**31 for any D, DV < 2**24"
)
# The widest D or DV for which a tile's int32 offsets (BLOCK_N or BLOCK_K <= 128 rows times the width)
# stay below 2**31.
MAX_TILE_WIDTH = 2**24
_EUCLIDEAN_EPS = tl.constexpr(EUCLIDEAN_EPS)


@triton.jit
def _logit_tile(
    zq_ptr,
    keys_ptr,
    z_tile,
    local_rows,
    row_mask,
    row_term,
    local_codes,
    code_mask,
    code_term,
    D,
    inv_temperature,
    METRIC: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``(logits [BLOCK_N, BLOCK_K], scale)`` of a row tile (``zq_ptr`` at its first row) and a code
    tile (``keys_ptr`` at its first code): ``-inf`` for NaN logits and padding codes; ``scale`` is
    euclidean's ``1 / (2 |z - e|)`` (0 where clamped), ones otherwise. Offsets inside the tiles are
    int32 (a tile spans far fewer than 2^31 elements); the callers move the base pointers in int64."""
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if SINGLE_D_TILE:
        key_tile = tl.load(
            keys_ptr + local_codes[None, :] * D + dims[:, None],
            mask=code_mask[None, :] & (dims < D)[:, None],
            other=0.0,
        )
        if DOT_IN_FP32:
            key_tile = key_tile.to(tl.float32)
        acc = tl.dot(z_tile, key_tile, acc, input_precision=DOT_PRECISION)
    else:
        for dim_start in range(0, D, BLOCK_D):
            dim_idx = dim_start + dims
            dim_mask = dim_idx < D
            z_slice = tl.load(
                zq_ptr + local_rows[:, None] * D + dim_idx[None, :], mask=row_mask[:, None] & dim_mask[None, :],
                other=0.0,
            )
            key_tile = tl.load(
                keys_ptr + local_codes[None, :] * D + dim_idx[:, None], mask=code_mask[None, :] & dim_mask[:, None],
                other=0.0,
            )
            if DOT_IN_FP32:
                z_slice = z_slice.to(tl.float32)
                key_tile = key_tile.to(tl.float32)
            acc = tl.dot(z_slice, key_tile, acc, input_precision=DOT_PRECISION)
    scale = tl.full((BLOCK_N, BLOCK_K), 1.0, tl.float32)
    if METRIC == METRIC_DOT:
        logits = (acc - code_term[None, :]) * inv_temperature
    elif METRIC == METRIC_L2:
        logits = (2.0 * acc - row_term[:, None] - code_term[None, :]) * inv_temperature
    else:
        tl.static_assert(METRIC == METRIC_EUCLIDEAN)
        squared = row_term[:, None] + code_term[None, :] - 2.0 * acc
        distance = tl.sqrt(tl.maximum(squared, _EUCLIDEAN_EPS))
        scale = tl.where(squared <= _EUCLIDEAN_EPS, 0.0, 0.5 / distance)
        logits = -distance * inv_temperature
    logits = tl.where(logits != logits, float("-inf"), logits)
    logits = tl.where(code_mask[None, :], logits, float("-inf"))
    return logits, scale


@triton.jit
def _load_row_tile(zq_ptr, local_rows, row_mask, D, DOT_IN_FP32: tl.constexpr, BLOCK_D: tl.constexpr):
    """The whole prepared row tile, for ``SINGLE_D_TILE`` (``D <= BLOCK_D``): loaded once, kept in registers."""
    dims = tl.arange(0, BLOCK_D)
    z_tile = tl.load(
        zq_ptr + local_rows[:, None] * D + dims[None, :], mask=row_mask[:, None] & (dims < D)[None, :], other=0.0
    )
    if DOT_IN_FP32:
        z_tile = z_tile.to(tl.float32)
    return z_tile


@triton.jit
def _gumbel_tile(seed, rows, code_start, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Standard Gumbel noise of the tile's (row, code) pairs (``rows`` the int64 row numbers):
    Philox-4x32-10 at counter ``(k >> 2, n mod 2^32, n >> 32, 0)``, output ``k mod 4``, its top 23
    bits read as ``(2 j + 1) / 2^24``."""
    groups = (code_start // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
    shape: tl.constexpr = (BLOCK_N, BLOCK_K // 4)
    c0 = tl.broadcast_to(groups[None, :], shape)
    c1 = tl.broadcast_to((rows & 0xFFFFFFFF).to(tl.uint32)[:, None], shape)
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32)[:, None], shape)
    c3 = c0 * 0
    out0, out1, out2, out3 = tl.philox(seed, c0, c1, c2, c3)
    bits = tl.interleave(tl.interleave(out0, out2), tl.interleave(out1, out3))
    uniform = ((bits >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
    return -tl.log(-tl.log(uniform))


@triton.jit
def _soft_quantize_fwd_kernel(
    zq_ptr,
    row_term_ptr,
    keys_ptr,
    code_term_ptr,
    values_ptr,
    soft_ptr,
    indices_ptr,
    lse_ptr,
    entropy_ptr,
    seed_ptr,
    N,
    K,
    D,
    DV,
    inv_temperature,
    METRIC: tl.constexpr,
    VALUES: tl.constexpr,
    HARD: tl.constexpr,
    NOISE: tl.constexpr,
    ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    value_start = tl.program_id(1) * BLOCK_DV
    local_rows = tl.arange(0, BLOCK_N)
    row_mask = local_rows < N - row_start
    zq_ptr += row_start * D
    row_term = tl.load(row_term_ptr + row_start + local_rows, mask=row_mask, other=0.0)
    value_dims = value_start + tl.arange(0, BLOCK_DV)
    value_mask = value_dims < DV
    z_tile = _load_row_tile(zq_ptr, local_rows, row_mask, D, DOT_IN_FP32, BLOCK_D) if SINGLE_D_TILE else 0.0
    if NOISE:
        seed = tl.load(seed_ptr)

    maximum = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_N,), tl.float32)
    weighted_logits = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int32)
    local_codes = tl.arange(0, BLOCK_K)
    # The tile pointers advance by whole tiles: 64-bit pointers, 32-bit steps.
    tile_keys_ptr = keys_ptr
    tile_values_ptr = values_ptr
    for code_start in range(0, K, BLOCK_K):
        code_mask = local_codes < K - code_start
        code_term = tl.load(code_term_ptr + code_start + local_codes, mask=code_mask, other=float("inf"))
        logits, _ = _logit_tile(
            zq_ptr, tile_keys_ptr, z_tile, local_rows, row_mask, row_term, local_codes,
            code_mask, code_term, D, inv_temperature, METRIC, SINGLE_D_TILE, DOT_PRECISION, DOT_IN_FP32,
            BLOCK_N, BLOCK_K, BLOCK_D,
        )
        if HARD:
            scores = logits
            if NOISE:
                scores = logits + _gumbel_tile(seed, row_start + local_rows, code_start, BLOCK_N, BLOCK_K)
            tile_best, tile_index = tl.max(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
            # Strict '>' keeps the earlier tile on ties, so the lowest index wins whatever the tiling.
            better = tile_best > best
            best = tl.where(better, tile_best, best)
            best_index = tl.where(better, tile_index + code_start, best_index)
        new_maximum = tl.maximum(maximum, tl.max(logits, axis=1))
        # A row whose logits are all -inf so far keeps a zero sum instead of exp(nan).
        shift = tl.where(new_maximum == float("-inf"), 0.0, new_maximum)
        rescale = tl.exp(maximum - shift)
        probs = tl.exp(logits - shift[:, None])
        if ENTROPY:
            # sum p (logit - shift), carried in the current shift (moving it from s0 to s1 adds
            # (s0 - s1) * total before the rescale): H = log(total) - that / total then subtracts no
            # two large numbers, so it stays in [0, log K] at any temperature.
            old_shift = tl.where(maximum == float("-inf"), 0.0, maximum)
            centred = tl.where(probs > 0, probs * (logits - shift[:, None]), 0.0)
            weighted_logits = (weighted_logits + (old_shift - shift) * total) * rescale + tl.sum(centred, axis=1)
        total = total * rescale + tl.sum(probs, axis=1)
        if VALUES:
            value_tile = tl.load(
                tile_values_ptr + local_codes[:, None] * DV + value_dims[None, :],
                mask=code_mask[:, None] & value_mask[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                value_tile = value_tile.to(tl.float32)
            acc = acc * rescale[:, None]
            acc = tl.dot(probs.to(value_tile.dtype), value_tile, acc, input_precision=DOT_PRECISION)
        maximum = new_maximum
        tile_keys_ptr += BLOCK_K * D
        tile_values_ptr += BLOCK_K * DV

    if VALUES:
        tl.store(
            soft_ptr + row_start * DV + local_rows[:, None] * DV + value_dims[None, :],
            (acc / total[:, None]).to(soft_ptr.dtype.element_ty),
            mask=row_mask[:, None] & value_mask[None, :],
        )
    # The per-row results are written by the first program along the value axis only. A branch, not a
    # mask `row_mask & (tl.program_id(1) == 0)`: Triton 3.9's interpreter broadcasts a scalar comparison
    # with integer data, which a store then refuses as a mask ("mask has unsupported dtype").
    if tl.program_id(1) == 0:
        shift = tl.where(maximum == float("-inf"), 0.0, maximum)
        lse = tl.where(total > 0, shift + tl.log(total), float("nan"))
        tl.store(lse_ptr + row_start + local_rows, lse, mask=row_mask)
        if ENTROPY:
            # [3, N]: the entropy, the largest logit and log(total), whose sum lse rounds: the code
            # kernel's probabilities exp(logit - max - log(total)) then sum to 1 however large the logits.
            log_total = tl.log(total)
            tl.store(entropy_ptr + row_start + local_rows, log_total - weighted_logits / total, mask=row_mask)
            tl.store(entropy_ptr + N + row_start + local_rows, shift, mask=row_mask)
            tl.store(entropy_ptr + 2 * N + row_start + local_rows, log_total, mask=row_mask)
        if HARD:
            tl.store(indices_ptr + row_start + local_rows, best_index.to(tl.int64), mask=row_mask)


@triton.jit
def _logit_grad_weight(
    logits,
    scale,
    lse,
    dp,
    gamma,
    delta,
    inv_temperature,
    GAMMA: tl.constexpr,
):
    """``(p, w)``: ``p = exp(logit - lse)`` and ``w = p (dp + gamma * logit - delta) / T * scale``, 0
    where ``p`` is 0 (an excluded code's ``-inf`` logit must not turn it into NaN)."""
    probs = tl.exp(logits - lse[:, None])
    bracket = dp - delta[:, None]
    if GAMMA:
        bracket += gamma[:, None] * logits
    weight = tl.where(probs > 0, probs * bracket, 0.0) * (scale * inv_temperature)
    return probs, weight


@triton.jit
def _output_grad_tile(
    grad_ptr,
    values_ptr,
    code_weight_ptr,
    local_rows,
    row_mask,
    local_codes,
    code_mask,
    DV,
    CODE_WEIGHTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    """``dp [BLOCK_N, BLOCK_K]``: ``grad @ values^T`` over ``DV`` in ``BLOCK_DV`` slices, or with
    ``CODE_WEIGHTS`` the per-code vector broadcast over the rows (pointers at the tiles' first row
    and code)."""
    if CODE_WEIGHTS:
        weights = tl.load(code_weight_ptr + local_codes, mask=code_mask, other=0.0)
        return tl.broadcast_to(weights[None, :], (BLOCK_N, BLOCK_K))
    dp = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for value_start in range(0, DV, BLOCK_DV):
        value_dims = value_start + tl.arange(0, BLOCK_DV)
        value_mask = value_dims < DV
        grad_tile = tl.load(
            grad_ptr + local_rows[:, None] * DV + value_dims[None, :], mask=row_mask[:, None] & value_mask[None, :],
            other=0.0,
        )
        value_tile = tl.load(
            values_ptr + local_codes[None, :] * DV + value_dims[:, None],
            mask=code_mask[None, :] & value_mask[:, None], other=0.0,
        )
        if DOT_IN_FP32:
            value_tile = value_tile.to(tl.float32)
        dp = tl.dot(grad_tile.to(value_tile.dtype), value_tile, dp, input_precision=DOT_PRECISION)
    return dp


@triton.jit
def _soft_rows_bwd_kernel(
    zq_ptr,
    row_term_ptr,
    keys_ptr,
    code_term_ptr,
    values_ptr,
    grad_ptr,
    code_weight_ptr,
    lse_ptr,
    gamma_ptr,
    delta_ptr,
    weighted_keys_ptr,
    row_sums_ptr,
    N,
    K,
    D,
    DV,
    inv_temperature,
    METRIC: tl.constexpr,
    CODE_WEIGHTS: tl.constexpr,
    GAMMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DO: tl.constexpr,
):
    row_start = tl.program_id(0).to(tl.int64) * BLOCK_N
    local_rows = tl.arange(0, BLOCK_N)
    row_mask = local_rows < N - row_start
    zq_ptr += row_start * D
    grad_ptr += row_start * DV
    row_term = tl.load(row_term_ptr + row_start + local_rows, mask=row_mask, other=0.0)
    lse = tl.load(lse_ptr + row_start + local_rows, mask=row_mask, other=0.0)
    delta = tl.load(delta_ptr + row_start + local_rows, mask=row_mask, other=0.0)
    gamma = tl.load(gamma_ptr + row_start + local_rows, mask=row_mask, other=0.0) if GAMMA else delta
    out_dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_dims < D
    z_tile = _load_row_tile(zq_ptr, local_rows, row_mask, D, DOT_IN_FP32, BLOCK_D) if SINGLE_D_TILE else 0.0

    weighted_keys = tl.zeros((BLOCK_N, BLOCK_DO), tl.float32)
    row_sums = tl.zeros((BLOCK_N,), tl.float32)
    local_codes = tl.arange(0, BLOCK_K)
    code_keys_ptr = keys_ptr
    code_values_ptr = values_ptr
    for code_start in range(0, K, BLOCK_K):
        code_mask = local_codes < K - code_start
        code_term = tl.load(code_term_ptr + code_start + local_codes, mask=code_mask, other=float("inf"))
        logits, scale = _logit_tile(
            zq_ptr, code_keys_ptr, z_tile, local_rows, row_mask, row_term, local_codes, code_mask, code_term, D,
            inv_temperature, METRIC, SINGLE_D_TILE, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_K, BLOCK_D,
        )
        dp = _output_grad_tile(grad_ptr, code_values_ptr, code_weight_ptr + code_start,
                               local_rows, row_mask, local_codes, code_mask, DV, CODE_WEIGHTS, DOT_PRECISION,
                               DOT_IN_FP32, BLOCK_N, BLOCK_K, BLOCK_DV)
        _, weight = _logit_grad_weight(logits, scale, lse, dp, gamma, delta, inv_temperature, GAMMA)
        row_sums += tl.sum(weight, axis=1)
        key_tile = tl.load(
            code_keys_ptr + local_codes[:, None] * D + out_dims[None, :], mask=code_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        if DOT_IN_FP32:
            key_tile = key_tile.to(tl.float32)
        weighted_keys = tl.dot(weight.to(key_tile.dtype), key_tile, weighted_keys, input_precision=DOT_PRECISION)
        code_keys_ptr += BLOCK_K * D
        code_values_ptr += BLOCK_K * DV

    tl.store(weighted_keys_ptr + row_start * D + local_rows[:, None] * D + out_dims[None, :], weighted_keys,
             mask=row_mask[:, None] & out_mask[None, :])
    if tl.program_id(1) == 0:  # a branch, not a mask: see _soft_quantize_fwd_kernel
        tl.store(row_sums_ptr + row_start + local_rows, row_sums, mask=row_mask)


@triton.jit
def _soft_codes_bwd_kernel(
    zq_ptr,
    row_term_ptr,
    keys_ptr,
    code_term_ptr,
    values_ptr,
    grad_ptr,
    code_weight_ptr,
    lse_ptr,
    gamma_ptr,
    delta_ptr,
    weighted_rows_ptr,
    code_sums_ptr,
    grad_values_ptr,
    N,
    K,
    D,
    DV,
    inv_temperature,
    METRIC: tl.constexpr,
    WEIGHTS: tl.constexpr,
    VALUE_GRAD: tl.constexpr,
    PROB_SUMS: tl.constexpr,
    CODE_WEIGHTS: tl.constexpr,
    GAMMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_DO: tl.constexpr,
    BLOCK_DVO: tl.constexpr,
):
    code_start = tl.program_id(0).to(tl.int64) * BLOCK_K
    local_codes = tl.arange(0, BLOCK_K)
    code_mask = local_codes < K - code_start
    keys_ptr += code_start * D
    values_ptr += code_start * DV
    code_weight_ptr += code_start
    code_term = tl.load(code_term_ptr + code_start + local_codes, mask=code_mask, other=float("inf"))
    out_dims = tl.program_id(1) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_mask = out_dims < D
    value_out_dims = tl.program_id(1) * BLOCK_DVO + tl.arange(0, BLOCK_DVO)
    value_out_mask = value_out_dims < DV

    weighted_rows = tl.zeros((BLOCK_K, BLOCK_DO), tl.float32)
    code_sums = tl.zeros((BLOCK_K,), tl.float32)
    grad_values = tl.zeros((BLOCK_K, BLOCK_DVO), tl.float32)
    local_rows = tl.arange(0, BLOCK_N)
    tile_zq_ptr = zq_ptr
    tile_grad_ptr = grad_ptr
    for row_start in range(0, N, BLOCK_N):
        row_mask = local_rows < N - row_start
        row_term = tl.load(row_term_ptr + row_start + local_rows, mask=row_mask, other=0.0)
        lse = tl.load(lse_ptr + row_start + local_rows, mask=row_mask, other=float("inf"))
        logits, scale = _logit_tile(
            tile_zq_ptr, keys_ptr, 0.0, local_rows, row_mask, row_term, local_codes, code_mask, code_term, D,
            inv_temperature, METRIC, False, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_K, BLOCK_D,
        )
        # Padding rows have lse = +inf, hence probability 0: they add nothing to any sum.
        probs = tl.exp(logits - lse[:, None])
        if PROB_SUMS:
            # Here lse holds each row's largest logit and delta its log(total) (see ENTROPY above).
            log_total = tl.load(delta_ptr + row_start + local_rows, mask=row_mask, other=0.0)
            code_sums += tl.sum(tl.exp(logits - lse[:, None] - log_total[:, None]), axis=0)
        if VALUE_GRAD:
            grad_tile = tl.load(
                tile_grad_ptr + local_rows[:, None] * DV + value_out_dims[None, :],
                mask=row_mask[:, None] & value_out_mask[None, :], other=0.0,
            )
            if DOT_IN_FP32:
                grad_tile = grad_tile.to(tl.float32)
            grad_values = tl.dot(tl.trans(probs.to(grad_tile.dtype)), grad_tile, grad_values,
                                 input_precision=DOT_PRECISION)
        if WEIGHTS:
            delta = tl.load(delta_ptr + row_start + local_rows, mask=row_mask, other=0.0)
            gamma = tl.load(gamma_ptr + row_start + local_rows, mask=row_mask, other=0.0) if GAMMA else delta
            dp = _output_grad_tile(tile_grad_ptr, values_ptr, code_weight_ptr, local_rows, row_mask, local_codes,
                                   code_mask, DV, CODE_WEIGHTS, DOT_PRECISION, DOT_IN_FP32, BLOCK_N, BLOCK_K, BLOCK_DV)
            _, weight = _logit_grad_weight(logits, scale, lse, dp, gamma, delta, inv_temperature, GAMMA)
            code_sums += tl.sum(weight, axis=0)
            z_tile = tl.load(
                tile_zq_ptr + local_rows[:, None] * D + out_dims[None, :], mask=row_mask[:, None] & out_mask[None, :],
                other=0.0,
            )
            if DOT_IN_FP32:
                z_tile = z_tile.to(tl.float32)
            weighted_rows = tl.dot(tl.trans(weight.to(z_tile.dtype)), z_tile, weighted_rows,
                                   input_precision=DOT_PRECISION)
        tile_zq_ptr += BLOCK_N * D
        tile_grad_ptr += BLOCK_N * DV

    if WEIGHTS:
        tl.store(weighted_rows_ptr + code_start * D + local_codes[:, None] * D + out_dims[None, :], weighted_rows,
                 mask=code_mask[:, None] & out_mask[None, :])
    if WEIGHTS or PROB_SUMS:
        if tl.program_id(1) == 0:  # a branch, not a mask: see _soft_quantize_fwd_kernel
            tl.store(code_sums_ptr + code_start + local_codes, code_sums, mask=code_mask)
    if VALUE_GRAD:
        tl.store(grad_values_ptr + code_start * DV + local_codes[:, None] * DV + value_out_dims[None, :], grad_values,
                 mask=code_mask[:, None] & value_out_mask[None, :])


# --------------------------------------------------------------------------- launchers

class KernelConfig(NamedTuple):
    """One kernel's tile sizes: rows, codes and the ``D`` slice of the logits; ``out``, the widest
    output slice a program accumulates in registers (wider outputs take more programs, each
    recomputing the logits); and the warps."""

    block_n: int
    block_k: int
    block_d: int
    out: int
    num_warps: int

    def blocks(self) -> dict:
        return {"BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "BLOCK_D": self.block_d}

    def out_block(self, dim: int) -> int:
        return slice_width(dim, self.out)


# Configurations that compiled without spills for sm_80 and sm_90, fp32/fp16/bf16, every metric
# and flag combination the launcher uses (triton.compile for both targets, the cubin's resource
# usage read with cuobjdump); not yet timed on a GPU. fp32's tf32x3 products
# triple the dot operands, so its tiles are smaller; the backward kernels carry more tiles than
# the forward.
_CONFIGS = {
    "fp32": {"fwd": KernelConfig(32, 32, 32, 32, 8), "rows": KernelConfig(16, 32, 32, 32, 4),
             "codes": KernelConfig(16, 32, 32, 32, 4)},
    "16-bit": {"fwd": KernelConfig(64, 32, 32, 64, 8), "rows": KernelConfig(64, 32, 32, 64, 8),
               "codes": KernelConfig(32, 32, 32, 64, 8)},
}
# Where D is no multiple of 16 (Triton cannot specialise the operands' row stride, D, nor their masks) the fp32
# code kernel on four warps spilled 40 to 56 B on sm_80 and sm_90; on eight it spills nothing.
_FP32_UNALIGNED_D_CODES = KernelConfig(16, 32, 32, 32, 8)
# Under the interpreter every tile is a numpy array: the smallest tiles tl.dot accepts are fastest.
_INTERPRETER_CONFIG = KernelConfig(16, 16, 16, 16, 4)


def kernel_config(kernel: str, dtype: torch.dtype, dim: int) -> KernelConfig:
    """The tiles ``kernel`` (``"fwd"``, ``"rows"`` or ``"codes"``) runs with for inputs of ``dtype`` and
    width ``dim``."""
    if interpreting():
        return _INTERPRETER_CONFIG
    if kernel == "codes" and dtype == torch.float32 and dim % 16:
        return _FP32_UNALIGNED_D_CODES
    return _CONFIGS["fp32" if dtype == torch.float32 else "16-bit"][kernel]


class _Launch:
    """The prepared operands of one call and the kernels' common arguments."""

    def __init__(self, z: torch.Tensor, codebook: torch.Tensor, values: Optional[torch.Tensor], metric: str,
                 temperature: float):
        # INT32_TILE_OFFSETS holds only below this width; checked before any operand is prepared.
        for name, tensor in (("z", z), ("values", values)):
            if tensor is not None and tensor.shape[-1] >= MAX_TILE_WIDTH:
                raise ValueError(f"the Triton soft-assignment kernels index inside a tile in int32: {name}'s last "
                                 f"dimension must be below 2**24, got {name} of shape {tuple(tensor.shape)}")
        dtype = torch.promote_types(z.dtype, codebook.dtype)
        if values is not None:
            dtype = torch.promote_types(dtype, values.dtype)
        self.dtype = dtype
        self.prep = SoftCodebook(codebook, values, metric, dtype)
        zq, row_term = self.prep.rows(z)
        self.zq_work = zq
        self.zq = zq.to(dtype).contiguous()
        self.row_term = row_term.float().contiguous()
        self.keys = self.prep.keys.to(dtype).contiguous()
        self.code_term = self.prep.code_term.float().contiguous()
        self.values = self.prep.values.to(dtype).contiguous()
        self.num_rows, self.dim = z.shape
        self.num_codes = codebook.shape[0]
        self.value_dim = self.values.shape[1]
        self.inv_temperature = 1.0 / temperature
        self.configs = {kernel: kernel_config(kernel, dtype, self.dim) for kernel in ("fwd", "rows", "codes")}
        self.meta = dict(
            # Cosine rows and keys arrive normalised, so their logits are the dot metric's: one compiled kernel.
            METRIC=METRIC_DOT if metric == "cosine" else METRIC_IDS[metric],
            DOT_PRECISION=dot_precision(dtype),
            DOT_IN_FP32=interpreting() and dtype == torch.bfloat16,
        )
        self.device = z.device

    def sizes(self) -> tuple:
        return (self.num_rows, self.num_codes, self.dim, self.value_dim, self.inv_temperature)

    def operands(self) -> tuple:
        return (self.zq, self.row_term, self.keys, self.code_term, self.values)

    def context(self):
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def forward(self, values: torch.Tensor, *, hard: bool, seed: Optional[torch.Tensor], entropy: bool,
                out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(soft [N, Dv], indices, lse, entropy_stats)`` of ``softmax(logits) @ values``; with
        ``entropy``, ``entropy_stats [3, N]`` holds each row's entropy, largest logit and
        ``log(sum exp(logit - largest))``, else it is empty."""
        value_dim = values.shape[1]
        soft = torch.empty((self.num_rows, value_dim), dtype=out_dtype, device=self.device)
        indices = torch.empty(self.num_rows if hard else 0, dtype=torch.int64, device=self.device)
        lse = torch.empty(self.num_rows, dtype=torch.float32, device=self.device)
        weighted = torch.empty((3, self.num_rows if entropy else 0), dtype=torch.float32, device=self.device)
        if self.num_rows == 0:
            return soft, indices, lse, weighted
        config = self.configs["fwd"]
        block_dv = config.out_block(value_dim)
        grid = (triton.cdiv(self.num_rows, config.block_n), max(1, triton.cdiv(value_dim, block_dv)))
        with self.context():
            _soft_quantize_fwd_kernel[grid](
                self.zq, self.row_term, self.keys, self.code_term, values,
                soft, indices, lse, weighted, seed if seed is not None else lse,
                self.num_rows, self.num_codes, self.dim, value_dim, self.inv_temperature,
                VALUES=value_dim > 0, HARD=hard, NOISE=seed is not None, ENTROPY=entropy,
                SINGLE_D_TILE=self.dim <= config.block_d, BLOCK_DV=block_dv,
                **self.meta, **config.blocks(), num_warps=config.num_warps,
            )
        return soft, indices, lse, weighted

    def backward_sums(self, lse: torch.Tensor, delta: torch.Tensor, *, rows_grad: bool, codes_grad: bool,
                      value_grad: bool = False, grad: Optional[torch.Tensor] = None,
                      code_weights: Optional[torch.Tensor] = None,
                      gamma: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        """``(weighted_keys, row_sums, weighted_rows, code_sums, grad_values)`` of the weight
        ``w = p (dp + gamma * logit - delta) / T`` with ``dp = grad @ values^T`` or ``code_weights``;
        the row kernel runs for ``rows_grad``, the code kernel for ``codes_grad`` or ``value_grad``,
        and what is not asked for comes back empty."""
        f32 = dict(dtype=torch.float32, device=self.device)
        rows, codes = (self.num_rows if rows_grad else 0), (self.num_codes if codes_grad else 0)
        weighted_keys = torch.zeros((rows, self.dim), **f32)
        row_sums = torch.zeros(rows, **f32)
        weighted_rows = torch.zeros((codes, self.dim), **f32)
        code_sums = torch.zeros(codes, **f32)
        grad_values = torch.zeros((self.num_codes if value_grad else 0, self.value_dim), **f32)
        if self.num_rows == 0:
            return weighted_keys, row_sums, weighted_rows, code_sums, grad_values
        lse, delta = lse.float().contiguous(), delta.float().contiguous()
        grad = grad.contiguous() if grad is not None else lse
        code_weights = code_weights.float().contiguous() if code_weights is not None else lse
        gamma_arg = gamma.float().contiguous() if gamma is not None else lse
        flags = dict(CODE_WEIGHTS=code_weights is not lse, GAMMA=gamma is not None)
        common_args = (*self.operands(), grad, code_weights, lse, gamma_arg, delta)
        with self.context():
            if rows_grad:
                config = self.configs["rows"]
                block_do, block_dv = config.out_block(self.dim), config.out_block(self.value_dim)
                grid = (triton.cdiv(self.num_rows, config.block_n), triton.cdiv(self.dim, block_do))
                _soft_rows_bwd_kernel[grid](
                    *common_args, weighted_keys, row_sums, *self.sizes(),
                    SINGLE_D_TILE=self.dim <= config.block_d, BLOCK_DV=block_dv, BLOCK_DO=block_do,
                    **flags, **self.meta, **config.blocks(), num_warps=config.num_warps,
                )
            if codes_grad or value_grad:
                config = self.configs["codes"]
                block_do, block_dv = config.out_block(self.dim), config.out_block(self.value_dim)
                slices = max(triton.cdiv(self.dim, block_do) if codes_grad else 1,
                             triton.cdiv(self.value_dim, block_dv) if value_grad else 1)
                grid = (triton.cdiv(self.num_codes, config.block_k), slices)
                _soft_codes_bwd_kernel[grid](
                    *common_args, weighted_rows, code_sums, grad_values, *self.sizes(),
                    WEIGHTS=codes_grad, VALUE_GRAD=value_grad, PROB_SUMS=False, BLOCK_DV=block_dv,
                    BLOCK_DO=block_do, BLOCK_DVO=block_dv, **flags, **self.meta, **config.blocks(),
                    num_warps=config.num_warps,
                )
        return weighted_keys, row_sums, weighted_rows, code_sums, grad_values

    def prob_sums(self, max_logit: torch.Tensor, log_total: torch.Tensor) -> torch.Tensor:
        """``sum_n p[n, k]`` per code, ``p = exp(logit - max_logit - log_total)`` (``forward``'s entropy stats)."""
        sums = torch.zeros(self.num_codes, dtype=torch.float32, device=self.device)
        if self.num_rows == 0:
            return sums
        lse, log_total = max_logit.float().contiguous(), log_total.float().contiguous()
        config = self.configs["codes"]
        grid = (triton.cdiv(self.num_codes, config.block_k), 1)
        with self.context():
            _soft_codes_bwd_kernel[grid](
                *self.operands(), lse, lse, lse, lse, log_total, sums, sums, sums, *self.sizes(),
                WEIGHTS=False, VALUE_GRAD=False, PROB_SUMS=True, CODE_WEIGHTS=False, GAMMA=False,
                BLOCK_DV=16, BLOCK_DO=16, BLOCK_DVO=16, **self.meta, **config.blocks(), num_warps=config.num_warps,
            )
        return sums

    def grads(self, z: torch.Tensor, codebook: torch.Tensor, sums: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_z, grad_codebook)`` from ``backward_sums``; an empty sum gives an empty gradient."""
        weighted_keys, row_sums, weighted_rows, code_sums, _ = sums
        return self.prep.chained_grads(z, codebook, self.zq_work, weighted_keys, row_sums, weighted_rows, code_sums,
                                       weighted_keys.shape[0] > 0, weighted_rows.shape[0] > 0)


def soft_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    seed: Optional[torch.Tensor],
    return_hard: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward; inputs are checked by the caller; fp64 is not handled here."""
    launch = _Launch(z, codebook, values, metric, temperature)
    soft, indices, lse, _ = launch.forward(launch.values, hard=return_hard, seed=seed, entropy=False,
                                           out_dtype=launch.dtype)
    return soft, indices, lse


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
    """``(grad_z, grad_codebook, grad_values)`` in fp32, as the PyTorch path's."""
    launch = _Launch(z, codebook, values, metric, temperature)
    delta = (grad_soft.float() * soft.float()).sum(dim=1) - grad_lse.float()
    value_grad = compute_values_grad if values is not None else compute_codebook_grad
    sums = launch.backward_sums(lse, delta, rows_grad=compute_z_grad, codes_grad=compute_codebook_grad,
                                value_grad=value_grad, grad=grad_soft.to(launch.dtype))
    grad_z, grad_codebook = launch.grads(z, codebook, sums)
    return (grad_z, *split_value_grad(values, grad_codebook, sums[4]))


def soft_entropy(
    z: torch.Tensor, codebook: torch.Tensor, metric: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_entropy, mean_probs, lse)`` in fp32: the forward kernel's running ``sum p * (logit - max)``,
    then the code kernel's per-code probability sums."""
    launch = _Launch(z, codebook, None, metric, temperature)
    no_values = launch.values[:, :0]
    _, _, lse, (row_entropy, max_logit, log_total) = launch.forward(no_values, hard=False, seed=None, entropy=True,
                                                                    out_dtype=launch.dtype)
    mean_probs = launch.prob_sums(max_logit, log_total)
    if launch.num_rows:
        mean_probs /= launch.num_rows
    # Rounding may still put a uniform row's entropy an ulp past log K, or a one-hot row's below 0.
    return row_entropy.clamp(0.0, math.log(launch.num_codes)), mean_probs, lse


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
    """``(grad_z, grad_codebook)`` in fp32, with the weight of the PyTorch path's
    ``soft_entropy_backward``: ``<p_n, c>`` is the forward kernel with the values ``c [K, 1]``."""
    launch = _Launch(z, codebook, None, metric, temperature)
    code_weights = grad_mean_probs.float() / max(launch.num_rows, 1)
    expected, _, _, _ = launch.forward(code_weights[:, None].contiguous(), hard=False, seed=None, entropy=False,
                                       out_dtype=torch.float32)
    grad_entropy = grad_row_entropy.float()
    mean_logit = lse.float() - row_entropy.float()
    delta = expected[:, 0] - grad_lse.float() - grad_entropy * mean_logit
    sums = launch.backward_sums(lse, delta, rows_grad=compute_z_grad, codes_grad=compute_codebook_grad,
                                code_weights=code_weights, gamma=-grad_entropy)
    return launch.grads(z, codebook, sums)


def soft_quantize_entropy(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    entropy_temperature: float,
) -> tuple[torch.Tensor, ...]:
    """The fused soft codes + entropies as the Triton ``soft_quantize`` then ``soft_entropy`` (each streams the
    codebook: the two softmaxes are not fused here)."""
    return composed_soft_quantize_entropy(soft_quantize, soft_entropy, z, codebook, values, metric, temperature,
                                          entropy_temperature)


def soft_quantize_entropy_backward(*args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op's backward as the Triton two backwards, their gradients added (arguments as the C++
    binding's ``soft_quantize_entropy_backward``)."""
    return composed_soft_quantize_entropy_backward(soft_quantize_backward, soft_entropy_backward, *args)


def compile_cases() -> list:
    """The launches of the soft quantize and soft entropy ops, forward and backward, for
    ``tests/backends/test_aot_compile.py`` (see ``common.CompileCase``), recorded from the launchers
    themselves: the dot (and cosine), l2 and euclidean logits in fp32 with the hard Gumbel choice,
    euclidean in bf16, fp16 at a D past one slice, separate values, odd N, K and D (18, 100; values of width
    18) in fp32 and bf16, and the entropy's launches."""
    import sys

    module = sys.modules[__name__]
    cases = []

    def quantize(name, dtype, metric, dim=64, value_dim=None, kernels=None, rows=256, codes=512):
        z, codebook = torch.zeros(rows, dim, dtype=dtype), torch.zeros(codes, dim, dtype=dtype)
        values = torch.zeros(codes, value_dim, dtype=dtype) if value_dim else None
        seed = torch.zeros(1, dtype=torch.int64)
        with recording_launches(module) as launches:
            soft, _, lse = soft_quantize(z, codebook, values, metric, 0.5, seed, True)
            soft_quantize_backward(torch.zeros_like(soft), torch.zeros_like(lse), z, codebook, values, soft, lse,
                                   metric, 0.5, True, True, values is not None)
        kept = [launch for launch in launches if kernels is None or launch[0] in kernels]
        cases.extend(cases_from_launches(name, kept))

    for metric in ("dot", "l2", "euclidean"):
        quantize(f"{metric} fp32 D=64", torch.float32, metric)
    quantize("euclidean bf16 D=64", torch.bfloat16, "euclidean")
    quantize("dot fp16 D=256", torch.float16, "dot", dim=256,
             kernels=(_soft_quantize_fwd_kernel, _soft_rows_bwd_kernel))
    quantize("dot fp32 D=64 values D=32", torch.float32, "dot", value_dim=32)
    # Odd N, K and D (the launcher makes every operand contiguous, so its row stride is D): Open-MAGVIT2's
    # D = 18 in one slice, D = 100 in several, with values of an odd width.
    quantize("l2 fp32 D=18 N=1001 K=1000", torch.float32, "l2", dim=18, rows=1001, codes=1000)
    quantize("dot fp32 D=100 N=1001 K=1000 values D=18", torch.float32, "dot", dim=100, value_dim=18, rows=1001,
             codes=1000)
    quantize("dot bf16 D=100 N=1001 K=1000 values D=18", torch.bfloat16, "dot", dim=100, value_dim=18, rows=1001,
             codes=1000)
    z, codebook = torch.zeros(256, 64, dtype=torch.bfloat16), torch.zeros(512, 64, dtype=torch.bfloat16)
    with recording_launches(module) as launches:
        row_entropy, mean_probs, lse = soft_entropy(z, codebook, "cosine", 0.5)
        soft_entropy_backward(torch.zeros_like(row_entropy), torch.zeros_like(mean_probs), torch.zeros_like(lse),
                              z, codebook, row_entropy, lse, "cosine", 0.5, True, True)
    cases.extend(cases_from_launches("entropy cosine bf16 D=64", launches))
    return cases
