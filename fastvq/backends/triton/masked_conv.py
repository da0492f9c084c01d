"""PixelCNN masked convolution as an implicit GEMM over the unmasked taps only.

A mask keeps a raster-order prefix of ``NUM_TAPS`` taps (``fastvq._masks``), so the kernels
loop ``for tap in range(NUM_TAPS)`` and never load, multiply or store a masked tap: a 7 x 7 type-B
convolution does 25 taps' work, not 49. The weight is read through a packed copy of its kept taps
(``[NUM_TAPS, K, N]``, a few MB at most) and is never modified.

- ``_masked_conv_implicit_gemm_kernel``: ``out[pixel, n] = sum_tap sum_k src[pixel + offset(tap), k]
  * w[tap, k, n]``. A program owns ``BLOCK_M`` output pixels x ``BLOCK_N`` output channels and
  accumulates ``tl.dot`` tiles in fp32 over the kept taps x ``BLOCK_K``-channel blocks. The forward
  reads ``x`` at ``+(tap - pad)``; the input gradient (``TRANSPOSED``) is the same loop reading the
  output gradient at ``-(tap - pad)`` with the weight's channel axes swapped. Padding is a load
  mask, never a padded copy.
- ``_masked_conv_weight_grad_kernel``: ``grad_w[tap, ci, co] = sum_pixels x[pixel + offset(tap), ci]
  * grad_out[pixel, co]`` for the kept taps; a program owns one tap, a ``BLOCK_CI x BLOCK_CO`` tile
  and one split of the pixels. Splits write separate slices of an fp32 workspace that is summed
  afterwards, so the result is deterministic (no atomics). Masked taps are exact zeros.

Inputs may have any strides (NCHW, channels-last, views); offsets are int64. Accumulation is fp32;
fp32 ``tl.dot`` follows PyTorch's convolution flag as ``conv2d`` does (``torch.backends.cudnn``'s
``allow_tf32`` or ``conv.fp32_precision``, tf32 by default), and uses ``tf32x3`` where that is off
(``fastvq.backends.triton.common.dot_precision``).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..._masks import num_taps
from ..common import output_memory_format, output_size, promoted_dtype
from .common import (
    CompileCase,
    device_arch,
    device_properties,
    dot_precision,
    fits_shared_memory,
    interpreting,
    only,
)


@triton.jit
def _masked_conv_implicit_gemm_kernel(
    src_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    NUM_PIXELS,
    SRC_C,
    SRC_H,
    SRC_W,
    OUT_C,
    OUT_H,
    OUT_W,
    PAD_H,
    PAD_W,
    stride_src_b,
    stride_src_c,
    stride_src_h,
    stride_src_w,
    stride_w_tap,
    stride_w_k,
    stride_w_n,
    stride_out_b,
    stride_out_c,
    stride_out_h,
    stride_out_w,
    KW: tl.constexpr,
    NUM_TAPS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pixels = pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    pixel_mask = pixels < NUM_PIXELS
    out_w = pixels % OUT_W
    out_h = (pixels // OUT_W) % OUT_H
    batch = pixels // (OUT_W * OUT_H)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_mask = cols < OUT_C
    channels = tl.arange(0, BLOCK_K).to(tl.int64)
    # Triton's interpreter multiplies bf16 tiles as raw integers in tl.dot; there the tiles are
    # widened to fp32 first (bf16 products are exact in fp32).
    if DOT_IN_FP32:
        dot_dtype = tl.float32
    else:
        dot_dtype = w_ptr.dtype.element_ty

    # One flat loop over (tap, channel block) rather than two nested ones, so that the compiler's
    # software pipelining keeps loads in flight across tap boundaries too.
    k_blocks = tl.cdiv(SRC_C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for step in range(NUM_TAPS * k_blocks):
        tap = (step // k_blocks).to(tl.int64)
        tap_h = tap // KW
        tap_w = tap % KW
        if TRANSPOSED:
            src_h = out_h - tap_h + PAD_H
            src_w = out_w - tap_w + PAD_W
        else:
            src_h = out_h + tap_h - PAD_H
            src_w = out_w + tap_w - PAD_W
        inside = pixel_mask & (src_h >= 0) & (src_h < SRC_H) & (src_w >= 0) & (src_w < SRC_W)
        ks = (step % k_blocks) * BLOCK_K + channels
        k_mask = ks < SRC_C
        src_tile = tl.load(
            src_ptr + (batch * stride_src_b + src_h * stride_src_h + src_w * stride_src_w)[:, None]
            + (ks * stride_src_c)[None, :],
            mask=inside[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_tile = tl.load(
            w_ptr + tap * stride_w_tap + (ks * stride_w_k)[:, None] + (cols * stride_w_n)[None, :],
            mask=k_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(src_tile.to(dot_dtype), w_tile.to(dot_dtype), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_offsets = (batch * stride_out_b + out_h * stride_out_h + out_w * stride_out_w)[:, None] + (
        cols * stride_out_c
    )[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=pixel_mask[:, None] & col_mask[None, :])


@triton.jit
def _masked_conv_weight_grad_kernel(
    x_ptr,
    grad_ptr,
    workspace_ptr,
    NUM_PIXELS,
    PIXELS_PER_SPLIT,
    NUM_SPLITS,
    C_IN,
    H,
    W,
    C_OUT,
    OUT_H,
    OUT_W,
    PAD_H,
    PAD_W,
    stride_x_b,
    stride_x_c,
    stride_x_h,
    stride_x_w,
    stride_g_b,
    stride_g_c,
    stride_g_h,
    stride_g_w,
    stride_ws_split,
    stride_ws_tap,
    stride_ws_ci,
    stride_ws_co,
    KW: tl.constexpr,
    NUM_TAPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_ci = tl.program_id(0).to(tl.int64)
    pid_co = tl.program_id(1).to(tl.int64)
    pid_tap_split = tl.program_id(2).to(tl.int64)
    tap = pid_tap_split // NUM_SPLITS
    split = pid_tap_split % NUM_SPLITS
    tap_h = tap // KW
    tap_w = tap % KW
    in_channels = pid_ci * BLOCK_CI + tl.arange(0, BLOCK_CI).to(tl.int64)
    ci_mask = in_channels < C_IN
    out_channels = pid_co * BLOCK_CO + tl.arange(0, BLOCK_CO).to(tl.int64)
    co_mask = out_channels < C_OUT
    if DOT_IN_FP32:
        dot_dtype = tl.float32
    else:
        dot_dtype = grad_ptr.dtype.element_ty

    start = split * PIXELS_PER_SPLIT
    stop = tl.minimum(start + PIXELS_PER_SPLIT, NUM_PIXELS)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), tl.float32)
    for pixel_start in range(start, stop, BLOCK_M):
        pixels = pixel_start + tl.arange(0, BLOCK_M).to(tl.int64)
        pixel_mask = pixels < stop
        out_w = pixels % OUT_W
        out_h = (pixels // OUT_W) % OUT_H
        batch = pixels // (OUT_W * OUT_H)
        src_h = out_h + tap_h - PAD_H
        src_w = out_w + tap_w - PAD_W
        inside = pixel_mask & (src_h >= 0) & (src_h < H) & (src_w >= 0) & (src_w < W)
        x_tile = tl.load(
            x_ptr
            + (batch * stride_x_b + src_h * stride_x_h + src_w * stride_x_w)[None, :]
            + (in_channels * stride_x_c)[:, None],
            mask=ci_mask[:, None] & inside[None, :],
            other=0.0,
        )
        grad_tile = tl.load(
            grad_ptr
            + (batch * stride_g_b + out_h * stride_g_h + out_w * stride_g_w)[:, None]
            + (out_channels * stride_g_c)[None, :],
            mask=pixel_mask[:, None] & co_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(x_tile.to(dot_dtype), grad_tile.to(dot_dtype), acc, input_precision=DOT_PRECISION)

    ws = workspace_ptr + split * stride_ws_split + tap * stride_ws_tap
    tl.store(
        ws + (in_channels * stride_ws_ci)[:, None] + (out_channels * stride_ws_co)[None, :],
        acc,
        mask=ci_mask[:, None] & co_mask[None, :],
    )


# The tile lists are chosen with the Triton the project pins (3.6, .ci/run; tests/_aot.py).
_TILES_CHOSEN_WITH_THIS_TRITON = tuple(int(part) for part in triton.__version__.split(".")[:2]) == (3, 6)


def _for_precision(configs, heavy_configs, kwargs):
    """``configs`` less those that spill registers in fp32 at full accuracy (``tf32x3``: three MMAs
    on split operands) on GPUs before Hopper, whose MMAs take their operands from registers."""
    if kwargs.get("DOT_PRECISION") == "tf32x3" and device_arch() != 90:
        return [c for c in configs if not any(c is heavy for heavy in heavy_configs)]
    return list(configs)


def _pinned_triton_gemm_configs(configs, named_args, kwargs) -> list:
    n_cap = max(32, triton.next_power_of_2(named_args["OUT_C"]))
    k_cap = max(32, triton.next_power_of_2(named_args["SRC_C"]))
    usable = _for_precision(only(configs, _GEMM_CONFIGS), _GEMM_TF32X3_SPILLING, kwargs)
    kept = [c for c in usable if c.kwargs["BLOCK_N"] <= n_cap and c.kwargs["BLOCK_K"] <= k_cap]
    return kept or usable[-1:]


def _prune_gemm_configs(configs, named_args, **kwargs):
    # The forward's tile may not depend on the map (see _implicit_gemm_tuned), so with another Triton than the
    # one the tiles were chosen with it takes the one that spills nothing there on odd maps too.
    if not _TILES_CHOSEN_WITH_THIS_TRITON:
        return only(configs, _GEMM_ANY_MAP_OTHER_TRITON)
    return _pinned_triton_gemm_configs(configs, named_args, kwargs)


def _strides_aligned(named_args, stride_names) -> bool:
    """Whether Triton specialises each of these strides as divisible by 16 (or as the constant 1). On odd
    maps (7 x 7, 13 x 13, 15 x 15) or odd channel counts it cannot: the loads lose their vector width and
    the address arithmetic takes registers that the larger tiles need (they spill, 24 to 800 B)."""
    return all(named_args[name] == 1 or named_args[name] % 16 == 0 for name in stride_names)


def _prune_input_grad_configs(configs, named_args, **kwargs):
    aligned = _strides_aligned(named_args, _GEMM_STRIDES)
    if not aligned and not _TILES_CHOSEN_WITH_THIS_TRITON:
        return only(configs, _GEMM_ANY_MAP_OTHER_TRITON)
    kept = _pinned_triton_gemm_configs(configs, named_args, kwargs)
    if aligned:
        return kept
    return [c for c in kept if not any(c is spilling for spilling in _GEMM_UNALIGNED_SPILLING)] or kept[-1:]


def _prune_weight_grad_configs(configs, named_args, **kwargs):
    ci_cap = max(32, triton.next_power_of_2(named_args["C_IN"]))
    co_cap = max(32, triton.next_power_of_2(named_args["C_OUT"]))
    usable = _for_precision(configs, _WEIGHT_GRAD_TF32X3_SPILLING, kwargs)
    if _strides_aligned(named_args, _WEIGHT_GRAD_STRIDES):
        usable = [c for c in usable if not any(c is unaligned_only for unaligned_only in _WEIGHT_GRAD_UNALIGNED_ONLY)]
    else:
        usable = [c for c in usable if any(c is safe for safe in _WEIGHT_GRAD_UNALIGNED)]
    kept = [c for c in usable if c.kwargs["BLOCK_CI"] <= ci_cap and c.kwargs["BLOCK_CO"] <= co_cap]
    return kept or usable[-1:]


# Chosen so that none spills registers or overflows shared memory on sm_80 and sm_90 in any dtype
# (fp32 under tf32x3 on sm_80 with the subsets below), checked by tests/backends/test_aot_compile.py with the
# pinned Triton; the smallest serves 32 channels and is what a prune that keeps nothing falls back to.
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 32, 32, 4, 4),
    ]
]
# Triton 3.9 (ptxas 12.9) spills 24 B to 3 KB in every tile above on odd maps (15 x 15 bf16 7 x 7, 13 x 13 fp32
# tf32x3 3 x 3 on 96 channels), forward and input gradient, on sm_80 or sm_90; of those and 64 x 64 x 16,
# 64 x 64 x 32 on three stages and 32 x 64 x 32, only the last spills nothing in both launches on both targets.
# Only a Triton other than the pinned one launches it (_TILES_CHOSEN_WITH_THIS_TRITON).
_GEMM_ANY_MAP_OTHER_TRITON = [triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)]
_WEIGHT_GRAD_CONFIGS = [
    triton.Config({"BLOCK_CI": bci, "BLOCK_CO": bco, "BLOCK_M": bm}, num_warps=w, num_stages=s)
    for bci, bco, bm, w, s in [
        (64, 64, 64, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 64, 8, 3),
        (64, 64, 32, 8, 3),
        (32, 32, 64, 4, 4),
    ]
]
# On sm_80 these spill registers under tf32x3 (the default fp32 precision, tf32, does not):
# 128 x 64 and 64 x 128 output tiles on four warps, and every weight-gradient tile but 32 x 32.
_GEMM_TF32X3_SPILLING = [c for c in _GEMM_CONFIGS
                         if c.num_warps == 4 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 64]
_WEIGHT_GRAD_TF32X3_SPILLING = [c for c in _WEIGHT_GRAD_CONFIGS
                                if c.kwargs["BLOCK_CI"] * c.kwargs["BLOCK_CO"] > 32 * 32]
# Where a stride is not a multiple of 16 (``_strides_aligned``): the input gradient's 128 x 128 tile spills on
# sm_80 in fp32, and of the weight gradient's tiles only these two spill nothing (64 x 64 on eight warps, whose
# accumulator is half a four-warp one's per thread, and 32 x 32). The eight-warp 64 x 64 tile serves only there:
# on aligned maps it spills 16 B in fp32 on sm_80, where the four-warp 64 x 64 x 64 tile does not.
_GEMM_UNALIGNED_SPILLING = [c for c in _GEMM_CONFIGS if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] == 128 * 128]
_WEIGHT_GRAD_UNALIGNED = [c for c in _WEIGHT_GRAD_CONFIGS
                          if (c.kwargs["BLOCK_CI"], c.kwargs["BLOCK_CO"], c.num_warps) in ((64, 64, 8), (32, 32, 4))]
_WEIGHT_GRAD_UNALIGNED_ONLY = [c for c in _WEIGHT_GRAD_UNALIGNED if c.num_warps == 8]
_GEMM_STRIDES = ["stride_src_b", "stride_src_c", "stride_src_h", "stride_src_w",
                 "stride_out_b", "stride_out_c", "stride_out_h", "stride_out_w"]
_WEIGHT_GRAD_STRIDES = ["stride_x_b", "stride_x_c", "stride_x_h", "stride_x_w",
                        "stride_g_b", "stride_g_c", "stride_g_h", "stride_g_w"]
# Keyed on channels and taps only, not on the map size: the configuration (and so every output's
# summation order) is the same for a whole map and for the cropped windows the fast sampler runs.
_implicit_gemm_tuned = triton.autotune(
    configs=_GEMM_CONFIGS + _GEMM_ANY_MAP_OTHER_TRITON,
    key=["SRC_C", "OUT_C", "KW", "NUM_TAPS", "TRANSPOSED"],
    prune_configs_by={
        "early_config_prune": fits_shared_memory(_masked_conv_implicit_gemm_kernel, _prune_gemm_configs)
    },
)(_masked_conv_implicit_gemm_kernel)
# The input gradient (the transposed launch), which the sampler never runs, is keyed on its strides as well, so
# that its prune can drop the tiles that spill where they are not multiples of 16.
_input_grad_tuned = triton.autotune(
    configs=_GEMM_CONFIGS + _GEMM_ANY_MAP_OTHER_TRITON,
    key=["SRC_C", "OUT_C", "KW", "NUM_TAPS", "TRANSPOSED", *_GEMM_STRIDES],
    prune_configs_by={
        "early_config_prune": fits_shared_memory(_masked_conv_implicit_gemm_kernel, _prune_input_grad_configs)
    },
)(_masked_conv_implicit_gemm_kernel)
_weight_grad_tuned = triton.autotune(
    configs=_WEIGHT_GRAD_CONFIGS,
    key=["C_IN", "C_OUT", "KW", "NUM_TAPS", *_WEIGHT_GRAD_STRIDES],
    prune_configs_by={
        "early_config_prune": fits_shared_memory(_masked_conv_weight_grad_kernel, _prune_weight_grad_configs)
    },
)(_masked_conv_weight_grad_kernel)
# Under the interpreter every tile is a numpy array: the smallest tiles tl.dot accepts are fastest.
_INTERPRETER_GEMM_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
_INTERPRETER_WEIGHT_GRAD_BLOCKS = {"BLOCK_CI": 16, "BLOCK_CO": 16, "BLOCK_M": 16}
# The weight gradient reduces over every pixel; its pixels are split so that about this many
# programs per SM share the reduction.
_WEIGHT_GRAD_PROGRAMS_PER_SM = 4
_MIN_PIXELS_PER_SPLIT = 1024


def _device_context(tensor: torch.Tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _packed_weight(weight: torch.Tensor, taps: int, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """The kept taps as ``[taps, C_in, C_out]`` (``[taps, C_out, C_in]`` when ``transposed``)."""
    out_channels, in_channels = weight.shape[:2]
    kept = weight.reshape(out_channels, in_channels, -1)[:, :, :taps]
    return kept.permute(2, 0, 1).to(dtype).contiguous() if transposed else kept.permute(2, 1, 0).to(dtype).contiguous()


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def _implicit_gemm_arguments(src, packed, bias, out, pad, kernel_width, taps, transposed):
    args = (
        src,
        packed,
        bias if bias is not None else out,  # never read without HAS_BIAS
        out,
        out.shape[0] * out.shape[2] * out.shape[3],
        src.shape[1],
        src.shape[2],
        src.shape[3],
        out.shape[1],
        out.shape[2],
        out.shape[3],
        pad[0],
        pad[1],
        *src.stride(),
        *packed.stride(),
        *out.stride(),
    )
    meta = dict(
        KW=kernel_width,
        NUM_TAPS=taps,
        TRANSPOSED=transposed,
        HAS_BIAS=bias is not None,
        DOT_PRECISION=dot_precision(packed.dtype, "conv"),
        DOT_IN_FP32=_dot_in_fp32(packed.dtype),
    )
    return args, meta


def _implicit_gemm(src, packed, bias, out, pad, kernel_width, taps, transposed) -> None:
    num_pixels = out.shape[0] * out.shape[2] * out.shape[3]
    if num_pixels == 0:
        return
    args, meta = _implicit_gemm_arguments(src, packed, bias, out, pad, kernel_width, taps, transposed)
    if interpreting():
        blocks = _INTERPRETER_GEMM_BLOCKS
        grid = (triton.cdiv(num_pixels, blocks["BLOCK_M"]), triton.cdiv(out.shape[1], blocks["BLOCK_N"]))
        _masked_conv_implicit_gemm_kernel[grid](*args, **meta, **blocks)
    else:
        grid = lambda cfg: (triton.cdiv(num_pixels, cfg["BLOCK_M"]), triton.cdiv(out.shape[1], cfg["BLOCK_N"]))  # noqa: E731
        with _device_context(out):
            (_input_grad_tuned if transposed else _implicit_gemm_tuned)[grid](*args, **meta)


def masked_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias, mask_type: str, padding: list[int]
) -> torch.Tensor:
    """Launches the forward. Inputs are checked by the caller; fp64 is not handled here."""
    dtype = promoted_dtype(x, weight, bias)
    out_channels, _, kernel_height, kernel_width = weight.shape
    out_height, out_width = output_size(x.shape[2], x.shape[3], kernel_height, kernel_width, padding)
    out = torch.empty(
        (x.shape[0], out_channels, out_height, out_width),
        dtype=dtype,
        device=x.device,
        memory_format=output_memory_format(x),
    )
    taps = num_taps(mask_type, kernel_height, kernel_width)
    packed = _packed_weight(weight, taps, False, dtype)
    src = x if x.dtype == dtype else x.to(dtype)
    _implicit_gemm(src, packed, bias, out, padding, kernel_width, taps, transposed=False)
    return out


def _weight_grad_splits(x: torch.Tensor, in_channels: int, out_channels: int, taps: int, num_pixels: int) -> int:
    if interpreting():
        return 1
    programs_per_split = taps * triton.cdiv(in_channels, 64) * triton.cdiv(out_channels, 64)
    with _device_context(x):
        target = _WEIGHT_GRAD_PROGRAMS_PER_SM * device_properties()["multiprocessor_count"]
    return max(1, min(triton.cdiv(target, programs_per_split), triton.cdiv(num_pixels, _MIN_PIXELS_PER_SPLIT)))


def _weight_grad_arguments(x, grad, weight, taps, padding, num_splits):
    """The fp32 workspace (one slice per split of the pixels) and the kernel's arguments."""
    out_channels, in_channels, _, kernel_width = weight.shape
    num_pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    # A multiple of every BLOCK_M, so each split's tiles line up and the last split is the short one.
    pixels_per_split = triton.cdiv(triton.cdiv(num_pixels, num_splits), 128) * 128
    num_splits = triton.cdiv(num_pixels, pixels_per_split)
    workspace = torch.empty((num_splits, taps, in_channels, out_channels), dtype=torch.float32, device=x.device)
    args = (
        x,
        grad,
        workspace,
        num_pixels,
        pixels_per_split,
        num_splits,
        in_channels,
        x.shape[2],
        x.shape[3],
        out_channels,
        grad.shape[2],
        grad.shape[3],
        padding[0],
        padding[1],
        *x.stride(),
        *grad.stride(),
        *workspace.stride(),
    )
    meta = dict(
        KW=kernel_width,
        NUM_TAPS=taps,
        DOT_PRECISION=dot_precision(grad.dtype, "conv"),
        DOT_IN_FP32=_dot_in_fp32(grad.dtype),
    )
    return workspace, args, meta


