"""Every fastvq op declared once with ``torch.library``: schema, fake function, autograd.

Each op has a schema (inferred from the annotations), a fake implementation so ``torch.compile``
and ``torch.export`` can trace it without running it, autograd where it is differentiable, and
one real implementation that checks its inputs and then asks :func:`fastvq.backends.select` which
backend's function runs it. Nothing here knows about backends beyond that question.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends
from ._checks import (
    check_code_entropy_grads,
    check_code_entropy_inputs,
    check_ema_inputs,
    check_masked_conv_inputs,
    check_sampling,
    check_search_inputs,
    check_seed,
    check_segment_inputs,
    check_soft_inputs,
    check_topk_inputs,
)
from .backends.common import CHUNK_BYTES, compute_dtype, output_memory_format, output_size, promoted_dtype
from .backends.duplicate_codes import find_duplicate_codes


def _promoted(a: Tensor, b: Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def _search_op(sample_temperature: float) -> str:
    return "gumbel_sample" if sample_temperature > 0.0 else "nearest_code"


def _lowest_duplicate(indices: Tensor, codebook: Tensor, sampled: bool) -> Tensor:
    """An argmin's indices with every exact duplicate code replaced by the lowest index of its
    group, so "ties go to the lowest index" holds whatever a backend's rounding chose (see
    ``backends.duplicate_codes.DuplicateCodes``). A sampled index is left alone: it names a code, not a tie."""
    if sampled or indices.numel() == 0:
        return indices
    groups = find_duplicate_codes(codebook)
    return indices if groups is None else groups.lowest(indices)


# --------------------------------------------------------------------------- nearest_code


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def nearest_code(
    z: Tensor,
    codebook: Tensor,
    metric: str = "l2",
    return_codes: bool = False,
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``z [N, D]``, ``codebook [K, D]`` -> ``(indices int64 [N], distances fp32 [N], codes)``.

    ``codes`` is ``[N, D]`` in the promoted dtype when ``return_codes`` else ``[0, D]``. With
    ``sample_temperature > 0`` the index is sampled from ``softmax(-distance / T)`` by Gumbel-max
    with noise drawn from the int64 ``seed`` tensor, instead of the argmin.
    """
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)
    backend = backends.select(_search_op(sample_temperature), z, _promoted(z, codebook))
    indices, distances, codes = backend.nearest_code(z, codebook, metric, return_codes, sample_temperature, seed)
    return _lowest_duplicate(indices, codebook, sample_temperature > 0.0), distances, codes


@nearest_code.register_fake
def _nearest_code_fake(z, codebook, metric="l2", return_codes=False, sample_temperature=0.0, seed=None):
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)
    num_rows, dim = z.shape
    return (
        z.new_empty(num_rows, dtype=torch.int64),
        z.new_empty(num_rows, dtype=torch.float32),
        z.new_empty((num_rows if return_codes else 0, dim), dtype=_promoted(z, codebook)),
    )


# --------------------------------------------------------------------------- segment_reduce


@torch.library.custom_op("fastvq::segment_reduce", mutates_args=())
def segment_reduce(values: Tensor, indices: Tensor, num_codes: int, deterministic: bool = False) -> tuple[Tensor, Tensor]:
    """``values [N, D]``, ``indices [N]`` -> ``(counts fp32 [K], sums fp32 [K, D])``."""
    check_segment_inputs(values, indices, num_codes)
    backend = backends.select("segment_reduce", values, values.dtype)
    return backend.segment_reduce(values, indices, num_codes, deterministic)


@segment_reduce.register_fake
def _segment_reduce_fake(values, indices, num_codes, deterministic=False):
    check_segment_inputs(values, indices, num_codes)
    return (
        values.new_empty(num_codes, dtype=torch.float32),
        values.new_empty((num_codes, values.shape[1]), dtype=torch.float32),
    )


# --------------------------------------------------------------------------- vector_quantize


def _loss_scales(num_rows: int, dim: int, commitment_weight: float, codebook_weight: float) -> tuple[float, float]:
    """d mean((z - e)^2) / dz = 2 (z - e) / (N D); an empty batch has zero loss and gradient."""
    if num_rows == 0:
        return 0.0, 0.0
    unit = 2.0 / (num_rows * dim)
    return commitment_weight * unit, codebook_weight * unit


