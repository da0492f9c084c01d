"""Greedy residual quantization, every level in one call: the codec quantizers' (EnCodec, audiocraft, Moshi's
Mimi, DAC) inner loop as one operator.

The public :func:`residual_quantize`, then the operator ``torch.ops.fastvq.residual_quantize`` (its check,
its real implementation, its fake), its backward operator ``torch.ops.fastvq.residual_quantize_backward``
and the autograd that joins them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_same_device, check_tensor
from ..backends.common import compute_dtype

STRAIGHT_THROUGH = ("final", "per_level", "detached_residual")


class ResidualQuantizeResult(NamedTuple):
    """What :func:`residual_quantize` returns (a named tuple: unpack it or read the fields)."""

    indices: Tensor
    quantized: Tensor
    commitment: Tensor
    codebook_loss: Tensor
    counts: Optional[Tensor]
    sums: Optional[Tensor]


def residual_quantize(
    z: Tensor,
    codebooks: Tensor,
    *,
    n_q: Optional[int | Tensor] = None,
    straight_through: str = "final",
    return_stats: bool = False,
) -> ResidualQuantizeResult:
    """Greedy residual quantization of ``z`` through ``L`` codebooks in one pass.

    Level ``l`` finds the nearest code (squared L2) of ``codebooks[l]`` to the residual ``r_l``
    (``r_0 = z``), ``q_l``, and passes on ``r_{l+1} = r_l - q_l``; ``quantized = sum_l q_l``. Each row
    tile's residual stays on chip (Triton) or in cache (C++) while it walks the levels; nothing of size
    ``N x K`` or ``N x L x D`` is ever built.

    Args:
        z: ``[N, D]`` float32, float16, bfloat16 or float64, any strides; ``N`` may be 0.
        codebooks: ``[L, K, D]`` floating point, ``L >= 1``, ``K >= 1``, on ``z``'s device; a dtype
            different from ``z``'s is promoted. A ``Parameter`` (loss-trained codebooks, DAC) gets the
            codebook-loss gradient; a tensor without grad (EMA codebooks) gets none.
        n_q: the levels each row uses: ``None`` (all ``L``), an int in ``[1, L]`` (a codec's bandwidth:
            the first ``n_q`` levels), or an integer tensor ``[N]`` (per-row quantizer dropout, as DAC
            draws per sample), each entry clamped to ``[0, L]`` (not checked, so no host sync). A row's
            levels past its ``n_q`` are not computed: index -1, nothing added to ``quantized``, the
            losses or the statistics.
        straight_through: how the gradient of ``quantized`` reaches ``z`` (the forward value is the same):

            - ``"final"`` (audiocraft, Moshi): ``z + sg[quantized - z]``: ``grad_z = grad_quantized``;
            - ``"per_level"`` (EnCodec, DAC): each level's output is ``r_l + sg[q_l - r_l]`` and the next
              residual is ``r_l`` minus it, undetached; so ``r_{l+1}`` has zero gradient to ``r_l`` and
              only level 0 reaches ``z``: ``grad_z = grad_quantized`` for a row with ``n_q >= 1``
              (0 for ``n_q = 0``), and only level 0's commitment trains ``z``;
            - ``"detached_residual"`` (WavTokenizer): the same level outputs with the residual passed on
              detached, so every level's output reaches ``z``: ``grad_z = n_q(row) * grad_quantized``.

        return_stats: also return each level's per-code counts and sums of the residual that level saw
            (the EMA update's input, as EnCodec/audiocraft/Moshi feed level ``l`` the residual after the
            levels before it).

    Returns:
        :class:`ResidualQuantizeResult` ``(indices, quantized, commitment, codebook_loss, counts, sums)``:

        - ``indices`` int64 ``[N, L]``, -1 at the levels a row does not use;
        - ``quantized`` ``[N, D]`` in the promoted dtype (``z``'s when the dtypes match);
        - ``commitment`` float32 ``[L]``: ``sum over rows and D of ||r_l - sg[q_l]||^2``; its gradient
          reaches ``z`` through the residuals, as ``straight_through`` says (``"final"`` and
          ``"detached_residual"``: ``2 (r_l - q_l)`` for every level; ``"per_level"``: level 0 only), never
          the codebooks;
        - ``codebook_loss`` float32 ``[L]``: the same values, ``sum ||sg[r_l] - q_l||^2``, whose gradient
          reaches only the codebooks: ``2 (q_l - r_l)`` summed onto each chosen code (a scatter-add);
        - ``counts`` float32 ``[L, K]`` and ``sums`` float32 ``[L, K, D]`` with ``return_stats``, else None.

        A library's mean-squared losses are these sums divided by ``N * D`` (DAC: by ``N * D`` with
        ``N`` all frames, its per-sample mask being ``n_q``); the quantized output carries no gradient to
        the codebooks in any variant (the libraries' codebooks learn by EMA or by the codebook loss).

    Losses and statistics accumulate in fp32 (fp64 inputs: in fp64, rounded once). Ties go to the lowest
    index; a NaN distance never wins and an all-NaN row takes index 0 at every level (its residual, and so
    the commitment, turns NaN visibly). The backward reads a copy of the codebooks taken at the forward, so an
    EMA step that rewrites them in place before ``backward()`` does not change the gradient; it costs
    ``L K D`` elements while a graph holds it. The statistics and the codebook gradient are summed with
    float atomics on GPU (last bits may vary between runs) unless
    ``torch.use_deterministic_algorithms(True)``, which selects a fixed-order reduction.

    Mapping from the libraries (``x`` their ``[B, D, T]`` input, flattened to ``z = x.transpose(1, 2)
    .reshape(-1, D)``; ``codebooks`` the stacked per-level ``embed``/``codebook.weight``):

    - audiocraft / Moshi ``ResidualVectorQuantization``: ``straight_through="final"``, ``n_q`` their
      ``n_q``; each level's loss ``commitment[l] / (N D)``; EMA from ``counts``/``sums`` with
      ``return_stats=True``; codes ``indices.T`` reshaped to ``[n_q, B, T]``.
    - EnCodec: ``straight_through="per_level"``, otherwise as audiocraft.
    - WavTokenizer: ``straight_through="detached_residual"``.
    - DAC ``ResidualVectorQuantize`` without projections (``codebook_dim == input_dim``, identity
      in/out projections; its l2-normalised search is not this op's): ``straight_through="per_level"``,
      ``n_q`` the per-sample ``n_quantizers`` repeated over frames, ``commitment.sum() / (N D)`` and
      ``codebook_loss.sum() / (N D)`` its two losses (it computes codes past a sample's ``n_q`` and masks
      them; here they are -1).

    Raises:
        TypeError: a non-tensor, an integer ``z``/``codebooks``, a non-integer ``n_q`` tensor.
        ValueError: ``z`` not 2-D, ``codebooks`` not 3-D, different ``D``, ``L == 0`` or ``K == 0``,
            different devices, ``n_q`` out of ``[1, L]`` or a tensor not ``[N]``, an unknown
            ``straight_through``.
    """
    row_levels = None
    if isinstance(n_q, Tensor):
        row_levels, scalar_levels = n_q, _num_levels(codebooks)
    elif n_q is None:
        scalar_levels = _num_levels(codebooks)
    elif isinstance(n_q, bool) or not isinstance(n_q, int):
        raise TypeError(f"n_q must be None, an int or an integer tensor [N], got {type(n_q).__name__}")
    else:
        scalar_levels = n_q
    if not isinstance(z, Tensor) or not isinstance(codebooks, Tensor) or not isinstance(straight_through, str):
        _check_residual_quantize(z, codebooks, 1, None, straight_through)  # names the argument the dispatcher would not
    quantized, indices, commitment, codebook_loss, counts, sums = _residual_quantize_op(
        z, codebooks, scalar_levels, row_levels, straight_through, bool(return_stats)
    )
    if not return_stats:
        counts = sums = None
    return ResidualQuantizeResult(indices, quantized, commitment, codebook_loss, counts, sums)


def _num_levels(codebooks: object) -> int:
    return codebooks.shape[0] if isinstance(codebooks, Tensor) and codebooks.dim() == 3 else 1


# --------------------------------------------------------------------------- the operators


def _check_residual_quantize(z, codebooks, n_q, row_levels, straight_through) -> None:
    z = check_tensor("z", z)
    codebooks = check_tensor("codebooks", codebooks)
    if straight_through not in STRAIGHT_THROUGH:
        raise ValueError(f"straight_through must be one of {STRAIGHT_THROUGH}, got {straight_through!r}")
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, D], got shape {tuple(z.shape)}")
    if codebooks.dim() != 3:
        raise ValueError(f"codebooks must be 3-D [L, K, D], got shape {tuple(codebooks.shape)}")
    check_float("z", z)
    check_float("codebooks", codebooks)
    num_levels, num_codes, dim = codebooks.shape
    if num_levels < 1 or num_codes < 1 or dim < 1:
        raise ValueError(f"codebooks must have L >= 1, K >= 1 and D >= 1, got shape {tuple(codebooks.shape)}")
    if z.shape[1] != dim:
        raise ValueError(
            f"z and codebooks must have the same last dimension D, got z of shape {tuple(z.shape)} "
            f"and codebooks of shape {tuple(codebooks.shape)}"
        )
    check_same_device(z=z, codebooks=codebooks)
    if not 1 <= n_q <= num_levels:
        raise ValueError(f"n_q must be in [1, L] = [1, {num_levels}] for codebooks of shape "
                         f"{tuple(codebooks.shape)}, got {n_q}")
    if row_levels is not None:
        row_levels = check_tensor("n_q", row_levels)
        if row_levels.dtype.is_floating_point or row_levels.dtype.is_complex or row_levels.dtype == torch.bool:
            raise TypeError(f"n_q as a tensor must hold integers, got dtype {row_levels.dtype}")
        if tuple(row_levels.shape) != (z.shape[0],):
            raise ValueError(f"n_q as a tensor must be [N] = [{z.shape[0]}] (one level count per row of z), "
                             f"got shape {tuple(row_levels.shape)}")
        check_same_device(z=z, n_q=row_levels)


@torch.library.custom_op("fastvq::residual_quantize", mutates_args=())
def _residual_quantize_op(
    z: Tensor,
    codebooks: Tensor,
    n_q: int,
    row_levels: Optional[Tensor],
    straight_through: str,
    return_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``z [N, D]``, ``codebooks [L, K, D]`` -> ``(quantized [N, D], indices int64 [N, L], commitment fp32 [L],
    codebook_loss fp32 [L], counts fp32 [L, K], sums fp32 [L, K, D])``; the statistics are ``[0, K]`` and
    ``[0, K, D]`` without ``return_stats``. Rows use their first ``min(n_q, row_levels[i])`` levels
    (``row_levels`` clamped at 0); ``straight_through`` is read only by the autograd."""
    _check_residual_quantize(z, codebooks, n_q, row_levels, straight_through)
    dtype = torch.promote_types(z.dtype, codebooks.dtype)
    backend = backends.select("residual_quantize", z, dtype)
    indices, quantized, commitment, counts, sums = backend.residual_quantize(
        z, codebooks, n_q, row_levels, return_stats, torch.are_deterministic_algorithms_enabled()
    )
    return quantized, indices, commitment, commitment.clone(), counts, sums


@_residual_quantize_op.register_fake
def _residual_quantize_fake(z, codebooks, n_q, row_levels, straight_through, return_stats):
    _check_residual_quantize(z, codebooks, n_q, row_levels, straight_through)
    num_levels, num_codes, dim = codebooks.shape
    stat_levels = num_levels if return_stats else 0
    return (
        z.new_empty(z.shape, dtype=torch.promote_types(z.dtype, codebooks.dtype)),
        z.new_empty((z.shape[0], num_levels), dtype=torch.int64),
        z.new_empty(num_levels, dtype=torch.float32),
        z.new_empty(num_levels, dtype=torch.float32),
        z.new_empty((stat_levels, num_codes), dtype=torch.float32),
        z.new_empty((stat_levels, num_codes, dim), dtype=torch.float32),
    )


@torch.library.custom_op("fastvq::residual_quantize_backward", mutates_args=())
def _residual_quantize_backward_op(
    grad_quantized: Tensor,
    grad_commitment: Tensor,
    grad_codebook_loss: Tensor,
    z: Tensor,
    codebooks: Tensor,
    indices: Tensor,
    straight_through: str,
    compute_codebook_grad: bool,
) -> tuple[Tensor, Tensor]:
    """``(grad_z [N, D] z's dtype, grad_codebooks [L, K, D] fp32, fp64 for fp64 inputs)`` of ``residual_quantize``
    (``grad_codebooks`` ``[0, K, D]`` without ``compute_codebook_grad``), from the codes the forward chose
    (``indices``, -1 where a row stops):

    - ``grad_z = m * grad_quantized + 2 sum_l c_l (r_l - q_l)``, with ``m = 1`` (``final``), the row's level
      count (``detached_residual``) or whether it has a level (``per_level``, whose sum keeps level 0 only),
      ``c_l = grad_commitment[l]``;
    - ``grad_codebooks[l, k] = 2 grad_codebook_loss[l] sum_{i: indices[i, l] = k} (q_l - r_l)``.
    """
    backend = backends.select("residual_quantize_backward", z, grad_quantized.dtype)
    return backend.residual_quantize_backward(
        grad_quantized, grad_commitment, grad_codebook_loss, z, codebooks, indices, straight_through,
        compute_codebook_grad, torch.are_deterministic_algorithms_enabled(),
    )


@_residual_quantize_backward_op.register_fake
def _residual_quantize_backward_fake(grad_quantized, grad_commitment, grad_codebook_loss, z, codebooks, indices,
                                     straight_through, compute_codebook_grad):
    num_levels, num_codes, dim = codebooks.shape
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        z.new_empty((num_levels if compute_codebook_grad else 0, num_codes, dim),
                    dtype=compute_dtype(torch.promote_types(z.dtype, codebooks.dtype))),
    )


def _residual_quantize_setup_context(ctx, inputs, output):
    z, codebooks, _, _, straight_through, _ = inputs
    indices = output[1]
    # A copy: EMA layers rewrite their codebooks in place (often through .data, which autograd cannot see)
    # between this forward and the backward, which must use the codes the forward chose.
    ctx.save_for_backward(z, codebooks.detach().clone(), indices)
    ctx.codebooks_dtype = codebooks.dtype
    ctx.straight_through = straight_through
    ctx.mark_non_differentiable(indices, *output[4:])


def _residual_quantize_autograd(ctx, grad_quantized, grad_indices, grad_commitment, grad_codebook_loss, *_):
    z, codebooks, indices = ctx.saved_tensors
    num_levels = codebooks.shape[0]
    if grad_quantized is None:
        grad_quantized = z.new_zeros(z.shape, dtype=torch.promote_types(z.dtype, codebooks.dtype))
    zeros = z.new_zeros(num_levels, dtype=torch.float32)
    grad_z, grad_codebooks = _residual_quantize_backward_op(
        grad_quantized.contiguous(),
        zeros if grad_commitment is None else grad_commitment.float(),
        zeros if grad_codebook_loss is None else grad_codebook_loss.float(),
        z,
        codebooks,
        indices,
        ctx.straight_through,
        ctx.needs_input_grad[1],
    )
    return (
        grad_z if ctx.needs_input_grad[0] else None,
        grad_codebooks.to(ctx.codebooks_dtype) if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
        None,
    )


_residual_quantize_op.register_autograd(_residual_quantize_autograd, setup_context=_residual_quantize_setup_context)
