"""Fused top-k search: each row's ``k`` nearest codes, held in registers across tiles of codes.

A program owns ``BLOCK_N`` rows. Each row keeps its best ``k`` (score, code) pairs in a register
tile ``[BLOCK_N, TOPK_PAD]`` (unsorted) and knows its worst pair. The codebook is walked in tiles of
``BLOCK_K`` codes scored by the nearest-code kernel's own tile scoring (``common.tile_scores``); a
tile is merged by taking its best remaining code per row (ties to the lower index) while that code
beats the row's worst pair, which it then replaces. After the first tiles few codes beat the worst,
so most tiles cost one extraction. Pairs compare by (score, index), so equal scores keep the lower index whatever the
tiling. At the end each of the ``k`` codes' true distance is computed from ``z - e`` and stored with
its score; the launcher orders the list by score (ties by index), the order in which the search
chooses, so the first column is the search's answer. Nothing of size ``N x K`` is ever allocated.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..search_codebook import SearchCodebook, nonfinite_cosine_rows, order_candidates
from .common import (
    METRIC_DOT,
    METRIC_IDS,
    SearchTiles,
    cases_from_launches,
    centered_square_norms,
    codes_by_column,
    dot_precision,
    interpreting,
    load_z_tile,
    offset_rows,
    recording_launches,
    size_bucket,
    tile_scores,
    true_distance,
)

# The largest k held in registers (fastvq.backends routes larger k, sampling aside, to the PyTorch path).
MAX_REGISTER_TOPK = 64


@triton.jit
def _worst_pair(best, best_index):
    """Each row's worst pair: the largest score, among equal scores the largest index."""
    worst = tl.max(best, axis=1)
    worst_index = tl.max(tl.where(best == worst[:, None], best_index, -1), axis=1)
    return worst, worst_index