def _weight_grad(
    x: torch.Tensor, grad: torch.Tensor, weight: torch.Tensor, taps: int, padding: list[int]
) -> torch.Tensor:
    out_channels, in_channels, kernel_height, kernel_width = weight.shape
    grad_weight = torch.zeros((out_channels, in_channels, kernel_height * kernel_width), dtype=weight.dtype,
                              device=weight.device)
    num_pixels = grad.shape[0] * grad.shape[2] * grad.shape[3]
    if taps == 0 or num_pixels == 0:
        return grad_weight.reshape(weight.shape)
    num_splits = _weight_grad_splits(x, in_channels, out_channels, taps, num_pixels)
    workspace, args, meta = _weight_grad_arguments(x, grad, weight, taps, padding, num_splits)
    num_splits = workspace.shape[0]
    if interpreting():
        blocks = _INTERPRETER_WEIGHT_GRAD_BLOCKS
        grid = (triton.cdiv(in_channels, blocks["BLOCK_CI"]), triton.cdiv(out_channels, blocks["BLOCK_CO"]),
                taps * num_splits)
        _masked_conv_weight_grad_kernel[grid](*args, **meta, **blocks)
    else:
        grid = lambda cfg: (  # noqa: E731
            triton.cdiv(in_channels, cfg["BLOCK_CI"]), triton.cdiv(out_channels, cfg["BLOCK_CO"]), taps * num_splits
        )
        with _device_context(x):
            _weight_grad_tuned[grid](*args, **meta)
    grad_weight[:, :, :taps] = workspace.sum(dim=0).permute(2, 1, 0).to(weight.dtype)
    return grad_weight.reshape(weight.shape)


