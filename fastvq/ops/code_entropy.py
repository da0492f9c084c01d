"""The two entropy terms of lookup-free quantization over ``2^d`` implicit codes, never ``N x 2^d``.

The public :func:`code_entropy`, then the operator ``torch.ops.fastvq.code_entropy`` (its check, its real
implementation, its fake), its backward operator ``torch.ops.fastvq.code_entropy_backward`` and the
autograd that joins them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_same_device, check_tensor, is_real

# vector-quantize-pytorch's floor inside the entropy's log.
ENTROPY_EPS = 1e-5


def code_entropy(bit_logits: Tensor, *, eps: float = ENTROPY_EPS) -> tuple[Tensor, Tensor]:
    """The two entropy terms of lookup-free quantization over ``2^d`` implicit codes, never ``N x 2^d``.

    Row ``n`` of group ``g`` puts probability ``p(n, c) = prod_b sigmoid((2 c_b - 1) l_b)`` on code
    ``c`` (bits ``c_b``, the first the most significant), which is the softmax over codes of the
    logit ``sum_b c_b l_b``: LFQ's ``softmax(-distance * inv_temperature)`` with ``l_b = 4 *
    inv_temperature * a * x_b`` for codes ``+-a``. Returns

    - ``sample_entropy [N, G]``: ``-sum_c p log max(p, eps)``, each row's clamped entropy (what
      vector-quantize-pytorch's ``per_sample_entropy`` averages), and
    - ``avg_probs [G, 2^d]``: ``mean_n p(n, c)``, the batch-mean distribution (``NaN`` for ``N = 0``,
      as a mean over nothing); its :func:`clamped_entropy` is LFQ's codebook entropy.

    Both come from the per-row products over the high and the low half of the bits,
    ``[N, 2^(d/2)]`` each: the mean is their GEMM, the clamped entropy is exact from sorted prefix
    sums, and the backward (autograd, to ``bit_logits``) reuses both (see
    ``fastvq/backends/torch/code_entropy.py``). Memory is ``O(rows x 2^(d/2))`` per chunk plus the
    ``G x 2^d`` output; vector-quantize-pytorch's LFQ builds ``N x 2^d`` several times over.

    Reuse: another quantizer whose assignments are not a product over bits (IBQ's softmax over an
    explicit codebook, say) streams its own ``sample_entropy [N]`` and ``avg_probs [K]`` and combines
    them the way LFQ does: ``loss = sample_entropy.mean() - diversity_gamma * clamped_entropy(avg_probs)``.

    Args:
        bit_logits: ``[N, G, d]`` float32, float16, bfloat16 or float64; ``N >= 0``, ``G >= 1``
            groups (LFQ's codebooks), ``1 <= d <= 30`` bits.
        eps: the clamp inside the log, ``> 0`` (vector-quantize-pytorch's ``1e-5``).

    Returns:
        ``(sample_entropy, avg_probs)``, float32 (float64 for float64 input). CPU tensors run the
        PyTorch path (batched GEMMs and sorts); CUDA tensors run fastvq's Triton kernels, which
        compute the per-row entropy and the backward directly over code tiles.

    Raises:
        TypeError: a non-tensor or a non-float tensor.
        ValueError: not 3-D, ``d`` outside ``[1, 30]``, or ``eps <= 0``.
    """
    if not (isinstance(bit_logits, Tensor) and is_real(eps)):
        check_code_entropy_inputs(bit_logits, eps)  # the dispatcher would reject these types with its own message
    return _code_entropy_op(bit_logits, float(eps))


# --------------------------------------------------------------------------- the operators

# 2^30 codes: the batch-mean distribution alone is then 4 GiB per group.
MAX_CODE_BITS = 30


def check_code_entropy_inputs(bit_logits: object, eps: object) -> None:
    """Checks ``bit_logits [N, G, d]`` (float, ``1 <= d <= 30``) and the clamp ``eps > 0``."""
    bit_logits = check_tensor("bit_logits", bit_logits)
    if bit_logits.dim() != 3:
        raise ValueError(f"bit_logits must be 3-D [N, G, d], got shape {tuple(bit_logits.shape)}")
    check_float("bit_logits", bit_logits)
    groups, num_bits = bit_logits.shape[1:]
    if groups < 1 or not 1 <= num_bits <= MAX_CODE_BITS:
        raise ValueError(
            f"bit_logits must have G >= 1 groups of 1 <= d <= {MAX_CODE_BITS} bits, got shape {tuple(bit_logits.shape)}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite float > 0, got {eps!r}")


def check_code_entropy_grads(grad_sample: object, grad_avg: object, bit_logits: torch.Tensor) -> None:
    num_rows, groups, num_bits = bit_logits.shape
    for name, value, shape in (("grad_sample", grad_sample, (num_rows, groups)),
                               ("grad_avg", grad_avg, (groups, 2**num_bits))):
        value = check_tensor(name, value)
        check_float(name, value)
        if tuple(value.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for bit_logits of shape {tuple(bit_logits.shape)}, "
                             f"got {tuple(value.shape)}")
        check_same_device(bit_logits=bit_logits, **{name: value})


@torch.library.custom_op("fastvq::code_entropy", mutates_args=())
def _code_entropy_op(bit_logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``bit_logits [N, G, d]`` -> ``(sample_entropy [N, G], avg_probs [G, 2^d])``, float32 (float64
    for float64 input); see ``fastvq.functional.code_entropy``."""
    check_code_entropy_inputs(bit_logits, eps)
    backend = backends.select("code_entropy", bit_logits, bit_logits.dtype)
    return backend.code_entropy(bit_logits, float(eps))


def _code_entropy_dtype(bit_logits: Tensor) -> torch.dtype:
    return torch.float64 if bit_logits.dtype == torch.float64 else torch.float32


@_code_entropy_op.register_fake
def _code_entropy_fake(bit_logits, eps):
    check_code_entropy_inputs(bit_logits, eps)
    num_rows, groups, num_bits = bit_logits.shape
    dtype = _code_entropy_dtype(bit_logits)
    return (
        bit_logits.new_empty((num_rows, groups), dtype=dtype),
        bit_logits.new_empty((groups, 2**num_bits), dtype=dtype),
    )


@torch.library.custom_op("fastvq::code_entropy_backward", mutates_args=())
def _code_entropy_backward_op(grad_sample: Tensor, grad_avg: Tensor, bit_logits: Tensor, eps: float) -> Tensor:
    """The gradient ``[N, G, d]`` (``bit_logits``' dtype) of ``code_entropy``'s two outputs."""
    check_code_entropy_inputs(bit_logits, eps)
    check_code_entropy_grads(grad_sample, grad_avg, bit_logits)
    backend = backends.select("code_entropy_backward", bit_logits, bit_logits.dtype)
    return backend.code_entropy_backward(grad_sample, grad_avg, bit_logits, float(eps))


@_code_entropy_backward_op.register_fake
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
    return _code_entropy_backward_op(grad_sample, grad_avg, bit_logits, ctx.eps), None


_code_entropy_op.register_autograd(_code_entropy_autograd, setup_context=_code_entropy_setup_context)
