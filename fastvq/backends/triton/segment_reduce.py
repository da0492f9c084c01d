"""Segment reduce: per-code counts and sums of rows, with no one-hot matrix.

Two kernels. ``_segment_sum_atomic_kernel`` scatters each row into its code's sum with fp32
atomics: fast, but the order of the additions (and so the last bits of a sum) varies from run to
run. ``_segment_sum_sorted_kernel`` is the deterministic path: rows are sorted by code once, and
one program per (code, D slice) sums its code's rows in a fixed order.
Indices outside ``[0, K)`` are ignored by both, never written through.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import interpreting


@triton.jit
def _segment_sum_atomic_kernel(
    values_ptr,
    indices_ptr,
    sums_ptr,
    counts_ptr,
    N,
    K,
    D,
    stride_row,
    stride_col,
    scale,
    COUNT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_row = tl.program_id(0).to(tl.int64)
    pid_dim = tl.program_id(1)
    rows = pid_row * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dims = pid_dim * BLOCK_D + tl.arange(0, BLOCK_D)
    row_mask = rows < N
    codes = tl.load(indices_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    valid = row_mask & (codes >= 0) & (codes < K)
    mask = valid[:, None] & (dims < D)[None, :]
    vals = tl.load(values_ptr + rows[:, None] * stride_row + dims[None, :] * stride_col, mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + codes[:, None] * D + dims[None, :], vals.to(tl.float32) * scale, mask=mask)
    if COUNT:
        if pid_dim == 0:
            tl.atomic_add(counts_ptr + codes, tl.full((BLOCK_N,), 1, tl.int64), mask=valid)


@triton.jit
def _segment_sum_sorted_kernel(
    values_ptr,
    order_ptr,
    offsets_ptr,
    sums_ptr,
    D,
    stride_row,
    stride_col,
    scale,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_mask = dims < D
    start = tl.load(offsets_ptr + code)
    stop = tl.load(offsets_ptr + code + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for block_start in range(start, stop, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        pos_mask = positions < stop
        rows = tl.load(order_ptr + positions, mask=pos_mask, other=0)
        mask = pos_mask[:, None] & dim_mask[None, :]
        vals = tl.load(values_ptr + rows[:, None] * stride_row + dims[None, :] * stride_col, mask=mask, other=0.0)
        acc += tl.sum(vals.to(tl.float32), axis=0)
    tl.store(sums_ptr + code * D + dims, acc * scale, mask=dim_mask)


def _blocks(dim: int) -> tuple[int, int]:
    if interpreting():
        return 16, 16
    return 64, min(128, max(16, triton.next_power_of_2(dim)))


def segment_sum_(
    sums: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    *,
    scale: float = 1.0,
    deterministic: bool,
    counts: torch.Tensor | None = None,
) -> None:
    """``sums[k] += scale * sum(values[i] for i with indices[i] == k)``, and counts likewise.

    ``sums`` is a contiguous fp32 ``[K, D]`` tensor, ``counts`` (optional) an int64 ``[K]``
    tensor. ``deterministic=False`` uses fp32 atomics (run-to-run variation in the last bits).
    """
    num_rows, dim = values.shape
    num_codes = sums.shape[0]
    if num_rows == 0:
        return
    block_n, block_d = _blocks(dim)
    indices = indices.contiguous()  # the kernels read indices with unit stride
    context = torch.cuda.device(values.device) if values.is_cuda else contextlib.nullcontext()
    with context:
        if not deterministic:
            grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
            _segment_sum_atomic_kernel[grid](
                values,
                indices,
                sums,
                counts if counts is not None else sums,
                num_rows,
                num_codes,
                dim,
                values.stride(0),
                values.stride(1),
                scale,
                COUNT=counts is not None,
                BLOCK_N=block_n,
                BLOCK_D=block_d,
            )
            return
        valid = (indices >= 0) & (indices < num_codes)
        keys = torch.where(valid, indices.long(), num_codes)
        order = torch.argsort(keys, stable=True)
        code_counts = torch.zeros(num_codes + 1, dtype=torch.int64, device=values.device)
        code_counts.index_add_(0, keys, torch.ones_like(keys))  # integer adds: exact in any order
        offsets = torch.zeros(num_codes + 1, dtype=torch.int64, device=values.device)
        torch.cumsum(code_counts[:num_codes], dim=0, out=offsets[1:])
        partial = torch.empty_like(sums)
        grid = (num_codes, triton.cdiv(dim, block_d))
        _segment_sum_sorted_kernel[grid](
            values, order, offsets, partial, dim, values.stride(0), values.stride(1), scale,
            BLOCK_N=block_n, BLOCK_D=block_d,
        )
        sums += partial
        if counts is not None:
            counts += code_counts[:num_codes]


def segment_reduce(
    values: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[K]`` and sums ``[K, D]``, both float32."""
    sums = torch.zeros(num_codes, values.shape[1], dtype=torch.float32, device=values.device)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=values.device)
    segment_sum_(sums, values, indices, deterministic=deterministic, counts=counts)
    return counts.float(), sums
