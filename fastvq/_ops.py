"""Every fastvq op declared once with ``torch.library``: schema, fake function, autograd.

Each op has a schema (inferred from the annotations), a fake implementation so ``torch.compile``
and ``torch.export`` can trace it without running it, autograd where it is differentiable, and
one real implementation that checks its inputs and then asks :func:`fastvq.backends.select` which
backend's function runs it. Nothing here knows about backends beyond that question.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import backends
from ._checks import check_code_entropy_grads, check_code_entropy_inputs


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
