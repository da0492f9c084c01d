"""Parity checks shared by the op tests, each printing where a mismatch is.

Search parity is checked the way FAISS and cuVS check it: the chosen code's exact (float64)
distance must be within tolerance of the row's true minimum, and the index must match the
reference exactly wherever the best code beats the second best by more than that tolerance.
Low-precision results follow flash-attention's rule: their error against the float64 truth is at
most twice PyTorch's own error in that dtype, plus a small slack.
"""

from __future__ import annotations

import contextlib
import os

import torch

from fastvq import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = ("fp32", "fp16", "bf16")
METRICS = reference.METRICS

# The fp32 contract: the chosen code is within this of the best, relative to the row's distances.
FP32_SEARCH_RTOL = 1e-5
# Returned distances are recomputed in fp32 from the exactly upcast inputs, in every dtype.
DISTANCE_RTOL = 1e-5
DISTANCE_ATOL = 1e-6

_SHOWN_MISMATCHES = 8


def _describe_rows(rows: torch.Tensor, **columns: torch.Tensor) -> str:
    lines = []
    for row in rows[:_SHOWN_MISMATCHES].tolist():
        values = ", ".join(f"{name}={column[row].item():.6g}" for name, column in columns.items())
        lines.append(f"  row {row}: {values}")
    more = f"\n  ... and {rows.numel() - _SHOWN_MISMATCHES} more rows" if rows.numel() > _SHOWN_MISMATCHES else ""
    return "\n".join(lines) + more


def assert_rows(ok: torch.Tensor, what: str, **columns: torch.Tensor) -> None:
    """Fails with the first offending rows (and the given per-row columns) where ``ok`` is False."""
    bad = (~ok).nonzero().flatten()
    if bad.numel():
        raise AssertionError(f"{what}: {bad.numel()} of {ok.numel()} rows\n{_describe_rows(bad, **columns)}")


def row_scale(distances: torch.Tensor) -> torch.Tensor:
    """Each row's mean absolute finite distance: what 'relative to the row's distances' means."""
    finite = distances.isfinite()
    total = torch.where(finite, distances.abs(), 0).sum(dim=1)
    return total / finite.sum(dim=1).clamp_min(1) + 1e-30


def lowest_two(distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(best, best_index, second_best)`` per row of a float64 matrix; NaN counts as +inf."""
    clean = distances.nan_to_num(nan=float("inf"), posinf=float("inf"))
    best, best_index = clean.min(dim=1)
    if clean.shape[1] < 2:
        return best, best_index, torch.full_like(best, float("inf"))
    second = clean.topk(2, dim=1, largest=False).values[:, 1]
    return best, best_index, second


def search_error(distances: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each row's chosen distance minus its true best, from the float64 distance matrix."""
    best, _, _ = lowest_two(distances)
    return distances.gather(1, indices[:, None]).squeeze(1) - best


def search_tolerance(z: torch.Tensor, codebook: torch.Tensor, metric: str, truth: torch.Tensor) -> torch.Tensor:
    """Per-row tolerance on the chosen code's excess distance, for the promoted dtype."""
    dtype = torch.promote_types(z.dtype, codebook.dtype)
    scale = row_scale(truth)
    if dtype in (torch.float32, torch.float64):
        if metric == "cosine":  # fp32 resolves a cosine to an absolute sqrt(D) ulps of 1 (the contract)
            return torch.clamp_min(FP32_SEARCH_RTOL * scale, z.shape[1] ** 0.5 * torch.finfo(torch.float32).eps)
        return FP32_SEARCH_RTOL * scale
    torch_indices, _, _ = reference.nearest_code_ref(z, codebook, metric, upcast=False)
    torch_error = search_error(truth, torch_indices).max()
    # The slack, one unit of the dtype's precision relative to the row's distances, covers the
    # kernels rounding the centred codes to the input dtype, which PyTorch's own path does not do.
    return 2.0 * torch_error + torch.finfo(dtype).eps * scale


def assert_search_parity(
    z: torch.Tensor,
    codebook: torch.Tensor,
    metric: str,
    indices: torch.Tensor,
    distances: torch.Tensor,
    codes: torch.Tensor | None = None,
) -> None:
    """Checks one ``nearest_code`` result against the float64 truth for finite or NaN inputs.

    Rows whose every distance is NaN must get index 0 and distance NaN; every other row must
    choose a code within tolerance of its best, the best itself wherever the gap to the second
    best exceeds the tolerance, and report that code's true distance. ``codes`` must be exactly
    ``codebook[indices]`` in the promoted dtype.
    """
    num_rows = z.shape[0]
    out_dtype = torch.promote_types(z.dtype, codebook.dtype)
    assert indices.dtype == torch.int64, indices.dtype
    assert tuple(indices.shape) == (num_rows,), indices.shape
    assert distances.dtype == torch.float32, distances.dtype
    assert tuple(distances.shape) == (num_rows,), distances.shape
    assert indices.device == z.device and distances.device == z.device
    if codes is not None:
        assert codes.dtype == out_dtype and tuple(codes.shape) == tuple(z.shape), (codes.dtype, codes.shape)
        torch.testing.assert_close(codes, codebook.to(out_dtype)[indices], rtol=0, atol=0, equal_nan=True)
    if num_rows == 0:
        return
    indices, distances = indices.cpu(), distances.cpu()
    z, codebook = z.cpu(), codebook.cpu()
    assert_rows((indices >= 0) & (indices < codebook.shape[0]), "index out of range", index=indices)

    truth = reference.distance_matrix_ref(z, codebook, metric, upcast=True)
    all_nan = truth.isnan().all(dim=1)
    assert_rows(~all_nan | (indices == 0), "all-NaN row did not get index 0", index=indices)
    assert_rows(~all_nan | distances.isnan(), "all-NaN row did not get distance NaN", distance=distances)
    keep = ~all_nan
    truth, indices, distances = truth[keep], indices[keep], distances[keep]
    z, row_ids = z[keep], keep.nonzero().flatten()
    if not row_ids.numel():
        return

    best, best_index, second = lowest_two(truth)
    chosen = truth.gather(1, indices[:, None]).squeeze(1)
    error = torch.where(chosen == best, 0.0, chosen - best)  # inf - inf is no error
    tolerance = search_tolerance(z, codebook, metric, truth)
    tolerance = tolerance.expand_as(error)
    details = dict(row=row_ids.double(), index=indices, best_index=best_index, chosen=chosen, best=best,
                   error=error, tolerance=tolerance)
    assert_rows(chosen.isfinite() | ~best.isfinite(), "a NaN/inf distance won over a finite one", **details)
    assert_rows(error <= tolerance, "chosen code is farther than tolerance from the best", **details)
    clear_winner = (second - best) > tolerance
    assert_rows(~clear_winner | (indices == best_index), "index differs where the best code is clear", **details)

    distance_error = torch.where(distances.double() == chosen, 0.0, (distances.double() - chosen).abs())
    allowed = DISTANCE_RTOL * row_scale(truth) + DISTANCE_ATOL
    assert_rows(distance_error <= allowed, "returned distance is not the chosen code's true distance",
                row=row_ids.double(), returned=distances, true=chosen, allowed=allowed)


def assert_close_flash_rule(
    actual: torch.Tensor, torch_result: torch.Tensor, truth: torch.Tensor, name: str, *, slack: float
) -> None:
    """flash-attention's rule: ``max|actual - truth| <= 2 max|torch_result - truth| + slack``.

    ``torch_result`` is what PyTorch computes in the low-precision dtype; ``truth`` is computed
    in float32 or float64.
    """
    assert actual.shape == truth.shape, (name, actual.shape, truth.shape)
    error = (actual.double() - truth.double()).abs()
    torch_error = (torch_result.double() - truth.double()).abs().max() if truth.numel() else 0.0
    allowed = 2.0 * float(torch_error) + slack
    if error.numel() and float(error.max()) > allowed:
        worst = error.flatten().argmax()
        where = tuple(int(i) for i in torch.unravel_index(worst, error.shape))
        raise AssertionError(
            f"{name}: max error {float(error.max()):.3g} at {where} (got {actual.flatten()[worst].item():.6g}, "
            f"true {truth.flatten()[worst].item():.6g}) exceeds 2 x PyTorch's error {float(torch_error):.3g} "
            f"+ slack {slack:.3g}"
        )


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """Sets ``torch.use_deterministic_algorithms(enabled)`` for a block and restores the previous mode."""
    previous = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace_config = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS refuses deterministic mode without it
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=warn_only)
        if workspace_config is None:
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]


