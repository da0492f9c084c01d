"""Every layer of fastvq.nn takes an empty batch (N = 0), in training and in eval, as vector-quantize-pytorch's
VectorQuantize and ResidualVQ do: outputs with a batch axis of 0 (issue 23, R12). A loss that is a mean over the
batch is whatever the layer's formula gives for no rows (vector-quantize-pytorch's layers give NaN there too)."""

from __future__ import annotations

import pytest
import torch
from vector_quantize_pytorch import ResidualVQ as TheirResidualVQ
from vector_quantize_pytorch import VectorQuantize as TheirVectorQuantize

import fastvq.nn as fnn

D = 4
LAYERS = {
    "BinaryMapper": (lambda: fnn.BinaryMapper(bits=3), (0, 5, 3)),
    "EvoLFQ": (lambda: fnn.EvoLFQ(torch.nn.Identity(), torch.nn.Identity(), dim=D, codebook_size=16), (0, 5, D)),
    "FSP": (lambda: fnn.FSP(levels=[3, 3]), (0, 5, 2)),
    "FSQ": (lambda: fnn.FSQ(levels=[3, 5]), (0, 5, 2)),
    "FSQ-channel-first": (lambda: fnn.FSQ(levels=[3, 5]), (0, 2, 3, 3)),
    "FactorizedL2Quantizer": (lambda: fnn.FactorizedL2Quantizer(dim=D, codebook_size=8), (0, 3, D)),
    "GroupedResidualFSQ": (lambda: fnn.GroupedResidualFSQ(dim=D, levels=[3, 3], num_quantizers=2, groups=2), (0, 5, D)),
    "GroupedResidualLFQ": (lambda: fnn.GroupedResidualLFQ(dim=D, num_quantizers=2, codebook_size=4, groups=2),
                           (0, 5, D)),
    "GroupedResidualVQ": (lambda: fnn.GroupedResidualVQ(dim=D, num_quantizers=2, codebook_size=8, groups=2),
                          (0, 5, D)),
    "GumbelQuantize": (lambda: fnn.GumbelQuantize(D, 8, D), (0, D, 3, 3)),
    "HierarchicalVQ": (lambda: fnn.HierarchicalVQ(dim=D, codebook_size=8, scales=[1, 2]), (0, D, 4)),
    "IBQ": (lambda: fnn.IBQ(8, D), (0, D, 3, 3)),
    "LFQ": (lambda: fnn.LFQ(dim=D), (0, 5, D)),
    "LFQ-image": (lambda: fnn.LFQ(dim=D), (0, D, 3, 3)),
    "LatentQuantize": (lambda: fnn.LatentQuantize(levels=[3, 3], dim=D), (0, D, 5)),
    "MaskedConv2d": (lambda: fnn.MaskedConv2d("B", D, D, 3, padding=1), (0, D, 5, 5)),
    "RandomProjectionQuantizer": (lambda: fnn.RandomProjectionQuantizer(dim=D, codebook_size=8, codebook_dim=4),
                                  (0, 5, D)),
    "ResidualFSQ": (lambda: fnn.ResidualFSQ(dim=D, levels=[3, 3], num_quantizers=2), (0, 5, D)),
    "ResidualLFQ": (lambda: fnn.ResidualLFQ(dim=D, num_quantizers=2, codebook_size=4), (0, 5, D)),
    "ResidualSimVQ": (lambda: fnn.ResidualSimVQ(dim=D, num_quantizers=2, codebook_size=8), (0, 5, D)),
    "ResidualVQ": (lambda: fnn.ResidualVQ(dim=D, num_quantizers=2, codebook_size=8), (0, 5, D)),
    "SimVQ": (lambda: fnn.SimVQ(dim=D, codebook_size=8), (0, 5, D)),
    "VectorQuantize": (lambda: fnn.VectorQuantize(dim=D, codebook_size=8), (0, 5, D)),
    "VectorQuantize-heads": (
        lambda: fnn.VectorQuantize(dim=D, codebook_size=8, heads=2, separate_codebook_per_head=True), (0, 5, D)
    ),
    "VectorQuantizer2": (lambda: fnn.VectorQuantizer2(8, D, beta=0.25), (0, D, 3, 3)),
    "VectorQuantizerEMA": (lambda: fnn.VectorQuantizerEMA(embedding_dim=D, num_embeddings=8, commitment_cost=0.25,
                                                          decay=0.99), (0, 3, 3, D)),
}


def test_every_layer_is_listed():
    layers = {name for name in dir(fnn) if name[0].isupper() and issubclass(getattr(fnn, name), torch.nn.Module)}
    # Codebook is VectorQuantize's state, Sequential a container, GatedMaskedConv2d takes two stacks (below).
    listed = {name.split("-")[0] for name in LAYERS} | {"Codebook", "Sequential", "GatedMaskedConv2d"}
    assert layers <= listed, f"layers without an empty-batch case: {sorted(layers - listed)}"


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_an_empty_batch_passes_through_every_layer(name, training):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().train(training)
    out = layer(torch.randn(shape))
    outputs = _tensors(out)
    assert outputs[0].shape[0] == 0, f"{name}: the first output has shape {tuple(outputs[0].shape)}"


def test_gated_masked_conv_takes_an_empty_batch():
    layer = fnn.GatedMaskedConv2d(D, 3)
    v, h = torch.randn(0, D, 5, 5), torch.randn(0, D, 5, 5)
    out_v, out_h, _ = layer(v, h)
    assert out_v.shape == (0, D, 5, 5) and out_h.shape == (0, D, 5, 5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vector_quantize_and_residual_vq_match_vector_quantize_pytorch_on_an_empty_batch(training):
    x = torch.randn(0, 5, D)
    for ours, theirs in ((fnn.VectorQuantize(dim=D, codebook_size=8), TheirVectorQuantize(dim=D, codebook_size=8)),
                         (fnn.ResidualVQ(dim=D, num_quantizers=2, codebook_size=8),
                          TheirResidualVQ(dim=D, num_quantizers=2, codebook_size=8))):
        ours.train(training)
        theirs.train(training)
        for mine, their in zip(ours(x), theirs(x)):
            assert mine.shape == their.shape
