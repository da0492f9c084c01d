"""Fused nearest-code search: distance, running argmin and gather in one kernel.

A program owns ``BLOCK_N`` rows of ``z``. It walks the codebook in tiles of ``BLOCK_K`` codes,
scores the tile with ``tl.dot`` (fp32 accumulation, ``D`` walked in ``BLOCK_D`` slices and
masked at the edge), folds the tile's minimum into a running (min, argmin) per row, and at the
end gathers the winning code and computes its true distance directly from ``z - e``. Scores live
only in registers, so nothing of size ``N x K`` is ever allocated.

When the rows alone give the GPU too few programs (``N / BLOCK_N`` below the number of SMs, as in
inference or an audio codec's small batches) and the codebook is large, the codebook is split
across programs as well (``SPLIT``): each program searches one slice of codes and writes its rows'
partial (min, argmin); ``_nearest_code_merge_kernel`` folds the slices in code order (strict ``<``,
so the lowest index wins ties) and gathers the winner. The autotuner is keyed on power-of-two
buckets of N and K besides D, so the first call's shape does not fix the tiles of every later one.
Every offset is computed in int64: a column-major ``z`` has column stride N, and N * (D - 1)
passes 2**31 long before memory runs out.

``_nearest_code_batched_kernel`` runs B independent searches (``z [B, N, D]``, ``codebook [B, K, D]``) in
one launch: the grid's second axis is the problem, whose program moves every pointer to its own rows,
codebook and prepared codes before walking its codebook as above.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..search_codebook import SearchCodebook, nonfinite_cosine_rows
from .common import (
    METRIC_DOT,
    METRIC_IDS,
    CompileCase,
    SearchTiles,
    centered_square_norms,
    codes_by_column,
    device_properties,
    dot_precision,
    interpreter_config,
    interpreting,
    load_z_tile,
    offset_rows,
    size_bucket,
    slice_width,
    tile_scores,
    true_distance,
)


@triton.jit
def _gather_and_distance(
    z_ptr,
    codebook_ptr,
    indices_ptr,
    distances_ptr,
    codes_out_ptr,
    rows,
    row_mask,
    best_index,
    D,
    stride_z_row,
    stride_z_col,
    stride_cb_row,
    stride_cb_col,
    METRIC: tl.constexpr,
    RETURN_CODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Gathers each row's winner and recomputes its distance from z - e: exact, no cancellation, >= 0."""
    distance = true_distance(z_ptr, codebook_ptr, codes_out_ptr, rows, row_mask, best_index, D, stride_z_row,
                             stride_z_col, stride_cb_row, stride_cb_col, METRIC, RETURN_CODES, BLOCK_N, BLOCK_D)
    tl.store(indices_ptr + rows, best_index, mask=row_mask)
    tl.store(distances_ptr + rows, distance, mask=row_mask)


@triton.jit(do_not_specialize=["n_bucket", "k_bucket"])
def _nearest_code_fwd_kernel(
    z_ptr,
    codebook_ptr,
    search_codes_ptr,
    code_bias_ptr,
    center_ptr,
    indices_ptr,
    distances_ptr,
    codes_out_ptr,
    seed_ptr,
    partial_best_ptr,
    partial_index_ptr,
    N,
    K,
    D,
    codes_per_split,
    stride_z_row,
    stride_z_col,
    stride_cb_row,
    stride_cb_col,
    inv_temperature,
    n_bucket,
    k_bucket,
    METRIC: tl.constexpr,
    RETURN_CODES: tl.constexpr,
    SAMPLE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # n_bucket and k_bucket are never read: they are autotuning keys (see common.size_bucket).
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    code_begin = split * codes_per_split
    code_end = tl.minimum(code_begin + codes_per_split, K)
    z_tile = 0.0
    if SINGLE_D_TILE:
        # The whole row fits one slice: load (and centre) it once, keep it in registers.
        z_tile = load_z_tile(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col, search_codes_ptr,
                             METRIC, DOT_IN_FP32, BLOCK_D)
    z_centered_sq = 0.0
    row_seeds = 0
    if SAMPLE:
        # Gumbel-max sampling draws code k with probability softmax(-distance_k / T): the same
        # noise-plus-argmax as vector-quantize-pytorch's stochastic codes, with the noise drawn
        # here from a counter-based generator (one Philox stream per row) instead of an N x K
        # tensor. l2 samples on the plain (not squared) distance, as their -cdist logits do, and
        # cosine on the true cosine, so the row's |z - c|^2 or |z| that the argmin drops is needed.
        row_seeds = tl.load(seed_ptr) + rows * 1000003
        if METRIC != METRIC_DOT:
            z_centered_sq = centered_square_norms(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col,
                                                  METRIC, BLOCK_N, BLOCK_D)

    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    # A row that no code beats (every score NaN) keeps its slice's first code; slice 0's is code 0.
    best_index = tl.zeros((BLOCK_N,), tl.int64) + code_begin
    for code_start in range(code_begin, code_end, BLOCK_K):
        scores, _ = tile_scores(
            z_ptr, search_codes_ptr, code_bias_ptr, center_ptr, z_tile, z_centered_sq, row_seeds, rows, row_mask,
            code_start, code_end, D, stride_z_row, stride_z_col, inv_temperature, METRIC, SAMPLE, DOT_PRECISION,
            DOT_IN_FP32, SINGLE_D_TILE, BLOCK_N, BLOCK_K, BLOCK_D,
        )
        tile_best, tile_index = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strict '<' keeps the earlier tile on ties, so the lowest index wins whatever the tiling.
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64) + code_start, best_index)

    if SPLIT:
        tl.store(partial_best_ptr + split * N + rows, best, mask=row_mask)
        tl.store(partial_index_ptr + split * N + rows, best_index, mask=row_mask)
    else:
        _gather_and_distance(
            z_ptr, codebook_ptr, indices_ptr, distances_ptr, codes_out_ptr, rows, row_mask, best_index, D,
            stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC, RETURN_CODES, BLOCK_N, BLOCK_D,
        )


