"""ResidualSimVQ against vector-quantize-pytorch 1.32: the same state_dict and inputs in, the same
outputs, indices, losses and gradients out, over SGD steps that train the code transforms.

fastvq's fused op accumulates the loss and the codebook gradient in float32 for every input dtype,
so after the first step the float64 trajectories agree to float32 precision (``ATOL``)."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")

ATOL = 1e-6


def _pair(**kwargs):
    torch.manual_seed(0)
    theirs = vqp.ResidualSimVQ(**kwargs).double()
    mine = ours.ResidualSimVQ(**kwargs).double()
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


@pytest.mark.parametrize("config", [
    dict(dim=6, num_quantizers=3, codebook_size=37),
    dict(dim=5, num_quantizers=2, codebook_size=20, rotation_trick=False, channel_first=True,
         input_to_quantize_commit_loss_weight=0.5, frozen_codebook_dim=7),
    dict(dim=4, num_quantizers=4, codebook_size=16, quantize_dropout=True, quantize_dropout_cutoff_index=1),
], ids=["rotation-trick", "straight-through-channel-first", "quantize-dropout"])
def test_residual_simvq_matches_vector_quantize_pytorch(config):
    theirs, mine = _pair(**config)
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.5) for module in (theirs, mine)]
    shape = (2, config["dim"], 3, 5) if config.get("channel_first") else (2, 13, config["dim"])
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
        results = []
        for module, optimizer in zip((theirs, mine), optimizers):
            leaf = x.clone().requires_grad_()
            quantized, indices, losses, codes = module(leaf, return_all_codes=True,
                                                       rand_quantize_dropout_fixed_seed=step)
            optimizer.zero_grad()
            ((quantized * torch.linspace(-1, 1, quantized.numel(), dtype=torch.float64).reshape(quantized.shape)).sum()
             + losses.sum()).backward()
            optimizer.step()
            results.append((quantized, indices, losses, codes, leaf.grad))
        for position, (a, b) in enumerate(zip(*results)):
            if position == 2:  # fastvq's fused op returns its loss in float32 for every input dtype
                assert b.dtype == torch.float32
                torch.testing.assert_close(b.double(), a, atol=ATOL, rtol=0)
            elif a.is_floating_point():
                torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
            else:
                assert torch.equal(a, b)
    for a, b in zip(theirs.parameters(), mine.parameters()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0)
    indices = results[1][1]
    torch.testing.assert_close(mine.get_output_from_indices(indices), theirs.get_output_from_indices(indices))


def test_residual_simvq_rejects_heads():
    with pytest.raises(ValueError, match="heads"):
        ours.ResidualSimVQ(dim=4, num_quantizers=2, codebook_size=8, heads=2)
