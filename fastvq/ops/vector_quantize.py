"""Vector quantization with the straight-through estimator and VQ-VAE's two losses, in one search.

The public :func:`vector_quantize`, then the operator ``torch.ops.fastvq.vector_quantize`` (its check,
its real implementation, its fake), its backward operator ``torch.ops.fastvq.vector_quantize_backward``
and the autograd that joins them. The search itself is the ``search`` family's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_sampling, seed_tensor
from ..backends.common import CHUNK_BYTES
from .search import check_search_inputs, draw_seed, lowest_duplicate, search_dtype, search_op


def vector_quantize(
    z: Tensor,
    codebook: Tensor,
    *,
    beta: float = 0.25,
    metric: str = "l2",
    codebook_weight: float = 1.0,
    rotation_trick: bool = False,
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantizes ``z`` to its nearest codes with the straight-through estimator and VQ-VAE's losses.

    The forward value of ``quantized`` is the chosen code; its gradient goes to ``z`` unchanged
    (``z + (e - z).detach()``), or, with ``rotation_trick``, rotated and rescaled the way the
    rotation trick (Fifty et al. 2024) maps ``z`` onto its code. ``loss = codebook_weight * mean((sg[z] - e)^2) +
    beta * mean((z - sg[e])^2)`` (van den Oord et al. 2017): the first term trains the chosen
    codes only (a scatter-add, no one-hot matrix), the second commits ``z`` to its code.
    An empty batch (``N == 0``) has loss 0.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64.
        codebook: ``[K, D]``, on ``z``'s device; a ``Parameter`` to train it by gradient, or a
            tensor without grad (EMA training) to get only the commitment gradient.
        beta: commitment weight (0.25 in the paper).
        metric: the search metric, ``"l2"``, ``"cosine"`` or ``"dot"``. The losses are always
            squared errors between ``z`` and the chosen code; normalise both first for cosine codes.
        codebook_weight: weight of the codebook term (taming-transformers' ``legacy`` form puts
            ``beta`` here and 1 on the commitment term).
        rotation_trick: pass the output gradient to ``z`` through the rotation trick instead of
            straight through (the forward value is the same).
        sample_temperature, seed: sample each row's code instead of taking the nearest, as
            :func:`nearest_code` does (``seed`` drawn from PyTorch's RNG when omitted).

    Returns:
        ``(quantized [N, D] promoted dtype, indices int64 [N], loss float32 scalar)``. The loss
        is summed in fp32, or for float64 inputs in float64 and rounded to fp32 once.

    The codebook gradient is summed with float atomics on GPU, so its last bits can vary between
    runs; ``torch.use_deterministic_algorithms(True)`` selects a sorted, deterministic reduction.

    Raises:
        TypeError, ValueError: as ``nearest_code``; ``ValueError`` for a non-finite weight.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and isinstance(metric, str)):
        check_search_inputs(z, codebook, metric)  # the dispatcher would reject these types with its own message
    for name, value in (("beta", beta), ("codebook_weight", codebook_weight)):
        if not isinstance(value, (int, float)) or value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if sample_temperature > 0 and seed is None:
        seed = draw_seed(z.device)
    seed = seed_tensor(seed, z.device)
    return _vector_quantize_op(z, codebook, metric, float(beta), float(codebook_weight), bool(rotation_trick),
                               float(sample_temperature), seed)


# --------------------------------------------------------------------------- the operators


def _loss_scales(num_rows: int, dim: int, commitment_weight: float, codebook_weight: float) -> tuple[float, float]:
    """d mean((z - e)^2) / dz = 2 (z - e) / (N D); an empty batch has zero loss and gradient."""
    if num_rows == 0:
        return 0.0, 0.0
    unit = 2.0 / (num_rows * dim)
    return commitment_weight * unit, codebook_weight * unit


def _check_vector_quantize(z, codebook, metric, sample_temperature, seed) -> None:
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)


@torch.library.custom_op("fastvq::vector_quantize", mutates_args=())
def _vector_quantize_op(
    z: Tensor,
    codebook: Tensor,
    metric: str,
    commitment_weight: float,
    codebook_weight: float,
    rotation_trick: bool = False,
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Search, gather and the two VQ losses: ``(quantized [N, D], indices int64 [N], loss fp32 [])``
    (fp64 inputs: the loss summed in fp64, rounded to fp32 once).

    ``loss = codebook_weight * mean((sg[z] - e)^2) + commitment_weight * mean((z - sg[e])^2)``.
    ``quantized``'s gradient reaches ``z`` straight through, or rotated by the rotation trick.
    ``sample_temperature``/``seed`` sample the codes as in ``nearest_code``.
    """
    _check_vector_quantize(z, codebook, metric, sample_temperature, seed)
    dtype = search_dtype(z, codebook)
    backend = backends.select(search_op(sample_temperature), z, dtype)
    indices, distances, quantized = backend.nearest_code(z, codebook, metric, True, sample_temperature, seed)
    indices = lowest_duplicate(indices, codebook, sample_temperature > 0.0)
    num_rows, dim = z.shape
    if num_rows == 0:
        return quantized, indices, torch.zeros((), dtype=torch.float32, device=z.device)
    if metric == "l2" and dtype != torch.float64:
        squared_error = distances.sum(dtype=torch.float32)
    else:
        squared_error = _sum_squared_difference(z, quantized)
    loss = squared_error * ((commitment_weight + codebook_weight) / (num_rows * dim))
    return quantized, indices, loss