@triton.jit
def _nearest_code_merge_kernel(
    partial_best_ptr,
    partial_index_ptr,
    z_ptr,
    codebook_ptr,
    indices_ptr,
    distances_ptr,
    codes_out_ptr,
    N,
    D,
    num_splits,
    stride_z_row,
    stride_z_col,
    stride_cb_row,
    stride_cb_col,
    METRIC: tl.constexpr,
    RETURN_CODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    best = tl.load(partial_best_ptr + rows, mask=row_mask, other=float("inf"))
    best_index = tl.load(partial_index_ptr + rows, mask=row_mask, other=0)
    # Slices in code order with strict '<': on a tie the earlier slice, so the lower index, wins.
    offsets = rows
    for _ in range(1, num_splits):
        offsets += N  # int64: rows are
        slice_best = tl.load(partial_best_ptr + offsets, mask=row_mask, other=float("inf"))
        slice_index = tl.load(partial_index_ptr + offsets, mask=row_mask, other=0)
        better = slice_best < best
        best = tl.where(better, slice_best, best)
        best_index = tl.where(better, slice_index, best_index)
    _gather_and_distance(
        z_ptr, codebook_ptr, indices_ptr, distances_ptr, codes_out_ptr, rows, row_mask, best_index, D,
        stride_z_row, stride_z_col, stride_cb_row, stride_cb_col, METRIC, RETURN_CODES, BLOCK_N, BLOCK_D,
    )


@triton.jit(do_not_specialize=["n_bucket", "k_bucket"])
def _nearest_code_batched_kernel(
    z_ptr,
    codebook_ptr,
    search_codes_ptr,
    code_bias_ptr,
    center_ptr,
    indices_ptr,
    distances_ptr,
    N,
    K,
    D,
    stride_z_batch,
    stride_z_row,
    stride_z_col,
    stride_cb_batch,
    stride_cb_row,
    stride_cb_col,
    n_bucket,
    k_bucket,
    METRIC: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """B searches, one per program of the grid's second axis: problem ``b`` moves every pointer to its own
    rows, codebook and prepared codes (``search_codes [B, K, D]``, ``code_bias [B, K]``, ``center [B, D]``,
    outputs ``[B, N]``, all contiguous), then walks its codebook as ``_nearest_code_fwd_kernel`` does."""
    pid = tl.program_id(0).to(tl.int64)
    problem = tl.program_id(1).to(tl.int64)
    z_ptr += problem * stride_z_batch
    codebook_ptr += problem * stride_cb_batch
    search_codes_ptr += problem * K * D
    code_bias_ptr += problem * K
    center_ptr += problem * D
    indices_ptr += problem * N
    distances_ptr += problem * N
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    z_tile = 0.0
    if SINGLE_D_TILE:
        z_tile = load_z_tile(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col, search_codes_ptr,
                             METRIC, DOT_IN_FP32, BLOCK_D)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int64)
    for code_start in range(0, K, BLOCK_K):
        scores, _ = tile_scores(
            z_ptr, search_codes_ptr, code_bias_ptr, center_ptr, z_tile, 0.0, 0, rows, row_mask, code_start, K, D,
            stride_z_row, stride_z_col, 1.0, METRIC, False, DOT_PRECISION, DOT_IN_FP32, SINGLE_D_TILE, BLOCK_N,
            BLOCK_K, BLOCK_D,
        )
        tile_best, tile_index = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strict '<' keeps the earlier tile on ties, so the lowest index wins whatever the tiling.
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64) + code_start, best_index)
    _gather_and_distance(
        z_ptr, codebook_ptr, indices_ptr, distances_ptr, distances_ptr, rows, row_mask, best_index, D, stride_z_row,
        stride_z_col, stride_cb_row, stride_cb_col, METRIC, False, BLOCK_N, BLOCK_D,
    )