@torch.library.custom_op("fastvq::vector_quantize", mutates_args=())
def vector_quantize(
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
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)
    dtype = _promoted(z, codebook)
    backend = backends.select(_search_op(sample_temperature), z, dtype)
    indices, distances, quantized = backend.nearest_code(z, codebook, metric, True, sample_temperature, seed)
    indices = _lowest_duplicate(indices, codebook, sample_temperature > 0.0)
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


@vector_quantize.register_fake
def _vector_quantize_fake(z, codebook, metric, commitment_weight, codebook_weight, rotation_trick=False,
                          sample_temperature=0.0, seed=None):
    check_search_inputs(z, codebook, metric)
    check_sampling(sample_temperature, seed, z)
    num_rows = z.shape[0]
    return (
        z.new_empty(z.shape, dtype=_promoted(z, codebook)),
        z.new_empty(num_rows, dtype=torch.int64),
        z.new_empty((), dtype=torch.float32),
    )


@torch.library.custom_op("fastvq::vector_quantize_backward", mutates_args=())
def vector_quantize_backward(
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


@vector_quantize_backward.register_fake
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
    grad_z, grad_codebook = torch.ops.fastvq.vector_quantize_backward(
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


vector_quantize.register_autograd(_vector_quantize_autograd, setup_context=_vector_quantize_setup_context)


# --------------------------------------------------------------------------- ema_update_


@torch.library.custom_op(
    "fastvq::ema_update_", mutates_args=("codebook", "cluster_size", "embed_avg", "step")
)
def ema_update_(
    codebook: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    z: Tensor,
    indices: Tensor,
    decay: float,
    eps: float,
    step: Optional[Tensor] = None,
    deterministic: bool = False,
) -> None:
    """EMA codebook update in place (see ``fastvq.ema_update_`` for the formulas)."""
    check_ema_inputs(codebook, cluster_size, embed_avg, z, indices, decay, eps, step)
    num_codes = codebook.shape[0]
    backend = backends.select("segment_reduce", z, z.dtype)
    counts, sums = backend.segment_reduce(z, indices, num_codes, deterministic)
    apply_ema_(codebook, cluster_size, embed_avg, counts, sums, decay, eps, step)


@ema_update_.register_fake
def _ema_update_fake(codebook, cluster_size, embed_avg, z, indices, decay, eps, step=None, deterministic=False):
    check_ema_inputs(codebook, cluster_size, embed_avg, z, indices, decay, eps, step)


def apply_ema_(
    codebook: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    counts: Tensor,
    sums: Tensor,
    decay: float,
    eps: float,
    step: Optional[Tensor],
) -> None:
    """Folds one batch's counts ``[K]`` and sums ``[K, D]`` into the moving averages, then
    renormalises the codebook. All of it is O(K D) elementwise work on the device, with no host
    synchronisation (the debiasing power ``decay^step`` is taken on the device too)."""
    cluster_size.lerp_(counts.to(cluster_size.dtype), 1.0 - decay)
    embed_avg.lerp_(sums.to(embed_avg.dtype), 1.0 - decay)
    sizes = cluster_size.float()
    averages = embed_avg.float()
    if step is not None:
        step.add_(1)
        correction = 1.0 - torch.pow(torch.tensor(decay, dtype=torch.float64, device=step.device), step.double())
        correction = correction.float().reshape(())
        sizes = sizes / correction
        averages = averages / correction
    num_codes = sizes.shape[0]
    total = sizes.sum()
    smoothed = (sizes + eps) / (total + num_codes * eps) * total
    # With no mass at all yet (a zero-started debiased average and an empty first batch) the
    # codes would be 0/0: they stay as they are instead.
    codebook.copy_(torch.where(total > 0, averages / smoothed[:, None], codebook))


# --------------------------------------------------------------------------- masked_conv2d

@torch.library.custom_op("fastvq::masked_conv2d", mutates_args=())
def masked_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask_type: str, padding: list[int]) -> Tensor:
    """``x [B, C_in, H, W]``, ``weight [C_out, C_in, kH, kW]`` -> ``[B, C_out, H_out, W_out]``, stride 1.

    Only the taps ``mask_type`` keeps are computed; ``padding`` is ``[pad_h, pad_w]``. The output
    has the promoted dtype and follows a channels-last ``x``.
    """
    check_masked_conv_inputs(x, weight, bias, mask_type, padding)
    backend = backends.select("masked_conv2d", x, promoted_dtype(x, weight, bias))
    return backend.masked_conv2d(x, weight, bias, mask_type, list(padding))


@masked_conv2d.register_fake
def _masked_conv2d_fake(x, weight, bias, mask_type, padding):
    pads = check_masked_conv_inputs(x, weight, bias, mask_type, padding)
    out_height, out_width = output_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], pads)
    return torch.empty(
        (x.shape[0], weight.shape[0], out_height, out_width),
        dtype=promoted_dtype(x, weight, bias),
        device=x.device,
        memory_format=output_memory_format(x),
    )


