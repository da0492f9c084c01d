"""``soft_entropy`` at sharp temperatures (issue 23, R8): logits of 1e5 and more whose differences
are of order 1. Each row's entropy stays in ``[0, log K]`` and ``mean_probs`` sums to 1, on the
backends that implement it (cpp routes it to the PyTorch path)."""

from __future__ import annotations

import math

import pytest
import torch

import fastvq


def near_tied_inputs():
    """Rows far along code 0, with codes 1-8 copies of code 0 scaled by 1 +- 1e-5: at T = 1e-5 the
    logits reach 1e7 while nine codes share the probability."""
    generator = torch.Generator().manual_seed(3)
    codebook = torch.randn(37, 16, generator=generator)
    codebook[1:9] = codebook[0] * (1 + 1e-5 * torch.randn(8, 1, generator=generator))
    z = 10 * codebook[0] + 1e-3 * torch.randn(64, 16, generator=generator)
    return z, codebook


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("temperature", [1e-3, 1e-4, 1e-5])
@pytest.mark.parametrize("metric", ["dot", "l2", "cosine", "euclidean"])
def test_sharp_entropies_are_bounded_and_mean_probs_sum_to_one(backend, device, metric, temperature):
    z, codebook = near_tied_inputs()
    row_entropy, mean_probs = fastvq.functional.soft_entropy(
        z.to(device), codebook.to(device), metric=metric, temperature=temperature
    )
    assert row_entropy.min() >= 0 and row_entropy.max() <= math.log(codebook.shape[0]), row_entropy
    assert (mean_probs >= 0).all()
    assert abs(mean_probs.double().sum().item() - 1) < 1e-5, mean_probs.sum().item()
