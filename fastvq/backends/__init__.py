"""The one place a backend is chosen, and the one table of which backend runs each op.

The backends, each in its own module or package, none importing another:

- ``torch`` (:mod:`fastvq.backends.torch`): the memory-bounded pure-PyTorch path, for any device;
- ``triton`` (:mod:`fastvq.backends.triton`): Triton kernels, for CUDA tensors, or for CPU tensors
  when ``TRITON_INTERPRET=1`` runs them through Triton's interpreter;
- ``cpp`` (:mod:`fastvq.backends.cpp`): the C++ kernels of the compiled extension ``fastvq._C``,
  for CPU tensors of every float dtype;
- ``cuda``: the CUDA C++ kernels of ``fastvq._C``, in builds made against a CUDA build of PyTorch
  (the same binding module as ``cpp``).

``FASTVQ_BACKEND=auto|triton|cuda|cpp|torch`` is read at every call. ``auto`` sends CPU tensors to
``cpp`` when ``fastvq._C`` loads and to ``torch`` otherwise, and CUDA tensors to Triton when it is
installed (float64 to ``torch``: the Triton kernels are written for fp32/fp16/bf16), else to
``cuda`` when built, else to ``torch``. Triton stays the CUDA default until the two are measured
against each other on a GPU.

A backend that does not implement an op falls back by one row of :data:`TABLE` (never by one
backend calling another's function); ``fastvq info`` prints the table and :func:`backend_info`
returns it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType
from typing import NamedTuple, Optional

# Not bound as ``torch``: importing the subpackage fastvq.backends.torch sets that attribute of this package.
import torch as _torch

from . import cpp
from .common import triton_interpreting

BACKENDS = ("auto", "triton", "cuda", "cpp", "torch")
IMPLEMENTATIONS = ("triton", "cuda", "cpp", "torch")

# Each backend's module for each op family ("cuda" is the CUDA half of the same fastvq._C binding).
_MODULES = {
    "torch": {
        "search": "fastvq.backends.torch.search",
        "segment_reduce": "fastvq.backends.torch.segment_reduce",
        "vector_quantize": "fastvq.backends.torch.vector_quantize",
        "masked_conv": "fastvq.backends.torch.masked_conv",
        "soft_quantize": "fastvq.backends.torch.soft_quantize",
        "code_entropy": "fastvq.backends.torch.code_entropy",
        "topk": "fastvq.backends.torch.topk",
        "residual_quantize": "fastvq.backends.torch.residual_quantize",
    },
    "triton": {
        "search": "fastvq.backends.triton.search",
        "segment_reduce": "fastvq.backends.triton.segment_reduce",
        "vector_quantize": "fastvq.backends.triton.vector_quantize",
        "masked_conv": "fastvq.backends.triton.masked_conv",
        "soft_quantize": "fastvq.backends.triton.soft_quantize",
        "code_entropy": "fastvq.backends.triton.code_entropy",
        "topk": "fastvq.backends.triton.topk",
        "residual_quantize": "fastvq.backends.triton.residual_quantize",
    },
    "cpp": {"search": "fastvq.backends.cpp", "segment_reduce": "fastvq.backends.cpp", "topk": "fastvq.backends.cpp",
            "residual_quantize": "fastvq.backends.cpp", "soft_quantize": "fastvq.backends.cpp"},
    "cuda": {"search": "fastvq.backends.cpp", "segment_reduce": "fastvq.backends.cpp", "topk": "fastvq.backends.cpp"},
}


class Op(NamedTuple):
    """An op as the table sees it: its family (the file it lives in) and the function there."""

    family: str
    function: str


OPS = {
    "nearest_code": Op("search", "nearest_code"),
    # nearest_code / vector_quantize with sample_temperature > 0
    "gumbel_sample": Op("search", "nearest_code"),
    "segment_reduce": Op("segment_reduce", "segment_reduce"),
    "vector_quantize_backward": Op("vector_quantize", "vector_quantize_backward"),
    "masked_conv2d": Op("masked_conv", "masked_conv2d"),
    "masked_conv2d_backward": Op("masked_conv", "masked_conv2d_backward"),
    "soft_quantize": Op("soft_quantize", "soft_quantize"),
    "soft_quantize_backward": Op("soft_quantize", "soft_quantize_backward"),
    "soft_entropy": Op("soft_quantize", "soft_entropy"),
    "soft_entropy_backward": Op("soft_quantize", "soft_entropy_backward"),
    "code_entropy": Op("code_entropy", "code_entropy"),
    "code_entropy_backward": Op("code_entropy", "code_entropy_backward"),
    "nearest_codes": Op("topk", "nearest_codes"),
    # nearest_codes with sample_temperature > 0
    "gumbel_topk": Op("topk", "nearest_codes"),
    # nearest_codes with more candidates per row than the Triton kernel holds, without and with sampling
    "nearest_codes_wide": Op("topk", "nearest_codes"),
    "gumbel_topk_wide": Op("topk", "nearest_codes"),
    # B independent nearest-code searches, z [B, N, D] against codebook [B, K, D]
    "nearest_code_batched": Op("search", "nearest_code_batched"),
    "residual_quantize": Op("residual_quantize", "residual_quantize"),
    "residual_quantize_backward": Op("residual_quantize", "residual_quantize_backward"),
}


class Route(NamedTuple):
    """Which backend runs an op when another is selected, and why (``None`` when it is itself)."""

    runs: str
    reason: Optional[str] = None


def _self_everywhere() -> dict[str, Route]:
    return {name: Route(name) for name in IMPLEMENTATIONS}


_NO_C_SAMPLING = "fastvq._C has no Gumbel-max sampling"
_NO_C_VQ_BACKWARD = "fastvq._C has no VQ backward; index_add_ already sums in row order on CPU"
_NO_C_CONV = "fastvq._C has no masked convolution"
_NO_C_SOFT = "fastvq._C has no soft assignment"


def _soft_routes() -> dict[str, Route]:
    return {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_SOFT + "; the chunked PyTorch path runs on the BLAS matmuls of its code chunks"),
        "cuda": Route("triton", _NO_C_SOFT + "; the Triton kernels run"),
    }


_NO_C_ENTROPY = (
    "fastvq._C has no code entropy: the PyTorch path is batched GEMMs and sorts of rows x 2^(d/2), "
    "which MKL and PyTorch's CPU kernels already run at speed"
)
_NO_CUDA_TOPK = "fastvq._C's CUDA kernels have no top-k search; the Triton kernel runs"
_WIDE_TOPK = "the Triton top-k kernel holds at most 64 codes per row in registers"

_RESIDUAL_BACKWARD = (
    "the residual backward is a gather, a subtraction and a scatter-add per level over [rows, D] chunks, "
    "bandwidth-bound elementwise work that PyTorch's own kernels run on the GPU"
)

# THE table: op -> selected backend -> the backend that runs it.
TABLE: dict[str, dict[str, Route]] = {
    "nearest_code": _self_everywhere(),
    "gumbel_sample": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_SAMPLING),
        "cuda": Route("torch", _NO_C_SAMPLING),
    },
    "segment_reduce": _self_everywhere(),
    "vector_quantize_backward": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_VQ_BACKWARD),
        "cuda": Route("torch", _NO_C_VQ_BACKWARD),
    },
    "masked_conv2d": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_CONV + "; oneDNN's convolution runs on the mask's row groups"),
        "cuda": Route("triton", _NO_C_CONV + "; the Triton kernel runs"),
    },
    "masked_conv2d_backward": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_CONV + "; oneDNN's convolution runs on the mask's row groups"),
        "cuda": Route("triton", _NO_C_CONV + "; the Triton kernel runs"),
    },
    **{
        op: _soft_routes()
        for op in ("soft_quantize", "soft_quantize_backward", "soft_entropy", "soft_entropy_backward")
    },
    "code_entropy": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_ENTROPY),
        "cuda": Route("triton", "fastvq._C has no CUDA code entropy; the Triton kernels run"),
    },
    "code_entropy_backward": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_ENTROPY),
        "cuda": Route("triton", "fastvq._C has no CUDA code entropy; the Triton kernels run"),
    },
    "nearest_codes": {**_self_everywhere(), "cuda": Route("triton", _NO_CUDA_TOPK)},
    "gumbel_topk": {
        **_self_everywhere(),
        "cpp": Route("torch", _NO_C_SAMPLING),
        "cuda": Route("triton", _NO_CUDA_TOPK),
    },
    "nearest_codes_wide": {
        **_self_everywhere(),
        "triton": Route("torch", _WIDE_TOPK),
        "cuda": Route("torch", _WIDE_TOPK),
    },
    "gumbel_topk_wide": {
        **_self_everywhere(),
        "triton": Route("torch", _WIDE_TOPK),
        "cpp": Route("torch", _NO_C_SAMPLING),
        "cuda": Route("torch", _WIDE_TOPK),
    },
    "nearest_code_batched": {
        **_self_everywhere(),
        "cuda": Route("triton", "fastvq._C's CUDA kernels have no batched search; the Triton kernel runs"),
    },
    "residual_quantize": {
        **_self_everywhere(),
        "cuda": Route("triton", "fastvq._C has no CUDA residual quantization; the Triton kernel runs"),
    },
    "residual_quantize_backward": {
        **_self_everywhere(),
        "triton": Route("torch", _RESIDUAL_BACKWARD),
        "cuda": Route("torch", _RESIDUAL_BACKWARD),
    },
}


# The C++ soft-assignment kernels (csrc/cpu/soft_quantize.cpp) run the soft assignments and entropies on CPU.
for _op in ("soft_quantize", "soft_quantize_backward", "soft_entropy", "soft_entropy_backward"):
    TABLE[_op] = {**TABLE[_op], "cpp": Route("cpp")}

# soft_quantize and soft_entropy of one logit matrix (IBQ): fused in the C++ kernels; the PyTorch and Triton
# paths run their two ops' passes one after the other.
OPS["soft_quantize_entropy"] = Op("soft_quantize", "soft_quantize_entropy")
OPS["soft_quantize_entropy_backward"] = Op("soft_quantize", "soft_quantize_entropy_backward")
for _op in ("soft_quantize_entropy", "soft_quantize_entropy_backward"):
    TABLE[_op] = {**_soft_routes(), "cpp": Route("cpp")}


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def requested_backend() -> str:
    """``FASTVQ_BACKEND``, checked; ``auto`` when unset."""
    name = os.environ.get("FASTVQ_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FASTVQ_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def backend_for(device_type: str, dtype: _torch.dtype) -> str:
    """The backend for tensors of ``device_type`` (``"cpu"``, ``"cuda"``, ...) and compute dtype
    ``dtype`` under the current ``FASTVQ_BACKEND``; raises if the requested backend cannot run them."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name in ("cuda", "cpp"):
        return _checked_extension_backend(name, device_type, dtype)
    if name == "auto":
        if device_type == "cpu":
            return "cpp" if cpp.available() else "torch"
        if device_type == "cuda" and dtype != _torch.float64:
            if triton_available():
                return "triton"
            if cpp.cuda_available():
                return "cuda"
        return "torch"
    if not triton_available():
        raise RuntimeError("FASTVQ_BACKEND=triton needs Triton: pip install triton")
    if device_type == "cpu" and not triton_interpreting():
        raise RuntimeError(
            "FASTVQ_BACKEND=triton got CPU tensors: Triton kernels run on CUDA tensors, or on CPU tensors "
            "only under its interpreter (set TRITON_INTERPRET=1 before the first fastvq op)"
        )
    if device_type not in ("cpu", "cuda"):
        raise RuntimeError(f"FASTVQ_BACKEND=triton cannot run on {device_type} tensors")
    if dtype == _torch.float64:
        raise TypeError("FASTVQ_BACKEND=triton supports float32, float16 and bfloat16 inputs, got float64")
    return "triton"