@torch.library.custom_op("fastvq::masked_conv2d_backward", mutates_args=())
def masked_conv2d_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    mask_type: str,
    padding: list[int],
    compute_input_grad: bool,
    compute_weight_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(grad_x, grad_weight)`` of ``masked_conv2d`` in ``x``'s and ``weight``'s dtypes; one not
    asked for is an empty tensor. The masked taps of ``grad_weight`` are exactly zero."""
    backend = backends.select("masked_conv2d_backward", x, promoted_dtype(x, weight, None))
    return backend.masked_conv2d_backward(
        grad_out, x, weight, mask_type, list(padding), compute_input_grad, compute_weight_grad
    )


@masked_conv2d_backward.register_fake
def _masked_conv2d_backward_fake(grad_out, x, weight, mask_type, padding, compute_input_grad, compute_weight_grad):
    grad_x = (
        torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
        if compute_input_grad
        else x.new_empty(0)
    )
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if compute_weight_grad else weight.new_empty(0)
    return grad_x, grad_weight


def _masked_conv2d_setup_context(ctx, inputs, output):
    x, weight, bias, mask_type, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.mask_type = mask_type
    ctx.padding = list(padding)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _masked_conv2d_autograd(ctx, grad):
    x, weight = ctx.saved_tensors
    needs_x, needs_weight, needs_bias = ctx.needs_input_grad[:3]
    grad_x = grad_weight = grad_bias = None
    if needs_x or needs_weight:
        grad_x, grad_weight = torch.ops.fastvq.masked_conv2d_backward(
            grad, x, weight, ctx.mask_type, ctx.padding, needs_x, needs_weight
        )
    if needs_bias:
        sum_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_bias = grad.sum(dim=(0, 2, 3), dtype=sum_dtype).to(ctx.bias_dtype)
    return (grad_x if needs_x else None), (grad_weight if needs_weight else None), grad_bias, None, None


masked_conv2d.register_autograd(_masked_conv2d_autograd, setup_context=_masked_conv2d_setup_context)


# --------------------------------------------------------------------------- soft_quantize


def _soft_dtype(z: Tensor, codebook: Tensor, values: Optional[Tensor]) -> torch.dtype:
    dtype = _promoted(z, codebook)
    return dtype if values is None else torch.promote_types(dtype, values.dtype)


def _check_soft_quantize(z, codebook, values, metric, temperature, seed, return_hard) -> None:
    check_soft_inputs(z, codebook, values, metric, temperature)
    if seed is not None:
        check_seed(seed, z)
        if not return_hard:
            raise ValueError("a seed (Gumbel noise) needs return_hard=True: the noise only enters the hard choice")


@torch.library.custom_op("fastvq::soft_quantize", mutates_args=())
def soft_quantize(
    z: Tensor,
    codebook: Tensor,
    values: Optional[Tensor],
    metric: str,
    temperature: float,
    seed: Optional[Tensor],
    return_hard: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(soft [N, Dv], indices int64 [N] or [0], lse [N])``: ``softmax(logits) @ values`` (the codebook
    when ``values`` is ``None``), the argmax of ``logits`` plus Gumbel noise drawn from ``seed``
    (plain argmax without one), and the row log-sum-exp, in fp32 (fp64 for fp64 inputs)."""
    _check_soft_quantize(z, codebook, values, metric, temperature, seed, return_hard)
    backend = backends.select("soft_quantize", z, _soft_dtype(z, codebook, values))
    soft, indices, lse = backend.soft_quantize(z, codebook, values, metric, temperature, seed, return_hard)
    return soft, _lowest_duplicate(indices, codebook, seed is not None), lse


