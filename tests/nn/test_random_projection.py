"""RandomProjectionQuantizer against vector-quantize-pytorch 1.32: the same state_dict and input in,
the same indices and cross-entropy (value and input gradient) out."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")


@pytest.mark.parametrize("config", [
    dict(dim=12, codebook_size=40, codebook_dim=6),
    dict(dim=10, codebook_size=33, codebook_dim=4, num_codebooks=3, norm=False),
], ids=["one-codebook", "three-codebooks"])
def test_random_projection_quantizer_matches_vector_quantize_pytorch(config):
    torch.manual_seed(0)
    theirs = vqp.RandomProjectionQuantizer(**config)
    mine = ours.RandomProjectionQuantizer(**config)
    mine.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 17, config["dim"])
    indices = mine(x)
    assert torch.equal(indices, theirs(x))
    targets = torch.randint(0, config["codebook_size"], indices.shape)
    targets[0, :3] = -1  # ignored, as F.cross_entropy's ignore_index
    losses, grads = [], []
    for module in (theirs, mine):
        leaf = x.clone().requires_grad_()
        loss = module(leaf, indices=targets)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, leaf)[0])
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_random_projection_quantizer_bad_input():
    rpq = ours.RandomProjectionQuantizer(dim=8, codebook_size=16, codebook_dim=4)
    with pytest.raises(ValueError, match=r"\[B, n, 8\]"):
        rpq(torch.randn(2, 8))
    with pytest.raises(ValueError, match="indices"):
        rpq(torch.randn(2, 3, 8), indices=torch.zeros(2, 4, dtype=torch.long))