# Chosen so that none spills registers in any branch, checked on sm_80 and sm_90 by
# tests/backends/test_aot_compile.py with the pinned Triton (picked from a sweep of a dozen tiles per dtype);
# shared memory is pruned per device at launch.
# fp32 runs three tf32 MMAs per tile (tf32x3) on split operands, which needs far more registers:
# on sm_80 only 32-wide D slices stay out of local memory, while Hopper's warp-group MMAs, which
# read their operands from shared memory, also take 128 x 64 tiles. For the 16-bit dtypes too,
# every tile with 64- or 128-wide D slices, and 128 x 128 and 64 x 128 tiles on four warps, spilled
# in some branch (a D that is no multiple of 16, Gumbel sampling at D = 256). Other GPUs get the
# sm_80 lists.
# A D that is no multiple of 16 and takes more than one 32-wide slice (D = 70, 100: common.unaligned_d): Triton
# cannot specialise the prepared codes' row stride (D) as divisible by 16, so their loads are scalar, and every
# tile above with 32-wide slices spilled on sm_80 or sm_90 (8 to 400 B; fp32 worst with a column-major z of odd N
# and with Gumbel sampling, 16-bit with cosine sampling). Of a sweep of 16- and 32-wide slices the unaligned lists
# spill nothing there in any branch, on either target. A D up to 32 is one slice in the lists above, which spill
# nothing at odd D.
_TILES = SearchTiles(
    fp32=[
        (64, 64, 32, 8, 3),
        (64, 32, 32, 4, 4),
        (64, 64, 16, 4, 3),
    ],
    fp32_hopper=[
        (64, 64, 32, 4, 3),
        (128, 64, 32, 8, 3),
    ],
    half=[
        (128, 64, 32, 8, 3),
        (64, 128, 32, 8, 3),
        (64, 64, 32, 4, 3),
    ],
    fp32_unaligned_d=[
        (128, 64, 16, 8, 3),
        (64, 64, 16, 8, 3),
        (64, 64, 16, 4, 3),
    ],
    half_unaligned_d=[
        (128, 64, 16, 8, 3),
        (64, 128, 16, 8, 3),
        (64, 64, 16, 4, 3),
    ],
)
_nearest_code_fixed, _nearest_code_tuned = _TILES.launchers(
    _nearest_code_fwd_kernel, key=["D", "n_bucket", "k_bucket", "METRIC", "SAMPLE", "SPLIT"])
_nearest_code_batched_fixed, _nearest_code_batched_tuned = _TILES.launchers(
    _nearest_code_batched_kernel, key=["D", "n_bucket", "k_bucket", "METRIC"])
# The merge pass reads a few floats per row and slice, then gathers one code per row.
_MERGE_ROWS = 32

# The codebook is split only where the rows leave SMs idle and each slice still has this many codes
# to amortise its rows' loads; slices are whole multiples of every BLOCK_K.
_SPLIT_MIN_CODES_PER_SLICE = 1024
_SPLIT_ALIGN = 256
# How many rows one program of the split path is reckoned to own when counting programs.
_SPLIT_REFERENCE_ROWS = 64


def _merge_config(dim: int) -> triton.Config:
    if interpreting():
        return interpreter_config("BLOCK_N", "BLOCK_D")
    # 128-wide slices spill (8 to 408 B) where D is no multiple of 16, whose masks and strides Triton cannot
    # specialise.
    widest = 128 if dim % 16 == 0 else 64
    return triton.Config({"BLOCK_N": _MERGE_ROWS, "BLOCK_D": slice_width(dim, widest)}, num_warps=4, num_stages=1)


