"""The PyTorch path's ``vector_quantize`` backward: the straight-through (or rotation-trick) gradient
to ``z`` and the codebook-loss gradient scattered to the chosen codes, in row chunks."""

from __future__ import annotations

import torch

from .. import common
from ..common import compute_dtype
from ._scatter import deterministic_scatter


def rotation_trick_grad(grad: torch.Tensor, z: torch.Tensor, codes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The rotation trick's gradient (Fifty et al. 2024) for rows of ``z`` quantized to ``codes``.

    With ``u = z/|z|``, ``q = e/|e|``, ``w = (u + q)/|u + q|`` and ``s = |e|/|z|`` held constant,
    the forward ``s (I - 2 w w^T + 2 q u^T) z`` equals ``e``; its transpose sends ``g`` to
    ``s (g - 2 w (w.g) + 2 u (q.g))``. ``eps`` floors the norms as vector-quantize-pytorch does.
    """
    z_norm = z.norm(dim=1, keepdim=True)
    e_norm = codes.norm(dim=1, keepdim=True)
    u = z / z_norm.clamp_min(eps)
    q = codes / e_norm.clamp_min(eps)
    w = u + q
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    scale = e_norm / z_norm.clamp_min(eps)
    return scale * (
        grad - 2.0 * w * (grad * w).sum(dim=1, keepdim=True) + 2.0 * u * (grad * q).sum(dim=1, keepdim=True)
    )


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
    """The gradient to ``z`` and the codebook-loss gradient to the chosen codes only.

    With ``e_i = quantized[i]`` the code row ``i`` chose:
    ``grad_z = T(grad_q) + grad_loss * commitment_scale * (z - e)``, ``T`` the identity
    (straight-through) or the rotation trick's transpose, and
    ``grad_codebook[k] = grad_loss * codebook_scale * sum_{i: idx_i = k} (e_i - z_i)`` (fp32), where
    the scales already hold ``2 * weight / (N * D)``. Indices outside ``[0, K)`` scatter nowhere.
    """
    num_rows, dim = z.shape
    work_dtype = compute_dtype(quantized.dtype)
    scale = grad_loss.to(work_dtype)
    grad_z = torch.empty(z.shape, dtype=z.dtype, device=z.device)
    grad_codebook = torch.zeros(num_codes + 1, dim, dtype=work_dtype, device=z.device)
    rows_per_chunk = max(1, common.CHUNK_BYTES // max(1, dim * 8))
    with deterministic_scatter(deterministic):
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            z_rows = z[rows].to(work_dtype)
            codes = quantized[rows].to(work_dtype)
            grad_rows = grad_quantized[rows].to(work_dtype)
            if rotation_trick:
                grad_rows = rotation_trick_grad(grad_rows, z_rows, codes)
            diff = z_rows - codes
            grad_z[rows] = grad_rows + (scale * commitment_scale) * diff
            if compute_codebook_grad:
                chosen = indices[rows]
                safe = torch.where((chosen >= 0) & (chosen < num_codes), chosen.long(), num_codes)
                grad_codebook.index_add_(0, safe, diff, alpha=-codebook_scale)
    grad_codebook = grad_codebook[:num_codes] * scale
    return grad_z, grad_codebook.float()
