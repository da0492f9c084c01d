"""Arguments that used to pass the checks and then gave NaN, a silent fallback or a dispatcher error (issue 23):
each now gets a clear error naming the argument before any kernel runs, or works."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastvq
from fastvq.nn import LFQ, ResidualVQ


def test_a_python_int_seed_works_as_the_same_seed_tensor():
    z, codebook = torch.randn(20, 4), torch.randn(9, 4)
    as_int = fastvq.nearest_code(z, codebook, sample_temperature=1.0, seed=5)
    as_tensor = fastvq.nearest_code(z, codebook, sample_temperature=1.0, seed=torch.tensor(5))
    assert torch.equal(as_int[0], as_tensor[0])
    top = fastvq.nearest_codes(z, codebook, 3, sample_temperature=1.0, seed=5)
    assert torch.equal(top[0], fastvq.nearest_codes(z, codebook, 3, sample_temperature=1.0, seed=torch.tensor(5))[0])
    soft = fastvq.soft_quantize(z, codebook, gumbel=True, seed=5)
    assert torch.equal(soft[1], fastvq.soft_quantize(z, codebook, gumbel=True, seed=torch.tensor(5))[1])
    vq = fastvq.vector_quantize(z, codebook, sample_temperature=1.0, seed=5)
    assert torch.equal(vq[1], as_tensor[0])


@pytest.mark.parametrize("temperature", [1e-320, 1e-39])
def test_a_temperature_below_the_smallest_normal_float32_is_refused(temperature):
    z, codebook = torch.randn(5, 4), torch.randn(7, 4)
    with pytest.raises(ValueError, match="^temperature must be 0 or at least 1.17549e-38"):
        fastvq.soft_quantize(z, codebook, temperature=temperature)
    with pytest.raises(ValueError, match="^temperature must be"):
        fastvq.soft_entropy(z, codebook, temperature=temperature)
    with pytest.raises(ValueError, match="^sample_temperature must be 0 or at least"):
        fastvq.nearest_code(z, codebook, sample_temperature=temperature)
    soft, _, lse = fastvq.soft_quantize(z, codebook, temperature=1e-30)  # small but normal: finite
    assert torch.isfinite(soft).all() and torch.isfinite(lse).all()


def test_an_ema_eps_whose_smoothing_overflows_float32_is_refused():
    codebook = torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"^eps must keep K \* eps finite in float32 \(K = 5\), got 1e\+300"):
        fastvq.ema_update_(codebook, torch.ones(5), codebook.clone(), torch.randn(3, 4), torch.tensor([0, 1, 2]),
                           decay=0.9, eps=1e300)
    assert torch.isfinite(codebook).all()


@pytest.mark.parametrize("inv_temperature", [float("nan"), 0.0, -1.0])
def test_lfq_refuses_an_inverse_temperature_that_is_not_positive(inv_temperature):
    layer = LFQ(dim=4, entropy_loss_weight=0.1)
    with pytest.raises(ValueError, match="^inv_temperature must be"):
        layer(torch.randn(2, 3, 4), inv_temperature=inv_temperature)


@pytest.mark.parametrize("beam_size", [-1, 0, 2.5])
def test_residual_vq_refuses_a_forward_beam_size_that_is_not_positive(beam_size):
    layer = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8)
    with pytest.raises(ValueError, match="^beam_size must be a positive int or None"):
        layer(torch.randn(2, 3, 4), beam_size=beam_size)


def test_kmeans_refuses_meta_tensors():
    with pytest.raises(ValueError, match="^x must hold data"):
        fastvq.kmeans(torch.empty(10, 3, device="meta"), 2)
    with pytest.raises(ValueError, match="^x must hold data"):
        fastvq.kmeans(torch.randn(10, 3), 2, device="meta")


@pytest.mark.parametrize("options", [{}, {"batch_size": 8}, {"init": "random"}])
def test_kmeans_takes_data_that_requires_grad(options):
    x = torch.nn.Parameter(torch.randn(40, 3))
    result = fastvq.kmeans(x, 3, iters=3, seed=0, **options)
    expected = fastvq.kmeans(x.detach(), 3, iters=3, seed=0, **options)
    assert not result.centroids.requires_grad
    torch.testing.assert_close(result.centroids, expected.centroids)


def test_kmeans_blames_overflow_not_nan_for_finite_data_that_is_too_large():
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)) * 1e30
    with pytest.raises(ValueError, match="x is finite") as error:
        fastvq.kmeans(x, 3, iters=2, seed=0)
    assert "NaN" not in str(error.value)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fastvq.kmeans(torch.tensor([[float("nan"), 0.0]] * 4 + [[1.0, 2.0]] * 4), 2, iters=2, seed=0)