def select_backend(tensor: _torch.Tensor, dtype: _torch.dtype) -> str:
    """The backend selected for ``tensor``'s device and compute dtype ``dtype`` (before the table)."""
    return backend_for(tensor.device.type, dtype)


def _checked_extension_backend(name: str, device_type: str, dtype: _torch.dtype) -> str:
    """Checks that ``FASTVQ_BACKEND=cpp|cuda`` can run here, with an error that says what to do."""
    device = "cpu" if name == "cpp" else "cuda"
    if device_type != device:
        raise RuntimeError(f"FASTVQ_BACKEND={name} runs on {device} tensors, got {device_type} tensors")
    loaded, reason = cpp.load()
    if not loaded:
        raise RuntimeError(f"FASTVQ_BACKEND={name} needs the compiled extension fastvq._C: {reason}")
    if name == "cuda":
        if not cpp.cuda_available():
            raise RuntimeError(
                "FASTVQ_BACKEND=cuda needs fastvq._C built with its CUDA kernels, which needs a CUDA build of "
                "PyTorch and the CUDA toolkit when fastvq is installed (FASTVQ_BUILD_CUDA=1 makes the install fail "
                "where either is missing); this build has the CPU kernels only"
            )
        if dtype == _torch.float64:
            raise TypeError("FASTVQ_BACKEND=cuda supports float32, float16 and bfloat16 inputs, got float64")
    return name


