"""What every Triton launcher needs: the metric codes, the interpreter switch, the dot precision, the
device's limits, :class:`CompileCase`, the form in which each op family lists its launches for the AOT
compile test, and the device helper the codebook-walking kernels share (:func:`true_distance`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import triton
import triton.language as tl

from ..common import triton_interpreting as interpreting

# The metric as every kernel's ``METRIC`` constexpr names it: one code per metric in every Triton file.
METRIC_L2 = tl.constexpr(0)
METRIC_COSINE = tl.constexpr(1)
METRIC_DOT = tl.constexpr(2)
METRIC_EUCLIDEAN = tl.constexpr(3)
METRIC_IDS = {"l2": METRIC_L2, "cosine": METRIC_COSINE, "dot": METRIC_DOT, "euclidean": METRIC_EUCLIDEAN}


@triton.jit
def true_distance(z_ptr, codebook_ptr, codes_out_ptr, rows, row_mask, index, D, stride_z_row, stride_z_col,
                  stride_cb_row, stride_cb_col, METRIC: tl.constexpr, RETURN_CODES: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's true distance to its code ``index [BLOCK_N]`` (int64), from ``z - e`` directly (exact,
    no cancellation, >= 0 for l2 and cosine); with ``RETURN_CODES`` the codes are stored to the
    contiguous ``codes_out_ptr [N, D]`` too. Shared by the nearest-code and the top-k kernels."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    sq_sum = tl.zeros((BLOCK_N,), tl.float32)
    dot_sum = tl.zeros((BLOCK_N,), tl.float32)
    z_sq = tl.zeros((BLOCK_N,), tl.float32)
    e_sq = tl.zeros((BLOCK_N,), tl.float32)
    for dim_start in range(0, D, BLOCK_D):
        dim_idx = dim_start + dims
        mask = row_mask[:, None] & (dim_idx < D)[None, :]
        z_vals = tl.load(z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col, mask=mask, other=0.0)
        e_vals = tl.load(
            codebook_ptr + index[:, None] * stride_cb_row + dim_idx[None, :] * stride_cb_col, mask=mask, other=0.0
        )
        if RETURN_CODES:
            tl.store(codes_out_ptr + rows[:, None] * D + dim_idx[None, :], e_vals.to(codes_out_ptr.dtype.element_ty),
                     mask=mask)
        z_f = z_vals.to(tl.float32)
        e_f = e_vals.to(tl.float32)
        if METRIC == METRIC_L2:
            diff = z_f - e_f
            sq_sum += tl.sum(diff * diff, axis=1)
        else:
            dot_sum += tl.sum(z_f * e_f, axis=1)
            if METRIC == METRIC_COSINE:
                z_sq += tl.sum(z_f * z_f, axis=1)
                e_sq += tl.sum(e_f * e_f, axis=1)
    if METRIC == METRIC_L2:
        distance = sq_sum
    elif METRIC == METRIC_COSINE:
        norms = tl.maximum(tl.sqrt(z_sq), 1e-12) * tl.maximum(tl.sqrt(e_sq), 1e-12)
        # Rounding can put a parallel pair's 1 - cos a few ulps below 0; a NaN row stays NaN.
        distance = tl.maximum(1.0 - dot_sum / norms, 0.0, propagate_nan=tl.PropagateNan.ALL)
    else:
        distance = -dot_sum
    return distance


# --------------------------------------------------------------------------- the searches' tile scoring
#
# Shared by the nearest-code (search.py) and the top-k (topk.py) kernels, so that both rank codes on
# the same computed score and the top-k's first column is the search's answer. Scores follow
# fastvq/backends/search_codebook.py (SearchCodebook): l2 is |e - c|^2 - 2 (z - c).(e - c) with c the
# codebook mean, cosine -z.e/|e|, dot -z.e.


@triton.jit
def to_search_dtype(x, search_codes_ptr, DOT_IN_FP32: tl.constexpr):
    """``x`` in the dtype ``tl.dot`` multiplies: the codes'. Triton's interpreter multiplies bf16
    tiles as raw integers in tl.dot; there they are widened to fp32 first (bf16 products are exact
    in fp32, so the sums agree with the GPU's)."""
    if DOT_IN_FP32:
        y = x.to(tl.float32)
    else:
        y = x.to(search_codes_ptr.dtype.element_ty)
    return y


@triton.jit
def load_z_tile(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col, search_codes_ptr,
                METRIC: tl.constexpr, DOT_IN_FP32: tl.constexpr, BLOCK_D: tl.constexpr):
    """The rows' whole (centred, for l2) vectors, when they fit one ``BLOCK_D`` slice."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dim_mask = dims < D
    z_tile = tl.load(
        z_ptr + rows[:, None] * stride_z_row + dims[None, :] * stride_z_col,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(tl.float32)
    if METRIC == METRIC_L2:
        center = tl.load(center_ptr + dims, mask=dim_mask, other=0.0)
        z_tile = z_tile - center[None, :]
    return to_search_dtype(z_tile, search_codes_ptr, DOT_IN_FP32)


@triton.jit
def centered_square_norms(z_ptr, center_ptr, rows, row_mask, D, stride_z_row, stride_z_col, METRIC: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's ``|z - c|^2`` (l2) or ``|z|^2`` (cosine): what Gumbel sampling adds back to the scores."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    total = tl.zeros((BLOCK_N,), tl.float32)
    for dim_start in range(0, D, BLOCK_D):
        dim_idx = dim_start + dims
        dim_mask = dim_idx < D
        z_slice = tl.load(
            z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col,
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        if METRIC == METRIC_L2:
            center = tl.load(center_ptr + dim_idx, mask=dim_mask, other=0.0)
            z_slice = tl.where(dim_mask[None, :], z_slice - center[None, :], 0.0)
        total += tl.sum(z_slice * z_slice, axis=1)
    return total


@triton.jit
def tile_scores(z_ptr, search_codes_ptr, code_bias_ptr, center_ptr, z_tile, z_centered_sq, row_seeds, rows,
                row_mask, code_start, code_end, D, stride_z_row, stride_z_col, inv_temperature, METRIC: tl.constexpr,
                SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
                SINGLE_D_TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """The search scores ``[BLOCK_N, BLOCK_K]`` of the rows against codes ``code_start + [0, BLOCK_K)``
    (with Gumbel noise when ``SAMPLE``), and those codes. A NaN score and a code at or past ``code_end``
    are +inf. ``z_tile`` is :func:`load_z_tile`'s when ``SINGLE_D_TILE``; ``z_centered_sq`` is
    :func:`centered_square_norms`' and ``row_seeds`` the rows' Philox seeds when ``SAMPLE``."""
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    codes = code_start + tl.arange(0, BLOCK_K)
    code_mask = codes < code_end
    code_rows = codes.to(tl.int64) * D  # int64: K * D may pass 2**31
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    if SINGLE_D_TILE:
        code_tile = tl.load(
            search_codes_ptr + code_rows[None, :] + dims[:, None],
            mask=code_mask[None, :] & (dims < D)[:, None],
            other=0.0,
        )
        acc = tl.dot(z_tile, to_search_dtype(code_tile, search_codes_ptr, DOT_IN_FP32), acc,
                     input_precision=DOT_PRECISION)
    else:
        for dim_start in range(0, D, BLOCK_D):
            dim_idx = dim_start + dims
            dim_mask = dim_idx < D
            z_slice = tl.load(
                z_ptr + rows[:, None] * stride_z_row + dim_idx[None, :] * stride_z_col,
                mask=row_mask[:, None] & dim_mask[None, :],
                other=0.0,
            ).to(tl.float32)
            if METRIC == METRIC_L2:
                center = tl.load(center_ptr + dim_idx, mask=dim_mask, other=0.0)
                z_slice = z_slice - center[None, :]
            code_tile = tl.load(
                search_codes_ptr + code_rows[None, :] + dim_idx[:, None],
                mask=code_mask[None, :] & dim_mask[:, None],
                other=0.0,
            )
            acc = tl.dot(to_search_dtype(z_slice, search_codes_ptr, DOT_IN_FP32),
                         to_search_dtype(code_tile, search_codes_ptr, DOT_IN_FP32), acc, input_precision=DOT_PRECISION)
    if METRIC == METRIC_L2:
        bias = tl.load(code_bias_ptr + codes.to(tl.int64), mask=code_mask, other=0.0)
        scores = bias[None, :] - 2.0 * acc
    else:
        scores = -acc
    if SAMPLE:
        # Gumbel-max: softmax(-distance / T) is sampled by the argmin of distance / T - gumbel, the
        # noise from a counter-based generator (one Philox stream per row) instead of an N x K
        # tensor. l2 samples on the plain (not squared) distance, as vector-quantize-pytorch's
        # -cdist logits do, and cosine on the true cosine.
        if METRIC == METRIC_L2:
            scores = tl.sqrt(tl.maximum(scores + z_centered_sq[:, None], 0.0))
        elif METRIC == METRIC_COSINE:
            scores = scores / tl.maximum(tl.sqrt(z_centered_sq), 1e-12)[:, None]
        # 32-bit Philox counters whatever the width of ``codes``: a split search draws the same noise.
        uniform = tl.maximum(tl.rand(row_seeds[:, None], codes.to(tl.int32)[None, :]), 1e-20)
        gumbel = -tl.log(tl.maximum(-tl.log(uniform), 1e-20))
        scores = scores * inv_temperature - gumbel
    scores = tl.where(scores != scores, float("inf"), scores)
    scores = tl.where(code_mask[None, :], scores, float("inf"))
    return scores, codes


def matmul_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 matmuls run in plain tf32, read through either of its APIs.

    PyTorch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` (and the global
    ``torch.backends.fp32_precision`` it inherits from); once either is set, reading the legacy
    ``allow_tf32`` raises RuntimeError. The new getter resolves the inheritance and reflects the
    legacy setter, so it is read wherever it exists; older PyTorch has only ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return bool(matmul.allow_tf32)


def conv_allows_tf32() -> bool:
    """Whether PyTorch lets fp32 convolutions run in plain tf32 (on by default, as ``conv2d`` runs).

    ``torch.backends.cudnn.conv.fp32_precision`` where it exists (PyTorch >= 2.9), else the legacy
    ``torch.backends.cudnn.allow_tf32``.
    """
    cudnn = torch.backends.cudnn
    precision = getattr(getattr(cudnn, "conv", None), "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(cudnn.allow_tf32)


def dot_precision(dtype: torch.dtype, op: str = "matmul") -> str:
    """``tl.dot`` precision for fp32 inputs.

    The contract forbids plain tf32 unless the caller opts in, the way PyTorch's own operator
    does: for a matmul-like op (``op="matmul"``: the search) PyTorch's matmul flag, off by default
    (:func:`matmul_allows_tf32`); for a convolution (``op="conv"``) cuDNN's convolution flag, on by
    default (:func:`conv_allows_tf32`). Otherwise ``tf32x3`` keeps fp32 accuracy on tensor cores.
    fp16/bf16 inputs always multiply natively with fp32 accumulation. The interpreter computes in
    numpy and only knows ``ieee``.
    """
    if op not in ("matmul", "conv"):
        raise ValueError(f"op must be 'matmul' or 'conv', got {op!r}")
    if interpreting():
        return "ieee"
    if dtype == torch.float32 and (matmul_allows_tf32() if op == "matmul" else conv_allows_tf32()):
        return "tf32"
    return "tf32x3"


def device_properties() -> dict:
    """Triton's account of the current device (``max_shared_mem``: the opt-in shared memory one
    block may use; ``multiprocessor_count``; ...), from the driver Triton launches on."""
    from triton.runtime import driver

    active = driver.active
    return active.utils.get_device_properties(active.get_current_device())


def device_arch() -> int:
    """The current device's compute capability as Triton names its target (80 for sm_80, 90 for sm_90)."""
    from triton.runtime import driver

    return driver.active.get_current_target().arch


