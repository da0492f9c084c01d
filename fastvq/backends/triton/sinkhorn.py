"""Sinkhorn passes: every (row, code) cost recomputed tile by tile with ``tl.dot``, never stored.

Three kernels share ``_cost_tile`` (a ``BLOCK_M x BLOCK_K`` tile of costs: ``tl.dot`` over ``D`` in
``BLOCK_D`` slices with fp32 accumulation, then the metric's transform with per-row and per-code terms
prepared once per call):

- ``_sinkhorn_row_pass_kernel``: a program owns ``BLOCK_M`` rows and walks the codes, carrying each
  row's running maximum and sum of ``exp(score - max)`` of ``score = (shift - C) * scale + g`` (an
  online log-sum-exp) and, on the last pass, the running argmax (a tile's maximum replaces the best only
  when strictly larger, and within a tile the lowest index wins: ties go to the lowest index).
- ``_sinkhorn_column_pass_kernel``: a program owns ``BLOCK_K`` codes and one contiguous split of the
  rows, and carries each code's running ``(max, sum of exp)`` of ``(shift - C) * scale + f`` over the
  split; it writes that pair to ``[splits, K]`` partials, which the launcher combines (a max, then the
  rescaled sum). No atomics: the result is deterministic.
- ``_sinkhorn_cost_stats_kernel``: per row, the count, minimum, maximum, mean and sum of squared
  deviations of the non-NaN costs (Chan's formula across code tiles), combined over rows in float64.

NaN scores and padding carry no mass (``-inf``). Offsets are int64.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ..sinkhorn_stats import combine_stats
from .common import (
    METRIC_COSINE,
    METRIC_DOT,
    METRIC_EUCLIDEAN,
    METRIC_IDS,
    CompileCase,
    codes_by_column,
    dot_precision,
    interpreter_config,
    interpreting,
    offset_rows,
)


@triton.jit
def _cost_tile(z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, rows, row_mask, codes, code_mask, D,
               stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The costs ``[BLOCK_M, BLOCK_K]`` of rows ``rows`` against codes ``codes`` (both int64). The row and
    code terms are squared norms (l2, euclidean) or inverse norms (cosine)."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
    for dim_start in range(0, D, BLOCK_D):
        dim_idx = dim_start + dims
        dim_mask = dim_idx < D
        z_tile = tl.load(z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col,
                         mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        code_tile = tl.load(codebook_ptr + codes[None, :] * stride_cb_row + dim_idx[:, None] * stride_cb_col,
                            mask=code_mask[None, :] & dim_mask[:, None], other=0.0)
        if DOT_IN_FP32:
            # Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot: widen them first.
            z_tile = z_tile.to(tl.float32)
            code_tile = code_tile.to(tl.float32)
        acc = tl.dot(z_tile, code_tile, acc, input_precision=DOT_PRECISION)
    if METRIC == METRIC_DOT:
        cost = -acc
    else:
        row_term = tl.load(row_term_ptr + rows, mask=row_mask, other=0.0)
        code_term = tl.load(code_term_ptr + codes, mask=code_mask, other=0.0)
        if METRIC == METRIC_COSINE:
            # Rounding can put a parallel pair's 1 - cos a few ulps below 0; a NaN stays NaN.
            cost = tl.maximum(1.0 - acc * row_term[:, None] * code_term[None, :], 0.0,
                              propagate_nan=tl.PropagateNan.ALL)
        else:
            cost = tl.maximum(row_term[:, None] + code_term[None, :] - 2.0 * acc, 0.0,
                              propagate_nan=tl.PropagateNan.ALL)
            if METRIC == METRIC_EUCLIDEAN:
                cost = tl.sqrt(cost)
    return cost


@triton.jit
def _sinkhorn_row_pass_kernel(
    z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, potential_ptr, affine_ptr, lse_ptr, indices_ptr,
    N, K, D, stride_z_row, stride_z_col, stride_cb_row, stride_cb_col,
    METRIC: tl.constexpr, ARGMAX: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    shift = tl.load(affine_ptr)
    scale = tl.load(affine_ptr + 1)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    best_index = tl.zeros((BLOCK_M,), tl.int64)
    for code_start in range(0, K, BLOCK_K):
        codes = code_start + tl.arange(0, BLOCK_K).to(tl.int64)
        code_mask = codes < K
        cost = _cost_tile(z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, rows, row_mask, codes, code_mask, D,
                          stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC, DOT_PRECISION,
                          DOT_IN_FP32, BLOCK_M, BLOCK_K, BLOCK_D)
        potential = tl.load(potential_ptr + codes, mask=code_mask, other=float("-inf"))
        scores = (shift - cost) * scale + potential[None, :]
        scores = tl.where((scores != scores) | ~code_mask[None, :], float("-inf"), scores)
        tile_max = tl.max(scores, axis=1)
        new_max = tl.maximum(running_max, tile_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(scores - safe_max[:, None]), axis=1)
        running_max = new_max
        if ARGMAX:
            tile_index = tl.min(tl.where(scores == tile_max[:, None], codes[None, :], K), axis=1)
            better = tile_max > best
            best_index = tl.where(better, tile_index, best_index)
            best = tl.where(better, tile_max, best)
    lse = tl.where(running_sum > 0, running_max + tl.log(tl.where(running_sum > 0, running_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if ARGMAX:
        tl.store(indices_ptr + rows, best_index, mask=row_mask)


@triton.jit
def _sinkhorn_column_pass_kernel(
    z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, potential_ptr, affine_ptr, partial_max_ptr, partial_sum_ptr,
    N, K, D, rows_per_split, stride_z_row, stride_z_col, stride_cb_row, stride_cb_col,
    METRIC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    codes = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    code_mask = codes < K
    split = tl.program_id(1).to(tl.int64)
    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)
    shift = tl.load(affine_ptr)
    scale = tl.load(affine_ptr + 1)
    running_max = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_K,), tl.float32)
    for row_start in range(row_begin, row_end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < row_end
        cost = _cost_tile(z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, rows, row_mask, codes, code_mask, D,
                          stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC, DOT_PRECISION,
                          DOT_IN_FP32, BLOCK_M, BLOCK_K, BLOCK_D)
        potential = tl.load(potential_ptr + rows, mask=row_mask, other=float("-inf"))
        scores = (shift - cost) * scale + potential[:, None]
        scores = tl.where((scores != scores) | ~row_mask[:, None], float("-inf"), scores)
        tile_max = tl.max(scores, axis=0)
        new_max = tl.maximum(running_max, tile_max)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(scores - safe_max[None, :]), axis=0)
        running_max = new_max
    tl.store(partial_max_ptr + split * K + codes, running_max, mask=code_mask)
    tl.store(partial_sum_ptr + split * K + codes, running_sum, mask=code_mask)


@triton.jit
def _sinkhorn_cost_stats_kernel(
    z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, stats_ptr,
    N, K, D, stride_z_row, stride_z_col, stride_cb_row, stride_cb_col,
    METRIC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < N
    count = tl.zeros((BLOCK_M,), tl.float32)
    mean = tl.zeros((BLOCK_M,), tl.float32)
    squares = tl.zeros((BLOCK_M,), tl.float32)
    low = tl.full((BLOCK_M,), float("inf"), tl.float32)
    high = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for code_start in range(0, K, BLOCK_K):
        codes = code_start + tl.arange(0, BLOCK_K).to(tl.int64)
        code_mask = codes < K
        cost = _cost_tile(z_ptr, codebook_ptr, row_term_ptr, code_term_ptr, rows, row_mask, codes, code_mask, D,
                          stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC, DOT_PRECISION,
                          DOT_IN_FP32, BLOCK_M, BLOCK_K, BLOCK_D)
        valid = (cost == cost) & code_mask[None, :]
        tile_count = tl.sum(valid.to(tl.float32), axis=1)
        tile_mean = tl.sum(tl.where(valid, cost, 0.0), axis=1) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(valid, cost - tile_mean[:, None], 0.0)
        tile_squares = tl.sum(deviation * deviation, axis=1)
        total = count + tile_count
        delta = tile_mean - mean
        mean += delta * tile_count / tl.maximum(total, 1.0)
        squares += tile_squares + delta * delta * count * tile_count / tl.maximum(total, 1.0)
        count = total
        low = tl.minimum(low, tl.min(tl.where(valid, cost, float("inf")), axis=1))
        high = tl.maximum(high, tl.max(tl.where(valid, cost, float("-inf")), axis=1))
    row_stats = stats_ptr + rows * 5
    tl.store(row_stats, count, mask=row_mask)
    tl.store(row_stats + 1, low, mask=row_mask)
    tl.store(row_stats + 2, high, mask=row_mask)
    tl.store(row_stats + 3, mean, mask=row_mask)
    tl.store(row_stats + 4, squares, mask=row_mask)


def _config(dtype: torch.dtype) -> triton.Config:
    """The tiles of every pass for operands of ``dtype``. fp32 tiles run three tf32 MMAs on split operands
    (``tf32x3``): with 4 warps, or 32-wide slices of ``D``, they spill registers on sm_80
    (tests/backends/test_aot_compile.py); 8 warps and 16-wide slices keep them under 180."""
    if interpreting():
        return interpreter_config("BLOCK_M", "BLOCK_K", "BLOCK_D")
    block_d = 16 if dtype == torch.float32 else 32
    return triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_D": block_d}, num_warps=8, num_stages=2)


def _prepared(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> tuple:
    """``(z, codebook, row_term, code_term)``: both operands in their promoted dtype (no copy when they
    share it), and the fp32 per-row and per-code terms of the metric."""
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    z, codebook = z.to(dtype), codebook.to(dtype)
    row_term = torch.linalg.vector_norm(z, dim=1, dtype=torch.float32)
    code_term = torch.linalg.vector_norm(codebook, dim=1, dtype=torch.float32)
    if metric == "cosine":
        row_term, code_term = 1.0 / row_term.clamp_min(1e-12), 1.0 / code_term.clamp_min(1e-12)
    else:
        row_term, code_term = row_term.square(), code_term.square()
    return z, codebook, row_term, code_term


def _meta(dtype: torch.dtype, metric: str) -> dict:
    return dict(METRIC=METRIC_IDS[metric], DOT_PRECISION=dot_precision(dtype),
                DOT_IN_FP32=interpreting() and dtype == torch.bfloat16)


def _strides(z, codebook):
    return (z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1))


def _device(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _row_pass_launch(z, codebook, column_potential, metric, affine, argmax):
    z, codebook, row_term, code_term = _prepared(z, codebook, metric)
    num_rows, dim = z.shape
    lse = torch.empty(num_rows, dtype=torch.float32, device=z.device)
    indices = torch.empty(num_rows if argmax else 0, dtype=torch.int64, device=z.device)
    args = (z, codebook, row_term, code_term, column_potential, affine, lse, indices if argmax else lse,
            num_rows, codebook.shape[0], dim, *_strides(z, codebook))
    return args, dict(**_meta(z.dtype, metric), ARGMAX=argmax), lse, indices


def sinkhorn_row_pass(z, codebook, column_potential, metric, affine, argmax):
    args, meta, lse, indices = _row_pass_launch(z, codebook, column_potential, metric, affine, argmax)
    if z.shape[0]:
        config = _config(args[0].dtype)
        with _device(z):
            _sinkhorn_row_pass_kernel[(triton.cdiv(z.shape[0], config.kwargs["BLOCK_M"]),)](
                *args, **meta, **config.all_kwargs())
    return lse, indices


def _splits(num_rows: int, num_codes: int, config: triton.Config, z: torch.Tensor) -> tuple[int, int]:
    """``(splits, rows_per_split)`` of the column pass: enough programs to fill the device (a few per SM),
    each split a whole number of row tiles; fixed by the shape, so the result is too."""
    block_m, block_k = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    row_tiles = max(1, triton.cdiv(num_rows, block_m))
    programs = 4 * (torch.cuda.get_device_properties(z.device).multi_processor_count if z.is_cuda else 2)
    splits = max(1, min(row_tiles, triton.cdiv(programs, triton.cdiv(num_codes, block_k))))
    rows_per_split = triton.cdiv(row_tiles, splits) * block_m
    return triton.cdiv(max(num_rows, 1), rows_per_split), rows_per_split


def _column_pass_launch(z, codebook, row_potential, metric, affine, config, splits, rows_per_split):
    z, codebook, row_term, code_term = _prepared(z, codebook, metric)
    num_rows, dim = z.shape
    num_codes = codebook.shape[0]
    partial_max = torch.empty((splits, num_codes), dtype=torch.float32, device=z.device)
    partial_sum = torch.empty((splits, num_codes), dtype=torch.float32, device=z.device)
    args = (z, codebook, row_term, code_term, row_potential, affine, partial_max, partial_sum, num_rows, num_codes,
            dim, rows_per_split, *_strides(z, codebook))
    return args, _meta(z.dtype, metric), partial_max, partial_sum


def sinkhorn_column_pass(z, codebook, row_potential, metric, affine):
    config = _config(torch.promote_types(z.dtype, codebook.dtype))
    splits, rows_per_split = _splits(z.shape[0], codebook.shape[0], config, z)
    args, meta, partial_max, partial_sum = _column_pass_launch(z, codebook, row_potential, metric, affine, config,
                                                               splits, rows_per_split)
    with _device(z):
        _sinkhorn_column_pass_kernel[(triton.cdiv(codebook.shape[0], config.kwargs["BLOCK_K"]), splits)](
            *args, **meta, **config.all_kwargs())
    high = partial_max.amax(dim=0)
    safe = torch.where(high == -math.inf, 0.0, high)
    return high, (partial_sum * torch.exp(partial_max - safe)).sum(dim=0)


def _cost_stats_launch(z, codebook, metric):
    z, codebook, row_term, code_term = _prepared(z, codebook, metric)
    num_rows, dim = z.shape
    stats = torch.empty((num_rows, 5), dtype=torch.float32, device=z.device)
    args = (z, codebook, row_term, code_term, stats, num_rows, codebook.shape[0], dim, *_strides(z, codebook))
    return args, _meta(z.dtype, metric), stats


def sinkhorn_cost_stats(z, codebook, metric):
    args, meta, stats = _cost_stats_launch(z, codebook, metric)
    if z.shape[0]:
        config = _config(args[0].dtype)
        with _device(z):
            _sinkhorn_cost_stats_kernel[(triton.cdiv(z.shape[0], config.kwargs["BLOCK_M"]),)](
                *args, **meta, **config.all_kwargs())
    empty = torch.tensor([[0.0, math.inf, -math.inf, 0.0, 0.0]], dtype=torch.float64, device=z.device)
    return combine_stats(torch.cat([empty, stats.to(torch.float64)]))


def compile_cases() -> list[CompileCase]:
    """The launches of the three passes, for ``tests/backends/test_aot_compile.py``: every metric in fp32
    (the row pass with and without its argmax), bf16 and fp16 operands, a column-major ``z``, and odd N, K and
    D (18, 100) with a sliced ``z`` and a codebook by column."""
    cases = []

    def add(name, dtype=torch.float32, metric="l2", dim=64, transposed=False, kernels=("row", "argmax", "column",
                                                                                       "stats"), odd=False):
        config = _config(dtype)
        z = torch.zeros((dim, 300), dtype=dtype).t() if transposed else torch.zeros((300, dim), dtype=dtype)
        codebook = torch.zeros((500, dim), dtype=dtype)
        if odd:  # odd N and K, a z slice (row stride and address no multiple of 16), a codebook by column
            z, codebook = offset_rows(301, dim, dtype), codes_by_column(499, dim, dtype)
        affine = torch.zeros(2)
        if "row" in kernels or "argmax" in kernels:
            for argmax in (False, True):
                if ("argmax" if argmax else "row") in kernels:
                    args, meta, _, _ = _row_pass_launch(z, codebook, torch.zeros(codebook.shape[0]), metric, affine,
                                                        argmax)
                    cases.append(CompileCase(f"row pass {name} argmax={argmax}", _sinkhorn_row_pass_kernel, args,
                                             meta, (config,)))
        if "column" in kernels:
            args, meta, _, _ = _column_pass_launch(z, codebook, torch.zeros(z.shape[0]), metric, affine, config, 2,
                                                   192)
            cases.append(CompileCase(f"column pass {name}", _sinkhorn_column_pass_kernel, args, meta, (config,)))
        if "stats" in kernels:
            args, meta, _ = _cost_stats_launch(z, codebook, metric)
            cases.append(CompileCase(f"cost stats {name}", _sinkhorn_cost_stats_kernel, args, meta, (config,)))

    for metric in ("l2", "euclidean", "cosine", "dot"):
        add(f"{metric} fp32 D=64", metric=metric)
    add("l2 bf16 D=256", torch.bfloat16, dim=256)
    add("euclidean fp16 D=64", torch.float16, "euclidean", kernels=("argmax", "column"))
    add("l2 fp32 D=64 column-major z", transposed=True, kernels=("argmax", "column"))
    add("l2 fp32 D=18 N=301 K=499 offset z, codebook by column", dim=18, odd=True)
    add("euclidean bf16 D=100 N=301 K=499 offset z, codebook by column", torch.bfloat16, "euclidean", dim=100,
        odd=True)
    return cases
