"""Segment reduce: per-code counts and sums of rows, with no one-hot matrix.

Two paths. ``_segment_sum_atomic_kernel`` scatters each row into its code's sum with fp32 atomics
(``relaxed``: a sum needs no ordering with other memory): fast, but the order of the additions (and
so the last bits of a sum) varies from run to run. The deterministic path sorts the rows by code
once and cuts each code's rows into chunks of ``_ROWS_PER_CHUNK``: ``_segment_sum_chunk_kernel``
sums one chunk per program in row order, and ``_segment_sum_partials_kernel`` adds each code's
chunk sums in chunk order. Both orders are fixed, so the result is bitwise the same run to run, and
a collapsed codebook (one code taking most rows) is summed by many programs, not walked by one.
Indices outside ``[0, K)`` are ignored by both paths, never written through; offsets are int64.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import CompileCase, interpreter_config, interpreting, offset_rows, slice_width


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
    pid_dim = tl.program_id(1).to(tl.int64)
    rows = pid_row * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dims = pid_dim * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    row_mask = rows < N
    codes = tl.load(indices_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    valid = row_mask & (codes >= 0) & (codes < K)
    mask = valid[:, None] & (dims < D)[None, :]
    vals = tl.load(values_ptr + rows[:, None] * stride_row + dims[None, :] * stride_col, mask=mask, other=0.0)
    tl.atomic_add(sums_ptr + codes[:, None] * D + dims[None, :], vals.to(tl.float32) * scale, mask=mask,
                  sem="relaxed")
    if COUNT:
        if pid_dim == 0:
            tl.atomic_add(counts_ptr + codes, tl.full((BLOCK_N,), 1, tl.int64), mask=valid, sem="relaxed")


@triton.jit
def _segment_sum_chunk_kernel(
    values_ptr,
    order_ptr,
    offsets_ptr,
    chunk_code_ptr,
    chunk_first_ptr,
    partial_ptr,
    K,
    D,
    stride_row,
    stride_col,
    ROWS_PER_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Chunk c holds rows [offsets[k] + j * ROWS_PER_CHUNK, ...) of code k = chunk_code[c], with
    # j = c - chunk_first[k]; chunks past the last (code K) hold nothing.
    chunk = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dim_mask = dims < D
    code = tl.load(chunk_code_ptr + chunk)
    used = code < K
    first = tl.load(chunk_first_ptr + code)
    start = tl.load(offsets_ptr + code) + (chunk - first) * ROWS_PER_CHUNK
    stop = tl.minimum(start + ROWS_PER_CHUNK, tl.load(offsets_ptr + code + 1, mask=used, other=0))
    stop = tl.where(used, stop, start)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for block_start in range(start, stop, BLOCK_N):
        positions = block_start + tl.arange(0, BLOCK_N).to(tl.int64)
        pos_mask = positions < stop
        rows = tl.load(order_ptr + positions, mask=pos_mask, other=0)
        mask = pos_mask[:, None] & dim_mask[None, :]
        vals = tl.load(values_ptr + rows[:, None] * stride_row + dims[None, :] * stride_col, mask=mask, other=0.0)
        acc += tl.sum(vals.to(tl.float32), axis=0)
    # A branch, not the mask `dim_mask & used`: Triton 3.9's interpreter broadcasts the scalar `used` with
    # integer data, which a store refuses as a mask ("mask has unsupported dtype").
    if used:
        tl.store(partial_ptr + chunk * D + dims, acc, mask=dim_mask)


@triton.jit
def _segment_sum_partials_kernel(
    partial_ptr,
    chunk_first_ptr,
    sums_ptr,
    D,
    scale,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    code = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dim_mask = dims < D
    first = tl.load(chunk_first_ptr + code)
    last = tl.load(chunk_first_ptr + code + 1)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for block_start in range(first, last, BLOCK_C):
        chunks = block_start + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (chunks < last)[:, None] & dim_mask[None, :]
        acc += tl.sum(tl.load(partial_ptr + chunks[:, None] * D + dims[None, :], mask=mask, other=0.0), axis=0)
    tl.store(sums_ptr + code * D + dims, acc * scale, mask=dim_mask)


# One chunk's rows are summed by one program: a code with more rows is split across programs.
_ROWS_PER_CHUNK = 256
_INTERPRETER_ROWS_PER_CHUNK = 32


def _config(dim: int) -> triton.Config:
    """The block sizes of every segment-sum kernel for rows of ``dim`` values (BLOCK_N: rows, or
    chunks in the partials pass)."""
    if interpreting():
        return interpreter_config("BLOCK_N", "BLOCK_D")
    # Slices of at most 64 values: with 128, the atomic kernel's 64 x 128 tile of int64 offsets spills
    # registers on sm_90 (tests/backends/test_aot_compile.py).
    return triton.Config({"BLOCK_N": 64, "BLOCK_D": slice_width(dim, 64)}, num_warps=4, num_stages=3)


def _rows_per_chunk() -> int:
    return _INTERPRETER_ROWS_PER_CHUNK if interpreting() else _ROWS_PER_CHUNK


def _atomic_launch(sums, values, indices, scale, counts):
    num_rows, dim = values.shape
    args = (values, indices, sums, counts if counts is not None else sums, num_rows, sums.shape[0], dim,
            values.stride(0), values.stride(1), scale)
    return args, dict(COUNT=counts is not None)


def _sorted_launch(sums, values, indices, scale):
    """The deterministic path's bookkeeping (device tensors, no host sync) and both kernels' arguments;
    also the per-code counts."""
    num_rows, dim = values.shape
    num_codes = sums.shape[0]
    device = values.device
    rows_per_chunk = _rows_per_chunk()
    valid = (indices >= 0) & (indices < num_codes)
    keys = torch.where(valid, indices.long(), num_codes)
    order = torch.argsort(keys, stable=True)
    code_counts = torch.zeros(num_codes + 1, dtype=torch.int64, device=device)
    code_counts.index_add_(0, keys, torch.ones_like(keys))  # integer adds: exact in any order
    offsets = torch.zeros(num_codes + 1, dtype=torch.int64, device=device)
    torch.cumsum(code_counts[:num_codes], dim=0, out=offsets[1:])
    chunk_first = torch.zeros(num_codes + 1, dtype=torch.int64, device=device)
    torch.cumsum((code_counts[:num_codes] + rows_per_chunk - 1) // rows_per_chunk, dim=0, out=chunk_first[1:])
    # At most one partly filled chunk per code besides the full ones: a bound known on the host.
    max_chunks = triton.cdiv(num_rows, rows_per_chunk) + num_codes
    chunk_code = torch.searchsorted(chunk_first[1:], torch.arange(max_chunks, device=device), right=True)
    partial = torch.empty((max_chunks, dim), dtype=torch.float32, device=device)
    result = torch.empty_like(sums)
    chunk_args = (values, order, offsets, chunk_code, chunk_first, partial, num_codes, dim,
                  values.stride(0), values.stride(1))
    partials_args = (partial, chunk_first, result, dim, scale)
    return (chunk_args, dict(ROWS_PER_CHUNK=rows_per_chunk)), partials_args, result, max_chunks, code_counts


def _partials_blocks(config: triton.Config) -> dict:
    return {"BLOCK_C": config.kwargs["BLOCK_N"], "BLOCK_D": config.kwargs["BLOCK_D"]}


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
    config = _config(dim)
    block_d = config.kwargs["BLOCK_D"]
    indices = indices.contiguous()  # the kernels read indices with unit stride
    context = torch.cuda.device(values.device) if values.is_cuda else contextlib.nullcontext()
    with context:
        if not deterministic:
            args, meta = _atomic_launch(sums, values, indices, scale, counts)
            grid = (triton.cdiv(num_rows, config.kwargs["BLOCK_N"]), triton.cdiv(dim, block_d))
            _segment_sum_atomic_kernel[grid](*args, **meta, **config.all_kwargs())
            return
        (chunk_args, chunk_meta), partials_args, result, max_chunks, code_counts = _sorted_launch(
            sums, values, indices, scale
        )
        _segment_sum_chunk_kernel[(max_chunks, triton.cdiv(dim, block_d))](
            *chunk_args, **chunk_meta, **config.all_kwargs()
        )
        _segment_sum_partials_kernel[(num_codes, triton.cdiv(dim, block_d))](
            *partials_args, **_partials_blocks(config), num_warps=config.num_warps, num_stages=config.num_stages
        )
        sums += result
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


def compile_cases() -> list[CompileCase]:
    """The launches of ``segment_sum_``, for ``tests/backends/test_aot_compile.py`` (see ``CompileCase``):
    both paths for every dtype at D = 64 and for every BLOCK_D the launcher picks (16 to 128:
    D = 1, 24, 64, 200; 24 and 200 are no multiples of 16), column-major values, the atomic path
    with int32 indices and without counts, and odd N, K and D (18, 100) with sliced values."""
    cases = []

    def add(name, dtype=torch.float32, dim=64, index_dtype=torch.int64, count=True, transposed=False,
            sorted_path=True, odd=False):
        values = torch.zeros((dim, 1000) if transposed else (1000, dim), dtype=dtype)
        values = values.t() if transposed else values
        # Odd N and K, and values sliced so that their row stride and address are no multiple of 16.
        values = offset_rows(1001, dim, dtype) if odd else values
        indices = torch.zeros(values.shape[0], dtype=index_dtype)
        sums = torch.zeros(301 if odd else 300, dim)
        counts = torch.zeros(300, dtype=torch.int64) if count else None
        config = _config(dim)
        args, meta = _atomic_launch(sums, values, indices, 1.0, counts)
        cases.append(CompileCase(f"atomic {name}", _segment_sum_atomic_kernel, args, meta, (config,)))
        if not sorted_path:
            return
        (chunk_args, chunk_meta), partials_args, _, _, _ = _sorted_launch(sums, values, indices, 1.0)
        cases.append(CompileCase(f"sorted {name}", _segment_sum_chunk_kernel, chunk_args, chunk_meta, (config,)))
        if dtype == torch.float32 and not transposed:  # the partials are fp32 [chunks, D] whatever the values
            partials = triton.Config(_partials_blocks(config), num_warps=config.num_warps,
                                     num_stages=config.num_stages)
            cases.append(CompileCase(f"partials {name}", _segment_sum_partials_kernel, partials_args, {},
                                     (partials,)))

    for dtype, short in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        add(f"{short} D=64", dtype)
    for dim in (1, 24, 200):
        add(f"fp32 D={dim}", dim=dim)
    add("bf16 D=64 column-major", torch.bfloat16, transposed=True)
    add("fp32 D=64 int32 indices", index_dtype=torch.int32, sorted_path=False)
    add("fp32 D=64 no counts", count=False, sorted_path=False)
    add("fp32 D=18 N=1001 K=301 offset values", dim=18, odd=True)
    add("bf16 D=100 N=1001 K=301 offset values", torch.bfloat16, dim=100, odd=True)
    return cases
