"""Greedy residual quantization in one kernel launch: every level of a row tile in one program.

A program owns ``BLOCK_N`` rows. It copies them (in fp32) into its rows of a residual buffer and then, for
each level, walks that level's codebook in tiles of ``BLOCK_K`` codes, scoring the centred residual with
``tl.dot`` over ``BLOCK_D`` slices of ``D`` (fp32 accumulation, tf32x3 unless the caller allows tf32, as the
search does) and folding a running (min, argmin) per row; then it subtracts each row's chosen code from its
residual, adds it to the row's running sum and the squared remainder to the level's commitment, and (for the
EMA) adds the residual the level saw to the chosen code's count and sum. Only this program ever touches its
rows of the residual buffer, so between levels they stay in the SM's L1 and the GPU's L2: no other launch,
no round trip of the residual through a second kernel, no ``N x K`` scores. The residual is not held in
registers across levels because the tf32x3 products of a whole ``D``-wide tile spill on sm_80 (the search
found only 32-wide slices stay in registers).

The commitment is written per program and level and summed afterwards (deterministic). The statistics use
fp32 atomics; under ``torch.use_deterministic_algorithms(True)`` the kernel skips them and
``residual_levels.level_statistics`` sums them in a fixed order from the chosen indices. Offsets are int64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..residual_levels import level_statistics, prepare_levels
from .common import CompileCase, dot_precision, interpreter_config, interpreting, offset_rows


@triton.jit
def _residual_quantize_fwd_kernel(
    z_ptr,
    codebooks_ptr,
    search_codes_ptr,
    code_bias_ptr,
    center_ptr,
    row_levels_ptr,
    residual_ptr,
    total_ptr,
    indices_ptr,
    partial_commitment_ptr,
    counts_ptr,
    sums_ptr,
    N,
    K,
    D,
    L,
    n_q,
    stride_z_row,
    stride_z_col,
    stride_cb_level,
    stride_cb_code,
    stride_cb_col,
    PER_ROW: tl.constexpr,
    STATS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    slice_dims = tl.arange(0, BLOCK_D).to(tl.int64)
    for d_start in range(0, D, BLOCK_D):
        dims = d_start + slice_dims
        mask = row_mask[:, None] & (dims < D)[None, :]
        values = tl.load(z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col, mask=mask, other=0.0)
        tl.store(residual_ptr + rows[:, None] * D + dims[None, :], values.to(tl.float32), mask=mask)
        tl.store(total_ptr + rows[:, None] * D + dims[None, :], tl.zeros((BLOCK_N, BLOCK_D), tl.float32), mask=mask)
    levels = tl.zeros((BLOCK_N,), tl.int64) + n_q
    if PER_ROW:
        own = tl.load(row_levels_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        levels = tl.minimum(tl.maximum(own, 0), levels)
    code_offsets = tl.arange(0, BLOCK_K).to(tl.int64)
    for level in range(0, n_q):
        level64 = pid * 0 + level  # int64 in the compiler and the interpreter alike
        active = row_mask & (level64 < levels)
        best = tl.full((BLOCK_N,), float("inf"), tl.float32)
        # A row that no code beats (every score NaN) keeps code 0.
        best_index = tl.zeros((BLOCK_N,), tl.int64)
        for code_start in range(0, K, BLOCK_K):
            codes = code_start + code_offsets
            code_mask = codes < K
            products = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d_start in range(0, D, BLOCK_D):
                dims = d_start + slice_dims
                dim_mask = dims < D
                residual = tl.load(residual_ptr + rows[:, None] * D + dims[None, :],
                                   mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
                center = tl.load(center_ptr + level64 * D + dims, mask=dim_mask, other=0.0)
                centred = tl.where(dim_mask[None, :], residual - center[None, :], 0.0)
                search_codes = tl.load(search_codes_ptr + (level64 * K + codes[None, :]) * D + dims[:, None],
                                       mask=code_mask[None, :] & dim_mask[:, None], other=0.0)
                products = tl.dot(centred, search_codes, products, input_precision=DOT_PRECISION)
            bias = tl.load(code_bias_ptr + level64 * K + codes, mask=code_mask, other=float("inf"))
            scores = bias[None, :] - 2.0 * products
            scores = tl.where(scores != scores, float("inf"), scores)  # a NaN score never wins
            tile_best, tile_index = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
            # Strict '<' keeps the earlier tile on ties, so the lowest index wins whatever the tiling.
            better = tile_best < best
            best = tl.where(better, tile_best, best)
            best_index = tl.where(better, tile_index.to(tl.int64) + code_start, best_index)
        if STATS:
            tl.atomic_add(counts_ptr + level64 * K + best_index, tl.full((BLOCK_N,), 1.0, tl.float32), mask=active,
                          sem="relaxed")
        squares = tl.zeros((BLOCK_N,), tl.float32)
        for d_start in range(0, D, BLOCK_D):
            dims = d_start + slice_dims
            mask = active[:, None] & (dims < D)[None, :]
            offsets = rows[:, None] * D + dims[None, :]
            residual = tl.load(residual_ptr + offsets, mask=mask, other=0.0)
            code = tl.load(codebooks_ptr + level64 * stride_cb_level + best_index[:, None] * stride_cb_code
                           + dims[None, :] * stride_cb_col, mask=mask, other=0.0).to(tl.float32)
            if STATS:
                tl.atomic_add(sums_ptr + (level64 * K + best_index[:, None]) * D + dims[None, :], residual, mask=mask,
                              sem="relaxed")
            residual = residual - code
            squares += tl.sum(tl.where(mask, residual * residual, 0.0), axis=1)
            tl.store(residual_ptr + offsets, residual, mask=mask)
            total = tl.load(total_ptr + offsets, mask=mask, other=0.0)
            tl.store(total_ptr + offsets, total + code, mask=mask)
        tl.store(partial_commitment_ptr + pid * L + level64, tl.sum(tl.where(active, squares, 0.0)))
        tl.store(indices_ptr + rows * L + level64, tl.where(active, best_index, -1), mask=row_mask)


# The search's second fp32 tile: 32-wide D slices keep tf32x3's split operands in registers. Of the tiles tried
# (64 x 64 on 8 warps with 2 or 3 stages, 64 x 64 x 16, 32 x 64 and 32 x 32 on 4 warps) it is the one that kept
# every case with D a multiple of 32 free of stack frames on sm_80 and sm_90; any other D (DAC's 8, 70) kept a
# stack frame in it, unmasked only by 16-wide slices (tests/backends/test_aot_compile.py checks both).
_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 32}, num_warps=4, num_stages=3)
_NARROW_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_D": 16}, num_warps=4, num_stages=3)


def _config(dim: int) -> triton.Config:
    if interpreting():
        return interpreter_config("BLOCK_N", "BLOCK_K", "BLOCK_D")
    return _CONFIG if dim % 32 == 0 else _NARROW_CONFIG


def _launch_arguments(z, codebooks, n_q, row_levels, return_stats, deterministic, block_rows):
    num_rows, dim = z.shape
    num_levels, num_codes, _ = codebooks.shape
    device = z.device
    levels = prepare_levels(codebooks)
    programs = triton.cdiv(num_rows, block_rows)
    stats_in_kernel = return_stats and not deterministic
    stat_levels = num_levels if return_stats else 0
    outputs = dict(
        residual=torch.empty((num_rows, dim), dtype=torch.float32, device=device),
        total=torch.empty((num_rows, dim), dtype=torch.float32, device=device),
        indices=torch.full((num_rows, num_levels), -1, dtype=torch.int64, device=device),
        partial_commitment=torch.zeros((programs, num_levels), dtype=torch.float32, device=device),
        counts=torch.zeros((stat_levels, num_codes), dtype=torch.float32, device=device),
        sums=torch.zeros((stat_levels, num_codes, dim), dtype=torch.float32, device=device),
    )
    args = (
        z, codebooks, levels.codes, levels.bias, levels.center,
        row_levels.contiguous() if row_levels is not None else outputs["indices"],
        outputs["residual"], outputs["total"], outputs["indices"], outputs["partial_commitment"],
        outputs["counts"], outputs["sums"],
        num_rows, num_codes, dim, num_levels, n_q,
        z.stride(0), z.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
    )
    meta = dict(PER_ROW=row_levels is not None, STATS=stats_in_kernel, DOT_PRECISION=dot_precision(torch.float32))
    return outputs, (programs,), args, meta


def residual_quantize(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    n_q: int,
    row_levels: torch.Tensor | None,
    return_stats: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for every level (plus the codebooks' preparation, O(L K D)); fp64 is not handled here."""
    num_rows, dim = z.shape
    out_dtype = torch.promote_types(z.dtype, codebooks.dtype)
    config = _config(dim)
    outputs, grid, args, meta = _launch_arguments(z, codebooks, n_q, row_levels, return_stats, deterministic,
                                                  config.kwargs["BLOCK_N"])
    if num_rows > 0:
        with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
            _residual_quantize_fwd_kernel[grid](*args, **meta, **config.all_kwargs())
    counts, sums = outputs["counts"], outputs["sums"]
    if return_stats and deterministic:
        counts, sums = level_statistics(z, codebooks, outputs["indices"])
    commitment = outputs["partial_commitment"].sum(dim=0)
    return outputs["indices"], outputs["total"].to(out_dtype), commitment, counts, sums


