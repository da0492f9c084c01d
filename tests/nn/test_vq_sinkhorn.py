"""``VectorQuantize(sinkhorn_iters=, sinkhorn_epsilon=)`` and ``ResidualVQ`` with them: in training the codes are
the balanced assignment (LC-Rec's min-max normalised costs, against the float64 reference), in eval and by
default the nearest code; a collapsed batch spreads over the codebook; the layer compiles with fullgraph."""

from __future__ import annotations

import pytest
import torch

import fastvq
from fastvq import reference
from fastvq.nn import ResidualVQ, VectorQuantize


def _collapsed_batch():
    generator = torch.Generator().manual_seed(0)
    return 0.05 * torch.randn(1, 96, 4, generator=generator) + 1.0


def _spread_codebook(layer):
    codes = torch.randn(layer._codebook.embed.shape, generator=torch.Generator().manual_seed(1))
    if layer.use_cosine_sim:  # a cosine codebook holds unit codes
        codes = torch.nn.functional.normalize(codes, dim=-1)
    with torch.no_grad():
        layer._codebook.embed.copy_(codes)


@pytest.mark.parametrize("use_cosine_sim", [False, True], ids=["l2", "cosine"])
def test_training_codes_are_the_balanced_assignment(use_cosine_sim):
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=8, sinkhorn_iters=30, sinkhorn_epsilon=0.05,
                           use_cosine_sim=use_cosine_sim, rotation_trick=False)
    _spread_codebook(layer)
    x = _collapsed_batch()
    codebook = layer._codebook.embed[0].clone()
    rows = torch.nn.functional.normalize(x[0], dim=-1) if use_cosine_sim else x[0]
    expected, _, _ = reference.sinkhorn_assign_ref(rows, codebook, epsilon=0.05, iters=30,
                                                   metric="cosine" if use_cosine_sim else "l2", normalize="minmax")
    layer.train()
    _, indices, loss = layer(x)
    assert torch.equal(indices[0], expected)
    assert indices.unique().numel() == 8  # the nearest code would give one or two codes to every row
    assert loss.requires_grad
    layer.eval()
    _, eval_indices, _ = layer(x)
    nearest = fastvq.nearest_code(rows, layer._codebook.embed[0], metric="cosine" if use_cosine_sim else "l2")[0]
    assert torch.equal(eval_indices[0], nearest)


def test_default_and_zero_epsilon_are_the_nearest_code():
    x = _collapsed_batch()
    for kwargs in (dict(), dict(sinkhorn_iters=10, sinkhorn_epsilon=0.0)):
        torch.manual_seed(0)
        layer = VectorQuantize(dim=4, codebook_size=8, **kwargs)
        _spread_codebook(layer)
        codebook = layer._codebook.embed[0].clone()
        _, indices, _ = layer(x)
        assert torch.equal(indices[0], fastvq.nearest_code(x[0], codebook)[0])


def test_residual_vq_balances_every_level():
    torch.manual_seed(0)
    layer = ResidualVQ(dim=4, num_quantizers=2, codebook_size=8, sinkhorn_iters=30, sinkhorn_epsilon=0.05,
                       rotation_trick=False)
    for level in layer.layers:
        assert level.sinkhorn_iters == 30 and level.sinkhorn_epsilon == 0.05
        _spread_codebook(level)
    codebook = layer.layers[0]._codebook.embed[0].clone()
    x = _collapsed_batch()
    _, indices, _ = layer(x)
    expected, _, _ = reference.sinkhorn_assign_ref(x[0], codebook, epsilon=0.05, iters=30, normalize="minmax")
    assert torch.equal(indices[0, :, 0], expected)
    assert indices[0, :, 1].unique().numel() >= 6


@pytest.mark.parametrize("kwargs, message", [(dict(sinkhorn_iters=-1), "sinkhorn_iters"),
                                             (dict(sinkhorn_iters=1.5), "sinkhorn_iters"),
                                             (dict(sinkhorn_epsilon=-0.1), "sinkhorn_epsilon")])
def test_bad_options_name_themselves(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VectorQuantize(dim=4, codebook_size=8, **kwargs)


def test_compiles_without_graph_break():
    torch.manual_seed(0)
    layer = VectorQuantize(dim=4, codebook_size=8, sinkhorn_iters=3, sinkhorn_epsilon=0.1, rotation_trick=False)
    _spread_codebook(layer)
    x = torch.randn(2, 16, 4, requires_grad=True)
    eager = layer(x)
    torch.manual_seed(0)
    compiled_layer = VectorQuantize(dim=4, codebook_size=8, sinkhorn_iters=3, sinkhorn_epsilon=0.1,
                                    rotation_trick=False)
    _spread_codebook(compiled_layer)
    # aot_eager: graph capture and the operators' fake functions are what this checks.
    compiled = torch.compile(compiled_layer, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[2], eager[2])
    torch.testing.assert_close(compiled_layer._codebook.embed, layer._codebook.embed)
