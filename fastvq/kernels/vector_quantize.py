"""Vector-quantize backward: the straight-through gradient to ``z`` and the codebook gradient.

The forward is the fused search (``search.py``) plus a reduction of its distances; only the
backward needs a kernel of its own. ``_vector_quantize_bwd_kernel`` reads ``z``, the codes the
forward chose (its ``quantized`` output, so a codebook rewritten in place by an EMA step since
then cannot leak in) and the output gradient once, writes ``grad_z = grad_q + grad_loss * commitment_scale * (z - e)``
and, on the atomic path, adds ``-grad_loss * codebook_scale * (z - e)`` to the chosen codes' rows
of the codebook gradient, so only codes that were chosen are touched and no one-hot matrix
exists. On the deterministic path it writes ``z - e`` instead and the sorted segment reduce sums it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ._common import interpreting
from .segment_reduce import segment_sum_


@triton.jit
def _vector_quantize_bwd_kernel(
    grad_quantized_ptr,
    grad_loss_ptr,
    z_ptr,
    quantized_ptr,
    indices_ptr,
    grad_z_ptr,
    grad_codebook_ptr,
    diff_ptr,
    N,
    K,
    D,
    stride_gq_row,
    stride_gq_col,
    stride_z_row,
    stride_z_col,
    stride_q_row,
    stride_q_col,
    commitment_scale,
    codebook_scale,
    CODEBOOK_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_row = tl.program_id(0).to(tl.int64)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rows = pid_row * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    mask = row_mask[:, None] & (dims < D)[None, :]
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    codes = tl.load(indices_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    # An index outside [0, K) reads no code and scatters nowhere.
    code_mask = mask & ((codes >= 0) & (codes < K))[:, None]
    z = tl.load(z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col, mask=mask, other=0.0)
    e = tl.load(quantized_ptr + rows[:, None] * stride_q_row + dims[None, :] * stride_q_col, mask=mask, other=0.0)
    grad_q = tl.load(
        grad_quantized_ptr + rows[:, None] * stride_gq_row + dims[None, :] * stride_gq_col, mask=mask, other=0.0
    )
    diff = z.to(tl.float32) - e.to(tl.float32)
    grad_z = grad_q.to(tl.float32) + (grad_loss * commitment_scale) * diff
    tl.store(grad_z_ptr + rows[:, None] * D + dims[None, :], grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
    if CODEBOOK_GRAD:
        if ATOMIC:
            tl.atomic_add(
                grad_codebook_ptr + codes[:, None] * D + dims[None, :], -(grad_loss * codebook_scale) * diff, mask=code_mask
            )
        else:
            tl.store(diff_ptr + rows[:, None] * D + dims[None, :], diff, mask=mask)


def vector_quantize_backward(
    grad_quantized: torch.Tensor,
    grad_loss: torch.Tensor,
    z: torch.Tensor,
    quantized: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    commitment_scale: float,
    codebook_scale: float,
    compute_codebook_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_z, grad_codebook)``: ``z``'s dtype and fp32 ``[K, D]``."""
    num_rows, dim = z.shape
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad_codebook = torch.zeros((num_codes, dim), dtype=torch.float32, device=z.device)
    if num_rows == 0:
        return grad_z, grad_codebook
    grad_loss = grad_loss.reshape(1).to(torch.float32)
    indices = indices.contiguous()  # the kernel reads indices with unit stride
    atomic = not deterministic
    diff_rows = num_rows if compute_codebook_grad and not atomic else 0
    diff = torch.empty((diff_rows, dim), dtype=torch.float32, device=z.device)
    block_n, block_d = (16, 16) if interpreting() else (64, min(128, max(16, triton.next_power_of_2(dim))))
    grid = (triton.cdiv(num_rows, block_n), triton.cdiv(dim, block_d))
    context = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with context:
        _vector_quantize_bwd_kernel[grid](
            grad_quantized, grad_loss, z, quantized, indices, grad_z, grad_codebook,
            diff if diff_rows else grad_codebook,
            num_rows, num_codes, dim,
            grad_quantized.stride(0), grad_quantized.stride(1),
            z.stride(0), z.stride(1),
            quantized.stride(0), quantized.stride(1),
            commitment_scale, codebook_scale,
            CODEBOOK_GRAD=compute_codebook_grad, ATOMIC=atomic, BLOCK_N=block_n, BLOCK_D=block_d,
        )
    if diff_rows:
        # grad_loss stays on the device: scaling after the sum avoids a host sync.
        segment_sum_(grad_codebook, diff, indices, scale=-codebook_scale, deterministic=True)
        grad_codebook *= grad_loss
    return grad_z, grad_codebook
