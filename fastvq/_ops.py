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
    check_seed,
    check_temperature,
    check_tensor,
    check_float,
    check_same_device,
)
from .backends.common import SOFT_METRICS, compute_dtype
from .ops.search import check_search_inputs, lowest_duplicate, search_dtype


# --------------------------------------------------------------------------- soft_quantize


def check_soft_inputs(
    z: object, codebook: object, values: object = None, metric: object = "l2", temperature: object = 1.0
) -> None:
    """Checks ``z [N, D]``, ``codebook [K, D]``, ``values [K, Dv]`` (optional), the metric and the
    temperature of the soft-assignment ops."""
    if metric not in SOFT_METRICS:
        raise ValueError(f"metric must be one of {SOFT_METRICS}, got {metric!r}")
    check_search_inputs(z, codebook, "l2")
    if values is not None:
        values = check_tensor("values", values)
        if values.dim() != 2:
            raise ValueError(f"values must be 2-D [K, Dv], got shape {tuple(values.shape)}")
        check_float("values", values)
        if values.shape[0] != codebook.shape[0] or values.shape[1] < 1:
            raise ValueError(
                f"values must have one row per code and Dv >= 1: codebook of shape {tuple(codebook.shape)}, "
                f"values of shape {tuple(values.shape)}"
            )
        check_same_device(z=z, values=values)
    check_temperature("temperature", temperature)



def _soft_dtype(z: Tensor, codebook: Tensor, values: Optional[Tensor]) -> torch.dtype:
    dtype = search_dtype(z, codebook)
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
    return soft, lowest_duplicate(indices, codebook, seed is not None), lse


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
    backend = backends.select("soft_entropy", z, search_dtype(z, codebook))
    return backend.soft_entropy(z, codebook, metric, temperature)


@soft_entropy.register_fake
def _soft_entropy_fake(z, codebook, metric, temperature):
    _check_soft_entropy(z, codebook, metric, temperature)
    work = compute_dtype(search_dtype(z, codebook))
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
    backend = backends.select("soft_entropy_backward", z, search_dtype(z, codebook))
    return backend.soft_entropy_backward(
        grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, metric, temperature,
        compute_z_grad, compute_codebook_grad,
    )


@soft_entropy_backward.register_fake
def _soft_entropy_backward_fake(grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, metric,
                                temperature, compute_z_grad, compute_codebook_grad):
    work = compute_dtype(search_dtype(z, codebook))
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
