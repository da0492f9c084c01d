"""Fused nearest-code search: distance, running argmin and gather in one kernel.

A program owns ``BLOCK_N`` rows of ``z``. It walks the codebook in tiles of ``BLOCK_K`` codes,
scores the tile with ``tl.dot`` (fp32 accumulation, ``D`` walked in ``BLOCK_D`` slices and
masked at the edge), folds the tile's minimum into a running (min, argmin) per row, and at the
end gathers the winning code and computes its true distance directly from ``z - e``. Scores live
only in registers, so nothing of size ``N x K`` is ever allocated.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..common import SearchCodebook
from .common import dot_precision, interpreting

METRIC_IDS = {"l2": 0, "cosine": 1, "dot": 2}


@triton.jit
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
    N,
    K,
    D,
    stride_z_row,
    stride_z_col,
    stride_cb_row,
    stride_cb_col,
    inv_temperature,
    METRIC: tl.constexpr,
    RETURN_CODES: tl.constexpr,
    SAMPLE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    SINGLE_D_TILE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    dims = tl.arange(0, BLOCK_D)
    # Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot; there the tiles are
    # widened to fp32 first (bf16 products are exact in fp32, so the sums agree with the GPU's).
    if DOT_IN_FP32:
        search_dtype = tl.float32
    else:
        search_dtype = search_codes_ptr.dtype.element_ty

    if SINGLE_D_TILE:
        # The whole row fits one slice: load (and centre) it once, keep it in registers.
        dim_mask = dims < D
        z_tile = tl.load(
            z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col,
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if METRIC == 0:
            center = tl.load(center_ptr + dims, mask=dim_mask, other=0.0)
            z_tile = z_tile - center[None, :]
        z_tile = z_tile.to(search_dtype)

    if SAMPLE:
        # Gumbel-max sampling draws code k with probability softmax(-distance_k / T): the same
        # noise-plus-argmax as vector-quantize-pytorch's stochastic codes, with the noise drawn
        # here from a counter-based generator (one Philox stream per row) instead of an N x K
        # tensor. l2 samples on the plain (not squared) distance, as their -cdist logits do, and
        # cosine on the true cosine, so the row's |z - c|^2 or |z| that the argmin drops is needed.
        row_seeds = tl.load(seed_ptr) + rows * 1000003
        z_centered_sq = tl.zeros((BLOCK_N,), tl.float32)
        if METRIC != 2:
            for dim_start in range(0, D, BLOCK_D):
                dim_idx = dim_start + dims
                dim_mask_s = dim_idx < D
                z_slice = tl.load(
                    z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col,
                    mask=row_mask[:, None] & dim_mask_s[None, :],
                    other=0.0,
                ).to(tl.float32)
                if METRIC == 0:
                    center_s = tl.load(center_ptr + dim_idx, mask=dim_mask_s, other=0.0)
                    z_slice = tl.where(dim_mask_s[None, :], z_slice - center_s[None, :], 0.0)
                z_centered_sq += tl.sum(z_slice * z_slice, axis=1)

    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_index = tl.zeros((BLOCK_N,), tl.int64)
    for code_start in range(0, K, BLOCK_K):
        codes = code_start + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        code_rows = codes.to(tl.int64) * D
        acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if SINGLE_D_TILE:
            code_tile = tl.load(
                search_codes_ptr + code_rows[None, :] + dims[:, None],
                mask=code_mask[None, :] & dim_mask[:, None],
                other=0.0,
            )
            acc = tl.dot(z_tile, code_tile.to(search_dtype), acc, input_precision=DOT_PRECISION)
        else:
            for dim_start in range(0, D, BLOCK_D):
                dim_idx = dim_start + dims
                dim_mask_d = dim_idx < D
                z_slice = tl.load(
                    z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col,
                    mask=row_mask[:, None] & dim_mask_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                if METRIC == 0:
                    center_d = tl.load(center_ptr + dim_idx, mask=dim_mask_d, other=0.0)
                    z_slice = z_slice - center_d[None, :]
                code_tile = tl.load(
                    search_codes_ptr + code_rows[None, :] + dim_idx[:, None],
                    mask=code_mask[None, :] & dim_mask_d[:, None],
                    other=0.0,
                )
                acc = tl.dot(z_slice.to(search_dtype), code_tile.to(search_dtype), acc, input_precision=DOT_PRECISION)
        if METRIC == 0:
            bias = tl.load(code_bias_ptr + codes, mask=code_mask, other=0.0)
            scores = bias[None, :] - 2.0 * acc
        else:
            scores = -acc
        if SAMPLE:
            if METRIC == 0:
                scores = tl.sqrt(tl.maximum(scores + z_centered_sq[:, None], 0.0))
            elif METRIC == 1:
                scores = scores / tl.maximum(tl.sqrt(z_centered_sq), 1e-12)[:, None]
            uniform = tl.maximum(tl.rand(row_seeds[:, None], codes[None, :]), 1e-20)
            gumbel = -tl.log(tl.maximum(-tl.log(uniform), 1e-20))
            scores = scores * inv_temperature - gumbel
        # A NaN score never wins, and padding codes past K never win either.
        scores = tl.where(scores != scores, float("inf"), scores)
        scores = tl.where(code_mask[None, :], scores, float("inf"))
        tile_best, tile_index = tl.min(scores, axis=1, return_indices=True, return_indices_tie_break_left=True)
        # Strict '<' keeps the earlier tile on ties, so the lowest index wins whatever the tiling.
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64) + code_start, best_index)

    # Gather the winner and recompute its distance from z - e: exact, no cancellation, >= 0.
    sq_sum = tl.zeros((BLOCK_N,), tl.float32)
    dot_sum = tl.zeros((BLOCK_N,), tl.float32)
    z_sq = tl.zeros((BLOCK_N,), tl.float32)
    e_sq = tl.zeros((BLOCK_N,), tl.float32)
    for dim_start in range(0, D, BLOCK_D):
        dim_idx = dim_start + dims
        mask = row_mask[:, None] & (dim_idx < D)[None, :]
        z_vals = tl.load(z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col, mask=mask, other=0.0)
        e_vals = tl.load(
            codebook_ptr + best_index[:, None] * stride_cb_row + dim_idx[None, :] * stride_cb_col, mask=mask, other=0.0
        )
        if RETURN_CODES:
            tl.store(
                codes_out_ptr + rows[:, None] * D + dim_idx[None, :],
                e_vals.to(codes_out_ptr.dtype.element_ty),
                mask=mask,
            )
        z_f = z_vals.to(tl.float32)
        e_f = e_vals.to(tl.float32)
        if METRIC == 0:
            diff = z_f - e_f
            sq_sum += tl.sum(diff * diff, axis=1)
        else:
            dot_sum += tl.sum(z_f * e_f, axis=1)
            if METRIC == 1:
                z_sq += tl.sum(z_f * z_f, axis=1)
                e_sq += tl.sum(e_f * e_f, axis=1)
    if METRIC == 0:
        distance = sq_sum
    elif METRIC == 1:
        norms = tl.maximum(tl.sqrt(z_sq), 1e-12) * tl.maximum(tl.sqrt(e_sq), 1e-12)
        # Rounding can put a parallel pair's 1 - cos a few ulps below 0; a NaN row stays NaN.
        distance = tl.maximum(1.0 - dot_sum / norms, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        distance = -dot_sum
    tl.store(indices_ptr + rows, best_index, mask=row_mask)
    tl.store(distances_ptr + rows, distance, mask=row_mask)


def _prune_configs(configs, named_args, **kwargs):
    width = max(32, triton.next_power_of_2(named_args["D"]))
    kept = [c for c in configs if c.kwargs["BLOCK_D"] <= width]
    return kept or configs[:1]


_TUNING_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
    for bn, bk, bd, w, s in [
        (128, 128, 32, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 64, 64, 4, 3),
        (64, 128, 64, 4, 3),
        (128, 128, 128, 8, 2),
        (64, 64, 128, 4, 3),
        (128, 64, 128, 8, 2),
        (64, 128, 32, 4, 4),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
    ]
]

_single_d_tile = triton.heuristics({"SINGLE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})
_nearest_code_tuned = triton.autotune(
    configs=_TUNING_CONFIGS, key=["D", "METRIC"], prune_configs_by={"early_config_prune": _prune_configs}
)(_single_d_tile(_nearest_code_fwd_kernel))
_nearest_code_fixed = _single_d_tile(_nearest_code_fwd_kernel)
# Under the interpreter every tile is a numpy array: the smallest tiles tl.dot accepts are fastest.
_INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}


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
    num_codes = codebook.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    device = z.device
    indices = torch.empty(num_rows, dtype=torch.int64, device=device)
    distances = torch.empty(num_rows, dtype=torch.float32, device=device)
    codes_out = torch.empty((num_rows if return_codes else 0, dim), dtype=out_dtype, device=device)
    if num_rows == 0:
        return indices, distances, codes_out
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
        codes_out if return_codes else placeholder,
        seed if sampling else indices,
        num_rows,
        num_codes,
        dim,
        z.stride(0),
        z.stride(1),
        codebook.stride(0),
        codebook.stride(1),
        1.0 / sample_temperature if sampling else 1.0,
    )
    meta = dict(
        METRIC=METRIC_IDS[metric],
        RETURN_CODES=return_codes,
        SAMPLE=sampling,
        DOT_PRECISION=dot_precision(out_dtype),
        DOT_IN_FP32=interpreting() and out_dtype == torch.bfloat16,
    )
    if interpreting():
        grid = (triton.cdiv(num_rows, _INTERPRETER_BLOCKS["BLOCK_N"]),)
        _nearest_code_fixed[grid](*args, **meta, **_INTERPRETER_BLOCKS)
    else:
        grid = lambda cfg: (triton.cdiv(num_rows, cfg["BLOCK_N"]),)  # noqa: E731
        with torch.cuda.device(device) if z.is_cuda else contextlib.nullcontext():
            _nearest_code_tuned[grid](*args, **meta)
    return indices, distances, codes_out
