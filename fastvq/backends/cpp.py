"""The compiled backend (``FASTVQ_BACKEND=cpp``, and ``cuda`` where built): the ``fastvq._C`` binding.

``fastvq._C`` registers the ``torch.ops.fastvq_C`` operators: a C++ nearest-code search (single and
batched), top-k search, segment reduce, residual quantization, Sinkhorn passes and soft assignments
(``soft_quantize``, ``soft_entropy`` and their backwards) for CPU tensors and, in builds made against a
CUDA build of PyTorch, CUDA C++ ones for CUDA tensors. This module gives them the entry points every
backend has (``nearest_code``, ``nearest_code_batched``, ``segment_reduce``, ...), and registers their
fake functions so that they pass ``torch.library.opcheck`` by themselves.

What ``fastvq._C`` does not implement (Gumbel-max sampling in the search, the ``vector_quantize``
backward, the masked convolution) is not here: the table in ``fastvq.backends`` routes those ops
to the PyTorch path.

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

from .openmp import serial_torch_ops, with_threads
from .sinkhorn_stats import combine_stats
from .soft_codebook import SoftCodebook, split_value_grad

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
    @torch.library.register_fake("fastvq_C::soft_quantize")
    def _soft_quantize_fake(zq, keys, code_term, row_term, values, metric, inverse_temperature, seed, return_hard):
        num_rows = zq.shape[0]
        return (
            values.new_empty((num_rows, values.shape[1])),
            zq.new_empty(num_rows if return_hard else 0, dtype=torch.int64),
            values.new_empty(num_rows),
        )

    @torch.library.register_fake("fastvq_C::soft_quantize_backward")
    def _soft_quantize_backward_fake(grad_soft, delta, lse, zq, keys, code_term, row_term, values, metric,
                                     inverse_temperature, rows_grad, codes_grad, values_grad):
        num_rows, num_codes = zq.shape[0], keys.shape[0]
        return (
            code_term.new_empty((num_rows if rows_grad else 0, keys.shape[1])),
            code_term.new_empty(num_rows if rows_grad else 0),
            code_term.new_empty((num_codes if codes_grad else 0, keys.shape[1])),
            code_term.new_empty(num_codes if codes_grad else 0),
            code_term.new_empty((num_codes if values_grad else 0, values.shape[1])),
        )

    @torch.library.register_fake("fastvq_C::soft_entropy")
    def _soft_entropy_fake(zq, keys, code_term, row_term, metric, inverse_temperature):
        return code_term.new_empty(zq.shape[0]), code_term.new_empty(keys.shape[0]), code_term.new_empty(zq.shape[0])

    @torch.library.register_fake("fastvq_C::soft_entropy_backward")
    def _soft_entropy_backward_fake(grad_entropy, code_weights, row_constant, lse, zq, keys, code_term, row_term,
                                    metric, inverse_temperature, rows_grad, codes_grad):
        num_rows, num_codes = zq.shape[0], keys.shape[0]
        return (
            code_term.new_empty((num_rows if rows_grad else 0, keys.shape[1])),
            code_term.new_empty(num_rows if rows_grad else 0),
            code_term.new_empty((num_codes if codes_grad else 0, keys.shape[1])),
            code_term.new_empty(num_codes if codes_grad else 0),
        )

    @torch.library.register_fake("fastvq_C::soft_quantize_entropy")
    def _soft_quantize_entropy_fake(zq, keys, code_term, row_term, values, metric, inverse_temperature,
                                    entropy_inverse_temperature, return_hard):
        num_rows = zq.shape[0]
        return (
            values.new_empty((num_rows, values.shape[1])),
            zq.new_empty(num_rows if return_hard else 0, dtype=torch.int64),
            *(code_term.new_empty(num_rows) for _ in range(2)),
            code_term.new_empty(keys.shape[0]),
            code_term.new_empty(num_rows),
        )

    @torch.library.register_fake("fastvq_C::soft_quantize_entropy_backward")
    def _soft_quantize_entropy_backward_fake(grad_soft, delta, lse, grad_entropy, code_weights, row_constant,
                                             entropy_lse, zq, keys, code_term, row_term, values, metric,
                                             inverse_temperature, entropy_inverse_temperature, rows_grad, codes_grad,
                                             values_grad):
        return _soft_quantize_backward_fake(grad_soft, delta, lse, zq, keys, code_term, row_term, values, metric,
                                            inverse_temperature, rows_grad, codes_grad, values_grad)

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
# --------------------------------------------------------------------------- soft assignments

# The C++ kernels' metric ids: cosine is dot on the operands SoftCodebook normalises.
_SOFT_METRIC_IDS = {"dot": 0, "cosine": 0, "l2": 1, "euclidean": 2}


def _soft_dtype(z: torch.Tensor, codebook: torch.Tensor, values: Optional[torch.Tensor]) -> torch.dtype:
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    return dtype if values is None else torch.promote_types(dtype, values.dtype)


def _soft_operands(prep: SoftCodebook, z: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(zq, keys, code_term, row_term, values)``: the prepared operands the kernels take, in the
    work dtype (the codebook itself for dot with finite codes: no copy of it is made here)."""
    zq, row_term = prep.rows(z)
    return zq.contiguous(), prep.keys.contiguous(), prep.code_term, row_term, prep.values.contiguous()