def _sum_squared_difference(z: Tensor, codes: Tensor) -> Tensor:
    # fp64 inputs are subtracted and summed in fp64 (rounding them to fp32 first loses the
    # difference of nearby z and e); the fp32 loss is rounded once, at the end.
    dtype = torch.float64 if codes.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=dtype, device=z.device)
    rows_per_chunk = max(1, CHUNK_BYTES // max(1, 8 * z.shape[1]))
    for start in range(0, z.shape[0], rows_per_chunk):
        diff = z[start : start + rows_per_chunk].to(dtype) - codes[start : start + rows_per_chunk].to(dtype)
        total += (diff * diff).sum()
    return total.float()


@_vector_quantize_op.register_fake
def _vector_quantize_fake(z, codebook, metric, commitment_weight, codebook_weight, rotation_trick=False,
                          sample_temperature=0.0, seed=None):
    _check_vector_quantize(z, codebook, metric, sample_temperature, seed)
    num_rows = z.shape[0]
    return (
        z.new_empty(z.shape, dtype=search_dtype(z, codebook)),
        z.new_empty(num_rows, dtype=torch.int64),
        z.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("fastvq::vector_quantize_backward", mutates_args=())
def _vector_quantize_backward_op(
    grad_quantized: Tensor,
    grad_loss: Tensor,
    z: Tensor,
    quantized: Tensor,
    indices: Tensor,
    num_codes: int,
    commitment_weight: float,
    codebook_weight: float,
    compute_codebook_grad: bool,
    rotation_trick: bool = False,
) -> tuple[Tensor, Tensor]:
    """``(grad_z [N, D] z's dtype, grad_codebook fp32 [K, D])`` of ``vector_quantize``.

    It reads the codes the forward chose (``quantized``), not the codebook, so a codebook that an
    EMA step rewrote in place after the forward cannot leak into the gradient. The codebook
    gradient is summed with float atomics unless PyTorch's deterministic mode is on.
    """
    num_rows, dim = z.shape
    commitment_scale, codebook_scale = _loss_scales(num_rows, dim, commitment_weight, codebook_weight)
    backend = backends.select("vector_quantize_backward", z, quantized.dtype)
    return backend.vector_quantize_backward(
        grad_quantized,
        grad_loss,
        z,
        quantized,
        indices,
        num_codes,
        commitment_scale,
        codebook_scale,
        compute_codebook_grad,
        rotation_trick,
        torch.are_deterministic_algorithms_enabled(),
    )


@_vector_quantize_backward_op.register_fake
def _vector_quantize_backward_fake(grad_quantized, grad_loss, z, quantized, indices, num_codes, commitment_weight,
                                   codebook_weight, compute_codebook_grad, rotation_trick=False):
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        z.new_empty((num_codes, z.shape[1]), dtype=torch.float32),
    )


def _vector_quantize_setup_context(ctx, inputs, output):
    z, codebook, metric, commitment_weight, codebook_weight, rotation_trick, _, _ = inputs
    quantized, indices, _ = output
    ctx.save_for_backward(z, quantized, indices)
    ctx.num_codes = codebook.shape[0]
    ctx.codebook_dtype = codebook.dtype
    ctx.weights = (commitment_weight, codebook_weight)
    ctx.rotation_trick = rotation_trick
    ctx.mark_non_differentiable(indices)


def _vector_quantize_autograd(ctx, grad_quantized, grad_indices, grad_loss):
    z, quantized, indices = ctx.saved_tensors
    commitment_weight, codebook_weight = ctx.weights
    if grad_quantized is None:
        grad_quantized = torch.zeros_like(quantized)
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=z.device)
    grad_z, grad_codebook = _vector_quantize_backward_op(
        grad_quantized,
        grad_loss,
        z,
        quantized,
        indices,
        ctx.num_codes,
        commitment_weight,
        codebook_weight,
        ctx.needs_input_grad[1],
        ctx.rotation_trick,
    )
    return (
        grad_z if ctx.needs_input_grad[0] else None,
        grad_codebook.to(ctx.codebook_dtype) if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_vector_quantize_op.register_autograd(_vector_quantize_autograd, setup_context=_vector_quantize_setup_context)