def size_bucket(size: int) -> int:
    """The power of two at or above ``size``: an autotuner's key for N or K, so that the first
    call's shape (a sampler's tiny crop, say) does not fix the tiles of every later, larger one."""
    return triton.next_power_of_2(max(size, 1))


def slice_width(dim: int, widest: int) -> int:
    """The width of the slices a kernel walks a row of ``dim`` values in: the power of two that covers
    ``dim``, at least 16 (the narrowest tile ``tl.dot`` takes) and at most ``widest``."""
    return min(widest, max(16, triton.next_power_of_2(max(dim, 1))))


def interpreter_config(*blocks: str) -> triton.Config:
    """The config a launch takes under the interpreter, where every tile is a numpy array and the smallest
    tiles ``tl.dot`` accepts (16 wide) run fastest: each of ``blocks`` 16, one warp, one stage."""
    return triton.Config({name: 16 for name in blocks}, num_warps=1, num_stages=1)


def only(configs, chosen) -> list:
    """The configs of ``configs`` that are (by identity) in ``chosen``: two lists may hold equal
    ``triton.Config``s, and an autotuner's prune keeps the one of the list it means."""
    return [config for config in configs if any(config is wanted for wanted in chosen)]


def unaligned_d(dim: int) -> bool:
    """Whether rows of ``dim`` values take more than one 32-wide slice and ``dim`` is no multiple of 16
    (D = 70, 100): Triton cannot specialise a row stride of ``dim`` (the prepared codes') as divisible by 16,
    so the loads are scalar and the address arithmetic takes registers that wide slices need."""
    return dim % 16 != 0 and dim > 32