def _bf16_logit_products() -> bool:
    """Whether the soft kernels run bf16 logit products now: under ``FASTVQ_CPU_SEARCH`` ``auto`` or
    ``avx512-bf16`` on an AVX512-BF16 CPU, the rule (and CPU check) of the search's bf16 kernel, read per call."""
    return json.loads(torch.ops.fastvq_C.cpu_search_kernels())["bf16"] == "avx512bf16-direct"


def _kernel_operands(operands: tuple[torch.Tensor, ...], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The operands as the kernels take them. For bf16 inputs where the bf16 logit products run, ``zq`` and
    ``keys`` rounded to bf16 (exact for dot, where they are the inputs; the centred l2/euclidean and normalised
    cosine operands round once): the kernels then multiply them with ``vdpbf16ps``, accumulating in fp32, and
    widen them for everything else. Otherwise every operand stays in the work dtype."""
    if dtype != torch.bfloat16 or not _bf16_logit_products():
        return operands
    zq, keys, *rest = operands
    return (zq.to(torch.bfloat16), keys.to(torch.bfloat16), *rest)


@serial_torch_ops()
def soft_quantize(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    seed: Optional[torch.Tensor],
    return_hard: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(soft [N, Dv], indices int64 [N] or [0], lse [N])`` by the C++ kernel (fp32 accumulation for
    fp16/bf16, fp64 for fp64); the Gumbel noise is ``fastvq._philox``'s, bit for bit."""
    out_dtype = _soft_dtype(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, out_dtype)
    soft, indices, lse = with_threads(
        torch.ops.fastvq_C.soft_quantize,
        *_kernel_operands(_soft_operands(prep, z), out_dtype), _SOFT_METRIC_IDS[metric], 1.0 / temperature, seed,
        return_hard,
    )
    return soft.to(out_dtype), indices, lse


@serial_torch_ops()
def soft_quantize_backward(
    grad_soft: torch.Tensor,
    grad_lse: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    soft: torch.Tensor,
    lse: torch.Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
    compute_values_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_codebook, grad_values)`` in the work dtype, as the PyTorch path's: the kernel
    returns the sums of the per-logit weights, ``SoftCodebook`` chains them back to the inputs."""
    dtype = _soft_dtype(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, dtype)
    work = prep.work_dtype
    value_grad = compute_values_grad if values is not None else compute_codebook_grad
    grad_soft = grad_soft.to(work).contiguous()
    delta = (grad_soft * soft.to(work)).sum(dim=1) - grad_lse.to(work)
    operands = _soft_operands(prep, z)
    weighted_keys, row_sums, weighted_rows, code_sums, grad_values = with_threads(
        torch.ops.fastvq_C.soft_quantize_backward,
        grad_soft, delta, lse.to(work).contiguous(), *_kernel_operands(operands, dtype), _SOFT_METRIC_IDS[metric],
        1.0 / temperature, compute_z_grad, compute_codebook_grad, value_grad,
    )
    grad_z, grad_codebook = prep.chained_grads(z, codebook, operands[0], weighted_keys, row_sums, weighted_rows,
                                               code_sums, compute_z_grad, compute_codebook_grad)
    return (grad_z, *split_value_grad(values, grad_codebook, grad_values))


@serial_torch_ops()
def soft_entropy(
    z: torch.Tensor, codebook: torch.Tensor, metric: str, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_entropy [N], mean_probs [K], lse [N])`` of ``p = softmax(logits)`` by the C++ kernel, in
    the work dtype (the PyTorch path's two passes: online softmax and entropy, then the per-code sums)."""
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    prep = SoftCodebook(codebook, None, metric, dtype)
    zq, keys, code_term, row_term, _ = _kernel_operands(_soft_operands(prep, z), dtype)
    row_entropy, mean_probs, lse = with_threads(
        torch.ops.fastvq_C.soft_entropy,
        zq, keys, code_term, row_term, _SOFT_METRIC_IDS[metric], 1.0 / temperature
    )
    if z.shape[0]:
        mean_probs /= z.shape[0]
    # Rounding may still put a uniform row's entropy an ulp past log K, or a one-hot row's below 0.
    return row_entropy.clamp_(0.0, math.log(codebook.shape[0])), mean_probs, lse


@serial_torch_ops()
def soft_entropy_backward(
    grad_row_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor,
    grad_lse: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    row_entropy: torch.Tensor,
    lse: torch.Tensor,
    metric: str,
    temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_codebook)`` of ``soft_entropy`` in the work dtype (``[0, D]`` when not asked
    for): ``dL/dlogit = p (-a (logit - m) + c_k - <p, c> + b)`` as on the PyTorch path, the row
    constant ``b + a m`` made here and ``<p, c>`` by the kernel's first pass."""
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    prep = SoftCodebook(codebook, None, metric, dtype)
    work = prep.work_dtype
    grad_entropy = grad_row_entropy.to(work).contiguous()
    code_weights = (grad_mean_probs.to(work) / max(z.shape[0], 1)).contiguous()
    lse = lse.to(work).contiguous()
    row_constant = (grad_lse.to(work) + grad_entropy * (lse - row_entropy.to(work))).contiguous()
    operands = _soft_operands(prep, z)
    zq = operands[0]
    kernel_zq, keys, code_term, row_term, _ = _kernel_operands(operands, dtype)
    weighted_keys, row_sums, weighted_rows, code_sums = with_threads(
        torch.ops.fastvq_C.soft_entropy_backward,
        grad_entropy, code_weights, row_constant, lse, kernel_zq, keys, code_term, row_term, _SOFT_METRIC_IDS[metric],
        1.0 / temperature, compute_z_grad, compute_codebook_grad,
    )
    return prep.chained_grads(z, codebook, zq, weighted_keys, row_sums, weighted_rows, code_sums, compute_z_grad,
                              compute_codebook_grad)


@serial_torch_ops()
def soft_quantize_entropy(
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    metric: str,
    temperature: float,
    entropy_temperature: float,
) -> tuple[torch.Tensor, ...]:
    """``(soft, indices, lse, row_entropy, mean_probs, entropy_lse)`` by the fused C++ kernel: one product
    per tile gives both softmaxes (the entropies' second pass, the per-code sums, takes one more)."""
    out_dtype = _soft_dtype(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, out_dtype)
    soft, indices, lse, row_entropy, mean_probs, entropy_lse = with_threads(
        torch.ops.fastvq_C.soft_quantize_entropy,
        *_kernel_operands(_soft_operands(prep, z), out_dtype), _SOFT_METRIC_IDS[metric], 1.0 / temperature,
        1.0 / entropy_temperature, True,
    )
    if z.shape[0]:
        mean_probs /= z.shape[0]
    # Rounding may still put a uniform row's entropy an ulp past log K, or a one-hot row's below 0.
    row_entropy.clamp_(0.0, math.log(codebook.shape[0]))
    return soft.to(out_dtype), indices, lse, row_entropy, mean_probs, entropy_lse


@serial_torch_ops()
def soft_quantize_entropy_backward(
    grad_soft: torch.Tensor,
    grad_row_entropy: torch.Tensor,
    grad_mean_probs: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    values: Optional[torch.Tensor],
    soft: torch.Tensor,
    lse: torch.Tensor,
    row_entropy: torch.Tensor,
    entropy_lse: torch.Tensor,
    metric: str,
    temperature: float,
    entropy_temperature: float,
    compute_z_grad: bool,
    compute_codebook_grad: bool,
    compute_values_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_codebook, grad_values)`` of the fused op in the work dtype: one pass for the
    entropies' ``<p_n, c>``, then one whose tile of products gives both parts' weights, added."""
    dtype = _soft_dtype(z, codebook, values)
    prep = SoftCodebook(codebook, values, metric, dtype)
    work = prep.work_dtype
    value_grad = compute_values_grad if values is not None else compute_codebook_grad
    grad_soft = grad_soft.to(work).contiguous()
    delta = (grad_soft * soft.to(work)).sum(dim=1)
    grad_entropy = grad_row_entropy.to(work).contiguous()
    code_weights = (grad_mean_probs.to(work) / max(z.shape[0], 1)).contiguous()
    entropy_lse = entropy_lse.to(work).contiguous()
    row_constant = (grad_entropy * (entropy_lse - row_entropy.to(work))).contiguous()
    operands = _soft_operands(prep, z)
    weighted_keys, row_sums, weighted_rows, code_sums, grad_values = with_threads(
        torch.ops.fastvq_C.soft_quantize_entropy_backward,
        grad_soft, delta, lse.to(work).contiguous(), grad_entropy, code_weights, row_constant, entropy_lse,
        *_kernel_operands(operands, dtype), _SOFT_METRIC_IDS[metric], 1.0 / temperature, 1.0 / entropy_temperature,
        compute_z_grad, compute_codebook_grad, value_grad,
    )
    grad_z, grad_codebook = prep.chained_grads(z, codebook, operands[0], weighted_keys, row_sums, weighted_rows,
                                               code_sums, compute_z_grad, compute_codebook_grad)
    return (grad_z, *split_value_grad(values, grad_codebook, grad_values))