def compile_cases() -> list[CompileCase]:
    """The launches ``residual_quantize`` makes, for ``tests/backends/test_aot_compile.py``: training (with the
    statistics) and inference, all rows at n_q or per-row levels, fp32 and bf16 inputs, EnCodec's D = 128,
    Mimi's 256, DAC's 8 and a D that is no multiple of 16, a column-major ``z``, the caller's tf32 opt-in, and
    odd N, K and D (18, 100) with a sliced ``z`` and codebooks by column."""
    cases = []

    def add(name, dtype=torch.float32, dim=128, stats=True, per_row=False, column_major=False, tf32=False,
            odd=False):
        z = torch.zeros((dim, 256) if column_major else (256, dim), dtype=dtype)
        z = z.t() if column_major else z
        codebooks = torch.zeros(4, 1024, dim, dtype=dtype)
        if odd:  # odd N and K, a z slice (row stride and address no multiple of 16), codebooks by column
            z, codebooks = offset_rows(1001, dim, dtype), torch.zeros(4, dim, 1000, dtype=dtype).transpose(1, 2)
        row_levels = torch.zeros(z.shape[0], dtype=torch.int64) if per_row else None
        config = _CONFIG if dim % 32 == 0 else _NARROW_CONFIG
        _, _, args, meta = _launch_arguments(z, codebooks, 4, row_levels, stats, False, config.kwargs["BLOCK_N"])
        if tf32:
            meta["DOT_PRECISION"] = "tf32"
        cases.append(CompileCase(name, _residual_quantize_fwd_kernel, args, meta, (config,)))

    add("fp32 D=128 stats")
    add("fp32 D=256 no stats", dim=256, stats=False)
    add("fp32 D=8 per-row levels stats", dim=8, per_row=True)
    add("bf16 D=70 column-major z", torch.bfloat16, dim=70, column_major=True)
    add("fp16 D=128 per-row levels no stats", torch.float16, per_row=True, stats=False)
    add("fp32 D=128 tf32", tf32=True)
    add("fp32 D=18 N=1001 K=1000 stats offset z, codebooks by column", dim=18, odd=True)
    add("bf16 D=100 N=1001 K=1000 per-row levels offset z, codebooks by column", torch.bfloat16, dim=100,
        per_row=True, odd=True)
    return cases
