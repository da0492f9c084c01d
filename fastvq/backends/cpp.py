"""The compiled backend (``FASTVQ_BACKEND=cpp``, and ``cuda`` where built): the ``fastvq._C`` binding.

``fastvq._C`` registers the ``torch.ops.fastvq_C`` operators: a C++ nearest-code search and
segment reduce for CPU tensors and, in builds made against a CUDA build of PyTorch, CUDA C++ ones
for CUDA tensors. This module gives them the entry points every backend has (``nearest_code``,
``nearest_code_batched``, ``segment_reduce``), and registers their fake functions so that they pass
``torch.library.opcheck`` by themselves.

What ``fastvq._C`` does not implement (Gumbel-max sampling, the ``vector_quantize`` backward,
the masked convolution) is not here: the table in ``fastvq.backends`` routes those ops to the
PyTorch path.

``fastvq._C`` is imported on first use, never at ``import fastvq``. When it is missing or does not
load, :func:`load` says why, ``FASTVQ_BACKEND=auto`` falls back to the PyTorch path, and
``fastvq.backends.backend_info()`` reports the reason.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import threading
from pathlib import Path
from typing import Optional

import torch

from .sinkhorn_stats import combine_stats

# Written by setup.py next to this file: whether it built fastvq._C, with which flags, or why not.
BUILD_STATUS_FILE = Path(__file__).parent.parent / "_build_status.json"
_REBUILD_HINT = (
    "install PyTorch first, then build fastvq against it without build isolation: "
    "pip install --no-build-isolation -e ."
)


def build_status() -> dict:
    """What setup.py recorded about the extension build, or ``{}`` if it recorded nothing."""
    try:
        return json.loads(BUILD_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return {}


_load_lock = threading.Lock()
_load_result: Optional[tuple[bool, Optional[str]]] = None


def load() -> tuple[bool, Optional[str]]:
    """Imports ``fastvq._C`` once: ``(True, None)``, or ``(False, why it is not available)``."""
    global _load_result
    with _load_lock:  # its fake functions may be registered only once, whichever thread comes first
        if _load_result is None:
            _load_result = _import_extension()
        return _load_result


def _import_extension() -> tuple[bool, Optional[str]]:
    try:
        importlib.import_module("fastvq._C")
    except ImportError as error:
        return False, _missing_reason(error)
    _register_fakes()
    _register_sinkhorn_fakes()
    return True, None


def available() -> bool:
    return load()[0]


def cuda_available() -> bool:
    """Whether ``fastvq._C`` holds the CUDA C++ kernels (built against a CUDA build of PyTorch)."""
    return available() and bool(build_info().get("cuda"))


def build_info() -> dict:
    """The compiled module's own account of how it was built (OpenMP, vector ISA, CUDA, compiler)."""
    return _extension_build_info() if available() else {}


@functools.lru_cache(maxsize=None)
def _extension_build_info() -> dict:
    return json.loads(torch.ops.fastvq_C.build_info())


def _missing_reason(error: ImportError) -> str:
    status = build_status()
    if status.get("built") is False:
        return f"setup.py did not build fastvq._C: {status.get('reason', 'no reason recorded')}"
    if isinstance(error, ModuleNotFoundError) and error.name == "fastvq._C":
        return f"fastvq._C is not built (setup.py never ran its build here); {_REBUILD_HINT}"
    return (
        f"fastvq._C is built but does not load ({error}); it was probably built against another "
        f"version of PyTorch than {torch.__version__}: rebuild it, {_REBUILD_HINT}"
    )