@soft_quantize.register_fake
def _soft_quantize_fake(z, codebook, values, metric, temperature, seed, return_hard):
    _check_soft_quantize(z, codebook, values, metric, temperature, seed, return_hard)
    dtype = _soft_dtype(z, codebook, values)
    num_rows = z.shape[0]
    value_dim = codebook.shape[1] if values is None else values.shape[1]
    return (
        z.new_empty((num_rows, value_dim), dtype=dtype),
        z.new_empty(num_rows if return_hard else 0, dtype=torch.int64),
        z.new_empty(num_rows, dtype=compute_dtype(dtype)),
    )


@torch.library.custom_op("fastvq::soft_quantize_backward", mutates_args=())
def soft_quantize_backward(
    grad_soft: Tensor,
    grad_lse: Tensor,
    z: Tensor,
    codebook: Tensor,
    values: Optional[Tensor],
    soft: Tensor,
    lse: Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
    compute_values_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_z [N, D], grad_codebook [K, D], grad_values [K, Dv])`` of ``soft_quantize`` in fp32
    (fp64 for fp64 inputs), the probabilities recomputed code tile by code tile from ``lse``. A
    gradient not asked for is empty (``[0, D]``, ``[0, Dv]``), and so is ``grad_values`` without
    ``values``: the gradient through the values is then part of ``grad_codebook``."""
    backend = backends.select("soft_quantize_backward", z, _soft_dtype(z, codebook, values))
    return backend.soft_quantize_backward(
        grad_soft, grad_lse, z, codebook, values, soft, lse, metric, temperature, compute_z_grad,
        compute_codebook_grad, compute_values_grad,
    )


@soft_quantize_backward.register_fake
def _soft_quantize_backward_fake(grad_soft, grad_lse, z, codebook, values, soft, lse, metric, temperature,
                                 compute_z_grad, compute_codebook_grad, compute_values_grad):
    work = compute_dtype(_soft_dtype(z, codebook, values))
    value_dim = codebook.shape[1] if values is None else values.shape[1]
    value_rows = values.shape[0] if values is not None and compute_values_grad else 0
    return (
        z.new_empty((z.shape[0] if compute_z_grad else 0, z.shape[1]), dtype=work),
        z.new_empty((codebook.shape[0] if compute_codebook_grad else 0, codebook.shape[1]), dtype=work),
        z.new_empty((value_rows, value_dim), dtype=work),
    )


def _soft_quantize_setup_context(ctx, inputs, output):
    z, codebook, values, metric, temperature, _, _ = inputs
    soft, indices, lse = output
    ctx.save_for_backward(z, codebook, values, soft, lse)
    ctx.metric = metric
    ctx.temperature = temperature
    ctx.mark_non_differentiable(indices)


def _soft_quantize_autograd(ctx, grad_soft, grad_indices, grad_lse):
    z, codebook, values, soft, lse = ctx.saved_tensors
    if grad_soft is None:
        grad_soft = torch.zeros_like(soft)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    needs_z, needs_codebook, needs_values = ctx.needs_input_grad[:3]
    grad_z, grad_codebook, grad_values = torch.ops.fastvq.soft_quantize_backward(
        grad_soft, grad_lse, z, codebook, values, soft, lse, ctx.metric, ctx.temperature, needs_z, needs_codebook,
        needs_values,
    )
    return (
        grad_z.to(z.dtype) if needs_z else None,
        grad_codebook.to(codebook.dtype) if needs_codebook else None,
        grad_values.to(values.dtype) if needs_values else None,
        None,
        None,
        None,
        None,
    )


soft_quantize.register_autograd(_soft_quantize_autograd, setup_context=_soft_quantize_setup_context)


# --------------------------------------------------------------------------- soft_entropy


def _check_soft_entropy(z, codebook, metric, temperature) -> None:
    check_soft_inputs(z, codebook, None, metric, temperature)


@torch.library.custom_op("fastvq::soft_entropy", mutates_args=())
def soft_entropy(z: Tensor, codebook: Tensor, metric: str, temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_entropy [N], mean_probs [K], lse [N])`` of ``p = softmax(logits)``: each row's entropy,
    the batch mean of ``p`` per code and the row log-sum-exp, in fp32 (fp64 for fp64 inputs)."""
    _check_soft_entropy(z, codebook, metric, temperature)
    backend = backends.select("soft_entropy", z, _promoted(z, codebook))
    return backend.soft_entropy(z, codebook, metric, temperature)


