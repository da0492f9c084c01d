"""fastvq.nn.diffusers.VectorQuantizer against diffusers' own ``VectorQuantizer`` and ``VQModel``: strict
state_dict loads both ways, the same outputs, losses, indices and gradients (float64, where ``cdist`` and
fastvq's search cannot disagree on a near tie), remapping, and a default ``VQModel`` whose quantizer is
swapped for fastvq's giving the same codes and reconstructions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fastvq.nn.diffusers import VectorQuantizer

vae = pytest.importorskip("diffusers.models.autoencoders.vae", reason="diffusers is not installed")
vq_model = pytest.importorskip("diffusers.models.autoencoders.vq_model")

CODES, DIM = 37, 5


def pair(legacy=True, **kwargs):
    torch.manual_seed(0)
    original = vae.VectorQuantizer(CODES, DIM, 0.3, legacy=legacy, **kwargs).double()
    ours = VectorQuantizer.from_original(copy.deepcopy(original))
    return original, ours


def run(layer, z, upstream):
    z = z.clone().requires_grad_(True)
    layer.zero_grad()
    z_q, loss, info = layer(z)
    ((z_q * upstream).sum() + loss).backward()
    return z_q.detach(), loss.detach(), info, z.grad, layer.embedding.weight.grad


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "fixed"])
@pytest.mark.parametrize("sane_index_shape", [False, True], ids=["flat", "sane"])
def test_matches_diffusers_in_float64(legacy, sane_index_shape):
    original, ours = pair(legacy, sane_index_shape=sane_index_shape)
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(3, DIM, 4, 5, generator=generator, dtype=torch.float64) * 0.05
    upstream = torch.randn(z.shape, generator=generator, dtype=torch.float64)
    want = run(original, z, upstream)
    got = run(ours, z, upstream)
    assert got[2][:2] == (None, None) and want[2][:2] == (None, None)
    assert got[2][2].shape == want[2][2].shape and torch.equal(got[2][2], want[2][2])
    assert len(torch.unique(want[2][2])) > 5
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-15)
    assert got[0].is_contiguous()
    torch.testing.assert_close(got[1].double(), want[1], rtol=1e-6, atol=0)  # fastvq's loss is float32
    torch.testing.assert_close(got[3], want[3], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got[4], want[4], rtol=1e-6, atol=1e-12)


def test_float32_codes_and_codebook_entry():
    torch.manual_seed(0)
    original = vae.VectorQuantizer(CODES, DIM, 0.25)
    ours = VectorQuantizer.from_original(copy.deepcopy(original))
    z = torch.randn(2, DIM, 3, 3) * 0.05
    z_q, loss, (_, _, indices) = ours(z)
    want_q, want_loss, (_, _, want_indices) = original(z)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(z_q, want_q, rtol=0, atol=1e-7)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-9)
    for shape in [(2, 3, 3, DIM), None]:
        torch.testing.assert_close(ours.get_codebook_entry(indices, shape),
                                   original.get_codebook_entry(indices, shape), rtol=0, atol=0)


def test_state_dicts_load_strictly_both_ways(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.array([4, 0, 9, 33, 12, 7], dtype=np.int64))
    for kwargs in ({}, {"remap": str(path), "unknown_index": "extra"}):
        torch.manual_seed(0)
        original = vae.VectorQuantizer(CODES, DIM, 0.25, **kwargs)
        ours = VectorQuantizer(CODES, DIM, 0.25, **kwargs)
        assert list(ours.state_dict()) == list(original.state_dict())
        ours.load_state_dict(original.state_dict(), strict=True)
        torch.nn.init.normal_(ours.embedding.weight)
        original.load_state_dict(ours.state_dict(), strict=True)
        assert torch.equal(original.embedding.weight, ours.embedding.weight)
    assert (ours.vq_embed_dim, ours.n_e, ours.re_embed, ours.unknown_index) == (DIM, CODES, 7, 6)


@pytest.mark.parametrize("unknown_index", ["extra", 1])
def test_remap_matches_diffusers(tmp_path, unknown_index):
    path = tmp_path / "used.npy"
    np.save(path, np.array([4, 0, 9, 33, 12, 7, 20, 15, 2, 30], dtype=np.int64))
    original, ours = pair(remap=str(path), unknown_index=unknown_index)
    z = torch.randn(2, DIM, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    z_q, _, (_, _, indices) = ours(z)
    want_q, _, (_, _, want_indices) = original(z)
    assert indices.shape == want_indices.shape == (32, 1)
    assert torch.equal(indices, want_indices)
    if unknown_index == "extra":
        assert (want_indices == ours.re_embed - 1).any()
    shape = (2, 4, 4, DIM)
    torch.testing.assert_close(ours.get_codebook_entry(indices.reshape(-1), shape),
                               original.get_codebook_entry(indices.reshape(-1).clone(), shape), rtol=0, atol=0)


def test_errors_name_diffusers_arguments():
    with pytest.raises(ValueError, match="vq_embed_dim must be a positive int"):
        VectorQuantizer(8, 0, 0.25)
    expected = r"z must be a feature map \[B, vq_embed_dim=4, H, W\], got shape \(2, 3, 5, 5\)"
    with pytest.raises(ValueError, match=expected):
        VectorQuantizer(8, 4, 0.25)(torch.zeros(2, 3, 5, 5))


def test_vq_model_gives_the_same_codes_and_outputs_with_the_quantizer_swapped():
    torch.manual_seed(0)
    model = vq_model.VQModel().double().eval()
    swapped = copy.deepcopy(model)
    swapped.quantize = VectorQuantizer.from_original(model.quantize)
    assert isinstance(swapped.quantize, VectorQuantizer) and not swapped.quantize.training
    swapped.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(swapped.state_dict(), strict=True)
    torch.nn.init.normal_(model.quantize.embedding.weight, std=0.5)
    swapped.quantize.embedding.weight.data.copy_(model.quantize.embedding.weight)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        latents = model.encode(x).latents
        assert torch.equal(swapped.encode(x).latents, latents)
        _, _, (_, _, codes) = model.quantize(latents)
        _, _, (_, _, swapped_codes) = swapped.quantize(latents)
        assert torch.equal(swapped_codes, codes) and len(torch.unique(codes)) > 10
        want = model(x)
        got = swapped(x)
    torch.testing.assert_close(got.sample, want.sample, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.commit_loss.double(), want.commit_loss, rtol=1e-6, atol=0)
