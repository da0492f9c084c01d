"""Precision at the edges of the contract (issue 11, item 7): float64 losses, cosine distances
that rounding would push below zero, the fp32 range, and the oracle's own NaN and Inf cases."""

from __future__ import annotations

import pytest
import torch
from _parity import DTYPE_IDS, DTYPES, METRICS, assert_search_parity, row_scale

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
    codebook = codebook.to(device=device, dtype=dtype)
    _, distances = fastvq.nearest_code(z, codebook, metric="cosine")
    _, top_distances = fastvq.nearest_codes(z, codebook, 2, metric="cosine")
    for name, found in (("nearest_code", distances), ("nearest_codes", top_distances[:, 0])):
        assert found.min() >= 0, (f"{name}: {int((found < 0).sum())} negative distances, "
                                  f"the least {float(found.min()):.3g}")


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


# --------------------------------------------------------------------------- fp32 cosine far from the origin


def _grid(num_rows, num_codes, dim, shift, seed):
    """Values on a 1/1024 grid in [-4, 4] shifted by ``shift``: exact in fp32 up to a few thousand."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randint(-4096, 4097, (num_rows, dim), generator=generator) / 1024.0 + shift
    codebook = torch.randint(-4096, 4097, (num_codes, dim), generator=generator) / 1024.0 + shift
    return z, codebook


@pytest.mark.parametrize("shift", [1000.0, -3000.0])
def test_fp32_cosine_far_from_the_origin_holds_its_absolute_rule(backend, device, shift):
    """Far from the origin every ``1 - cos`` is ~1e-6, a few fp32 ulps of 1: the search (and plain
    PyTorch) misses the 1e-5 rule relative to the row's distances, and the contract is absolute
    for cosine: within ``sqrt(D) * 2^-23`` of the best (measured: at most half of that)."""
    z, codebook = _grid(127, 129, 17, shift, seed=14)
    truth = reference.distance_matrix_ref(z, codebook, "cosine")
    best = truth.min(dim=1).values
    relative_rule = 1e-5 * row_scale(truth)
    plain, _, _ = reference.nearest_code_ref(z, codebook, "cosine", upcast=False)
    plain_error = truth.gather(1, plain[:, None]).squeeze(1) - best
    assert (plain_error > relative_rule).any(), "the relative rule alone would hold here: the test shows nothing"

    indices, distances, codes = fastvq.nearest_code(z.to(device), codebook.to(device), metric="cosine",
                                                    return_codes=True)
    error = truth.gather(1, indices.cpu()[:, None]).squeeze(1) - best
    absolute_rule = 17**0.5 * torch.finfo(torch.float32).eps
    assert float(error.max()) <= absolute_rule, (float(error.max()), absolute_rule)
    assert_search_parity(z.to(device), codebook.to(device), "cosine", indices, distances, codes)


# --------------------------------------------------------------------------- the fp32 range


def _scaled(scale, seed=15):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(50, 17, generator=generator) * scale, torch.randn(40, 17, generator=generator) * scale


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_contract_holds_at_the_top_of_the_fp32_range(backend, device, dtype, metric):
    """Norms up to about 1e19, squared distances up to 1e38: just under fp32's largest, 3.4e38."""
    z, codebook = (x.to(dtype).to(device) for x in _scaled(1e18))
    assert reference.distance_matrix_ref(z, codebook, "l2").max() < torch.finfo(torch.float32).max
    assert_search_parity(z, codebook, metric, *fastvq.nearest_code(z, codebook, metric=metric, return_codes=True))


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_the_contract_holds_at_the_bottom_of_the_fp32_range(backend, device, metric):
    """Entries about 1e-19: squared distances about 1e-37, above fp32's smallest normal (1.2e-38)."""
    z, codebook = (x.to(device) for x in _scaled(1e-19))
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert_search_parity(z, codebook, metric, indices, distances, codes)
    truth = reference.distance_matrix_ref(z.cpu(), codebook.cpu(), metric).gather(1, indices.cpu()[:, None])
    torch.testing.assert_close(distances.cpu().double(), truth.squeeze(1), rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("metric", METRICS)
def test_beyond_the_fp32_range_nothing_crashes_and_l2_says_inf(backend, device, metric):
    """Above it (norms ~4e20) squares overflow: every index is still a code, the codes are those
    codes, and l2's distance is Inf, fp32's rounding of the true one; inputs are not rescaled."""
    z, codebook = (x.to(device) for x in _scaled(1e20))
    indices, distances, codes = fastvq.nearest_code(z, codebook, metric=metric, return_codes=True)
    assert ((indices >= 0) & (indices < codebook.shape[0])).all()
    assert torch.equal(codes, codebook[indices])
    if metric == "l2":
        assert distances.isinf().all() and (distances > 0).all(), distances


@pytest.mark.parametrize("metric", ["l2", "dot"])
def test_beneath_the_fp32_range_distances_are_zero_and_tie(backend, device, metric):
    """Below it (entries ~1e-24) squares and products underflow to 0: every code ties at distance 0
    (the true one rounded to fp32), and a tie goes to the lowest index, 0."""
    z, codebook = (x.to(device) for x in _scaled(1e-24))
    indices, distances = fastvq.nearest_code(z, codebook, metric=metric)
    assert torch.equal(distances.cpu(), torch.zeros(50)), distances
    assert not indices.any(), indices