class SearchTiles:
    """The tile lists of a codebook-walking kernel (the search and the top-k), the prune that picks a call's
    list, and the autotuned launcher built on them: one builder for both families, so that they key their
    lists on the same things the same way.

    A list is chosen by the dtype class of the prepared codes (``fp32``, whose tf32x3 products hold split
    operands in registers, or ``half``: fp16 and bf16), by the GPU (``*_hopper``: sm_90's own list, where
    the family has one; other GPUs take the sm_80 list) and by ``D``: where it is :func:`unaligned_d` the
    ``*_unaligned_d`` lists (16-wide slices) serve. Each list is given as rows of ``(BLOCK_N, BLOCK_K,
    BLOCK_D, num_warps, num_stages)`` and ends with its smallest tile, the one a prune that keeps nothing
    else falls back to. The prune keeps the list's tiles whose ``BLOCK_D`` is no wider than ``D`` needs
    (at most ``max(32, next power of two)``) and that pass the family's own test, if any.
    """

    # Under the interpreter every tile is a numpy array: the smallest tiles tl.dot accepts are fastest.
    INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_D": 16}

    def __init__(self, *, fp32, half, fp32_unaligned_d, half_unaligned_d, fp32_hopper=None, half_hopper=None,
                 fp32_hopper_unaligned_d=None, half_hopper_unaligned_d=None):
        def configs(rows):
            return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                    for bn, bk, bd, w, s in rows]

        # (dtype class, sm_90, unaligned D) -> list; where a family has no sm_90 list, the sm_80 one.
        self.lists = {}
        # Every distinct list once, in this order: what the autotuner is given.
        self.configs = []
        for unaligned, dtype_class, rows, hopper_rows in (
            (False, "fp32", fp32, fp32_hopper),
            (False, "half", half, half_hopper),
            (True, "fp32", fp32_unaligned_d, fp32_hopper_unaligned_d),
            (True, "half", half_unaligned_d, half_hopper_unaligned_d),
        ):
            sm80 = configs(rows)
            sm90 = configs(hopper_rows) if hopper_rows else sm80
            self.lists[dtype_class, False, unaligned] = sm80
            self.lists[dtype_class, True, unaligned] = sm90
            self.configs += sm80 + (sm90 if sm90 is not sm80 else [])

    def pool(self, dtype: torch.dtype, arch: int, dim: int) -> list:
        """The list a call with prepared codes of ``dtype`` takes on a GPU of compute capability ``arch``."""
        return self.lists["fp32" if dtype == torch.float32 else "half", arch == 90, unaligned_d(dim)]

    def prune(self, allows: Callable | None = None) -> Callable:
        """The family's prune (for :func:`fits_shared_memory`): the call's list, slices no wider than D needs,
        and ``allows(config, named_args, meta)`` where given."""

        def prune_configs(configs, named_args, **kwargs):
            dim = named_args["D"]
            width = max(32, triton.next_power_of_2(dim))
            own = only(configs, self.pool(named_args["search_codes_ptr"].dtype, device_arch(), dim))
            kept = [config for config in own if config.kwargs["BLOCK_D"] <= width
                    and (allows is None or allows(config, named_args, kwargs))]
            return kept or own[-1:] or configs[:1]

        return prune_configs

    def launchers(self, kernel, key: list, allows: Callable | None = None) -> tuple:
        """``(fixed, tuned)``: ``kernel`` with its ``SINGLE_D_TILE`` constexpr set by the heuristic (a row
        of ``D`` values fits one ``BLOCK_D`` slice), launched with a config the caller names; and that,
        autotuned over :attr:`configs` on ``key``, pruned by :meth:`prune` and then by shared memory."""
        fixed = triton.heuristics({"SINGLE_D_TILE": lambda args: args["D"] <= args["BLOCK_D"]})(kernel)
        tuned = triton.autotune(
            configs=self.configs, key=key,
            prune_configs_by={"early_config_prune": fits_shared_memory(fixed, self.prune(allows))},
        )(fixed)
        return fixed, tuned