def route(op: str, backend: str) -> str:
    """The backend that runs ``op`` when ``backend`` is selected: itself, or its row's fallback."""
    return TABLE[op][backend].runs


# The top-k ops whose Triton kernel holds each row's k candidates in registers, and the table row a
# larger k takes instead (the Triton module's MAX_REGISTER_TOPK says how many fit).
_WIDE_TOPK_OPS = {"nearest_codes": "nearest_codes_wide", "gumbel_topk": "gumbel_topk_wide"}


def select(op: str, tensor: _torch.Tensor, dtype: _torch.dtype, *, k: Optional[int] = None) -> ModuleType:
    """The module whose ``OPS[op].function`` runs ``op`` on ``tensor``'s device in compute dtype ``dtype``.

    ``k`` is the top-k ops' candidates per row: a ``k`` larger than the Triton kernel holds in
    registers takes the op's ``*_wide`` row of the table wherever Triton would run it."""
    backend = select_backend(tensor, dtype)
    runs = route(op, backend)
    if runs == "triton" and not triton_available():
        raise RuntimeError(f"{op} runs on Triton for {tensor.device.type} tensors here: pip install triton")
    module = importlib.import_module(_MODULES[runs][OPS[op].family])
    if runs == "triton" and op in _WIDE_TOPK_OPS and k is not None and k > module.MAX_REGISTER_TOPK:
        return select(_WIDE_TOPK_OPS[op], tensor, dtype)
    return module


