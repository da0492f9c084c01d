"""Soft assignments over an explicit codebook, streamed as flash attention streams keys: the soft codes
``softmax(logits) @ codebook`` with the hard (or Gumbel-max) choice (``soft_quantize``), and the
entropies of that softmax (``soft_entropy``).

The public :func:`soft_quantize` and :func:`soft_entropy`, then their operators
``torch.ops.fastvq.soft_quantize`` and ``torch.ops.fastvq.soft_entropy`` (each with the check its real
implementation and its fake share), their backward operators and the autograd that joins them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_same_device, check_seed, check_temperature, check_tensor, is_real, seed_tensor
from ..backends.common import compute_dtype
from ..backends.soft_codebook import SOFT_METRICS
from .search import check_search_inputs, draw_seed, lowest_duplicate, search_dtype


def soft_quantize(
    z: Tensor,
    codebook: Tensor,
    *,
    metric: str = "l2",
    temperature: float = 1.0,
    gumbel: bool = False,
    seed: Optional[Tensor] = None,
    return_hard: bool = True,
    values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor]:
    """Soft codes ``softmax(logits) @ codebook`` and the hard choice, without the ``N x K`` matrix.

    The logits are ``s(z, e_k) / temperature`` with the similarity ``s``:

    - ``"l2"``: ``-|z - e|^2`` (the negative squared distance);
    - ``"euclidean"``: ``-|z - e|``, the plain distance (``-cdist``, as vector-quantize-pytorch's
      logits), its square floored at ``1e-8`` as theirs is;
    - ``"cosine"``: ``z.e / (|z| |e|)`` (norms floored at ``1e-12``, as ``F.normalize``);
    - ``"dot"``: ``z.e`` (IBQ's logits).

    Computed the way flash attention computes attention, with ``z`` as queries and the codebook as
    keys and values: code tiles are streamed, each row keeps a running maximum, a running sum of
    ``exp(logit - max)`` and a running weighted sum of codes. The backward recomputes the
    probabilities tile by tile from the saved log-sum-exp; memory stays ``O((N + K) D)``.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides; ``N`` may be 0.
        codebook: ``[K, D]`` floating point, ``K >= 1``, on ``z``'s device; dtypes are promoted.
        metric: ``"l2"``, ``"euclidean"``, ``"cosine"`` or ``"dot"``.
        temperature: ``T > 0``, finite.
        gumbel: add standard Gumbel noise to the logits before the hard argmax, so that the hard
            index is a sample from ``softmax(logits)`` (Gumbel-max). The noise enters the hard
            choice only: the soft assignment stays ``softmax(logits)``, as in vector-quantize-pytorch's
            Gumbel straight-through, so the backward needs no noise. Needs ``return_hard``.
        seed: int64 one-element tensor on ``z``'s device (or a Python int) keying the noise; drawn from PyTorch's RNG
            when omitted (``torch.manual_seed`` makes it reproducible). The noise of (row ``n``,
            code ``k``) is a function of ``(seed, n, k)`` only (Philox-4x32-10 at a counter made of
            ``n`` and ``k``), so every backend, chunking and tiling draws exactly the same noise.
        return_hard: also return the hard indices.
        values: optional ``[K, Dv]`` vectors averaged by the probabilities instead of the codes
            (``values=codebook.detach()`` gives IBQ's gradient, which reaches the codebook only
            through the logits).

    Returns:
        ``(soft, indices, lse)`` or, without ``return_hard``, ``(soft, lse)``: ``soft`` ``[N, Dv]``
        in the promoted dtype; ``indices`` int64 ``[N]``, the argmax of the logits (plus noise),
        ties to the lowest index; ``lse`` ``[N]`` the row's ``logsumexp(logits)`` (noise-free), float32
        (float64 for float64 inputs). ``soft`` and ``lse`` are differentiable with respect to ``z``,
        ``codebook`` and ``values``.

    A code with a NaN or infinite entry is excluded: probability 0, never chosen, no contribution
    and zero gradient. A row of ``z`` with a NaN gets index 0 and NaN ``soft`` and ``lse``, so the
    loss turns NaN visibly. Accumulation is fp32 for every dtype (fp64 for fp64); the forward and
    backward are deterministic.

    Raises:
        TypeError: a non-tensor or an integer/bool tensor.
        ValueError: ``z``, ``codebook`` or ``values`` not 2-D, mismatched ``D`` or ``K``, ``K == 0``,
            different devices, an unknown metric, a temperature that is not a finite float > 0, a
            seed without ``gumbel``, or ``gumbel`` without ``return_hard``.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and (values is None or isinstance(values, Tensor))
            and isinstance(metric, str) and is_real(temperature)):
        check_soft_inputs(z, codebook, values, metric, temperature)  # the dispatcher would reject these types
    if gumbel and not return_hard:
        raise ValueError("gumbel=True needs return_hard=True: the noise only enters the hard choice")
    if seed is not None and not gumbel:
        raise ValueError("seed keys the Gumbel noise: pass gumbel=True with it")
    if gumbel and seed is None:
        seed = draw_seed(z.device)
    seed = seed_tensor(seed, z.device)
    soft, indices, lse = _soft_quantize_op(
        z, codebook, values, metric, float(temperature), seed if gumbel else None, bool(return_hard)
    )
    return (soft, indices, lse) if return_hard else (soft, lse)