@triton.jit(do_not_specialize=["n_bucket"])
def _nearest_codes_fwd_kernel(
    z_ptr,
    codebook_ptr,
    search_codes_ptr,
    code_bias_ptr,
    center_ptr,
    indices_ptr,
    distances_ptr,
    keys_ptr,
    seed_ptr,
    N,
    K,
    D,
    stride_z_row,
    stride_z_col,
    stride_cb_row,
    stride_cb_col,
    inv_temperature,
    n_bucket,
    TOPK: tl.constexpr,
    TOPK_PAD: tl.constexpr,
    METRIC: tl.constexpr,
    SAMPLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # n_bucket is never read: it is an autotuning key (see common.size_bucket).
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    z_tile = 0.0
    if SINGLE_D_TILE:
        z_tile = load_z_tile(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col, search_codes_ptr,
                             METRIC, DOT_IN_FP32, BLOCK_D)
    z_centered_sq = 0.0
    row_seeds = 0
    if SAMPLE:
        row_seeds = tl.load(seed_ptr) + rows * 1000003
        if METRIC != METRIC_DOT:
            z_centered_sq = centered_square_norms(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col,
                                                  METRIC, BLOCK_N, BLOCK_D)

    # Slots past TOPK are padding: score -inf, so never the worst and never replaced. The real slots
    # start as +inf placeholders numbered past K, which any real code (even at +inf) beats.
    slots = tl.arange(0, TOPK_PAD)
    real_slot = slots < TOPK
    best = tl.where(real_slot, float("inf"), float("-inf"))[None, :] + tl.zeros((BLOCK_N, TOPK_PAD), tl.float32)
    best_index = tl.where(real_slot, K + slots, -1)[None, :] + tl.zeros((BLOCK_N, TOPK_PAD), tl.int32)
    worst, worst_index = _worst_pair(best, best_index)
    for code_start in range(0, K, BLOCK_K):
        scores, codes = tile_scores(
            z_ptr, search_codes_ptr, code_bias_ptr, center_ptr, z_tile, z_centered_sq, row_seeds, rows, row_mask,
            code_start, K, D, stride_z_row, stride_z_col, inv_temperature, METRIC, SAMPLE, DOT_PRECISION,
            DOT_IN_FP32, SINGLE_D_TILE, BLOCK_N, BLOCK_K, BLOCK_D,
        )
        # Codes past K are never taken; taken codes are marked by an index past every real one.
        tile_index = tl.where(codes < K, codes, 2147483647)[None, :] + tl.zeros((BLOCK_N, BLOCK_K), tl.int32)
        candidate = tl.min(scores, axis=1)
        candidate_index = tl.min(tl.where(scores == candidate[:, None], tile_index, 2147483647), axis=1)
        takes = (candidate_index < K) & ((candidate < worst) | ((candidate == worst) & (candidate_index < worst_index)))
        while tl.max(takes.to(tl.int32), axis=0) > 0:
            replaced = takes[:, None] & (best_index == worst_index[:, None])
            best = tl.where(replaced, candidate[:, None], best)
            best_index = tl.where(replaced, candidate_index[:, None], best_index)
            worst, worst_index = _worst_pair(best, best_index)
            taken = takes[:, None] & (tile_index == candidate_index[:, None])
            tile_index = tl.where(taken, 2147483647, tile_index)
            scores = tl.where(taken, float("inf"), scores)
            candidate = tl.min(tl.where(tile_index < K, scores, float("inf")), axis=1)
            candidate_index = tl.min(tl.where((scores == candidate[:, None]) & (tile_index < K), tile_index,
                                              2147483647), axis=1)
            takes = (candidate_index < K) & (
                (candidate < worst) | ((candidate == worst) & (candidate_index < worst_index))
            )

    for slot in range(TOPK):
        in_slot = slots[None, :] == slot
        index = tl.sum(tl.where(in_slot, best_index, 0), axis=1).to(tl.int64)
        key = tl.sum(tl.where(in_slot, best, 0.0), axis=1)
        distance = true_distance(z_ptr, codebook_ptr, distances_ptr, rows, row_mask, index, D, stride_z_row,
                                 stride_z_col, stride_cb_row, stride_cb_col, METRIC, False, BLOCK_N, BLOCK_D)
        # One int64 offset (a pointer plus rows * TOPK, then plus the int32 slot, would be an int32 add).
        slot_offsets = rows * TOPK + slot
        tl.store(indices_ptr + slot_offsets, index, mask=row_mask)
        tl.store(distances_ptr + slot_offsets, distance, mask=row_mask)
        tl.store(keys_ptr + slot_offsets, key, mask=row_mask)


def _few_enough_pairs(config, named_args, meta) -> bool:
    """Whether each thread holds few enough kept pairs: ``BLOCK_N * TOPK_PAD / threads`` (score, code) pairs
    besides its share of the score tile."""
    pairs = meta.get("TOPK_PAD", named_args.get("TOPK_PAD", 1))
    return config.kwargs["BLOCK_N"] * pairs <= _MAX_PAIRS_PER_THREAD * 32 * config.num_warps


# Chosen from a sweep of tiles compiled for sm_80 and sm_90 with the pinned Triton and read with
# cuobjdump, keeping those that spill no register in any branch the compile cases list
# (tests/backends/test_aot_compile.py); shared memory is pruned per device at launch. Each list ends with its
# smallest tile, the one a large k falls back to. fp32 runs tf32x3 (three MMAs on split operands),
# which needs far more registers than the 16-bit dtypes: on sm_80 every fp32 tile tried except
# 16 x 32 with two warps spilled a few bytes in some branch (Hopper's warp-group MMAs read their
# operands from shared memory and leave more registers). Other GPUs get the sm_80 lists.
# A D that is no multiple of 16 and takes more than one 32-wide slice (D = 70, 100: common.unaligned_d; one slice
# at most 32 takes the first lists): Triton cannot specialise the prepared codes' row stride (D), and tiles with
# 32- or 64-wide slices spilled 8 to 16 B on sm_80 and sm_90 (bf16 at k = 64, fp32 with Gumbel sampling). Of a
# sweep of 16-wide-slice tiles the unaligned lists spill nothing at k = 8 and 64 with and without sampling.
_MAX_PAIRS_PER_THREAD = 16
_TILES = SearchTiles(
    fp32=[
        (16, 32, 32, 2, 3),
    ],
    fp32_hopper=[
        (64, 64, 32, 8, 3),
        (64, 64, 32, 4, 3),
        (32, 64, 32, 4, 3),
        (16, 64, 32, 2, 3),
    ],
    half=[
        (64, 128, 32, 8, 3),
        (64, 64, 64, 4, 3),
        (32, 128, 32, 8, 3),
        (16, 64, 32, 2, 3),
    ],
    half_hopper=[
        (64, 128, 32, 8, 3),
        (64, 64, 64, 4, 3),
        (32, 64, 64, 4, 3),
        (16, 64, 64, 4, 3),
    ],
    fp32_unaligned_d=[
        (16, 32, 16, 2, 3),
    ],
    fp32_hopper_unaligned_d=[
        (64, 64, 16, 8, 3),
        (32, 64, 16, 4, 3),
        (16, 64, 16, 2, 3),
    ],
    half_unaligned_d=[
        (64, 128, 16, 8, 3),
        (32, 128, 16, 8, 3),
        (16, 64, 16, 4, 3),
    ],
)
_nearest_codes_fixed, _nearest_codes_tuned = _TILES.launchers(
    _nearest_codes_fwd_kernel, key=["D", "n_bucket", "METRIC", "SAMPLE", "TOPK_PAD"], allows=_few_enough_pairs)


def topk_pad(k: int) -> int:
    return max(2, triton.next_power_of_2(k))


def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    k: int,
    metric: str,
    sample_temperature: float = 0.0,
    seed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the fused top-k search (Gumbel-top-k when ``sample_temperature > 0``, noise from the
    int64 ``seed`` tensor). Inputs are checked by the caller; fp64 is not handled here."""
    if k > MAX_REGISTER_TOPK:
        raise ValueError(f"the Triton top-k kernel keeps at most {MAX_REGISTER_TOPK} codes per row in registers, "
                         f"got k = {k}")
    num_rows, dim = z.shape
    num_codes = codebook.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    device = z.device
    indices = torch.empty((num_rows, k), dtype=torch.int64, device=device)
    distances = torch.empty((num_rows, k), dtype=torch.float32, device=device)
    if num_rows == 0:
        return indices, distances
    # The scores the kernel ranked the codes by: the list is ordered by them, as the search chooses.
    keys = torch.empty((num_rows, k), dtype=torch.float32, device=device)
    sampling = sample_temperature > 0.0
    search = SearchCodebook(codebook, metric, out_dtype)
    search_codes = search.codes.to(out_dtype).contiguous()
    placeholder = distances  # never read: the metric's constexpr branch skips it
    args = (
        z,
        codebook,
        search_codes,
        search.code_bias if search.code_bias is not None else placeholder,
        search.center if search.center is not None else placeholder,
        indices,
        distances,
        keys,
        seed if sampling else indices,
        num_rows,
        num_codes,
        dim,
        z.stride(0),
        z.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        1.0 / sample_temperature if sampling else 1.0,
        size_bucket(num_rows),
    )
    meta = dict(
        TOPK=k,
        TOPK_PAD=topk_pad(k),
        METRIC=METRIC_IDS[metric],
        SAMPLE=sampling,
        DOT_PRECISION=dot_precision(out_dtype),
        DOT_IN_FP32=interpreting() and out_dtype == torch.bfloat16,
    )
    if interpreting():
        grid = (triton.cdiv(num_rows, _TILES.INTERPRETER_BLOCKS["BLOCK_N"]),)
        _nearest_codes_fixed[grid](*args, **meta, **_TILES.INTERPRETER_BLOCKS)
    else:
        grid = lambda cfg: (triton.cdiv(num_rows, cfg["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(device) if z.is_cuda else contextlib.nullcontext():
            _nearest_codes_tuned[grid](*args, **meta)
    nonfinite = nonfinite_cosine_rows(z, metric)
    if nonfinite is not None:
        indices = torch.where(nonfinite[:, None], torch.arange(k, device=device), indices)
        keys = torch.where(nonfinite[:, None], float("inf"), keys)
    return order_candidates(indices, distances if sampling else keys, distances)


def compile_cases() -> list:
    """The launches of ``nearest_codes``, for ``tests/backends/test_aot_compile.py`` (see ``common.CompileCase``),
    recorded from the launcher itself, through the autotuner (so in every config its prune keeps):
    the smallest and largest register-held k (2 and MAX_REGISTER_TOPK) and one between, fp32 and
    bf16, a D in one slice and one past it, the three metrics, Gumbel-top-k sampling, a
    column-major ``z`` at a D that is no multiple of 16, and odd N, K and D (18, 100) with a sliced ``z`` and a
    codebook by column."""
    import sys

    module = sys.modules[__name__]
    cases = []

    def add(name, k, dtype=torch.float32, metric="l2", dim=64, sample=False, column_major=False, odd_layouts=False):
        z = torch.zeros((dim, 256) if column_major else (256, dim), dtype=dtype)
        z = z.t() if column_major else z
        codebook = torch.zeros(1024, dim, dtype=dtype)
        if odd_layouts:
            z, codebook = offset_rows(1001, dim, dtype), codes_by_column(1000, dim, dtype)
        with recording_launches(module) as launches:
            nearest_codes(z, codebook, k, metric, 0.5 if sample else 0.0, torch.zeros(1, dtype=torch.int64))
        cases.extend(cases_from_launches(name, launches))

    for k in (2, 8, MAX_REGISTER_TOPK):
        add(f"l2 fp32 D=64 k={k}", k)
        add(f"l2 bf16 D=256 k={k}", k, torch.bfloat16, dim=256)
    add("cosine fp32 D=256 k=8", 8, metric="cosine", dim=256)
    add("dot bf16 D=64 k=8", 8, torch.bfloat16, metric="dot")
    add("sample l2 bf16 D=64 k=8", 8, torch.bfloat16, sample=True)
    add("l2 fp32 D=70 column-major z k=8", 8, dim=70, column_major=True)
    # Odd N and K, a z slice whose row stride and address are no multiple of 16, a codebook by column
    # (offset_rows, codes_by_column): Open-MAGVIT2's D = 18 in one slice, D = 100 in several.
    add("l2 fp32 D=18 N=1001 K=1000 offset z, codebook by column k=8", 8, dim=18, odd_layouts=True)
    add("sample l2 fp32 D=100 N=1001 K=1000 offset z, codebook by column k=8", 8, dim=100, sample=True,
        odd_layouts=True)
    add(f"l2 bf16 D=100 N=1001 K=1000 offset z, codebook by column k={MAX_REGISTER_TOPK}", MAX_REGISTER_TOPK,
        torch.bfloat16, dim=100, odd_layouts=True)
    return cases
