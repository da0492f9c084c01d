"""Per-code counts and sums of rows (``segment_reduce``) and the EMA codebook update built on them.

The public :func:`segment_reduce` and :func:`ema_update_`, then their operators
``torch.ops.fastvq.segment_reduce`` and ``torch.ops.fastvq.ema_update_`` (each with the check its real
implementation and its fake share), and :func:`apply_ema_`, the device-side half of the update that
the distributed path runs after summing the batch over ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from .._checks import check_float, check_own_memory, check_real, check_same_device, check_tensor, is_real
from .._distributed import all_reduce_sum_, is_distributed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def segment_reduce(
    values: Tensor, indices: Tensor, num_codes: int, *, deterministic: Optional[bool] = None
) -> tuple[Tensor, Tensor]:
    """Per-code counts and sums of rows, without a one-hot matrix.

    Args:
        values: ``[N, D]`` floating point.
        indices: int64 or int32 ``[N]``; entries outside ``[0, num_codes)`` are ignored.
        num_codes: ``K >= 1``.
        deterministic: sum in a fixed order (sorted by code) instead of with float atomics;
            ``None`` follows ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``(counts float32 [K], sums float32 [K, D])``.
    """
    if not (isinstance(values, Tensor) and isinstance(indices, Tensor) and _is_int(num_codes)):
        check_segment_inputs(values, indices, num_codes)  # the dispatcher would reject these types with its own message
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    return _segment_reduce_op(values, indices, num_codes, bool(deterministic))


def ema_update_(
    codebook: Tensor,
    cluster_size: Tensor,
    embed_avg: Tensor,
    z: Tensor,
    indices: Tensor,
    *,
    decay: float = 0.99,
    eps: float = 1e-5,
    step: Optional[Tensor] = None,
    deterministic: Optional[bool] = None,
    check_indices_range: bool = True,
    sync: Optional[bool] = None,
) -> None:
    """Trains the codebook by exponential moving averages of its clusters, in place.

    With ``n_k`` the number of rows of ``z`` assigned to code ``k`` and ``s_k`` their sum::

        cluster_size <- decay * cluster_size + (1 - decay) * n
        embed_avg    <- decay * embed_avg    + (1 - decay) * s
        smoothed_k    = (cluster_size_k + eps) / (sum(cluster_size) + K eps) * sum(cluster_size)
        codebook_k    = embed_avg_k / smoothed_k

    (VQ-VAE's appendix with Laplace smoothing, as vector-quantize-pytorch computes it.) With
    ``step``, the zero-debiased variant: ``step`` is incremented and the averages are divided by
    ``1 - decay^step`` before smoothing; start ``cluster_size`` and ``embed_avg`` at zero for it.

    Args:
        codebook: ``[K, D]`` floating point, overwritten.
        cluster_size: ``[K]`` floating point (float32 recommended), updated.
        embed_avg: ``[K, D]`` floating point (float32 recommended), updated.
        z: ``[N, D]`` the batch, any float dtype; ``N`` may be 0 (the averages still decay).
        indices: int64/int32 ``[N]`` codes chosen for ``z``, in ``[0, K)``.
        decay: in ``[0, 1)``. eps: Laplace smoothing, ``>= 0``.
        step: optional one-element counter tensor for zero-debiasing, incremented in place.
        deterministic: as in ``segment_reduce``.
        check_indices_range: verify ``0 <= indices < K`` first (one host synchronisation; skipped
            under ``torch.compile``). The kernels never write out of bounds either way: an
            out-of-range index is ignored.
        sync: sum the batch's counts and sums over all ranks before the update, so every replica
            keeps the same codebook; ``None`` syncs when a process group of several ranks is
            initialised. (Functional collectives: ``torch.compile`` keeps them in its graph.)

    Raises:
        TypeError: a non-tensor or a non-float state or batch, non-integer indices.
        ValueError: shapes that do not match the codebook, ``decay`` outside ``[0, 1)``,
            ``eps < 0``, different devices, or indices out of range.
    """
    tensors = (codebook, cluster_size, embed_avg, z, indices)
    synced = (is_distributed() if sync is None else sync) and is_distributed()
    check_range = check_indices_range and not torch.compiler.is_compiling()
    if synced or check_range or not (all(isinstance(t, Tensor) for t in tensors) and is_real(decay) and is_real(eps)
                                     and (step is None or isinstance(step, Tensor))):
        # The synced update runs no ema_update_ operator to check them, the range check reads checked
        # indices (and syncs with the host, next to which this check costs nothing), and the dispatcher
        # would reject these types with its own message.
        check_ema_inputs(codebook, cluster_size, embed_avg, z, indices, decay, eps, step)
    if check_range and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= codebook.shape[0]:
            raise ValueError(
                f"indices must lie in [0, {codebook.shape[0]}) for a codebook of shape {tuple(codebook.shape)}, "
                f"got values in [{low}, {high}]"
            )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if synced:
        counts, sums = _segment_reduce_op(z, indices, codebook.shape[0], bool(deterministic))
        all_reduce_sum_(counts)
        all_reduce_sum_(sums)
        apply_ema_(codebook, cluster_size, embed_avg, counts, sums, float(decay), float(eps), step)
        return
    _ema_update_op(codebook, cluster_size, embed_avg, z, indices, float(decay), float(eps), step, bool(deterministic))


# --------------------------------------------------------------------------- the operators


def check_indices(indices: object, num_rows: int, name: str = "indices") -> torch.Tensor:
    indices = check_tensor(name, indices)
    if indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 or int32 tensor, got dtype {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != num_rows:
        raise ValueError(f"{name} must be 1-D with {num_rows} entries, got shape {tuple(indices.shape)}")
    return indices


def check_segment_inputs(values: object, indices: object, num_codes: object) -> None:
    """Checks ``values [N, D]``, ``indices [N]`` and ``num_codes`` for the segment reduce."""
    values = check_tensor("values", values)
    if values.dim() != 2:
        raise ValueError(f"values must be 2-D [N, D], got shape {tuple(values.shape)}")
    check_float("values", values)
    indices = check_indices(indices, values.shape[0])
    if not isinstance(num_codes, int) or isinstance(num_codes, bool) or num_codes < 1:
        raise ValueError(f"num_codes must be an int >= 1, got {num_codes!r}")
    check_same_device(values=values, indices=indices)


def check_ema_inputs(
    codebook: object,
    cluster_size: object,
    embed_avg: object,
    z: object,
    indices: object,
    decay: object,
    eps: object,
    step: object,
) -> None:
    """Checks the state and batch of the in-place EMA update."""
    codebook = check_tensor("codebook", codebook)
    cluster_size = check_tensor("cluster_size", cluster_size)
    embed_avg = check_tensor("embed_avg", embed_avg)
    z = check_tensor("z", z)
    if codebook.dim() != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
        raise ValueError(f"codebook must be 2-D [K, D] with K, D >= 1, got shape {tuple(codebook.shape)}")
    num_codes, dim = codebook.shape
    if tuple(cluster_size.shape) != (num_codes,):
        raise ValueError(
            f"cluster_size must have shape ({num_codes},) to match codebook, got {tuple(cluster_size.shape)}"
        )
    if tuple(embed_avg.shape) != (num_codes, dim):
        raise ValueError(
            f"embed_avg must have shape ({num_codes}, {dim}) to match codebook, got {tuple(embed_avg.shape)}"
        )
    if z.dim() != 2 or z.shape[1] != dim:
        raise ValueError(f"z must be 2-D [N, {dim}] to match codebook, got shape {tuple(z.shape)}")
    for name, tensor in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_avg", embed_avg), ("z", z)):
        check_float(name, tensor)
    indices = check_indices(indices, z.shape[0])
    tensors = dict(codebook=codebook, cluster_size=cluster_size, embed_avg=embed_avg, z=z, indices=indices)
    if step is not None:
        step = check_tensor("step", step)
        if step.numel() != 1:
            raise ValueError(f"step must be a one-element counter tensor, got shape {tuple(step.shape)}")
        tensors["step"] = step
    check_same_device(**tensors)
    for name in ("codebook", "cluster_size", "embed_avg", "step"):
        if name in tensors:
            check_own_memory(name, tensors[name])
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) < 1.0:
        raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
    check_real("eps", eps, minimum=0.0)
    if float(eps) * num_codes > torch.finfo(torch.float32).max:
        # The smoothing divides by sum(cluster_size) + K eps in float32: an infinite one turns the codebook NaN.
        raise ValueError(f"eps must keep K * eps finite in float32 (K = {num_codes}), got {eps!r}")


@torch.library.custom_op("fastvq::segment_reduce", mutates_args=())
def _segment_reduce_op(
    values: Tensor, indices: Tensor, num_codes: int, deterministic: bool = False
) -> tuple[Tensor, Tensor]:
    """``values [N, D]``, ``indices [N]`` -> ``(counts fp32 [K], sums fp32 [K, D])``."""
    check_segment_inputs(values, indices, num_codes)
    backend = backends.select("segment_reduce", values, values.dtype)
    return backend.segment_reduce(values, indices, num_codes, deterministic)


@_segment_reduce_op.register_fake
def _segment_reduce_fake(values, indices, num_codes, deterministic=False):
    check_segment_inputs(values, indices, num_codes)
    return (
        values.new_empty(num_codes, dtype=torch.float32),
        values.new_empty((num_codes, values.shape[1]), dtype=torch.float32),
    )


@torch.library.custom_op(
    "fastvq::ema_update_", mutates_args=("codebook", "cluster_size", "embed_avg", "step")
)
def _ema_update_op(
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
    """EMA codebook update in place (see :func:`ema_update_` for the formulas)."""
    check_ema_inputs(codebook, cluster_size, embed_avg, z, indices, decay, eps, step)
    num_codes = codebook.shape[0]
    backend = backends.select("segment_reduce", z, z.dtype)
    counts, sums = backend.segment_reduce(z, indices, num_codes, deterministic)
    apply_ema_(codebook, cluster_size, embed_avg, counts, sums, decay, eps, step)


@_ema_update_op.register_fake
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
