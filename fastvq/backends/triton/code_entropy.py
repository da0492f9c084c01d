"""The code entropy (LFQ's entropy loss) over code tiles: three kernels that never hold ``N x 2^d``.

Code ``(hi, lo)`` of a row has probability ``P_hi[hi] * P_lo[lo]``, the products of the row's
per-bit probabilities over the high and the low half of its ``d`` bits (see
``fastvq/backends/torch/code_entropy.py`` for the algebra). The kernels build tiles of ``P_hi`` and
``P_lo`` in registers straight from the logits, so neither is ever written to memory:

- ``_code_entropy_avg_kernel``: a program owns a ``BLOCK_H x BLOCK_L`` tile of codes and walks a
  slice of the rows, accumulating ``P_hi^T @ P_lo`` with ``tl.dot``; the slices' partial sums are
  added afterwards: the batch-mean distribution.
- ``_code_entropy_sample_kernel``: a program owns ``BLOCK_N`` rows and walks every code tile,
  summing ``-p log max(p, eps)`` over the ``[BLOCK_N, BLOCK_H, BLOCK_L]`` products: each row's
  clamped entropy, ``N 2^d`` elementwise work (the PyTorch path's sort-based formula needs
  sorting, which a GPU does not pay back at these sizes).
- ``_code_entropy_bwd_kernel``: the same walk over code tiles with the weight ``W = g_avg / N +
  g_n f'(p)`` of every code, accumulating per bit ``sum W p`` over the codes whose bit is 1 and
  over those whose bit is 0; the gradient is ``sigmoid(-l) ones - sigmoid(l) zeros``. Each program
  writes its own rows: no atomics, deterministic.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ..common import code_entropy_split
from .common import cases_from_launches, dot_precision, interpreting, recording_launches


@triton.jit
def _sigmoid_pair(logit):
    """``(sigmoid(l), sigmoid(-l))``, each computed on its own from ``exp(-|l|)``: ``1 - sigmoid(l)``
    would round to 0 long before ``sigmoid(-l)`` does, and ``exp(|l|)`` would overflow."""
    small = tl.exp(-tl.abs(logit))
    near_one = 1.0 / (1.0 + small)
    near_zero = small / (1.0 + small)
    positive = logit >= 0
    return tl.where(positive, near_one, near_zero), tl.where(positive, near_zero, near_one)


@triton.jit
def _half_probs(logits_ptr, row_offsets, row_mask, stride_bit, codes, code_mask,
                BIT_START: tl.constexpr, NUM_BITS: tl.constexpr):
    """``[BLOCK_N, BLOCK_C]``: each row's product of per-bit probabilities for the patterns
    ``codes`` of bits ``BIT_START ..< BIT_START + NUM_BITS`` (first bit most significant); zero for
    masked rows and codes."""
    probs = tl.where(row_mask[:, None] & code_mask[None, :], 1.0, 0.0)
    for k in tl.static_range(NUM_BITS):
        bit_offset = (BIT_START + k) * tl.cast(stride_bit, tl.int64)
        logit = tl.load(logits_ptr + (row_offsets + bit_offset), mask=row_mask, other=0.0).to(tl.float32)
        p_one, p_zero = _sigmoid_pair(logit)
        bit = (codes >> (NUM_BITS - 1 - k)) & 1
        probs = probs * tl.where(bit[None, :] == 1, p_one[:, None], p_zero[:, None])
    return probs


@triton.jit
def _code_entropy_avg_kernel(
    logits_ptr,
    partial_ptr,
    N,
    rows_per_split,
    num_splits,
    stride_row,
    stride_group,
    stride_bit,
    NUM_HI: tl.constexpr,
    NUM_LO: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid_hi = tl.program_id(0).to(tl.int64)
    pid_lo = tl.program_id(1).to(tl.int64)
    pid_split = tl.program_id(2).to(tl.int64)
    group = pid_split // num_splits
    split = pid_split % num_splits
    num_hi_codes: tl.constexpr = 1 << NUM_HI
    num_lo_codes: tl.constexpr = 1 << NUM_LO
    hi_codes = pid_hi * BLOCK_H + tl.arange(0, BLOCK_H)
    lo_codes = pid_lo * BLOCK_L + tl.arange(0, BLOCK_L)
    hi_mask = hi_codes < num_hi_codes
    lo_mask = lo_codes < num_lo_codes
    first_row = split * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, N)
    acc = tl.zeros((BLOCK_H, BLOCK_L), tl.float32)
    for row_start in range(first_row, end_row, BLOCK_N):
        rows = row_start + tl.arange(0, BLOCK_N).to(tl.int64)
        row_mask = rows < end_row
        offsets = rows * stride_row + group * stride_group
        p_hi = _half_probs(logits_ptr, offsets, row_mask, stride_bit, hi_codes, hi_mask, 0, NUM_HI)
        p_lo = _half_probs(logits_ptr, offsets, row_mask, stride_bit, lo_codes, lo_mask, NUM_HI, NUM_LO)
        acc = tl.dot(tl.trans(p_hi), p_lo, acc, input_precision=DOT_PRECISION)
    out = partial_ptr + (pid_split * (num_hi_codes * num_lo_codes) + hi_codes[:, None].to(tl.int64) * num_lo_codes
                         + lo_codes[None, :])
    tl.store(out, acc, mask=hi_mask[:, None] & lo_mask[None, :])


@triton.jit
def _code_entropy_sample_kernel(
    logits_ptr,
    sample_ptr,
    N,
    stride_row,
    stride_group,
    stride_bit,
    num_groups,
    eps,
    NUM_HI: tl.constexpr,
    NUM_LO: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    offsets = rows * stride_row + group * stride_group
    entropy = tl.zeros((BLOCK_N,), tl.float32)
    for hi_start in range(0, 1 << NUM_HI, BLOCK_H):
        hi_codes = hi_start + tl.arange(0, BLOCK_H)
        p_hi = _half_probs(logits_ptr, offsets, row_mask, stride_bit, hi_codes, hi_codes < (1 << NUM_HI), 0, NUM_HI)
        for lo_start in range(0, 1 << NUM_LO, BLOCK_L):
            lo_codes = lo_start + tl.arange(0, BLOCK_L)
            p_lo = _half_probs(logits_ptr, offsets, row_mask, stride_bit, lo_codes, lo_codes < (1 << NUM_LO),
                               NUM_HI, NUM_LO)
            p = p_hi[:, :, None] * p_lo[:, None, :]
            # p = 0 (masked, or underflowed) gives 0 * log(eps) = 0, as in vector-quantize-pytorch.
            terms = -p * tl.log(tl.maximum(p, eps))
            entropy += tl.sum(tl.sum(terms, axis=2), axis=1)
    tl.store(sample_ptr + rows * num_groups + group, entropy, mask=row_mask)


@triton.jit
def _bit_table(codes, bit_ids, FIRST_BIT: tl.constexpr, NUM_BITS: tl.constexpr):
    """``[BLOCK_C, D_PAD]`` as float: 1 where bit ``FIRST_BIT + k`` of the pattern is set, 0 where it is
    clear, and which columns belong to this half (``is_half``)."""
    local = bit_ids - FIRST_BIT
    is_half = (local >= 0) & (local < NUM_BITS)
    shift = tl.where(is_half, NUM_BITS - 1 - local, 0)
    is_set = ((codes[:, None] >> shift[None, :]) & 1) == 1
    ones = tl.where(is_half[None, :] & is_set, 1.0, 0.0)
    zeros = tl.where(is_half[None, :] & (~is_set), 1.0, 0.0)
    return ones, zeros


@triton.jit
def _code_entropy_bwd_kernel(
    logits_ptr,
    grad_sample_ptr,
    grad_avg_ptr,
    grad_logits_ptr,
    N,
    stride_row,
    stride_group,
    stride_bit,
    num_groups,
    inv_rows,
    eps,
    log_eps,
    NUM_HI: tl.constexpr,
    NUM_LO: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    offsets = rows * stride_row + group * stride_group
    num_lo_codes: tl.constexpr = 1 << NUM_LO
    grad_row = tl.load(grad_sample_ptr + rows * num_groups + group, mask=row_mask, other=0.0).to(tl.float32)
    bit_ids = tl.arange(0, D_PAD)
    ones = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    zeros = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for hi_start in range(0, 1 << NUM_HI, BLOCK_H):
        hi_codes = hi_start + tl.arange(0, BLOCK_H)
        hi_mask = hi_codes < (1 << NUM_HI)
        p_hi = _half_probs(logits_ptr, offsets, row_mask, stride_bit, hi_codes, hi_mask, 0, NUM_HI)
        hi_ones, hi_zeros = _bit_table(hi_codes, bit_ids, 0, NUM_HI)
        for lo_start in range(0, num_lo_codes, BLOCK_L):
            lo_codes = lo_start + tl.arange(0, BLOCK_L)
            lo_mask = lo_codes < num_lo_codes
            p_lo = _half_probs(logits_ptr, offsets, row_mask, stride_bit, lo_codes, lo_mask, NUM_HI, NUM_LO)
            lo_ones, lo_zeros = _bit_table(lo_codes, bit_ids, NUM_HI, NUM_LO)
            mean_grad = tl.load(
                grad_avg_ptr + (group * ((1 << NUM_HI) * num_lo_codes) + hi_codes[:, None].to(tl.int64) * num_lo_codes
                                + lo_codes[None, :]),
                mask=hi_mask[:, None] & lo_mask[None, :],
                other=0.0,
            ).to(tl.float32) * inv_rows
            p = p_hi[:, :, None] * p_lo[:, None, :]
            # d/dp of -p log max(p, eps); where p < eps the log side is never selected.
            slope = tl.where(p >= eps, -(tl.log(tl.maximum(p, eps)) + 1.0), -log_eps)
            weighted = (mean_grad[None, :, :] + grad_row[:, None, None] * slope) * p
            by_hi = tl.sum(weighted, axis=2)
            by_lo = tl.sum(weighted, axis=1)
            ones += tl.sum(by_hi[:, :, None] * hi_ones[None, :, :], axis=1)
            ones += tl.sum(by_lo[:, :, None] * lo_ones[None, :, :], axis=1)
            zeros += tl.sum(by_hi[:, :, None] * hi_zeros[None, :, :], axis=1)
            zeros += tl.sum(by_lo[:, :, None] * lo_zeros[None, :, :], axis=1)
    bit_mask = bit_ids < NUM_HI + NUM_LO
    mask = row_mask[:, None] & bit_mask[None, :]
    bit_offsets = bit_ids[None, :].to(tl.int64) * stride_bit
    logits = tl.load(logits_ptr + (offsets[:, None] + bit_offsets), mask=mask, other=0.0).to(tl.float32)
    p_one, p_zero = _sigmoid_pair(logits)
    grad = p_zero * ones - p_one * zeros
    out = grad_logits_ptr + (rows[:, None] * (num_groups * (NUM_HI + NUM_LO)) + group * (NUM_HI + NUM_LO)
                             + bit_ids[None, :].to(tl.int64))
    tl.store(out, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


# Tiles: the avg kernel's tl.dot needs every side >= 16; the elementwise kernels hold
# BLOCK_N x BLOCK_H x BLOCK_L products (4 096). The mean takes 16 rows a step against 64 x 32 code
# tiles on four warps, the others 8 rows a program on eight warps: of the tiles tried these are the
# ones that spill no register on sm_80 or sm_90 (tests/backends/test_aot_compile.py; 64 x 64 code tiles and
# 32-row programs spilled a few bytes). Their registers grow with the bits of a half (NUM_HI): past 7
# (d > 14) 8-row programs spilled 136 to 450 B (d = 16 and 18, Open-MAGVIT2's), so longer codes take
# fewer rows a program (_TILE_ROWS_BY_HALF_BITS).
_AVG_BLOCKS = {"BLOCK_N": 16, "BLOCK_H": 64, "BLOCK_L": 32, "num_warps": 4}
# Past 7 bits in the high half (d > 14) the 64-pattern tile kept an 8 B stack frame on sm_80 with 16-bit logits
# (d = 20 and 22, at 96 registers); 32 patterns keep none.
_AVG_BLOCKS_LONG_CODES = dict(_AVG_BLOCKS, BLOCK_H=32)
_AVG_LONG_CODES_HALF_BITS = 7
_TILE_BLOCKS = {"BLOCK_H": 16, "BLOCK_L": 32, "num_warps": 8}  # and BLOCK_N by the code length:
_INTERPRETER_AVG_BLOCKS = {"BLOCK_N": 16, "BLOCK_H": 16, "BLOCK_L": 16}
_INTERPRETER_TILE_BLOCKS = {"BLOCK_N": 16, "BLOCK_H": 16, "BLOCK_L": 16}
# (most bits in the high half, rows a program of the elementwise kernels); 4 rows spill nothing up to d = 24 but
# sit at 255 registers there, so past d = 20 they take 2 (d = 22 and 24 checked; 30, the longest, not compiled:
# its compile case would allocate 2**30 floats).
_TILE_ROWS_BY_HALF_BITS = ((7, 8), (10, 4))
_TILE_ROWS_LONGEST_CODES = 2
# Programs the mean's grid should reach (several per SM of an A100/H100-class GPU).
_TARGET_PROGRAMS = 512


def _tile_blocks(num_hi: int, num_lo: int) -> dict:
    if interpreting():
        blocks = dict(_INTERPRETER_TILE_BLOCKS)
    else:
        rows = next((rows for most_bits, rows in _TILE_ROWS_BY_HALF_BITS if num_hi <= most_bits),
                    _TILE_ROWS_LONGEST_CODES)
        blocks = dict(_TILE_BLOCKS, BLOCK_N=rows)
    # A half with fewer patterns than the tile is covered by one tile of its own (power-of-two) size.
    blocks["BLOCK_H"] = min(blocks["BLOCK_H"], 1 << num_hi)
    blocks["BLOCK_L"] = min(blocks["BLOCK_L"], 1 << num_lo)
    return blocks


def _device_guard(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def code_entropy(bit_logits: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the mean and the per-row entropy kernels; inputs are checked by the caller."""
    num_rows, groups, num_bits = bit_logits.shape
    num_hi, num_lo = code_entropy_split(num_bits)
    device = bit_logits.device
    sample = torch.empty((num_rows, groups), dtype=torch.float32, device=device)
    if num_rows == 0:
        return sample, torch.full((groups, 2**num_bits), float("nan"), dtype=torch.float32, device=device)
    strides = bit_logits.stride()
    if interpreting():
        avg_blocks = _INTERPRETER_AVG_BLOCKS
    else:
        avg_blocks = _AVG_BLOCKS_LONG_CODES if num_hi > _AVG_LONG_CODES_HALF_BITS else _AVG_BLOCKS
    tile_blocks = _tile_blocks(num_hi, num_lo)
    code_tiles = triton.cdiv(2**num_hi, avg_blocks["BLOCK_H"]) * triton.cdiv(2**num_lo, avg_blocks["BLOCK_L"])
    # With few code tiles (2^16 codes make 16) the rows are split too, so that the GPU has enough
    # programs; the partial sums are added in a fixed order afterwards (deterministic, no atomics).
    row_blocks = triton.cdiv(num_rows, avg_blocks["BLOCK_N"])
    num_splits = 1 if interpreting() else max(1, min(row_blocks, triton.cdiv(_TARGET_PROGRAMS, code_tiles * groups)))
    rows_per_split = triton.cdiv(row_blocks, num_splits) * avg_blocks["BLOCK_N"]
    num_splits = triton.cdiv(num_rows, rows_per_split)
    partial = torch.empty((groups * num_splits, 2**num_bits), dtype=torch.float32, device=device)
    with _device_guard(bit_logits):
        grid = (triton.cdiv(2**num_hi, avg_blocks["BLOCK_H"]), triton.cdiv(2**num_lo, avg_blocks["BLOCK_L"]),
                groups * num_splits)
        _code_entropy_avg_kernel[grid](
            bit_logits, partial, num_rows, rows_per_split, num_splits, *strides,
            NUM_HI=num_hi, NUM_LO=num_lo, DOT_PRECISION=dot_precision(torch.float32), **avg_blocks,
        )
        grid = (triton.cdiv(num_rows, tile_blocks["BLOCK_N"]), groups)
        _code_entropy_sample_kernel[grid](
            bit_logits, sample, num_rows, *strides, groups, eps, NUM_HI=num_hi, NUM_LO=num_lo, **tile_blocks,
        )
    avg = partial.reshape(groups, num_splits, 2**num_bits).sum(dim=1) / num_rows
    return sample, avg


