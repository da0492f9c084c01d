"""Vector-quantize backward: the gradient to ``z`` and the codebook gradient.

The forward is the fused search (``search.py``) plus a reduction of its distances; only the
backward needs a kernel of its own. ``_vector_quantize_bwd_kernel`` owns ``BLOCK_N`` rows and walks
their ``D`` in slices. It reads ``z``, the codes the forward chose (its ``quantized`` output, so a
codebook rewritten in place by an EMA step since then cannot leak in) and the output gradient,
and writes ``grad_z = T(grad_q) + grad_loss * commitment_scale * (z - e)``, where ``T`` is the
identity (straight-through estimator) or, with ``ROTATION``, the transpose of the rotation trick's
map (Fifty et al. 2024), which needs a first pass over the row for its dot products. On the atomic
path it adds ``-grad_loss * codebook_scale * (z - e)`` to the chosen codes' rows of the codebook
gradient, so only chosen codes are touched and no one-hot matrix exists; on the deterministic
path it writes ``z - e`` and the sorted segment reduce sums it.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .common import CompileCase, interpreter_config, interpreting, offset_rows, slice_width
from .segment_reduce import segment_sum_

# vector-quantize-pytorch's safe_div / l2norm floor for the rotation trick's norms.
ROTATION_EPS = 1e-6


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
    rotation_eps,
    CODEBOOK_GRAD: tl.constexpr,
    ATOMIC: tl.constexpr,
    ROTATION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_row = tl.program_id(0).to(tl.int64)
    rows = pid_row * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_mask = rows < N
    grad_loss = tl.load(grad_loss_ptr).to(tl.float32)
    codes = tl.load(indices_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    # An index outside [0, K) scatters nowhere.
    code_ok = row_mask & (codes >= 0) & (codes < K)

    if ROTATION:
        # With u = z/|z|, q = e/|e|, w = (u + q)/|u + q| and s = |e|/|z| (all held constant, as
        # in the paper), the forward is s (I - 2 w w^T + 2 q u^T) z = e, so the gradient is
        # s (g - 2 w (w.g) + 2 u (q.g)). The row's dot products come first.
        zz = tl.zeros((BLOCK_N,), tl.float32)
        ee = tl.zeros((BLOCK_N,), tl.float32)
        ze = tl.zeros((BLOCK_N,), tl.float32)
        gz = tl.zeros((BLOCK_N,), tl.float32)
        ge = tl.zeros((BLOCK_N,), tl.float32)
        for dim_start in range(0, D, BLOCK_D):
            dims = dim_start + tl.arange(0, BLOCK_D).to(tl.int64)
            mask = row_mask[:, None] & (dims < D)[None, :]
            z = tl.load(z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col, mask=mask, other=0.0)
            e = tl.load(
                quantized_ptr + rows[:, None] * stride_q_row + dims[None, :] * stride_q_col, mask=mask, other=0.0
            )
            g = tl.load(
                grad_quantized_ptr + rows[:, None] * stride_gq_row + dims[None, :] * stride_gq_col,
                mask=mask,
                other=0.0,
            )
            z = z.to(tl.float32)
            e = e.to(tl.float32)
            g = g.to(tl.float32)
            zz += tl.sum(z * z, axis=1)
            ee += tl.sum(e * e, axis=1)
            ze += tl.sum(z * e, axis=1)
            gz += tl.sum(g * z, axis=1)
            ge += tl.sum(g * e, axis=1)
        z_norm = tl.maximum(tl.sqrt(zz), rotation_eps)
        e_norm = tl.maximum(tl.sqrt(ee), rotation_eps)
        scale = tl.sqrt(ee) / z_norm
        uu = zz / (z_norm * z_norm)
        qq = ee / (e_norm * e_norm)
        uq = ze / (z_norm * e_norm)
        w_norm = tl.maximum(tl.sqrt(tl.maximum(uu + qq + 2.0 * uq, 0.0)), rotation_eps)
        g_dot_u = gz / z_norm
        g_dot_q = ge / e_norm
        g_dot_w = (g_dot_u + g_dot_q) / w_norm

    for dim_start in range(0, D, BLOCK_D):
        dims = dim_start + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = row_mask[:, None] & (dims < D)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col, mask=mask, other=0.0)
        e = tl.load(quantized_ptr + rows[:, None] * stride_q_row + dims[None, :] * stride_q_col, mask=mask, other=0.0)
        g = tl.load(
            grad_quantized_ptr + rows[:, None] * stride_gq_row + dims[None, :] * stride_gq_col, mask=mask, other=0.0
        )
        z = z.to(tl.float32)
        e = e.to(tl.float32)
        g = g.to(tl.float32)
        if ROTATION:
            u = z / z_norm[:, None]
            w = (u + e / e_norm[:, None]) / w_norm[:, None]
            g = scale[:, None] * (g - 2.0 * w * g_dot_w[:, None] + 2.0 * u * g_dot_q[:, None])
        diff = z - e
        grad_z = g + (grad_loss * commitment_scale) * diff
        tl.store(grad_z_ptr + rows[:, None] * D + dims[None, :], grad_z.to(grad_z_ptr.dtype.element_ty), mask=mask)
        if CODEBOOK_GRAD:
            if ATOMIC:
                tl.atomic_add(
                    grad_codebook_ptr + codes[:, None] * D + dims[None, :],
                    -(grad_loss * codebook_scale) * diff,
                    mask=mask & code_ok[:, None],
                    sem="relaxed",
                )
            else:
                tl.store(diff_ptr + rows[:, None] * D + dims[None, :], diff, mask=mask)


def _config(dim: int) -> triton.Config:
    if interpreting():
        return interpreter_config("BLOCK_N", "BLOCK_D")
    # Slices of at most 64 values: at 32 x 128, with every offset in int64, ptxas gives up on the
    # registers and spills about 2 KB a thread on sm_80 and sm_90 (tests/backends/test_aot_compile.py).
    # At most 32 where D is no multiple of 16, whose masks Triton cannot specialise: there 64-wide slices
    # spilled 40 B, and 400 to 470 B with the rotation trick.
    widest = 64 if dim % 16 == 0 else 32
    return triton.Config({"BLOCK_N": 32, "BLOCK_D": slice_width(dim, widest)}, num_warps=4, num_stages=3)


def _launch_arguments(grad_quantized, grad_loss, z, quantized, indices, num_codes, commitment_scale,
                      codebook_scale, compute_codebook_grad, rotation_trick, deterministic):
    """The outputs, the deterministic path's ``z - e`` rows, and the kernel's arguments."""
    num_rows, dim = z.shape
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad_codebook = torch.zeros((num_codes, dim), dtype=torch.float32, device=z.device)
    grad_loss = grad_loss.reshape(1).to(torch.float32)
    atomic = not deterministic
    diff_rows = num_rows if compute_codebook_grad and not atomic else 0
    diff = torch.empty((diff_rows, dim), dtype=torch.float32, device=z.device)
    args = (
        grad_quantized, grad_loss, z, quantized, indices, grad_z, grad_codebook,
        diff if diff_rows else grad_codebook,
        num_rows, num_codes, dim,
        grad_quantized.stride(0), grad_quantized.stride(1),
        z.stride(0), z.stride(1),
        quantized.stride(0), quantized.stride(1),
        commitment_scale, codebook_scale, ROTATION_EPS,
    )
    meta = dict(CODEBOOK_GRAD=compute_codebook_grad, ATOMIC=atomic, ROTATION=rotation_trick)
    return grad_z, grad_codebook, grad_loss, diff if diff_rows else None, args, meta


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
    rotation_trick: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_z, grad_codebook)``: ``z``'s dtype and fp32 ``[K, D]``."""
    num_rows, dim = z.shape
    if num_rows == 0:
        return (torch.empty(z.shape, dtype=z.dtype, device=z.device),
                torch.zeros((num_codes, dim), dtype=torch.float32, device=z.device))
    indices = indices.contiguous()  # the kernel reads indices with unit stride
    grad_z, grad_codebook, grad_loss, diff, args, meta = _launch_arguments(
        grad_quantized, grad_loss, z, quantized, indices, num_codes, commitment_scale, codebook_scale,
        compute_codebook_grad, rotation_trick, deterministic,
    )
    config = _config(dim)
    grid = (triton.cdiv(num_rows, config.kwargs["BLOCK_N"]),)
    context = torch.cuda.device(z.device) if z.is_cuda else contextlib.nullcontext()
    with context:
        _vector_quantize_bwd_kernel[grid](*args, **meta, **config.all_kwargs())
    if diff is not None:
        # grad_loss stays on the device: scaling after the sum avoids a host sync.
        segment_sum_(grad_codebook, diff, indices, scale=-codebook_scale, deterministic=True)
        grad_codebook *= grad_loss
    return grad_z, grad_codebook