# --------------------------------------------------------------------------- inputs shared by the search tests

# One code repeated in different tiles of every tiling the kernels use (16 under the interpreter,
# 32 to 256 on GPUs), and a second one repeated inside a tile and across the end of one.
DUPLICATE_GROUPS = [(3, 3 + 16, 3 + 64, 3 + 128, 3 + 256), (40, 41, 63, 64, 299)]


# Inputs in every memory layout the ops accept without a copy: transposed, strided and image views.
IMAGE_BATCH, IMAGE_HEIGHT, IMAGE_WIDTH = 2, 3, 8
LAYOUT_ROWS = IMAGE_BATCH * IMAGE_HEIGHT * IMAGE_WIDTH


def transposed(x):
    return x.T.contiguous().T


def strided(x):
    """Every other row and every third column of a larger buffer, at a non-zero offset."""
    buffer = torch.full((2 * x.shape[0] + 1, 3 * x.shape[1]), float("nan"), dtype=x.dtype, device=x.device)
    view = buffer[1::2, 2::3]
    view.copy_(x)
    return view


def from_nchw_image(x):
    """A contiguous NCHW image of batch 1 read as ``[H*W, C]`` rows: a view with column stride H*W."""
    image = x.T.contiguous().reshape(1, x.shape[1], IMAGE_HEIGHT * IMAGE_BATCH, IMAGE_WIDTH)
    rows = image.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    assert rows.data_ptr() == image.data_ptr() and not rows.is_contiguous()
    return rows


def from_channels_last_image(x):
    """A channels-last ``(B, C, H, W)`` image flattened to rows the way the layers do it."""
    image = x.reshape(IMAGE_BATCH, IMAGE_HEIGHT, IMAGE_WIDTH, x.shape[1]).permute(0, 3, 1, 2)
    assert image.is_contiguous(memory_format=torch.channels_last)
    return image.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


Z_LAYOUTS = {"contiguous": lambda x: x, "transposed": transposed, "strided": strided, "nchw-image": from_nchw_image,
             "channels-last-image": from_channels_last_image}
CODEBOOK_LAYOUTS = {"contiguous": lambda x: x, "transposed": transposed, "strided": strided}


def layout_inputs(device, seed=10):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(LAYOUT_ROWS, 17, generator=generator).to(device)
    codebook = torch.randn(40, 17, generator=generator).to(device)
    return z, codebook