def code_entropy_backward(
    grad_sample: torch.Tensor, grad_avg: torch.Tensor, bit_logits: torch.Tensor, eps: float
) -> torch.Tensor:
    """Launches the backward kernel: the gradient ``[N, G, d]`` in ``bit_logits``' dtype."""
    num_rows, groups, num_bits = bit_logits.shape
    num_hi, num_lo = code_entropy_split(num_bits)
    grad = torch.empty((num_rows, groups, num_bits), dtype=bit_logits.dtype, device=bit_logits.device)
    if num_rows == 0:
        return grad
    blocks = _tile_blocks(num_hi, num_lo)
    with _device_guard(bit_logits):
        grid = (triton.cdiv(num_rows, blocks["BLOCK_N"]), groups)
        _code_entropy_bwd_kernel[grid](
            bit_logits, grad_sample.contiguous(), grad_avg.contiguous(), grad, num_rows, *bit_logits.stride(),
            groups, 1.0 / num_rows, eps, math.log(eps), NUM_HI=num_hi, NUM_LO=num_lo,
            D_PAD=max(2, triton.next_power_of_2(num_bits)), **blocks,
        )
    return grad


def compile_cases() -> list:
    """The launches of ``code_entropy`` and its backward, for ``tests/backends/test_aot_compile.py`` (see
    ``common.CompileCase``), recorded from the launchers themselves: fp32 logits in one group of 10
    bits (a 1024-code LFQ), bf16 logits in two groups of 13 (halves of 7 and 6 bits), 3 bits
    (tiles narrower than the defaults), and at odd N 18 bits from a channels-first map and 22 sliced bits
    (fewer rows a program)."""
    import sys

    cases = []

    def add(name, logits):
        num_rows, groups, bits = logits.shape
        with recording_launches(sys.modules[__name__]) as launches:
            code_entropy(logits, 1e-5)
            code_entropy_backward(torch.zeros(num_rows, groups), torch.zeros(groups, 2**bits), logits, 1e-5)
        cases.extend(cases_from_launches(name, launches))

    for dtype, short, groups, bits in ((torch.float32, "fp32", 1, 10), (torch.bfloat16, "bf16", 2, 13),
                                       (torch.float32, "fp32", 1, 3)):
        add(f"{short} {groups}x{bits} bits", torch.zeros(256, groups, bits, dtype=dtype))
    # Layouts no case above has, with odd N, and the longer codes that take fewer rows a program: Open-MAGVIT2's
    # 18 bits read from a channels-first 13 x 13 map (bit stride 169, row stride 1), and 22 bits sliced one
    # element in (row stride 23, base address no multiple of 16).
    add("fp32 1x18 bits N=169 channels-first map",
        torch.zeros(1, 18, 13, 13).permute(0, 2, 3, 1).reshape(169, 1, 18))
    add("bf16 1x22 bits N=1001 offset", torch.zeros(1001, 23, dtype=torch.bfloat16)[:, 1:].reshape(1001, 1, 22))
    return cases