def compile_cases() -> list[CompileCase]:
    """The launches of ``vector_quantize_backward``, for ``tests/backends/test_aot_compile.py`` (see
    ``CompileCase``): the atomic and the deterministic codebook gradient, none, and the rotation
    trick, for every dtype at D = 64; every BLOCK_D the launcher picks (D = 1, 24, 64); a D that is
    no multiple of 16 (24, 200); a column-major ``z``; odd N, K and D (18, 100) with a sliced ``z`` and
    output gradient."""
    cases = []

    def add(name, dtype=torch.float32, dim=64, codebook_grad=True, rotation=False, deterministic=False,
            transposed=False, odd=False):
        z = torch.zeros((dim, 1000) if transposed else (1000, dim), dtype=dtype)
        z = z.t() if transposed else z
        quantized = torch.zeros(1000, dim, dtype=dtype)
        grad_quantized = quantized
        if odd:  # odd N and K; z and its output gradient sliced (row stride and address no multiple of 16)
            z, grad_quantized = offset_rows(1001, dim, dtype), offset_rows(1001, dim, dtype)
            quantized = torch.zeros(1001, dim, dtype=dtype)
        indices = torch.zeros(z.shape[0], dtype=torch.int64)
        *_, args, meta = _launch_arguments(grad_quantized, torch.ones(()), z, quantized, indices, 301 if odd else 300,
                                           0.25, 1.0, codebook_grad, rotation, deterministic)
        cases.append(CompileCase(name, _vector_quantize_bwd_kernel, args, meta, (_config(dim),)))

    for dtype, short in ((torch.float32, "fp32"), (torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        add(f"atomic {short} D=64", dtype)
        add(f"deterministic {short} D=64", dtype, deterministic=True)
        add(f"rotation atomic {short} D=64", dtype, rotation=True)
    add("no codebook grad fp32 D=64", codebook_grad=False)
    add("rotation deterministic bf16 D=64", torch.bfloat16, rotation=True, deterministic=True)
    for dim in (1, 24, 200):
        add(f"atomic fp32 D={dim}", dim=dim)
    add("atomic bf16 D=64 column-major z", torch.bfloat16, transposed=True)
    add("rotation atomic fp32 D=100 N=1001 K=301 offset z and gradient", dim=100, rotation=True, odd=True)
    add("rotation deterministic bf16 D=18 N=1001 K=301 offset z and gradient", torch.bfloat16, dim=18,
        rotation=True, deterministic=True, odd=True)
    add("deterministic bf16 D=100 N=1001 K=301 offset z and gradient", torch.bfloat16, dim=100,
        deterministic=True, odd=True)
    return cases