def _compiled(kernel) -> Any:
    """A warm-up's result: the compiled kernel, or (in Triton's async compile mode) its future's."""
    return kernel.result() if hasattr(kernel, "result") else kernel


def fits_shared_memory(kernel, prune: Callable | None = None) -> Callable:
    """An ``early_config_prune`` for ``triton.autotune`` that keeps the configs whose compiled kernel
    fits the current device's shared memory per block (after ``prune``, a family's own pruning).

    Each config is compiled for the device (``kernel.warmup``, which fills the JIT's cache, so the
    autotuner's benchmark runs reuse it) and its shared memory read from the compiled kernel: exact
    for every device and Triton version, where a formula would be an estimate. An A100 (sm_80) lets
    a block use 163 KB and an H100/H200 (sm_90) 227 KB, a consumer Ampere or Ada card only 99 KB; a
    config over the limit would fail to launch. If none fits, the smallest is kept, and its launch
    raises Triton's OutOfResources, which names the sizes.
    """

    def early_config_prune(configs, named_args, **kwargs):
        candidates = prune(configs, named_args, **kwargs) if prune is not None else list(configs)
        limit = device_properties()["max_shared_mem"]
        args = list(named_args.values())
        # The autotuner passes its launch's grid and warm-up flag along with the constexprs.
        meta = {name: value for name, value in kwargs.items() if name not in ("grid", "warmup")}
        shared = {
            config: _compiled(kernel.warmup(*args, grid=(1,), **meta, **config.all_kwargs())).metadata.shared
            for config in candidates
        }
        kept = [config for config in candidates if shared[config] <= limit]
        return kept or [min(candidates, key=shared.__getitem__)]

    early_config_prune.family_prune = prune  # what the AOT compile test checks the shared-memory rule after
    return early_config_prune


