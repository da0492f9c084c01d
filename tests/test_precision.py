"""Precision at the edges of the contract (issue 11, item 7): float64 losses, cosine distances
that rounding would push below zero, the fp32 range, and the oracle's own NaN and Inf cases."""

from __future__ import annotations

import pytest
import torch
from _parity import DTYPE_IDS, DTYPES, METRICS, assert_search_parity

import fastvq
from fastvq import reference

# --------------------------------------------------------------------------- float64 losses


@pytest.mark.parametrize("metric", METRICS)
def test_float64_loss_is_computed_in_float64(backend, device, metric):
    """Rows 1e-3 from their codes, 50 from the origin: rounding z and e to fp32 before subtracting
    loses about 1e-5 of the loss; in float64 the only error is the fp32 loss's own rounding. The
    codes all have norm 50, so dot picks the nearby code too."""
    if backend[0] == "triton":
        pytest.skip("the Triton kernels take fp32, fp16 and bf16 (fp64 runs on the PyTorch path under auto)")
    generator = torch.Generator().manual_seed(11)
    directions = 1.0 + 0.1 * torch.randn(16, 24, dtype=torch.float64, generator=generator)
    codebook = 50 * torch.nn.functional.normalize(directions, dim=1)
    z = codebook[torch.randint(16, (300,), generator=generator)]
    z = z + 1e-3 * torch.randn(300, 24, dtype=torch.float64, generator=generator)
    _, indices, loss = fastvq.vector_quantize(z.to(device), codebook.to(device), beta=0.25, metric=metric)
    true = ((z - codebook[indices.cpu()]) ** 2).mean() * 1.25
    assert loss.dtype == torch.float32
    relative_error = float((loss.double().cpu() - true).abs() / true)
    assert relative_error <= 2 * torch.finfo(torch.float32).eps, relative_error


# --------------------------------------------------------------------------- cosine >= 0


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cosine_distance_is_never_negative(backend, device, dtype):
    """Rows parallel to a code (scaled copies) have 1 - cos = 0 exactly; rounding puts the computed
    value a few ulps either side of 0, and the contract clamps it at 0 as l2's is."""
    generator = torch.Generator().manual_seed(12)
    codebook = torch.randn(64, 19, generator=generator)
    scales = torch.rand(400, 1, generator=generator) * 10 + 0.1
    z = (codebook[torch.arange(400) % 64] * scales).to(device=device, dtype=dtype)
    _, distances = fastvq.nearest_code(z, codebook.to(device=device, dtype=dtype), metric="cosine")
    assert distances.min() >= 0, f"{int((distances < 0).sum())} negative distances, the least {float(distances.min()):.3g}"


# --------------------------------------------------------------------------- the oracle's NaN and Inf


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
def test_oracle_and_kernels_agree_on_a_zero_row_against_infinite_codes(backend, device):
    """``|0 - e|^2`` is Inf for an infinite code, which every backend returns; the oracle's
    ``z^2 + e^2 - 2 z.e`` made it ``inf - 0 * inf`` = NaN, an all-NaN row it expected distance NaN for."""
    inf = float("inf")
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    codebook = torch.tensor([[inf, 1.0, 0.0], [-inf, 0.0, 0.0]])
    truth = reference.distance_matrix_ref(z, codebook, "l2")
    assert torch.equal(truth, torch.full((2, 2), inf)), truth
    indices, distances, codes = fastvq.nearest_code(z.to(device), codebook.to(device), return_codes=True)
    assert_search_parity(z.to(device), codebook.to(device), "l2", indices, distances, codes)
    assert torch.equal(distances.cpu(), torch.full((2,), inf)) and not indices.any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_oracle_and_kernels_agree_that_a_bad_row_changes_only_its_code(backend, device, bad):
    """A NaN or Inf row changes its own code's sum; ``one_hot.T @ z`` spread ``0 * nan`` to all."""
    generator = torch.Generator().manual_seed(13)
    z = torch.randn(40, 7, generator=generator)
    indices = torch.randint(5, (40,), generator=generator)
    z[9, 2] = bad
    counts, sums = fastvq.segment_reduce(z.to(device), indices.to(device), 5)
    expected_counts, expected_sums = reference.segment_reduce_ref(z, indices, 5)
    others = torch.arange(5) != indices[9]
    assert expected_sums[others].isfinite().all(), expected_sums
    assert torch.equal(expected_sums[indices[9], 2].isnan(), torch.tensor(bad != bad))
    torch.testing.assert_close(counts.cpu(), expected_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums.cpu(), expected_sums, equal_nan=True)