def _code_splits(num_rows: int, num_codes: int, multiprocessors: int) -> int:
    """How many slices the codebook is split into: 1 unless the rows alone would leave SMs idle.

    Enough slices that the row blocks times the slices fill every SM once, none under
    ``_SPLIT_MIN_CODES_PER_SLICE`` codes.
    """
    row_programs = triton.cdiv(num_rows, _SPLIT_REFERENCE_ROWS)
    if row_programs >= multiprocessors:
        return 1
    return max(1, min(triton.cdiv(multiprocessors, row_programs), num_codes // _SPLIT_MIN_CODES_PER_SLICE))


def _codes_per_split(num_codes: int, splits: int) -> int:
    return triton.cdiv(triton.cdiv(num_codes, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN


def _launch_arguments(z, codebook, metric, return_codes, sample_temperature, seed, splits):
    """Outputs, the partial (min, argmin) buffers of a split search, and the kernel's arguments."""
    num_rows, dim = z.shape
    num_codes = codebook.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    device = z.device
    indices = torch.empty(num_rows, dtype=torch.int64, device=device)
    distances = torch.empty(num_rows, dtype=torch.float32, device=device)
    codes_out = torch.empty((num_rows if return_codes else 0, dim), dtype=out_dtype, device=device)
    sampling = sample_temperature > 0.0
    search = SearchCodebook(codebook, metric, out_dtype)
    search_codes = search.codes.to(out_dtype).contiguous()
    codes_per_split = _codes_per_split(num_codes, splits) if splits > 1 else num_codes
    splits = triton.cdiv(num_codes, codes_per_split)
    partial_best = torch.empty((splits, num_rows) if splits > 1 else 0, dtype=torch.float32, device=device)
    partial_index = torch.empty((splits, num_rows) if splits > 1 else 0, dtype=torch.int64, device=device)
    placeholder = distances  # never read: the metric's constexpr branch skips it
    args = (
        z,
        codebook,
        search_codes,
        search.code_bias if search.code_bias is not None else placeholder,
        search.center if search.center is not None else placeholder,
        indices,
        distances,
        codes_out if return_codes else placeholder,
        seed if sampling else indices,
        partial_best if splits > 1 else placeholder,
        partial_index if splits > 1 else indices,
        num_rows,
        num_codes,
        dim,
        codes_per_split,
        z.stride(0),
        z.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        1.0 / sample_temperature if sampling else 1.0,
        size_bucket(num_rows),
        size_bucket(num_codes),
    )
    meta = dict(
        METRIC=METRIC_IDS[metric],
        RETURN_CODES=return_codes,
        SAMPLE=sampling,
        SPLIT=splits > 1,
        DOT_PRECISION=dot_precision(out_dtype),
        DOT_IN_FP32=interpreting() and out_dtype == torch.bfloat16,
    )
    merge_args = (
        partial_best, partial_index, z, codebook, indices, distances, codes_out if return_codes else placeholder,
        num_rows, dim, splits, z.stride(0), z.stride(1), codebook.stride(0), codebook.stride(1),
    )
    merge_meta = dict(METRIC=meta["METRIC"], RETURN_CODES=return_codes)
    return (indices, distances, codes_out), splits, (args, meta), (merge_args, merge_meta)


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    return_codes: bool,
    sample_temperature: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the fused search (or Gumbel-max sampling when ``sample_temperature > 0``, noise
    from the int64 ``seed`` tensor). Inputs are checked by the caller; fp64 is not handled here."""
    num_rows, dim = z.shape
    if num_rows == 0:
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        return (
            torch.empty(0, dtype=torch.int64, device=z.device),
            torch.empty(0, dtype=torch.float32, device=z.device),
            torch.empty((0, dim), dtype=out_dtype, device=z.device),
        )
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        multiprocessors = 1 if interpreting() else device_properties()["multiprocessor_count"]
        requested = _code_splits(num_rows, codebook.shape[0], multiprocessors)
        outputs, splits, (args, meta), (merge_args, merge_meta) = _launch_arguments(
            z, codebook, metric, return_codes, sample_temperature, seed, requested
        )
        if interpreting():
            grid = (triton.cdiv(num_rows, _TILES.INTERPRETER_BLOCKS["BLOCK_N"]), splits)
            _nearest_code_fixed[grid](*args, **meta, **_TILES.INTERPRETER_BLOCKS)
        else:
            grid = lambda cfg: (triton.cdiv(num_rows, cfg["BLOCK_N"]), splits)  # noqa: E731
            _nearest_code_tuned[grid](*args, **meta)
        if splits > 1:
            merge = _merge_config(dim)
            merge_grid = (triton.cdiv(num_rows, merge.kwargs["BLOCK_N"]),)
            _nearest_code_merge_kernel[merge_grid](*merge_args, **merge_meta, **merge.all_kwargs())
    nonfinite = nonfinite_cosine_rows(z, metric)
    if nonfinite is not None:
        indices, distances, codes_out = outputs
        indices.masked_fill_(nonfinite, 0)
        if return_codes:  # the distance stays: it is NaN to every code
            codes_out.copy_(torch.where(nonfinite[:, None], codebook[0].to(codes_out.dtype), codes_out))
    return outputs


def _batched_launch_arguments(z, codebook, metric):
    """Outputs and the batched kernel's arguments (the prepared codebooks of every problem, contiguous)."""
    num_problems, num_rows, dim = z.shape
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    indices = torch.empty(num_problems, num_rows, dtype=torch.int64, device=z.device)
    distances = torch.empty(num_problems, num_rows, dtype=torch.float32, device=z.device)
    search = SearchCodebook(codebook, metric, out_dtype)
    placeholder = distances  # never read: the metric's constexpr branch skips it
    args = (
        z,
        codebook,
        search.codes.to(out_dtype).contiguous(),
        search.code_bias.contiguous() if search.code_bias is not None else placeholder,
        search.center.contiguous() if search.center is not None else placeholder,
        indices,
        distances,
        num_rows,
        codebook.shape[1],
        dim,
        z.stride(0),
        z.stride(1),
        z.stride(2),
        codebook.stride(0),
        codebook.stride(1),
        codebook.stride(2),
        size_bucket(num_rows),
        size_bucket(codebook.shape[1]),
    )
    meta = dict(
        METRIC=METRIC_IDS[metric],
        DOT_PRECISION=dot_precision(out_dtype),
        DOT_IN_FP32=interpreting() and out_dtype == torch.bfloat16,
    )
    return (indices, distances), (args, meta)


def nearest_code_batched(
    z: torch.Tensor, codebook: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches B searches in one grid, ``(row blocks, B)``: ``z [B, N, D]`` against ``codebook [B, K, D]``.
    The batch axis fills the GPU where one problem's rows would not, so the codebook is never split."""
    num_problems, num_rows, _ = z.shape
    outputs, (args, meta) = _batched_launch_arguments(z, codebook, metric)
    if num_problems * num_rows == 0:
        return outputs
    with torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext():
        if interpreting():
            grid = (triton.cdiv(num_rows, _TILES.INTERPRETER_BLOCKS["BLOCK_N"]), num_problems)
            _nearest_code_batched_fixed[grid](*args, **meta, **_TILES.INTERPRETER_BLOCKS)
        else:
            grid = lambda cfg: (triton.cdiv(num_rows, cfg["BLOCK_N"]), num_problems)  # noqa: E731
            _nearest_code_batched_tuned[grid](*args, **meta)
    indices, distances = outputs
    if metric == "cosine":
        indices.masked_fill_(~z.isfinite().all(dim=-1), 0)
    return indices, distances


def compile_cases() -> list[CompileCase]:
    """The launches ``nearest_code`` makes, for ``tests/backends/test_aot_compile.py`` (see ``CompileCase``).

    Each branch at least once per dtype class (fp32, whose tiles run three tf32 MMAs, and the
    16-bit dtypes): l2 with codes returned (the training call) at a D that fits one slice and one
    that does not; fp32 with the caller's tf32 opt-in; cosine and dot; Gumbel-max sampling; the
    split codebook and its merge pass; a D that is no multiple of 16 (so neither are the strides);
    a column-major ``z`` (the row stride becomes the constant 1); mixed dtypes; fp16, with no
    codes returned; odd N, K and D (18 in one slice, 100 in several) with a sliced ``z`` and a codebook by
    column, sampled and split too. Each through the autotuner, so in every config it keeps for the target.
    Then the batched kernel (``nearest_code_batched``): fp32 and bf16 at D = 128, cosine on one slice, a
    column-major bf16 ``z`` with odd sizes, fp16 dot, a sliced fp32 ``z`` at D = 100.
    """
    cases = []

    def add(name, dtype=torch.float32, codebook_dtype=None, metric="l2", dim=64, rows=1024, codes=1024,
            return_codes=True, sample=False, splits=1, column_major=False, tf32=False, odd_layouts=False):
        z = torch.zeros((dim, rows) if column_major else (rows, dim), dtype=dtype)
        z = z.t() if column_major else z
        codebook = torch.zeros(codes, dim, dtype=codebook_dtype or dtype)
        if odd_layouts:
            z, codebook = offset_rows(rows, dim, dtype), codes_by_column(codes, dim, codebook_dtype or dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        _, used, (args, meta), (merge_args, merge_meta) = _launch_arguments(
            z, codebook, metric, return_codes, 0.5 if sample else 0.0, seed, splits
        )
        if tf32:
            meta["DOT_PRECISION"] = "tf32"
        cases.append(CompileCase(name, _nearest_code_tuned, args, meta))
        if used > 1:
            cases.append(CompileCase(f"{name}: merge", _nearest_code_merge_kernel, merge_args, merge_meta,
                                     (_merge_config(dim),)))

    bf16, fp16 = torch.bfloat16, torch.float16
    for dim in (64, 256, 32):  # 32: fp32's single-slice branch
        add(f"l2 fp32 D={dim}", dim=dim)
    add("l2 fp32 tf32 D=64", tf32=True)
    add("cosine fp32 D=64", metric="cosine")
    add("sample l2 fp32 D=64", sample=True)
    add("split l2 fp32 D=64", rows=64, codes=8192, splits=4)
    add("l2 fp32 D=70 column-major z", dim=70, codes=1000, column_major=True)
    add("l2 bf16 z fp32 codebook D=64", bf16, codebook_dtype=torch.float32)
    for dim in (64, 256):
        add(f"l2 bf16 D={dim}", bf16, dim=dim)
    add("l2 fp16 D=64 no codes", fp16, return_codes=False)
    add("dot bf16 D=256", bf16, metric="dot", dim=256)
    add("sample cosine bf16 D=256", bf16, metric="cosine", dim=256, sample=True)
    add("split l2 bf16 D=256", bf16, dim=256, rows=64, codes=8192, splits=4)
    add("l2 bf16 D=70", bf16, dim=70, codes=1000)
    # What no size above has: odd N and K, a z slice whose row stride and address are no multiple of 16, and a
    # codebook by column (offset_rows, codes_by_column); Open-MAGVIT2's D = 18 in one slice, D = 100 in several.
    add("l2 fp32 D=18 N=1001 K=1000 offset z, codebook by column", dim=18, rows=1001, codes=1000, odd_layouts=True)
    add("sample l2 bf16 D=100 N=1001 K=1000 offset z, codebook by column", bf16, dim=100, rows=1001, codes=1000,
        sample=True, odd_layouts=True)
    add("split cosine fp32 D=100 N=63 K=8191 offset z, codebook by column", metric="cosine", dim=100, rows=63,
        codes=8191, splits=4, odd_layouts=True)

    def add_batched(name, dtype=torch.float32, metric="l2", dim=128, rows=1024, codes=1024, problems=4,
                    column_major=False, offset=False):
        z = torch.zeros((problems, dim, rows) if column_major else (problems, rows, dim), dtype=dtype)
        z = z.transpose(1, 2) if column_major else z
        z = torch.zeros(problems, rows, dim + 1, dtype=dtype)[:, :, 1:] if offset else z
        codebook = torch.zeros(problems, codes, dim, dtype=dtype)
        _, (args, meta) = _batched_launch_arguments(z, codebook, metric)
        cases.append(CompileCase(name, _nearest_code_batched_tuned, args, meta))

    # k-means' batched search: fp32 (CPU data moved over) and bf16 at flash-kmeans' D = 128, cosine, a D
    # that fits one slice, and odd sizes whose strides are no multiple of 16.
    add_batched("batched l2 fp32 D=128")
    add_batched("batched l2 bf16 D=128", bf16)
    add_batched("batched cosine fp32 D=32", metric="cosine", dim=32)
    add_batched("batched l2 bf16 D=70 column-major z", bf16, dim=70, rows=1000, codes=1000, problems=3,
                column_major=True)
    add_batched("batched dot fp16 D=64", fp16, metric="dot", dim=64)
    add_batched("batched l2 fp32 D=100 N=1001 K=1000 offset z", dim=100, rows=1001, codes=1000, problems=3,
                offset=True)
    return cases