@dataclass(frozen=True)
class CompileCase:
    """One way a launcher of this package launches a Triton kernel, for ``tests/backends/test_aot_compile.py``.

    The convention: every op-family file in ``fastvq/backends/triton/`` that defines ``@triton.jit``
    kernels has a function ``compile_cases() -> list[CompileCase]`` listing the launches real calls
    make, and builds their arguments with the same code its launcher uses. The test compiles each
    case for sm_80 and sm_90 on a machine without a GPU, in every config the launch can take, and
    fails for a kernel of the package that no case launches. See ``fastvq/backends/triton/__init__.py``.

    - ``name``: which branch this is, e.g. ``"l2 bf16 D=256"``: the test's messages name it.
    - ``launcher``: what the launcher calls: a ``@triton.jit`` kernel, or the ``triton.autotune`` /
      ``triton.heuristics`` objects around one. Through an autotuner every config its early prune
      keeps on the target is compiled.
    - ``args``: the positional arguments, as the launcher passes them. CPU tensors stand in for CUDA
      ones: the JIT specialises on dtype, 16-byte alignment and sizes (1, multiples of 16), never on
      the device.
    - ``meta``: the keyword arguments (constexprs) the launcher passes.
    - ``configs``: for a launcher that is not autotuned, the ``triton.Config`` (block sizes, warps,
      stages) it launches with; empty for an autotuner, whose configs are its own.
    """

    name: str
    launcher: Any
    args: tuple
    meta: dict = field(default_factory=dict)
    configs: tuple = ()