@soft_entropy.register_fake
def _soft_entropy_fake(z, codebook, metric, temperature):
    _check_soft_entropy(z, codebook, metric, temperature)
    work = compute_dtype(_promoted(z, codebook))
    return (
        z.new_empty(z.shape[0], dtype=work),
        z.new_empty(codebook.shape[0], dtype=work),
        z.new_empty(z.shape[0], dtype=work),
    )


@torch.library.custom_op("fastvq::soft_entropy_backward", mutates_args=())
def soft_entropy_backward(
    grad_row_entropy: Tensor,
    grad_mean_probs: Tensor,
    grad_lse: Tensor,
    z: Tensor,
    codebook: Tensor,
    row_entropy: Tensor,
    lse: Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(grad_z [N, D], grad_codebook [K, D])`` of ``soft_entropy``, in fp32 (fp64 for fp64 inputs);
    a gradient not asked for is empty (``[0, D]``)."""
    backend = backends.select("soft_entropy_backward", z, _promoted(z, codebook))
    return backend.soft_entropy_backward(
        grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, metric, temperature,
        compute_z_grad, compute_codebook_grad,
    )


@soft_entropy_backward.register_fake
def _soft_entropy_backward_fake(grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, metric,
                                temperature, compute_z_grad, compute_codebook_grad):
    work = compute_dtype(_promoted(z, codebook))
    return (
        z.new_empty((z.shape[0] if compute_z_grad else 0, z.shape[1]), dtype=work),
        z.new_empty((codebook.shape[0] if compute_codebook_grad else 0, codebook.shape[1]), dtype=work),
    )


def _soft_entropy_setup_context(ctx, inputs, output):
    z, codebook, metric, temperature = inputs
    row_entropy, _, lse = output
    ctx.save_for_backward(z, codebook, row_entropy, lse)
    ctx.metric = metric
    ctx.temperature = temperature


def _soft_entropy_autograd(ctx, grad_row_entropy, grad_mean_probs, grad_lse):
    z, codebook, row_entropy, lse = ctx.saved_tensors
    if grad_row_entropy is None:
        grad_row_entropy = torch.zeros_like(row_entropy)
    if grad_mean_probs is None:
        grad_mean_probs = lse.new_zeros(codebook.shape[0])
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    needs_z, needs_codebook = ctx.needs_input_grad[:2]
    grad_z, grad_codebook = torch.ops.fastvq.soft_entropy_backward(
        grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, ctx.metric, ctx.temperature,
        needs_z, needs_codebook,
    )
    return (
        grad_z.to(z.dtype) if needs_z else None,
        grad_codebook.to(codebook.dtype) if needs_codebook else None,
        None,
        None,
    )


soft_entropy.register_autograd(_soft_entropy_autograd, setup_context=_soft_entropy_setup_context)
# --------------------------------------------------------------------------- code_entropy (LFQ)


@torch.library.custom_op("fastvq::code_entropy", mutates_args=())
def code_entropy(bit_logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``bit_logits [N, G, d]`` -> ``(sample_entropy [N, G], avg_probs [G, 2^d])``, float32 (float64
    for float64 input); see ``fastvq.functional.code_entropy``."""
    check_code_entropy_inputs(bit_logits, eps)
    backend = backends.select("code_entropy", bit_logits, bit_logits.dtype)
    return backend.code_entropy(bit_logits, float(eps))


def _code_entropy_dtype(bit_logits: Tensor) -> torch.dtype:
    return torch.float64 if bit_logits.dtype == torch.float64 else torch.float32


@code_entropy.register_fake
def _code_entropy_fake(bit_logits, eps):
    check_code_entropy_inputs(bit_logits, eps)
    num_rows, groups, num_bits = bit_logits.shape
    dtype = _code_entropy_dtype(bit_logits)
    return bit_logits.new_empty((num_rows, groups), dtype=dtype), bit_logits.new_empty((groups, 2**num_bits), dtype=dtype)


@torch.library.custom_op("fastvq::code_entropy_backward", mutates_args=())
def code_entropy_backward(grad_sample: Tensor, grad_avg: Tensor, bit_logits: Tensor, eps: float) -> Tensor:
    """The gradient ``[N, G, d]`` (``bit_logits``' dtype) of ``code_entropy``'s two outputs."""
    check_code_entropy_inputs(bit_logits, eps)
    check_code_entropy_grads(grad_sample, grad_avg, bit_logits)
    backend = backends.select("code_entropy_backward", bit_logits, bit_logits.dtype)
    return backend.code_entropy_backward(grad_sample, grad_avg, bit_logits, float(eps))


@code_entropy_backward.register_fake
def _code_entropy_backward_fake(grad_sample, grad_avg, bit_logits, eps):
    return torch.empty_like(bit_logits, memory_format=torch.contiguous_format)


def _code_entropy_setup_context(ctx, inputs, output):
    bit_logits, eps = inputs
    ctx.save_for_backward(bit_logits)
    ctx.eps = eps


def _code_entropy_autograd(ctx, grad_sample, grad_avg):
    (bit_logits,) = ctx.saved_tensors
    num_rows, groups, num_bits = bit_logits.shape
    dtype = _code_entropy_dtype(bit_logits)
    if grad_sample is None:
        grad_sample = bit_logits.new_zeros((num_rows, groups), dtype=dtype)
    if grad_avg is None:
        grad_avg = bit_logits.new_zeros((groups, 2**num_bits), dtype=dtype)
    return torch.ops.fastvq.code_entropy_backward(grad_sample, grad_avg, bit_logits, ctx.eps), None


code_entropy.register_autograd(_code_entropy_autograd, setup_context=_code_entropy_setup_context)


# --------------------------------------------------------------------------- nearest_codes (top-k)

# The Triton kernel holds each row's candidates in registers, up to this many.
MAX_REGISTER_TOPK = 64


def _topk_op(k: int, sample_temperature: float) -> str:
    name = "gumbel_topk" if sample_temperature > 0.0 else "nearest_codes"
    return name if k <= MAX_REGISTER_TOPK else name + "_wide"


@torch.library.custom_op("fastvq::nearest_codes", mutates_args=())
def nearest_codes(
    z: Tensor,
    codebook: Tensor,
    k: int,
    metric: str = "l2",
    sample_temperature: float = 0.0,
    seed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``z [N, D]``, ``codebook [K, D]``, ``1 <= k <= K`` -> ``(indices int64 [N, k], distances fp32 [N, k])``,
    each row's ``k`` nearest codes by ascending distance (ties to the lower index). With
    ``sample_temperature > 0``, ``k`` codes drawn without replacement from ``softmax(-distance / T)``
    (Gumbel-top-k, noise from the int64 ``seed`` tensor), still listed by ascending distance."""
    check_topk_inputs(z, codebook, k, metric)
    check_sampling(sample_temperature, seed, z)
    backend = backends.select(_topk_op(k, sample_temperature), z, _promoted(z, codebook))
    indices, distances = backend.nearest_codes(z, codebook, k, metric, sample_temperature, seed)
    if sample_temperature > 0.0 or indices.numel() == 0:
        return indices, distances
    groups = find_duplicate_codes(codebook)
    # Exact duplicates: a row lists the lowest members of each group, whatever the rounding chose.
    return (indices, distances) if groups is None else (groups.lowest_members(indices), distances)


@nearest_codes.register_fake
def _nearest_codes_fake(z, codebook, k, metric="l2", sample_temperature=0.0, seed=None):
    check_topk_inputs(z, codebook, k, metric)
    check_sampling(sample_temperature, seed, z)
    num_rows = z.shape[0]
    return z.new_empty((num_rows, k), dtype=torch.int64), z.new_empty((num_rows, k), dtype=torch.float32)