def table_rows() -> list[dict]:
    """The table as rows ``{op, backend, runs, reason}``, in the order of :data:`OPS`."""
    return [
        {"op": op, "backend": backend, "runs": entry.runs, "reason": entry.reason}
        for op in OPS
        for backend, entry in TABLE[op].items()
    ]


def backend_info() -> dict:
    """What runs where under the current ``FASTVQ_BACKEND``, and the state of every backend.

    ``selected`` maps ``cpu`` and ``cuda`` to the backend fp32 tensors there go to (or the error the
    requested backend raises there); ``ops`` maps every op to the backend that runs it on each
    device after the table's fallbacks; ``table`` is the whole table (:func:`table_rows`);
    ``compiled`` says whether ``fastvq._C`` loaded, why not when it did not, and how it was built;
    ``triton`` whether Triton is installed and interpreting. The ``fastvq info`` command prints this.
    """
    loaded, reason = cpp.load()
    selected = {}
    for device_type in ("cpu", "cuda"):
        try:
            selected[device_type] = backend_for(device_type, _torch.float32)
        except (RuntimeError, TypeError, ValueError) as error:
            selected[device_type] = f"error: {error}"
    ops = {
        op: {
            device: route(op, backend) if backend in IMPLEMENTATIONS else backend
            for device, backend in selected.items()
        }
        for op in OPS
    }
    return {
        "requested": os.environ.get("FASTVQ_BACKEND", "auto"),
        "selected": selected,
        "ops": ops,
        "table": table_rows(),
        "compiled": {
            "available": loaded,
            "reason": reason,
            "cuda_kernels": cpp.cuda_available(),
            "build": {**cpp.build_status(), **cpp.build_info()},
        },
        "triton": {"available": triton_available(), "interpreting": triton_interpreting()},
        "torch": _torch.__version__,
    }


# Sinkhorn assignment (fastvq/ops/sinkhorn.py): three passes, each one fused walk over every (row, code) pair.
_SINKHORN_OPS = ("sinkhorn_cost_stats", "sinkhorn_row_pass", "sinkhorn_column_pass")
_MODULES["torch"]["sinkhorn"] = "fastvq.backends.torch.sinkhorn"
_MODULES["triton"]["sinkhorn"] = "fastvq.backends.triton.sinkhorn"
_MODULES["cpp"]["sinkhorn"] = "fastvq.backends.cpp"
OPS.update({op: Op("sinkhorn", op) for op in _SINKHORN_OPS})
TABLE.update({
    op: {
        **_self_everywhere(),
        "cuda": Route("triton", "fastvq._C has no CUDA Sinkhorn passes; the Triton kernels run"),
    }
    for op in _SINKHORN_OPS
})