def masked_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mask_type: str,
    padding: list[int],
    compute_input_grad: bool,
    compute_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight)``; a gradient not asked for is an empty tensor."""
    dtype = promoted_dtype(x, weight, None)
    _, _, kernel_height, kernel_width = weight.shape
    taps = num_taps(mask_type, kernel_height, kernel_width)
    grad = grad_out if grad_out.dtype == dtype else grad_out.to(dtype)
    if compute_input_grad:
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
        if taps == 0:
            grad_x.zero_()
        else:
            packed = _packed_weight(weight, taps, True, dtype)
            _implicit_gemm(grad, packed, None, grad_x, padding, kernel_width, taps, transposed=True)
    else:
        grad_x = x.new_empty(0)
    if compute_weight_grad:
        src = x if x.dtype == dtype else x.to(dtype)
        grad_weight = _weight_grad(src, grad, weight, taps, padding)
    else:
        grad_weight = weight.new_empty(0)
    return grad_x, grad_weight


def compile_cases() -> list[CompileCase]:
    """The launches of the masked convolution, for ``tests/backends/test_aot_compile.py`` (see ``CompileCase``).

    The forward (with bias), the input gradient (``TRANSPOSED``) and the weight gradient, each in
    fp32 with cuDNN's default tf32 and with tf32 turned off (``tf32x3``) and in bf16, on 7 x 7
    type-B masks and 128 channels (so that every config is a candidate), NCHW; the fp16 forward;
    channels-last; a 3 x 3 type-A mask on 32 channels; Gated PixelCNN's 1 x 3 horizontal stack; and odd maps and
    channel counts (15 x 15, 13 x 13 and 7 x 7 maps; 3 x 3 and 5 x 5 masks on 96, 67 and 64 channels), whose
    strides Triton cannot specialise as multiples of 16, with every Triton.
    """
    cases = []

    def add(name, dtype=torch.float32, channels=128, kernel=(7, 7), mask="B", channels_last=False, tf32=True,
            kinds=("forward", "input grad", "weight grad"), size=16):
        x = torch.zeros(2, channels, size, size, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.zeros(channels, channels, *kernel, dtype=dtype)
        padding = [kernel[0] // 2, kernel[1] // 2]
        taps = num_taps(mask, *kernel)
        out = torch.empty_like(x)
        precision = {"DOT_PRECISION": "tf32" if tf32 or dtype != torch.float32 else "tf32x3"}
        for transposed, kind in ((False, "forward"), (True, "input grad")):
            if kind in kinds:
                packed = _packed_weight(weight, taps, transposed, dtype)
                bias = None if transposed else torch.zeros(channels, dtype=dtype)
                args, meta = _implicit_gemm_arguments(x, packed, bias, out, padding, kernel[1], taps, transposed)
                tuned = _input_grad_tuned if transposed else _implicit_gemm_tuned
                cases.append(CompileCase(f"{kind} {name}", tuned, args, {**meta, **precision}))
        if "weight grad" in kinds:
            _, args, meta = _weight_grad_arguments(x, out, weight, taps, padding, num_splits=2)
            cases.append(CompileCase(f"weight grad {name}", _weight_grad_tuned, args, {**meta, **precision}))

    add("fp32 tf32 7x7 B")
    add("fp32 tf32x3 7x7 B", tf32=False)
    add("bf16 7x7 B", torch.bfloat16)
    add("fp16 7x7 B", torch.float16, kinds=("forward",))
    add("bf16 7x7 B channels-last", torch.bfloat16, channels_last=True, kinds=("forward", "weight grad"))
    add("bf16 3x3 A 32 channels", torch.bfloat16, channels=32, kernel=(3, 3), mask="A")
    add("fp32 tf32 1x3 A horizontal", kernel=(1, 3), mask="A", kinds=("forward",))
    # Odd maps and channel counts: no stride divisible by 16, which Triton specialises on (the cases above have
    # them all divisible). With another Triton than the pinned one the forward and input gradient there take the
    # tile _GEMM_ANY_MAP_OTHER_TRITON.
    add("bf16 7x7 B 15x15", torch.bfloat16, size=15)
    add("fp32 tf32 3x3 B 96 channels 13x13", channels=96, kernel=(3, 3), size=13)
    add("fp32 tf32x3 3x3 B 96 channels 13x13", channels=96, kernel=(3, 3), size=13, tf32=False)
    add("bf16 5x5 A 64 channels 7x7", torch.bfloat16, channels=64, kernel=(5, 5), mask="A", size=7)
    add("fp32 tf32 5x5 B 67 channels 13x13", channels=67, kernel=(5, 5), size=13)
    add("bf16 7x7 B 15x15 channels-last", torch.bfloat16, channels_last=True, size=15, kinds=("weight grad",))
    return cases
