"""HierarchicalVQ against vector-quantize-pytorch 1.32: the same state_dict and maps in, the same
reconstructions, per-scale indices, commitment loss, input and parameter gradients and EMA
codebooks out, over several training steps."""

from __future__ import annotations

import pytest
import torch

import fastvq.nn as ours

vqp = pytest.importorskip("vector_quantize_pytorch")

ATOL = 2e-5

CONFIGS = {
    "2d-shared": dict(dim=6, codebook_size=24, scales=(1, 2, 3, 5), accept_image_fmap=True, kmeans_init=False,
                      threshold_ema_dead_code=0),
    "2d-kmeans-levels": dict(dim=5, codebook_size=(8, 12, 16), scales=((1, 2), (2, 3), (4, 6)), shared_codebook=False,
                             accept_image_fmap=True, share_quant_resi=2, threshold_ema_dead_code=0, kmeans_iters=3),
    "1d-channel-last": dict(dim=4, codebook_size=16, scales=(1, 3, 9), channel_first=False, kmeans_init=False,
                            threshold_ema_dead_code=0, share_quant_resi=0, rotation_trick=True, commitment_weight=0.5),
}


def _pair(**config):
    torch.manual_seed(0)
    theirs = vqp.HierarchicalVQ(**config)
    mine = ours.HierarchicalVQ(**config)
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


def _shape(config, batch=3):
    spatial = {1: (9,), 2: (4, 6)}[2 if config.get("accept_image_fmap") else 1]
    if config.get("channel_first", True):
        return (batch, config["dim"], *spatial)
    return (batch, *spatial, config["dim"])


def _step(module, x, seed, **kwargs):
    leaf = x.clone().requires_grad_()
    torch.manual_seed(seed)  # the same k-means draws for both
    reconstruction, indices, loss = module(leaf, **kwargs)
    weight = torch.linspace(-1, 1, reconstruction.numel()).reshape(reconstruction.shape)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((reconstruction * weight).sum() + loss, [leaf, *params])
    return reconstruction, indices, loss, grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_hierarchical_vq_matches_vector_quantize_pytorch(name):
    config = CONFIGS[name]
    theirs, mine = _pair(**config)
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        x = torch.randn(_shape(config), generator=generator)
        mask = None
        if name == "1d-channel-last" and step == 1:
            mask = torch.rand(3, 9, generator=generator) > 0.3
        got_theirs, got_mine = _step(theirs, x, step, mask=mask), _step(mine, x, step, mask=mask)
        torch.testing.assert_close(got_mine[0], got_theirs[0], atol=ATOL, rtol=0)
        for a, b in zip(got_theirs[1], got_mine[1]):
            assert torch.equal(a, b)
        torch.testing.assert_close(got_mine[2], got_theirs[2], atol=ATOL, rtol=0)
        for a, b in zip(got_theirs[3], got_mine[3]):
            torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-5)
    for (key, a), b in zip(theirs.state_dict().items(), mine.state_dict().values()):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=1e-5, msg=lambda m: f"{key}: {m}")
    theirs.eval(), mine.eval()
    _, indices, _ = mine(x)
    torch.testing.assert_close(mine.get_output_from_indices(indices), theirs.get_output_from_indices(indices))


def test_hierarchical_vq_nested_dropout_matches_their_draw():
    config = dict(dim=4, codebook_size=16, scales=(1, 2, 4), accept_image_fmap=True, kmeans_init=False,
                  threshold_ema_dead_code=0, nested_dropout=0.7)
    theirs, mine = _pair(**config)
    x = torch.randn(2, 4, 4, 4)
    for seed in range(4):
        torch.manual_seed(seed)
        *got_theirs, cutoff_theirs = theirs(x, return_cutoff=True)
        torch.manual_seed(seed)
        *got_mine, cutoff_mine = mine(x, return_cutoff=True)
        assert cutoff_mine == cutoff_theirs
        torch.testing.assert_close(got_mine[0], got_theirs[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got_mine[2], got_theirs[2], atol=ATOL, rtol=0)


def test_hierarchical_vq_bad_arguments():
    with pytest.raises(ValueError, match="non-decreasing"):
        ours.HierarchicalVQ(dim=4, codebook_size=8, scales=(2, 1))
    with pytest.raises(ValueError, match="shared codebook"):
        ours.HierarchicalVQ(dim=4, codebook_size=(8, 16), scales=(1, 2))
    hvq = ours.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2), accept_image_fmap=True, kmeans_init=False)
    with pytest.raises(ValueError, match="dim = 4"):
        hvq(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        hvq(torch.randn(2, 4, 4, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(NotImplementedError):
        hvq(torch.randn(2, 4, 4, 4), indices=torch.zeros(2, 4))
