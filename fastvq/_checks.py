"""Argument checks shared by the functional API and the operators.

Every check runs before any kernel launch, names the offending argument and shows its shape or
dtype, and raises ``TypeError`` for wrong types or dtypes and ``ValueError`` for wrong shapes or
values, so that nothing a user passes reaches a kernel that could read out of bounds.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from ._masks import check_kernel_size, check_mask_type
from .backends.common import output_size
from .backends.soft_codebook import SOFT_METRICS

METRICS = ("l2", "cosine", "dot")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PaddingArg = Union[None, int, str, Sequence[int]]


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


def unbatched_as_batch(x: object) -> tuple[torch.Tensor, bool]:
    """``x [C_in, H, W]`` (unbatched, as ``nn.Conv2d`` takes it) as a batch of one, or ``x [B, C_in, H, W]``
    as it is; and whether it was unbatched (so the output loses its batch dimension again)."""
    x = check_tensor("x", x)
    if x.dim() == 3:
        return x.unsqueeze(0), True
    if x.dim() != 4:
        raise ValueError(f"x must be 3-D [C_in, H, W] (unbatched) or 4-D [B, C_in, H, W], got shape {tuple(x.shape)}")
    return x, False


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


def check_metric(metric: object) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric  # type: ignore[return-value]


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def check_search_inputs(z: object, codebook: object, metric: object = "l2") -> None:
    """Checks ``z [N, D]`` and ``codebook [K, D]`` for the search and quantize ops."""
    z = check_tensor("z", z)
    codebook = check_tensor("codebook", codebook)
    check_metric(metric)
    if z.dim() != 2:
        raise ValueError(f"z must be 2-D [N, D], got shape {tuple(z.shape)}")
    if codebook.dim() != 2:
        raise ValueError(f"codebook must be 2-D [K, D], got shape {tuple(codebook.shape)}")
    check_float("z", z)
    check_float("codebook", codebook)
    if codebook.shape[0] < 1:
        raise ValueError(f"codebook must hold at least one code (K >= 1), got shape {tuple(codebook.shape)}")
    if codebook.shape[1] < 1:
        raise ValueError(f"codebook must have D >= 1, got shape {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"z and codebook must have the same last dimension D, got z of shape {tuple(z.shape)} "
            f"and codebook of shape {tuple(codebook.shape)}"
        )
    check_same_device(z=z, codebook=codebook)


def check_sampling(sample_temperature: object, seed: object, z: torch.Tensor) -> None:
    """Checks the Gumbel-max sampling arguments: a temperature >= 0 and, when sampling, a seed."""
    if not isinstance(sample_temperature, (int, float)) or not float(sample_temperature) >= 0.0:
        raise ValueError(f"sample_temperature must be a float >= 0, got {sample_temperature!r}")
    if float(sample_temperature) == float("inf"):
        raise ValueError("sample_temperature must be finite")
    if sample_temperature > 0:
        check_seed(seed, z)


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
        raise ValueError(f"cluster_size must have shape ({num_codes},) to match codebook, got {tuple(cluster_size.shape)}")
    if tuple(embed_avg.shape) != (num_codes, dim):
        raise ValueError(f"embed_avg must have shape ({num_codes}, {dim}) to match codebook, got {tuple(embed_avg.shape)}")
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


# --------------------------------------------------------------------------- masked convolution


def resolve_padding(padding: PaddingArg, kernel_height: int, kernel_width: int) -> tuple[int, int]:
    """``None`` or ``"same"`` -> ``(kh // 2, kw // 2)``; an int or a pair of ints ``>= 0`` as given."""
    if padding is None or padding == "same":
        return kernel_height // 2, kernel_width // 2
    if isinstance(padding, bool):
        raise TypeError(f"padding must be None, 'same', an int or a pair of ints, got {padding!r}")
    if isinstance(padding, int):
        pair = (padding, padding)
    elif isinstance(padding, (tuple, list)) and len(padding) == 2 and all(
        isinstance(p, int) and not isinstance(p, bool) for p in padding
    ):
        pair = (int(padding[0]), int(padding[1]))
    else:
        raise TypeError(f"padding must be None, 'same', an int or a pair of ints, got {padding!r}")
    if pair[0] < 0 or pair[1] < 0:
        raise ValueError(f"padding must be >= 0, got {padding!r}")
    return pair


def check_masked_conv_inputs(
    x: object, weight: object, bias: object, mask_type: object, padding: object
) -> tuple[int, int]:
    """Checks the masked convolution's arguments and returns its ``(pad_h, pad_w)``.

    ``padding`` here is what the operator receives: a list of two ints ``>= 0``.
    """
    x = check_tensor("x", x)
    weight = check_tensor("weight", weight)
    check_mask_type(mask_type)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [B, C_in, H, W], got shape {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [C_out, C_in, kH, kW], got shape {tuple(weight.shape)}")
    check_float("x", x)
    check_float("weight", weight)
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    if out_channels < 1 or in_channels < 1:
        raise ValueError(f"weight must have C_out >= 1 and C_in >= 1, got shape {tuple(weight.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects C_in = {in_channels}: x of shape "
            f"{tuple(x.shape)}, weight of shape {tuple(weight.shape)}"
        )
    check_kernel_size(kernel_height, kernel_width)
    if bias is not None:
        bias = check_tensor("bias", bias)
        check_float("bias", bias)
        if tuple(bias.shape) != (out_channels,):
            raise ValueError(
                f"bias must have shape ({out_channels},) to match weight of shape {tuple(weight.shape)}, "
                f"got {tuple(bias.shape)}"
            )
        check_same_device(x=x, weight=weight, bias=bias)
    else:
        check_same_device(x=x, weight=weight)
    pads = resolve_padding(tuple(padding) if isinstance(padding, list) else padding, kernel_height, kernel_width)
    out_height, out_width = output_size(x.shape[2], x.shape[3], kernel_height, kernel_width, pads)
    if out_height < 1 or out_width < 1:
        raise ValueError(
            f"the output would be empty: x of shape {tuple(x.shape)} with kernel size "
            f"({kernel_height}, {kernel_width}) and padding {pads} gives {out_height} x {out_width}"
        )
    return pads


# --------------------------------------------------------------------------- soft assignments


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


def check_temperature(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < float("inf"):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")


def check_seed(seed: object, z: torch.Tensor) -> None:
    """A Gumbel-noise seed: a one-element int64 tensor on ``z``'s device."""
    seed = check_tensor("seed", seed)
    if seed.numel() != 1 or seed.dtype != torch.int64:
        raise ValueError(f"seed must be a one-element int64 tensor, got dtype {seed.dtype} and shape {tuple(seed.shape)}")
    check_same_device(z=z, seed=seed)
# --------------------------------------------------------------------------- code entropy (LFQ)

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


def check_topk_inputs(z: object, codebook: object, k: object, metric: object = "l2") -> None:
    """Checks the top-k search's arguments: those of the search, and ``1 <= k <= K``."""
    check_search_inputs(z, codebook, metric)
    num_codes = codebook.shape[0]  # type: ignore[union-attr]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= num_codes:
        raise ValueError(f"k must be an int in [1, K] = [1, {num_codes}] for a codebook of shape "
                         f"{tuple(codebook.shape)}, got {k!r}")  # type: ignore[union-attr]