def _register_fakes() -> None:
    @torch.library.register_fake("fastvq_C::nearest_code")
    def _nearest_code_fake(z, codebook, metric, return_codes):
        out_dtype = torch.promote_types(z.dtype, codebook.dtype)
        num_rows, dim = z.shape
        return (
            z.new_empty(num_rows, dtype=torch.int64),
            z.new_empty(num_rows, dtype=torch.float32),
            z.new_empty((num_rows if return_codes else 0, dim), dtype=out_dtype),
        )

    @torch.library.register_fake("fastvq_C::nearest_codes")
    def _nearest_codes_fake(z, codebook, k, metric):
        num_rows = z.shape[0]
        return z.new_empty((num_rows, k), dtype=torch.int64), z.new_empty((num_rows, k), dtype=torch.float32)

    @torch.library.register_fake("fastvq_C::nearest_code_batched")
    def _nearest_code_batched_fake(z, codebook, metric):
        return z.new_empty(z.shape[:2], dtype=torch.int64), z.new_empty(z.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("fastvq_C::segment_reduce")
    def _segment_reduce_fake(values, indices, num_codes, deterministic):
        return (
            values.new_empty(num_codes, dtype=torch.float32),
            values.new_empty((num_codes, values.shape[1]), dtype=torch.float32),
        )

    @torch.library.register_fake("fastvq_C::residual_quantize")
    def _residual_quantize_fake(z, codebooks, n_q, row_levels, return_stats):
        num_levels, num_codes, dim = codebooks.shape
        stat_levels = num_levels if return_stats else 0
        return (
            z.new_empty((z.shape[0], num_levels), dtype=torch.int64),
            z.new_empty(z.shape, dtype=torch.promote_types(z.dtype, codebooks.dtype)),
            z.new_empty(num_levels, dtype=torch.float32),
            z.new_empty((stat_levels, num_codes), dtype=torch.float32),
            z.new_empty((stat_levels, num_codes, dim), dtype=torch.float32),
        )

    @torch.library.register_fake("fastvq_C::residual_quantize_backward")
    def _residual_quantize_backward_fake(grad_quantized, grad_commitment, grad_codebook_loss, z, codebooks, indices,
                                         straight_through, compute_codebook_grad):
        num_levels, num_codes, dim = codebooks.shape
        promoted = torch.promote_types(z.dtype, codebooks.dtype)
        return (
            torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty((num_levels if compute_codebook_grad else 0, num_codes, dim),
                        dtype=torch.float64 if promoted == torch.float64 else torch.float32),
        )


# --------------------------------------------------------------------------- backend entry points


def nearest_code(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    return_codes: bool,
    sample_temperature: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The argmin search; ``sample_temperature``/``seed`` are in the signature every backend shares,
    but sampling is routed to the PyTorch path by the table, so they never reach here set."""
    if sample_temperature > 0.0:
        raise RuntimeError("fastvq._C has no Gumbel-max sampling; fastvq.backends routes it to the PyTorch path")
    return torch.ops.fastvq_C.nearest_code(z, codebook, metric, return_codes)


def nearest_code_batched(
    z: torch.Tensor, codebook: torch.Tensor, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """B searches in one parallel loop over (problem, row block): ``z [B, N, D]``, ``codebook [B, K, D]``."""
    return torch.ops.fastvq_C.nearest_code_batched(z, codebook, metric)


def segment_reduce(
    values: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[K]`` and sums ``[K, D]`` in fp32. The CPU kernel is deterministic whatever
    ``deterministic`` says; the CUDA kernel uses fp32 atomics unless it is set."""
    return torch.ops.fastvq_C.segment_reduce(values, indices, num_codes, deterministic)


def nearest_codes(
    z: torch.Tensor,
    codebook: torch.Tensor,
    k: int,
    metric: str,
    sample_temperature: float = 0.0,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k search (direct kernels or BLAS tiles, as the nearest-code search); sampling is
    routed to the PyTorch path by the table, so ``sample_temperature`` never reaches here set."""
    if sample_temperature > 0.0:
        raise RuntimeError("fastvq._C has no Gumbel-top-k sampling; fastvq.backends routes it to the PyTorch path")
    return torch.ops.fastvq_C.nearest_codes(z, codebook, k, metric)


def residual_quantize(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    n_q: int,
    row_levels: Optional[torch.Tensor],
    return_stats: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every level of a row tile in one walk (``csrc/cpu/residual_quantize.cpp``); the statistics are summed
    in row order per level, deterministic whatever ``deterministic`` says."""
    return torch.ops.fastvq_C.residual_quantize(z, codebooks, n_q, row_levels, return_stats)


def residual_quantize_backward(
    grad_quantized: torch.Tensor,
    grad_commitment: torch.Tensor,
    grad_codebook_loss: torch.Tensor,
    z: torch.Tensor,
    codebooks: torch.Tensor,
    indices: torch.Tensor,
    straight_through: str,
    compute_codebook_grad: bool,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's levels walked again in cache; the codebook gradient summed per level in row order, deterministic
    whatever ``deterministic`` says."""
    return torch.ops.fastvq_C.residual_quantize_backward(
        grad_quantized, grad_commitment, grad_codebook_loss, z, codebooks, indices, straight_through,
        compute_codebook_grad,
    )
# --------------------------------------------------------------------------- Sinkhorn passes (csrc/cpu/sinkhorn.cpp)

# The C++ column pass cuts the rows into at most this many splits of whole 256-row blocks (kMaxSplits, kBlockRows).
_SINKHORN_MAX_SPLITS = 64
_SINKHORN_BLOCK_ROWS = 256


def _sinkhorn_splits(num_rows):
    return max(1, min((num_rows + _SINKHORN_BLOCK_ROWS - 1) // _SINKHORN_BLOCK_ROWS, _SINKHORN_MAX_SPLITS))


def _register_sinkhorn_fakes() -> None:
    if not hasattr(torch.ops.fastvq_C, "sinkhorn_row_pass"):
        return  # a fastvq._C built before the Sinkhorn passes: calling one names the missing operator
    @torch.library.register_fake("fastvq_C::sinkhorn_row_pass")
    def _row_pass_fake(z, codebook, column_potential, metric, affine, argmax):
        num_rows = z.shape[0]
        return (z.new_empty(num_rows, dtype=column_potential.dtype),
                z.new_empty(num_rows if argmax else 0, dtype=torch.int64))

    @torch.library.register_fake("fastvq_C::sinkhorn_column_partials")
    def _column_partials_fake(z, codebook, row_potential, metric, affine):
        shape = (_sinkhorn_splits(z.shape[0]), codebook.shape[0])
        return z.new_empty(shape, dtype=row_potential.dtype), z.new_empty(shape, dtype=row_potential.dtype)

    @torch.library.register_fake("fastvq_C::sinkhorn_cost_stats")
    def _cost_stats_fake(z, codebook, metric):
        return z.new_empty((z.shape[0], 5), dtype=torch.float64)


def sinkhorn_row_pass(z, codebook, column_potential, metric, affine, argmax):
    return torch.ops.fastvq_C.sinkhorn_row_pass(z, codebook, column_potential, metric, affine, argmax)


def sinkhorn_column_pass(z, codebook, row_potential, metric, affine):
    """The per-code ``(max, sum of exp)`` of the C++ kernel's row splits, combined: a max, then the rescaled sum."""
    partial_max, partial_sum = torch.ops.fastvq_C.sinkhorn_column_partials(z, codebook, row_potential, metric, affine)
    high = partial_max.amax(dim=0)
    safe = torch.where(high == -math.inf, 0.0, high)
    return high, (partial_sum * torch.exp(partial_max - safe)).sum(dim=0)


def sinkhorn_cost_stats(z, codebook, metric):
    rows = torch.ops.fastvq_C.sinkhorn_cost_stats(z, codebook, metric)
    empty = torch.tensor([[0.0, math.inf, -math.inf, 0.0, 0.0]], dtype=torch.float64)
    return combine_stats(torch.cat([empty, rows]))
