"""The compiled backend (``FASTVQ_BACKEND=cpp``, and ``cuda`` where built): ``fastvq._C``.

``fastvq._C`` registers the ``torch.ops.fastvq_C`` operators: a C++ nearest-code search and
segment reduce for CPU tensors and, in builds made against a CUDA build of PyTorch, CUDA C++ ones
for CUDA tensors. This module gives them the same entry points as ``fastvq._chunked``, so
``fastvq._ops`` hands work to either in the same way, and registers their fake functions so that
they pass ``torch.library.opcheck`` by themselves.

What stays on the PyTorch path, on every device: Gumbel-max sampling (``sample_temperature > 0``)
and the ``vector_quantize`` backward, whose codebook gradient ``index_add_`` already sums in row
order on CPU.

``fastvq._C`` is imported on first use, never at ``import fastvq``. When it is missing or does not
load, :func:`load` says why, ``FASTVQ_BACKEND=auto`` falls back to the PyTorch path, and
``fastvq._ops.backend_info()`` reports the reason.
"""

from __future__ import annotations

import functools
import importlib
import json
import threading
from pathlib import Path
from typing import Optional

import torch

# The PyTorch path's functions for what stays on it, bound here as this backend's own.
from ._chunked import nearest_code as _sampling_nearest_code
from ._chunked import vector_quantize_backward as vector_quantize_backward  # noqa: PLC0414

# Written by setup.py next to this file: whether it built fastvq._C, with which flags, or why not.
BUILD_STATUS_FILE = Path(__file__).with_name("_build_status.json")
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

    @torch.library.register_fake("fastvq_C::segment_reduce")
    def _segment_reduce_fake(values, indices, num_codes, deterministic):
        return (
            values.new_empty(num_codes, dtype=torch.float32),
            values.new_empty((num_codes, values.shape[1]), dtype=torch.float32),
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
    if sample_temperature > 0.0:
        return _sampling_nearest_code(z, codebook, metric, return_codes, sample_temperature, seed)
    return torch.ops.fastvq_C.nearest_code(z, codebook, metric, return_codes)


def segment_reduce(
    values: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[K]`` and sums ``[K, D]`` in fp32. The CPU kernel is deterministic whatever
    ``deterministic`` says; the CUDA kernel uses fp32 atomics unless it is set."""
    return torch.ops.fastvq_C.segment_reduce(values, indices, num_codes, deterministic)
