"""Argument checks shared by the functional API and the operators.

Every check runs before any kernel launch, names the offending argument and shows its shape or
dtype, and raises ``TypeError`` for wrong types or dtypes and ``ValueError`` for wrong shapes or
values, so that nothing a user passes reaches a kernel that could read out of bounds.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


METRICS = ("l2", "cosine", "dot")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(
            f"{name} must be a dense (strided) tensor, got layout {value.layout} with shape {tuple(value.shape)}: "
            "call .to_dense() first"
        )
    return value


def check_own_memory(name: str, tensor: torch.Tensor) -> None:
    """An in-place output must not have a stride 0 over a dimension of size > 1 (an ``expand()``ed
    tensor): several of its elements would be one memory location, written by several updates."""
    if any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride())):
        raise ValueError(
            f"{name} is updated in place but several of its elements share memory (shape {tuple(tensor.shape)}, "
            f"strides {tuple(tensor.stride())}, as made by expand()): pass a tensor with its own memory, e.g. "
            f"{name}.clone()"
        )


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got dtype {tensor.dtype} with shape {tuple(tensor.shape)}"
        )


def check_real(
    name: str,
    value: object,
    *,
    minimum: Optional[float] = None,
    above: Optional[float] = None,
    maximum: Optional[float] = None,
    below: Optional[float] = None,
) -> float:
    """``value`` as a float, which must be a finite real number (not a bool, NaN or infinity) and lie
    ``>= minimum``, ``> above``, ``<= maximum`` and ``< below`` where those are given; anything else
    is a ``ValueError`` naming the argument. Every float argument of the ops and layers goes
    through here: a NaN or infinite weight, rate or temperature would poison the state it touches."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite float, got {value!r}")
    for bound, holds, relation in ((minimum, lambda b: value >= b, ">="), (above, lambda b: value > b, ">"),
                                   (maximum, lambda b: value <= b, "<="), (below, lambda b: value < b, "<")):
        if bound is not None and not holds(bound):
            raise ValueError(f"{name} must be a float {relation} {bound:g}, got {value!r}")
    return float(value)


def is_real(value: object) -> bool:
    """Whether ``value`` is a Python int or float (not a bool): what a ``float`` argument of an operator takes."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric  # type: ignore[return-value]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_sampling(sample_temperature: object, seed: object, z: torch.Tensor) -> None:
    """Checks the Gumbel-max sampling arguments: a temperature >= 0 and, when sampling, a seed."""
    if not isinstance(sample_temperature, (int, float)) or not float(sample_temperature) >= 0.0:
        raise ValueError(f"sample_temperature must be a float >= 0, got {sample_temperature!r}")
    if float(sample_temperature) == float("inf"):
        raise ValueError("sample_temperature must be finite")
    if sample_temperature > 0:
        check_seed(seed, z)


def check_temperature(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


def check_seed(seed: object, z: torch.Tensor) -> None:
    """A Gumbel-noise seed: a one-element int64 tensor on ``z``'s device."""
    seed = check_tensor("seed", seed)
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got dtype {seed.dtype} and shape {tuple(seed.shape)}")
    check_same_device(z=z, seed=seed)
# --------------------------------------------------------------------------- k-means

KMEANS_METRICS = ("l2", "cosine")
KMEANS_INITS = ("k-means++", "random")
KMEANS_EMPTY_CLUSTERS = ("farthest", "keep")


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_kmeans_args(
    x: torch.Tensor,
    num_clusters: object,
    iters: object,
    init: object,
    metric: object,
    tol: object,
    batch_size: object,
    seed: object,
    empty_clusters: object,
) -> None:
    """Checks the arguments of ``fastvq.kmeans`` (``x`` already a tensor view of the data). The
    finiteness of ``init`` (a host synchronisation) is not checked under ``torch.compile``."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [N, D], got shape {tuple(x.shape)}")
    check_float("x", x)
    if x.shape[1] < 1:
        raise ValueError(f"x must have D >= 1, got shape {tuple(x.shape)}")
    _check_int("num_clusters", num_clusters, 1)
    _check_int("iters", iters, 1)
    if batch_size is not None:
        _check_int("batch_size", batch_size, 1)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if metric not in KMEANS_METRICS:
        raise ValueError(f"metric must be one of {KMEANS_METRICS}, got {metric!r}")
    if empty_clusters not in KMEANS_EMPTY_CLUSTERS:
        raise ValueError(f"empty_clusters must be one of {KMEANS_EMPTY_CLUSTERS}, got {empty_clusters!r}")
    if tol is not None and (
        not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0.0 <= float(tol) < float("inf")
    ):
        raise ValueError(f"tol must be a finite float >= 0 or None, got {tol!r}")
    if isinstance(init, str):
        if init not in KMEANS_INITS:
            raise ValueError(f"init must be one of {KMEANS_INITS} or a [K, D] tensor, got {init!r}")
        return
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be one of {KMEANS_INITS} or a [K, D] tensor, got {type(init).__name__}")
    check_float("init", init)
    if tuple(init.shape) != (num_clusters, x.shape[1]):
        raise ValueError(
            f"init must have shape ({num_clusters}, {x.shape[1]}) for num_clusters={num_clusters} and x of shape "
            f"{tuple(x.shape)}, got {tuple(init.shape)}"
        )
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(init).all()):
        raise ValueError(f"init must hold finite values, got NaN or Inf in the tensor of shape {tuple(init.shape)}")
