"""The argument-check primitives that several op families and layers share (each family's own input
check lives in its ``fastvq/ops/<family>.py``, k-means' in ``fastvq/clustering.py``).

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


# The kernels divide by a temperature in float32: below the smallest normal float32 its inverse is infinite
# (or the temperature itself rounds to 0), and every logit turns NaN.
SMALLEST_TEMPERATURE = torch.finfo(torch.float32).tiny


def _check_not_below_float32(name: str, value: object) -> None:
    if 0.0 < float(value) < SMALLEST_TEMPERATURE:
        raise ValueError(f"{name} must be 0 or at least {SMALLEST_TEMPERATURE:g} (the smallest normal float32: the "
                         f"kernels divide by it in float32), got {value!r}")


def check_sampling(sample_temperature: object, seed: object, z: torch.Tensor) -> None:
    """Checks the Gumbel-max sampling arguments: a temperature >= 0 and, when sampling, a seed."""
    if not isinstance(sample_temperature, (int, float)) or not float(sample_temperature) >= 0.0:
        raise ValueError(f"sample_temperature must be a float >= 0, got {sample_temperature!r}")
    if float(sample_temperature) == float("inf"):
        raise ValueError("sample_temperature must be finite")
    _check_not_below_float32("sample_temperature", sample_temperature)
    if sample_temperature > 0:
        check_seed(seed, z)


def check_temperature(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    _check_not_below_float32(name, value)


def seed_tensor(seed: object, device: torch.device) -> object:
    """A Python int seed as the one-element int64 tensor the operators take (on ``device``); anything else as
    it is, for the operator's check to name."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        return torch.tensor(seed, dtype=torch.int64, device=device)
    return seed


def check_seed(seed: object, z: torch.Tensor) -> None:
    """A Gumbel-noise seed: a one-element int64 tensor on ``z``'s device."""
    seed = check_tensor("seed", seed)
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(
            f"seed must be a one-element int64 tensor, got dtype {seed.dtype} and shape {tuple(seed.shape)}"
        )
    check_same_device(z=z, seed=seed)