def soft_entropy(
    z: Tensor, codebook: Tensor, *, metric: str = "dot", temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """The entropies of the soft assignment ``p = softmax(logits)`` over explicit codes, streamed.

    The logits are those of :func:`soft_quantize`. Returns ``(row_entropy [N], mean_probs [K])``:
    ``row_entropy[n] = -sum_k p[n, k] log p[n, k]`` and ``mean_probs[k] = mean_n p[n, k]``, from which
    the usual entropy losses follow in ``O(N + K)``: the per-sample entropy ``row_entropy.mean()``
    and the batch (codebook-usage) entropy ``-(mean_probs * log(mean_probs + eps)).sum()`` (IBQ's
    and MAGVIT's ``compute_entropy_loss``). Both are differentiable with respect to ``z`` and
    ``codebook``.

    Two passes over the codebook per row tile: the first carries the online softmax and the
    running ``sum p * logit`` (``H = lse - <p, logits>``); the second adds the probabilities of the
    tile's rows to the per-code sums, which needs each row's final log-sum-exp. The backward takes
    two more: ``<p_n, dL/dmean_probs>`` per row, then the gradient. Nothing of size ``N x K`` exists.

    Args:
        z: ``[N, D]`` floating point; ``N`` may be 0 (then ``mean_probs`` is all zeros).
        codebook: ``[K, D]`` floating point on ``z``'s device.
        metric: as in :func:`soft_quantize` (default ``"dot"``, IBQ's logits).
        temperature: ``T > 0`` (IBQ's entropy temperature is 0.01).

    Returns:
        ``(row_entropy, mean_probs)`` in float32 (float64 for float64 inputs). Excluded codes (NaN
        or infinite entries) have probability 0; a NaN row of ``z`` makes its entropy and every
        ``mean_probs`` entry NaN. At any temperature, however sharp, each row entropy lies in
        ``[0, log K]`` and each row's probabilities sum to 1 (so does ``mean_probs``).

    Raises:
        TypeError, ValueError: as :func:`soft_quantize`.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and isinstance(metric, str)
            and is_real(temperature)):
        check_soft_inputs(z, codebook, None, metric, temperature)  # the dispatcher would reject these types
    row_entropy, mean_probs, _ = _soft_entropy_op(z, codebook, metric, float(temperature))
    return row_entropy, mean_probs


# --------------------------------------------------------------------------- the operators


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
def _soft_quantize_op(
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


@_soft_quantize_op.register_fake
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
def _soft_quantize_backward_op(
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


@_soft_quantize_backward_op.register_fake
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
    grad_z, grad_codebook, grad_values = _soft_quantize_backward_op(
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


_soft_quantize_op.register_autograd(_soft_quantize_autograd, setup_context=_soft_quantize_setup_context)




def _check_soft_entropy(z, codebook, metric, temperature) -> None:
    check_soft_inputs(z, codebook, None, metric, temperature)


@torch.library.custom_op("fastvq::soft_entropy", mutates_args=())
def _soft_entropy_op(
    z: Tensor, codebook: Tensor, metric: str, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(row_entropy [N], mean_probs [K], lse [N])`` of ``p = softmax(logits)``: each row's entropy,
    the batch mean of ``p`` per code and the row log-sum-exp, in fp32 (fp64 for fp64 inputs)."""
    _check_soft_entropy(z, codebook, metric, temperature)
    backend = backends.select("soft_entropy", z, search_dtype(z, codebook))
    return backend.soft_entropy(z, codebook, metric, temperature)


@_soft_entropy_op.register_fake
def _soft_entropy_fake(z, codebook, metric, temperature):
    _check_soft_entropy(z, codebook, metric, temperature)
    work = compute_dtype(search_dtype(z, codebook))
    return (
        z.new_empty(z.shape[0], dtype=work),
        z.new_empty(codebook.shape[0], dtype=work),
        z.new_empty(z.shape[0], dtype=work),
    )


@torch.library.custom_op("fastvq::soft_entropy_backward", mutates_args=())
def _soft_entropy_backward_op(
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


@_soft_entropy_backward_op.register_fake
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
    grad_z, grad_codebook = _soft_entropy_backward_op(
        grad_row_entropy, grad_mean_probs, grad_lse, z, codebook, row_entropy, lse, ctx.metric, ctx.temperature,
        needs_z, needs_codebook,
    )
    return (
        grad_z.to(z.dtype) if needs_z else None,
        grad_codebook.to(codebook.dtype) if needs_codebook else None,
        None,
        None,
    )


_soft_entropy_op.register_autograd(_soft_entropy_autograd, setup_context=_soft_entropy_setup_context)


# --------------------------------------------------------------------------- soft codes and entropies, fused


def soft_quantize_entropy(
    z: Tensor,
    codebook: Tensor,
    *,
    metric: str = "dot",
    temperature: float = 1.0,
    entropy_temperature: float = 1.0,
    values: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`soft_quantize` and :func:`soft_entropy` of the same logits in one op, for IBQ's layer
    (soft codes at ``temperature``, entropy losses at ``entropy_temperature``, one logit matrix).

    Each code tile's products ``s(z, e_k)`` are computed once and divided by both temperatures: on
    CPU (the C++ kernels) the forward takes two passes over the codebook where the two ops take three,
    the backward two where they take four (``<p_n, dL/dmean_probs>`` per row, then one pass whose
    tile gives both softmaxes' weights). The PyTorch and Triton paths run the two ops' passes one
    after the other (same results).

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides; ``N`` may be 0.
        codebook: ``[K, D]`` floating point, ``K >= 1``, on ``z``'s device; dtypes are promoted.
        metric: ``"l2"``, ``"euclidean"``, ``"cosine"`` or ``"dot"`` (default, IBQ's), as in
            :func:`soft_quantize`.
        temperature: ``T > 0`` of the soft codes and the hard choice.
        entropy_temperature: ``T > 0`` of the entropies (IBQ's is 0.01).
        values: optional ``[K, Dv]`` vectors averaged instead of the codes, as in :func:`soft_quantize`.

    Returns:
        ``(soft, indices, row_entropy, mean_probs)``: ``soft`` ``[N, Dv]`` in the promoted dtype and
        ``indices`` int64 ``[N]`` as :func:`soft_quantize` returns them (no Gumbel noise); ``row_entropy``
        ``[N]`` and ``mean_probs`` ``[K]`` as :func:`soft_entropy` returns them at
        ``entropy_temperature`` (float32, float64 for float64 inputs). ``soft``, ``row_entropy`` and
        ``mean_probs`` are differentiable with respect to ``z``, ``codebook`` and ``values``.

    Excluded codes, NaN rows, accumulation and determinism are as in the two ops.

    Raises:
        TypeError, ValueError: as :func:`soft_quantize`, and for an ``entropy_temperature`` that is
            not a finite float > 0.
    """
    if not (isinstance(z, Tensor) and isinstance(codebook, Tensor) and (values is None or isinstance(values, Tensor))
            and isinstance(metric, str) and is_real(temperature) and is_real(entropy_temperature)):
        _check_soft_quantize_entropy(z, codebook, values, metric, temperature, entropy_temperature)
    soft, indices, _, row_entropy, mean_probs, _ = _soft_quantize_entropy_op(
        z, codebook, values, metric, float(temperature), float(entropy_temperature)
    )
    return soft, indices, row_entropy, mean_probs


def _check_soft_quantize_entropy(z, codebook, values, metric, temperature, entropy_temperature) -> None:
    check_soft_inputs(z, codebook, values, metric, temperature)
    check_temperature("entropy_temperature", entropy_temperature)


@torch.library.custom_op("fastvq::soft_quantize_entropy", mutates_args=())
def _soft_quantize_entropy_op(
    z: Tensor,
    codebook: Tensor,
    values: Optional[Tensor],
    metric: str,
    temperature: float,
    entropy_temperature: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(soft [N, Dv], indices int64 [N], lse [N], row_entropy [N], mean_probs [K], entropy_lse [N])``:
    ``soft_quantize``'s outputs at ``temperature`` and ``soft_entropy``'s at ``entropy_temperature``,
    the log-sum-exps in fp32 (fp64 for fp64 inputs)."""
    _check_soft_quantize_entropy(z, codebook, values, metric, temperature, entropy_temperature)
    backend = backends.select("soft_quantize_entropy", z, _soft_dtype(z, codebook, values))
    soft, indices, lse, row_entropy, mean_probs, entropy_lse = backend.soft_quantize_entropy(
        z, codebook, values, metric, temperature, entropy_temperature
    )
    return soft, lowest_duplicate(indices, codebook, False), lse, row_entropy, mean_probs, entropy_lse


@_soft_quantize_entropy_op.register_fake
def _soft_quantize_entropy_fake(z, codebook, values, metric, temperature, entropy_temperature):
    _check_soft_quantize_entropy(z, codebook, values, metric, temperature, entropy_temperature)
    dtype = _soft_dtype(z, codebook, values)
    work = compute_dtype(dtype)
    num_rows = z.shape[0]
    value_dim = codebook.shape[1] if values is None else values.shape[1]
    return (
        z.new_empty((num_rows, value_dim), dtype=dtype),
        z.new_empty(num_rows, dtype=torch.int64),
        z.new_empty(num_rows, dtype=work),
        z.new_empty(num_rows, dtype=work),
        z.new_empty(codebook.shape[0], dtype=work),
        z.new_empty(num_rows, dtype=work),
    )


@torch.library.custom_op("fastvq::soft_quantize_entropy_backward", mutates_args=())
def _soft_quantize_entropy_backward_op(
    grad_soft: Tensor,
    grad_row_entropy: Tensor,
    grad_mean_probs: Tensor,
    z: Tensor,
    codebook: Tensor,
    values: Optional[Tensor],
    soft: Tensor,
    lse: Tensor,
    row_entropy: Tensor,
    entropy_lse: Tensor,
    metric: str,
    temperature: float,
    entropy_temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
    compute_values_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_z [N, D], grad_codebook [K, D], grad_values [K, Dv])`` of ``soft_quantize_entropy`` in fp32
    (fp64 for fp64 inputs), empty where not asked for, as ``soft_quantize_backward``'s."""
    backend = backends.select("soft_quantize_entropy_backward", z, _soft_dtype(z, codebook, values))
    return backend.soft_quantize_entropy_backward(
        grad_soft, grad_row_entropy, grad_mean_probs, z, codebook, values, soft, lse, row_entropy, entropy_lse,
        metric, temperature, entropy_temperature, compute_z_grad, compute_codebook_grad, compute_values_grad,
    )


@_soft_quantize_entropy_backward_op.register_fake
def _soft_quantize_entropy_backward_fake(grad_soft, grad_row_entropy, grad_mean_probs, z, codebook, values, soft,
                                         lse, row_entropy, entropy_lse, metric, temperature, entropy_temperature,
                                         compute_z_grad, compute_codebook_grad, compute_values_grad):
    return _soft_quantize_backward_fake(grad_soft, lse, z, codebook, values, soft, lse, metric, temperature,
                                        compute_z_grad, compute_codebook_grad, compute_values_grad)


def _soft_quantize_entropy_setup_context(ctx, inputs, output):
    z, codebook, values, metric, temperature, entropy_temperature = inputs
    soft, indices, lse, row_entropy, _, entropy_lse = output
    ctx.save_for_backward(z, codebook, values, soft, lse, row_entropy, entropy_lse)
    ctx.metric = metric
    ctx.temperatures = (temperature, entropy_temperature)
    ctx.mark_non_differentiable(indices, lse, entropy_lse)


def _soft_quantize_entropy_autograd(ctx, grad_soft, grad_indices, grad_lse, grad_row_entropy, grad_mean_probs,
                                    grad_entropy_lse):
    z, codebook, values, soft, lse, row_entropy, entropy_lse = ctx.saved_tensors
    if grad_soft is None:
        grad_soft = torch.zeros_like(soft)
    if grad_row_entropy is None:
        grad_row_entropy = torch.zeros_like(row_entropy)
    if grad_mean_probs is None:
        grad_mean_probs = row_entropy.new_zeros(codebook.shape[0])
    needs_z, needs_codebook, needs_values = ctx.needs_input_grad[:3]
    grad_z, grad_codebook, grad_values = _soft_quantize_entropy_backward_op(
        grad_soft, grad_row_entropy, grad_mean_probs, z, codebook, values, soft, lse, row_entropy, entropy_lse,
        ctx.metric, *ctx.temperatures, needs_z, needs_codebook, needs_values,
    )
    return (
        grad_z.to(z.dtype) if needs_z else None,
        grad_codebook.to(codebook.dtype) if needs_codebook else None,
        grad_values.to(values.dtype) if needs_values else None,
        None,
        None,
        None,
    )


_soft_quantize_entropy_op.register_autograd(
    _soft_quantize_entropy_autograd, setup_context=_soft_quantize_entropy_setup_context
)