def offset_rows(rows: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[rows, dim]`` compile-case input laid out as a real call can pass it, but no 16-divisible case
    does: ``x[:, 1:]`` of a ``[rows, dim + 1]`` tensor (a slice that drops a leading channel). Its row
    stride (``dim + 1``) and its base address (one element in) are no multiple of 16, so Triton
    specialises neither, and every load of it is a scalar one."""
    return torch.zeros(rows, dim + 1, dtype=dtype)[:, 1:]


def codes_by_column(codes: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A ``[codes, dim]`` codebook kept the other way round, as ``[dim, codes]`` (the layout of Sonnet's
    original embeddings), and transposed: code stride 1 (a constant to Triton), dimension stride ``codes``."""
    return torch.zeros(dim, codes, dtype=dtype).t()


@contextlib.contextmanager
def recording_launches(module):
    """Within the block, ``module``'s kernels record each launch (launcher object, positional and
    keyword arguments) in the yielded list instead of running, so ``compile_cases`` can call the
    family's own launchers on small CPU inputs and list exactly the launches they make."""
    from triton.runtime.jit import KernelInterface

    records = []
    originals = {name: value for name, value in vars(module).items() if isinstance(value, KernelInterface)}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.kernel, args, kwargs))

    try:
        for name, kernel in originals.items():
            setattr(module, name, Recorder(kernel))
        yield records
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


def cases_from_launches(name: str, records: list) -> list[CompileCase]:
    """``CompileCase``s of launches recorded by :func:`recording_launches`: an autotuned launch as it
    is; a fixed one with the warps and stages it passed (Triton's defaults where it passed none)."""
    from triton.runtime.autotuner import Autotuner

    cases = []
    for kernel, args, kwargs in records:
        inner = kernel
        while not hasattr(inner, "__name__"):  # through triton.autotune / triton.heuristics
            inner = inner.fn
        label = f"{name}: {inner.__name__}"
        if isinstance(kernel, Autotuner):
            cases.append(CompileCase(label, kernel, args, dict(kwargs)))
            continue
        meta = dict(kwargs)
        config = triton.Config({}, num_warps=meta.pop("num_warps", 4), num_stages=meta.pop("num_stages", 3))
        cases.append(CompileCase(label, kernel, args, meta, (config,)))
    return cases
